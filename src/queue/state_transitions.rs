//! The index's transitions: an edit enqueued (a new pending job, or coalesced into the
//! pending one), a stored job restored, a claim, a finish, a requeue, delayed jobs coming due;
//! and putting a pending job where it belongs: blocked, delayed or ready.

use std::sync::Arc;

use super::*;

impl State {
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

    pub(super) fn insert_pending(
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
    pub(super) fn place(&mut self, n: u32, now_ms: u64) -> Option<Arc<str>> {
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
    pub(super) fn unplace(&mut self, n: u32) {
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
