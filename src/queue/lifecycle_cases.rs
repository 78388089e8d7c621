//! Named cases of a message's life through the real queue: dead letters that hold their
//! message and operator commands racing producers; forgetting and what a restart shows while
//! recovery runs are in `lifecycle_restart_cases.rs`. (`lifecycle_tests.rs` is the random walk
//! against a model.)

#[path = "lifecycle_restart_cases.rs"]
mod restart;

use super::tests::{close, open};
use super::*;
use crate::protocol::{Delete, Edit, MessageState, Selector, Send, StatusQuery, Target};

const ROBOT: &str = "bot@xmpp.zoom.us";

fn content(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::to_raw_value(&serde_json::json!({"head": {"text": text}})).unwrap()
}

fn send(reference: &str, text: &str) -> Send {
    Send {
        reference: reference.into(),
        account_id: "a".into(),
        robot_jid: ROBOT.into(),
        to_jid: "channel@conference.xmpp.zoom.us".into(),
        user_jid: None,
        visible_to_user: None,
        reply_to: None,
        is_markdown_support: None,
        content: content(text),
    }
}

fn edit(target: Target, text: &str) -> Edit {
    Edit {
        target,
        account_id: "a".into(),
        robot_jid: ROBOT.into(),
        user_jid: None,
        is_markdown_support: None,
        content: content(text),
    }
}

fn delete(target: Target) -> Delete {
    Delete {
        target,
        account_id: "a".into(),
        robot_jid: ROBOT.into(),
        user_jid: None,
    }
}

fn status_of(target: Target) -> StatusQuery {
    StatusQuery {
        target,
        account_id: "a".into(),
        robot_jid: ROBOT.into(),
        wait: None,
    }
}

fn by_ref(r: &str) -> Target {
    Target::Ref(r.into())
}

fn text_in(body: &[u8]) -> String {
    let body: serde_json::Value = serde_json::from_slice(body).unwrap();
    body["content"]["head"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Claims the account's next job that needs a request, waiting for commits.
async fn claim_job(queue: &LocalQueue) -> Option<Job> {
    loop {
        queue.settled().await.unwrap();
        match queue.claim("a").unwrap() {
            Claimed::Job(job) => {
                if let Some(batch) = job.marked_batch {
                    queue.durable(batch).await;
                }
                return Some(job);
            }
            Claimed::Skipped { .. } | Claimed::NotDurable => continue,
            Claimed::Empty => return None,
        }
    }
}

fn outcome_unknown() -> DeadInfo {
    DeadInfo {
        reason: "outcome_unknown",
        status: None,
        zoom_code: None,
        detail: "timeout".into(),
    }
}

fn rejected() -> DeadInfo {
    DeadInfo {
        reason: "rejected",
        status: Some(400),
        zoom_code: Some(7001),
        detail: "bad".into(),
    }
}

fn sent(id: &str) -> Option<SentMessage> {
    Some(SentMessage {
        message_id: id.into(),
        sent_time: None,
    })
}

/// An edit dead-lettered before its message was deleted is sent after Zoom answered the
/// delete once an operator retries the dead letters.
#[tokio::test]
async fn a_retried_dead_edit_never_follows_the_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    assert!(matches!(job.call, Call::Send { .. }));
    wait(queue.complete(&job, sent("z1"))).await.unwrap();
    // An edit Zoom rejects: a dead letter (not holding the ref).
    queue.enqueue(&edit(by_ref("r"), "v2")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    assert!(matches!(job.call, Call::Edit { .. }));
    wait(queue.dead_letter(&job, rejected())).await.unwrap();
    // The bot deletes the message; Zoom answers the delete.
    queue.delete(&delete(by_ref("r"))).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    assert!(matches!(job.call, Call::Delete { .. }));
    wait(queue.complete(&job, None)).await.unwrap();
    assert!(matches!(
        queue.enqueue(&edit(by_ref("r"), "v3")).await,
        Err(EnqueueError::Gone(_))
    ));
    // The operator retries every dead letter after an outage.
    queue.dead_retry(&Selector::All).await.unwrap();
    let after_delete = claim_job(&queue).await;
    assert!(
        after_delete.is_none(),
        "a request after Zoom answered the delete: {:?}",
        after_delete.map(|j| j.call)
    );
    close(queue).await;
}

/// Makes the ref's send a dead letter while an edit of it is pending.
async fn held_with_a_pending_edit(queue: &LocalQueue) -> u64 {
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(queue).await.unwrap();
    assert!(matches!(job.call, Call::Send { .. }));
    queue.enqueue(&edit(by_ref("r"), "v2")).await.unwrap();
    wait(queue.dead_letter(&job, outcome_unknown()))
        .await
        .unwrap();
    job.seq
}

/// Content for a held ref coalesces in the index and waits out of line; the retry lets the
/// newest acknowledged content go out as the send, once.
#[tokio::test]
async fn a_held_refs_newest_content_is_what_its_retried_send_carries() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    let seq = held_with_a_pending_edit(&queue).await;
    let joined = queue.enqueue(&edit(by_ref("r"), "v3")).await.unwrap();
    assert!(joined.coalesced, "v3 replaces v2, waiting");
    queue.settled().await.unwrap();
    assert!(
        matches!(queue.claim("a").unwrap(), Claimed::Empty),
        "held: nothing to claim"
    );
    let status = queue.status(&status_of(by_ref("r"))).await.unwrap();
    assert_eq!(status.state, MessageState::Dead);
    assert_eq!(status.reason.as_deref(), Some("outcome_unknown"));
    // The waiting content is newer than the dead letter: it is what goes out.
    let retried = queue.dead_retry(&Selector::One(seq)).await.unwrap();
    assert_eq!((retried.affected, retried.superseded), (0, 1));
    assert_eq!(queue.stats().dead, 0);
    let job = claim_job(&queue).await.unwrap();
    let Call::Send { body } = &job.call else {
        panic!("{:?}", job.call)
    };
    assert_eq!(text_in(body), "v3", "the last acknowledged content is sent");
    assert!(!job.in_doubt, "the operator decided");
    let status = queue.status(&status_of(by_ref("r"))).await.unwrap();
    assert_eq!(status.state, MessageState::InFlight);
    assert!(claim_job(&queue).await.is_none(), "one send, not two");
    close(queue).await;
}

/// Purging a held ref's dead letter forgets the ref with the content waiting for it; the ref
/// is free again and a delete of it is `not_found`, with the counters right throughout.
#[tokio::test]
async fn purging_a_held_send_forgets_its_ref_and_waiting_content() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    let seq = held_with_a_pending_edit(&queue).await;
    let purged = queue.dead_purge(&Selector::One(seq)).await.unwrap();
    assert_eq!(purged.affected, 1);
    let stats = queue.stats();
    assert_eq!((stats.dead, stats.pending, stats.refs), (0, 0, 0));
    assert!(matches!(
        queue.delete(&delete(by_ref("r"))).await,
        Err(EnqueueError::NotFound(_))
    ));
    assert!(!queue.send(&send("r", "again")).await.unwrap().coalesced);
    close(queue).await;
}

/// A delete of a held ref cancels its dead letter and the waiting content: Zoom hears nothing
/// more, and the counters stay right.
#[tokio::test]
async fn a_delete_cancels_a_held_send_and_its_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    held_with_a_pending_edit(&queue).await;
    let deleted = queue.delete(&delete(by_ref("r"))).await.unwrap();
    assert!(deleted.cancelled);
    let stats = queue.stats();
    assert_eq!((stats.dead, stats.pending), (0, 0));
    assert!(queue.dead_letters(None).unwrap().is_empty());
    assert!(claim_job(&queue).await.is_none());
    let status = queue.status(&status_of(by_ref("r"))).await.unwrap();
    assert_eq!(status.state, MessageState::Deleted);
    close(queue).await;
}

/// `zoomq_sends_cancelled_total` ("Sends cancelled by a delete before they were attempted")
/// does not count a delete that cancels a send never attempted.
#[tokio::test]
async fn a_cancelled_send_is_counted_as_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let deleted = queue.delete(&delete(by_ref("r"))).await.unwrap();
    assert!(deleted.cancelled);
    assert_eq!(queue.shared.metrics.sends_cancelled.get(), 1);
    close(queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_racing_the_retry_of_its_held_send_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    let mut lost = Vec::new();
    let rounds = 300;
    for i in 0..rounds {
        let r = format!("r{i}");
        queue.send(&send(&r, "v1")).await.unwrap();
        let job = claim_job(&queue).await.unwrap();
        wait(queue.dead_letter(&job, outcome_unknown()))
            .await
            .unwrap();
        let retry = tokio::spawn({
            let queue = queue.clone();
            async move { queue.dead_retry(&Selector::One(job.seq)).await }
        });
        let late = tokio::spawn({
            let queue = queue.clone();
            let r = r.clone();
            async move {
                // Woken by the same commit as the retry's `settled`.
                tokio::task::yield_now().await;
                queue.settled().await.unwrap();
                for _ in 0..(i % 7) * 50 {
                    std::hint::spin_loop();
                }
                queue.enqueue(&edit(by_ref(&r), "late")).await
            }
        });
        retry.await.unwrap().unwrap();
        late.await.unwrap().unwrap();
        let job = claim_job(&queue).await.unwrap();
        let Call::Send { body } = &job.call else {
            panic!()
        };
        if text_in(body) != "late" {
            lost.push(i);
        }
        wait(queue.complete(&job, sent(&format!("z{i}"))))
            .await
            .unwrap();
    }
    assert!(
        lost.is_empty(),
        "acknowledged edit lost in rounds {lost:?} of {rounds}"
    );
    close(queue).await;
}

/// A delete that cancels a held send while `dead purge` runs: both decrement the dead counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delete_racing_a_purge_counts_the_dead_letter_once() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    // Another dead letter keeps the counter above zero, so that drift shows without a panic.
    queue
        .enqueue(&edit(Target::MessageId("keep".into()), "k"))
        .await
        .unwrap();
    let keep = claim_job(&queue).await.unwrap();
    wait(queue.dead_letter(&keep, rejected())).await.unwrap();
    let rounds = 300;
    for i in 0..rounds {
        let r = format!("r{i}");
        queue.send(&send(&r, "v1")).await.unwrap();
        let job = claim_job(&queue).await.unwrap();
        wait(queue.dead_letter(&job, outcome_unknown()))
            .await
            .unwrap();
        let purge = tokio::spawn({
            let queue = queue.clone();
            async move { queue.dead_purge(&Selector::One(job.seq)).await }
        });
        let del = tokio::spawn({
            let queue = queue.clone();
            let r = r.clone();
            async move {
                tokio::task::yield_now().await;
                queue.settled().await.unwrap();
                for _ in 0..(i % 7) * 50 {
                    std::hint::spin_loop();
                }
                queue.delete(&delete(by_ref(&r))).await
            }
        });
        let _ = purge.await.unwrap();
        let _ = del.await.unwrap();
        queue.settled().await.unwrap();
        let listed = queue.dead_letters(None).unwrap().len() as u64;
        let counted = queue.stats().dead;
        assert_eq!(counted, listed, "dead counter drifted in round {i}");
    }
    close(queue).await;
}

/// The same gap with content: a retried dead edit of a ref overwrites newer content that Zoom
/// already showed (the retry only looks for a *pending* newer job).
#[tokio::test]
async fn a_retried_dead_edit_never_overwrites_newer_delivered_content() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.complete(&job, sent("z1"))).await.unwrap();
    queue.enqueue(&edit(by_ref("r"), "v2")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.dead_letter(&job, rejected())).await.unwrap();
    queue.enqueue(&edit(by_ref("r"), "v3")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.complete(&job, None)).await.unwrap();
    queue.dead_retry(&Selector::All).await.unwrap();
    if let Some(job) = claim_job(&queue).await {
        panic!(
            "after v3 was shown, Zoom gets {:?} with {}",
            job.call,
            text_in(&job.body)
        );
    }
    close(queue).await;
}

/// Two dead edits of one message retried together: the newer one goes out, whichever the
/// operator's command puts back first.
#[tokio::test]
async fn of_two_retried_dead_edits_the_newer_goes_out() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.complete(&job, sent("z1"))).await.unwrap();
    for text in ["v2", "v3"] {
        queue.enqueue(&edit(by_ref("r"), text)).await.unwrap();
        let job = claim_job(&queue).await.unwrap();
        wait(queue.dead_letter(&job, rejected())).await.unwrap();
    }
    let retried = queue.dead_retry(&Selector::All).await.unwrap();
    assert_eq!(retried.affected, 2, "both put back, the older giving way");
    let job = claim_job(&queue).await.unwrap();
    assert_eq!(text_in(&job.body), "v3");
    wait(queue.complete(&job, None)).await.unwrap();
    assert!(claim_job(&queue).await.is_none());
    close(queue).await;
}
