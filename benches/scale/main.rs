//! Scale benchmark (BENCHMARKS.md, "Scale"): what a backlog of a million pending edits costs the
//! daemon in memory, disk and restart time, how fast a restart with it serves and delivers
//! again, how fast it stops while Zoom hangs, and whether the disk space comes back once the
//! backlog is delivered.
//!
//! The real daemon runs as a separate process (`CARGO_BIN_EXE_zoomq serve`, release build, with
//! a generated configuration on a fresh temporary directory under `--dir`) so its memory can be
//! read from `/proc/PID/status`. Everything else runs in this process on one tokio runtime: the
//! sandbox Zoom and the producers, which talk to the daemon over its Unix socket like any bot.
//! The daemon keeps its release defaults (`storage.cache_capacity`, `max_pending` 1,000,000,
//! `delivery.concurrency`, `delivery.shutdown_timeout`, ...) except where a step below says
//! otherwise. From every spawn until its stop, the daemon's VmRSS is sampled every 50 ms, and
//! VmHWM is read just before the stop (`daemon.rs`).
//!
//! Steps:
//! 1. **Fill.** `--connections` connections, each keeping `--window` requests outstanding, send
//!    `--edits` edits, each of a distinct message id, spread round-robin over `--accounts`
//!    accounts, each with a `content` of `--content-bytes` (256) bytes of JSON. Delivery is
//!    held: the sandbox's token endpoint takes an hour, so the daemon never gets a token and
//!    sends nothing. The producers count the bytes of the request lines they send.
//! 2. **Memory and disk** with the backlog: VmRSS, VmHWM, RssAnon and RssFile of the daemon; the
//!    data directory's apparent size (sum of file lengths), its allocated size (blocks, as `du`)
//!    and sled's own figure (`zoomq_storage_size_bytes` from `/metrics`). Ratios use the larger
//!    of apparent and allocated. `--index-probe` (run as a child process) builds the in-memory
//!    index of the backlog alone ([`zoomq::queue::State`], as recovery does) and reports its
//!    resident memory and build time, to tell the index's share from sled's.
//! 3. **Restarts** (`restart.rs`). SIGTERM, start again; SIGKILL, start again; each start is
//!    timed from spawn until `{"op":"ping"}` is answered (the socket is bound before recovery,
//!    so the answer waits for it), and `stats` must show every edit pending or in flight. Then
//!    a start against a sandbox where every edit request hangs (its `slow` fault with
//!    probability 1 and a one-hour delay): once `delivery.concurrency` requests hang (or 10 s
//!    passed), SIGTERM, timed until the process is gone; then a start with delivery held must
//!    find every acknowledged edit pending.
//! 4. **Drain** (`drain.rs`). Restart against a second sandbox that answers at once, with
//!    accounts allowed 100,000 requests/s, `[accounts."<id>"] rate = --account-rate` and
//!    `delivery.concurrency = 64`; the time from spawn until the first edit request reaches the
//!    sandbox (its recorded arrival) is taken; deliver until nothing is left or `--drain-limit`
//!    seconds have passed (then the rate is extrapolated to the whole backlog). Every delivery
//!    must be a 200 at the sandbox, and a sample of 1,000 messages must show the content that
//!    was enqueued. Data directory size at every tenth, right after, after a graceful stop, and
//!    after a restart.
//! 5. **Refill** (unless `--no-refill`): hold delivery again and enqueue `--edits` new edits on
//!    the drained database, to see whether the space freed by the drain is reused. Steps 4 and
//!    5 repeat `--cycles` times; the largest data directory seen over them is compared with the
//!    one holding a single backlog (step 2).
//!
//! Output (`report.rs`): a table, one line per daemon process, one line per target (`met` or
//! `MISSED`), and one JSON line with every figure. A missed target is reported, not fatal; the
//! exit status is non-zero only when the benchmark itself fails.
//!
//! Files: `daemon.rs` (the daemon process, its configuration and memory sampling), `fill.rs`
//! (producers), `probe.rs` (the index alone), `restart.rs` (step 3), `drain.rs` (steps 4 and
//! 5), `report.rs` (targets, tables, JSON); `../common/` holds what other benches share.

#[path = "../common/disk.rs"]
mod disk;
#[path = "../common/host.rs"]
mod host;
#[path = "../common/logs.rs"]
mod logs;
#[allow(dead_code)]
#[path = "../common/proc.rs"]
mod proc;
#[allow(dead_code)]
#[path = "../common/spawn.rs"]
mod spawn;

mod daemon;
mod drain;
mod fill;
mod probe;
mod report;
mod restart;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::daemon::{Daemon, Kind};
use crate::report::{mb, progress, secs_text};

#[derive(Debug, Clone, Parser, Serialize)]
#[command(about = "zoomq scale benchmark (see BENCHMARKS.md)")]
pub struct Args {
    /// Pending edits to build up (each a distinct message).
    #[arg(long, default_value_t = 1_000_000)]
    pub edits: u64,
    /// Accounts the edits are spread over.
    #[arg(long, default_value_t = 100)]
    pub accounts: u64,
    /// Producer connections during the fill.
    #[arg(long, default_value_t = 64)]
    pub connections: u64,
    /// Outstanding requests per connection.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Size of each edit's `content` object, serialized.
    #[arg(long, default_value_t = 256)]
    pub content_bytes: usize,
    /// `[accounts."<id>"] rate` of every account while draining.
    #[arg(long, default_value_t = 5000.0)]
    pub account_rate: f64,
    /// Longest drain, in seconds; a drain cut short is extrapolated.
    #[arg(long, default_value_t = 600.0)]
    pub drain_limit: f64,
    /// Drain-and-refill cycles (steps 4 and 5).
    #[arg(long, default_value_t = 2)]
    pub cycles: u32,
    /// Skip step 5 (refill after the drain); implies one cycle.
    #[arg(long)]
    pub no_refill: bool,
    /// Parent of the daemon's temporary directory (default: the system's temp dir). Put it on
    /// the filesystem you want to measure.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    pub keep: bool,
    /// Internal: build the in-memory index alone and print its cost as one JSON line.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub index_probe: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.edits >= 1 && args.accounts >= 1 && args.connections >= 1);
    anyhow::ensure!(args.window >= 1 && args.content_bytes >= 128);
    if args.index_probe {
        return probe::index_probe(&args);
    }
    logs::init("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("zoomq-scale-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    let machine = report::machine(root.path());
    println!(
        "zoomq scale benchmark on {} at {}",
        machine["summary"],
        report::commit()
    );
    println!("directory {}", root.path().display());
    let mut daemon = Daemon::new(root.path())?;

    // 1. Fill, with delivery held: the token endpoint never answers in time.
    let held = Sandbox::start(SandboxConfig {
        token_delay: std::time::Duration::from_secs(3600),
        request_log_capacity: 0,
        ..SandboxConfig::default()
    })
    .await?;
    daemon.configure(&args, &held, None)?;
    let first = daemon.start("first start, fill", Kind::Fill).await?;
    progress(&format!("started in {}; filling", secs_text(first.ready)));
    let fill = fill::fill_queue(&args, &daemon, 0).await?;
    progress(&format!(
        "filled {} edits in {:.1} s ({:.0} edits/s, {:.1} MB of request lines)",
        fill.acked,
        fill.seconds,
        fill.rate,
        fill.request_bytes as f64 / 1e6
    ));
    anyhow::ensure!(fill.errors == 0, "edits refused: {:?}", fill.first_error);
    let backlog = daemon.settle(args.edits).await?;

    // 2. Memory and disk with the backlog; the index alone.
    let memory = daemon.memory()?;
    let disk = daemon.disk().await;
    progress(&format!("{memory}; {disk}"));
    let index = probe::run_index_probe(&args).await?;
    progress(&format!(
        "index alone: {} ({:.0} B/edit, VmHWM {}), built in {:.2} s",
        mb(index.bytes()),
        index.bytes() as f64 / args.edits as f64,
        mb(index.hwm_kib * 1024),
        index.seconds
    ));

    // 3. Restarts; leaves the daemon stopped.
    let restarts = restart::restarts(&args, &mut daemon, &held).await?;
    let sent_while_held = held.stats().requests_total;
    anyhow::ensure!(sent_while_held == 0, "{sent_while_held} edits reached Zoom");

    // 4 and 5. Drain at full speed, then refill; `--cycles` times.
    let n_cycles = if args.no_refill {
        1
    } else {
        args.cycles.max(1)
    };
    let mut cycles = Vec::new();
    for round in 1..=n_cycles {
        cycles.push(drain::drain_and_refill(&args, &mut daemon, &held, round).await?);
    }
    if daemon.is_running() {
        daemon.kill().await?;
    }
    held.shutdown().await;

    let run = report::Run {
        args: args.clone(),
        machine,
        fill,
        first,
        backlog,
        memory,
        disk,
        index,
        restarts,
        cycles,
        lives: std::mem::take(&mut daemon.lives),
    };
    let targets = run.targets();
    run.print(&targets);
    println!("load average at the end {}", host::loadavg());
    println!("{}", run.json(&targets)?);
    if args.keep {
        let kept = root.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}
