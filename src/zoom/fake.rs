//! A small scripted fake Zoom for the client's loopback tests (axum on 127.0.0.1:0): a token
//! endpoint that checks the client credentials and counts (and times) its requests, and the
//! three message endpoints (send, edit, delete), which record each request and answer from
//! one shared script. A scripted answer can also be no answer at all: the connection is
//! closed after the whole request was read ([`hang_up`]). [`rig`] starts one and points a
//! [`ZoomClient`] at it.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::token::Backoff;
use super::*;

pub(super) const SECRET: &str = "hunter2-client-secret";
pub(super) const EDIT_BODY: &[u8] =
    br#"{"robot_jid":"bot@xmpp.zoom.us","account_id":"acct","content":{"head":{"text":"hi"}}}"#;
pub(super) const SEND_BODY: &[u8] = br#"{"robot_jid":"bot@xmpp.zoom.us","to_jid":"chan@conference.xmpp.zoom.us","account_id":"acct","content":{"head":{"text":"hi"}}}"#;

/// One scripted answer of the fake.
#[derive(Clone)]
pub(super) struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
    /// Close the connection instead of answering.
    hang_up: bool,
}

pub(super) fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: body.to_string(),
        delay: Duration::ZERO,
        hang_up: false,
    }
}

/// No answer: the connection is closed once the whole request has been read, as when Zoom
/// (or something in between) fails after taking the request.
pub(super) fn hang_up() -> Reply {
    Reply {
        hang_up: true,
        ..reply(500, "")
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

/// A seen message request (send, edit or delete).
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub(super) method: Method,
    /// Still percent-encoded, as sent.
    pub(super) path: String,
    pub(super) query: Option<String>,
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
    /// Answers to sends, edits and deletes, in order of arrival; when empty, Zoom's
    /// documented success (201 with a new message id for a send, 200 otherwise).
    script: Mutex<VecDeque<Reply>>,
    calls: Mutex<Vec<Seen>>,
}

impl Fake {
    pub(super) fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().extend(replies);
    }
    pub(super) fn script_tokens(&self, replies: impl IntoIterator<Item = Reply>) {
        self.token_script.lock().unwrap().extend(replies);
    }
    pub(super) fn token_requests(&self) -> usize {
        self.token_requests.load(Ordering::SeqCst)
    }
    /// Every message request seen, in order.
    pub(super) fn calls(&self) -> Vec<Seen> {
        self.calls.lock().unwrap().clone()
    }
    pub(super) fn bearers(&self) -> Vec<String> {
        self.calls()
            .iter()
            .map(|seen| seen.headers["authorization"].to_str().unwrap().to_string())
            .collect()
    }
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    ConnectInfo(connection): ConnectInfo<HangUpSwitch>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let send = method == Method::POST && path == "/v2/im/chat/messages";
    let edit_or_delete = (method == Method::PUT || method == Method::DELETE)
        && path.starts_with("/v2/im/chat/messages/");
    let answer = if method == Method::POST && path == "/oauth/token" {
        token_answer(&fake, &uri, &headers).await
    } else if send || edit_or_delete {
        let n = {
            let mut calls = fake.calls.lock().unwrap();
            calls.push(Seen {
                method: method.clone(),
                path: path.to_string(),
                query: uri.query().map(str::to_string),
                headers,
                body,
            });
            calls.len()
        };
        let scripted = fake.script.lock().unwrap().pop_front();
        scripted.unwrap_or_else(|| {
            if send {
                reply(201, &format!(r#"{{"message_id":"sent-{n}","robot_jid":"bot@xmpp.zoom.us","sent_time":"2019-10-17 01:40:24","to_jid":"chan@conference.xmpp.zoom.us"}}"#))
            } else {
                reply(200, r#"{"message_id":"m","robot_jid":"bot@xmpp.zoom.us","sent_time":"2019-10-17 01:40:24 +0000"}"#)
            }
        })
    } else {
        reply(404, r#"{"code":404,"message":"no such route"}"#)
    };
    tokio::time::sleep(answer.delay).await;
    if answer.hang_up {
        connection.0.store(true, Ordering::SeqCst);
    }
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new()
        .fallback(handle)
        .with_state(fake.clone())
        .into_make_service_with_connect_info::<HangUpSwitch>();
    tokio::spawn(async move { axum::serve(HangUpListener(listener), router).await });
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
    pub(super) async fn send(&self) -> Outcome {
        self.client.send_message(SEND_BODY).await
    }
    pub(super) fn responses(&self, class: &str) -> u64 {
        self.metrics
            .zoom_responses
            .with_label_values(&[class])
            .get()
    }
}

/// Set by the handler to make the server close its connection instead of writing the answer:
/// every write then fails, and hyper drops the connection unanswered.
#[derive(Clone, Default)]
struct HangUpSwitch(Arc<AtomicBool>);

impl Connected<IncomingStream<'_, HangUpListener>> for HangUpSwitch {
    fn connect_info(stream: IncomingStream<'_, HangUpListener>) -> Self {
        stream.io().switch.clone()
    }
}

/// A TCP listener whose connections carry a [`HangUpSwitch`], which the handler reaches
/// through `ConnectInfo`.
struct HangUpListener(TcpListener);

impl Listener for HangUpListener {
    type Io = HangUpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (HangUpStream, std::net::SocketAddr) {
        let (tcp, addr) = Listener::accept(&mut self.0).await;
        let switch = HangUpSwitch::default();
        (HangUpStream { tcp, switch }, addr)
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}

struct HangUpStream {
    tcp: TcpStream,
    switch: HangUpSwitch,
}

impl HangUpStream {
    fn hung_up(&self) -> bool {
        self.switch.0.load(Ordering::SeqCst)
    }
}

impl AsyncRead for HangUpStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for HangUpStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.hung_up() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.hung_up() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
