//! The daemon as its own process (started, pinged and stopped with `common/spawn.rs`): the
//! release binary cargo builds for this bench (`CARGO_BIN_EXE_zoomq`, i.e.
//! `target/release/zoomq` under `cargo bench`) running `zoomq serve --config` on a generated
//! configuration in a fresh temporary directory, so its CPU time and memory can be read from
//! `/proc/PID` apart from the sandbox and the producers, which stay in this process.
//!
//! The configuration holds only what delivery to the sandbox needs (socket, data directory,
//! sandbox URLs and credentials, plan) and turns metrics off; everything else is the daemon's
//! default. The process is stopped with SIGKILL or SIGTERM by its own pid, and killed on drop.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::{proc, spawn};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// CPU time and memory of the daemon process at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

pub struct DaemonProcess {
    pub socket: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    /// The running daemon; `None` before `start` and after it stopped.
    child: Option<Child>,
    /// Holds the configuration, socket, log and database; removed on drop, after the kill.
    dir: tempfile::TempDir,
}

impl DaemonProcess {
    /// Writes a configuration delivering to `sandbox` with `plan` as every account's plan.
    pub fn new(sandbox: &Sandbox, credentials: &SandboxConfig, plan: Plan) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("zoomq-drain-proc-")
            .tempdir()?;
        let daemon = DaemonProcess {
            socket: dir.path().join("zoomq.sock"),
            config_path: dir.path().join("zoomq.toml"),
            log_path: dir.path().join("daemon.log"),
            child: None,
            dir,
        };
        let q = |s: &str| format!("{s:?}");
        let mut toml = String::new();
        writeln!(
            toml,
            "[socket]\npath = {}",
            q(&daemon.socket.display().to_string())
        )?;
        let data = daemon.dir.path().join("data");
        writeln!(toml, "[storage]\npath = {}", q(&data.display().to_string()))?;
        writeln!(toml, "[zoom]\napi_base = {}", q(&sandbox.api_base()))?;
        writeln!(toml, "token_url = {}", q(&sandbox.token_url()))?;
        writeln!(toml, "client_id = {}", q(&credentials.client_id))?;
        writeln!(toml, "client_secret = {}", q(&credentials.client_secret))?;
        writeln!(toml, "plan = {}", q(plan.as_str()))?;
        writeln!(toml, "[metrics]\nlisten = \"\"")?;
        std::fs::write(&daemon.config_path, toml)?;
        Ok(daemon)
    }

    /// Spawns the daemon and waits until it answers a ping (after its queue is recovered).
    pub async fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "already running");
        let spawned = Instant::now();
        let child = self
            .child
            .insert(spawn::serve(&self.config_path, &self.log_path, None)?);
        let ready =
            spawn::wait_ready(&self.socket, child, spawned, START_TIMEOUT, &self.log_path).await;
        if ready.is_err() && child.try_wait().ok().flatten().is_some() {
            self.child = None;
        }
        ready
    }

    /// SIGKILL, then waits for the process to be gone. Acknowledged edits survive it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.as_mut().context("not running")?.kill()?;
        self.wait_exit().await
    }

    /// SIGTERM, then waits for the graceful exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        spawn::sigterm(self.child.as_ref().context("not running")?)?;
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("not running")?;
        spawn::wait_exit(child, START_TIMEOUT).await?;
        self.child = None;
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<String> {
        Ok(self.child.as_ref().context("not running")?.id().to_string())
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        let stats = zoomq::client::request(&self.socket, &json!({"op": "stats"})).await?;
        anyhow::ensure!(stats["ok"] == true, "stats answered {stats}");
        Ok(stats)
    }

    pub fn usage(&self) -> anyhow::Result<Usage> {
        let pid = self.pid()?;
        Ok(Usage {
            cpu: proc::cpu_time(&pid),
            rss_bytes: proc::status_bytes(&pid, "VmRSS:"),
            hwm_bytes: proc::status_bytes(&pid, "VmHWM:"),
        })
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
