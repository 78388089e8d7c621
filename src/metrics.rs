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

use std::sync::{Mutex, MutexGuard};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

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
struct AccountSeries {
    pending: IntGaugeVec,
    limit: GaugeVec,
    allowed: GaugeVec,
    delivered: GaugeVec,
}

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

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn float_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let metric = prometheus::Gauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let metric = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric =
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Metrics {
            edits_accepted: counter(
                r,
                "zoomq_edits_accepted_total",
                "Requests acknowledged to producers (durable; sends, edits and deletes), including coalesced ones.",
            ),
            edits_coalesced: counter(
                r,
                "zoomq_edits_coalesced_total",
                "Requests whose content replaced a pending job of the same message.",
            ),
            edits_superseded: counter(
                r,
                "zoomq_edits_superseded_total",
                "Jobs dropped unsent because newer content or a delete of the same message replaced them.",
            ),
            edits_delivered: counter(
                r,
                "zoomq_edits_delivered_total",
                "Edits Zoom accepted (2xx).",
            ),
            edits_dead_lettered: counter_vec(
                r,
                "zoomq_edits_dead_lettered_total",
                "Jobs (sends, edits, deletes) moved to the dead letters, by reason.",
                &["reason"],
            ),
            dead_letters_retried: counter(
                r,
                "zoomq_dead_letters_retried_total",
                "Dead letters put back in the queue by an operator.",
            ),
            requests_accepted: counter_vec(
                r,
                "zoomq_requests_accepted_total",
                "Requests acknowledged to producers (durable), by operation.",
                &["op"],
            ),
            requests_delivered: counter_vec(
                r,
                "zoomq_requests_delivered_total",
                "Zoom calls that succeeded, by operation.",
                &["op"],
            ),
            sends_in_doubt: counter_vec(
                r,
                "zoomq_sends_in_doubt_total",
                "Sends whose outcome was unknown, by what was done: retried or dead.",
                &["action"],
            ),
            sends_cancelled: counter(
                r,
                "zoomq_sends_cancelled_total",
                "Sends cancelled by a delete before they were attempted.",
            ),
            refs_remembered: gauge(
                r,
                "zoomq_refs_remembered",
                "Messages remembered by ref or as deleted (storage.ref_retention).",
            ),
            queue_pending: gauge(r, "zoomq_queue_pending", "Jobs waiting to be sent (with content waiting for a dead letter)."),
            queue_in_flight: gauge(r, "zoomq_queue_in_flight", "Jobs being sent to Zoom."),
            queue_dead: gauge(r, "zoomq_queue_dead", "Jobs in the dead letters."),
            cluster_partitions_owned: gauge(
                r,
                "zoomq_cluster_partitions_owned",
                "Cluster mode: partitions of the accounts this daemon owns (paces and delivers).",
            ),
            cluster_daemons: gauge(
                r,
                "zoomq_cluster_daemons",
                "Cluster mode: daemons of the deployment this one sees alive, itself included.",
            ),
            queue_oldest_pending_age: float_gauge(
                r,
                "zoomq_queue_oldest_pending_age_seconds",
                "Age of the oldest edit not yet delivered (0 when none).",
            ),
            zoom_responses: counter_vec(
                r,
                "zoomq_zoom_responses_total",
                "Answers to edit requests, by HTTP status class or network for none.",
                &["class"],
            ),
            zoom_rate_limited: counter_vec(
                r,
                "zoomq_zoom_rate_limited_total",
                "429 answers to edit requests, by limit type.",
                &["type"],
            ),
            retries: counter(
                r,
                "zoomq_retries_total",
                "Edits scheduled for another attempt after a transient failure.",
            ),
            zoom_request_duration: histogram(
                r,
                "zoomq_zoom_request_duration_seconds",
                "Duration of edit requests to Zoom.",
                LATENCY_BUCKETS.to_vec(),
            ),
            delivery_latency: histogram(
                r,
                "zoomq_delivery_latency_seconds",
                "Time from an edit's acknowledgement to Zoom accepting it.",
                DELIVERY_BUCKETS.to_vec(),
            ),
            ack_latency: histogram(
                r,
                "zoomq_ack_latency_seconds",
                "Time from reading an edit request to acknowledging it.",
                LATENCY_BUCKETS.to_vec(),
            ),
            commit_batch_size: histogram(
                r,
                "zoomq_commit_batch_size",
                "Writes per group commit.",
                vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                    16384.0,
                ],
            ),
            commit_duration: histogram(
                r,
                "zoomq_commit_duration_seconds",
                "Duration of a group commit (write, flush, fsync).",
                LATENCY_BUCKETS.to_vec(),
            ),
            storage_failures: counter(
                r,
                "zoomq_storage_failures_total",
                "Group commits that failed.",
            ),
            storage_size: gauge(
                r,
                "zoomq_storage_size_bytes",
                "Size of the database on disk.",
            ),
            storage_free: gauge(
                r,
                "zoomq_storage_free_bytes",
                "Free space on the database's file system (for unprivileged users).",
            ),
            storage_min_free: gauge(
                r,
                "zoomq_storage_min_free_bytes",
                "storage.min_free_bytes: below this free space new edits are refused.",
            ),
            limiter_rate: float_gauge(
                r,
                "zoomq_limiter_rate_requests_per_second",
                "Sum of the request rates the limiters currently allow over active accounts.",
            ),
            accounts_active: gauge(
                r,
                "zoomq_accounts_active",
                "Accounts with limiter state (recently active).",
            ),
            accounts_paused: gauge(
                r,
                "zoomq_accounts_paused",
                "Accounts paused by a 429 (Retry-After or daily limit).",
            ),
            delivered_rate: float_gauge(
                r,
                "zoomq_delivered_requests_per_second",
                "Edit requests Zoom accepted per second over all accounts, averaged over the last 10 s.",
            ),
            account_series: AccountSeries {
                pending: {
                    let m = IntGaugeVec::new(
                        Opts::new(
                            "zoomq_account_pending",
                            "Edits waiting to be sent, by account. Per-account series cover at most metrics.per_account_series accounts: the largest backlogs, then the highest delivered rates.",
                        ),
                        &["account_id"],
                    )
                    .expect("valid");
                    r.register(Box::new(m.clone())).expect("unique metric");
                    m
                },
                limit: gauge_vec(
                    r,
                    "zoomq_account_limit_requests_per_second",
                    "Zoom's request limit for the account: its plan's, or its [accounts] rate (before delivery.rate_margin). Same accounts as zoomq_account_pending.",
                    &["account_id"],
                ),
                allowed: gauge_vec(
                    r,
                    "zoomq_account_rate_requests_per_second",
                    "Request rate zoomq currently allows itself for the account: its limit times delivery.rate_margin, lower for a while after a 429, 0 while paused. Same accounts as zoomq_account_pending.",
                    &["account_id"],
                ),
                delivered: gauge_vec(
                    r,
                    "zoomq_account_delivered_requests_per_second",
                    "Edit requests of the account Zoom accepted per second, averaged over the last 10 s. Same accounts as zoomq_account_pending.",
                    &["account_id"],
                ),
            },
            account_rows: Mutex::new(Vec::new()),
            token_refreshes: counter(
                r,
                "zoomq_token_refreshes_total",
                "Access tokens obtained from Zoom.",
            ),
            token_failures: counter(
                r,
                "zoomq_token_failures_total",
                "Failed access-token requests.",
            ),
            token_valid: gauge(
                r,
                "zoomq_token_valid",
                "1 while the daemon holds an unexpired access token.",
            ),
            ingest_connections: gauge(r, "zoomq_ingest_connections", "Producer connections open."),
            ingest_connections_total: counter(
                r,
                "zoomq_ingest_connections_total",
                "Producer connections accepted.",
            ),
            ingest_rejected_connections: counter(
                r,
                "zoomq_ingest_rejected_connections_total",
                "Producer connections refused by the peer-credential check.",
            ),
            protocol_errors: counter_vec(
                r,
                "zoomq_protocol_errors_total",
                "Error answers to producers, by error code.",
                &["code"],
            ),
            build_info: {
                let m = IntGaugeVec::new(
                    Opts::new("zoomq_build_info", "Build information; always 1."),
                    &["version"],
                )
                .expect("valid");
                r.register(Box::new(m.clone())).expect("unique metric");
                m
            },
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for class in ["2xx", "4xx", "5xx", "network"] {
            metrics.zoom_responses.with_label_values(&[class]);
        }
        for kind in ["qps", "daily"] {
            metrics.zoom_rate_limited.with_label_values(&[kind]);
        }
        for op in ["send", "edit", "delete"] {
            metrics.requests_accepted.with_label_values(&[op]);
            metrics.requests_delivered.with_label_values(&[op]);
        }
        for action in ["retried", "dead"] {
            metrics.sends_in_doubt.with_label_values(&[action]);
        }
        for reason in ["rejected", "expired", "outcome_unknown"] {
            metrics.edits_dead_lettered.with_label_values(&[reason]);
        }
        for code in crate::protocol::ALL_ERROR_CODES {
            metrics.protocol_errors.with_label_values(&[code.as_str()]);
        }
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(process));
        }
        metrics
    }

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

    fn lock_rows(&self) -> MutexGuard<'_, Vec<AccountRow>> {
        // The rows are replaced whole, so a panic while holding the lock leaves nothing torn.
        self.account_rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The HELP and TYPE lines of every zoomq metric, in exposition order.
    fn schema(exposition: &str) -> String {
        exposition
            .lines()
            .filter(|line| line.starts_with("# HELP zoomq_") || line.starts_with("# TYPE zoomq_"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// Golden test of the exposition: names, types and help texts are an interface that
    /// dashboards and alerts depend on; changing one must be deliberate. Regenerate with
    /// `UPDATE_GOLDEN=1 cargo test --lib metrics`.
    #[test]
    fn exposition_matches_the_golden_file() {
        let golden_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/metrics.txt");
        let metrics = Metrics::new();
        // Labelled families appear only once they have a series.
        metrics.publish_accounts(vec![row("acct-a", 1, 1.0)]);
        let actual = schema(&metrics.encode());
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(golden_path, &actual).unwrap();
        }
        let golden = std::fs::read_to_string(golden_path).unwrap_or_default();
        assert_eq!(
            actual, golden,
            "metrics changed; if intended, run UPDATE_GOLDEN=1 cargo test --lib metrics"
        );
    }

    fn row(account_id: &str, pending: u64, delivered: f64) -> AccountRow {
        AccountRow {
            account_id: account_id.into(),
            pending,
            limit: 20.0,
            allowed: 19.4,
            delivered,
            paused: false,
        }
    }

    /// The sample lines of the per-account families, sorted.
    fn account_samples(metrics: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = metrics
            .encode()
            .lines()
            .filter(|line| line.starts_with("zoomq_account_"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn published_accounts_become_series_and_rows() {
        let metrics = Metrics::new();
        assert!(account_samples(&metrics).is_empty());
        assert!(metrics.account_rows().is_empty());
        let rows = vec![row("acct-a", 12, 19.3), row("acct-b", 0, 2.5)];
        metrics.publish_accounts(rows.clone());
        assert_eq!(metrics.account_rows(), rows);
        assert_eq!(
            account_samples(&metrics),
            [
                r#"zoomq_account_delivered_requests_per_second{account_id="acct-a"} 19.3"#,
                r#"zoomq_account_delivered_requests_per_second{account_id="acct-b"} 2.5"#,
                r#"zoomq_account_limit_requests_per_second{account_id="acct-a"} 20"#,
                r#"zoomq_account_limit_requests_per_second{account_id="acct-b"} 20"#,
                r#"zoomq_account_pending{account_id="acct-a"} 12"#,
                r#"zoomq_account_pending{account_id="acct-b"} 0"#,
                r#"zoomq_account_rate_requests_per_second{account_id="acct-a"} 19.4"#,
                r#"zoomq_account_rate_requests_per_second{account_id="acct-b"} 19.4"#,
            ]
        );
    }

    #[test]
    fn accounts_that_leave_the_top_lose_their_series() {
        let metrics = Metrics::new();
        metrics.publish_accounts(vec![row("acct-a", 5, 1.0), row("acct-b", 3, 1.0)]);
        metrics.publish_accounts(vec![AccountRow {
            allowed: 0.0,
            paused: true,
            ..row("acct-c", 7, 0.0)
        }]);
        let samples = account_samples(&metrics);
        assert_eq!(samples.len(), 4, "{samples:?}");
        assert!(samples
            .iter()
            .all(|line| line.contains(r#"account_id="acct-c""#)));
        assert!(samples.contains(
            &r#"zoomq_account_rate_requests_per_second{account_id="acct-c"} 0"#.to_string()
        ));
        assert!(metrics.account_rows()[0].paused);

        metrics.publish_accounts(Vec::new());
        assert!(account_samples(&metrics).is_empty());
        assert!(metrics.account_rows().is_empty());
    }

    #[test]
    fn account_rows_serialize_for_the_stats_answer() {
        let json = serde_json::to_value(row("acct-a", 12, 19.5)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"account_id": "acct-a", "pending": 12, "limit": 20.0,
                "allowed": 19.4, "delivered": 19.5, "paused": false})
        );
    }

    #[test]
    fn delivered_rate_is_exported() {
        let metrics = Metrics::new();
        metrics.delivered_rate.set(19.5);
        assert!(metrics
            .encode()
            .lines()
            .any(|line| line == "zoomq_delivered_requests_per_second 19.5"));
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let text = Metrics::new().encode();
        for line in text.lines().filter(|l| l.starts_with("# TYPE zoomq_")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            match kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                "histogram" => assert!(
                    name.ends_with("_seconds") || name.ends_with("_size"),
                    "{name}"
                ),
                _ => assert!(!name.ends_with("_total"), "{name}"),
            }
        }
        assert!(text.contains("zoomq_build_info{version=\""));
        // Process metrics come from the prometheus crate's process collector.
        assert!(text.contains("process_resident_memory_bytes"));
    }
}
