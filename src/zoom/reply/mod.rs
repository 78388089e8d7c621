//! Reading Zoom's answers: one HTTP answer classified into an [`Outcome`] by its status, its
//! rate-limit headers and its body (this file), the `Retry-After` header's three forms
//! (`retry_after.rs`), and the body itself, read size-capped and parsed leniently (`body.rs`).
//! Everything here is a pure function of the answer except [`read_capped`]; this module holds
//! no state and never sees the access token.

use std::time::SystemTime;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;

use super::{Call, LimitKind, Outcome, Sent};

mod body;
mod retry_after;

use body::ErrorBody;
pub(super) use body::{excerpt, parse_error_body, read_capped};
pub use retry_after::parse_retry_after;

/// Body codes Zoom uses for a missing, invalid or expired access token (7010 is the chatbot
/// API's, 124 and 4700 the generic REST API's).
const BAD_TOKEN_CODES: [i64; 3] = [124, 4700, 7010];

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
/// (empty, cut off at [`body::MAX_BODY`], not JSON, no non-empty `message_id` string). Such a
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

#[cfg(test)]
mod tests {
    use super::retry_after::tests::{at, NOW};
    use super::*;
    use reqwest::header::HeaderValue;

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
