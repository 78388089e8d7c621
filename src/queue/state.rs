//! The queue's in-memory index: which job is pending or in flight for each message, each
//! account's line of ready jobs, and the timer set of jobs waiting for a retry. Pure data and
//! decisions, no I/O: `queue::mod` persists what these decisions change, and the property test
//! drives this state machine against a simple model.
//!
//! A message has at most one *pending* job and at most one *in-flight* job. A pending job is in
//! exactly one of three places:
//! - `ready`: in its account's line, ordered by job id (= first-enqueue order);
//! - `delayed`: in the timer set until its retry time;
//! - blocked: in neither, because the message's previous job is still in flight. It moves to
//!   `ready` or `delayed` when that job finishes.
//!
//! # Memory
//! The index is what a million pending edits cost in memory, so it is kept small: a 56-byte
//! slot per message in `slab.rs` (which also says how messages are known by a hashed key, not
//! their id), about 25 bytes in its account's ready line, and retry state only for jobs that
//! have any. Accounts are interned once each.
//!
//! **Invariant:** `pending`, `in_flight` and the sizes of the sets above always agree; the tests
//! check it after every step.
//!
//! This file holds the types and the transitions; `state_lines.rs` the per-account lines and
//! their announcements, `state_queries.rs` the read-only questions and the tests' check,
//! `state_holds.rs` what the message lifecycle adds: holds by a dead letter, cancelled sends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::entry::{EntryRef, Loc};
pub use super::slab::MessageKey;
use super::slab::{Keyed, Slab};

/// What the index keeps of a pending job's stored state, so that a coalesced edit or a retry
/// can write the job's new entry without reading the old one back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Where its current entry is; `None` only between `enqueue` and `set_loc`.
    pub loc: Option<Loc>,
    pub enqueued_ms: u64,
    pub attempts: u32,
    pub first_failure_ms: Option<u64>,
}

impl EntryRef<'_> {
    /// What the index keeps of this entry, stored at `loc`.
    pub fn stored(&self, loc: Loc) -> Stored {
        Stored {
            loc: Some(loc),
            enqueued_ms: self.enqueued_ms,
            attempts: self.attempts,
            first_failure_ms: self.first_failure_ms,
        }
    }
}

/// A pending job, packed: record 0 never occurs, so it stands for "not stored yet". What only
/// a failing or delayed job has is kept apart, in [`Retry`], so that the common job costs 28
/// bytes here.
#[derive(Debug, Clone, Copy, Default)]
struct PendingJob {
    /// 0: no pending job.
    seq: u64,
    record: u64,
    enqueued_ms: u64,
    index: u32,
}

impl PendingJob {
    fn is_some(&self) -> bool {
        self.seq != 0
    }
}

/// The retry state of a pending job that failed or waits for a time (all zero otherwise, and
/// then not stored at all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Retry {
    due_ms: u64,
    first_failure_ms: u64,
    attempts: u32,
    /// Its current content was sent and failed transiently (it waits for a retry).
    failed: bool,
}

/// `Slot::in_flight` of a message *held* by its dead letter (a send that failed for good or
/// whose outcome is unknown): its pending content waits, blocked as behind a job in flight,
/// until an operator retries or purges the dead letter. Not a job: not counted in flight.
pub const HELD: u64 = u64::MAX;

/// Where a message stands.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    key: MessageKey,
    account: u32,
    /// 0: nothing in flight; [`HELD`]: held by a dead letter.
    in_flight: u64,
    pending: PendingJob,
}

impl Keyed for Slot {
    fn key(&self) -> MessageKey {
        self.key
    }
}

#[derive(Debug, Default)]
struct AccountLine {
    name: Arc<str>,
    /// Ready jobs of this account: job id → slot.
    ready: BTreeMap<u64, u32>,
    /// Whether the dispatcher has been told this account has ready work and not yet been
    /// told it ran out.
    announced: bool,
    /// Slots (messages) that name this account; the line is dropped when none do.
    slots: usize,
}

/// What an enqueue did to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// A new pending job; `announce` is set when its account just got ready work.
    New {
        seq: u64,
        announce: Option<Arc<str>>,
    },
    /// Merged into the message's pending job `seq`. `moved_from` is the previous account
    /// when the edit names a different one.
    Coalesced {
        seq: u64,
        moved_from: Option<Arc<str>>,
        announce: Option<Arc<str>>,
    },
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub seq: u64,
    pub message: MessageKey,
    pub stored: Stored,
    /// Whether the account still has ready work after this claim.
    pub more: bool,
}

/// What putting an in-flight job back did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requeued {
    /// The message had a newer pending job, so this one was dropped instead.
    pub superseded: bool,
    /// An account that just got ready work.
    pub announce: Option<Arc<str>>,
}

/// What restoring a stored job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The job (id and entry) that lost to a newer job of the same message: the restored one
    /// or the one already there.
    pub superseded: Option<(u64, Option<Loc>)>,
    pub announce: Option<Arc<str>>,
}

/// What finishing an in-flight job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// An account that just got ready work (the message's next pending job).
    pub announce: Option<Arc<str>>,
}

/// The index. See the module documentation.
pub struct State {
    slots: Slab<Slot>,
    lines: Vec<Option<AccountLine>>,
    free_lines: Vec<u32>,
    line_of: HashMap<Arc<str>, u32>,
    /// Jobs waiting for a retry time: (due ms, job id) → slot.
    delayed: BTreeMap<(u64, u64), u32>,
    /// Retry state of pending jobs that have any, by job id.
    retries: HashMap<u64, Retry>,
    pending: u64,
    in_flight: u64,
    next_seq: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("pending", &self.pending)
            .field("in_flight", &self.in_flight)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl State {
    pub fn new(next_seq: u64) -> State {
        State {
            slots: Slab::new(),
            lines: Vec::new(),
            free_lines: Vec::new(),
            line_of: HashMap::new(),
            delayed: BTreeMap::new(),
            retries: HashMap::new(),
            pending: 0,
            in_flight: 0,
            next_seq: next_seq.max(1),
        }
    }

    /// The key the index knows `message` by.
    pub fn key(&self, message: &str) -> MessageKey {
        self.slots.key(message)
    }

    pub fn pending(&self) -> u64 {
        self.pending
    }
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    // ---- slots ----

    fn slot(&self, n: u32) -> &Slot {
        self.slots.get(n)
    }

    fn slot_mut(&mut self, n: u32) -> &mut Slot {
        self.slots.get_mut(n)
    }

    /// Makes a pending job, keeping its retry state aside if it has any.
    fn make_pending(&mut self, seq: u64, due_ms: u64, failed: bool, stored: Stored) -> PendingJob {
        let retry = Retry {
            due_ms,
            first_failure_ms: stored.first_failure_ms.unwrap_or(0),
            attempts: stored.attempts,
            failed,
        };
        if retry != Retry::default() {
            self.retries.insert(seq, retry);
        }
        PendingJob {
            seq,
            record: stored.loc.map_or(0, |l| l.record),
            index: stored.loc.map_or(0, |l| l.index),
            enqueued_ms: stored.enqueued_ms,
        }
    }

    fn retry(&self, pending: &PendingJob) -> Retry {
        self.retries.get(&pending.seq).copied().unwrap_or_default()
    }

    fn stored(&self, pending: &PendingJob) -> Stored {
        let retry = self.retry(pending);
        Stored {
            loc: (pending.record != 0).then_some(Loc {
                record: pending.record,
                index: pending.index,
            }),
            enqueued_ms: pending.enqueued_ms,
            attempts: retry.attempts,
            first_failure_ms: (retry.first_failure_ms != 0).then_some(retry.first_failure_ms),
        }
    }

    /// A pending job stops being pending (claimed or dropped): its retry state goes with it.
    fn forget_retry(&mut self, pending: &PendingJob) {
        self.retries.remove(&pending.seq);
    }

    fn find(&self, key: MessageKey) -> Option<u32> {
        self.slots.find(key)
    }

    fn find_str(&self, message: &str) -> Option<u32> {
        self.find(self.key(message))
    }

    fn new_slot(&mut self, key: MessageKey, account: u32) -> u32 {
        self.slots.insert(Slot {
            key,
            account,
            in_flight: 0,
            pending: PendingJob::default(),
        })
    }

    fn remove_slot(&mut self, n: u32) {
        let slot = self.slots.remove(n);
        self.release_line(slot.account);
    }

    /// Records where the pending job of `message` is now stored; returns where it was.
    pub fn set_loc(&mut self, message: &str, loc: Loc) -> Option<Loc> {
        let n = self.find_str(message)?;
        let pending = &mut self.slot_mut(n).pending;
        if !pending.is_some() {
            return None;
        }
        let old = (pending.record != 0).then_some(Loc {
            record: pending.record,
            index: pending.index,
        });
        pending.record = loc.record;
        pending.index = loc.index;
        old
    }

    // ---- transitions ----

    /// Records an edit of `message` for `account`: coalesces into the pending job if there is
    /// one, else creates a pending job with a fresh id.
    pub fn enqueue(&mut self, message: &str, account: &str, now_ms: u64) -> Placed {
        let key = self.key(message);
        if let Some(n) = self.find(key) {
            let slot = *self.slot(n);
            if slot.pending.is_some() {
                // New content: whatever failed before is not what will be sent next.
                let pending = self.slot(n).pending;
                if let Some(retry) = self.retries.get_mut(&pending.seq) {
                    retry.failed = false;
                }
                let old_line = slot.account;
                if &*self.line(old_line).name == account {
                    return Placed::Coalesced {
                        seq: pending.seq,
                        moved_from: None,
                        announce: None,
                    };
                }
                // The producer names another account for the same message: the pending job
                // moves to that account's line, keeping its id and so its place.
                let old_name = self.line(old_line).name.clone();
                self.unplace(n);
                let line = self.line_id(account);
                self.line_mut(line).slots += 1;
                self.slot_mut(n).account = line;
                self.release_line(old_line);
                let announce = self.place(n, now_ms);
                return Placed::Coalesced {
                    seq: pending.seq,
                    moved_from: Some(old_name),
                    announce,
                };
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let stored = Stored {
            loc: None,
            enqueued_ms: now_ms,
            attempts: 0,
            first_failure_ms: None,
        };
        let announce = self.insert_pending(key, account, seq, 0, stored, now_ms);
        Placed::New { seq, announce }
    }

    /// Adds a pending job recovered from disk or restored from the dead letters. If the message
    /// already has a pending job, the one with the higher id wins and the other is returned
    /// as superseded.
    pub fn restore(
        &mut self,
        message: &str,
        account: &str,
        seq: u64,
        due_ms: u64,
        stored: Stored,
        now_ms: u64,
    ) -> Restored {
        self.next_seq = self.next_seq.max(seq + 1);
        let key = self.key(message);
        if let Some(n) = self.find(key) {
            let existing = self.slot(n).pending;
            if existing.is_some() {
                if existing.seq > seq {
                    return Restored {
                        superseded: Some((seq, stored.loc)),
                        announce: None,
                    };
                }
                let existing_loc = self.stored(&existing).loc;
                self.unplace(n);
                self.forget_retry(&existing);
                self.slot_mut(n).pending = PendingJob::default();
                self.pending -= 1;
                let announce = self.insert_pending(key, account, seq, due_ms, stored, now_ms);
                return Restored {
                    superseded: Some((existing.seq, existing_loc)),
                    announce,
                };
            }
        }
        Restored {
            superseded: None,
            announce: self.insert_pending(key, account, seq, due_ms, stored, now_ms),
        }
    }

    /// Takes the oldest ready job of `account`, marking it in flight.
    pub fn claim(&mut self, account: &str) -> Option<Claim> {
        let &line_id = self.line_of.get(account)?;
        let line = self.line_mut(line_id);
        let Some((seq, n)) = line.ready.pop_first() else {
            line.announced = false;
            if line.slots == 0 {
                // Kept only while the dispatcher held it in its ring (see release_line).
                self.drop_line(line_id);
            }
            return None;
        };
        let more = !line.ready.is_empty();
        if !more {
            line.announced = false;
        }
        let slot = self.slot_mut(n);
        debug_assert_eq!(slot.in_flight, 0);
        debug_assert_eq!(slot.pending.seq, seq);
        let pending = std::mem::take(&mut slot.pending);
        slot.in_flight = seq;
        let key = slot.key;
        self.pending -= 1;
        self.in_flight += 1;
        let stored = self.stored(&pending);
        self.forget_retry(&pending);
        Some(Claim {
            seq,
            message: key,
            stored,
            more,
        })
    }

    /// The in-flight job `seq` of `message` is done (delivered, dead-lettered or dropped).
    pub fn finish(&mut self, message: &str, seq: u64, now_ms: u64) -> Finished {
        self.finish_key(self.key(message), seq, now_ms)
    }

    /// [`State::finish`] by key.
    pub fn finish_key(&mut self, message: MessageKey, seq: u64, now_ms: u64) -> Finished {
        let Some(n) = self.find(message) else {
            return Finished { announce: None };
        };
        let slot = self.slot_mut(n);
        if slot.in_flight != seq || seq == 0 || seq == HELD {
            return Finished { announce: None };
        }
        slot.in_flight = 0;
        let has_pending = slot.pending.is_some();
        self.in_flight -= 1;
        let announce = if has_pending {
            self.place(n, now_ms)
        } else {
            self.remove_slot(n);
            None
        };
        Finished { announce }
    }

    /// The in-flight job `seq` goes back to pending, due at `due_ms` (`failed`: its content
    /// was sent and failed) with its stored state now `stored`, unless the message has a newer
    /// pending job: then it is superseded and finished instead. `None` when `seq` is not the
    /// message's in-flight job.
    pub fn requeue(
        &mut self,
        message: &str,
        seq: u64,
        due_ms: u64,
        now_ms: u64,
        failed: bool,
        stored: Stored,
    ) -> Option<Requeued> {
        self.requeue_key(self.key(message), seq, due_ms, now_ms, failed, stored)
    }

    /// [`State::requeue`] by key.
    pub fn requeue_key(
        &mut self,
        message: MessageKey,
        seq: u64,
        due_ms: u64,
        now_ms: u64,
        failed: bool,
        stored: Stored,
    ) -> Option<Requeued> {
        let n = self.find(message)?;
        let slot = *self.slot(n);
        if slot.in_flight != seq || seq == 0 {
            return None;
        }
        if slot.pending.is_some() {
            // The newer pending job may become ready now: pass its announcement on.
            let finished = self.finish_key(message, seq, now_ms);
            return Some(Requeued {
                superseded: true,
                announce: finished.announce,
            });
        }
        let pending = self.make_pending(seq, due_ms, failed, stored);
        let slot = self.slot_mut(n);
        slot.in_flight = 0;
        slot.pending = pending;
        self.in_flight -= 1;
        self.pending += 1;
        let announce = self.place(n, now_ms);
        Some(Requeued {
            superseded: false,
            announce,
        })
    }

    /// Moves every delayed job due by `now_ms` to its account's ready line. Returns the
    /// accounts that just got ready work.
    pub fn promote_due(&mut self, now_ms: u64) -> Vec<Arc<str>> {
        let mut announce = Vec::new();
        while let Some(entry) = self.delayed.first_entry() {
            let (due, seq) = *entry.key();
            if due > now_ms {
                break;
            }
            let n = entry.remove();
            let line = self.slot(n).account;
            if let Some(a) = self.make_ready(line, seq, n) {
                announce.push(a);
            }
        }
        announce
    }

    fn insert_pending(
        &mut self,
        key: MessageKey,
        account: &str,
        seq: u64,
        due_ms: u64,
        stored: Stored,
        now_ms: u64,
    ) -> Option<Arc<str>> {
        let line = self.line_id(account);
        let pending = self.make_pending(seq, due_ms, false, stored);
        let n = match self.find(key) {
            Some(n) => {
                debug_assert!(!self.slot(n).pending.is_some());
                let old = self.slot(n).account;
                self.slot_mut(n).pending = pending;
                if old != line {
                    // Only possible while a job of this message is in flight for the old
                    // account; the new job belongs to the new one.
                    self.slot_mut(n).account = line;
                    self.line_mut(line).slots += 1;
                    self.pending += 1;
                    self.release_line(old);
                    return self.place(n, now_ms);
                }
                n
            }
            None => {
                self.line_mut(line).slots += 1;
                let n = self.new_slot(key, line);
                self.slot_mut(n).pending = pending;
                n
            }
        };
        self.pending += 1;
        self.place(n, now_ms)
    }

    /// Puts a slot's pending job where it belongs: blocked, delayed or ready.
    fn place(&mut self, n: u32, now_ms: u64) -> Option<Arc<str>> {
        let slot = *self.slot(n);
        if slot.in_flight != 0 {
            return None; // blocked until the in-flight job finishes
        }
        let due_ms = self.retry(&slot.pending).due_ms;
        if due_ms > now_ms {
            self.delayed.insert((due_ms, slot.pending.seq), n);
            return None;
        }
        self.make_ready(slot.account, slot.pending.seq, n)
    }

    /// Takes a slot's pending job out of `ready` or `delayed`.
    fn unplace(&mut self, n: u32) {
        let slot = *self.slot(n);
        let pending = slot.pending;
        if self
            .delayed
            .remove(&(self.retry(&pending).due_ms, pending.seq))
            .is_none()
        {
            if let Some(Some(line)) = self.lines.get_mut(slot.account as usize) {
                line.ready.remove(&pending.seq);
            }
        }
    }
}

#[path = "state_holds.rs"]
mod holds;
#[path = "state_lines.rs"]
mod lines;
#[path = "state_queries.rs"]
mod queries;

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
