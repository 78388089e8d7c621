//! What the sandbox lets tests, benchmarks and bot authors observe: plain snapshot types,
//! copied out of the shared state under its lock, plus the window arithmetic a pacing check
//! needs. Nothing here is shared or mutable; `state.rs` keeps the live counters.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::plan::Plan;

/// What the sandbox knows about one message id.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageRecord {
    pub message_id: String,
    /// `content` of the send that created it or of the last successful edit, whichever came
    /// last. `None` for an id only ever deleted or refused.
    pub content: Option<serde_json::Value>,
    /// Whole JSON body of the send that created it or of the last successful edit.
    pub last_body: Option<serde_json::Value>,
    /// The `to_jid` of the send that created it; `None` for an id the sandbox took as sent
    /// before it started (first named by an edit or delete).
    pub to_jid: Option<String>,
    /// Successful edits.
    pub edits: u64,
    /// Whether a delete succeeded; edits and deletes of it now answer 404 code 8001.
    pub deleted: bool,
    /// Edit and delete requests naming this id, of any outcome. The send that created it does
    /// not name it, so it is not one of them.
    pub requests: u64,
    /// Most edit and delete requests for this message id ever in flight at the same time. A
    /// client that serialises the requests of each message keeps this at 1.
    pub max_concurrent: u32,
}

/// Figures for one account.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountStats {
    pub plan: Plan,
    /// The plan's per-second limit (what `X-RateLimit-Limit` says).
    pub limit_per_second: u32,
    /// What this app may really use per second (the plan's limit unless overridden).
    pub capacity_per_second: u32,
    pub daily_limit: Option<u32>,
    /// Requests counted toward the per-second windows (see the module docs of `sandbox`).
    pub requests: u64,
    /// 2xx answers.
    pub successes: u64,
    /// Every 429 sent for a request naming this account (limits, faults, injections and scripts).
    pub rate_limited: u64,
    /// 429s sent because a per-second window was full.
    pub rate_limited_qps: u64,
    /// 429s sent because the daily cap was reached.
    pub rate_limited_daily: u64,
    /// Requests counted toward today's (UTC) cap.
    pub daily_used: u32,
    /// Most counted requests in one fixed window (aligned to the sandbox's start).
    pub max_fixed_window: u32,
    /// Most counted requests in any one-second interval.
    pub max_sliding_window: u32,
    /// Arrival of each counted request, as an offset from the sandbox's start, in order.
    #[serde(skip)]
    pub arrivals: Vec<Duration>,
}

impl AccountStats {
    /// Most arrivals in one fixed window of `window` length aligned to the sandbox's start.
    pub fn max_in_fixed_window(&self, window: Duration) -> u32 {
        let window_nanos = window.as_nanos().max(1);
        let mut counts: HashMap<u128, u32> = HashMap::new();
        for arrival in &self.arrivals {
            *counts.entry(arrival.as_nanos() / window_nanos).or_default() += 1;
        }
        counts.into_values().max().unwrap_or(0)
    }

    /// Most arrivals in any half-open interval `[t, t + window)`.
    pub fn max_in_sliding_window(&self, window: Duration) -> u32 {
        let mut best = 0;
        let mut first = 0;
        for (last, arrival) in self.arrivals.iter().enumerate() {
            while arrival.saturating_sub(self.arrivals[first]) >= window {
                first += 1;
            }
            best = best.max(last - first + 1);
        }
        best as u32
    }
}

/// Global and per-account figures; also served as JSON by `GET /sandbox/stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxStats {
    pub uptime_ms: u64,
    /// Requests of the three message calls (send, edit, delete) received; token requests are
    /// counted apart.
    pub requests_total: u64,
    /// Requests of the three message calls by call: `"send"`, `"edit"`, `"delete"` (a call never
    /// requested is absent).
    pub by_op: BTreeMap<String, u64>,
    /// Requests of the three message calls by the status they were answered with.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests of the three message calls answered by closing the connection, whether before
    /// or after applying them.
    pub resets: u64,
    pub token_requests: u64,
    pub tokens_issued: u64,
    /// Most token requests ever served at the same time. A client that never overlaps token
    /// requests keeps this at 1.
    pub token_max_concurrent: u32,
    pub accounts: BTreeMap<String, AccountStats>,
}

/// One request of a message call, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Which call: `"send"`, `"edit"` or `"delete"`.
    pub op: &'static str,
    /// When it arrived.
    pub at: Instant,
    /// `at` as an offset from the sandbox's start (the fixed windows' origin).
    pub offset: Duration,
    /// The request's `account_id` (body of a send or edit, query of a delete), when it had one.
    pub account_id: Option<String>,
    /// The id an edit or delete named; for a send, the id it created (`""` if it created none).
    pub message_id: String,
    /// The status answered; `None` when the connection was reset instead.
    pub status: Option<u16>,
}
