//! LocalQueue-level tests on a real sled database in a temporary directory.

use super::*;
use crate::config::StorageConfig;
use crate::protocol::{parse_request, Edit, Request, Selector};

pub(super) fn edit(message: &str, account: &str, text: &str) -> Edit {
    let line = format!(
        r#"{{"op":"edit","message_id":"{message}","account_id":"{account}","robot_jid":"bot@xmpp.zoom.us","content":{{"head":{{"text":"{text}"}}}}}}"#
    );
    match parse_request(line.as_bytes()).unwrap() {
        Request::Edit(edit) => edit,
        other => panic!("{other:?}"),
    }
}

/// The storage configuration of these tests: a small cache in `dir`.
pub(super) fn config(dir: &std::path::Path) -> StorageConfig {
    StorageConfig {
        path: dir.to_path_buf(),
        cache_capacity: 8 * 1024 * 1024,
        ..StorageConfig::default()
    }
}

/// Commits everything and lets go of the database, as a stop does.
pub(super) async fn close(queue: LocalQueue) {
    tokio::task::spawn_blocking(move || queue.close())
        .await
        .unwrap();
}

/// Zoom's answer to an edit of a message it does not know.
fn rejected() -> DeadInfo {
    DeadInfo {
        reason: "rejected",
        status: Some(400),
        zoom_code: Some(7001),
        detail: "bad".into(),
    }
}

pub(super) async fn open(
    dir: &std::path::Path,
) -> (LocalQueue, mpsc::UnboundedReceiver<Arc<str>>, Recovery) {
    let config = config(dir);
    // sled lets go of its file lock only once its I/O threads are done with the previous
    // handle, a moment after the last one is dropped.
    let mut tries = 0;
    loop {
        match LocalQueue::open(&config, Arc::new(Metrics::new())) {
            Err(StoreError::Locked(_)) if tries < 200 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => {
                let (queue, ready) = opened.unwrap();
                let recovery = queue.recovered().await;
                return (queue, ready, recovery);
            }
        }
    }
}

impl LocalQueue {
    /// Claims, expecting every acknowledged write to be committed already.
    pub(super) fn claim_now(&self, account: &str) -> Option<Job> {
        match self.claim(account).unwrap() {
            Claimed::Job(job) => Some(job),
            Claimed::Empty => None,
            Claimed::Skipped { .. } => panic!("a job needing no request"),
            Claimed::NotDurable => panic!("an acknowledged edit is not durable"),
        }
    }
}

pub(super) fn text_of(job: &Job) -> String {
    let body: serde_json::Value = serde_json::from_slice(&job.body).unwrap();
    body["content"]["head"]["text"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn coalesces_pending_and_serializes_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, mut ready, _) = open(dir.path()).await;
    let first = queue.enqueue(&edit("m1", "a", "v1")).await.unwrap();
    assert!(!first.coalesced);
    let again = queue.enqueue(&edit("m1", "a", "v2")).await.unwrap();
    assert_eq!(
        again,
        Enqueued {
            job_id: first.job_id,
            coalesced: true
        }
    );
    assert_eq!(&*ready.recv().await.unwrap(), "a");
    assert_eq!(queue.stats().pending, 1);

    // Claim it, then enqueue a newer edit: it must wait behind the in-flight one.
    let job = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&job), "v2");
    let newer = queue.enqueue(&edit("m1", "a", "v3")).await.unwrap();
    assert!(!newer.coalesced);
    assert!(newer.job_id > job.seq);
    assert!(
        queue.claim_now("a").is_none(),
        "never two in flight for one message"
    );
    wait(queue.complete(&job, None)).await.unwrap();
    let next = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&next), "v3");
    wait(queue.complete(&next, None)).await.unwrap();
    let stats = queue.stats();
    assert_eq!((stats.pending, stats.in_flight), (0, 0));
}

#[tokio::test]
async fn restart_recovers_pending_and_in_flight_keeping_newest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (queue, _ready, _) = open(dir.path()).await;
        queue.enqueue(&edit("m1", "a", "old")).await.unwrap();
        queue.enqueue(&edit("m2", "b", "only")).await.unwrap();
        let job = queue.claim_now("a").unwrap();
        assert_eq!(text_of(&job), "old");
        queue.enqueue(&edit("m1", "a", "new")).await.unwrap();
        // Crash with m1's old edit in flight and its newer edit pending.
        drop(job);
        close(queue).await;
    }
    let (queue, _ready, recovery) = open(dir.path()).await;
    assert_eq!(recovery.pending, 2);
    assert_eq!(recovery.superseded, 1);
    let job = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&job), "new");
    assert_eq!(text_of(&queue.claim_now("b").unwrap()), "only");
}

#[tokio::test]
async fn converts_a_queue_of_the_earlier_layout() {
    let dir = tempfile::tempdir().unwrap();
    let header = |message: &str, account: &str| JobHeader {
        message_id: message.into(),
        account_id: account.into(),
        enqueued_ms: 5,
        attempts: 0,
        next_attempt_ms: 0,
        first_failure_ms: None,
        op: JobOp::Content,
    };
    let body = |text: &str| String::from_utf8(edit("x", "x", text).zoom_body()).expect("utf-8");
    let (old, new, other, gone) = (body("old"), body("new"), body("other"), body("gone"));
    let dead = DeadRecord {
        header: header("m3", "a"),
        dead_ms: 9,
        reason: "rejected".into(),
        status: Some(400),
        zoom_code: None,
        detail: "bad".into(),
        call: None,
    };
    store::write_v1(
        dir.path(),
        &[
            (3, header("m1", "a"), old.as_str()),
            (4, header("m2", "b"), other.as_str()),
            (6, header("m1", "a"), new.as_str()),
        ],
        &[(5, dead, gone.as_str())],
    )
    .unwrap();
    for round in 0..2 {
        let (queue, _ready, recovery) = open(dir.path()).await;
        assert_eq!(recovery.pending, 2, "round {round}");
        assert_eq!(recovery.dead, 1);
        assert_eq!(recovery.migrated, if round == 0 { 3 } else { 0 });
        close(queue).await;
    }
    let (queue, _ready, _) = open(dir.path()).await;
    assert_eq!(text_of(&queue.claim_now("a").unwrap()), "new");
    assert_eq!(text_of(&queue.claim_now("b").unwrap()), "other");
    let outcome = queue.dead_retry(&Selector::All).await.unwrap();
    assert_eq!(outcome.affected, 1);
    let retried = queue.claim_now("a").unwrap();
    assert_eq!((retried.seq, text_of(&retried)), (5, "gone".to_string()));
    let next = queue.enqueue(&edit("m9", "a", "fresh")).await.unwrap();
    assert!(next.job_id > 6, "job ids are not reused");
}

#[tokio::test]
async fn retry_state_and_dead_letters_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let due = now_ms() + 3_600_000;
    {
        let (queue, _ready, _) = open(dir.path()).await;
        queue.enqueue(&edit("m1", "a", "x")).await.unwrap();
        queue.enqueue(&edit("m2", "a", "y")).await.unwrap();
        let mut job = queue.claim_now("a").unwrap();
        job.header.attempts = 3;
        job.header.next_attempt_ms = due;
        let (superseded, commit) = queue.retry_later(&job, true);
        assert!(!superseded);
        wait(commit).await.unwrap();
        let job2 = queue.claim_now("a").unwrap();
        let info = DeadInfo {
            reason: "rejected",
            status: Some(404),
            zoom_code: Some(8001),
            detail: "Invalid message_id value.".into(),
        };
        wait(queue.dead_letter(&job2, info)).await.unwrap();
        close(queue).await;
    }
    let (queue, _ready, recovery) = open(dir.path()).await;
    assert_eq!((recovery.pending, recovery.dead), (1, 1));
    assert!(
        queue.claim_now("a").is_none(),
        "still waiting for its retry time"
    );
    assert_eq!(queue.next_due_ms(), Some(due));
    let dead = queue.dead_list(None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1.status, Some(404));
    assert_eq!(dead[0].1.header.message_id, "m2");

    // Retry the dead letter: it is pending again, with its content.
    let outcome = queue.dead_retry(&Selector::All).await.unwrap();
    assert_eq!(outcome.affected, 1);
    let job = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&job), "y");
    assert_eq!(queue.stats().dead, 0);
}

#[tokio::test]
async fn dead_retry_is_superseded_by_pending_edit() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.enqueue(&edit("m1", "a", "x")).await.unwrap();
    let job = queue.claim_now("a").unwrap();
    let info = rejected();
    wait(queue.dead_letter(&job, info)).await.unwrap();
    queue.enqueue(&edit("m1", "a", "newer")).await.unwrap();
    let outcome = queue.dead_retry(&Selector::One(job.seq)).await.unwrap();
    assert_eq!(
        outcome,
        DeadOutcome {
            affected: 0,
            superseded: 1
        }
    );
    assert_eq!(text_of(&queue.claim_now("a").unwrap()), "newer");
    assert!(queue.dead_retry(&Selector::One(job.seq)).await.is_err());
}

#[tokio::test]
async fn queue_full_refuses_new_messages_but_coalesces() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        max_pending: 2,
        ..config(dir.path())
    };
    let (queue, _ready) = LocalQueue::open(&config, Arc::new(Metrics::new())).unwrap();
    queue.enqueue(&edit("m1", "a", "x")).await.unwrap();
    queue.enqueue(&edit("m2", "a", "x")).await.unwrap();
    assert_eq!(
        queue.enqueue(&edit("m3", "a", "x")).await,
        Err(EnqueueError::Full(2))
    );
    assert!(
        queue
            .enqueue(&edit("m1", "a", "y"))
            .await
            .unwrap()
            .coalesced
    );
}

#[tokio::test]
async fn a_retried_job_is_claimed_again_with_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.enqueue(&edit("m1", "a", "v1")).await.unwrap();
    let mut job = queue.claim_now("a").unwrap();
    job.header.attempts = 1;
    job.header.first_failure_ms = Some(now_ms());
    job.header.next_attempt_ms = now_ms();
    let (superseded, commit) = queue.retry_later(&job, true);
    assert!(!superseded);
    wait(commit).await.unwrap();
    queue.promote_due(now_ms() + 1);
    let again = queue.claim_now("a").expect("claimable again");
    assert_eq!((again.seq, text_of(&again)), (job.seq, "v1".to_string()));
    assert_eq!(again.header.attempts, 1);
    wait(queue.complete(&again, None)).await.unwrap();
    assert_eq!(queue.stats().pending, 0);
}

/// Recovery runs in the background: restored jobs go out while it runs, content that arrived
/// since the open waits for its end and wins over the older stored jobs of its message.
#[tokio::test]
async fn content_arriving_during_recovery_waits_and_wins() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (queue, _ready, _) = open(dir.path()).await;
        // One commit each, so one record each: m1/a1, m2/b1, m1/a2 (m1/a1 in flight), m3/c1.
        queue.enqueue(&edit("m1", "a", "a1")).await.unwrap();
        queue.enqueue(&edit("m2", "b", "b1")).await.unwrap();
        let in_flight = queue.claim_now("a").unwrap();
        queue.enqueue(&edit("m1", "a", "a2")).await.unwrap();
        queue.enqueue(&edit("m3", "c", "c1")).await.unwrap();
        drop(in_flight);
        close(queue).await;
    }
    let config = config(dir.path());
    let (go, steps) = std::sync::mpsc::channel();
    let (done, restored) = std::sync::mpsc::channel();
    let (queue, _ready) = LocalQueue::open_stepped(&config, (steps, done)).unwrap();
    let step = || {
        go.send(()).unwrap();
        restored.recv().unwrap();
    };
    assert!(queue.recovering());
    // Nothing restored yet: new content for m2 and m3 is accepted but not sent.
    assert!(
        !queue
            .enqueue(&edit("m3", "c", "c2"))
            .await
            .unwrap()
            .coalesced
    );
    assert!(
        !queue
            .enqueue(&edit("m2", "b", "b2"))
            .await
            .unwrap()
            .coalesced
    );
    assert!(matches!(queue.claim("b").unwrap(), Claimed::NotDurable));
    step(); // m1/a1: restored, and sent at once
    let a1 = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&a1), "a1");
    step(); // m2/b1: older than the fresh b2, dropped
    step(); // m1/a2: newer than a1, waits behind it
    assert!(queue.claim_now("a").is_none(), "never two in flight");
    assert!(matches!(queue.claim("c").unwrap(), Claimed::NotDurable));
    step(); // m3/c1: older than the fresh c2, dropped
    drop(go); // and no more steps to wait for
    let recovery = queue.recovered().await;
    assert_eq!(recovery.superseded, 2);
    assert!(!queue.recovering());
    assert_eq!(text_of(&queue.claim_now("b").unwrap()), "b2");
    assert_eq!(text_of(&queue.claim_now("c").unwrap()), "c2");
    wait(queue.complete(&a1, None)).await.unwrap();
    let a2 = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&a2), "a2");
    wait(queue.complete(&a2, None)).await.unwrap();
    assert_eq!(queue.stats().pending, 0);
}

/// Once a backlog has drained completely, its files are rebuilt empty: the space comes back,
/// job ids go on, and the queue works as before.
#[tokio::test]
async fn a_drained_queue_gives_its_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        shrink_above_bytes: 1 << 20,
        ..config(dir.path())
    };
    let (queue, _ready) = LocalQueue::open(&config, Arc::new(Metrics::new())).unwrap();
    queue.recovered().await;
    let text = "x".repeat(2_000);
    let mut last = 0;
    for i in 0..2_000 {
        last = queue
            .enqueue(&edit(&format!("m{i}"), "a", &text))
            .await
            .unwrap()
            .job_id;
    }
    let full = queue.size_on_disk().unwrap();
    assert!(full > 1 << 20, "{full} bytes");
    while let Some(job) = queue.claim_now("a") {
        wait(queue.complete(&job, None)).await.unwrap();
    }
    // The commit that retired the last records is followed by the rebuild, right after its
    // waiters are answered.
    queue.settled().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match queue.size_on_disk() {
            Ok(size) if size < full / 4 => break,
            Ok(size) => assert!(
                std::time::Instant::now() < deadline,
                "{size} bytes left of {full}"
            ),
            Err(StoreError::Reopening) => {}
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let next = queue.enqueue(&edit("after", "a", "y")).await.unwrap();
    assert!(next.job_id > last, "job ids go on");
    assert_eq!(text_of(&queue.claim_now("a").unwrap()), "y");
    close(queue).await;
    let (queue, _ready, recovery) = open(dir.path()).await;
    assert_eq!(recovery.pending, 1, "the edit after the rebuild is durable");
    assert!(
        queue
            .enqueue(&edit("later", "a", "z"))
            .await
            .unwrap()
            .job_id
            > next.job_id
    );
}

/// A dead letter put back while recovery runs is older than what its message got since: it
/// waits for recovery and loses to the newer stored edit, never the other way round.
#[tokio::test]
async fn a_dead_letter_put_back_during_recovery_loses_to_newer_stored_edits() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (queue, _ready, _) = open(dir.path()).await;
        queue.enqueue(&edit("m1", "a", "old")).await.unwrap();
        let job = queue.claim_now("a").unwrap();
        let info = rejected();
        wait(queue.dead_letter(&job, info)).await.unwrap();
        // Acknowledged, newer than the dead letter.
        queue.enqueue(&edit("m1", "a", "newer")).await.unwrap();
        close(queue).await;
    }
    let config = config(dir.path());
    let (go, steps) = std::sync::mpsc::channel();
    let (done, restored) = std::sync::mpsc::channel();
    let (queue, _ready) = LocalQueue::open_stepped(&config, (steps, done)).unwrap();
    // The operator retries the dead letters before recovery has reached the newer edit.
    let retry = tokio::spawn({
        let queue = queue.clone();
        async move { queue.dead_retry(&Selector::All).await }
    });
    tokio::task::yield_now().await;
    go.send(()).unwrap();
    restored.recv().unwrap();
    drop(go);
    let outcome = retry.await.unwrap().unwrap();
    assert_eq!((outcome.affected, outcome.superseded), (0, 1));
    let job = queue.claim_now("a").unwrap();
    assert_eq!(text_of(&job), "newer", "the acknowledged newer edit wins");
    assert!(queue.claim_now("a").is_none());
}
