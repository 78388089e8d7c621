//! Per-account pacing: how fast, and whether at all, the dispatcher may send the next request
//! for a Zoom account. The dispatcher asks [`Limiters::try_acquire`] before each request and
//! reports Zoom's verdict back through [`Limiters::on_success`] / [`Limiters::on_rate_limited`].
//!
//! Zoom limits each account, shared with every other app on it, without saying whether its
//! one-second window is fixed or sliding. So each account gets its own [`pacer`]: grants evenly
//! spaced at the account's rate, late ones caught up, and never more than the limit in any
//! window a little longer than a second (the rule and why governor alone cannot express it are
//! in that module). On top of that:
//! - a per-second 429 lowers the rate, which returns quickly to just below the rate that drew
//!   the 429 and then probes slowly upward ([`adapt`]), measured on the monotonic clock;
//! - a Retry-After pauses the account until then (at most two days); a daily 429 without one
//!   pauses it until the next 00:00 UTC;
//! - on plans with a daily cap, grants are counted per UTC day and held once the cap is reached.
//!
//! Accounts are independent: nothing one account does changes another's pacing.
//!
//! Not here: retry delays of failed jobs (`retry`), parsing Zoom's headers (`zoom`), choosing
//! which account to serve next (`dispatch`), and exporting metrics (callers read
//! [`Limiters::snapshot`]). No locking either: the owner wraps `Limiters` in its own mutex.

mod account;
mod adapt;
mod pacer;
mod utc;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use governor::clock::{Clock, MonotonicClock};

use crate::config::Config;

use self::account::Account;

/// What an account may use at most.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AccountPolicy {
    /// Zoom's limit for the account, requests per second (the plan's, or a configured `rate`):
    /// no window of one second ever holds more requests than this, rounded up.
    pub limit: f64,
    /// The rate requests are paced at when nothing slows them down: `limit` times
    /// `delivery.rate_margin`. Fractional rates are fine.
    pub rate: f64,
    /// Requests per UTC day, for plans with a daily cap.
    pub daily_limit: Option<u32>,
}

/// Which of Zoom's limits a 429 reports (`X-RateLimit-Type: QPS` or `Daily-limit`). A 429
/// without that header should be taken as [`LimitKind::Qps`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// The per-second limit: slow down.
    Qps,
    /// The per-day limit: stop until Retry-After or the next 00:00 UTC.
    Daily,
}

/// A point-in-time view for metrics and health.
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterSnapshot {
    /// Sum of the current rates of the accounts that are not paused.
    pub total_rate: f64,
    /// Tracked accounts held by a pause or their daily cap.
    pub paused: usize,
    /// Tracked accounts that are not paused.
    pub active: usize,
    /// Every tracked account, sorted by id.
    pub per_account: Vec<AccountView>,
}

/// One tracked account in a [`LimiterSnapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct AccountView {
    pub account_id: String,
    /// Zoom's limit, requests per second.
    pub limit: f64,
    /// The rate the pacer runs at now (below the policy rate after a 429).
    pub rate: f64,
    /// Held by a Retry-After, a daily 429 or the daily cap.
    pub paused: bool,
    /// Requests Zoom accepted per second, over the last ten whole seconds.
    pub delivered: f64,
}

type PolicyFn = dyn Fn(&str) -> AccountPolicy + Send + Sync;

/// The pacing state of every account in use. Accounts appear on first use and go away through
/// [`Limiters::release_idle`].
pub struct Limiters<C: Clock = MonotonicClock> {
    /// Shared by every account's governor limiter; a fake clock in tests.
    clock: C,
    /// Consulted once per account, when its state is created (again after a release).
    policy: Box<PolicyFn>,
    /// How long an account may go without calls before its state is dropped.
    idle_release: Duration,
    accounts: HashMap<String, Account<C>>,
}

impl Limiters<MonotonicClock> {
    /// The production limiters: rates and daily caps from the config, released after
    /// `delivery.account_idle`.
    pub fn from_config(config: &Config) -> Self {
        let config = config.clone();
        let idle_release = config.delivery.account_idle;
        Limiters::new(
            MonotonicClock,
            move |account| AccountPolicy {
                limit: config.account_limit(account),
                rate: config.account_rate(account),
                daily_limit: config.account_daily_limit(account),
            },
            idle_release,
        )
    }
}

impl<C: Clock + Clone> Limiters<C> {
    pub fn new(
        clock: C,
        policy: impl Fn(&str) -> AccountPolicy + Send + Sync + 'static,
        idle_release: Duration,
    ) -> Self {
        Limiters {
            clock,
            policy: Box::new(policy),
            idle_release,
            accounts: HashMap::new(),
        }
    }

    /// Takes one request slot for `account` if allowed now, returning its instant (pass it to
    /// [`Limiters::on_rate_limited`] if Zoom answers that request with a 429). `Err(wait)` says
    /// how long until it might be: the pacing interval, a Retry-After pause, or the daily-cap
    /// hold until the next 00:00 UTC, whichever is longest. The wait is never zero.
    pub fn try_acquire(
        &mut self,
        account: &str,
        now_utc: SystemTime,
    ) -> Result<C::Instant, Duration> {
        let (state, clock) = self.account(account, now_utc);
        state.try_acquire(clock, now_utc)
    }

    /// Zoom accepted a request: let a lowered rate recover toward the policy rate.
    pub fn on_success(&mut self, account: &str) {
        // An account without state runs at its policy rate already.
        if let Some(state) = self.accounts.get_mut(account) {
            state.on_success(&self.clock);
        }
    }

    /// Zoom answered 429 to the request granted at `sent_at` (`None`: unknown). `retry_after`
    /// is the absolute time from the Retry-After header, if any.
    pub fn on_rate_limited(
        &mut self,
        account: &str,
        kind: LimitKind,
        retry_after: Option<SystemTime>,
        sent_at: Option<C::Instant>,
        now_utc: SystemTime,
    ) {
        tracing::debug!(account, ?kind, ?retry_after, "rate limited by Zoom");
        let (state, clock) = self.account(account, now_utc);
        state.on_rate_limited(kind, retry_after, sent_at, clock, now_utc);
    }

    /// Drops the state of accounts unused for `idle_release`, keeping memory bounded with many
    /// accounts. An account is kept past that while it is paused, while its daily count for
    /// the current UTC day matters, and until a lowered rate has recovered, so releasing never
    /// forgets a limit Zoom imposed.
    pub fn release_idle(&mut self) {
        let now = self.clock.now();
        let idle_release = self.idle_release;
        self.accounts
            .retain(|_, state| now < state.retain_until(idle_release));
    }

    pub fn snapshot(&self, now_utc: SystemTime) -> LimiterSnapshot {
        let now = self.clock.now();
        let mut per_account: Vec<AccountView> = self
            .accounts
            .iter()
            .map(|(id, state)| AccountView {
                account_id: id.clone(),
                limit: state.policy().limit,
                rate: state.rate(),
                paused: state.is_paused(now_utc),
                delivered: state.delivered_rate(now),
            })
            .collect();
        per_account.sort_by(|a, b| a.account_id.cmp(&b.account_id));
        let paused = per_account.iter().filter(|view| view.paused).count();
        let total_rate = per_account
            .iter()
            .filter(|view| !view.paused)
            .map(|view| view.rate)
            .fold(0.0, |sum, rate| sum + rate);
        LimiterSnapshot {
            total_rate,
            paused,
            active: per_account.len() - paused,
            per_account,
        }
    }

    /// The current rate of a tracked account; `None` if it has no state (never used or released).
    pub fn rate_of(&self, account: &str) -> Option<f64> {
        self.accounts.get(account).map(|state| state.rate())
    }

    /// How `account` is paced now; for an account without state, its policy at rest.
    pub fn view_of(&self, account: &str, now_utc: SystemTime) -> AccountView {
        match self.accounts.get(account) {
            Some(state) => AccountView {
                account_id: account.to_string(),
                limit: state.policy().limit,
                rate: state.rate(),
                paused: state.is_paused(now_utc),
                delivered: state.delivered_rate(self.clock.now()),
            },
            None => {
                let policy = (self.policy)(account);
                AccountView {
                    account_id: account.to_string(),
                    limit: policy.limit,
                    rate: policy.rate,
                    paused: false,
                    delivered: 0.0,
                }
            }
        }
    }

    /// The state of `account`, created on first use, and the clock to drive it with.
    fn account(&mut self, account: &str, now_utc: SystemTime) -> (&mut Account<C>, &C) {
        // `entry` would need an owned key on every call; allocate only for a new account.
        if !self.accounts.contains_key(account) {
            let state = Account::new((self.policy)(account), &self.clock, now_utc);
            self.accounts.insert(account.to_string(), state);
        }
        let state = self
            .accounts
            .get_mut(account)
            .expect("account state was just ensured");
        (state, &self.clock)
    }
}

impl<C: Clock> fmt::Debug for Limiters<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiters")
            .field("idle_release", &self.idle_release)
            .field("accounts", &self.accounts)
            .finish_non_exhaustive()
    }
}
