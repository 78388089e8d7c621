//! The load generator (`--client`): `--connections` connections to the daemon at `--socket`,
//! each keeping `--window` requests outstanding (`common/load.rs`), `--warmup` seconds before
//! the measured `--seconds`. It prints [`MARK_START`] and [`MARK_END`] on stdout when the
//! measured interval starts and ends, and then its figures as one JSON line.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::latency::Latency;
use crate::load::{self, Bound, Clock};
use crate::{proc, Args, ACCOUNT, MARK_END, MARK_START};

/// What the load generator measured; printed by the client as one JSON line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    /// Acknowledged edits whose answer was read inside the measured interval.
    pub acked_measured: u64,
    /// Acknowledged edits over the whole run, warm-up and drain included.
    pub acked_total: u64,
    pub rate: f64,
    pub samples: usize,
    /// `p50_us`, `p90_us`, `p99_us`, `max_us`.
    #[serde(flatten)]
    pub latency: Latency,
    /// Answers other than `ok:true`, and the first of them.
    pub errors: u64,
    pub first_error: Option<String>,
    /// `coalesced:true` answers; must be 0 since every message id is distinct.
    pub coalesced: u64,
    /// CPU time (user + system) of the client process.
    pub cpu_seconds: f64,
}

pub async fn client(args: &Args) -> anyhow::Result<LoadReport> {
    let socket = args.socket.as_ref().context("--client needs --socket")?;
    anyhow::ensure!(args.connections >= 1 && args.window >= 1);
    let streams = load::connect(std::slice::from_ref(socket), args.connections).await?;
    // Everyone starts together, once all connections are up.
    let clock = Clock::after_warmup(args.warmup, args.seconds);
    // Marks the measured interval on stdout, for the server's CPU accounting.
    let marks = clock.at_bounds(|bound| {
        println!(
            "{}",
            match bound {
                Bound::Start => MARK_START,
                Bound::End => MARK_END,
            }
        )
    });
    let total = load::drive_all(streams, args.window, clock, |conn| {
        move |out: &mut Vec<u8>, seq: u64| load::push_edit(out, conn, seq, ACCOUNT)
    })
    .await?;
    // The last answers can come before the end mark's timer fires (tokio's timers have 1 ms
    // resolution); the mark must still be printed before the report.
    marks.await?;
    let mut latencies = total.latencies_us;
    latencies.sort_unstable();
    Ok(LoadReport {
        acked_measured: total.acked_measured,
        acked_total: total.acked_total,
        rate: total.acked_measured as f64 / args.seconds,
        samples: latencies.len(),
        latency: Latency::of(&latencies),
        errors: total.errors,
        first_error: total.first_error,
        coalesced: total.coalesced,
        cpu_seconds: proc::cpu_time("self").as_secs_f64(),
    })
}
