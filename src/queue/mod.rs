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
pub use lifecycle::{describe, Deleted};
mod recovery;
mod refs;
mod slab;
mod sled_kv;
mod state;
mod store;
mod writer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use ledger::Ledger;
pub use ledger::Loc;
use refs::Refs;
pub use state::{State, Stored};
use store::{put_next_seq, EntryRef, Op, Store};
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

struct Shared {
    core: Mutex<Core>,
    /// Signals the writer thread that `core.batch` has writes, or that the queue is closing.
    writer_wake: Condvar,
    /// The writer thread, joined by `close` once it has committed everything.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Read handle on the storage; `None` while it is being reopened after a failure.
    store: RwLock<Option<Store>>,
    /// Where the queue is stored, and how to reopen it.
    medium: Box<dyn kv::Medium>,
    /// Its limits.
    storage: crate::config::StorageConfig,
    max_pending: u64,
    metrics: Arc<Metrics>,
    /// Accounts that just got ready work, for the dispatcher.
    ready_tx: mpsc::UnboundedSender<Arc<str>>,
    /// Woken when the earliest retry time may have moved earlier.
    timer_changed: tokio::sync::Notify,
    /// Woken after each successful group commit (jobs became claimable).
    committed: tokio::sync::Notify,
    /// Serializes operator commands on the dead letters: each reads sled, so it must see the
    /// previous one's writes committed.
    dead_ops: tokio::sync::Mutex<()>,
    /// The recovery thread, joined by `close`.
    recoverer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What recovery found, once it is done.
    recovered: tokio::sync::watch::Sender<Option<Recovery>>,
    /// Bumped whenever a message gets its id or reaches a final state, for `status` waits.
    status_changed: tokio::sync::watch::Sender<u64>,
    /// The number of the last batch committed.
    durable_batch: tokio::sync::watch::Sender<u64>,
    /// Cancelled by [`LocalQueue::fence_off`]; every claimed job carries it.
    fence: CancellationToken,
    /// Tests only: when set, recovery waits for a message before each record and answers one
    /// after it, so a test can look at the queue between records.
    #[cfg(test)]
    recovery_steps: Mutex<Option<RecoverySteps>>,
}

#[cfg(test)]
type RecoverySteps = (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>);

struct Core {
    state: State,
    /// The job ids of the dead letters (stored under `d` and `e`): one place decides whether
    /// a dead letter still exists, so that concurrent operator commands and deletes count
    /// each once.
    dead: HashSet<u64>,
    /// What is remembered of messages beyond their jobs (see `refs.rs`).
    refs: Refs,
    /// Records: entries appended and retired since the last commit (see `ledger.rs`).
    ledger: Ledger,
    /// Other writes not yet committed (dead letters), in the order the index changed.
    ops: Vec<Op>,
    /// The writes of a failed commit: they go first in the next one, in order.
    retained: Vec<Op>,
    /// The job-id counter as last handed to the writer.
    next_seq_written: u64,
    /// Whoever waits for the writes above to be durable.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Jobs with an entry not yet committed, with the number of the batch that holds the
    /// newest: not claimable until it is (see `delivery.rs`), so Zoom only ever receives
    /// durable content.
    overlay: HashMap<u64, u64>,
    /// Number of the batch now accumulating; the writer bumps it when it takes the batch.
    batch_gen: u64,
    /// The last commit's error, while commits are failing.
    failure: Option<String>,
    /// Free bytes on the database's filesystem, while below `storage.min_free_bytes`.
    space_low: Option<u64>,
    closing: bool,
    /// The writer thread has exited (after `closing`, with nothing left to commit).
    writer_gone: bool,
    /// The writer thread is waiting for work: only then does a change need to wake it (a
    /// wake-up is a system call, and under load the writer is busy committing anyway and
    /// looks for more before it waits).
    writer_waiting: bool,
    /// Recovery could not read the stored records back: kept apart from `failure`, which a
    /// later successful commit clears, because this one lasts until a restart.
    recovery_failure: Option<String>,
    /// While recovery runs in the background: the jobs whose content arrived since the open
    /// (new, coalesced or restored from the dead letters). They are not claimable until
    /// recovery is done (see [`recovery::recover`]).
    recovering: Option<HashSet<u64>>,
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

    /// [`LocalQueue::open`] with recovery taking one record per message on `steps.0` and
    /// answering on `steps.1` after each.
    #[cfg(test)]
    fn open_stepped(
        config: &crate::config::StorageConfig,
        steps: RecoverySteps,
    ) -> Result<(LocalQueue, mpsc::UnboundedReceiver<Arc<str>>), StoreError> {
        Self::open_inner(
            sled_medium(config),
            config,
            Arc::new(Metrics::new()),
            Some(steps),
        )
    }

    fn open_inner(
        medium: Box<dyn kv::Medium>,
        config: &crate::config::StorageConfig,
        metrics: Arc<Metrics>,
        #[cfg(test)] steps: Option<RecoverySteps>,
    ) -> Result<(LocalQueue, mpsc::UnboundedReceiver<Arc<str>>), StoreError> {
        let started = Instant::now();
        let (kv, mut committer) = medium.open()?;
        let store = Store::new(kv);
        let migrated = recovery::migrate_v1(&store, &mut committer)?;
        let first_new_record = store.last_record()?.map_or(1, |r| r + 1);
        let mut state = State::new(store.next_seq()?);
        // Remembered messages are read before anything is served (they are few next to a
        // backlog of edits: one per ref in use or message deleted lately).
        let mut refs = Refs::default();
        for record in store.refs() {
            let record = record?;
            let key = state.key(&record.name);
            let message_key = record
                .message_id
                .as_deref()
                .filter(|_| refs::ref_of(&record.name).is_some())
                .map(|id| state.key(id));
            // A ref held by its dead letter: what recovery restores for it waits out of line.
            if let (Some(_), Some(account)) = (&record.held, refs::account_of(&record.name)) {
                state.hold(key, account);
            }
            refs.put(key, record, message_key);
        }
        let ledger = Ledger::new(first_new_record);
        let dead_seqs = store.dead_seqs()?;
        let dead = dead_seqs.len() as u64;
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                next_seq_written: state.next_seq(),
                state,
                refs,
                dead: dead_seqs,
                ledger,
                ops: Vec::new(),
                retained: Vec::new(),
                waiters: Vec::new(),
                overlay: HashMap::new(),
                batch_gen: 1,
                failure: None,
                space_low: medium
                    .free_space()
                    .filter(|free| *free < config.min_free_bytes),
                closing: false,
                writer_gone: false,
                writer_waiting: false,
                recovery_failure: None,
                recovering: Some(HashSet::new()),
            }),
            writer_wake: Condvar::new(),
            writer: Mutex::new(None),
            store: RwLock::new(Some(store.clone())),
            medium,
            storage: config.clone(),
            max_pending: config.max_pending,
            metrics,
            ready_tx,
            timer_changed: tokio::sync::Notify::new(),
            committed: tokio::sync::Notify::new(),
            dead_ops: tokio::sync::Mutex::new(()),
            recoverer: Mutex::new(None),
            recovered: tokio::sync::watch::channel(None).0,
            status_changed: tokio::sync::watch::channel(0).0,
            durable_batch: tokio::sync::watch::channel(0).0,
            fence: CancellationToken::new(),
            #[cfg(test)]
            recovery_steps: Mutex::new(steps),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("zoomq-commit".into())
            .spawn(move || writer::writer_loop(&writer_shared, committer))
            .map_err(StoreError::Io)?;
        *shared.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(writer);
        let recovery_shared = shared.clone();
        let recoverer = std::thread::Builder::new()
            .name("zoomq-recover".into())
            .spawn(move || {
                recovery::recover(
                    &recovery_shared,
                    &store,
                    first_new_record,
                    started,
                    dead,
                    migrated,
                )
            })
            .map_err(StoreError::Io)?;
        *shared.recoverer.lock().unwrap_or_else(|e| e.into_inner()) = Some(recoverer);
        Ok((LocalQueue { shared }, ready_rx))
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

    /// Stops accepting edits, commits everything outstanding and stops the writer thread.
    /// Blocking; call from a blocking context.
    pub fn close(&self) {
        self.shared.lock().closing = true;
        // The recovery thread stops at its next record once it sees `closing`.
        join(&self.shared.recoverer, "recovery");
        self.shared.writer_wake.notify_one();
        // The writer owns the write side of sled; joining it releases the database.
        join(&self.shared.writer, "storage writer");
    }
}

fn sled_medium(config: &crate::config::StorageConfig) -> Box<dyn kv::Medium> {
    Box::new(sled_kv::SledMedium {
        path: config.path.clone(),
        cache_capacity: config.cache_capacity,
    })
}

/// Joins the thread in `slot`, if it is still there.
fn join(slot: &Mutex<Option<std::thread::JoinHandle<()>>>, name: &str) {
    let thread = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(thread) = thread {
        if thread.join().is_err() {
            tracing::error!("the {name} thread panicked");
        }
    }
}

impl Core {
    /// Drops the message's pending job unsent (a delete cancelled it, its dead letter was
    /// purged, or a stored delete outranks it): its entry retires and it needs no commit.
    fn drop_pending(&mut self, key: state::MessageKey) {
        if let Some((seq, loc)) = self.state.drop_pending(key) {
            if let Some(loc) = loc {
                self.ledger.done(loc);
            }
            self.overlay.remove(&seq);
        }
    }

    /// Deletes dead letter `seq` (both keys) if it still exists; returns whether it did.
    fn remove_dead(&mut self, seq: u64) -> bool {
        if !self.dead.remove(&seq) {
            return false;
        }
        self.ops.push(Op::Del(store::key(store::DEAD, seq)));
        self.ops.push(Op::Del(store::key(store::DEAD_BODY, seq)));
        true
    }

    /// Appends a job's new entry and marks the job not durable until it is committed.
    fn write_entry(&mut self, entry: &EntryRef<'_>, body: &[u8]) -> Loc {
        self.overlay.insert(entry.seq, self.batch_gen);
        self.ledger.append(entry, body)
    }

    /// Whether anything waits to be committed.
    fn has_writes(&self) -> bool {
        !self.retained.is_empty()
            || !self.ops.is_empty()
            || self.ledger.has_changes()
            || self.state.next_seq() != self.next_seq_written
    }

    /// Every write since the last take, in order, for one commit.
    fn take_writes(&mut self) -> Vec<Op> {
        let mut ops = std::mem::take(&mut self.retained);
        ops.extend(self.ledger.take());
        ops.append(&mut self.ops);
        if self.state.next_seq() != self.next_seq_written {
            self.next_seq_written = self.state.next_seq();
            ops.push(put_next_seq(self.next_seq_written));
        }
        ops
    }
}

impl Shared {
    /// A read handle on the database (a cheap clone), unless it is being reopened.
    fn store(&self) -> Result<Store, StoreError> {
        // Never block a reader (an async worker) behind a reopen.
        match self.store.try_read() {
            Ok(slot) => slot.clone().ok_or(StoreError::Reopening),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().clone().ok_or(StoreError::Reopening)
            }
            Err(std::sync::TryLockError::WouldBlock) => Err(StoreError::Reopening),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the index as it was at the panic; keep going
        // rather than poisoning every producer.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announce(&self, account: Option<Arc<str>>) {
        if let Some(account) = account {
            let _ = self.ready_tx.send(account);
        }
    }

    /// Registers a waiter for the writes already in the batch and wakes the writer.
    fn commit_locked(&self, mut core: MutexGuard<'_, Core>) -> Commit {
        let (tx, rx) = oneshot::channel();
        // The writer has exited (the queue closed): nobody would ever answer.
        if core.writer_gone {
            let _ = tx.send(Err("the queue is closed".into()));
            return rx;
        }
        core.waiters.push(tx);
        let wake = core.writer_waiting;
        drop(core);
        if wake {
            self.writer_wake.notify_one();
        }
        rx
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
