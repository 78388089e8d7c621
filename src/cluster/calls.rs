//! The cluster's queue API, as `backend::Queue` calls it: each call goes to its partition's
//! queue, here if this daemon owns it, else to the daemon that does (`rpc`), and job ids are
//! made cluster-wide on the way back; the dispatcher's calls reach only partitions this
//! daemon owns and may send for.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::assign::{global_job_id, partition_of, split_job_id, PARTITIONS};
use super::rpc::{self, Answer, Call, CallError};
use super::{Cluster, ROUTE_PATIENCE};
use crate::protocol::{DeadLetter, Delete, Edit, MessageStatus, Selector, Send, StatusQuery};
use crate::queue::{Commit, DeadOutcome, Deleted, EnqueueError, Enqueued, Job};

impl Cluster {
    /// Runs `call` on partition `p`'s queue, here or at its owner.
    async fn route(&self, p: u32, call: Call, wait: Duration) -> Result<Answer, EnqueueError> {
        let deadline = Instant::now() + ROUTE_PATIENCE;
        loop {
            let answer = match self.owned(p) {
                Some(owned) if !owned.stop.is_cancelled() => {
                    return Ok(rpc::run(&owned.queue, call.clone()).await);
                }
                _ => {
                    let subject = rpc::subject(&self.prefix, p);
                    rpc::call(&self.client, subject, &call, wait + Duration::from_secs(5)).await
                }
            };
            match answer {
                Ok(Answer::Moved) | Err(CallError::NoOwner) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Answer::Moved) | Err(CallError::NoOwner) => {
                    return Err(EnqueueError::Unavailable(format!(
                        "no daemon owns this account's partition (p{p}) right now: one is \
                         taking it over (a failover takes about 1.2 x nats.lease_ttl + 1.1 s); try again"
                    )))
                }
                Ok(answer) => return Ok(answer),
                Err(CallError::TooLarge(size, max)) => {
                    return Err(EnqueueError::TooLarge(format!(
                        "this request ({size} bytes) is larger than the NATS servers carry \
                         between daemons (max_payload {max}); send it to the daemon that owns \
                         its account, or raise max_payload in the servers' configuration (see \
                         README, \"When one host is not enough\")"
                    )))
                }
                Err(CallError::Failed(e)) => {
                    return Err(EnqueueError::Unavailable(format!(
                        "cannot reach the daemon that owns this account's partition (p{p}): {e}"
                    )))
                }
            }
        }
    }

    pub async fn enqueue(&self, edit: &Edit) -> Result<Enqueued, EnqueueError> {
        let p = partition_of(&edit.account_id);
        enqueued(
            p,
            self.route(p, Call::Enqueue(edit.clone()), Duration::ZERO)
                .await,
        )
    }

    pub async fn send(&self, send: &Send) -> Result<Enqueued, EnqueueError> {
        let p = partition_of(&send.account_id);
        enqueued(
            p,
            self.route(p, Call::Send(send.clone()), Duration::ZERO)
                .await,
        )
    }

    pub async fn delete(&self, delete: &Delete) -> Result<Deleted, EnqueueError> {
        let p = partition_of(&delete.account_id);
        match self
            .route(p, Call::Delete(delete.clone()), Duration::ZERO)
            .await?
        {
            Answer::Deleted(Ok(mut deleted)) => {
                deleted.job_id = deleted.job_id.map(|id| global_job_id(p, id));
                Ok(deleted)
            }
            Answer::Deleted(Err(e)) => Err(e),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn status(&self, query: &StatusQuery) -> Result<MessageStatus, EnqueueError> {
        let p = partition_of(&query.account_id);
        let wait = query.wait.unwrap_or_default();
        match self.route(p, Call::Status(query.clone()), wait).await? {
            Answer::Status(Ok(mut status)) => {
                status.job_id = status
                    .job_id
                    .and_then(|id| id.parse().ok())
                    .map(|id| global_job_id(p, id).to_string());
                Ok(status)
            }
            Answer::Status(Err(e)) => Err(e),
            other => Err(unexpected(&other)),
        }
    }

    /// Dead letters of every partition, in job-id order, at most `limit`.
    pub async fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, String> {
        let mut all = Vec::new();
        for p in 0..PARTITIONS {
            // Each partition's answer is one NATS message: a thousand letters at most.
            let per_partition = Some(limit.unwrap_or(1000).min(1000));
            match self
                .route(p, Call::DeadList(per_partition), Duration::ZERO)
                .await
            {
                Ok(Answer::Dead(Ok(letters))) => {
                    all.extend(letters.into_iter().map(|mut letter| {
                        let seq: u64 = letter.job_id.parse().unwrap_or(0);
                        letter.job_id = global_job_id(p, seq).to_string();
                        letter
                    }));
                }
                Ok(Answer::Dead(Err(e))) => return Err(format!("partition p{p}: {e}")),
                Ok(other) => return Err(unexpected(&other).to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        all.sort_by_key(|l| l.job_id.parse::<u64>().unwrap_or(0));
        if let Some(limit) = limit {
            all.truncate(limit);
        }
        Ok(all)
    }

    /// Retries (`purge` false) or purges dead letters, in their partitions.
    pub async fn dead_command(
        &self,
        selector: &Selector,
        purge: bool,
    ) -> Result<DeadOutcome, String> {
        let targets: Vec<(u32, Selector)> = match selector {
            Selector::One(job_id) => {
                let (p, seq) = split_job_id(*job_id);
                vec![(p, Selector::One(seq))]
            }
            Selector::All => (0..PARTITIONS).map(|p| (p, Selector::All)).collect(),
        };
        // Every partition is asked, whatever another answered: an error says what was done.
        let mut total = DeadOutcome::default();
        let mut errors = Vec::new();
        for (p, selector) in targets {
            let call = if purge {
                Call::DeadPurge(selector)
            } else {
                Call::DeadRetry(selector)
            };
            match self.route(p, call, Duration::ZERO).await {
                Ok(Answer::DeadOutcome(Ok(outcome))) => {
                    total.affected += outcome.affected;
                    total.superseded += outcome.superseded;
                }
                Ok(Answer::DeadOutcome(Err(e))) => errors.push(format!("partition p{p}: {e}")),
                Ok(other) => errors.push(format!("partition p{p}: {}", unexpected(&other))),
                Err(e) => errors.push(format!("partition p{p}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(total)
        } else {
            Err(format!(
                "{} (done in the other partitions: {} dead letters)",
                errors.join("; "),
                total.affected
            ))
        }
    }

    // The dispatcher's side: only partitions this daemon owns and may send for.

    pub fn head(&self, account: &str) -> crate::queue::Head {
        match self.sending(account) {
            Some(queue) => queue.head(account),
            None => crate::queue::Head::Empty,
        }
    }

    pub fn claim(&self, account: &str) -> Result<crate::queue::Claimed, crate::queue::StoreError> {
        match self.sending(account) {
            Some(queue) => queue.claim(account),
            None => Ok(crate::queue::Claimed::Empty),
        }
    }

    pub fn is_durable(&self, job: &Job) -> bool {
        match (self.queue_of(job), job.marked_batch) {
            (Some(queue), Some(batch)) => queue.is_durable(batch),
            (_, None) => true,
            // Its partition moved: the job is abandoned when it is started.
            (None, Some(_)) => true,
        }
    }

    pub async fn durable(&self, job: &Job) {
        if let (Some(queue), Some(batch)) = (self.queue_of(job), job.marked_batch) {
            queue.durable(batch).await;
        }
    }

    pub fn complete(&self, job: &Job, sent: Option<crate::queue::SentMessage>) -> Commit {
        match self.queue_of(job) {
            Some(queue) => queue.complete(job, sent),
            None => moved(),
        }
    }

    pub fn retry_later(&self, job: &Job, failed: bool) -> (bool, Commit) {
        match self.queue_of(job) {
            Some(queue) => queue.retry_later(job, failed),
            None => (false, moved()),
        }
    }

    pub fn dead_letter(&self, job: &Job, info: crate::queue::DeadInfo) -> Commit {
        match self.queue_of(job) {
            Some(queue) => queue.dead_letter(job, info),
            None => moved(),
        }
    }

    pub fn promote_due(&self, now_ms: u64) {
        for owned in self.all_owned() {
            owned.queue.promote_due(now_ms);
        }
    }

    pub fn next_due_ms(&self) -> Option<u64> {
        self.all_owned()
            .iter()
            .filter_map(|o| o.queue.next_due_ms())
            .min()
    }

    pub async fn committed(&self) {
        self.committed.notified().await
    }

    pub async fn timer_changed(&self) {
        self.timer_changed.notified().await
    }

    pub fn expire_refs(&self) -> usize {
        self.all_owned().iter().map(|o| o.queue.expire_refs()).sum()
    }

    /// The `n` accounts of this daemon's partitions with the largest ready backlogs.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .all_owned()
            .iter()
            .flat_map(|o| o.queue.top_accounts(n))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

fn enqueued(p: u32, answer: Result<Answer, EnqueueError>) -> Result<Enqueued, EnqueueError> {
    match answer? {
        Answer::Enqueued(Ok(mut done)) => {
            done.job_id = global_job_id(p, done.job_id);
            Ok(done)
        }
        Answer::Enqueued(Err(e)) => Err(e),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(answer: &Answer) -> EnqueueError {
    EnqueueError::Unavailable(format!("unexpected answer from another daemon: {answer:?}"))
}

/// A commit that reports the job's partition moved (its outcome is the new owner's business).
fn moved() -> Commit {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(Err("the job's partition moved to another daemon".into()));
    rx
}
