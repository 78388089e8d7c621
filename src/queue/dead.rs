//! Operator commands on the dead letters: list, retry (put back in line, or supersede when a
//! newer edit of the message is pending) and purge. Serialized by `Shared::dead_ops`, because each
//! reads sled and must see the previous command's writes committed.

use super::refs::ref_of;
use super::store::JobOp;
use super::store::{del_ref, key, put_ref, EntryRef, Op, DEAD, DEAD_BODY};
use super::{now_ms, wait, Core, DeadOutcome, DeadRecord, JobHeader, Queue, StoreError};
use crate::protocol::{DeadLetter, Selector};

impl Core {
    /// Releases the ref or deleted message held by dead letter `seq`, if any: after a retry
    /// it is live again (no longer in doubt); after a purge a ref never sent is forgotten.
    fn release_hold(&mut self, seq: u64, name: &str, purged: bool) {
        let key = self.state.key(name);
        let Some(record) = self.refs.get(key) else {
            return;
        };
        if record.held.as_ref().is_none_or(|h| h.seq != seq) {
            return;
        }
        if purged && record.message_id.is_none() && !record.deleted {
            if let Some(record) = self.refs.remove(key, None) {
                self.ops.push(del_ref(&record.name));
            }
            return;
        }
        let released = self.refs.update(key, |r| {
            r.held = None;
            r.in_doubt = false;
            r.last_used_ms = now_ms();
        });
        if let Some(released) = released {
            let op = put_ref(released);
            self.ops.push(op);
        }
    }
}

impl Queue {
    /// Resolves once every change made so far is committed, so that what sled says next
    /// includes it (a dead letter is counted as soon as it is decided, but written by the next
    /// commit).
    pub async fn settled(&self) -> Result<(), String> {
        wait(self.shared.commit_locked(self.shared.lock())).await
    }

    /// Dead letters as producers and operators see them (named by ref where they were), in
    /// job-id order, at most `limit` of them. Call [`Queue::settled`] first to see the latest.
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
                let op = match record.header.op {
                    JobOp::Delete => "delete",
                    JobOp::Content if reference.is_some() && message_id.is_empty() => "send",
                    JobOp::Content => "edit",
                };
                DeadLetter {
                    job_id: seq.to_string(),
                    message_id,
                    reference,
                    op: op.to_string(),
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

    /// Dead letters in job-id order, at most `limit` of them. Call [`Queue::settled`] first
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
        let _serial = self.shared.dead_ops.lock().await;
        self.settled().await?;
        let records = self.select_dead(selector)?;
        // Bodies are read before taking the queue's lock (they are only ever deleted by these
        // serialized commands, so they cannot go away meanwhile).
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
                let message = &record.header.message_id;
                core.ops.push(Op::Del(key(DEAD, seq)));
                core.ops.push(Op::Del(key(DEAD_BODY, seq)));
                core.dead -= 1;
                let Some((updated_ms, body)) = body else {
                    tracing::error!(job_id = seq, "dead letter without a body; dropped");
                    continue;
                };
                // A newer job of the message, pending or in flight, wins: sent after it, the
                // dead letter would take back newer content.
                let newer_in_flight = core.state.in_flight_of(message).is_some_and(|s| s > seq);
                if core.state.pending_of(message).is_some() || newer_in_flight {
                    outcome.superseded += 1;
                    continue;
                }
                // A held ref is released: the operator chose to send it again, knowing that
                // a send whose outcome was unknown may post the message twice.
                core.release_hold(seq, message, false);
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
            for (seq, record) in &records {
                // A ref held by its send is forgotten with it (the ref is free again); one
                // held by its delete stays deleted.
                core.release_hold(*seq, &record.header.message_id, true);
                core.ops.push(Op::Del(key(DEAD, *seq)));
                core.ops.push(Op::Del(key(DEAD_BODY, *seq)));
                core.dead -= 1;
            }
            self.shared.commit_locked(core)
        };
        wait(commit).await?;
        Ok(DeadOutcome {
            affected: records.len() as u64,
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
