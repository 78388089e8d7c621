//! The daemon as its own process ([`Daemon`]): the release binary cargo builds for the bench
//! (`CARGO_BIN_EXE_zoomq`, i.e. `target/release/zoomq` under `cargo bench`) running
//! `zoomq serve --config` on a configuration generated in a directory of its own
//! ([`ConfigToml`]), started until its socket answers, signalled, waited for, and killed on drop.
//! Shared by the benches that run the daemon apart from the sandbox and the producers, to read
//! its CPU time and memory from `/proc/PID` or to kill it (drain's `accounts`, scale, cluster).

use std::fmt::{Display, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use zoomq::sandbox::Sandbox;

/// A daemon process's files, all in one directory: its socket `zoomq.sock`, its data
/// directory `data`, its configuration `zoomq.toml` and its log (stderr) `daemon.log`; and the
/// process while it runs.
pub struct Daemon {
    pub socket: PathBuf,
    pub data: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    /// The `RUST_LOG` the process runs with; `None` (the default) leaves it unset, for the
    /// daemon's own default.
    pub rust_log: Option<&'static str>,
    /// How long a start (until the socket answers) or a stop may take; 60 s unless set.
    pub timeout: Duration,
    /// The running process; `None` before a start and after a stop.
    child: Option<Child>,
    /// The directory, when it is a temporary one of the daemon's own: removed on drop, after
    /// the process is gone.
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// A daemon whose files go in `dir`, which it does not own.
    pub fn in_dir(dir: &Path) -> Daemon {
        Daemon {
            socket: dir.join("zoomq.sock"),
            data: dir.join("data"),
            config_path: dir.join("zoomq.toml"),
            log_path: dir.join("daemon.log"),
            rust_log: None,
            timeout: Duration::from_secs(60),
            child: None,
            _dir: None,
        }
    }

    /// A daemon whose files go in a fresh temporary directory `prefix...` under `parent`,
    /// removed when the daemon is dropped.
    pub fn in_temp_dir(parent: &Path, prefix: &str) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        let mut daemon = Daemon::in_dir(dir.path());
        daemon._dir = Some(dir);
        Ok(daemon)
    }

    /// The start of the daemon's configuration: `[socket] path` and `[storage] path`. Lines
    /// added next are in `[storage]` until one opens another section.
    pub fn config(&self) -> ConfigToml {
        let mut toml = ConfigToml::default();
        toml.line(format_args!(
            "[socket]\npath = {}",
            quote(&self.socket.display().to_string())
        ))
        .line(format_args!(
            "[storage]\npath = {}",
            quote(&self.data.display().to_string())
        ));
        toml
    }

    /// Writes `toml` as the configuration the next start reads.
    pub fn write_config(&self, toml: &ConfigToml) -> anyhow::Result<()> {
        std::fs::write(&self.config_path, &toml.0)
            .with_context(|| format!("cannot write {}", self.config_path.display()))
    }

    /// Spawns `zoomq serve --config <config_path>`, its stderr appended to the log; returns the
    /// instant just before the spawn. [`Daemon::ready`] waits for its answer.
    pub fn spawn(&mut self) -> anyhow::Result<Instant> {
        anyhow::ensure!(self.child.is_none(), "already running");
        let spawned = Instant::now();
        self.child = Some(serve(&self.config_path, &self.log_path, self.rust_log)?);
        Ok(spawned)
    }

    /// Waits until the process spawned at `spawned` answers `{"op":"ping"}` on its socket. The
    /// daemon binds its socket before it recovers its queue and answers once recovery is
    /// done, so the answer also marks the end of recovery. Fails, with the end of the log, if
    /// the process exits first (it is then no longer running) or the timeout passes.
    pub async fn ready(&mut self, spawned: Instant) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("not running")?;
        let ready = wait_ready(&self.socket, child, spawned, self.timeout, &self.log_path).await;
        if ready.is_err() && child.try_wait().ok().flatten().is_some() {
            self.child = None;
        }
        ready
    }

    /// [`Daemon::spawn`], then [`Daemon::ready`].
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let spawned = self.spawn()?;
        self.ready(spawned).await
    }

    /// SIGKILL, then waits until the process is gone. Acknowledged edits survive it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.as_mut().context("not running")?.kill()?;
        self.wait_exit().await
    }

    /// SIGTERM (a graceful stop), then waits for the process to exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        sigterm(self.child.as_ref().context("not running")?)?;
        self.wait_exit().await
    }

    async fn wait_exit(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("not running")?;
        wait_exit(child, self.timeout).await?;
        self.child = None;
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's `stats` answer; an answer without `ok:true` is an error.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        let stats = zoomq::client::request(&self.socket, &json!({"op": "stats"})).await?;
        anyhow::ensure!(stats["ok"] == true, "stats answered {stats}");
        Ok(stats)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A daemon configuration in TOML, written line by line (see [`Daemon::config`]); whatever
/// it leaves out is the daemon's default.
#[derive(Debug, Default)]
pub struct ConfigToml(String);

impl ConfigToml {
    /// Appends `line` and a newline; `line` may hold several lines, or open a section.
    pub fn line(&mut self, line: impl Display) -> &mut Self {
        writeln!(self.0, "{line}").expect("writing to a String");
        self
    }

    /// `[zoom]`: the sandbox's API and token URLs, and the credentials the daemon asks for
    /// tokens with. Lines added next are in `[zoom]` (`plan`, ...).
    pub fn zoom(&mut self, sandbox: &Sandbox, client_id: &str, client_secret: &str) -> &mut Self {
        self.line(format_args!(
            "[zoom]\napi_base = {}",
            quote(&sandbox.api_base())
        ))
        .line(format_args!("token_url = {}", quote(&sandbox.token_url())))
        .line(format_args!("client_id = {}", quote(client_id)))
        .line(format_args!("client_secret = {}", quote(client_secret)))
    }
}

/// `s` as a TOML basic string.
pub fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// Spawns `zoomq serve --config <config>` with its stderr (the log) appended to `log`.
/// `rust_log`: the `RUST_LOG` it runs with; `None` leaves it unset (the daemon's default).
fn serve(config: &Path, log: &Path, rust_log: Option<&str>) -> anyhow::Result<Child> {
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

/// Waits until the daemon answers `{"op":"ping"}` on `socket`, trying every 5 ms. Fails, with
/// the end of `log`, if the process exits first or `timeout` passes after `spawned`.
async fn wait_ready(
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
fn sigterm(child: &Child) -> anyhow::Result<()> {
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
async fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
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
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
