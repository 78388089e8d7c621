//! Adapting without waste, on one Pro account with a backlog that never runs dry:
//! - `lone429`: the sandbox answers exactly one request with a per-second 429 (another app's
//!   burst); what it costs: the rate around it, how long until the rate is back to 95 % of the
//!   limit, and the capacity lost in the 10 s after it beyond what pacing loses anyway;
//! - `shared`: another app steadily uses 8 of the account's 20 requests a second; the 429 share
//!   and the delivered share of the 12/s left, after the first `--settle` seconds.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, Injected429, InjectedLimit, SandboxConfig};

use crate::measure::{self, secs, share, Counts, Log};
use crate::report::{loadavg, print_targets, series, Target};
use crate::rig::{preload, Rig, ACCOUNT};
use crate::Args;

const SHARED_CAPACITY: u32 = 12;
/// The rate must be back to this share of the limit within `RECOVERY_TARGET` of a lone 429.
const RECOVERED_SHARE: f64 = 0.95;
const RECOVERY_TARGET: Duration = Duration::from_secs(5);
/// Capacity lost to a lone 429 is counted over this long after it.
const LOSS_SPAN: Duration = Duration::from_secs(10);
/// Step of the 1 s windows searched for the recovery.
const RECOVERY_STEP: Duration = Duration::from_millis(50);

pub async fn lone429(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(30.0);
    let before = args.settle.min(seconds / 2.0);
    let limit = Plan::Pro.per_second();
    println!(
        "\n== lone429: Pro account, preloaded backlog, daemon defaults; one per-second 429 injected {before} s into the deliveries; {seconds} s of deliveries"
    );
    let rig = Rig::start(SandboxConfig::default(), |_| {}).await?;
    let preloaded = (f64::from(limit) * (seconds + 10.0)).ceil() as usize;
    preload(&rig.socket, ACCOUNT, "lone", preloaded).await?;
    let first = rig.first_request(ACCOUNT).await?;
    tokio::time::sleep_until((first + secs(before)).into()).await;
    let injected_at = Instant::now();
    rig.sandbox.inject_429(
        ACCOUNT,
        Injected429 {
            limit: InjectedLimit::Qps,
            retry_after: None,
        },
        1,
    );
    tokio::time::sleep_until((first + secs(seconds + 0.05)).into()).await;
    let stats = rig.stats().await?;
    let log = Log::read(&rig.sandbox);
    rig.stop().await?;

    let arrivals = log.arrivals(ACCOUNT);
    let delivered = measure::delivered(arrivals);
    let injected = log.offset(injected_at);
    let t429 = arrivals
        .iter()
        .find(|a| a.status == Some(429) && a.offset >= injected)
        .map(|a| a.offset)
        .ok_or_else(|| anyhow::anyhow!("the injected 429 was never answered"))?;
    let (Some(&first), Some(&last)) = (delivered.first(), delivered.last()) else {
        anyhow::bail!("nothing delivered");
    };
    let limit_f = f64::from(limit);

    // Before the 429: the steady rate pacing alone gives, and what it loses per 10 s.
    let before_from = (first + secs(args.edge)).max(t429.saturating_sub(LOSS_SPAN));
    let steady_before = measure::rate(&delivered, before_from, t429);
    let lost_before = lost_seconds(limit_f, t429 - before_from, steady_before.count)
        * (LOSS_SPAN.as_secs_f64() / (t429 - before_from).as_secs_f64().max(1e-9));
    // After: the same over the 10 s from the 429 (shorter if the run ends first).
    let after_until = (t429 + LOSS_SPAN).min(last);
    let after = measure::rate(&delivered, t429, after_until);
    let lost_after = lost_seconds(limit_f, after_until - t429, after.count);
    let cost = lost_after - lost_before * ((after_until - t429).as_secs_f64() / 10.0);

    // The first 1 s window from the 429 on holding >= 95 % of the limit, and the first holding
    // >= 98 % of the rate before the 429 (which may itself be below 95 %).
    let recovered = recovery(&delivered, t429, last, RECOVERED_SHARE * limit_f);
    let back_to_before = recovery(&delivered, t429, last, 0.98 * steady_before.per_second);

    // Per-second deliveries from 5 s before the 429 to 15 s after.
    let around_from = t429.saturating_sub(Duration::from_secs(5)).max(first);
    let around = measure::per_second(
        &delivered,
        around_from,
        (t429 + Duration::from_secs(15)).min(last),
    );
    let rate_limited = arrivals.iter().filter(|a| a.status == Some(429)).count();

    println!(
        "{:<28} {:>9} {:>9} {:>10} {:>13}",
        "interval", "delivered", "deliv/s", "% of limit", "lost (s cap.)"
    );
    for (name, rate, lost) in [
        ("before the 429 (up to 10 s)", steady_before, lost_before),
        ("10 s from the 429", after, lost_after),
    ] {
        println!(
            "{:<28} {:>9} {:>9.3} {:>9.2}% {:>13.3}",
            name,
            rate.count,
            rate.per_second,
            rate.per_second / limit_f * 100.0,
            lost
        );
    }
    println!(
        "2xx per second from {:.1} s before the 429: {}",
        (t429 - around_from).as_secs_f64(),
        series(&around)
    );
    let text = |d: Option<Duration>| {
        d.map_or("never".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    println!(
        "429 at {:.3} s into the deliveries; rate back to >= {:.0}% of {limit}/s after {}, to >= 98% of the rate before the 429 after {}; 429s in all: {rate_limited}",
        (t429 - first).as_secs_f64(),
        RECOVERED_SHARE * 100.0,
        text(recovered),
        text(back_to_before),
    );
    let targets = vec![
        Target::new(
            format!(
                "rate back to >= {:.0}% of the limit after a lone 429",
                RECOVERED_SHARE * 100.0
            ),
            format!("within {} s", RECOVERY_TARGET.as_secs()),
            text(recovered),
            recovered.is_some_and(|r| r <= RECOVERY_TARGET),
        ),
        Target::new(
            "capacity the 429 cost in the 10 s after it (beyond pacing's own loss)",
            "<= 1 s of capacity",
            format!(
                "{cost:.2} s (lost {lost_after:.2} s after, {lost_before:.2} s per 10 s before)"
            ),
            cost <= 1.0,
        ),
        Target::new(
            "429s besides the injected one",
            "0",
            (rate_limited.saturating_sub(1)).to_string(),
            rate_limited == 1,
        ),
        Target::new(
            "backlog never ran dry",
            "> 0 pending at the end",
            stats["pending"].to_string(),
            stats["pending"].as_u64().unwrap_or(0) > 0,
        ),
    ];
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "lone429", "machine": machine, "loadavg": loadavg(),
        "seconds": seconds, "before_seconds": before, "limit": limit, "preloaded": preloaded,
        "at_seconds": (t429 - first).as_secs_f64(), "before": steady_before, "after": after,
        "lost_before_per_10s": lost_before, "lost_after": lost_after, "cost": cost,
        "recovered_seconds": recovered.map(|r| r.as_secs_f64()),
        "back_to_before_seconds": back_to_before.map(|r| r.as_secs_f64()),
        "per_second_around": around, "around_from_seconds_before": (t429 - around_from).as_secs_f64(),
        "rate_limited_total": rate_limited, "backlog_left": stats["pending"], "targets": targets,
    });
    println!("{line}");
    Ok(())
}

/// How long after `t429` the first 1 s window (searched in steps) starts that holds at least
/// `rate` deliveries, rounded down to whole requests. A count, not the gaps' rate: a window
/// that is half empty must not pass because its other half is busy.
fn recovery(delivered: &[Duration], t429: Duration, last: Duration, rate: f64) -> Option<Duration> {
    let needed = rate.floor().max(1.0) as usize;
    let mut t = t429;
    while t + Duration::from_secs(1) <= last {
        if measure::within(delivered, t, t + Duration::from_secs(1)).len() >= needed {
            return Some(t - t429);
        }
        t += RECOVERY_STEP;
    }
    None
}

/// Seconds of capacity not used: `limit * span - delivered`, over `limit`.
fn lost_seconds(limit: f64, span: Duration, delivered: usize) -> f64 {
    (limit * span.as_secs_f64() - delivered as f64) / limit
}

pub async fn shared(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(60.0);
    // Short smoke runs keep at least half of the run measured.
    let settle = args.settle.min(seconds / 2.0);
    println!(
        "\n== shared: Pro account whose sandbox capacity is {SHARED_CAPACITY}/s (another app uses the rest), preloaded backlog, {seconds} s of deliveries; measured after the first {settle} s"
    );
    let sandbox = SandboxConfig {
        accounts: [(
            ACCOUNT.to_string(),
            AccountSettings {
                capacity_per_second: Some(SHARED_CAPACITY),
                ..AccountSettings::default()
            },
        )]
        .into(),
        ..SandboxConfig::default()
    };
    let rig = Rig::start(sandbox, |_| {}).await?;
    // Enough for the plan's full rate: the daemon must never run dry, whatever it finds.
    let preloaded = (f64::from(Plan::Pro.per_second()) * (seconds + 10.0)).ceil() as usize;
    preload(&rig.socket, ACCOUNT, "shared", preloaded).await?;
    let start = rig.first_request(ACCOUNT).await?;
    // The daemon's own view of its rate, once a second (the gauge is refreshed once a second).
    let mut limiter_rates = Vec::new();
    let end = start + secs(seconds);
    while Instant::now() + Duration::from_secs(1) <= end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter_rates.push(rig.stats().await?["limiter_rate"].as_f64().unwrap_or(0.0));
    }
    tokio::time::sleep_until(end.into()).await;
    let stats = rig.stats().await?;
    let log = Log::read(&rig.sandbox);
    rig.stop().await?;

    let arrivals = log.arrivals(ACCOUNT);
    let (from, until) = (log.offset(start), log.offset(end));
    let settled = from + secs(settle);
    let after = Counts::of(arrivals, settled, until);
    let whole = Counts::of(arrivals, from, until);
    let timeline = Counts::per_second(arrivals, from, until);
    let share_429 = share(after.rate_limited, after.requests);
    let delivered = after.delivered as f64 / (seconds - settle);
    let capacity = f64::from(SHARED_CAPACITY);
    let target_rate = 0.95 * capacity;
    println!(
        "{:<14} {:>9} {:>10} {:>6} {:>7} {:>10} {:>9}",
        "interval", "requests", "delivered", "429", "429 %", "deliv/s", "% capac."
    );
    for (name, w, length) in [
        ("after settle", after, seconds - settle),
        ("whole run", whole, seconds),
    ] {
        println!(
            "{:<14} {:>9} {:>10} {:>6} {:>6.2}% {:>10.2} {:>8.1}%",
            name,
            w.requests,
            w.delivered,
            w.rate_limited,
            share(w.rate_limited, w.requests) * 100.0,
            w.delivered as f64 / length,
            w.delivered as f64 / length / capacity * 100.0,
        );
    }
    // The gauge reads 0 until the dispatcher's first housekeeping pass; leave those out.
    let rates: Vec<f64> = limiter_rates.iter().copied().filter(|r| *r > 0.0).collect();
    let (low, high) = rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
    println!(
        "daemon's allowed rate, sampled each second: min {:.2}, mean {:.2}, max {:.2} req/s",
        if rates.is_empty() { 0.0 } else { low },
        rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        high
    );
    println!(
        "2xx per second:  {}",
        series(timeline.iter().map(|w| w.delivered))
    );
    println!(
        "429s per second: {}",
        series(timeline.iter().map(|w| w.rate_limited))
    );
    let targets = vec![
        Target::new(
            format!("requests answered 429 after the first {settle} s"),
            "< 2%",
            format!(
                "{:.2}% ({} of {})",
                share_429 * 100.0,
                after.rate_limited,
                after.requests
            ),
            share_429 < 0.02,
        ),
        Target::new(
            "delivered rate after settling",
            format!(">= {target_rate:.1}/s (95% of {SHARED_CAPACITY}/s)"),
            format!("{delivered:.2}/s ({:.1}%)", delivered / capacity * 100.0),
            delivered >= target_rate,
        ),
        Target::new(
            "backlog never ran dry",
            "> 0 pending at the end",
            stats["pending"].to_string(),
            stats["pending"].as_u64().unwrap_or(0) > 0,
        ),
    ];
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "shared", "machine": machine, "loadavg": loadavg(), "seconds": seconds,
        "settle_seconds": settle, "capacity_per_second": SHARED_CAPACITY, "preloaded": preloaded,
        "after_settle": after, "whole": whole, "delivered_per_second": delivered,
        "rate_limited_share": share_429, "limiter_rates": limiter_rates,
        "per_second": timeline, "backlog_left": stats["pending"], "targets": targets,
    });
    println!("{line}");
    Ok(())
}
