//! The embedded medium: one sled tree on local disk, and the only code that touches sled.
//!
//! # Durability
//! sled 0.34's `flush` writes its log with `sync_file_range`, which neither flushes the disk's
//! write cache nor persists the file's new size (sled issue 1452), and it writes large values
//! ("blobs") to their own files without any sync. [`SledCommit::commit`] therefore follows every
//! flush with `fdatasync` of the log file and `fsync` of blob files created since the last
//! commit and of their directory. After `commit` returns, the batch survives power loss on a
//! disk that honours flushes.

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::kv::{Commit, Kv, Medium, Op, Opened, Pair, StoreError};

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                StoreError::Locked(e.to_string())
            }
            sled::Error::Io(e) => StoreError::Io(e),
            e => StoreError::Backend(e.to_string()),
        }
    }
}

/// A sled database in a directory.
pub struct SledMedium {
    pub path: PathBuf,
    pub cache_capacity: u64,
}

struct SledKv {
    db: sled::Db,
}

/// The write side: owned by the queue's single writer thread.
struct SledCommit {
    db: sled::Db,
    path: PathBuf,
    log_file: File,
    synced_blobs: HashSet<std::ffi::OsString>,
}

/// sled's value as `Bytes`, without a copy (the `Bytes` keeps the `IVec`).
fn bytes(value: sled::IVec) -> Bytes {
    Bytes::from_owner(value)
}

impl Medium for SledMedium {
    fn open(&self) -> Result<Opened, StoreError> {
        let path = &self.path;
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(self.cache_capacity)
            .mode(sled::Mode::HighThroughput)
            // Every group commit flushes explicitly; a background flusher would only add I/O.
            .flush_every_ms(None)
            .open()?;
        let log_file = File::open(path.join("db"))?;
        let mut commit = SledCommit {
            db: db.clone(),
            path: path.to_path_buf(),
            log_file,
            synced_blobs: HashSet::new(),
        };
        // Blobs left by an earlier run were synced then, or are garbage sled will collect.
        commit.synced_blobs = commit.blob_names()?;
        Ok((Arc::new(SledKv { db }), Box::new(commit)))
    }

    /// Deletes the database's files and creates an empty database in their place (the caller
    /// makes sure the queue holds nothing, and keeps everyone out meanwhile). sled never
    /// shrinks its file; this is how the space of a drained backlog comes back. Old handles
    /// may linger in sled's I/O threads for a moment: they keep the unlinked files, not the
    /// new ones.
    fn rebuild_empty(&self, commit: Box<dyn Commit>) -> Result<Opened, StoreError> {
        drop(commit);
        self.remove_files()?;
        self.open()
    }

    fn shrinks(&self) -> bool {
        true
    }

    fn free_space(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(&self.path).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }
}

impl SledMedium {
    /// In this order, each step made durable before the next, so that whatever a crash
    /// leaves opens as an empty database: without its snapshots sled reads its log again, a
    /// missing log is a new one, orphaned blobs are never read, `conf` alone is nothing.
    fn remove_files(&self) -> Result<(), StoreError> {
        let path = &self.path;
        let sync_dir = || File::open(path).and_then(|d| d.sync_all());
        let mut names: Vec<(u8, std::ffi::OsString)> = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let name = entry?.file_name();
            let step = match name.to_string_lossy() {
                n if n.starts_with("snap.") => 0,
                n if n == "db" => 1,
                n if n == "blobs" => 2,
                n if n == "conf" => 3,
                _ => continue,
            };
            names.push((step, name));
        }
        names.sort();
        for (step, name) in names {
            let target = path.join(&name);
            if step == 2 {
                std::fs::remove_dir_all(target)?;
            } else {
                std::fs::remove_file(target)?;
            }
            sync_dir()?;
        }
        Ok(())
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StoreError> {
        Ok(self.db.get(key)?.map(bytes))
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> Box<dyn Iterator<Item = Result<Pair, StoreError>> + 'a> {
        Box::new(self.db.scan_prefix(prefix).map(|item| {
            let (k, v) = item?;
            Ok((bytes(k), bytes(v)))
        }))
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Bytes>, StoreError> {
        match self.db.scan_prefix(prefix).keys().next_back() {
            Some(k) => Ok(Some(bytes(k?))),
            None => Ok(None),
        }
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

impl Commit for SledCommit {
    /// Applies a batch atomically and makes it durable (see the module documentation).
    fn commit(&mut self, ops: &[Op]) -> Result<(), StoreError> {
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
}

impl SledCommit {
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

/// Opens the sled database at `path` the way the queue does, for tests that write a layout
/// of their own.
#[cfg(test)]
pub fn open_for_test(path: &std::path::Path) -> Result<Opened, StoreError> {
    SledMedium {
        path: path.to_path_buf(),
        cache_capacity: 8 << 20,
    }
    .open()
}
