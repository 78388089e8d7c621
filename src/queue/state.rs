//! The queue's in-memory index: which job is pending or in flight for each message, each
//! account's line of ready jobs, and the timer wheel of jobs waiting for a retry. Pure data and
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
//! **Invariant:** `pending`, `in_flight` and the sizes of the sets above always agree; the tests
//! check it after every step.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Where a message stands.
#[derive(Debug)]
struct Slot {
    account: Arc<str>,
    message: Arc<str>,
    pending: Option<PendingJob>,
    in_flight: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct PendingJob {
    seq: u64,
    due_ms: u64,
    /// Its current content was sent and failed transiently (it waits for a retry).
    failed: bool,
}

#[derive(Debug, Default)]
struct AccountLine {
    /// Ready jobs of this account: job id → message id.
    ready: BTreeMap<u64, Arc<str>>,
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
    pub message: Arc<str>,
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

/// What finishing an in-flight job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// An account that just got ready work (the message's next pending job).
    pub announce: Option<Arc<str>>,
}

/// The index. See the module documentation.
#[derive(Debug, Default)]
pub struct State {
    slots: HashMap<Arc<str>, Slot>,
    accounts: HashMap<Arc<str>, AccountLine>,
    /// Jobs waiting for a retry time: (due ms, job id) → message id.
    delayed: BTreeMap<(u64, u64), Arc<str>>,
    pending: u64,
    in_flight: u64,
    next_seq: u64,
}

impl State {
    pub fn new(next_seq: u64) -> State {
        State {
            next_seq: next_seq.max(1),
            ..State::default()
        }
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
    /// Accounts with any pending or in-flight job.
    pub fn accounts(&self) -> usize {
        // Lines kept only for the dispatcher's ring (no message names them) do not count.
        self.accounts.values().filter(|line| line.slots > 0).count()
    }

    /// The `n` accounts with the most ready jobs, largest first.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .accounts
            .iter()
            .filter(|(_, line)| line.slots > 0)
            .map(|(account, line)| (account.clone(), line.ready.len()))
            .collect();
        if all.len() > n {
            all.select_nth_unstable_by(n, |a, b| b.1.cmp(&a.1));
            all.truncate(n);
        }
        all.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        all
    }

    /// The pending job of a message, if any.
    pub fn pending_of(&self, message: &str) -> Option<u64> {
        self.slots
            .get(message)
            .and_then(|s| s.pending.map(|p| p.seq))
    }
    /// The in-flight job of a message, if any.
    pub fn in_flight_of(&self, message: &str) -> Option<u64> {
        self.slots.get(message).and_then(|s| s.in_flight)
    }
    /// Whether the message's pending job `seq` is waiting for a retry time.
    pub fn is_waiting(&self, message: &str, seq: u64) -> bool {
        self.slots
            .get(message)
            .and_then(|s| s.pending)
            .is_some_and(|p| p.seq == seq && self.delayed.contains_key(&(p.due_ms, seq)))
    }

    /// Whether the message's pending job holds content that already failed once (so that a
    /// newer edit replacing it supersedes an edit waiting for its retry).
    pub fn pending_failed(&self, message: &str) -> bool {
        self.slots
            .get(message)
            .and_then(|s| s.pending)
            .is_some_and(|p| p.failed)
    }

    /// Whether a new edit of `message` would add a pending job (rather than coalesce).
    pub fn would_add(&self, message: &str) -> bool {
        self.pending_of(message).is_none()
    }

    /// Records an edit of `message` for `account`: coalesces into the pending job if there is
    /// one, else creates a pending job with a fresh id.
    pub fn enqueue(&mut self, message: &str, account: &str, now_ms: u64) -> Placed {
        if let Some(slot) = self.slots.get_mut(message) {
            if let Some(pending) = slot.pending.as_mut() {
                // New content: whatever failed before is not what will be sent next.
                pending.failed = false;
                let pending = *pending;
                let old_account = slot.account.clone();
                if &*old_account == account {
                    return Placed::Coalesced {
                        seq: pending.seq,
                        moved_from: None,
                        announce: None,
                    };
                }
                // The producer names another account for the same message: the pending job
                // moves to that account's line, keeping its id and so its place.
                let message_key = slot.message.clone();
                self.unplace(&message_key, pending);
                let account_key = self.account_key(account);
                self.accounts.get_mut(&account_key).expect("line").slots += 1;
                let slot = self.slots.get_mut(message).expect("slot exists");
                slot.account = account_key;
                self.release_account(&old_account);
                let announce = self.place(&message_key, pending, now_ms);
                return Placed::Coalesced {
                    seq: pending.seq,
                    moved_from: Some(old_account),
                    announce,
                };
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let announce = self.insert_pending(message, account, seq, 0, now_ms);
        Placed::New { seq, announce }
    }

    /// Adds a pending job recovered from disk or restored from the dead letters. If the message
    /// already has a pending job, the one with the higher id wins and the other id is returned
    /// as superseded.
    pub fn restore(
        &mut self,
        message: &str,
        account: &str,
        seq: u64,
        due_ms: u64,
        now_ms: u64,
    ) -> (Option<u64>, Option<Arc<str>>) {
        self.next_seq = self.next_seq.max(seq + 1);
        if let Some(existing) = self.pending_of(message) {
            if existing > seq {
                return (Some(seq), None);
            }
            let message_key = self.slots[message].message.clone();
            let pending = self.slots[message].pending.expect("pending");
            self.unplace(&message_key, pending);
            let slot = self.slots.get_mut(message).expect("slot");
            slot.pending = None;
            self.pending -= 1;
            let announce = self.insert_pending(message, account, seq, due_ms, now_ms);
            return (Some(existing), announce);
        }
        (
            None,
            self.insert_pending(message, account, seq, due_ms, now_ms),
        )
    }

    /// The oldest ready job of `account`, without claiming it.
    pub fn peek_ready(&self, account: &str) -> Option<u64> {
        self.accounts
            .get(account)
            .and_then(|line| line.ready.keys().next().copied())
    }

    /// Takes the oldest ready job of `account`, marking it in flight.
    pub fn claim(&mut self, account: &str) -> Option<Claim> {
        let line = self.accounts.get_mut(account)?;
        let Some((seq, message)) = line.ready.pop_first() else {
            line.announced = false;
            if line.slots == 0 {
                // Kept only while the dispatcher held it in its ring (see release_account).
                self.accounts.remove(account);
            }
            return None;
        };
        let more = !line.ready.is_empty();
        if !more {
            line.announced = false;
        }
        let slot = self.slots.get_mut(&message).expect("ready job has a slot");
        debug_assert!(slot.in_flight.is_none());
        debug_assert_eq!(slot.pending.map(|p| p.seq), Some(seq));
        slot.pending = None;
        slot.in_flight = Some(seq);
        self.pending -= 1;
        self.in_flight += 1;
        Some(Claim { seq, message, more })
    }

    /// The in-flight job `seq` of `message` is done (delivered, dead-lettered or dropped).
    pub fn finish(&mut self, message: &str, seq: u64, now_ms: u64) -> Finished {
        let Some(slot) = self.slots.get_mut(message) else {
            return Finished { announce: None };
        };
        if slot.in_flight != Some(seq) {
            return Finished { announce: None };
        }
        slot.in_flight = None;
        self.in_flight -= 1;
        let announce = match slot.pending {
            Some(pending) => {
                let message_key = slot.message.clone();
                self.place(&message_key, pending, now_ms)
            }
            None => {
                self.remove_slot(message);
                None
            }
        };
        Finished { announce }
    }

    /// The in-flight job `seq` goes back to pending, due at `due_ms` (`failed`: its content
    /// was sent and failed), unless the message has a newer pending job: then it is superseded
    /// and finished instead. `None` when `seq` is not the message's in-flight job.
    pub fn requeue(
        &mut self,
        message: &str,
        seq: u64,
        due_ms: u64,
        now_ms: u64,
        failed: bool,
    ) -> Option<Requeued> {
        let slot = self.slots.get_mut(message)?;
        if slot.in_flight != Some(seq) {
            return None;
        }
        if slot.pending.is_some() {
            // The newer pending job may become ready now: pass its announcement on.
            let finished = self.finish(message, seq, now_ms);
            return Some(Requeued {
                superseded: true,
                announce: finished.announce,
            });
        }
        slot.in_flight = None;
        self.in_flight -= 1;
        let pending = PendingJob {
            seq,
            due_ms,
            failed,
        };
        slot.pending = Some(pending);
        self.pending += 1;
        let message_key = slot.message.clone();
        let announce = self.place(&message_key, pending, now_ms);
        Some(Requeued {
            superseded: false,
            announce,
        })
    }

    /// The earliest retry time of a delayed job.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.delayed.keys().next().map(|(due, _)| *due)
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
            let message = entry.remove();
            let slot = self.slots.get(&message).expect("delayed job has a slot");
            let account = slot.account.clone();
            if let Some(a) = self.make_ready(&account, seq, message) {
                announce.push(a);
            }
        }
        announce
    }

    fn account_key(&mut self, account: &str) -> Arc<str> {
        match self.accounts.get_key_value(account) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(account);
                self.accounts.insert(key.clone(), AccountLine::default());
                key
            }
        }
    }

    fn insert_pending(
        &mut self,
        message: &str,
        account: &str,
        seq: u64,
        due_ms: u64,
        now_ms: u64,
    ) -> Option<Arc<str>> {
        let account_key = self.account_key(account);
        let pending = PendingJob {
            seq,
            due_ms,
            failed: false,
        };
        let mut released = None;
        let message_key = match self.slots.get_mut(message) {
            Some(slot) => {
                debug_assert!(slot.pending.is_none());
                if slot.account != account_key {
                    // Only possible while a job of this message is in flight for the old
                    // account; the new job belongs to the new one.
                    let old = std::mem::replace(&mut slot.account, account_key.clone());
                    slot.pending = Some(pending);
                    self.accounts.get_mut(&account_key).expect("line").slots += 1;
                    released = Some(old);
                    self.slots[message].message.clone()
                } else {
                    slot.pending = Some(pending);
                    slot.message.clone()
                }
            }
            None => {
                let message_key: Arc<str> = Arc::from(message);
                self.accounts.get_mut(&account_key).expect("line").slots += 1;
                self.slots.insert(
                    message_key.clone(),
                    Slot {
                        account: account_key,
                        message: message_key.clone(),
                        pending: Some(pending),
                        in_flight: None,
                    },
                );
                message_key
            }
        };
        self.pending += 1;
        if let Some(old) = released {
            self.release_account(&old);
        }
        self.place(&message_key, pending, now_ms)
    }

    /// Puts a pending job where it belongs: blocked, delayed or ready.
    fn place(&mut self, message: &Arc<str>, pending: PendingJob, now_ms: u64) -> Option<Arc<str>> {
        let slot = &self.slots[message];
        if slot.in_flight.is_some() {
            return None; // blocked until the in-flight job finishes
        }
        if pending.due_ms > now_ms {
            self.delayed
                .insert((pending.due_ms, pending.seq), message.clone());
            return None;
        }
        let account = slot.account.clone();
        self.make_ready(&account, pending.seq, message.clone())
    }

    /// Takes a pending job out of `ready` or `delayed`.
    fn unplace(&mut self, message: &Arc<str>, pending: PendingJob) {
        if self
            .delayed
            .remove(&(pending.due_ms, pending.seq))
            .is_none()
        {
            let account = self.slots[message].account.clone();
            if let Some(line) = self.accounts.get_mut(&account) {
                line.ready.remove(&pending.seq);
            }
        }
    }

    fn make_ready(&mut self, account: &Arc<str>, seq: u64, message: Arc<str>) -> Option<Arc<str>> {
        let line = self.accounts.entry(account.clone()).or_default();
        line.ready.insert(seq, message);
        if line.announced {
            None
        } else {
            line.announced = true;
            Some(account.clone())
        }
    }

    fn remove_slot(&mut self, message: &str) {
        if let Some(slot) = self.slots.remove(message) {
            self.release_account(&slot.account);
        }
    }

    /// One slot less names `account`; its line is forgotten once none does, so memory follows
    /// the accounts with work, not every account ever seen.
    fn release_account(&mut self, account: &Arc<str>) {
        if let Some(line) = self.accounts.get_mut(account) {
            line.slots -= 1;
            // A line the dispatcher still holds in its ring (announced) stays until a claim
            // finds it empty; dropping it now would announce the account twice if it got work
            // again meanwhile.
            if line.slots == 0 && !line.announced {
                debug_assert!(line.ready.is_empty());
                self.accounts.remove(account);
            }
        }
    }

    /// Checks the counters against the structure (tests only; O(n)).
    #[cfg(test)]
    pub fn check(&self) {
        let pending = self.slots.values().filter(|s| s.pending.is_some()).count() as u64;
        let in_flight = self
            .slots
            .values()
            .filter(|s| s.in_flight.is_some())
            .count() as u64;
        assert_eq!(pending, self.pending);
        assert_eq!(in_flight, self.in_flight);
        let ready: usize = self.accounts.values().map(|l| l.ready.len()).sum();
        let blocked = self
            .slots
            .values()
            .filter(|s| s.pending.is_some() && s.in_flight.is_some())
            .count();
        assert_eq!(ready + self.delayed.len() + blocked, pending as usize);
        for slot in self.slots.values() {
            assert!(slot.pending.is_some() || slot.in_flight.is_some());
        }
        for (account, line) in &self.accounts {
            let naming = self
                .slots
                .values()
                .filter(|s| &s.account == account)
                .count();
            assert_eq!(line.slots, naming, "slot count of {account}");
            assert!(
                line.slots > 0 || line.announced,
                "idle line of {account} kept"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_into_pending_but_not_in_flight() {
        let mut state = State::new(1);
        let Placed::New { seq: first, .. } = state.enqueue("m", "a", 0) else {
            panic!()
        };
        assert!(
            matches!(state.enqueue("m", "a", 0), Placed::Coalesced { seq, .. } if seq == first)
        );
        let claim = state.claim("a").unwrap();
        assert_eq!(claim.seq, first);
        // In flight: a new edit is a new pending job, blocked behind the in-flight one.
        let Placed::New { seq: second, .. } = state.enqueue("m", "a", 0) else {
            panic!()
        };
        assert!(state.claim("a").is_none(), "blocked behind in-flight job");
        state.check();
        let finished = state.finish("m", first, 0);
        assert_eq!(finished.announce.as_deref(), Some("a"));
        assert_eq!(state.claim("a").unwrap().seq, second);
        state.check();
    }

    #[test]
    fn order_is_first_enqueue() {
        let mut state = State::new(1);
        state.enqueue("m1", "a", 0);
        state.enqueue("m2", "a", 0);
        state.enqueue("m1", "a", 0); // coalesced: keeps its place
        assert_eq!(&*state.claim("a").unwrap().message, "m1");
        assert_eq!(&*state.claim("a").unwrap().message, "m2");
    }

    #[test]
    fn requeue_waits_and_is_superseded_by_newer_pending() {
        let mut state = State::new(1);
        state.enqueue("m", "a", 0);
        let claim = state.claim("a").unwrap();
        assert!(
            !state
                .requeue("m", claim.seq, 1_000, 0, true)
                .unwrap()
                .superseded
        );
        assert!(state.claim("a").is_none());
        assert_eq!(state.next_due_ms(), Some(1_000));
        assert_eq!(state.promote_due(1_000), vec![Arc::<str>::from("a")]);
        let claim = state.claim("a").unwrap();
        state.enqueue("m", "a", 0);
        assert!(
            state
                .requeue("m", claim.seq, 5_000, 0, true)
                .unwrap()
                .superseded,
            "superseded"
        );
        assert_eq!(state.pending(), 1);
        assert_eq!(state.in_flight(), 0);
        state.check();
    }

    #[test]
    fn restore_keeps_newest() {
        let mut state = State::new(1);
        assert_eq!(state.restore("m", "a", 3, 0, 0).0, None);
        assert_eq!(state.restore("m", "a", 7, 0, 0).0, Some(3));
        assert_eq!(state.restore("m", "a", 5, 0, 0).0, Some(5));
        assert_eq!(state.claim("a").unwrap().seq, 7);
        assert_eq!(state.next_seq(), 8);
        state.check();
    }

    #[test]
    fn accounts_are_released_when_idle() {
        let mut state = State::new(1);
        state.enqueue("m", "a", 0);
        let claim = state.claim("a").unwrap();
        state.finish("m", claim.seq, 0);
        assert_eq!(state.accounts(), 0);
        state.check();
    }
}
