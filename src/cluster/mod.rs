//! The cluster mode: several daemons as one service on a NATS JetStream cluster.
//!
//! The accounts are hashed into [`assign::PARTITIONS`] partitions. Each partition is a queue
//! of its own (`queue::LocalQueue`, the embedded mode's code) stored in a JetStream stream of
//! its own (`queue::nats_kv`), and one daemon at a time owns it, under a lease
//! ([`lease`]): that daemon holds its index, paces its accounts and delivers them. Any daemon
//! accepts any request: one for a partition it does not own is carried to the owner
//! ([`rpc`]), which answers once the edit is stored on a quorum of JetStream's replicas. So
//! every promise of the embedded mode holds across hosts, by the same code: latest wins and
//! one request per message in flight (one index per partition), one pacer per account (one
//! owner per partition, and a new owner waits out the old one's window), durability
//! (JetStream's quorum), fencing (a former owner can no longer write).
//!
//! A coordinator task per daemon, every `lease_ttl / 5`: heartbeat in the members bucket
//! (with this daemon's figures, for `stats`), renew the leases held, release the partitions
//! rendezvous hashing gives to another live daemon (a daemon joining takes its share), take
//! those it gives to this one once their lease allows.

pub mod assign;
mod calls;
mod coordinator;
pub mod lease;
pub mod rpc;
#[cfg(test)]
mod rpc_tests;
mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NatsConfig, StorageConfig};
use crate::metrics::Metrics;
use crate::queue::nats_kv::{self, Partition};
use crate::queue::{Job, LocalQueue, QueueStats};
use assign::partition_of;
use lease::Timing;

/// How long a request waits for its partition to get an owner (during a failover) before it
/// is answered `unavailable`.
const ROUTE_PATIENCE: Duration = Duration::from_secs(3);
/// Partitions taken over in one round (each is read whole from JetStream first).
const TAKES_PER_ROUND: usize = 8;

/// One partition this daemon owns.
struct Owned {
    n: u32,
    queue: LocalQueue,
    partition: Arc<Partition>,
    /// The lease's revision as this daemon last wrote it; held across each write of the
    /// lease, so a renewal and the release never race (one would fail its compare-and-set).
    revision: tokio::sync::Mutex<u64>,
    /// Being given up (only one `give_up` runs).
    stopping: std::sync::atomic::AtomicBool,
    /// Being handed over: nothing more is claimed; what is in flight finishes first.
    draining: std::sync::atomic::AtomicBool,
    /// A renewal is under way (the next tick does not start another).
    renewing: std::sync::atomic::AtomicBool,
    /// Until when this daemon may send for the partition (moved on by each renewal).
    valid_until: watch::Sender<Instant>,
    /// When its first request may leave (the former owner's windows are over).
    active_from: Instant,
    /// Stops its tasks (requests of other daemons, announcements, the validity guard).
    stop: CancellationToken,
}

/// What a member publishes about itself.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub id: String,
    pub host: String,
    pub partitions: Vec<u32>,
    pub stats: QueueStats,
    /// How long it has been running, in milliseconds (see `assign::eligible`).
    #[serde(default)]
    pub up_ms: Option<u64>,
    /// Age of the oldest job of its partitions not yet delivered, in milliseconds.
    #[serde(default)]
    pub oldest_ms: Option<u64>,
}

pub struct Cluster {
    id: String,
    /// When this daemon joined (its age, in its heartbeat).
    started: Instant,
    prefix: String,
    replicas: usize,
    timing: Timing,
    /// `zoom.request_timeout`: the longest a hand-over waits for requests in flight.
    request_timeout: Duration,
    storage: StorageConfig,
    client: async_nats::Client,
    js: jetstream::Context,
    leases: kv::Store,
    members: kv::Store,
    table: RwLock<HashMap<u32, Arc<Owned>>>,
    metrics: Arc<Metrics>,
    ready_tx: mpsc::UnboundedSender<Arc<str>>,
    committed: Arc<Notify>,
    timer_changed: Arc<Notify>,
    /// The members seen at the last round (this one included).
    view: Mutex<Vec<Member>>,
    closing: CancellationToken,
    coordinator: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Connects to NATS, retrying until it answers (the daemon is not ready meanwhile).
pub async fn connect(
    config: &NatsConfig,
    cancel: &CancellationToken,
) -> anyhow::Result<async_nats::Client> {
    let addrs: Vec<async_nats::ServerAddr> = config
        .servers
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("nats.servers: {e}"))?;
    // A credentials file that cannot be used is a configuration error, not a reason to wait.
    if let Some(path) = &config.credentials_file {
        credentials(async_nats::ConnectOptions::new(), path).await?;
    }
    let servers = config.shown_servers();
    persist(
        cancel,
        "NATS answered",
        |e| tracing::error!(?servers, error = %e, "cannot reach NATS; retrying (not ready meanwhile)"),
        || async {
            let mut options = async_nats::ConnectOptions::new()
                .name("zoomq")
                .connection_timeout(Duration::from_secs(5));
            if let Some(path) = &config.credentials_file {
                options = credentials(options, path).await?;
            }
            if config.wants_tls() {
                options = options.require_tls(true);
            }
            if let Some(ca) = &config.tls_ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            Ok(options.connect(addrs.clone()).await?)
        },
    )
    .await
}

/// `options` with the credentials of `path`; the error names the key, not the file's content.
async fn credentials(
    options: async_nats::ConnectOptions,
    path: &std::path::Path,
) -> anyhow::Result<async_nats::ConnectOptions> {
    options.credentials_file(path).await.map_err(|e| {
        anyhow::anyhow!(
            "nats.credentials_file: cannot use the file it names ({})",
            e.kind()
        )
    })
}

/// Runs `attempt` until it succeeds, `report`ing each failure and waiting between attempts
/// (0.2 s, doubling up to 5 s); gives up only when `cancel` fires (the daemon is stopping).
async fn persist<T, F, Fut>(
    cancel: &CancellationToken,
    until: &str,
    report: impl Fn(&anyhow::Error),
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        tokio::select! {
            result = attempt() => match result {
                Ok(value) => return Ok(value),
                Err(e) => report(&e),
            },
            _ = cancel.cancelled() => anyhow::bail!("stopped before {until}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => anyhow::bail!("stopped before {until}"),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Opens a key-value bucket, creating it if it does not exist, retrying while JetStream does
/// not answer (a NATS cluster that is starting has no leader yet).
async fn bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<kv::Store> {
    persist(
        cancel,
        "JetStream answered",
        |e| tracing::error!(bucket = %name, error = %e, "cannot open a JetStream bucket; retrying"),
        || open_bucket(js, &name, replicas, max_age),
    )
    .await
}

async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    max_age: Duration,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(name).await {
        // The members' expiry follows nats.lease_ttl: a bucket made under another setting is
        // brought in line (every daemon of a deployment has the same [nats]).
        let mut stream = js.get_stream(format!("KV_{name}")).await?;
        let mut config = stream.info().await?.config.clone();
        if config.max_age != max_age {
            tracing::info!(bucket = %name, ?max_age, "updating the bucket's expiry to nats.lease_ttl");
            config.max_age = max_age;
            js.update_stream(config).await?;
        }
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.to_string(),
            history: 1,
            max_age,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another daemon created it meanwhile.
        Err(_) => Ok(js.get_key_value(name).await?),
    }
}

impl Cluster {
    /// Joins the cluster: connects (retrying until NATS answers), opens the buckets and
    /// starts the coordinator. Returns the receiver of accounts with ready work for the
    /// dispatcher, over every partition this daemon will own.
    pub async fn start(
        config: &Config,
        metrics: Arc<Metrics>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<(Arc<Cluster>, mpsc::UnboundedReceiver<Arc<str>>)> {
        let nats = &config.nats;
        let client = connect(nats, cancel).await?;
        // The server's INFO is known once the connection answered a round trip.
        let _ = client.flush().await;
        let max_payload = client.server_info().max_payload;
        let needed = config.socket.max_line_bytes + rpc::HEADROOM;
        if max_payload < needed {
            tracing::warn!(
                max_payload,
                max_line_bytes = config.socket.max_line_bytes,
                "the NATS servers carry messages up to max_payload bytes: a request longer than \
                 that, sent to a daemon that does not own its account, is answered too_large; \
                 set max_payload to at least socket.max_line_bytes + 4 KiB in the servers' \
                 configuration (stored edits are split, whatever their size)"
            );
        }
        let parts = config
            .socket
            .max_line_bytes
            .div_ceil(max_payload.saturating_sub(nats_kv::HEADROOM).max(1));
        if parts >= nats_kv::MAX_BATCH / 2 {
            tracing::error!(
                max_payload,
                max_line_bytes = config.socket.max_line_bytes,
                parts,
                "an edit of socket.max_line_bytes is stored in this many NATS messages, written \
                 at once, and JetStream writes at most 1,000 at once: such an edit could never \
                 be stored; raise max_payload in the servers' configuration or lower \
                 socket.max_line_bytes"
            );
        }
        let js = jetstream::new(client.clone());
        let upper = nats.prefix.to_ascii_uppercase();
        let timing = Timing {
            ttl: nats.lease_ttl,
        };
        let leases = bucket(
            &js,
            format!("{upper}_LEASES"),
            nats.replicas,
            Duration::ZERO,
            cancel,
        )
        .await?;
        let members = bucket(
            &js,
            format!("{upper}_MEMBERS"),
            nats.replicas,
            timing.ttl,
            cancel,
        )
        .await?;
        let host = hostname();
        let id = format!("{host}-{:08x}", rand::random::<u32>());
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            id,
            started: Instant::now(),
            prefix: nats.prefix.clone(),
            replicas: nats.replicas,
            timing,
            request_timeout: config.zoom.request_timeout,
            storage: config.storage.clone(),
            client,
            js,
            leases,
            members,
            table: RwLock::new(HashMap::new()),
            metrics,
            ready_tx,
            committed: Arc::new(Notify::new()),
            timer_changed: Arc::new(Notify::new()),
            view: Mutex::new(Vec::new()),
            closing: CancellationToken::new(),
            coordinator: Mutex::new(None),
        });
        tracing::info!(daemon = %cluster.id, servers = ?nats.shown_servers(), "joined the cluster");
        let coordinator = tokio::spawn(cluster.clone().coordinate());
        *cluster
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(coordinator);
        Ok((cluster, ready_rx))
    }

    /// This daemon's id in the members bucket.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn owned(&self, partition: u32) -> Option<Arc<Owned>> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&partition)
            .cloned()
    }

    fn all_owned(&self) -> Vec<Arc<Owned>> {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        let mut owned: Vec<_> = table.values().cloned().collect();
        owned.sort_by_key(|o| o.n);
        owned
    }

    /// The queue of `account` if this daemon owns its partition and may send for it now.
    fn sending(&self, account: &str) -> Option<LocalQueue> {
        let owned = self.owned(partition_of(account))?;
        let now = Instant::now();
        (now >= owned.active_from
            && now < *owned.valid_until.borrow()
            && !owned.stop.is_cancelled()
            && !owned.draining.load(std::sync::atomic::Ordering::SeqCst))
        .then(|| owned.queue.clone())
    }

    /// The queue a claimed job came from, if it is still this daemon's.
    fn queue_of(&self, job: &Job) -> Option<LocalQueue> {
        if job.fence.is_cancelled() {
            return None;
        }
        self.owned(partition_of(&job.header.account_id))
            .map(|o| o.queue.clone())
    }

    /// Leaves the cluster: gives up every partition (committing what they hold) and releases
    /// the leases, so the others take over without waiting for them to expire.
    pub async fn close(&self) {
        self.closing.cancel();
        let coordinator = self
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(coordinator) = coordinator {
            let _ = coordinator.await;
        }
        futures_util::future::join_all(
            self.all_owned()
                .iter()
                .map(|owned| self.give_up(owned, true)),
        )
        .await;
        let _ = self.members.delete(&self.id).await;
        let _ = self.client.flush().await;
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}
