//! Durable-enqueue benchmark (BENCHMARKS.md, "Durable enqueue"): how many edits per second zoomq
//! acknowledges, and how long an acknowledgement takes, when every answer waits for an fsync.
//!
//! The executable plays two roles:
//! - by default the *server*: it starts the sandbox Zoom and the real daemon ([`zoomq::run`], the
//!   code `zoomq serve` runs, with release defaults and `metrics.listen = ""`) on one tokio
//!   multi-thread runtime, as `zoomq serve` does, with a fresh data directory per scenario. It
//!   runs each scenario's load generator as a child process (this executable again, with
//!   `--client`), so producers and daemon share the machine's cores but no runtime or thread.
//! - with `--client`, the *load generator*: `--connections` connections on a current-thread
//!   runtime, each keeping `--window` requests outstanding, printing one JSON line of results.
//!
//! The sandbox's token endpoint is told to take an hour, so the dispatcher never obtains a token
//! and sends nothing: the figures are intake only (read, parse, index, group commit, fsync,
//! answer). Every edit names a distinct message, so nothing coalesces, and carries a `content`
//! object of exactly 1024 bytes of JSON.
//!
//! Runs (`--runs`): **pipelined**, `--connections` (64) connections each keeping `--window` (4)
//! requests outstanding; **window1**, the same connections with one request outstanding each
//! (as `redis-benchmark -P 1`); **single**, one connection sending one edit at a time.
//!
//! Measuring: the load runs `--warmup` seconds before the measured `--seconds`. The rate counts
//! answers read inside the measured interval; latency (from just before a request is written to
//! when its answer line has been read) is recorded for requests sent inside it, including those
//! whose answers arrive while the connection drains after it. Percentiles are nearest-rank over
//! every sample, in microseconds.
//!
//! Daemon CPU per acknowledged edit: the load generator prints a mark on its stdout when the
//! measured interval starts and another when it ends; at each mark the server reads its own
//! user + system CPU time (`/proc/self/stat`, 10 ms resolution) and divides the difference by
//! the edits acknowledged inside the interval. It counts every thread of the server process:
//! the daemon's tokio workers (framing, parsing, answers), its group-commit thread and sled's
//! threads, plus the sandbox, which only holds one token request open, and the bench's own
//! reading of the marks (negligible). It leaves out the load generator (its own process,
//! reported apart as `cpu_seconds`) and kernel work charged to no process of the run, such as
//! the filesystem's journal thread and the block layer's flush work.
//!
//! fdatasync anchor: before each run, 200 appends of 4 KiB to a fresh file in the data
//! directory's parent, then 200 overwrites of those blocks, each followed by `fdatasync`, are
//! timed ("disk probe"): the floor under any durable acknowledgement on that filesystem at that
//! moment (an append also commits the file's new size; an overwrite does not), and the anchor
//! of the single connection's latency.

#[path = "common/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "common/proc.rs"]
mod proc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use zoomq::sandbox::{Sandbox, SandboxConfig};

/// Size of every edit's `content` object, serialized.
const CONTENT_BYTES: usize = 1024;
/// The load generator's stdout lines at the start and the end of the measured interval.
const MARK_START: &str = r#"{"mark":"start"}"#;
const MARK_END: &str = r#"{"mark":"end"}"#;
/// The targets of BENCHMARKS.md, "Durable enqueue", that need no anchor from another program
/// (the Redis ratios are checked by scripts/bench-enqueue.sh).
const PIPELINED_RATE_TARGET: f64 = 60_000.0;
const WINDOW1_P99_TARGET_US: u32 = 5_000;
const SINGLE_P50_TARGET_US: u32 = 300;

#[derive(Debug, Clone, Parser)]
#[command(about = "zoomq durable-enqueue benchmark (see BENCHMARKS.md)")]
struct Args {
    /// Measured seconds of each multi-connection run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Outstanding requests per connection in the pipelined run.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Connections of the multi-connection runs.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured seconds of the one-connection, one-at-a-time run.
    #[arg(long, default_value_t = 5.0)]
    single_seconds: f64,
    /// Seconds of load before measuring starts, in every run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Parent of the daemon's per-run data directories (default: the system's temp dir). Put it
    /// on the filesystem you want to measure.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs to do, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pipelined,window1,single"
    )]
    runs: Vec<RunKind>,
    /// Internal: be the load generator for the daemon at --socket.
    #[arg(long, hide = true)]
    client: bool,
    #[arg(long, hide = true)]
    socket: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RunKind {
    /// `--connections` connections, `--window` outstanding requests each.
    Pipelined,
    /// `--connections` connections, one outstanding request each (as redis-benchmark -P 1).
    Window1,
    /// One connection: send, wait for the answer, repeat.
    Single,
}

/// One run's load, as the server asks the client for it.
#[derive(Debug, Clone, Copy)]
struct Load {
    kind: RunKind,
    connections: usize,
    window: usize,
    seconds: f64,
}

/// What the load generator measured; printed by the client as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LoadReport {
    /// Acknowledged edits whose answer was read inside the measured interval.
    acked_measured: u64,
    /// Acknowledged edits over the whole run, warm-up and drain included.
    acked_total: u64,
    rate: f64,
    samples: usize,
    p50_us: u32,
    p90_us: u32,
    p99_us: u32,
    max_us: u32,
    /// Answers other than `ok:true`, and the first of them.
    errors: u64,
    first_error: Option<String>,
    /// `coalesced:true` answers; must be 0 since every message id is distinct.
    coalesced: u64,
    /// CPU time (user + system) of the client process.
    cpu_seconds: f64,
}

/// A run's figures as the server reports them.
#[derive(Debug, Clone, Serialize)]
struct RunReport {
    run: &'static str,
    connections: usize,
    window: usize,
    seconds: f64,
    warmup_seconds: f64,
    #[serde(flatten)]
    load: LoadReport,
    /// CPU time of the server process (daemon and idle sandbox) over the whole run, warm-up and
    /// drain included.
    daemon_cpu_seconds: f64,
    /// CPU time of the server process inside the measured interval (between the load
    /// generator's marks), and that divided by `acked_measured`, in microseconds.
    daemon_cpu_measured_seconds: f64,
    cpu_us_per_ack: f64,
    /// The disk probe just before this run: 4 KiB append + `fdatasync`, p50 and p99; 4 KiB
    /// overwrite + `fdatasync`, p50 and p99.
    fsync_p50_us: u32,
    fsync_p99_us: u32,
    fsync_overwrite_p50_us: u32,
    fsync_overwrite_p99_us: u32,
    /// `accepted` from the daemon's `stats` after the run.
    daemon_accepted: u64,
    /// Size of the data directory after the run (the larger of apparent and allocated).
    disk_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The token endpoint's delay makes token errors and stuck in-flight jobs at
                // shutdown expected; anything else at error level is shown.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new("error,zoomq::zoom=off,zoomq::dispatch=off")
                }),
        )
        .init();
    if args.client {
        // The client stays on one thread so it takes as little CPU from the daemon as it can.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let report = runtime.block_on(client(&args))?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server(args))
}

// ---------------------------------------------------------------------------------------------
// Server: sandbox, daemon, one child load generator per run.

async fn server(args: Args) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    check_request_shape()?;

    let sandbox = Sandbox::start(SandboxConfig::default())
        .await
        .context("cannot start the sandbox")?;
    // An hour per token: the dispatcher never gets one, so it never sends; intake only.
    sandbox.set_token_delay(Duration::from_secs(3600));

    println!("zoomq durable enqueue: intake only (the sandbox withholds OAuth tokens, so the dispatcher sends nothing)");
    println!(
        "  each edit: distinct message id, {CONTENT_BYTES}-byte JSON content, {} bytes per request line",
        request_line(0, 0).len()
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
        let load = match kind {
            RunKind::Pipelined => Load {
                kind: *kind,
                connections: args.connections,
                window: args.window,
                seconds: args.seconds,
            },
            RunKind::Window1 => Load {
                kind: *kind,
                connections: args.connections,
                window: 1,
                seconds: args.seconds,
            },
            RunKind::Single => Load {
                kind: *kind,
                connections: 1,
                window: 1,
                seconds: args.single_seconds,
            },
        };
        let probe = tokio::task::block_in_place(|| fsync_probe(&parent))?;
        print!(
            "  disk probe p50 {} us (append), {} us (overwrite); running {} ...",
            percentile(&probe.append, 50.0),
            percentile(&probe.overwrite, 50.0),
            run_name(load.kind)
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
        "line_bytes": request_line(0, 0).len(),
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
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    let socket = config.socket.path.clone();
    let data = config.storage.path.clone();
    let listener = zoomq::bind_socket(&config.socket)?;
    let cancel = CancellationToken::new();
    let daemon = tokio::spawn(zoomq::run(config, listener, cancel.clone()));
    // The daemon accepts only once its queue is open; a ping waits for that.
    zoomq::client::request(&socket, &json!({"op": "ping"}))
        .await
        .context("the daemon did not answer a ping")?;

    let cpu_before = proc::cpu_time("self");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--client")
        .arg("--socket")
        .arg(&socket)
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

    let stats = zoomq::client::request(&socket, &json!({"op": "stats"})).await?;
    cancel.cancel();
    daemon.await??;
    let disk_bytes = tokio::task::block_in_place(|| disk::usage(&data).size());
    Ok(RunReport {
        run: run_name(load.kind),
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

fn run_name(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Pipelined => "pipelined",
        RunKind::Window1 => "window1",
        RunKind::Single => "single",
    }
}

fn print_table(reports: &[RunReport]) {
    println!(
        "{:<10} {:>5} {:>6} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "run",
        "conns",
        "window",
        "secs",
        "acked/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "errors",
        "us/ack",
        "srv cpu",
        "cli cpu",
        "fsync ms",
        "disk MiB"
    );
    let ms = |us: u32| f64::from(us) / 1000.0;
    for r in reports {
        // CPU as cores busy over the run (warm-up and drain are in both numbers).
        let wall = r.seconds + r.warmup_seconds;
        println!(
            "{:<10} {:>5} {:>6} {:>5} {:>10.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>6} {:>8.1} {:>8.2} {:>8.2} {:>8.3} {:>8.1}",
            r.run,
            r.connections,
            r.window,
            r.seconds,
            r.load.rate,
            ms(r.load.p50_us),
            ms(r.load.p90_us),
            ms(r.load.p99_us),
            ms(r.load.max_us),
            r.load.errors,
            r.cpu_us_per_ack,
            r.daemon_cpu_seconds / wall,
            r.load.cpu_seconds / wall,
            ms(r.fsync_p50_us),
            r.disk_bytes as f64 / (1024.0 * 1024.0),
        );
        if let Some(error) = &r.load.first_error {
            println!("           first error: {error}");
        }
        if r.load.coalesced > 0 {
            println!("           WARNING: {} edits coalesced", r.load.coalesced);
        }
    }
    println!(
        "(us/ack: the daemon process's CPU time in the measured interval per acknowledged edit;"
    );
    println!(
        " srv cpu / cli cpu: cores kept busy by the daemon's process / the load generator over the"
    );
    println!(" whole run, warm-up included; fsync ms: p50 of the disk probe's appends just before");
    println!(" the run)");
}

/// The targets that need no other program's figure; the script adds the Redis ratios.
fn print_targets(reports: &[RunReport]) {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let ms = |us: u32| f64::from(us) / 1000.0;
    if let Some(r) = reports.iter().find(|r| r.run == "pipelined") {
        println!(
            "target pipelined ({} x {}) >= {PIPELINED_RATE_TARGET:.0} acked edits/s: {:.0}/s \
             (p50 {:.3} ms, p99 {:.3} ms, {:.1} us CPU/edit), {}",
            r.connections,
            r.window,
            r.load.rate,
            ms(r.load.p50_us),
            ms(r.load.p99_us),
            r.cpu_us_per_ack,
            verdict(r.load.rate >= PIPELINED_RATE_TARGET)
        );
    }
    if let Some(r) = reports.iter().find(|r| r.run == "window1") {
        println!(
            "target window1 ({} x 1) p99 < {} ms: {:.3} ms ({:.0}/s, p50 {:.3} ms, {:.1} us \
             CPU/edit), {}",
            r.connections,
            ms(WINDOW1_P99_TARGET_US),
            ms(r.load.p99_us),
            r.load.rate,
            ms(r.load.p50_us),
            r.cpu_us_per_ack,
            verdict(r.load.p99_us < WINDOW1_P99_TARGET_US)
        );
    }
    if let Some(r) = reports.iter().find(|r| r.run == "single") {
        println!(
            "target single p50 < {} ms: {:.3} ms (fdatasync p50 just before: {:.3} ms after an \
             append, {:.3} ms after an overwrite; {:.1} us CPU/edit), {}",
            ms(SINGLE_P50_TARGET_US),
            ms(r.load.p50_us),
            ms(r.fsync_p50_us),
            ms(r.fsync_overwrite_p50_us),
            r.cpu_us_per_ack,
            verdict(r.load.p50_us < SINGLE_P50_TARGET_US)
        );
    }
    println!("(the Redis-relative targets are checked by scripts/bench-enqueue.sh)");
}

/// Writes (each + `fdatasync`) timed by each half of the disk probe.
const PROBE_WRITES: usize = 200;

/// The disk probe: sorted latencies, in microseconds, of writing 4 KiB and `fdatasync`ing it
/// (`sync_data`) in a fresh file under `parent`: first [`PROBE_WRITES`] appends, each of which
/// grows the file (so the file system also commits its size: the cost of a log that appends),
/// then as many overwrites of those blocks, which change no metadata `fdatasync` must write
/// (the cost of a log that writes into space it allocated before). Either is a floor under a
/// durable acknowledgement that needs one such write on this filesystem.
fn fsync_probe(parent: &Path) -> anyhow::Result<Probe> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::Builder::new()
        .prefix("zoomq-bench-probe-")
        .tempdir_in(parent)?;
    let mut file = std::fs::File::create(dir.path().join("probe"))?;
    let block = vec![b'x'; 4096];
    let mut append = Vec::with_capacity(PROBE_WRITES);
    for _ in 0..PROBE_WRITES {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        append.push(micros(started.elapsed()));
    }
    let mut overwrite = Vec::with_capacity(PROBE_WRITES);
    for n in 0..PROBE_WRITES {
        let started = Instant::now();
        file.write_all_at(&block, (n * block.len()) as u64)?;
        file.sync_data()?;
        overwrite.push(micros(started.elapsed()));
    }
    append.sort_unstable();
    overwrite.sort_unstable();
    Ok(Probe { append, overwrite })
}

/// The disk probe's sorted latencies in microseconds.
struct Probe {
    append: Vec<u32>,
    overwrite: Vec<u32>,
}

// ---------------------------------------------------------------------------------------------
// Client: the load generator.

/// The measured interval, shared by every connection of a run.
#[derive(Debug, Clone, Copy)]
struct Clock {
    measure_from: Instant,
    until: Instant,
}

/// One connection's results.
#[derive(Debug, Default)]
struct ConnReport {
    latencies_us: Vec<u32>,
    acked_measured: u64,
    acked_total: u64,
    errors: u64,
    first_error: Option<String>,
    coalesced: u64,
}

async fn client(args: &Args) -> anyhow::Result<LoadReport> {
    let socket = args.socket.as_ref().context("--client needs --socket")?;
    anyhow::ensure!(args.connections >= 1 && args.window >= 1);
    let mut streams = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        streams.push(
            UnixStream::connect(socket)
                .await
                .with_context(|| format!("cannot connect to {}", socket.display()))?,
        );
    }
    // Everyone starts together, once all connections are up.
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let clock = Clock {
        measure_from,
        until: measure_from + Duration::from_secs_f64(args.seconds),
    };
    // Marks the measured interval on stdout, for the server's CPU accounting.
    let marks = tokio::spawn(async move {
        tokio::time::sleep_until(clock.measure_from.into()).await;
        println!("{MARK_START}");
        tokio::time::sleep_until(clock.until.into()).await;
        println!("{MARK_END}");
    });
    let mut tasks = Vec::with_capacity(streams.len());
    for (conn, stream) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(drive(conn, stream, args.window, clock)));
    }
    let mut total = ConnReport::default();
    for task in tasks {
        let conn = task.await??;
        total.latencies_us.extend(conn.latencies_us);
        total.acked_measured += conn.acked_measured;
        total.acked_total += conn.acked_total;
        total.errors += conn.errors;
        total.coalesced += conn.coalesced;
        if total.first_error.is_none() {
            total.first_error = conn.first_error;
        }
    }
    // The last answers can come before the end mark's timer fires (tokio's timers have 1 ms
    // resolution); the mark must still be printed before the report.
    marks.await?;
    let mut latencies = total.latencies_us;
    latencies.sort_unstable();
    Ok(LoadReport {
        acked_measured: total.acked_measured,
        acked_total: total.acked_total,
        rate: total.acked_measured as f64 / args.seconds,
        samples: latencies.len(),
        p50_us: percentile(&latencies, 50.0),
        p90_us: percentile(&latencies, 90.0),
        p99_us: percentile(&latencies, 99.0),
        max_us: latencies.last().copied().unwrap_or(0),
        errors: total.errors,
        first_error: total.first_error,
        coalesced: total.coalesced,
        cpu_seconds: proc::cpu_time("self").as_secs_f64(),
    })
}

/// Drives one connection: the writer keeps up to `window` requests outstanding and writes every
/// free slot's request in one `write`; the reader matches answers (which come in order) to
/// their send times, which the writer queues *before* writing so the reader never waits for one.
async fn drive(
    conn: usize,
    stream: UnixStream,
    window: usize,
    clock: Clock,
) -> anyhow::Result<ConnReport> {
    let (reader, mut writer) = stream.into_split();
    let slots = Semaphore::new(window);
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel::<Instant>();

    let write_side = async {
        let mut seq = 0u64;
        let mut batch = Vec::with_capacity(window * (request_line(0, 0).len() + 16));
        loop {
            slots.acquire().await?.forget();
            let extra = slots.available_permits();
            if extra > 0 {
                slots.try_acquire_many(extra as u32)?.forget();
            }
            let sent_at = Instant::now();
            if sent_at >= clock.until {
                break;
            }
            batch.clear();
            for _ in 0..=extra {
                push_request(&mut batch, conn, seq);
                seq += 1;
                let _ = sent_tx.send(sent_at);
            }
            writer.write_all(&batch).await?;
        }
        // Closing the channel tells the reader to stop after the outstanding answers.
        drop(sent_tx);
        anyhow::Ok(())
    };

    let read_side = async {
        let mut report = ConnReport::default();
        let mut answers = BufReader::with_capacity(64 * 1024, reader);
        let mut line = Vec::with_capacity(256);
        while let Some(sent_at) = sent_rx.recv().await {
            line.clear();
            if answers.read_until(b'\n', &mut line).await? == 0 {
                anyhow::bail!("the daemon closed connection {conn}");
            }
            let now = Instant::now();
            slots.add_permits(1);
            if line.starts_with(b"{\"ok\":true") {
                report.acked_total += 1;
                if now >= clock.measure_from && now < clock.until {
                    report.acked_measured += 1;
                }
                if sent_at >= clock.measure_from {
                    report.latencies_us.push(micros(now - sent_at));
                }
                if memchr_str(&line, b"\"coalesced\":true") {
                    report.coalesced += 1;
                }
            } else {
                report.errors += 1;
                if report.first_error.is_none() {
                    report.first_error = Some(String::from_utf8_lossy(&line).trim().to_string());
                }
            }
        }
        anyhow::Ok(report)
    };

    let ((), report) = tokio::try_join!(write_side, read_side)?;
    Ok(report)
}

/// The request line of edit `seq` of connection `conn`.
fn request_line(conn: usize, seq: u64) -> Vec<u8> {
    let mut line = Vec::new();
    push_request(&mut line, conn, seq);
    line
}

/// Appends one edit request: a message id of its own and a `content` of exactly
/// [`CONTENT_BYTES`] bytes. Every piece is plain ASCII needing no JSON escaping.
fn push_request(out: &mut Vec<u8>, conn: usize, seq: u64) {
    const HEAD: &str = r#"{"head":{"text":"Build status"},"body":[{"type":"message","text":""#;
    const TAIL: &str = r#""}]}"#;
    const FILLER: &[u8] = b"step 3 of 7 done, all checks green; ";
    write!(
        out,
        r#"{{"op":"edit","message_id":"bench-{conn}-{seq}","account_id":"bench-account","robot_jid":"bench-bot@xmpp.zoom.us","content":{HEAD}"#
    )
    .expect("writing to a Vec");
    let text_len = CONTENT_BYTES - HEAD.len() - TAIL.len();
    out.extend(FILLER.iter().cycle().take(text_len));
    out.extend_from_slice(TAIL.as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Checks once that a request line is valid JSON with a content of [`CONTENT_BYTES`] bytes.
fn check_request_shape() -> anyhow::Result<()> {
    let line = request_line(3, 17);
    let value: serde_json::Value = serde_json::from_slice(&line)?;
    anyhow::ensure!(value["message_id"] == "bench-3-17" && line.ends_with(b"}\n"));
    let content = value["content"].to_string().len();
    anyhow::ensure!(content == CONTENT_BYTES, "content is {content} bytes");
    Ok(())
}

fn memchr_str(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest-rank percentile of sorted samples; 0 when there are none.
fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
