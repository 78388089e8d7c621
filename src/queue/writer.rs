//! The queue's single writer thread: group commit of the shared batch, the free-space guard,
//! and reopening the database after an I/O error. Everything here runs on the thread named
//! `zoomq-commit`; the async side only appends to the batch and waits for its commit.

use std::time::{Duration, Instant};

use super::store::{Committer, Store, StoreError};
use super::Shared;

/// The writer thread: commits whatever accumulated, as one batch, until the queue closes.
pub(super) fn writer_loop(shared: &Shared, committer: Committer) {
    let mut committer = Some(committer);
    let mut failures = 0u32;
    loop {
        let (ops, waiters, taken_gen) = {
            let mut core = shared.lock();
            loop {
                if core.has_writes() || !core.waiters.is_empty() {
                    break;
                }
                if core.closing {
                    core.writer_gone = true;
                    return;
                }
                core.writer_waiting = true;
                if core.space_low.is_some() {
                    // Re-check the free space every second until it is back.
                    core = shared
                        .writer_wake
                        .wait_timeout(core, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    core.space_low = low_space(shared);
                    if core.space_low.is_none() {
                        tracing::info!("free space is back; accepting edits again");
                    }
                } else {
                    core = shared
                        .writer_wake
                        .wait(core)
                        .unwrap_or_else(|e| e.into_inner());
                }
                core.writer_waiting = false;
            }
            let taken_gen = core.batch_gen;
            core.batch_gen += 1;
            (
                core.take_writes(),
                std::mem::take(&mut core.waiters),
                taken_gen,
            )
        };
        let started = Instant::now();
        let n_ops = ops.len();
        let result = if ops.is_empty() {
            Ok(())
        } else {
            // After a failure the committer is gone and the database is reopened first.
            let ready = match committer.take() {
                Some(committer) => Ok(committer),
                None => reopen(shared),
            };
            ready.and_then(|mut ready| {
                ready.commit(&ops)?;
                committer = Some(ready);
                Ok(())
            })
        };
        shared
            .metrics
            .commit_duration
            .observe(started.elapsed().as_secs_f64());
        shared.metrics.commit_batch_size.observe(n_ops as f64);
        match result {
            Ok(()) => {
                {
                    let mut core = shared.lock();
                    // Committed: sled now has these versions. Newer writes (a later batch)
                    // keep their overlay entries.
                    core.overlay.retain(|_, batch_gen| *batch_gen > taken_gen);
                    let was_low = core.space_low.is_some();
                    core.space_low = low_space(shared);
                    if let (false, Some(free)) = (was_low, core.space_low) {
                        tracing::error!(
                            free_bytes = free,
                            min_free_bytes = shared.storage.min_free_bytes,
                            "storage nearly full; refusing new edits until space is freed"
                        );
                    }
                    if failures > 0 {
                        tracing::info!("storage recovered; commits succeed again");
                        core.failure = None;
                    }
                }
                failures = 0;
                shared.durable_batch.send_replace(taken_gen);
                shared.committed.notify_one();
                for waiter in waiters {
                    let _ = waiter.send(Ok(()));
                }
                if let Some(current) = committer.take() {
                    committer = shrink_if_drained(shared, current);
                }
            }
            Err(e) => {
                failures += 1;
                let message = e.to_string();
                tracing::error!(error = %message, writes = n_ops, "group commit failed; will retry");
                shared.metrics.storage_failures.inc();
                let mut core = shared.lock();
                // Keep the failed writes ahead of anything queued since, in order: the next
                // take puts `retained` first.
                core.retained = ops;
                core.failure = Some(message.clone());
                if core.closing && failures >= 3 {
                    tracing::error!("giving up on uncommitted writes at shutdown");
                    core.retained.clear();
                    core.ops.clear();
                    let _ = core.take_writes();
                }
                drop(core);
                for waiter in waiters {
                    let _ = waiter.send(Err(message.clone()));
                }
                // sled stays failed after an I/O error (it remembers the first one), so the
                // committer was dropped and the next attempt reopens the database: its log
                // replays everything committed.
                // Wait before retrying (a full disk does not empty itself in microseconds).
                let core = shared.lock();
                let _ = shared
                    .writer_wake
                    .wait_timeout(core, Duration::from_secs(1));
            }
        }
    }
}

/// Gives back the space of a drained backlog: when the queue holds nothing at all and the
/// database's files take more than `storage.shrink_above_bytes`, they are rebuilt empty (only
/// the job-id counter is carried over). The queue's lock is held throughout, so no edit
/// arrives meanwhile (producers wait some milliseconds); nothing is pending, in flight, dead
/// or uncommitted, so nothing can be lost. If the rebuild fails, new edits are refused while
/// the database is reopened, every second, as after a failed commit; `None` if the queue
/// closes meanwhile.
fn shrink_if_drained(shared: &Shared, committer: Committer) -> Option<Committer> {
    let threshold = shared.storage.shrink_above_bytes;
    if threshold == 0 || !shared.medium.shrinks() {
        return Some(committer);
    }
    // The emptiness test is in memory and comes first: this runs after every commit, and
    // asking sled for its size reads the directory.
    let mut core = shared.lock();
    let empty = core.state.pending() == 0
        && core.state.in_flight() == 0
        && core.dead.is_empty()
        // Remembered messages (refs, deletions) would be lost to a crash between the rebuild
        // and their rewrite: a database that holds any is not rebuilt.
        && core.refs.len() == 0
        && core.ledger.records() == 0
        && !core.has_writes()
        && core.waiters.is_empty()
        && core.recovering.is_none()
        && core.failure.is_none()
        && !core.closing;
    if !empty {
        return Some(committer);
    }
    let size = match shared.store() {
        Ok(store) => store.size_on_disk().unwrap_or(0),
        Err(_) => 0,
    };
    if size <= threshold {
        return Some(committer);
    }
    let started = Instant::now();
    // Readers (claims, dead-letter commands, stats) get "being reopened" meanwhile.
    let old = shared
        .store
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    drop(old);
    let rebuilt = shared
        .medium
        .rebuild_empty(committer)
        .and_then(|(kv, mut committer)| {
            committer.commit(&[super::store::put_next_seq(core.state.next_seq())])?;
            Ok((Store::new(kv), committer))
        });
    match rebuilt {
        Ok((store, committer)) => {
            *shared.store.write().unwrap_or_else(|e| e.into_inner()) = Some(store);
            drop(core);
            give_back_memory();
            tracing::info!(
                freed_bytes = size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "queue drained; storage rebuilt empty to give its space back"
            );
            Some(committer)
        }
        Err(e) => {
            tracing::error!(error = %e, "rebuilding the drained storage failed; reopening");
            core.failure = Some(format!("rebuilding the drained storage failed: {e}"));
            drop(core);
            shared.metrics.storage_failures.inc();
            loop {
                match reopen(shared) {
                    Ok(committer) => {
                        shared.lock().failure = None;
                        return Some(committer);
                    }
                    Err(e) if !shared.lock().closing => {
                        tracing::error!(error = %e, "reopening the storage failed; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(_) => return None,
                }
            }
        }
    }
}

/// Hands the memory a drained backlog used back to the system. glibc keeps freed heap memory
/// for reuse, so without this the daemon's resident memory would stay near its peak until a
/// restart (measured: 190 MB with an empty queue after a million edits, 12 MB after this).
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointers and only releases free memory of glibc's own
    // heaps; it may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops every handle on the failed database and opens it again.
fn reopen(shared: &Shared) -> Result<Committer, StoreError> {
    let old = shared
        .store
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(old) = old {
        // sled flushes when its last handle drops, which can stall on a failing disk: do it
        // aside. Until it is done, sled's file lock makes the open below fail, and the
        // writer simply tries again a second later.
        let _ = std::thread::Builder::new()
            .name("zoomq-close-db".into())
            .spawn(move || drop(old));
    }
    let (kv, committer) = shared.medium.open()?;
    *shared.store.write().unwrap_or_else(|e| e.into_inner()) = Some(Store::new(kv));
    tracing::info!("storage reopened");
    Ok(committer)
}

/// The free bytes where the queue is stored if they are below `storage.min_free_bytes`; `None`
/// when there is enough (or when the figure cannot be read: then commits themselves will tell).
pub(super) fn low_space(shared: &Shared) -> Option<u64> {
    let min_free = shared.storage.min_free_bytes;
    shared.medium.free_space().filter(|free| *free < min_free)
}
