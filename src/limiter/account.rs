//! One account's pacing state: the [`Pacer`] that spaces its requests, the adaptive rate after a
//! per-second 429 ([`Recovery`]), pauses (Retry-After, daily 429), the per-UTC-day request count
//! of plans with a daily cap, and the delivered rate shown to operators.
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

use super::adapt::Recovery;
use super::pacer::{later, latest, sanitize, Pacer};
use super::{utc, AccountPolicy, LimitKind};

/// The longest pause a Retry-After may impose; a later time is taken as a bogus header.
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(2 * 86_400);
/// A second QPS 429 this soon after the one that lowered the rate does not lower it again (it
/// may answer a request sent before): it means Zoom's window is still full, so the account
/// waits until this long after the first, by when any one-second window, fixed or sliding, has
/// moved past the requests that filled it.
const REPEAT_GUARD: Duration = Duration::from_secs(1);
/// Recovery raises the rate in steps of at least this share of the policy rate (each step
/// rebuilds the pacer), except for the last step to the policy rate.
const RECOVERY_STEP: f64 = 0.01;
/// The delivered rate is averaged over this many whole seconds.
const DELIVERED_SECONDS: usize = 10;

pub(super) struct Account<C: Clock> {
    /// The configured ceiling, read once when the state is created.
    policy: AccountPolicy,
    /// The rate `pacer` runs at: the policy rate, or less after a 429.
    rate: f64,
    pacer: Pacer<C>,
    /// Present while the rate is below the policy after a 429, with the instant from which the
    /// recovery curve counts (after any pause).
    recovery: Option<(Recovery, C::Instant)>,
    last_decrease: Option<C::Instant>,
    /// 429s for requests sent after `last_decrease`, within [`REPEAT_GUARD`] of it.
    repeats: u32,
    /// No grant before this instant: set by a repeated 429 (see [`REPEAT_GUARD`]).
    hold_until: Option<C::Instant>,
    /// Wall-clock end of a Retry-After or daily-429 pause; `pause_ends` mirrors it.
    paused_until: Option<SystemTime>,
    pause_ends: Option<C::Instant>,
    /// UTC day of `granted_today`; `day_ends` mirrors its end while a daily cap applies.
    day: u64,
    granted_today: u32,
    day_ends: Option<C::Instant>,
    delivered: Delivered<C::Instant>,
    /// Last call of any kind for this account; idle release counts from here.
    last_used: C::Instant,
}

impl<C: Clock + Clone> Account<C> {
    pub(super) fn new(policy: AccountPolicy, clock: &C, now_utc: SystemTime) -> Self {
        let policy = AccountPolicy {
            limit: sanitize(policy.limit),
            rate: sanitize(policy.rate),
            daily_limit: policy.daily_limit,
        };
        let now = clock.now();
        Account {
            rate: policy.rate,
            pacer: Pacer::new(policy.limit, policy.rate, clock),
            policy,
            recovery: None,
            last_decrease: None,
            repeats: 0,
            hold_until: None,
            paused_until: None,
            pause_ends: None,
            day: utc::day_number(now_utc),
            granted_today: 0,
            day_ends: None,
            delivered: Delivered::new(now),
            last_used: now,
        }
    }

    /// Takes a request slot, returning its instant (hand it back with a 429 for that request),
    /// or says how long to wait.
    pub(super) fn try_acquire(
        &mut self,
        clock: &C,
        now_utc: SystemTime,
    ) -> Result<C::Instant, Duration> {
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
        self.pacer.try_grant(now)?;
        if let Some(limit) = self.policy.daily_limit {
            self.granted_today = self.granted_today.saturating_add(1);
            self.day_ends = Some(later(now, utc::until_next_midnight(now_utc)));
            if self.granted_today == limit {
                tracing::info!(
                    limit,
                    "daily request limit reached; holding until 00:00 UTC"
                );
            }
        }
        Ok(now)
    }

    /// Zoom accepted a request: count it, and let a lowered rate follow its recovery curve.
    /// Applied here, on success, so the rate only rises while Zoom keeps accepting.
    pub(super) fn on_success(&mut self, clock: &C) {
        let now = clock.now();
        self.last_used = now;
        self.delivered.count(now);
        let Some((recovery, from)) = self.recovery else {
            return;
        };
        let elapsed = if now > from {
            Duration::from(now.duration_since(from))
        } else {
            Duration::ZERO
        };
        let target = recovery.rate_at(elapsed);
        if target >= self.policy.rate {
            self.recovery = None;
            self.rate = self.policy.rate;
            self.pacer.speed_up(self.policy.rate);
        } else if target >= self.rate + self.policy.rate * RECOVERY_STEP {
            self.rate = target;
            self.pacer.speed_up(target);
        }
    }

    /// Zoom answered 429 to the request granted at `sent_at`.
    pub(super) fn on_rate_limited(
        &mut self,
        kind: LimitKind,
        retry_after: Option<SystemTime>,
        sent_at: Option<C::Instant>,
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
        // A Retry-After in the past (clock skew) imposes no pause.
        let pause = pause_until
            .and_then(|until| until.duration_since(now_utc).ok())
            .unwrap_or_default();
        if !pause.is_zero() {
            let until = now_utc + pause;
            self.paused_until = Some(latest(self.paused_until, until));
            let ends = later(now, pause);
            self.pause_ends = Some(latest(self.pause_ends, ends));
        }
        if kind == LimitKind::Daily {
            self.pacer.slow_down(self.rate, now);
            return;
        }
        // A 429 for a request sent before the last decrease was already answered by it: with
        // several requests in flight, one overflow comes back as several 429s.
        let answered = match (sent_at, self.last_decrease) {
            (Some(sent), Some(decreased)) => sent <= decreased,
            _ => false,
        };
        if answered {
            return;
        }
        let repeated = self
            .last_decrease
            .filter(|at| Duration::from(now.duration_since(*at)) < REPEAT_GUARD);
        match repeated {
            // Sent after the decrease and still refused: Zoom's window is still full. Wait,
            // twice as long each time, but never past a second after the decrease, when any
            // window, fixed or sliding, has passed; the rate stays, since a full window says
            // nothing new about it. (Waiting the whole second at once would throw away the
            // start of the next fixed window.)
            Some(first) => {
                self.repeats = (self.repeats + 1).min(16);
                let backoff = self.pacer.interval() * (1u32 << self.repeats);
                let until = later(now, backoff).min(later(first, REPEAT_GUARD));
                self.hold_until = Some(latest(self.hold_until, until));
                self.pacer.slow_down(self.rate, now);
                // The way back starts when sending does again.
                if let Some((_, from)) = &mut self.recovery {
                    *from = (*from).max(until);
                }
            }
            None => {
                self.last_decrease = Some(now);
                self.repeats = 0;
                let previous = self.recovery.map(|(recovery, _)| recovery.ceiling);
                let recovery = Recovery::after_429(self.policy.rate, self.rate, previous);
                tracing::debug!(
                    from = self.rate,
                    to = recovery.base,
                    ceiling = recovery.ceiling,
                    "429: lowering account rate"
                );
                self.recovery = Some((recovery, later(now, pause)));
                self.rate = recovery.base;
                self.pacer.slow_down(recovery.base, now);
            }
        }
    }

    /// When this state may be dropped: after `idle` without calls, but never while paused,
    /// while a daily count for the current UTC day must be kept, or before the rate recovered.
    pub(super) fn retain_until(&self, idle: Duration) -> C::Instant {
        // Never before the pacer's memory of recent grants has lapsed, whatever `idle` says:
        // a fresh pacer would forget them and could crowd one window.
        let mut until = later(self.last_used, idle.max(self.pacer.memory()));
        for deadline in [self.pause_ends, self.day_ends, self.hold_until]
            .into_iter()
            .flatten()
        {
            until = until.max(deadline);
        }
        if let Some((recovery, from)) = &self.recovery {
            until = until.max(later(*from, recovery.duration()));
        }
        until
    }

    pub(super) fn policy(&self) -> AccountPolicy {
        self.policy
    }

    pub(super) fn rate(&self) -> f64 {
        self.rate
    }

    /// Requests Zoom accepted per second over the last whole seconds.
    pub(super) fn delivered_rate(&self, now: C::Instant) -> f64 {
        self.delivered.rate(now)
    }

    /// Whether a request would be held now for a pause or the daily cap (not for pacing).
    pub(super) fn is_paused(&self, now_utc: SystemTime) -> bool {
        let paused = self.paused_until.is_some_and(|until| until > now_utc);
        let capped = utc::day_number(now_utc) <= self.day && self.daily_cap_reached();
        paused || capped
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

/// Deliveries per whole second of the monotonic clock, for the last [`DELIVERED_SECONDS`].
struct Delivered<I> {
    origin: I,
    /// Counts of the seconds `second - DELIVERED_SECONDS + 1 ..= second`, by `second % len`.
    counts: [u32; DELIVERED_SECONDS + 1],
    second: u64,
}

impl<I: Reference> Delivered<I> {
    fn new(origin: I) -> Self {
        Delivered {
            origin,
            counts: [0; DELIVERED_SECONDS + 1],
            second: 0,
        }
    }

    fn second_of(&self, now: I) -> u64 {
        if now > self.origin {
            Duration::from(now.duration_since(self.origin)).as_secs()
        } else {
            0
        }
    }

    /// Moves to `second`, zeroing the seconds skipped on the way.
    fn advance(&mut self, second: u64) {
        let len = self.counts.len() as u64;
        if second > self.second {
            for s in (self.second + 1)..=second.min(self.second + len) {
                self.counts[(s % len) as usize] = 0;
            }
            self.second = second;
        }
    }

    fn count(&mut self, now: I) {
        let second = self.second_of(now);
        self.advance(second);
        let len = self.counts.len() as u64;
        self.counts[(self.second % len) as usize] += 1;
    }

    /// The mean over the whole seconds before the current one (at most [`DELIVERED_SECONDS`]).
    fn rate(&self, now: I) -> f64 {
        let current = self.second_of(now).max(self.second);
        let whole = (current as usize).min(DELIVERED_SECONDS);
        if whole == 0 {
            return 0.0;
        }
        let len = self.counts.len() as u64;
        let sum: u64 = (current - whole as u64..current)
            .filter(|s| *s + len > self.second && *s <= self.second)
            .map(|s| u64::from(self.counts[(s % len) as usize]))
            .sum();
        sum as f64 / whole as f64
    }
}
