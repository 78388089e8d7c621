//! The queue's layout on its storage medium ([`Kv`]: sled, or JetStream in the cluster mode):
//! keys, encoding, and the reads built on them.
//!
//! # On-disk layout
//! One ordered map, so that a group commit is one atomic batch. Edits are not stored one key
//! each: a group commit writes its new edits as a few *records*
//! of up to [`RECORD_BODY_BYTES`] of bodies, so a million pending edits need tens of thousands
//! of keys, not millions, and each commit costs sled a handful of inserts whatever its size.
//! Keys are a one-byte prefix and a big-endian number, so each prefix scans in order:
//!
//! | key              | value                                                        |
//! |------------------|--------------------------------------------------------------|
//! | `h` + record     | the record's entry headers ([`encode_header`]), in entry order |
//! | `b` + record     | the record's bodies, concatenated in entry order             |
//! | `x` + record     | done bitmap: bit *i* set when entry *i* no longer counts     |
//! | `d` + job id     | [`DeadRecord`] as JSON                                       |
//! | `e` + job id     | a dead letter's 8-byte BE ack time (ms), then its body        |
//! | `m` `next_seq`   | the next job id, 8-byte BE                                   |
//! | `r` + name       | what is remembered of a message ([`RefRecord`]) as JSON       |
//!
//! An entry is a job's complete state (ids, times, retry state, body). A job's state never
//! changes in place: a coalesced edit or a retry writes a new entry and sets the old entry's
//! done bit *in the same batch*, so at most one live entry per job exists after any commit.
//! A record is deleted (all three keys) in the commit that marks its last entry done. Which
//! bits to set and which records to delete is decided by `queue::ledger`; this module only
//! encodes, decodes and writes. Headers are kept apart from bodies so that recovery reads
//! only the headers (about 12 bytes an edit besides its ids).
//!
//! Databases written by earlier versions (`j` + id header, `c` + id content) are converted at
//! open: see [`Store::v1_jobs`].

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use super::entry::{encode_header, entries, EntryRef, JobHeader, JobOp, Malformed};
use super::kv::{Commit, Kv};
pub use super::kv::{Op, StoreError};
use super::refs::RefRecord;

/// Bodies per record before it is sealed and a new one started. Small enough that sled keeps
/// a record inline in its log (it moves values over ~128 KiB with their node to blob files,
/// each an extra file to sync), large enough that a busy commit is a few inserts.
pub const RECORD_BODY_BYTES: usize = 7 * 1024;

/// A job that can never succeed, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadRecord {
    pub header: JobHeader,
    /// When it was dead-lettered (unix ms).
    pub dead_ms: u64,
    /// Why: `rejected` (Zoom refused it), `expired` (failing longer than `max_age`) or
    /// `outcome_unknown` (a send that may have been posted; `delivery.send_in_doubt`).
    pub reason: String,
    /// Zoom's HTTP status, if Zoom answered.
    pub status: Option<u16>,
    /// Zoom's error code, if its body had one.
    pub zoom_code: Option<i64>,
    /// Zoom's error message, or a description of the last failure.
    pub detail: String,
    /// The call that failed: `send`, `edit` or `delete` (none in dead letters written before
    /// there were other calls than edits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
}

impl From<Malformed> for StoreError {
    fn from(malformed: Malformed) -> StoreError {
        corrupt(
            HEADERS,
            malformed.record,
            "truncated or malformed entry header",
        )
    }
}

pub const HEADERS: u8 = b'h';
pub const BODIES: u8 = b'b';
pub const DONE: u8 = b'x';
pub const DEAD: u8 = b'd';
pub const DEAD_BODY: u8 = b'e';
pub const REFS: u8 = b'r';
const NEXT_SEQ_KEY: &[u8] = b"mnext_seq";
/// Keys of the layout before records (one header and one content key per job).
const V1_JOB: u8 = b'j';
const V1_CONTENT: u8 = b'c';

/// The writes that delete an old-layout job.
pub fn v1_deletes(seq: u64) -> [Op; 2] {
    [Op::Del(key(V1_JOB, seq)), Op::Del(key(V1_CONTENT, seq))]
}

pub fn key(prefix: u8, n: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(prefix);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

fn number_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(&key[1..])
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            key: format!("{key:?}"),
            detail: "key is not a prefix and an 8-byte number".into(),
        })
}

pub(super) fn corrupt(prefix: u8, n: u64, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        key: format!("{}{n}", prefix as char),
        detail: detail.into(),
    }
}

pub fn put_json<T: Serialize>(prefix: u8, seq: u64, value: &T) -> Op {
    Op::Put(
        key(prefix, seq),
        serde_json::to_vec(value).expect("records always serialize"),
    )
}

pub fn put_dead_body(seq: u64, updated_ms: u64, body: &[u8]) -> Op {
    let mut value = Vec::with_capacity(8 + body.len());
    value.extend_from_slice(&updated_ms.to_be_bytes());
    value.extend_from_slice(body);
    Op::Put(key(DEAD_BODY, seq), value)
}

pub fn put_ref(record: &RefRecord) -> Op {
    Op::Put(
        ref_key(&record.name),
        serde_json::to_vec(record).expect("records always serialize"),
    )
}

pub fn del_ref(name: &str) -> Op {
    Op::Del(ref_key(name))
}

fn ref_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(REFS);
    key.extend_from_slice(name.as_bytes());
    key
}

pub fn put_next_seq(next_seq: u64) -> Op {
    Op::Put(NEXT_SEQ_KEY.to_vec(), next_seq.to_be_bytes().to_vec())
}

/// A stored record's headers and done bitmap, as recovery reads them.
pub struct StoredRecord {
    pub record: u64,
    pub headers: Bytes,
    pub done: Option<Bytes>,
}

/// A claimed job as read back from its record.
pub struct Loaded {
    pub seq: u64,
    pub header: JobHeader,
    pub updated_ms: u64,
    pub body: Vec<u8>,
}

/// A read handle on the queue's storage; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
}

/// The write side, owned by the queue's single writer thread.
pub type Committer = Box<dyn Commit>;

impl Store {
    pub fn new(kv: Arc<dyn Kv>) -> Store {
        Store { kv }
    }
}

impl Store {
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(match self.kv.get(NEXT_SEQ_KEY)? {
            Some(value) => {
                u64::from_be_bytes(value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "next_seq".into(),
                    detail: "not 8 bytes".into(),
                })?)
            }
            None => 1,
        })
    }

    /// Every stored record's headers and done bitmap, in record order. Reads only the `h` and
    /// `x` keys, never a body.
    pub fn records(&self) -> impl Iterator<Item = Result<StoredRecord, StoreError>> + '_ {
        self.kv.scan_prefix(&[HEADERS]).map(move |item| {
            let (k, headers) = item?;
            let record = number_of(&k)?;
            let done = self.kv.get(&key(DONE, record))?;
            Ok(StoredRecord {
                record,
                headers,
                done,
            })
        })
    }

    /// The highest record number stored, if any (a seek, not a scan).
    pub fn last_record(&self) -> Result<Option<u64>, StoreError> {
        match self.kv.last_key(&[HEADERS])? {
            Some(k) => Ok(Some(number_of(&k)?)),
            None => Ok(None),
        }
    }

    /// The header, ack time and body of entry `index` of `record`.
    pub fn load(&self, record: u64, index: u32) -> Result<Option<Loaded>, StoreError> {
        let Some(headers) = self.kv.get(&key(HEADERS, record))? else {
            return Ok(None);
        };
        let Some((entry, offset)) = entries(record, &headers).nth(index as usize).transpose()?
        else {
            return Ok(None);
        };
        let Some(bodies) = self.kv.get(&key(BODIES, record))? else {
            return Err(corrupt(BODIES, record, "record has headers but no bodies"));
        };
        let start = offset as usize;
        let end = start + entry.body_len as usize;
        let Some(body) = bodies.get(start..end) else {
            return Err(corrupt(BODIES, record, "shorter than its headers say"));
        };
        Ok(Some(Loaded {
            seq: entry.seq,
            header: entry.header(),
            updated_ms: entry.updated_ms,
            body: body.to_vec(),
        }))
    }

    /// The enqueue time of every entry of `record`, in entry order (one read, no body).
    pub fn enqueue_times(&self, record: u64) -> Result<Option<Vec<u64>>, StoreError> {
        let Some(headers) = self.kv.get(&key(HEADERS, record))? else {
            return Ok(None);
        };
        let times = entries(record, &headers).map(|e| e.map(|(entry, _)| entry.enqueued_ms));
        Ok(Some(times.collect::<Result<_, _>>()?))
    }

    pub fn dead(&self, seq: u64) -> Result<Option<DeadRecord>, StoreError> {
        self.get_json(DEAD, seq)
    }

    /// A dead letter's ack time and body.
    pub fn dead_body(&self, seq: u64) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(match self.kv.get(&key(DEAD_BODY, seq))? {
            Some(value) if value.len() >= 8 => {
                let updated_ms = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
                Some((updated_ms, value[8..].to_vec()))
            }
            Some(_) => return Err(corrupt(DEAD_BODY, seq, "shorter than its timestamp")),
            None => None,
        })
    }

    /// Dead letters in job-id order.
    pub fn dead_records(&self) -> impl Iterator<Item = Result<(u64, DeadRecord), StoreError>> + '_ {
        self.kv.scan_prefix(&[DEAD]).map(|item| {
            let (k, v) = item?;
            let seq = number_of(&k)?;
            let record =
                serde_json::from_slice(&v).map_err(|e| corrupt(DEAD, seq, e.to_string()))?;
            Ok((seq, record))
        })
    }

    /// Every remembered message (see `queue::refs`).
    pub fn refs(&self) -> impl Iterator<Item = Result<RefRecord, StoreError>> + '_ {
        self.kv.scan_prefix(&[REFS]).map(|item| {
            let (k, v) = item?;
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                detail: e.to_string(),
            })
        })
    }

    /// The job ids of every dead letter.
    pub fn dead_seqs(&self) -> Result<std::collections::HashSet<u64>, StoreError> {
        let mut seqs = std::collections::HashSet::new();
        for item in self.kv.scan_prefix(&[DEAD]) {
            seqs.insert(number_of(&item?.0)?);
        }
        Ok(seqs)
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.kv.size_on_disk()
    }

    /// Jobs of a database written before records existed (`j` + id header, `c` + id
    /// content), in job-id order: header, ack time and body. `LocalQueue::open` appends them to
    /// records and deletes the old keys ([`v1_deletes`]) in the same commit, so a crash midway
    /// leaves each job in exactly one layout.
    pub fn v1_jobs(
        &self,
    ) -> impl Iterator<Item = Result<(u64, JobHeader, u64, Vec<u8>), StoreError>> + '_ {
        self.kv.scan_prefix(&[V1_JOB]).map(move |item| {
            let (k, v) = item?;
            let seq = number_of(&k)?;
            let header: JobHeader =
                serde_json::from_slice(&v).map_err(|e| corrupt(V1_JOB, seq, e.to_string()))?;
            let content = self
                .kv
                .get(&key(V1_CONTENT, seq))?
                .filter(|c| c.len() >= 8)
                .ok_or_else(|| corrupt(V1_CONTENT, seq, "missing or shorter than 8 bytes"))?;
            let updated_ms = u64::from_be_bytes(content[..8].try_into().expect("8 bytes"));
            Ok((seq, header, updated_ms, content[8..].to_vec()))
        })
    }

    /// Moves the bodies of dead letters written before records existed from `c` + id to
    /// `e` + id (the value keeps its form).
    pub fn v1_dead_bodies(&self) -> Result<Vec<Op>, StoreError> {
        let mut ops = Vec::new();
        for item in self.kv.scan_prefix(&[DEAD]) {
            let seq = number_of(&item?.0)?;
            if let Some(content) = self.kv.get(&key(V1_CONTENT, seq))? {
                ops.push(Op::Del(key(V1_CONTENT, seq)));
                ops.push(Op::Put(key(DEAD_BODY, seq), content.to_vec()));
            }
        }
        Ok(ops)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: u8,
        seq: u64,
    ) -> Result<Option<T>, StoreError> {
        match self.kv.get(&key(prefix, seq))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| corrupt(prefix, seq, e.to_string())),
            None => Ok(None),
        }
    }
}

/// Writes jobs and a dead letter in the layout of earlier versions, to test the conversion.
#[cfg(test)]
pub fn write_v1(
    path: &std::path::Path,
    jobs: &[(u64, JobHeader, &str)],
    dead: &[(u64, DeadRecord, &str)],
) -> Result<(), StoreError> {
    let (_, mut commit) = super::sled_kv::open_for_test(path)?;
    let content = |body: &str| [&7u64.to_be_bytes()[..], body.as_bytes()].concat();
    let mut ops = Vec::new();
    for (seq, header, body) in jobs {
        ops.push(Op::Put(
            key(V1_JOB, *seq),
            serde_json::to_vec(header).expect("json"),
        ));
        ops.push(Op::Put(key(V1_CONTENT, *seq), content(body)));
    }
    for (seq, record, body) in dead {
        ops.push(Op::Put(
            key(DEAD, *seq),
            serde_json::to_vec(record).expect("json"),
        ));
        ops.push(Op::Put(key(V1_CONTENT, *seq), content(body)));
    }
    let last = jobs
        .iter()
        .map(|j| j.0)
        .chain(dead.iter().map(|d| d.0))
        .max();
    let last = last.unwrap_or(0);
    ops.push(Op::Put(
        NEXT_SEQ_KEY.to_vec(),
        (last + 1).to_be_bytes().to_vec(),
    ));
    commit.commit(&ops)
}
