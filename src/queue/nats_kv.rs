//! The cluster mode's medium: one JetStream stream per partition of the accounts, holding the
//! same ordered map the embedded mode keeps in sled, and a copy of it in memory for reads.
//!
//! # Layout
//! Stream `<PREFIX>_P<n>` (replicated `nats.replicas` times, one message kept per subject):
//!
//! | subject                  | message                                                 |
//! |--------------------------|---------------------------------------------------------|
//! | `<prefix>.p<n>.k.<hex>`  | the value of key `<hex>` (or its first part)           |
//! | `<prefix>.p<n>.k.<hex>.<i>` | part *i* of a value larger than a NATS message       |
//! | `<prefix>.p<n>.commit`   | the token of the last commit, for telling a lost answer |
//! | `<prefix>.p<n>.owner`    | who wrote the partition last after taking it over       |
//!
//! A deleted key is a tombstone (`Zoomq-Del`, no payload) that JetStream drops a minute later
//! (`Nats-TTL`); one message per subject means a write replaces the key's older value.
//!
//! # Atomic, durable, fenced
//! A group commit is one JetStream atomic batch (nats-server 2.12+): all of its messages are
//! stored, or none. JetStream answers once a quorum of the stream's replicas stored it. Its
//! first message carries `Nats-Expected-Last-Sequence`: the stream's last sequence as this
//! owner left it. A daemon that takes the partition over writes its `owner` marker first, so
//! from then on every batch of the former owner fails as a whole (fencing: however late it
//! wakes up, it cannot write over the new owner). A batch whose answer was lost is told apart
//! from a takeover by the `commit` token it carries. Commits of more than
//! [`MAX_BATCH`] messages go as several batches, in order (see [`NatsCommit::commit`]).
//!
//! # Reads
//! The owner reads its partition once, when it takes it over, into memory; after that every
//! read is served from memory (no network round trip under the queue's lock), and a commit
//! updates memory once JetStream has stored it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::kv::{Commit, Kv, Medium, Op, Opened, Pair, StoreError};
pub use super::nats_layout::Names;
use super::nats_layout::{encode, load, Message};

/// JetStream's limit of messages in one atomic batch.
pub const MAX_BATCH: usize = 1000;
/// Room left in a NATS message for its subject and headers.
const HEADROOM: usize = 8 * 1024;
/// How long a commit waits for JetStream's answer before it counts as failed (and is retried).
pub(super) const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the partition's stream if it does not exist yet.
pub async fn ensure_stream(
    js: &jetstream::Context,
    names: &Names,
    replicas: usize,
) -> Result<(), StoreError> {
    js.get_or_create_stream(stream::Config {
        name: names.stream.clone(),
        subjects: vec![format!("{}.>", names.root)],
        max_messages_per_subject: 1,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        allow_atomic_publish: true,
        allow_message_ttl: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(0),
        description: Some("zoomq: one partition of the queue".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| backend("creating the stream", names, e))?;
    Ok(())
}

pub(super) fn backend(what: &str, names: &Names, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", names.stream))
}

/// The copy in memory of one partition's map.
#[derive(Default)]
struct Mirror {
    map: RwLock<BTreeMap<Bytes, Bytes>>,
}

impl Kv for Mirror {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.read().get(key).cloned())
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + 'a> {
        let pairs: Vec<Result<Pair, StoreError>> = self
            .read()
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| Ok((k.clone(), v.clone())))
            .collect();
        Box::new(pairs.into_iter())
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self
            .read()
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, _)| k.clone()))
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
}

impl Mirror {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Bytes, Bytes>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the writer of a partition knows.
struct WriteState {
    /// The stream's last sequence as this owner left it.
    last: u64,
    /// Commits made, for tokens.
    commits: u64,
    /// Tokens of commits whose answer never came, since the last one that did.
    unanswered: Vec<String>,
    fenced: bool,
}

/// One partition, taken over by this daemon.
pub struct Partition {
    pub n: u32,
    names: Names,
    client: async_nats::Client,
    js: jetstream::Context,
    runtime: tokio::runtime::Handle,
    mirror: Arc<Mirror>,
    write: Mutex<WriteState>,
    /// This take-over of the partition, in every commit token (short: a batch id has at most
    /// 64 characters).
    token_base: String,
    part_bytes: usize,
}

impl Partition {
    /// Takes partition `n` over: reads it whole into memory, then writes the `owner` marker
    /// expecting the stream as read, which fences every earlier owner's later commits. Fails
    /// (and is retried by the caller) if anything was written meanwhile.
    pub async fn take_over(
        client: async_nats::Client,
        names: Names,
        n: u32,
        owner: String,
    ) -> Result<Arc<Partition>, StoreError> {
        let js = jetstream::new(client.clone());
        let mut stream = js
            .get_stream(&names.stream)
            .await
            .map_err(|e| backend("opening the stream", &names, e))?;
        let state = stream
            .info()
            .await
            .map_err(|e| backend("reading the state of", &names, e))?
            .state
            .clone();
        let map = if state.messages == 0 {
            BTreeMap::new()
        } else {
            load(&stream, &names, state.last_sequence).await?
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Sequence",
            state.last_sequence.to_string().as_str(),
        );
        let ack = js
            .publish_with_headers(
                format!("{}.owner", names.root),
                headers,
                Bytes::from(owner.clone()),
            )
            .await
            .map_err(|e| backend("taking over", &names, e))?
            .await
            .map_err(|e| backend("taking over", &names, e))?;
        let max_payload = client.server_info().max_payload;
        if max_payload < 4 * HEADROOM {
            return Err(backend(
                "taking over",
                &names,
                format!("the NATS servers' max_payload ({max_payload} bytes) is too small; 1MB is the default"),
            ));
        }
        let part_bytes = max_payload - HEADROOM;
        Ok(Arc::new(Partition {
            n,
            names,
            client,
            js,
            runtime: tokio::runtime::Handle::current(),
            mirror: Arc::new(Mirror {
                map: RwLock::new(map),
            }),
            write: Mutex::new(WriteState {
                last: ack.sequence,
                commits: 0,
                unanswered: Vec::new(),
                fenced: false,
            }),
            token_base: format!("{:016x}", rand::random::<u64>()),
            part_bytes,
        }))
    }

    /// Whether another daemon has taken this partition over (found at a commit).
    pub fn fenced(&self) -> bool {
        self.lock().fenced
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriteState> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Partition::publish_batch`] within [`COMMIT_TIMEOUT`], whatever blocks (a publish waits
    /// while the client reconnects, or while a stalled connection's buffer is full).
    async fn publish_bounded(
        &self,
        messages: &[Message],
        expected: u64,
        token: &str,
    ) -> Result<u64, BatchError> {
        tokio::time::timeout(
            COMMIT_TIMEOUT,
            self.publish_batch(messages, expected, token),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BatchError::Failed(format!(
                "no answer within {} s",
                COMMIT_TIMEOUT.as_secs()
            )))
        })
    }

    /// Publishes one atomic batch expecting the stream's last sequence to be `expected`;
    /// returns the batch's last sequence.
    async fn publish_batch(
        &self,
        messages: &[Message],
        expected: u64,
        token: &str,
    ) -> Result<u64, BatchError> {
        let total = messages.len() + 1;
        let headers_of = |i: usize, mut h: HeaderMap| {
            h.insert("Nats-Batch-Id", token);
            h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if i == 0 {
                h.insert("Nats-Expected-Last-Sequence", expected.to_string().as_str());
            }
            h
        };
        for (i, (subject, h, payload)) in messages.iter().enumerate() {
            let h = headers_of(i, h.clone());
            self.client
                .publish_with_headers(subject.clone(), h, payload.clone())
                .await
                .map_err(|e| BatchError::Failed(e.to_string()))?;
        }
        let mut h = headers_of(total - 1, HeaderMap::new());
        h.insert("Nats-Batch-Commit", "1");
        let request = async_nats::Request::new()
            .headers(h)
            .payload(Bytes::from(token.to_string()))
            .timeout(Some(COMMIT_TIMEOUT));
        let answer = self
            .client
            .send_request(format!("{}.commit", self.names.root), request)
            .await
            .map_err(|e| BatchError::Failed(e.to_string()))?;
        let ack: serde_json::Value = serde_json::from_slice(&answer.payload)
            .map_err(|e| BatchError::Failed(format!("unreadable answer: {e}")))?;
        if let Some(error) = ack.get("error") {
            let code = error.get("err_code").and_then(|c| c.as_u64());
            let text = error
                .get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("unknown error")
                .to_string();
            // 10071: wrong last sequence.
            return Err(if code == Some(10071) {
                BatchError::WrongLast
            } else {
                BatchError::Failed(text)
            });
        }
        ack.get("seq")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| BatchError::Failed("an answer without a sequence".into()))
    }

    /// After a wrong-last-sequence answer: whether the stream's last write is one of this
    /// owner's commits whose answer was lost (then its sequence), or someone else's (fenced).
    async fn landed(&self, unanswered: &[String]) -> Result<Option<u64>, StoreError> {
        let mut stream = self
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| backend("opening the stream", &self.names, e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| backend("reading the state of", &self.names, e))?
            .state
            .last_sequence;
        let commit = stream
            .direct_get_last_for_subject(format!("{}.commit", self.names.root))
            .await
            .map_err(|e| backend("reading the last commit of", &self.names, e))?;
        let token = String::from_utf8_lossy(&commit.payload);
        Ok((commit.sequence == last && unanswered.iter().any(|t| *t == token)).then_some(last))
    }
}

enum BatchError {
    /// The stream was written since this owner's last commit.
    WrongLast,
    Failed(String),
}

/// The messages of a commit in batches of at most [`MAX_BATCH`] (with the commit message),
/// each write's messages in one batch.
fn chunks(writes: Vec<Vec<Message>>) -> Vec<Vec<Message>> {
    let mut chunks: Vec<Vec<Message>> = vec![Vec::new()];
    for write in writes {
        let current = chunks.last_mut().expect("one chunk at least");
        if !current.is_empty() && current.len() + write.len() > MAX_BATCH - 1 {
            chunks.push(write);
        } else {
            current.extend(write);
        }
    }
    chunks
}

/// A partition as a medium for the queue.
pub struct NatsMedium(pub Arc<Partition>);

struct NatsCommit(Arc<Partition>);

impl Medium for NatsMedium {
    /// The partition was read when it was taken over; every open hands out the same copy.
    fn open(&self) -> Result<Opened, StoreError> {
        if self.0.fenced() {
            return Err(StoreError::Fenced(self.0.n));
        }
        Ok((self.0.mirror.clone(), Box::new(NatsCommit(self.0.clone()))))
    }

    fn shrinks(&self) -> bool {
        false
    }

    fn rebuild_empty(&self, _commit: Box<dyn Commit>) -> Result<Opened, StoreError> {
        self.open()
    }

    fn free_space(&self) -> Option<u64> {
        None
    }
}

impl Commit for NatsCommit {
    /// Publishes `ops` as atomic batches, in order, each expecting the stream as this owner
    /// left it, and applies them to memory once stored. Runs on the queue's writer thread.
    ///
    /// More than [`MAX_BATCH`] messages go as several batches, never splitting one write's
    /// messages (the parts of a value): a crash between two of them leaves the first applied.
    /// The ledger orders a commit's writes new entries first, done bits and deletions after,
    /// so such a prefix holds every job at least once (a job found twice is resolved by
    /// recovery, newer entry first); it is rare (a commit of a thousand writes) and the next
    /// owner's recovery reads it like any other state.
    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let partition = &self.0;
        if partition.fenced() {
            return Err(StoreError::Fenced(partition.n));
        }
        let chunks = chunks(encode(
            &partition.names,
            partition.part_bytes,
            &partition.mirror.read(),
            ops,
        ));
        partition.runtime.block_on(async {
            for chunk in &chunks {
                let (expected, token) = {
                    let mut state = partition.lock();
                    state.commits += 1;
                    (
                        state.last,
                        format!("{}-{}", partition.token_base, state.commits),
                    )
                };
                let mut result = partition.publish_bounded(chunk, expected, &token).await;
                if let Err(BatchError::WrongLast) = result {
                    let unanswered = partition.lock().unanswered.clone();
                    // An earlier attempt was stored after all: this one repeats its
                    // writes (in the same order, so harmlessly) and adds the newer.
                    let landed =
                        tokio::time::timeout(COMMIT_TIMEOUT, partition.landed(&unanswered))
                            .await
                            .map_err(|_| {
                                backend("reading the last commit of", &partition.names, "no answer")
                            })??;
                    if let Some(last) = landed {
                        partition.lock().last = last;
                        result = partition.publish_bounded(chunk, last, &token).await;
                    }
                }
                match result {
                    Ok(last) => {
                        let mut state = partition.lock();
                        state.last = last;
                        state.unanswered.clear();
                    }
                    Err(BatchError::WrongLast) => {
                        partition.lock().fenced = true;
                        return Err(StoreError::Fenced(partition.n));
                    }
                    Err(BatchError::Failed(e)) => {
                        partition.lock().unanswered.push(token);
                        return Err(backend("committing to", &partition.names, e));
                    }
                }
            }
            Ok(())
        })?;
        let mut map = partition
            .mirror
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    map.insert(Bytes::copy_from_slice(k), Bytes::copy_from_slice(v));
                }
                Op::Del(k) => {
                    map.remove(k.as_slice());
                }
            }
        }
        Ok(())
    }
}
