//! Cluster-mode benchmark (BENCHMARKS.md, "Cluster mode (NATS JetStream)"): what the cluster
//! mode costs and keeps, measured in one run on real processes. Three daemons
//! (`zoomq serve`, the release binary, `storage.backend = "nats"`, default `[nats]` settings:
//! replicas 3, lease_ttl 5 s) on a real 3-node nats-server cluster on loopback
//! (`zoomq::testkit::nats::NatsCluster`: JetStream with `sync_interval: always`, so every
//! stored batch is fsynced on each server), delivering to the sandbox Zoom, which runs in this
//! process (multi-thread runtime) with the producers. Each scenario (and each intake run)
//! starts a fresh NATS cluster and fresh daemons.
//!
//! 1. **Intake** (`intake.rs`): 64 producer connections spread evenly over the three daemons'
//!    sockets, 4 requests outstanding each, 1 KiB edits of distinct messages over 1,000
//!    accounts (every partition busy); acknowledged edits/s and ack latency. The anchor, in the
//!    same run: the same load against one daemon in the embedded sled mode, data directory on
//!    the same filesystem as the NATS servers' stores. Then both again with one request
//!    outstanding per connection (`--no-window1` skips it). A third row, `direct`, sends each
//!    connection's edits only for accounts the daemon it is connected to owns: the same
//!    replication without the hop to the owner, so the two rows tell the costs apart.
//!    Then one connection sending one edit at a time (`single`): to the sled daemon, and to
//!    one cluster daemon, first for accounts it owns, then for accounts another daemon owns.
//!    **Delivery is held** in these runs (the sandbox's token endpoint takes an hour, so no
//!    daemon ever sends): intake only.
//! 2. **Delivery** (`delivery.rs`): ten Pro accounts (20/s) paced by the three daemons, a
//!    backlog preloaded through all three; per-account share of the limit over
//!    `--delivery-seconds`, 429s, most requests in one 1 s window (fixed, sliding). The
//!    anchor, first: the same through one daemon in the sled mode. Last (unless
//!    `--no-together`), both at the same time, each with its own sandbox: the sled daemon
//!    then shares the CPUs with a busy NATS cluster too, which tells what the cluster mode
//!    does to pacing apart from what its NATS servers do to the machine.
//! 3. **Failover** (`failover.rs`): SIGKILL of the daemon owning a flowing account's
//!    partition; time until that account's next request reaches the sandbox; `--rounds` times.
//!
//! Prints one table per scenario, one line per target (`met` or `MISSED`) and one JSON line
//! with every figure. A missed target is reported, not fatal.
//!
//! Files: `rig.rs` (daemon processes, the NATS cluster and its daemons, partition owners, CPU
//! of processes), `intake.rs` (its runs; its producers are `../common/load.rs`),
//! `delivery.rs`, `failover.rs`; `../common/` holds what the benches share.

#[allow(dead_code)]
#[path = "../common/fsync.rs"]
mod fsync;
#[path = "../common/host.rs"]
mod host;
#[path = "../common/latency.rs"]
mod latency;
#[path = "../common/load.rs"]
mod load;
#[path = "../common/logs.rs"]
mod logs;
#[allow(dead_code)]
#[path = "../common/proc.rs"]
mod proc;
#[allow(dead_code)]
#[path = "../common/spawn.rs"]
mod spawn;

mod delivery;
mod failover;
mod intake;
mod rig;

use std::path::PathBuf;

use clap::Parser;
use serde_json::json;

use delivery::Gate;
use intake::{AccountId, IntakeRun, Mode};

/// Delivered share of each account's limit, in percent.
const SHARE_TARGET_PCT: f64 = 95.0;
/// Kill to the account's next request at the sandbox.
const FAILOVER_TARGET_S: f64 = 10.0;

#[derive(Debug, Clone, Parser)]
#[command(about = "zoomq cluster-mode benchmark (see BENCHMARKS.md)")]
pub struct Args {
    /// Intake: measured seconds of each run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Intake: seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Intake: producer connections (spread evenly over the daemons).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Intake: outstanding requests per connection in the pipelined runs.
    #[arg(long, default_value_t = 4)]
    pub window: usize,
    /// Intake: accounts the edits go to, in turn.
    #[arg(long, default_value_t = 1000)]
    pub accounts: usize,
    /// Intake: leave out the runs with one outstanding request per connection.
    #[arg(long)]
    pub no_window1: bool,
    /// Intake: measured seconds of each one-connection, one-at-a-time run.
    #[arg(long, default_value_t = 5.0)]
    pub single_seconds: f64,
    /// Delivery: measured seconds.
    #[arg(long, default_value_t = 25.0)]
    pub delivery_seconds: f64,
    /// Delivery: leave out the run of both modes at the same time.
    #[arg(long)]
    pub no_together: bool,
    /// Delivery: seconds left out after the preload.
    #[arg(long, default_value_t = 2.0)]
    pub edge: f64,
    /// Failover: rounds (kill, measure, restart).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Scenarios to run, comma-separated: intake, single, delivery, failover.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "intake,single,delivery,failover"
    )]
    pub only: Vec<String>,
    /// Parent of the daemons' directories (default: the system's temp dir, where the NATS
    /// servers keep their stores too).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logs::init("error");
    // The sandbox (and the preloads) on a runtime of their own; the intake's producers run on
    // a thread and a current-thread runtime of their own, to take as little CPU from the
    // daemons and the NATS servers as they can.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)?;
    let (nproc, cpu, mem_gib) = host::host();
    let machine = format!("{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM");
    let load_start = host::loadavg();
    println!("zoomq cluster benchmark on {machine}; load average {load_start}");
    let nats = zoomq::testkit::nats::server_binary()?;
    println!("  nats-server: {}", nats.display());
    let runs = |name: &str| args.only.iter().any(|o| o == name);

    let mut intake_runs: Vec<IntakeRun> = Vec::new();
    if runs("intake") || runs("single") {
        let line = load::check_request_shape(AccountId(1000))?;
        println!(
            "  intake: {} connections x window {}, {}-byte content ({line}-byte request lines), {} accounts; delivery held",
            args.connections, args.window, load::CONTENT_BYTES, args.accounts
        );
        let sandbox = load::held_sandbox().await?;
        let mut windows = vec![args.window];
        if !args.no_window1 && args.window != 1 {
            windows.push(1);
        }
        if !runs("intake") {
            windows.clear();
        }
        for window in windows {
            for mode in [Mode::Sled, Mode::Cluster, Mode::Direct] {
                intake_runs.push(intake::run(&args, &sandbox, &parent, mode, window).await?);
            }
        }
        if runs("single") {
            intake_runs.extend(intake::single(&args, &sandbox, &parent).await?);
        }
        sandbox.shutdown().await;
    }
    let mut delivered = Vec::new();
    if runs("delivery") {
        delivered.push(delivery::run(&args, &parent, false, Gate::Now).await?);
        delivered.push(delivery::run(&args, &parent, true, Gate::Now).await?);
        if !args.no_together {
            // Both at once; the sled daemon starts once the cluster's backlog is in.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (cluster, sled) = tokio::join!(
                delivery::run(&args, &parent, true, Gate::Signal(tx)),
                delivery::run(&args, &parent, false, Gate::Wait(rx))
            );
            delivered.push(sled?);
            delivered.push(cluster?);
        }
    }
    let failed_over = if runs("failover") {
        Some(failover::run(&args, &parent).await?)
    } else {
        None
    };

    println!();
    let mut targets: Vec<(String, bool)> = Vec::new();
    if !intake_runs.is_empty() {
        print_intake(&intake_runs);
    }
    for d in &delivered {
        println!();
        delivery::print(d);
        let worst = d
            .rows
            .iter()
            .map(|r| r.share_pct)
            .fold(f64::INFINITY, f64::min);
        let r429: u64 = d.rows.iter().map(|r| r.rate_limited).sum();
        let within = d
            .rows
            .iter()
            .all(|r| r.max_fixed <= r.limit && r.max_sliding <= r.limit);
        let fixed = d.rows.iter().map(|r| r.max_fixed).max().unwrap_or(0);
        let sliding = d.rows.iter().map(|r| r.max_sliding).max().unwrap_or(0);
        let over = d.rows.iter().filter(|r| r.max_sliding > r.limit).count();
        let span = d
            .rows
            .iter()
            .map(|r| r.min_span_ms)
            .fold(f64::INFINITY, f64::min);
        let summary = format!(
            "lowest share {worst:.2} %, {r429} 429s, most in 1 s fixed {fixed} / sliding {sliding} \
             ({over} of {} accounts over the limit sliding), shortest span of limit + 1 requests \
             {span:.1} ms{}",
            d.rows.len(),
            if d.backlog_throughout {
                ""
            } else {
                " (an account ran out of backlog)"
            }
        );
        if d.alongside {
            println!("{}, both modes at once: {summary}", d.mode);
            continue;
        }
        if d.mode != "cluster" {
            println!("anchor, one sled daemon, same run: {summary}");
            continue;
        }
        println!("cluster: {summary}");
        targets.push((
            format!(
                "delivery: every account >= {SHARE_TARGET_PCT} % of its limit: lowest {worst:.2} %"
            ),
            worst >= SHARE_TARGET_PCT && d.backlog_throughout,
        ));
        targets.push((format!("delivery: 0 429s: {r429}"), r429 == 0));
        targets.push((
            format!("delivery: at most the limit (20) in any 1 s window: fixed {fixed}, sliding {sliding}"),
            within,
        ));
    }
    if let Some(f) = &failed_over {
        println!();
        failover::print(f);
        let each: Vec<String> = f
            .rounds
            .iter()
            .map(|r| r.failover_s.map_or("none".into(), |s| format!("{s:.2}")))
            .collect();
        targets.push((
            format!(
                "failover: kill to the account's next request < {FAILOVER_TARGET_S} s: {} s, max {}",
                each.join(", "),
                f.max_s.map_or("none".into(), |s| format!("{s:.2} s"))
            ),
            f.max_s.is_some_and(|s| s < FAILOVER_TARGET_S),
        ));
        targets.push((
            format!(
                "failover: no 429 and at most the limit in any 1 s window: {} 429s, fixed {}, sliding {}",
                f.rate_limited, f.max_fixed, f.max_sliding
            ),
            f.rate_limited == 0 && f.max_fixed <= f.limit && f.max_sliding <= f.limit,
        ));
    }
    println!();
    println!(
        "load average at the start: {load_start}; at the end: {}",
        host::loadavg()
    );
    for (what, met) in &targets {
        println!("target {what}: {}", if *met { "met" } else { "MISSED" });
    }
    let line = json!({
        "bench": "cluster", "machine": machine, "load_start": load_start,
        "load_end": host::loadavg(), "intake": intake_runs, "delivery": delivered,
        "failover": failed_over,
    });
    println!("{line}");
    Ok(())
}

fn print_intake(runs: &[IntakeRun]) {
    println!(
        "{:<8} {:>7} {:>11} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>11} {:>9} {:>6} {:>8} {:>11}",
        "mode",
        "daemons",
        "conns x win",
        "acked/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "daemon us",
        "nats us",
        "busy",
        "fsync us",
        "idle cores"
    );
    let ms = |us: u32| f64::from(us) / 1000.0;
    for r in runs {
        println!(
            "{:<8} {:>7} {:>11} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.1} {:>6} {:>11.1} {:>9.1} {:>5.0}% {:>8} {:>11}",
            r.mode,
            r.daemons,
            format!("{} x {}", r.connections, r.window),
            r.rate,
            ms(r.latency.p50_us),
            ms(r.latency.p90_us),
            ms(r.latency.p99_us),
            ms(r.latency.max_us),
            r.errors,
            r.daemon_us_per_ack,
            r.nats_us_per_ack,
            r.machine_busy * 100.0,
            r.fsync_p50_us,
            format!("{:.2} / {:.2}", r.idle_daemon_cores, r.idle_nats_cores)
        );
        if let Some(e) = &r.first_error {
            println!("         first error: {e}");
        }
        if r.coalesced > 0 {
            println!("         WARNING: {} edits coalesced", r.coalesced);
        }
    }
    let shapes: std::collections::BTreeSet<_> =
        runs.iter().map(|r| (r.connections, r.window)).collect();
    for (conns, window) in shapes.into_iter().rev() {
        let find = |mode: &str| {
            runs.iter()
                .find(|r| r.mode == mode && r.window == window && r.connections == conns)
        };
        let Some(s) = find("sled") else { continue };
        for c in ["cluster", "direct"].into_iter().filter_map(find) {
            println!(
                "{conns} x {window}: {} / sled anchor = {:.3}x the rate, {:.1}x the p50, {:.1}x the p99",
                c.mode,
                c.rate / s.rate.max(1e-9),
                f64::from(c.latency.p50_us) / f64::from(s.latency.p50_us.max(1)),
                f64::from(c.latency.p99_us) / f64::from(s.latency.p99_us.max(1))
            );
        }
    }
    println!("(daemon us / nats us: CPU time of the daemon processes / the nats-server processes in the measured interval per acknowledged edit; busy: the machine's CPUs over it; fsync us: one 4 KiB append + fdatasync just before, p50; idle cores: daemons / nats-servers over 2 s without load just before)");
}
