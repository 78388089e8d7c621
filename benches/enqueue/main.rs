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
//! of the single connection's latency.//!
//! Files: `server.rs` (sandbox, daemon and disk probe, one child load generator per run),
//! `client.rs` (the load generator), `report.rs` (table, targets); `../common/` holds what the
//! benches share (the load itself, percentiles, the disk probe, the in-process daemon).

#[path = "../common/disk.rs"]
mod disk;
#[path = "../common/embed.rs"]
mod embed;
#[path = "../common/fsync.rs"]
mod fsync;
#[path = "../common/latency.rs"]
mod latency;
#[allow(dead_code)]
#[path = "../common/load.rs"]
mod load;
#[path = "../common/logs.rs"]
mod logs;
#[allow(dead_code)]
#[path = "../common/proc.rs"]
mod proc;

mod client;
mod report;
mod server;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// The account every edit names.
const ACCOUNT: &str = "bench-account";
/// The load generator's stdout lines at the start and the end of the measured interval.
const MARK_START: &str = r#"{"mark":"start"}"#;
const MARK_END: &str = r#"{"mark":"end"}"#;

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

impl RunKind {
    fn name(self) -> &'static str {
        match self {
            RunKind::Pipelined => "pipelined",
            RunKind::Window1 => "window1",
            RunKind::Single => "single",
        }
    }
}

/// One run's load, as the server asks the client for it.
#[derive(Debug, Clone, Copy)]
struct Load {
    kind: RunKind,
    connections: usize,
    window: usize,
    seconds: f64,
}

impl Load {
    fn of(kind: RunKind, args: &Args) -> Load {
        let (connections, window, seconds) = match kind {
            RunKind::Pipelined => (args.connections, args.window, args.seconds),
            RunKind::Window1 => (args.connections, 1, args.seconds),
            RunKind::Single => (1, 1, args.single_seconds),
        };
        Load {
            kind,
            connections,
            window,
            seconds,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The token endpoint's delay makes token errors and stuck in-flight jobs at shutdown
    // expected; anything else at error level is shown.
    logs::init("error,zoomq::zoom=off,zoomq::dispatch=off");
    if args.client {
        // The client stays on one thread so it takes as little CPU from the daemon as it can.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let report = runtime.block_on(client::client(&args))?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::server(args))
}
