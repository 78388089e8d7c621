//! How much room a data directory takes: shared by the benches that report the daemon's disk
//! footprint.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A directory tree's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Sum of file lengths (what `du --apparent-size` counts).
    pub apparent: u64,
    /// Allocated blocks (what `du` counts): less than `apparent` for sparse files, more for
    /// preallocated ones.
    pub allocated: u64,
    pub files: u64,
}

impl Usage {
    /// The larger of the two sizes: what the directory can be said to occupy either way.
    pub fn size(&self) -> u64 {
        self.apparent.max(self.allocated)
    }
}

/// The size of everything under `path`; zero if it cannot be read.
pub fn usage(path: &Path) -> Usage {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Usage::default();
    };
    let mut total = Usage::default();
    for entry in entries.flatten() {
        match entry.metadata() {
            Ok(meta) if meta.is_dir() => {
                let below = usage(&entry.path());
                total.apparent += below.apparent;
                total.allocated += below.allocated;
                total.files += below.files;
            }
            Ok(meta) => {
                total.apparent += meta.len();
                total.allocated += meta.blocks() * 512;
                total.files += 1;
            }
            Err(_) => {}
        }
    }
    total
}
