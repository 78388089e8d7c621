//! Restarts with the whole backlog pending (step 3): SIGTERM then start, SIGKILL then start,
//! and a SIGTERM while every request to Zoom hangs, then a start that must find every
//! acknowledged edit still there.

use std::time::{Duration, Instant};

use serde::Serialize;
use zoomq::sandbox::{Faults, Sandbox, SandboxConfig};

use crate::daemon::{Backlog, Daemon, Kind, Memory, Started};
use crate::report::{progress, secs_text};
use crate::Args;

/// How long a hanging request to Zoom hangs: longer than any run.
const HANG: Duration = Duration::from_secs(3600);
/// Longest wait for the daemon to have its requests in flight before the SIGTERM.
const HANG_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize)]
pub struct Restarts {
    /// SIGTERM of the daemon that did the fill (delivery held: no token), until it was gone.
    pub term_stop_seconds: f64,
    pub term: Started,
    pub term_backlog: Backlog,
    pub term_memory: Memory,
    pub kill: Started,
    pub kill_backlog: Backlog,
    pub kill_memory: Memory,
    pub hung: Hung,
}

/// SIGTERM while every request to Zoom hangs.
#[derive(Debug, Clone, Serialize)]
pub struct Hung {
    /// Start against the sandbox whose edit requests all hang (tokens are immediate).
    pub start: Started,
    /// Requests the sandbox was holding when the SIGTERM was sent, and how long after the
    /// ping the bench waited for them (until `delivery.concurrency` were in flight, at most
    /// [`HANG_WAIT`]).
    pub hanging: u64,
    pub waited_seconds: f64,
    /// From the SIGTERM until the process was gone.
    pub stop_seconds: f64,
    /// Edits the sandbox applied (answered 2xx): none, since every request hangs.
    pub delivered: u64,
    /// The start after it (delivery held again), and the queue it found.
    pub restart: Started,
    pub backlog: Backlog,
}

/// Step 3 on the running daemon that holds the backlog (delivery held by `held`); leaves it
/// stopped.
pub async fn restarts(
    args: &Args,
    daemon: &mut Daemon,
    held: &Sandbox,
) -> anyhow::Result<Restarts> {
    let term_stop = daemon.terminate().await?;
    let term = daemon.start("restart after SIGTERM", Kind::Backlog).await?;
    let term_backlog = daemon.settle(args.edits).await?;
    let term_memory = daemon.memory()?;
    progress(&format!(
        "SIGTERM: stopped in {}, ready in {} (recovery {} ms), {term_memory}",
        secs_text(term_stop),
        secs_text(term.ready),
        term.recovery_ms.unwrap_or(0)
    ));
    daemon.kill().await?;
    let kill = daemon.start("restart after SIGKILL", Kind::Backlog).await?;
    let kill_backlog = daemon.settle(args.edits).await?;
    let kill_memory = daemon.memory()?;
    progress(&format!(
        "SIGKILL: ready in {} (recovery {} ms), {kill_memory}",
        secs_text(kill.ready),
        kill.recovery_ms.unwrap_or(0)
    ));
    daemon.terminate().await?;
    let hung = sigterm_while_zoom_hangs(args, daemon, held).await?;
    Ok(Restarts {
        term_stop_seconds: term_stop.as_secs_f64(),
        term,
        term_backlog,
        term_memory,
        kill,
        kill_backlog,
        kill_memory,
        hung,
    })
}

/// Starts the stopped daemon against a sandbox where every edit request hangs (the sandbox's
/// `slow` fault with probability 1 and a one-hour delay: each request is admitted, counted in
/// its account's arrivals, then held), waits until the daemon has its requests in flight,
/// sends SIGTERM and times the exit. Then starts it again with delivery held and checks that
/// every acknowledged edit is still pending. Leaves the daemon stopped.
async fn sigterm_while_zoom_hangs(
    args: &Args,
    daemon: &mut Daemon,
    held: &Sandbox,
) -> anyhow::Result<Hung> {
    let hang = Sandbox::start(SandboxConfig {
        faults: Faults {
            slow: 1.0,
            slow_min: HANG,
            slow_max: HANG,
            ..Faults::default()
        },
        request_log_capacity: 0,
        ..SandboxConfig::default()
    })
    .await?;
    daemon.configure(args, &hang, None)?;
    let start = daemon
        .start("restart, every Zoom request hangs", Kind::Backlog)
        .await?;
    let concurrency = zoomq::config::Config::default().delivery.concurrency as u64;
    let want = concurrency.min(args.edits);
    let ready = Instant::now();
    let mut hanging = 0;
    while ready.elapsed() < HANG_WAIT {
        hanging = hanging_requests(&hang);
        if hanging >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waited = ready.elapsed();
    anyhow::ensure!(
        hanging > 0,
        "no request reached the sandbox in {HANG_WAIT:?}"
    );
    let stop = daemon.terminate().await?;
    let stats = hang.stats();
    let delivered: u64 = stats
        .by_status
        .iter()
        .filter(|(status, _)| (200..300).contains(*status))
        .map(|(_, n)| n)
        .sum();
    progress(&format!(
        "SIGTERM with {hanging} requests hanging at Zoom: stopped in {} ({delivered} delivered)",
        secs_text(stop)
    ));
    // The sandbox keeps holding its requests (none can complete) until the daemon has started
    // again; only then is it shut down.
    daemon.configure(args, held, None)?;
    let restart = daemon
        .start("restart after the SIGTERM with Zoom hanging", Kind::Backlog)
        .await?;
    let backlog = daemon.settle(args.edits - delivered).await?;
    progress(&format!(
        "restart after it: ready in {}, {} pending + {} in flight",
        secs_text(restart.ready),
        backlog.pending,
        backlog.in_flight
    ));
    daemon.terminate().await?;
    hang.shutdown().await;
    Ok(Hung {
        start,
        hanging,
        waited_seconds: waited.as_secs_f64(),
        stop_seconds: stop.as_secs_f64(),
        delivered,
        restart,
        backlog,
    })
}

/// Edit requests the sandbox admitted and has not answered.
fn hanging_requests(sandbox: &Sandbox) -> u64 {
    let stats = sandbox.stats();
    let admitted: u64 = stats.accounts.values().map(|a| a.requests).sum();
    admitted.saturating_sub(stats.requests_total)
}
