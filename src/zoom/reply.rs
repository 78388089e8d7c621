//! Reading Zoom's answers: the size-capped body read, the lenient error-body parser, the
//! rate-limit headers with `Retry-After`, and the classification of one HTTP answer into an
//! [`Outcome`]. Everything here is a pure function of the answer except [`read_capped`]; this
//! file holds no state and never sees the access token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;
use time::format_description::well_known::{Iso8601, Rfc3339};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use super::{Call, LimitKind, Outcome, Sent};

/// Most bytes of an answer body kept; a hostile or broken server cannot make us buffer more.
pub(super) const MAX_BODY: usize = 64 * 1024;
/// Most characters of a body quoted in an error message.
const EXCERPT_CHARS: usize = 200;
/// The furthest a `Retry-After` may push a retry; anything later is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2 * 24 * 3600);
/// Body codes Zoom uses for a missing, invalid or expired access token (7010 is the chatbot
/// API's, 124 and 4700 the generic REST API's).
const BAD_TOKEN_CODES: [i64; 3] = [124, 4700, 7010];

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

/// One answer, classified. A refused token is not an [`Outcome`] yet: the client retries once.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Answer {
    Outcome(Outcome),
    BadToken { status: u16, detail: String },
}

/// Classifies an answer to one call by status, headers and (capped) body. Only a send's 2xx
/// reads the body for more than an explanation.
pub(super) fn classify(
    call: Call,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Answer {
    let code = status.as_u16();
    if status.is_success() {
        return Answer::Outcome(match call {
            Call::Send => sent(code, body),
            Call::Edit | Call::Delete => Outcome::Delivered {
                status: code,
                sent: None,
            },
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        // The message text varies and is not parsed; only the documented headers count.
        let kind = match header(headers, "x-ratelimit-type") {
            Some(kind) if kind.to_ascii_lowercase().contains("daily") => LimitKind::Daily,
            _ => LimitKind::Qps,
        };
        return Answer::Outcome(Outcome::RateLimited {
            kind,
            retry_after: header(headers, "retry-after").and_then(|v| parse_retry_after(v, now)),
            limit: header(headers, "x-ratelimit-limit").and_then(|v| v.trim().parse().ok()),
        });
    }
    let error = parse_error_body(body);
    let detail = describe_status(status, &error);
    let bad_token = error.code.is_some_and(|c| BAD_TOKEN_CODES.contains(&c));
    if status == StatusCode::UNAUTHORIZED || (status.is_client_error() && bad_token) {
        return Answer::BadToken {
            status: code,
            detail,
        };
    }
    if status.is_client_error() && status != StatusCode::REQUEST_TIMEOUT {
        let message = if error.message.is_empty() {
            status
                .canonical_reason()
                .unwrap_or("no message")
                .to_string()
        } else {
            error.message
        };
        return Answer::Outcome(Outcome::Rejected {
            status: code,
            code: error.code,
            message,
        });
    }
    // 408, 5xx, and what Zoom never sends (3xx: redirects are not followed, so a proxy or a
    // wrong `api_base` shows up here): transient, so requests wait for an operator instead of
    // being dropped.
    let detail = match header(headers, "location") {
        Some(location) if status.is_redirection() => {
            format!(
                "{detail}: unexpected redirect to {}",
                excerpt(location.as_bytes())
            )
        }
        _ => detail,
    };
    Answer::Outcome(Outcome::Transient {
        status: Some(code),
        detail,
        in_doubt: may_be_applied(status),
    })
}

/// Whether a transient status leaves open that Zoom applied the request. 503 means "not
/// serving" and 408 that the request never arrived whole; a 3xx came from something in front
/// of Zoom (redirects are not followed). Any other 5xx may come after the work was done, or
/// from a gateway that lost Zoom's answer (502, 504); a nonstandard status is given the same
/// benefit of the doubt, since guessing "not applied" wrongly is what duplicates a message.
fn may_be_applied(status: StatusCode) -> bool {
    !(status == StatusCode::SERVICE_UNAVAILABLE
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_redirection())
}

/// A send's 2xx: the posted message's name, or a rejection when the body does not name it
/// (empty, cut off at [`MAX_BODY`], not JSON, no non-empty `message_id` string). Such a
/// message can never be edited or deleted, and a retry would post it twice, so it is refused
/// for good.
fn sent(status: u16, body: &[u8]) -> Outcome {
    let fields: Option<Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        fields
            .as_ref()
            .and_then(|fields| fields.get(key))
            .and_then(Value::as_str)
    };
    match text("message_id") {
        Some(message_id) if !message_id.is_empty() => Outcome::Delivered {
            status,
            sent: Some(Sent {
                message_id: message_id.to_string(),
                sent_time: text("sent_time").map(str::to_string),
            }),
        },
        _ => {
            let quoted = if body.is_empty() {
                "(no body)".to_string()
            } else {
                excerpt(body)
            };
            Outcome::Rejected {
                status,
                code: None,
                message: format!("Zoom answered {status} to a send without a message_id: {quoted}"),
            }
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// `HTTP 404 Not Found: Invalid message_id value. (code 8001)`.
fn describe_status(status: StatusCode, error: &ErrorBody) -> String {
    let mut text = format!("HTTP {status}");
    if !error.message.is_empty() {
        text.push_str(": ");
        text.push_str(&error.message);
    }
    if let Some(code) = error.code {
        text.push_str(&format!(" (code {code})"));
    }
    text
}

/// What an error body says, as far as it can be made out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ErrorBody {
    pub code: Option<i64>,
    /// Never longer than about [`EXCERPT_CHARS`]; empty when the body said nothing.
    pub message: String,
}

/// Parses Zoom's `{"code": int, "message": str}` leniently: a string code, OAuth's
/// `error`/`reason`, an `errors` array (strings or objects with `message`), `result: false`
/// (ignored) and non-JSON bodies (quoted as a short excerpt) are all accepted.
pub(super) fn parse_error_body(body: &[u8]) -> ErrorBody {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) else {
        return ErrorBody {
            code: None,
            message: excerpt(body),
        };
    };
    let mut code = map.get("code").and_then(as_code);
    let mut message = ["message", "reason", "error_description", "error"]
        .iter()
        .find_map(|key| {
            map.get(*key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_default()
        .to_string();
    let details: Vec<String> = match map.get("errors") {
        Some(Value::Array(errors)) => errors
            .iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(text.clone()),
                Value::Object(fields) => {
                    code = code.or_else(|| fields.get("code").and_then(as_code));
                    fields
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !details.is_empty() {
        let joined = details.join("; ");
        message = if message.is_empty() {
            joined
        } else {
            format!("{message} ({joined})")
        };
    }
    ErrorBody {
        code,
        message: excerpt(message.as_bytes()),
    }
}

fn as_code(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// A body as one short line of text: lossy UTF-8, control characters as spaces, at most
/// [`EXCERPT_CHARS`] characters (cut on a character boundary, marked with `…`).
pub(super) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Reads at most [`MAX_BODY`] bytes of a body. A failure while reading keeps what arrived:
/// the status line already decided the outcome, the body only explains it.
pub(super) async fn read_capped(response: &mut reqwest::Response) -> Vec<u8> {
    let mut buffer = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_BODY - buffer.len();
                buffer.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if buffer.len() >= MAX_BODY {
                    break;
                }
            }
            Ok(None) => break,
            Err(error) => {
                tracing::debug!(error = %error, "could not read the whole answer body");
                break;
            }
        }
    }
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    // 2020-05-30T23:58:00Z, two minutes before Zoom's documented example instant.
    const NOW: u64 = 1_590_883_080;

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

    #[test]
    fn error_bodies_are_read_leniently() {
        let zoom = parse_error_body(br#"{"code":8001,"message":"Invalid message_id value."}"#);
        assert_eq!(
            zoom,
            ErrorBody {
                code: Some(8001),
                message: "Invalid message_id value.".into()
            }
        );
        let listed = parse_error_body(
            br#"{"code":"300","message":"Validation Failed.","result":false,"errors":[{"field":"content","message":"Empty message"},"second"]}"#,
        );
        assert_eq!(listed.code, Some(300));
        assert_eq!(listed.message, "Validation Failed. (Empty message; second)");
        let only_errors = parse_error_body(br#"{"errors":[{"code":7001,"message":"bad body"}]}"#);
        assert_eq!(
            only_errors,
            ErrorBody {
                code: Some(7001),
                message: "bad body".into()
            }
        );
        let oauth = parse_error_body(br#"{"reason":"Invalid client","error":"invalid_client"}"#);
        assert_eq!(oauth.message, "Invalid client");
        let html = parse_error_body(b"<html>\n<body>Bad Gateway</body></html>");
        assert_eq!(
            html,
            ErrorBody {
                code: None,
                message: "<html> <body>Bad Gateway</body></html>".into()
            }
        );
        assert_eq!(parse_error_body(b"").message, "");
        assert_eq!(parse_error_body(b"[1,2]").message, "[1,2]");
    }

    #[test]
    fn excerpts_are_short_and_cut_on_characters() {
        let long = "ü".repeat(500);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
        assert_eq!(excerpt(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn classification() {
        let now = at(NOW);
        let none = HeaderMap::new();
        let outcome = |status: u16, body: &str| {
            classify(
                Call::Edit,
                StatusCode::from_u16(status).unwrap(),
                &none,
                body.as_bytes(),
                now,
            )
        };
        assert_eq!(
            outcome(204, ""),
            Answer::Outcome(Outcome::Delivered {
                status: 204,
                sent: None
            })
        );
        assert!(matches!(
            outcome(401, ""),
            Answer::BadToken { status: 401, .. }
        ));
        assert!(matches!(
            outcome(400, r#"{"code":4700,"message":"x"}"#),
            Answer::BadToken { status: 400, .. }
        ));
        assert!(matches!(
            outcome(500, r#"{"code":124}"#),
            Answer::Outcome(Outcome::Transient {
                status: Some(500),
                in_doubt: true,
                ..
            })
        ));
        assert_eq!(
            outcome(404, ""),
            Answer::Outcome(Outcome::Rejected {
                status: 404,
                code: None,
                message: "Not Found".into()
            })
        );
        assert!(matches!(
            outcome(408, ""),
            Answer::Outcome(Outcome::Transient {
                status: Some(408),
                in_doubt: false,
                ..
            })
        ));
        let mut redirect = HeaderMap::new();
        redirect.insert(
            "location",
            HeaderValue::from_static("https://example.com/v2"),
        );
        let Answer::Outcome(Outcome::Transient {
            detail,
            in_doubt: false,
            ..
        }) = classify(
            Call::Edit,
            StatusCode::MOVED_PERMANENTLY,
            &redirect,
            b"",
            now,
        )
        else {
            panic!("a redirect is transient");
        };
        assert!(
            detail.contains("redirect to https://example.com/v2"),
            "{detail}"
        );
    }

    #[test]
    fn rate_limit_headers() {
        let now = at(NOW);
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-type", HeaderValue::from_static("Daily-limit"));
        headers.insert("x-ratelimit-limit", HeaderValue::from_static("2000"));
        headers.insert(
            "retry-after",
            HeaderValue::from_static("2020-05-31T00:00:00Z"),
        );
        assert_eq!(
            classify(
                Call::Send,
                StatusCode::TOO_MANY_REQUESTS,
                &headers,
                b"{}",
                now
            ),
            Answer::Outcome(Outcome::RateLimited {
                kind: LimitKind::Daily,
                retry_after: Some(at(NOW + 120)),
                limit: Some(2000),
            })
        );
        assert_eq!(
            classify(
                Call::Send,
                StatusCode::TOO_MANY_REQUESTS,
                &HeaderMap::new(),
                b"",
                now
            ),
            Answer::Outcome(Outcome::RateLimited {
                kind: LimitKind::Qps,
                retry_after: None,
                limit: None
            })
        );
    }

    #[test]
    fn in_doubt_by_status() {
        for (status, in_doubt) in [
            (500, true),
            (502, true),
            (504, true),
            (507, true),
            (503, false),
            (408, false),
            (307, false),
        ] {
            let answer = classify(
                Call::Send,
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                b"",
                at(NOW),
            );
            assert!(
                matches!(answer, Answer::Outcome(Outcome::Transient { in_doubt: d, .. }) if d == in_doubt),
                "{status}: {answer:?}"
            );
        }
    }

    #[test]
    fn sends_are_named_by_their_answer() {
        assert_eq!(
            sent(200, br#"{"message_id":"m-1"}"#),
            Outcome::Delivered {
                status: 200,
                sent: Some(Sent {
                    message_id: "m-1".into(),
                    sent_time: None
                })
            }
        );
        let unnamed = [
            (&b""[..], "(no body)"),
            (br#"{"message_id":""}"#, r#"{"message_id":""}"#),
            (br#"{"message_id":42}"#, r#"{"message_id":42}"#),
            (br#"{"message_id":"m-1""#, r#"{"message_id":"m-1""#),
            (b"<html>Created</html>", "<html>Created</html>"),
        ];
        for (body, quoted) in unnamed {
            assert_eq!(
                sent(201, body),
                Outcome::Rejected {
                    status: 201,
                    code: None,
                    message: format!("Zoom answered 201 to a send without a message_id: {quoted}")
                }
            );
        }
    }
}
