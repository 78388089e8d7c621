//! The producer protocol against the real daemon: answers, errors, pipelining and isolation.

use std::time::Duration;

use serde_json::json;
use zoomq::sandbox::SandboxConfig;

use crate::helpers::{edit, sandbox, Client, TestDaemon, Tweaks};

#[tokio::test]
async fn edits_are_acknowledged_and_coalesced() {
    let zoom = sandbox(SandboxConfig::default()).await;
    // Hold deliveries so coalescing is observable: the token endpoint is slow.
    zoom.set_token_delay(Duration::from_secs(3));
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    assert_eq!(
        client.call(&json!({"op": "ping"})).await,
        json!({"ok": true})
    );
    let first = client.call(&edit("m1", "acct", "v1")).await;
    assert_eq!(first["ok"], true);
    assert_eq!(first["coalesced"], false);
    let job_id = first["job_id"].as_str().unwrap().to_string();
    let second = client.call(&edit("m2", "acct", "w1")).await;
    assert_eq!(second["coalesced"], false);
    // m1 is pending or in flight; if pending it coalesces into the same job.
    let third = client.call(&edit("m1", "acct", "v2")).await;
    assert_eq!(third["ok"], true);
    if third["coalesced"] == true {
        assert_eq!(third["job_id"], job_id.as_str());
    }
    let stats = client.call(&json!({"op": "stats"})).await;
    assert_eq!(stats["ok"], true);
    assert_eq!(stats["accepted"], 3);
    assert!(stats["pending"].as_u64().unwrap() + stats["in_flight"].as_u64().unwrap() <= 3);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    let mut batch = Vec::new();
    for i in 0..500 {
        let request = if i % 50 == 7 {
            json!({"op": "ping"})
        } else {
            edit(&format!("pipe-{i}"), "acct", "x")
        };
        batch.extend(serde_json::to_vec(&request).unwrap());
        batch.push(b'\n');
    }
    client.send_raw(&batch).await;
    let mut last_job = 0u64;
    for i in 0..500 {
        let answer = client.answer().await;
        assert_eq!(answer["ok"], true, "{answer}");
        if i % 50 == 7 {
            assert!(
                answer.get("job_id").is_none(),
                "answer {i} out of order: {answer}"
            );
        } else {
            let job: u64 = answer["job_id"].as_str().unwrap().parse().unwrap();
            assert!(job > last_job, "answers out of order");
            last_job = job;
        }
    }
}

#[tokio::test]
async fn every_bad_input_gets_its_specific_error_and_the_connection_goes_on() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = Tweaks::default().set("socket", "max_line_bytes", "4096");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (b"not json\n".to_vec(), "bad_request", "invalid JSON"),
        (b"{\"op\":\"ping\xff\"}\n".to_vec(), "bad_request", "UTF-8"),
        (b"\n".to_vec(), "bad_request", "empty line"),
        (b"[1,2]\n".to_vec(), "bad_request", "expected a JSON object"),
        (b"{\"op\":\"teleport\"}\n".to_vec(), "bad_request", "unknown operation"),
        (
            br#"{"op":"edit","account_id":"a","robot_jid":"r","content":{"a":1}}"#.to_vec(),
            "bad_request",
            "`message_id` or `ref` is missing",
        ),
        (
            br#"{"op":"edit","message_id":"m","account_id":"a","robot_jid":"r","content":{}}"#.to_vec(),
            "bad_request",
            "empty",
        ),
        (
            br#"{"op":"edit","message_id":"m","account_id":"a","robot_jid":"r","content":"hi"}"#.to_vec(),
            "bad_request",
            "expected a JSON object",
        ),
        (
            br#"{"op":"edit","message_id":"m","account_id":"","robot_jid":"r","content":{"a":1}}"#.to_vec(),
            "bad_request",
            "`account_id`: expected a non-empty string",
        ),
        (
            br#"{"op":"edit","message_id":"m","account_id":"a","robot_jid":"r","content":{"a":1},"extra":1}"#.to_vec(),
            "bad_request",
            "unknown field `extra`",
        ),
        (
            format!(r#"{{"op":"edit","message_id":"{}","account_id":"a","robot_jid":"r","content":{{"a":1}}}}"#, "m".repeat(300)).into_bytes(),
            "bad_request",
            "at most 256",
        ),
        (
            format!(r#"{{"op":"edit","message_id":"m","account_id":"a","robot_jid":"r","content":{{"a":"{}"}}}}"#, "x".repeat(10_000)).into_bytes(),
            "too_large",
            "longer than 4096 bytes",
        ),
    ];
    for (bytes, code, needle) in cases {
        let mut line = bytes.clone();
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        client.send_raw(&line).await;
        let answer = client.answer().await;
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"], code, "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
        // The same connection still works after every error.
        assert_eq!(client.call(&json!({"op": "ping"})).await["ok"], true);
    }
    // Nothing bad was accepted, and a good edit still is.
    assert_eq!(client.call(&edit("good", "a", "x")).await["ok"], true);
    assert_eq!(daemon.stats().await["accepted"], 1);
}

#[tokio::test]
async fn a_huge_line_a_silent_client_and_many_idle_ones_block_no_one() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = Tweaks::default().set("socket", "write_timeout", "\"2s\"");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    // 1,000 idle connections (raise this process's open-file limit for them first).
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(Client::connect(&daemon.socket).await.unwrap());
    }
    // A client that sends many requests and never reads its answers.
    let mut silent = daemon.client().await;
    let silent_task = tokio::spawn(async move {
        let mut line = serde_json::to_vec(&json!({"op": "stats"})).unwrap();
        line.push(b'\n');
        let burst: Vec<u8> = line.repeat(20_000);
        // This write blocks once the socket buffers fill, and fails once the daemon gives up
        // on this client (socket.write_timeout); both are the point.
        let write = tokio::io::AsyncWriteExt::write_all(&mut silent.writer, &burst);
        let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        silent
    });
    // A client streaming a 100 MiB line while we test.
    let mut huge = daemon.client().await;
    let huge_task = tokio::spawn(async move {
        huge.send_raw(b"{\"op\":\"edit\",\"content\":\"").await;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            huge.send_raw(&chunk).await;
        }
        huge.send_raw(b"\"}\n").await;
        let answer = huge.answer().await;
        assert_eq!(answer["error"], "too_large", "{answer}");
        assert_eq!(huge.call(&json!({"op": "ping"})).await["ok"], true);
    });
    // Meanwhile a normal producer is served promptly.
    let mut normal = daemon.client().await;
    for i in 0..50 {
        let started = std::time::Instant::now();
        let answer = normal.call(&edit(&format!("n{i}"), "a", "x")).await;
        assert_eq!(answer["ok"], true);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "producer was blocked"
        );
    }
    huge_task.await.unwrap();
    drop(silent_task.await.unwrap());
    // The idle ones are still connected and served.
    assert_eq!(idle[999].call(&json!({"op": "ping"})).await["ok"], true);
    drop(idle);
    // The daemon's memory stayed bounded while reading 100 MiB in one line and serving
    // 1,000 connections.
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(rss_kib < 200 * 1024, "peak RSS {rss_kib} KiB");
}

#[tokio::test]
async fn queue_full_is_reported() {
    let zoom = sandbox(SandboxConfig::default()).await;
    zoom.set_token_delay(Duration::from_secs(5));
    let tweaks = Tweaks::default().set("storage", "max_pending", "3");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    let mut full = None;
    for i in 0..10 {
        let answer = client.call(&edit(&format!("q{i}"), "a", "x")).await;
        if answer["ok"] == false {
            full = Some(answer);
            break;
        }
    }
    let full = full.expect("the queue must fill up");
    assert_eq!(full["error"], "queue_full");
    assert!(full["message"]
        .as_str()
        .unwrap()
        .contains("storage.max_pending"));
}
