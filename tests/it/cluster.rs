//! The cluster mode: three real daemons on a real 3-node NATS JetStream cluster (loopback),
//! delivering to the sandbox: one service, latest wins across daemons, one request per
//! message in flight, every account within its limit, failover after a SIGKILL.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zoomq::cluster::assign::{partition_of, PARTITIONS};
use zoomq::sandbox::SandboxConfig;
use zoomq::testkit::nats::NatsCluster;

use crate::helpers::{edit, sandbox, shown, TestDaemon, Tweaks};

/// The configuration of a daemon of the cluster on `nats`, with its own prefix.
pub fn cluster_tweaks(nats: &NatsCluster, prefix: &str, lease_ttl: &str) -> Tweaks {
    let servers: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    Tweaks::default()
        .set("storage", "backend", "\"nats\"")
        .set("nats", "servers", &format!("[{}]", servers.join(", ")))
        .set("nats", "prefix", &format!("{prefix:?}"))
        .set("nats", "lease_ttl", &format!("{lease_ttl:?}"))
}

/// Waits until every partition has an owner among `daemons` and may send; returns which
/// daemon owns each.
pub async fn owned(daemons: &[&TestDaemon], within: Duration) -> Vec<usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut owner = vec![usize::MAX; PARTITIONS as usize];
        for (i, daemon) in daemons.iter().enumerate() {
            let stats = daemon.stats().await;
            for p in stats["cluster"]["partitions"]
                .as_array()
                .into_iter()
                .flatten()
            {
                owner[p.as_u64().unwrap() as usize] = i;
            }
        }
        if owner.iter().all(|&o| o != usize::MAX) {
            // Their first requests may leave a gap after the take-over.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            return owner;
        }
        assert!(
            Instant::now() < deadline,
            "partitions without an owner: {owner:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `request` through `daemon` until it is accepted (a partition changing owner answers
/// `unavailable` meanwhile).
async fn accepted(daemon: &TestDaemon, request: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = daemon.client().await.call(request).await;
        if answer["ok"] == true {
            return answer;
        }
        assert_eq!(answer["error"], "unavailable", "{answer}");
        assert!(Instant::now() < deadline, "never accepted: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn shows_all(
    zoom: &zoomq::sandbox::Sandbox,
    expected: &[(String, String)],
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let missing: Vec<_> = expected
            .iter()
            .filter(|(m, text)| shown(zoom, m).as_deref() != Some(text.as_str()))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} messages not showing their last edit, e.g. {:?}",
            missing.len(),
            missing.first()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nothing zoomq sent got a 429, no message ever had two requests at once, and no account got
/// more than its limit into any of Zoom's 1-second windows (the sandbox's, fixed). A sliding
/// 1-second window can see limit + 1 when arrivals jitter by a few milliseconds (BENCHMARKS.md,
/// "Cluster mode"; the embedded mode does the same): measured by the benchmark, not asserted.
pub fn zoom_saw_no_excess(zoom: &zoomq::sandbox::Sandbox) {
    let stats = zoom.stats();
    for (account, a) in &stats.accounts {
        assert_eq!(a.rate_limited, 0, "{account} was rate limited");
        assert!(
            a.max_in_fixed_window(Duration::from_secs(1)) <= a.limit_per_second,
            "{account}: {} requests in one of Zoom's seconds, limit {}",
            a.max_in_fixed_window(Duration::from_secs(1)),
            a.limit_per_second
        );
    }
    for message in zoom.messages() {
        assert!(message.max_concurrent <= 1, "{message:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_daemons_are_one_service() {
    let nats = NatsCluster::start(3).await.unwrap();
    let zoom = sandbox(SandboxConfig::default()).await;
    let tweaks = cluster_tweaks(&nats, "one", "2s").set("socket", "max_line_bytes", "2097152");
    let a = TestDaemon::start(&zoom, tweaks.clone()).await;
    let b = TestDaemon::start(&zoom, tweaks.clone()).await;
    let c = TestDaemon::start(&zoom, tweaks).await;
    let daemons = [&a, &b, &c];
    let owner = owned(&daemons, Duration::from_secs(60)).await;
    for i in 0..3 {
        assert!(owner.contains(&i), "daemon {i} owns nothing: {owner:?}");
    }

    // Each message's edits go through the three daemons in turn, each acknowledged before
    // the next is sent: Zoom must end up showing the last.
    let mut expected = Vec::new();
    let mut job_ids = std::collections::HashSet::new();
    for m in 0..24 {
        let message = format!("m{m}");
        let account = format!("acct{}", m % 8);
        for k in 0..5 {
            let text = format!("{message}-{k}");
            let answer = accepted(daemons[(m + k) % 3], &edit(&message, &account, &text)).await;
            job_ids.insert((answer["job_id"].as_str().unwrap_or_default().to_string(), m));
        }
        expected.push((message, format!("m{m}-4")));
    }
    shows_all(&zoom, &expected, Duration::from_secs(30)).await;
    zoom_saw_no_excess(&zoom);

    // stats is cluster-wide and says which daemon paces what.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = a.stats().await;
        let cluster = &stats["cluster"];
        assert_eq!(cluster["daemons"].as_array().unwrap().len(), 3, "{stats}");
        if stats["pending"] == 0 && stats["in_flight"] == 0 {
            let mine: Vec<u64> = cluster["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .collect();
            for account in cluster["accounts_paced"].as_array().unwrap() {
                let p = partition_of(account.as_str().unwrap());
                assert!(mine.contains(&u64::from(p)), "{stats}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A message's whole life by ref, each step through another daemon.
    let by_ref = |op: &str, extra: Value| {
        let mut request = json!({"op": op, "ref": "build-1", "account_id": "acct5",
                                 "robot_jid": "bot@xmpp.zoom.us"});
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        request
    };
    let content = |text: &str| json!({"content": {"head": {"text": text}}});
    let mut sent = content("v0");
    sent["to_jid"] = json!("chan@conf.xmpp.zoom.us");
    accepted(&a, &by_ref("send", sent)).await;
    accepted(&b, &by_ref("edit", content("v1"))).await;
    accepted(&c, &by_ref("edit", content("v2"))).await;
    let status = a
        .client()
        .await
        .call(&by_ref("status", json!({"wait": "10s"})))
        .await;
    // Answered once Zoom's id is known (the edits may still be pending).
    let message_id = status["message_id"].as_str().unwrap().to_string();
    accepted(&b, &edit(&message_id, "acct5", "v3")).await;
    shows_all(
        &zoom,
        &[(message_id.clone(), "v3".into())],
        Duration::from_secs(10),
    )
    .await;
    accepted(&c, &by_ref("delete", json!({}))).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while zoom.message(&message_id).is_some_and(|m| !m.deleted) {
        assert!(Instant::now() < deadline, "never deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = b.client().await.call(&by_ref("status", json!({}))).await;
    assert_eq!(status["state"], "deleted", "{status}");
    let gone = a
        .client()
        .await
        .call(&edit(&message_id, "acct5", "v4"))
        .await;
    assert_eq!(gone["error"], "gone", "{gone}");
    assert_eq!(
        zoom.messages()
            .iter()
            .filter(|m| m.to_jid.as_deref() == Some("chan@conf.xmpp.zoom.us"))
            .count(),
        1,
        "one message for the ref"
    );

    // An edit larger than a NATS message (1 MB here): stored in parts by its owner; a daemon
    // that would have to forward it says why it cannot.
    let owner = owned(&daemons, Duration::from_secs(10)).await;
    let big = "x".repeat(1_500_000);
    let p = partition_of("acct7") as usize;
    let at_owner = daemons[owner[p]]
        .client()
        .await
        .call(&edit("big", "acct7", &big))
        .await;
    assert_eq!(at_owner["ok"], true, "{at_owner}");
    let elsewhere = daemons[(owner[p] + 1) % 3]
        .client()
        .await
        .call(&edit("big", "acct7", &big))
        .await;
    assert_eq!(elsewhere["error"], "too_large", "{elsewhere}");
    assert!(
        elsewhere["message"]
            .as_str()
            .unwrap()
            .contains("max_payload"),
        "{elsewhere}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while shown(&zoom, "big").map(|t| t.len()) != Some(big.len()) {
        assert!(Instant::now() < deadline, "the large edit never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Dead letters of every partition, through any daemon, with ids that say where they are.
    let answer = accepted(
        &b,
        &json!({"op": "edit", "message_id": "missing-1", "account_id": "acct3",
                "robot_jid": "bot@xmpp.zoom.us", "content": {"head": {"text": "x"}}}),
    )
    .await;
    let job_id = answer["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dead = c.client().await.call(&json!({"op": "dead_list"})).await;
        let letters = dead["dead"].as_array().unwrap();
        if letters.iter().any(|l| l["job_id"] == job_id.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "{dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged = a
        .client()
        .await
        .call(&json!({"op": "dead_purge", "job_id": job_id}))
        .await;
    assert_eq!(purged["purged"], 1, "{purged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_daemons_accounts_are_delivered_by_the_others() {
    let nats = NatsCluster::start(3).await.unwrap();
    let zoom = sandbox(SandboxConfig::default()).await;
    // The default lease_ttl: the failover time measured is the default's.
    let tweaks = cluster_tweaks(&nats, "failover", "5s");
    let mut daemons = [
        TestDaemon::start(&zoom, tweaks.clone()).await,
        TestDaemon::start(&zoom, tweaks.clone()).await,
        TestDaemon::start(&zoom, tweaks).await,
    ];
    let owner = owned(&daemons.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await;
    // An account whose partition daemon 0 owns.
    let account = (0..)
        .map(|i| format!("acct{i}"))
        .find(|a| owner[partition_of(a) as usize] == 0)
        .unwrap();
    accepted(&daemons[1], &edit("before", &account, "v1")).await;
    shows_all(
        &zoom,
        &[("before".into(), "v1".into())],
        Duration::from_secs(10),
    )
    .await;

    daemons[0].kill();
    let killed = Instant::now();

    accepted(&daemons[1], &edit("after", &account, "v2")).await;
    shows_all(
        &zoom,
        &[("after".into(), "v2".into())],
        Duration::from_secs(30),
    )
    .await;
    let failover = killed.elapsed();
    eprintln!("failover: the killed daemon's account delivered again after {failover:?}");
    // lease_ttl + a renewal period + a poll + the gap, with room for a slow machine.
    assert!(failover < Duration::from_secs(15), "{failover:?}");

    // Back again: it takes its share of the partitions again.
    daemons[0].spawn().await;
    let owner = owned(&daemons.iter().collect::<Vec<_>>(), Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = daemons[0].stats().await;
        if !stats["cluster"]["partitions"]
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no rebalance: {owner:?} {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    accepted(&daemons[2], &edit("again", &account, "v3")).await;
    shows_all(
        &zoom,
        &[("again".into(), "v3".into())],
        Duration::from_secs(30),
    )
    .await;
    zoom_saw_no_excess(&zoom);
}

/// A daemon whose NATS does not answer says so, keeps trying and is not ready meanwhile; it
/// stops at once when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_waits_for_nats_and_is_not_ready_meanwhile() {
    let zoom = sandbox(SandboxConfig::default()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tweaks = Tweaks::default()
        .set("storage", "backend", "\"nats\"")
        .set("nats", "servers", &format!("[\"nats://127.0.0.1:{port}\"]"))
        .set("metrics", "listen", &format!("\"{metrics}\""));
    let mut daemon = TestDaemon::prepare(&zoom, tweaks);
    daemon.launch();
    let ready = || async {
        let mut stream = tokio::net::TcpStream::connect(metrics).await.ok()?;
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n",
        )
        .await
        .ok()?;
        let mut answer = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut answer)
            .await
            .ok()?;
        answer.lines().next().map(str::to_string)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = ready().await {
            assert!(status.contains("503"), "{status}");
            if daemon.log().contains("cannot reach NATS; retrying") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, took) = daemon.terminate_timed();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(took < Duration::from_secs(3), "{took:?}");
}
