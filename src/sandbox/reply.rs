//! Zoom's response shapes as the sandbox sends them: error bodies, rate-limit headers,
//! `Retry-After` values in each form, and scripted answers. No decisions are made here.

use std::time::{Duration, SystemTime};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use time::macros::format_description;
use time::OffsetDateTime;

use super::RetryAfterForm;

pub(crate) const QPS_MESSAGE: &str =
    "You have reached the maximum per-second rate limit for this API. Try again later.";
pub(crate) const DAILY_MESSAGE: &str =
    "You have reached the maximum daily rate limit for this API. \
     Refer to the response header for details on when you can make another request.";

pub(crate) fn zoom_error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

pub(crate) fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

pub(crate) fn too_many(
    limit: u32,
    kind: &'static str,
    message: &str,
    retry_after: Option<String>,
) -> Response {
    let mut response = zoom_error(StatusCode::TOO_MANY_REQUESTS, 429, message);
    let headers = response.headers_mut();
    set_rate_limit_headers(headers, kind, limit, 0);
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(header::RETRY_AFTER, value);
    }
    response
}

pub(crate) fn set_rate_limit_headers(
    headers: &mut HeaderMap,
    kind: &'static str,
    limit: u32,
    remaining: u32,
) {
    let pairs = [
        ("x-ratelimit-category", HeaderValue::from_static("Medium")),
        ("x-ratelimit-type", HeaderValue::from_static(kind)),
        ("x-ratelimit-limit", HeaderValue::from(limit)),
        ("x-ratelimit-remaining", HeaderValue::from(remaining)),
    ];
    for (name, value) in pairs {
        headers.insert(HeaderName::from_static(name), value);
    }
}

pub(crate) fn scripted_response(
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<Value>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        Some(body) => (status, Json(body)).into_response(),
        None if status == StatusCode::NO_CONTENT || status.is_informational() => {
            status.into_response()
        }
        None if status == StatusCode::TOO_MANY_REQUESTS => zoom_error(status, 429, QPS_MESSAGE),
        None => zoom_error(status, status.as_u16().into(), reason(status)),
    };
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes());
        let value = HeaderValue::from_str(&value);
        if let (Ok(name), Ok(value)) = (name, value) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// `Retry-After` for an instant `delay` from now.
pub(crate) fn retry_after_value(form: RetryAfterForm, delay: Duration) -> String {
    let now = OffsetDateTime::now_utc();
    retry_after_at(form, now, now + delay)
}

/// `Retry-After` for the instant `target`. Instants are rounded up to the next whole second so
/// a client that obeys never comes back early.
pub(crate) fn retry_after_at(
    form: RetryAfterForm,
    now: OffsetDateTime,
    target: OffsetDateTime,
) -> String {
    // Delta seconds round up on their own.
    let delay = (target - now).as_seconds_f64();
    let target = if target.nanosecond() > 0 {
        target.replace_nanosecond(0).unwrap_or(target) + Duration::from_secs(1)
    } else {
        target
    };
    match form {
        RetryAfterForm::Seconds => delay.ceil().max(1.0).to_string(),
        RetryAfterForm::HttpDate => httpdate::fmt_http_date(SystemTime::from(target)),
        RetryAfterForm::Iso8601 => target
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            ))
            .unwrap_or_default(),
    }
}
