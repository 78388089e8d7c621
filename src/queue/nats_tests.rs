//! The queue on the cluster mode's medium, against a real NATS JetStream cluster: what one
//! owner commits, the next reads back; a former owner's commits are fenced off.

use super::nats_kv::{ensure_stream, Names, Partition};
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
