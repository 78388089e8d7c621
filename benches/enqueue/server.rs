//! The server: the sandbox Zoom with delivery held and, per run, a disk probe, a fresh daemon
//! in this process (`common/embed.rs`) and the load generator as a child process (this
//! executable again, with `--client`), whose marks bound the measured interval of the
//! server's CPU time.

use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use zoomq::sandbox::Sandbox;

use crate::client::LoadReport;
use crate::embed::Embedded;
use crate::fsync::{fsync_probe, PROBE_WRITES};
use crate::latency::percentile;
use crate::load::{self, CONTENT_BYTES};
use crate::report::{print_table, print_targets, RunReport};
use crate::{disk, proc, Args, Load, ACCOUNT, MARK_END, MARK_START};

pub async fn server(args: Args) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    load::check_request_shape(ACCOUNT)?;
    let line_bytes = load::request_line(0, 0, ACCOUNT).len();

    // An hour per token: the dispatcher never gets one, so it never sends; intake only.
    let sandbox = load::held_sandbox().await?;

    println!("zoomq durable enqueue: intake only (the sandbox withholds OAuth tokens, so the dispatcher sends nothing)");
    println!(
        "  each edit: distinct message id, {CONTENT_BYTES}-byte JSON content, {line_bytes} bytes per request line"
    );
    println!(
        "  daemon + sandbox: this process, tokio multi-thread runtime ({} workers); load generator: child process, current-thread runtime",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  data dirs under {} (a fresh one per run); warm-up {} s before each measured interval",
        parent.display(),
        args.warmup
    );
    println!(
        "  before each run, a disk probe: {PROBE_WRITES} appends of 4 KiB, then {PROBE_WRITES} overwrites, each + fdatasync"
    );

    let mut reports = Vec::new();
    for kind in &args.runs {
        let load = Load::of(*kind, &args);
        let probe =
            tokio::task::block_in_place(|| fsync_probe(&parent, "zoomq-bench-probe-", true))?;
        print!(
            "  disk probe p50 {} us (append), {} us (overwrite); running {} ...",
            percentile(&probe.append, 50.0),
            percentile(&probe.overwrite, 50.0),
            load.kind.name()
        );
        std::io::stdout().flush().ok();
        let mut report = run_once(&sandbox, &parent, &args, load).await?;
        report.fsync_p50_us = percentile(&probe.append, 50.0);
        report.fsync_p99_us = percentile(&probe.append, 99.0);
        report.fsync_overwrite_p50_us = percentile(&probe.overwrite, 50.0);
        report.fsync_overwrite_p99_us = percentile(&probe.overwrite, 99.0);
        println!(
            " {:.0} acked edits/s, {:.1} us of daemon CPU per edit",
            report.load.rate, report.cpu_us_per_ack
        );
        reports.push(report);
    }
    sandbox.shutdown().await;

    println!();
    print_table(&reports);
    print_targets(&reports);
    let line = json!({
        "bench": "enqueue",
        "content_bytes": CONTENT_BYTES,
        "line_bytes": line_bytes,
        "warmup_seconds": args.warmup,
        "dir": parent,
        "runs": reports,
    });
    println!("{line}");
    Ok(())
}

/// Starts a daemon on a fresh directory, runs one child load generator against it, stops it.
async fn run_once(
    sandbox: &Sandbox,
    parent: &Path,
    args: &Args,
    load: Load,
) -> anyhow::Result<RunReport> {
    let dir = tempfile::Builder::new()
        .prefix("zoomq-bench-")
        .tempdir_in(parent)
        .context("cannot create the run's directory")?;
    // Release defaults, aimed at the sandbox, with metrics off.
    let mut config = sandbox.daemon_config(dir.path());
    // Outside the measurement: the dispatcher's claimed jobs wait for a token that never comes,
    // and stopping would otherwise wait the default 10 s for them after every run.
    config.delivery.shutdown_timeout = Duration::from_millis(500);
    let data = config.storage.path.clone();
    let daemon = Embedded::start(config).await?;

    let cpu_before = proc::cpu_time("self");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--client")
        .arg("--socket")
        .arg(&daemon.socket)
        .arg(format!("--connections={}", load.connections))
        .arg(format!("--window={}", load.window))
        .arg(format!("--seconds={}", load.seconds))
        .arg(format!("--warmup={}", args.warmup))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run the load generator")?;
    // The server's CPU time at the client's marks bounds the measured interval's share.
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let (mut cpu_start, mut cpu_end, mut last) = (None, None, String::new());
    while let Some(line) = lines.next_line().await? {
        match line.as_str() {
            MARK_START => cpu_start = Some(proc::cpu_time("self")),
            MARK_END => cpu_end = Some(proc::cpu_time("self")),
            _ => last = line,
        }
    }
    let status = child.wait().await?;
    let daemon_cpu_seconds = (proc::cpu_time("self") - cpu_before).as_secs_f64();
    anyhow::ensure!(status.success(), "the load generator failed ({status})");
    let report: LoadReport = serde_json::from_str(&last)
        .with_context(|| format!("the load generator printed {last:?}"))?;
    let (Some(cpu_start), Some(cpu_end)) = (cpu_start, cpu_end) else {
        anyhow::bail!("the load generator did not mark the measured interval");
    };
    let daemon_cpu_measured_seconds = (cpu_end - cpu_start).as_secs_f64();
    let cpu_us_per_ack = daemon_cpu_measured_seconds * 1e6 / report.acked_measured.max(1) as f64;

    let stats = daemon.stats().await?;
    daemon.stop().await?;
    let disk_bytes = tokio::task::block_in_place(|| disk::usage(&data).size());
    Ok(RunReport {
        run: load.kind.name(),
        connections: load.connections,
        window: load.window,
        seconds: load.seconds,
        warmup_seconds: args.warmup,
        load: report,
        daemon_cpu_seconds,
        daemon_cpu_measured_seconds,
        cpu_us_per_ack,
        fsync_p50_us: 0,
        fsync_p99_us: 0,
        fsync_overwrite_p50_us: 0,
        fsync_overwrite_p99_us: 0,
        daemon_accepted: stats["accepted"].as_u64().unwrap_or(0),
        disk_bytes,
    })
}
