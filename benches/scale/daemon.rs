//! The daemon process under test: its directory and generated configuration, starts and stops
//! (with `common/spawn.rs`), and what each process's life cost.
//!
//! Every start is timed from spawn until `{"op":"ping"}` is answered, and from spawn the
//! daemon's VmRSS is sampled every [`SAMPLE_EVERY`] until the process is stopped, so the peak
//! during recovery is seen, not only what is left after it. Just before a stop, VmHWM (the
//! kernel's own peak of the process's resident memory) is read too. Each process's record is a
//! [`Life`], kept in [`Daemon::lives`] for the report.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use zoomq::sandbox::Sandbox;

use crate::disk::{self, Usage};
use crate::fill::account_id;
use crate::report::ser_secs;
use crate::spawn::{self, quote};
use crate::{proc, Args};

/// The daemon's default `storage.max_pending`; raised in the configuration only above it.
const DEFAULT_MAX_PENDING: u64 = 1_000_000;
/// How long a start or a stop may take before the benchmark gives up on it.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the daemon's VmRSS is sampled while it runs.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// The daemon process with its directory, configuration and log.
pub struct Daemon {
    /// The process, its socket (`process.socket`) and data directory (`process.data`).
    pub process: spawn::Daemon,
    /// `metrics.listen`, for sled's own size figure.
    metrics_addr: std::net::SocketAddr,
    /// Set while the process runs.
    sampling: Option<Sampling>,
    /// Every process started so far, in order; the last one may still run.
    pub lives: Vec<Life>,
}

/// The running process's RSS sampler.
struct Sampling {
    /// Stops the RSS sampler.
    stop: CancellationToken,
    /// `[seconds since spawn, VmRSS KiB]`, every [`SAMPLE_EVERY`].
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
}

/// How a start went.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Started {
    /// When the process was spawned.
    #[serde(skip)]
    pub spawned: Instant,
    /// From spawn until the socket answered a ping.
    #[serde(serialize_with = "ser_secs")]
    pub ready: Duration,
    /// `elapsed_ms` of the daemon's "queue recovered" log line.
    pub recovery_ms: Option<u64>,
    /// Highest VmRSS sampled from spawn until the ping was answered (recovery).
    pub rss_max_to_ping_kib: u64,
}

/// One daemon process, from spawn to stop.
#[derive(Debug, Clone, Serialize)]
pub struct Life {
    pub label: String,
    pub kind: Kind,
    pub start: Started,
    /// Highest VmRSS seen over the whole life (every sample, the reading when the ping was
    /// answered and the one just before the stop), and how many samples there were.
    pub rss_max_sampled_kib: u64,
    pub samples: usize,
    /// Read just before the stop signal: VmHWM covers every moment of the life until then.
    pub hwm_kib: u64,
    pub rss_at_stop_kib: u64,
    /// "SIGTERM" or "SIGKILL", and the seconds from the signal until the process was gone.
    pub stop: Option<(&'static str, f64)>,
}

/// What a daemon process was started for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Started (with or without a backlog), then filled with `--edits` edits, delivery held.
    Fill,
    /// Started with the whole backlog pending, delivery held.
    Backlog,
    /// Started with the whole backlog pending, delivery allowed: it drains the queue.
    Drain,
    /// Anything else (a start on the drained database).
    Other,
}

/// The queue as `stats` shows it once a start or fill has settled.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Backlog {
    pub pending: u64,
    pub in_flight: u64,
}

impl Daemon {
    pub fn new(dir: &Path) -> anyhow::Result<Daemon> {
        // A free port for /metrics, kept for the daemon's whole life.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut process = spawn::Daemon::in_dir(dir);
        process.rust_log = Some("info");
        process.timeout = START_TIMEOUT;
        Ok(Daemon {
            process,
            metrics_addr,
            sampling: None,
            lives: Vec::new(),
        })
    }

    /// Writes the configuration: delivery to `sandbox`, and with `account_rate` the fast
    /// drain settings (a rate per account, 64 requests in flight). Everything else is the
    /// daemon's default.
    pub fn configure(
        &self,
        args: &Args,
        sandbox: &Sandbox,
        account_rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let mut toml = self.process.config();
        if args.edits > DEFAULT_MAX_PENDING {
            toml.line(format_args!("max_pending = {}", args.edits));
        }
        toml.zoom(sandbox, "sandbox-client", "sandbox-secret")
            .line(format_args!(
                "[metrics]\nlisten = {}",
                quote(&self.metrics_addr.to_string())
            ));
        if let Some(rate) = account_rate {
            toml.line("[delivery]\nconcurrency = 64");
            for account in 0..args.accounts {
                toml.line(format_args!(
                    "[accounts.{}]\nrate = {rate:?}",
                    quote(&account_id(account))
                ));
            }
        }
        self.process.write_config(&toml)
    }

    /// Spawns the daemon, samples its memory from then on, and waits until it answers a ping.
    pub async fn start(&mut self, label: &str, kind: Kind) -> anyhow::Result<Started> {
        let log_offset = std::fs::metadata(&self.process.log_path).map_or(0, |m| m.len());
        let spawned = self.process.spawn()?;
        let pid = self.pid()?;
        let stop = CancellationToken::new();
        let samples = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(sample_rss(pid, spawned, samples.clone(), stop.clone()));
        self.sampling = Some(Sampling {
            stop,
            samples: samples.clone(),
        });
        let ready = self.process.ready(spawned).await;
        let ready_at = spawned.elapsed();
        let rss_now = proc::status_bytes(&pid.to_string(), "VmRSS:") / 1024;
        ready?;
        let rss_max_to_ping_kib = samples
            .lock()
            .expect("samples lock")
            .iter()
            .map(|&(_, kib)| kib)
            .fold(rss_now, u64::max);
        let log = std::fs::read(&self.process.log_path).unwrap_or_default();
        let new_lines = String::from_utf8_lossy(&log[(log_offset as usize).min(log.len())..]);
        let recovery_ms = new_lines
            .lines()
            .filter(|line| line.contains("queue recovered"))
            .filter_map(|line| line.split_once("elapsed_ms="))
            .find_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        let started = Started {
            spawned,
            ready: ready_at,
            recovery_ms,
            rss_max_to_ping_kib,
        };
        self.lives.push(Life {
            label: label.to_string(),
            kind,
            start: started,
            rss_max_sampled_kib: 0,
            samples: 0,
            hwm_kib: 0,
            rss_at_stop_kib: 0,
            stop: None,
        });
        Ok(started)
    }

    /// SIGTERM, then waits for the process to exit; returns how long that took.
    pub async fn terminate(&mut self) -> anyhow::Result<Duration> {
        self.stop("SIGTERM").await
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(&mut self) -> anyhow::Result<Duration> {
        self.stop("SIGKILL").await
    }

    async fn stop(&mut self, signal: &'static str) -> anyhow::Result<Duration> {
        let pid = self.pid()?.to_string();
        let hwm_kib = proc::status_bytes(&pid, "VmHWM:") / 1024;
        let rss_at_stop_kib = proc::status_bytes(&pid, "VmRSS:") / 1024;
        let signalled = Instant::now();
        match signal {
            "SIGTERM" => self.process.terminate().await?,
            _ => self.process.kill().await?,
        }
        let took = signalled.elapsed();
        let sampling = self.sampling.take().context("not sampling")?;
        sampling.stop.cancel();
        let samples = sampling.samples.lock().expect("samples lock");
        if let Some(life) = self.lives.last_mut() {
            life.rss_max_sampled_kib = samples.iter().map(|&(_, kib)| kib).fold(
                life.start.rss_max_to_ping_kib.max(rss_at_stop_kib),
                u64::max,
            );
            life.samples = samples.len();
            life.hwm_kib = hwm_kib;
            life.rss_at_stop_kib = rss_at_stop_kib;
            life.stop = Some((signal, took.as_secs_f64()));
        }
        Ok(took)
    }

    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.process.pid().context("not running")
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        self.process.stats().await
    }

    /// Waits for recovery (it runs in the background after the socket answers), then checks
    /// that exactly `edits` edits are pending or in flight.
    pub async fn settle(&mut self, edits: u64) -> anyhow::Result<Backlog> {
        let started = std::time::Instant::now();
        let mut stats = self.stats().await?;
        while stats["recovering"] == true {
            anyhow::ensure!(
                started.elapsed() < std::time::Duration::from_secs(120),
                "still recovering after 120 s: {stats}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stats = self.stats().await?;
        }
        // The daemon logs "queue recovered ... elapsed_ms=" when its recovery ends.
        let log = std::fs::read(&self.process.log_path).unwrap_or_default();
        let recovery_ms = String::from_utf8_lossy(&log)
            .lines()
            .rev()
            .filter(|line| line.contains("queue recovered"))
            .filter_map(|line| line.split_once("elapsed_ms="))
            .find_map(|(_, rest)| rest.split_whitespace().next()?.parse().ok());
        if let Some(life) = self.lives.last_mut() {
            life.start.recovery_ms = recovery_ms.or(life.start.recovery_ms);
        }
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

    pub fn memory(&self) -> anyhow::Result<Memory> {
        let pid = self.pid()?.to_string();
        let field = |name: &str| proc::status_bytes(&pid, name) / 1024;
        Ok(Memory {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
            anon_kib: field("RssAnon:"),
            file_kib: field("RssFile:"),
        })
    }

    pub async fn disk(&self) -> Disk {
        let usage = disk::usage(&self.process.data);
        let sled = if self.is_running() {
            sled_size(self.metrics_addr).await
        } else {
            None
        };
        Disk { usage, sled }
    }
}

impl Drop for Daemon {
    /// Stops the sampler; the process is killed when `process` is dropped, right after.
    fn drop(&mut self) {
        if let Some(sampling) = self.sampling.take() {
            sampling.stop.cancel();
        }
    }
}

/// Samples VmRSS of `pid` every [`SAMPLE_EVERY`] until `stop`.
async fn sample_rss(
    pid: u32,
    spawned: Instant,
    samples: Arc<Mutex<Vec<(f64, u64)>>>,
    stop: CancellationToken,
) {
    let pid = pid.to_string();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let kib = proc::status_bytes(&pid, "VmRSS:") / 1024;
        if kib > 0 {
            let at = spawned.elapsed().as_secs_f64();
            samples.lock().expect("samples lock").push((at, kib));
        }
    }
}

/// The daemon's memory, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
}

impl Memory {
    pub fn rss_bytes(&self) -> u64 {
        self.rss_kib * 1024
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

/// The data directory's size, and sled's own figure while the daemon runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Disk {
    #[serde(flatten)]
    pub usage: Usage,
    /// sled's `size_on_disk` (`zoomq_storage_size_bytes`), while the daemon runs.
    pub sled: Option<u64>,
}

impl Disk {
    /// What the ratios use: the larger of the apparent and allocated sizes.
    pub fn size(&self) -> u64 {
        self.usage.size()
    }
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |bytes: u64| bytes as f64 / 1e6;
        write!(
            f,
            "{:.1} MB in {} files ({:.1} MB allocated",
            mb(self.usage.apparent),
            self.usage.files,
            mb(self.usage.allocated)
        )?;
        match self.sled {
            Some(sled) => write!(f, ", sled says {:.1} MB)", mb(sled)),
            None => write!(f, ")"),
        }
    }
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
