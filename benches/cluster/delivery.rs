//! Delivery at the limit through the cluster: ten Pro accounts (20 requests/s each at the
//! sandbox, its default plan), chosen so the three daemons pace three or four each, get a
//! backlog of distinct messages preloaded through the three daemons in turn; delivery runs
//! from the first acknowledgement (tokens come at once). After the preload and `--edge`
//! seconds, `--delivery-seconds` are measured from the sandbox's own request log: each
//! account's delivered (2xx) requests in that interval as a share of its limit; over the whole
//! run, its 429s and the most of its requests the sandbox received in one 1-second window,
//! fixed (aligned to the sandbox's start, the windows it enforces) and sliding (any
//! interval); and no message ever had two requests at once. The backlog is sized so that
//! every account still has work at the end of the interval, which is checked. Also the CPU
//! time of the daemon and nats-server processes over the interval per request delivered. The
//! anchor: the same accounts, backlog and measurement through one daemon in the embedded
//! sled mode.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::oneshot;
use zoomq::cluster::assign::{partition_of, PARTITIONS};
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::load::send_all;
use crate::rig::{self, cpu_of, nats_pids, small_edit, Cluster, Daemon, Storage};
use crate::{proc, Args};

pub const ACCOUNTS: usize = 10;
const SECOND: Duration = Duration::from_secs(1);

/// One account's figures.
#[derive(Debug, Clone, Serialize)]
pub struct AccountRow {
    pub account: String,
    /// The daemon pacing it (index).
    pub daemon: usize,
    pub limit: u32,
    pub enqueued: usize,
    pub delivered_in_window: usize,
    /// `delivered_in_window / seconds / limit`, in percent.
    pub share_pct: f64,
    pub rate_limited: u64,
    pub max_fixed: u32,
    pub max_sliding: u32,
    /// Where the first 1 s interval holding `max_sliding` requests starts, in seconds after
    /// the account's first request; and the most in one sliding second inside the measured
    /// interval alone.
    pub max_sliding_at_s: f64,
    pub max_sliding_measured: u32,
    /// The shortest time, in ms, between a request and the `limit`-th after it at the sandbox
    /// (under 1,000 ms means `limit + 1` arrived within one second; the daemon spaces their
    /// grants at least 1,002 ms apart, so the rest is the way from grant to arrival).
    pub min_span_ms: f64,
    /// Requests it received until the interval's end: fewer than `enqueued` means it still had
    /// a backlog then.
    pub requested_by_end: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryResult {
    /// `cluster` (three daemons) or `sled` (one embedded daemon, the anchor).
    pub mode: &'static str,
    /// Run at the same time as the other mode's (each with its own sandbox): the sled daemon
    /// then shares the machine with a busy NATS cluster, as the cluster daemons do.
    pub alongside: bool,
    pub seconds: f64,
    pub preload_seconds: f64,
    pub rows: Vec<AccountRow>,
    /// Most requests in flight at once for any one message (1 when serialized).
    pub max_concurrent_per_message: u32,
    /// Every account still had a backlog at the interval's end.
    pub backlog_throughout: bool,
    /// CPU time over the measured interval per request the sandbox received in it, in
    /// microseconds: of the daemon processes and of the nats-server processes; and the busy
    /// share of the machine's CPUs.
    pub daemon_us_per_request: f64,
    pub nats_us_per_request: f64,
    pub machine_busy: f64,
}

/// When a run starts: at once, or after another run's preload (`Wait`), which signals it
/// (`Signal`).
pub enum Gate {
    Now,
    Signal(oneshot::Sender<()>),
    Wait(oneshot::Receiver<()>),
}

/// Runs the scenario through three cluster daemons (`clustered`), or through one daemon in
/// the embedded sled mode (the anchor: same accounts, same backlog, same measurement).
pub async fn run(
    args: &Args,
    parent: &Path,
    clustered: bool,
    mut gate: Gate,
) -> anyhow::Result<DeliveryResult> {
    let alongside = !matches!(gate, Gate::Now);
    if let Gate::Wait(rx) = std::mem::replace(&mut gate, Gate::Now) {
        let _ = rx.await;
    }
    let sandbox = Sandbox::start(SandboxConfig::default()).await?;
    let limit = Plan::Pro.per_second();
    let (mut cluster, mut single) = (None, None);
    let (sockets, owner) = if clustered {
        println!(
            "  delivery cluster: starting a 3-node NATS cluster and 3 daemons; {ACCOUNTS} Pro accounts ({limit}/s each)"
        );
        let c = Cluster::start(parent, &sandbox, "deliver", 3).await?;
        let owner = c.settled(Duration::from_secs(60)).await?;
        let sockets = c.sockets();
        cluster = Some(c);
        (sockets, owner)
    } else {
        println!("  delivery sled: one daemon; {ACCOUNTS} Pro accounts ({limit}/s each)");
        let mut daemon = rig::daemon(parent, &sandbox, &Storage::Sled)?;
        daemon.start().await?;
        let socket = daemon.socket.clone();
        single = Some(daemon);
        (vec![socket], vec![0; PARTITIONS as usize])
    };

    // Ten accounts, as evenly over the daemons as their partitions allow.
    let per_daemon = ACCOUNTS.div_ceil(sockets.len());
    let mut taken = vec![0usize; sockets.len()];
    let mut accounts: Vec<(String, usize)> = Vec::new();
    for i in 0.. {
        if accounts.len() == ACCOUNTS {
            break;
        }
        let account = format!("pro-{i:03}");
        let daemon = owner[partition_of(&account) as usize];
        if daemon < taken.len() && taken[daemon] < per_daemon {
            taken[daemon] += 1;
            accounts.push((account, daemon));
        }
    }

    // A backlog lasting well beyond the measured interval: the preload, both edges, the
    // interval and 20 s more, at the limit.
    let per_account =
        (f64::from(limit) * (args.delivery_seconds + 2.0 * args.edge + 20.0)) as usize;
    let mut lines: Vec<Vec<Vec<u8>>> = vec![Vec::new(); sockets.len()];
    for seq in 0..per_account {
        for (a, (account, _)) in accounts.iter().enumerate() {
            let message = format!("{account}-m{seq}");
            lines[(seq + a) % sockets.len()].push(small_edit(account, &message, seq as u64));
        }
    }
    let preload_started = Instant::now();
    let mut producers = Vec::new();
    for (socket, lines) in sockets.iter().zip(lines) {
        let socket = socket.clone();
        producers.push(tokio::spawn(async move { send_all(&socket, lines).await }));
    }
    for producer in producers {
        producer.await??;
    }
    let preload = preload_started.elapsed();
    if let Gate::Signal(tx) = gate {
        let _ = tx.send(());
    }
    println!(
        "  delivery: preloaded {} edits through {} daemon(s) in {:.2} s; measuring {} s ...",
        per_account * ACCOUNTS,
        sockets.len(),
        preload.as_secs_f64(),
        args.delivery_seconds
    );
    let from = Instant::now() + Duration::from_secs_f64(args.edge);
    let until = from + Duration::from_secs_f64(args.delivery_seconds);
    let members: Vec<&Daemon> = match &cluster {
        Some(c) => c.daemons.iter().collect(),
        None => single.iter().collect(),
    };
    let pids: Vec<String> = members
        .iter()
        .filter_map(|d| d.pid())
        .map(|p| p.to_string())
        .collect();
    let nats = if clustered { nats_pids() } else { Vec::new() };
    let sample = || (cpu_of(&pids), cpu_of(&nats), proc::machine_cpu());
    tokio::time::sleep_until(from.into()).await;
    let (d0, n0, m0) = sample();
    tokio::time::sleep_until(until.into()).await;
    let (d1, n1, m1) = sample();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let requests = sandbox.requests();
    let stats = sandbox.stats();
    let mut by_account: BTreeMap<&str, Vec<(Instant, Option<u16>)>> = BTreeMap::new();
    for r in &requests {
        if let Some(account) = r.account_id.as_deref() {
            by_account
                .entry(account)
                .or_default()
                .push((r.at, r.status));
        }
    }
    let mut rows = Vec::new();
    for (account, daemon) in &accounts {
        let log = by_account
            .get(account.as_str())
            .cloned()
            .unwrap_or_default();
        let delivered_in_window = log
            .iter()
            .filter(|(at, status)| *at >= from && *at < until && matches!(status, Some(200..=299)))
            .count();
        let a = stats.accounts.get(account.as_str());
        rows.push(AccountRow {
            account: account.clone(),
            daemon: *daemon,
            limit: a.map_or(limit, |a| a.limit_per_second),
            enqueued: per_account,
            delivered_in_window,
            share_pct: delivered_in_window as f64 * 100.0
                / (args.delivery_seconds * f64::from(limit)),
            rate_limited: a.map_or(0, |a| a.rate_limited),
            max_fixed: a.map_or(0, |a| a.max_in_fixed_window(SECOND)),
            max_sliding: a.map_or(0, |a| a.max_in_sliding_window(SECOND)),
            max_sliding_at_s: {
                let times: Vec<Instant> = log.iter().map(|(at, _)| *at).collect();
                let (_, at) = sliding(&times);
                match (times.first(), at) {
                    (Some(first), Some(at)) => (at - *first).as_secs_f64(),
                    _ => 0.0,
                }
            },
            min_span_ms: {
                let times: Vec<Instant> = log.iter().map(|(at, _)| *at).collect();
                times
                    .windows(limit as usize + 1)
                    .map(|w| (w[w.len() - 1] - w[0]).as_secs_f64() * 1000.0)
                    .fold(f64::INFINITY, f64::min)
            },
            max_sliding_measured: {
                let inside: Vec<Instant> = log
                    .iter()
                    .map(|(at, _)| *at)
                    .filter(|at| *at >= from && *at < until)
                    .collect();
                sliding(&inside).0
            },
            requested_by_end: log.iter().filter(|(at, _)| *at < until).count(),
        });
    }
    let max_concurrent_per_message = sandbox
        .messages()
        .iter()
        .map(|m| m.max_concurrent)
        .max()
        .unwrap_or(0);
    let backlog_throughout = rows.iter().all(|r| r.requested_by_end < r.enqueued);
    let in_window = requests
        .iter()
        .filter(|r| r.at >= from && r.at < until)
        .count()
        .max(1) as f64;
    drop(cluster);
    drop(single);
    sandbox.shutdown().await;
    Ok(DeliveryResult {
        mode: if clustered { "cluster" } else { "sled" },
        alongside,
        seconds: args.delivery_seconds,
        preload_seconds: preload.as_secs_f64(),
        rows,
        max_concurrent_per_message,
        backlog_throughout,
        daemon_us_per_request: (d1 - d0).as_secs_f64() * 1e6 / in_window,
        nats_us_per_request: (n1 - n0).as_secs_f64() * 1e6 / in_window,
        machine_busy: (m1.0 - m0.0).as_secs_f64() / (m1.1 - m0.1).as_secs_f64().max(1e-9),
    })
}

/// Most of the sorted `times` in any half-open interval `[t, t + 1 s)`, and where the first
/// such interval starts.
fn sliding(times: &[Instant]) -> (u32, Option<Instant>) {
    let mut best = (0, None);
    let mut first = 0;
    for (last, t) in times.iter().enumerate() {
        while t.saturating_duration_since(times[first]) >= SECOND {
            first += 1;
        }
        if last - first + 1 > best.0 {
            best = (last - first + 1, Some(times[first]));
        }
    }
    (best.0 as u32, best.1)
}

pub fn print(result: &DeliveryResult) {
    println!(
        "delivery through {}{}:",
        if result.mode == "cluster" {
            "3 cluster daemons"
        } else {
            "1 sled daemon (anchor)"
        },
        if result.alongside {
            ", both modes at the same time"
        } else {
            ""
        }
    );
    println!(
        "{:<9} {:>6} {:>5} {:>9} {:>10} {:>5} {:>5} {:>7} {:>8} {:>9} {:>9} {:>11}",
        "account",
        "daemon",
        "limit",
        "delivered",
        "% of limit",
        "429",
        "fixed",
        "sliding",
        "worst at",
        "measured",
        "min span",
        "left at end"
    );
    for r in &result.rows {
        println!(
            "{:<9} {:>6} {:>5} {:>9} {:>9.2}% {:>5} {:>5} {:>7} {:>7.2}s {:>9} {:>7.1}ms {:>11}",
            r.account,
            r.daemon,
            r.limit,
            r.delivered_in_window,
            r.share_pct,
            r.rate_limited,
            r.max_fixed,
            r.max_sliding,
            r.max_sliding_at_s,
            r.max_sliding_measured,
            r.min_span_ms,
            r.enqueued.saturating_sub(r.requested_by_end)
        );
    }
    println!(
        "CPU per request received in the interval: daemons {:.0} us, nats-servers {:.0} us; machine busy {:.0} %",
        result.daemon_us_per_request,
        result.nats_us_per_request,
        result.machine_busy * 100.0
    );
    println!(
        "(delivered: 2xx requests arriving in the {} s interval; fixed / sliding: most requests in one 1 s window over the whole run, the first sliding one that many starting `worst at` after the account's first request; measured: most in a sliding window inside the interval; min span: shortest time from a request to the limit-th after it, the daemon's pacer keeps their grants >= 1002 ms apart; most requests at once for one message: {})",
        result.seconds, result.max_concurrent_per_message
    );
}
