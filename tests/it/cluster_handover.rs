//! Planned hand-overs under traffic against a slow Zoom: daemons join a running cluster (and
//! one leaves on SIGTERM) while producers send messages by ref, edit them and delete some,
//! and every request takes Zoom 300 to 600 ms to answer, so partitions change owner with
//! requests in flight. A hand-over must let them finish: a send cut off after Zoom applied it
//! would be sent again by the new owner and post the message twice.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use zoomq::cluster::assign::{desired_owner, partition_of, PARTITIONS};
use zoomq::plan::Plan;
use zoomq::sandbox::{MessageRecord, Sandbox, SandboxConfig, Scripted};
use zoomq::testkit::nats::NatsCluster;

use crate::cluster::{cluster_tweaks, owned, zoom_saw_no_excess};
use crate::helpers::{sandbox, Client, TestDaemon};

const ROBOT: &str = "bot@xmpp.zoom.us";
/// Accounts, each in a partition of its own; on the Free plan (2 requests a second) the
/// producers keep most of them at their limit.
const ACCOUNTS: usize = 10;
const PRODUCERS: usize = 4;
/// Refs a producer lives through at once; edits of each after the send.
const BATCH: usize = 4;
const EDITS: usize = 4;

/// What the daemon acknowledged last for a ref.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// Sent or edited, this text last.
    Shows(String),
    /// At most one message, deleted: none if its send never left (e.g. it was claimed and
    /// put back by a stop), or if a delete answered `unavailable` then `gone` had cancelled it.
    Deleted,
    /// Deleted before its send was attempted: Zoom never sees it.
    Cancelled,
}

type Fates = Arc<Mutex<HashMap<String, Fate>>>;

fn to_jid(name: &str) -> String {
    format!("{name}@conference.xmpp.zoom.us")
}

/// A slow Zoom: requests applied at once, answered 300 to 600 ms later (below the 1 s a
/// stopping daemon gives its requests in flight).
fn slow() -> Vec<Scripted> {
    let mut rng = rand::rng();
    (0..12)
        .map(|_| Scripted::DelayAfterApply(Duration::from_millis(rng.random_range(300..=600))))
        .collect()
}

/// Makes the edits and deletes of every message slow too. A send is answered 300 ms after its
/// message exists at the earliest, and no edit of it leaves before that answer.
async fn slow_edits(zoom: Arc<Sandbox>, stop: CancellationToken) {
    let mut scripted = HashSet::new();
    while !stop.is_cancelled() {
        for message in zoom.messages() {
            if scripted.insert(message.message_id.clone()) {
                zoom.script(&message.message_id, slow());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request` until it is accepted (a partition changing owner answers `unavailable`).
async fn accepted(client: &mut Client, request: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut retried = false;
    loop {
        let answer = client.call(request).await;
        if answer["ok"] == true || (retried && answer["error"] == "gone") {
            return answer;
        }
        assert_eq!(answer["error"], "unavailable", "{request} -> {answer}");
        assert!(Instant::now() < deadline, "never accepted: {request}");
        retried = true;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lives through batches of refs: sends each, edits each every 400 ms (each edit answered
/// before the next of its message), deletes every other one.
async fn producer(
    socket: PathBuf,
    zoom: Arc<Sandbox>,
    accounts: Vec<String>,
    id: usize,
    fates: Fates,
    stop: CancellationToken,
) {
    let mut client = Client::connect(&socket).await.unwrap();
    for batch in 0.. {
        if stop.is_cancelled() {
            break;
        }
        let refs: Vec<(String, &String)> = (0..BATCH)
            .map(|s| {
                let account = &accounts[(id * BATCH + s + batch) % ACCOUNTS];
                (format!("p{id}-b{batch}-r{s}"), account)
            })
            .collect();
        for k in 0..=EDITS {
            if k > 0 {
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            for (name, account) in &refs {
                let text = format!("{name}-{k}");
                let mut request = json!({"op": "edit", "ref": name, "account_id": account,
                                         "robot_jid": ROBOT, "content": {"head": {"text": text}}});
                if k == 0 {
                    zoom.script_send(&to_jid(name), slow());
                    request["op"] = json!("send");
                    request["to_jid"] = json!(to_jid(name));
                }
                accepted(&mut client, &request).await;
                let mut fates = fates.lock().unwrap();
                fates.insert(name.clone(), Fate::Shows(text));
            }
        }
        for (name, account) in refs.iter().step_by(2) {
            let request =
                json!({"op": "delete", "ref": name, "account_id": account, "robot_jid": ROBOT});
            let answer = accepted(&mut client, &request).await;
            let cancelled = answer["cancelled"] == true;
            let fate = if cancelled {
                Fate::Cancelled
            } else {
                Fate::Deleted
            };
            fates.lock().unwrap().insert(name.clone(), fate);
        }
    }
}

/// Waits until Zoom has received `n` more requests.
async fn traffic(zoom: &Sandbox, n: u64) {
    let target = zoom.stats().requests_total + n;
    let deadline = Instant::now() + Duration::from_secs(20);
    while zoom.stats().requests_total < target {
        assert!(Instant::now() < deadline, "too little traffic");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every partition is where rendezvous hashing puts it among `daemons` (a joining
/// daemon has taken its share, a stopped one's were taken back); returns the owner of each.
async fn handed_over(daemons: &[&TestDaemon]) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ids = Vec::new();
        let mut owner = vec![usize::MAX; PARTITIONS as usize];
        for (i, daemon) in daemons.iter().enumerate() {
            let stats = daemon.stats().await;
            let cluster = &stats["cluster"];
            ids.push(cluster["daemon"].as_str().unwrap_or("").to_string());
            for p in cluster["partitions"].as_array().into_iter().flatten() {
                owner[p.as_u64().unwrap() as usize] = i;
            }
        }
        let desired: Vec<usize> = (0..PARTITIONS)
            .map(|p| {
                let id = desired_owner(p, &ids).unwrap();
                ids.iter().position(|i| i == id).unwrap()
            })
            .collect();
        if owner == desired {
            return owned(daemons, Duration::from_secs(10)).await;
        }
        assert!(
            Instant::now() < deadline,
            "not handed over: {owner:?}, wanted {desired:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The refs Zoom does not show as acknowledged: a ref not one message showing its last text,
/// a deleted one more than one message or one not deleted, a cancelled one any message.
fn wrong(zoom: &Sandbox, fates: &HashMap<String, Fate>) -> Vec<String> {
    let mut by_jid: HashMap<String, Vec<MessageRecord>> = HashMap::new();
    for message in zoom.messages() {
        if let Some(jid) = message.to_jid.clone() {
            by_jid.entry(jid).or_default().push(message);
        }
    }
    let text = |m: &MessageRecord| {
        m.content
            .as_ref()
            .and_then(|c| c["head"]["text"].as_str().map(str::to_string))
    };
    let mut wrong = Vec::new();
    for (name, fate) in fates {
        let found = by_jid.get(&to_jid(name)).map_or(&[][..], Vec::as_slice);
        let right = match (fate, found) {
            (Fate::Shows(last), [m]) => !m.deleted && text(m).as_ref() == Some(last),
            (Fate::Deleted, [m]) => m.deleted,
            (Fate::Deleted | Fate::Cancelled, []) => true,
            _ => false,
        };
        if !right {
            let seen: Vec<_> = found
                .iter()
                .map(|m| (&m.message_id, text(m), m.deleted))
                .collect();
            wrong.push(format!("{name}: acknowledged {fate:?}, Zoom has {seen:?}"));
        }
    }
    wrong.sort();
    wrong
}

/// The warnings and errors of a daemon's log (empty with `TEST_LOG`, which logs to stderr).
fn troubles(daemon: &TestDaemon) -> String {
    let log = daemon.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"));
    lines.collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_hand_overs_under_traffic_to_a_slow_zoom() {
    let started = Instant::now();
    let nats = NatsCluster::start(3).await.unwrap();
    let config = SandboxConfig {
        default_plan: Plan::Free,
        ..SandboxConfig::default()
    };
    let zoom = Arc::new(sandbox(config).await);
    // Paced at 0.9 of the limit: 3 requests of an account leave 1.11 s apart, so that one
    // reaching Zoom tens of ms late on a busy machine does not put 3 into one of its windows.
    let tweaks = cluster_tweaks(&nats, "handover", "3s")
        .set("zoom", "plan", "\"free\"")
        .set("delivery", "rate_margin", "0.9");
    let a = TestDaemon::start(&zoom, tweaks.clone()).await;
    owned(&[&a], Duration::from_secs(60)).await;

    let mut seen = HashSet::new();
    let accounts: Vec<String> = (0..)
        .map(|i| format!("acct{i}"))
        .filter(|account| seen.insert(partition_of(account)))
        .take(ACCOUNTS)
        .collect();
    let fates: Fates = Arc::default();
    let stop = CancellationToken::new();
    let scripter = tokio::spawn(slow_edits(zoom.clone(), stop.clone()));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let (zoom, fates) = (zoom.clone(), fates.clone());
            let (accounts, stop) = (accounts.clone(), stop.clone());
            tokio::spawn(producer(a.socket.clone(), zoom, accounts, id, fates, stop))
        })
        .collect();
    traffic(&zoom, 40).await;

    // B joins, then C: A hands their shares over, with requests in flight.
    let mut b = TestDaemon::start(&zoom, tweaks.clone()).await;
    let with_b = handed_over(&[&a, &b]).await;
    assert!(with_b.contains(&1), "nothing moved to B: {with_b:?}");
    traffic(&zoom, 40).await;
    let c = TestDaemon::start(&zoom, tweaks).await;
    let with_c = handed_over(&[&a, &b, &c]).await;
    assert!(with_c.contains(&2), "nothing moved to C: {with_c:?}");
    assert!(with_c.contains(&1), "B lost everything: {with_c:?}");
    traffic(&zoom, 40).await;

    // B stops: its partitions go back to A and C.
    let status = tokio::task::block_in_place(|| b.terminate());
    assert!(status.success(), "{status}\n{}", b.log());
    handed_over(&[&a, &c]).await;
    traffic(&zoom, 40).await;
    stop.cancel();
    for producer in producers {
        producer.await.unwrap();
    }
    scripter.await.unwrap();

    // Some accounts with traffic changed owner (any partition not A's moved at least once).
    let moved = accounts
        .iter()
        .map(|account| partition_of(account) as usize)
        .filter(|&p| with_b[p] != 0 || with_c[p] != 0)
        .count();
    assert!(moved > 0, "no account with traffic changed owner");
    let fates = fates.lock().unwrap().clone();
    assert!(
        fates.len() >= 40,
        "too little progress: {} refs",
        fates.len()
    );

    // Drained, every ref is one message at Zoom showing its last acknowledged edit, or gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let wrong = wrong(&zoom, &fates);
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} refs wrong at Zoom:\n{}\nA:\n{}\nB:\n{}\nC:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(20)].join("\n"),
            troubles(&a),
            troubles(&b),
            troubles(&c)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = a.drained(Duration::from_secs(20)).await;
    assert_eq!(stats["dead"], 0, "{stats}");
    let wrong = wrong(&zoom, &fates);
    assert!(wrong.is_empty(), "after draining:\n{}", wrong.join("\n"));
    zoom_saw_no_excess(&zoom);
    if std::env::var_os("TEST_LOG").is_none() {
        assert!(a.log().contains("handing a partition over"), "{}", a.log());
    }
    eprintln!(
        "{} refs, {} requests at Zoom, {moved} of {ACCOUNTS} accounts changed owner, {:?}",
        fates.len(),
        zoom.stats().requests_total,
        started.elapsed()
    );
}
