//! The dispatcher's side of the queue: claim an account's oldest ready job, then finish it:
//! delivered, back in line for a retry, or dead. Each transition changes the index and appends
//! its writes under one lock.
//!
//! **Invariant:** only a job whose writes are all committed can be claimed. So Zoom never
//! receives content that a crash could still take back, and after a restart it never gets an
//! older edit of a message after a newer one.

use super::refs::ref_of;
use super::store::{put_ref, EntryRef, JobOp, StoreError};
use super::{now_ms, Call, Core, Job, LocalQueue};

/// A send's body: the content job's edit-shaped body (robot_jid, account_id, content,
/// user_jid, is_markdown_support, as `Edit::zoom_body` wrote it) with where the message goes,
/// appended as text so that the producer's content is sent exactly as given.
fn send_body(edit_body: &[u8], params: &super::refs::SendParams) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Extra<'a> {
        to_jid: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        visible_to_user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_to: Option<&'a str>,
    }
    let extra = serde_json::to_vec(&Extra {
        to_jid: &params.to_jid,
        visible_to_user: params.visible_to_user.as_deref(),
        reply_to: params.reply_to.as_deref(),
    })
    .expect("strings serialize");
    // Both are JSON objects: `{a}` and `{b}` make `{a,b}`.
    let mut body = edit_body.strip_suffix(b"}").unwrap_or(edit_body).to_vec();
    body.push(b',');
    body.extend_from_slice(&extra[1..]);
    body
}

/// The state of an account's line, as the dispatcher needs it before taking a rate-limit slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// A job is ready to be claimed.
    Ready,
    /// The ready job is the send of a message named by a ref (or needs no request): claim it
    /// before taking a rate-limit slot, and send it once [`LocalQueue::is_durable`] says its mark
    /// is on disk, so that the slot is taken when the request really leaves.
    ClaimFirst,
    /// The oldest ready job has writes not yet on disk: wait for [`LocalQueue::committed`].
    NotDurable,
    /// Nothing is ready.
    Empty,
}

/// What a claim found.
// One per request, moved straight into the request's task: boxing the job would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Claimed {
    Job(Job),
    /// The claimed job needed no request (a delete of a message never sent, content joining
    /// its message's dead letter); `more` as for a job.
    Skipped {
        more: bool,
    },
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

impl LocalQueue {
    /// Whether `account`'s oldest ready job can be claimed now.
    pub fn head(&self, account: &str) -> Head {
        let core = self.shared.lock();
        match core.state.peek_ready_key(account) {
            None => Head::Empty,
            Some((seq, _)) if !core.claimable(seq) => Head::NotDurable,
            Some((_, key)) if core.refs.get(key).is_some_and(|r| r.message_id.is_none()) => {
                Head::ClaimFirst
            }
            Some(_) => Head::Ready,
        }
    }

    /// Whether batch `batch` is committed (see [`Job::marked_batch`]).
    pub fn is_durable(&self, batch: u64) -> bool {
        *self.shared.durable_batch.borrow() >= batch
    }

    /// Claims the oldest ready job of `account`, reading its content from disk.
    pub fn claim(&self, account: &str) -> Result<Claimed, StoreError> {
        if self.shared.fence.is_cancelled() {
            return Ok(Claimed::Empty);
        }
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
            Ok(Some(loaded)) if loaded.seq == claim.seq => {
                let job = Job {
                    seq: claim.seq,
                    call: Call::Edit {
                        message_id: loaded.header.message_id.clone(),
                    },
                    header: loaded.header,
                    updated_ms: loaded.updated_ms,
                    body: loaded.body,
                    more: claim.more,
                    marked_batch: None,
                    fence: self.shared.fence.clone(),
                    in_doubt: false,
                    doubt_new: false,
                    outcome_unknown: false,
                    loc,
                    key: claim.message,
                };
                Ok(self.prepare(job))
            }
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

    /// Decides which call a claimed job makes. A message named by a ref is sent while Zoom
    /// has not given it an id (the send marked as under way first), edited or deleted by that
    /// id after; a delete of a ref never sent, and content for a ref whose send is a dead
    /// letter, need no request.
    fn prepare(&self, mut job: Job) -> Claimed {
        let name = job.header.message_id.clone();
        if ref_of(&name).is_none() {
            if job.header.op == JobOp::Delete {
                job.call = Call::Delete { message_id: name };
            }
            return Claimed::Job(job);
        }
        let mut core = self.shared.lock();
        let core = &mut *core;
        let Some(record) = core.refs.get(job.key).cloned() else {
            // Every ref with a job has a record: written with its first send.
            tracing::error!(job_id = job.seq, "a job of a ref without a record; dropped");
            self.skip(core, &job);
            return Claimed::Skipped { more: job.more };
        };
        match (job.header.op, record.message_id) {
            (JobOp::Content, Some(message_id)) => job.call = Call::Edit { message_id },
            (JobOp::Delete, Some(message_id)) => job.call = Call::Delete { message_id },
            (JobOp::Delete, None) => {
                // Its send failed and went back in line, and then this delete replaced it:
                // Zoom never hears of the message (unless that send's outcome was unknown).
                if record.in_doubt {
                    tracing::warn!(job_id = job.seq, message = %super::describe(&name),
                        "deleted before its send was confirmed; an earlier attempt may have posted it");
                }
                self.skip(core, &job);
                self.shared.metrics.sends_cancelled.inc();
                let done = core.refs.update(job.key, |r| {
                    r.send = None;
                    r.last_used_ms = now_ms();
                });
                if let Some(done) = done {
                    core.ops.push(put_ref(done));
                }
                self.shared.status_changed.send_modify(|n| *n += 1);
                return Claimed::Skipped { more: job.more };
            }
            (JobOp::Content, None) => {
                if record.held.is_some() {
                    // A held message's content waits out of line (see `outcome.rs`); this
                    // one got into line anyway: back, and out of line.
                    tracing::error!(
                        job_id = job.seq,
                        "content of a held message was claimed; held again"
                    );
                    let entry = EntryRef::new(job.seq, &job.header, job.updated_ms, &job.body);
                    let now = now_ms();
                    core.state
                        .requeue_key(job.key, job.seq, 0, now, false, entry.stored(job.loc));
                    if let Some(account) = super::refs::account_of(&name) {
                        core.state.hold(job.key, account);
                    }
                    return Claimed::Skipped { more: job.more };
                }
                let Some(params) = &record.send else {
                    tracing::error!(
                        job_id = job.seq,
                        "a ref never sent without its send; dropped"
                    );
                    self.skip(core, &job);
                    return Claimed::Skipped { more: job.more };
                };
                job.call = Call::Send {
                    body: send_body(&job.body, params),
                };
                job.in_doubt = record.in_doubt;
                job.doubt_new = record.in_doubt && !record.doubt_counted;
                // Recorded before the request leaves (the dispatcher waits for this batch):
                // after a crash, a send that may have reached Zoom is known as one.
                let marked = core.refs.update(job.key, |r| {
                    r.doubt_counted |= r.in_doubt;
                    r.in_doubt = true;
                });
                if let Some(marked) = marked {
                    core.ops.push(put_ref(marked));
                }
                job.marked_batch = Some(core.batch_gen);
                if core.writer_waiting {
                    self.shared.writer_wake.notify_one();
                }
            }
        }
        Claimed::Job(job)
    }

    /// Finishes a claimed job that needs no request, and has its writes committed soon
    /// (nothing else may be on its way to the writer).
    fn skip(&self, core: &mut Core, job: &Job) {
        let finished = core.state.finish_key(job.key, job.seq, now_ms());
        core.ledger.done(job.loc);
        self.shared.announce(finished.announce);
        if core.writer_waiting {
            self.shared.writer_wake.notify_one();
        }
    }

    /// Resolves after the next successful group commit.
    pub async fn committed(&self) {
        self.shared.committed.notified().await
    }

    /// Resolves once batch `batch` is committed (see [`Job::marked_batch`]).
    pub async fn durable(&self, batch: u64) {
        let mut durable = self.shared.durable_batch.subscribe();
        let _ = durable.wait_for(|&done| done >= batch).await;
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
