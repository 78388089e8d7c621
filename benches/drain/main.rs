//! Delivery benchmark (BENCHMARKS.md, "Delivery"): how close zoomq drains to Zoom's per-account
//! limits without crossing them, what a 429 costs, how it copes with an account whose quota
//! another app shares, whether one account's pause slows the others, how it serves thousands of
//! accounts and what that costs in CPU and memory, and how soon an edit reaches Zoom when
//! nothing is queued.
//!
//! The sandbox Zoom ([`zoomq::sandbox::Sandbox`], default seed, no random faults) always runs in
//! this process. The daemon runs in this process too ([`zoomq::run`], the code `zoomq serve`
//! runs) except in `accounts` and `accounts10k`, where it is the release binary in its own
//! process so its CPU time and memory can be read from `/proc`. It always runs on its default
//! settings plus the sandbox's URLs and credentials, the plan, per-account overrides where a
//! row says so, and metrics off. Producers talk to it over its Unix socket like any bot.
//! Figures come from the sandbox's own records (request log, per-account arrivals, message
//! contents), not from the daemon's counters, so they show what Zoom would see.
//!
//! Scenarios (`cargo bench --bench drain -- <scenario>`; `all`, the default, runs each in turn):
//! - `drain`: a preloaded backlog of distinct messages on one account, per plan (free, pro,
//!   business) and for a business account with `[accounts."<id>"] rate = 37` that Zoom also
//!   holds to 37/s; delivered rate over the steady part (`--seconds`, 60, after leaving out
//!   `--edge` seconds, 2, at each end of the deliveries), 429s, most requests in any 1 s window
//!   (fixed windows from the sandbox's origin, from wall-clock seconds and at ten phases;
//!   sliding windows), gaps between requests. The rows run at once (a sandbox and a daemon
//!   each) unless `--serial`.
//! - `lone429`: a Pro backlog; `--settle` (10) seconds into the deliveries the sandbox answers
//!   exactly one request with a per-second 429; per-second rate around it, time until the rate
//!   is back to 95 % of the limit, capacity lost in the 10 s after it.
//! - `shared`: a Pro account of which this app may use only 12 requests/s; 429 share and
//!   delivered rate after the first `--settle` (10) of `--seconds` (60).
//! - `isolation`: two Pro accounts; one gets a 429 with `Retry-After: 5`, later reaches a daily
//!   cap (`Daily-limit`, Retry-After at 00:00 UTC); the other's rate must not drop.
//! - `accounts`: `--accounts` (1,000) Free accounts x `--messages` (20) distinct messages,
//!   all queued before delivery starts; per-account and total delivered rate, 429s, final
//!   contents, the daemon's CPU time per request and memory.
//! - `accounts10k`: `--accounts` (10,000) Free accounts x `--messages` (1); all delivered,
//!   how long the last one waited, CPU and memory.
//! - `hot`: 20 messages edited 50 times a second each for `--seconds` (30) on one Pro account;
//!   ack-to-Zoom lag from polling the sandbox's messages every `--poll-ms`.
//! - `lifecycle`: one account (Pro, and Business) whose messages are sent by ref, edited in
//!   bursts that coalesce and one in three deleted, three times the limit of refs under way so
//!   the three calls always have a backlog; delivered rate by call and in all over the steady
//!   part (`--seconds`, 60, between `--edge` seconds at each end), 429s, most requests in any
//!   1 s window, and at the end one message per ref at Zoom, on its last edit or deleted.
//!   The rows run at once unless `--serial`.
//! - `idle`: `--samples` (200) edits one at a time on an empty queue: from the producer's write
//!   to the sandbox's receipt of the PUT (`RequestRecord::at`, same process, same clock).
//!
//! Each scenario prints a table, one line per target (`met` or `MISSED`), and one JSON line. A
//! missed target is reported, not fatal: the exit status is non-zero only when the benchmark
//! itself fails (the daemon or sandbox does not start, an edit is refused, ...).
//!
//! Files: `rig.rs` (in-process sandbox + daemon, producers), `process.rs` (the daemon as its own
//! process), `measure.rs` (windows, rates, gaps, percentiles), `report.rs` (targets, machine),
//! and one file per scenario family: `rows.rs` (`drain`), `adapt.rs` (`lone429`, `shared`),
//! `isolation.rs`, `accounts.rs`, `hot.rs`, `lifecycle.rs`, `idle.rs`; `../common/` holds what
//! the benches share (the daemon in this process or its own, preloads, percentiles).

#[path = "../common/embed.rs"]
mod embed;
#[path = "../common/host.rs"]
mod host;
#[allow(dead_code)]
#[path = "../common/latency.rs"]
mod latency;
#[allow(dead_code)]
#[path = "../common/load.rs"]
mod load;
#[path = "../common/logs.rs"]
mod logs;
#[path = "../common/proc.rs"]
mod proc;
#[allow(dead_code)]
#[path = "../common/spawn.rs"]
mod spawn;

mod accounts;
mod adapt;
mod hot;
mod idle;
mod isolation;
mod lifecycle;
mod measure;
mod process;
mod report;
mod rig;
mod rows;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Parser)]
#[command(about = "zoomq delivery benchmark (see BENCHMARKS.md)")]
pub struct Args {
    /// Which scenario to run; `all` runs every one in turn.
    #[arg(value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// drain, lifecycle: measured seconds (60); lone429, shared, isolation: seconds of
    /// deliveries (30, 60, 40); hot: seconds of editing (30).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// drain, lone429, isolation, lifecycle: seconds of deliveries left out at each end of the run.
    #[arg(long, default_value_t = 2.0)]
    pub edge: f64,
    /// shared: seconds left out at the start while the daemon finds the account's capacity;
    /// lone429: seconds of deliveries before the 429.
    #[arg(long, default_value_t = 10.0)]
    pub settle: f64,
    /// accounts, accounts10k: how many Free accounts (default 1,000 and 10,000).
    #[arg(long)]
    pub accounts: Option<usize>,
    /// accounts, accounts10k: distinct messages queued per account (default 20 and 1).
    #[arg(long)]
    pub messages: Option<usize>,
    /// hot: how often the sandbox's messages are sampled, in milliseconds.
    #[arg(long, default_value_t = 2)]
    pub poll_ms: u64,
    /// idle: measured edits.
    #[arg(long, default_value_t = 200)]
    pub samples: usize,
    /// drain, lifecycle: run the rows one after another instead of at once (four times longer).
    #[arg(long)]
    pub serial: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Drain,
    Lone429,
    Shared,
    Isolation,
    Accounts,
    #[value(name = "accounts10k")]
    Accounts10k,
    Hot,
    Lifecycle,
    Idle,
    All,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    logs::init("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let machine = report::machine();
        println!(
            "zoomq delivery benchmark on {}",
            machine["summary"].as_str().unwrap_or_default()
        );
        let runs = |scenario: Scenario| args.scenario == scenario || args.scenario == Scenario::All;
        if runs(Scenario::Drain) {
            rows::drain(&args, &machine).await?;
        }
        if runs(Scenario::Lone429) {
            adapt::lone429(&args, &machine).await?;
        }
        if runs(Scenario::Shared) {
            adapt::shared(&args, &machine).await?;
        }
        if runs(Scenario::Isolation) {
            isolation::isolation(&args, &machine).await?;
        }
        if runs(Scenario::Accounts) {
            accounts::accounts(&args, &machine, 1_000, 20).await?;
        }
        if runs(Scenario::Accounts10k) {
            accounts::accounts(&args, &machine, 10_000, 1).await?;
        }
        if runs(Scenario::Hot) {
            hot::hot(&args, &machine).await?;
        }
        if runs(Scenario::Lifecycle) {
            lifecycle::lifecycle(&args, &machine).await?;
        }
        if runs(Scenario::Idle) {
            idle::idle(&args, &machine).await?;
        }
        anyhow::Ok(())
    })
}
