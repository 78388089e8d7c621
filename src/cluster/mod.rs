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
pub mod lease;
pub mod rpc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, NatsConfig, StorageConfig};
use crate::metrics::Metrics;
use crate::protocol::{DeadLetter, Delete, Edit, MessageStatus, Selector, Send, StatusQuery};
use crate::queue::nats_kv::{self, Names, Partition};
use crate::queue::{
    Commit, DeadOutcome, Deleted, EnqueueError, Enqueued, Job, LocalQueue, QueueStats,
};
use assign::{desired_owner, global_job_id, partition_of, split_job_id, PARTITIONS};
use lease::{Lease, Seen, Take, Timing};
use rpc::{Answer, Call, CallError};

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
}

pub struct Cluster {
    id: String,
    prefix: String,
    replicas: usize,
    timing: Timing,
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
    let mut delay = Duration::from_millis(200);
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .name("zoomq")
            .connection_timeout(Duration::from_secs(5));
        if let Some(path) = &config.credentials_file {
            options = options.credentials_file(path).await.map_err(|e| {
                anyhow::anyhow!(
                    "nats.credentials_file: cannot use the file it names ({})",
                    e.kind()
                )
            })?;
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
        let attempt = options.connect(addrs.clone());
        let error = tokio::select! {
            connected = attempt => match connected {
                Ok(client) => return Ok(client),
                Err(e) => e.to_string(),
            },
            _ = cancel.cancelled() => anyhow::bail!("stopped before NATS answered"),
        };
        tracing::error!(
            servers = ?config.servers,
            error = %error,
            "cannot reach NATS; retrying (not ready meanwhile)"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = cancel.cancelled() => anyhow::bail!("stopped before NATS answered"),
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Opens a key-value bucket, creating it if it does not exist.
async fn bucket(
    js: &jetstream::Context,
    name: String,
    replicas: usize,
    max_age: Duration,
) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
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
        Err(_) => Ok(js.get_key_value(&name).await?),
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
        )
        .await?;
        let members = bucket(&js, format!("{upper}_MEMBERS"), nats.replicas, timing.ttl).await?;
        let host = hostname();
        let id = format!("{host}-{:08x}", rand::random::<u32>());
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            id,
            prefix: nats.prefix.clone(),
            replicas: nats.replicas,
            timing,
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
        tracing::info!(daemon = %cluster.id, servers = ?nats.servers, "joined the cluster");
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
            && !owned.stop.is_cancelled())
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

    /// Runs `call` on partition `p`'s queue, here or at its owner.
    async fn route(&self, p: u32, call: Call, wait: Duration) -> Result<Answer, EnqueueError> {
        let deadline = Instant::now() + ROUTE_PATIENCE;
        loop {
            let answer = match self.owned(p) {
                Some(owned) if !owned.stop.is_cancelled() => {
                    return Ok(rpc::run(&owned.queue, call.clone()).await);
                }
                _ => {
                    let subject = rpc::subject(&self.prefix, p);
                    rpc::call(&self.client, subject, &call, wait + Duration::from_secs(5)).await
                }
            };
            match answer {
                Ok(Answer::Moved) | Err(CallError::NoOwner) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Answer::Moved) | Err(CallError::NoOwner) => {
                    return Err(EnqueueError::Unavailable(format!(
                        "no daemon owns this account's partition (p{p}) right now: one is \
                         taking it over (a failover takes up to nats.lease_ttl and 2 s); try again"
                    )))
                }
                Ok(answer) => return Ok(answer),
                Err(CallError::TooLarge(size, max)) => {
                    return Err(EnqueueError::TooLarge(format!(
                        "this request ({size} bytes) is larger than the NATS servers carry \
                         between daemons (max_payload {max}); send it to the daemon that owns \
                         its account, or raise max_payload in the servers' configuration (see \
                         README, \"When one host is not enough\")"
                    )))
                }
                Err(CallError::Failed(e)) => {
                    return Err(EnqueueError::Unavailable(format!(
                        "cannot reach the daemon that owns this account's partition (p{p}): {e}"
                    )))
                }
            }
        }
    }

    pub async fn enqueue(&self, edit: &Edit) -> Result<Enqueued, EnqueueError> {
        let p = partition_of(&edit.account_id);
        enqueued(
            p,
            self.route(p, Call::Enqueue(edit.clone()), Duration::ZERO)
                .await,
        )
    }

    pub async fn send(&self, send: &Send) -> Result<Enqueued, EnqueueError> {
        let p = partition_of(&send.account_id);
        enqueued(
            p,
            self.route(p, Call::Send(send.clone()), Duration::ZERO)
                .await,
        )
    }

    pub async fn delete(&self, delete: &Delete) -> Result<Deleted, EnqueueError> {
        let p = partition_of(&delete.account_id);
        match self
            .route(p, Call::Delete(delete.clone()), Duration::ZERO)
            .await?
        {
            Answer::Deleted(Ok(mut deleted)) => {
                deleted.job_id = deleted.job_id.map(|id| global_job_id(p, id));
                Ok(deleted)
            }
            Answer::Deleted(Err(e)) => Err(e),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn status(&self, query: &StatusQuery) -> Result<MessageStatus, EnqueueError> {
        let p = partition_of(&query.account_id);
        let wait = query.wait.unwrap_or_default();
        match self.route(p, Call::Status(query.clone()), wait).await? {
            Answer::Status(Ok(mut status)) => {
                status.job_id = status
                    .job_id
                    .and_then(|id| id.parse().ok())
                    .map(|id| global_job_id(p, id).to_string());
                Ok(status)
            }
            Answer::Status(Err(e)) => Err(e),
            other => Err(unexpected(&other)),
        }
    }

    /// Dead letters of every partition, in job-id order, at most `limit`.
    pub async fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, String> {
        let mut all = Vec::new();
        for p in 0..PARTITIONS {
            match self.route(p, Call::DeadList(limit), Duration::ZERO).await {
                Ok(Answer::Dead(Ok(letters))) => {
                    all.extend(letters.into_iter().map(|mut letter| {
                        let seq: u64 = letter.job_id.parse().unwrap_or(0);
                        letter.job_id = global_job_id(p, seq).to_string();
                        letter
                    }));
                }
                Ok(Answer::Dead(Err(e))) => return Err(format!("partition p{p}: {e}")),
                Ok(other) => return Err(unexpected(&other).to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        all.sort_by_key(|l| l.job_id.parse::<u64>().unwrap_or(0));
        if let Some(limit) = limit {
            all.truncate(limit);
        }
        Ok(all)
    }

    /// Retries (`purge` false) or purges dead letters, in their partitions.
    pub async fn dead_command(
        &self,
        selector: &Selector,
        purge: bool,
    ) -> Result<DeadOutcome, String> {
        let targets: Vec<(u32, Selector)> = match selector {
            Selector::One(job_id) => {
                let (p, seq) = split_job_id(*job_id);
                vec![(p, Selector::One(seq))]
            }
            Selector::All => (0..PARTITIONS).map(|p| (p, Selector::All)).collect(),
        };
        let mut total = DeadOutcome::default();
        for (p, selector) in targets {
            let call = if purge {
                Call::DeadPurge(selector)
            } else {
                Call::DeadRetry(selector)
            };
            match self.route(p, call, Duration::ZERO).await {
                Ok(Answer::DeadOutcome(Ok(outcome))) => {
                    total.affected += outcome.affected;
                    total.superseded += outcome.superseded;
                }
                Ok(Answer::DeadOutcome(Err(e))) => return Err(e),
                Ok(other) => return Err(unexpected(&other).to_string()),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(total)
    }

    // The dispatcher's side: only partitions this daemon owns and may send for.

    pub fn head(&self, account: &str) -> crate::queue::Head {
        match self.sending(account) {
            Some(queue) => queue.head(account),
            None => crate::queue::Head::Empty,
        }
    }

    pub fn claim(&self, account: &str) -> Result<crate::queue::Claimed, crate::queue::StoreError> {
        match self.sending(account) {
            Some(queue) => queue.claim(account),
            None => Ok(crate::queue::Claimed::Empty),
        }
    }

    pub fn is_durable(&self, job: &Job) -> bool {
        match (self.queue_of(job), job.marked_batch) {
            (Some(queue), Some(batch)) => queue.is_durable(batch),
            (_, None) => true,
            // Its partition moved: the job is abandoned when it is started.
            (None, Some(_)) => true,
        }
    }

    pub async fn durable(&self, job: &Job) {
        if let (Some(queue), Some(batch)) = (self.queue_of(job), job.marked_batch) {
            queue.durable(batch).await;
        }
    }

    pub fn complete(&self, job: &Job, sent: Option<crate::queue::SentMessage>) -> Commit {
        match self.queue_of(job) {
            Some(queue) => queue.complete(job, sent),
            None => moved(),
        }
    }

    pub fn retry_later(&self, job: &Job, failed: bool) -> (bool, Commit) {
        match self.queue_of(job) {
            Some(queue) => queue.retry_later(job, failed),
            None => (false, moved()),
        }
    }

    pub fn dead_letter(&self, job: &Job, info: crate::queue::DeadInfo) -> Commit {
        match self.queue_of(job) {
            Some(queue) => queue.dead_letter(job, info),
            None => moved(),
        }
    }

    pub fn promote_due(&self, now_ms: u64) {
        for owned in self.all_owned() {
            owned.queue.promote_due(now_ms);
        }
    }

    pub fn next_due_ms(&self) -> Option<u64> {
        self.all_owned()
            .iter()
            .filter_map(|o| o.queue.next_due_ms())
            .min()
    }

    pub async fn committed(&self) {
        self.committed.notified().await
    }

    pub async fn timer_changed(&self) {
        self.timer_changed.notified().await
    }

    pub fn expire_refs(&self) -> usize {
        self.all_owned().iter().map(|o| o.queue.expire_refs()).sum()
    }

    /// The `n` accounts of this daemon's partitions with the largest ready backlogs.
    pub fn top_accounts(&self, n: usize) -> Vec<(Arc<str>, usize)> {
        let mut all: Vec<(Arc<str>, usize)> = self
            .all_owned()
            .iter()
            .flat_map(|o| o.queue.top_accounts(n))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// This daemon's share: the partitions it owns.
    pub fn local_stats(&self) -> QueueStats {
        let mut total = QueueStats::default();
        for owned in self.all_owned() {
            let s = owned.queue.stats();
            total.pending += s.pending;
            total.in_flight += s.in_flight;
            total.dead += s.dead;
            total.accounts += s.accounts;
            total.refs += s.refs;
            total.recovering |= s.recovering;
            if total.storage_error.is_none() {
                total.storage_error = s
                    .storage_error
                    .map(|e| format!("partition p{}: {e}", owned.n));
            }
        }
        total
    }

    /// Cluster-wide figures: this daemon's own, and the others' as they last published them
    /// (at most `lease_ttl / 5` old).
    pub fn stats(&self) -> QueueStats {
        let mut total = self.local_stats();
        for member in self.view.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if member.id == self.id {
                continue;
            }
            total.pending += member.stats.pending;
            total.in_flight += member.stats.in_flight;
            total.dead += member.stats.dead;
            total.accounts += member.stats.accounts;
            total.refs += member.stats.refs;
        }
        total
    }

    /// What `stats` shows of the cluster: the daemons, and which partitions and accounts this
    /// one paces.
    pub fn view(&self) -> serde_json::Value {
        let members = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let local = self.local_stats();
        let mut accounts: Vec<String> = Vec::new();
        for owned in self.all_owned() {
            accounts.extend(
                owned
                    .queue
                    .top_accounts(usize::MAX)
                    .into_iter()
                    .map(|(a, _)| a.to_string()),
            );
        }
        accounts.sort();
        serde_json::json!({
            "daemon": self.id,
            "daemons": members.iter().map(|m| serde_json::json!({
                "id": m.id, "host": m.host, "partitions": m.partitions.len(),
                "pending": m.stats.pending, "in_flight": m.stats.in_flight,
            })).collect::<Vec<_>>(),
            "partitions": self.all_owned().iter().map(|o| o.n).collect::<Vec<_>>(),
            "accounts_paced": accounts,
            "this_daemon": {"pending": local.pending, "in_flight": local.in_flight, "dead": local.dead},
        })
    }

    /// Updates the queue gauges with this daemon's share and the cluster's own.
    pub fn observe(&self) {
        let stats = self.local_stats();
        let m = &self.metrics;
        m.queue_pending.set(stats.pending as i64);
        m.queue_in_flight.set(stats.in_flight as i64);
        m.queue_dead.set(stats.dead as i64);
        m.refs_remembered.set(stats.refs as i64);
        m.cluster_partitions_owned
            .set(self.all_owned().len() as i64);
        m.cluster_daemons
            .set(self.view.lock().unwrap_or_else(|e| e.into_inner()).len() as i64);
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
        for owned in self.all_owned() {
            self.give_up(&owned, true).await;
        }
        let _ = self.members.delete(&self.id).await;
        let _ = self.client.flush().await;
    }

    /// The coordinator: two loops, each every tick. The keeper heartbeats and renews the
    /// leases held (all at once: a slow take-over must never starve a renewal); the balancer
    /// releases and takes partitions.
    async fn coordinate(self: Arc<Self>) {
        let keeper = tokio::spawn(self.clone().keep());
        let mut seen: HashMap<u32, Seen> = HashMap::new();
        loop {
            let started = Instant::now();
            if let Some(members) = self.live_members().await {
                self.rebalance(&members, &mut seen).await;
            }
            let next = started + self.timing.tick();
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.closing.cancelled() => break,
            }
        }
        let _ = keeper.await;
    }

    async fn keep(self: Arc<Self>) {
        loop {
            let started = Instant::now();
            let heartbeat = self.heartbeat();
            let renewals = futures_util::future::join_all(
                self.all_owned().into_iter().map(|owned| self.renew(owned)),
            );
            tokio::join!(heartbeat, renewals);
            let next = started + self.timing.tick();
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.closing.cancelled() => return,
            }
        }
    }

    async fn heartbeat(&self) {
        let member = Member {
            id: self.id.clone(),
            host: hostname(),
            partitions: self.all_owned().iter().map(|o| o.n).collect(),
            stats: self.local_stats(),
        };
        let value = serde_json::to_vec(&member).expect("members serialize");
        if let Err(e) = self.members.put(&self.id, value.into()).await {
            tracing::warn!(error = %e, "cannot publish this daemon's heartbeat");
        }
    }

    /// The ids of the live members, sorted (this one included); `None` if NATS did not answer.
    async fn live_members(&self) -> Option<Vec<String>> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = match self.members.keys().await {
            Ok(keys) => keys.try_collect().await.ok()?,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the cluster's members");
                return None;
            }
        };
        let mut view = Vec::new();
        for key in &keys {
            if let Ok(Some(value)) = self.members.get(key).await {
                if let Ok(member) = serde_json::from_slice::<Member>(&value) {
                    view.push(member);
                }
            }
        }
        let mut ids: Vec<String> = view.iter().map(|m| m.id.clone()).collect();
        if !ids.contains(&self.id) {
            ids.push(self.id.clone());
        }
        ids.sort();
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
        Some(ids)
    }

    /// Renews one lease; a partition whose lease is lost, or that its guard stopped, is
    /// given up.
    async fn renew(&self, owned: Arc<Owned>) {
        if owned.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Stopped by its guard (renewals failed for too long): let it go; the balancer takes
        // it again (the lease is still ours) with a fresh read.
        if owned.stop.is_cancelled() {
            self.give_up(&owned, false).await;
            return;
        }
        let mut revision = owned.revision.lock().await;
        if owned.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let sent = Instant::now();
        match self
            .leases
            .update(lease_key(owned.n), lease_value(&self.id, false), *revision)
            .await
        {
            Ok(new) => {
                *revision = new;
                owned
                    .valid_until
                    .send_replace(sent + self.timing.hold_for());
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                drop(revision);
                tracing::warn!(
                    partition = owned.n,
                    "lost the lease of a partition to another daemon"
                );
                self.give_up(&owned, false).await;
            }
            Err(e) => {
                tracing::warn!(partition = owned.n, error = %e, "cannot renew a lease; retrying");
            }
        }
    }

    async fn rebalance(&self, members: &[String], seen: &mut HashMap<u32, Seen>) {
        // Release what belongs to another live daemon.
        for owned in self.all_owned() {
            if desired_owner(owned.n, members) != Some(self.id.as_str()) {
                tracing::info!(
                    partition = owned.n,
                    "handing a partition over to its new owner"
                );
                self.give_up(&owned, true).await;
            }
        }
        // Every lease not ours is watched, wanted or not, so that the wait for a silent
        // owner has already begun when the member list says its partitions are ours.
        let others: Vec<u32> = (0..PARTITIONS)
            .filter(|p| self.owned(*p).is_none())
            .collect();
        let entries =
            futures_util::future::join_all(others.iter().map(|p| self.leases.entry(lease_key(*p))))
                .await;
        let now = Instant::now();
        let mut wanted = Vec::new();
        for (p, entry) in others.into_iter().zip(entries) {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "cannot read a lease");
                    continue;
                }
            };
            let current = entry.as_ref().and_then(|e| {
                let lease: Lease = serde_json::from_slice(&e.value).ok()?;
                Some((lease, e.revision))
            });
            let (take, now_seen) = lease::decide(
                &self.id,
                current.as_ref().map(|(l, r)| (l, *r)),
                seen.get(&p).copied(),
                now,
                self.timing,
            );
            match now_seen {
                Some(s) => {
                    seen.insert(p, s);
                }
                None => {
                    seen.remove(&p);
                }
            }
            tracing::trace!(partition = p, ?take, ?current, desired = ?desired_owner(p, members), "lease");
            if take != Take::Wait && desired_owner(p, members) == Some(self.id.as_str()) {
                wanted.push((p, take));
            }
        }
        for (p, take) in wanted.into_iter().take(TAKES_PER_ROUND) {
            if self.closing.is_cancelled() {
                break;
            }
            let key = lease_key(p);
            let value = lease_value(&self.id, false);
            let acquired = match take {
                Take::Wait => None,
                Take::Create => self.leases.create(&key, value).await.ok(),
                Take::Update(revision) => self.leases.update(&key, value, revision).await.ok(),
            };
            let Some(revision) = acquired else { continue };
            let acquired_at = Instant::now();
            seen.remove(&p);
            if let Err(e) = self.take(p, revision, acquired_at).await {
                tracing::error!(partition = p, error = %e, "cannot take a partition over; releasing it");
                let _ = self
                    .leases
                    .update(&key, lease_value(&self.id, true), revision)
                    .await;
            }
        }
    }

    /// Takes partition `p` over, its lease just acquired.
    async fn take(&self, p: u32, revision: u64, acquired_at: Instant) -> anyhow::Result<()> {
        let names = Names::new(&self.prefix, p);
        nats_kv::ensure_stream(&self.js, &names, self.replicas).await?;
        let partition =
            Partition::take_over(self.client.clone(), names, p, self.id.clone()).await?;
        let storage = self.storage.clone();
        let metrics = self.metrics.clone();
        let opened = partition.clone();
        let (queue, ready_rx) = tokio::task::spawn_blocking(move || {
            LocalQueue::open_partition(opened, &storage, metrics)
        })
        .await??;
        // Reading the partition may have taken a while: renew before sending anything.
        let sent = Instant::now();
        let renewed = self
            .leases
            .update(lease_key(p), lease_value(&self.id, false), revision)
            .await;
        let revision = match renewed {
            Ok(revision) => revision,
            Err(e) => {
                queue.fence_off();
                let _ = tokio::task::spawn_blocking(move || queue.close()).await;
                anyhow::bail!("cannot renew the lease just taken: {e}");
            }
        };
        let (valid_until, valid_rx) = watch::channel(sent + self.timing.hold_for());
        let owned = Arc::new(Owned {
            n: p,
            queue: queue.clone(),
            partition,
            revision: tokio::sync::Mutex::new(revision),
            stopping: std::sync::atomic::AtomicBool::new(false),
            valid_until,
            active_from: (acquired_at + self.timing.gap()).max(Instant::now()),
            stop: CancellationToken::new(),
        });
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, owned.clone());
        tokio::spawn(rpc::serve(
            self.client.clone(),
            rpc::subject(&self.prefix, p),
            queue.clone(),
            owned.stop.clone(),
        ));
        tokio::spawn(forward(
            owned.clone(),
            ready_rx,
            self.ready_tx.clone(),
            self.committed.clone(),
            self.timer_changed.clone(),
        ));
        tokio::spawn(guard(owned.clone(), valid_rx));
        tracing::info!(
            partition = p,
            elapsed_ms = acquired_at.elapsed().as_millis() as u64,
            "took a partition over"
        );
        Ok(())
    }

    /// Stops owning a partition: nothing more is claimed or sent for it (requests in flight
    /// are cancelled), its queue commits what it holds and closes; with `release`, the lease
    /// is released for the next owner (only after all that).
    async fn give_up(&self, owned: &Arc<Owned>, release: bool) {
        if owned
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&owned.n);
        owned.stop.cancel();
        owned.queue.fence_off();
        let queue = owned.queue.clone();
        let _ = tokio::task::spawn_blocking(move || queue.close()).await;
        if release && !owned.partition.fenced() {
            let revision = owned.revision.lock().await;
            let released = self
                .leases
                .update(lease_key(owned.n), lease_value(&self.id, true), *revision)
                .await;
            if let Err(e) = released {
                tracing::warn!(partition = owned.n, error = %e, "cannot release a lease; it expires instead");
            }
        }
    }
}

/// Passes a partition's announcements and wake-ups on to the dispatcher, from the moment its
/// first request may leave.
async fn forward(
    owned: Arc<Owned>,
    mut ready_rx: mpsc::UnboundedReceiver<Arc<str>>,
    ready_tx: mpsc::UnboundedSender<Arc<str>>,
    committed: Arc<Notify>,
    timer_changed: Arc<Notify>,
) {
    tokio::select! {
        _ = tokio::time::sleep_until(owned.active_from.into()) => {}
        _ = owned.stop.cancelled() => return,
    }
    loop {
        tokio::select! {
            account = ready_rx.recv() => match account {
                Some(account) => { let _ = ready_tx.send(account); }
                None => return,
            },
            _ = owned.queue.committed() => committed.notify_one(),
            _ = owned.queue.timer_changed() => timer_changed.notify_one(),
            _ = owned.stop.cancelled() => return,
        }
    }
}

/// Fences a partition off the moment this daemon may no longer send for it (its renewals
/// failed for `hold_for`): requests in flight are cancelled, nothing more is claimed.
async fn guard(owned: Arc<Owned>, mut valid_rx: watch::Receiver<Instant>) {
    loop {
        let until = *valid_rx.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {
                if *valid_rx.borrow() <= Instant::now() {
                    tracing::error!(partition = owned.n, "could not renew a lease in time; stopped sending for its accounts");
                    owned.stop.cancel();
                    owned.queue.fence_off();
                    return;
                }
            }
            changed = valid_rx.changed() => if changed.is_err() { return },
            _ = owned.stop.cancelled() => return,
        }
    }
}

fn lease_key(p: u32) -> String {
    format!("p{p}")
}

fn lease_value(owner: &str, released: bool) -> bytes::Bytes {
    serde_json::to_vec(&Lease {
        owner: owner.to_string(),
        released,
    })
    .expect("leases serialize")
    .into()
}

fn enqueued(p: u32, answer: Result<Answer, EnqueueError>) -> Result<Enqueued, EnqueueError> {
    match answer? {
        Answer::Enqueued(Ok(mut done)) => {
            done.job_id = global_job_id(p, done.job_id);
            Ok(done)
        }
        Answer::Enqueued(Err(e)) => Err(e),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(answer: &Answer) -> EnqueueError {
    EnqueueError::Unavailable(format!("unexpected answer from another daemon: {answer:?}"))
}

/// A commit that reports the job's partition moved (its outcome is the new owner's business).
fn moved() -> Commit {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(Err("the job's partition moved to another daemon".into()));
    rx
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}
