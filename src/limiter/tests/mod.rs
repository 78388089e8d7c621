//! Tests of [`super::Limiters`] through its public API, on governor's `FakeRelativeClock`: time
//! moves only when a test advances it, and the wall clock (`now_utc`) moves with it unless a
//! test steps it.
//!
//! - `pacing`: the window rule and the throughput of the pacer, under late wake-ups, stalls and
//!   wall-clock steps, and as a property over random schedules;
//! - `adaptive`: what a 429 does to the rate and how it comes back;
//! - `limits`: daily caps, pauses, independent accounts, release of idle state.

mod adaptive;
mod limits;
mod pacing;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::{Clock, FakeRelativeClock};
use governor::nanos::Nanos;

use super::{AccountPolicy, LimitKind, Limiters};
use crate::plan::Plan;

/// 2024-03-10T00:00:00Z.
const MIDNIGHT: u64 = 1_710_028_800;
/// The default `delivery.rate_margin`.
const MARGIN: f64 = 0.995;
const SECOND: Duration = Duration::from_secs(1);

/// Accounts are named after their policy: "pro…" and "business…" take the plan's limit,
/// "free…" also its daily cap, "capped…" 100/s with 5 a day, "r=<rate>…" a `rate` override;
/// every account is paced at the limit times [`MARGIN`].
fn policy(account: &str) -> AccountPolicy {
    let (limit, daily_limit) = if account.starts_with("pro") {
        (Plan::Pro.per_second().into(), Plan::Pro.per_day())
    } else if account.starts_with("business") {
        (Plan::Business.per_second().into(), Plan::Business.per_day())
    } else if account.starts_with("free") {
        (Plan::Free.per_second().into(), Plan::Free.per_day())
    } else if account.starts_with("capped") {
        (100.0, Some(5))
    } else if let Some(rate) = account.strip_prefix("r=") {
        (rate.split('/').next().unwrap().parse().unwrap(), None)
    } else {
        panic!("no test policy for {account}")
    };
    AccountPolicy {
        limit,
        rate: limit * MARGIN,
        daily_limit,
    }
}

struct Harness {
    clock: FakeRelativeClock,
    limiters: Limiters<FakeRelativeClock>,
    /// The wall-clock time when the fake clock read zero; a test may step it.
    start_utc: SystemTime,
}

impl Harness {
    fn new(start_utc: SystemTime) -> Self {
        let clock = FakeRelativeClock::default();
        let limiters = Limiters::new(clock.clone(), policy, Duration::from_secs(60));
        Harness {
            clock,
            limiters,
            start_utc,
        }
    }

    fn elapsed(&self) -> Duration {
        self.clock.now().into()
    }

    fn now_utc(&self) -> SystemTime {
        self.start_utc + self.elapsed()
    }

    fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    fn try_acquire(&mut self, account: &str) -> Result<(), Duration> {
        self.grant(account).map(|_| ())
    }

    /// Like [`Harness::try_acquire`], with the grant's instant.
    fn grant(&mut self, account: &str) -> Result<Nanos, Duration> {
        let now_utc = self.now_utc();
        self.limiters.try_acquire(account, now_utc)
    }

    /// A 429 for a request whose grant instant is not known.
    fn rate_limited(&mut self, account: &str, kind: LimitKind, retry_after: Option<SystemTime>) {
        let now_utc = self.now_utc();
        self.limiters
            .on_rate_limited(account, kind, retry_after, None, now_utc);
    }

    /// A QPS 429 for the request granted at `sent_at`.
    fn rate_limited_for(&mut self, account: &str, sent_at: Nanos) {
        let now_utc = self.now_utc();
        self.limiters
            .on_rate_limited(account, LimitKind::Qps, None, Some(sent_at), now_utc);
    }

    fn rate(&self, account: &str) -> f64 {
        self.limiters.rate_of(account).expect("account is tracked")
    }

    /// Grants as many requests as allowed for `span`, advancing the clock by exactly each
    /// returned wait: the tightest schedule a caller could produce. Stops exactly `span`
    /// later (never sleeping past it) and returns the grant instants.
    fn drain(&mut self, account: &str, span: Duration) -> Vec<Duration> {
        self.drain_late(account, span, |_| Duration::ZERO)
    }

    /// Like [`Harness::drain`], but every wake-up comes `late(n)` after the wait the limiter
    /// asked for (`n` counts wake-ups): a timer that fires late, a busy runtime.
    fn drain_late(
        &mut self,
        account: &str,
        span: Duration,
        mut late: impl FnMut(u64) -> Duration,
    ) -> Vec<Duration> {
        let end = self.elapsed() + span;
        let mut grants = Vec::new();
        let mut wake_ups = 0;
        while self.elapsed() < end {
            match self.try_acquire(account) {
                Ok(()) => grants.push(self.elapsed()),
                Err(wait) => {
                    wake_ups += 1;
                    let sleep = wait + late(wake_ups);
                    self.advance(sleep.min(end - self.elapsed()));
                }
            }
        }
        grants
    }
}

fn utc(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The most grants in any half-open window of `width`. A window holding the most grants can be
/// slid right until it starts at a grant, so checking windows that start at grants suffices;
/// this covers fixed windows of every phase too.
fn max_in_window(grants: &[Duration], width: Duration) -> usize {
    (0..grants.len())
        .map(|i| grants[i..].partition_point(|&t| t < grants[i] + width))
        .max()
        .unwrap_or(0)
}

fn max_in_sliding_second(grants: &[Duration]) -> usize {
    max_in_window(grants, SECOND)
}

/// The most grants in one whole second of the fake clock (windows aligned to second boundaries).
fn max_in_fixed_second(grants: &[Duration]) -> usize {
    let mut counts = std::collections::HashMap::new();
    for grant in grants {
        *counts.entry(grant.as_secs()).or_insert(0) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}
