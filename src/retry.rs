//! The retry delay policy after a transient failure: exponential growth from
//! `delivery.retry_initial` to `delivery.retry_max`, with full jitter. This module decides *how
//! long*; the dispatcher decides *whether* (classification is kept apart from the schedule, as
//! in Vector's `RetryLogic`). It is the only user of the `backoff` crate (unmaintained upstream,
//! RUSTSEC-2025-0012), so replacing it touches this file alone.

use std::time::Duration;

use backoff::backoff::Backoff;
use rand::Rng;

/// Delay policy; cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// The exponential ceiling after `attempts` failed attempts (1 → `initial`, doubling, capped).
    pub fn ceiling(&self, attempts: u32) -> Duration {
        // backoff's ExponentialBackoff is stateful; step a deterministic one (no randomization,
        // no elapsed-time limit) `attempts` times. The cap is reached after a few dozen steps.
        let mut exponential = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_multiplier(2.0)
            .with_randomization_factor(0.0)
            .with_max_interval(self.max)
            .with_max_elapsed_time(None)
            .build();
        let mut delay = self.initial;
        for _ in 0..attempts.clamp(1, 64) {
            delay = exponential.next_backoff().unwrap_or(self.max);
            if delay >= self.max {
                break;
            }
        }
        delay.min(self.max)
    }

    /// The delay before the next attempt: uniform between `initial` and the ceiling ("full
    /// jitter" with a floor, so a retry never comes sooner than `initial`).
    pub fn delay(&self, attempts: u32) -> Duration {
        let ceiling = self.ceiling(attempts);
        if ceiling <= self.initial {
            return ceiling;
        }
        rand::rng().random_range(self.initial..=ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }

    #[test]
    fn grows_exponentially_to_the_cap() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(4), Duration::from_secs(8));
        assert_eq!(p.ceiling(9), Duration::from_secs(256));
        assert_eq!(p.ceiling(10), Duration::from_secs(300));
        assert_eq!(p.ceiling(1_000), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_between_initial_and_ceiling() {
        let p = policy();
        for attempts in 1..20 {
            for _ in 0..50 {
                let delay = p.delay(attempts);
                assert!(delay >= p.initial && delay <= p.ceiling(attempts));
            }
        }
        // Full jitter really spreads: 200 draws at the cap are not all equal.
        let draws: std::collections::HashSet<_> = (0..200).map(|_| p.delay(30)).collect();
        assert!(draws.len() > 100);
    }
}
