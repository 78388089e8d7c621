//! The whole life of a message through the real daemon and the sandbox over HTTP: a send by
//! ref (an upsert), edits by ref and by Zoom's id, a delete, status with and without waiting,
//! a delete cancelling a send never attempted, and sends whose outcome is unknown under both
//! `delivery.send_in_doubt` settings.

use std::time::Duration;

use serde_json::{json, Value};
use zoomq::sandbox::{MessageRecord, Sandbox, SandboxConfig, Scripted};

use crate::helpers::{sandbox, TestDaemon, Tweaks};

const ROBOT: &str = "bot@xmpp.zoom.us";

fn send(reference: &str, to_jid: &str, text: &str) -> Value {
    json!({
        "op": "send", "ref": reference, "account_id": "acct", "robot_jid": ROBOT,
        "to_jid": to_jid, "content": {"head": {"text": text}},
    })
}

fn edit_ref(reference: &str, text: &str) -> Value {
    json!({
        "op": "edit", "ref": reference, "account_id": "acct", "robot_jid": ROBOT,
        "content": {"head": {"text": text}},
    })
}

fn by_ref(op: &str, reference: &str) -> Value {
    json!({"op": op, "ref": reference, "account_id": "acct", "robot_jid": ROBOT})
}

/// The messages the sandbox holds for `to_jid`, in creation order.
fn messages_to(zoom: &Sandbox, to_jid: &str) -> Vec<MessageRecord> {
    zoom.messages()
        .into_iter()
        .filter(|m| m.to_jid.as_deref() == Some(to_jid))
        .collect()
}

fn text(message: &MessageRecord) -> Option<&str> {
    message.content.as_ref()?["head"]["text"].as_str()
}

#[tokio::test]
async fn a_message_is_sent_edited_and_deleted_by_its_ref() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;

    let first = client.call(&send("build-1", "channel-1@conf", "v0")).await;
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["ref"], "build-1");
    // A send of a known ref never makes a second message, and edits by ref follow it.
    assert_eq!(
        client.call(&send("build-1", "channel-1@conf", "v1")).await["ok"],
        true
    );
    for n in 2..=20 {
        let answer = client.call(&edit_ref("build-1", &format!("v{n}"))).await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
    let mut status = by_ref("status", "build-1");
    status["wait"] = json!("10s");
    let sent = client.call(&status).await;
    assert_eq!(sent["ok"], true, "{sent}");
    let message_id = sent["message_id"]
        .as_str()
        .expect("an id once sent")
        .to_string();
    daemon.drained(Duration::from_secs(20)).await;
    let shown = messages_to(&zoom, "channel-1@conf");
    assert_eq!(shown.len(), 1, "exactly one message per ref: {shown:?}");
    assert_eq!(shown[0].message_id, message_id);
    assert_eq!(text(&shown[0]), Some("v20"), "the last edit is shown");
    assert_eq!(shown[0].max_concurrent, 1);
    let now = client.call(&by_ref("status", "build-1")).await;
    assert_eq!(now["state"], "sent", "{now}");
    assert_eq!(now["message_id"], message_id.as_str());

    // Zoom's id names the same message: an edit by it is an edit of the ref's message.
    let by_id = json!({
        "op": "edit", "message_id": message_id, "account_id": "acct", "robot_jid": ROBOT,
        "content": {"head": {"text": "v21"}},
    });
    assert_eq!(client.call(&by_id).await["ok"], true);
    daemon.drained(Duration::from_secs(20)).await;
    assert_eq!(text(&messages_to(&zoom, "channel-1@conf")[0]), Some("v21"));

    let deleted = client.call(&by_ref("delete", "build-1")).await;
    assert_eq!(deleted["ok"], true, "{deleted}");
    assert!(deleted["job_id"].is_string(), "{deleted}");
    daemon.drained(Duration::from_secs(20)).await;
    assert!(messages_to(&zoom, "channel-1@conf")[0].deleted);
    assert_eq!(
        client.call(&by_ref("status", "build-1")).await["state"],
        "deleted"
    );
    // Nothing more is accepted for a deleted message, whatever names it.
    for refused in [
        edit_ref("build-1", "late"),
        send("build-1", "channel-1@conf", "late"),
        by_ref("delete", "build-1"),
        by_id,
    ] {
        let answer = client.call(&refused).await;
        assert_eq!(answer["error"], "gone", "{refused} → {answer}");
    }
    // Unknown refs are told apart from deleted ones.
    for unknown in [
        edit_ref("never", "x"),
        by_ref("delete", "never"),
        by_ref("status", "never"),
    ] {
        let answer = client.call(&unknown).await;
        assert_eq!(answer["error"], "not_found", "{unknown} → {answer}");
    }
    let stats = daemon.stats().await;
    assert_eq!(stats["dead"], 0, "{stats}");
    assert_eq!(stats["refs"], 1, "{stats}");
}

#[tokio::test]
async fn a_delete_before_the_send_was_attempted_cancels_it() {
    let zoom = sandbox(SandboxConfig::default()).await;
    // No token for a while: nothing is sent meanwhile.
    zoom.set_token_delay(Duration::from_secs(2));
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    assert_eq!(
        client.call(&send("poll-1", "channel-2@conf", "open")).await["ok"],
        true
    );
    assert_eq!(
        client.call(&edit_ref("poll-1", "3 votes")).await["coalesced"],
        true
    );
    let pending = client.call(&by_ref("status", "poll-1")).await;
    assert_eq!(pending["state"], "pending", "{pending}");
    let cancelled = client.call(&by_ref("delete", "poll-1")).await;
    assert_eq!(cancelled, json!({"ok": true, "cancelled": true}));
    // Another message goes out once the token comes: the cancelled one never does.
    assert_eq!(
        client.call(&send("poll-2", "channel-2@conf", "kept")).await["ok"],
        true
    );
    let mut status = by_ref("status", "poll-2");
    status["wait"] = json!("20s");
    assert_eq!(client.call(&status).await["state"], "sent");
    daemon.drained(Duration::from_secs(20)).await;
    let shown = messages_to(&zoom, "channel-2@conf");
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(text(&shown[0]), Some("kept"));
    assert_eq!(
        client.call(&by_ref("status", "poll-1")).await["state"],
        "deleted"
    );
}

/// The send's connection breaks after Zoom posted the message: its outcome is unknown.
async fn send_lost_after_apply(zoom: &Sandbox, tweaks: Tweaks) -> (TestDaemon, Value) {
    zoom.script_send("channel-3@conf", vec![Scripted::ResetAfterApply]);
    let daemon = TestDaemon::start(zoom, tweaks).await;
    let mut client = daemon.client().await;
    assert_eq!(
        client.call(&send("deploy-1", "channel-3@conf", "v1")).await["ok"],
        true
    );
    let mut status = by_ref("status", "deploy-1");
    status["wait"] = json!("20s");
    let status = client.call(&status).await;
    (daemon, status)
}

#[tokio::test]
async fn a_send_in_doubt_is_a_dead_letter_with_its_edits_when_asked() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = Tweaks::default().set("delivery", "send_in_doubt", "\"dead\"");
    let (daemon, status) = send_lost_after_apply(&zoom, tweaks).await;
    assert_eq!(status["state"], "dead", "{status}");
    assert_eq!(status["reason"], "outcome_unknown", "{status}");
    let mut client = daemon.client().await;
    // Edits wait with it (accepted, not sent); the latest is what a retry sends.
    let waiting = client.call(&edit_ref("deploy-1", "v1.5")).await;
    assert_eq!(waiting["ok"], true, "{waiting}");
    let waiting = client.call(&edit_ref("deploy-1", "v2")).await;
    assert_eq!(waiting["coalesced"], true, "{waiting}");
    assert_eq!(
        client.call(&by_ref("status", "deploy-1")).await["state"],
        "dead"
    );
    let dead = client.call(&json!({"op": "dead_list"})).await;
    assert_eq!(dead["dead"][0]["reason"], "outcome_unknown", "{dead}");
    assert_eq!(dead["dead"][0]["ref"], "deploy-1", "{dead}");
    assert_eq!(dead["dead"][0]["op"], "send", "{dead}");
    assert_eq!(dead["dead"][0]["message_id"], "", "{dead}");
    // At most once: exactly the one message Zoom posted, nothing sent again.
    assert_eq!(messages_to(&zoom, "channel-3@conf").len(), 1);
    let job_id = dead["dead"][0]["job_id"].clone();
    // The operator checked and wants it sent again (knowing it may be a duplicate).
    let retried = client
        .call(&json!({"op": "dead_retry", "job_id": job_id}))
        .await;
    // The waiting content is newer than the dead letter: it goes out as the send instead.
    assert_eq!(retried["superseded"], 1, "{retried}");
    let mut wait = by_ref("status", "deploy-1");
    wait["wait"] = json!("20s");
    assert_eq!(client.call(&wait).await["state"], "sent");
    daemon.drained(Duration::from_secs(20)).await;
    let shown = messages_to(&zoom, "channel-3@conf");
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert_eq!(text(&shown[1]), Some("v2"));
}

#[tokio::test]
async fn a_send_in_doubt_is_sent_again_by_default() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let (daemon, status) = send_lost_after_apply(&zoom, Tweaks::default()).await;
    assert_eq!(status["state"], "sent", "{status}");
    daemon.drained(Duration::from_secs(20)).await;
    // At least once: the lost answer's message and the retry's.
    assert_eq!(messages_to(&zoom, "channel-3@conf").len(), 2);
    let metrics = daemon.stats().await;
    assert_eq!(metrics["dead"], 0, "{metrics}");
}

#[tokio::test]
async fn hostile_lifecycle_input_gets_a_specific_error_and_changes_nothing() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let daemon = TestDaemon::start(&zoom, Tweaks::default()).await;
    let mut client = daemon.client().await;
    let long = "x".repeat(300);
    let send = |field: &str, value: Value| {
        let mut request = send("r1", "channel@conf", "v");
        request[field] = value;
        request
    };
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            send("ref", json!("")),
            "bad_request",
            "`ref`: expected a non-empty",
        ),
        (send("ref", json!(long)), "bad_request", "`ref`: 300 bytes"),
        (
            send("ref", json!("a\u{7}b")),
            "bad_request",
            "`ref`: contains the control",
        ),
        (
            send("ref", json!(7)),
            "bad_request",
            "`ref`: expected a string",
        ),
        (
            send("to_jid", Value::Null),
            "bad_request",
            "`to_jid` is missing",
        ),
        (
            send("to_jid", json!(["x"])),
            "bad_request",
            "`to_jid`: expected a string",
        ),
        (
            send("visible_to_user", json!("")),
            "bad_request",
            "`visible_to_user`",
        ),
        (send("reply_to", json!(long)), "bad_request", "`reply_to`"),
        (
            send("is_markdown_support", json!("yes")),
            "bad_request",
            "`is_markdown_support`",
        ),
        (send("content", json!({})), "bad_request", "empty"),
        (
            send("message_id", json!("m1")),
            "bad_request",
            "`message_id` is not allowed",
        ),
        (
            json!({"op": "edit", "ref": "r1", "message_id": "m1", "account_id": "acct",
                   "robot_jid": ROBOT, "content": {"a": 1}}),
            "bad_request",
            "not both",
        ),
        (
            json!({"op": "delete", "ref": "r1", "account_id": "acct", "robot_jid": ROBOT,
                   "content": {"a": 1}}),
            "bad_request",
            "`content` is not allowed",
        ),
        (
            json!({"op": "delete", "account_id": "acct", "robot_jid": ROBOT}),
            "bad_request",
            "`ref` is missing",
        ),
        (
            json!({"op": "status", "ref": "r1", "account_id": "acct", "robot_jid": ROBOT, "wait": "soon"}),
            "bad_request",
            "`wait`",
        ),
        (
            json!({"op": "status", "ref": "r1", "account_id": "acct", "robot_jid": ROBOT, "wait": 10}),
            "bad_request",
            "`wait`",
        ),
        (
            json!({"op": "status", "ref": "r1", "account_id": "acct", "robot_jid": ROBOT, "wait": "1h"}),
            "bad_request",
            "socket.max_status_wait",
        ),
    ];
    for (request, code, needle) in cases {
        let answer = client.call(&request).await;
        assert_eq!(answer["error"], code, "{request} → {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    // None of it was accepted: the ref is unknown, nothing is queued.
    let status = client.call(&by_ref("status", "r1")).await;
    assert_eq!(status["error"], "not_found", "{status}");
    assert_eq!(daemon.stats().await["pending"], 0);
}
