//! `accounts` and `accounts10k`: many Free accounts (2 requests/s each) with distinct messages
//! queued before delivery starts, delivered by the daemon running as its own process.
//!
//! 1. **Fill**: the sandbox's token endpoint takes an hour, so the daemon sends nothing while
//!    eight producer connections enqueue every edit (account-major order per connection).
//! 2. **Deliver**: SIGKILL the daemon (acknowledged edits are on disk), make tokens instant,
//!    start it again; from its first answered ping it delivers the whole backlog. CPU time
//!    (utime + stime) and memory (VmRSS, VmHWM) are read from `/proc/PID` at that instant and
//!    when nothing is left, so the figures cover recovery and delivery only.
//! 3. **Check**, from the sandbox's log and messages: per-account rate over each account's
//!    steady part (its first and last `--edge` seconds left out), the total rate over the
//!    window all accounts share, 429s, every message's content, how long each account waited.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::load::send_all;
use crate::measure::{self, percentile, secs, Log};
use crate::proc;
use crate::process::{self, Usage};
use crate::report::{loadavg, print_targets, Target};
use crate::rig::{content_seq, edit_line, seq_content};
use crate::Args;

const PRODUCERS: usize = 8;
/// Every account's steady rate must reach this share of 2/s, and the total this share of
/// `accounts * 2/s`.
const ACCOUNT_SHARE: f64 = 0.95;
const TOTAL_SHARE: f64 = 0.97;
/// The daemon's CPU time per delivered request must stay under this.
const CPU_PER_REQUEST_TARGET: Duration = Duration::from_micros(100);

fn account_id(index: usize) -> String {
    format!("free-{index:05}")
}

fn message_id(account: usize, message: usize) -> String {
    format!("free-{account:05}-m{message}")
}

/// Per-account figures.
struct Account {
    first: Duration,
    last: Duration,
    /// Arrival offsets of its deliveries.
    times: Vec<Duration>,
    /// Over the account's steady part; `None` when it is too short to measure.
    steady_rate: Option<f64>,
}

pub async fn accounts(
    args: &Args,
    machine: &Value,
    default_accounts: usize,
    default_messages: usize,
) -> anyhow::Result<()> {
    let n_accounts = args.accounts.unwrap_or(default_accounts).max(1);
    let n_messages = args.messages.unwrap_or(default_messages).max(1);
    let scenario = if default_messages == 1 {
        "accounts10k"
    } else {
        "accounts"
    };
    let total = n_accounts * n_messages;
    let limit = f64::from(Plan::Free.per_second());
    let ideal = total as f64 / (limit * n_accounts as f64);
    println!(
        "\n== {scenario}: {n_accounts} Free accounts x {n_messages} distinct messages = {total} edits queued before delivery ({:.0} requests/s in all, {ideal:.1} s at the limit); daemon in its own process",
        limit * n_accounts as f64
    );

    // 1. Fill, with delivery held by an hour-long token endpoint.
    let credentials = SandboxConfig {
        default_plan: Plan::Free,
        token_delay: Duration::from_secs(3600),
        request_log_capacity: (total * 2).max(200_000),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::start(credentials.clone()).await?;
    let mut daemon = process::daemon(&sandbox, &credentials, Plan::Free)?;
    daemon.start().await?;
    let fill_started = Instant::now();
    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let socket = daemon.socket.clone();
        producers.push(tokio::spawn(async move {
            let lines = (producer..n_accounts)
                .step_by(PRODUCERS)
                .flat_map(|a| (0..n_messages).map(move |m| (a, m)))
                .map(|(a, m)| {
                    let id = message_id(a, m);
                    edit_line(&account_id(a), &id, &seq_content(&id, m as u64))
                });
            send_all(&socket, lines).await
        }));
    }
    for producer in producers {
        producer.await??;
    }
    let fill = fill_started.elapsed();
    let stats = daemon.stats().await?;
    let queued = stats["pending"].as_u64().unwrap_or(0) + stats["in_flight"].as_u64().unwrap_or(0);
    anyhow::ensure!(
        queued == total as u64 && sandbox.stats().requests_total == 0,
        "expected {total} edits queued and none sent, stats says {stats}"
    );
    println!("filled {total} edits in {:.2} s", fill.as_secs_f64());

    // 2. Deliver: restart with tokens available at once.
    daemon.kill().await?;
    sandbox.set_token_delay(Duration::ZERO);
    let restarted = Instant::now();
    daemon.start().await?;
    let ready = Instant::now();
    let usage_ready = process::usage(&daemon)?;
    let (bench_cpu_ready, machine_ready) = (proc::cpu_time("self"), proc::machine_cpu());
    let timeout = secs(ideal * 4.0 + 60.0);
    let mut peak_rss = usage_ready.rss_bytes;
    let drained = loop {
        let stats = daemon.stats().await?;
        let usage = process::usage(&daemon)?;
        peak_rss = peak_rss.max(usage.rss_bytes);
        if stats["pending"] == 0 && stats["in_flight"] == 0 {
            break Some((Instant::now(), usage));
        }
        if ready.elapsed() > timeout {
            eprintln!("not drained within {timeout:?}: {stats}");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (done, usage_done) = match drained {
        Some(found) => found,
        None => (Instant::now(), process::usage(&daemon)?),
    };
    let (bench_cpu_done, machine_done) = (proc::cpu_time("self"), proc::machine_cpu());
    let final_stats = daemon.stats().await?;
    daemon.terminate().await?;
    let log = Log::read(&sandbox);

    // 3. Check.
    let edge = secs(args.edge);
    let mut per_account = Vec::with_capacity(n_accounts);
    let mut all_delivered = Vec::with_capacity(total);
    let mut rate_limited = 0usize;
    let mut requests = 0usize;
    let mut never_delivered = 0usize;
    for a in 0..n_accounts {
        let arrivals = log.arrivals(&account_id(a));
        requests += arrivals.len();
        rate_limited += arrivals.iter().filter(|r| r.status == Some(429)).count();
        let delivered = measure::delivered(arrivals);
        let (Some(&first), Some(&last)) = (delivered.first(), delivered.last()) else {
            never_delivered += 1;
            continue;
        };
        let steady_rate = measure::steady(&delivered, edge)
            .map(|(from, until)| measure::rate(&delivered, from, until))
            .filter(|rate| rate.count >= 3)
            .map(|rate| rate.per_second);
        per_account.push(Account {
            first,
            last,
            times: delivered.clone(),
            steady_rate,
        });
        all_delivered.extend(delivered);
    }
    all_delivered.sort_unstable();
    let delivered_total = all_delivered.len();
    let other_accounts = log
        .accounts()
        .filter(|(id, _)| !id.starts_with("free-"))
        .count();
    anyhow::ensure!(other_accounts == 0, "requests for unknown accounts");

    let mut wrong = 0usize;
    let mut concurrent = 0usize;
    for a in 0..n_accounts {
        for m in 0..n_messages {
            let record = sandbox.message(&message_id(a, m));
            let shown = record
                .as_ref()
                .and_then(|r| r.content.as_ref())
                .and_then(content_seq);
            wrong += usize::from(shown != Some(m as u64));
            concurrent += usize::from(record.is_some_and(|r| r.max_concurrent > 1));
        }
    }
    sandbox.shutdown().await;

    // Per-account steady rates (accounts with enough messages to have a steady part).
    let mut rates: Vec<f64> = per_account.iter().filter_map(|a| a.steady_rate).collect();
    rates.sort_by(f64::total_cmp);
    let below = rates.iter().filter(|r| **r < ACCOUNT_SHARE * limit).count();
    // The sum of the accounts' rates: over the window in which every account is in its
    // steady part (each account's rate measured from its own gaps, as accounts paced in
    // lockstep make a count over a window jump by whole rounds), else over each one's own.
    let common = (
        per_account
            .iter()
            .map(|a| a.first)
            .max()
            .unwrap_or_default()
            + edge,
        per_account
            .iter()
            .map(|a| a.last)
            .min()
            .unwrap_or_default()
            .saturating_sub(edge),
    );
    let total_rate = if n_messages < 2 {
        None
    } else if common.1 >= common.0 + Duration::from_secs(1) {
        let sum: f64 = per_account
            .iter()
            .map(|a| measure::rate(&a.times, common.0, common.1).per_second)
            .sum();
        Some(("common steady window", common.0, common.1, sum))
    } else {
        let (from, until) = measure::steady(&all_delivered, edge).unwrap_or_default();
        Some((
            "each account's own steady part",
            from,
            until,
            rates.iter().sum(),
        ))
    };
    let ready_offset = log.offset(ready);
    let (first_delivery, last_delivery) = (
        all_delivered.first().copied().unwrap_or_default(),
        all_delivered.last().copied().unwrap_or_default(),
    );
    let mut waits: Vec<Duration> = per_account
        .iter()
        .map(|a| a.first.saturating_sub(ready_offset))
        .collect();
    waits.sort_unstable();
    let mut finish: Vec<Duration> = per_account
        .iter()
        .map(|a| a.last.saturating_sub(ready_offset))
        .collect();
    finish.sort_unstable();

    let cpu = usage_done.cpu.saturating_sub(usage_ready.cpu);
    let cpu_per_request = cpu / (delivered_total.max(1) as u32);
    let bench_cpu = bench_cpu_done.saturating_sub(bench_cpu_ready);
    let elapsed = done - ready;
    let machine_busy = (machine_done.0.saturating_sub(machine_ready.0)).as_secs_f64()
        / (machine_done.1.saturating_sub(machine_ready.1))
            .as_secs_f64()
            .max(1e-9);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);

    println!(
        "delivered {delivered_total} of {total} in {:.2} s from the restart's first ping (restart took {:.2} s); first delivery {:.3} s, last {:.3} s after it",
        elapsed.as_secs_f64(),
        (ready - restarted).as_secs_f64(),
        first_delivery.as_secs_f64() - ready_offset.as_secs_f64(),
        last_delivery.as_secs_f64() - ready_offset.as_secs_f64(),
    );
    if !rates.is_empty() {
        println!(
            "per-account steady rate (req/s, {} accounts): min {:.3}, p5 {:.3}, median {:.3}, max {:.3}; {below} below {:.2}",
            rates.len(),
            rates[0],
            percentile(&rates, 5.0),
            percentile(&rates, 50.0),
            rates[rates.len() - 1],
            ACCOUNT_SHARE * limit
        );
    }
    if let Some((name, from, until, rate)) = total_rate {
        println!(
            "sum of the accounts' rates over the {name} ({:.2} s to {:.2} s after ready): {rate:.1} req/s = {:.2}% of {:.0}/s",
            from.as_secs_f64() - ready_offset.as_secs_f64(),
            until.as_secs_f64() - ready_offset.as_secs_f64(),
            rate / (limit * n_accounts as f64) * 100.0,
            limit * n_accounts as f64
        );
    }
    println!(
        "wait from ready to an account's first delivery: p50 {:.3} s, p99 {:.3} s, max {:.3} s; to its last: p50 {:.3} s, max {:.3} s",
        percentile(&waits, 50.0).as_secs_f64(),
        percentile(&waits, 99.0).as_secs_f64(),
        waits.last().copied().unwrap_or_default().as_secs_f64(),
        percentile(&finish, 50.0).as_secs_f64(),
        finish.last().copied().unwrap_or_default().as_secs_f64(),
    );
    println!(
        "daemon: CPU {:.3} s for {delivered_total} requests = {:.1} us/request ({:.0}% of one core over {:.2} s); VmRSS {:.1} MiB at the end, peak sampled {:.1} MiB, VmHWM {:.1} MiB",
        cpu.as_secs_f64(),
        cpu_per_request.as_secs_f64() * 1e6,
        cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        elapsed.as_secs_f64(),
        mib(usage_done.rss_bytes),
        mib(peak_rss),
        mib(usage_done.hwm_bytes),
    );
    println!(
        "bench process (sandbox, producers idle, poller): CPU {:.3} s = {:.1} us/request; machine busy {:.0}% of {} cores",
        bench_cpu.as_secs_f64(),
        bench_cpu.as_secs_f64() * 1e6 / delivered_total.max(1) as f64,
        machine_busy * 100.0,
        machine["nproc"]
    );

    let mut targets = vec![
        Target::new(
            "every edit delivered, every message on its last acknowledged edit",
            format!("{total} of {total}"),
            format!(
                "{delivered_total} delivered, {} wrong contents, {never_delivered} accounts never served",
                wrong
            ),
            delivered_total == total && wrong == 0 && never_delivered == 0,
        ),
        Target::new(
            "requests answered 429",
            "0",
            format!("{rate_limited} of {requests}"),
            rate_limited == 0,
        ),
        Target::new(
            "never two requests for one message at once",
            "0 messages",
            concurrent.to_string(),
            concurrent == 0,
        ),
        Target::new(
            "daemon CPU time per delivered request (recovery included)",
            format!("< {} us", CPU_PER_REQUEST_TARGET.as_micros()),
            format!("{:.1} us", cpu_per_request.as_secs_f64() * 1e6),
            cpu_per_request < CPU_PER_REQUEST_TARGET,
        ),
    ];
    if !rates.is_empty() {
        targets.push(Target::new(
            "every account's delivered rate over its steady part",
            format!(">= {:.0}% of 2/s", ACCOUNT_SHARE * 100.0),
            format!(
                "min {:.2}%, p5 {:.2}%, median {:.2}%; {below} of {} below",
                rates[0] / limit * 100.0,
                percentile(&rates, 5.0) / limit * 100.0,
                percentile(&rates, 50.0) / limit * 100.0,
                rates.len()
            ),
            below == 0 && never_delivered == 0,
        ));
        let total_share = total_rate.map_or(0.0, |t| t.3 / (limit * n_accounts as f64));
        targets.push(Target::new(
            format!(
                "sum over accounts ({})",
                total_rate.map_or("no steady window", |t| t.0)
            ),
            format!(
                ">= {:.0}% of {:.0}/s",
                TOTAL_SHARE * 100.0,
                limit * n_accounts as f64
            ),
            format!("{:.2}%", total_share * 100.0),
            total_share >= TOTAL_SHARE,
        ));
    } else {
        targets.push(Target::new(
            "no account starved: how long the last account waited from ready",
            "all served (report)",
            format!(
                "{:.2} s (p50 {:.2} s)",
                waits.last().copied().unwrap_or_default().as_secs_f64(),
                percentile(&waits, 50.0).as_secs_f64()
            ),
            never_delivered == 0,
        ));
    }
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": scenario, "machine": machine, "loadavg": loadavg(),
        "accounts": n_accounts, "messages": n_messages, "edits": total,
        "fill_seconds": fill.as_secs_f64(), "restart_seconds": (ready - restarted).as_secs_f64(),
        "delivered": delivered_total, "drained": drained.is_some(), "seconds": elapsed.as_secs_f64(),
        "first_delivery_s": first_delivery.as_secs_f64() - ready_offset.as_secs_f64(),
        "last_delivery_s": last_delivery.as_secs_f64() - ready_offset.as_secs_f64(),
        "rate_limited": rate_limited, "requests": requests, "wrong_contents": wrong,
        "concurrent_messages": concurrent, "never_delivered": never_delivered,
        "account_rate": (!rates.is_empty()).then(|| json!({
            "min": rates[0], "p5": percentile(&rates, 5.0), "median": percentile(&rates, 50.0),
            "max": rates[rates.len() - 1], "below_target": below, "measured_accounts": rates.len(),
        })),
        "total_rate": total_rate.map(|(name, from, until, rate)| json!({
            "window": name, "from_s": from.as_secs_f64() - ready_offset.as_secs_f64(),
            "until_s": until.as_secs_f64() - ready_offset.as_secs_f64(), "per_second": rate,
            "share": rate / (limit * n_accounts as f64),
        })),
        "wait_first_s": {"p50": percentile(&waits, 50.0).as_secs_f64(), "p99": percentile(&waits, 99.0).as_secs_f64(),
            "max": waits.last().copied().unwrap_or_default().as_secs_f64()},
        "wait_last_s": {"p50": percentile(&finish, 50.0).as_secs_f64(),
            "max": finish.last().copied().unwrap_or_default().as_secs_f64()},
        "daemon": usage_json(cpu, cpu_per_request, &usage_done, peak_rss),
        "bench_cpu_s": bench_cpu.as_secs_f64(), "machine_busy_share": machine_busy,
        "final_stats": final_stats, "targets": targets,
    });
    println!("{line}");
    Ok(())
}

fn usage_json(cpu: Duration, per_request: Duration, done: &Usage, peak_rss: u64) -> Value {
    json!({
        "cpu_s": cpu.as_secs_f64(), "cpu_per_request_us": per_request.as_secs_f64() * 1e6,
        "rss_bytes": done.rss_bytes, "hwm_bytes": done.hwm_bytes, "peak_rss_sampled_bytes": peak_rss,
    })
}
