//! The three message calls, send (`POST /v2/im/chat/messages`), edit
//! (`PUT /v2/im/chat/messages/{message_id}`) and delete
//! (`DELETE /v2/im/chat/messages/{message_id}?account_id=..&robot_jid=..`): how one request is
//! judged.
//!
//! The three go through one sequence of checks, so they share the token check, the quota, the
//! faults and the request log exactly as Zoom's shared Medium quota would have it. This module
//! owns the order of the checks, which decides what a client sees when several things are
//! wrong at once:
//!
//! 1. a [`Scripted`] step queued for the message id (edit, delete) or the body's `to_jid`
//!    (send), if any: a status or a reset answers before anything else; an after-apply step is
//!    kept for step 7;
//! 2. the bearer token (401 code 124);
//! 3. `Content-Type` and JSON (send, edit), and `account_id`, needed to know whose quota to
//!    charge (400 7001);
//! 4. the account's daily cap, then its per-second window, then an injected 429 (429);
//! 5. random faults: slow, then reset / 5xx / spurious 429, which apply nothing;
//! 6. the rest of the parameters (400 7001), `robot_jid` (404 7002, 403 7004), and for an edit
//!    or delete the message id (404 8001: configured missing, or deleted);
//! 7. the request is applied (the message created, edited or deleted), then answered: by the
//!    after-apply step of step 1 if there is one, else by an after-apply fault drawn in step 5
//!    if there is one, else with success: 201 and Zoom's body for a send, 200 and the body (or
//!    204) for an edit, 200 and the body for a delete.
//!
//! Schemas live in `schema.rs`, fault draws in `fault.rs`, quota bookkeeping and what each call
//! does to a message in `state.rs`, response shapes in `reply.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use time::macros::format_description;
use time::OffsetDateTime;

use super::conn::ResetSwitch;
use super::fault::{FaultDraw, FaultOutcome};
use super::http::{bearer_token, form_pairs, pause};
use super::reply::{
    reason, retry_after_at, retry_after_value, scripted_response, set_rate_limit_headers, too_many,
    zoom_error, DAILY_MESSAGE, QPS_MESSAGE,
};
use super::schema::validate;
use super::state::{Admission, Shared};
use super::stats::RequestRecord;
use super::{InjectedLimit, RetryAfterForm, Scripted};

/// Which of the three message calls a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Send,
    Edit,
    Delete,
}

impl Op {
    /// The name in [`RequestRecord::op`] and [`super::SandboxStats::by_op`].
    fn name(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Edit => "edit",
            Op::Delete => "delete",
        }
    }
}

/// One request as read off the wire, before it is judged.
struct Call {
    op: Op,
    /// The path's message id (edit, delete).
    message_id: Option<String>,
    /// The JSON body of a send or edit (`None` if it does not parse), or the query of a delete
    /// as an object of strings.
    params: Option<Value>,
    /// Whether the body is declared JSON; a delete has no body and passes.
    is_json: bool,
}

/// How a request is answered.
enum Reply {
    Response(Response),
    /// Close the connection without answering.
    Reset,
}

pub(crate) async fn send(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(switch): ConnectInfo<ResetSwitch>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        op: Op::Send,
        message_id: None,
        params: serde_json::from_slice(&body).ok(),
        is_json: is_json(&headers),
    };
    handle(shared, switch, headers, call).await
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
    let call = Call {
        op: Op::Edit,
        message_id: Some(message_id),
        params: serde_json::from_slice(&body).ok(),
        is_json: is_json(&headers),
    };
    handle(shared, switch, headers, call).await
}

pub(crate) async fn delete(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(switch): ConnectInfo<ResetSwitch>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let Ok(Path(message_id)) = path else {
        return zoom_error(StatusCode::BAD_REQUEST, 7001, "Invalid message_id value.");
    };
    let mut query = Map::new();
    for (name, value) in form_pairs(uri.query().unwrap_or("")) {
        query.entry(name).or_insert(Value::String(value));
    }
    let call = Call {
        op: Op::Delete,
        message_id: Some(message_id),
        params: Some(Value::Object(query)),
        is_json: true,
    };
    handle(shared, switch, headers, call).await
}

/// Judges one request, logs it and answers it (or resets the connection).
async fn handle(
    shared: Arc<Shared>,
    switch: ResetSwitch,
    headers: HeaderMap,
    call: Call,
) -> Response {
    let at = Instant::now();
    // Held until the answer is decided, or until hyper drops this future because the client
    // went away: either way the per-message concurrency count stays right.
    let _in_flight = call
        .message_id
        .as_deref()
        .map(|message_id| shared.enter_message(message_id));
    let account_id = call
        .params
        .as_ref()
        .and_then(|params| params.get("account_id"))
        .and_then(Value::as_str)
        .filter(|account_id| !account_id.is_empty())
        .map(str::to_string);

    let (reply, created) = match check(&shared, &headers, &call, account_id.as_deref()).await {
        Ok(cleared) => {
            let delay = cleared.delay_after_apply;
            let applied = apply(&shared, &call, cleared);
            if let Some(delay) = delay {
                pause(&shared, delay).await;
            }
            applied
        }
        Err(reply) => (reply, None),
    };

    let status = match &reply {
        Reply::Response(response) => Some(response.status().as_u16()),
        Reply::Reset => None,
    };
    let op = call.op.name();
    let message_id = call.message_id.or(created).unwrap_or_default();
    tracing::debug!(
        op,
        message_id,
        account_id,
        status,
        "sandbox message request"
    );
    shared.lock().finish(RequestRecord {
        op,
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

/// A request that passed steps 1 to 5: what steps 6 and 7 need.
struct Cleared<'a> {
    params: &'a Map<String, Value>,
    /// `X-RateLimit-Limit` and `X-RateLimit-Remaining` of the success answer.
    limit: u32,
    remaining: u32,
    /// What answers instead of success once the request is applied (step 7).
    after_apply: Option<Reply>,
    /// How long to wait between applying the request and answering.
    delay_after_apply: Option<std::time::Duration>,
}

/// Steps 1 to 5 of the module docs.
async fn check<'a>(
    shared: &Arc<Shared>,
    headers: &HeaderMap,
    call: &'a Call,
    account_id: Option<&str>,
) -> Result<Cleared<'a>, Reply> {
    let step = {
        let mut state = shared.lock();
        let (scripts, key) = match call.op {
            Op::Send => {
                let to_jid = call.params.as_ref().and_then(|params| params.get("to_jid"));
                (&mut state.send_scripts, to_jid.and_then(Value::as_str))
            }
            Op::Edit | Op::Delete => (&mut state.scripts, call.message_id.as_deref()),
        };
        key.and_then(|key| scripts.get_mut(key))
            .and_then(VecDeque::pop_front)
    };
    let mut after_apply = None;
    let mut delay_after_apply = None;
    match step {
        Some(Scripted::Status {
            status,
            headers,
            body,
        }) => return Err(Reply::Response(scripted_response(status, headers, body))),
        Some(Scripted::Reset) => return Err(Reply::Reset),
        Some(Scripted::Delay(delay)) => pause(shared, delay).await,
        Some(Scripted::ResetAfterApply) => after_apply = Some(Reply::Reset),
        Some(Scripted::DelayAfterApply(delay)) => delay_after_apply = Some(delay),
        Some(Scripted::StatusAfterApply {
            status,
            headers,
            body,
        }) => after_apply = Some(Reply::Response(scripted_response(status, headers, body))),
        Some(Scripted::Pass) | None => {}
    }

    let token_is_live = bearer_token(headers)
        .is_some_and(|token| shared.lock().token_is_live(token, Instant::now()));
    if !token_is_live {
        return Err(Reply::Response(zoom_error(
            StatusCode::UNAUTHORIZED,
            124,
            "Invalid access token.",
        )));
    }
    if !call.is_json {
        return Err(bad_request("Content-Type must be application/json."));
    }
    let Some(params) = call.params.as_ref().and_then(Value::as_object) else {
        return Err(bad_request("Request body must be a JSON object."));
    };
    let Some(account_id) = account_id else {
        return Err(bad_request(
            "account_id is required and must be a non-empty string.",
        ));
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
                return Err(Reply::Response(too_many(
                    limit,
                    "QPS",
                    QPS_MESSAGE,
                    retry_after,
                )));
            }
            Admission::Daily { limit } => {
                let retry_after = state.cfg.daily_retry_after.map(|form| {
                    let now = OffsetDateTime::now_utc();
                    let midnight = now.date().next_day().map(|day| day.midnight().assume_utc());
                    retry_after_at(form, now, midnight.unwrap_or(now))
                });
                return Err(Reply::Response(too_many(
                    limit,
                    "Daily-limit",
                    DAILY_MESSAGE,
                    retry_after,
                )));
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
                return Err(Reply::Response(response));
            }
        }
    };

    if let Some(delay) = faults.slow {
        pause(shared, delay).await;
    }
    let server_error = |status: StatusCode| {
        Reply::Response(zoom_error(status, status.as_u16().into(), reason(status)))
    };
    let drawn_after_apply = match faults.outcome {
        FaultOutcome::None => None,
        FaultOutcome::Reset => return Err(Reply::Reset),
        FaultOutcome::ServerError(status) => return Err(server_error(status)),
        FaultOutcome::Spurious429(None) => {
            return Err(Reply::Response(zoom_error(
                StatusCode::TOO_MANY_REQUESTS,
                429,
                QPS_MESSAGE,
            )));
        }
        FaultOutcome::Spurious429(Some(retry_after)) => {
            return Err(Reply::Response(too_many(
                limit,
                "QPS",
                QPS_MESSAGE,
                Some(retry_after),
            )));
        }
        FaultOutcome::ResetAfterApply => Some(Reply::Reset),
        FaultOutcome::ServerErrorAfterApply(status) => Some(server_error(status)),
    };
    Ok(Cleared {
        params,
        limit,
        remaining,
        // A script is the test's explicit wish for this one request; it wins over chance.
        after_apply: after_apply.or(drawn_after_apply),
        delay_after_apply,
    })
}

/// Steps 6 and 7 of the module docs. Returns the answer and, for a send, the id it created.
fn apply(shared: &Shared, call: &Call, cleared: Cleared<'_>) -> (Reply, Option<String>) {
    let params = cleared.params;
    if let Err(problem) = validate(call.op, params) {
        return (bad_request(&problem), None);
    }
    let text = |name: &str| params.get(name).and_then(Value::as_str).unwrap_or_default();
    let robot_jid = text("robot_jid");
    let message_id = call.message_id.as_deref().unwrap_or_default();

    // Checked and applied under one lock, so a delete racing an edit of the same message is
    // either before it (the edit answers 404) or after it, never between check and change.
    let mut state = shared.lock();
    if state.cfg.unknown_robots.contains(robot_jid) {
        let response = zoom_error(StatusCode::NOT_FOUND, 7002, "Invalid robot_jid value.");
        return (Reply::Response(response), None);
    }
    if state.cfg.forbidden_robots.contains(robot_jid) {
        let response = zoom_error(StatusCode::FORBIDDEN, 7004, "Not authorized.");
        return (Reply::Response(response), None);
    }
    if call.op != Op::Send && state.is_gone(message_id) {
        let response = zoom_error(StatusCode::NOT_FOUND, 8001, "Invalid message_id value.");
        return (Reply::Response(response), None);
    }

    // The answer of an edit or a delete: Zoom's five fields, `user_jid` empty when the request
    // named none (a send's answer leaves it out instead, as Zoom documents it optional there).
    let five_fields = |to_jid: String| {
        json!({
            "message_id": message_id,
            "robot_jid": robot_jid,
            "sent_time": sent_time(true),
            "to_jid": to_jid,
            "user_jid": text("user_jid"),
        })
    };
    let (mut response, created) = match call.op {
        Op::Send => {
            let body = Value::Object(params.clone());
            let created = state.apply_send(&body);
            let mut answer = json!({
                "message_id": created,
                "robot_jid": robot_jid,
                "sent_time": sent_time(false),
                "to_jid": text("to_jid"),
            });
            if let Some(user_jid) = params.get("user_jid").and_then(Value::as_str) {
                answer["user_jid"] = json!(user_jid);
            }
            let response = (StatusCode::CREATED, Json(answer)).into_response();
            (response, Some(created))
        }
        Op::Edit => {
            state.apply_edit(message_id, &Value::Object(params.clone()));
            let response = if state.cfg.respond_204 {
                StatusCode::NO_CONTENT.into_response()
            } else {
                Json(five_fields(state.to_jid_of(message_id))).into_response()
            };
            (response, None)
        }
        Op::Delete => {
            state.apply_delete(message_id);
            let to_jid = state.to_jid_of(message_id);
            (Json(five_fields(to_jid)).into_response(), None)
        }
    };
    drop(state);

    if let Some(after_apply) = cleared.after_apply {
        return (after_apply, created);
    }
    set_rate_limit_headers(
        response.headers_mut(),
        "QPS",
        cleared.limit,
        cleared.remaining,
    );
    (Reply::Response(response), created)
}

/// `sent_time` as Zoom spells it: the send's `2019-10-17 01:40:24`, or with ` +0000` as the
/// edit's example has it (and the delete's, documented as the edit's).
fn sent_time(with_offset: bool) -> String {
    let now = OffsetDateTime::now_utc();
    let formatted = if with_offset {
        now.format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second] +0000"
        ))
    } else {
        now.format(format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second]"
        ))
    };
    formatted.unwrap_or_default()
}

fn bad_request(problem: &str) -> Reply {
    Reply::Response(zoom_error(StatusCode::BAD_REQUEST, 7001, problem))
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
