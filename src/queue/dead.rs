//! Operator commands on the dead letters: list, retry (put back in line, or supersede when a
//! newer edit of the message is pending) and purge. Serialized by `Shared::dead_ops`, because each
//! reads sled and must see the previous command's writes committed.

use super::refs::ref_of;
use super::store::JobOp;
use super::store::{del_ref, put_ref, EntryRef};
use super::{now_ms, wait, Core, DeadOutcome, DeadRecord, JobHeader, LocalQueue, StoreError};
use crate::protocol::{DeadLetter, Selector};

/// What becomes of a dead letter an operator put back.
enum Back {
    /// Back in line.
    Restore,
    /// Dropped: newer content of its message is pending or in flight, or was delivered, or
    /// the message was deleted since. (Older pending content gives way to it instead.)
    Superseded,
}

impl Core {
    /// The dead letter `seq` of `name` is being retried or purged: the message's record
    /// forgets it (and, if it held the message, the hold ends: pending content takes its
    /// place in line). After a purge, a ref whose send it was is forgotten altogether with
    /// any content waiting for it. Returns the account that just got ready work.
    fn let_go(&mut self, seq: u64, name: &str, purged: bool) -> Option<std::sync::Arc<str>> {
        let key = self.state.key(name);
        let record = self.refs.get(key)?.clone();
        let held = record.held.as_ref().is_some_and(|h| h.seq == seq);
        let now = now_ms();
        if held && purged && record.message_id.is_none() && !record.deleted {
            // Its content waiting out of line goes with it.
            self.drop_pending(key);
            self.state.release(key, now);
            if let Some(record) = self.refs.remove(key, None) {
                self.ops.push(del_ref(&record.name));
            }
            return None;
        }
        let released = self.refs.update(key, |r| {
            r.dead_letters = r.dead_letters.saturating_sub(1);
            r.last_used_ms = now;
            if held {
                r.held = None;
                // The operator decided: a send in doubt goes out again knowing it may be a
                // duplicate.
                r.in_doubt = false;
                r.doubt_counted = false;
            }
        });
        if let Some(released) = released {
            let op = put_ref(released);
            self.ops.push(op);
        }
        held.then(|| self.state.release(key, now).announce)
            .flatten()
    }

    /// Whether a retried dead letter still has something to say (see [`Back`]).
    fn back(&self, seq: u64, record: &DeadRecord) -> Back {
        let name = &record.header.message_id;
        let key = self.state.key(name);
        let (pending, in_flight) = self.state.jobs_of_key(key);
        let remembered = self.refs.get(key);
        let deleted_since =
            record.header.op == JobOp::Content && remembered.is_some_and(|r| r.deleted);
        let delivered_since = remembered.is_some_and(|r| r.delivered_seq > seq);
        // Job ids grow with each new job of a message, so the higher id is the newer content
        // (an older pending job, e.g. another dead letter retried just before, gives way).
        if pending > seq || in_flight > seq || deleted_since || delivered_since {
            Back::Superseded
        } else {
            Back::Restore
        }
    }
}

impl LocalQueue {
    /// Resolves once every change made so far is committed, so that what sled says next
    /// includes it (a dead letter is counted as soon as it is decided, but written by the next
    /// commit).
    pub async fn settled(&self) -> Result<(), String> {
        wait(self.shared.commit_locked(self.shared.lock())).await
    }

    /// Dead letters as producers and operators see them (named by ref where they were), in
    /// job-id order, at most `limit` of them. Call [`LocalQueue::settled`] first to see the latest.
    pub fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, StoreError> {
        let records = self.dead_list(limit)?;
        let core = self.shared.lock();
        Ok(records
            .into_iter()
            .map(|(seq, record)| {
                let name = &record.header.message_id;
                let remembered = core.refs.get(core.state.key(name));
                let reference = ref_of(name).map(str::to_string);
                let message_id = match &reference {
                    Some(_) => remembered
                        .and_then(|r| r.message_id.clone())
                        .unwrap_or_default(),
                    None => name.clone(),
                };
                // Written with the dead letter; guessed for those written before it was.
                let op = record.call.clone().unwrap_or_else(|| {
                    match record.header.op {
                        JobOp::Delete => "delete",
                        JobOp::Content if reference.is_some() && message_id.is_empty() => "send",
                        JobOp::Content => "edit",
                    }
                    .to_string()
                });
                DeadLetter {
                    job_id: seq.to_string(),
                    message_id,
                    reference,
                    op,
                    account_id: record.header.account_id,
                    reason: record.reason,
                    status: record.status,
                    zoom_code: record.zoom_code,
                    detail: record.detail,
                    attempts: record.header.attempts,
                    enqueued_ms: record.header.enqueued_ms,
                    dead_ms: record.dead_ms,
                }
            })
            .collect())
    }

    /// Dead letters in job-id order, at most `limit` of them. Call [`LocalQueue::settled`] first
    /// to see the latest ones.
    pub fn dead_list(&self, limit: Option<usize>) -> Result<Vec<(u64, DeadRecord)>, StoreError> {
        let store = self.shared.store()?;
        let records = store
            .dead_records()
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        records
    }

    /// Puts dead letters back in the queue (first in line: they keep their job id). One whose
    /// message has a newer pending edit is superseded and deleted instead.
    pub async fn dead_retry(&self, selector: &Selector) -> Result<DeadOutcome, String> {
        // A dead letter is older than any job its message got since, but recovery takes
        // whatever arrives while it runs for newer than anything stored: wait for it to end.
        self.recovered().await;
        if let Some(failure) = self.shared.lock().recovery_failure.clone() {
            return Err(failure);
        }
        let _serial = self.shared.dead_ops.lock().await;
        self.settled().await?;
        let records = self.select_dead(selector)?;
        // Bodies are read before taking the queue's lock: a dead letter's body is written once
        // and never changed, and only these serialized commands and a delete's cancel (which
        // the `remove_dead` below notices) delete it.
        let store = self.shared.store().map_err(|e| e.to_string())?;
        let mut bodies = Vec::with_capacity(records.len());
        for (seq, _) in &records {
            bodies.push(store.dead_body(*seq).map_err(|e| e.to_string())?);
        }
        let mut outcome = DeadOutcome::default();
        let commit = {
            let mut core = self.shared.lock();
            let now = now_ms();
            for ((seq, record), body) in records.into_iter().zip(bodies) {
                // A delete may have cancelled it (or another command taken it) meanwhile.
                if !core.remove_dead(seq) {
                    continue;
                }
                let message = &record.header.message_id;
                // Decided before the hold ends: content waiting for a held send is newer
                // than the send's dead letter, and goes out as the send instead.
                let back = core.back(seq, &record);
                let announce = core.let_go(seq, message, false);
                self.shared.announce(announce);
                let Some((updated_ms, body)) = body else {
                    tracing::error!(job_id = seq, "dead letter without a body; dropped");
                    continue;
                };
                if let Back::Superseded = back {
                    outcome.superseded += 1;
                    continue;
                }
                // Back in line with a clean retry state.
                let header = JobHeader {
                    attempts: 0,
                    next_attempt_ms: 0,
                    first_failure_ms: None,
                    ..record.header
                };
                let entry = EntryRef::new(seq, &header, updated_ms, &body);
                let stored = entry.stored(core.write_entry(&entry, &body));
                let restored =
                    core.state
                        .restore(&header.message_id, &header.account_id, seq, 0, stored, now);
                if let Some((_, Some(loser))) = restored.superseded {
                    core.ledger.done(loser);
                }
                self.shared.announce(restored.announce);
                outcome.affected += 1;
            }
            self.shared
                .metrics
                .dead_letters_retried
                .inc_by(outcome.affected);
            self.shared
                .metrics
                .edits_superseded
                .inc_by(outcome.superseded);
            self.shared.commit_locked(core)
        };
        wait(commit).await?;
        Ok(outcome)
    }

    /// Deletes dead letters.
    pub async fn dead_purge(&self, selector: &Selector) -> Result<DeadOutcome, String> {
        let _serial = self.shared.dead_ops.lock().await;
        self.settled().await?;
        let records = self.select_dead(selector)?;
        let commit = {
            let mut core = self.shared.lock();
            let mut purged = 0;
            for (seq, record) in &records {
                if !core.remove_dead(*seq) {
                    continue; // gone meanwhile
                }
                // A ref held by its send is forgotten with it (the ref is free again); one
                // held by its delete stays deleted.
                let announce = core.let_go(*seq, &record.header.message_id, true);
                self.shared.announce(announce);
                purged += 1;
            }
            (self.shared.commit_locked(core), purged)
        };
        let (commit, purged) = commit;
        wait(commit).await?;
        Ok(DeadOutcome {
            affected: purged,
            superseded: 0,
        })
    }

    fn select_dead(&self, selector: &Selector) -> Result<Vec<(u64, DeadRecord)>, String> {
        match selector {
            Selector::All => self.dead_list(None).map_err(|e| e.to_string()),
            Selector::One(seq) => match self.shared.store().and_then(|store| store.dead(*seq)) {
                Ok(Some(record)) => Ok(vec![(*seq, record)]),
                Ok(None) => Err(format!("no dead letter with job id \"{seq}\"")),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}
