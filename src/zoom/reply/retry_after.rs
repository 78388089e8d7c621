//! The `Retry-After` header of a 429: delay seconds, an HTTP-date or an ISO 8601 instant,
//! clamped to at most two days ahead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// The furthest a `Retry-After` may push a retry; anything later is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2 * 24 * 3600);

/// Parses a `Retry-After` value in any of the three forms Zoom or HTTP may use: delay seconds
/// (`"120"`), an HTTP-date (`"Sun, 31 May 2020 00:00:00 GMT"`) or an RFC 3339 / ISO 8601
/// instant (`"2020-05-31T00:00:00Z"`; without an offset it is taken as UTC). The result is
/// clamped to `[now, now + 2 days]`: an instant in the past means "now". `None` when the value
/// is none of these.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(seconds) = value.parse::<i64>() {
        return Some(after_nanos(now, i128::from(seconds) * 1_000_000_000));
    }
    if let Ok(seconds) = value.parse::<f64>() {
        // `f64::from_str` also accepts "inf" and "NaN", which are no delay at all.
        if !seconds.is_finite() {
            return None;
        }
        let nanos = (seconds * 1e9).clamp(-1e30, 1e30) as i128;
        return Some(after_nanos(now, nanos));
    }
    if let Ok(instant) = httpdate::parse_http_date(value) {
        let delay = instant.duration_since(now).unwrap_or(Duration::ZERO);
        return Some(now + delay.min(MAX_RETRY_AFTER));
    }
    let instant = OffsetDateTime::parse(value, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(value, &Iso8601::DEFAULT))
        .or_else(|_| {
            let local = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            PrimitiveDateTime::parse(value, local).map(PrimitiveDateTime::assume_utc)
        })
        .ok()?;
    let now_nanos = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i128);
    Some(after_nanos(now, instant.unix_timestamp_nanos() - now_nanos))
}

/// `now` plus a signed delay in nanoseconds, clamped to `[now, now + MAX_RETRY_AFTER]`.
fn after_nanos(now: SystemTime, nanos: i128) -> SystemTime {
    let capped = nanos.clamp(0, MAX_RETRY_AFTER.as_nanos() as i128);
    now + Duration::from_nanos(capped as u64)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The instant `seconds` after the Unix epoch.
    pub(in crate::zoom::reply) fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// 2020-05-30T23:58:00Z, two minutes before Zoom's documented example instant.
    pub(in crate::zoom::reply) const NOW: u64 = 1_590_883_080;

    #[test]
    fn retry_after_seconds() {
        let now = at(NOW);
        assert_eq!(parse_retry_after("120", now), Some(at(NOW + 120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(now));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(now + Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-5", now), Some(now));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(now + MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_http_date() {
        let now = at(NOW);
        assert_eq!(
            parse_retry_after("Sun, 31 May 2020 00:00:00 GMT", now),
            Some(at(NOW + 120))
        );
        assert_eq!(
            parse_retry_after("Sat, 30 May 2020 00:00:00 GMT", now),
            Some(now)
        );
    }

    #[test]
    fn retry_after_iso_instant() {
        let now = at(NOW);
        assert_eq!(
            parse_retry_after("2020-05-31T00:00:00Z", now),
            Some(at(NOW + 120))
        );
        assert_eq!(
            parse_retry_after("2020-05-31T02:00:00+02:00", now),
            Some(at(NOW + 120))
        );
        assert_eq!(
            parse_retry_after("2020-05-31T00:00:00", now),
            Some(at(NOW + 120))
        );
        assert_eq!(
            parse_retry_after("2020-05-31T00:00:00.500Z", now),
            Some(at(NOW + 120) + Duration::from_millis(500))
        );
        assert_eq!(parse_retry_after("1999-01-01T00:00:00Z", now), Some(now));
        assert_eq!(
            parse_retry_after("2999-01-01T00:00:00Z", now),
            Some(now + MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_garbage() {
        let now = at(NOW);
        for value in [
            "",
            "soon",
            "inf",
            "NaN",
            "2020-13-45T00:00:00Z",
            "12 seconds",
        ] {
            assert_eq!(parse_retry_after(value, now), None, "{value:?}");
        }
    }
}
