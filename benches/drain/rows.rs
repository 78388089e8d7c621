//! `drain`: a backlog of distinct messages on one account, per plan at the daemon's defaults
//! (free 2/s, pro 20/s, business 60/s) and for a business account with a per-account `rate`
//! override that Zoom also holds it to. The delivered rate is measured over the steady part of
//! the deliveries (the first and last `--edge` seconds left out), and the backlog is large
//! enough never to run dry before the end.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use zoomq::config::AccountConfig;
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, SandboxConfig};

use crate::measure::{self, ms, secs, Gaps, Log, Rate, WindowMax};
use crate::report::{loadavg, print_targets, series, Target};
use crate::rig::{self, preload, Rig, ACCOUNT};
use crate::Args;

/// The share of the limit a steady backlog must be delivered at.
const TARGET_SHARE: f64 = 0.99;
/// The per-account override row: `[accounts."<id>"] rate = 37`, and the sandbox lets the
/// account use only that many requests a second of its plan's 60.
const OVERRIDE_RATE: u32 = 37;

/// One row: a plan and maybe a per-account rate override.
#[derive(Debug, Clone, Copy)]
struct Spec {
    plan: Plan,
    rate: Option<u32>,
}

impl Spec {
    fn name(&self) -> String {
        match self.rate {
            Some(rate) => format!("{} rate={rate}", self.plan),
            None => self.plan.to_string(),
        }
    }

    fn limit(&self) -> u32 {
        self.rate.unwrap_or(self.plan.per_second())
    }
}

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    plan: Plan,
    limit: u32,
    preloaded: usize,
    /// From the first to the last delivery of the run.
    run_seconds: f64,
    /// The steady part, as offsets from the sandbox's start.
    steady_from_s: f64,
    steady_until_s: f64,
    /// Deliveries (2xx) in the steady part.
    delivered: Rate,
    share_of_limit: f64,
    /// Over the whole run.
    requests_total: usize,
    rate_limited_total: usize,
    windows: WindowMax,
    /// Spacing of requests at the sandbox in the steady part; nominal `1000 / limit`.
    gap_nominal_ms: f64,
    gaps: Gaps,
    /// The first five gaps of the run, in ms: how the account starts.
    first_gaps_ms: Vec<f64>,
    /// 2xx per second from the first delivery.
    per_second: Vec<usize>,
    /// Edits still pending when the run ended: must be > 0, or the daemon ran dry.
    backlog_left: u64,
}

pub async fn drain(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(60.0);
    let edge = args.edge;
    let specs = [
        Spec {
            plan: Plan::Free,
            rate: None,
        },
        Spec {
            plan: Plan::Pro,
            rate: None,
        },
        Spec {
            plan: Plan::Business,
            rate: None,
        },
        Spec {
            plan: Plan::Business,
            rate: Some(OVERRIDE_RATE),
        },
    ];
    println!(
        "\n== drain: preloaded backlog of distinct messages, one account, daemon defaults; {seconds} s measured between the first and last {edge} s of deliveries; rows {}",
        if args.serial { "one after another" } else { "at once (a sandbox and a daemon each)" }
    );
    let rows = rig::rows(&specs, args.serial, |spec| row(spec, seconds, edge)).await?;

    println!(
        "{:<17} {:>5} {:>8} {:>7} {:>8} {:>6} {:>5} {:>20} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7}",
        "row",
        "limit",
        "deliv/s",
        "% limit",
        "count/s",
        "reqs",
        "429",
        "fixed/wall/phase/sl",
        "gap nom",
        "gap mean",
        "gap min",
        "gap p99",
        "gap max",
        "backlog"
    );
    let mut targets = Vec::new();
    for r in &rows {
        let w = r.windows;
        println!(
            "{:<17} {:>5} {:>8.3} {:>6.2}% {:>8.3} {:>6} {:>5} {:>20} {:>7.2} {:>8.2} {:>7.2} {:>7.2} {:>7.2} {:>7}",
            r.name,
            r.limit,
            r.delivered.per_second,
            r.share_of_limit * 100.0,
            r.delivered.count_per_second,
            r.requests_total,
            r.rate_limited_total,
            format!("{}/{}/{}/{}", w.sandbox_fixed, w.wall_fixed, w.any_phase_fixed, w.sliding),
            r.gap_nominal_ms,
            r.gaps.mean_ms,
            r.gaps.min_ms,
            r.gaps.p99_ms,
            r.gaps.max_ms,
            r.backlog_left,
        );
        targets.push(Target::new(
            format!("{}: delivered / limit over the steady part", r.name),
            format!(">= {:.0}%", TARGET_SHARE * 100.0),
            format!(
                "{:.2}% ({:.3}/s of {}/s, {} deliveries in {:.1} s)",
                r.share_of_limit * 100.0,
                r.delivered.per_second,
                r.limit,
                r.delivered.count,
                r.steady_until_s - r.steady_from_s
            ),
            r.share_of_limit >= TARGET_SHARE,
        ));
        targets.push(Target::new(
            format!("{}: requests answered 429", r.name),
            "0",
            format!("{} of {}", r.rate_limited_total, r.requests_total),
            r.rate_limited_total == 0,
        ));
        targets.push(Target::new(
            format!(
                "{}: most requests in a 1 s window (sandbox-fixed / wall-clock / any phase / sliding)",
                r.name
            ),
            format!("<= {}", r.limit),
            format!(
                "{} / {} / {} / {} (worst sliding window from {:.2} s after the first request)",
                w.sandbox_fixed, w.wall_fixed, w.any_phase_fixed, w.sliding, w.sliding_worst_at_s
            ),
            w.worst() <= r.limit,
        ));
        targets.push(Target::new(
            format!("{}: backlog never ran dry", r.name),
            "> 0 pending at the end",
            r.backlog_left.to_string(),
            r.backlog_left > 0,
        ));
    }
    for r in &rows {
        println!(
            "{}: first gaps {} ms",
            r.name,
            series(r.first_gaps_ms.iter().map(|g| format!("{g:.1}")))
        );
    }
    println!(
        "(deliv/s: (n - 1) / (last - first) of the n deliveries in the steady part; count/s: n / steady seconds; reqs, 429 and windows over the whole run; gaps in ms between requests in the steady part)"
    );
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "drain", "machine": machine, "loadavg": loadavg(),
        "seconds": seconds, "edge_seconds": edge, "serial": args.serial, "rows": rows,
        "targets": targets,
    });
    println!("{line}");
    Ok(())
}

async fn row(spec: Spec, seconds: f64, edge: f64) -> anyhow::Result<Row> {
    let limit = spec.limit();
    let mut sandbox = SandboxConfig {
        default_plan: spec.plan,
        ..SandboxConfig::default()
    };
    if let Some(rate) = spec.rate {
        sandbox.accounts.insert(
            ACCOUNT.to_string(),
            AccountSettings {
                capacity_per_second: Some(rate),
                ..AccountSettings::default()
            },
        );
    }
    let rig = Rig::start(sandbox, |config| {
        if let Some(rate) = spec.rate {
            config.accounts.insert(
                ACCOUNT.to_string(),
                AccountConfig {
                    rate: Some(f64::from(rate)),
                    ..AccountConfig::default()
                },
            );
        }
    })
    .await?;
    // Ten seconds more than the run can send at the limit, so the daemon never runs dry.
    let preloaded = (f64::from(limit) * (seconds + 2.0 * edge + 10.0)).ceil() as usize;
    preload(&rig.socket, ACCOUNT, "drain", preloaded).await?;
    let first = rig.first_request(ACCOUNT).await?;
    // A little past the end, so the last edge is whole.
    tokio::time::sleep_until((first + secs(seconds + 2.0 * edge + 0.05)).into()).await;
    let stats = rig.stats().await?;
    let log = Log::read(&rig.sandbox);
    rig.stop().await?;

    let arrivals = log.arrivals(ACCOUNT);
    let all = measure::offsets(arrivals);
    let delivered = measure::delivered(arrivals);
    let (from, until) = measure::steady(&delivered, secs(edge))
        .ok_or_else(|| anyhow::anyhow!("{}: too few deliveries to measure", spec.name()))?;
    let rate = measure::rate(&delivered, from, until);
    let run = match (delivered.first(), delivered.last()) {
        (Some(first), Some(last)) => *last - *first,
        _ => Duration::ZERO,
    };
    Ok(Row {
        name: spec.name(),
        plan: spec.plan,
        limit,
        preloaded,
        run_seconds: run.as_secs_f64(),
        steady_from_s: from.as_secs_f64(),
        steady_until_s: until.as_secs_f64(),
        share_of_limit: rate.per_second / f64::from(limit),
        delivered: rate,
        requests_total: arrivals.len(),
        rate_limited_total: arrivals.iter().filter(|a| a.status == Some(429)).count(),
        windows: WindowMax::of(&all, log.wall_phase),
        gap_nominal_ms: 1000.0 / f64::from(limit),
        gaps: Gaps::of(measure::within(&all, from, until)),
        first_gaps_ms: all.windows(2).take(5).map(|w| ms(w[1] - w[0])).collect(),
        per_second: measure::per_second(&delivered, delivered[0], until + secs(edge)),
        backlog_left: stats["pending"].as_u64().unwrap_or(0),
    })
}
