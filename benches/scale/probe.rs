//! The index alone: what the in-memory index of the backlog costs by itself, measured in a fresh
//! process (this executable again, with `--index-probe`) so neither sled nor the sandbox is in
//! the figures.

use std::fmt::Write as _;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::fill::account_id;
use crate::{proc, Args};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct IndexProbe {
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub hwm_kib: u64,
    /// Time to restore every job into the index, as recovery does.
    pub seconds: f64,
}

impl IndexProbe {
    pub fn bytes(&self) -> u64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) * 1024
    }
}

/// Runs the probe as a child process and reads its JSON line.
pub async fn run_index_probe(args: &Args) -> anyhow::Result<IndexProbe> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--index-probe")
        .arg("--edits")
        .arg(args.edits.to_string())
        .arg("--accounts")
        .arg(args.accounts.to_string())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "index probe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// Restores `--edits` pending jobs, named as the fill names them, into a fresh
/// [`zoomq::queue::State`], exactly as recovery does, and prints the resident memory it took.
pub fn index_probe(args: &Args) -> anyhow::Result<()> {
    let pid = std::process::id().to_string();
    let rss_kib = || proc::status_bytes(&pid, "VmRSS:") / 1024;
    let rss_before_kib = rss_kib();
    let started = Instant::now();
    let mut state = zoomq::queue::State::new(1);
    let mut message = String::new();
    for index in 0..args.edits {
        message.clear();
        write!(message, "m0-{index}")?;
        // Where recovery finds it: records of 30 entries, as 1 KiB edits fill them.
        let stored = zoomq::queue::Stored {
            loc: Some(zoomq::queue::Loc {
                record: 1 + index / 30,
                index: (index % 30) as u32,
            }),
            enqueued_ms: 1_700_000_000_000 + index,
            attempts: 0,
            first_failure_ms: None,
        };
        state.restore(
            &message,
            &account_id(index % args.accounts),
            index + 1,
            0,
            stored,
            0,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(state.pending() == args.edits);
    let probe = IndexProbe {
        rss_before_kib,
        rss_after_kib: rss_kib(),
        hwm_kib: proc::status_bytes(&pid, "VmHWM:") / 1024,
        seconds,
    };
    println!("{}", serde_json::to_string(&probe)?);
    Ok(())
}
