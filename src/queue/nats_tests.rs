//! The queue on the cluster mode's medium, against a real NATS JetStream cluster: what one
//! owner commits, the next reads back; a former owner's commits are fenced off, a commit
//! whose answer was lost is not; values in parts leave none behind when the part size
//! changes; commits of more than a batch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;

use super::kv::{Commit, Kv, Medium, Op, StoreError};
use super::nats_kv::{chunks, ensure_stream, Names, NatsMedium, Partition, MAX_BATCH};
use super::nats_layout::{encode, Parts, DEL};
use super::tests::{close, config, edit, text_of};
use super::*;
use crate::testkit::nats::NatsCluster;

async fn take(
    cluster: &NatsCluster,
    names: &Names,
    owner: &str,
    dir: &std::path::Path,
) -> (LocalQueue, Arc<Partition>, Recovery) {
    let client = cluster.client().await.unwrap();
    let partition = Partition::take_over(client, names.clone(), 0, owner.into())
        .await
        .unwrap();
    let config = config(dir);
    let opened = partition.clone();
    let (queue, _ready) = tokio::task::spawn_blocking(move || {
        LocalQueue::open_partition(opened, &config, Arc::new(Metrics::new()))
    })
    .await
    .unwrap()
    .unwrap();
    let recovery = queue.recovered().await;
    (queue, partition, recovery)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_reads_what_the_last_committed_and_fences_it_off() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let names = Names::new("zqtest", 0);
    let js = async_nats::jetstream::new(cluster.client().await.unwrap());
    ensure_stream(&js, &names, 3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let (first, first_partition, recovery) = take(&cluster, &names, "a", dir.path()).await;
    assert_eq!(recovery.pending, 0);
    first.enqueue(&edit("m1", "acct", "old")).await.unwrap();
    first.enqueue(&edit("m2", "acct", "two")).await.unwrap();
    // Larger than a NATS message (1 MB by default): stored in parts.
    let big = "x".repeat(1_200_000);
    first.enqueue(&edit("m3", "acct", &big)).await.unwrap();
    let job = first.claim_now("acct").unwrap();
    assert_eq!(text_of(&job), "old");
    wait(first.complete(&job, None)).await.unwrap();
    first.enqueue(&edit("m2", "acct", "two-b")).await.unwrap();

    // A second daemon takes the partition over while the first still runs.
    let (second, _, recovery) = take(&cluster, &names, "b", dir.path()).await;
    assert_eq!(recovery.pending, 2, "m2 and m3");
    let mut texts = Vec::new();
    while let Some(job) = second.claim_now("acct") {
        texts.push(text_of(&job));
        wait(second.complete(&job, None)).await.unwrap();
    }
    texts.sort();
    assert_eq!(texts, ["two-b".to_string(), big]);

    // The first owner can no longer write: its edits are refused, not lost in silence.
    let refused = first.enqueue(&edit("m4", "acct", "late")).await;
    assert!(
        matches!(refused, Err(EnqueueError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(first_partition.fenced());
    close(first).await;

    // What the second committed is what a third finds.
    second.enqueue(&edit("m5", "acct", "five")).await.unwrap();
    close(second).await;
    let (third, _, recovery) = take(&cluster, &names, "c", dir.path()).await;
    assert_eq!(recovery.pending, 1);
    assert_eq!(text_of(&third.claim_now("acct").unwrap()), "five");
    close(third).await;
}

/// A partition taken over without a queue on it: its map in memory and its write side.
struct Owner {
    partition: Arc<Partition>,
    kv: Arc<dyn Kv>,
    writer: Option<Box<dyn Commit>>,
}

impl Owner {
    /// Takes partition 0 over; `part_bytes`: the part size of an owner whose servers had
    /// another max_payload (else the servers' own).
    async fn take(
        cluster: &NatsCluster,
        names: &Names,
        owner: &str,
        part_bytes: Option<usize>,
    ) -> Owner {
        let client = cluster.client().await.unwrap();
        let partition = match part_bytes {
            Some(n) => {
                Partition::take_over_in_parts_of(client, names.clone(), 0, owner.into(), n).await
            }
            None => Partition::take_over(client, names.clone(), 0, owner.into()).await,
        }
        .unwrap();
        let (kv, writer) = NatsMedium(partition.clone()).open().unwrap();
        Owner {
            partition,
            kv,
            writer: Some(writer),
        }
    }

    /// One group commit, on a thread of its own as on the queue's writer thread.
    async fn commit(&mut self, ops: Vec<Op>) -> Result<(), StoreError> {
        let mut writer = self.writer.take().expect("one commit at a time");
        let (writer, result) = tokio::task::spawn_blocking(move || {
            let result = writer.commit(&ops);
            (writer, result)
        })
        .await
        .unwrap();
        self.writer = Some(writer);
        result
    }

    fn all(&self) -> BTreeMap<Bytes, Bytes> {
        self.kv.scan_prefix(b"").map(Result::unwrap).collect()
    }
}

fn put(key: &[u8], value: impl Into<Vec<u8>>) -> Op {
    Op::Put(key.to_vec(), value.into())
}

fn del(key: &[u8]) -> Op {
    Op::Del(key.to_vec())
}

/// `n` bytes that differ from part to part.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i / 1000) as u8))
        .collect()
}

/// The map `ops` make of `map`.
fn applied(mut map: BTreeMap<Bytes, Bytes>, ops: &[Op]) -> BTreeMap<Bytes, Bytes> {
    for op in ops {
        match op {
            Op::Put(k, v) => {
                map.insert(Bytes::from(k.clone()), Bytes::from(v.clone()));
            }
            Op::Del(k) => {
                map.remove(k.as_slice());
            }
        }
    }
    map
}

/// A message as the stream holds it.
struct Stored {
    sequence: u64,
    subject: String,
    tombstone: bool,
}

/// Every message the stream holds, in order: the last one of each subject.
async fn stored(cluster: &NatsCluster, names: &Names) -> Vec<Stored> {
    let js = async_nats::jetstream::new(cluster.client().await.unwrap());
    let mut stream = js.get_stream(&names.stream).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", names.root),
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while out.last().is_none_or(|m: &Stored| m.sequence < last) {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream read to its end")
            .unwrap()
            .unwrap();
        out.push(Stored {
            sequence: message.info().unwrap().stream_sequence,
            subject: message.subject.to_string(),
            tombstone: message
                .headers
                .as_ref()
                .is_some_and(|h| h.get(DEL).is_some()),
        });
    }
    out
}

/// The subjects of parts after the first that hold a value (not a tombstone).
fn live_parts(stored: &[Stored], names: &Names) -> Vec<String> {
    let keys = format!("{}.k.", names.root);
    stored
        .iter()
        .filter(|m| !m.tombstone)
        .filter_map(|m| m.subject.strip_prefix(&keys).map(|rest| (m, rest)))
        .filter(|(_, rest)| rest.contains('.'))
        .map(|(m, _)| m.subject.clone())
        .collect()
}

async fn new_stream(cluster: &NatsCluster, prefix: &str) -> Names {
    let names = Names::new(prefix, 0);
    let js = async_nats::jetstream::new(cluster.client().await.unwrap());
    ensure_stream(&js, &names, 3).await.unwrap();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_part_is_left_behind_when_max_payload_changes() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let names = new_stream(&cluster, "zqparts").await;

    // An owner whose servers allowed small messages: values in parts of 1 KiB.
    let mut small = Owner::take(&cluster, &names, "small", Some(1024)).await;
    let (v1, v2, v3) = (pattern(10_000, 1), pattern(5_000, 2), pattern(3_000, 3));
    small
        .commit(vec![put(b"k1", v1.clone()), put(b"k2", v2), put(b"k3", v3)])
        .await
        .unwrap();
    assert_eq!(
        live_parts(&stored(&cluster, &names).await, &names).len(),
        9 + 4 + 2
    );

    // max_payload raised: the next owner's parts are near 1 MB, each value would be one part
    // by its length. It reads them whole all the same, and writing one over, shorter or as
    // long, or deleting it, tombstones every part it has.
    let mut large = Owner::take(&cluster, &names, "large", None).await;
    assert_eq!(large.kv.get(b"k1").unwrap().unwrap(), v1);
    let (v3b, v4) = (pattern(3_000, 4), pattern(3_000, 5));
    large
        .commit(vec![
            put(b"k1", "short"),
            del(b"k2"),
            put(b"k3", v3b.clone()),
            put(b"k4", v4),
        ])
        .await
        .unwrap();
    let left = live_parts(&stored(&cluster, &names).await, &names);
    assert!(left.is_empty(), "parts left behind: {left:?}");

    // max_payload lowered again: deleting k4, written in one part, tombstones that part only
    // (its length in the new part size would say three).
    let mut small_again = Owner::take(&cluster, &names, "small-again", Some(1024)).await;
    small_again.commit(vec![del(b"k4")]).await.unwrap();
    let k4 = names.key_subject(b"k4", 0);
    let k4_messages: Vec<(String, bool)> = stored(&cluster, &names)
        .await
        .into_iter()
        .filter(|m| m.subject == k4 || m.subject.starts_with(&format!("{k4}.")))
        .map(|m| (m.subject, m.tombstone))
        .collect();
    assert_eq!(k4_messages, [(k4, true)]);

    let fresh = Owner::take(&cluster, &names, "fresh", None).await;
    let expected = BTreeMap::from([
        (Bytes::from_static(b"k1"), Bytes::from_static(b"short")),
        (Bytes::from_static(b"k3"), Bytes::from(v3b)),
    ]);
    assert_eq!(fresh.all(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_told_from_a_take_over() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let names = new_stream(&cluster, "zqlost").await;
    let mut a = Owner::take(&cluster, &names, "a", None).await;

    // Stored, but the answer never came: failed as far as the writer knows.
    a.partition.lose_answers(1);
    let lost = a.commit(vec![put(b"k1", "one")]).await;
    assert!(matches!(lost, Err(StoreError::Backend(_))), "{lost:?}");
    assert!(!a.partition.fenced());
    let k1 = names.key_subject(b"k1", 0);
    assert!(
        stored(&cluster, &names)
            .await
            .iter()
            .any(|m| m.subject == k1),
        "the batch was stored"
    );
    // The next commit finds the stream one batch further than this owner left it: by its
    // token, that batch is its own, not a new owner's marker, and it commits after it. (It
    // does not repeat k1, so what a new owner finds of k1 is that batch's.)
    a.commit(vec![put(b"k2", "two")]).await.unwrap();
    assert!(!a.partition.fenced());

    // Lost twice in a row, the writer committing the failed writes again each time as it
    // does after a failure: two batches without an answer, the last of them in the stream.
    a.partition.lose_answers(2);
    let lost = a.commit(vec![put(b"k3", "three")]).await;
    assert!(matches!(lost, Err(StoreError::Backend(_))), "{lost:?}");
    let lost = a
        .commit(vec![put(b"k3", "three"), put(b"k4", "four")])
        .await;
    assert!(matches!(lost, Err(StoreError::Backend(_))), "{lost:?}");
    a.commit(vec![
        put(b"k3", "three"),
        put(b"k4", "four"),
        put(b"k5", "five"),
    ])
    .await
    .unwrap();
    assert!(!a.partition.fenced());
    assert_eq!(a.kv.get(b"k5").unwrap().unwrap(), "five");

    let fresh = Owner::take(&cluster, &names, "b", None).await;
    let expected: BTreeMap<Bytes, Bytes> = [
        ("k1", "one"),
        ("k2", "two"),
        ("k3", "three"),
        ("k4", "four"),
        ("k5", "five"),
    ]
    .into_iter()
    .map(|(k, v)| (Bytes::from(k), Bytes::from(v)))
    .collect();
    assert_eq!(fresh.all(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_former_owner_is_fenced_off_though_its_answers_were_lost() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let names = new_stream(&cluster, "zqfence").await;
    let mut a = Owner::take(&cluster, &names, "a", None).await;
    a.partition.lose_answers(1);
    assert!(a.commit(vec![put(b"k1", "one")]).await.is_err());

    // B takes over (its `owner` marker is the stream's last write) and reads what A's
    // unanswered batch stored. A's next commit finds its token in the stream, but not last.
    let mut b = Owner::take(&cluster, &names, "b", None).await;
    assert_eq!(b.kv.get(b"k1").unwrap().unwrap(), "one");
    let late = a.commit(vec![put(b"k1", "one"), put(b"k2", "late")]).await;
    assert!(matches!(late, Err(StoreError::Fenced(0))), "{late:?}");
    assert!(a.partition.fenced());

    // B's answer lost in turn; C takes over and commits: B's retry finds C's commit last.
    b.partition.lose_answers(1);
    assert!(b.commit(vec![put(b"k3", "three")]).await.is_err());
    let mut c = Owner::take(&cluster, &names, "c", None).await;
    c.commit(vec![put(b"k4", "four")]).await.unwrap();
    let late = b
        .commit(vec![put(b"k3", "three"), put(b"k5", "late")])
        .await;
    assert!(matches!(late, Err(StoreError::Fenced(0))), "{late:?}");
    assert!(b.partition.fenced());
    assert!(!c.partition.fenced());

    let fresh = Owner::take(&cluster, &names, "d", None).await;
    let expected: BTreeMap<Bytes, Bytes> = [("k1", "one"), ("k3", "three"), ("k4", "four")]
        .into_iter()
        .map(|(k, v)| (Bytes::from(k), Bytes::from(v)))
        .collect();
    assert_eq!(fresh.all(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_more_than_a_batch_lands_whole_and_in_order() {
    let cluster = NatsCluster::start(3).await.unwrap();
    let names = new_stream(&cluster, "zqbulk").await;
    let mut a = Owner::take(&cluster, &names, "a", Some(1024)).await;

    // 2,500 puts, a value in 20 parts where it would straddle the end of the first batch,
    // a key written twice in the first batch and again in the last, a key written and
    // deleted in other batches.
    let mut ops = vec![
        put(b"twice", "first"),
        put(b"gone", "soon"),
        put(b"twice", "again"),
    ];
    for i in 0..2500 {
        if i == 987 {
            ops.push(put(b"big", pattern(20 * 1024, 9)));
        }
        ops.push(put(format!("bulk{i:05}").as_bytes(), format!("v{i}")));
    }
    ops.push(put(b"twice", "last"));
    ops.push(del(b"gone"));

    let encoded = encode(&names, 1024, &BTreeMap::new(), &Parts::new(), &ops);
    let batches = chunks(encoded.writes);
    let sizes: Vec<usize> = batches.iter().map(Vec::len).collect();
    assert_eq!(sizes[0], 990, "{sizes:?}");
    assert_eq!(sizes.len(), 3, "{sizes:?}");
    assert!(sizes.iter().all(|n| *n < MAX_BATCH));
    let big: Vec<String> = (0..20).map(|i| names.key_subject(b"big", i)).collect();
    let second: Vec<String> = batches[1][..20].iter().map(|m| m.0.clone()).collect();
    assert_eq!(second, big, "the value's parts start the second batch");

    let before = stored(&cluster, &names).await.last().unwrap().sequence;
    a.commit(ops.clone()).await.unwrap();
    assert!(!a.partition.fenced());
    let expected = applied(BTreeMap::new(), &ops);
    assert_eq!(a.all(), expected);

    // Every message in its batch's order (each batch with its commit message), and the
    // batches in order: of a subject written twice, the last write is what is kept.
    let after = stored(&cluster, &names).await;
    let messages: Vec<&str> = batches.iter().flatten().map(|m| m.0.as_str()).collect();
    assert_eq!(
        after.last().unwrap().sequence - before,
        (messages.len() + batches.len()) as u64
    );
    let last_of: std::collections::HashMap<&str, usize> =
        messages.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    let kept: Vec<&str> = messages
        .iter()
        .enumerate()
        .filter(|(i, s)| last_of[**s] == *i)
        .map(|(_, s)| *s)
        .collect();
    let commit = format!("{}.commit", names.root);
    let landed: Vec<&str> = after
        .iter()
        .filter(|m| m.sequence > before && m.subject != commit)
        .map(|m| m.subject.as_str())
        .collect();
    assert_eq!(landed, kept);

    let fresh = Owner::take(&cluster, &names, "b", None).await;
    assert_eq!(fresh.all(), expected);
    assert_eq!(
        fresh.kv.get(b"twice").unwrap().unwrap(),
        Bytes::from_static(b"last")
    );
}
