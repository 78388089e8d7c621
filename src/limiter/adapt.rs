//! How an account's rate reacts to a per-second 429 and comes back afterwards: a pure function
//! of the time since the 429, so it can be tested without a clock.
//!
//! A QPS 429 means the account's requests, ours and other apps', went over Zoom's count. Two
//! causes look alike at first and need opposite answers:
//! - an isolated 429 (another app's one-off burst, a fault): the quota is ours again at once,
//!   and every second spent below the limit is capacity thrown away;
//! - another app that steadily uses part of the quota: going back above what it leaves us
//!   brings the 429s straight back.
//!
//! So the rate drops to `DECREASE` of the rate at which Zoom stopped accepting (the
//! `ceiling`), climbs back within [`FAST_RETURN`] to just below it (`PLATEAU` of it), stays
//! there for [`HOLD`], and only then probes upward, slowly at first ([`PROBE`]), until the
//! policy rate or the next 429, which sets a new ceiling (lower than where it came when it
//! came below the previous ceiling, then probed after [`GUESSED_HOLD`]).
//!
//! An isolated 429 at the full rate costs about a third of a second of capacity (0.1 s in the
//! dip, 0.2 s on the plateau, a little while probing) and the account is above 95% of its
//! rate within a second. A steady competitor costs about one 429 per cycle once the share is
//! found (measured: benches/drain `lone429` and `shared`, figures in BENCHMARKS.md).
//!
//! The idea is TCP CUBIC's (a fast return to the last rate that worked, slow probing beyond
//! it, fast convergence when the share shrinks), with straight lines for the first two.

use std::time::Duration;

/// A QPS 429 multiplies the rate by this.
pub(super) const DECREASE: f64 = 0.8;
/// How long the climb from the dip back to the plateau takes.
pub(super) const FAST_RETURN: Duration = Duration::from_secs(1);
/// The plateau, as a share of the rate at which the 429 came.
pub(super) const PLATEAU: f64 = 0.98;
/// How long the rate stays on the plateau before probing above it.
pub(super) const HOLD: Duration = Duration::from_secs(10);
/// A 429 below this share of the previous ceiling means the share left to us shrank; one just
/// below it is the noise of probing near the same ceiling.
const SHRUNK: f64 = 0.95;
/// The same after a ceiling that fast convergence guessed rather than a 429 measured: probe
/// soon, to find where Zoom really stops accepting.
pub(super) const GUESSED_HOLD: Duration = Duration::from_secs(2);
/// Probing speed above the plateau, as a share of the policy rate per second, growing with
/// the cube of the time spent probing (`PROBE_CUBE` per s³), so that a plateau far below what
/// Zoom would accept is left within seconds while one just below it is approached slowly.
pub(super) const PROBE: f64 = 0.005;
pub(super) const PROBE_CUBE: f64 = 0.002;
/// The rate never drops below `max(ABSOLUTE_FLOOR, policy * POLICY_FLOOR)` (nor above the
/// policy).
const ABSOLUTE_FLOOR: f64 = 0.2;
const POLICY_FLOOR: f64 = 1.0 / 20.0;

/// The state of a recovery after a 429: present from the 429 until the rate is back at the
/// policy rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Recovery {
    /// The account's policy rate: the end of every recovery.
    pub policy: f64,
    /// The rate when the 429 came.
    pub ceiling: f64,
    /// The rate right after it.
    pub base: f64,
    /// How long the rate stays on the plateau: [`HOLD`] or [`GUESSED_HOLD`].
    pub hold: Duration,
}

impl Recovery {
    /// The recovery after a 429 that came while running at `rate`, `previous` being the
    /// ceiling of the recovery it interrupts, if any. A 429 below that ceiling means the share
    /// left to us shrank (or was overestimated): the new ceiling is set lower still, halfway
    /// between this rate and its decrease (TCP CUBIC's "fast convergence"), so a share far
    /// below the first ceiling is found in a few 429s rather than 2% per 429.
    pub(super) fn after_429(policy: f64, rate: f64, previous: Option<f64>) -> Recovery {
        let floor = (policy * POLICY_FLOOR).max(ABSOLUTE_FLOOR).min(policy);
        let rate = rate.clamp(floor, policy);
        let (ceiling, hold) = match previous {
            Some(previous) if rate < previous * SHRUNK => {
                (rate * (1.0 + DECREASE) / 2.0, GUESSED_HOLD)
            }
            _ => (rate, HOLD),
        };
        Recovery {
            policy,
            ceiling: ceiling.max(floor),
            base: (rate * DECREASE).max(floor).min(ceiling.max(floor)),
            hold,
        }
    }

    /// The rate `elapsed` after the 429 (or after the end of the pause that came with it).
    pub(super) fn rate_at(&self, elapsed: Duration) -> f64 {
        let plateau = (self.ceiling * PLATEAU).max(self.base);
        let t = elapsed.as_secs_f64();
        let fast = FAST_RETURN.as_secs_f64();
        let rate = if t < fast {
            self.base + (plateau - self.base) * t / fast
        } else {
            let probing = (t - fast - self.hold.as_secs_f64()).max(0.0);
            plateau + self.policy * probed(probing)
        };
        rate.min(self.policy)
    }

    /// How long after the 429 the rate is back at the policy rate.
    pub(super) fn duration(&self) -> Duration {
        let plateau = (self.ceiling * PLATEAU).max(self.base);
        let gap = ((self.policy - plateau) / self.policy).max(0.0);
        // `probed` is increasing: bisect for the time it covers `gap` (at most 1 + gap / PROBE).
        let (mut low, mut high) = (0.0, gap / PROBE + 1.0);
        for _ in 0..64 {
            let mid = (low + high) / 2.0;
            if probed(mid) >= gap {
                high = mid;
            } else {
                low = mid;
            }
        }
        FAST_RETURN + self.hold + Duration::from_secs_f64(high.min(1e6))
    }
}

/// How far probing has raised the rate after `seconds`, as a share of the policy rate.
fn probed(seconds: f64) -> f64 {
    PROBE * seconds + PROBE_CUBE * seconds.powi(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Capacity lost to an isolated 429 at the full rate, in seconds of the policy rate.
    fn capacity_lost(recovery: &Recovery) -> f64 {
        let step = 0.001;
        let end = recovery.duration().as_secs_f64();
        (0..(end / step) as usize)
            .map(|i| (recovery.policy - recovery.rate_at(secs(i as f64 * step))) * step)
            .sum::<f64>()
            / recovery.policy
    }

    #[test]
    fn an_isolated_429_costs_under_half_a_second() {
        let recovery = Recovery::after_429(19.9, 19.9, None);
        assert!((recovery.rate_at(Duration::ZERO) - 19.9 * DECREASE).abs() < 1e-9);
        assert!(recovery.rate_at(secs(0.5)) >= 0.89 * 19.9);
        assert!(recovery.rate_at(secs(1.0)) >= 0.95 * 19.9);
        let lost = capacity_lost(&recovery);
        assert!(lost < 0.5, "lost {lost} s");
        assert_eq!(recovery.rate_at(recovery.duration()), 19.9);
        assert!(recovery.rate_at(recovery.duration() - secs(0.1)) < 19.9);
    }

    #[test]
    fn holds_just_below_a_lower_ceiling_then_probes_slowly() {
        // Another app leaves 12 of 20: the 429 came at 12.1.
        let recovery = Recovery::after_429(19.9, 12.1, None);
        let plateau = 12.1 * PLATEAU;
        assert!((recovery.rate_at(FAST_RETURN) - plateau).abs() < 1e-9);
        assert!((recovery.rate_at(FAST_RETURN + HOLD) - plateau).abs() < 1e-9);
        assert!(recovery.rate_at(FAST_RETURN + HOLD / 2) < 12.0);
        // One second of probing adds PROBE and PROBE_CUBE of the policy rate.
        let probed = recovery.rate_at(FAST_RETURN + HOLD + secs(1.0));
        assert!((probed - plateau - 19.9 * (PROBE + PROBE_CUBE)).abs() < 1e-6);
        // A plateau far too low is left within seconds: from 6/s to 19.9/s in under 8 s.
        let low = Recovery::after_429(19.9, 6.0, None);
        assert!(
            low.duration() < FAST_RETURN + HOLD + secs(8.0),
            "{:?}",
            low.duration()
        );
    }

    #[test]
    fn a_429_below_the_last_ceiling_lowers_the_next_one_further() {
        // Another app leaves 12 of 20: the first 429 came at 19.9, the next at 16 on the way
        // back; the ceiling drops to 14.4, not 16, and then, below it, further.
        let first = Recovery::after_429(19.9, 19.9, None);
        let second = Recovery::after_429(19.9, 16.0, Some(first.ceiling));
        assert!((second.ceiling - 16.0 * 0.9).abs() < 1e-9);
        assert!((second.base - 16.0 * DECREASE).abs() < 1e-9);
        let third = Recovery::after_429(19.9, 13.0, Some(second.ceiling));
        assert!(third.ceiling * PLATEAU < 12.0, "{third:?}");
        // At, above or just below the last ceiling (probing near it), the ceiling is where the
        // 429 came.
        let probing = Recovery::after_429(19.9, 12.1, Some(12.0));
        assert_eq!(probing.ceiling, 12.1);
        let near = Recovery::after_429(19.9, 11.9, Some(12.2));
        assert_eq!((near.ceiling, near.hold), (11.9, HOLD));
    }

    #[test]
    fn rate_never_leaves_floor_and_policy() {
        for (policy, rate) in [(1.99, 1.99), (0.5, 0.5), (19.9, 0.21), (59.7, 80.0)] {
            let recovery = Recovery::after_429(policy, rate, None);
            let floor = (policy / 20.0).max(0.2).min(policy);
            let mut t = 0.0;
            let mut last = 0.0;
            while t < recovery.duration().as_secs_f64() + 5.0 {
                let r = recovery.rate_at(secs(t));
                assert!(
                    r >= floor - 1e-9 && r <= policy + 1e-9,
                    "{policy} {rate} {t}: {r}"
                );
                assert!(r >= last - 1e-9, "the rate only rises after the 429");
                last = r;
                t += 0.05;
            }
        }
    }
}
