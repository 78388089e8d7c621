//! Stopping: SIGTERM ends the daemon within its budget whatever hangs (every request to Zoom,
//! the token endpoint, a producer that does not read its answers, a half-sent line, a
//! half-sent scrape), and nothing acknowledged is lost: after a restart against a Zoom that
//! answers, every message shows its last acknowledged edit.
//!
//! The stop takes about `zoomq::SHUTDOWN_GRACE_MAX` (1 s) plus a commit. The tests only
//! require less than [`PROMPT`], far enough above that for a loaded machine and far enough
//! below the 10 s the daemon used to wait (`delivery.shutdown_timeout`'s default, which
//! [`tweaks`] sets explicitly).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zoomq::sandbox::{Faults, SandboxConfig};

use crate::helpers::{edit, sandbox, shown, TestDaemon, Tweaks};

/// What the tests require of a stop.
const PROMPT: Duration = Duration::from_secs(5);
/// Longer than any test: a request or token request that takes this long hangs.
const HOUR: Duration = Duration::from_secs(3600);

/// The defaults where they matter here: a 10 s `shutdown_timeout`, and requests that only
/// the stop ends (no request timeout fires during a test).
fn tweaks() -> Tweaks {
    Tweaks::default()
        .set("delivery", "shutdown_timeout", "\"10s\"")
        .set("zoom", "request_timeout", "\"10m\"")
}

/// Zoom takes every edit request and never answers it (until the client goes away).
fn hanging() -> Faults {
    Faults {
        slow: 1.0,
        slow_min: HOUR,
        slow_max: HOUR,
        ..Faults::default()
    }
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM; asserts a clean exit within [`PROMPT`] and returns how long it took.
fn stop_promptly(daemon: &mut TestDaemon) -> Duration {
    let (status, took) = daemon.terminate_timed();
    let log = daemon.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(took < PROMPT, "the stop took {took:?}\n{log}");
    eprintln!("SIGTERM to exit: {took:?}");
    took
}

#[tokio::test]
async fn sigterm_abandons_requests_zoom_never_answers_and_loses_nothing() {
    let zoom = sandbox(SandboxConfig {
        faults: hanging(),
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, tweaks()).await;
    let mut client = daemon.client().await;
    let messages: Vec<(String, &str)> = (0..8)
        .map(|i| {
            (
                format!("hang{i}"),
                if i % 2 == 0 { "acct-a" } else { "acct-b" },
            )
        })
        .collect();
    for (message, account) in &messages {
        let answer = client.call(&edit(message, account, "v1")).await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
    wait_for(
        "every message's first edit to hang at Zoom",
        Duration::from_secs(10),
        || {
            messages
                .iter()
                .all(|(m, _)| zoom.message(m).is_some_and(|r| r.requests == 1))
        },
    )
    .await;
    // Newer edits wait behind the hanging ones (never two requests for one message); the
    // last one of each message is what Zoom must show in the end.
    for text in ["v2", "v3"] {
        for (message, account) in &messages {
            let answer = client.call(&edit(message, account, text)).await;
            assert_eq!(answer["ok"], true, "{answer}");
        }
    }
    let stats = daemon.stats().await;
    assert_eq!(stats["in_flight"], 8, "{stats}");
    assert_eq!(stats["pending"], 8, "{stats}");

    stop_promptly(&mut daemon);
    assert!(
        daemon
            .log()
            .contains("abandoning the requests to Zoom still in flight"),
        "{}",
        daemon.log()
    );

    // Zoom answers again: the restarted daemon sends each message's last edit.
    zoom.set_faults(Faults::default());
    daemon.spawn().await;
    let stats = daemon.drained(Duration::from_secs(20)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    for (message, _) in &messages {
        assert_eq!(shown(&zoom, message).as_deref(), Some("v3"), "{message}");
        let record = zoom.message(message).unwrap();
        // The abandoned request ended with the daemon, before the restart's one began.
        assert_eq!(record.max_concurrent, 1, "{record:?}");
    }
}

#[tokio::test]
async fn sigterm_is_prompt_while_the_token_endpoint_hangs() {
    let zoom = sandbox(SandboxConfig {
        token_delay: HOUR,
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, tweaks()).await;
    let mut client = daemon.client().await;
    for i in 0..4 {
        let answer = client.call(&edit(&format!("tok{i}"), "acct", "last")).await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
    wait_for("a token request", Duration::from_secs(10), || {
        zoom.stats().token_requests >= 1
    })
    .await;

    stop_promptly(&mut daemon);

    zoom.set_token_delay(Duration::ZERO);
    daemon.spawn().await;
    daemon.drained(Duration::from_secs(20)).await;
    for i in 0..4 {
        assert_eq!(shown(&zoom, &format!("tok{i}")).as_deref(), Some("last"));
    }
}

/// Where the daemon serves metrics, from its start-up log line.
fn metrics_addr(log: &str) -> std::net::SocketAddr {
    log.lines()
        .find(|line| line.contains("serving /metrics"))
        .and_then(|line| line.split("addr=").nth(1))
        .and_then(|addr| addr.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
}

/// Edits the silent producer sends, for [`SILENT_MESSAGES`] messages in turn; the content of
/// edit `i` is `i`, so answers (in request order) say which edit each acknowledges.
const SILENT_EDITS: usize = 20_000;
const SILENT_MESSAGES: usize = 4;

#[tokio::test]
async fn sigterm_is_prompt_with_a_silent_producer_a_half_sent_line_and_a_half_sent_scrape() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = tweaks().set("metrics", "listen", "\"127.0.0.1:0\"");
    let mut daemon = TestDaemon::start(&zoom, tweaks).await;
    let metrics_addr = metrics_addr(&daemon.log());

    // A producer that pipelines many edits and reads nothing until the daemon has stopped:
    // the daemon's answers fill the socket's buffers and its writes block
    // (socket.write_timeout is 30 s).
    let silent = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .unwrap();
    let (mut silent_reader, mut silent_writer) = silent.into_split();
    let silent_task = tokio::spawn(async move {
        let mut burst = Vec::new();
        for i in 0..SILENT_EDITS {
            let message = format!("silent{}", i % SILENT_MESSAGES);
            let mut line = serde_json::to_vec(&edit(&message, "acct", &i.to_string())).unwrap();
            line.push(b'\n');
            burst.extend_from_slice(&line);
        }
        // Blocks once the buffers are full; fails once the daemon closes the connection.
        let _ = silent_writer.write_all(&burst).await;
        silent_writer
    });
    // A producer in the middle of a line.
    let mut half_line = daemon.client().await;
    half_line
        .send_raw(br#"{"op":"edit","message_id":"half","account_id":"acct","#)
        .await;
    // A scraper in the middle of its request.
    let mut scrape = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: zoomq\r\n")
        .await
        .unwrap();

    // Wait until the daemon is stuck writing to the silent producer: it stops reading (and
    // accepting) that producer's edits. `accepted` then stays put well below SILENT_EDITS.
    let mut observer = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut unchanged) = (0, 0);
    while unchanged < 10 {
        assert!(
            Instant::now() < deadline,
            "the silent producer never blocked the daemon"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let accepted = observer.call(&serde_json::json!({"op": "stats"})).await["accepted"]
            .as_u64()
            .unwrap();
        unchanged = if accepted == last && accepted > 0 {
            unchanged + 1
        } else {
            0
        };
        last = accepted;
    }
    assert!(
        last < SILENT_EDITS as u64,
        "the daemon never blocked: {last} accepted"
    );
    drop(observer);

    stop_promptly(&mut daemon);

    // The half-sent line got no answer, only the end of the connection; so did the scrape.
    assert!(half_line.try_answer().await.is_none());
    let mut byte = [0; 1];
    let scraped = tokio::time::timeout(Duration::from_secs(5), scrape.read(&mut byte)).await;
    assert!(matches!(scraped, Ok(Ok(0) | Err(_))), "{scraped:?}");
    // The silent producer reads what it was sent: complete lines are true answers (a line the
    // daemon was cut off writing is incomplete). What follows is the end of the connection
    // (or a reset: the daemon left some of its edits unread).
    let mut received = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        match silent_reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
        }
    }
    drop(silent_task.await.unwrap());
    let complete = match received.iter().rposition(|b| *b == b'\n') {
        Some(end) => &received[..end],
        None => &received[..0],
    };
    let mut acked: HashMap<String, usize> = HashMap::new();
    let mut answered = 0;
    for (i, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let answer: Value = serde_json::from_slice(line).unwrap();
        answered += 1;
        if answer["ok"] == true {
            acked.insert(format!("silent{}", i % SILENT_MESSAGES), i);
        } else {
            assert_eq!(answer["error"], "unavailable", "{answer}");
        }
    }
    assert!(
        answered > 0 && answered < SILENT_EDITS,
        "{answered} answers"
    );
    assert_eq!(acked.len(), SILENT_MESSAGES, "{acked:?}");

    // After a restart each message shows its last acknowledged edit, or a later one that
    // was committed without its answer reaching the producer; the half-sent line nothing.
    daemon.spawn().await;
    daemon.drained(Duration::from_secs(20)).await;
    for (message, last_acked) in &acked {
        let shown: usize = shown(&zoom, message)
            .unwrap_or_else(|| panic!("{message} never reached Zoom"))
            .parse()
            .unwrap();
        assert!(
            shown >= *last_acked,
            "{message}: Zoom shows edit {shown}, but edit {last_acked} was acknowledged"
        );
    }
    assert!(zoom.message("half").is_none());
}
