//! Property test of the record layout ([`Ledger`]) against a model: a set of live entries.
//! proptest drives random appends (with bodies large enough to seal records midway), retire
//! steps, commits and crashes. Each commit applies the ledger's writes to an in-memory stand-in
//! for sled, decoded with the store's own encoding. After every commit the disk must hold
//! exactly the live entries (no record without a live entry, nothing live missing, bodies
//! intact); a crash throws away everything not committed and rebuilds the ledger from the disk
//! the way `LocalQueue::open` does, and the model falls back to what was committed.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::ledger::{is_done, Ledger, Loc};
use super::store::{entries, key, EntryRef, JobOp, Op, BODIES, DONE, HEADERS, RECORD_BODY_BYTES};

#[derive(Debug, Clone)]
enum Step {
    /// Appends an entry with a body of this many bytes.
    Append(usize),
    /// Retires the `pick`-th live entry (modulo their number).
    Retire(usize),
    /// Retires the `pick`-th live entry and appends its successor (a coalesced edit or a
    /// retry: the same job, a new entry, in the same commit).
    Rewrite(usize, usize),
    Commit,
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop_oneof![1..200usize, 4_000..20_000usize].prop_map(Step::Append),
        4 => any::<usize>().prop_map(Step::Retire),
        2 => (any::<usize>(), 1..3_000usize).prop_map(|(p, n)| Step::Rewrite(p, n)),
        3 => Just(Step::Commit),
        1 => Just(Step::Crash),
    ]
}

type Disk = BTreeMap<Vec<u8>, Vec<u8>>;

fn body_of(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize + i) as u8).collect()
}

struct Harness {
    ledger: Ledger,
    disk: Disk,
    next_id: u64,
    /// Live entries: id → (where, body length).
    live: BTreeMap<u64, (Loc, usize)>,
    /// Live entries as of the last commit.
    committed: BTreeMap<u64, usize>,
}

impl Harness {
    fn append(&mut self, len: usize) {
        let id = self.next_id;
        self.next_id += 1;
        let body = body_of(id, len);
        let entry = EntryRef {
            seq: id,
            enqueued_ms: id,
            updated_ms: id + 1,
            attempts: 0,
            next_attempt_ms: 0,
            first_failure_ms: None,
            op: JobOp::Content,
            message_id: "m",
            account_id: "a",
            body_len: len as u32,
        };
        let loc = self.ledger.append(&entry, &body);
        self.live.insert(id, (loc, len));
    }

    fn retire(&mut self, pick: usize) -> bool {
        if self.live.is_empty() {
            return false;
        }
        let id = *self
            .live
            .keys()
            .nth(pick % self.live.len())
            .expect("in range");
        let (loc, _) = self.live.remove(&id).expect("live");
        self.ledger.done(loc);
        true
    }

    fn commit(&mut self) {
        for op in self.ledger.take() {
            match op {
                Op::Put(k, v) => self.disk.insert(k, v),
                Op::Del(k) => self.disk.remove(&k),
            };
        }
        self.committed = self.live.iter().map(|(id, (_, len))| (*id, *len)).collect();
        self.check_disk();
    }

    /// What the disk holds: live entries by id, with their place and body.
    fn stored(&self) -> BTreeMap<u64, (Loc, Vec<u8>)> {
        let mut found = BTreeMap::new();
        for (k, headers) in self.disk.range(vec![HEADERS]..vec![HEADERS + 1]) {
            let record = u64::from_be_bytes(k[1..].try_into().unwrap());
            let bodies = self
                .disk
                .get(&key(BODIES, record))
                .expect("bodies beside headers");
            let done = self.disk.get(&key(DONE, record)).map(Vec::as_slice);
            for (index, item) in entries(record, headers).enumerate() {
                let (entry, offset) = item.expect("decodes");
                if is_done(done, index as u32) {
                    continue;
                }
                let start = offset as usize;
                let body = bodies[start..start + entry.body_len as usize].to_vec();
                let loc = Loc {
                    record,
                    index: index as u32,
                };
                assert!(
                    found.insert(entry.seq, (loc, body)).is_none(),
                    "entry {} is live twice",
                    entry.seq
                );
            }
        }
        found
    }

    fn check_disk(&self) {
        let stored = self.stored();
        let ids: BTreeSet<u64> = stored.keys().copied().collect();
        let expected: BTreeSet<u64> = self.committed.keys().copied().collect();
        assert_eq!(
            ids, expected,
            "the disk holds exactly the committed live entries"
        );
        for (id, (_, body)) in &stored {
            assert_eq!(body, &body_of(*id, self.committed[id]), "body of {id}");
        }
        // No record without a live entry, no bitmap or bodies without headers.
        let records: BTreeSet<u64> = stored.values().map(|(loc, _)| loc.record).collect();
        for k in self.disk.keys() {
            let record = u64::from_be_bytes(k[1..].try_into().unwrap());
            assert!(
                records.contains(&record),
                "{} key of record {record} kept without a live entry",
                k[0] as char
            );
        }
    }

    fn crash(&mut self) {
        let mut ledger = Ledger::new(1);
        let mut by_record: BTreeMap<u64, u32> = BTreeMap::new();
        for (k, headers) in self.disk.range(vec![HEADERS]..vec![HEADERS + 1]) {
            let record = u64::from_be_bytes(k[1..].try_into().unwrap());
            by_record.insert(record, entries(record, headers).count() as u32);
        }
        for (record, count) in by_record {
            let done = self.disk.get(&key(DONE, record)).map(Vec::as_slice);
            ledger.restore(record, count, done);
        }
        self.ledger = ledger;
        self.live = self
            .stored()
            .into_iter()
            .map(|(id, (loc, body))| (id, (loc, body.len())))
            .collect();
        let lens: BTreeMap<u64, usize> = self.live.iter().map(|(i, (_, n))| (*i, *n)).collect();
        assert_eq!(lens, self.committed, "recovered exactly what was committed");
    }
}

proptest! {
    #[test]
    fn disk_holds_exactly_the_live_entries(steps in proptest::collection::vec(step(), 1..120)) {
        let mut h = Harness {
            ledger: Ledger::new(1),
            disk: Disk::new(),
            next_id: 1,
            live: BTreeMap::new(),
            committed: BTreeMap::new(),
        };
        for step in &steps {
            match step {
                Step::Append(len) => h.append(*len),
                Step::Retire(pick) => {
                    h.retire(*pick);
                }
                Step::Rewrite(pick, len) => {
                    if h.retire(*pick) {
                        h.append(*len);
                    }
                }
                Step::Commit => h.commit(),
                Step::Crash => h.crash(),
            }
        }
        // Drained: once everything is retired and committed, nothing is left on disk.
        while h.retire(0) {}
        h.commit();
        prop_assert!(h.disk.is_empty(), "disk left: {:?}", h.disk.keys().collect::<Vec<_>>());
        prop_assert_eq!(h.ledger.records(), 0);
    }
}

#[test]
fn a_busy_commit_is_a_few_records() {
    let mut ledger = Ledger::new(1);
    for id in 0..1_000u64 {
        let body = body_of(id, 1_100);
        let entry = EntryRef {
            seq: id,
            enqueued_ms: 0,
            updated_ms: 0,
            attempts: 0,
            next_attempt_ms: 0,
            first_failure_ms: None,
            op: JobOp::Content,
            message_id: "message",
            account_id: "account",
            body_len: body.len() as u32,
        };
        ledger.append(&entry, &body);
    }
    let ops = ledger.take();
    // A record is sealed by the entry that takes its bodies to RECORD_BODY_BYTES or beyond.
    let per_record = RECORD_BODY_BYTES.div_ceil(1_100);
    let records = 1_000usize.div_ceil(per_record);
    assert!(records < 200, "{records} records for 1,000 edits");
    assert_eq!(ops.len(), 2 * records, "two keys a record, none an edit");
}
