//! The in-process rig: a sandbox Zoom and the real daemon ([`zoomq::run`], `common/embed.rs`)
//! on a fresh temporary directory, both on this process's runtime, and the producer side every
//! scenario shares (request lines, pipelined preloads with `common/load.rs`, a producer's own
//! connection, sequence-numbered contents).
//!
//! The daemon runs on its default settings: [`Sandbox::daemon_config`] plus whatever a
//! scenario's `tweak` adds (per-account overrides). `accounts` runs the daemon as its own
//! process instead (see `process.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use zoomq::config::Config;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::embed::Embedded;
use crate::load::send_all;

/// The account single-account scenarios' edits name.
pub const ACCOUNT: &str = "bench-account";
/// The bot every request names.
pub const ROBOT: &str = "bench-bot@xmpp.zoom.us";

/// A sandbox Zoom and a daemon on a fresh directory, both on this runtime.
pub struct Rig {
    pub sandbox: Sandbox,
    pub socket: PathBuf,
    /// The daemon; `stop` cancels it and waits for its graceful shutdown.
    daemon: Embedded,
    /// Holds the socket and the sled database; removed on drop, after the daemon stopped.
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Starts a sandbox and a daemon on its defaults; `tweak` may add per-account overrides.
    pub async fn start(
        sandbox_config: SandboxConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Rig> {
        let sandbox = Sandbox::start(sandbox_config)
            .await
            .context("cannot start the sandbox")?;
        let dir = tempfile::Builder::new().prefix("zoomq-drain-").tempdir()?;
        // Metrics stay off (daemon_config): several daemons may run at once.
        let mut config = sandbox.daemon_config(dir.path());
        tweak(&mut config);
        let daemon = Embedded::start(config).await?;
        Ok(Rig {
            sandbox,
            socket: daemon.socket.clone(),
            daemon,
            _dir: dir,
        })
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        self.daemon.stats().await
    }

    pub fn account(&self, account_id: &str) -> anyhow::Result<zoomq::sandbox::AccountStats> {
        self.sandbox
            .account(account_id)
            .with_context(|| format!("the sandbox never saw account {account_id}"))
    }

    /// Waits until the sandbox has seen a request of `account_id`; returns when it arrived.
    pub async fn first_request(&self, account_id: &str) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(first) = self
                .sandbox
                .account(account_id)
                .and_then(|a| a.arrivals.first().copied())
            {
                return Ok(self.sandbox.started() + first);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no request of {account_id} reached the sandbox within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until nothing is pending or in flight; returns how long that took.
    pub async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let stats = self.stats().await?;
            if stats["pending"] == 0 && stats["in_flight"] == 0 {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the queue did not drain within {timeout:?}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.daemon.stop().await?;
        self.sandbox.shutdown().await;
        Ok(())
    }
}

/// Runs `row` for each spec: at once (each row starts its own sandbox and daemon) or, with
/// `serial`, one after another; the rows come back in the specs' order.
pub async fn rows<S, R, Fut>(
    specs: &[S],
    serial: bool,
    row: impl Fn(S) -> Fut,
) -> anyhow::Result<Vec<R>>
where
    S: Copy,
    R: Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<R>> + Send + 'static,
{
    let mut rows = Vec::with_capacity(specs.len());
    if serial {
        for &spec in specs {
            rows.push(row(spec).await?);
        }
    } else {
        let tasks: Vec<JoinHandle<anyhow::Result<R>>> =
            specs.iter().map(|&spec| tokio::spawn(row(spec))).collect();
        for task in tasks {
            rows.push(task.await??);
        }
    }
    Ok(rows)
}

/// Enqueues `count` edits of distinct messages `{prefix}-{i}` of `account` over one pipelined
/// connection and waits for every answer.
pub async fn preload(
    socket: &Path,
    account: &str,
    prefix: &str,
    count: usize,
) -> anyhow::Result<()> {
    let lines = (0..count).map(|i| {
        let id = format!("{prefix}-{i}");
        edit_line(account, &id, &seq_content(&id, i as u64))
    });
    send_all(socket, lines).await
}

/// One `edit` request line.
pub fn edit_line(account: &str, message_id: &str, content: &Value) -> Vec<u8> {
    request_line(&json!({
        "op": "edit", "message_id": message_id, "account_id": account,
        "robot_jid": ROBOT, "content": content,
    }))
}

/// A request as the line the socket reads.
pub fn request_line(request: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(request).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// One producer's connection, kept open like a bot's: requests written together are answered
/// in order, each answer read before the call returns.
pub struct Conn {
    answers: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Conn {
    pub async fn connect(socket: &Path) -> anyhow::Result<Conn> {
        let (reader, writer) = UnixStream::connect(socket).await?.into_split();
        Ok(Conn {
            answers: BufReader::new(reader).lines(),
            writer,
        })
    }

    /// Sends one request and returns its answer; an `ok:false` answer is an error.
    pub async fn call(&mut self, request: &Value) -> anyhow::Result<Value> {
        let mut answers = self.pipeline(std::slice::from_ref(request)).await?;
        Ok(answers.remove(0))
    }

    /// Writes every request in one go, then reads their answers; any `ok:false` is an error.
    pub async fn pipeline(&mut self, requests: &[Value]) -> anyhow::Result<Vec<Value>> {
        let lines: Vec<u8> = requests.iter().flat_map(request_line).collect();
        self.writer.write_all(&lines).await?;
        let mut answers = Vec::with_capacity(requests.len());
        for request in requests {
            let line = self
                .answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            let answer: Value = serde_json::from_str(&line)?;
            anyhow::ensure!(answer["ok"] == true, "{} refused: {line}", request["op"]);
            answers.push(answer);
        }
        Ok(answers)
    }
}

/// A content whose text carries `seq`, so the sandbox's copy tells which edit it shows.
pub fn seq_content(id: &str, seq: u64) -> Value {
    json!({"head": {"text": id}, "body": [{"type": "message", "text": format!("seq {seq}")}]})
}

/// The sequence number a [`seq_content`] carries.
pub fn content_seq(content: &Value) -> Option<u64> {
    content["body"][0]["text"]
        .as_str()?
        .strip_prefix("seq ")?
        .parse()
        .ok()
}
