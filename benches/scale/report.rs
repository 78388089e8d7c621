//! What the scale bench prints: a table of every figure, one line per target (measured vs
//! target, `met` or `MISSED`), and one JSON line holding everything; plus the small formatting
//! helpers the other files share.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::daemon::{Backlog, Disk, Kind, Life, Memory, Started};
use crate::drain::Cycle;
use crate::fill::Fill;
use crate::probe::IndexProbe;
use crate::restart::Restarts;
use crate::{host, Args};

/// The targets of BENCHMARKS.md, "Scale".
const MEMORY_TARGET_BYTES: u64 = 200_000_000;
const PING_TARGET: f64 = 1.0;
const FIRST_REQUEST_TARGET: f64 = 1.5;
const HUNG_STOP_TARGET: f64 = 2.0;
const DISK_RATIO_TARGET: f64 = 1.5;
const CYCLE_RATIO_TARGET: f64 = 1.2;

/// Everything one run measured.
pub struct Run {
    pub args: Args,
    pub machine: Value,
    pub fill: Fill,
    pub first: Started,
    pub backlog: Backlog,
    pub memory: Memory,
    pub disk: Disk,
    pub index: IndexProbe,
    pub restarts: Restarts,
    pub cycles: Vec<Cycle>,
    pub lives: Vec<Life>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    what: String,
    target: &'static str,
    measured: String,
    met: bool,
}

impl Run {
    /// The data directory with the backlog over the request bytes that built it.
    fn disk_ratio(&self) -> f64 {
        self.disk.size() as f64 / self.fill.request_bytes.max(1) as f64
    }

    /// The largest data directory over the cycles over the one with a single backlog.
    fn cycle_ratio(&self) -> Option<f64> {
        let max = self.cycles.iter().map(Cycle::max_disk).max()?;
        Some(max as f64 / self.disk.size().max(1) as f64)
    }

    pub fn targets(&self) -> Vec<Target> {
        let lives = |kinds: &'static [Kind]| {
            self.lives
                .iter()
                .filter(move |life| kinds.contains(&life.kind))
        };
        let memory = |what: &str, bytes: u64, detail: String| Target {
            what: what.to_string(),
            target: "< 200 MB",
            measured: format!("{}{detail}", mb(bytes)),
            met: bytes < MEMORY_TARGET_BYTES,
        };
        // A life's peak: VmHWM before the stop, or a sample taken while it stopped.
        let peak = |life: &Life| life.hwm_kib.max(life.rss_max_sampled_kib) * 1024;
        let fill_hwm = lives(&[Kind::Fill]).map(peak).max();
        let restarted = lives(&[Kind::Backlog, Kind::Drain]).count();
        let recovery_rss = lives(&[Kind::Backlog, Kind::Drain])
            .map(|l| l.start.rss_max_to_ping_kib * 1024)
            .max();
        let after_hwm = lives(&[Kind::Backlog]).map(peak).max();
        let readies: Vec<f64> = lives(&[Kind::Backlog, Kind::Drain])
            .map(|l| l.start.ready.as_secs_f64())
            .collect();
        let max_ready = readies.iter().copied().fold(0.0, f64::max);
        let firsts: Vec<Option<f64>> = self
            .cycles
            .iter()
            .map(|c| c.first_request_seconds)
            .collect();
        let max_first = firsts
            .iter()
            .copied()
            .try_fold(0.0, |m, f| f.map(|f| f.max(m)));
        let hung = &self.restarts.hung;
        let cycle_ratio = self.cycle_ratio();
        let list = |xs: &mut dyn Iterator<Item = String>| xs.collect::<Vec<_>>().join(", ");
        vec![
            memory(
                "memory with the backlog after enqueue (VmRSS)",
                self.memory.rss_bytes(),
                String::new(),
            ),
            memory(
                "memory peak while filling (VmHWM of the filling daemons, or a higher sample)",
                fill_hwm.unwrap_or(0),
                String::new(),
            ),
            memory(
                "memory during recovery (max VmRSS sampled every 50 ms, spawn to ping)",
                recovery_rss.unwrap_or(0),
                format!(" over {restarted} starts with the backlog"),
            ),
            memory(
                "memory during and after recovery (VmHWM of each restarted daemon before its stop, \
                 or a higher sample)",
                after_hwm.unwrap_or(0),
                String::new(),
            ),
            Target {
                what: "restart with the backlog: spawn to ping".into(),
                target: "< 1 s",
                measured: format!(
                    "max {max_ready:.3} s of {} ({}), every edit back",
                    readies.len(),
                    list(&mut readies.iter().map(|r| format!("{r:.3}")))
                ),
                met: !readies.is_empty() && max_ready < PING_TARGET,
            },
            Target {
                what: "restart with the backlog: spawn to first request at the sandbox".into(),
                target: "< 1.5 s",
                measured: format!(
                    "max {} of {} ({}); after the ping {}",
                    max_first.map_or("never".into(), |f| format!("{f:.3} s")),
                    firsts.len(),
                    list(
                        &mut firsts
                            .iter()
                            .map(|f| f.map_or("never".into(), |f| format!("{f:.3}")))
                    ),
                    list(&mut self.cycles.iter().map(|c| {
                        c.first_request_after_ping_seconds
                            .map_or("never".into(), |f| format!("{f:.3} s"))
                    }))
                ),
                met: !firsts.is_empty() && max_first.is_some_and(|f| f < FIRST_REQUEST_TARGET),
            },
            Target {
                what: "SIGTERM while every request to Zoom hangs: time to exit".into(),
                target: "< 2 s, nothing lost",
                measured: format!(
                    "{:.3} s with {} requests hanging; restart found {} pending + {} in flight \
                     of {} acknowledged ({} delivered)",
                    hung.stop_seconds,
                    hung.hanging,
                    hung.backlog.pending,
                    hung.backlog.in_flight,
                    self.args.edits,
                    hung.delivered
                ),
                met: hung.stop_seconds < HUNG_STOP_TARGET
                    && hung.backlog.pending + hung.backlog.in_flight + hung.delivered
                        == self.args.edits,
            },
            Target {
                what: "data dir with the backlog / request bytes".into(),
                target: "<= 1.5x",
                measured: format!(
                    "{:.2}x ({:.1} MB for {:.1} MB of request lines)",
                    self.disk_ratio(),
                    self.disk.size() as f64 / 1e6,
                    self.fill.request_bytes as f64 / 1e6
                ),
                met: self.disk_ratio() <= DISK_RATIO_TARGET,
            },
            Target {
                what: "largest data dir over the fill/drain cycles / data dir with one backlog"
                    .into(),
                target: "<= 1.2x",
                measured: match cycle_ratio {
                    Some(ratio) => format!(
                        "{ratio:.2}x over {} cycles ({:.1} MB vs {:.1} MB)",
                        self.cycles.len(),
                        ratio * self.disk.size() as f64 / 1e6,
                        self.disk.size() as f64 / 1e6
                    ),
                    None => "no cycles".into(),
                },
                met: cycle_ratio.is_some_and(|r| r <= CYCLE_RATIO_TARGET),
            },
        ]
    }

    pub fn print(&self, targets: &[Target]) {
        let args = &self.args;
        let hung = &self.restarts.hung;
        let r = &self.restarts;
        println!();
        print_rows(&[
            (
                "fill rate".into(),
                format!("{:.0} edits/s ({:.1} s)", self.fill.rate, self.fill.seconds),
            ),
            ("daemon memory with backlog".into(), self.memory.to_string()),
            (
                "index alone (zoomq::queue::State)".into(),
                format!(
                    "{} ({:.0} B/edit; VmHWM {}), {:.2} s to build",
                    mb(self.index.bytes()),
                    self.index.bytes() as f64 / args.edits as f64,
                    mb(self.index.hwm_kib * 1024),
                    self.index.seconds
                ),
            ),
            (
                "data dir with backlog".into(),
                format!(
                    "{}, {:.0} B/edit for {:.0} B/request line",
                    self.disk,
                    self.disk.size() as f64 / args.edits as f64,
                    self.fill.request_bytes as f64 / args.edits as f64
                ),
            ),
            (
                "SIGTERM: stop".into(),
                format!("{:.3} s", r.term_stop_seconds),
            ),
            ("SIGTERM: restart to ping".into(), start_text(&r.term)),
            (
                "SIGTERM: memory after restart".into(),
                r.term_memory.to_string(),
            ),
            ("SIGKILL: restart to ping".into(), start_text(&r.kill)),
            (
                "SIGKILL: memory after restart".into(),
                r.kill_memory.to_string(),
            ),
            (
                "Zoom hangs: restart to ping".into(),
                start_text(&hung.start),
            ),
            (
                "Zoom hangs: SIGTERM to exit".into(),
                format!(
                    "{:.3} s, {} requests hanging ({:.2} s after the ping)",
                    hung.stop_seconds, hung.hanging, hung.waited_seconds
                ),
            ),
            (
                "Zoom hangs: restart after it".into(),
                start_text(&hung.restart),
            ),
        ]);
        for (n, cycle) in self.cycles.iter().enumerate() {
            let row = |what: &str| format!("cycle {}: {what}", n + 1);
            let secs = |s: Option<f64>| s.map_or("never".into(), |s| format!("{s:.3} s"));
            let mut rows = vec![
                (row("start with backlog"), start_text(&cycle.start)),
                (
                    row("first request at Zoom"),
                    format!(
                        "{} after spawn, {} after the ping",
                        secs(cycle.first_request_seconds),
                        secs(cycle.first_request_after_ping_seconds)
                    ),
                ),
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
            rows.push((
                row("largest data dir"),
                format!("{:.1} MB", cycle.max_disk() as f64 / 1e6),
            ));
            print_rows(&rows);
        }
        println!();
        print_lives(&self.lives);
        println!();
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

    pub fn json(&self, targets: &[Target]) -> anyhow::Result<Value> {
        Ok(json!({
            "bench": "scale", "machine": self.machine, "args": &self.args, "commit": commit(),
            "fill": {
                "seconds": self.fill.seconds, "rate": self.fill.rate, "acked": self.fill.acked,
                "request_bytes": self.fill.request_bytes,
                "rss_by_progress": self.fill.rss_by_progress, "start": self.first,
                "backlog": self.backlog,
            },
            "backlog": {
                "memory": self.memory, "disk": self.disk, "disk_size": self.disk.size(),
                "disk_ratio": self.disk_ratio(), "index_alone": self.index,
            },
            "restarts": self.restarts,
            "cycles": self.cycles,
            "cycle_disk_max": self.cycles.iter().map(Cycle::max_disk).collect::<Vec<_>>(),
            "cycle_ratio": self.cycle_ratio(),
            "lives": self.lives,
            "targets": targets,
            "loadavg_end": host::loadavg(),
        }))
    }
}

fn print_rows(rows: &[(String, String)]) {
    for (what, value) in rows {
        println!("{what:<34}  {value}");
    }
}

/// One line per daemon process: what it was for and what it cost.
fn print_lives(lives: &[Life]) {
    println!(
        "{:<46} {:>8} {:>9} {:>12} {:>12} {:>9} {:>14}",
        "daemon process", "ready s", "recov ms", "RSS@ping MB", "RSS max MB", "HWM MB", "stop"
    );
    let mb = |kib: u64| format!("{:.1}", kib as f64 * 1024.0 / 1e6);
    for life in lives {
        println!(
            "{:<46} {:>8.3} {:>9} {:>12} {:>12} {:>9} {:>14}",
            life.label,
            life.start.ready.as_secs_f64(),
            life.start
                .recovery_ms
                .map_or("-".into(), |ms| ms.to_string()),
            mb(life.start.rss_max_to_ping_kib),
            mb(life.rss_max_sampled_kib),
            mb(life.hwm_kib),
            life.stop
                .map_or("-".into(), |(signal, s)| format!("{signal} {s:.3} s")),
        );
    }
    println!(
        "(RSS@ping: highest VmRSS sampled every 50 ms from spawn until the ping was answered; \
         RSS max: over the whole life; HWM: VmHWM read just before the stop)"
    );
}

/// nproc, CPU model, memory and the data directory's filesystem, for the record.
pub fn machine(dir: &Path) -> Value {
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
    let loadavg = host::loadavg();
    json!({
        "nproc": nproc, "cpu": cpu, "mem_gib": (mem_gib * 10.0).round() / 10.0, "fs": fs,
        "loadavg": loadavg,
        "summary": format!(
            "{nproc} CPUs ({cpu}), {mem_gib:.1} GiB RAM, data dir on {fs}, load average {loadavg}"
        ),
    })
}

/// The crate's git commit, with `-dirty` when the working tree differs from it.
pub fn commit() -> String {
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

pub fn progress(line: &str) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "scale: {line}");
}

pub fn start_text(start: &Started) -> String {
    let rss = format!(
        "VmRSS up to {} during it",
        mb(start.rss_max_to_ping_kib * 1024)
    );
    match start.recovery_ms {
        Some(ms) => format!("{} (queue recovery {ms} ms), {rss}", secs_text(start.ready)),
        None => format!("{}, {rss}", secs_text(start.ready)),
    }
}

/// Bytes as decimal megabytes, with MiB alongside.
pub fn mb(bytes: u64) -> String {
    format!(
        "{:.1} MB ({:.1} MiB)",
        bytes as f64 / 1e6,
        bytes as f64 / (1024.0 * 1024.0)
    )
}

pub fn secs_text(duration: Duration) -> String {
    format!("{:.3} s", duration.as_secs_f64())
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn ser_secs<S: serde::Serializer>(
    duration: &Duration,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}
