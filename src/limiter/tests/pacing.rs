//! The pacer's rule on a controlled clock: never more than the limit in any window of one
//! second (fixed or sliding, of any phase: [`max_in_window`] checks every window that starts at
//! a grant), with the guard on top; evenly spaced; and late wake-ups caught up, so a backlog
//! drains at the rate the margin sets, not below it.

use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::limiter::pacer::{interval, START_GUARD, WINDOW};

/// Every plan, and a `rate` override, with Zoom's limit.
const ACCOUNTS: [(&str, usize); 4] = [("free", 2), ("pro", 20), ("business", 60), ("r=37", 37)];

/// Grants per second inside `[from, to)`.
fn rate_between(grants: &[Duration], from: Duration, to: Duration) -> f64 {
    let inside = grants.iter().filter(|t| **t >= from && **t < to).count();
    inside as f64 / (to - from).as_secs_f64()
}

/// The window rule, with the guard: no window of `WINDOW` (a little over one second) holds more
/// than the limit, so neither does any fixed or sliding second.
fn assert_window_rule(grants: &[Duration], limit: usize, what: &str) {
    assert!(
        max_in_window(grants, WINDOW) <= limit,
        "{what}: {} grants in a window of {WINDOW:?}",
        max_in_window(grants, WINDOW)
    );
    assert!(max_in_sliding_second(grants) <= limit, "{what}");
    assert!(max_in_fixed_second(grants) <= limit, "{what}");
}

#[test]
fn exact_wake_ups_drain_at_the_margin_and_keep_every_window() {
    for (account, limit) in ACCOUNTS {
        let mut harness = Harness::new(utc(MIDNIGHT));
        let grants = harness.drain(account, Duration::from_secs(60));
        assert_window_rule(&grants, limit, account);
        let rate = rate_between(&grants, 2 * SECOND, Duration::from_secs(58));
        assert!(
            rate >= 0.99 * limit as f64,
            "{account}: {rate}/s of {limit}/s"
        );
        // Evenly spaced in steady state: one interval apart.
        let spacing = interval(policy(account).rate);
        let steady: Vec<&[Duration]> = grants
            .windows(2)
            .filter(|pair| pair[0] >= 2 * SECOND)
            .collect();
        assert!(steady.iter().all(|pair| pair[1] - pair[0] == spacing));
    }
}

#[test]
fn late_wake_ups_are_caught_up() {
    // tokio's timer fires on a 1 ms tick, after the deadline; under load later still. Here
    // every wake-up is 0-4 ms late: a burst-1 limiter lost all of it (Business drained at
    // 16.7 / (16.7 + 2) = 89% of its limit); the pacer keeps its grid.
    for (account, limit) in ACCOUNTS {
        let mut harness = Harness::new(utc(MIDNIGHT));
        let mut rng = StdRng::seed_from_u64(11);
        let grants = harness.drain_late(account, Duration::from_secs(60), |_| {
            Duration::from_micros(rng.random_range(0..4_000))
        });
        assert_window_rule(&grants, limit, account);
        let rate = rate_between(&grants, 2 * SECOND, Duration::from_secs(58));
        assert!(
            rate >= 0.99 * limit as f64,
            "{account}: {rate}/s of {limit}/s"
        );
    }
}

#[test]
fn a_stalled_runtime_never_bursts() {
    // The runtime stalls for 300 ms (a long GC-like pause, a blocked worker) in the middle of a
    // drain. Afterwards the pacer catches up what it can within the rules, spread out: never
    // two grants closer than half an interval, never more than the limit in a window.
    for (account, limit) in ACCOUNTS {
        let mut harness = Harness::new(utc(MIDNIGHT));
        let mut grants = harness.drain(account, Duration::from_secs(5));
        harness.advance(Duration::from_millis(300));
        grants.extend(harness.drain(account, Duration::from_secs(5)));
        assert_window_rule(&grants, limit, account);
        let half = interval(policy(account).rate) / 2;
        assert!(
            grants.windows(2).all(|pair| pair[1] - pair[0] >= half),
            "{account}"
        );
        // The stall costs at most itself: at least (10 s - 0.3 s) at the rate, less one grant.
        let expected = policy(account).rate * 9.7 - 1.0;
        assert!(
            grants.len() as f64 >= expected,
            "{account}: {}",
            grants.len()
        );
    }
}

#[test]
fn a_pause_with_nothing_to_send_is_not_caught_up() {
    // The account runs dry for 95 ms (less than the catch-up GCRA allows), then has work
    // again: it starts a fresh grid instead of spending the credit at double rate.
    let mut harness = Harness::new(utc(MIDNIGHT));
    harness.drain("business", SECOND);
    // The last request of the busy spell goes out; then there is nothing to send.
    while let Err(wait) = harness.try_acquire("business") {
        harness.advance(wait);
    }
    harness.advance(Duration::from_millis(95));
    let grants = harness.drain("business", 2 * SECOND);
    let spacing = interval(policy("business").rate);
    assert!(
        grants.windows(2).all(|pair| pair[1] - pair[0] >= spacing),
        "{grants:?}"
    );
    // The spell's first window is START_GUARD longer, in case its first request reaches Zoom
    // late: the grant that completes it waits, and the grid restarts there, no catching up.
    let limit = 60;
    assert!(grants[limit] - grants[0] >= WINDOW + START_GUARD);
    assert!(grants[..=limit]
        .windows(2)
        .take(limit - 1)
        .all(|pair| pair[1] - pair[0] == spacing));
    assert!(grants[limit..]
        .windows(2)
        .all(|pair| pair[1] - pair[0] == spacing));
}

#[test]
fn every_wake_up_very_late_still_keeps_the_rule() {
    // Wake-ups up to five intervals late: the pacer cannot catch everything up, but what it
    // does catch up never breaks the rule.
    let mut harness = Harness::new(utc(MIDNIGHT));
    let mut rng = StdRng::seed_from_u64(3);
    let spacing = interval(policy("business").rate);
    let grants = harness.drain_late("business", Duration::from_secs(30), |_| {
        spacing * rng.random_range(0..5)
    });
    assert_window_rule(&grants, 60, "business");
}

#[test]
fn wall_clock_steps_change_nothing() {
    // Pacing runs on the monotonic clock: a wall clock stepped back an hour, then forward two,
    // grants exactly what an undisturbed one does.
    let mut steady = Harness::new(utc(MIDNIGHT + 3_600 * 5));
    let expected = steady.drain("business", Duration::from_secs(6));

    let mut stepped = Harness::new(utc(MIDNIGHT + 3_600 * 5));
    let mut grants = stepped.drain("business", Duration::from_secs(2));
    stepped.start_utc -= Duration::from_secs(3_600);
    grants.extend(stepped.drain("business", Duration::from_secs(2)));
    stepped.start_utc += Duration::from_secs(7_200);
    grants.extend(stepped.drain("business", Duration::from_secs(2)));
    assert_eq!(grants, expected);
}

#[test]
fn fractional_rates() {
    let mut harness = Harness::new(utc(MIDNIGHT));
    // 7.5/s paced at 7.4625/s: 74 or 75 in 10 s, at most 8 in any second.
    let grants = harness.drain("r=7.5", Duration::from_secs(10));
    assert!((74..=75).contains(&grants.len()), "{}", grants.len());
    assert!(max_in_window(&grants, WINDOW) <= 8);
    let grants = harness.drain("r=0.5", Duration::from_secs(10));
    assert_eq!(grants.len(), 5);
    assert!(grants
        .windows(2)
        .all(|pair| pair[1] - pair[0] >= 2 * SECOND));
    // An integer rate whose interval is not a whole number of nanoseconds.
    let grants = harness.drain("r=3", Duration::from_secs(10));
    assert_eq!(max_in_window(&grants, WINDOW), 3);
}

#[test]
fn accounts_do_not_share_a_pacer() {
    // Two accounts polled alternately each get their own full rate.
    let mut harness = Harness::new(utc(MIDNIGHT));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    while harness.elapsed() < Duration::from_secs(10) {
        if harness.try_acquire("pro-a").is_ok() {
            a.push(harness.elapsed());
        }
        if harness.try_acquire("pro-b").is_ok() {
            b.push(harness.elapsed());
        }
        harness.advance(Duration::from_micros(500));
    }
    for grants in [a, b] {
        assert_window_rule(&grants, 20, "pro");
        assert!(grants.len() >= 198, "{}", grants.len());
    }
}

/// One step of a random schedule.
#[derive(Debug, Clone)]
enum Step {
    /// The caller sleeps the wait it was given, plus this many microseconds.
    Wake(u32),
    /// The caller polls early, this many microseconds from now.
    Poll(u32),
    /// The runtime stalls this many milliseconds.
    Stall(u32),
    /// Zoom answers a request with a QPS 429.
    Qps429,
    /// Zoom accepts a request.
    Success,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0u32..5_000).prop_map(Step::Wake),
        3 => (0u32..30_000).prop_map(Step::Poll),
        1 => (0u32..800).prop_map(Step::Stall),
        1 => Just(Step::Qps429),
        6 => Just(Step::Success),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the caller and Zoom do (late, early or stalled wake-ups, 429s, recoveries), no
    /// window of a little over one second ever holds more than the limit, and no two grants
    /// are closer than half the interval in force.
    #[test]
    fn the_window_rule_holds_on_every_schedule(
        account in prop::sample::select(vec!["free", "pro", "business", "r=37", "r=5.5"]),
        steps in prop::collection::vec(step(), 200..2_000),
    ) {
        let limit = policy(account).limit.ceil() as usize;
        let mut harness = Harness::new(utc(MIDNIGHT));
        let mut grants: Vec<(Duration, f64)> = Vec::new();
        let mut wait = Duration::ZERO;
        for step in steps {
            match step {
                Step::Wake(late) => harness.advance(wait + Duration::from_micros(late.into())),
                Step::Poll(after) => harness.advance(Duration::from_micros(after.into())),
                Step::Stall(ms) => harness.advance(Duration::from_millis(ms.into())),
                Step::Qps429 => harness.rate_limited(account, LimitKind::Qps, None),
                Step::Success => harness.limiters.on_success(account),
            }
            match harness.try_acquire(account) {
                Ok(()) => {
                    grants.push((harness.elapsed(), harness.rate(account)));
                    wait = Duration::ZERO;
                }
                Err(next) => {
                    prop_assert!(!next.is_zero());
                    wait = next;
                }
            }
        }
        let instants: Vec<Duration> = grants.iter().map(|grant| grant.0).collect();
        prop_assert!(max_in_window(&instants, WINDOW) <= limit);
        for pair in grants.windows(2) {
            // The later grant's rate is the one in force (a 429 in between only lowers it).
            let half = interval(pair[1].1) / 2;
            prop_assert!(pair[1].0 - pair[0].0 >= half, "{:?}", pair);
        }
    }
}
