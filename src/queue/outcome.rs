//! How a claimed job ends: delivered (a send's `message_id` remembered first), back in line
//! for a retry, or dead. Each transition changes the index and appends its writes under one
//! lock, like every change of the queue.
//!
//! A remembered message is *held* when its send (or its delete) becomes a dead letter: what
//! arrives for it afterwards is accepted and coalesced as usual but waits out of line (an
//! edit needs the message's id, which only a send gives), until an operator retries the dead
//! letter (the newest content goes out as the send) or purges it (the ref and its content are
//! forgotten).

use super::refs::{ref_of, Held};
use super::state::Stored;
use super::store::{put_dead_body, put_json, put_ref, EntryRef, JobOp, DEAD};
use super::{now_ms, Call, Commit, Core, DeadInfo, DeadRecord, Job, LocalQueue};

/// What Zoom answered to a send: the message's id and its `sent_time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub message_id: String,
    pub sent_time: Option<String>,
}

impl LocalQueue {
    /// The job was delivered: forget it. For a send, `sent` is Zoom's id for the message,
    /// written in the same batch, and the message's next job is not claimable until that
    /// batch is committed: no edit leaves before the id it needs is durable.
    pub fn complete(&self, job: &Job, sent: Option<SentMessage>) -> Commit {
        let mut core = self.shared.lock();
        let core_ref = &mut *core;
        let now = now_ms();
        let finished = core_ref.state.finish_key(job.key, job.seq, now);
        core_ref.ledger.done(job.loc);
        let remembered =
            ref_of(&job.header.message_id).is_some() || core_ref.refs.get(job.key).is_some();
        if remembered || job.header.op == JobOp::Delete {
            self.remember(core_ref, job, sent, now);
        }
        self.shared.announce(finished.announce);
        self.shared.commit_locked(core)
    }

    /// Updates what is remembered of a ref or deleted message after its job was delivered.
    fn remember(&self, core: &mut Core, job: &Job, sent: Option<SentMessage>, now: u64) {
        if core.refs.get(job.key).is_none() {
            // The delete of a message id zoomq never sent: remembered as deleted (its record
            // was only in memory while the delete was pending).
            core.refs.put(
                job.key,
                super::refs::RefRecord::new(job.header.message_id.clone(), now),
                None,
            );
        }
        let message_key = sent.as_ref().map(|s| core.state.key(&s.message_id));
        if let (Some(sent), Some(message_key)) = (sent, message_key) {
            let batch = core.batch_gen;
            let record = core.refs.get(job.key).cloned().map(|mut r| {
                r.message_id = Some(sent.message_id);
                r.sent_time = sent.sent_time;
                r.send = None;
                r.in_doubt = false;
                r.doubt_counted = false;
                r.id_batch = batch;
                r
            });
            if let Some(record) = record {
                core.refs.put(job.key, record, Some(message_key));
            }
            // The next job of this message needs the id: only once it is on disk.
            let (pending, _) = core.state.jobs_of_key(job.key);
            if pending != 0 {
                core.overlay.insert(pending, core.batch_gen);
            }
            self.shared.status_changed.send_modify(|n| *n += 1);
        }
        let record = core.refs.update(job.key, |r| {
            r.last_used_ms = now;
            r.delivered_seq = r.delivered_seq.max(job.seq);
            if job.header.op == JobOp::Delete {
                r.deleted = true;
            }
        });
        if let Some(record) = record {
            core.ops.push(put_ref(record));
        }
        if job.header.op == JobOp::Delete {
            self.shared.status_changed.send_modify(|n| *n += 1);
        }
    }

    /// Puts a claimed job back in line: after a transient failure (`failed`, with the new
    /// retry state in `job.header`, stored before the job can be claimed again) or unsent
    /// (a 429, no token). A job whose message got a newer job meanwhile is dropped instead.
    /// A send known not to have been applied (`job.outcome_unknown` unset) is no longer in
    /// doubt. Returns whether it was superseded.
    pub fn retry_later(&self, job: &Job, failed: bool) -> (bool, Commit) {
        let mut core = self.shared.lock();
        if matches!(job.call, Call::Send { .. }) && !job.outcome_unknown && !job.in_doubt {
            let cleared = core.refs.update(job.key, |r| r.in_doubt = false);
            if let Some(cleared) = cleared {
                let op = put_ref(cleared);
                core.ops.push(op);
            }
        }
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
    pub(super) fn requeue_locked(
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

    /// The job can never succeed (or, for a send in doubt, must not be tried again): move it
    /// to the dead letters. A send or a delete of a remembered message holds it (see the
    /// module docs): its later content waits in the index, out of line, and the dead letter
    /// itself is never rewritten.
    pub fn dead_letter(&self, job: &Job, info: DeadInfo) -> Commit {
        let mut core = self.shared.lock();
        let core_ref = &mut *core;
        let now = now_ms();
        let remembered = core_ref.refs.get(job.key).is_some();
        let holds =
            remembered && (matches!(job.call, Call::Send { .. }) || job.header.op == JobOp::Delete);
        let mut announce = None;
        if holds {
            core_ref.state.hold_in_flight(job.key, job.seq);
        } else {
            announce = core_ref.state.finish_key(job.key, job.seq, now).announce;
        }
        if remembered {
            let record = core_ref.refs.update(job.key, |r| {
                r.dead_letters += 1;
                r.last_used_ms = now;
                if holds {
                    r.held = Some(Held {
                        seq: job.seq,
                        reason: info.reason.to_string(),
                    });
                }
                if info.reason == "rejected" {
                    // Zoom refused it: whatever was sent was not applied.
                    r.in_doubt = false;
                    r.doubt_counted = false;
                }
            });
            if let Some(record) = record {
                core_ref.ops.push(put_ref(record));
            }
            self.shared.status_changed.send_modify(|n| *n += 1);
        }
        let record = DeadRecord {
            header: job.header.clone(),
            dead_ms: now,
            reason: info.reason.to_string(),
            status: info.status,
            zoom_code: info.zoom_code,
            detail: info.detail,
            call: Some(call_name(&job.call).to_string()),
        };
        core_ref.ledger.done(job.loc);
        core_ref.ops.push(put_json(DEAD, job.seq, &record));
        core_ref
            .ops
            .push(put_dead_body(job.seq, job.updated_ms, &job.body));
        core_ref.dead.insert(job.seq);
        self.shared
            .metrics
            .edits_dead_lettered
            .with_label_values(&[info.reason])
            .inc();
        self.shared.announce(announce);
        self.shared.commit_locked(core)
    }
}

/// The name of a call, as dead letters and metrics give it.
pub fn call_name(call: &Call) -> &'static str {
    match call {
        Call::Send { .. } => "send",
        Call::Edit { .. } => "edit",
        Call::Delete { .. } => "delete",
    }
}
