//! Failover time: three daemons on a 3-node NATS cluster, the default `nats.lease_ttl` (5 s).
//! Each round picks an account whose partition daemon 0 owns (from the daemons' `stats`,
//! `cluster.partitions`, and `partition_of`), preloads a backlog for it through daemons 1 and
//! 2, waits until its requests flow at the sandbox, SIGKILLs daemon 0 and takes the time from
//! the kill to the first request of that account the sandbox receives afterwards
//! (`RequestRecord::at`, same process, same clock). A request that arrives within
//! [`IN_FLIGHT_GRACE`] of the kill was already on its way from the killed daemon (no other
//! daemon may send for the partition before a whole lease_ttl has passed), so it is counted
//! apart, not taken as the first of the new owner. Then daemon 0 is started again and the
//! round ends when every partition is back with the daemon rendezvous hashing gives it to.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use zoomq::cluster::assign::partition_of;
use zoomq::sandbox::{Sandbox, SandboxConfig};

use crate::load::send_all;
use crate::rig::{small_edit, Cluster};
use crate::Args;

/// Arrivals this soon after the kill come from the killed daemon.
const IN_FLIGHT_GRACE: Duration = Duration::from_millis(200);
/// How long a round waits for the account's first request after the kill.
const GIVE_UP: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub account: String,
    pub partition: u32,
    /// Kill to the account's first request afterwards; `None` if none came within 60 s.
    pub failover_s: Option<f64>,
    /// The account's last request before the kill, that long before it.
    pub last_before_kill_ms: f64,
    /// Requests arriving within the grace after the kill (from the killed daemon).
    pub in_flight_at_kill: usize,
    /// From daemon 0's restart until every partition was with its rendezvous owner again.
    pub rebalanced_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverResult {
    pub rounds: Vec<Round>,
    pub max_s: Option<f64>,
    /// Over the rounds' accounts and the whole run: 429s, most requests in one 1 s window
    /// (fixed and sliding).
    pub rate_limited: u64,
    pub max_fixed: u32,
    pub max_sliding: u32,
    pub limit: u32,
}

pub async fn run(args: &Args, parent: &Path) -> anyhow::Result<FailoverResult> {
    let sandbox = Sandbox::start(SandboxConfig::default()).await?;
    println!(
        "  failover: starting a 3-node NATS cluster and 3 daemons (lease_ttl 5 s, the default)"
    );
    let mut cluster = Cluster::start(parent, &sandbox, "failover", 3).await?;
    let mut owner = cluster.settled(Duration::from_secs(90)).await?;
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let account = (0..)
            .map(|i| format!("fo{round}-{i}"))
            .find(|a| owner[partition_of(a) as usize] == 0)
            .expect("daemon 0 owns a partition");
        let partition = partition_of(&account);
        // 30 s of backlog at 20/s, through the two daemons that stay.
        let (mut odd, mut even) = (Vec::new(), Vec::new());
        for seq in 0..600u64 {
            let message = format!("{account}-m{seq}");
            let line = small_edit(&account, &message, seq);
            if seq % 2 == 0 {
                even.push(line)
            } else {
                odd.push(line)
            }
        }
        let sockets = [
            cluster.daemons[1].socket.clone(),
            cluster.daemons[2].socket.clone(),
        ];
        let (a, b) = tokio::join!(send_all(&sockets[0], even), send_all(&sockets[1], odd));
        a?;
        b?;
        // Flowing: 20 of its requests at the sandbox (a second at its limit).
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrivals(&sandbox, &account).len() < 20 {
            anyhow::ensure!(Instant::now() < deadline, "{account}: no deliveries");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        let killed = Instant::now();
        cluster.daemons[0].kill().await?;
        let (first, in_flight, last_before) = loop {
            let seen = arrivals(&sandbox, &account);
            let last_before = seen.iter().filter(|at| **at <= killed).max().copied();
            let after: Vec<Instant> = seen.into_iter().filter(|at| *at > killed).collect();
            let in_flight = after
                .iter()
                .filter(|at| **at < killed + IN_FLIGHT_GRACE)
                .count();
            let first = after
                .iter()
                .filter(|at| **at >= killed + IN_FLIGHT_GRACE)
                .min()
                .copied();
            if first.is_some() || killed.elapsed() > GIVE_UP {
                break (first, in_flight, last_before);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let failover_s = first.map(|at| (at - killed).as_secs_f64());
        match failover_s {
            Some(s) => println!("  failover round {}: {account} (p{partition}) delivered again {s:.3} s after the kill", round + 1),
            None => println!("  failover round {}: {account} (p{partition}) NOT delivered within {GIVE_UP:?} of the kill", round + 1),
        }
        let restarted = Instant::now();
        cluster.daemons[0].start().await?;
        owner = cluster.settled(Duration::from_secs(90)).await?;
        rounds.push(Round {
            account,
            partition,
            failover_s,
            last_before_kill_ms: last_before
                .map_or(f64::NAN, |at| (killed - at).as_secs_f64() * 1000.0),
            in_flight_at_kill: in_flight,
            rebalanced_s: restarted.elapsed().as_secs_f64(),
        });
    }
    let stats = sandbox.stats();
    let accounts: Vec<_> = rounds
        .iter()
        .filter_map(|r| stats.accounts.get(&r.account))
        .collect();
    let result = FailoverResult {
        max_s: rounds
            .iter()
            .map(|r| r.failover_s)
            .try_fold(0.0f64, |max, s| s.map(|s| max.max(s))),
        rate_limited: accounts.iter().map(|a| a.rate_limited).sum(),
        max_fixed: accounts
            .iter()
            .map(|a| a.max_in_fixed_window(SECOND))
            .max()
            .unwrap_or(0),
        max_sliding: accounts
            .iter()
            .map(|a| a.max_in_sliding_window(SECOND))
            .max()
            .unwrap_or(0),
        limit: accounts
            .iter()
            .map(|a| a.limit_per_second)
            .max()
            .unwrap_or(0),
        rounds,
    };
    drop(cluster);
    sandbox.shutdown().await;
    Ok(result)
}

/// When the sandbox received each request naming `account`.
fn arrivals(sandbox: &Sandbox, account: &str) -> Vec<Instant> {
    sandbox
        .requests()
        .into_iter()
        .filter(|r| r.account_id.as_deref() == Some(account))
        .map(|r| r.at)
        .collect()
}

pub fn print(result: &FailoverResult) {
    println!(
        "{:<5} {:<8} {:>9} {:>11} {:>16} {:>20} {:>13}",
        "round",
        "account",
        "partition",
        "failover s",
        "last before ms",
        "in flight at kill",
        "rebalanced s"
    );
    for (i, r) in result.rounds.iter().enumerate() {
        println!(
            "{:<5} {:<8} {:>9} {:>11} {:>16.1} {:>20} {:>13.2}",
            i + 1,
            r.account,
            format!("p{}", r.partition),
            r.failover_s
                .map_or("none".to_string(), |s| format!("{s:.3}")),
            r.last_before_kill_ms,
            r.in_flight_at_kill,
            r.rebalanced_s
        );
    }
    println!(
        "(these accounts over the whole run: {} 429s, most in one 1 s window {} fixed / {} sliding, limit {})",
        result.rate_limited, result.max_fixed, result.max_sliding, result.limit
    );
}
