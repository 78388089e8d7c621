//! Reading the queue back at start: converting a database of the earlier layout, then
//! rebuilding the index from the stored records in the background while the queue already
//! serves (see [`recover`] for why that is safe).

use std::time::Instant;

use super::ledger::{self, Ledger, Loc};
use super::refs::RefRecord;
use super::store::{self, put_next_seq, EntryRef, JobOp, Store, StoreError};
use super::{now_ms, Recovery, Shared};

/// Converts jobs stored in the layout of earlier versions (one key pair per job) to records,
/// committing every few thousand so that a large old queue converts in bounded memory. Each
/// commit writes the new entries and deletes the old keys together: a crash midway leaves
/// every job in exactly one layout. Recovery then reads the converted jobs like any others.
pub(super) fn migrate_v1(
    store: &Store,
    committer: &mut store::Committer,
) -> Result<u64, StoreError> {
    let mut migrated = 0;
    let mut ledger = Ledger::new(store.last_record()?.map_or(1, |r| r + 1));
    let mut next_seq = store.next_seq()?;
    let mut ops = store.v1_dead_bodies()?;
    let mut jobs = store.v1_jobs().peekable();
    while jobs.peek().is_some() || !ops.is_empty() {
        for item in jobs.by_ref().take(4096) {
            let (seq, header, updated_ms, body) = item?;
            ledger.append(&EntryRef::new(seq, &header, updated_ms, &body), &body);
            ops.extend(store::v1_deletes(seq));
            next_seq = next_seq.max(seq + 1);
            migrated += 1;
        }
        let mut batch = ledger.take();
        batch.append(&mut ops);
        batch.push(put_next_seq(next_seq));
        committer.commit(&batch)?;
    }
    if migrated > 0 {
        tracing::info!(jobs = migrated, "converted the queue to the record layout");
    }
    Ok(migrated)
}

/// Rebuilds the index from the records stored before `open`, in record order, one record per
/// hold of the queue's lock, while the queue already accepts edits and delivers what it has
/// restored. Only headers and done bitmaps are read: bodies stay on disk until claimed.
///
/// Why this is safe:
/// - A job's latest entry is always in a later record than the entry of any older job of its
///   message (a newer job is only created while the older one is in flight, and an in-flight
///   job's entry is not rewritten; a rewrite while pending goes to the newest record). So
///   record order meets the jobs of a message oldest first: a restored job may be sent before
///   a newer one of its message is found, never after it; a newer one found meanwhile waits
///   behind the one in flight, as usual.
/// - Content that arrived since the open ("fresh": new jobs, coalesced ones, dead letters put
///   back) is newer than anything stored, so it wins over any job recovery still finds for
///   its message, and it is not claimable until recovery is done: sent earlier, a stored older
///   job found later would follow it.
/// - Records stored before the open are not touched by anything else until restored (nothing
///   in the index points at them), so reading them outside the lock is consistent.
pub(super) fn recover(
    shared: &Shared,
    store: &Store,
    first_new_record: u64,
    started: Instant,
    dead: u64,
    migrated: u64,
) {
    let now = now_ms();
    let mut superseded = 0u64;
    let result = (|| -> Result<(), StoreError> {
        for item in store.records() {
            let stored = item?;
            if stored.record >= first_new_record {
                break; // written since the open
            }
            #[cfg(test)]
            let _step = shared.recovery_step();
            let entries: Vec<EntryRef<'_>> = store::entries(stored.record, &stored.headers)
                .map(|e| e.map(|(entry, _)| entry))
                .collect::<Result<_, _>>()?;
            let done = stored.done.as_deref();
            let mut core = shared.lock();
            if core.closing {
                return Ok(());
            }
            let core = &mut *core;
            core.ledger
                .restore(stored.record, entries.len() as u32, done);
            for (index, entry) in entries.iter().enumerate() {
                let index = index as u32;
                if ledger::is_done(done, index) {
                    continue;
                }
                let loc = Loc {
                    record: stored.record,
                    index,
                };
                let fresh = core.recovering.as_ref().expect("recovering");
                if let Some(existing) = core.state.pending_of(entry.message_id) {
                    if fresh.contains(&existing) && entry.op == JobOp::Delete {
                        // Content accepted meanwhile for a message whose delete was
                        // accepted before: the delete stands, nothing follows it.
                        let key = core.state.key(entry.message_id);
                        core.drop_pending(key);
                        superseded += 1;
                    } else if fresh.contains(&existing) {
                        core.ledger.done(loc);
                        superseded += 1;
                        continue;
                    }
                }
                if entry.op == JobOp::Delete {
                    // A pending delete: nothing more is accepted for its message.
                    let key = core.state.key(entry.message_id);
                    if core.refs.get(key).is_none() {
                        let record = RefRecord::new(entry.message_id.to_string(), entry.updated_ms);
                        core.refs.put(key, record, None);
                    }
                    core.refs.update(key, |r| r.deleted = true);
                }
                let restored = core.state.restore(
                    entry.message_id,
                    entry.account_id,
                    entry.seq,
                    entry.next_attempt_ms,
                    entry.stored(loc),
                    now,
                );
                shared.announce(restored.announce);
                if let Some((_, loser)) = restored.superseded {
                    if let Some(loser) = loser {
                        core.ledger.done(loser);
                    }
                    superseded += 1;
                }
            }
        }
        Ok(())
    })();
    let mut core = shared.lock();
    if let Err(e) = result {
        // Stay conservative: what was restored is delivered, but nothing new is accepted and
        // what arrived since the open is never sent ahead of what could not be read.
        tracing::error!(error = %e, "queue recovery failed; refusing new edits");
        core.recovery_failure = Some(format!("recovery failed: {e}; restart the daemon"));
        drop(core);
        // Whoever waits for the end of recovery learns it ended (and checks how).
        shared.recovered.send_replace(Some(Recovery {
            dead,
            superseded,
            migrated,
            elapsed: started.elapsed(),
            ..Recovery::default()
        }));
        return;
    }
    if core.closing {
        return;
    }
    let recovery = Recovery {
        pending: core.state.pending(),
        dead,
        superseded,
        migrated,
        elapsed: started.elapsed(),
    };
    // Logged before `stats` can show the end of recovery, for whoever waits for both.
    tracing::info!(
        pending = recovery.pending,
        dead = recovery.dead,
        superseded = recovery.superseded,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "queue recovered"
    );
    core.recovering = None;
    drop(core);
    shared.metrics.edits_superseded.inc_by(superseded);
    // Fresh jobs are claimable now, and superseded entries need their done bits written.
    shared.writer_wake.notify_one();
    shared.committed.notify_one();
    shared.recovered.send_replace(Some(recovery));
}

#[cfg(test)]
impl Shared {
    /// Waits for the test's go-ahead; the guard answers when the record has been restored.
    fn recovery_step(&self) -> impl Drop + '_ {
        struct Done<'a>(&'a Shared);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                let steps = self
                    .0
                    .recovery_steps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some((_, done)) = steps.as_ref() {
                    let _ = done.send(());
                }
            }
        }
        let steps = self
            .recovery_steps
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((go, _)) = steps.as_ref() {
            let _ = go.recv();
        }
        Done(self)
    }
}
