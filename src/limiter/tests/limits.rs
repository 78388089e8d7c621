//! Daily caps, pauses, independence of accounts and release of idle state.

use std::time::{Duration, SystemTime};

use governor::clock::FakeRelativeClock;

use super::*;
use crate::limiter::{LimitKind, Limiters};

#[test]
fn daily_cap_holds_until_utc_midnight_then_resets() {
    let mut harness = Harness::new(utc(MIDNIGHT - 10));
    let grants = harness.drain("capped", Duration::from_secs(1));
    assert_eq!(grants.len(), 5);
    let wait = harness.try_acquire("capped").unwrap_err();
    assert_eq!(harness.now_utc() + wait, utc(MIDNIGHT));
    assert!(harness.limiters.snapshot(harness.now_utc()).per_account[0].paused);
    harness.advance(wait - Duration::from_millis(1));
    assert!(harness.try_acquire("capped").is_err());
    harness.advance(Duration::from_millis(1));
    assert_eq!(harness.drain("capped", Duration::from_secs(2)).len(), 5);
    assert!(
        !harness
            .limiters
            .snapshot(utc(MIDNIGHT + 86_400))
            .per_account[0]
            .paused
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
    // No pause, only the new interval: 1 / (4 × margin × 0.8) s.
    assert_eq!(
        harness.try_acquire("r=4"),
        Err(Duration::from_nanos(
            (1e9 / (4.0 * MARGIN * 0.8)).ceil() as u64
        ))
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
    assert!((39..=40).contains(&grants.len()), "{}", grants.len());
    assert_eq!(harness.rate("pro-d"), policy("pro").rate);
    let snapshot = harness.limiters.snapshot(harness.now_utc());
    assert_eq!((snapshot.active, snapshot.paused), (2, 3));
    let expected_total = policy("pro").rate * 1.8;
    assert!((snapshot.total_rate - expected_total).abs() < 1e-9);
    let ids: Vec<&str> = snapshot
        .per_account
        .iter()
        .map(|a| a.account_id.as_str())
        .collect();
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
    // Recovery from a 429 at the full rate takes 15 s; idle release came later.
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
    limiters.on_rate_limited("pro", LimitKind::Qps, None, None, utc(MIDNIGHT));
    clock.advance(Duration::from_secs(5));
    limiters.release_idle();
    assert_eq!(limiters.rate_of("pro"), Some(policy("pro").rate * 0.8));
    // Recovery after a 429 at the full rate: 1 s back to the plateau, 10 s on it, then probing.
    let rate = policy("pro").rate;
    let recovered = crate::limiter::adapt::Recovery::after_429(rate, rate, None).duration();
    assert!(recovered > Duration::from_secs(11) && recovered < Duration::from_secs(16));
    clock.advance(recovered - Duration::from_secs(6));
    limiters.release_idle();
    assert!(limiters.rate_of("pro").is_some());
    clock.advance(Duration::from_secs(2));
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
