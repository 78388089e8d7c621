//! The demo's live status line and the figures printed after it: the daemon's counters from
//! `stats`, and rates over a sliding window next to the account's limit. Events the demo's
//! producers report (the bot's sends and deletes) are printed above the line, so they stay on
//! screen while the line keeps changing.

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The span over which the status line averages rates.
pub(super) const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Wide enough to blank out the status line when an event is printed over it.
const LINE_WIDTH: usize = 170;

/// The live line: what it printed last and the rates it follows.
pub(super) struct Live {
    started: Instant,
    account: String,
    /// Used until the account's row in `stats` names its limit.
    plan_limit: f64,
    /// The delivered rate, and the rate of requests Zoom answered (delivered or not): with
    /// faults injected some requests fail, and each still counts against Zoom's limit.
    delivery: SlidingRate,
    requests: SlidingRate,
}

impl Live {
    pub fn new(started: Instant, account: &str, plan_limit: f64) -> Live {
        Live {
            started,
            account: account.to_string(),
            plan_limit,
            delivery: SlidingRate::new(RATE_WINDOW),
            requests: SlidingRate::new(RATE_WINDOW),
        }
    }

    /// Prints `event` on a line of its own, over the status line (redrawn at the next update).
    pub fn event(&self, event: &str) {
        println!("\r  {event:<LINE_WIDTH$}");
    }

    /// Records a `stats` answer and redraws the line from it.
    pub fn update(&mut self, stats: &Value) {
        let delivered = stats["delivered"].as_u64().unwrap_or(0);
        let waiting = waiting(stats);
        let now = Instant::now();
        self.delivery.sample(now, delivered, waiting > 0);
        self.requests.sample(now, answered(stats), waiting > 0);
        let paused = account_row(stats, &self.account).is_some_and(|row| row["paused"] == true);
        print!(
            "\r  {:5.1}s  accepted {:6}  coalesced {:6}  sent {:5}  retried {:4}  429 {:3}  pending {:4}  delivered {:5.1}/s of {}/s (requests {:4.1}/s){}",
            self.started.elapsed().as_secs_f64(),
            stats["accepted"].as_u64().unwrap_or(0),
            stats["coalesced"].as_u64().unwrap_or(0),
            delivered,
            stats["retries"].as_u64().unwrap_or(0),
            stats["rate_limited"].as_u64().unwrap_or(0),
            waiting,
            self.delivery.rate().unwrap_or(0.0),
            format_rate(self.limit(stats)),
            self.requests.rate().unwrap_or(0.0),
            if paused { " paused by a 429 " } else { "                 " },
        );
        std::io::stdout().flush().ok();
    }

    /// The account's limit as the daemon reports it.
    pub fn limit(&self, stats: &Value) -> f64 {
        account_limit(stats, &self.account).unwrap_or(self.plan_limit)
    }

    /// The rates while edits were waiting, when delivery should run at the limit; `None`
    /// before a second of backlog.
    pub fn summary(&self, stats: &Value) -> Option<String> {
        let average = self.delivery.backlogged_average()?;
        let sent = self.requests.backlogged_average()?;
        let limit = self.limit(stats);
        let lowest = match self.delivery.lowest_full_window() {
            Some(lowest) => format!(" (lowest over {} s: {lowest:.1}/s)", RATE_WINDOW.as_secs()),
            None => String::new(),
        };
        Some(format!(
            "while edits were waiting: delivered {average:.1}/s on average{lowest} of a limit of {}/s, {:.0}% used; requests to Zoom {sent:.1}/s",
            format_rate(limit),
            100.0 * average / limit
        ))
    }
}

/// Jobs pending or in flight, from a `stats` answer.
pub(super) fn waiting(stats: &Value) -> u64 {
    stats["pending"].as_u64().unwrap_or(0) + stats["in_flight"].as_u64().unwrap_or(0)
}

/// A rate as the demo sees it: samples of one of the daemon's counters (from `stats`, e.g.
/// `delivered`), averaged over a sliding window, plus figures over the time edits were waiting
/// (when the rate should be at the limit).
#[derive(Debug)]
struct SlidingRate {
    window: Duration,
    /// (when, counter), oldest first, spanning at most `window` plus one sample.
    samples: VecDeque<(Instant, u64)>,
    /// When the current stretch of samples that all saw edits waiting began.
    backlog_start: Option<Instant>,
    /// Time and counter increase between consecutive samples that both saw edits waiting,
    /// summed: (seconds, increase).
    backlogged: (f64, u64),
    /// The lowest rate over a whole window during which edits were waiting throughout.
    lowest: Option<f64>,
}

impl SlidingRate {
    fn new(window: Duration) -> SlidingRate {
        SlidingRate {
            window,
            samples: VecDeque::new(),
            backlog_start: None,
            backlogged: (0.0, 0),
            lowest: None,
        }
    }

    /// Records the counter's value at `now`; `waiting` is whether edits were pending or in
    /// flight.
    fn sample(&mut self, now: Instant, count: u64, waiting: bool) {
        if let Some(&(last_at, last)) = self.samples.back() {
            if waiting && self.backlog_start.is_some() {
                let seconds = now.saturating_duration_since(last_at).as_secs_f64();
                self.backlogged.0 += seconds;
                self.backlogged.1 += count.saturating_sub(last);
            }
        }
        self.samples.push_back((now, count));
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].0) >= self.window
        {
            self.samples.pop_front();
        }
        match (waiting, self.backlog_start) {
            (false, _) => self.backlog_start = None,
            (true, None) => self.backlog_start = Some(now),
            (true, Some(since)) => {
                let (oldest_at, _) = self.samples[0];
                if oldest_at >= since && now.saturating_duration_since(oldest_at) >= self.window {
                    if let Some(rate) = self.rate() {
                        self.lowest = Some(self.lowest.map_or(rate, |low| low.min(rate)));
                    }
                }
            }
        }
    }

    /// Increase per second over the last window (less at the start); `None` before two
    /// samples.
    fn rate(&self) -> Option<f64> {
        let (&(first_at, first), &(last_at, last)) = (self.samples.front()?, self.samples.back()?);
        let seconds = last_at.saturating_duration_since(first_at).as_secs_f64();
        (seconds > 0.0).then(|| last.saturating_sub(first) as f64 / seconds)
    }

    /// Increase per second over all the time edits were waiting.
    fn backlogged_average(&self) -> Option<f64> {
        let (seconds, increase) = self.backlogged;
        (seconds >= 1.0).then(|| increase as f64 / seconds)
    }

    fn lowest_full_window(&self) -> Option<f64> {
        self.lowest
    }
}

/// Requests Zoom answered, from a `stats` answer: delivered, failed and retried, answered
/// 429, or refused for good.
fn answered(stats: &Value) -> u64 {
    ["delivered", "retries", "rate_limited", "dead_lettered"]
        .iter()
        .map(|key| stats[*key].as_u64().unwrap_or(0))
        .sum()
}

/// The row of `account` among the `per_account` rows of a `stats` answer.
fn account_row<'a>(stats: &'a Value, account: &str) -> Option<&'a Value> {
    stats["per_account"]
        .as_array()?
        .iter()
        .find(|row| row["account_id"] == account)
}

/// The limit of `account` from the `per_account` rows of a `stats` answer.
fn account_limit(stats: &Value, account: &str) -> Option<f64> {
    account_row(stats, account)?["limit"].as_f64()
}

/// A rate for people: "20" for whole numbers, "7.5" otherwise.
fn format_rate(rate: f64) -> String {
    if rate.fract() == 0.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_rate_slides_over_its_window() {
        let start = Instant::now();
        let mut rate = SlidingRate::new(Duration::from_secs(5));
        assert_eq!(rate.rate(), None);
        // 20 deliveries a second for 10 s, sampled every 250 ms, edits waiting throughout.
        for tick in 0..=40u64 {
            rate.sample(start + Duration::from_millis(250 * tick), 5 * tick, true);
        }
        assert!((rate.rate().unwrap() - 20.0).abs() < 1e-9);
        // Then 2 s without a delivery: the last 5 s hold 3 s of deliveries.
        for tick in 41..=48u64 {
            rate.sample(start + Duration::from_millis(250 * tick), 200, true);
        }
        assert!(
            (rate.rate().unwrap() - 12.0).abs() < 1e-9,
            "{:?}",
            rate.rate()
        );
        assert!((rate.lowest_full_window().unwrap() - 12.0).abs() < 1e-9);
        assert!((rate.backlogged_average().unwrap() - 200.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn idle_time_counts_neither_in_the_average_nor_in_the_lowest_window() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut rate = SlidingRate::new(Duration::from_secs(5));
        // 3 s at 20/s with edits waiting, then 10 s idle, then 2 s at 20/s again.
        for tick in 0..=12u64 {
            rate.sample(at(250 * tick), 5 * tick, true);
        }
        for tick in 13..=52u64 {
            rate.sample(at(250 * tick), 60, false);
        }
        for tick in 53..=60u64 {
            rate.sample(at(250 * tick), 60 + 5 * (tick - 52), true);
        }
        assert!((rate.backlogged_average().unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(
            rate.lowest_full_window(),
            None,
            "no whole window was backlogged"
        );
    }

    #[test]
    fn the_demo_reads_its_limit_from_the_rows() {
        let stats = serde_json::json!({"ok": true, "per_account": [
            {"account_id": "demo-account", "pending": 9, "limit": 20.0, "allowed": 19.4,
             "delivered": 19.3, "paused": false},
            {"account_id": "acct-free", "pending": 0, "limit": 2.0, "allowed": 0.0,
             "delivered": 0.5, "paused": true},
        ]});
        assert_eq!(account_limit(&stats, "acct-free"), Some(2.0));
        assert_eq!(account_limit(&stats, "other"), None);
        assert_eq!(format_rate(20.0), "20");
        assert_eq!(format_rate(7.5), "7.5");
    }
}
