//! The daemon as its own process: the release binary cargo builds for this bench
//! (`CARGO_BIN_EXE_zoomq`, i.e. `target/release/zoomq` under `cargo bench`) running
//! `zoomq serve --config` on a generated configuration in a fresh temporary directory, so its CPU
//! time and memory can be read from `/proc/PID` apart from the sandbox and the producers, which
//! stay in this process.
//!
//! The configuration holds only what delivery to the sandbox needs (socket, data directory,
//! sandbox URLs and credentials, plan) and turns metrics off; everything else is the daemon's
//! default. The process is stopped with SIGKILL or SIGTERM by its own pid, and killed on drop.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use zoomq::plan::Plan;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::proc;

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
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        let spawned = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_zoomq"))
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start zoomq")?;
        self.child = Some(child);
        loop {
            if let Ok(answer) = zoomq::client::request(&self.socket, &json!({"op": "ping"})).await {
                anyhow::ensure!(answer["ok"] == true, "ping answered {answer}");
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                anyhow::bail!(
                    "zoomq exited during start-up: {status}\n{}",
                    self.log_tail()
                );
            }
            anyhow::ensure!(
                spawned.elapsed() < START_TIMEOUT,
                "zoomq did not answer within {START_TIMEOUT:?}\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL, then waits for the process to be gone. Acknowledged edits survive it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.as_mut().context("not running")?.kill()?;
        self.wait_exit().await
    }

    /// SIGTERM, then waits for the graceful exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = Command::new("kill").arg("-TERM").arg(&pid).status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let child = self.child.as_mut().context("not running")?;
        while child.try_wait()?.is_none() {
            anyhow::ensure!(started.elapsed() < START_TIMEOUT, "zoomq did not exit");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
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
