//! The durable, coalescing edit queue: the only module that touches sled.
//!
//! # Design constraints
//! - **Ack only what is durable.** [`LocalQueue::enqueue`] returns only after the edit's write is
//!   flushed and fsynced ([`store`] explains why sled's own flush is not enough).
//! - **Group commit.** Every change (enqueue, claim result, dead letter) appends its writes to
//!   one shared batch under the queue's lock, and a single writer thread commits whatever has
//!   accumulated as one atomic sled batch with one flush. Concurrent producers therefore share
//!   fsyncs, and writes reach disk in the order the in-memory index changed.
//! - **Coalesce against pending, never in flight.** A message has at most one pending job; a
//!   new edit replaces its content in place (same job id, same place in line). An edit arriving
//!   while the message's previous job is in flight becomes a new pending job that is only
//!   claimable once the in-flight one finishes (see [`state`]).
//! - **Memory is bounded by the index, not the content.** The in-memory index holds ids and
//!   times only; bodies stay on disk until a worker claims them. sled's cache is set explicitly.
//! - **Counters, not scans.** Pending, in-flight and dead counts are kept as the index changes.
//!
//! # Restart
//! Every job with a header on disk is pending after a restart, including those that were in
//! flight when the process died. If a message has two (an in-flight one and a newer pending
//! one), the newer wins and the older is deleted: only the latest content matters.
//!
//! # Storage failure
//! A failed commit keeps its writes and retries them every second; its waiters get
//! `unavailable`. While a commit is failing, new edits are refused with `unavailable` and
//! nothing already accepted is lost. The in-memory index keeps the refused batch's changes,
//! so an edit answered `unavailable` may still be delivered; producers simply retry it.

mod dead;
mod delivery;
pub use delivery::{Claimed, Head};
mod outcome;
pub use outcome::SentMessage;
mod entry;
mod kv;
mod ledger;
mod lifecycle;
pub mod nats_kv;
mod nats_layout;
mod nats_mirror;
pub use lifecycle::{describe, Deleted};
mod open;
mod recovery;
mod refs;
mod shared;
mod slab;
mod sled_kv;
mod state;
mod store;
mod writer;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
pub use ledger::Loc;
use open::sled_medium;
use shared::{Core, Shared};
pub use state::{State, Stored};
pub use store::{DeadRecord, JobHeader, JobOp, StoreError};

/// Milliseconds since the Unix epoch: the clock of every time stored on disk.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How an enqueue was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Enqueued {
    pub job_id: u64,
    pub coalesced: bool,
}

/// Why an enqueue was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EnqueueError {
    #[error("the queue holds {0} pending edits, its limit (storage.max_pending); try again later")]
    Full(u64),
    #[error("{0}")]
    Unavailable(String),
    /// The ref or message is unknown.
    #[error("{0}")]
    NotFound(String),
    /// The message was deleted.
    #[error("{0}")]
    Gone(String),
    #[error(
        "zoomq remembers {0} messages by ref or as deleted (storage.max_refs); a new one is \
         accepted once older ones are forgotten (storage.ref_retention after their last use)"
    )]
    TooManyRefs(u64),
    /// Larger than the cluster can carry between daemons (NATS's `max_payload`).
    #[error("{0}")]
    TooLarge(String),
}

/// Which Zoom call a claimed job makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// The first send of a message named by a ref, with the send's body (the job's body is
    /// its content, as stored).
    Send {
        body: Vec<u8>,
    },
    Edit {
        message_id: String,
    },
    Delete {
        message_id: String,
    },
}

/// A job claimed by a worker, with everything needed to send it.
#[derive(Debug, Clone)]
pub struct Job {
    pub seq: u64,
    pub header: JobHeader,
    /// When the content being sent was acknowledged (unix ms).
    pub updated_ms: u64,
    /// Zoom's request body (for a delete, its query parameters as a JSON object).
    pub body: Vec<u8>,
    /// Whether the account still had ready work after this claim.
    pub more: bool,
    pub call: Call,
    /// A send may leave only once this batch is committed: it records that the send is
    /// under way, so that a crash during it is known as one (see `refs.rs`).
    pub marked_batch: Option<u64>,
    /// A send whose earlier attempt's outcome is unknown: sending it may post it twice.
    pub in_doubt: bool,
    /// `in_doubt`, and not yet counted or logged as such (a send put back after a 429 and
    /// claimed again is the same doubt).
    pub doubt_new: bool,
    /// Set by the dispatcher when this attempt's outcome is unknown (kept by `retry_later`).
    pub outcome_unknown: bool,
    /// Cancelled when the queue that claimed it is fenced off (cluster mode: this daemon
    /// gave up or lost the job's partition): its request must stop at once, and its outcome
    /// is not recorded (the partition's new owner sends it again).
    pub fence: CancellationToken,
    /// Where its entry is stored.
    loc: Loc,
    /// The message's key in the index.
    key: state::MessageKey,
}

/// Why a job went to the dead letters.
#[derive(Debug, Clone)]
pub struct DeadInfo {
    pub reason: &'static str,
    pub status: Option<u16>,
    pub zoom_code: Option<i64>,
    pub detail: String,
}

/// Result of an operator's dead-letter command.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadOutcome {
    /// Dead letters put back in the queue (retry) or deleted (purge).
    pub affected: u64,
    /// Dead letters dropped by a retry because a newer edit of the message is pending.
    pub superseded: u64,
}

/// Queue figures, all read from counters.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    pub pending: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub accounts: u64,
    /// Messages remembered by ref or as deleted.
    pub refs: u64,
    pub storage_error: Option<String>,
    /// Recovery is still reading stored edits back (counts are partial meanwhile).
    pub recovering: bool,
}

/// A waiter's view of its commit: `Err` carries the storage error text.
pub type Commit = oneshot::Receiver<Result<(), String>>;

/// The queue. Cheap to clone; all clones share one index and one writer thread.
#[derive(Clone)]
pub struct LocalQueue {
    shared: Arc<Shared>,
}

/// What recovery found on disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recovery {
    pub pending: u64,
    pub dead: u64,
    /// Older jobs of a message that also had a newer one (in flight at the crash).
    pub superseded: u64,
    /// Jobs converted from the layout of earlier versions.
    pub migrated: u64,
    pub elapsed: Duration,
}

impl LocalQueue {
    /// Opens (or creates) the database and starts the writer thread and the recovery thread,
    /// which rebuilds the index in the background (see [`recovery::recover`]); new edits are accepted
    /// meanwhile. Returns the queue and the receiver of ready-account announcements for the
    /// dispatcher.
    pub fn open(
        config: &crate::config::StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(LocalQueue, mpsc::UnboundedReceiver<Arc<str>>), StoreError> {
        Self::open_inner(
            sled_medium(config),
            config,
            metrics,
            #[cfg(test)]
            None,
        )
    }

    /// [`LocalQueue::open`] on a partition of the cluster mode, taken over by this daemon (its
    /// limits from `config`, its data in JetStream).
    pub fn open_partition(
        partition: Arc<nats_kv::Partition>,
        config: &crate::config::StorageConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(LocalQueue, mpsc::UnboundedReceiver<Arc<str>>), StoreError> {
        Self::open_inner(
            Box::new(nats_kv::NatsMedium(partition)),
            config,
            metrics,
            #[cfg(test)]
            None,
        )
    }

    /// What recovery found, once it is done (it runs in the background from `open` on).
    pub async fn recovered(&self) -> Recovery {
        let mut watch = self.shared.recovered.subscribe();
        let done = watch.wait_for(Option::is_some).await;
        done.map(|r| r.expect("waited for Some"))
            .unwrap_or_default()
    }

    /// Whether the queue is closing or closed (nothing more will be committed).
    pub fn closing(&self) -> bool {
        self.shared.lock().closing
    }

    /// Whether recovery is still running.
    pub fn recovering(&self) -> bool {
        self.shared.lock().recovering.is_some()
    }

    pub fn stats(&self) -> QueueStats {
        let core = self.shared.lock();
        QueueStats {
            pending: core.state.pending(),
            in_flight: core.state.in_flight(),
            dead: core.dead.len() as u64,
            accounts: core.state.accounts() as u64,
            refs: core.refs.len() as u64,
            storage_error: core
                .failure
                .clone()
                .or_else(|| core.recovery_failure.clone()),
            recovering: core.recovering.is_some(),
        }
    }

    /// The `n` accounts with the largest ready backlogs.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        self.shared.lock().state.top_accounts(n)
    }

    /// Age of the oldest job not yet delivered, as far as the oldest stored record tells (a
    /// job rewritten to a newer record by a retry or a coalesced edit keeps its enqueue time
    /// but is only seen once the records before it are gone). One record read, not a scan.
    pub fn oldest_age(&self) -> Result<Option<Duration>, StoreError> {
        let oldest = self.shared.lock().ledger.oldest();
        let Some((record, live)) = oldest else {
            return Ok(None);
        };
        // An uncommitted record is not readable yet: then there is no age to tell.
        let Some(times) = self.shared.store()?.enqueue_times(record)? else {
            return Ok(None);
        };
        let enqueued = live.iter().filter_map(|&i| times.get(i as usize)).min();
        Ok(enqueued.map(|&e| Duration::from_millis(now_ms().saturating_sub(e))))
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.shared.store()?.size_on_disk()
    }

    /// Refreshes the queue's gauges; called before each metrics scrape.
    pub fn observe(&self) {
        let stats = self.stats();
        let metrics = &self.shared.metrics;
        metrics.queue_pending.set(stats.pending as i64);
        metrics.queue_in_flight.set(stats.in_flight as i64);
        metrics.queue_dead.set(stats.dead as i64);
        metrics.refs_remembered.set(stats.refs as i64);
        if let Ok(age) = self.oldest_age() {
            metrics
                .queue_oldest_pending_age
                .set(age.map_or(0.0, |a| a.as_secs_f64()));
        }
        if let Ok(size) = self.size_on_disk() {
            metrics.storage_size.set(size as i64);
        }
        if let Some(free) = self.shared.medium.free_space() {
            metrics.storage_free.set(free as i64);
        }
        metrics
            .storage_min_free
            .set(self.shared.storage.min_free_bytes as i64);
    }

    /// Stops claiming and cancels the fence of every job claimed (cluster mode: another
    /// daemon owns this queue's partition, or is about to).
    pub fn fence_off(&self) {
        self.shared.fence.cancel();
    }
}

/// Awaits a commit, mapping a stopped writer to an error.
pub async fn wait(commit: Commit) -> Result<(), String> {
    commit
        .await
        .unwrap_or_else(|_| Err("the storage writer stopped".into()))
}

#[cfg(test)]
mod ledger_tests;
#[cfg(test)]
mod lifecycle_cases;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod nats_tests;
#[cfg(test)]
mod retention_tests;
#[cfg(test)]
mod tests;
