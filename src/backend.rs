//! The queue the daemon runs on, whichever the storage: the embedded queue (sled, one
//! daemon) or the cluster's (NATS JetStream, several daemons: [`crate::cluster`]). The socket,
//! the dispatcher and the metrics see only this; each call goes to the one that runs.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::Cluster;
use crate::protocol::{DeadLetter, Delete, Edit, MessageStatus, Selector, Send, StatusQuery};
use crate::queue::{
    Claimed, Commit, DeadInfo, DeadOutcome, Deleted, EnqueueError, Enqueued, Head, Job, LocalQueue,
    QueueStats, SentMessage, StoreError,
};

/// Cheap to clone.
#[derive(Clone)]
pub enum Queue {
    Local(LocalQueue),
    Cluster(Arc<Cluster>),
}

impl Queue {
    pub async fn enqueue(&self, edit: &Edit) -> Result<Enqueued, EnqueueError> {
        match self {
            Queue::Local(q) => q.enqueue(edit).await,
            Queue::Cluster(c) => c.enqueue(edit).await,
        }
    }

    pub async fn send(&self, send: &Send) -> Result<Enqueued, EnqueueError> {
        match self {
            Queue::Local(q) => q.send(send).await,
            Queue::Cluster(c) => c.send(send).await,
        }
    }

    pub async fn delete(&self, delete: &Delete) -> Result<Deleted, EnqueueError> {
        match self {
            Queue::Local(q) => q.delete(delete).await,
            Queue::Cluster(c) => c.delete(delete).await,
        }
    }

    pub async fn status(&self, query: &StatusQuery) -> Result<MessageStatus, EnqueueError> {
        match self {
            Queue::Local(q) => q.status(query).await,
            Queue::Cluster(c) => c.status(query).await,
        }
    }

    /// Dead letters, once the outcomes decided so far are written.
    pub async fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, String> {
        match self {
            Queue::Local(q) => {
                q.settled().await?;
                q.dead_letters(limit).map_err(|e| e.to_string())
            }
            Queue::Cluster(c) => c.dead_letters(limit).await,
        }
    }

    pub async fn dead_retry(&self, selector: &Selector) -> Result<DeadOutcome, String> {
        match self {
            Queue::Local(q) => q.dead_retry(selector).await,
            Queue::Cluster(c) => c.dead_command(selector, false).await,
        }
    }

    pub async fn dead_purge(&self, selector: &Selector) -> Result<DeadOutcome, String> {
        match self {
            Queue::Local(q) => q.dead_purge(selector).await,
            Queue::Cluster(c) => c.dead_command(selector, true).await,
        }
    }

    /// Figures of the whole queue (cluster mode: of every daemon).
    pub fn stats(&self) -> QueueStats {
        match self {
            Queue::Local(q) => q.stats(),
            Queue::Cluster(c) => c.stats(),
        }
    }

    /// The cluster's part of `stats`, in the cluster mode.
    pub fn cluster_view(&self) -> Option<serde_json::Value> {
        match self {
            Queue::Local(_) => None,
            Queue::Cluster(c) => Some(c.view()),
        }
    }

    /// Age of the oldest job not yet delivered (cluster mode: cluster-wide, the others' as
    /// their last heartbeat told).
    pub fn oldest_age(&self) -> Option<Duration> {
        match self {
            Queue::Local(q) => q.oldest_age().ok().flatten(),
            Queue::Cluster(c) => c.oldest_age(),
        }
    }

    /// The `n` accounts (of this daemon) with the largest ready backlogs.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        match self {
            Queue::Local(q) => q.top_accounts(n),
            Queue::Cluster(c) => c.top_accounts(n),
        }
    }

    pub fn observe(&self) {
        match self {
            Queue::Local(q) => q.observe(),
            Queue::Cluster(c) => c.observe(),
        }
    }

    // The dispatcher's side.

    pub fn head(&self, account: &str) -> Head {
        match self {
            Queue::Local(q) => q.head(account),
            Queue::Cluster(c) => c.head(account),
        }
    }

    pub fn claim(&self, account: &str) -> Result<Claimed, StoreError> {
        match self {
            Queue::Local(q) => q.claim(account),
            Queue::Cluster(c) => c.claim(account),
        }
    }

    /// Whether a claimed send's in-doubt mark is committed (see `Job::marked_batch`).
    pub fn is_durable(&self, job: &Job) -> bool {
        match (self, job.marked_batch) {
            (_, None) => true,
            (Queue::Local(q), Some(batch)) => q.is_durable(batch),
            (Queue::Cluster(c), Some(_)) => c.is_durable(job),
        }
    }

    /// Resolves once a claimed send's in-doubt mark is committed.
    pub async fn durable(&self, job: &Job) {
        match (self, job.marked_batch) {
            (_, None) => {}
            (Queue::Local(q), Some(batch)) => q.durable(batch).await,
            (Queue::Cluster(c), Some(_)) => c.durable(job).await,
        }
    }

    pub fn complete(&self, job: &Job, sent: Option<SentMessage>) -> Commit {
        match self {
            Queue::Local(q) => q.complete(job, sent),
            Queue::Cluster(c) => c.complete(job, sent),
        }
    }

    pub fn retry_later(&self, job: &Job, failed: bool) -> (bool, Commit) {
        match self {
            Queue::Local(q) => q.retry_later(job, failed),
            Queue::Cluster(c) => c.retry_later(job, failed),
        }
    }

    pub fn dead_letter(&self, job: &Job, info: DeadInfo) -> Commit {
        match self {
            Queue::Local(q) => q.dead_letter(job, info),
            Queue::Cluster(c) => c.dead_letter(job, info),
        }
    }

    pub fn promote_due(&self, now_ms: u64) {
        match self {
            Queue::Local(q) => q.promote_due(now_ms),
            Queue::Cluster(c) => c.promote_due(now_ms),
        }
    }

    pub fn next_due_ms(&self) -> Option<u64> {
        match self {
            Queue::Local(q) => q.next_due_ms(),
            Queue::Cluster(c) => c.next_due_ms(),
        }
    }

    pub async fn committed(&self) {
        match self {
            Queue::Local(q) => q.committed().await,
            Queue::Cluster(c) => c.committed().await,
        }
    }

    pub async fn timer_changed(&self) {
        match self {
            Queue::Local(q) => q.timer_changed().await,
            Queue::Cluster(c) => c.timer_changed().await,
        }
    }

    pub fn expire_refs(&self) -> usize {
        match self {
            Queue::Local(q) => q.expire_refs(),
            Queue::Cluster(c) => c.expire_refs(),
        }
    }

    /// Commits everything and lets go of the storage (cluster mode: of every partition, whose
    /// leases are released for the other daemons).
    pub async fn close(&self) {
        match self {
            Queue::Local(q) => {
                let q = q.clone();
                let _ = tokio::task::spawn_blocking(move || q.close()).await;
            }
            Queue::Cluster(c) => c.close().await,
        }
    }
}
