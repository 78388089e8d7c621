//! A small scripted fake Zoom for the client's loopback tests (axum on 127.0.0.1:0): a token
//! endpoint that checks the client credentials and counts (and times) its requests, and an
//! edit endpoint that records each request and answers from a script. [`rig`] starts one and
//! points a [`ZoomClient`] at it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;

use super::token::Backoff;
use super::*;

pub(super) const SECRET: &str = "hunter2-client-secret";
pub(super) const EDIT_BODY: &[u8] =
    br#"{"robot_jid":"bot@xmpp.zoom.us","account_id":"acct","content":{"head":{"text":"hi"}}}"#;

/// One scripted answer of the fake.
#[derive(Clone)]
pub(super) struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

pub(super) fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: body.to_string(),
        delay: Duration::ZERO,
    }
}

impl Reply {
    pub(super) fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }
    pub(super) fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// A seen edit request.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub(super) path: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

#[derive(Default)]
pub(super) struct Fake {
    token_requests: AtomicUsize,
    tokens_in_flight: AtomicUsize,
    pub(super) max_tokens_in_flight: AtomicUsize,
    /// Answers of the token endpoint; when empty, a token `tok-<n>` lasting `token_lifetime`.
    token_script: Mutex<VecDeque<Reply>>,
    pub(super) token_lifetime: Mutex<Option<u64>>,
    pub(super) token_delay: Mutex<Duration>,
    /// Answers to edits; when empty, 200 with Zoom's documented body.
    edit_script: Mutex<VecDeque<Reply>>,
    edits: Mutex<Vec<Seen>>,
}

impl Fake {
    pub(super) fn script_edits(&self, replies: impl IntoIterator<Item = Reply>) {
        self.edit_script.lock().unwrap().extend(replies);
    }
    pub(super) fn script_tokens(&self, replies: impl IntoIterator<Item = Reply>) {
        self.token_script.lock().unwrap().extend(replies);
    }
    pub(super) fn token_requests(&self) -> usize {
        self.token_requests.load(Ordering::SeqCst)
    }
    pub(super) fn edits(&self) -> Vec<Seen> {
        self.edits.lock().unwrap().clone()
    }
    pub(super) fn bearers(&self) -> Vec<String> {
        self.edits()
            .iter()
            .map(|seen| seen.headers["authorization"].to_str().unwrap().to_string())
            .collect()
    }
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = if method == Method::POST && uri.path() == "/oauth/token" {
        token_answer(&fake, &uri, &headers).await
    } else if method == Method::PUT && uri.path().starts_with("/v2/im/chat/messages/") {
        fake.edits.lock().unwrap().push(Seen {
            path: uri.path().to_string(),
            headers,
            body,
        });
        let scripted = fake.edit_script.lock().unwrap().pop_front();
        scripted.unwrap_or_else(|| {
            reply(200, r#"{"message_id":"m","robot_jid":"bot@xmpp.zoom.us","sent_time":"2019-10-17 01:40:24 +0000"}"#)
        })
    } else {
        reply(404, r#"{"code":404,"message":"no such route"}"#)
    };
    tokio::time::sleep(answer.delay).await;
    let mut response = Response::builder().status(StatusCode::from_u16(answer.status).unwrap());
    for (name, value) in &answer.headers {
        response = response.header(*name, value);
    }
    response.body(answer.body.into()).unwrap()
}

async fn token_answer(fake: &Fake, uri: &Uri, headers: &HeaderMap) -> Reply {
    let n = fake.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let in_flight = fake.tokens_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_tokens_in_flight
        .fetch_max(in_flight, Ordering::SeqCst);
    let delay = *fake.token_delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    fake.tokens_in_flight.fetch_sub(1, Ordering::SeqCst);
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("client-id:{SECRET}"))
    );
    assert_eq!(uri.query(), Some("grant_type=client_credentials"));
    assert_eq!(headers["authorization"].to_str().unwrap(), expected);
    if let Some(scripted) = fake.token_script.lock().unwrap().pop_front() {
        return scripted;
    }
    let lifetime = fake.token_lifetime.lock().unwrap().unwrap_or(3600);
    reply(
        200,
        &format!(
            r#"{{"access_token":"tok-{n}","token_type":"bearer","expires_in":{lifetime},"scope":"imchat:bot"}}"#
        ),
    )
}

/// A fake Zoom, and a client pointed at it.
pub(super) struct Rig {
    pub(super) fake: Arc<Fake>,
    pub(super) client: ZoomClient,
    pub(super) metrics: Arc<Metrics>,
    pub(super) health: Arc<Health>,
}

pub(super) async fn rig() -> Rig {
    rig_with(|_| {}).await
}

pub(super) async fn rig_with(adjust: impl FnOnce(&mut ZoomSettings)) -> Rig {
    let fake = Arc::new(Fake::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut settings = ZoomSettings {
        api_base: format!("http://{addr}/v2/"),
        token_url: format!("http://{addr}/oauth/token"),
        client_id: "client-id".into(),
        client_secret: Secret::new(SECRET),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
    };
    adjust(&mut settings);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(400),
    };
    let client =
        ZoomClient::with_backoff(settings, metrics.clone(), health.clone(), backoff).unwrap();
    Rig {
        fake,
        client,
        metrics,
        health,
    }
}

impl Rig {
    pub(super) async fn edit(&self) -> Outcome {
        self.client.edit("msg-1", EDIT_BODY).await
    }
    pub(super) fn responses(&self, class: &str) -> u64 {
        self.metrics
            .zoom_responses
            .with_label_values(&[class])
            .get()
    }
}
