//! The dispatcher's reactions to Zoom: each [`Outcome`] becomes a queue transition (complete,
//! retry later, dead letter, or put back) and feedback to the account's limiter; a missing token
//! holds all sending.

use std::time::{Duration, Instant, SystemTime};

use super::{Dispatcher, Finished, NO_TOKEN_PAUSE_MAX, NO_TOKEN_PAUSE_MIN};
use crate::limiter::LimitKind;
use crate::queue::{self, now_ms, DeadInfo, Job};
use crate::zoom::Outcome;

impl Dispatcher {
    /// Turns an outcome into a queue transition and limiter feedback.
    pub(super) fn handle(
        &mut self,
        Finished {
            mut job,
            granted,
            outcome,
        }: Finished,
    ) {
        let account = job.header.account_id.clone();
        let now = now_ms();
        match outcome {
            Outcome::Delivered { .. } => {
                self.no_token_pause = NO_TOKEN_PAUSE_MIN;
                self.limiters.on_success(&account);
                self.metrics.edits_delivered.inc();
                self.delivered_since_log += 1;
                self.metrics
                    .delivery_latency
                    .observe(now.saturating_sub(job.updated_ms) as f64 / 1000.0);
                tracing::debug!(job_id = job.seq, message_id = %job.header.message_id, account = %account, "delivered");
                self.finish(self.queue.complete(&job));
            }
            Outcome::RateLimited {
                kind, retry_after, ..
            } => {
                let (kind, label) = match kind {
                    crate::zoom::LimitKind::Qps => (LimitKind::Qps, "qps"),
                    crate::zoom::LimitKind::Daily => (LimitKind::Daily, "daily"),
                };
                self.metrics
                    .zoom_rate_limited
                    .with_label_values(&[label])
                    .inc();
                self.limiters.on_rate_limited(
                    &account,
                    kind,
                    retry_after,
                    Some(granted),
                    SystemTime::now(),
                );
                tracing::info!(job_id = job.seq, message_id = %job.header.message_id, account = %account,
                    kind = label, retry_after = ?retry_after, "rate limited by Zoom; account slowed down");
                // Not a failed attempt: the edit goes back to its place in line.
                self.put_back(&job);
            }
            Outcome::NoToken { detail } => {
                // Not the edit's fault: hold all sending and try again later.
                tracing::debug!(job_id = job.seq, "no access token for this edit");
                self.hold_for_token(&detail);
                self.put_back(&job);
            }
            Outcome::Transient { status, detail } => {
                let first_failure = *job.header.first_failure_ms.get_or_insert(now);
                job.header.attempts += 1;
                let failing_for = Duration::from_millis(now.saturating_sub(first_failure));
                if failing_for >= self.settings.max_age {
                    tracing::warn!(job_id = job.seq, message_id = %job.header.message_id, account = %account,
                        attempts = job.header.attempts, status = ?status, %detail,
                        "edit failing longer than delivery.max_age; moved to the dead letters");
                    let info = DeadInfo {
                        reason: "expired",
                        status,
                        zoom_code: None,
                        detail: format!(
                            "failing for {} s ({} attempts); last error: {detail}",
                            failing_for.as_secs(),
                            job.header.attempts
                        ),
                    };
                    self.finish(self.queue.dead_letter(&job, info));
                    return;
                }
                let delay = self.settings.retry.delay(job.header.attempts);
                job.header.next_attempt_ms = now + delay.as_millis() as u64;
                tracing::warn!(job_id = job.seq, message_id = %job.header.message_id, account = %account,
                    attempts = job.header.attempts, status = ?status, %detail,
                    retry_in_s = delay.as_secs_f64(), "transient failure; will retry");
                self.metrics.retries.inc();
                let (superseded, commit) = self.queue.retry_later(&job, true);
                if superseded {
                    tracing::debug!(job_id = job.seq, "superseded by a newer edit; dropped");
                }
                self.finish(commit);
            }
            Outcome::Rejected {
                status,
                code,
                message,
            } => {
                tracing::warn!(job_id = job.seq, message_id = %job.header.message_id, account = %account,
                    status, zoom_code = ?code, zoom_message = %message,
                    "Zoom rejected the edit; moved to the dead letters");
                let info = DeadInfo {
                    reason: "rejected",
                    status: Some(status),
                    zoom_code: code,
                    detail: message,
                };
                self.finish(self.queue.dead_letter(&job, info));
            }
        }
    }

    /// Holds all sending after the token could not be obtained, for longer each time. Several
    /// requests failing for want of the same token escalate the hold only once.
    pub(super) fn hold_for_token(&mut self, detail: &str) {
        if self
            .no_token_until
            .is_some_and(|until| until > Instant::now())
        {
            return;
        }
        let pause = self.no_token_pause;
        self.no_token_until = Some(Instant::now() + pause);
        self.no_token_pause = (pause * 2).min(NO_TOKEN_PAUSE_MAX);
        tracing::warn!(%detail, pause_s = pause.as_secs_f64(), "no access token; holding deliveries");
    }

    /// Returns a claimed job to its place in line without counting an attempt.
    pub(super) fn put_back(&self, job: &Job) {
        let mut job = job.clone();
        job.header.next_attempt_ms = 0;
        let (_, commit) = self.queue.retry_later(&job, false);
        self.finish(commit);
    }

    /// Logs a commit failure in the background; the queue keeps and retries the writes.
    fn finish(&self, commit: queue::Commit) {
        tokio::spawn(async move {
            if let Err(e) = queue::wait(commit).await {
                tracing::debug!(error = %e, "queue transition not yet durable");
            }
        });
    }
}
