//! Durable intake: how many edits per second are acknowledged, and how long an acknowledgement
//! takes, through three cluster daemons on a 3-node JetStream cluster, against one daemon in
//! the embedded sled mode under the same load (the anchor).
//!
//! Load (this process, on a thread and a current-thread runtime of its own): `--connections`
//! Unix-socket connections spread round-robin over the daemons' sockets, each keeping
//! `window` requests outstanding and writing every free slot's request in one `write`. Every
//! edit names a message of its own (nothing coalesces; the answers are checked) and an
//! account of `--accounts`, taken in turn, so every partition is busy (in the `direct` mode
//! only the accounts the connection's daemon owns); its `content` is exactly 1024 bytes of
//! JSON. The load runs `--warmup` seconds before the measured `--seconds`. Rate:
//! acknowledgements read inside the measured interval. Latency: from just before a request is
//! written to when its answer has been read, for requests written inside the interval;
//! nearest-rank percentiles.
//!
//! Delivery is held (the sandbox's token endpoint takes an hour), so the figures are intake
//! only. CPU time of the daemon processes and of the nats-server processes is read from
//! `/proc` at the interval's start and end, and the machine's busy share over it.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use zoomq::cluster::assign::partition_of;
use zoomq::sandbox::Sandbox;

use crate::fsync::fsync_probe;
use crate::latency::{percentile, Latency};
use crate::load::{self, Clock, Tally};
use crate::rig::{self, cpu_of, nats_pids, Cluster, Daemon, Storage};
use crate::{proc, Args};

/// One intake run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct IntakeRun {
    pub mode: &'static str,
    pub daemons: usize,
    pub connections: usize,
    pub window: usize,
    pub seconds: f64,
    pub acked_measured: u64,
    pub rate: f64,
    /// `p50_us`, `p90_us`, `p99_us`, `max_us`.
    #[serde(flatten)]
    pub latency: Latency,
    /// Answers other than `ok`, and the first.
    pub errors: u64,
    pub first_error: Option<String>,
    /// `coalesced:true` answers; 0 since every message id is distinct.
    pub coalesced: u64,
    /// CPU time in the measured interval per acknowledged edit, in microseconds: of the daemon
    /// processes, and of the nats-server processes.
    pub daemon_us_per_ack: f64,
    pub nats_us_per_ack: f64,
    /// Busy share of the machine's CPUs over the measured interval.
    pub machine_busy: f64,
    /// Cores the daemon processes and the nats-server processes kept busy with no load, over
    /// the 2 s just before it (leases, heartbeats, Raft of the idle streams).
    pub idle_daemon_cores: f64,
    pub idle_nats_cores: f64,
    /// One 4 KiB append + `fdatasync` in the data directories' filesystem just before, p50.
    pub fsync_p50_us: u32,
}

/// Which daemons take the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One daemon in the embedded sled mode: the anchor.
    Sled,
    /// Three cluster daemons; each connection's edits go to every account in turn, so two in
    /// three are carried to another daemon, the owner of their partition.
    Cluster,
    /// Three cluster daemons; each connection sends only edits of accounts whose partition
    /// the daemon it is connected to owns: nothing is carried, the same replication.
    Direct,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Sled => "sled",
            Mode::Cluster => "cluster",
            Mode::Direct => "direct",
        }
    }
}

/// Runs the intake load once against fresh daemons (and, for the cluster modes, a fresh
/// 3-node NATS cluster), stopped (SIGKILL) at the end.
pub async fn run(
    args: &Args,
    sandbox: &Sandbox,
    parent: &Path,
    mode: Mode,
    window: usize,
) -> anyhow::Result<IntakeRun> {
    let fsync_p50_us = fsync_p50(parent)?;
    print!(
        "  intake {} {} x {window}: fdatasync p50 {fsync_p50_us} us; starting ...",
        mode.name(),
        args.connections
    );
    std::io::stdout().flush().ok();
    let all: Vec<usize> = (0..args.accounts.max(1)).collect();
    let load = Load {
        connections: args.connections,
        window,
        warmup: args.warmup,
        seconds: args.seconds,
        fsync_p50_us,
    };
    if mode == Mode::Sled {
        let mut daemon = rig::daemon(parent, sandbox, &Storage::Sled)?;
        daemon.start().await?;
        return measure(mode, &[&daemon], 1, vec![all], load).await;
    }
    let prefix = format!("{}{window}", mode.name());
    let cluster = Cluster::start(parent, sandbox, &prefix, 3).await?;
    let owner = cluster.settled(Duration::from_secs(60)).await?;
    // The accounts each daemon's connections edit, in turn.
    let lists = (0..cluster.daemons.len())
        .map(|d| match mode {
            Mode::Direct => owned_by(&all, &owner, d, true),
            _ => all.clone(),
        })
        .collect();
    let daemons: Vec<&Daemon> = cluster.daemons.iter().collect();
    measure(mode, &daemons, daemons.len(), lists, load).await
}

/// One connection, one edit at a time, for `--single-seconds`: to one sled daemon; then on a
/// fresh cluster to daemon 0, first for accounts daemon 0 owns (`direct`), then for accounts
/// the others own (`cluster`: every edit carried to the owner): the latency of one durable
/// acknowledgement without queueing, and what the hop to the owner adds to it.
pub async fn single(
    args: &Args,
    sandbox: &Sandbox,
    parent: &Path,
) -> anyhow::Result<Vec<IntakeRun>> {
    let all: Vec<usize> = (0..args.accounts.max(1)).collect();
    let mut runs = Vec::new();
    for mode in [Mode::Sled, Mode::Direct, Mode::Cluster] {
        let fsync_p50_us = fsync_p50(parent)?;
        print!(
            "  intake {} 1 x 1: fdatasync p50 {fsync_p50_us} us; starting ...",
            mode.name()
        );
        std::io::stdout().flush().ok();
        let load = Load {
            connections: 1,
            window: 1,
            warmup: args.warmup.min(1.0),
            seconds: args.single_seconds,
            fsync_p50_us,
        };
        if mode == Mode::Sled {
            let mut daemon = rig::daemon(parent, sandbox, &Storage::Sled)?;
            daemon.start().await?;
            runs.push(measure(mode, &[&daemon], 1, vec![all.clone()], load).await?);
        } else {
            let cluster = Cluster::start(parent, sandbox, mode.name(), 3).await?;
            let owner = cluster.settled(Duration::from_secs(60)).await?;
            let list = owned_by(&all, &owner, 0, mode == Mode::Direct);
            let daemons: Vec<&Daemon> = cluster.daemons.iter().collect();
            runs.push(measure(mode, &daemons, 1, vec![list], load).await?);
        }
    }
    Ok(runs)
}

/// The accounts of `all` whose partition daemon `d` owns (`mine`), or does not own.
fn owned_by(all: &[usize], owner: &[usize], d: usize, mine: bool) -> Vec<usize> {
    all.iter()
        .copied()
        .filter(|a| (owner[partition_of(&AccountId(*a).to_string()) as usize] == d) == mine)
        .collect()
}

/// The shape of one run's load.
#[derive(Debug, Clone, Copy)]
struct Load {
    connections: usize,
    window: usize,
    warmup: f64,
    seconds: f64,
    fsync_p50_us: u32,
}

/// Runs `load` against the first `n` of `daemons` (connection `c` to daemon `c % n`, editing
/// the accounts of `lists[c % n]`), on a thread and a current-thread runtime of its own; the
/// CPU time of all of `daemons` counts.
async fn measure(
    mode: Mode,
    daemons: &[&Daemon],
    n: usize,
    lists: Vec<Vec<usize>>,
    load: Load,
) -> anyhow::Result<IntakeRun> {
    let sockets: Vec<_> = daemons[..n].iter().map(|d| d.socket.clone()).collect();
    let pids: Vec<String> = daemons
        .iter()
        .filter_map(|d| d.pid())
        .map(|p| p.to_string())
        .collect();
    let nats = if mode == Mode::Sled {
        Vec::new()
    } else {
        nats_pids()
    };
    let idle_from = (cpu_of(&pids), cpu_of(&nats), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_for = idle_from.2.elapsed().as_secs_f64();
    let idle_daemon_cores = (cpu_of(&pids) - idle_from.0).as_secs_f64() / idle_for;
    let idle_nats_cores = (cpu_of(&nats) - idle_from.1).as_secs_f64() / idle_for;
    print!(" measuring ...");
    std::io::stdout().flush().ok();
    let Load {
        connections,
        window,
        warmup: _,
        seconds,
        fsync_p50_us,
    } = load;
    let thread = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(generate(sockets, lists, load, pids, nats))
    });
    let (total, (d0, n0, m0), (d1, n1, m1)) = tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load generator panicked"))??;

    let mut latencies = total.latencies_us;
    latencies.sort_unstable();
    let acked = total.acked_measured.max(1) as f64;
    let busy = (m1.0 - m0.0).as_secs_f64() / (m1.1 - m0.1).as_secs_f64().max(1e-9);
    let run = IntakeRun {
        mode: mode.name(),
        daemons: if mode == Mode::Sled { 1 } else { 3 },
        connections,
        window,
        seconds,
        acked_measured: total.acked_measured,
        rate: total.acked_measured as f64 / seconds,
        latency: Latency::of(&latencies),
        errors: total.errors,
        first_error: total.first_error,
        coalesced: total.coalesced,
        daemon_us_per_ack: (d1 - d0).as_secs_f64() * 1e6 / acked,
        nats_us_per_ack: (n1 - n0).as_secs_f64() * 1e6 / acked,
        machine_busy: busy,
        idle_daemon_cores,
        idle_nats_cores,
        fsync_p50_us,
    };
    println!(
        " {:.0} acked edits/s, p50 {:.2} ms, p99 {:.2} ms",
        run.rate,
        f64::from(run.latency.p50_us) / 1000.0,
        f64::from(run.latency.p99_us) / 1000.0
    );
    Ok(run)
}

/// p50 of 200 appends of 4 KiB, each followed by `fdatasync`, in a fresh file under `parent`:
/// the floor under a durable acknowledgement on that filesystem at that moment.
fn fsync_p50(parent: &Path) -> anyhow::Result<u32> {
    let probe = fsync_probe(parent, "zoomq-cluster-probe-", false)?;
    Ok(percentile(&probe.append, 50.0))
}

/// CPU time of the daemon processes, of the nats-server processes and of the machine
/// (busy, total) at one instant.
type Sample = (Duration, Duration, (Duration, Duration));

/// The load, on the calling thread's runtime: `shape.connections` connections round-robin over
/// `sockets`, connection `c` editing the accounts of `lists[c % sockets.len()]` in turn; CPU
/// time of the `daemons` and `nats` processes and of the machine sampled at the measured
/// interval's start and end.
async fn generate(
    sockets: Vec<PathBuf>,
    lists: Vec<Vec<usize>>,
    shape: Load,
    daemons: Vec<String>,
    nats: Vec<String>,
) -> anyhow::Result<(Tally, Sample, Sample)> {
    for conn in 0..shape.connections {
        let d = conn % sockets.len();
        anyhow::ensure!(!lists[d].is_empty(), "daemon {d} owns no account");
    }
    let streams = load::connect(&sockets, shape.connections).await?;
    let clock = Clock::after_warmup(shape.warmup, shape.seconds);
    let sampler = clock.at_bounds(move |_| (cpu_of(&daemons), cpu_of(&nats), proc::machine_cpu()));
    let total = load::drive_all(streams, shape.window, clock, |conn| {
        let accounts = lists[conn % sockets.len()].clone();
        move |out: &mut Vec<u8>, seq: u64| {
            let account = accounts[(seq as usize * 64 + conn) % accounts.len()];
            load::push_edit(out, conn, seq, AccountId(account));
        }
    })
    .await?;
    let (start, end) = sampler.await?;
    Ok((total, start, end))
}

/// The name of account number `n`: `acct-` and five digits.
pub struct AccountId(pub usize);

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "acct-{:05}", self.0)
    }
}
