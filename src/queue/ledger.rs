//! Which stored entries still count, and what a group commit must write for that to be true
//! on disk. Pure bookkeeping, no I/O: the queue appends entries and marks old ones done under
//! its lock; the writer thread takes the resulting writes ([`Ledger::take`]) and commits them as
//! one batch. Property-tested against a model in `ledger_tests.rs`, crashes included.
//!
//! Entries are appended to the *open* record; it is sealed when its bodies reach
//! [`RECORD_BODY_BYTES`](super::store::RECORD_BODY_BYTES) and at every take, so each commit
//! writes a few records whatever its size. For each record with a live entry the ledger keeps
//! its entry count, live count and done bitmap (a few dozen bytes a record, not a few per
//! edit). A take writes, in one batch: the records sealed since the last take, the bitmaps
//! that changed, and the deletion of every record whose last live entry was marked done.
//!
//! **Invariant:** after any take, what the store holds is exactly the live entries: a record
//! is on disk iff it has a live entry, and an entry of a stored record is live iff its done bit
//! is clear. Hence disk use follows the backlog: a record is reclaimed in the very commit that
//! retires its last entry.

use std::collections::{BTreeMap, BTreeSet};

use super::store::{encode_header, key, EntryRef, Op, BODIES, DONE, HEADERS, RECORD_BODY_BYTES};

pub use super::entry::Loc;

#[derive(Debug, Default)]
struct Record {
    entries: u32,
    live: u32,
    /// Bit `i` set: entry `i` is done. Empty until the first entry is done.
    done: Vec<u8>,
}

impl Record {
    fn set_done(&mut self, index: u32) -> bool {
        let (byte, bit) = ((index / 8) as usize, 1u8 << (index % 8));
        if self.done.len() <= byte {
            self.done.resize(byte + 1, 0);
        }
        let newly = self.done[byte] & bit == 0;
        self.done[byte] |= bit;
        newly
    }
}

/// Whether entry `index` is marked in a stored done bitmap.
pub fn is_done(bitmap: Option<&[u8]>, index: u32) -> bool {
    bitmap
        .and_then(|b| b.get((index / 8) as usize))
        .is_some_and(|byte| byte & (1u8 << (index % 8)) != 0)
}

#[derive(Debug, Default)]
struct Open {
    headers: Vec<u8>,
    bodies: Vec<u8>,
    entries: u32,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The number of the open record.
    open_record: u64,
    open: Open,
    /// Records sealed since the last take: number, headers, bodies.
    sealed: Vec<(u64, Vec<u8>, Vec<u8>)>,
    /// Every record with a live entry, stored or not yet taken.
    records: BTreeMap<u64, Record>,
    /// Records whose done bits changed since the last take.
    dirty: BTreeSet<u64>,
}

impl Ledger {
    /// A ledger whose first record will be `next_record`.
    pub fn new(next_record: u64) -> Ledger {
        Ledger {
            open_record: next_record,
            ..Ledger::default()
        }
    }

    /// Registers a stored record found at recovery, `entries` long, with its done bitmap.
    /// Records must be restored in increasing order, before anything is appended.
    pub fn restore(&mut self, record: u64, entries: u32, done: Option<&[u8]>) {
        let live = (0..entries).filter(|&i| !is_done(done, i)).count() as u32;
        let mut stored = Record {
            entries,
            live,
            done: done.map(<[u8]>::to_vec).unwrap_or_default(),
        };
        stored.done.truncate(entries.div_ceil(8) as usize);
        self.records.insert(record, stored);
        if live == 0 {
            // Cannot be left by a take; clean it up if some older version left it.
            self.dirty.insert(record);
        }
        self.open_record = self.open_record.max(record + 1);
    }

    /// Appends a job's state and body to the open record.
    pub fn append(&mut self, entry: &EntryRef<'_>, body: &[u8]) -> Loc {
        debug_assert_eq!(entry.body_len as usize, body.len());
        let loc = Loc {
            record: self.open_record,
            index: self.open.entries,
        };
        encode_header(&mut self.open.headers, entry);
        self.open.bodies.extend_from_slice(body);
        self.open.entries += 1;
        let record = self.records.entry(loc.record).or_default();
        record.entries += 1;
        record.live += 1;
        if self.open.bodies.len() >= RECORD_BODY_BYTES {
            self.seal();
        }
        loc
    }

    /// The entry at `loc` no longer counts (delivered, superseded, rewritten elsewhere, dead).
    /// Marking an entry twice, or one of a record already reclaimed, changes nothing.
    pub fn done(&mut self, loc: Loc) {
        let Some(record) = self.records.get_mut(&loc.record) else {
            return;
        };
        if loc.index < record.entries && record.set_done(loc.index) {
            record.live -= 1;
            self.dirty.insert(loc.record);
        }
    }

    /// Whether a take would write anything.
    pub fn has_changes(&self) -> bool {
        self.open.entries > 0 || !self.sealed.is_empty() || !self.dirty.is_empty()
    }

    /// Records on disk or about to be.
    pub fn records(&self) -> usize {
        self.records.len()
    }

    /// The lowest record with a live entry and the indexes of its live entries.
    pub fn oldest(&self) -> Option<(u64, Vec<u32>)> {
        let (&n, record) = self.records.iter().find(|(_, r)| r.live > 0)?;
        let live = (0..record.entries)
            .filter(|&i| !is_done(Some(&record.done), i))
            .collect();
        Some((n, live))
    }

    fn seal(&mut self) {
        if self.open.entries == 0 {
            return;
        }
        let open = std::mem::take(&mut self.open);
        self.sealed
            .push((self.open_record, open.headers, open.bodies));
        self.open_record += 1;
    }

    /// Seals the open record and returns every write needed since the last take, in an order
    /// that is also correct when applied one by one (new records before bitmaps and deletes).
    pub fn take(&mut self) -> Vec<Op> {
        self.seal();
        let mut ops = Vec::new();
        for (n, headers, bodies) in std::mem::take(&mut self.sealed) {
            let live = self.records.get(&n).map_or(0, |r| r.live);
            if live == 0 {
                // Every entry was retired before it reached the disk: never write it.
                self.records.remove(&n);
                self.dirty.remove(&n);
                continue;
            }
            ops.push(Op::Put(key(HEADERS, n), headers));
            ops.push(Op::Put(key(BODIES, n), bodies));
        }
        for n in std::mem::take(&mut self.dirty) {
            let Some(record) = self.records.get(&n) else {
                continue;
            };
            if record.live == 0 {
                ops.push(Op::Del(key(HEADERS, n)));
                ops.push(Op::Del(key(BODIES, n)));
                ops.push(Op::Del(key(DONE, n)));
                self.records.remove(&n);
            } else {
                ops.push(Op::Put(key(DONE, n), record.done.clone()));
            }
        }
        ops
    }
}
