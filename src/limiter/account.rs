//! One account's pacing state: the governor limiter that spaces requests evenly, the adaptive
//! rate (multiplicative decrease on a per-second 429, additive recovery), pauses (Retry-After,
//! daily 429) and the per-UTC-day request count of plans with a daily cap.
//!
//! It knows nothing of other accounts, of the map that holds it, or of HTTP: [`super::Limiters`]
//! owns the map and the clock, and the caller translates Zoom's responses into calls here.
//!
//! Two clocks are in play on purpose. Pacing and recovery use the injected monotonic clock `C`,
//! so a wall-clock step never bursts or stalls requests. Pauses and the daily count use the
//! caller's `now_utc`, because Zoom states them in wall-clock terms (an absolute Retry-After, a
//! reset at 00:00 UTC). Each wall-clock deadline is also mirrored onto the monotonic clock, only
//! to decide when the state may be released.

use std::time::{Duration, SystemTime};

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use super::{utc, AccountPolicy, LimitKind};

/// The longest pause a Retry-After may impose; a later time is taken as a bogus header.
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(2 * 86_400);

/// Rates outside this range are clamped before building a limiter (config validation already
/// keeps them in 0..=10000, this only guards the interval arithmetic).
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1_000_000.0;
/// The adaptive rate never goes below `max(ABSOLUTE_FLOOR, policy * POLICY_FRACTION)` (nor above
/// the policy); recovery adds `policy * INCREASE_FRACTION` per second without a 429.
const ABSOLUTE_FLOOR: f64 = 0.2;
const POLICY_FRACTION: f64 = 1.0 / 20.0;
/// A QPS 429 multiplies the rate by this. Gentler than halving: when another app takes a
/// steady share of the account's quota, the rate saw-tooths just under the share that is left
/// instead of spending half its time at half of it (measured: benches/drain.rs `shared`).
const DECREASE_FACTOR: f64 = 0.8;
/// Recovery per 429-free second, as a share of the policy rate: slow enough that the probing
/// above the free share costs few 429s.
const INCREASE_FRACTION: f64 = 1.0 / 40.0;
/// 429s arriving this soon after a decrease answer requests sent at the old rate, so they do not
/// halve the rate again (a burst of in-flight 429s would otherwise drop it straight to the floor).
const DECREASE_GUARD: Duration = Duration::from_secs(1);
/// Bounds every offset added to a monotonic instant, so absurd settings cannot overflow it.
const MAX_OFFSET: Duration = Duration::from_secs(10 * 365 * 86_400);

type Pacer<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub(super) struct Account<C: Clock> {
    /// The configured ceiling, read once when the state is created.
    policy: AccountPolicy,
    /// The rate `pacer` is built for: the policy rate, or less after a 429.
    rate: f64,
    /// Governor limiter with burst 1 and period `1/rate`; replaced whenever `rate` changes.
    pacer: Pacer<C>,
    /// No grant before this instant. Set after a rebuild (a fresh governor limiter would grant
    /// at once, so this keeps `last grant + new interval`) and after a 429 (one interval).
    hold_until: Option<C::Instant>,
    last_grant: Option<C::Instant>,
    /// Present while the rate is below the policy: the rate right after the last 429 and the
    /// instant from which 429-free time counts (after any pause).
    recovery: Option<Recovery<C::Instant>>,
    last_decrease: Option<C::Instant>,
    /// Wall-clock end of a Retry-After or daily-429 pause; `pause_ends` mirrors it.
    paused_until: Option<SystemTime>,
    pause_ends: Option<C::Instant>,
    /// UTC day of `granted_today`; `day_ends` mirrors its end while a daily cap applies.
    day: u64,
    granted_today: u32,
    day_ends: Option<C::Instant>,
    /// Last call of any kind for this account; idle release counts from here.
    last_used: C::Instant,
}

struct Recovery<I> {
    base: f64,
    from: I,
}

impl<C: Clock + Clone> Account<C> {
    pub(super) fn new(policy: AccountPolicy, clock: &C, now_utc: SystemTime) -> Self {
        let policy = AccountPolicy {
            rate: sanitize(policy.rate),
            daily_limit: policy.daily_limit,
        };
        Account {
            rate: policy.rate,
            pacer: pacer(policy.rate, clock),
            policy,
            hold_until: None,
            last_grant: None,
            recovery: None,
            last_decrease: None,
            paused_until: None,
            pause_ends: None,
            day: utc::day_number(now_utc),
            granted_today: 0,
            day_ends: None,
            last_used: clock.now(),
        }
    }

    pub(super) fn try_acquire(&mut self, clock: &C, now_utc: SystemTime) -> Result<(), Duration> {
        let now = clock.now();
        self.last_used = now;
        // Collect every reason to wait and report the longest, so the caller does not wake up
        // just to hit the next one.
        let mut wait = Duration::ZERO;
        if let Some(until) = self.paused_until {
            match until.duration_since(now_utc) {
                Ok(left) if !left.is_zero() => wait = left,
                _ => self.paused_until = None,
            }
        }
        self.roll_day(now_utc);
        if self.daily_cap_reached() {
            wait = wait.max(utc::until_next_midnight(now_utc));
        }
        if let Some(hold) = self.hold_until {
            if hold > now {
                wait = wait.max(hold.duration_since(now).into());
            } else {
                self.hold_until = None;
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        // Only now ask governor: a positive answer consumes the slot.
        if let Err(not_until) = self.pacer.check() {
            return Err(not_until
                .wait_time_from(clock.now())
                .max(Duration::from_nanos(1)));
        }
        self.last_grant = Some(now);
        self.granted_today += 1;
        if let Some(limit) = self.policy.daily_limit {
            self.day_ends = Some(later(now, utc::until_next_midnight(now_utc)));
            if self.granted_today == limit {
                tracing::info!(
                    limit,
                    "daily request limit reached; holding until 00:00 UTC"
                );
            }
        }
        Ok(())
    }

    /// Additive increase: the rate grows by `policy/20` per second since the last 429 (or the
    /// end of its pause), never above the policy. Applied here, on success, so the rate only
    /// rises while Zoom keeps accepting.
    pub(super) fn on_success(&mut self, clock: &C) {
        let now = clock.now();
        self.last_used = now;
        let Some(recovery) = &self.recovery else {
            return;
        };
        let recovered = Duration::from(now.duration_since(recovery.from)).as_secs_f64();
        let target = recovery.base + self.step() * recovered;
        if target >= self.policy.rate {
            self.recovery = None;
            self.rebuild(self.policy.rate, clock);
        } else if target > self.rate {
            self.rebuild(target, clock);
        }
    }

    pub(super) fn on_rate_limited(
        &mut self,
        kind: LimitKind,
        retry_after: Option<SystemTime>,
        clock: &C,
        now_utc: SystemTime,
    ) {
        let now = clock.now();
        self.last_used = now;
        let pause_until = match (kind, retry_after) {
            (_, Some(at)) => Some(at.min(now_utc + MAX_PAUSE)),
            (LimitKind::Daily, None) => Some(now_utc + utc::until_next_midnight(now_utc)),
            (LimitKind::Qps, None) => None,
        };
        // A Retry-After in the past (clock skew) imposes no pause; the hold below still applies.
        let pause = pause_until
            .and_then(|until| until.duration_since(now_utc).ok())
            .unwrap_or_default();
        if !pause.is_zero() {
            let until = now_utc + pause;
            self.paused_until = Some(self.paused_until.map_or(until, |old| old.max(until)));
            let ends = later(now, pause);
            self.pause_ends = Some(self.pause_ends.map_or(ends, |old| old.max(ends)));
        }
        if kind == LimitKind::Qps {
            self.decrease(clock, later(now, pause));
        }
        // The rate may have dropped: wait at least one (new) interval before the next request.
        self.hold(later(now, interval(self.rate)));
    }

    /// When this state may be dropped: after `idle` without calls, but never while paused,
    /// while a daily count for the current UTC day must be kept, or before the rate recovered.
    pub(super) fn retain_until(&self, idle: Duration) -> C::Instant {
        let mut until = later(self.last_used, idle);
        for deadline in [self.pause_ends, self.day_ends, self.hold_until]
            .into_iter()
            .flatten()
        {
            until = until.max(deadline);
        }
        if let Some(recovery) = &self.recovery {
            let seconds = ((self.policy.rate - recovery.base) / self.step()).max(0.0);
            until = until.max(later(recovery.from, Duration::from_secs_f64(seconds)));
        }
        until
    }

    pub(super) fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether a request would be held now for a pause or the daily cap (not for pacing).
    pub(super) fn is_paused(&self, now_utc: SystemTime) -> bool {
        let paused = self.paused_until.is_some_and(|until| until > now_utc);
        let capped = utc::day_number(now_utc) <= self.day && self.daily_cap_reached();
        paused || capped
    }

    /// Multiplicative decrease, at most once per [`DECREASE_GUARD`]; either way the 429 restarts
    /// the 429-free time that recovery counts, from `recover_from`.
    fn decrease(&mut self, clock: &C, recover_from: C::Instant) {
        let now = clock.now();
        let recent = self
            .last_decrease
            .is_some_and(|at| Duration::from(now.duration_since(at)) < DECREASE_GUARD);
        if !recent {
            self.last_decrease = Some(now);
            let floor = (self.policy.rate * POLICY_FRACTION)
                .max(ABSOLUTE_FLOOR)
                .min(self.policy.rate);
            let decreased = (self.rate * DECREASE_FACTOR).max(floor);
            if decreased < self.rate {
                tracing::debug!(
                    from = self.rate,
                    to = decreased,
                    "429: lowering account rate"
                );
                self.rebuild(decreased, clock);
            }
        }
        if self.rate < self.policy.rate {
            self.recovery = Some(Recovery {
                base: self.rate,
                from: recover_from,
            });
        }
    }

    /// Replaces the governor limiter for `rate`. A fresh limiter would grant at once, so hold
    /// the next grant until `last grant + new interval`: a rebuild never adds a request.
    fn rebuild(&mut self, rate: f64, clock: &C) {
        self.rate = rate;
        self.pacer = pacer(rate, clock);
        if let Some(last_grant) = self.last_grant {
            self.hold(later(last_grant, interval(rate)));
        }
    }

    fn hold(&mut self, until: C::Instant) {
        self.hold_until = Some(self.hold_until.map_or(until, |old| old.max(until)));
    }

    /// Starts a new count at 00:00 UTC. A wall clock stepping back into an earlier day keeps the
    /// count, which errs toward holding requests rather than exceeding Zoom's cap.
    fn roll_day(&mut self, now_utc: SystemTime) {
        let today = utc::day_number(now_utc);
        if today > self.day {
            self.day = today;
            self.granted_today = 0;
            self.day_ends = None;
        }
    }

    fn daily_cap_reached(&self) -> bool {
        self.policy
            .daily_limit
            .is_some_and(|limit| self.granted_today >= limit)
    }

    fn step(&self) -> f64 {
        self.policy.rate * INCREASE_FRACTION
    }
}

impl<C: Clock> std::fmt::Debug for Account<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("policy", &self.policy)
            .field("rate", &self.rate)
            .field("recovering", &self.recovery.is_some())
            .field("paused_until", &self.paused_until)
            .field("granted_today", &self.granted_today)
            .finish_non_exhaustive()
    }
}

fn sanitize(rate: f64) -> f64 {
    if rate.is_nan() {
        MIN_RATE
    } else {
        rate.clamp(MIN_RATE, MAX_RATE)
    }
}

/// The spacing between grants at `rate`, rounded *up* to whole nanoseconds: rounding down would
/// let e.g. 3/s put a fourth grant just inside one second.
fn interval(rate: f64) -> Duration {
    Duration::from_nanos((1e9 / sanitize(rate)).ceil() as u64)
}

fn pacer<C: Clock + Clone>(rate: f64, clock: &C) -> Pacer<C> {
    let quota = Quota::with_period(interval(rate))
        .expect("interval is at least one nanosecond")
        .allow_burst(std::num::NonZeroU32::MIN);
    RateLimiter::direct_with_clock(quota, clock.clone())
}

fn later<I: Reference>(at: I, by: Duration) -> I {
    at + Nanos::from(by.min(MAX_OFFSET))
}
