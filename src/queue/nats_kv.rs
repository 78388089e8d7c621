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
//! (`Nats-TTL`); one message per subject means a write replaces the key's older value. The
//! part size follows the servers' `max_payload` at each commit, which may change between two
//! commits (a reconnect to another server, a rolling change of the setting), so
//! the owner keeps how many part subjects each key in several parts has (read at the
//! take-over, updated by each commit) and a write tombstones exactly the older parts beyond
//! its value (see `nats_layout.rs`).
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

use super::kv::{Commit, Medium, Op, Opened, StoreError};
pub use super::nats_layout::Names;
use super::nats_layout::{encode, load, update_parts, Message, Parts};
use super::nats_mirror::Mirror;

/// JetStream's limit of messages in one atomic batch.
pub const MAX_BATCH: usize = 1000;
/// Room left in a NATS message for its subject and headers.
pub const HEADROOM: usize = 8 * 1024;
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

/// What the writer of a partition knows.
struct WriteState {
    /// The stream's last sequence as this owner left it.
    last: u64,
    /// Commits made, for tokens.
    commits: u64,
    /// Tokens of commits whose answer never came, since the last one that did.
    unanswered: Vec<String>,
    fenced: bool,
    /// The part subjects of the keys stored in several parts, as this owner's commits left
    /// them (at most: after a failed commit, the most it may have written).
    parts: Parts,
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
    /// Parts of a fixed size (tests); `None`: the size follows the `max_payload` of the server
    /// the client is connected to now, which a reconnect or a rolling change may lower.
    part_bytes: Option<usize>,
    /// How many of the next stored batches have their answer dropped, as if it never came.
    #[cfg(test)]
    answers_to_lose: std::sync::atomic::AtomicUsize,
}

impl Partition {
    /// The size of the parts a commit writes now: fixed, or the current `max_payload` less
    /// the room for subject and headers.
    fn part_bytes(&self) -> usize {
        self.part_bytes.unwrap_or_else(|| {
            let max_payload = self.client.server_info().max_payload;
            max_payload.saturating_sub(HEADROOM).max(HEADROOM)
        })
    }

    /// Takes partition `n` over: reads it whole into memory, then writes the `owner` marker
    /// expecting the stream as read, which fences every earlier owner's later commits. Fails
    /// (and is retried by the caller) if anything was written meanwhile.
    pub async fn take_over(
        client: async_nats::Client,
        names: Names,
        n: u32,
        owner: String,
    ) -> Result<Arc<Partition>, StoreError> {
        Self::take_over_with(client, names, n, owner, None).await
    }

    /// [`Partition::take_over`] by an owner that writes values in parts of `part_bytes`,
    /// whatever the servers' max_payload: an owner from before max_payload was changed.
    #[cfg(test)]
    pub async fn take_over_in_parts_of(
        client: async_nats::Client,
        names: Names,
        n: u32,
        owner: String,
        part_bytes: usize,
    ) -> Result<Arc<Partition>, StoreError> {
        Self::take_over_with(client, names, n, owner, Some(part_bytes)).await
    }

    async fn take_over_with(
        client: async_nats::Client,
        names: Names,
        n: u32,
        owner: String,
        part_bytes: Option<usize>,
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
        // Known once the connection is up (after an answer), and checked before the `owner`
        // marker is written: an owner that cannot write would fence the former one off for
        // nothing.
        let max_payload = client.server_info().max_payload;
        if max_payload < 4 * HEADROOM {
            return Err(backend(
                "taking over",
                &names,
                format!("the NATS servers' max_payload ({max_payload} bytes) is too small; 1MB is the default"),
            ));
        }
        let (map, parts) = if state.messages == 0 {
            (BTreeMap::new(), Parts::new())
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
                parts,
            }),
            token_base: format!("{:016x}", rand::random::<u64>()),
            part_bytes,
            #[cfg(test)]
            answers_to_lose: Default::default(),
        }))
    }

    /// Drops the answers of the next `n` batches JetStream stores, as when a commit stops
    /// waiting for an answer that is late (or lost with the connection): stored, yet failed
    /// as far as the writer knows.
    #[cfg(test)]
    pub fn lose_answers(&self, n: usize) {
        self.answers_to_lose
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether to drop the answer of a batch just stored (see [`Partition::lose_answers`]).
    #[cfg(test)]
    fn lose_answer(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        self.answers_to_lose
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
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
        let sequence = ack
            .get("seq")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| BatchError::Failed("an answer without a sequence".into()))?;
        #[cfg(test)]
        {
            if self.lose_answer() {
                return Err(BatchError::Failed("the answer was lost".into()));
            }
        }
        Ok(sequence)
    }

    /// After a wrong-last-sequence answer: whether the stream's last write is one of this
    /// owner's commits whose answer was lost (then its sequence), or someone else's (fenced).
    async fn landed(&self, unanswered: &[String]) -> Result<Option<u64>, StoreError> {
        // Every batch of this owner was answered: the stream was written by another.
        if unanswered.is_empty() {
            return Ok(None);
        }
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
        // From the stream's leader, like `last`: a direct get may be answered by a replica
        // that has not applied the batch yet (JetStream answers once a quorum stored it), and
        // the older commit it shows would make this owner take itself for fenced off.
        let commit = match stream
            .get_last_raw_message_by_subject(&format!("{}.commit", self.names.root))
            .await
        {
            Ok(commit) => commit,
            // No commit at all: the last write is someone's `owner` marker.
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(e) => return Err(backend("reading the last commit of", &self.names, e)),
        };
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
pub(super) fn chunks(writes: Vec<Vec<Message>>) -> Vec<Vec<Message>> {
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
        let encoded = {
            let state = partition.lock();
            encode(
                &partition.names,
                partition.part_bytes(),
                &partition.mirror.read(),
                &state.parts,
                ops,
            )
        };
        let chunks = chunks(encoded.writes);
        let published = partition.runtime.block_on(async {
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
        });
        // Even a failed commit may have stored some of its batches, or all of them: the part
        // counts then keep the most it may have written, so that no part escapes the
        // tombstones of the key's next write.
        update_parts(
            &mut partition.lock().parts,
            encoded.parts,
            published.is_ok(),
        );
        published?;
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

#[cfg(test)]
#[path = "nats_kv_tests.rs"]
mod tests;
