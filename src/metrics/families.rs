//! The metric families: each one's name, help text, type and buckets, registered once in the
//! daemon's registry by [`Metrics::new`], with the labelled series that exist from the start.
//! Names and help texts are an interface dashboards and alerts depend on; the golden test in
//! `tests.rs` guards them.

use std::sync::Mutex;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::{AccountSeries, Metrics};

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
}
