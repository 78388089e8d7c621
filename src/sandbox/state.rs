//! The sandbox's shared state and what it lets tests observe.
//!
//! One `std::sync::Mutex` guards everything: every critical section is a few map lookups and
//! counter bumps, never held across an `.await`, so a blocking mutex is cheaper than an async
//! one and keeps the handle's accessors synchronous. This module owns the quota arithmetic
//! (fixed windows, daily caps), the messages and what each call does to them, and the in-flight
//! counters behind the concurrency high-water marks; it does not decide the order of checks or
//! build HTTP responses (see `calls.rs`).

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::distr::{Alphanumeric, SampleString};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::macros::format_description;
use time::{Date, OffsetDateTime};
use tokio_util::sync::CancellationToken;

use super::stats::{AccountStats, MessageRecord, RequestRecord, SandboxStats};
use super::{Injected429, SandboxConfig, Scripted};
use crate::plan::Plan;

/// Outcome of the rate-limit check for one request.
pub(crate) enum Admission {
    Admitted {
        limit: u32,
        remaining: u32,
    },
    /// The per-second window is full; `next_window` is when the next one opens.
    Qps {
        limit: u32,
        next_window: Instant,
    },
    Daily {
        limit: u32,
    },
    /// Admitted, but answered with an injected 429.
    Injected {
        limit: u32,
        answer: Injected429,
    },
}

/// State reachable from the handle and every handler.
pub(crate) struct Shared {
    /// Origin of the fixed per-second windows and of every logged offset.
    pub started: Instant,
    pub addr: SocketAddr,
    /// The sandbox's shutdown signal; injected delays end early when it fires.
    pub cancel: CancellationToken,
    inner: Mutex<State>,
}

pub(crate) struct State {
    pub cfg: SandboxConfig,
    /// Decides faults; seeded so campaigns replay.
    pub rng: StdRng,
    /// The random part of sent message ids; apart from `rng`, so sends do not shift which
    /// request gets which fault.
    id_rng: StdRng,
    /// Sends applied so far; part of every new message id, which makes it unique.
    sends_applied: u64,
    /// Order in which message records were created, for [`State::messages`].
    next_seq: u64,
    /// Live tokens and their expiry.
    pub tokens: HashMap<String, Instant>,
    /// Tokens in issue order, for `max_live_tokens`. May hold tokens already gone from `tokens`.
    pub token_order: VecDeque<String>,
    pub token_requests: u64,
    pub tokens_issued: u64,
    pub token_in_flight: u32,
    pub token_max_concurrent: u32,
    pub messages: HashMap<String, MessageState>,
    pub accounts: HashMap<String, AccountState>,
    /// Scripts of edits and deletes, by message id.
    pub scripts: HashMap<String, VecDeque<Scripted>>,
    /// Scripts of sends, by `to_jid`.
    pub send_scripts: HashMap<String, VecDeque<Scripted>>,
    pub log: VecDeque<RequestRecord>,
    pub requests_total: u64,
    pub by_op: BTreeMap<&'static str, u64>,
    pub by_status: BTreeMap<u16, u64>,
    pub resets: u64,
}

pub(crate) struct MessageState {
    pub record: MessageRecord,
    pub in_flight: u32,
    /// When the record was created, relative to the others.
    seq: u64,
}

#[derive(Default)]
pub(crate) struct AccountState {
    pub requests: u64,
    pub successes: u64,
    pub rate_limited: u64,
    pub rate_limited_qps: u64,
    pub rate_limited_daily: u64,
    /// Index of the current fixed window and the requests counted in it.
    pub window: u64,
    pub window_count: u32,
    /// The UTC day `day_used` belongs to.
    pub day: Option<Date>,
    pub day_used: u32,
    pub arrivals: Vec<Duration>,
    /// 429s still to answer instead of admitting ([`super::Sandbox::inject_429`]).
    pub injected: VecDeque<Injected429>,
}

/// The limits that apply to one account right now.
struct Limits {
    plan: Plan,
    capacity: u32,
    daily: Option<u32>,
}

impl Shared {
    pub fn new(cfg: SandboxConfig, addr: SocketAddr, cancel: CancellationToken) -> Shared {
        let rng = StdRng::seed_from_u64(cfg.seed);
        // Any fixed tweak of the seed will do (this is the golden ratio's): it only keeps the
        // two streams from being the same numbers.
        let id_rng = StdRng::seed_from_u64(cfg.seed ^ 0x9e37_79b9_7f4a_7c15);
        Shared {
            started: Instant::now(),
            addr,
            cancel,
            inner: Mutex::new(State {
                cfg,
                rng,
                id_rng,
                sends_applied: 0,
                next_seq: 0,
                tokens: HashMap::new(),
                token_order: VecDeque::new(),
                token_requests: 0,
                tokens_issued: 0,
                token_in_flight: 0,
                token_max_concurrent: 0,
                messages: HashMap::new(),
                accounts: HashMap::new(),
                scripts: HashMap::new(),
                send_scripts: HashMap::new(),
                log: VecDeque::new(),
                requests_total: 0,
                by_op: BTreeMap::new(),
                by_status: BTreeMap::new(),
                resets: 0,
            }),
        }
    }

    /// Locks the state. A panic while holding the lock cannot leave it half-updated in a way
    /// that matters to a test double, so poisoning is ignored.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn stats(&self) -> SandboxStats {
        let state = self.lock();
        let mut accounts = BTreeMap::new();
        let configured = state.cfg.accounts.keys();
        for account_id in state.accounts.keys().chain(configured) {
            if let Some(stats) = state.account_stats(account_id) {
                accounts.insert(account_id.clone(), stats);
            }
        }
        SandboxStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            requests_total: state.requests_total,
            by_op: state
                .by_op
                .iter()
                .map(|(op, count)| (op.to_string(), *count))
                .collect(),
            by_status: state.by_status.clone(),
            resets: state.resets,
            token_requests: state.token_requests,
            tokens_issued: state.tokens_issued,
            token_max_concurrent: state.token_max_concurrent,
            accounts,
        }
    }

    /// Marks one more request in flight for `message_id` until the guard drops (also when the
    /// handler is cancelled because the client went away).
    pub fn enter_message(self: &Arc<Self>, message_id: &str) -> InFlight {
        let mut state = self.lock();
        let message = state.record_of(message_id);
        message.in_flight += 1;
        message.record.requests += 1;
        message.record.max_concurrent = message.record.max_concurrent.max(message.in_flight);
        InFlight {
            shared: self.clone(),
            message_id: Some(message_id.to_string()),
        }
    }

    /// Marks one more token request in flight until the guard drops.
    pub fn enter_token(self: &Arc<Self>) -> InFlight {
        let mut state = self.lock();
        state.token_requests += 1;
        state.token_in_flight += 1;
        state.token_max_concurrent = state.token_max_concurrent.max(state.token_in_flight);
        InFlight {
            shared: self.clone(),
            message_id: None,
        }
    }
}

/// Decrements an in-flight counter on drop.
pub(crate) struct InFlight {
    shared: Arc<Shared>,
    /// The message whose counter this holds; `None` for the token endpoint.
    message_id: Option<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        match &self.message_id {
            Some(message_id) => {
                if let Some(message) = state.messages.get_mut(message_id) {
                    message.in_flight -= 1;
                }
            }
            None => state.token_in_flight -= 1,
        }
    }
}

impl State {
    pub fn message(&self, message_id: &str) -> Option<MessageRecord> {
        self.messages.get(message_id).map(|m| m.record.clone())
    }

    /// Every message record, oldest first.
    pub fn messages(&self) -> Vec<MessageRecord> {
        let mut messages: Vec<&MessageState> = self.messages.values().collect();
        messages.sort_by_key(|message| message.seq);
        messages.into_iter().map(|m| m.record.clone()).collect()
    }

    /// The record of `message_id`, created blank (as a message sent before the sandbox
    /// started) if there is none yet.
    fn record_of(&mut self, message_id: &str) -> &mut MessageState {
        match self.messages.entry(message_id.to_string()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                entry.insert(MessageState {
                    record: MessageRecord {
                        message_id: message_id.to_string(),
                        content: None,
                        last_body: None,
                        to_jid: None,
                        edits: 0,
                        deleted: false,
                        requests: 0,
                        max_concurrent: 0,
                    },
                    in_flight: 0,
                    seq,
                })
            }
        }
    }

    /// Figures for an account seen in a request or named in the configuration.
    pub fn account_stats(&self, account_id: &str) -> Option<AccountStats> {
        if !self.accounts.contains_key(account_id) && !self.cfg.accounts.contains_key(account_id) {
            return None;
        }
        let limits = self.limits(account_id);
        let empty = AccountState::default();
        let account = self.accounts.get(account_id).unwrap_or(&empty);
        let today = OffsetDateTime::now_utc().date();
        let mut stats = AccountStats {
            plan: limits.plan,
            limit_per_second: limits.plan.per_second(),
            capacity_per_second: limits.capacity,
            daily_limit: limits.daily,
            requests: account.requests,
            successes: account.successes,
            rate_limited: account.rate_limited,
            rate_limited_qps: account.rate_limited_qps,
            rate_limited_daily: account.rate_limited_daily,
            daily_used: if account.day == Some(today) {
                account.day_used
            } else {
                0
            },
            max_fixed_window: 0,
            max_sliding_window: 0,
            arrivals: account.arrivals.clone(),
        };
        stats.max_fixed_window = stats.max_in_fixed_window(Duration::from_secs(1));
        stats.max_sliding_window = stats.max_in_sliding_window(Duration::from_secs(1));
        Some(stats)
    }

    fn limits(&self, account_id: &str) -> Limits {
        let settings = self.cfg.accounts.get(account_id);
        let plan = settings
            .and_then(|s| s.plan)
            .unwrap_or(self.cfg.default_plan);
        let capacity = settings
            .and_then(|s| s.capacity_per_second)
            .unwrap_or(plan.per_second());
        let plan_daily = plan
            .per_day()
            .map(|cap| self.cfg.daily_limit.unwrap_or(cap));
        let daily = settings.and_then(|s| s.daily_limit).or(plan_daily);
        Limits {
            plan,
            capacity,
            daily,
        }
    }

    /// Counts a request arriving now toward
    /// `account_id`'s quota and says whether Zoom would serve it.
    ///
    /// The arrival time is read under the lock, so each account's arrivals are in order.
    pub fn admit(&mut self, account_id: &str, started: Instant, today: Date) -> Admission {
        let offset = started.elapsed();
        let limits = self.limits(account_id);
        let account = self.accounts.entry(account_id.to_string()).or_default();
        account.requests += 1;
        account.arrivals.push(offset);
        let window = offset.as_secs();
        if account.window != window {
            account.window = window;
            account.window_count = 0;
        }
        account.window_count += 1;
        if account.day != Some(today) {
            account.day = Some(today);
            account.day_used = 0;
        }
        if let Some(daily) = limits.daily {
            if account.day_used >= daily {
                account.rate_limited_daily += 1;
                return Admission::Daily { limit: daily };
            }
        }
        let plan_limit = limits.plan.per_second();
        if account.window_count > limits.capacity {
            account.rate_limited_qps += 1;
            return Admission::Qps {
                limit: plan_limit,
                next_window: started + Duration::from_secs(window + 1),
            };
        }
        account.day_used += 1;
        if let Some(answer) = account.injected.pop_front() {
            return Admission::Injected {
                limit: plan_limit,
                answer,
            };
        }
        Admission::Admitted {
            limit: plan_limit,
            remaining: limits.capacity - account.window_count,
        }
    }

    /// Records the outcome of a request of a message call: log, counters, account counters.
    pub fn finish(&mut self, record: RequestRecord) {
        self.requests_total += 1;
        *self.by_op.entry(record.op).or_default() += 1;
        match record.status {
            Some(status) => *self.by_status.entry(status).or_default() += 1,
            None => self.resets += 1,
        }
        if let (Some(account_id), Some(status)) = (&record.account_id, record.status) {
            if status == 429 || (200..300).contains(&status) {
                let account = self.accounts.entry(account_id.clone()).or_default();
                if status == 429 {
                    account.rate_limited += 1;
                } else {
                    account.successes += 1;
                }
            }
        }
        if self.cfg.request_log_capacity > 0 {
            while self.log.len() >= self.cfg.request_log_capacity {
                self.log.pop_front();
            }
            self.log.push_back(record);
        }
    }

    /// Whether edits and deletes of `message_id` answer 404 code 8001: configured missing,
    /// or deleted.
    pub fn is_gone(&self, message_id: &str) -> bool {
        let cfg = &self.cfg;
        let missing_prefix = cfg.missing_prefix.as_deref().filter(|p| !p.is_empty());
        cfg.missing_messages.contains(message_id)
            || missing_prefix.is_some_and(|prefix| message_id.starts_with(prefix))
            || self
                .messages
                .get(message_id)
                .is_some_and(|message| message.record.deleted)
    }

    /// Creates the message of a successful send and returns its new id.
    pub fn apply_send(&mut self, body: &serde_json::Value) -> String {
        let message_id = loop {
            let candidate = self.new_message_id();
            // An edit may already have named any string; never hand out one in use.
            if !self.messages.contains_key(&candidate) {
                break candidate;
            }
        };
        let message = self.record_of(&message_id);
        message.record.content = body.get("content").cloned();
        message.record.last_body = Some(body.clone());
        message.record.to_jid = body
            .get("to_jid")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        message_id
    }

    /// An opaque id in one of the two shapes of Zoom's examples, alternating so a client that
    /// assumes either shape finds out: `20191017014024747_XYYRFjM_1` (time, random, count) and
    /// `DWQ2A82E-9220-4600-AFB2-000000000002` (random groups, the count last). The count makes
    /// it unique; the random part keeps a client from guessing it.
    fn new_message_id(&mut self) -> String {
        self.sends_applied += 1;
        let count = self.sends_applied;
        if count % 2 == 1 {
            let time = OffsetDateTime::now_utc()
                .format(format_description!(
                    "[year][month][day][hour][minute][second][subsecond digits:3]"
                ))
                .unwrap_or_default();
            let random = Alphanumeric.sample_string(&mut self.id_rng, 7);
            format!("{time}_{random}_{count}")
        } else {
            let rng = &mut self.id_rng;
            let (a, b, c, d): (u32, u16, u16, u16) =
                (rng.random(), rng.random(), rng.random(), rng.random());
            format!("{a:08X}-{b:04X}-{c:04X}-{d:04X}-{count:012X}")
        }
    }

    /// Applies a successful edit to the message.
    pub fn apply_edit(&mut self, message_id: &str, body: &serde_json::Value) {
        let message = self.record_of(message_id);
        message.record.content = body.get("content").cloned();
        message.record.last_body = Some(body.clone());
        message.record.edits += 1;
    }

    /// Applies a successful delete: edits and deletes of the message now answer 404.
    pub fn apply_delete(&mut self, message_id: &str) {
        self.record_of(message_id).record.deleted = true;
    }

    /// The `to_jid` an edit or delete answer names: the one the message was sent to, or a
    /// stand-in channel for a message sent before the sandbox started.
    pub fn to_jid_of(&self, message_id: &str) -> String {
        self.messages
            .get(message_id)
            .and_then(|message| message.record.to_jid.clone())
            .unwrap_or_else(|| "sandbox-channel@conference.xmpp.zoom.us".to_string())
    }

    /// Issues a token, invalidating the oldest when more than `max_live_tokens` would be live.
    pub fn issue_token(&mut self, token: String, now: Instant) {
        self.tokens.retain(|_, expiry| *expiry > now);
        self.tokens.insert(token.clone(), now + self.cfg.token_ttl);
        self.token_order.push_back(token);
        self.tokens_issued += 1;
        if let Some(max_live) = self.cfg.max_live_tokens {
            while self.tokens.len() > max_live.max(1) {
                match self.token_order.pop_front() {
                    Some(oldest) => self.tokens.remove(&oldest),
                    None => break,
                };
            }
        }
        // Keep the order queue from growing without bound once tokens expire.
        self.token_order.retain(|t| self.tokens.contains_key(t));
    }

    pub fn token_is_live(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|expiry| *expiry > now)
    }
}
