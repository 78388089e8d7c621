//! The disk probe the intake benches (enqueue, cluster) time before each run: how long one
//! 4 KiB write followed by `fdatasync` takes on the filesystem the data directories are on, at
//! that moment. It is the floor under any durable acknowledgement that needs one such write,
//! and the anchor of a one-connection run's latency.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::latency::micros;

/// Writes (each + `fdatasync`) timed by each half of the probe.
pub const PROBE_WRITES: usize = 200;

/// The probe's sorted latencies in microseconds.
pub struct Probe {
    /// Appends, each of which grows the file.
    pub append: Vec<u32>,
    /// Overwrites of the appended blocks; empty when the probe was asked for appends only.
    pub overwrite: Vec<u32>,
}

/// Writes 4 KiB and `fdatasync`s it (`sync_data`) in a fresh file in a fresh directory under
/// `parent` (named `prefix...`): first [`PROBE_WRITES`] appends, each of which grows the file (so
/// the file system also commits its size: the cost of a log that appends), then, with
/// `overwrites`, as many overwrites of those blocks, which change no metadata `fdatasync` must
/// write (the cost of a log that writes into space it allocated before).
pub fn fsync_probe(parent: &Path, prefix: &str, overwrites: bool) -> anyhow::Result<Probe> {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(parent)?;
    let mut file = std::fs::File::create(dir.path().join("probe"))?;
    let block = vec![b'x'; 4096];
    let mut append = Vec::with_capacity(PROBE_WRITES);
    for _ in 0..PROBE_WRITES {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        append.push(micros(started.elapsed()));
    }
    let mut overwrite = Vec::new();
    if overwrites {
        overwrite.reserve(PROBE_WRITES);
        for n in 0..PROBE_WRITES {
            let started = Instant::now();
            file.write_all_at(&block, (n * block.len()) as u64)?;
            file.sync_data()?;
            overwrite.push(micros(started.elapsed()));
        }
    }
    append.sort_unstable();
    overwrite.sort_unstable();
    Ok(Probe { append, overwrite })
}
