//! The pieces every scenario of the cluster benchmark stands on: the daemon as its own
//! process (`zoomq serve --config`, the release binary cargo builds for the bench) on a
//! generated configuration, in the embedded sled mode or as a member of a cluster; a 3-node
//! NATS JetStream cluster ([`NatsCluster`], `sync_interval: always`) with three such daemons;
//! which daemon owns which partition, from each daemon's `stats` answer; the CPU time of the
//! daemons and of the nats-server processes, from `/proc`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use zoomq::cluster::assign::{desired_owner, PARTITIONS};
use zoomq::sandbox::Sandbox;
use zoomq::testkit::nats::NatsCluster;

use crate::{proc, spawn};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a daemon keeps its queue.
#[derive(Debug, Clone)]
pub enum Storage {
    /// The default backend: sled under the daemon's own directory.
    Sled,
    /// A member of the cluster on `servers`, its streams and subjects named after `prefix`;
    /// `nats.replicas` and `nats.lease_ttl` are the defaults (3 and 5 s).
    Nats {
        servers: Vec<String>,
        prefix: String,
    },
}

/// One daemon process with its own directory (configuration, socket, log, data).
pub struct Daemon {
    pub socket: PathBuf,
    config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes the configuration of a daemon delivering to `sandbox` (its default credentials,
    /// plan Pro), metrics off, everything else at the daemon's defaults.
    pub fn new(parent: &Path, sandbox: &Sandbox, storage: &Storage) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("zoomq-cluster-bench-")
            .tempdir_in(parent)
            .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
        let socket = dir.path().join("zoomq.sock");
        let q = |s: &str| format!("{s:?}");
        let mut toml = String::new();
        writeln!(
            toml,
            "[socket]\npath = {}",
            q(&socket.display().to_string())
        )?;
        let data = dir.path().join("data");
        writeln!(toml, "[storage]\npath = {}", q(&data.display().to_string()))?;
        if let Storage::Nats { servers, prefix } = storage {
            writeln!(toml, "backend = \"nats\"")?;
            let servers: Vec<String> = servers.iter().map(|s| q(s)).collect();
            writeln!(toml, "[nats]\nservers = [{}]", servers.join(", "))?;
            writeln!(toml, "prefix = {}", q(prefix))?;
        }
        writeln!(toml, "[zoom]\napi_base = {}", q(&sandbox.api_base()))?;
        writeln!(toml, "token_url = {}", q(&sandbox.token_url()))?;
        writeln!(toml, "client_id = \"sandbox-client\"")?;
        writeln!(toml, "client_secret = \"sandbox-secret\"")?;
        writeln!(toml, "plan = \"pro\"")?;
        writeln!(toml, "[metrics]\nlisten = \"\"")?;
        let config_path = dir.path().join("zoomq.toml");
        std::fs::write(&config_path, toml)?;
        Ok(Daemon {
            socket,
            config_path,
            log_path: dir.path().join("daemon.log"),
            child: None,
            _dir: dir,
        })
    }

    /// Spawns the process; [`Daemon::ready`] waits for its answer.
    pub fn spawn(&mut self) -> anyhow::Result<Instant> {
        anyhow::ensure!(self.child.is_none(), "already running");
        self.child = Some(spawn::serve(&self.config_path, &self.log_path, None)?);
        Ok(Instant::now())
    }

    /// Waits until the process spawned at `spawned` answers a ping.
    pub async fn ready(&mut self, spawned: Instant) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("not running")?;
        spawn::wait_ready(&self.socket, child, spawned, START_TIMEOUT, &self.log_path).await
    }

    pub async fn start(&mut self) -> anyhow::Result<()> {
        let spawned = self.spawn()?;
        self.ready(spawned).await
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub async fn stats(&self) -> anyhow::Result<Value> {
        let stats = zoomq::client::request(&self.socket, &json!({"op": "stats"})).await?;
        anyhow::ensure!(stats["ok"] == true, "stats answered {stats}");
        Ok(stats)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A 3-node NATS cluster and three daemons on it, each reachable on its own socket.
pub struct Cluster {
    pub daemons: Vec<Daemon>,
    /// Dropped after the daemons (field order), which kills its servers.
    _nats: NatsCluster,
}

impl Cluster {
    /// Starts the NATS cluster, then `n` daemons at once, and waits until each answers a ping
    /// ([`Cluster::settled`] waits for the partitions).
    pub async fn start(
        parent: &Path,
        sandbox: &Sandbox,
        prefix: &str,
        n: usize,
    ) -> anyhow::Result<Cluster> {
        let nats = NatsCluster::start(3).await?;
        let storage = Storage::Nats {
            servers: nats.urls(),
            prefix: prefix.to_string(),
        };
        let mut daemons = Vec::new();
        let mut spawned = Vec::new();
        for _ in 0..n {
            let mut daemon = Daemon::new(parent, sandbox, &storage)?;
            spawned.push(daemon.spawn()?);
            daemons.push(daemon);
        }
        for (daemon, at) in daemons.iter_mut().zip(spawned) {
            daemon.ready(at).await?;
        }
        Ok(Cluster {
            daemons,
            _nats: nats,
        })
    }

    /// The sockets of the daemons, in order.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.daemons.iter().map(|d| d.socket.clone()).collect()
    }

    /// Which daemon (index) owns each partition now, `None` for a partition without an owner;
    /// and each daemon's id in the cluster (`None` for one not running).
    pub async fn owners(&self) -> anyhow::Result<(Vec<Option<usize>>, Vec<Option<String>>)> {
        let mut owner = vec![None; PARTITIONS as usize];
        let mut ids = Vec::new();
        for (i, daemon) in self.daemons.iter().enumerate() {
            if daemon.pid().is_none() {
                ids.push(None);
                continue;
            }
            let stats = daemon.stats().await?;
            let cluster = &stats["cluster"];
            ids.push(cluster["daemon"].as_str().map(str::to_string));
            for p in cluster["partitions"].as_array().into_iter().flatten() {
                let p = p.as_u64().context("a partition number")?;
                owner[usize::try_from(p)?] = Some(i);
            }
        }
        Ok((owner, ids))
    }

    /// Waits until every partition is owned by the running daemon rendezvous hashing gives it
    /// to (so no partition moves during a measurement), twice in a row 200 ms apart, then
    /// 1.2 s more: a partition's new owner waits 1.1 s before its first request. Returns the
    /// owner of each partition.
    pub async fn settled(&self, within: Duration) -> anyhow::Result<Vec<usize>> {
        let deadline = Instant::now() + within;
        let mut stable = 0;
        loop {
            let (owner, ids) = self.owners().await?;
            let live: Vec<String> = ids.iter().flatten().cloned().collect();
            let balanced = (0..PARTITIONS).all(|p| {
                let desired = desired_owner(p, &live);
                owner[p as usize].is_some_and(|i| ids[i].as_deref() == desired)
            });
            stable = if balanced { stable + 1 } else { 0 };
            if stable >= 2 {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                return Ok(owner.into_iter().map(|o| o.unwrap_or(usize::MAX)).collect());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "partitions not settled within {within:?}: owners {owner:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The pids of this process's nats-server children (the [`NatsCluster`]'s nodes).
pub fn nats_pids() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the command in parentheses may hold spaces.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        if comm == "nats-server" && ppid == me {
            pids.push(name);
        }
    }
    pids
}

/// User + system CPU time of the processes `pids`, summed.
pub fn cpu_of(pids: &[String]) -> Duration {
    pids.iter().map(|p| proc::cpu_time(p)).sum()
}

/// The content of every edit of the delivery and failover scenarios (small: those measure
/// pacing, not intake).
pub fn small_edit(account: &str, message_id: &str, seq: u64) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "op": "edit", "message_id": message_id, "account_id": account,
        "robot_jid": "bench-bot@xmpp.zoom.us",
        "content": {"head": {"text": format!("update {seq}")}},
    }))
    .expect("JSON");
    line.push(b'\n');
    line
}

/// Sends `lines` pipelined on one connection to `socket`, then reads every answer; fails on
/// any answer but `ok`. Returns how many were acknowledged.
pub async fn send_all(socket: &Path, lines: Vec<Vec<u8>>) -> anyhow::Result<usize> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    let n = lines.len();
    let writing = async move {
        let mut batch = Vec::new();
        for line in lines {
            batch.extend(line);
            if batch.len() >= 64 * 1024 {
                writer.write_all(&batch).await?;
                batch.clear();
            }
        }
        writer.write_all(&batch).await?;
        anyhow::Ok(writer)
    };
    let reading = async move {
        let mut answers = BufReader::new(reader).lines();
        for _ in 0..n {
            let line = answers
                .next_line()
                .await?
                .context("the daemon closed the connection")?;
            anyhow::ensure!(line.starts_with(r#"{"ok":true"#), "edit refused: {line}");
        }
        anyhow::Ok(())
    };
    let (_writer, ()) = tokio::try_join!(writing, reading)?;
    Ok(n)
}
