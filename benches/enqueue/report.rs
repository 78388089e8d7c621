//! What the enqueue bench reports per run ([`RunReport`], flat in the JSON line, which
//! scripts/bench-enqueue.sh reads), its table, and the targets it can judge alone.

use serde::Serialize;

use crate::client::LoadReport;

/// The targets of BENCHMARKS.md, "Durable enqueue", that need no anchor from another program
/// (the Redis ratios are checked by scripts/bench-enqueue.sh).
const PIPELINED_RATE_TARGET: f64 = 60_000.0;
const WINDOW1_P99_TARGET_US: u32 = 5_000;
const SINGLE_P50_TARGET_US: u32 = 300;

/// A run's figures as the server reports them.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub run: &'static str,
    pub connections: usize,
    pub window: usize,
    pub seconds: f64,
    pub warmup_seconds: f64,
    #[serde(flatten)]
    pub load: LoadReport,
    /// CPU time of the server process (daemon and idle sandbox) over the whole run, warm-up and
    /// drain included.
    pub daemon_cpu_seconds: f64,
    /// CPU time of the server process inside the measured interval (between the load
    /// generator's marks), and that divided by `acked_measured`, in microseconds.
    pub daemon_cpu_measured_seconds: f64,
    pub cpu_us_per_ack: f64,
    /// The disk probe just before this run: 4 KiB append + `fdatasync`, p50 and p99; 4 KiB
    /// overwrite + `fdatasync`, p50 and p99.
    pub fsync_p50_us: u32,
    pub fsync_p99_us: u32,
    pub fsync_overwrite_p50_us: u32,
    pub fsync_overwrite_p99_us: u32,
    /// `accepted` from the daemon's `stats` after the run.
    pub daemon_accepted: u64,
    /// Size of the data directory after the run (the larger of apparent and allocated).
    pub disk_bytes: u64,
}

pub fn print_table(reports: &[RunReport]) {
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
            ms(r.load.latency.p50_us),
            ms(r.load.latency.p90_us),
            ms(r.load.latency.p99_us),
            ms(r.load.latency.max_us),
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
pub fn print_targets(reports: &[RunReport]) {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let ms = |us: u32| f64::from(us) / 1000.0;
    if let Some(r) = reports.iter().find(|r| r.run == "pipelined") {
        println!(
            "target pipelined ({} x {}) >= {PIPELINED_RATE_TARGET:.0} acked edits/s: {:.0}/s \
             (p50 {:.3} ms, p99 {:.3} ms, {:.1} us CPU/edit), {}",
            r.connections,
            r.window,
            r.load.rate,
            ms(r.load.latency.p50_us),
            ms(r.load.latency.p99_us),
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
            ms(r.load.latency.p99_us),
            r.load.rate,
            ms(r.load.latency.p50_us),
            r.cpu_us_per_ack,
            verdict(r.load.latency.p99_us < WINDOW1_P99_TARGET_US)
        );
    }
    if let Some(r) = reports.iter().find(|r| r.run == "single") {
        println!(
            "target single p50 < {} ms: {:.3} ms (fdatasync p50 just before: {:.3} ms after an \
             append, {:.3} ms after an overwrite; {:.1} us CPU/edit), {}",
            ms(SINGLE_P50_TARGET_US),
            ms(r.load.latency.p50_us),
            ms(r.fsync_p50_us),
            ms(r.fsync_overwrite_p50_us),
            r.cpu_us_per_ack,
            verdict(r.load.latency.p50_us < SINGLE_P50_TARGET_US)
        );
    }
    println!("(the Redis-relative targets are checked by scripts/bench-enqueue.sh)");
}
