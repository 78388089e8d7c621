//! Tests of [`super::Limiters`] through its public API, on governor's `FakeRelativeClock`: time
//! moves only when a test advances it, and the wall clock (`now_utc`) moves with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use governor::clock::{Clock, FakeRelativeClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{AccountPolicy, LimitKind, Limiters};
use crate::plan::Plan;

/// 2024-03-10T00:00:00Z.
const MIDNIGHT: u64 = 1_710_028_800;
const MARGIN: f64 = 0.97;
const SECOND: Duration = Duration::from_secs(1);

/// Accounts are named after their policy: "pro…" and "business…" take the plan rate with the
/// margin, "free…" also the daily cap, "capped…" 100/s with 5 a day, "r=<rate>…" a bare rate.
fn policy(account: &str) -> AccountPolicy {
    let plan_policy = |plan: Plan| AccountPolicy {
        rate: f64::from(plan.per_second()) * MARGIN,
        daily_limit: plan.per_day(),
    };
    if account.starts_with("pro") {
        plan_policy(Plan::Pro)
    } else if account.starts_with("business") {
        plan_policy(Plan::Business)
    } else if account.starts_with("free") {
        plan_policy(Plan::Free)
    } else if account.starts_with("capped") {
        AccountPolicy {
            rate: 100.0,
            daily_limit: Some(5),
        }
    } else if let Some(rate) = account.strip_prefix("r=") {
        AccountPolicy {
            rate: rate.split('/').next().unwrap().parse().unwrap(),
            daily_limit: None,
        }
    } else {
        panic!("no test policy for {account}")
    }
}

struct Harness {
    clock: FakeRelativeClock,
    limiters: Limiters<FakeRelativeClock>,
    /// The wall-clock time when the fake clock read zero.
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
        let now_utc = self.now_utc();
        self.limiters.try_acquire(account, now_utc)
    }

    fn rate_limited(&mut self, account: &str, kind: LimitKind, retry_after: Option<SystemTime>) {
        let now_utc = self.now_utc();
        self.limiters
            .on_rate_limited(account, kind, retry_after, now_utc);
    }

    fn rate(&self, account: &str) -> f64 {
        self.limiters.rate_of(account).expect("account is tracked")
    }

    /// Grants as many requests as allowed for `span`, advancing the clock by exactly each
    /// returned wait: the tightest schedule a caller could produce. Stops exactly `span`
    /// later (never sleeping past it) and returns the grant instants.
    fn drain(&mut self, account: &str, span: Duration) -> Vec<Duration> {
        let end = self.elapsed() + span;
        let mut grants = Vec::new();
        while self.elapsed() < end {
            match self.try_acquire(account) {
                Ok(()) => grants.push(self.elapsed()),
                Err(wait) => self.advance(wait.min(end - self.elapsed())),
            }
        }
        grants
    }
}

fn utc(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// The most grants in any half-open one-second window. A window holding the most grants can be
/// slid right until it starts at a grant, so checking windows that start at grants suffices.
fn max_in_sliding_second(grants: &[Duration]) -> usize {
    (0..grants.len())
        .map(|i| grants[i..].partition_point(|&t| t < grants[i] + SECOND))
        .max()
        .unwrap_or(0)
}

/// The most grants in one whole second of the fake clock (windows aligned to second boundaries).
fn max_in_fixed_second(grants: &[Duration]) -> usize {
    let mut counts = std::collections::HashMap::new();
    for grant in grants {
        *counts.entry(grant.as_secs()).or_insert(0) += 1;
    }
    counts.into_values().max().unwrap_or(0)
}

#[test]
fn pacing_never_exceeds_the_rate_in_any_second() {
    for (account, zoom_limit) in [("pro", 20), ("business", 60), ("free", 2), ("r=20", 20)] {
        let mut harness = Harness::new(utc(MIDNIGHT));
        let rate = policy(account).rate;
        let grants = harness.drain(account, Duration::from_secs(10));
        // With 19.4/s a half-open second holds at most ceil(19.4) = 20 grants: Zoom's limit.
        let bound = rate.ceil() as usize;
        assert!(bound <= zoom_limit, "{account}");
        assert!(max_in_sliding_second(&grants) <= bound, "{account}");
        assert!(max_in_fixed_second(&grants) <= bound, "{account}");
        // Evenly paced: never two grants closer than one interval (no burst).
        let interval = Duration::from_secs_f64(1.0 / rate);
        assert!(grants.windows(2).all(|pair| pair[1] - pair[0] >= interval));
        // ... and not needlessly slow either.
        assert!(grants.len() as f64 >= (rate * 10.0).floor(), "{account}");
    }
}

#[test]
fn pacing_holds_under_irregular_polling() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let mut rng = StdRng::seed_from_u64(7);
    let mut grants = Vec::new();
    while harness.elapsed() < Duration::from_secs(20) {
        if harness.try_acquire("pro").is_ok() {
            grants.push(harness.elapsed());
        }
        harness.advance(Duration::from_micros(rng.random_range(0..80_000)));
    }
    assert!(max_in_sliding_second(&grants) <= 20);
    assert!(max_in_fixed_second(&grants) <= 20);
}

#[test]
fn fractional_rates() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let grants = harness.drain("r=7.5", Duration::from_secs(10));
    assert_eq!(grants.len(), 75);
    assert!(max_in_sliding_second(&grants) <= 8);
    let grants = harness.drain("r=0.5", Duration::from_secs(10));
    assert_eq!(grants.len(), 5);
    assert!(grants
        .windows(2)
        .all(|pair| pair[1] - pair[0] >= 2 * SECOND));
    // An integer rate whose interval is not a whole number of nanoseconds.
    let grants = harness.drain("r=3", Duration::from_secs(10));
    assert_eq!(max_in_sliding_second(&grants), 3);
}

#[test]
fn daily_cap_holds_until_utc_midnight_then_resets() {
    let mut harness = Harness::new(utc(MIDNIGHT - 10));
    let grants = harness.drain("capped", Duration::from_secs(1));
    assert_eq!(grants.len(), 5);
    let wait = harness.try_acquire("capped").unwrap_err();
    assert_eq!(harness.now_utc() + wait, utc(MIDNIGHT));
    assert!(harness.limiters.snapshot(harness.now_utc()).per_account[0].2);
    harness.advance(wait - Duration::from_millis(1));
    assert!(harness.try_acquire("capped").is_err());
    harness.advance(Duration::from_millis(1));
    assert_eq!(harness.drain("capped", Duration::from_secs(2)).len(), 5);
    assert!(
        !harness
            .limiters
            .snapshot(utc(MIDNIGHT + 86_400))
            .per_account[0]
            .2
    );
}

#[test]
fn free_plan_stops_at_two_thousand_a_day() {
    let mut harness = Harness::new(utc(MIDNIGHT + 3_600));
    let grants = harness.drain("free", Duration::from_secs(1_100));
    assert_eq!(grants.len(), 2_000);
    assert!(max_in_sliding_second(&grants) <= 2);
    let wait = harness.try_acquire("free").unwrap_err();
    assert_eq!(harness.now_utc() + wait, utc(MIDNIGHT + 86_400));
}

#[test]
fn qps_429_lowers_the_rate_then_recovers_gradually() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let policy_rate = policy("pro").rate;
    harness.try_acquire("pro").unwrap();
    harness.rate_limited("pro", LimitKind::Qps, None);
    assert_eq!(harness.rate("pro"), policy_rate * 0.8);
    // Without Retry-After the pause is one new interval.
    let wait = harness.try_acquire("pro").unwrap_err();
    assert_eq!(
        wait,
        Duration::from_nanos((1e9 / (policy_rate * 0.8)).ceil() as u64)
    );
    // Other in-flight requests answered 429 within a second do not lower it again.
    harness.advance(Duration::from_millis(300));
    harness.rate_limited("pro", LimitKind::Qps, None);
    assert_eq!(harness.rate("pro"), policy_rate * 0.8);
    // Later 429s do, down to the floor max(0.2, policy/20).
    for _ in 0..20 {
        harness.advance(Duration::from_millis(1_100));
        harness.rate_limited("pro", LimitKind::Qps, None);
    }
    let floor = policy_rate / 20.0;
    assert!((harness.rate("pro") - floor).abs() < 1e-12);
    // Each 429-free second adds policy/40, applied on success, capped at the policy.
    let mut previous = floor;
    for second in 1..=45 {
        harness.advance(SECOND);
        harness.limiters.on_success("pro");
        let rate = harness.rate("pro");
        let expected = (floor + policy_rate / 40.0 * f64::from(second)).min(policy_rate);
        assert!(
            (rate - expected).abs() < 1e-9,
            "{second}: {rate} vs {expected}"
        );
        assert!(rate >= previous && rate <= policy_rate);
        previous = rate;
    }
    assert_eq!(harness.rate("pro"), policy_rate);
}

#[test]
fn floor_for_slow_accounts_is_absolute() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    for _ in 0..15 {
        harness.rate_limited("free", LimitKind::Qps, None);
        harness.advance(Duration::from_secs(2));
    }
    assert_eq!(harness.rate("free"), 0.2);
    harness.rate_limited("r=0.1", LimitKind::Qps, None);
    assert_eq!(harness.rate("r=0.1"), 0.1);
}

#[test]
fn rate_changes_never_grant_early() {
    // Random 429s, successes and polling: every grant is at least one interval (at the rate in
    // force) after the previous one, so no rebuild of the governor limiter adds a request.
    let mut harness = Harness::new(utc(MIDNIGHT));
    let mut rng = StdRng::seed_from_u64(42);
    let mut grants: Vec<(Duration, f64)> = Vec::new();
    while harness.elapsed() < Duration::from_secs(120) {
        match rng.random_range(0..1000) {
            0..8 => harness.rate_limited("pro", LimitKind::Qps, None),
            8..400 => harness.limiters.on_success("pro"),
            _ => {
                if harness.try_acquire("pro").is_ok() {
                    grants.push((harness.elapsed(), harness.rate("pro")));
                }
            }
        }
        harness.advance(Duration::from_micros(rng.random_range(0..40_000)));
    }
    // The schedule must have exercised both decreases and recoveries.
    let lowest = grants.iter().map(|grant| grant.1).fold(f64::MAX, f64::min);
    assert!(
        lowest < 8.0 && grants.len() > 500,
        "{lowest} {}",
        grants.len()
    );
    assert!(grants.iter().any(|grant| grant.1 == policy("pro").rate));
    for pair in grants.windows(2) {
        let interval = Duration::from_secs_f64(1.0 / pair[1].1);
        assert!(pair[1].0 - pair[0].0 >= interval, "{pair:?}");
    }
    let instants: Vec<Duration> = grants.iter().map(|grant| grant.0).collect();
    assert!(max_in_sliding_second(&instants) <= 20);
}

#[test]
fn raising_the_rate_keeps_the_last_grant_spacing() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    harness.rate_limited("pro", LimitKind::Qps, None);
    harness.advance(Duration::from_secs(5));
    harness.try_acquire("pro").unwrap();
    // Recovery rebuilds the limiter; the fresh one must not grant right away.
    harness.limiters.on_success("pro");
    let rate = harness.rate("pro");
    assert!(rate > policy("pro").rate / 2.0);
    let wait = harness.try_acquire("pro").unwrap_err();
    assert_eq!(wait, Duration::from_nanos((1e9 / rate).ceil() as u64));
}

#[test]
fn retry_after_pauses_until_then() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let until = harness.now_utc() + Duration::from_secs(30);
    harness.rate_limited("pro", LimitKind::Qps, Some(until));
    assert_eq!(harness.try_acquire("pro"), Err(Duration::from_secs(30)));
    assert_eq!(harness.limiters.snapshot(harness.now_utc()).paused, 1);
    harness.advance(Duration::from_millis(29_999));
    assert!(harness.try_acquire("pro").is_err());
    harness.advance(Duration::from_millis(1));
    assert!(harness.try_acquire("pro").is_ok());
    // The lowered rate starts recovering only when the pause ends.
    harness.limiters.on_success("pro");
    assert_eq!(harness.rate("pro"), policy("pro").rate * 0.8);

    // A far-off Retry-After is clamped to two days; one in the past adds no pause.
    let far = harness.now_utc() + Duration::from_secs(30 * 86_400);
    harness.rate_limited("business", LimitKind::Qps, Some(far));
    assert_eq!(
        harness.try_acquire("business"),
        Err(Duration::from_secs(2 * 86_400))
    );
    let past = harness.now_utc() - Duration::from_secs(5);
    harness.rate_limited("r=4", LimitKind::Qps, Some(past));
    // No pause, only the new interval: 1 / (4 × 0.8) s.
    assert_eq!(
        harness.try_acquire("r=4"),
        Err(Duration::from_micros(312_500))
    );
}

#[test]
fn daily_429_pauses_until_utc_midnight_or_retry_after() {
    let mut harness = Harness::new(utc(MIDNIGHT + 23 * 3_600));
    harness.rate_limited("pro", LimitKind::Daily, None);
    assert_eq!(harness.try_acquire("pro"), Err(Duration::from_secs(3_600)));
    // A daily limit says nothing about the per-second rate.
    assert_eq!(harness.rate("pro"), policy("pro").rate);
    harness.advance(Duration::from_secs(3_600));
    assert!(harness.try_acquire("pro").is_ok());

    let until = utc(MIDNIGHT + 86_400 + 7_200);
    harness.rate_limited("business", LimitKind::Daily, Some(until));
    assert_eq!(
        harness.try_acquire("business"),
        Err(Duration::from_secs(7_200))
    );
}

#[test]
fn accounts_are_independent() {
    let mut harness = Harness::new(utc(MIDNIGHT - 100));
    harness.drain("capped", SECOND);
    harness.rate_limited("pro-a", LimitKind::Qps, None);
    harness.rate_limited("pro-b", LimitKind::Daily, None);
    let far = harness.now_utc() + Duration::from_secs(3_600);
    harness.rate_limited("pro-c", LimitKind::Qps, Some(far));
    let grants = harness.drain("pro-d", Duration::from_secs(2));
    assert_eq!(grants.len(), 39);
    assert_eq!(harness.rate("pro-d"), policy("pro").rate);
    let snapshot = harness.limiters.snapshot(harness.now_utc());
    assert_eq!((snapshot.active, snapshot.paused), (2, 3));
    let expected_total = policy("pro").rate * 1.8;
    assert!((snapshot.total_rate - expected_total).abs() < 1e-9);
    let ids: Vec<&str> = snapshot.per_account.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(ids, ["capped", "pro-a", "pro-b", "pro-c", "pro-d"]);
}

#[test]
fn idle_accounts_are_released_unless_still_limited() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    harness.try_acquire("pro-idle").unwrap();
    harness.try_acquire("capped").unwrap();
    let pause_end = harness.now_utc() + Duration::from_secs(600);
    harness.rate_limited("pro-paused", LimitKind::Qps, Some(pause_end));
    harness.rate_limited("pro-slow", LimitKind::Qps, None);
    harness.advance(Duration::from_secs(59));
    harness.limiters.release_idle();
    assert_eq!(
        harness
            .limiters
            .snapshot(harness.now_utc())
            .per_account
            .len(),
        4
    );

    harness.advance(Duration::from_secs(2));
    harness.limiters.release_idle();
    assert_eq!(harness.limiters.rate_of("pro-idle"), None);
    // Still paused; and the daily count of "capped" matters until midnight.
    assert!(harness.limiters.rate_of("pro-paused").is_some());
    assert!(harness.limiters.rate_of("capped").is_some());
    // Recovery from half the rate takes 10 s of 429-free time; idle release came later.
    assert_eq!(harness.limiters.rate_of("pro-slow"), None);

    harness.advance(Duration::from_secs(600));
    harness.limiters.release_idle();
    assert_eq!(harness.limiters.rate_of("pro-paused"), None);
    harness.advance(Duration::from_secs(86_400));
    harness.limiters.release_idle();
    assert_eq!(harness.limiters.snapshot(harness.now_utc()).per_account, []);
}

#[test]
fn reduced_rate_outlives_idle_release_until_recovered() {
    let clock = FakeRelativeClock::default();
    let mut limiters = Limiters::new(clock.clone(), policy, Duration::from_secs(1));
    limiters.on_rate_limited("pro", LimitKind::Qps, None, utc(MIDNIGHT));
    clock.advance(Duration::from_secs(5));
    limiters.release_idle();
    assert_eq!(limiters.rate_of("pro"), Some(policy("pro").rate * 0.8));
    clock.advance(Duration::from_secs(6));
    limiters.release_idle();
    assert_eq!(limiters.rate_of("pro"), None);
}

#[test]
fn built_from_config() {
    let config = crate::config::Config::parse(
        "[zoom]\nplan = \"pro\"\n[accounts.\"acct-free\"]\nplan = \"free\"\n",
    )
    .unwrap();
    let mut limiters = Limiters::from_config(&config);
    let now_utc = SystemTime::now();
    assert!(limiters.try_acquire("acct-free", now_utc).is_ok());
    assert!(limiters.try_acquire("other", now_utc).is_ok());
    assert_eq!(
        limiters.rate_of("acct-free"),
        Some(config.account_rate("acct-free"))
    );
    assert_eq!(
        limiters.rate_of("other"),
        Some(config.account_rate("other"))
    );
    let debug = format!("{limiters:?}");
    assert!(
        debug.starts_with("Limiters {") && debug.contains("acct-free"),
        "{debug}"
    );
}
