//! How a partition's ordered map is written as JetStream messages and read back: the
//! subjects of keys, values split into parts, tombstones (the table is in `nats_kv.rs`).
//!
//! # How many parts a key has
//! A value is split into parts of the size the servers' `max_payload` allows *when it is
//! written*. An operator may change `max_payload` (say from 1 MB to 8 MB) while the stream
//! keeps values written before, so a stored value's length does not tell how many part
//! subjects it occupies. A write must tombstone every part of the older value beyond the new
//! one, or those parts stay in the stream for good (one message per subject, no TTL). So the
//! owner keeps [`Parts`]: read from the stream at the take-over, updated by every commit.

use std::collections::{BTreeMap, HashMap};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::kv::{Op, StoreError};
use super::nats_kv::{backend, COMMIT_TIMEOUT};

/// A header of a tombstone: the key is deleted.
pub(super) const DEL: &str = "Zoomq-Del";
/// A header of a value's first part: how many parts it has (absent: one).
const PARTS: &str = "Zoomq-Parts";

/// A message to publish: subject, headers, payload.
pub type Message = (String, HeaderMap, Bytes);

/// Where a deployment keeps partition `n`.
#[derive(Debug, Clone)]
pub struct Names {
    pub stream: String,
    pub root: String,
}

impl Names {
    pub fn new(prefix: &str, n: u32) -> Names {
        Names {
            stream: format!("{}_P{n}", prefix.to_ascii_uppercase()),
            root: format!("{prefix}.p{n}"),
        }
    }

    /// The subject of part `part` of key `key` (part 0: the key's own subject).
    pub(super) fn key_subject(&self, key: &[u8], part: usize) -> String {
        let mut subject = String::with_capacity(self.root.len() + 4 + key.len() * 2 + 4);
        subject.push_str(&self.root);
        subject.push_str(".k.");
        for b in key {
            subject.push_str(&format!("{b:02x}"));
        }
        if part > 0 {
            subject.push_str(&format!(".{part}"));
        }
        subject
    }

    /// The key and part number a message's subject names, if it is a key's.
    fn parse(&self, subject: &str) -> Option<(Vec<u8>, usize)> {
        let rest = subject.strip_prefix(&self.root)?.strip_prefix(".k.")?;
        let (hex, part) = match rest.split_once('.') {
            Some((hex, part)) => (hex, part.parse().ok()?),
            None => (rest, 0),
        };
        if hex.len() % 2 != 0 {
            return None;
        }
        let key = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some((key, part))
    }
}

/// How many part subjects each key stored in more than one has in the stream (never fewer
/// than it really has: see [`update_parts`]). A key not in it has one (its value's single
/// message) if it is in the map, else none. Most values have one part, so this is usually
/// empty.
pub type Parts = HashMap<Bytes, usize>;

/// How many part subjects `key` has in the stream, as far as this owner knows.
fn stored_parts(map: &BTreeMap<Bytes, Bytes>, parts: &Parts, key: &[u8]) -> usize {
    parts
        .get(key)
        .copied()
        .unwrap_or(usize::from(map.contains_key(key)))
}

/// A commit as messages to publish, and what it does to [`Parts`].
pub struct Encoded {
    /// One group per write, in order: the value's parts, then the tombstones of the older
    /// value's parts beyond the new one.
    pub writes: Vec<Vec<Message>>,
    /// The keys stored in more than one part before, during or after the commit.
    pub parts: Vec<PartsChange>,
}

/// What a commit does to one key's entry in [`Parts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartsChange {
    pub key: Bytes,
    /// Its part subjects once the whole commit is stored.
    pub after: usize,
    /// The most any prefix of the commit's writes leaves it (a commit of several batches
    /// may be stored in part).
    pub most: usize,
}

/// The messages that write `ops`, in order, one group per write: values split into parts of
/// `part_bytes`, and every part the key has in the stream beyond its new value tombstoned,
/// however large the parts it was written in (`map` and `parts`: the partition as stored
/// before this commit).
pub fn encode(
    names: &Names,
    part_bytes: usize,
    map: &BTreeMap<Bytes, Bytes>,
    parts: &Parts,
    ops: &[Op],
) -> Encoded {
    struct Touched {
        /// Stored before the commit.
        before: usize,
        /// As the commit's writes so far leave it.
        now: usize,
        most: usize,
    }
    let mut writes = Vec::with_capacity(ops.len());
    let tombstone = || {
        let mut h = HeaderMap::new();
        h.insert(DEL, "1");
        h.insert("Nats-TTL", "1m");
        h
    };
    // Several writes of one key in one commit: each tombstones what the one before left.
    let mut touched: HashMap<&[u8], Touched> = HashMap::new();
    for op in ops {
        let key = match op {
            Op::Put(k, _) | Op::Del(k) => k.as_slice(),
        };
        let mut write = Vec::new();
        let entry = touched.entry(key).or_insert_with(|| {
            let n = stored_parts(map, parts, key);
            Touched {
                before: n,
                now: n,
                most: 0,
            }
        });
        let old_parts = entry.now;
        let new_parts = match op {
            Op::Put(_, value) => {
                let chunks: Vec<&[u8]> = if value.is_empty() {
                    vec![&[][..]]
                } else {
                    value.chunks(part_bytes).collect()
                };
                let n = chunks.len();
                for (i, chunk) in chunks.into_iter().enumerate() {
                    let mut h = HeaderMap::new();
                    if i == 0 && n > 1 {
                        h.insert(PARTS, n.to_string().as_str());
                    }
                    write.push((names.key_subject(key, i), h, Bytes::copy_from_slice(chunk)));
                }
                n
            }
            Op::Del(_) => 0,
        };
        for part in new_parts..old_parts {
            write.push((names.key_subject(key, part), tombstone(), Bytes::new()));
        }
        entry.now = new_parts;
        entry.most = entry.most.max(new_parts);
        writes.push(write);
    }
    let parts = touched
        .into_iter()
        .filter(|(_, t)| t.before > 1 || t.most > 1)
        .map(|(key, t)| PartsChange {
            key: Bytes::copy_from_slice(key),
            after: t.now,
            most: t.most,
        })
        .collect();
    Encoded { writes, parts }
}

/// Records in `parts` what a commit did: exactly once all of its batches are stored. If it
/// failed, some of them may have been stored (or all, with the answer lost), so each key
/// keeps the most that any prefix of the commit leaves it: a count too high only costs a
/// tombstone on a subject that holds nothing, one too low would leave parts no later write
/// tombstones. (The writer commits the failed writes again, first, so the next successful
/// commit sets them exactly.)
pub fn update_parts(parts: &mut Parts, changes: Vec<PartsChange>, stored: bool) {
    for change in changes {
        let n = if stored {
            change.after
        } else {
            parts
                .get(&change.key)
                .copied()
                .unwrap_or(0)
                .max(change.most)
        };
        if n > 1 {
            parts.insert(change.key, n);
        } else if stored {
            parts.remove(&change.key);
        }
    }
}

/// Reads every key of the partition (values reassembled from their parts) and how many part
/// subjects each has, up to sequence `last`, the stream's last when the take-over began.
/// Every message is read (the `commit` and `owner` ones too) because the last one is always
/// one of those two, never expired nor replaced while it is the last: reading up to it reads
/// everything.
pub async fn load(
    stream: &stream::Stream,
    names: &Names,
    last: u64,
) -> Result<(BTreeMap<Bytes, Bytes>, Parts), StoreError> {
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("{}.>", names.root),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| backend("reading", names, e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| backend("reading", names, e))?;
    let mut read = Reader::default();
    loop {
        let next = tokio::time::timeout(COMMIT_TIMEOUT, messages.next()).await;
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(backend("reading", names, e)),
            // Never a partial read: what is missing could be an acknowledged edit.
            Ok(None) | Err(_) => {
                return Err(backend(
                    "reading",
                    names,
                    format!("the stream ended before sequence {last}"),
                ))
            }
        };
        let sequence = message
            .info()
            .map_err(|e| backend("reading", names, e))?
            .stream_sequence;
        read.add(
            names,
            &message.subject,
            message.headers.as_ref(),
            &message.payload,
        );
        if sequence >= last {
            break;
        }
    }
    read.finish(names)
}

/// The values of a partition, as its messages are read.
#[derive(Default)]
pub struct Reader {
    /// Per key: its parts read, each with the part count its first part says.
    parts: BTreeMap<Vec<u8>, BTreeMap<usize, (Bytes, usize)>>,
}

impl Reader {
    /// One message of the stream (others than keys' are ignored).
    pub fn add(
        &mut self,
        names: &Names,
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) {
        let Some((key, part)) = names.parse(subject) else {
            return;
        };
        if headers.is_some_and(|h| h.get(DEL).is_some()) {
            // A tombstone: the last message of its subject, so nothing older of it is here.
            return;
        }
        let count = headers
            .and_then(|h| h.get(PARTS))
            .and_then(|v| v.as_str().parse().ok())
            .unwrap_or(1);
        self.parts
            .entry(key)
            .or_default()
            .insert(part, (payload.clone(), count));
    }

    /// The map (every key whose first part is there, its parts joined) and the part
    /// subjects of the keys that have more than one.
    pub fn finish(self, names: &Names) -> Result<(BTreeMap<Bytes, Bytes>, Parts), StoreError> {
        let mut map = BTreeMap::new();
        let mut parts = Parts::new();
        for (key, pieces) in self.parts {
            // Every part subject holding a value counts, also those beyond the count its first
            // part gives and those of no value at all: an older version tombstoned parts by the
            // part size of the day, and left some behind when max_payload changed. Counted,
            // they are tombstoned at the key's next write.
            let present = pieces.keys().next_back().map_or(0, |last| last + 1);
            if present > 1 {
                parts.insert(Bytes::from(key.clone()), present);
            }
            // Parts beyond a shorter value that replaced a longer one are tombstones; leftover
            // parts without a first part belong to no value.
            let Some((_, count)) = pieces.get(&0).cloned() else {
                continue;
            };
            let mut value = Vec::new();
            for i in 0..count {
                let Some((piece, _)) = pieces.get(&i) else {
                    return Err(StoreError::Corrupt {
                        key: names.key_subject(&key, i),
                        detail: format!("part {i} of {count} is missing"),
                    });
                };
                value.extend_from_slice(piece);
            }
            map.insert(Bytes::from(key), Bytes::from(value));
        }
        Ok((map, parts))
    }
}

#[cfg(test)]
#[path = "nats_layout_tests.rs"]
mod tests;
