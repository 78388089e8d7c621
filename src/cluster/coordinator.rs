//! The coordinator of a daemon: heartbeat, lease renewals, release and take-over of
//! partitions (see the module documentation of `cluster` and `lease`), and the tasks each
//! owned partition runs (announcements to the dispatcher, the validity guard).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::assign::{desired_owner, eligible, Candidate, PARTITIONS};
use super::lease::{self, Lease, Seen, Take};
use super::{hostname, rpc, Cluster, Member, Owned, TAKES_PER_ROUND};
use crate::queue::nats_kv::{self, Names, Partition};
use crate::queue::LocalQueue;

impl Cluster {
    /// The coordinator: three loops, each every tick. The heartbeat publishes this daemon;
    /// the keeper renews every lease held, each renewal on its own (a slow one, or a slow
    /// give-up, never delays the others); the balancer releases and takes partitions.
    pub(super) async fn coordinate(self: Arc<Self>) {
        let keeper = tokio::spawn(self.clone().keep());
        let heart = tokio::spawn(self.clone().beat());
        let mut seen: HashMap<u32, Seen> = HashMap::new();
        let mut backoff: HashMap<u32, (u32, Instant)> = HashMap::new();
        // The last member list read: a members bucket that does not answer for a while must
        // not keep this daemon from taking back what is its own.
        let mut members: Vec<String> = vec![self.id.clone()];
        loop {
            let started = Instant::now();
            if let Some(live) = self.live_members().await {
                members = live;
            }
            self.rebalance(&members, &mut seen, &mut backoff).await;
            let next = started + self.timing.tick();
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = self.closing.cancelled() => break,
            }
        }
        let _ = tokio::join!(keeper, heart);
    }

    async fn beat(self: Arc<Self>) {
        loop {
            let started = Instant::now();
            let _ = tokio::time::timeout(self.timing.tick(), self.heartbeat()).await;
            tokio::select! {
                _ = tokio::time::sleep_until((started + self.timing.tick()).into()) => {}
                _ = self.closing.cancelled() => return,
            }
        }
    }

    async fn keep(self: Arc<Self>) {
        loop {
            let started = Instant::now();
            for owned in self.all_owned() {
                if owned
                    .renewing
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    continue; // the previous one is still waiting for NATS
                }
                let cluster = self.clone();
                tokio::spawn(async move {
                    cluster.renew(&owned).await;
                    owned
                        .renewing
                        .store(false, std::sync::atomic::Ordering::SeqCst);
                });
            }
            tokio::select! {
                _ = tokio::time::sleep_until((started + self.timing.tick()).into()) => {}
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
            up_ms: Some(self.started.elapsed().as_millis() as u64),
            oldest_ms: self.local_oldest_age().map(|a| a.as_millis() as u64),
        };
        let value = serde_json::to_vec(&member).expect("members serialize");
        if let Err(e) = self.members.put(&self.id, value.into()).await {
            tracing::warn!(error = %e, "cannot publish this daemon's heartbeat");
        }
    }

    /// The ids of the live members partitions are given to, sorted (see `assign::eligible`);
    /// `None` if NATS did not answer.
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
        // This daemon as it knows itself now (its record in the bucket may be a tick old).
        let mut candidates: Vec<Candidate> = view
            .iter()
            .filter(|m| m.id != self.id)
            .map(|m| Candidate {
                id: m.id.clone(),
                up: m.up_ms.map(std::time::Duration::from_millis),
                owns: !m.partitions.is_empty(),
            })
            .collect();
        candidates.push(Candidate {
            id: self.id.clone(),
            up: Some(self.started.elapsed()),
            owns: !self.all_owned().is_empty(),
        });
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
        Some(eligible(&candidates, self.timing.settle()))
    }

    /// Renews one lease. A partition whose lease is lost, whose guard stopped it, or whose
    /// storage another daemon fenced, is given up (in a task of its own).
    async fn renew(self: &Arc<Self>, owned: &Arc<Owned>) {
        use std::sync::atomic::Ordering::SeqCst;
        if owned.stopping.load(SeqCst) {
            return;
        }
        // Stopped by its guard (renewals failed for too long), or fenced: let it go; the
        // balancer takes it again if the lease is still ours, with a fresh read.
        if owned.stop.is_cancelled() || owned.partition.fenced() {
            self.spawn_give_up(owned, false);
            return;
        }
        let mut revision = owned.revision.lock().await;
        if owned.stopping.load(SeqCst) {
            return;
        }
        let key = lease_key(owned.n);
        let value = lease_value(&self.id, false, self.timing.ttl);
        let sent = Instant::now();
        let renewed = tokio::time::timeout(
            self.timing.tick(),
            self.leases.update(&key, value, *revision),
        )
        .await;
        match renewed {
            Ok(Ok(new)) => {
                *revision = new;
                owned
                    .valid_until
                    .send_replace(sent + self.timing.hold_for());
            }
            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // An earlier renewal whose answer was lost may have landed: still ours then
                // (its revision is taken; the next renewal extends the validity).
                let current = self.leases.entry(&key).await.ok().flatten();
                let ours = current.as_ref().and_then(|e| {
                    let lease: Lease = serde_json::from_slice(&e.value).ok()?;
                    (lease.owner == self.id && !lease.released).then_some(e.revision)
                });
                match ours {
                    Some(current) => *revision = current,
                    None => {
                        drop(revision);
                        tracing::warn!(
                            partition = owned.n,
                            "lost the lease of a partition to another daemon"
                        );
                        self.spawn_give_up(owned, false);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(partition = owned.n, error = %e, "cannot renew a lease; retrying");
            }
            Err(_) => {
                tracing::warn!(
                    partition = owned.n,
                    "no answer to a lease renewal; retrying"
                );
            }
        }
    }

    fn spawn_give_up(self: &Arc<Self>, owned: &Arc<Owned>, release: bool) {
        let (cluster, owned) = (self.clone(), owned.clone());
        tokio::spawn(async move { cluster.give_up(&owned, release).await });
    }

    /// A planned hand-over: nothing more is claimed for the partition while the lease is
    /// still renewed; the requests in flight finish and their outcomes are committed (for
    /// at most a request's timeout), so that the new owner neither sends a send twice nor
    /// an edit while an older one may still reach Zoom; then it is given up and released.
    async fn hand_over(self: Arc<Self>, owned: Arc<Owned>) {
        use std::sync::atomic::Ordering::SeqCst;
        if owned.draining.swap(true, SeqCst) {
            return;
        }
        tracing::info!(
            partition = owned.n,
            "handing a partition over to its new owner"
        );
        let deadline = Instant::now() + self.request_timeout + std::time::Duration::from_secs(1);
        while owned.queue.stats().in_flight > 0 && Instant::now() < deadline {
            if owned.stop.is_cancelled() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), owned.queue.settled()).await;
        self.give_up(&owned, true).await;
    }

    async fn rebalance(
        self: &Arc<Self>,
        members: &[String],
        seen: &mut HashMap<u32, Seen>,
        backoff: &mut HashMap<u32, (u32, Instant)>,
    ) {
        // Hand over what belongs to another live daemon.
        for owned in self.all_owned() {
            if desired_owner(owned.n, members) != Some(self.id.as_str()) {
                tokio::spawn(self.clone().hand_over(owned));
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
            let waiting = backoff.get(&p).is_some_and(|(_, until)| *until > now);
            if take != Take::Wait && !waiting && desired_owner(p, members) == Some(self.id.as_str())
            {
                wanted.push((p, take));
            }
        }
        for (p, take) in wanted.into_iter().take(TAKES_PER_ROUND) {
            if self.closing.is_cancelled() {
                break;
            }
            let key = lease_key(p);
            let value = lease_value(&self.id, false, self.timing.ttl);
            let acquired = match take {
                Take::Wait => None,
                Take::Create => self.leases.create(&key, value).await.ok(),
                Take::Update(revision) => self.leases.update(&key, value, revision).await.ok(),
            };
            let Some(revision) = acquired else { continue };
            let acquired_at = Instant::now();
            seen.remove(&p);
            match self.take(p, revision, acquired_at).await {
                Ok(()) => {
                    backoff.remove(&p);
                }
                Err(e) => {
                    // Tried again after 1, 2, 4... 30 s (each try reads the whole stream).
                    let failures = backoff.get(&p).map_or(0, |(n, _)| *n) + 1;
                    let wait = std::time::Duration::from_secs(1 << failures.min(5))
                        .min(std::time::Duration::from_secs(30));
                    backoff.insert(p, (failures, Instant::now() + wait));
                    tracing::error!(partition = p, error = %e, failures, "cannot take a partition over; releasing it");
                    let _ = self
                        .leases
                        .update(&key, lease_value(&self.id, true, self.timing.ttl), revision)
                        .await;
                }
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
            .update(
                lease_key(p),
                lease_value(&self.id, false, self.timing.ttl),
                revision,
            )
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
            draining: std::sync::atomic::AtomicBool::new(false),
            renewing: std::sync::atomic::AtomicBool::new(false),
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
    pub(super) async fn give_up(&self, owned: &Arc<Owned>, release: bool) {
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
                .update(
                    lease_key(owned.n),
                    lease_value(&self.id, true, self.timing.ttl),
                    *revision,
                )
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

fn lease_value(owner: &str, released: bool, ttl: std::time::Duration) -> bytes::Bytes {
    serde_json::to_vec(&Lease {
        owner: owner.to_string(),
        released,
        ttl_ms: Some(ttl.as_millis() as u64),
    })
    .expect("leases serialize")
    .into()
}
