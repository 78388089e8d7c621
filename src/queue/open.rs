//! Opening a queue and closing it: the medium opened, a database of the earlier layout
//! converted, the remembered refs read before anything is served, the index's counters set,
//! the writer and recovery threads started; on close, both threads joined once everything is
//! committed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ledger::Ledger;
use super::refs::{self, Refs};
#[cfg(test)]
use super::shared::RecoverySteps;
use super::shared::{Core, Shared};
use super::store::Store;
use super::{kv, recovery, sled_kv, writer, LocalQueue, State, StoreError};
use crate::metrics::Metrics;

impl LocalQueue {
    /// [`LocalQueue::open`] with recovery taking one record per message on `steps.0` and
    /// answering on `steps.1` after each.
    #[cfg(test)]
    pub(super) fn open_stepped(
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

    /// Opens the queue on `medium` (see [`LocalQueue::open`]).
    pub(super) fn open_inner(
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

pub(super) fn sled_medium(config: &crate::config::StorageConfig) -> Box<dyn kv::Medium> {
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
