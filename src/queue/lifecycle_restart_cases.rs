//! Named cases of what a restart shows while recovery runs, and of forgetting: refs are kept
//! while anything needs them, deletions refuse at once, Zoom's id is told once durable.

use super::super::refs::ref_name;
use super::super::tests::config;
use super::*;

/// Sets the stored last use of ref `r` to `days` days ago.
async fn age_ref(queue: &LocalQueue, r: &str, days: u64) {
    let commit = {
        let mut core = queue.shared.lock();
        let key = core.state.key(&ref_name("a", ROBOT, r));
        let then = now_ms() - days * 24 * 3600 * 1000;
        let record = core
            .refs
            .update(key, |r| r.last_used_ms = then)
            .cloned()
            .unwrap();
        core.ops.push(store::put_ref(&record));
        queue.shared.commit_locked(core)
    };
    wait(commit).await.unwrap();
}

fn open_paused(dir: &std::path::Path) -> (LocalQueue, std::sync::mpsc::Sender<()>) {
    let config = config(dir);
    for _ in 0..200 {
        let (go, steps) = std::sync::mpsc::channel();
        let (done, _restored) = std::sync::mpsc::channel();
        match LocalQueue::open_stepped(&config, (steps, done)) {
            Ok((queue, _ready)) => return (queue, go),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    panic!("cannot reopen");
}

/// The daemon was stopped for more than `storage.ref_retention` with a send pending. At the
/// restart, housekeeping forgets the ref while recovery has not yet read the send back: the
/// acknowledged send is then dropped.
#[tokio::test]
async fn no_ref_is_forgotten_while_recovery_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    age_ref(&queue, "r", 8).await;
    close(queue).await;
    std::thread::sleep(Duration::from_millis(100));
    let (queue, go) = open_paused(dir.path());
    assert!(queue.recovering());
    // During recovery the known ref is also reported unknown.
    let during = queue.status(&status_of(by_ref("r"))).await;
    let forgotten = queue.expire_refs();
    drop(go);
    queue.recovered().await;
    let job = claim_job(&queue).await;
    assert!(
        job.is_some(),
        "the acknowledged send was dropped (forgotten refs: {forgotten}; status while \
         recovering: {during:?})"
    );
    close(queue).await;
}

/// During recovery a known ref with a pending send is answered `not_found`.
#[tokio::test]
async fn a_pending_ref_is_pending_while_recovery_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    close(queue).await;
    std::thread::sleep(Duration::from_millis(100));
    let (queue, go) = open_paused(dir.path());
    let during = queue.status(&status_of(by_ref("r"))).await;
    drop(go);
    queue.recovered().await;
    let after = queue.status(&status_of(by_ref("r"))).await;
    assert!(
        during.is_ok(),
        "while recovering: {during:?}; after: {:?}",
        after.map(|s| s.state)
    );
    close(queue).await;
}

/// A message whose delete is pending at a restart accepts edits (ok) until recovery reads
/// the delete back, and those acknowledged edits are then dropped: they should be `gone`.
#[tokio::test]
async fn a_pending_delete_refuses_edits_while_recovery_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.complete(&job, sent("z1"))).await.unwrap();
    queue.delete(&delete(by_ref("r"))).await.unwrap();
    // and a plain message id deleted through zoomq
    queue
        .delete(&delete(Target::MessageId("m9".into())))
        .await
        .unwrap();
    close(queue).await;
    std::thread::sleep(Duration::from_millis(100));
    let (queue, go) = open_paused(dir.path());
    let by_ref_answer = queue.enqueue(&edit(by_ref("r"), "v2")).await;
    let by_id_answer = queue
        .enqueue(&edit(Target::MessageId("m9".into()), "x"))
        .await;
    drop(go);
    queue.recovered().await;
    assert!(
        matches!(by_ref_answer, Err(EnqueueError::Gone(_)))
            && matches!(by_id_answer, Err(EnqueueError::Gone(_))),
        "edits of deleted messages answered {by_ref_answer:?} and {by_id_answer:?}"
    );
    close(queue).await;
}

/// A ref whose edit is a dead letter is forgotten past its retention (only a dead letter that
/// *holds* the ref keeps it): the operator's retry of that edit is then dropped, and
/// `dead list` shows the edit as a send without a message id.
#[tokio::test]
async fn a_ref_with_a_dead_letter_is_not_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.complete(&job, sent("z1"))).await.unwrap();
    queue.enqueue(&edit(by_ref("r"), "v2")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    wait(queue.dead_letter(&job, rejected())).await.unwrap();
    age_ref(&queue, "r", 8).await;
    let forgotten = queue.expire_refs();
    queue.settled().await.unwrap();
    let listed = queue.dead_letters(None).unwrap();
    queue.dead_retry(&Selector::All).await.unwrap();
    let retried = claim_job(&queue).await;
    assert!(
        retried.is_some(),
        "forgotten: {forgotten}; dead list says op={:?} message_id={:?}; the retried edit was dropped",
        listed[0].op,
        listed[0].message_id
    );
    close(queue).await;
}

/// `status` names the message by an id that is not durable yet: a crash before that commit
/// makes the ref a send in doubt again (sent twice with "retry", a dead letter with "dead"),
/// though the producer was told "sent, message_id z1".
#[tokio::test]
async fn status_tells_a_message_id_only_once_it_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _ready, _) = open(dir.path()).await;
    queue.send(&send("r", "v1")).await.unwrap();
    let job = claim_job(&queue).await.unwrap();
    let mut commit = queue.complete(&job, sent("z1"));
    let status = queue.status(&status_of(by_ref("r"))).await.unwrap();
    let durable = !matches!(
        commit.try_recv(),
        Err(tokio::sync::oneshot::error::TryRecvError::Empty)
    );
    assert!(
        status.message_id.is_none() || durable,
        "status said {:?} {:?} before the id was committed",
        status.state,
        status.message_id
    );
    close(queue).await;
}
