//! What every clone of a [`LocalQueue`](super::LocalQueue) shares: the index and everything
//! not yet committed, under one lock ([`Core`]), beside the handles and signals of the writer
//! and recovery threads ([`Shared`]); and the commit plumbing: appending a job's entry, taking
//! every write since the last commit for one batch, handing a batch's waiter to the writer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::kv;
use super::ledger::{Ledger, Loc};
use super::refs::Refs;
use super::state::{self, State};
use super::store::{self, put_next_seq, EntryRef, Op, Store, StoreError};
use super::{Commit, Recovery};
use crate::metrics::Metrics;

/// What the clones of a queue share.
pub(super) struct Shared {
    pub(super) core: Mutex<Core>,
    /// Signals the writer thread that `core.batch` has writes, or that the queue is closing.
    pub(super) writer_wake: Condvar,
    /// The writer thread, joined by `close` once it has committed everything.
    pub(super) writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Read handle on the storage; `None` while it is being reopened after a failure.
    pub(super) store: RwLock<Option<Store>>,
    /// Where the queue is stored, and how to reopen it.
    pub(super) medium: Box<dyn kv::Medium>,
    /// Its limits.
    pub(super) storage: crate::config::StorageConfig,
    pub(super) max_pending: u64,
    pub(super) metrics: Arc<Metrics>,
    /// Accounts that just got ready work, for the dispatcher.
    pub(super) ready_tx: mpsc::UnboundedSender<Arc<str>>,
    /// Woken when the earliest retry time may have moved earlier.
    pub(super) timer_changed: tokio::sync::Notify,
    /// Woken after each successful group commit (jobs became claimable).
    pub(super) committed: tokio::sync::Notify,
    /// Serializes operator commands on the dead letters: each reads sled, so it must see the
    /// previous one's writes committed.
    pub(super) dead_ops: tokio::sync::Mutex<()>,
    /// The recovery thread, joined by `close`.
    pub(super) recoverer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What recovery found, once it is done.
    pub(super) recovered: tokio::sync::watch::Sender<Option<Recovery>>,
    /// Bumped whenever a message gets its id or reaches a final state, for `status` waits.
    pub(super) status_changed: tokio::sync::watch::Sender<u64>,
    /// The number of the last batch committed.
    pub(super) durable_batch: tokio::sync::watch::Sender<u64>,
    /// Cancelled by [`super::LocalQueue::fence_off`]; every claimed job carries it.
    pub(super) fence: CancellationToken,
    /// Tests only: when set, recovery waits for a message before each record and answers one
    /// after it, so a test can look at the queue between records.
    #[cfg(test)]
    pub(super) recovery_steps: Mutex<Option<RecoverySteps>>,
}

#[cfg(test)]
pub(super) type RecoverySteps = (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>);

/// The index and everything not yet committed, under the queue's one lock.
pub(super) struct Core {
    pub(super) state: State,
    /// The job ids of the dead letters (stored under `d` and `e`): one place decides whether
    /// a dead letter still exists, so that concurrent operator commands and deletes count
    /// each once.
    pub(super) dead: HashSet<u64>,
    /// What is remembered of messages beyond their jobs (see `refs.rs`).
    pub(super) refs: Refs,
    /// Records: entries appended and retired since the last commit (see `ledger.rs`).
    pub(super) ledger: Ledger,
    /// Other writes not yet committed (dead letters), in the order the index changed.
    pub(super) ops: Vec<Op>,
    /// The writes of a failed commit: they go first in the next one, in order.
    pub(super) retained: Vec<Op>,
    /// The job-id counter as last handed to the writer.
    pub(super) next_seq_written: u64,
    /// Whoever waits for the writes above to be durable.
    pub(super) waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Jobs with an entry not yet committed, with the number of the batch that holds the
    /// newest: not claimable until it is (see `delivery.rs`), so Zoom only ever receives
    /// durable content.
    pub(super) overlay: HashMap<u64, u64>,
    /// Number of the batch now accumulating; the writer bumps it when it takes the batch.
    pub(super) batch_gen: u64,
    /// The last commit's error, while commits are failing.
    pub(super) failure: Option<String>,
    /// Free bytes on the database's filesystem, while below `storage.min_free_bytes`.
    pub(super) space_low: Option<u64>,
    pub(super) closing: bool,
    /// The writer thread has exited (after `closing`, with nothing left to commit).
    pub(super) writer_gone: bool,
    /// The writer thread is waiting for work: only then does a change need to wake it (a
    /// wake-up is a system call, and under load the writer is busy committing anyway and
    /// looks for more before it waits).
    pub(super) writer_waiting: bool,
    /// Recovery could not read the stored records back: kept apart from `failure`, which a
    /// later successful commit clears, because this one lasts until a restart.
    pub(super) recovery_failure: Option<String>,
    /// While recovery runs in the background: the jobs whose content arrived since the open
    /// (new, coalesced or restored from the dead letters). They are not claimable until
    /// recovery is done (see [`super::recovery::recover`]).
    pub(super) recovering: Option<HashSet<u64>>,
}

impl Core {
    /// Drops the message's pending job unsent (a delete cancelled it, its dead letter was
    /// purged, or a stored delete outranks it): its entry retires and it needs no commit.
    pub(super) fn drop_pending(&mut self, key: state::MessageKey) {
        if let Some((seq, loc)) = self.state.drop_pending(key) {
            if let Some(loc) = loc {
                self.ledger.done(loc);
            }
            self.overlay.remove(&seq);
        }
    }

    /// Deletes dead letter `seq` (both keys) if it still exists; returns whether it did.
    pub(super) fn remove_dead(&mut self, seq: u64) -> bool {
        if !self.dead.remove(&seq) {
            return false;
        }
        self.ops.push(Op::Del(store::key(store::DEAD, seq)));
        self.ops.push(Op::Del(store::key(store::DEAD_BODY, seq)));
        true
    }

    /// Appends a job's new entry and marks the job not durable until it is committed.
    pub(super) fn write_entry(&mut self, entry: &EntryRef<'_>, body: &[u8]) -> Loc {
        self.overlay.insert(entry.seq, self.batch_gen);
        self.ledger.append(entry, body)
    }

    /// Whether anything waits to be committed.
    pub(super) fn has_writes(&self) -> bool {
        !self.retained.is_empty()
            || !self.ops.is_empty()
            || self.ledger.has_changes()
            || self.state.next_seq() != self.next_seq_written
    }

    /// Every write since the last take, in order, for one commit.
    pub(super) fn take_writes(&mut self) -> Vec<Op> {
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
    pub(super) fn store(&self) -> Result<Store, StoreError> {
        // Never block a reader (an async worker) behind a reopen.
        match self.store.try_read() {
            Ok(slot) => slot.clone().ok_or(StoreError::Reopening),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().clone().ok_or(StoreError::Reopening)
            }
            Err(std::sync::TryLockError::WouldBlock) => Err(StoreError::Reopening),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves the index as it was at the panic; keep going
        // rather than poisoning every producer.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn announce(&self, account: Option<Arc<str>>) {
        if let Some(account) = account {
            let _ = self.ready_tx.send(account);
        }
    }

    /// Registers a waiter for the writes already in the batch and wakes the writer.
    pub(super) fn commit_locked(&self, mut core: MutexGuard<'_, Core>) -> Commit {
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
