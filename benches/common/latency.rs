//! Latency samples and their percentiles: microseconds as the intake benches record them
//! (enqueue, cluster), nearest-rank percentiles of any sorted samples (also drain's durations
//! and rates), and the p50/p90/p99/max summary the intake reports print.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration as whole microseconds, saturating at `u32::MAX` (71 minutes).
pub fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest-rank percentile `p` (0 to 100) of sorted samples; the default (zero) when there
/// are none.
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p90, p99 and the largest of a run's latency samples, in microseconds; serialized
/// under these names (flattened into a run's figures).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

impl Latency {
    /// The summary of `sorted` samples.
    pub fn of(sorted: &[u32]) -> Latency {
        Latency {
            p50_us: percentile(sorted, 50.0),
            p90_us: percentile(sorted, 90.0),
            p99_us: percentile(sorted, 99.0),
            max_us: sorted.last().copied().unwrap_or(0),
        }
    }
}
