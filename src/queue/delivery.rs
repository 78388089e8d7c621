//! The dispatcher's side of the queue: claim an account's oldest ready job, then finish it:
//! delivered, back in line for a retry, or dead. Each transition changes the index and appends
//! its writes under one lock.
//!
//! **Invariant:** only a job whose writes are all committed can be claimed. So Zoom never
//! receives content that a crash could still take back, and after a restart it never gets an
//! older edit of a message after a newer one.

use super::state::Stored;
use super::store::{put_dead_body, put_json, EntryRef, StoreError, DEAD};
use super::{now_ms, Commit, Core, DeadInfo, DeadRecord, Job, Queue};

/// The state of an account's line, as the dispatcher needs it before taking a rate-limit slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A job is ready to be claimed.
    Ready,
    /// The oldest ready job has writes not yet on disk: wait for [`Queue::committed`].
    NotDurable,
    /// Nothing is ready.
    Empty,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claimed {
    Job(Job),
    /// See [`Head::NotDurable`]; the account keeps its place in the dispatcher's ring.
    NotDurable,
    /// Nothing ready; the queue announces the account again when it has work.
    Empty,
}

impl Core {
    /// Whether a ready job may be sent: its writes are committed, and it is not content that
    /// arrived while recovery still runs (see `recover`).
    fn claimable(&self, seq: u64) -> bool {
        !self.overlay.contains_key(&seq)
            && !self
                .recovering
                .as_ref()
                .is_some_and(|fresh| fresh.contains(&seq))
    }
}

impl Queue {
    /// Whether `account`'s oldest ready job can be claimed now.
    pub fn head(&self, account: &str) -> Head {
        let core = self.shared.lock();
        match core.state.peek_ready(account) {
            None => Head::Empty,
            Some(seq) if !core.claimable(seq) => Head::NotDurable,
            Some(_) => Head::Ready,
        }
    }

    /// Claims the oldest ready job of `account`, reading its content from disk.
    pub fn claim(&self, account: &str) -> Result<Claimed, StoreError> {
        let claim = {
            let mut core = self.shared.lock();
            if let Some(seq) = core.state.peek_ready(account) {
                if !core.claimable(seq) {
                    return Ok(Claimed::NotDurable);
                }
            }
            let Some(claim) = core.state.claim(account) else {
                return Ok(Claimed::Empty);
            };
            claim
        };
        // The job is in flight now and its entry is committed: nothing else retires that entry
        // until we finish the job, so its record is on disk as long as we read it.
        let loc = claim
            .stored
            .loc
            .expect("a claimable job has a stored entry");
        let loaded = self
            .shared
            .store()
            .and_then(|store| store.load(loc.record, loc.index));
        match loaded {
            Ok(Some(loaded)) if loaded.seq == claim.seq => Ok(Claimed::Job(Job {
                seq: claim.seq,
                header: loaded.header,
                updated_ms: loaded.updated_ms,
                body: loaded.body,
                more: claim.more,
                loc,
            })),
            Ok(_) => {
                let mut core = self.shared.lock();
                let finished = core.state.finish_key(claim.message, claim.seq, now_ms());
                core.ledger.done(loc);
                self.shared.announce(finished.announce);
                Err(StoreError::Corrupt {
                    key: format!("h{}", loc.record),
                    detail: format!(
                        "entry {} (job {}) is missing or holds another job; dropped",
                        loc.index, claim.seq
                    ),
                })
            }
            Err(e) => {
                // Put it back where it was; the dispatcher will retry later.
                let mut core = self.shared.lock();
                let due = now_ms() + 1000;
                let requeued = core.state.requeue_key(
                    claim.message,
                    claim.seq,
                    due,
                    now_ms(),
                    false,
                    claim.stored,
                );
                if let Some(requeued) = requeued {
                    self.shared.announce(requeued.announce);
                    if requeued.superseded {
                        core.ledger.done(loc);
                        self.shared.metrics.edits_superseded.inc();
                    } else {
                        self.shared.timer_changed.notify_one();
                    }
                }
                drop(core);
                Err(e)
            }
        }
    }

    /// Resolves after the next successful group commit.
    pub async fn committed(&self) {
        self.shared.committed.notified().await
    }

    /// The job was delivered: forget it.
    pub fn complete(&self, job: &Job) -> Commit {
        let mut core = self.shared.lock();
        let finished = core.state.finish(&job.header.message_id, job.seq, now_ms());
        core.ledger.done(job.loc);
        self.shared.announce(finished.announce);
        self.shared.commit_locked(core)
    }

    /// Puts a claimed job back in line: after a transient failure (`failed`, with the new
    /// retry state in `job.header`, stored before the job can be claimed again) or unsent
    /// (a 429, no token). A job whose message got a newer edit meanwhile is dropped instead.
    /// Returns whether it was superseded.
    pub fn retry_later(&self, job: &Job, failed: bool) -> (bool, Commit) {
        let mut core = self.shared.lock();
        let header = &job.header;
        let entry = EntryRef::new(job.seq, header, job.updated_ms, &job.body);
        let mut loc = job.loc;
        if failed && !core.state.would_supersede(&header.message_id, job.seq) {
            // The retry state changed: the job gets a new entry, the old one retires.
            loc = core.write_entry(&entry, &job.body);
            core.ledger.done(job.loc);
        }
        let stored = entry.stored(loc);
        let superseded = self.requeue_locked(
            &mut core,
            &header.message_id,
            job.seq,
            header.next_attempt_ms,
            failed,
            stored,
        );
        (superseded, self.shared.commit_locked(core))
    }

    /// The in-flight job goes back to pending, or is dropped (records deleted) when a newer
    /// pending job supersedes it. Returns whether it was superseded.
    fn requeue_locked(
        &self,
        core: &mut Core,
        message: &str,
        seq: u64,
        due_ms: u64,
        failed: bool,
        stored: Stored,
    ) -> bool {
        let Some(requeued) = core
            .state
            .requeue(message, seq, due_ms, now_ms(), failed, stored)
        else {
            return false;
        };
        self.shared.announce(requeued.announce);
        if requeued.superseded {
            if let Some(loc) = stored.loc {
                core.ledger.done(loc);
            }
            self.shared.metrics.edits_superseded.inc();
        } else {
            self.shared.timer_changed.notify_one();
        }
        requeued.superseded
    }

    /// The job can never succeed: move it to the dead letters.
    pub fn dead_letter(&self, job: &Job, info: DeadInfo) -> Commit {
        let mut core = self.shared.lock();
        let now = now_ms();
        let finished = core.state.finish(&job.header.message_id, job.seq, now);
        let record = DeadRecord {
            header: job.header.clone(),
            dead_ms: now,
            reason: info.reason.to_string(),
            status: info.status,
            zoom_code: info.zoom_code,
            detail: info.detail,
        };
        core.ledger.done(job.loc);
        core.ops.push(put_json(DEAD, job.seq, &record));
        core.ops
            .push(put_dead_body(job.seq, job.updated_ms, &job.body));
        core.dead += 1;
        self.shared
            .metrics
            .edits_dead_lettered
            .with_label_values(&[info.reason])
            .inc();
        self.shared.announce(finished.announce);
        self.shared.commit_locked(core)
    }

    /// Moves jobs whose retry time has come to their accounts' lines (announcing them).
    pub fn promote_due(&self, now_ms: u64) {
        let mut core = self.shared.lock();
        for account in core.state.promote_due(now_ms) {
            let _ = self.shared.ready_tx.send(account);
        }
    }

    /// The earliest retry time of a waiting job (unix ms).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.shared.lock().state.next_due_ms()
    }

    /// Resolves when the earliest retry time may have moved earlier.
    pub async fn timer_changed(&self) {
        self.shared.timer_changed.notified().await
    }
}
