//! `isolation`: two Pro accounts drain their backlogs through one daemon. A quarter into the
//! run one of them (the paused account) gets a per-second 429 with `Retry-After: 5`; halfway it
//! reaches a daily cap, so Zoom answers `Daily-limit` with a Retry-After at the next 00:00 UTC.
//! The other (steady) account must not slow down at any point, and the paused one must send
//! nothing while it is told to wait.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, Injected429, InjectedLimit, SandboxConfig};

use crate::measure::{self, secs, Log, Rate};
use crate::report::{loadavg, print_targets, series, Target};
use crate::rig::{preload, Rig};
use crate::Args;

const PAUSED: &str = "iso-paused";
const STEADY: &str = "iso-steady";
/// What the steady account must keep during the other's pauses, as a share of its rate before.
const KEPT_SHARE: f64 = 0.98;
/// Requests already on their way when a 429 is answered may still arrive this long after it.
const GRACE: Duration = Duration::from_millis(200);

pub async fn isolation(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(40.0);
    let (retry_at, daily_at) = (seconds * 0.25, seconds * 0.5);
    let retry_after = Duration::from_secs_f64((daily_at - retry_at - 1.0).clamp(1.0, 5.0).floor());
    let limit = f64::from(Plan::Pro.per_second());
    println!(
        "\n== isolation: two Pro accounts, preloaded backlogs, one daemon; {PAUSED} gets a 429 with Retry-After: {} at {retry_at} s and a Daily-limit 429 at {daily_at} s; {seconds} s of deliveries",
        retry_after.as_secs()
    );
    let rig = Rig::start(SandboxConfig::default(), |_| {}).await?;
    let preloaded = (limit * (seconds + 10.0)).ceil() as usize;
    let (a, b) = tokio::join!(
        preload(&rig.socket, PAUSED, "paused", preloaded),
        preload(&rig.socket, STEADY, "steady", preloaded),
    );
    a?;
    b?;
    let start = rig.first_request(STEADY).await?;
    rig.first_request(PAUSED).await?;

    tokio::time::sleep_until((start + secs(retry_at)).into()).await;
    let retry_injected = Instant::now();
    rig.sandbox.inject_429(
        PAUSED,
        Injected429 {
            limit: InjectedLimit::Qps,
            retry_after: Some(retry_after),
        },
        1,
    );
    tokio::time::sleep_until((start + secs(daily_at)).into()).await;
    // The cap becomes what the account has used today: every further request is refused.
    let used = rig.account(PAUSED)?.daily_used;
    let daily_set = Instant::now();
    rig.sandbox.set_account(
        PAUSED,
        AccountSettings {
            daily_limit: Some(used),
            ..AccountSettings::default()
        },
    );
    tokio::time::sleep_until((start + secs(seconds + 0.05)).into()).await;
    let log = Log::read(&rig.sandbox);
    rig.stop().await?;

    let paused = log.arrivals(PAUSED);
    let first_429_after = |at: Duration| {
        paused
            .iter()
            .find(|a| a.status == Some(429) && a.offset >= at)
            .map(|a| a.offset)
    };
    let t_retry = first_429_after(log.offset(retry_injected))
        .ok_or_else(|| anyhow::anyhow!("the Retry-After 429 was never answered"))?;
    let t_daily = first_429_after(log.offset(daily_set))
        .ok_or_else(|| anyhow::anyhow!("the Daily-limit 429 was never answered"))?;
    let retry_end = t_retry + retry_after;
    let paused_offsets = measure::offsets(paused);
    // Retry-After is at least a second, so this interval is never empty.
    let sent_while_told_to_wait =
        measure::within(&paused_offsets, t_retry + GRACE, retry_end - GRACE).len();
    let resumed = measure::within(&paused_offsets, retry_end - GRACE, t_daily)
        .first()
        .map(|t| *t - t_retry);
    let end = log.offset(start) + secs(seconds);
    let sent_after_daily = measure::within(&paused_offsets, t_daily + GRACE, end).len();

    let steady = log.delivered(STEADY);
    let edge = secs(args.edge);
    let phases: [(&str, Duration, Duration); 4] = [
        ("before", log.offset(start) + edge, t_retry),
        ("Retry-After pause", t_retry, retry_end),
        ("between", retry_end, t_daily),
        ("daily pause", t_daily, end - edge),
    ];
    let rates: Vec<Rate> = phases
        .iter()
        .map(|(_, from, until)| measure::rate(&steady, *from, *until))
        .collect();
    let steady_429 = log
        .arrivals(STEADY)
        .iter()
        .filter(|a| a.status == Some(429))
        .count();
    let paused_delivered = log.delivered(PAUSED);

    println!(
        "{:<20} {:>8} {:>8} {:>10} {:>10} {:>12}",
        "phase", "from s", "until s", "steady /s", "% before", "paused reqs"
    );
    let origin = log.offset(start);
    for ((name, from, until), rate) in phases.iter().zip(&rates) {
        println!(
            "{:<20} {:>8.2} {:>8.2} {:>10.3} {:>9.2}% {:>12}",
            name,
            (*from - origin).as_secs_f64(),
            (*until - origin).as_secs_f64(),
            rate.per_second,
            rate.per_second / rates[0].per_second.max(1e-9) * 100.0,
            measure::within(&paused_offsets, *from, *until).len()
        );
    }
    println!(
        "(paused reqs: requests of {PAUSED} in the phase, the 429 that starts a pause included)"
    );
    println!(
        "steady 2xx per second: {}",
        series(measure::per_second(&steady, origin, end))
    );
    println!(
        "paused 2xx per second: {}",
        series(measure::per_second(&paused_delivered, origin, end))
    );
    let mut targets = Vec::new();
    for ((name, _, _), rate) in phases.iter().zip(&rates).skip(1) {
        let kept = rate.per_second / rates[0].per_second.max(1e-9);
        targets.push(Target::new(
            format!("{STEADY} during the other account's {name}, against before"),
            format!(">= {:.0}%", KEPT_SHARE * 100.0),
            format!(
                "{:.2}% ({:.3}/s against {:.3}/s; {:.1}% of the limit)",
                kept * 100.0,
                rate.per_second,
                rates[0].per_second,
                rate.per_second / limit * 100.0
            ),
            kept >= KEPT_SHARE,
        ));
    }
    targets.push(Target::new(
        format!("{STEADY}: requests answered 429"),
        "0",
        steady_429.to_string(),
        steady_429 == 0,
    ));
    targets.push(Target::new(
        format!("{PAUSED}: requests sent while Retry-After said wait"),
        "0",
        sent_while_told_to_wait.to_string(),
        sent_while_told_to_wait == 0,
    ));
    targets.push(Target::new(
        format!(
            "{PAUSED}: first request after the 429 with Retry-After: {}",
            retry_after.as_secs()
        ),
        format!(
            "{} to {} s after it",
            retry_after.as_secs(),
            retry_after.as_secs() + 1
        ),
        resumed.map_or("never".to_string(), |r| format!("{:.2} s", r.as_secs_f64())),
        resumed
            .is_some_and(|r| r >= retry_after - GRACE && r <= retry_after + Duration::from_secs(1)),
    ));
    targets.push(Target::new(
        format!("{PAUSED}: requests sent after the Daily-limit 429"),
        "0",
        sent_after_daily.to_string(),
        sent_after_daily == 0,
    ));
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "isolation", "machine": machine, "loadavg": loadavg(),
        "seconds": seconds, "retry_after_seconds": retry_after.as_secs(),
        "retry_429_at": (t_retry - origin).as_secs_f64(), "daily_429_at": (t_daily - origin).as_secs_f64(),
        "phases": phases.iter().zip(&rates).map(|((name, from, until), rate)| json!({
            "phase": name, "from": (*from - origin).as_secs_f64(), "until": (*until - origin).as_secs_f64(),
            "steady": rate, "paused_requests": measure::within(&paused_offsets, *from, *until).len(),
        })).collect::<Vec<_>>(),
        "paused_resumed_after": resumed.map(|r| r.as_secs_f64()),
        "paused_sent_while_waiting": sent_while_told_to_wait, "paused_sent_after_daily": sent_after_daily,
        "steady_rate_limited": steady_429, "targets": targets,
    });
    println!("{line}");
    Ok(())
}
