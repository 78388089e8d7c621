//! The coordinator of a daemon: heartbeat, lease renewals, release and take-over of
//! partitions (see the module documentation of `cluster` and `lease`), and the tasks each
//! owned partition runs (announcements to the dispatcher, the validity guard).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::kv;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::assign::{desired_owner, PARTITIONS};
use super::lease::{self, Lease, Seen, Take};
use super::{hostname, rpc, Cluster, Member, Owned, TAKES_PER_ROUND};
use crate::queue::nats_kv::{self, Names, Partition};
use crate::queue::LocalQueue;

impl Cluster {
    /// The coordinator: two loops, each every tick. The keeper heartbeats and renews the
    /// leases held (all at once: a slow take-over must never starve a renewal); the balancer
    /// releases and takes partitions.
    pub(super) async fn coordinate(self: Arc<Self>) {
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
