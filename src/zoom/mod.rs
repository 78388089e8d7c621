//! The Zoom API client: the only module that knows Zoom's URLs, the access token and what
//! Zoom's answers mean. It makes Zoom's three chatbot message calls, each one request whose
//! answer is classified into an [`Outcome`]:
//! - [`ZoomClient::send_message`] posts a new message and names it ([`Sent`]);
//! - [`ZoomClient::edit`] replaces a message's content (idempotent);
//! - [`ZoomClient::delete`] removes a message (Zoom answers 404/8001 when it is already gone).
//!
//! The three share the token, the per-account quota, the answer classification and the
//! metrics; they differ only in method, URL and body. A send is not idempotent: Zoom has no
//! idempotency key, so [`Outcome::Transient`] says whether a failed request may have been
//! applied anyway (`in_doubt`).
//!
//! It deliberately does not retry (apart from repeating a request once after Zoom refuses the
//! token, which Zoom did not act on), pace requests or count 429s: the worker owns those
//! decisions and the retry policy decides how long to wait. Code map:
//! - `mod.rs`: settings, the client, the three calls' requests and their metrics.
//! - `token.rs`: the access-token cache (single flight, refresh ahead, backoff).
//! - `reply/`: answer classification and rate-limit headers (`mod.rs`), `Retry-After`
//!   (`retry_after.rs`), error bodies and the size-capped read (`body.rs`).
//! - `fake.rs`, `tests.rs` and `tests_lifecycle.rs` (tests only): a scripted fake Zoom and the
//!   loopback tests (the edit's answer classes and the token in `tests.rs`; send, delete and
//!   `in_doubt` in `tests_lifecycle.rs`).

#[cfg(test)]
mod fake;
mod reply;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_lifecycle;
mod token;

use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, Url};

pub use reply::parse_retry_after;

use crate::config::{Config, Secret};
use crate::health::Health;
use crate::metrics::Metrics;
use reply::Answer;
use token::{Backoff, TokenCache, TokenLease};

/// What the client needs from the configuration.
#[derive(Debug, Clone)]
pub struct ZoomSettings {
    /// E.g. `https://api.zoom.us/v2`; a trailing `/` is ignored.
    pub api_base: String,
    /// E.g. `https://zoom.us/oauth/token`.
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub connect_timeout: Duration,
    /// Whole-request limit (connect, send, answer and body), for every call and token request.
    pub request_timeout: Duration,
}

impl ZoomSettings {
    /// Takes the `[zoom]` section and the client secret from wherever the config says it is.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Ok(ZoomSettings {
            api_base: config.zoom.api_base.clone(),
            token_url: config.zoom.token_url.clone(),
            client_id: config.zoom.client_id.clone(),
            client_secret: config.client_secret()?,
            connect_timeout: config.zoom.connect_timeout,
            request_timeout: config.zoom.request_timeout,
        })
    }
}

/// Which of Zoom's limits a 429 reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// The per-second limit (also assumed when the 429 does not say).
    Qps,
    /// The per-day limit, which resets at 00:00 UTC.
    Daily,
}

/// How one call (send, edit or delete) went, as far as the caller's decisions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Zoom accepted the request (any 2xx; for an edit or a delete with or without a body).
    /// `sent` names the new message after a send, and is `None` after an edit or a delete.
    Delivered { status: u16, sent: Option<Sent> },
    /// 429: Zoom did not apply the request. `retry_after` is already clamped to at most two
    /// days ahead.
    RateLimited {
        kind: LimitKind,
        retry_after: Option<SystemTime>,
        limit: Option<u32>,
    },
    /// Worth retrying later: 5xx, 408, a timeout, a transport error (`status: None`), a token
    /// refused twice in a row, or an unexpected 3xx.
    ///
    /// `in_doubt` says whether Zoom may have applied the request anyway. Only a send cares (an
    /// edit or a delete repeated is harmless, a send repeated posts the message twice), but it
    /// is computed for every call:
    /// - `true` when the request may have reached Zoom and only the answer was lost: a timeout
    ///   or a transport error once the connection was made (a reset, a broken pipe, a
    ///   connection closed before the whole answer), and HTTP 500, 502, 504 and every other
    ///   5xx but 503. A whole-request timeout that fires while still connecting also counts:
    ///   it cannot be told apart.
    /// - `false` when nothing was applied: a connection that could not be made, before any
    ///   byte of the request was written (including a connect timeout), HTTP 503 (not
    ///   serving), 408 (the server gave up waiting for the request), an unexpected 3xx (a
    ///   redirect, not followed) and a token refused twice (Zoom refused the request itself).
    Transient {
        status: Option<u16>,
        detail: String,
        in_doubt: bool,
    },
    /// Zoom refused this request for good (4xx other than 401, 408 and 429). `status` is 0
    /// when the request was refused locally without being made (a `message_id` that cannot be
    /// a path segment: empty, `.` or `..`). A 2xx to a send without a readable `message_id` is
    /// also rejected (`code: None`): the message was posted but cannot be named, and a retry
    /// would post it twice.
    Rejected {
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// No access token could be obtained; the request was not made and is not at fault.
    NoToken { detail: String },
}

/// The message a send posted, as Zoom named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Opaque; what edits and deletes of this message name.
    pub message_id: String,
    /// As Zoom wrote it (e.g. `2019-10-17 01:40:24`), when it did; not parsed.
    pub sent_time: Option<String>,
}

/// Zoom's three chatbot message calls. They share the token, the quota and the
/// classification, and differ in method, URL and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Send,
    Edit,
    Delete,
}

impl Call {
    /// As the logs name it.
    fn name(self) -> &'static str {
        match self {
            Call::Send => "send",
            Call::Edit => "edit",
            Call::Delete => "delete",
        }
    }

    fn method(self) -> Method {
        match self {
            Call::Send => Method::POST,
            Call::Edit => Method::PUT,
            Call::Delete => Method::DELETE,
        }
    }
}

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("zoom.{key}: expected an http(s) URL, got {url:?}")]
    BadUrl { key: &'static str, url: String },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// The Zoom client. Cheap to clone: clones share the connection pool and the token.
#[derive(Clone)]
pub struct ZoomClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `{api_base}/im/chat/messages`: where sends go, and the parent of every message's URL.
    messages_url: Url,
    token_url: String,
    client_id: String,
    tokens: TokenCache,
    metrics: Arc<Metrics>,
}

const USER_AGENT: &str = concat!("zoomq/", env!("CARGO_PKG_VERSION"));

/// Everything but RFC 3986's unreserved characters is encoded, so a message id is always
/// exactly one path segment whatever it contains (`/`, `?`, `#`, `%`, spaces, non-ASCII).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl ZoomClient {
    pub fn new(
        settings: ZoomSettings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<ZoomClient, Error> {
        ZoomClient::with_backoff(settings, metrics, health, Backoff::DEFAULT)
    }

    fn with_backoff(
        settings: ZoomSettings,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        backoff: Backoff,
    ) -> Result<ZoomClient, Error> {
        parse_http_url("api_base", &settings.api_base)?;
        let messages_url = parse_http_url(
            "api_base",
            &format!(
                "{}/im/chat/messages",
                settings.api_base.trim_end_matches('/')
            ),
        )?;
        let mut token_url = parse_http_url("token_url", &settings.token_url)?;
        token_url
            .query_pairs_mut()
            .append_pair("grant_type", "client_credentials");
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            // A redirect would be a misconfiguration; following it could carry the token to
            // another host, so it is reported instead (see `reply::classify`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(Error::Client)?;
        let tokens = TokenCache::new(
            http.clone(),
            token_url,
            settings.client_id.clone(),
            settings.client_secret,
            metrics.clone(),
            health,
            backoff,
        );
        Ok(ZoomClient {
            inner: Arc::new(Inner {
                http,
                messages_url,
                token_url: settings.token_url,
                client_id: settings.client_id,
                tokens,
                metrics,
            }),
        })
    }

    /// Whether a token is at hand, so that a request would leave at once (see
    /// [`TokenCache::ready`]).
    pub fn token_ready(&self) -> bool {
        self.inner.tokens.ready()
    }

    /// Whether a token request is due now: there is no token and no backoff is running, or the
    /// token is to be refreshed ahead of its expiry.
    pub fn token_wanted(&self) -> bool {
        self.inner.tokens.wanted()
    }

    /// Gets a token into the cache (one request at most, shared with concurrent callers), or
    /// says why there is none.
    pub async fn fetch_token(&self) -> Result<(), String> {
        self.inner.tokens.get().await.map(|_| ())
    }

    /// Posts one new message. `body` is Zoom's JSON request body, already serialized
    /// (robot_jid, to_jid, account_id, content, ...). A 2xx names the message in
    /// [`Outcome::Delivered`]'s `sent`. Not idempotent: see `in_doubt` at
    /// [`Outcome::Transient`] before repeating one.
    pub async fn send_message(&self, body: &[u8]) -> Outcome {
        self.request(Call::Send, self.inner.messages_url.clone(), Some(body))
            .await
    }

    /// Sends one edit. `body` is Zoom's JSON request body, already serialized (robot_jid,
    /// account_id, content, ...). If Zoom refuses the token, the edit is repeated once with a
    /// fresh one; a second refusal is [`Outcome::Transient`].
    pub async fn edit(&self, message_id: &str, body: &[u8]) -> Outcome {
        match self.message_url(message_id) {
            Ok(url) => self.request(Call::Edit, url, Some(body)).await,
            Err(refused) => refused,
        }
    }

    /// Deletes one message; `user_jid` is sent only when given. Zoom answers 404 with code 8001
    /// for a message that is already gone: that stays [`Outcome::Rejected`], for the caller to
    /// read as done.
    pub async fn delete(
        &self,
        message_id: &str,
        account_id: &str,
        robot_jid: &str,
        user_jid: Option<&str>,
    ) -> Outcome {
        let mut url = match self.message_url(message_id) {
            Ok(url) => url,
            Err(refused) => return refused,
        };
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("account_id", account_id)
                .append_pair("robot_jid", robot_jid);
            if let Some(user_jid) = user_jid {
                query.append_pair("user_jid", user_jid);
            }
        }
        self.request(Call::Delete, url, None).await
    }

    /// `{api_base}/im/chat/messages/{message_id}`, or the refusal of an id no URL can carry.
    fn message_url(&self, message_id: &str) -> Result<Url, Outcome> {
        let refused = |why: String| Outcome::Rejected {
            status: 0,
            code: None,
            message: format!("message_id {message_id:?} {why}"),
        };
        if matches!(message_id, "" | "." | "..") {
            // URL parsers resolve these as dot segments, so no URL can carry them.
            return Err(refused("cannot be a URL path segment".into()));
        }
        // Concatenated rather than pushed with `path_segments_mut`, which would leave `:`, `@`,
        // `+` and the other sub-delimiters as they are; the parser keeps `%XX` unchanged.
        let url = format!(
            "{}/{}",
            self.inner.messages_url,
            utf8_percent_encode(message_id, SEGMENT)
        );
        Url::parse(&url).map_err(|error| refused(format!("gives no valid URL: {error}")))
    }

    /// One call: a token lease, the request, and one repeat with a fresh token if Zoom refuses
    /// the first (a refused token means Zoom did not act on the request, so even a send may be
    /// repeated).
    async fn request(&self, call: Call, url: Url, body: Option<&[u8]>) -> Outcome {
        let mut lease = match self.inner.tokens.get().await {
            Ok(lease) => lease,
            Err(detail) => return Outcome::NoToken { detail },
        };
        let mut refused_before = false;
        loop {
            match self.attempt(call, &url, &lease, body).await {
                Answer::Outcome(outcome) => return outcome,
                Answer::BadToken { status, detail } => {
                    self.inner.tokens.invalidate(lease.generation);
                    if refused_before {
                        return Outcome::Transient {
                            status: Some(status),
                            detail: format!("Zoom refused a fresh access token too: {detail}"),
                            in_doubt: false,
                        };
                    }
                    refused_before = true;
                    lease = match self.inner.tokens.get().await {
                        Ok(lease) => lease,
                        Err(detail) => return Outcome::NoToken { detail },
                    };
                }
            }
        }
    }

    /// One HTTP request, with its metrics. `body` is JSON; a delete has none.
    async fn attempt(
        &self,
        call: Call,
        url: &Url,
        lease: &TokenLease,
        body: Option<&[u8]>,
    ) -> Answer {
        let metrics = &self.inner.metrics;
        let started = Instant::now();
        let mut request = self
            .inner
            .http
            .request(call.method(), url.clone())
            .bearer_auth(lease.secret.expose())
            .header(ACCEPT, "application/json");
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                metrics
                    .zoom_request_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.zoom_responses.with_label_values(&["network"]).inc();
                // Before a connection exists (or a request is even built) nothing can have
                // been written; any later failure may have lost only the answer.
                let in_doubt = !(error.is_connect() || error.is_builder());
                let detail = describe(&error);
                tracing::debug!(call = call.name(), %detail, in_doubt, "Zoom request failed");
                return Answer::Outcome(Outcome::Transient {
                    status: None,
                    detail,
                    in_doubt,
                });
            }
        };
        let status = response.status();
        let answer_body = reply::read_capped(&mut response).await;
        metrics
            .zoom_request_duration
            .observe(started.elapsed().as_secs_f64());
        let class = format!("{}xx", status.as_u16() / 100);
        metrics.zoom_responses.with_label_values(&[&class]).inc();
        let answer = reply::classify(
            call,
            status,
            response.headers(),
            &answer_body,
            SystemTime::now(),
        );
        tracing::debug!(
            call = call.name(),
            status = status.as_u16(),
            ?answer,
            "Zoom answered"
        );
        answer
    }
}

impl fmt::Debug for ZoomClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoomClient")
            .field("messages_url", &self.inner.messages_url.as_str())
            .field("token_url", &self.inner.token_url)
            .field("client_id", &self.inner.client_id)
            .finish_non_exhaustive()
    }
}

fn parse_http_url(key: &'static str, url: &str) -> Result<reqwest::Url, Error> {
    let bad = || Error::BadUrl {
        key,
        url: url.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    if matches!(parsed.scheme(), "http" | "https") {
        Ok(parsed)
    } else {
        Err(bad())
    }
}

/// A transport error as one line: its kind, then its chain of causes (which is where reqwest
/// keeps the useful part, such as "Connection refused").
fn describe(error: &reqwest::Error) -> String {
    let mut text = String::from(if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    });
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
