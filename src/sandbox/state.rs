//! The sandbox's shared state and what it lets tests observe.
//!
//! One `std::sync::Mutex` guards everything: every critical section is a few map lookups and
//! counter bumps, never held across an `.await`, so a blocking mutex is cheaper than an async
//! one and keeps the handle's accessors synchronous. This module owns the quota arithmetic
//! (fixed windows, daily caps) and the in-flight counters behind the concurrency high-water
//! marks; it does not decide the order of checks or build HTTP responses (see `http.rs`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
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
    pub scripts: HashMap<String, VecDeque<Scripted>>,
    pub log: VecDeque<RequestRecord>,
    pub requests_total: u64,
    pub by_status: BTreeMap<u16, u64>,
    pub resets: u64,
}

pub(crate) struct MessageState {
    pub record: MessageRecord,
    pub in_flight: u32,
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
        Shared {
            started: Instant::now(),
            addr,
            cancel,
            inner: Mutex::new(State {
                cfg,
                rng,
                tokens: HashMap::new(),
                token_order: VecDeque::new(),
                token_requests: 0,
                tokens_issued: 0,
                token_in_flight: 0,
                token_max_concurrent: 0,
                messages: HashMap::new(),
                accounts: HashMap::new(),
                scripts: HashMap::new(),
                log: VecDeque::new(),
                requests_total: 0,
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
        let message = state
            .messages
            .entry(message_id.to_string())
            .or_insert_with(|| MessageState {
                record: MessageRecord {
                    message_id: message_id.to_string(),
                    content: None,
                    last_body: None,
                    edits: 0,
                    requests: 0,
                    max_concurrent: 0,
                },
                in_flight: 0,
            });
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

    /// Records the outcome of an edit request: log, status counters, account counters.
    pub fn finish(&mut self, record: RequestRecord) {
        self.requests_total += 1;
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

    /// Applies a successful edit to the message.
    pub fn apply_edit(&mut self, message_id: &str, body: &serde_json::Value) {
        if let Some(message) = self.messages.get_mut(message_id) {
            message.record.content = body.get("content").cloned();
            message.record.last_body = Some(body.clone());
            message.record.edits += 1;
        }
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
