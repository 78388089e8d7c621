//! The on-disk form of the queue, and the only code that touches sled.
//!
//! # On-disk layout
//! One sled tree (the default one), so that a group commit is one atomic `apply_batch`.
//! Keys are a one-byte prefix and a big-endian job id, so each prefix scans in job-id order:
//!
//! | key              | value                                                   |
//! |------------------|---------------------------------------------------------|
//! | `j` + id         | [`JobHeader`] as JSON: message, account, times, retries |
//! | `c` + id         | 8-byte BE ack time (ms) of the latest content, then Zoom's request body |
//! | `d` + id         | [`DeadRecord`] as JSON (its body stays under `c` + id)  |
//! | `m` `next_seq`   | the next job id, 8-byte BE                              |
//!
//! A job is pending or in flight while `j`+id exists, dead while `d`+id exists; the two never
//! coexist. Headers are kept apart from bodies so that recovery reads only the small headers.
//!
//! # Durability
//! sled 0.34's `flush` writes its log with `sync_file_range`, which neither flushes the disk's
//! write cache nor persists the file's new size (sled issue 1452), and it writes large values
//! ("blobs") to their own files without any sync. [`Store::commit`] therefore follows every
//! flush with `fdatasync` of the log file and `fsync` of blob files created since the last
//! commit and of their directory. After `commit` returns, the batch survives power loss on a
//! disk that honours flushes.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Metadata of a pending or in-flight job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHeader {
    pub message_id: String,
    pub account_id: String,
    /// When the job was created: its place in line (unix ms).
    pub enqueued_ms: u64,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time (unix ms); 0 means now.
    pub next_attempt_ms: u64,
    /// When the first failed attempt happened, if any (unix ms).
    pub first_failure_ms: Option<u64>,
}

/// A job that can never succeed, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadRecord {
    pub header: JobHeader,
    /// When it was dead-lettered (unix ms).
    pub dead_ms: u64,
    /// Why: `rejected` (Zoom refused it) or `expired` (failing longer than `max_age`).
    pub reason: String,
    /// Zoom's HTTP status, if Zoom answered.
    pub status: Option<u16>,
    /// Zoom's error code, if its body had one.
    pub zoom_code: Option<i64>,
    /// Zoom's error message, or a description of the last failure.
    pub detail: String,
}

/// One write of a group commit.
#[derive(Debug)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage is being reopened after a failure")]
    Reopening,
    #[error("corrupt record under key {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

pub const JOB: u8 = b'j';
pub const CONTENT: u8 = b'c';
pub const DEAD: u8 = b'd';
const NEXT_SEQ_KEY: &[u8] = b"mnext_seq";

pub fn key(prefix: u8, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(9);
    key.push(prefix);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn seq_of(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(&key[1..])
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            key: format!("{key:?}"),
            detail: "key is not a prefix and an 8-byte id".into(),
        })
}

pub fn put_json<T: Serialize>(prefix: u8, seq: u64, value: &T) -> Op {
    Op::Put(
        key(prefix, seq),
        serde_json::to_vec(value).expect("records always serialize"),
    )
}

pub fn put_content(seq: u64, updated_ms: u64, body: &[u8]) -> Op {
    let mut value = Vec::with_capacity(8 + body.len());
    value.extend_from_slice(&updated_ms.to_be_bytes());
    value.extend_from_slice(body);
    Op::Put(key(CONTENT, seq), value)
}

pub fn put_next_seq(next_seq: u64) -> Op {
    Op::Put(NEXT_SEQ_KEY.to_vec(), next_seq.to_be_bytes().to_vec())
}

/// A read handle on the database; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
}

/// The write side: owned by the queue's single writer thread.
pub struct Committer {
    db: sled::Db,
    path: PathBuf,
    log_file: File,
    synced_blobs: HashSet<std::ffi::OsString>,
}

impl Store {
    pub fn open(path: &Path, cache_capacity: u64) -> Result<(Store, Committer), StoreError> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // Every group commit flushes explicitly; a background flusher would only add I/O.
            .flush_every_ms(None)
            .open()?;
        let log_file = File::open(path.join("db"))?;
        let mut committer = Committer {
            db: db.clone(),
            path: path.to_path_buf(),
            log_file,
            synced_blobs: HashSet::new(),
        };
        // Blobs left by an earlier run were synced then, or are garbage sled will collect.
        committer.synced_blobs = committer.blob_names()?;
        let store = Store { db };
        Ok((store, committer))
    }
}

impl Committer {
    /// Applies a batch atomically and makes it durable (see the module documentation).
    pub fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                Op::Put(k, v) => batch.insert(k.as_slice(), v.as_slice()),
                Op::Del(k) => batch.remove(k.as_slice()),
            }
        }
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        self.log_file.sync_data()?;
        self.sync_new_blobs()
    }

    fn blob_names(&self) -> Result<HashSet<std::ffi::OsString>, StoreError> {
        let dir = self.path.join("blobs");
        let mut names = HashSet::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    names.insert(entry?.file_name());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(names)
    }

    fn sync_new_blobs(&mut self) -> Result<(), StoreError> {
        let names = self.blob_names()?;
        let mut any_new = false;
        for name in &names {
            if !self.synced_blobs.contains(name) {
                let path = self.path.join("blobs").join(name);
                match File::open(&path) {
                    Ok(file) => file.sync_all()?,
                    // sled garbage-collected it meanwhile: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
        }
        if any_new {
            File::open(self.path.join("blobs"))?.sync_all()?;
        }
        self.synced_blobs = names;
        Ok(())
    }
}

impl Store {
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(match self.db.get(NEXT_SEQ_KEY)? {
            Some(value) => {
                u64::from_be_bytes(value.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    key: "next_seq".into(),
                    detail: "not 8 bytes".into(),
                })?)
            }
            None => 1,
        })
    }

    /// Every pending or in-flight job's header, in job-id order.
    pub fn headers(&self) -> impl Iterator<Item = Result<(u64, JobHeader), StoreError>> + '_ {
        self.db.scan_prefix([JOB]).map(|item| {
            let (k, v) = item?;
            let seq = seq_of(&k)?;
            let header = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: format!("j{seq}"),
                detail: e.to_string(),
            })?;
            Ok((seq, header))
        })
    }

    pub fn header(&self, seq: u64) -> Result<Option<JobHeader>, StoreError> {
        self.get_json(JOB, seq)
    }

    pub fn dead(&self, seq: u64) -> Result<Option<DeadRecord>, StoreError> {
        self.get_json(DEAD, seq)
    }

    /// Dead letters in job-id order.
    pub fn dead_records(&self) -> impl Iterator<Item = Result<(u64, DeadRecord), StoreError>> + '_ {
        self.db.scan_prefix([DEAD]).map(|item| {
            let (k, v) = item?;
            let seq = seq_of(&k)?;
            let record = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                key: format!("d{seq}"),
                detail: e.to_string(),
            })?;
            Ok((seq, record))
        })
    }

    pub fn count_dead(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.db.scan_prefix([DEAD]).keys() {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// The ack time and Zoom body of a job.
    pub fn content(&self, seq: u64) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(match self.db.get(key(CONTENT, seq))? {
            Some(value) if value.len() >= 8 => {
                let updated_ms = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
                Some((updated_ms, value[8..].to_vec()))
            }
            Some(_) => {
                return Err(StoreError::Corrupt {
                    key: format!("c{seq}"),
                    detail: "shorter than its 8-byte timestamp".into(),
                })
            }
            None => None,
        })
    }

    /// The oldest job id still pending or in flight, and its header.
    pub fn oldest(&self) -> Result<Option<(u64, JobHeader)>, StoreError> {
        self.headers().next().transpose()
    }

    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }

    fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        prefix: u8,
        seq: u64,
    ) -> Result<Option<T>, StoreError> {
        match self.db.get(key(prefix, seq))? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: format!("{}{seq}", prefix as char),
                    detail: e.to_string(),
                }),
            None => Ok(None),
        }
    }
}
