//! The daemon as its own process (`common/spawn.rs`): the release binary cargo builds for this
//! bench running `zoomq serve --config` on a generated configuration in a fresh temporary
//! directory, so its CPU time and memory can be read from `/proc/PID` apart from the sandbox
//! and the producers, which stay in this process.
//!
//! The configuration holds only what delivery to the sandbox needs (socket, data directory,
//! sandbox URLs and credentials, plan) and turns metrics off; everything else is the daemon's
//! default. The process is stopped with SIGKILL or SIGTERM by its own pid, and killed on drop.

use std::time::Duration;

use anyhow::Context;
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::proc;
use crate::spawn::{quote, Daemon};

/// CPU time and memory of the daemon process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// A daemon (not started yet) delivering to `sandbox`, which runs with `credentials`, with
/// `plan` as every account's plan.
pub fn daemon(
    sandbox: &Sandbox,
    credentials: &SandboxConfig,
    plan: Plan,
) -> anyhow::Result<Daemon> {
    let daemon = Daemon::in_temp_dir(&std::env::temp_dir(), "zoomq-drain-proc-")?;
    let mut toml = daemon.config();
    toml.zoom(sandbox, &credentials.client_id, &credentials.client_secret)
        .line(format_args!("plan = {}", quote(plan.as_str())))
        .line("[metrics]\nlisten = \"\"");
    daemon.write_config(&toml)?;
    Ok(daemon)
}

/// The running daemon's CPU time and memory now.
pub fn usage(daemon: &Daemon) -> anyhow::Result<Usage> {
    let pid = daemon.pid().context("not running")?.to_string();
    Ok(Usage {
        cpu: proc::cpu_time(&pid),
        rss_bytes: proc::status_bytes(&pid, "VmRSS:"),
        hwm_bytes: proc::status_bytes(&pid, "VmHWM:"),
    })
}
