//! Tests of the metrics: the golden exposition, the per-account series and rows, naming.

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
    assert!(samples
        .contains(&r#"zoomq_account_rate_requests_per_second{account_id="acct-c"} 0"#.to_string()));
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
