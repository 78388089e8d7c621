//! Prometheus metrics: one [`Metrics`] struct of typed metrics, registered once in its own
//! registry and passed as `Arc<Metrics>` to the modules that record them. No globals.
//!
//! Gauges that mirror state owned elsewhere (queue sizes, storage size, limiter state) are set
//! by the owner's `observe` step right before each scrape, not by callbacks, so reading them
//! never takes another module's lock from inside the encoder.
//!
//! The per-account series are the exception to "set one gauge at a time": the dispatcher hands
//! over all of them at once with [`Metrics::publish_accounts`], which replaces them under a lock
//! that the encoder also takes, so a scrape never sees half of one second's accounts.
//!
//! This file holds the struct and the exposition; `families.rs` names, describes and registers
//! every metric (the interface the golden test guards), `accounts.rs` the per-account rows and
//! series.

use std::sync::Mutex;

use prometheus::{
    Encoder, Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder,
};

mod accounts;
mod families;
#[cfg(test)]
mod tests;

pub use accounts::AccountRow;
use accounts::AccountSeries;

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,

    pub edits_accepted: IntCounter,
    pub edits_coalesced: IntCounter,
    pub edits_superseded: IntCounter,
    pub edits_delivered: IntCounter,
    /// By `reason`: `rejected` (Zoom refused the edit) or `expired` (failing past max_age).
    pub edits_dead_lettered: IntCounterVec,
    pub dead_letters_retried: IntCounter,
    /// Requests acknowledged to producers by `op`: send, edit, delete.
    pub requests_accepted: IntCounterVec,
    /// Zoom calls that succeeded by `op`: send, edit, delete (a delete of a message already
    /// gone counts).
    pub requests_delivered: IntCounterVec,
    /// Sends whose outcome was unknown, by `action`: `retried` (sent again, a duplicate is
    /// possible) or `dead` (kept as a dead letter, `delivery.send_in_doubt = "dead"`).
    pub sends_in_doubt: IntCounterVec,
    /// Deletes that cancelled a send never attempted (Zoom saw nothing).
    pub sends_cancelled: IntCounter,
    /// Messages remembered by ref or as deleted (see storage.ref_retention).
    pub refs_remembered: IntGauge,

    pub queue_pending: IntGauge,
    pub queue_in_flight: IntGauge,
    pub queue_dead: IntGauge,
    /// Cluster mode: partitions this daemon owns, and daemons it sees (0 in the embedded mode).
    pub cluster_partitions_owned: IntGauge,
    pub cluster_daemons: IntGauge,
    pub queue_oldest_pending_age: prometheus::Gauge,

    /// Zoom answers to edit requests by `class`: 2xx, 4xx, 5xx, or `network` (no answer).
    pub zoom_responses: IntCounterVec,
    /// 429 answers by `type`: `qps`, `daily`.
    pub zoom_rate_limited: IntCounterVec,
    pub retries: IntCounter,
    pub zoom_request_duration: Histogram,
    pub delivery_latency: Histogram,
    pub ack_latency: Histogram,

    pub commit_batch_size: Histogram,
    pub commit_duration: Histogram,
    pub storage_failures: IntCounter,
    pub storage_size: IntGauge,
    pub storage_free: IntGauge,
    pub storage_min_free: IntGauge,

    /// Sum over active accounts of the request rate the limiter currently allows.
    pub limiter_rate: prometheus::Gauge,
    /// Requests Zoom accepted per second over all accounts, averaged over the last 10 s. Set
    /// by the dispatcher once a second.
    pub delivered_rate: prometheus::Gauge,
    pub accounts_active: IntGauge,
    pub accounts_paused: IntGauge,
    /// Per-account series (see [`AccountRow`]), replaced as a whole by `publish_accounts`.
    account_series: AccountSeries,
    /// The rows last published; its lock also keeps a scrape from seeing a half-replaced set.
    account_rows: Mutex<Vec<AccountRow>>,

    pub token_refreshes: IntCounter,
    pub token_failures: IntCounter,
    pub token_valid: IntGauge,

    pub ingest_connections: IntGauge,
    pub ingest_connections_total: IntCounter,
    pub ingest_rejected_connections: IntCounter,
    /// Error answers to producers by `code`.
    pub protocol_errors: IntCounterVec,

    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        let families = {
            let _consistent_accounts = self.lock_rows();
            self.registry.gather()
        };
        TextEncoder::new()
            .encode(&families, &mut buffer)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
