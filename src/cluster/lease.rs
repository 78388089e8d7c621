//! Leases on partitions, in a JetStream key-value bucket with compare-and-set: who may deliver
//! a partition's accounts, and when a new owner may start.
//!
//! # Why a new owner never starts in a window the old one may have used
//! All durations are measured on each daemon's own monotonic clock; no clocks are compared.
//! - The holder renews every [`Timing::tick`] (`lease_ttl / 5`) by a compare-and-set on the
//!   revision it last wrote. It stops sending (and cancels what is in flight) at
//!   `s + hold_for` (`0.8 × lease_ttl`) unless a later renewal succeeded, `s` being the moment
//!   it *sent* its last successful renewal.
//! - Another daemon takes a lease held by someone else only after it has seen the same
//!   revision for a whole `lease_ttl`, and by compare-and-set on that revision. It first saw
//!   that revision after it was written, so after `s`: it takes at `t ≥ s + lease_ttl`.
//! - The taker then waits [`Timing::gap`] (1.1 s) before its first request. So the old
//!   owner's last request left at most at `s + 0.8 × lease_ttl`, the new owner's first at
//!   `s + lease_ttl + 1.1 s` or later: more than a second (Zoom's window) apart, plus
//!   `0.2 × lease_ttl` for a request on its way. A lease released by its holder (which stops
//!   first, then writes the release) is taken at once, and the gap is waited the same.
//! - The partition's storage is fenced too (`queue::nats_kv`): after the take-over, every
//!   write of the former owner fails, so even a holder frozen past every deadline (a paused
//!   VM) cannot change what the new owner *stores*. What it *sends* is bounded by its guard
//!   alone, on the monotonic clock: a request it had already handed to the kernel when it
//!   froze still leaves when it thaws, and a host suspended and resumed (the monotonic clock
//!   stops meanwhile) sends until its next renewal fails. Run daemons where neither happens
//!   (no VM pauses longer than `0.2 × lease_ttl`, no suspend).
//! - Requests in flight when a lease *expires* (the holder died or lost NATS) are cancelled
//!   by the holder's guard, but one already written may still be processed by Zoom for up to
//!   `zoom.request_timeout`; a planned hand-over waits for them instead.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The lease timing, from `nats.lease_ttl`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub ttl: Duration,
}

impl Timing {
    /// How often leases are renewed and the members heartbeat.
    pub fn tick(&self) -> Duration {
        self.ttl / 5
    }
    /// How long after sending its last successful renewal the holder may still send.
    pub fn hold_for(&self) -> Duration {
        self.ttl * 4 / 5
    }
    /// How long a new owner waits after taking a lease before its first request: one of
    /// Zoom's 1-second windows and 100 ms for requests on their way.
    pub fn gap(&self) -> Duration {
        Duration::from_millis(1100)
    }
    /// How long a daemon that has just started runs before partitions are given to it
    /// (`assign::eligible`): two lease periods.
    pub fn settle(&self) -> Duration {
        self.ttl * 2
    }
}

/// The value of a lease key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The daemon holding it, or that last held it.
    pub owner: String,
    /// Given up by its owner, which stopped sending before writing this.
    pub released: bool,
    /// The holder's `lease_ttl` in milliseconds: a taker waits the longer of it and its own,
    /// so that a deployment changing `lease_ttl` one daemon at a time stays safe.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

/// A lease revision this daemon has seen, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub revision: u64,
    pub since: Instant,
}

/// What to do about a lease this daemon wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Nobody ever held it: create the key.
    Create,
    /// Take it by compare-and-set on this revision.
    Update(u64),
    /// Held by a daemon that may still be sending.
    Wait,
}

/// Decides whether a daemon (`me`) may take a lease whose key holds `current` (with its
/// revision), given what it saw before; returns the decision and what it has seen now.
pub fn decide(
    me: &str,
    current: Option<(&Lease, u64)>,
    seen: Option<Seen>,
    now: Instant,
    timing: Timing,
) -> (Take, Option<Seen>) {
    let Some((lease, revision)) = current else {
        return (Take::Create, None);
    };
    if lease.released || lease.owner == me {
        return (Take::Update(revision), None);
    }
    let ttl = lease
        .ttl_ms
        .map_or(timing.ttl, |ms| timing.ttl.max(Duration::from_millis(ms)));
    match seen {
        Some(seen) if seen.revision == revision => {
            if now.saturating_duration_since(seen.since) >= ttl {
                (Take::Update(revision), Some(seen))
            } else {
                (Take::Wait, Some(seen))
            }
        }
        // A new revision: its holder renewed; the wait starts again from now.
        _ => (
            Take::Wait,
            Some(Seen {
                revision,
                since: now,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn held(owner: &str) -> Lease {
        Lease {
            owner: owner.into(),
            released: false,
            ttl_ms: None,
        }
    }

    #[test]
    fn absent_released_and_own_leases_are_taken_at_once() {
        let t = Timing {
            ttl: Duration::from_secs(5),
        };
        let now = Instant::now();
        assert_eq!(decide("a", None, None, now, t).0, Take::Create);
        let released = Lease {
            owner: "b".into(),
            released: true,
            ttl_ms: None,
        };
        assert_eq!(
            decide("a", Some((&released, 7)), None, now, t).0,
            Take::Update(7)
        );
        assert_eq!(
            decide("a", Some((&held("a"), 8)), None, now, t).0,
            Take::Update(8)
        );
    }

    #[test]
    fn a_holder_with_a_longer_ttl_is_waited_for_as_long() {
        let t = Timing {
            ttl: Duration::from_secs(5),
        };
        let start = Instant::now();
        let mut lease = held("b");
        lease.ttl_ms = Some(30_000);
        let (_, seen) = decide("a", Some((&lease, 3)), None, start, t);
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(
            decide("a", Some((&lease, 3)), seen, at(10), t).0,
            Take::Wait
        );
        assert_eq!(
            decide("a", Some((&lease, 3)), seen, at(30), t).0,
            Take::Update(3)
        );
    }

    proptest! {
        /// Whatever the holder's renewal pattern and the observer's polling, a held lease is
        /// taken only once its revision went unchanged for a whole lease_ttl of the taker's
        /// polls, so at least lease_ttl after the holder sent that renewal; and then the
        /// holder had stopped more than a second before the taker's first request.
        #[test]
        fn a_held_lease_is_taken_only_after_a_silent_ttl(
            ttl_ms in 2_000u64..30_000,
            renewals in proptest::collection::vec((0u64..8_000, 0u64..500), 1..20),
            poll_ms in 50u64..3_000,
        ) {
            let timing = Timing { ttl: Duration::from_millis(ttl_ms) };
            let start = Instant::now();
            // Renewals: sent at `sent`, written `delay` later; revision i+1.
            let mut sent = 0u64;
            let mut writes = Vec::new();
            for (i, (gap, delay)) in renewals.iter().enumerate() {
                sent += gap;
                writes.push((sent, sent + delay, i as u64 + 1));
            }
            let mut seen = None;
            let mut t = 0u64;
            let end = sent + 1_000 + 3 * ttl_ms;
            while t < end {
                // The newest revision written by now.
                let current = writes.iter().filter(|w| w.1 <= t).max_by_key(|w| w.2).copied();
                let lease = held("holder");
                let now = start + Duration::from_millis(t);
                let (take, next) = decide("taker", current.map(|w| (&lease, w.2)), seen, now, timing);
                seen = next;
                if let Take::Update(revision) = take {
                    let (renew_sent, _, _) = writes[revision as usize - 1];
                    prop_assert!(t >= renew_sent + ttl_ms);
                    let holder_stops = renew_sent + timing.hold_for().as_millis() as u64;
                    let taker_starts = t + timing.gap().as_millis() as u64;
                    prop_assert!(taker_starts >= holder_stops + 1_000 + ttl_ms / 5);
                    break;
                }
                t += poll_ms;
            }
        }
    }
}
