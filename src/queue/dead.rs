//! Operator commands on the dead letters: list, retry (put back in line, or supersede when a
//! newer edit of the message is pending) and purge. Serialized by `Shared::dead_ops`, because each
//! reads sled and must see the previous command's writes committed.

use super::store::{key, Op, CONTENT, DEAD};
use super::{now_ms, wait, DeadOutcome, DeadRecord, JobHeader, Queue, StoreError};
use crate::protocol::Selector;

impl Queue {
    /// Dead letters in job-id order, at most `limit` of them.
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
        let _serial = self.shared.dead_ops.lock().await;
        let records = self.select_dead(selector)?;
        let mut outcome = DeadOutcome::default();
        let commit = {
            let mut core = self.shared.lock();
            let now = now_ms();
            for (seq, record) in records {
                let message = &record.header.message_id;
                core.batch.push(Op::Del(key(DEAD, seq)));
                core.dead -= 1;
                if core.state.pending_of(message).is_some() {
                    core.batch.push(Op::Del(key(CONTENT, seq)));
                    outcome.superseded += 1;
                    continue;
                }
                let header = JobHeader {
                    attempts: 0,
                    next_attempt_ms: 0,
                    first_failure_ms: None,
                    ..record.header
                };
                let (_, announce) =
                    core.state
                        .restore(&header.message_id, &header.account_id, seq, 0, now);
                core.write_header(seq, header);
                self.shared.announce(announce);
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
        let records = self.select_dead(selector)?;
        let commit = {
            let mut core = self.shared.lock();
            for (seq, _) in &records {
                core.batch.push(Op::Del(key(DEAD, *seq)));
                core.batch.push(Op::Del(key(CONTENT, *seq)));
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
