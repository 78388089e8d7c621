//! How a partition's ordered map is written as JetStream messages and read back: the
//! subjects of keys, values split into parts, tombstones (the table is in `nats_kv.rs`).

use std::collections::BTreeMap;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::kv::{Op, StoreError};
use super::nats_kv::{backend, COMMIT_TIMEOUT};

/// A header of a tombstone: the key is deleted.
const DEL: &str = "Zoomq-Del";
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

    fn key_subject(&self, key: &[u8], part: usize) -> String {
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

/// The messages that write `ops`, in order, one group per write (values split into parts where needed; older
/// parts beyond the new value's deleted).
pub fn encode(
    names: &Names,
    part_bytes: usize,
    map: &BTreeMap<Bytes, Bytes>,
    ops: &[Op],
) -> Vec<Vec<Message>> {
    let mut out = Vec::with_capacity(ops.len());
    let tombstone = || {
        let mut h = HeaderMap::new();
        h.insert(DEL, "1");
        h.insert("Nats-TTL", "1m");
        h
    };
    // Parts of each key as committed so far in this batch (values of earlier ops count).
    let mut parts_now: std::collections::HashMap<&[u8], usize> = Default::default();
    for op in ops {
        let key = match op {
            Op::Put(k, _) | Op::Del(k) => k.as_slice(),
        };
        let mut write = Vec::new();
        let old_parts = *parts_now.entry(key).or_insert_with(|| {
            map.get(key)
                .map_or(0, |v| v.len().div_ceil(part_bytes).max(1))
        });
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
        parts_now.insert(key, new_parts);
        out.push(write);
    }
    out
}

/// Reads every key of the partition (values reassembled from their parts), up to sequence
/// `last`, the stream's last when the take-over began. Every message is read (the `commit`
/// and `owner` ones too) because the last one is always one of those two, never expired nor
/// replaced while it is the last: reading up to it reads everything.
pub async fn load(
    stream: &stream::Stream,
    names: &Names,
    last: u64,
) -> Result<BTreeMap<Bytes, Bytes>, StoreError> {
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

    /// The map: every key whose first part is there, its parts joined.
    pub fn finish(self, names: &Names) -> Result<BTreeMap<Bytes, Bytes>, StoreError> {
        let mut map = BTreeMap::new();
        for (key, pieces) in self.parts {
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
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        let key = (0u8..6).prop_map(|k| vec![b'k', k]);
        prop_oneof![
            3 => (key.clone(), 0usize..40).prop_map(|(k, n)| Op::Put(k, vec![n as u8; n])),
            1 => key.prop_map(Op::Del),
        ]
    }

    proptest! {
        /// Whatever the commits (values of any size, split in parts of 8 bytes, replaced by
        /// longer or shorter ones, deleted, several ops of one key in one commit), what a new
        /// owner reads back from the stream's last message per subject is the map the
        /// commits made, whether or not expired tombstones are still there.
        #[test]
        fn what_is_read_back_is_what_was_committed(
            commits in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..12),
            expire in any::<bool>(),
        ) {
            let names = Names::new("zq", 3);
            let mut model: BTreeMap<Bytes, Bytes> = BTreeMap::new();
            // The stream: one message per subject, the last written.
            let mut stream: BTreeMap<String, (HeaderMap, Bytes)> = BTreeMap::new();
            for ops in &commits {
                for (subject, headers, payload) in encode(&names, 8, &model, ops).into_iter().flatten() {
                    stream.insert(subject, (headers, payload));
                }
                for op in ops {
                    match op {
                        Op::Put(k, v) => {
                            model.insert(Bytes::copy_from_slice(k), Bytes::copy_from_slice(v));
                        }
                        Op::Del(k) => {
                            model.remove(k.as_slice());
                        }
                    }
                }
            }
            if expire {
                stream.retain(|_, (h, _)| h.get(DEL).is_none());
            }
            let mut read = Reader::default();
            for (subject, (headers, payload)) in &stream {
                read.add(&names, subject, Some(headers), payload);
            }
            prop_assert_eq!(read.finish(&names).unwrap(), model);
        }
    }
}
