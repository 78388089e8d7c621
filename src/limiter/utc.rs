//! UTC calendar arithmetic for daily limits: which UTC day an instant falls in and when the next
//! 00:00 UTC is. Zoom resets daily quotas at 00:00 UTC, and Unix time has exactly 86,400 seconds
//! per day, so plain integer division is exact and needs no calendar library.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECONDS_PER_DAY: u64 = 86_400;

/// Days since 1970-01-01 UTC. Times before the epoch (a badly wrong clock) count as day 0.
pub(super) fn day_number(now_utc: SystemTime) -> u64 {
    since_epoch(now_utc).as_secs() / SECONDS_PER_DAY
}

/// How long from `now_utc` until the next 00:00 UTC; a full day when `now_utc` is exactly
/// midnight, since the day that just began is the one being counted.
pub(super) fn until_next_midnight(now_utc: SystemTime) -> Duration {
    let next_midnight = Duration::from_secs((day_number(now_utc) + 1) * SECONDS_PER_DAY);
    next_midnight.saturating_sub(since_epoch(now_utc))
}

fn since_epoch(now_utc: SystemTime) -> Duration {
    now_utc.duration_since(UNIX_EPOCH).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-03-10T00:00:00Z.
    const MIDNIGHT: u64 = 1_710_028_800;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn days_change_exactly_at_midnight() {
        assert_eq!(day_number(at(MIDNIGHT - 1)) + 1, day_number(at(MIDNIGHT)));
        assert_eq!(day_number(at(MIDNIGHT)), day_number(at(MIDNIGHT + 86_399)));
        assert_eq!(day_number(UNIX_EPOCH - Duration::from_secs(5)), 0);
    }

    #[test]
    fn next_midnight() {
        assert_eq!(
            until_next_midnight(at(MIDNIGHT - 1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            until_next_midnight(at(MIDNIGHT)),
            Duration::from_secs(86_400)
        );
        let late = at(MIDNIGHT + 86_399) + Duration::from_millis(250);
        assert_eq!(until_next_midnight(late), Duration::from_millis(750));
    }
}
