//! The dispatcher's reactions to Zoom: each [`Outcome`] becomes a queue transition (complete,
//! retry later, dead letter, or put back) and feedback to the account's limiter; a missing token
//! holds all sending.

use std::time::{Duration, Instant, SystemTime};

use super::{Dispatcher, Finished, NO_TOKEN_PAUSE_MAX, NO_TOKEN_PAUSE_MIN};
use crate::config::SendInDoubt;
use crate::limiter::LimitKind;
use crate::queue::{self, now_ms, Call, DeadInfo, Job, SentMessage};
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
        let op = op_name(&job.call);
        match outcome {
            Outcome::Delivered { sent, .. } => {
                self.delivered(&job);
                let sent = sent.map(|sent| SentMessage {
                    message_id: sent.message_id,
                    sent_time: sent.sent_time,
                });
                tracing::debug!(job_id = job.seq, message = %queue::describe(&job.header.message_id),
                    account = %account, op, "delivered");
                self.finish(self.queue.complete(&job, sent));
            }
            Outcome::Rejected {
                status: 404,
                code: Some(8001),
                ..
            } if matches!(job.call, Call::Delete { .. }) => {
                // Already gone: what the delete wanted.
                self.delivered(&job);
                tracing::debug!(job_id = job.seq, account = %account, "deleted (it was already gone)");
                self.finish(self.queue.complete(&job, None));
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
                tracing::info!(job_id = job.seq, message = %queue::describe(&job.header.message_id), account = %account,
                    op, kind = label, retry_after = ?retry_after, "rate limited by Zoom; account slowed down");
                // Not a failed attempt: the job goes back to its place in line.
                self.put_back(&job);
            }
            Outcome::NoToken { detail } => {
                // Not the job's fault: hold all sending and try again later.
                tracing::debug!(job_id = job.seq, "no access token for this request");
                self.hold_for_token(&detail);
                self.put_back(&job);
            }
            Outcome::Transient {
                status,
                detail,
                in_doubt,
            } => {
                let is_send = matches!(job.call, Call::Send { .. });
                if is_send && in_doubt {
                    job.outcome_unknown = true;
                    // With "retry" it is counted when it is claimed again (as after a restart).
                    if self.settings.send_in_doubt == SendInDoubt::Dead {
                        self.send_in_doubt(&job, &detail);
                        return;
                    }
                }
                let first_failure = *job.header.first_failure_ms.get_or_insert(now);
                job.header.attempts += 1;
                let failing_for = Duration::from_millis(now.saturating_sub(first_failure));
                if failing_for >= self.settings.max_age {
                    tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id), account = %account,
                        op, attempts = job.header.attempts, status = ?status, %detail,
                        "failing longer than delivery.max_age; moved to the dead letters");
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
                if is_send && in_doubt {
                    tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id), account = %account,
                        status = ?status, %detail, retry_in_s = delay.as_secs_f64(),
                        "send outcome unknown: Zoom may have posted it; sending again (delivery.send_in_doubt = \"retry\"), which may post it twice");
                } else {
                    tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id), account = %account,
                        op, attempts = job.header.attempts, status = ?status, %detail,
                        retry_in_s = delay.as_secs_f64(), "transient failure; will retry");
                }
                self.metrics.retries.inc();
                let (superseded, commit) = self.queue.retry_later(&job, true);
                if superseded {
                    tracing::debug!(job_id = job.seq, "superseded by a newer job; dropped");
                }
                self.finish(commit);
            }
            Outcome::Rejected {
                status,
                code,
                message,
            } => {
                tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id), account = %account,
                    op, status, zoom_code = ?code, zoom_message = %message,
                    "Zoom rejected the request; moved to the dead letters");
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

    /// Counts a successful call.
    fn delivered(&mut self, job: &Job) {
        self.no_token_pause = NO_TOKEN_PAUSE_MIN;
        self.limiters.on_success(&job.header.account_id);
        if matches!(job.call, Call::Edit { .. }) {
            self.metrics.edits_delivered.inc();
        }
        self.metrics
            .requests_delivered
            .with_label_values(&[op_name(&job.call)])
            .inc();
        self.delivered_since_log += 1;
        self.metrics
            .delivery_latency
            .observe(now_ms().saturating_sub(job.updated_ms) as f64 / 1000.0);
    }

    /// A send that may already have posted its message, about to be sent (again): with
    /// `delivery.send_in_doubt = "dead"` it goes to the dead letters instead (its ref held
    /// with it) and this returns true; with `"retry"` it is counted, and is to be sent.
    pub(super) fn send_in_doubt(&mut self, job: &Job, detail: &str) -> bool {
        if self.settings.send_in_doubt == SendInDoubt::Dead {
            self.metrics
                .sends_in_doubt
                .with_label_values(&["dead"])
                .inc();
            tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id),
                account = %job.header.account_id, %detail,
                "send outcome unknown; kept as a dead letter (delivery.send_in_doubt = \"dead\"): check Zoom, then retry or purge it");
            let info = DeadInfo {
                reason: "outcome_unknown",
                status: None,
                zoom_code: None,
                detail: format!("Zoom may or may not have posted the message: {detail}"),
            };
            self.finish(self.queue.dead_letter(job, info));
            true
        } else {
            self.metrics
                .sends_in_doubt
                .with_label_values(&["retried"])
                .inc();
            tracing::warn!(job_id = job.seq, message = %queue::describe(&job.header.message_id),
                account = %job.header.account_id, %detail,
                "sending again a message whose earlier send may have been posted (delivery.send_in_doubt = \"retry\")");
            false
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

/// The metric label of a call.
fn op_name(call: &Call) -> &'static str {
    match call {
        Call::Send { .. } => "send",
        Call::Edit { .. } => "edit",
        Call::Delete { .. } => "delete",
    }
}
