//! The dispatcher's once-a-second chores: the summary log line, idle limiter release, refs
//! past their retention, limiter gauges, and the per-account rows of `stats` and of the per-account series.

use std::time::{Duration, Instant, SystemTime};

use super::Dispatcher;
use crate::limiter::AccountView;
use crate::metrics::AccountRow;

impl Dispatcher {
    /// Once a second: limiter gauges, per-account series, idle limiter release.
    pub(super) fn housekeeping(&mut self) {
        if self.last_housekeeping.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_housekeeping = Instant::now();
        if self.delivered_since_log > 0 && self.last_summary.elapsed() >= Duration::from_secs(10) {
            let stats = self.queue.stats();
            tracing::info!(
                delivered = self.delivered_since_log,
                seconds = self.last_summary.elapsed().as_secs(),
                pending = stats.pending,
                in_flight = stats.in_flight,
                dead = stats.dead,
                "delivered edits"
            );
            self.delivered_since_log = 0;
            self.last_summary = Instant::now();
        } else if self.delivered_since_log == 0 {
            self.last_summary = Instant::now();
        }
        self.limiters.release_idle();
        let forgotten = self.queue.expire_refs();
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot messages past storage.ref_retention");
        }
        let snapshot = self.limiters.snapshot(SystemTime::now());
        self.metrics.limiter_rate.set(snapshot.total_rate);
        self.metrics.accounts_paused.set(snapshot.paused as i64);
        self.metrics.accounts_active.set(snapshot.active as i64);
        self.metrics.delivered_rate.set(
            snapshot
                .per_account
                .iter()
                .map(|view| view.delivered)
                .fold(0.0, |sum, rate| sum + rate),
        );
        self.publish_accounts(&snapshot.per_account);
    }

    /// The per-account rows of `stats` and the per-account series: the accounts with the
    /// largest backlogs, then (when fewer have a backlog) the busiest by delivered rate, at most
    /// `metrics.per_account_series`.
    fn publish_accounts(&self, tracked: &[AccountView]) {
        let wanted = self.settings.per_account_series;
        if wanted == 0 {
            self.metrics.publish_accounts(Vec::new());
            return;
        }
        let now_utc = SystemTime::now();
        let mut rows: Vec<AccountRow> = self
            .queue
            .top_accounts(wanted)
            .into_iter()
            .map(|(account, pending)| {
                let view = self.limiters.view_of(&account, now_utc);
                row(view, pending as u64)
            })
            .collect();
        if rows.len() < wanted {
            let mut busiest: Vec<&AccountView> = tracked
                .iter()
                .filter(|view| !rows.iter().any(|row| row.account_id == view.account_id))
                .collect();
            busiest.sort_by(|a, b| b.delivered.total_cmp(&a.delivered));
            let missing = wanted - rows.len();
            rows.extend(
                busiest
                    .into_iter()
                    .take(missing)
                    .map(|view| row(view.clone(), 0)),
            );
        }
        self.metrics.publish_accounts(rows);
    }
}

fn row(view: AccountView, pending: u64) -> AccountRow {
    AccountRow {
        account_id: view.account_id,
        pending,
        limit: view.limit,
        allowed: if view.paused { 0.0 } else { view.rate },
        delivered: view.delivered,
        paused: view.paused,
    }
}
