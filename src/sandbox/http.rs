//! The sandbox's HTTP server: routes, the token endpoint and the `/sandbox/*` views for bot
//! authors. The message calls (send, edit, delete) live in `calls.rs`.
//!
//! Nothing here logs a token or the client secret.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::calls;
use super::conn::{ResetSwitch, ResettableListener};
use super::reply::zoom_error;
use super::state::Shared;

/// Serves until `cancel` fires, then lets in-flight requests finish.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    let app = Router::new()
        .route("/oauth/token", post(token))
        .route("/v2/im/chat/messages", post(calls::send))
        .route(
            "/v2/im/chat/messages/{message_id}",
            put(calls::edit).delete(calls::delete),
        )
        .route("/sandbox/messages", get(view_messages))
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

async fn token(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
        let body =
            json!({"reason": "Invalid client_id or client_secret", "error": "invalid_client"});
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

async fn view_message(
    State(shared): State<Arc<Shared>>,
    Path(message_id): Path<String>,
) -> Response {
    // A record made only by refused requests describes no message a bot author could look at.
    match shared.lock().message(&message_id) {
        Some(record) if record.to_jid.is_some() || record.edits > 0 || record.deleted => {
            Json(record).into_response()
        }
        _ => zoom_error(
            StatusCode::NOT_FOUND,
            8001,
            "Message was never sent, edited or deleted in this sandbox.",
        ),
    }
}

/// Every message record, oldest first, refused requests' records included: the list is for
/// checking what a client did, misses too.
async fn view_messages(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.lock().messages()).into_response()
}

async fn view_stats(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.stats()).into_response()
}

async fn not_found() -> Response {
    zoom_error(
        StatusCode::NOT_FOUND,
        404,
        "No such endpoint in the Zoom sandbox.",
    )
}

/// Sleeps, unless the sandbox is shutting down.
pub(crate) async fn pause(shared: &Shared, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shared.cancel.cancelled() => {}
    }
}

pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
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

/// The value of `key` in an `application/x-www-form-urlencoded` string.
fn form_value(form: &str, key: &str) -> Option<String> {
    form_pairs(form).find_map(|(name, value)| (name == key).then_some(value))
}

/// The decoded name-value pairs of an `application/x-www-form-urlencoded` string (a query), in
/// order.
pub(crate) fn form_pairs(form: &str) -> impl Iterator<Item = (String, String)> + '_ {
    let decode = |text: &str| {
        let text = text.replace('+', " ");
        percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned()
    };
    form.split('&')
        .filter(|pair| !pair.is_empty())
        .map(move |pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(name), decode(value))
        })
}
