//! The sandbox's HTTP surface: Zoom's token and edit endpoints plus the `/sandbox/*` views.
//!
//! This module owns the order in which an edit request is judged, which decides what a client
//! sees when several things are wrong at once:
//!
//! 1. a [`Scripted`] step queued for the message id, if any (answers before anything else);
//! 2. the bearer token (401 code 124);
//! 3. `Content-Type`, JSON and `account_id`, needed to know whose quota to charge (400 7001);
//! 4. the account's daily cap, then its per-second window (429);
//! 5. random faults: slow, then reset / 5xx / spurious 429;
//! 6. the rest of the body (400 7001), `robot_jid` (404 7002, 403 7004), the message id
//!    (404 8001);
//! 7. success: the edit is applied and answered 200 with Zoom's body, or 204.
//!
//! It never logs a token or the client secret.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use rand::distr::{Alphanumeric, SampleString};
use rand::Rng;
use serde_json::{json, Value};
use time::macros::format_description;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::conn::{ResetSwitch, ResettableListener};
use super::state::{Admission, RequestRecord, Shared};
use super::{RetryAfterForm, Scripted};

const QPS_MESSAGE: &str =
    "You have reached the maximum per-second rate limit for this API. Try again later.";
const DAILY_MESSAGE: &str = "You have reached the maximum daily rate limit for this API. \
     Refer to the response header for details on when you can make another request.";

/// Serves until `cancel` fires, then lets in-flight requests finish.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let app = Router::new()
        .route("/oauth/token", post(token))
        .route("/v2/im/chat/messages/{message_id}", put(edit))
        .route("/sandbox/messages/{message_id}", get(view_message))
        .route("/sandbox/stats", get(view_stats))
        .fallback(not_found)
        .with_state(shared)
        .into_make_service_with_connect_info::<ResetSwitch>();
    let server = axum::serve(ResettableListener(listener), app)
        .with_graceful_shutdown(cancel.cancelled_owned());
    if let Err(error) = server.await {
        tracing::warn!(%error, "zoom sandbox stopped");
    }
}

/// How an edit request is answered.
enum Reply {
    Response(Response),
    /// Close the connection without answering.
    Reset,
}

async fn token(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let _in_flight = shared.enter_token();
    let delay = shared.lock().cfg.token_delay;
    pause(&shared, delay).await;

    let (client_id, client_secret) = {
        let state = shared.lock();
        (state.cfg.client_id.clone(), state.cfg.client_secret.clone())
    };
    let authenticated = basic_credentials(&headers)
        .is_some_and(|(id, secret)| id == client_id && secret == client_secret);
    if !authenticated {
        tracing::debug!(status = 401, "sandbox token request");
        let body = json!({"reason": "Invalid client_id or client_secret", "error": "invalid_client"});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let body_text = String::from_utf8_lossy(&body);
    let grant_type = form_value(uri.query().unwrap_or(""), "grant_type")
        .or_else(|| form_value(&body_text, "grant_type"));
    if grant_type.as_deref() != Some("client_credentials") {
        tracing::debug!(status = 400, "sandbox token request");
        let body = json!({"reason": "unsupported grant type", "error": "unsupported_grant_type"});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }

    let access_token = Alphanumeric.sample_string(&mut rand::rng(), 48);
    let expires_in = {
        let mut state = shared.lock();
        state.issue_token(access_token.clone(), Instant::now());
        state.cfg.token_ttl.as_secs().max(1)
    };
    tracing::debug!(status = 200, expires_in, "sandbox token request");
    Json(json!({
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": "imchat:bot",
        "api_url": format!("http://{}", shared.addr),
    }))
    .into_response()
}

async fn edit(
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
        return Reply::Response(zoom_error(StatusCode::UNAUTHORIZED, 124, "Invalid access token."));
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
                    let delay = midnight.map_or(Duration::ZERO, |m| (m - now).unsigned_abs());
                    retry_after_value(form, delay)
                });
                return Reply::Response(too_many(limit, "Daily-limit", DAILY_MESSAGE, retry_after));
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
            return Reply::Response(zoom_error(StatusCode::NOT_FOUND, 7002, "Invalid robot_jid value."));
        }
        if cfg.forbidden_robots.contains(robot_jid) {
            return Reply::Response(zoom_error(StatusCode::FORBIDDEN, 7004, "Not authorized."));
        }
        let missing_prefix = cfg.missing_prefix.as_deref().filter(|p| !p.is_empty());
        if cfg.missing_messages.contains(message_id)
            || missing_prefix.is_some_and(|prefix| message_id.starts_with(prefix))
        {
            return Reply::Response(zoom_error(StatusCode::NOT_FOUND, 8001, "Invalid message_id value."));
        }
        let respond_204 = cfg.respond_204;
        state.apply_edit(message_id, &body);
        respond_204
    };

    let mut response = if respond_204 {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let sent_time = OffsetDateTime::now_utc()
            .format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second] +0000"))
            .unwrap_or_default();
        let user_jid = body.get("user_jid").and_then(Value::as_str).unwrap_or_default();
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
    fn draw(faults: &super::Faults, rng: &mut impl Rng) -> FaultDraw {
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
    let object = body.as_object().ok_or("Request body must be a JSON object.")?;
    for field in object.keys() {
        let known = ["robot_jid", "account_id", "content", "user_jid", "is_markdown_support"];
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
    if !matches!(object.get("user_jid"), None | Some(Value::Null | Value::String(_))) {
        return Err("user_jid must be a string.".to_string());
    }
    let markdown = object.get("is_markdown_support");
    if !matches!(markdown, None | Some(Value::Null | Value::Bool(_))) {
        return Err("is_markdown_support must be a boolean.".to_string());
    }
    Ok(())
}

async fn view_message(State(shared): State<Arc<Shared>>, Path(message_id): Path<String>) -> Response {
    match shared.lock().message(&message_id) {
        Some(record) if record.edits > 0 => Json(record).into_response(),
        _ => zoom_error(StatusCode::NOT_FOUND, 8001, "Message was never edited in this sandbox."),
    }
}

async fn view_stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

async fn not_found() -> Response {
    zoom_error(StatusCode::NOT_FOUND, 404, "No such endpoint in the Zoom sandbox.")
}

/// Sleeps, unless the sandbox is shutting down.
async fn pause(shared: &Shared, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.cancel.cancelled() => {}
    }
}

fn zoom_error(status: StatusCode, code: u32, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

fn bad_request(problem: String) -> Reply {
    Reply::Response(zoom_error(StatusCode::BAD_REQUEST, 7001, &problem))
}

fn reason(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Error")
}

fn too_many(limit: u32, kind: &'static str, message: &str, retry_after: Option<String>) -> Response {
    let mut response = zoom_error(StatusCode::TOO_MANY_REQUESTS, 429, message);
    let headers = response.headers_mut();
    set_rate_limit_headers(headers, kind, limit, 0);
    if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
        headers.insert(header::RETRY_AFTER, value);
    }
    response
}

fn set_rate_limit_headers(headers: &mut HeaderMap, kind: &'static str, limit: u32, remaining: u32) {
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

fn scripted_response(status: u16, headers: Vec<(String, String)>, body: Option<Value>) -> Response {
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

/// `Retry-After` for an instant `delay` from now. Instants are rounded up to the next whole
/// second so a client that obeys never comes back early.
fn retry_after_value(form: RetryAfterForm, delay: Duration) -> String {
    let target = OffsetDateTime::now_utc() + delay;
    let target = if target.nanosecond() > 0 {
        target.replace_nanosecond(0).unwrap_or(target) + Duration::from_secs(1)
    } else {
        target
    };
    match form {
        RetryAfterForm::Seconds => delay.as_secs_f64().ceil().max(1.0).to_string(),
        RetryAfterForm::HttpDate => httpdate::fmt_http_date(SystemTime::from(target)),
        RetryAfterForm::Iso8601 => target
            .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"))
            .unwrap_or_default(),
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// The value of `key` in an `application/x-www-form-urlencoded` string.
fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |text: &str| {
            let text = text.replace('+', " ");
            percent_encoding::percent_decode_str(&text)
                .decode_utf8_lossy()
                .into_owned()
        };
        (decode(name) == key).then(|| decode(value))
    })
}
