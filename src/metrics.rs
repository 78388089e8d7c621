//! Prometheus metrics: one [`Metrics`] struct of typed metrics, registered once in its own
//! registry and passed as `Arc<Metrics>` to the modules that record them. No globals.
//!
//! Gauges that mirror state owned elsewhere (queue sizes, storage size, limiter state) are set
//! by the owner's `observe` step right before each scrape, not by callbacks, so reading them
//! never takes another module's lock from inside the encoder.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

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

    pub queue_pending: IntGauge,
    pub queue_in_flight: IntGauge,
    pub queue_dead: IntGauge,
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
    pub accounts_active: IntGauge,
    pub accounts_paused: IntGauge,
    /// Per-account figures, only for the `metrics.per_account_series` largest backlogs.
    pub account_pending: IntGaugeVec,
    pub account_rate: prometheus::GaugeVec,

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
                "Edits acknowledged to producers (durable), including coalesced ones.",
            ),
            edits_coalesced: counter(
                r,
                "zoomq_edits_coalesced_total",
                "Edits merged into a pending edit of the same message.",
            ),
            edits_superseded: counter(
                r,
                "zoomq_edits_superseded_total",
                "Edits dropped unsent because a newer edit of the same message replaced them.",
            ),
            edits_delivered: counter(
                r,
                "zoomq_edits_delivered_total",
                "Edits Zoom accepted (2xx).",
            ),
            edits_dead_lettered: counter_vec(
                r,
                "zoomq_edits_dead_lettered_total",
                "Edits moved to the dead letters, by reason.",
                &["reason"],
            ),
            dead_letters_retried: counter(
                r,
                "zoomq_dead_letters_retried_total",
                "Dead letters put back in the queue by an operator.",
            ),
            queue_pending: gauge(r, "zoomq_queue_pending", "Edits waiting to be sent."),
            queue_in_flight: gauge(r, "zoomq_queue_in_flight", "Edits being sent to Zoom."),
            queue_dead: gauge(r, "zoomq_queue_dead", "Edits in the dead letters."),
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
            account_pending: {
                let m = IntGaugeVec::new(Opts::new("zoomq_account_pending", "Pending edits of the accounts with the largest backlogs (capped by metrics.per_account_series)."), &["account_id"]).expect("valid");
                r.register(Box::new(m.clone())).expect("unique metric");
                m
            },
            account_rate: {
                let m = prometheus::GaugeVec::new(
                    Opts::new(
                        "zoomq_account_rate_requests_per_second",
                        "Allowed request rate of the accounts with the largest backlogs.",
                    ),
                    &["account_id"],
                )
                .expect("valid");
                r.register(Box::new(m.clone())).expect("unique metric");
                m
            },
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
        for reason in ["rejected", "expired"] {
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

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
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
        let actual = schema(&Metrics::new().encode());
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(golden_path, &actual).unwrap();
        }
        let golden = std::fs::read_to_string(golden_path).unwrap_or_default();
        assert_eq!(
            actual, golden,
            "metrics changed; if intended, run UPDATE_GOLDEN=1 cargo test --lib metrics"
        );
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
