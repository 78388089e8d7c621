//! Crash and fault campaigns for the whole life of a message: producers send, edit by ref and
//! delete while Zoom fails (also after applying a send) and the daemon is SIGKILLed; nothing
//! acknowledged is lost, and with `delivery.send_in_doubt = "dead"` no ref ever has two
//! messages at Zoom. Plus the one kill that matters most for a send: after Zoom posted it and
//! before the daemon could write its id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use zoomq::sandbox::{Faults, Sandbox, SandboxConfig, Scripted};

use crate::helpers::{sandbox, Client, TestDaemon, Tweaks};

const ROBOT: &str = "bot@xmpp.zoom.us";

fn request(op: &str, reference: &str, text: Option<&str>) -> Value {
    let mut request = json!({"op": op, "ref": reference, "account_id": "acct", "robot_jid": ROBOT});
    if let Some(text) = text {
        request["content"] = json!({"head": {"text": text}});
    }
    if op == "send" {
        // One channel per ref: the sandbox's messages to it are the ref's messages.
        request["to_jid"] = json!(format!("{reference}@conf"));
    }
    request
}

/// What a producer had acknowledged for one ref.
#[derive(Debug, Clone, Default)]
struct Acked {
    /// The highest content number acknowledged.
    last: u64,
    deleted: bool,
}

type Ledger = Arc<Mutex<HashMap<String, Acked>>>;

/// A producer with four refs at a time: sends each, edits it by ref, now and then deletes it
/// and starts a new one. One request at a time, reconnecting whenever the daemon goes away.
/// A ref whose delete got no answer is retired unchecked (it may or may not be deleted).
async fn producer(
    socket: std::path::PathBuf,
    id: usize,
    ledger: Ledger,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = 0u64;
    let mut generation = [0u32; 4];
    let mut sent = [false; 4];
    let mut client: Option<Client> = None;
    while !stop.is_cancelled() {
        let Some(connected) = client.as_mut() else {
            match Client::connect(&socket).await {
                Ok(connected) => client = Some(connected),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
            continue;
        };
        let k = rand::rng().random_range(0..4);
        let reference = format!("p{id}-r{k}-g{}", generation[k]);
        n += 1;
        let text = n.to_string();
        let delete = sent[k] && rand::rng().random_bool(0.1);
        let op = match (sent[k], delete) {
            (false, _) => "send",
            (true, false) => "edit",
            (true, true) => "delete",
        };
        let line = request(op, &reference, (!delete).then_some(text.as_str()));
        let mut bytes = serde_json::to_vec(&line).unwrap();
        bytes.push(b'\n');
        let written = tokio::io::AsyncWriteExt::write_all(&mut connected.writer, &bytes).await;
        let answer = match written {
            Ok(()) => connected.try_answer().await,
            Err(_) => None,
        };
        if delete {
            // Whatever the answer, this ref is done.
            generation[k] += 1;
            sent[k] = false;
        }
        match answer {
            Some(answer) if answer["ok"] == true => {
                let mut ledger = ledger.lock().unwrap();
                let acked = ledger.entry(reference).or_default();
                if delete {
                    acked.deleted = true;
                } else {
                    acked.last = acked.last.max(n);
                    sent[k] = true;
                }
            }
            Some(answer) => {
                // Refusals while the daemon stops are allowed; they are not acknowledgements.
                assert_eq!(answer["error"], "unavailable", "{line} → {answer}");
            }
            None => {
                client = None;
                if delete {
                    // Maybe deleted, maybe not: nothing to check about this ref.
                    ledger.lock().unwrap().remove(&reference);
                }
                // A send or edit without an answer may or may not count; the checks only ask
                // for what was acknowledged (a send repeated later is an upsert either way).
            }
        }
    }
}

/// What `status` says of a ref.
async fn status(daemon: &TestDaemon, reference: &str) -> Value {
    daemon
        .client()
        .await
        .call(&request("status", reference, None))
        .await
}

fn number(message: &zoomq::sandbox::MessageRecord) -> u64 {
    message.content.as_ref().expect("content")["head"]["text"]
        .as_str()
        .expect("text")
        .parse()
        .expect("a number")
}

/// Every acknowledged operation is visible at Zoom on the message zoomq knows for its ref.
/// Returns the refs held as dead letters (only with `send_in_doubt = "dead"`).
async fn check_acknowledged(
    zoom: &Sandbox,
    daemon: &TestDaemon,
    ledger: &HashMap<String, Acked>,
) -> usize {
    let mut held = 0;
    for (reference, acked) in ledger {
        let status = status(daemon, reference).await;
        if status["state"] == "dead" {
            held += 1;
            continue;
        }
        let message = status["message_id"]
            .as_str()
            .and_then(|id| zoom.message(id));
        if acked.deleted {
            assert_eq!(status["state"], "deleted", "{reference}: {status}");
            if let Some(message) = message {
                assert!(message.deleted, "{reference}: deleted but shown at Zoom");
            }
            continue;
        }
        assert_eq!(status["state"], "sent", "{reference}: {status}");
        let message = message.unwrap_or_else(|| panic!("{reference}: its message is not at Zoom"));
        assert!(
            number(&message) >= acked.last,
            "{reference}: Zoom shows {} but {} was acknowledged",
            number(&message),
            acked.last
        );
    }
    for message in zoom.messages() {
        assert!(message.max_concurrent <= 1, "{message:?}");
    }
    held
}

/// Waits until everything that can go has gone: nothing in flight, and every acknowledged
/// ref sent, deleted, or held as a dead letter (its content waits with it, pending for good).
async fn settle(daemon: &TestDaemon, ledger: &HashMap<String, Acked>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    'look: loop {
        assert!(
            std::time::Instant::now() < deadline,
            "did not settle: {}",
            daemon.stats().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let stats = daemon.stats().await;
        if stats["in_flight"] != 0 || stats["recovering"] != false {
            continue;
        }
        for reference in ledger.keys() {
            let state = status(daemon, reference).await["state"].clone();
            if !(state == "sent" || state == "deleted" || state == "dead") {
                continue 'look;
            }
        }
        return;
    }
}

/// Messages per ref at Zoom.
fn messages_per_ref(zoom: &Sandbox) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in zoom.messages() {
        if let Some(to_jid) = &message.to_jid {
            *counts.entry(to_jid.clone()).or_default() += 1;
        }
    }
    counts
}

async fn campaign(
    faults: Faults,
    tweaks: Tweaks,
    kills: usize,
) -> (Sandbox, TestDaemon, HashMap<String, Acked>) {
    let zoom = sandbox(SandboxConfig {
        faults: faults.clone(),
        default_plan: zoomq::plan::Plan::Business,
        ..SandboxConfig::default()
    })
    .await;
    let mut daemon = TestDaemon::start(&zoom, tweaks).await;
    let ledger: Ledger = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let producers: Vec<_> = (0..6)
        .map(|id| {
            tokio::spawn(producer(
                daemon.socket.clone(),
                id,
                ledger.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let mut rng = rand::rng();
    if kills == 0 {
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        daemon.kill();
        daemon.spawn().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    for producer in producers {
        producer.await.unwrap();
    }
    // Delivery finishes without faults (but the ones already in flight).
    zoom.set_faults(Faults::default());
    let ledger = ledger.lock().unwrap().clone();
    settle(&daemon, &ledger).await;
    assert!(
        ledger.len() >= 30,
        "producers made too little progress: {}",
        ledger.len()
    );
    assert!(
        ledger.values().any(|a| a.deleted),
        "no delete was acknowledged"
    );
    (zoom, daemon, ledger)
}

#[tokio::test]
async fn sigkills_while_messages_are_sent_edited_and_deleted_lose_nothing_acknowledged() {
    let kills: usize = std::env::var("ZOOMQ_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let faults = Faults {
        error_5xx: 0.15,
        reset_after_apply: 0.05,
        ..Faults::default()
    };
    let (zoom, daemon, ledger) = campaign(faults, Tweaks::default(), kills).await;
    assert_eq!(check_acknowledged(&zoom, &daemon, &ledger).await, 0);
    assert_eq!(daemon.stats().await["dead"], 0);
}

#[tokio::test]
async fn with_send_in_doubt_dead_no_ref_ever_has_two_messages() {
    // Resets and 5xx before and after Zoom applied the request.
    let faults = Faults {
        reset: 0.1,
        reset_after_apply: 0.1,
        error_5xx: 0.1,
        error_5xx_after_apply: 0.05,
        ..Faults::default()
    };
    let tweaks = Tweaks::default().set("delivery", "send_in_doubt", "\"dead\"");
    let (zoom, daemon, ledger) = campaign(faults, tweaks, 3).await;
    let held = check_acknowledged(&zoom, &daemon, &ledger).await;
    // Held refs the producers deleted later were cancelled (their dead letters with them):
    // the log tells how many sends were in doubt.
    let in_doubt = daemon
        .log()
        .matches("send outcome unknown; kept as a dead letter")
        .count();
    assert!(
        in_doubt > 0,
        "no send was in doubt: the faults did not reach a send"
    );
    for (to_jid, count) in messages_per_ref(&zoom) {
        assert_eq!(count, 1, "{to_jid} has {count} messages at Zoom");
    }
    let dead = daemon
        .client()
        .await
        .call(&json!({"op": "dead_list"}))
        .await;
    let outcome_unknown = dead["dead"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == "outcome_unknown")
        .count();
    // Every held ref is one such dead letter (a send whose answer the producer never got
    // may be one more).
    assert!(outcome_unknown >= held, "{dead}");
}

/// Zoom posts the message and its answer is on the way when the daemon dies: after the
/// restart the send is in doubt, and `send_in_doubt` decides.
async fn killed_after_zoom_posted(tweaks: Tweaks) -> (Sandbox, TestDaemon, Value) {
    let zoom = sandbox(SandboxConfig::default()).await;
    zoom.script_send(
        "kept@conf",
        vec![Scripted::DelayAfterApply(Duration::from_secs(5))],
    );
    let mut daemon = TestDaemon::start(&zoom, tweaks).await;
    let mut client = daemon.client().await;
    let send = request("send", "kept", Some("1"));
    assert_eq!(client.call(&send).await["ok"], true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while zoom.messages().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the send never reached Zoom"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.kill();
    daemon.spawn().await;
    let mut wait = request("status", "kept", None);
    wait["wait"] = json!("20s");
    let status = daemon.client().await.call(&wait).await;
    (zoom, daemon, status)
}

#[tokio::test]
async fn a_kill_after_zoom_posted_a_send_retries_it_by_default() {
    let (zoom, daemon, status) = killed_after_zoom_posted(Tweaks::default()).await;
    assert_eq!(status["state"], "sent", "{status}");
    daemon.drained(Duration::from_secs(20)).await;
    // At least once: the lost answer's message and the one sent again.
    assert_eq!(messages_per_ref(&zoom)["kept@conf"], 2);
}

#[tokio::test]
async fn a_kill_after_zoom_posted_a_send_is_a_dead_letter_at_most_once() {
    let tweaks = Tweaks::default().set("delivery", "send_in_doubt", "\"dead\"");
    let (zoom, _daemon, status) = killed_after_zoom_posted(tweaks).await;
    assert_eq!(status["state"], "dead", "{status}");
    assert_eq!(status["reason"], "outcome_unknown", "{status}");
    assert_eq!(messages_per_ref(&zoom)["kept@conf"], 1);
}
