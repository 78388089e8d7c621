//! Crash safety: SIGKILL the real daemon at random moments while producers write and the
//! dispatcher delivers, restart it, and check that nothing acknowledged is ever lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use zoomq::sandbox::{Faults, SandboxConfig};

use crate::helpers::{edit, sandbox, shown, Client, TestDaemon, Tweaks};

fn failing() -> Faults {
    Faults {
        error_5xx: 1.0,
        ..Faults::default()
    }
}

#[tokio::test]
async fn an_acknowledged_edit_survives_sigkill() {
    let zoom = sandbox(SandboxConfig {
        faults: failing(),
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let answer = daemon
        .client()
        .await
        .call(&edit("survivor", "a", "kept"))
        .await;
    assert_eq!(answer["ok"], true);
    daemon.kill();
    daemon.spawn().await;
    let stats = daemon.stats().await;
    assert_eq!(
        stats["pending"].as_u64().unwrap() + stats["in_flight"].as_u64().unwrap(),
        1,
        "{stats}"
    );
    zoom.set_faults(Faults::default());
    daemon.drained(Duration::from_secs(20)).await;
    assert_eq!(shown(&zoom, "survivor").as_deref(), Some("kept"));
}

/// Per message, the highest edit number acknowledged to its producer.
type Acked = Arc<Mutex<HashMap<String, u64>>>;

/// A producer that owns `messages` message ids and edits them round-robin with increasing
/// numbers, pipelining up to 16 requests, reconnecting whenever the daemon goes away. Producer
/// `id` uses account `acct{id % accounts}`.
async fn producer(
    socket: std::path::PathBuf,
    id: usize,
    messages: usize,
    accounts: usize,
    acked: Acked,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let Ok(mut client) = Client::connect(&socket).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        // Send a window of edits, then read their answers.
        let mut sent = Vec::new();
        let mut failed = false;
        for _ in 0..16 {
            n += 1;
            let message = format!("p{id}-m{}", n % messages as u64);
            let mut line = serde_json::to_vec(&edit(
                &message,
                &format!("acct{}", id % accounts),
                &n.to_string(),
            ))
            .unwrap();
            line.push(b'\n');
            if tokio::io::AsyncWriteExt::write_all(&mut client.writer, &line)
                .await
                .is_err()
            {
                failed = true;
                break;
            }
            sent.push((message, n));
        }
        for (message, number) in sent {
            if failed {
                break;
            }
            match client.try_answer().await {
                Some(answer) if answer["ok"] == true => {
                    let mut acked = acked.lock().unwrap();
                    let entry = acked.entry(message).or_insert(0);
                    *entry = (*entry).max(number);
                }
                Some(answer) => {
                    // Refusals are allowed (e.g. shutting down); they are not acknowledgements.
                    assert_eq!(answer["ok"], false);
                }
                None => failed = true,
            }
        }
    }
}

#[tokio::test]
async fn random_sigkills_under_load_lose_nothing_acknowledged() {
    let kills: usize = std::env::var("ZOOMQ_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let zoom = sandbox(SandboxConfig {
        faults: Faults {
            error_5xx: 0.2,
            ..Faults::default()
        },
        default_plan: zoomq::plan::Plan::Business,
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let acked: Acked = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let producers: Vec<_> = (0..8)
        .map(|id| {
            tokio::spawn(producer(
                daemon.socket.clone(),
                id,
                12,
                3,
                acked.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut rng = rand::rng();
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
        if round % 3 == 2 {
            // Kill it during its graceful shutdown (draining, committing, closing sled).
            daemon.signal_term();
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        }
        // Under this load the commit thread is busy most of the time, so most kills land in
        // the middle of a group commit.
        daemon.kill();
        daemon.spawn().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    for producer in producers {
        producer.await.unwrap();
    }
    // One more kill with everything quiet, then let it drain without faults.
    daemon.kill();
    daemon.spawn().await;
    let stats = daemon.stats().await;
    let acked = acked.lock().unwrap().clone();
    assert!(
        stats["pending"].as_u64().unwrap() <= acked.len() as u64,
        "more pending jobs than messages: duplicates? {stats}"
    );
    zoom.set_faults(Faults::default());
    let stats = daemon.drained(Duration::from_secs(60)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    assert!(
        acked.len() >= 8 * 6,
        "producers made too little progress: {}",
        acked.len()
    );
    check_delivered(&zoom, &acked);
}

/// Checks that Zoom shows, for every message, at least its last acknowledged edit, and never
/// had two requests for it at once.
fn check_delivered(zoom: &zoomq::sandbox::Sandbox, acked: &HashMap<String, u64>) {
    for (message, number) in acked {
        let shown: u64 = shown(zoom, message)
            .unwrap_or_else(|| panic!("{message} never reached Zoom"))
            .parse()
            .unwrap();
        assert!(
            shown >= *number,
            "{message}: Zoom shows edit {shown}, but edit {number} was acknowledged"
        );
        let record = zoom.message(message).unwrap();
        assert!(
            record.max_concurrent <= 1,
            "{message} had {} requests in flight",
            record.max_concurrent
        );
    }
}

/// Kills that land while recovery runs in the background: a backlog of thousands of messages
/// that Zoom keeps refusing (5xx: retried, so their entries are rewritten), producers editing
/// them throughout (content arriving during recovery), and every restart killed within a few
/// milliseconds of its socket answering.
#[tokio::test]
async fn sigkills_during_recovery_lose_nothing_acknowledged() {
    let zoom = sandbox(SandboxConfig {
        faults: failing(),
        default_plan: zoomq::plan::Plan::Business,
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let acked: Acked = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let producers: Vec<_> = (0..8)
        .map(|id| {
            let (socket, acked, stop) = (daemon.socket.clone(), acked.clone(), stop.clone());
            tokio::spawn(producer(socket, id, 500, 8, acked, stop))
        })
        .collect();
    let started = std::time::Instant::now();
    while acked.lock().unwrap().len() < 3_000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "too slow a fill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rng = rand::rng();
    let mut during_recovery = 0;
    for _ in 0..12 {
        daemon.kill();
        daemon.spawn_answering().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..15))).await;
        // A stats call costs a round trip; the kill follows it at once.
        if daemon.stats().await["recovering"] == true {
            during_recovery += 1;
        }
    }
    assert!(
        during_recovery > 0,
        "no kill landed while recovery ran: the backlog is too small to test it"
    );
    stop.cancel();
    for producer in producers {
        producer.await.unwrap();
    }
    daemon.kill();
    daemon.spawn().await;
    zoom.set_faults(Faults::default());
    let stats = daemon.drained(Duration::from_secs(120)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    let acked = acked.lock().unwrap().clone();
    check_delivered(&zoom, &acked);
}

#[tokio::test]
async fn a_kill_during_a_dead_letter_retry_loses_nothing() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let mut daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    // 150 edits that Zoom rejects (unknown message ids): all become dead letters.
    for i in 0..150 {
        client
            .call(&edit(
                &format!("missing-{i}"),
                &format!("acct{}", i % 3),
                "v",
            ))
            .await;
    }
    let stats = daemon.drained(Duration::from_secs(30)).await;
    assert_eq!(stats["dead"], 150);
    // Zoom learns the messages; an operator retries everything and the daemon dies meanwhile.
    zoom.configure(|c| c.missing_prefix = None);
    let socket = daemon.socket.clone();
    let retry = tokio::spawn(async move {
        let mut client = crate::helpers::Client::connect(&socket).await.unwrap();
        client
            .send(&serde_json::json!({"op": "dead_retry", "all": true}))
            .await;
        client.try_answer().await
    });
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..40))).await;
    daemon.kill();
    let _ = retry.await;
    daemon.spawn().await;
    // Every edit is exactly once either dead or pending/delivered: never lost, never both.
    let stats = daemon.stats().await;
    let delivered = (0..150)
        .filter(|i| shown(&zoom, &format!("missing-{i}")).is_some())
        .count() as u64;
    let dead = stats["dead"].as_u64().unwrap();
    let queued = stats["pending"].as_u64().unwrap() + stats["in_flight"].as_u64().unwrap();
    assert!(
        dead + queued + delivered >= 150,
        "lost edits: {stats}, delivered {delivered}"
    );
    assert!(
        dead + queued <= 150,
        "an edit is both dead and queued: {stats}"
    );
    // Finish the retry; everything arrives and nothing stays dead.
    let mut client = daemon.client().await;
    client
        .call(&serde_json::json!({"op": "dead_retry", "all": true}))
        .await;
    let stats = daemon.drained(Duration::from_secs(30)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    for i in 0..150 {
        assert_eq!(shown(&zoom, &format!("missing-{i}")).as_deref(), Some("v"));
    }
}
