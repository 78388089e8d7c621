//! The pacing rule of one account: when its next request may go, at the rate it runs at now.
//!
//! Zoom counts an account's requests per second without saying whether its window is aligned
//! to wall-clock seconds or slides, and its clock sees our requests a few milliseconds late,
//! with jitter. So the rule is "evenly spaced at `rate`, never more than the limit in any
//! window a little longer than one second", made of three parts:
//!
//! 1. **Grid with bounded catch-up** (governor's GCRA, burst `k`): grants fall on a grid
//!    `1/rate` apart. A grant that comes late (a timer that fired late, a busy runtime) does not
//!    shift the grid: the next ones catch up, as long as the lag is under [`CATCH_UP`]. This is
//!    what GCRA with a burst of `k` cells means, and governor does it exactly. With burst 1 (the
//!    earlier design) every late wake-up was lost for good: a 16.7 ms interval fired about 1.6 ms
//!    late on average, so Business drained at 89% of its limit.
//! 2. **No bursts**: two grants are never closer than half an interval, so catching up spreads
//!    out instead of leaving in one burst. And only lateness is caught up: GCRA also hands out
//!    credit after a spell with nothing to send, so a grant that was not preceded by a refusal
//!    (the caller had no work) and comes more than an interval after the last one starts a
//!    fresh grid instead.
//! 3. **Window cap**: at most `ceil(limit)` grants in any window of [`WINDOW`] (one second plus
//!    [`WINDOW_GUARD`]), checked against a log of the last grants. This is Zoom's own rule with a
//!    guard for arrival jitter, and it holds for windows of any phase, so for fixed and sliding
//!    windows alike. GCRA cannot express it: a GCRA that allows any catch-up at all lets up to
//!    `2k - 1` grants into one window; only a log of send times bounds the count in every window.
//!    A busy spell's first grant counts [`START_GUARD`] later, in case it reaches Zoom late.
//!
//! In steady state only rule 1 binds, and the grid's spacing (the rate, `limit` times
//! `delivery.rate_margin`) keeps `limit + 1` consecutive grants 1/margin seconds apart: 5 ms of
//! slack for arrival jitter at the default 0.995. While catching up, rule 3 keeps at least
//! [`WINDOW_GUARD`] of it.
//!
//! Time is the injected monotonic clock only: a wall-clock step changes nothing here.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// How far behind its grid the pacer may fall and still catch up (rule 1). Longer stalls are
/// not made up: after them the grid restarts, which costs capacity but never adds a burst.
pub(super) const CATCH_UP: Duration = Duration::from_millis(100);
/// The first request of a busy spell often reaches Zoom later than the others (it may wait for
/// a connection to open), which would crowd the spell's first second at Zoom's end. So rule 3
/// counts a spell's first grant as if it had come this much later; where that delays the
/// grant that completes the spell's first window, the grid restarts there (instead of catching
/// up, which the following windows would echo). Spells shorter than `limit + 1` requests in
/// their first second, and sparse traffic, never notice.
pub(super) const START_GUARD: Duration = Duration::from_millis(50);
/// Rule 3's margin over one second: the least slack any `limit + 1` grants keep for jitter
/// between our send times and Zoom's arrival times.
pub(super) const WINDOW_GUARD: Duration = Duration::from_millis(2);
pub(super) const WINDOW: Duration =
    Duration::from_nanos(1_000_000_000 + WINDOW_GUARD.as_nanos() as u64);

/// Rates outside this range are clamped before building a limiter (config validation already
/// keeps them in 0..=10000, this only guards the interval arithmetic).
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1_000_000.0;

type Gcra<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

pub(super) struct Pacer<C: Clock> {
    clock: C,
    /// Rule 3's count: `ceil(limit)`.
    window_count: usize,
    /// The grid's spacing, `1/rate` rounded up to whole nanoseconds.
    interval: Duration,
    /// Rule 1. Rebuilt at every rate change and fresh grid (a governor quota is fixed).
    gcra: Gcra<C>,
    /// Instants of the last `window_count` grants, oldest first (rules 2 and 3).
    recent: VecDeque<C::Instant>,
    /// No grant before this instant: after a rate change (see [`Pacer::slow_down`] and
    /// [`Pacer::speed_up`]). Cleared by the next grant.
    hold: Option<C::Instant>,
    /// Grants since the current busy spell began, counted up to `window_count + 1`.
    spell_grants: usize,
    /// Set when [`START_GUARD`] holds a grant back: the grid restarts at that grant.
    regrid: bool,
    /// Whether the caller was refused since the last grant: then a late grant is lateness to
    /// catch up; otherwise the caller had nothing to send, and there is nothing to catch up.
    refused: bool,
}

impl<C: Clock + Clone> Pacer<C> {
    /// A pacer for an account whose limit is `limit` requests per second, running at `rate`.
    /// The first request may go at once.
    pub(super) fn new(limit: f64, rate: f64, clock: &C) -> Self {
        let window_count = (sanitize(limit) - 1e-9).ceil().max(1.0) as usize;
        let interval = interval(rate);
        let mut pacer = Pacer {
            clock: clock.clone(),
            window_count,
            interval,
            gcra: gcra(interval, clock),
            recent: VecDeque::with_capacity(window_count.min(64)),
            hold: None,
            spell_grants: 0,
            regrid: false,
            refused: false,
        };
        pacer.restart(1);
        pacer
    }

    /// Takes a grant if all three rules allow one now; otherwise says how long until they
    /// might (never zero). `now` must be `clock.now()`.
    pub(super) fn try_grant(&mut self, now: C::Instant) -> Result<(), Duration> {
        let result = self.check(now);
        self.refused = result.is_err();
        result
    }

    fn check(&mut self, now: C::Instant) -> Result<(), Duration> {
        // Rules 2 and 3 (and a hold) first: they only look, while a positive GCRA answer
        // consumes a cell.
        let mut not_before = self.hold;
        if let Some(&last) = self.recent.back() {
            let spaced = later(last, self.interval / 2);
            not_before = Some(latest(not_before, spaced));
        }
        if self.recent.len() >= self.window_count {
            let oldest = self.recent[self.recent.len() - self.window_count];
            let mut window_opens = later(oldest, WINDOW);
            if self.spell_grants == self.window_count {
                // `oldest` is the spell's first grant.
                let guarded = later(window_opens, START_GUARD);
                if guarded > now {
                    self.regrid = true;
                }
                window_opens = guarded;
            }
            not_before = Some(latest(not_before, window_opens));
        }
        if let Some(at) = not_before {
            if at > now {
                return Err(Duration::from(at.duration_since(now)).max(Duration::from_nanos(1)));
            }
        }
        // After a spell with nothing to send, start a fresh grid rather than spend the credit
        // GCRA piled up meanwhile (rule 2's doc).
        let idle = !self.refused
            && self
                .recent
                .back()
                .is_some_and(|&last| now > later(last, self.interval));
        if idle || self.recent.is_empty() {
            self.spell_grants = 0;
        }
        if idle {
            self.restart(1);
        }
        if let Err(not_until) = self.gcra.check() {
            return Err(not_until.wait_time_from(now).max(Duration::from_nanos(1)));
        }
        if self.recent.len() == self.window_count {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        self.spell_grants = (self.spell_grants + 1).min(self.window_count + 1);
        self.hold = None;
        if std::mem::take(&mut self.regrid) {
            // The grid restarts at this grant: the next one interval from now.
            self.restart(0);
        }
        Ok(())
    }

    /// Runs at a lower `rate` (or the same) from now on, the next grant one new interval from
    /// now: after a 429, wait before trying again.
    pub(super) fn slow_down(&mut self, rate: f64, now: C::Instant) {
        self.interval = interval(rate);
        self.restart(0);
        self.hold_until(later(now, self.interval));
    }

    /// Runs at a higher `rate` from now on, keeping the schedule: the next grant one new
    /// interval after the last one (or now, if that has passed). Recovery after a 429 raises
    /// the rate when Zoom's answers arrive, some time after their grants; counting from the
    /// answer instead would push the schedule back by that delay at every step.
    pub(super) fn speed_up(&mut self, rate: f64) {
        self.interval = interval(rate);
        self.restart(1);
        if let Some(last) = self.recent.back().copied() {
            self.hold_until(later(last, self.interval));
        }
    }

    pub(super) fn interval(&self) -> Duration {
        self.interval
    }

    fn hold_until(&mut self, at: C::Instant) {
        self.hold = Some(latest(self.hold, at));
    }

    /// How long after the last grant this pacer's state still matters (rule 3's window and
    /// the grid): it must not be released earlier.
    pub(super) fn memory(&self) -> Duration {
        WINDOW + self.interval + CATCH_UP
    }

    /// A fresh GCRA at the current interval with `cells` (0 or 1) left to grant now.
    fn restart(&mut self, cells: u32) {
        self.gcra = gcra(self.interval, &self.clock);
        // Consuming `burst - cells` cells of a fresh GCRA leaves its theoretical arrival time
        // that many intervals ahead: with 0 left, the next conforming instant is one interval
        // from now; with 1 left, it is now, and the one after falls on the grid.
        if let Some(consume) = NonZeroU32::new(burst(self.interval).get() - cells) {
            let _ = self.gcra.check_n(consume);
        }
    }
}

/// The spacing between grants at `rate`, rounded *up* to whole nanoseconds: rounding down would
/// let e.g. 3/s put a fourth grant just inside one second.
pub(super) fn interval(rate: f64) -> Duration {
    Duration::from_nanos((1e9 / sanitize(rate)).ceil() as u64)
}

pub(super) fn sanitize(rate: f64) -> f64 {
    if rate.is_nan() {
        MIN_RATE
    } else {
        rate.clamp(MIN_RATE, MAX_RATE)
    }
}

/// GCRA's burst for a grid of `interval`: one cell plus enough to absorb [`CATCH_UP`] of lag,
/// and at least one interval's worth.
fn burst(interval: Duration) -> NonZeroU32 {
    let extra = (CATCH_UP.as_nanos() as f64 / interval.as_nanos() as f64).ceil();
    NonZeroU32::new(1 + extra.clamp(1.0, 100_000.0) as u32).expect("at least 2")
}

fn gcra<C: Clock + Clone>(interval: Duration, clock: &C) -> Gcra<C> {
    let quota = Quota::with_period(interval)
        .expect("interval is at least one nanosecond")
        .allow_burst(burst(interval));
    RateLimiter::direct_with_clock(quota, clock.clone())
}

/// Bounds every offset added to a monotonic instant, so absurd settings cannot overflow it.
const MAX_OFFSET: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The later of a deadline that may be unset and a new one: deadlines only ever move later.
pub(super) fn latest<T: Ord + Copy>(current: Option<T>, new: T) -> T {
    current.map_or(new, |current| current.max(new))
}

pub(super) fn later<I: Reference>(at: I, by: Duration) -> I {
    at + Nanos::from(by.min(MAX_OFFSET))
}
