//! The one small interface the queue needs of its storage: an ordered map of byte keys with
//! atomic, durable batches. Two media implement it: sled on local disk (`sled_kv.rs`, the
//! default) and a JetStream stream per partition in the cluster mode (`nats_kv.rs`). They know
//! nothing of jobs, records or Zoom: `store.rs` lays the queue out on top of this.

use bytes::Bytes;

/// One write of a group commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage error: {0}")]
    Backend(String),
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("storage is being reopened after a failure")]
    Reopening,
    #[error("corrupt record under key {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// Another daemon wrote this partition since this one last did: it owns it now, and
    /// nothing more may be written here (cluster mode).
    #[error("this daemon no longer owns partition {0}: another daemon took it over")]
    Fenced(u32),
    /// The database's lock is held by another process (sled), or still by our own previous
    /// handle for a moment after it was dropped.
    #[error("storage is locked: {0}")]
    Locked(String),
}

/// A key and its value, as read.
pub type Pair = (Bytes, Bytes);

/// Reads. Cheap to share between threads; never blocks on the network (the NATS medium reads
/// its own copy in memory).
pub trait Kv: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + 'a>;
    /// The greatest key starting with `prefix` (a seek, not a scan).
    fn last_key(&self, prefix: &[u8]) -> Result<Option<Bytes>, StoreError>;
    /// Bytes the medium takes on this host's disk (0 when it is elsewhere).
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// Writes: owned by the queue's single writer thread.
pub trait Commit: Send {
    /// Applies `ops` atomically and makes them durable before returning.
    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError>;
}

/// A read handle and the write side, as opened.
pub type Opened = (std::sync::Arc<dyn Kv>, Box<dyn Commit>);

/// Where a queue is stored and how it is (re)opened.
pub trait Medium: Send + Sync {
    /// Opens it (also after a failed commit: sled remembers its first I/O error forever, so
    /// its medium opens a fresh handle).
    fn open(&self) -> Result<Opened, StoreError>;
    /// Whether [`Medium::rebuild_empty`] gives anything back.
    fn shrinks(&self) -> bool;
    /// Deletes everything and opens it empty, for a queue that holds nothing, to give back
    /// the space a drained backlog took.
    fn rebuild_empty(&self, commit: Box<dyn Commit>) -> Result<Opened, StoreError>;
    /// Free bytes where it stores, when that is this host's disk.
    fn free_space(&self) -> Option<u64>;
}
