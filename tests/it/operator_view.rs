//! What an operator sees of the rate limit: the per-account rows of `stats` and the per-account
//! series on /metrics (limit, allowed and delivered rate), with the default
//! `metrics.per_account_series`, bounded to the largest backlogs.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use zoomq::plan::Plan;
use zoomq::sandbox::SandboxConfig;

use crate::helpers::{edit, sandbox, TestDaemon, Tweaks};

/// A loopback address with a port free a moment ago, for `metrics.listen`.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn scrape(address: &str) -> String {
    reqwest::get(format!("http://{address}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the sample `name{account_id="account"}`, if exported.
fn sample(exposition: &str, name: &str, account: &str) -> Option<f64> {
    let prefix = format!("{name}{{account_id=\"{account}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(|value| value.parse().unwrap())
}

fn row<'a>(stats: &'a Value, account: &str) -> Option<&'a Value> {
    stats["per_account"]
        .as_array()?
        .iter()
        .find(|row| row["account_id"] == account)
}

/// Enqueues `count` edits of distinct messages for `account`.
async fn backlog(daemon: &TestDaemon, account: &str, count: usize) {
    let mut client = daemon.client().await;
    for i in 0..count {
        let answer = client
            .call(&edit(&format!("{account}-{i}"), account, "x"))
            .await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
}

#[tokio::test]
async fn stats_and_metrics_show_limit_allowed_and_delivered_with_the_default_settings() {
    let zoom = sandbox(SandboxConfig::default()).await; // Pro: 20/s
    let address = free_address();
    // Nothing under [metrics] but the address: per_account_series keeps its default.
    let tweaks = Tweaks::default().set("metrics", "listen", &format!("{address:?}"));
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    // About 15 s of work at the Pro limit; look after 12 s, when the 10-s average is all busy.
    backlog(&daemon, "busy-acct", 300).await;
    tokio::time::sleep(Duration::from_secs(12)).await;

    let stats = daemon.stats().await;
    let busy = row(&stats, "busy-acct").unwrap_or_else(|| panic!("no row: {stats}"));
    let limit = busy["limit"].as_f64().unwrap();
    let allowed = busy["allowed"].as_f64().unwrap();
    let delivered = busy["delivered"].as_f64().unwrap();
    assert_eq!(limit, f64::from(Plan::Pro.per_second()), "{busy}");
    assert!(allowed > 0.0 && allowed <= limit, "{busy}");
    assert!(
        delivered >= 0.85 * limit && delivered <= limit,
        "with a backlog, zoomq should use (nearly) all of the limit: {busy}"
    );
    assert!(busy["pending"].as_u64().unwrap() > 0, "{busy}");
    assert_eq!(busy["paused"], false);
    // Fields that were there before stay as they were.
    assert_eq!(stats["accounts"], 1, "{stats}");
    let total = stats["delivered_rate"].as_f64().unwrap();
    assert!((total - delivered).abs() < 0.5, "one busy account: {stats}");

    let exposition = scrape(&address).await;
    for name in [
        "zoomq_account_pending",
        "zoomq_account_limit_requests_per_second",
        "zoomq_account_rate_requests_per_second",
        "zoomq_account_delivered_requests_per_second",
    ] {
        assert!(
            sample(&exposition, name, "busy-acct").is_some(),
            "{name} missing:\n{exposition}"
        );
    }
    assert_eq!(
        sample(
            &exposition,
            "zoomq_account_limit_requests_per_second",
            "busy-acct"
        ),
        Some(limit)
    );
    let scraped = sample(
        &exposition,
        "zoomq_account_delivered_requests_per_second",
        "busy-acct",
    )
    .unwrap();
    assert!(scraped >= 0.85 * limit, "{scraped}");

    // The human rendering of the same answer.
    let output = Command::new(env!("CARGO_BIN_EXE_zoomq"))
        .arg("stats")
        .arg("--socket")
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("QUOTA USED"), "{text}");
    let line = text
        .lines()
        .find(|line| line.starts_with("busy-acct "))
        .unwrap_or_else(|| panic!("no busy-acct row:\n{text}"));
    assert!(line.contains(" 20.0 ") && line.ends_with("  no"), "{line}");
}

#[tokio::test]
async fn per_account_series_are_bounded_to_the_largest_backlogs() {
    let zoom = sandbox(SandboxConfig {
        default_plan: Plan::Free, // 2/s: the backlogs stay for a while
        ..SandboxConfig::default()
    })
    .await;
    let address = free_address();
    let tweaks = Tweaks::default()
        .set("metrics", "listen", &format!("{address:?}"))
        .set("metrics", "per_account_series", "2")
        .set("zoom", "plan", "\"free\"");
    let daemon = TestDaemon::start(&zoom, tweaks).await;
    for (account, count) in [
        ("acct-c", 14),
        ("acct-a", 40),
        ("acct-d", 12),
        ("acct-b", 30),
    ] {
        backlog(&daemon, account, count).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let stats = daemon.stats().await;
    let rows = stats["per_account"].as_array().unwrap();
    let ids: Vec<&str> = rows
        .iter()
        .map(|row| row["account_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["acct-a", "acct-b"], "{stats}");
    assert!(rows[0]["pending"].as_u64() > rows[1]["pending"].as_u64());
    for row in rows {
        assert_eq!(row["limit"], 2.0, "{row}");
    }
    assert_eq!(
        stats["accounts"], 4,
        "the count covers every account: {stats}"
    );

    let exposition = scrape(&address).await;
    let exported: BTreeSet<&str> = exposition
        .lines()
        .filter(|line| line.starts_with("zoomq_account_"))
        .filter_map(|line| line.split('"').nth(1))
        .collect();
    assert_eq!(
        exported,
        BTreeSet::from(["acct-a", "acct-b"]),
        "{exposition}"
    );
}
