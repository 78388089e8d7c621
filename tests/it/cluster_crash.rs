//! The cluster mode under SIGKILL: daemons killed at random moments and NATS stream leaders
//! killed while producers edit through random daemons. Nothing acknowledged is lost, no
//! message ever has two requests at Zoom at once, no account gets a 429 or more than its limit
//! into a 1-second window.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use zoomq::cluster::assign::partition_of;
use zoomq::sandbox::SandboxConfig;
use zoomq::testkit::nats::NatsCluster;

use crate::cluster::{cluster_tweaks, owned, zoom_saw_no_excess};
use crate::helpers::{edit, sandbox, shown, Client, TestDaemon};

type Acked = Arc<Mutex<HashMap<String, u64>>>;

const ACCOUNTS: usize = 6;

/// Edits its messages round-robin with increasing numbers through a random live daemon per
/// window of 5 pipelined edits (one per message: each edit of a message is sent after the
/// answer to the one before), keeping the highest number acknowledged per message.
async fn producer(
    sockets: Vec<std::path::PathBuf>,
    id: usize,
    acked: Acked,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        let socket = &sockets[rand::rng().random_range(0..sockets.len())];
        let Ok(mut client) = Client::connect(socket).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut sent = Vec::new();
        for _ in 0..5 {
            n += 1;
            // A message belongs to one account (as at Zoom); a producer's five messages are
            // spread over the accounts.
            let m = (n % 5) as usize;
            let message = format!("p{id}-m{m}");
            let account = format!("acct{}", (id * 5 + m) % ACCOUNTS);
            let request = edit(&message, &account, &n.to_string());
            let mut line = serde_json::to_vec(&request).unwrap();
            line.push(b'\n');
            if tokio::io::AsyncWriteExt::write_all(&mut client.writer, &line)
                .await
                .is_err()
            {
                break;
            }
            sent.push((message, n));
        }
        for (message, number) in sent {
            match client.try_answer().await {
                Some(answer) if answer["ok"] == true => {
                    let mut acked = acked.lock().unwrap();
                    let entry = acked.entry(message).or_insert(0);
                    *entry = (*entry).max(number);
                }
                Some(answer) => assert_eq!(answer["error"], "unavailable", "{answer}"),
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkills_of_daemons_and_nats_leaders_lose_nothing_acknowledged() {
    let mut nats = NatsCluster::start(3).await.unwrap();
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = cluster_tweaks(&nats, "crash", "3s");
    let mut daemons = [
        TestDaemon::start(&zoom, tweaks.clone()).await,
        TestDaemon::start(&zoom, tweaks.clone()).await,
        TestDaemon::start(&zoom, tweaks).await,
    ];
    owned(&daemons.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await;
    let sockets: Vec<_> = daemons.iter().map(|d| d.socket.clone()).collect();
    let acked: Acked = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let producers: Vec<_> = (0..4)
        .map(|id| tokio::spawn(producer(sockets.clone(), id, acked.clone(), stop.clone())))
        .collect();

    let mut rng = rand::rng();
    for round in 0..12 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        if round == 4 || round == 9 {
            // The leader of a busy partition's stream, then of the leases.
            let stream = if round == 4 {
                format!("CRASH_P{}", partition_of("acct0"))
            } else {
                "KV_CRASH_LEASES".to_string()
            };
            let leader = nats.stream_leader(&stream).await.unwrap();
            nats.kill(leader);
            tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
            nats.start_node(leader).unwrap();
            nats.wait_ready(Duration::from_secs(30)).await.unwrap();
            continue;
        }
        let victim = rng.random_range(0..daemons.len());
        daemons[victim].kill();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
        daemons[victim].spawn_answering().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for producer in producers {
        producer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 15,
        "producers made too little progress: {acked:?}"
    );

    // Everything acknowledged reaches Zoom: each message shows its last acknowledged edit
    // or a later one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<_> = acked
            .iter()
            .filter(|(m, n)| {
                shown(&zoom, m)
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    < **n
            })
            .collect();
        if behind.is_empty() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let requests = zoom.requests();
            for (message, number) in &behind {
                let times: Vec<_> = requests
                    .iter()
                    .filter(|r| &r.message_id == *message)
                    .map(|r| (r.offset.as_millis(), r.status))
                    .collect();
                eprintln!(
                    "{message}: acked {number}, shown {:?}, requests {times:?}",
                    shown(&zoom, message)
                );
            }
            panic!("acknowledged edits not delivered: {behind:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    zoom_saw_no_excess(&zoom);
}
