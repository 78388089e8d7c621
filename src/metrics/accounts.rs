//! The per-account rows and series: the top accounts the dispatcher hands over once a second,
//! replaced as a whole under the lock the exposition also takes, so a scrape never sees half of
//! one second's accounts.

use std::sync::MutexGuard;

use prometheus::{GaugeVec, IntGaugeVec};

use super::Metrics;

/// One account's row in `stats` and in the per-account series (the top
/// `metrics.per_account_series` accounts by backlog, then by delivered rate).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AccountRow {
    pub account_id: String,
    pub pending: u64,
    /// The account's limit in requests per second (plan or `rate` override), before any margin.
    pub limit: f64,
    /// The rate zoomq currently allows itself (after margin and any 429 slow-down); 0 while
    /// paused.
    pub allowed: f64,
    /// Requests Zoom accepted per second, averaged over the last 10 s.
    pub delivered: f64,
    pub paused: bool,
}

/// The per-account series, written only by [`Metrics::publish_accounts`].
pub(super) struct AccountSeries {
    pub(super) pending: IntGaugeVec,
    pub(super) limit: GaugeVec,
    pub(super) allowed: GaugeVec,
    pub(super) delivered: GaugeVec,
}

impl Metrics {
    /// Called by the dispatcher once a second: replaces the per-account series and the rows
    /// `stats` shows. Accounts not in `rows` lose their series (they go stale in Prometheus),
    /// so the number of series stays bounded by the number of rows.
    pub fn publish_accounts(&self, rows: Vec<AccountRow>) {
        let mut published = self.lock_rows();
        let series = &self.account_series;
        series.pending.reset();
        series.limit.reset();
        series.allowed.reset();
        series.delivered.reset();
        for row in &rows {
            let labels = [row.account_id.as_str()];
            series
                .pending
                .with_label_values(&labels)
                .set(i64::try_from(row.pending).unwrap_or(i64::MAX));
            series.limit.with_label_values(&labels).set(row.limit);
            series.allowed.with_label_values(&labels).set(row.allowed);
            series
                .delivered
                .with_label_values(&labels)
                .set(row.delivered);
        }
        *published = rows;
    }

    /// The rows last published (for the `stats` answer).
    pub fn account_rows(&self) -> Vec<AccountRow> {
        self.lock_rows().clone()
    }

    pub(super) fn lock_rows(&self) -> MutexGuard<'_, Vec<AccountRow>> {
        // The rows are replaced whole, so a panic while holding the lock leaves nothing torn.
        self.account_rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
