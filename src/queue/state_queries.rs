//! Questions the queue asks the index without changing it, and the consistency check the
//! tests run after every step.

use super::*;

impl State {
    /// The pending job of a message, if any.
    pub fn pending_of(&self, message: &str) -> Option<u64> {
        let slot = self.slot(self.find_str(message)?);
        slot.pending.is_some().then_some(slot.pending.seq)
    }

    /// The in-flight job of a message, if any.
    pub fn in_flight_of(&self, message: &str) -> Option<u64> {
        let slot = self.slot(self.find_str(message)?);
        (slot.in_flight != 0 && slot.in_flight != HELD).then_some(slot.in_flight)
    }

    /// The pending and in-flight job ids of the message known by `key` (0: none; a hold is
    /// not a job in flight).
    pub fn jobs_of_key(&self, key: MessageKey) -> (u64, u64) {
        match self.find(key) {
            Some(n) => {
                let slot = self.slot(n);
                let in_flight = if slot.in_flight == HELD {
                    0
                } else {
                    slot.in_flight
                };
                (slot.pending.seq, in_flight)
            }
            None => (0, 0),
        }
    }

    /// Whether the message's pending job `seq` is waiting for a retry time.
    pub fn is_waiting(&self, message: &str, seq: u64) -> bool {
        self.find_str(message).is_some_and(|n| {
            let p = self.slot(n).pending;
            p.is_some() && p.seq == seq && self.delayed.contains_key(&(self.retry(&p).due_ms, seq))
        })
    }

    /// Whether the message's pending job holds content that already failed once (so that a
    /// newer edit replacing it supersedes an edit waiting for its retry).
    pub fn pending_failed(&self, message: &str) -> bool {
        self.find_str(message).is_some_and(|n| {
            let p = self.slot(n).pending;
            p.is_some() && self.retry(&p).failed
        })
    }

    /// Whether a new edit of `message` would add a pending job (rather than coalesce).
    pub fn would_add(&self, message: &str) -> bool {
        self.pending_of(message).is_none()
    }

    /// The pending job of `message`: its id, retry time and stored state.
    pub fn pending_job(&self, message: &str) -> Option<(u64, u64, Stored)> {
        let pending = self.slot(self.find_str(message)?).pending;
        pending.is_some().then(|| {
            (
                pending.seq,
                self.retry(&pending).due_ms,
                self.stored(&pending),
            )
        })
    }

    /// The oldest ready job of `account`, without claiming it.
    pub fn peek_ready(&self, account: &str) -> Option<u64> {
        self.peek_ready_key(account).map(|(seq, _)| seq)
    }

    /// The oldest ready job of `account` and its message's key, without claiming it.
    pub fn peek_ready_key(&self, account: &str) -> Option<(u64, MessageKey)> {
        let &line = self.line_of.get(account)?;
        let (&seq, &n) = self.line(line).ready.iter().next()?;
        Some((seq, self.slot(n).key))
    }

    /// Whether the message's in-flight job is `seq` and a newer pending job would supersede
    /// it if it were put back.
    pub fn would_supersede(&self, message: &str, seq: u64) -> bool {
        self.find_str(message).is_some_and(|n| {
            let slot = self.slot(n);
            slot.in_flight == seq && slot.pending.is_some()
        })
    }

    /// The earliest retry time of a delayed job.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.delayed.keys().next().map(|(due, _)| *due)
    }

    /// Checks the counters against the structure (tests only; O(n)).
    #[cfg(test)]
    pub fn check(&self) {
        let live = self.slots.live();
        let pending = live.iter().filter(|(_, s)| s.pending.is_some()).count() as u64;
        let in_flight = live
            .iter()
            .filter(|(_, s)| s.in_flight != 0 && s.in_flight != HELD)
            .count() as u64;
        assert_eq!(pending, self.pending);
        assert_eq!(in_flight, self.in_flight);
        let ready: usize = self.lines.iter().flatten().map(|l| l.ready.len()).sum();
        let blocked = live
            .iter()
            .filter(|(_, s)| s.pending.is_some() && s.in_flight != 0)
            .count();
        assert_eq!(ready + self.delayed.len(), pending as usize - blocked);
        for (_, slot) in &live {
            assert!(slot.pending.is_some() || slot.in_flight != 0);
        }
        let pending_seqs: std::collections::HashSet<u64> = live
            .iter()
            .filter(|(_, s)| s.pending.is_some())
            .map(|(_, s)| s.pending.seq)
            .collect();
        for seq in self.retries.keys() {
            assert!(
                pending_seqs.contains(seq),
                "retry state of job {seq} outlives it"
            );
        }
        for (id, line) in self.lines.iter().enumerate() {
            let Some(line) = line else { continue };
            let naming = live
                .iter()
                .filter(|(_, s)| s.account as usize == id)
                .count();
            assert_eq!(line.slots, naming, "slot count of {}", line.name);
            assert!(
                line.slots > 0 || line.announced,
                "idle line of {} kept",
                line.name
            );
            assert_eq!(self.line_of.get(&line.name), Some(&(id as u32)));
        }
    }
}
