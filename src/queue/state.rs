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
//! This file holds the types and the slots; `state_transitions.rs` the transitions (enqueue,
//! restore, claim, finish, requeue, retries coming due), `state_lines.rs` the per-account lines
//! and their announcements, `state_queries.rs` the read-only questions and the tests' check,
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
}

#[path = "state_holds.rs"]
mod holds;
#[path = "state_lines.rs"]
mod lines;
#[path = "state_queries.rs"]
mod queries;
#[path = "state_transitions.rs"]
mod transitions;

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
