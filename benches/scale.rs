//! Scale benchmark (BENCHMARKS.md, "Scale"): what a backlog of a million pending edits costs the
//! daemon in memory, disk and restart time, and whether the disk space comes back once the
//! backlog is delivered.
//!
//! The real daemon runs as a separate process (`CARGO_BIN_EXE_zoomq serve`, release build, with
//! a generated configuration on a fresh temporary directory under `--dir`) so its memory can be
//! read from `/proc/PID/status`. Everything else runs in this process on one tokio runtime: the
//! sandbox Zoom and the producers, which talk to the daemon over its Unix socket like any bot.
//! The daemon keeps its release defaults (`storage.cache_capacity` 64 MiB, `max_pending`
//! 1,000,000, ...) except where a step below says otherwise.
//!
//! Steps:
//! 1. **Fill.** `--connections` connections, each keeping `--window` requests outstanding, send
//!    `--edits` edits, each of a distinct message id, spread round-robin over `--accounts`
//!    accounts, each with a `content` of `--content-bytes` bytes of JSON. Delivery is held: the
//!    sandbox's token endpoint takes an hour, so the daemon never gets a token and sends nothing.
//! 2. **Memory and disk** with the backlog: VmRSS, VmHWM, RssAnon and RssFile of the daemon; the
//!    data directory's apparent size (sum of file lengths), its allocated size (blocks, as `du`)
//!    and sled's own figure (`zoomq_storage_size_bytes` from `/metrics`).
//! 3. **Restarts.** SIGTERM, wait for the exit, start again; then SIGKILL and start again. Each
//!    start is timed from spawn until `{"op":"ping"}` is answered (the socket is bound before
//!    recovery, so the answer waits for it), and `stats` must show every edit pending or in
//!    flight.
//! 4. **Drain.** Restart against a second sandbox with no token delay, accounts allowed 100,000
//!    requests/s, `[accounts."<id>"] rate = --account-rate` and `delivery.concurrency = 64`, and
//!    deliver until nothing is left or `--drain-limit` seconds have passed (then the rate is
//!    extrapolated to the whole backlog). Every delivery must be a 200 at the sandbox, and a
//!    sample of 1,000 messages must show the content that was enqueued. Data directory size
//!    right after, after a graceful stop, and after a restart.
//! 5. **Refill** (unless `--no-refill`): hold delivery again and enqueue `--edits` new edits on
//!    the drained database, to see whether the space freed by the drain is reused. Steps 4 and
//!    5 repeat `--cycles` times, so a growing footprint shows.
//!
//! `--index-probe` (run by step 2 as a child process) builds the in-memory index of the backlog
//! alone ([`zoomq::queue::State`], as recovery does) and reports its resident memory and build
//! time, to tell the index's share of the daemon's memory and restart time from sled's.
//!
//! Output: a table, one line per target (`met` or `MISSED`), and one JSON line. A missed target
//! is reported, not fatal; the exit status is non-zero only when the benchmark itself fails.

#[path = "common/host.rs"]
mod host;

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use zoomq::sandbox::{AccountSettings, Sandbox, SandboxConfig};

/// The daemon's default `storage.max_pending`; raised in the configuration only above it.
const DEFAULT_MAX_PENDING: u64 = 1_000_000;
const RSS_TARGET_BYTES: u64 = 300_000_000;
const RESTART_TARGET: Duration = Duration::from_secs(3);
/// How long a start may take before the benchmark gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Parser, Serialize)]
#[command(about = "zoomq scale benchmark (see BENCHMARKS.md)")]
struct Args {
    /// Pending edits to build up (each a distinct message).
    #[arg(long, default_value_t = 1_000_000)]
    edits: u64,
    /// Accounts the edits are spread over.
    #[arg(long, default_value_t = 100)]
    accounts: u64,
    /// Producer connections during the fill.
    #[arg(long, default_value_t = 64)]
    connections: u64,
    /// Outstanding requests per connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Size of each edit's `content` object, serialized.
    #[arg(long, default_value_t = 1024)]
    content_bytes: usize,
    /// `[accounts."<id>"] rate` of every account while draining.
    #[arg(long, default_value_t = 5000.0)]
    account_rate: f64,
    /// Longest drain, in seconds; a drain cut short is extrapolated.
    #[arg(long, default_value_t = 600.0)]
    drain_limit: f64,
    /// Drain-and-refill cycles (steps 4 and 5).
    #[arg(long, default_value_t = 2)]
    cycles: u32,
    /// Skip step 5 (refill after the drain); implies one cycle.
    #[arg(long)]
    no_refill: bool,
    /// Parent of the daemon's temporary directory (default: the system's temp dir). Put it on
    /// the filesystem you want to measure.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the temporary directory (its path is printed).
    #[arg(long)]
    keep: bool,
    /// Internal: build the in-memory index alone and print its cost as one JSON line.
    #[arg(long, hide = true)]
    #[serde(skip)]
    index_probe: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    #[serde(skip)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.edits >= 1 && args.accounts >= 1 && args.connections >= 1);
    anyhow::ensure!(args.window >= 1 && args.content_bytes >= 128);
    if args.index_probe {
        return index_probe(&args);
    }
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
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = tempfile::Builder::new()
        .prefix("zoomq-scale-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    let machine = machine(root.path());
    println!(
        "zoomq scale benchmark on {} at {}",
        machine["summary"],
        commit()
    );
    println!("directory {}", root.path().display());
    let mut daemon = Daemon::new(root.path())?;
    let mut report = json!({
        "bench": "scale", "machine": machine, "args": &args, "commit": commit(),
    });

    // 1. Fill, with delivery held: the token endpoint never answers in time.
    let held = Sandbox::start(SandboxConfig {
        token_delay: Duration::from_secs(3600),
        request_log_capacity: 0,
        ..SandboxConfig::default()
    })
    .await?;
    daemon.configure(&args, &held, None)?;
    let first = daemon.start().await?;
    progress(&format!("started in {}; filling", secs_text(first.ready)));
    let fill = fill_queue(&args, &daemon, 0).await?;
    progress(&format!(
        "filled {} edits in {:.1} s ({:.0} edits/s)",
        fill.acked, fill.seconds, fill.rate
    ));
    anyhow::ensure!(fill.errors == 0, "edits refused: {:?}", fill.first_error);
    let backlog = daemon.settle(args.edits).await?;

    // 2. Memory and disk with the backlog.
    let memory = daemon.memory()?;
    let disk = daemon.disk().await;
    progress(&format!("{memory}; {disk}"));

    let index = run_index_probe(&args).await?;
    progress(&format!(
        "index alone: {} ({:.0} B/edit, VmHWM {}), built in {:.2} s",
        mb(index.bytes()),
        index.bytes() as f64 / args.edits as f64,
        mb(index.hwm_kib * 1024),
        index.seconds
    ));

    // 3. Restarts.
    let term_stop = daemon.terminate().await?;
    let term = daemon.start().await?;
    let term_backlog = daemon.settle(args.edits).await?;
    let term_memory = daemon.memory()?;
    progress(&format!(
        "SIGTERM: stopped in {}, ready in {} (recovery {} ms), {term_memory}",
        secs_text(term_stop),
        secs_text(term.ready),
        term.recovery_ms.unwrap_or(0)
    ));
    daemon.kill().await?;
    let kill = daemon.start().await?;
    let kill_backlog = daemon.settle(args.edits).await?;
    let kill_memory = daemon.memory()?;
    progress(&format!(
        "SIGKILL: ready in {} (recovery {} ms), {kill_memory}",
        secs_text(kill.ready),
        kill.recovery_ms.unwrap_or(0)
    ));
    let disk_after_kill = daemon.disk().await;
    let sent_while_held = held.stats().requests_total;
    anyhow::ensure!(sent_while_held == 0, "{sent_while_held} edits reached Zoom");

    // 4 and 5. Drain at full speed, then refill; `--cycles` times.
    daemon.terminate().await?;
    let n_cycles = if args.no_refill {
        1
    } else {
        args.cycles.max(1)
    };
    let mut cycles = Vec::new();
    for round in 1..=n_cycles {
        let cycle = drain_and_refill(&args, &mut daemon, &held, round).await?;
        cycles.push(cycle);
    }
    if daemon.child.is_some() {
        daemon.kill().await?;
    }
    held.shutdown().await;

    report["fill"] = json!({
        "seconds": fill.seconds, "rate": fill.rate, "acked": fill.acked,
        "rss_by_progress": fill.rss_by_progress, "start": first, "backlog": backlog,
    });
    report["backlog"] = json!({"memory": memory, "disk": disk, "index_alone": index});
    report["restarts"] = json!({
        "sigterm": {"stop_seconds": term_stop.as_secs_f64(), "start": term,
                    "backlog": term_backlog, "memory": term_memory},
        "sigkill": {"start": kill, "backlog": kill_backlog, "memory": kill_memory,
                    "disk": disk_after_kill},
    });
    report["cycles"] = serde_json::to_value(&cycles)?;

    let targets = vec![
        Target::new(
            "VmRSS with the backlog",
            "< 300 MB",
            mb(memory.rss_bytes()),
            memory.rss_bytes() < RSS_TARGET_BYTES,
        ),
        Target::new(
            "VmHWM with the backlog",
            "< 300 MB",
            mb(memory.hwm_bytes()),
            memory.hwm_bytes() < RSS_TARGET_BYTES,
        ),
        restart_target("restart after SIGTERM", &term, &term_backlog, args.edits),
        restart_target("restart after SIGKILL", &kill, &kill_backlog, args.edits),
    ];
    println!();
    print_table(&[
        (
            "fill rate",
            format!("{:.0} edits/s ({:.1} s)", fill.rate, fill.seconds),
        ),
        ("daemon memory with backlog", memory.to_string()),
        (
            "index alone (zoomq::queue::State)",
            format!(
                "{} ({:.0} B/edit; VmHWM {}), {:.2} s to build",
                mb(index.bytes()),
                index.bytes() as f64 / args.edits as f64,
                mb(index.hwm_kib * 1024),
                index.seconds
            ),
        ),
        (
            "data dir with backlog",
            format!(
                "{disk}, {:.0} B/edit",
                disk.apparent as f64 / args.edits as f64
            ),
        ),
        ("SIGTERM: stop", secs_text(term_stop)),
        ("SIGTERM: restart to ping", start_text(&term)),
        ("SIGTERM: memory after restart", term_memory.to_string()),
        ("SIGKILL: restart to ping", start_text(&kill)),
        ("SIGKILL: memory after restart", kill_memory.to_string()),
    ]);
    for (n, cycle) in cycles.iter().enumerate() {
        let row = |what: &str| format!("cycle {}: {what}", n + 1);
        let mut rows = vec![
            (row("start with backlog"), start_text(&cycle.start)),
            (row("drain"), cycle.drain.to_string()),
            (
                row("memory at end of drain"),
                cycle.memory_drained.to_string(),
            ),
            (row("data dir after drain"), cycle.disk_drained.to_string()),
            (row("data dir after stop"), cycle.disk_stopped.to_string()),
            (row("restart of drained db"), start_text(&cycle.restart)),
            (
                row("data dir after restart"),
                cycle.disk_restarted.to_string(),
            ),
            (
                row("memory after restart"),
                cycle.memory_restarted.to_string(),
            ),
        ];
        if let Some(refill) = &cycle.refill {
            rows.push((row("refill rate"), format!("{:.0} edits/s", refill.rate)));
            rows.push((row("data dir after refill"), refill.disk.to_string()));
            rows.push((row("memory after refill"), refill.memory.to_string()));
        }
        print_table(&rows);
    }
    println!();
    for t in &targets {
        println!(
            "target {} {}: {}, {}",
            t.what,
            t.target,
            t.measured,
            if t.met { "met" } else { "MISSED" }
        );
    }
    report["targets"] = serde_json::to_value(&targets)?;
    report["loadavg_end"] = json!(loadavg());
    println!("load average at the end {}", loadavg());
    println!("{report}");
    if args.keep {
        let kept = root.keep();
        println!("kept {}", kept.display());
    }
    Ok(())
}

/// The daemon process with its directory, configuration and log.
struct Daemon {
    socket: PathBuf,
    data: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    /// `metrics.listen`, for sled's own size figure.
    metrics_addr: std::net::SocketAddr,
    /// Set while the process runs; taken by `terminate` and `kill`.
    child: Option<Child>,
}

/// How a start went.
#[derive(Debug, Clone, Copy, Serialize)]
struct Started {
    /// From spawn until the socket answered a ping.
    #[serde(serialize_with = "ser_secs")]
    ready: Duration,
    /// `elapsed_ms` of the daemon's "queue recovered" log line.
    recovery_ms: Option<u64>,
}

/// The queue as `stats` shows it once a start or fill has settled.
#[derive(Debug, Clone, Copy, Serialize)]
struct Backlog {
    pending: u64,
    in_flight: u64,
}

impl Daemon {
    fn new(dir: &Path) -> anyhow::Result<Daemon> {
        // A free port for /metrics, kept for the daemon's whole life.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Daemon {
            socket: dir.join("zoomq.sock"),
            data: dir.join("data"),
            config_path: dir.join("zoomq.toml"),
            log_path: dir.join("daemon.log"),
            metrics_addr,
            child: None,
        })
    }

    /// Writes the configuration: delivery to `sandbox`, and with `account_rate` the fast
    /// drain settings (a rate per account, 64 requests in flight).
    fn configure(
        &self,
        args: &Args,
        sandbox: &Sandbox,
        account_rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let q = |s: &str| format!("{s:?}");
        let mut toml = String::new();
        writeln!(
            toml,
            "[socket]\npath = {}",
            q(&self.socket.display().to_string())
        )?;
        writeln!(
            toml,
            "[storage]\npath = {}",
            q(&self.data.display().to_string())
        )?;
        if args.edits > DEFAULT_MAX_PENDING {
            writeln!(toml, "max_pending = {}", args.edits)?;
        }
        writeln!(toml, "[zoom]\napi_base = {}", q(&sandbox.api_base()))?;
        writeln!(toml, "token_url = {}", q(&sandbox.token_url()))?;
        writeln!(toml, "client_id = \"sandbox-client\"")?;
        writeln!(toml, "client_secret = \"sandbox-secret\"")?;
        writeln!(
            toml,
            "[metrics]\nlisten = {}",
            q(&self.metrics_addr.to_string())
        )?;
        if let Some(rate) = account_rate {
            writeln!(toml, "[delivery]\nconcurrency = 64")?;
            for account in 0..args.accounts {
                writeln!(
                    toml,
                    "[accounts.{}]\nrate = {rate:?}",
                    q(&account_id(account))
                )?;
            }
        }
        std::fs::write(&self.config_path, toml)?;
        Ok(())
    }

    /// Spawns the daemon and waits until it answers a ping.
    async fn start(&mut self) -> anyhow::Result<Started> {
        anyhow::ensure!(self.child.is_none(), "already running");
        let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let spawned = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_zoomq"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start zoomq")?;
        self.child = Some(child);
        loop {
            if let Ok(answer) = call(&self.socket, &json!({"op": "ping"})).await {
                anyhow::ensure!(answer["ok"] == true, "ping answered {answer}");
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                anyhow::bail!(
                    "zoomq exited during start-up: {status}\n{}",
                    self.log_tail()
                );
            }
            anyhow::ensure!(
                spawned.elapsed() < START_TIMEOUT,
                "zoomq did not answer within {START_TIMEOUT:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ready = spawned.elapsed();
        let log = std::fs::read(&self.log_path).unwrap_or_default();
        let new_lines = String::from_utf8_lossy(&log[(log_offset as usize).min(log.len())..]);
        let recovery_ms = new_lines
            .lines()
            .filter(|line| line.contains("queue recovered"))
            .filter_map(|line| line.split_once("elapsed_ms="))
            .find_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        Ok(Started { ready, recovery_ms })
    }

    /// SIGTERM, then waits for the process to exit; returns how long that took.
    async fn terminate(&mut self) -> anyhow::Result<Duration> {
        let child = self.child.as_ref().context("not running")?;
        let started = Instant::now();
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        self.wait_exit(started).await
    }

    /// SIGKILL, then waits for the process to be gone.
    async fn kill(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.child.as_mut().context("not running")?.kill()?;
        self.wait_exit(started).await
    }

    async fn wait_exit(&mut self, started: Instant) -> anyhow::Result<Duration> {
        let child = self.child.as_mut().context("not running")?;
        while child.try_wait()?.is_none() {
            anyhow::ensure!(started.elapsed() < START_TIMEOUT, "zoomq did not exit");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.child = None;
        Ok(started.elapsed())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("not running")?.id())
    }

    async fn stats(&self) -> anyhow::Result<Value> {
        let stats = call(&self.socket, &json!({"op": "stats"})).await?;
        anyhow::ensure!(stats["ok"] == true, "stats answered {stats}");
        Ok(stats)
    }

    /// Checks that every one of `edits` edits is pending or in flight.
    async fn settle(&self, edits: u64) -> anyhow::Result<Backlog> {
        let stats = self.stats().await?;
        let backlog = Backlog {
            pending: stats["pending"].as_u64().unwrap_or(0),
            in_flight: stats["in_flight"].as_u64().unwrap_or(0),
        };
        anyhow::ensure!(
            backlog.pending + backlog.in_flight == edits,
            "expected {edits} edits pending or in flight, stats says {stats}"
        );
        Ok(backlog)
    }

    fn memory(&self) -> anyhow::Result<Memory> {
        let pid = self.pid()?;
        let field = |name: &str| read_status_kib(pid, name);
        Ok(Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
        })
    }

    async fn disk(&self) -> Disk {
        let (apparent, allocated, files) = dir_usage(&self.data);
        let sled = match &self.child {
            Some(_) => sled_size(self.metrics_addr).await,
            None => None,
        };
        Disk {
            apparent,
            allocated,
            files,
            sled,
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The daemon's memory, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Serialize)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

impl Memory {
    fn rss_bytes(&self) -> u64 {
        self.rss_kib * 1024
    }
    fn hwm_bytes(&self) -> u64 {
        self.hwm_kib * 1024
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
        write!(
            f,
            "VmRSS {:.1} MB (anon {:.1}, file {:.1}), VmHWM {:.1} MB",
            mb(self.rss_kib),
            mb(self.anon_kib),
            mb(self.file_kib),
            mb(self.hwm_kib)
        )
    }
}

/// The data directory's size.
#[derive(Debug, Clone, Copy, Serialize)]
struct Disk {
    /// Sum of file lengths.
    apparent: u64,
    /// Allocated blocks, as `du` counts them.
    allocated: u64,
    files: u64,
    /// sled's `size_on_disk`, while the daemon runs.
    sled: Option<u64>,
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |bytes: u64| bytes as f64 / 1e6;
        write!(
            f,
            "{:.1} MB in {} files ({:.1} MB allocated",
            mb(self.apparent),
            self.files,
            mb(self.allocated)
        )?;
        match self.sled {
            Some(sled) => write!(f, ", sled says {:.1} MB)", mb(sled)),
            None => write!(f, ")"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fill: the producers.

struct Fill {
    acked: u64,
    seconds: f64,
    rate: f64,
    errors: u64,
    first_error: Option<String>,
    /// `[share acknowledged, seconds, VmRSS MB]` at every tenth of the fill.
    rss_by_progress: Vec<[f64; 3]>,
}

/// What each edit looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Fill number: 0 for the first fill, then the cycle whose refill this is.
    round: u32,
    connections: u64,
    accounts: u64,
    edits: u64,
    content_bytes: usize,
}

async fn fill_queue(args: &Args, daemon: &Daemon, round: u32) -> anyhow::Result<Fill> {
    let shape = Shape {
        round,
        connections: args.connections,
        accounts: args.accounts,
        edits: args.edits,
        content_bytes: args.content_bytes,
    };
    check_shape(shape)?;
    let mut streams = Vec::new();
    for _ in 0..args.connections {
        streams.push(UnixStream::connect(&daemon.socket).await?);
    }
    let acked = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let started = Instant::now();
    let sampler = tokio::spawn(sample_rss(
        daemon.pid()?,
        acked.clone(),
        args.edits,
        started,
        done.clone(),
    ));
    let mut tasks = Vec::new();
    for (conn, stream) in streams.into_iter().enumerate() {
        tasks.push(tokio::spawn(produce(
            stream,
            conn as u64,
            shape,
            args.window,
            acked.clone(),
        )));
    }
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (n_errors, error) = task.await??;
        errors += n_errors;
        first_error = first_error.or(error);
    }
    let seconds = started.elapsed().as_secs_f64();
    done.cancel();
    let rss_by_progress = sampler.await?;
    let acked = acked.load(Ordering::Relaxed);
    Ok(Fill {
        acked,
        seconds,
        rate: acked as f64 / seconds,
        errors,
        first_error,
        rss_by_progress,
    })
}

/// One connection: edits `conn`, `conn + connections`, ... with up to `window` outstanding,
/// every free slot's requests written at once. Returns the refusals and the first of them.
async fn produce(
    stream: UnixStream,
    conn: u64,
    shape: Shape,
    window: usize,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<(u64, Option<String>)> {
    let total = if conn < shape.edits {
        (shape.edits - conn).div_ceil(shape.connections)
    } else {
        0
    };
    let (reader, mut writer) = stream.into_split();
    let slots = Semaphore::new(window);
    let write_side = async {
        let mut sent = 0u64;
        let mut batch = Vec::new();
        while sent < total {
            slots.acquire().await?.forget();
            let extra = (slots.available_permits() as u64).min(total - sent - 1);
            if extra > 0 {
                slots.try_acquire_many(extra as u32)?.forget();
            }
            batch.clear();
            for _ in 0..=extra {
                push_edit(&mut batch, shape, conn + sent * shape.connections);
                sent += 1;
            }
            writer.write_all(&batch).await?;
        }
        anyhow::Ok(())
    };
    let read_side = async {
        let mut answers = BufReader::with_capacity(64 * 1024, reader);
        let mut line = Vec::with_capacity(256);
        let mut errors = 0u64;
        let mut first_error = None;
        for _ in 0..total {
            line.clear();
            if answers.read_until(b'\n', &mut line).await? == 0 {
                anyhow::bail!("the daemon closed connection {conn}");
            }
            slots.add_permits(1);
            if line.starts_with(b"{\"ok\":true") {
                acked.fetch_add(1, Ordering::Relaxed);
            } else {
                errors += 1;
                first_error.get_or_insert_with(|| String::from_utf8_lossy(&line).into_owned());
            }
        }
        anyhow::Ok((errors, first_error))
    };
    let ((), outcome) = tokio::try_join!(write_side, read_side)?;
    Ok(outcome)
}

/// Appends the request line of edit `index`: message [`message_id`] on account
/// `acct-<index % accounts>`, whose content names the message (so a delivery can be checked)
/// and is padded to exactly `content_bytes`.
fn push_edit(out: &mut Vec<u8>, shape: Shape, index: u64) {
    const FILLER: &[u8] = b"step 3 of 7 done, all checks green; ";
    let message = message_id(shape.round, index);
    let head = format!(r#"{{"head":{{"text":"{message}"}},"body":[{{"type":"message","text":""#);
    const TAIL: &str = r#""}]}"#;
    write!(
        out,
        r#"{{"op":"edit","message_id":"{message}","account_id":"{}","robot_jid":"scale-bot@xmpp.zoom.us","content":{head}"#,
        account_id(index % shape.accounts)
    )
    .expect("writing to a Vec");
    let filler = shape.content_bytes.saturating_sub(head.len() + TAIL.len());
    out.extend(FILLER.iter().cycle().take(filler));
    out.extend_from_slice(TAIL.as_bytes());
    out.extend_from_slice(b"}\n");
}

fn check_shape(shape: Shape) -> anyhow::Result<()> {
    let mut line = Vec::new();
    push_edit(&mut line, shape, shape.edits - 1);
    let value: Value = serde_json::from_slice(&line)?;
    let content = value["content"].to_string().len();
    anyhow::ensure!(
        content == shape.content_bytes,
        "content is {content} bytes, not {}",
        shape.content_bytes
    );
    Ok(())
}

/// Samples the daemon's VmRSS at every tenth of the fill until `done`.
async fn sample_rss(
    pid: u32,
    acked: Arc<AtomicU64>,
    edits: u64,
    started: Instant,
    done: CancellationToken,
) -> Vec<[f64; 3]> {
    let mut samples = Vec::new();
    let mut next_tenth = 1;
    loop {
        let finished = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => false,
            _ = done.cancelled() => true,
        };
        let count = acked.load(Ordering::Relaxed);
        if count * 10 >= next_tenth * edits || finished {
            let rss = read_rss_kib(pid) as f64 * 1024.0 / 1e6;
            let share = count as f64 / edits as f64;
            samples.push([
                round2(share),
                round2(started.elapsed().as_secs_f64()),
                rss.round(),
            ]);
            while next_tenth <= 10 && count * 10 >= next_tenth * edits {
                next_tenth += 1;
            }
        }
        if finished {
            return samples;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The index alone.

/// What the in-memory index of the backlog costs by itself: measured in a fresh process (this
/// executable with `--index-probe`), so neither sled nor the sandbox is in the figures.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
struct IndexProbe {
    rss_before_kib: u64,
    rss_after_kib: u64,
    hwm_kib: u64,
    /// Time to restore every job into the index, as recovery does.
    seconds: f64,
}

impl IndexProbe {
    fn bytes(&self) -> u64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) * 1024
    }
}

async fn run_index_probe(args: &Args) -> anyhow::Result<IndexProbe> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--index-probe")
        .arg("--edits")
        .arg(args.edits.to_string())
        .arg("--accounts")
        .arg(args.accounts.to_string())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "index probe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Restores `--edits` pending jobs, named as the fill names them, into a fresh
/// [`zoomq::queue::State`], exactly as recovery does, and prints the resident memory it took.
fn index_probe(args: &Args) -> anyhow::Result<()> {
    let pid = std::process::id();
    let rss_before_kib = read_status_kib(pid, "VmRSS:");
    let started = Instant::now();
    let mut state = zoomq::queue::State::new(1);
    let mut message = String::new();
    for index in 0..args.edits {
        message.clear();
        write!(message, "m0-{index}")?;
        // Where recovery finds it: records of 30 entries, as 1 KiB edits fill them.
        let stored = zoomq::queue::Stored {
            loc: Some(zoomq::queue::Loc {
                record: 1 + index / 30,
                index: (index % 30) as u32,
            }),
            enqueued_ms: 1_700_000_000_000 + index,
            attempts: 0,
            first_failure_ms: None,
        };
        state.restore(
            &message,
            &account_id(index % args.accounts),
            index + 1,
            0,
            stored,
            0,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(state.pending() == args.edits);
    let probe = IndexProbe {
        rss_before_kib,
        rss_after_kib: read_status_kib(pid, "VmRSS:"),
        hwm_kib: read_status_kib(pid, "VmHWM:"),
        seconds,
    };
    println!("{}", serde_json::to_string(&probe)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Drain and refill.

/// One drain-and-refill cycle.
#[derive(Debug, Clone, Serialize)]
struct Cycle {
    /// Start of the draining daemon, with the whole backlog to recover.
    start: Started,
    drain: Drain,
    /// Messages whose content was checked at the sandbox.
    checked_messages: u64,
    memory_drained: Memory,
    disk_drained: Disk,
    stop_seconds: f64,
    disk_stopped: Disk,
    /// Start on the drained database.
    restart: Started,
    stats_restarted: Value,
    disk_restarted: Disk,
    memory_restarted: Memory,
    refill: Option<Refill>,
}

#[derive(Debug, Clone, Serialize)]
struct Refill {
    seconds: f64,
    rate: f64,
    disk: Disk,
    memory: Memory,
}

/// Step 4 (and 5 unless `--no-refill`) on a stopped daemon holding the backlog of fill
/// `round - 1`. Leaves the daemon running (refilled, delivery held) or stopped.
async fn drain_and_refill(
    args: &Args,
    daemon: &mut Daemon,
    held: &Sandbox,
    round: u32,
) -> anyhow::Result<Cycle> {
    let fast = Sandbox::start(SandboxConfig {
        accounts: (0..args.accounts)
            .map(|a| {
                let settings = AccountSettings {
                    capacity_per_second: Some(100_000),
                    ..AccountSettings::default()
                };
                (account_id(a), settings)
            })
            .collect(),
        request_log_capacity: 0,
        ..SandboxConfig::default()
    })
    .await?;
    daemon.configure(args, &fast, Some(args.account_rate))?;
    let start = daemon.start().await?;
    progress(&format!(
        "cycle {round}: draining (ready in {})",
        secs_text(start.ready)
    ));
    let drain = drain_queue(args, daemon).await?;
    let checked_messages = check_delivered(args, &fast, &drain, round - 1)?;
    let memory_drained = daemon.memory()?;
    let disk_drained = daemon.disk().await;
    let stop = daemon.terminate().await?;
    let disk_stopped = daemon.disk().await;
    let restart = daemon.start().await?;
    let stats_restarted = daemon.stats().await?;
    // Let sled's background work after a start settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let disk_restarted = daemon.disk().await;
    let memory_restarted = daemon.memory()?;
    progress(&format!(
        "cycle {round}: {drain}; data dir after drain {disk_drained}, after stop {disk_stopped}, \
         after restart {disk_restarted}"
    ));
    daemon.terminate().await?;
    fast.shutdown().await;
    let mut refill = None;
    if !args.no_refill {
        daemon.configure(args, held, None)?;
        daemon.start().await?;
        let fill = fill_queue(args, daemon, round).await?;
        anyhow::ensure!(fill.errors == 0, "edits refused: {:?}", fill.first_error);
        daemon.settle(args.edits).await?;
        let disk = daemon.disk().await;
        progress(&format!(
            "cycle {round}: refilled at {:.0} edits/s: {disk}",
            fill.rate
        ));
        refill = Some(Refill {
            seconds: fill.seconds,
            rate: fill.rate,
            disk,
            memory: daemon.memory()?,
        });
        daemon.terminate().await?;
    }
    Ok(Cycle {
        start,
        drain,
        checked_messages,
        memory_drained,
        disk_drained,
        stop_seconds: stop.as_secs_f64(),
        disk_stopped,
        restart,
        stats_restarted,
        disk_restarted,
        memory_restarted,
        refill,
    })
}

#[derive(Debug, Clone, Serialize)]
struct Drain {
    /// Edits delivered (the daemon's `delivered` counter).
    delivered: u64,
    /// Whether the whole backlog was delivered within `--drain-limit`.
    complete: bool,
    seconds: f64,
    rate: f64,
    /// Seconds the whole backlog takes at `rate` (equal to `seconds` when complete).
    full_seconds: f64,
    /// `[share delivered, seconds, VmRSS MB, data dir MB]` at every tenth of the drain.
    by_progress: Vec<[f64; 4]>,
}

impl std::fmt::Display for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} delivered in {:.1} s, {:.0} edits/s",
            self.delivered, self.seconds, self.rate
        )?;
        if !self.complete {
            write!(
                f,
                " (cut short; whole backlog ~{:.0} s at that rate)",
                self.full_seconds
            )?;
        }
        Ok(())
    }
}

async fn drain_queue(args: &Args, daemon: &Daemon) -> anyhow::Result<Drain> {
    let started = Instant::now();
    let limit = Duration::from_secs_f64(args.drain_limit);
    let pid = daemon.pid()?;
    let mut by_progress = Vec::new();
    let mut next_tenth = 1;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = daemon.stats().await?;
        let left =
            stats["pending"].as_u64().unwrap_or(0) + stats["in_flight"].as_u64().unwrap_or(0);
        let delivered = stats["delivered"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            stats["dead"] == 0 && stats["retries"] == 0,
            "delivery failures: {stats}"
        );
        let elapsed = started.elapsed();
        let complete = left == 0;
        if delivered * 10 >= next_tenth * args.edits || complete {
            let rss = read_rss_kib(pid) as f64 * 1024.0 / 1e6;
            let (apparent, _, _) = dir_usage(&daemon.data);
            by_progress.push([
                round2(delivered as f64 / args.edits as f64),
                round2(elapsed.as_secs_f64()),
                rss.round(),
                (apparent as f64 / 1e6).round(),
            ]);
            while next_tenth <= 10 && delivered * 10 >= next_tenth * args.edits {
                next_tenth += 1;
            }
            progress(&format!(
                "drained {delivered} in {:.0} s",
                elapsed.as_secs_f64()
            ));
        }
        if complete || elapsed >= limit {
            let seconds = elapsed.as_secs_f64();
            let rate = delivered as f64 / seconds;
            return Ok(Drain {
                delivered,
                complete,
                seconds,
                rate,
                full_seconds: if complete {
                    seconds
                } else {
                    args.edits as f64 / rate
                },
                by_progress,
            });
        }
    }
}

/// Checks at the sandbox that every delivered edit arrived once, and that a sample of messages
/// shows the content that was enqueued. Returns how many messages were checked.
fn check_delivered(
    args: &Args,
    sandbox: &Sandbox,
    drain: &Drain,
    round: u32,
) -> anyhow::Result<u64> {
    let stats = sandbox.stats();
    let ok = stats.by_status.get(&200).copied().unwrap_or(0);
    anyhow::ensure!(
        ok >= drain.delivered && stats.requests_total == ok,
        "sandbox saw {} requests, {ok} answered 200, daemon delivered {}: {:?}",
        stats.requests_total,
        drain.delivered,
        stats.by_status
    );
    let mut checked = 0;
    let step = (args.edits / 1000).max(1);
    for index in (0..args.edits).step_by(step as usize) {
        let id = message_id(round, index);
        if let Some(message) = sandbox.message(&id) {
            let text = message.content.as_ref().map(|c| c["head"]["text"].clone());
            anyhow::ensure!(text == Some(json!(id)), "{id} shows {text:?}");
            checked += 1;
        }
    }
    if drain.complete {
        anyhow::ensure!(
            checked == args.edits.div_ceil(step),
            "some messages never arrived"
        );
    }
    Ok(checked)
}

// ---------------------------------------------------------------------------------------------
// Measuring helpers.

/// One request, one answer, on a fresh connection; fails fast if nothing answers.
async fn call(socket: &Path, request: &Value) -> anyhow::Result<Value> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    let mut answer = String::new();
    let n = tokio::time::timeout(START_TIMEOUT, BufReader::new(reader).read_line(&mut answer))
        .await??;
    anyhow::ensure!(n > 0, "connection closed without an answer");
    Ok(serde_json::from_str(&answer)?)
}

/// sled's `size_on_disk`, from the daemon's `zoomq_storage_size_bytes`.
async fn sled_size(addr: std::net::SocketAddr) -> Option<u64> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("zoomq_storage_size_bytes "))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

fn read_rss_kib(pid: u32) -> u64 {
    read_status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status`, such as `VmRSS:`; 0 if unreadable.
fn read_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (sum of file lengths, allocated bytes, number of files) under `path`.
fn dir_usage(path: &Path) -> (u64, u64, u64) {
    let Ok(entries) = std::fs::read_dir(path) else {
        return (0, 0, 0);
    };
    let mut usage = (0, 0, 0);
    for entry in entries.flatten() {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => {
                let (a, b, n) = dir_usage(&entry.path());
                usage = (usage.0 + a, usage.1 + b, usage.2 + n);
            }
            Ok(meta) => {
                usage = (
                    usage.0 + meta.len(),
                    usage.1 + meta.blocks() * 512,
                    usage.2 + 1,
                )
            }
            Err(_) => {}
        }
    }
    usage
}

/// nproc, CPU model, memory and the data directory's filesystem, for the record.
fn machine(dir: &Path) -> Value {
    let (nproc, cpu, mem_gib) = host::host();
    // The filesystem is the mount point that is the longest prefix of the directory.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let fs = mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 3 && dir.starts_with(fields[1]))
                .then(|| (fields[1].len(), fields[2].to_string()))
        })
        .max()
        .map_or_else(|| "unknown".to_string(), |(_, fs)| fs);
    json!({
        "nproc": nproc, "cpu": cpu, "mem_gib": (mem_gib * 10.0).round() / 10.0, "fs": fs,
        "loadavg": loadavg(),
        "summary": format!(
            "{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM, data dir on {fs}, load average {}",
            loadavg()
        ),
    })
}

/// The crate's git commit, with `-dirty` when the working tree differs from it.
fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
        _ => head,
    }
}

/// The 1, 5 and 15 minute load averages: the machine may be shared with other work.
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Serialize)]
struct Target {
    what: &'static str,
    target: &'static str,
    measured: String,
    met: bool,
}

impl Target {
    fn new(what: &'static str, target: &'static str, measured: String, met: bool) -> Target {
        Target {
            what,
            target,
            measured,
            met,
        }
    }
}

fn restart_target(what: &'static str, start: &Started, backlog: &Backlog, edits: u64) -> Target {
    Target::new(
        what,
        "< 3 s to ping, every edit back",
        format!(
            "{}, {} pending + {} in flight",
            secs_text(start.ready),
            backlog.pending,
            backlog.in_flight
        ),
        start.ready < RESTART_TARGET && backlog.pending + backlog.in_flight == edits,
    )
}

fn print_table<S: AsRef<str>>(rows: &[(S, String)]) {
    for (what, value) in rows {
        println!("{:<34}  {value}", what.as_ref());
    }
}

fn progress(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "scale: {line}");
}

fn start_text(start: &Started) -> String {
    match start.recovery_ms {
        Some(ms) => format!("{} (queue recovery {ms} ms)", secs_text(start.ready)),
        None => secs_text(start.ready),
    }
}

/// Message `index` of fill `round`.
fn message_id(round: u32, index: u64) -> String {
    format!("m{round}-{index}")
}

fn account_id(index: u64) -> String {
    format!("acct-{index}")
}

/// Bytes as decimal megabytes, with MiB alongside.
fn mb(bytes: u64) -> String {
    format!(
        "{:.1} MB ({:.1} MiB)",
        bytes as f64 / 1e6,
        bytes as f64 / (1024.0 * 1024.0)
    )
}

fn secs_text(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn ser_secs<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}
