//! Measurements over the sandbox's request log: per-account arrivals with their answers, the
//! most requests in any one-second window (fixed windows at any phase, wall-clock seconds,
//! sliding), delivered rates over an interval, gaps between requests, per-second series and
//! percentiles (nearest-rank, `common/latency.rs`). Pure arithmetic on offsets from the
//! sandbox's start; no I/O beyond one copy of the log.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use zoomq::sandbox::Sandbox;

pub use crate::latency::percentile;

const SECOND: Duration = Duration::from_secs(1);

/// One request as the sandbox logged it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Which call: `"send"`, `"edit"` or `"delete"`.
    pub op: &'static str,
    /// When it arrived, from the sandbox's start (the origin of its fixed windows).
    pub offset: Duration,
    /// The status answered; `None` for a reset connection.
    pub status: Option<u16>,
}

impl Arrival {
    pub fn delivered(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }
}

/// The sandbox's request log, split by account and sorted by arrival.
pub struct Log {
    pub origin: Instant,
    /// Where wall-clock seconds start, as an offset from `origin` in `0..1 s`.
    pub wall_phase: Duration,
    by_account: HashMap<String, Vec<Arrival>>,
}

impl Log {
    pub fn read(sandbox: &Sandbox) -> Log {
        let origin = sandbox.started();
        // Read the two clocks together to place the origin on the wall clock.
        let (now, wall) = (Instant::now(), SystemTime::now());
        let origin_wall = wall - (now - origin);
        let into_second = origin_wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let wall_phase =
            Duration::from_nanos(u64::from((1_000_000_000 - into_second) % 1_000_000_000));
        let mut by_account: HashMap<String, Vec<Arrival>> = HashMap::new();
        for record in sandbox.requests() {
            let Some(account) = record.account_id else {
                continue;
            };
            by_account.entry(account).or_default().push(Arrival {
                op: record.op,
                offset: record.offset,
                status: record.status,
            });
        }
        for arrivals in by_account.values_mut() {
            arrivals.sort_by_key(|a| a.offset);
        }
        Log {
            origin,
            wall_phase,
            by_account,
        }
    }

    pub fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    pub fn accounts(&self) -> impl Iterator<Item = (&String, &Vec<Arrival>)> {
        self.by_account.iter()
    }

    /// Every request of `account`, in order of arrival.
    pub fn arrivals(&self, account: &str) -> &[Arrival] {
        self.by_account.get(account).map_or(&[], Vec::as_slice)
    }

    /// Arrival offsets of `account`'s requests answered 2xx.
    pub fn delivered(&self, account: &str) -> Vec<Duration> {
        delivered(self.arrivals(account))
    }
}

pub fn delivered(arrivals: &[Arrival]) -> Vec<Duration> {
    arrivals
        .iter()
        .filter(|a| a.delivered())
        .map(|a| a.offset)
        .collect()
}

pub fn offsets(arrivals: &[Arrival]) -> Vec<Duration> {
    arrivals.iter().map(|a| a.offset).collect()
}

/// Most requests in one second, by window kind, over sorted arrival offsets.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WindowMax {
    /// Fixed windows aligned to the sandbox's start (what the sandbox enforces).
    pub sandbox_fixed: u32,
    /// Fixed windows aligned to wall-clock seconds.
    pub wall_fixed: u32,
    /// The worst of fixed windows at ten phases, 0.0 to 0.9 s after the sandbox's start.
    pub any_phase_fixed: u32,
    /// Any half-open interval `[t, t + 1 s)`: the bound on every fixed window.
    pub sliding: u32,
    /// Where the first sliding window with `sliding` requests starts, in seconds after the
    /// first request.
    pub sliding_worst_at_s: f64,
}

impl WindowMax {
    pub fn of(sorted: &[Duration], wall_phase: Duration) -> WindowMax {
        WindowMax {
            sandbox_fixed: max_fixed(sorted, Duration::ZERO),
            wall_fixed: max_fixed(sorted, wall_phase),
            any_phase_fixed: (0..10)
                .map(|tenth| max_fixed(sorted, Duration::from_millis(100 * tenth)))
                .max()
                .unwrap_or(0),
            sliding: max_sliding(sorted).0,
            sliding_worst_at_s: sorted
                .first()
                .map_or(0.0, |first| (max_sliding(sorted).1 - *first).as_secs_f64()),
        }
    }

    /// The largest figure: at most `limit` means no window of any kind went over it.
    pub fn worst(&self) -> u32 {
        self.sandbox_fixed
            .max(self.wall_fixed)
            .max(self.any_phase_fixed)
            .max(self.sliding)
    }
}

/// Most arrivals in one window `[phase + n s, phase + (n + 1) s)`, `phase` in `0..1 s`.
fn max_fixed(sorted: &[Duration], phase: Duration) -> u32 {
    let window = |t: &Duration| (*t + SECOND - phase).as_nanos() / SECOND.as_nanos();
    let mut best = 0;
    let mut run = 0;
    let mut current = None;
    for t in sorted {
        let w = window(t);
        if current == Some(w) {
            run += 1;
        } else {
            current = Some(w);
            run = 1;
        }
        best = best.max(run);
    }
    best
}

/// Most arrivals in any half-open interval `[t, t + 1 s)`, and the first arrival of the
/// first interval holding that many.
fn max_sliding(sorted: &[Duration]) -> (u32, Duration) {
    let mut best = (0, Duration::ZERO);
    let mut first = 0;
    for (last, t) in sorted.iter().enumerate() {
        while t.saturating_sub(sorted[first]) >= SECOND {
            first += 1;
        }
        if last - first + 1 > best.0 {
            best = (last - first + 1, sorted[first]);
        }
    }
    (best.0 as u32, best.1)
}

/// Deliveries inside an interval.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rate {
    pub count: usize,
    /// `(count - 1) / (last - first)`: one over the mean gap, free of the ±1 that a count in an
    /// interval gets from where the interval falls between two deliveries.
    pub per_second: f64,
    /// `count / interval`.
    pub count_per_second: f64,
}

/// The rate of the sorted `times` inside `[from, until)`.
pub fn rate(times: &[Duration], from: Duration, until: Duration) -> Rate {
    let inside = within(times, from, until);
    let span = match (inside.first(), inside.last()) {
        (Some(first), Some(last)) => (*last - *first).as_secs_f64(),
        _ => 0.0,
    };
    Rate {
        count: inside.len(),
        per_second: if inside.len() >= 2 && span > 0.0 {
            (inside.len() - 1) as f64 / span
        } else {
            0.0
        },
        count_per_second: inside.len() as f64 / until.saturating_sub(from).as_secs_f64().max(1e-9),
    }
}

/// The part of sorted `times` inside `[from, until)`.
pub fn within(times: &[Duration], from: Duration, until: Duration) -> &[Duration] {
    let start = times.partition_point(|t| *t < from);
    let end = times.partition_point(|t| *t < until);
    &times[start..end.max(start)]
}

/// `[first + edge, last - edge]` of sorted deliveries: the steady part; `None` if too short.
pub fn steady(times: &[Duration], edge: Duration) -> Option<(Duration, Duration)> {
    let (first, last) = (times.first()?, times.last()?);
    let (from, until) = (*first + edge, last.checked_sub(edge)?);
    (until > from).then_some((from, until))
}

/// Spacing of consecutive times, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Gaps {
    pub mean_ms: f64,
    pub min_ms: f64,
    pub p1_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Gaps {
    pub fn of(sorted: &[Duration]) -> Gaps {
        let mut gaps: Vec<Duration> = sorted.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_unstable();
        if gaps.is_empty() {
            return Gaps::default();
        }
        Gaps {
            mean_ms: ms(sorted[sorted.len() - 1] - sorted[0]) / gaps.len() as f64,
            min_ms: ms(gaps[0]),
            p1_ms: ms(percentile(&gaps, 1.0)),
            p50_ms: ms(percentile(&gaps, 50.0)),
            p99_ms: ms(percentile(&gaps, 99.0)),
            max_ms: ms(gaps[gaps.len() - 1]),
        }
    }
}

/// Requests, 2xx and 429 answers in an interval.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub delivered: u64,
    pub rate_limited: u64,
}

impl Counts {
    pub fn of(arrivals: &[Arrival], from: Duration, until: Duration) -> Counts {
        let mut counts = Counts::default();
        for a in arrivals
            .iter()
            .filter(|a| a.offset >= from && a.offset < until)
        {
            counts.requests += 1;
            match a.status {
                Some(200..=299) => counts.delivered += 1,
                Some(429) => counts.rate_limited += 1,
                _ => {}
            }
        }
        counts
    }

    /// One per second from `from` (the last one may be shorter).
    pub fn per_second(arrivals: &[Arrival], from: Duration, until: Duration) -> Vec<Counts> {
        let seconds = until.saturating_sub(from).as_secs_f64().ceil() as u32;
        (0..seconds)
            .map(|s| {
                let start = from + SECOND * s;
                Counts::of(arrivals, start, (start + SECOND).min(until))
            })
            .collect()
    }
}

/// How many of the sorted `times` fall in each second from `from` (the last may be shorter).
pub fn per_second(times: &[Duration], from: Duration, until: Duration) -> Vec<usize> {
    let seconds = until.saturating_sub(from).as_secs_f64().ceil() as u32;
    (0..seconds)
        .map(|s| {
            let start = from + SECOND * s;
            within(times, start, (start + SECOND).min(until)).len()
        })
        .collect()
}

pub fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

pub fn secs(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
