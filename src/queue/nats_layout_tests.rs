//! The layout's read-back property: what is committed (in parts of any size, through failed and
//! retried commits and take-overs) is what a take-over reads, and no part is left behind.

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
