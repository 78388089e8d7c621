//! The edit endpoint, `PUT /v2/im/chat/messages/{message_id}`: how one request is judged.
//!
//! This module owns the order of the checks, which decides what a client sees when several
//! things are wrong at once:
//!
//! 1. a [`Scripted`] step queued for the message id, if any (answers before anything else);
//! 2. the bearer token (401 code 124);
//! 3. `Content-Type`, JSON and `account_id`, needed to know whose quota to charge (400 7001);
//! 4. the account's daily cap, then its per-second window, then an injected 429 (429);
//! 5. random faults: slow, then reset / 5xx / spurious 429;
//! 6. the rest of the body (400 7001), `robot_jid` (404 7002, 403 7004), the message id
//!    (404 8001);
//! 7. success: the edit is applied and answered 200 with Zoom's body, or 204.
//!
//! Quota bookkeeping lives in `state.rs`, response shapes in `reply.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde_json::{json, Value};
use time::macros::format_description;
use time::OffsetDateTime;

use super::conn::ResetSwitch;
use super::http::{bearer_token, pause};
use super::reply::{
    reason, retry_after_at, retry_after_value, scripted_response, set_rate_limit_headers, too_many,
    zoom_error, DAILY_MESSAGE, QPS_MESSAGE,
};
use super::state::{Admission, Shared};
use super::stats::RequestRecord;
use super::{Faults, InjectedLimit, RetryAfterForm, Scripted};

/// How an edit request is answered.
enum Reply {
    Response(Response),
    /// Close the connection without answering.
    Reset,
}

pub(crate) async fn edit(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(switch): ConnectInfo<ResetSwitch>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Ok(Path(message_id)) = path else {
        return zoom_error(StatusCode::BAD_REQUEST, 7001, "Invalid message_id value.");
    };
    let at = Instant::now();
    // Held until the answer is decided, or until hyper drops this future because the client
    // went away: either way the per-message concurrency count stays right.
    let _in_flight = shared.enter_message(&message_id);
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    let account_id = body
        .as_ref()
        .and_then(|body| body.get("account_id"))
        .and_then(Value::as_str)
        .filter(|account_id| !account_id.is_empty())
        .map(str::to_string);

    let reply = judge_edit(&shared, &message_id, &headers, body, account_id.as_deref()).await;

    let status = match &reply {
        Reply::Response(response) => Some(response.status().as_u16()),
        Reply::Reset => None,
    };
    tracing::debug!(message_id, account_id, status, "sandbox edit request");
    shared.lock().finish(RequestRecord {
        at,
        offset: at.saturating_duration_since(shared.started),
        account_id,
        message_id,
        status,
    });
    match reply {
        Reply::Response(response) => response,
        Reply::Reset => {
            // This response is never written: the flipped switch fails hyper's first write.
            switch.reset();
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Steps 1 to 7 of the module docs.
async fn judge_edit(
    shared: &Arc<Shared>,
    message_id: &str,
    headers: &HeaderMap,
    body: Option<Value>,
    account_id: Option<&str>,
) -> Reply {
    let step = shared
        .lock()
        .scripts
        .get_mut(message_id)
        .and_then(VecDeque::pop_front);
    match step {
        Some(Scripted::Status {
            status,
            headers,
            body,
        }) => return Reply::Response(scripted_response(status, headers, body)),
        Some(Scripted::Reset) => return Reply::Reset,
        Some(Scripted::Delay(delay)) => pause(shared, delay).await,
        Some(Scripted::Pass) | None => {}
    }

    let token_is_live = bearer_token(headers)
        .is_some_and(|token| shared.lock().token_is_live(token, Instant::now()));
    if !token_is_live {
        return Reply::Response(zoom_error(
            StatusCode::UNAUTHORIZED,
            124,
            "Invalid access token.",
        ));
    }
    if !is_json(headers) {
        return bad_request("Content-Type must be application/json.".to_string());
    }
    let Some(body) = body.filter(Value::is_object) else {
        return bad_request("Request body must be a JSON object.".to_string());
    };
    let Some(account_id) = account_id else {
        return bad_request("account_id is required and must be a non-empty string.".to_string());
    };

    let (limit, remaining, faults) = {
        let mut guard = shared.lock();
        let state = &mut *guard;
        let today = OffsetDateTime::now_utc().date();
        match state.admit(account_id, shared.started, today) {
            Admission::Admitted { limit, remaining } => {
                let faults = FaultDraw::draw(&state.cfg.faults, &mut state.rng);
                (limit, remaining, faults)
            }
            Admission::Qps { limit, next_window } => {
                let retry_after = state.cfg.qps_retry_after.map(|form| {
                    let delay = next_window.saturating_duration_since(Instant::now());
                    retry_after_value(form, delay)
                });
                return Reply::Response(too_many(limit, "QPS", QPS_MESSAGE, retry_after));
            }
            Admission::Daily { limit } => {
                let retry_after = state.cfg.daily_retry_after.map(|form| {
                    let now = OffsetDateTime::now_utc();
                    let midnight = now.date().next_day().map(|day| day.midnight().assume_utc());
                    retry_after_at(form, now, midnight.unwrap_or(now))
                });
                return Reply::Response(too_many(limit, "Daily-limit", DAILY_MESSAGE, retry_after));
            }
            Admission::Injected { limit, answer } => {
                let retry_after = answer
                    .retry_after
                    .map(|delay| retry_after_value(RetryAfterForm::Seconds, delay));
                let response = match answer.limit {
                    InjectedLimit::Qps => too_many(limit, "QPS", QPS_MESSAGE, retry_after),
                    InjectedLimit::Daily => {
                        too_many(limit, "Daily-limit", DAILY_MESSAGE, retry_after)
                    }
                };
                return Reply::Response(response);
            }
        }
    };

    if let Some(delay) = faults.slow {
        pause(shared, delay).await;
    }
    match faults.outcome {
        FaultOutcome::None => {}
        FaultOutcome::Reset => return Reply::Reset,
        FaultOutcome::ServerError(status) => {
            return Reply::Response(zoom_error(status, status.as_u16().into(), reason(status)));
        }
        FaultOutcome::Spurious429(None) => {
            return Reply::Response(zoom_error(StatusCode::TOO_MANY_REQUESTS, 429, QPS_MESSAGE));
        }
        FaultOutcome::Spurious429(Some(retry_after)) => {
            return Reply::Response(too_many(limit, "QPS", QPS_MESSAGE, Some(retry_after)));
        }
    }

    if let Err(problem) = validate(&body) {
        return bad_request(problem);
    }
    let robot_jid = body["robot_jid"].as_str().unwrap_or_default();
    let respond_204 = {
        let mut state = shared.lock();
        let cfg = &state.cfg;
        if cfg.unknown_robots.contains(robot_jid) {
            return Reply::Response(zoom_error(
                StatusCode::NOT_FOUND,
                7002,
                "Invalid robot_jid value.",
            ));
        }
        if cfg.forbidden_robots.contains(robot_jid) {
            return Reply::Response(zoom_error(StatusCode::FORBIDDEN, 7004, "Not authorized."));
        }
        let missing_prefix = cfg.missing_prefix.as_deref().filter(|p| !p.is_empty());
        if cfg.missing_messages.contains(message_id)
            || missing_prefix.is_some_and(|prefix| message_id.starts_with(prefix))
        {
            return Reply::Response(zoom_error(
                StatusCode::NOT_FOUND,
                8001,
                "Invalid message_id value.",
            ));
        }
        let respond_204 = cfg.respond_204;
        state.apply_edit(message_id, &body);
        respond_204
    };

    let mut response = if respond_204 {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let sent_time = OffsetDateTime::now_utc()
            .format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second] +0000"
            ))
            .unwrap_or_default();
        let user_jid = body
            .get("user_jid")
            .and_then(Value::as_str)
            .unwrap_or_default();
        Json(json!({
            "message_id": message_id,
            "robot_jid": robot_jid,
            "sent_time": sent_time,
            "to_jid": "sandbox-channel@conference.xmpp.zoom.us",
            "user_jid": user_jid,
        }))
        .into_response()
    };
    set_rate_limit_headers(response.headers_mut(), "QPS", limit, remaining);
    Reply::Response(response)
}

/// The random faults decided for one admitted request.
struct FaultDraw {
    slow: Option<Duration>,
    outcome: FaultOutcome,
}

enum FaultOutcome {
    None,
    Reset,
    ServerError(StatusCode),
    /// With the `Retry-After` value, if the configured form sends one.
    Spurious429(Option<String>),
}

impl FaultDraw {
    /// Always draws the same number of values, so the n-th request gets the same faults
    /// whatever the probabilities of earlier requests turned out to be.
    fn draw(faults: &Faults, rng: &mut impl Rng) -> FaultDraw {
        let reset: f64 = rng.random();
        let error_5xx: f64 = rng.random();
        let spurious_429: f64 = rng.random();
        let slow: f64 = rng.random();
        let slow_fraction: f64 = rng.random();
        let status_pick = rng.random_range(0..3usize);

        let slow_span = faults.slow_max.saturating_sub(faults.slow_min);
        let outcome = if reset < faults.reset {
            FaultOutcome::Reset
        } else if error_5xx < faults.error_5xx {
            let statuses = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
            ];
            FaultOutcome::ServerError(statuses[status_pick])
        } else if spurious_429 < faults.spurious_429 {
            let retry_after = faults
                .spurious_429_retry_after
                .map(|form| retry_after_value(form, faults.spurious_429_delay));
            FaultOutcome::Spurious429(retry_after)
        } else {
            FaultOutcome::None
        };
        FaultDraw {
            slow: (slow < faults.slow).then(|| faults.slow_min + slow_span.mul_f64(slow_fraction)),
            outcome,
        }
    }
}

/// Checks the body against Zoom's schema for the edit call (`account_id` already checked).
/// `null` optional fields count as absent; unknown fields are rejected so typos surface.
fn validate(body: &Value) -> Result<(), String> {
    let object = body
        .as_object()
        .ok_or("Request body must be a JSON object.")?;
    for field in object.keys() {
        let known = [
            "robot_jid",
            "account_id",
            "content",
            "user_jid",
            "is_markdown_support",
        ];
        if !known.contains(&field.as_str()) {
            return Err(format!("Unknown field: {field}."));
        }
    }
    let robot_jid = object.get("robot_jid").and_then(Value::as_str);
    if robot_jid.is_none_or(str::is_empty) {
        return Err("robot_jid is required and must be a non-empty string.".to_string());
    }
    match object.get("content") {
        Some(Value::Object(content)) if !content.is_empty() => {}
        Some(Value::Object(_)) => return Err("content must not be empty.".to_string()),
        _ => return Err("content is required and must be a JSON object.".to_string()),
    }
    if !matches!(
        object.get("user_jid"),
        None | Some(Value::Null | Value::String(_))
    ) {
        return Err("user_jid must be a string.".to_string());
    }
    let markdown = object.get("is_markdown_support");
    if !matches!(markdown, None | Some(Value::Null | Value::Bool(_))) {
        return Err("is_markdown_support must be a boolean.".to_string());
    }
    Ok(())
}

fn bad_request(problem: String) -> Reply {
    Reply::Response(zoom_error(StatusCode::BAD_REQUEST, 7001, &problem))
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}
