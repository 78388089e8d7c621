//! Forgetting: a ref is remembered `storage.ref_retention` after its last use, then its
//! record goes from memory and disk; one that a job or a dead letter still needs stays.

use super::tests::{close, open};
use super::*;
use crate::config::StorageConfig;
use crate::protocol::{MessageState, Send, StatusQuery, Target};

const HOUR_MS: u64 = 3_600_000;

fn send(reference: &str) -> Send {
    Send {
        reference: reference.into(),
        account_id: "a".into(),
        robot_jid: "bot@xmpp.zoom.us".into(),
        to_jid: "channel@conf".into(),
        user_jid: None,
        visible_to_user: None,
        reply_to: None,
        is_markdown_support: None,
        content: serde_json::value::to_raw_value(&serde_json::json!({"head": {"text": "v"}}))
            .unwrap(),
    }
}

fn status(reference: &str) -> StatusQuery {
    StatusQuery {
        target: Target::Ref(reference.into()),
        account_id: "a".into(),
        robot_jid: "bot@xmpp.zoom.us".into(),
        wait: None,
    }
}

/// Claims the account's next job, which must be a send, and says Zoom posted it.
async fn deliver_send(queue: &LocalQueue, message_id: &str) {
    queue.settled().await.unwrap();
    let Claimed::Job(job) = queue.claim("a").unwrap() else {
        panic!("a send to claim")
    };
    assert!(matches!(job.call, Call::Send { .. }), "{job:?}");
    let sent = SentMessage {
        message_id: message_id.into(),
        sent_time: None,
    };
    wait(queue.complete(&job, Some(sent))).await.unwrap();
}

#[tokio::test]
async fn a_ref_is_forgotten_after_its_retention_unless_still_needed() {
    let dir = tempfile::tempdir().unwrap();
    let (queue, _, _) = open(dir.path()).await;
    queue.send(&send("done")).await.unwrap();
    deliver_send(&queue, "z1").await;
    // Still pending: needed, whatever its age.
    queue.send(&send("waiting")).await.unwrap();
    let retention = StorageConfig::default().ref_retention.as_millis() as u64;
    let now = now_ms();

    assert_eq!(queue.expire_refs_at(now + retention - HOUR_MS), 0);
    assert_eq!(queue.stats().refs, 2);
    assert_eq!(queue.expire_refs_at(now + retention + HOUR_MS), 1);
    assert!(matches!(
        queue.status(&status("done")).await,
        Err(EnqueueError::NotFound(_))
    ));
    assert_eq!(
        queue.status(&status("waiting")).await.unwrap().state,
        MessageState::Pending
    );

    // Gone from disk too: a restart does not bring it back, and the ref is free again.
    close(queue).await;
    let (queue, _, _) = open(dir.path()).await;
    assert_eq!(queue.stats().refs, 1);
    let again = queue.send(&send("done")).await.unwrap();
    assert!(!again.coalesced);
    close(queue).await;
}
