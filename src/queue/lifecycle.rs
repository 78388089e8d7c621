//! The producer's side of a message's life: a send (an upsert by `ref`), edits by `ref` or
//! `message_id`, a delete, and the status of a message. Each request takes the queue's lock
//! once, decides against the index and the remembered messages (`refs.rs`), appends its writes
//! and waits for their group commit before it is answered.
//!
//! The rules, per message: one pending job at most, whose content the latest request replaces
//! (a send whose ref is known is new content of that message, never a second message); a
//! delete replaces any pending content and after it nothing more is accepted (`gone`); a
//! delete of a message never sent (nothing in flight, no `message_id`) cancels it, and Zoom
//! sees nothing. Content for a ref whose send is a dead letter is accepted and coalesced as
//! usual, and waits out of line with it for an operator (see `outcome.rs`).

use std::time::Duration;

use super::refs::{ref_name, ref_of, RefRecord, SendParams};
use super::state::{self, MessageKey};
use super::store::{self, put_ref, EntryRef, JobOp};
use super::{now_ms, Commit, Core, EnqueueError, Enqueued, LocalQueue};
use crate::protocol::{Delete, Edit, MessageState, MessageStatus, Send, StatusQuery, Target};

/// How a delete was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deleted {
    /// The delete's job; `None` when it cancelled a send never attempted.
    pub job_id: Option<u64>,
    pub cancelled: bool,
}

/// A request's message, resolved: its name and key in the index.
struct Named {
    name: String,
    key: MessageKey,
    /// Named by a producer's ref (directly, or through the message id Zoom gave it).
    by_ref: bool,
}

impl Core {
    fn resolve(&self, target: &Target, account_id: &str, robot_jid: &str) -> Named {
        match target {
            Target::Ref(reference) => {
                let name = ref_name(account_id, robot_jid, reference);
                Named {
                    key: self.state.key(&name),
                    name,
                    by_ref: true,
                }
            }
            Target::MessageId(id) => {
                let message_key = self.state.key(id);
                match self.refs.by_message_id(message_key) {
                    Some(key) => Named {
                        name: self.refs.get(key).expect("indexed ref").name.clone(),
                        key,
                        by_ref: true,
                    },
                    None => Named {
                        name: id.clone(),
                        key: message_key,
                        by_ref: false,
                    },
                }
            }
        }
    }

    /// Refuses everything while the queue cannot take writes.
    fn admit(&self, shared: &super::Shared) -> Result<(), EnqueueError> {
        if self.closing {
            return Err(EnqueueError::Unavailable(
                "the daemon is shutting down; the request was not accepted".into(),
            ));
        }
        if let Some(free) = self.space_low {
            return Err(EnqueueError::Unavailable(format!(
                "storage nearly full: {free} bytes free on the filesystem of {}, below \
                 storage.min_free_bytes ({}); the request was not accepted, try again later",
                shared.storage.path.display(),
                shared.storage.min_free_bytes
            )));
        }
        if let Some(failure) = self.failure.as_ref().or(self.recovery_failure.as_ref()) {
            return Err(EnqueueError::Unavailable(format!(
                "storage is failing ({failure}); the request was not accepted, try again later"
            )));
        }
        Ok(())
    }

    /// Appends the job's new entry for `name`, placing it in the index (new or coalesced).
    fn place_job(
        &mut self,
        shared: &super::Shared,
        name: &str,
        account_id: &str,
        op: JobOp,
        body: &[u8],
        now: u64,
    ) -> Result<(u64, bool), EnqueueError> {
        if self.state.would_add(name) && self.state.pending() >= shared.max_pending {
            return Err(EnqueueError::Full(self.state.pending()));
        }
        let replaces_failed = self.state.pending_failed(name);
        let (seq, coalesced, announce) = match self.state.enqueue(name, account_id, now) {
            state::Placed::New { seq, announce } => (seq, false, announce),
            // A move to another account is in the index; the new entry names it.
            state::Placed::Coalesced { seq, announce, .. } => (seq, true, announce),
        };
        let (_, due_ms, stored) = self
            .state
            .pending_job(name)
            .expect("the job was just placed");
        let entry = EntryRef {
            seq,
            enqueued_ms: stored.enqueued_ms,
            updated_ms: now,
            attempts: stored.attempts,
            next_attempt_ms: due_ms,
            first_failure_ms: stored.first_failure_ms,
            message_id: name,
            account_id,
            body_len: body.len() as u32,
            op,
        };
        let loc = self.write_entry(&entry, body);
        if let Some(replaced) = self.state.set_loc(name, loc) {
            self.ledger.done(replaced);
        }
        if let Some(fresh) = self.recovering.as_mut() {
            fresh.insert(seq);
        }
        shared.announce(announce);
        if coalesced && (replaces_failed || op == JobOp::Delete) {
            // The replaced content failed and waited for a retry, or a delete replaced it: it
            // will never be sent.
            shared.metrics.edits_superseded.inc();
        }
        Ok((seq, coalesced))
    }
}

fn gone(named: &Named) -> EnqueueError {
    EnqueueError::Gone(format!(
        "{} was deleted; nothing more is accepted for it",
        describe(&named.name)
    ))
}

/// A message's name as a producer knows it.
pub fn describe(name: &str) -> String {
    match ref_of(name) {
        Some(reference) => format!("the message with ref {reference:?}"),
        None => format!("message {name:?}"),
    }
}

impl Core {
    /// Refuses a new remembered message beyond `storage.max_refs`.
    fn room_for_ref(&self, shared: &super::Shared) -> Result<(), EnqueueError> {
        let max = shared.storage.max_refs;
        if self.refs.len() as u64 >= max {
            return Err(EnqueueError::TooManyRefs(max));
        }
        Ok(())
    }
}

impl LocalQueue {
    /// Makes one edit durable, coalescing it with the message's pending job if there is one.
    /// Content for a held message is accepted and waits with it (see `outcome.rs`).
    pub async fn enqueue(&self, edit: &Edit) -> Result<Enqueued, EnqueueError> {
        let now = now_ms();
        let body = edit.zoom_body();
        let (enqueued, commit) = {
            let mut core = self.shared.lock();
            core.admit(&self.shared)?;
            let named = core.resolve(&edit.target, &edit.account_id, &edit.robot_jid);
            let record = core.refs.get(named.key);
            if record.is_some_and(|r| r.deleted) {
                return Err(gone(&named));
            }
            if named.by_ref && record.is_none() {
                return Err(not_found(&edit.target));
            }
            let (job_id, coalesced) = core.place_job(
                &self.shared,
                &named.name,
                &edit.account_id,
                JobOp::Content,
                &body,
                now,
            )?;
            core.refs.update(named.key, |r| r.last_used_ms = now);
            let enqueued = Enqueued { job_id, coalesced };
            (enqueued, self.shared.commit_locked(core))
        };
        self.accepted_content(commit, "edit", enqueued).await
    }

    /// Makes one send durable: a new message for an unknown ref, else new content of the
    /// message the ref already names.
    pub async fn send(&self, send: &Send) -> Result<Enqueued, EnqueueError> {
        let now = now_ms();
        let edit = Edit {
            target: Target::Ref(send.reference.clone()),
            account_id: send.account_id.clone(),
            robot_jid: send.robot_jid.clone(),
            user_jid: send.user_jid.clone(),
            is_markdown_support: send.is_markdown_support,
            content: send.content.clone(),
        };
        // The content job is edit-shaped; how to send it is remembered with the ref.
        let body = edit.zoom_body();
        let params = SendParams {
            to_jid: send.to_jid.clone(),
            visible_to_user: send.visible_to_user.clone(),
            reply_to: send.reply_to.clone(),
        };
        let (enqueued, commit) = {
            let mut core = self.shared.lock();
            core.admit(&self.shared)?;
            let named = core.resolve(&edit.target, &edit.account_id, &edit.robot_jid);
            let record = core.refs.get(named.key).cloned();
            if record.as_ref().is_some_and(|r| r.deleted) {
                return Err(gone(&named));
            }
            if record.is_none() {
                core.room_for_ref(&self.shared)?;
            }
            let (job_id, coalesced) = core.place_job(
                &self.shared,
                &named.name,
                &send.account_id,
                JobOp::Content,
                &body,
                now,
            )?;
            let (_, in_flight) = core.state.jobs_of_key(named.key);
            let mut record = record.unwrap_or_else(|| RefRecord::new(named.name.clone(), now));
            record.last_used_ms = now;
            // Until a send may have reached Zoom, the latest send says where the message goes
            // (also after Zoom refused one: a corrected `to_jid` is what a retry needs).
            if record.message_id.is_none() && !record.in_doubt && in_flight == 0 {
                record.send = Some(params);
            }
            core.ops.push(put_ref(&record));
            core.refs.put(named.key, record, None);
            let enqueued = Enqueued { job_id, coalesced };
            (enqueued, self.shared.commit_locked(core))
        };
        self.accepted_content(commit, "send", enqueued).await
    }

    /// Makes a delete durable: it replaces the message's pending content, or cancels a send
    /// never attempted (or held as a dead letter). The deletion is remembered in the same
    /// batch, so that it refuses later content at once, also after a restart.
    pub async fn delete(&self, delete: &Delete) -> Result<Deleted, EnqueueError> {
        let now = now_ms();
        #[derive(serde::Serialize)]
        struct Params<'a> {
            account_id: &'a str,
            robot_jid: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            user_jid: Option<&'a str>,
        }
        let body = serde_json::to_vec(&Params {
            account_id: &delete.account_id,
            robot_jid: &delete.robot_jid,
            user_jid: delete.user_jid.as_deref(),
        })
        .expect("strings serialize");
        let (deleted, commit) = {
            let mut core = self.shared.lock();
            core.admit(&self.shared)?;
            let named = core.resolve(&delete.target, &delete.account_id, &delete.robot_jid);
            let record = core.refs.get(named.key).cloned();
            if record.as_ref().is_some_and(|r| r.deleted) {
                return Err(gone(&named));
            }
            if named.by_ref && record.is_none() {
                return Err(not_found(&delete.target));
            }
            if record.is_none() {
                core.room_for_ref(&self.shared)?;
            }
            let (_, in_flight) = core.state.jobs_of_key(named.key);
            let unsent = record.as_ref().is_some_and(|r| r.message_id.is_none());
            let mut record = record.unwrap_or_else(|| RefRecord::new(named.name.clone(), now));
            let deleted = if unsent && in_flight == 0 {
                // Never sent and nothing on its way: Zoom never hears of this message. (A send
                // whose outcome was unknown may have posted it; nothing can name that one.)
                core.drop_pending(named.key);
                if let Some(held) = record.held.take() {
                    if core.remove_dead(held.seq) {
                        record.dead_letters = record.dead_letters.saturating_sub(1);
                    }
                    let released = core.state.release(named.key, now);
                    self.shared.announce(released.announce);
                }
                if record.in_doubt {
                    tracing::warn!(message = %describe(&named.name),
                        "deleted before its send was confirmed; an earlier attempt may have posted it");
                }
                self.shared.metrics.sends_cancelled.inc();
                record.send = None;
                Deleted {
                    job_id: None,
                    cancelled: true,
                }
            } else {
                let (seq, _) = core.place_job(
                    &self.shared,
                    &named.name,
                    &delete.account_id,
                    JobOp::Delete,
                    &body,
                    now,
                )?;
                Deleted {
                    job_id: Some(seq),
                    cancelled: false,
                }
            };
            record.deleted = true;
            record.last_used_ms = now;
            core.ops.push(put_ref(&record));
            core.refs.put(named.key, record, None);
            (deleted, self.shared.commit_locked(core))
        };
        self.accepted(commit, "delete").await?;
        self.shared.status_changed.send_modify(|n| *n += 1);
        Ok(deleted)
    }

    /// Where a message stands; with `wait`, answered once it has a `message_id` or reached a
    /// final state, or when `wait` ends.
    pub async fn status(&self, query: &StatusQuery) -> Result<MessageStatus, EnqueueError> {
        let deadline = tokio::time::Instant::now() + query.wait.unwrap_or(Duration::ZERO);
        let mut changed = self.shared.status_changed.subscribe();
        let mut durable = self.shared.durable_batch.subscribe();
        loop {
            changed.borrow_and_update();
            durable.borrow_and_update();
            let status = self.status_now(query)?;
            let settled = status.message_id.is_some()
                || matches!(
                    status.state,
                    MessageState::Sent | MessageState::Deleted | MessageState::Dead
                );
            if settled || query.wait.is_none() {
                return Ok(status);
            }
            // A change of state, or the commit that makes a new id tellable.
            let next = async {
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = durable.changed() => {}
                }
            };
            if tokio::time::timeout_at(deadline, next).await.is_err() {
                return self.status_now(query);
            }
        }
    }

    fn status_now(&self, query: &StatusQuery) -> Result<MessageStatus, EnqueueError> {
        let durable = *self.shared.durable_batch.borrow();
        let core = self.shared.lock();
        let named = core.resolve(&query.target, &query.account_id, &query.robot_jid);
        let record = core.refs.get(named.key);
        let (pending, in_flight) = core.state.jobs_of_key(named.key);
        // Zoom's id is told only once it is on disk: a crash before would make the send one
        // in doubt again.
        let id_durable = record.is_none_or(|r| r.id_batch <= durable);
        let state = if in_flight != 0 || !id_durable {
            MessageState::InFlight
        } else if record.is_some_and(|r| r.held.is_some()) {
            MessageState::Dead
        } else if pending != 0 {
            MessageState::Pending
        } else if record.is_some_and(|r| r.deleted) {
            MessageState::Deleted
        } else if record.is_some_and(|r| r.message_id.is_some()) {
            MessageState::Sent
        } else if record.is_some() {
            // A ref never sent, with no job in the index: recovery has not reached its send.
            MessageState::Pending
        } else {
            return Err(not_found(&query.target));
        };
        let job = if in_flight != 0 { in_flight } else { pending };
        let message_id = match &query.target {
            Target::MessageId(id) => Some(id.clone()),
            Target::Ref(_) => record
                .filter(|_| id_durable)
                .and_then(|r| r.message_id.clone()),
        };
        Ok(MessageStatus {
            state,
            message_id,
            sent_time: record
                .filter(|_| id_durable)
                .and_then(|r| r.sent_time.clone()),
            reason: record.and_then(|r| r.held.as_ref().map(|h| h.reason.clone())),
            job_id: (job != 0).then(|| job.to_string()),
            reference: ref_of(&named.name).map(str::to_string),
        })
    }

    /// Forgets messages last used more than `storage.ref_retention` ago (a few at a time; the
    /// dispatcher calls this every second). One that a job or a dead letter still needs
    /// stays, and counts as used now. Nothing is forgotten while recovery runs: the stored
    /// jobs it has not reached yet may need any of them.
    pub fn expire_refs(&self) -> usize {
        self.expire_refs_at(now_ms())
    }

    /// [`LocalQueue::expire_refs`] as of `now` (unix ms).
    pub(super) fn expire_refs_at(&self, now: u64) -> usize {
        let cutoff = now.saturating_sub(self.shared.storage.ref_retention.as_millis() as u64);
        let mut core = self.shared.lock();
        if core.recovering.is_some() {
            return 0;
        }
        let mut changed = 0;
        let mut forgotten = 0;
        for key in core.refs.expired(cutoff, 10_000) {
            let (pending, in_flight) = core.state.jobs_of_key(key);
            let busy = pending != 0
                || in_flight != 0
                || core
                    .refs
                    .get(key)
                    .is_some_and(|r| r.held.is_some() || r.dead_letters > 0);
            if busy {
                if let Some(kept) = core.refs.update(key, |r| r.last_used_ms = now) {
                    let op = put_ref(kept);
                    core.ops.push(op);
                    changed += 1;
                }
                continue;
            }
            let message_key = core
                .refs
                .get(key)
                .and_then(|r| r.message_id.as_deref())
                .map(|id| core.state.key(id));
            if let Some(record) = core.refs.remove(key, message_key) {
                core.ops.push(store::del_ref(&record.name));
                forgotten += 1;
            }
        }
        if forgotten + changed > 0 {
            core.refs.shrink();
            drop(self.shared.commit_locked(core));
        }
        forgotten
    }

    /// [`LocalQueue::accepted`] for new content, also counting it coalesced when it was.
    async fn accepted_content(
        &self,
        commit: Commit,
        op: &'static str,
        enqueued: Enqueued,
    ) -> Result<Enqueued, EnqueueError> {
        self.accepted(commit, op).await?;
        if enqueued.coalesced {
            self.shared.metrics.edits_coalesced.inc();
        }
        Ok(enqueued)
    }

    /// Waits for an intake's commit and counts it.
    async fn accepted(&self, commit: Commit, op: &'static str) -> Result<(), EnqueueError> {
        match commit.await {
            Ok(Ok(())) => {
                let metrics = &self.shared.metrics;
                metrics.edits_accepted.inc();
                metrics.requests_accepted.with_label_values(&[op]).inc();
                Ok(())
            }
            Ok(Err(e)) => Err(EnqueueError::Unavailable(format!(
                "storage failed to persist the {op} ({e}); it was not accepted, try again later"
            ))),
            Err(_) => Err(EnqueueError::Unavailable(format!(
                "the storage writer stopped; the {op} was not accepted"
            ))),
        }
    }
}

fn not_found(target: &Target) -> EnqueueError {
    EnqueueError::NotFound(match target {
        Target::Ref(reference) => format!(
            "no message with ref {reference:?} for this account_id and robot_jid: send it \
             first (refs are forgotten storage.ref_retention after their last use)"
        ),
        Target::MessageId(id) => format!(
            "message {id:?} is not pending, and zoomq remembers only messages it sent by ref \
             or deleted"
        ),
    })
}
