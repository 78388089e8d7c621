//! The daemon as its own process: starting the release binary cargo builds for the bench
//! (`CARGO_BIN_EXE_zoomq`, i.e. `target/release/zoomq` under `cargo bench`) as
//! `zoomq serve --config`, waiting until its socket answers, signalling it and waiting for its
//! exit. Shared by the benches that read the daemon's CPU time and memory from `/proc/PID`
//! apart from the sandbox and the producers (drain's `accounts`, scale).

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;

/// Spawns `zoomq serve --config <config>` with its stderr (the log) appended to `log`.
/// `rust_log`: the `RUST_LOG` it runs with; `None` leaves it unset (the daemon's default).
pub fn serve(config: &Path, log: &Path, rust_log: Option<&str>) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_zoomq"));
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    command.spawn().context("cannot start zoomq")
}

/// Waits until the daemon answers `{"op":"ping"}` on `socket`, trying every 5 ms. The daemon
/// binds its socket before it recovers its queue and answers once recovery is done, so the
/// answer also marks the end of recovery. Fails, with the end of `log`, if the process exits
/// first or `timeout` passes after `spawned`.
pub async fn wait_ready(
    socket: &Path,
    child: &mut Child,
    spawned: Instant,
    timeout: Duration,
    log: &Path,
) -> anyhow::Result<()> {
    loop {
        if let Ok(answer) = zoomq::client::request(socket, &json!({"op": "ping"})).await {
            anyhow::ensure!(answer["ok"] == true, "ping answered {answer}");
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("zoomq exited during start-up: {status}\n{}", log_tail(log));
        }
        anyhow::ensure!(
            spawned.elapsed() < timeout,
            "zoomq did not answer within {timeout:?}\n{}",
            log_tail(log)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends SIGTERM (a graceful stop) to the process.
pub fn sigterm(child: &Child) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) with a pid this process spawned and has not reaped yet, so it cannot name
    // another process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    anyhow::ensure!(
        result == 0,
        "kill -TERM {pid}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Waits for the process to exit, polling every 5 ms, at most `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "zoomq did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The last 20 lines of the daemon's log, for error messages.
pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
