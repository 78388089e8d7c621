//! What a per-second 429 does to an account's rate, and how the rate comes back: through the
//! public API, with requests granted and accepted as the dispatcher would.

use std::time::Duration;

use super::*;
use crate::limiter::adapt::{DECREASE, FAST_RETURN, HOLD, PLATEAU};
use crate::limiter::pacer::interval;

/// Drains `account` for `span`, every grant answered with success at once; returns the grants.
fn drain_accepted(harness: &mut Harness, account: &str, span: Duration) -> Vec<Duration> {
    let end = harness.elapsed() + span;
    let mut grants = Vec::new();
    while harness.elapsed() < end {
        match harness.try_acquire(account) {
            Ok(()) => {
                grants.push(harness.elapsed());
                harness.limiters.on_success(account);
            }
            Err(wait) => harness.advance(wait.min(end - harness.elapsed())),
        }
    }
    grants
}

#[test]
fn a_lone_429_costs_well_under_a_second_of_capacity() {
    let rate = policy("pro").rate;
    let mut undisturbed = Harness::new(utc(MIDNIGHT));
    let baseline = drain_accepted(&mut undisturbed, "pro", Duration::from_secs(25)).len();

    let mut harness = Harness::new(utc(MIDNIGHT));
    let mut grants = drain_accepted(&mut harness, "pro", Duration::from_secs(5));
    harness.rate_limited("pro", LimitKind::Qps, None);
    assert_eq!(harness.rate("pro"), rate * DECREASE);
    // Without Retry-After the account waits one new interval.
    let limited_at = harness.elapsed();
    while let Err(wait) = harness.try_acquire("pro") {
        harness.advance(wait);
    }
    assert_eq!(harness.elapsed() - limited_at, interval(rate * DECREASE));
    grants.push(harness.elapsed());
    let after = drain_accepted(&mut harness, "pro", Duration::from_secs(20));
    // Back above 95% of the rate within a second...
    let first_second = after
        .iter()
        .filter(|t| **t >= Duration::from_secs(6) && **t < Duration::from_secs(7))
        .count();
    assert!(first_second as f64 >= 0.95 * rate - 1.0, "{first_second}");
    // ... and the whole episode costs well under one second of capacity.
    grants.extend(after);
    let lost = (baseline - grants.len()) as f64 / rate;
    assert!(lost < 0.6, "lost {lost} s of capacity");
    assert_eq!(harness.rate("pro"), rate);
}

/// Drains `account` for `span` like Zoom with a response time: each grant's success is
/// reported `latency` later, as the dispatcher does when the answer arrives.
fn drain_with_latency(
    harness: &mut Harness,
    account: &str,
    span: Duration,
    latency: Duration,
) -> Vec<Duration> {
    let end = harness.elapsed() + span;
    let mut grants = Vec::new();
    let mut answers: std::collections::VecDeque<Duration> = Default::default();
    while harness.elapsed() < end {
        while answers.front().is_some_and(|due| *due <= harness.elapsed()) {
            answers.pop_front();
            harness.limiters.on_success(account);
        }
        match harness.try_acquire(account) {
            Ok(()) => {
                grants.push(harness.elapsed());
                answers.push_back(harness.elapsed() + latency);
            }
            Err(wait) => {
                let next_answer = answers.front().map(|due| *due - harness.elapsed());
                let step = next_answer.map_or(wait, |answer| answer.min(wait));
                harness.advance(
                    step.max(Duration::from_micros(1))
                        .min(end - harness.elapsed()),
                );
            }
        }
    }
    grants
}

#[test]
fn recovery_keeps_its_schedule_when_answers_come_late() {
    // Zoom answers after 150-300 ms: recovery raises the rate when the answers arrive, long
    // after their grants; the schedule must not slip by that delay at every step.
    for (account, latency_ms) in [("pro", 150), ("pro", 300), ("free", 300), ("r=5", 150)] {
        let latency = Duration::from_millis(latency_ms);
        let rate = policy(account).rate;
        let span = Duration::from_secs(30);
        let mut undisturbed = Harness::new(utc(MIDNIGHT));
        let baseline = drain_with_latency(&mut undisturbed, account, span, latency).len();
        let mut harness = Harness::new(utc(MIDNIGHT));
        let mut grants = drain_with_latency(&mut harness, account, SECOND * 3, latency);
        harness.rate_limited(account, LimitKind::Qps, None);
        grants.extend(drain_with_latency(
            &mut harness,
            account,
            span - SECOND * 3,
            latency,
        ));
        let lost = (baseline as f64 - grants.len() as f64) / rate;
        assert!(
            lost < 0.8,
            "{account} at {latency_ms} ms: lost {lost} s of capacity"
        );
    }
}

#[test]
fn in_flight_429s_from_before_the_decrease_do_not_hold_the_account() {
    // Six requests in flight when the first 429 comes back: the others were sent before the
    // decrease and answer nothing new.
    let mut harness = Harness::new(utc(MIDNIGHT));
    let mut sent = Vec::new();
    while sent.len() < 6 {
        match harness.grant("pro") {
            Ok(at) => sent.push(at),
            Err(wait) => harness.advance(wait),
        }
    }
    harness.advance(Duration::from_millis(30));
    harness.rate_limited_for("pro", sent[0]);
    let lowered = harness.rate("pro");
    for at in &sent[1..] {
        harness.advance(Duration::from_millis(20));
        harness.rate_limited_for("pro", *at);
    }
    assert_eq!(harness.rate("pro"), lowered);
    // No hold: 100 ms after the decrease, more than one new interval, the next request goes.
    assert!(interval(lowered) < Duration::from_millis(100));
    let after = harness.grant("pro").unwrap();
    // A request sent after the decrease and still refused within the second: the window is
    // still full, so the account waits, twice as long each time, at the same rate.
    harness.rate_limited_for("pro", after);
    assert_eq!(harness.rate("pro"), lowered);
    let held = harness.try_acquire("pro").unwrap_err();
    assert_eq!(held, interval(lowered) * 2);
    harness.advance(held);
    let again = harness.grant("pro").unwrap();
    harness.rate_limited_for("pro", again);
    assert_eq!(
        harness.try_acquire("pro").unwrap_err(),
        interval(lowered) * 4
    );
}

#[test]
fn the_rate_comes_back_to_a_plateau_and_stays_there() {
    // After a 429 at the full rate, the rate is back just below it within FAST_RETURN and
    // stays there for HOLD before probing.
    let mut harness = Harness::new(utc(MIDNIGHT));
    let ceiling = policy("pro").rate;
    drain_accepted(&mut harness, "pro", SECOND);
    harness.rate_limited("pro", LimitKind::Qps, None);
    drain_accepted(&mut harness, "pro", FAST_RETURN + HOLD / 2);
    let plateau = harness.rate("pro");
    assert!(
        (plateau - ceiling * PLATEAU).abs() <= 0.01 * ceiling,
        "{plateau} vs {ceiling}"
    );
    drain_accepted(&mut harness, "pro", HOLD / 2 - Duration::from_millis(100));
    assert!(harness.rate("pro") - plateau < 0.01 * ceiling);
}

#[test]
fn a_repeated_429_holds_until_the_window_has_passed() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let rate = policy("business").rate;
    drain_accepted(&mut harness, "business", SECOND);
    harness.rate_limited("business", LimitKind::Qps, None);
    harness.advance(Duration::from_millis(300));
    // 429s within a second, for requests sent after the first (or not known to be older): no
    // second decrease, but holds doubling each time, never past one second after the first,
    // when any window that was full has moved on.
    let mut waits = Vec::new();
    for _ in 0..6 {
        harness.rate_limited("business", LimitKind::Qps, None);
        assert_eq!(harness.rate("business"), rate * DECREASE);
        let wait = harness.try_acquire("business").unwrap_err();
        waits.push(wait);
        harness.advance(Duration::from_millis(1));
    }
    let spacing = interval(rate * DECREASE);
    assert_eq!(waits[0], spacing * 2);
    assert_eq!(waits[1], spacing * 4);
    // 300 ms + 6 ms after the first 429: the cap, one second after it.
    assert_eq!(waits[5], Duration::from_millis(1_000 - 305));
    harness.advance(waits[5]);
    assert!(harness.try_acquire("business").is_ok());
    // Later 429s lower it again, down to the floor max(0.2, policy/20).
    for _ in 0..30 {
        harness.advance(Duration::from_millis(1_100));
        harness.rate_limited("business", LimitKind::Qps, None);
    }
    assert!((harness.rate("business") - rate / 20.0).abs() < 1e-9);
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
    assert_eq!(harness.rate("r=0.1"), 0.1 * MARGIN);
}

#[test]
fn recovery_waits_for_the_end_of_a_pause() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    let until = harness.now_utc() + Duration::from_secs(30);
    harness.rate_limited("pro", LimitKind::Qps, Some(until));
    harness.advance(Duration::from_secs(30));
    assert!(harness.try_acquire("pro").is_ok());
    harness.limiters.on_success("pro");
    assert_eq!(harness.rate("pro"), policy("pro").rate * DECREASE);
    drain_accepted(
        &mut harness,
        "pro",
        FAST_RETURN + Duration::from_millis(100),
    );
    assert!(harness.rate("pro") >= policy("pro").rate * PLATEAU * 0.99);
}

#[test]
fn rate_changes_never_grant_early() {
    // Random 429s, successes and polling: every grant is at least half an interval (at the rate
    // in force) after the previous one, so no rebuild of the pacer adds a request.
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
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
        assert!(pair[1].0 - pair[0].0 >= interval(pair[1].1) / 2, "{pair:?}");
    }
    let instants: Vec<Duration> = grants.iter().map(|grant| grant.0).collect();
    assert!(max_in_sliding_second(&instants) <= 20);
}
