//! The pieces every scenario of the cluster benchmark stands on: the daemon as its own
//! process (`zoomq serve --config`, the release binary cargo builds for the bench, run by
//! `common/spawn.rs`) on a generated configuration, in the embedded sled mode or as a member
//! of a cluster; a 3-node NATS JetStream cluster ([`NatsCluster`], `sync_interval: always`)
//! with three such daemons; which daemon owns which partition, from each daemon's `stats`
//! answer; the CPU time of the daemons and of the nats-server processes, from `/proc`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use zoomq::cluster::assign::{desired_owner, PARTITIONS};
use zoomq::sandbox::Sandbox;
use zoomq::testkit::nats::NatsCluster;

use crate::proc;
use crate::spawn::quote;

pub use crate::spawn::Daemon;

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

/// A daemon with a directory of its own under `parent` (configuration, socket, log, data),
/// configured to deliver to `sandbox` (its default credentials, plan Pro) with `storage`,
/// metrics off, everything else at the daemon's defaults; not started yet.
pub fn daemon(parent: &Path, sandbox: &Sandbox, storage: &Storage) -> anyhow::Result<Daemon> {
    let daemon = Daemon::in_temp_dir(parent, "zoomq-cluster-bench-")?;
    let mut toml = daemon.config();
    if let Storage::Nats { servers, prefix } = storage {
        let servers: Vec<String> = servers.iter().map(|s| quote(s)).collect();
        toml.line("backend = \"nats\"")
            .line(format_args!("[nats]\nservers = [{}]", servers.join(", ")))
            .line(format_args!("prefix = {}", quote(prefix)));
    }
    toml.zoom(sandbox, "sandbox-client", "sandbox-secret")
        .line("plan = \"pro\"")
        .line("[metrics]\nlisten = \"\"");
    daemon.write_config(&toml)?;
    Ok(daemon)
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
            let mut member = daemon(parent, sandbox, &storage)?;
            spawned.push(member.spawn()?);
            daemons.push(member);
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
