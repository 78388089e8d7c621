//! Delivery benchmark (BENCHMARKS.md, "Delivery"): how close zoomq drains to Zoom's per-account
//! limits without crossing them, how fast hot messages converge, how it copes with an account
//! whose quota another app shares, and how soon an edit reaches Zoom when nothing is queued.
//!
//! Everything runs in this process on one tokio multi-thread runtime, as `zoomq demo` does: the
//! sandbox Zoom ([`Sandbox::start`], default seed, no faults), the real daemon ([`zoomq::run`],
//! the code `zoomq serve` runs, with release defaults except `metrics.listen = ""` and, where a
//! row says so, `delivery.rate_margin`) on a fresh temporary directory, and the producers, which
//! talk to the daemon over its Unix socket like any bot. Figures come from the sandbox's own
//! records (request log, per-account arrivals, message contents), not from the daemon's
//! counters, so they show what Zoom would see.
//!
//! Scenarios (`cargo bench --bench drain -- <scenario>`; `all`, the default, runs each in turn):
//! - `drain`: a preloaded backlog of distinct messages on one account, measured for `--seconds`
//!   (60) after `--warmup` (2): Pro and Business, each with the default margin and with 1.0.
//!   The four rows run at once (separate sandbox and daemon each) unless `--serial`.
//! - `hot`: 20 messages edited 50 times a second each for `--seconds` (30) on one Pro account;
//!   ack-to-Zoom lag from polling the sandbox's messages every `--poll-ms`.
//! - `shared`: a Pro account of which this app may use only 12 requests/s; 429 share and
//!   delivered rate after the first `--settle` (10) of `--seconds` (60).
//! - `idle`: `--samples` (200) edits one at a time on an empty queue: from the producer's write
//!   to the sandbox's receipt of the PUT (`RequestRecord::at`, same process, same clock).
//!
//! Each scenario prints a table, one line per target (`met` or `MISSED`), and one JSON line. A
//! missed target is reported, not fatal: the exit status is non-zero only when the benchmark
//! itself fails (the daemon or sandbox does not start, an edit is refused, ...).

#[path = "common/host.rs"]
mod host;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zoomq::plan::Plan;
use zoomq::sandbox::{AccountSettings, Sandbox, SandboxConfig};

/// The account every scenario's edits name.
const ACCOUNT: &str = "bench-account";
/// The daemon's default `delivery.rate_margin`, the first row of each plan in `drain`.
const DEFAULT_MARGIN: f64 = 0.97;
const HOT_MESSAGES: usize = 20;
const HOT_EDITS_PER_MESSAGE: u32 = 50;
const SHARED_CAPACITY: u32 = 12;
/// `idle` edits sent before measuring: they fetch the token and open the HTTP connection.
const IDLE_WARMUP: usize = 5;
/// How long the queue may take to empty after a producer stops before we call it stuck.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Parser)]
#[command(about = "zoomq delivery benchmark (see BENCHMARKS.md)")]
struct Args {
    /// Which scenario to run; `all` runs every one in turn.
    #[arg(value_enum, default_value = "all")]
    scenario: Scenario,
    /// Measured seconds (default: 60 for drain and shared, 30 for hot).
    #[arg(long)]
    seconds: Option<f64>,
    /// drain: seconds of backlog draining before the measured interval.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// shared: seconds left out at the start while the daemon finds the account's capacity.
    #[arg(long, default_value_t = 10.0)]
    settle: f64,
    /// hot: how often the sandbox's messages are sampled, in milliseconds.
    #[arg(long, default_value_t = 2)]
    poll_ms: u64,
    /// idle: measured edits.
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// drain: run the four rows one after another instead of at once (four times longer).
    #[arg(long)]
    serial: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Drain,
    Hot,
    Shared,
    Idle,
    All,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let machine = machine();
        println!(
            "zoomq delivery benchmark on {}",
            machine["summary"].as_str().unwrap_or_default()
        );
        let all = args.scenario == Scenario::All;
        if all || args.scenario == Scenario::Drain {
            drain(&args, &machine).await?;
        }
        if all || args.scenario == Scenario::Hot {
            hot(&args, &machine).await?;
        }
        if all || args.scenario == Scenario::Shared {
            shared(&args, &machine).await?;
        }
        if all || args.scenario == Scenario::Idle {
            idle(&args, &machine).await?;
        }
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// drain

#[derive(Debug, Serialize)]
struct DrainRow {
    plan: Plan,
    limit: u32,
    rate_margin: f64,
    seconds: f64,
    preloaded: usize,
    /// Delivered (2xx) requests per second inside the measured interval.
    delivered_per_second: f64,
    share_of_limit: f64,
    measured: Window,
    /// Over the whole run, preload and warm-up included.
    requests_total: u64,
    rate_limited_total: u64,
    rate_limited_share: f64,
    max_fixed_window: u32,
    max_sliding_window: u32,
    /// Spacing of arrivals at the sandbox inside the measured interval, against the limiter's
    /// interval `1 / (limit * margin)`: the mean shows how much pacing loses per request.
    gap_nominal_ms: f64,
    gap_mean_ms: f64,
    gap_min_ms: f64,
    gap_p99_ms: f64,
    /// Edits still pending when the interval ended: must be > 0, or the daemon ran dry.
    backlog_left: u64,
}

async fn drain(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(60.0);
    let rows = [
        (Plan::Pro, DEFAULT_MARGIN),
        (Plan::Pro, 1.0),
        (Plan::Business, DEFAULT_MARGIN),
        (Plan::Business, 1.0),
    ];
    println!(
        "\n== drain: preloaded backlog of distinct messages, one account, {seconds} s measured after {} s, rows {}",
        args.warmup,
        if args.serial { "one after another" } else { "at once (a sandbox and a daemon each)" }
    );
    let mut results = Vec::new();
    if args.serial {
        for (plan, margin) in rows {
            results.push(drain_row(plan, margin, seconds, args.warmup).await?);
        }
    } else {
        let tasks: Vec<JoinHandle<anyhow::Result<DrainRow>>> = rows
            .iter()
            .map(|&(plan, margin)| tokio::spawn(drain_row(plan, margin, seconds, args.warmup)))
            .collect();
        for task in tasks {
            results.push(task.await??);
        }
    }

    println!(
        "{:<9} {:>5} {:>6} {:>10} {:>8} {:>9} {:>6} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "plan",
        "limit",
        "margin",
        "deliv/s",
        "% limit",
        "requests",
        "429",
        "429 %",
        "fixed",
        "sliding",
        "gap nom",
        "gap mean",
        "gap min",
        "backlog"
    );
    let mut targets = Vec::new();
    for r in &results {
        println!(
            "{:<9} {:>5} {:>6.2} {:>10.2} {:>7.1}% {:>9} {:>6} {:>6.2}% {:>6} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8}",
            r.plan.as_str(),
            r.limit,
            r.rate_margin,
            r.delivered_per_second,
            r.share_of_limit * 100.0,
            r.requests_total,
            r.rate_limited_total,
            r.rate_limited_share * 100.0,
            r.max_fixed_window,
            r.max_sliding_window,
            r.gap_nominal_ms,
            r.gap_mean_ms,
            r.gap_min_ms,
            r.backlog_left,
        );
        let row = format!("{} margin {}", r.plan, r.rate_margin);
        targets.push(Target::new(
            format!("{row}: delivered / limit"),
            ">= 95%",
            format!("{:.2}%", r.share_of_limit * 100.0),
            r.share_of_limit >= 0.95,
        ));
        targets.push(Target::new(
            format!("{row}: requests answered 429"),
            "< 0.5%",
            format!(
                "{:.2}% ({} of {})",
                r.rate_limited_share * 100.0,
                r.rate_limited_total,
                r.requests_total
            ),
            r.rate_limited_share < 0.005,
        ));
        targets.push(Target::new(
            format!("{row}: most requests in a fixed / sliding 1 s window"),
            format!("<= {}", r.limit),
            format!("{} / {}", r.max_fixed_window, r.max_sliding_window),
            r.max_fixed_window <= r.limit && r.max_sliding_window <= r.limit,
        ));
        targets.push(Target::new(
            format!("{row}: backlog never ran dry"),
            "> 0 pending at the end",
            r.backlog_left.to_string(),
            r.backlog_left > 0,
        ));
    }
    println!(
        "(deliv/s: 2xx per second in the measured interval; requests, 429, windows: whole run)"
    );
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "drain", "machine": machine, "loadavg": loadavg(), "seconds": seconds,
        "warmup_seconds": args.warmup, "serial": args.serial, "rows": results, "targets": targets,
    });
    println!("{line}");
    Ok(())
}

async fn drain_row(
    plan: Plan,
    rate_margin: f64,
    seconds: f64,
    warmup: f64,
) -> anyhow::Result<DrainRow> {
    let sandbox = SandboxConfig {
        default_plan: plan,
        ..SandboxConfig::default()
    };
    let rig = Rig::start(sandbox, rate_margin).await?;
    let limit = plan.per_second();
    // Ten seconds more than the run can possibly send, so the daemon never runs dry.
    let preloaded = (f64::from(limit) * (warmup + seconds + 10.0)).ceil() as usize;
    let started = Instant::now();
    preload(&rig.socket, "drain", preloaded).await?;
    tokio::time::sleep_until((started + secs(warmup)).into()).await;
    let from = Instant::now();
    tokio::time::sleep(secs(seconds)).await;
    let until = Instant::now();
    let stats = rig.stats().await?;
    let measured = Window::of(&rig.sandbox, from, until);
    let account = rig.account()?;
    let origin = rig.sandbox.started();
    let (from_offset, until_offset) = (from - origin, until - origin);
    rig.stop().await?;
    let delivered_per_second = measured.delivered as f64 / (until - from).as_secs_f64();
    let arrivals: Vec<Duration> = account
        .arrivals
        .iter()
        .copied()
        .filter(|at| *at >= from_offset && *at < until_offset)
        .collect();
    let mut gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort_unstable();
    let gap_mean_ms = match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) if !gaps.is_empty() => ms(*last - *first) / gaps.len() as f64,
        _ => 0.0,
    };
    Ok(DrainRow {
        plan,
        limit,
        rate_margin,
        seconds,
        preloaded,
        delivered_per_second,
        share_of_limit: delivered_per_second / f64::from(limit),
        measured,
        requests_total: account.requests,
        rate_limited_total: account.rate_limited,
        rate_limited_share: share(account.rate_limited, account.requests),
        max_fixed_window: account.max_fixed_window,
        max_sliding_window: account.max_sliding_window,
        gap_nominal_ms: 1000.0 / (f64::from(limit) * rate_margin),
        gap_mean_ms,
        gap_min_ms: ms(gaps.first().copied().unwrap_or_default()),
        gap_p99_ms: ms(percentile(&gaps, 99.0)),
        backlog_left: stats["pending"].as_u64().unwrap_or(0),
    })
}

// ---------------------------------------------------------------------------------------------
// hot

/// An edit the daemon acknowledged: which hot message, its sequence number, when the ack was read.
struct Acked {
    message: usize,
    seq: u64,
    at: Instant,
}

async fn hot(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(30.0);
    let rate = HOT_EDITS_PER_MESSAGE * HOT_MESSAGES as u32;
    let poll = Duration::from_millis(args.poll_ms.max(1));
    println!(
        "\n== hot: {HOT_MESSAGES} messages x {HOT_EDITS_PER_MESSAGE} edits/s = {rate} edits/s for {seconds} s, one Pro account; sandbox polled every {} ms",
        poll.as_millis()
    );
    let rig = Rig::start(SandboxConfig::default(), DEFAULT_MARGIN).await?;
    let ids: Vec<String> = (0..HOT_MESSAGES).map(|m| format!("hot-{m}")).collect();

    // The watcher runs until the producer has finished and the queue is empty; the guard stops
    // it also when producing fails, so the join below cannot hang.
    let stop = CancellationToken::new();
    let watching = watch(&rig.sandbox, &ids, poll, stop.clone());
    let driving = async {
        let _stop = stop.clone().drop_guard();
        let started = Instant::now();
        let acked = produce_hot(&rig.socket, &ids, rate, secs(seconds)).await?;
        let produced = Instant::now();
        let drained = rig.wait_drained(DRAIN_TIMEOUT).await?;
        // One more poll period so the watcher sees the final contents.
        tokio::time::sleep(poll * 2).await;
        anyhow::Ok((acked, started, produced, drained))
    };
    let (watched, driven) = tokio::join!(watching, driving);
    let (acked, started, produced, drained) = driven?;
    let stats = rig.stats().await?;

    // Lag: for each acked edit, the first poll showing its content or a later one.
    let mut lags = Vec::with_capacity(acked.len());
    let mut unresolved = 0u64;
    for edit in &acked {
        let seen = &watched.first_seen[edit.message];
        let index = seen.partition_point(|(seq, _)| *seq < edit.seq);
        match seen.get(index) {
            Some((_, at)) => lags.push(at.saturating_duration_since(edit.at)),
            None => unresolved += 1,
        }
    }
    lags.sort_unstable();
    let mut wrong = Vec::new();
    let mut max_concurrent = 0;
    for (m, id) in ids.iter().enumerate() {
        let last_acked = acked.iter().rev().find(|a| a.message == m).map(|a| a.seq);
        let record = rig.sandbox.message(id);
        let shown = record
            .as_ref()
            .and_then(|r| r.content.as_ref())
            .and_then(content_seq);
        max_concurrent = max_concurrent.max(record.map_or(0, |r| r.max_concurrent));
        if shown != last_acked {
            wrong.push(format!("{id}: shows {shown:?}, last acked {last_acked:?}"));
        }
    }
    let producing = (produced - started).as_secs_f64();
    let window = Window::of(&rig.sandbox, started, produced);
    let account = rig.account()?;
    rig.stop().await?;

    let requests_per_second = window.requests as f64 / producing;
    let ceiling = f64::from(Plan::Pro.per_second()) * DEFAULT_MARGIN;
    let lag_target = HOT_MESSAGES as f64 / ceiling + 1.0;
    let (p50, p99, max) = (
        ms(percentile(&lags, 50.0)),
        ms(percentile(&lags, 99.0)),
        ms(lags.last().copied().unwrap_or_default()),
    );
    println!(
        "{:>8} {:>7} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "edits/s",
        "acked",
        "coalesced",
        "req/s",
        "429",
        "fixed",
        "sliding",
        "p50 ms",
        "p99 ms",
        "max ms",
        "drain s"
    );
    println!(
        "{:>8.0} {:>7} {:>9} {:>8.2} {:>6} {:>6} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>10.2}",
        acked.len() as f64 / producing,
        acked.len(),
        stats["coalesced"].as_u64().unwrap_or(0),
        requests_per_second,
        account.rate_limited,
        account.max_fixed_window,
        account.max_sliding_window,
        p50,
        p99,
        max,
        drained.as_secs_f64(),
    );
    println!(
        "(req/s: edit requests at the sandbox while producing; lag: ack read by the producer -> first poll showing that content or a later one; {} polls, one per {:.2} ms on average)",
        watched.polls,
        watched.elapsed.as_secs_f64() * 1000.0 / watched.polls.max(1) as f64
    );
    for line in &wrong {
        println!("  MISMATCH {line}");
    }
    let targets = vec![
        Target::new(
            "every message ends on its last acknowledged edit",
            "all 20",
            format!("{} of {HOT_MESSAGES}", HOT_MESSAGES - wrong.len()),
            wrong.is_empty(),
        ),
        Target::new(
            "ack-to-Zoom lag p99",
            format!("< {:.2} s", lag_target),
            format!(
                "{:.3} s (p50 {:.3} s, max {:.3} s, {} unresolved)",
                p99 / 1e3,
                p50 / 1e3,
                max / 1e3,
                unresolved
            ),
            p99 / 1e3 < lag_target && unresolved == 0,
        ),
        Target::new(
            "requests at the sandbox: per second (ceiling by design), most in a fixed / sliding 1 s window",
            format!("{ceiling:.1}/s; <= 20"),
            format!(
                "{requests_per_second:.2}/s; {} / {}",
                account.max_fixed_window, account.max_sliding_window
            ),
            account.max_fixed_window <= 20 && account.max_sliding_window <= 20,
        ),
        Target::new(
            "never two requests for one message at once, never an older content after a newer",
            "1 / 0",
            format!("{max_concurrent} / {}", watched.regressions),
            max_concurrent <= 1 && watched.regressions == 0,
        ),
    ];
    print_targets(&targets);
    let line = json!({
        "bench": "drain", "scenario": "hot", "machine": machine, "loadavg": loadavg(), "seconds": seconds,
        "messages": HOT_MESSAGES, "offered_edits_per_second": rate,
        "produced_seconds": producing, "acked": acked.len(),
        "coalesced": stats["coalesced"], "delivered": stats["delivered"],
        "window": window, "requests_per_second": requests_per_second,
        "rate_limited_total": account.rate_limited,
        "max_fixed_window": account.max_fixed_window, "max_sliding_window": account.max_sliding_window,
        "lag_ms": {"p50": p50, "p99": p99, "max": max, "samples": lags.len(), "unresolved": unresolved},
        "poll_ms": poll.as_millis() as u64, "polls": watched.polls, "regressions": watched.regressions,
        "max_concurrent": max_concurrent, "wrong": wrong, "drain_seconds": drained.as_secs_f64(),
        "targets": targets,
    });
    println!("{line}");
    Ok(())
}

/// Edits `ids` round-robin, `rate` edits a second in all, over one pipelined connection, for
/// `duration`; returns every acknowledged edit with the instant its answer was read.
async fn produce_hot(
    socket: &Path,
    ids: &[String],
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Vec<Acked>> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    // Answers come in request order, so the reader pairs each with the next sent edit.
    let reading = tokio::spawn(async move {
        let mut answers = BufReader::new(reader).lines();
        let mut acked = Vec::new();
        while let Some((message, seq)) = sent_rx.recv().await {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            let at = Instant::now();
            anyhow::ensure!(line.starts_with(r#"{"ok":true"#), "edit refused: {line}");
            acked.push(Acked { message, seq, at });
        }
        anyhow::Ok(acked)
    });
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    // Catch up after a late tick, so the offered rate is the asked one on average.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut seq = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let message = seq as usize % ids.len();
        writer
            .write_all(&edit_line(&ids[message], &seq_content(&ids[message], seq)))
            .await?;
        let _ = sent_tx.send((message, seq));
        seq += 1;
    }
    drop(sent_tx);
    reading.await?
}

/// What polling the sandbox's messages saw.
struct Watched {
    /// Per message: each newer sequence number shown, with the first poll that showed it.
    first_seen: Vec<Vec<(u64, Instant)>>,
    /// Polls in which a message showed an older sequence number than before (must be 0).
    regressions: u64,
    polls: u64,
    elapsed: Duration,
}

async fn watch(
    sandbox: &Sandbox,
    ids: &[String],
    period: Duration,
    stop: CancellationToken,
) -> Watched {
    let mut watched = Watched {
        first_seen: vec![Vec::new(); ids.len()],
        regressions: 0,
        polls: 0,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        for (m, id) in ids.iter().enumerate() {
            let Some(seq) = sandbox
                .message(id)
                .and_then(|r| r.content.as_ref().and_then(content_seq))
            else {
                continue;
            };
            // Taken after the read: the content was shown no later than this.
            let now = Instant::now();
            let seen = &mut watched.first_seen[m];
            match seen.last() {
                Some((last, _)) if seq < *last => watched.regressions += 1,
                Some((last, _)) if seq == *last => {}
                _ => seen.push((seq, now)),
            }
        }
        watched.polls += 1;
    }
    watched.elapsed = started.elapsed();
    watched
}

fn seq_content(id: &str, seq: u64) -> Value {
    json!({"head": {"text": id}, "body": [{"type": "message", "text": format!("seq {seq}")}]})
}

fn content_seq(content: &Value) -> Option<u64> {
    content["body"][0]["text"]
        .as_str()?
        .strip_prefix("seq ")?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// shared

async fn shared(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let seconds = args.seconds.unwrap_or(60.0);
    // Short smoke runs keep at least half of the run measured.
    let settle = args.settle.min(seconds / 2.0);
    println!(
        "\n== shared: Pro account whose sandbox capacity is {SHARED_CAPACITY}/s (another app uses the rest), preloaded backlog, {seconds} s; measured after the first {settle} s"
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
    let rig = Rig::start(sandbox, DEFAULT_MARGIN).await?;
    // Enough for the plan's full rate: the daemon must never run dry, whatever it finds.
    let preloaded = (f64::from(Plan::Pro.per_second()) * (seconds + 10.0)).ceil() as usize;
    let from = Instant::now();
    preload(&rig.socket, "shared", preloaded).await?;
    // The daemon's own view of its rate, once a second (the gauge is refreshed once a second).
    let mut limiter_rates = Vec::new();
    let until = from + secs(seconds);
    while Instant::now() + Duration::from_secs(1) <= until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter_rates.push(rig.stats().await?["limiter_rate"].as_f64().unwrap_or(0.0));
    }
    tokio::time::sleep_until(until.into()).await;
    let stats = rig.stats().await?;
    let settled = from + secs(settle);
    let after = Window::of(&rig.sandbox, settled, until);
    let whole = Window::of(&rig.sandbox, from, until);
    let timeline = Window::per_second(&rig.sandbox, from, until);
    rig.stop().await?;

    let share_429 = share(after.rate_limited, after.requests);
    let delivered = after.delivered as f64 / (seconds - settle);
    let target_rate = 0.9 * f64::from(SHARED_CAPACITY);
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
            w.delivered as f64 / length / f64::from(SHARED_CAPACITY) * 100.0,
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
        timeline
            .iter()
            .map(|w| w.delivered.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "429s per second: {}",
        timeline
            .iter()
            .map(|w| w.rate_limited.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let targets = vec![
        Target::new(
            format!("requests answered 429 after the first {settle} s"),
            "< 5%",
            format!(
                "{:.2}% ({} of {})",
                share_429 * 100.0,
                after.rate_limited,
                after.requests
            ),
            share_429 < 0.05,
        ),
        Target::new(
            "delivered rate after settling",
            format!(">= {target_rate:.1}/s (90% of {SHARED_CAPACITY}/s)"),
            format!(
                "{delivered:.2}/s ({:.1}%)",
                delivered / f64::from(SHARED_CAPACITY) * 100.0
            ),
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

// ---------------------------------------------------------------------------------------------
// idle

async fn idle(args: &Args, machine: &Value) -> anyhow::Result<()> {
    let samples = args.samples.max(1);
    // Spacing after each arrival, longer than the Pro pacing interval (1/19.4 s = 51.5 ms), so
    // no edit waits for the limiter: the figure is the idle path, not pacing.
    let gap = Duration::from_millis(60);
    println!(
        "\n== idle: {samples} edits one at a time on an empty queue (Pro), {} ms after the previous one reached the sandbox",
        gap.as_millis()
    );
    let rig = Rig::start(SandboxConfig::default(), DEFAULT_MARGIN).await?;
    let stream = UnixStream::connect(&rig.socket).await?;
    let (reader, mut writer) = stream.into_split();
    let mut answers = BufReader::new(reader).lines();
    let mut to_request = Vec::with_capacity(samples);
    let mut to_ack = Vec::with_capacity(samples);
    let mut before_ack = 0usize;
    for i in 0..IDLE_WARMUP + samples {
        tokio::time::sleep(gap).await;
        let id = format!("idle-{i}");
        let line = edit_line(&id, &seq_content(&id, i as u64));
        // The log then holds this edit's request only.
        rig.sandbox.clear_requests();
        let written = Instant::now();
        writer.write_all(&line).await?;
        let answer = answers
            .next_line()
            .await?
            .context("the daemon closed the connection")?;
        let acked = Instant::now();
        anyhow::ensure!(
            answer.starts_with(r#"{"ok":true"#),
            "edit refused: {answer}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            if let Some(record) = rig
                .sandbox
                .requests()
                .into_iter()
                .find(|r| r.message_id == id)
            {
                break record.at;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{id} did not reach the sandbox within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        if i >= IDLE_WARMUP {
            to_request.push(arrived.saturating_duration_since(written));
            to_ack.push(acked - written);
            before_ack += usize::from(arrived < acked);
        }
    }
    rig.stop().await?;
    to_request.sort_unstable();
    to_ack.sort_unstable();

    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8}",
        "from the write to", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for (name, sorted) in [
        ("the PUT at the sandbox", &to_request),
        ("the ack read", &to_ack),
    ] {
        println!(
            "{:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name,
            ms(percentile(sorted, 50.0)),
            ms(percentile(sorted, 90.0)),
            ms(percentile(sorted, 99.0)),
            ms(sorted.last().copied().unwrap_or_default()),
        );
    }
    println!("{before_ack} of {samples} PUTs reached the sandbox before the producer read the edit's ack");
    let p50 = ms(percentile(&to_request, 50.0));
    let targets = vec![Target::new(
        "enqueue-to-request latency p50",
        "< 5 ms",
        format!(
            "{p50:.2} ms (p99 {:.2} ms)",
            ms(percentile(&to_request, 99.0))
        ),
        p50 < 5.0,
    )];
    print_targets(&targets);
    let summary = |sorted: &[Duration]| {
        json!({
            "p50": ms(percentile(sorted, 50.0)), "p90": ms(percentile(sorted, 90.0)),
            "p99": ms(percentile(sorted, 99.0)), "max": ms(sorted.last().copied().unwrap_or_default()),
        })
    };
    let line = json!({
        "bench": "drain", "scenario": "idle", "machine": machine, "loadavg": loadavg(), "samples": samples,
        "gap_ms": gap.as_millis() as u64, "to_request_ms": summary(&to_request),
        "to_ack_ms": summary(&to_ack), "request_before_ack": before_ack, "targets": targets,
    });
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Shared pieces

/// A sandbox Zoom and a daemon on a fresh directory, both on this runtime.
struct Rig {
    sandbox: Sandbox,
    socket: PathBuf,
    /// Stops the daemon; `stop` fires it and waits for the daemon's graceful shutdown.
    cancel: CancellationToken,
    daemon: JoinHandle<anyhow::Result<()>>,
    /// Holds the socket and the sled database; removed on drop, after the daemon stopped.
    _dir: tempfile::TempDir,
}

impl Rig {
    async fn start(sandbox_config: SandboxConfig, rate_margin: f64) -> anyhow::Result<Rig> {
        let sandbox = Sandbox::start(sandbox_config)
            .await
            .context("cannot start the sandbox")?;
        let dir = tempfile::Builder::new().prefix("zoomq-drain-").tempdir()?;
        // Metrics stay off: several daemons may run at once.
        let mut config = sandbox.daemon_config(dir.path());
        config.delivery.rate_margin = rate_margin;
        config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let socket = config.socket.path.clone();
        let listener = zoomq::bind_socket(&config.socket)?;
        let cancel = CancellationToken::new();
        let daemon = tokio::spawn(zoomq::run(config, listener, cancel.clone()));
        // The daemon accepts only once its queue is open; a ping waits for that.
        zoomq::client::request(&socket, &json!({"op": "ping"}))
            .await
            .context("the daemon did not answer a ping")?;
        Ok(Rig {
            sandbox,
            socket,
            cancel,
            daemon,
            _dir: dir,
        })
    }

    async fn stats(&self) -> anyhow::Result<Value> {
        zoomq::client::request(&self.socket, &json!({"op": "stats"})).await
    }

    fn account(&self) -> anyhow::Result<zoomq::sandbox::AccountStats> {
        self.sandbox
            .account(ACCOUNT)
            .context("the sandbox never saw the bench account")
    }

    /// Waits until nothing is pending or in flight; returns how long that took.
    async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let stats = self.stats().await?;
            if stats["pending"] == 0 && stats["in_flight"] == 0 {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the queue did not drain within {timeout:?}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.daemon.await??;
        self.sandbox.shutdown().await;
        Ok(())
    }
}

/// Enqueues `count` edits of distinct messages over one pipelined connection and waits for
/// every answer.
async fn preload(socket: &Path, prefix: &str, count: usize) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let reading = tokio::spawn(async move {
        let mut answers = BufReader::new(reader).lines();
        for _ in 0..count {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            anyhow::ensure!(line.starts_with(r#"{"ok":true"#), "edit refused: {line}");
        }
        anyhow::Ok(())
    });
    let mut batch = Vec::new();
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        batch.extend(edit_line(&id, &seq_content(&id, i as u64)));
        if batch.len() >= 64 * 1024 {
            writer.write_all(&batch).await?;
            batch.clear();
        }
    }
    writer.write_all(&batch).await?;
    reading.await?
}

/// One `edit` request line for [`ACCOUNT`].
fn edit_line(message_id: &str, content: &Value) -> Vec<u8> {
    let request = json!({
        "op": "edit", "message_id": message_id, "account_id": ACCOUNT,
        "robot_jid": "bench-bot@xmpp.zoom.us", "content": content,
    });
    let mut line = serde_json::to_vec(&request).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// What the sandbox's request log shows for [`ACCOUNT`] in `[from, until)`.
#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Window {
    requests: u64,
    /// Answered 2xx.
    delivered: u64,
    /// Answered 429.
    rate_limited: u64,
}

impl Window {
    fn of(sandbox: &Sandbox, from: Instant, until: Instant) -> Window {
        Window::per_second(sandbox, from, until)
            .into_iter()
            .fold(Window::default(), |a, b| Window {
                requests: a.requests + b.requests,
                delivered: a.delivered + b.delivered,
                rate_limited: a.rate_limited + b.rate_limited,
            })
    }

    /// One window per second from `from` (the last one may be shorter).
    fn per_second(sandbox: &Sandbox, from: Instant, until: Instant) -> Vec<Window> {
        let mut seconds = vec![Window::default(); (until - from).as_secs_f64().ceil() as usize];
        for record in sandbox.requests() {
            if record.account_id.as_deref() != Some(ACCOUNT)
                || record.at < from
                || record.at >= until
            {
                continue;
            }
            let window = &mut seconds[(record.at - from).as_secs() as usize];
            window.requests += 1;
            match record.status {
                Some(200..=299) => window.delivered += 1,
                Some(429) => window.rate_limited += 1,
                _ => {}
            }
        }
        seconds
    }
}

/// One target, its verdict, and what was measured.
#[derive(Debug, Serialize)]
struct Target {
    what: String,
    target: String,
    measured: String,
    met: bool,
}

impl Target {
    fn new(
        what: impl Into<String>,
        target: impl Into<String>,
        measured: impl Into<String>,
        met: bool,
    ) -> Target {
        Target {
            what: what.into(),
            target: target.into(),
            measured: measured.into(),
            met,
        }
    }
}

fn print_targets(targets: &[Target]) {
    println!("load average (1, 5, 15 min) at the end: {}", loadavg());
    for t in targets {
        println!(
            "target {} {}: {}, {}",
            t.what,
            t.target,
            t.measured,
            if t.met { "met" } else { "MISSED" }
        );
    }
}

/// nproc, CPU model and memory, for the record.
fn machine() -> Value {
    let (nproc, cpu, mem_gib) = host::host();
    json!({
        "nproc": nproc, "cpu": cpu, "mem_gib": (mem_gib * 10.0).round() / 10.0,
        "summary": format!("{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM"),
    })
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews pacing figures.
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn secs(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted samples; zero when there are none.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
