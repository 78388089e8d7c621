//! What the cluster shows: this daemon's share, the deployment's figures (others' from their
//! heartbeats), the `cluster` object of `stats`, the gauges.

use super::Cluster;
use crate::queue::QueueStats;

impl Cluster {
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

    /// Age of the oldest job not yet delivered of the partitions this daemon owns.
    pub fn local_oldest_age(&self) -> Option<std::time::Duration> {
        self.all_owned()
            .iter()
            .filter_map(|o| o.queue.oldest_age().ok().flatten())
            .max()
    }

    /// The same, cluster-wide: the others' as they last published them.
    pub fn oldest_age(&self) -> Option<std::time::Duration> {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let others = view
            .iter()
            .filter(|m| m.id != self.id)
            .filter_map(|m| m.oldest_ms.map(std::time::Duration::from_millis));
        others.chain(self.local_oldest_age()).max()
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
        m.queue_oldest_pending_age
            .set(self.local_oldest_age().map_or(0.0, |a| a.as_secs_f64()));
        m.cluster_partitions_owned
            .set(self.all_owned().len() as i64);
        m.cluster_daemons
            .set(self.view.lock().unwrap_or_else(|e| e.into_inner()).len() as i64);
    }
}
