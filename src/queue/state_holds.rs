//! What the message lifecycle adds to the index: a message held by its dead letter (its
//! content waits out of line, see [`HELD`]), and a pending send cancelled by a delete.

use super::*;

impl State {
    /// Drops the message's pending job (a delete cancelled it before it was ever sent):
    /// returns its id and where its entry is, to retire it.
    pub fn drop_pending(&mut self, key: MessageKey) -> Option<(u64, Option<Loc>)> {
        let n = self.find(key)?;
        let pending = self.slot(n).pending;
        if !pending.is_some() {
            return None;
        }
        let loc = self.stored(&pending).loc;
        self.unplace(n);
        self.forget_retry(&pending);
        self.slot_mut(n).pending = PendingJob::default();
        self.pending -= 1;
        if self.slot(n).in_flight == 0 {
            self.remove_slot(n);
        }
        Some((pending.seq, loc))
    }

    /// The in-flight job `seq` of the message became a dead letter that holds the message
    /// (see [`HELD`]): its pending job, if any, stays blocked.
    pub fn hold_in_flight(&mut self, key: MessageKey, seq: u64) {
        let Some(n) = self.find(key) else { return };
        if self.slot(n).in_flight != seq || seq == 0 || seq == HELD {
            return;
        }
        self.slot_mut(n).in_flight = HELD;
        self.in_flight -= 1;
    }

    /// Holds a message named `message` of `account` whose dead letter was found at the open
    /// (or a job about to be sent after all): its pending job, if any, is taken out of line.
    pub fn hold(&mut self, key: MessageKey, account: &str) {
        let n = match self.find(key) {
            Some(n) => n,
            None => {
                let line = self.line_id(account);
                self.line_mut(line).slots += 1;
                self.new_slot(key, line)
            }
        };
        if self.slot(n).in_flight != 0 {
            return; // already held (a job in flight cannot be held from outside)
        }
        if self.slot(n).pending.is_some() {
            self.unplace(n);
        }
        self.slot_mut(n).in_flight = HELD;
    }

    /// The message's dead letter was retried or purged: its pending job, if any, takes its
    /// place in line (announcing the account when it just got ready work).
    pub fn release(&mut self, key: MessageKey, now_ms: u64) -> Finished {
        let Some(n) = self.find(key) else {
            return Finished { announce: None };
        };
        if self.slot(n).in_flight != HELD {
            return Finished { announce: None };
        }
        self.slot_mut(n).in_flight = 0;
        let announce = if self.slot(n).pending.is_some() {
            self.place(n, now_ms)
        } else {
            self.remove_slot(n);
            None
        };
        Finished { announce }
    }
}
