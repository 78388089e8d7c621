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
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A stream as JetStream keeps this one: one message per subject, the last written.
    type Stream = BTreeMap<String, (HeaderMap, Bytes)>;

    fn op() -> impl Strategy<Value = Op> {
        let key = (0u8..6).prop_map(|k| vec![b'k', k]);
        prop_oneof![
            3 => (key.clone(), 0usize..40).prop_map(|(k, n)| Op::Put(k, vec![n as u8; n])),
            1 => key.prop_map(Op::Del),
        ]
    }

    /// One commit of the property below.
    #[derive(Debug, Clone)]
    struct Step {
        ops: Vec<Op>,
        /// The part size of the owner making it (the servers' max_payload may change).
        part_bytes: usize,
        /// A new owner takes the partition over first: it reads the stream back.
        take_over: bool,
        /// A first attempt fails after this many of its writes were stored (all of them: its
        /// answer was lost); the writer then commits the same writes again.
        fails_after: Option<usize>,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            proptest::collection::vec(op(), 1..6),
            prop_oneof![Just(4usize), Just(8), Just(16)],
            proptest::bool::weighted(0.3),
            proptest::option::weighted(0.2, 0usize..8),
        )
            .prop_map(|(ops, part_bytes, take_over, fails_after)| Step {
                ops,
                part_bytes,
                take_over,
                fails_after,
            })
    }

    fn is_tombstone(headers: &HeaderMap) -> bool {
        headers.get(DEL).is_some()
    }

    fn publish(stream: &mut Stream, messages: impl IntoIterator<Item = Message>) {
        for (subject, headers, payload) in messages {
            stream.insert(subject, (headers, payload));
        }
    }

    fn read_back(names: &Names, stream: &Stream) -> (BTreeMap<Bytes, Bytes>, Parts) {
        let mut read = Reader::default();
        for (subject, (headers, payload)) in stream {
            read.add(names, subject, Some(headers), payload);
        }
        read.finish(names).unwrap()
    }

    fn apply(model: &mut BTreeMap<Bytes, Bytes>, ops: &[Op]) {
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

    fn tombstoned(encoded: &Encoded) -> Vec<String> {
        encoded
            .writes
            .iter()
            .flatten()
            .filter(|(_, h, _)| is_tombstone(h))
            .map(|(subject, _, _)| subject.clone())
            .collect()
    }

    fn key(k: &'static [u8]) -> Bytes {
        Bytes::from_static(k)
    }

    proptest! {
        /// Whatever the commits (values of any size, split in parts of 4, 8 or 16 bytes as
        /// the max_payload of the day allows, replaced by longer or shorter ones, deleted,
        /// several ops of one key in one commit, commits stored in part or whole with the
        /// answer lost and then made again, new owners reading the stream in between):
        /// - what a new owner reads back from the stream's last message per subject is the
        ///   map the commits made, whether or not expired tombstones are still there;
        /// - no part of a replaced or deleted value stays in the stream;
        /// - a tombstone lands only on a part that is there (in a commit stored at the first
        ///   attempt);
        /// - the part counts a new owner reads are those the last owner kept.
        #[test]
        fn what_is_read_back_is_what_was_committed(
            steps in proptest::collection::vec(step(), 1..12),
            expire in any::<bool>(),
        ) {
            let names = Names::new("zq", 3);
            let mut model: BTreeMap<Bytes, Bytes> = BTreeMap::new();
            let mut stream = Stream::new();
            let mut parts = Parts::new();
            for step in &steps {
                if step.take_over {
                    let (map, read) = read_back(&names, &stream);
                    prop_assert_eq!(&map, &model);
                    parts = read;
                }
                if let Some(stored) = step.fails_after {
                    let encoded = encode(&names, step.part_bytes, &model, &parts, &step.ops);
                    publish(&mut stream, encoded.writes.into_iter().take(stored).flatten());
                    update_parts(&mut parts, encoded.parts, false);
                }
                let encoded = encode(&names, step.part_bytes, &model, &parts, &step.ops);
                for (subject, headers, payload) in encoded.writes.into_iter().flatten() {
                    if is_tombstone(&headers) && step.fails_after.is_none() {
                        let holds = stream.get(&subject).is_some_and(|(h, _)| !is_tombstone(h));
                        prop_assert!(holds, "a tombstone on {}, which holds nothing", subject);
                    }
                    stream.insert(subject, (headers, payload));
                }
                update_parts(&mut parts, encoded.parts, true);
                apply(&mut model, &step.ops);
            }
            if expire {
                stream.retain(|_, (h, _)| !is_tombstone(h));
            }
            let (map, read) = read_back(&names, &stream);
            prop_assert_eq!(&map, &model);
            prop_assert_eq!(&read, &parts);
            for (subject, (headers, _)) in &stream {
                if is_tombstone(headers) {
                    continue;
                }
                let (key, part) = names.parse(subject).unwrap();
                let count = stream
                    .get(&names.key_subject(&key, 0))
                    .and_then(|(h, _)| h.get(PARTS))
                    .map_or(1, |n| n.as_str().parse::<usize>().unwrap());
                prop_assert!(
                    model.contains_key(key.as_slice()) && part < count,
                    "{} is left over",
                    subject
                );
            }
        }
    }

    /// A value written in small parts, written again after max_payload grew (its length
    /// in the new part size says one part): every older part is tombstoned. Then deleted
    /// after max_payload shrank back: only the one part it has is tombstoned.
    #[test]
    fn a_write_tombstones_the_parts_a_key_has_whatever_the_part_size() {
        let names = Names::new("zq", 3);
        let value = vec![7u8; 100];
        let put = [Op::Put(b"k".to_vec(), value.clone())];
        let mut parts = Parts::new();
        let first = encode(&names, 10, &BTreeMap::new(), &parts, &put);
        assert_eq!(first.writes[0].len(), 10);
        update_parts(&mut parts, first.parts, true);
        assert_eq!(parts, Parts::from([(key(b"k"), 10)]));

        let map = BTreeMap::from([(key(b"k"), Bytes::from(value))]);
        let second = encode(&names, 1000, &map, &parts, &put);
        let older: Vec<String> = (1..10).map(|i| names.key_subject(b"k", i)).collect();
        assert_eq!(tombstoned(&second), older);
        update_parts(&mut parts, second.parts, true);
        assert!(parts.is_empty(), "{parts:?}");

        let third = encode(&names, 10, &map, &parts, &[Op::Del(b"k".to_vec())]);
        assert_eq!(tombstoned(&third), [names.key_subject(b"k", 0)]);
        assert_eq!(third.writes[0].len(), 1);
    }

    /// Parts an older version left in the stream (it counted a value's parts by the part
    /// size of the day) are counted at the take-over and tombstoned at the key's next write:
    /// beyond a value (`a`), and of no value at all (`b`, whose first part was deleted).
    #[test]
    fn parts_left_behind_are_tombstoned_at_the_next_write() {
        let names = Names::new("zq", 3);
        let mut stream = Stream::new();
        let stored: [(&[u8], usize); 4] = [(b"a", 0), (b"a", 1), (b"a", 2), (b"b", 3)];
        for (k, part) in stored {
            stream.insert(
                names.key_subject(k, part),
                (HeaderMap::new(), Bytes::from_static(b"x")),
            );
        }
        let (map, mut parts) = read_back(&names, &stream);
        assert_eq!(map, BTreeMap::from([(key(b"a"), key(b"x"))]));
        assert_eq!(parts, Parts::from([(key(b"a"), 3), (key(b"b"), 4)]));
        let ops = [
            Op::Put(b"a".to_vec(), b"new".to_vec()),
            Op::Put(b"b".to_vec(), b"new".to_vec()),
        ];
        let encoded = encode(&names, 1024, &map, &parts, &ops);
        let stray: [(&[u8], usize); 5] = [(b"a", 1), (b"a", 2), (b"b", 1), (b"b", 2), (b"b", 3)];
        let expected: Vec<String> = stray
            .iter()
            .map(|(k, part)| names.key_subject(k, *part))
            .collect();
        assert_eq!(tombstoned(&encoded), expected);
        update_parts(&mut parts, encoded.parts, true);
        assert!(parts.is_empty(), "{parts:?}");
    }

    /// A commit that failed may have been stored in part, or whole: each of its keys keeps
    /// the most parts any prefix of it leaves, until a commit that is stored sets them.
    #[test]
    fn a_failed_commit_leaves_the_most_parts_it_may_have_written() {
        let names = Names::new("zq", 3);
        let map = BTreeMap::from([(key(b"k"), Bytes::from(vec![1u8; 30]))]);
        let mut parts = Parts::from([(key(b"k"), 3)]);
        let ops = [
            Op::Put(b"k".to_vec(), vec![2u8; 50]),
            Op::Put(b"k".to_vec(), vec![3u8; 5]),
            Op::Put(b"j".to_vec(), vec![4u8; 40]),
            Op::Del(b"j".to_vec()),
            Op::Put(b"i".to_vec(), vec![5u8; 5]),
        ];
        let encoded = encode(&names, 10, &map, &parts, &ops);
        update_parts(&mut parts, encoded.parts, false);
        assert_eq!(parts, Parts::from([(key(b"k"), 5), (key(b"j"), 4)]));
        let encoded = encode(&names, 10, &map, &parts, &ops);
        update_parts(&mut parts, encoded.parts, true);
        assert!(parts.is_empty(), "{parts:?}");
    }
}
