//! Drain and refill (steps 4 and 5): start with the backlog against a fast sandbox that answers
//! at once, time the first request that reaches it, deliver everything, measure the data
//! directory through stop and restart, then fill again with delivery held.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use zoomq::sandbox::{AccountSettings, Sandbox, SandboxConfig};

use crate::daemon::{Daemon, Disk, Kind, Memory, Started};
use crate::fill::{account_id, fill_queue, message_id};
use crate::report::{progress, round2, secs_text};
use crate::{disk, Args};

/// One drain-and-refill cycle.
#[derive(Debug, Clone, Serialize)]
pub struct Cycle {
    /// Start of the draining daemon, with the whole backlog to recover.
    pub start: Started,
    /// From spawn, and from the ping's answer, until the first edit request reached the
    /// sandbox (its arrival as the sandbox recorded it).
    pub first_request_seconds: Option<f64>,
    pub first_request_after_ping_seconds: Option<f64>,
    pub drain: Drain,
    /// Messages whose content was checked at the sandbox.
    pub checked_messages: u64,
    pub memory_drained: Memory,
    pub disk_drained: Disk,
    pub stop_seconds: f64,
    pub disk_stopped: Disk,
    /// Start on the drained database.
    pub restart: Started,
    pub stats_restarted: Value,
    pub disk_restarted: Disk,
    pub memory_restarted: Memory,
    pub refill: Option<Refill>,
}

impl Cycle {
    /// The largest data directory seen in this cycle, drain samples included.
    pub fn max_disk(&self) -> u64 {
        let sampled = self.drain.by_progress.iter().map(|s| s[4] as u64);
        [
            self.disk_drained.size(),
            self.disk_stopped.size(),
            self.disk_restarted.size(),
            self.refill.as_ref().map_or(0, |r| r.disk.size()),
        ]
        .into_iter()
        .chain(sampled)
        .max()
        .unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Refill {
    pub seconds: f64,
    pub rate: f64,
    pub disk: Disk,
    pub memory: Memory,
}

/// Step 4 (and 5 unless `--no-refill`) on a stopped daemon holding the backlog of fill
/// `round - 1`. Leaves the daemon stopped.
pub async fn drain_and_refill(
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
    let start = daemon
        .start(&format!("cycle {round}: drain"), Kind::Drain)
        .await?;
    progress(&format!(
        "cycle {round}: draining (ready in {})",
        secs_text(start.ready)
    ));
    let drain = drain_queue(args, daemon).await?;
    let checked_messages = check_delivered(args, &fast, &drain, round - 1)?;
    let first = first_arrival(args, &fast);
    let first_request_seconds = first.map(|at| (at - start.spawned).as_secs_f64());
    let first_request_after_ping_seconds =
        first.map(|at| (at - start.spawned).as_secs_f64() - start.ready.as_secs_f64());
    let memory_drained = daemon.memory()?;
    let disk_drained = daemon.disk().await;
    let stop = daemon.terminate().await?;
    let disk_stopped = daemon.disk().await;
    let restart = daemon
        .start(
            &format!("cycle {round}: restart of the drained db"),
            Kind::Other,
        )
        .await?;
    let stats_restarted = daemon.stats().await?;
    // Let sled's background work after a start settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let disk_restarted = daemon.disk().await;
    let memory_restarted = daemon.memory()?;
    progress(&format!(
        "cycle {round}: first request {} after spawn; {drain}; data dir after drain \
         {disk_drained}, after stop {disk_stopped}, after restart {disk_restarted}",
        first_request_seconds.map_or("never".into(), |s| format!("{s:.3} s")),
    ));
    daemon.terminate().await?;
    fast.shutdown().await;
    let mut refill = None;
    if !args.no_refill {
        daemon.configure(args, held, None)?;
        daemon
            .start(&format!("cycle {round}: refill"), Kind::Fill)
            .await?;
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
        first_request_seconds,
        first_request_after_ping_seconds,
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

/// When the first edit request reached the sandbox: the earliest first arrival over the
/// accounts (the sandbox records each admitted request's arrival, under its lock, as it comes).
fn first_arrival(args: &Args, sandbox: &Sandbox) -> Option<Instant> {
    (0..args.accounts)
        .filter_map(|a| sandbox.account(&account_id(a)))
        .filter_map(|stats| stats.arrivals.first().copied())
        .min()
        .map(|offset| sandbox.started() + offset)
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    /// Edits delivered (the daemon's `delivered` counter).
    pub delivered: u64,
    /// Whether the whole backlog was delivered within `--drain-limit`.
    pub complete: bool,
    pub seconds: f64,
    pub rate: f64,
    /// Seconds the whole backlog takes at `rate` (equal to `seconds` when complete).
    pub full_seconds: f64,
    /// `[share delivered, seconds, VmRSS MB, data dir apparent MB, data dir size bytes]` at
    /// every tenth of the drain (size: the larger of apparent and allocated).
    pub by_progress: Vec<[f64; 5]>,
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
    let pid = daemon.pid()?.to_string();
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
            let rss = crate::proc::status_bytes(&pid, "VmRSS:") as f64 / 1e6;
            let usage = disk::usage(&daemon.process.data);
            by_progress.push([
                round2(delivered as f64 / args.edits as f64),
                round2(elapsed.as_secs_f64()),
                rss.round(),
                (usage.apparent as f64 / 1e6).round(),
                usage.size() as f64,
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
