//! The Zoom API client: the only module that knows Zoom's URLs, the access token and what
//! Zoom's answers mean. [`ZoomClient::edit`] sends one edit and classifies the answer into an
//! [`Outcome`].
//!
//! It deliberately does not retry (apart from repeating an edit once after Zoom refuses the
//! token), pace requests or count 429s: the worker owns those decisions and the retry policy
//! decides how long to wait. Code map:
//! - `mod.rs`: settings, the client, the edit request and its metrics.
//! - `token.rs`: the access-token cache (single flight, refresh ahead, backoff).
//! - `reply.rs`: answer classification, error bodies, rate-limit headers, `Retry-After`.
//! - `fake.rs` and `tests.rs` (tests only): a scripted fake Zoom and the loopback tests.

#[cfg(test)]
mod fake;
mod reply;
#[cfg(test)]
mod tests;
mod token;

use std::error::Error as _;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{ACCEPT, CONTENT_TYPE};

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
    /// Whole-request limit (connect, send, answer and body), for edits and token requests.
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

/// How one edit went, as far as the caller's decisions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Zoom accepted the edit (any 2xx, with or without a body).
    Delivered { status: u16 },
    /// 429. `retry_after` is already clamped to at most two days ahead.
    RateLimited {
        kind: LimitKind,
        retry_after: Option<SystemTime>,
        limit: Option<u32>,
    },
    /// Worth retrying later: 5xx, 408, a timeout, a transport error (`status: None`), a token
    /// refused twice in a row, or an unexpected 3xx.
    Transient { status: Option<u16>, detail: String },
    /// Zoom refused this edit for good (4xx other than 401, 408 and 429). `status` is 0 when
    /// the edit was refused locally without a request (a `message_id` that cannot be a path
    /// segment: empty, `.` or `..`).
    Rejected {
        status: u16,
        code: Option<i64>,
        message: String,
    },
    /// No access token could be obtained; the edit was not sent and is not at fault.
    NoToken { detail: String },
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
    /// `{api_base}/im/chat/messages/`, ready for an encoded message id.
    messages_url: String,
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
                messages_url: format!(
                    "{}/im/chat/messages/",
                    settings.api_base.trim_end_matches('/')
                ),
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

    /// Sends one edit. `body` is Zoom's JSON request body, already serialized (robot_jid,
    /// account_id, content, ...). If Zoom refuses the token, the edit is repeated once with a
    /// fresh one; a second refusal is [`Outcome::Transient`].
    pub async fn edit(&self, message_id: &str, body: &[u8]) -> Outcome {
        if matches!(message_id, "" | "." | "..") {
            // URL parsers resolve these as dot segments, so no URL can carry them.
            return Outcome::Rejected {
                status: 0,
                code: None,
                message: format!("message_id {message_id:?} cannot be a URL path segment"),
            };
        }
        let url = format!(
            "{}{}",
            self.inner.messages_url,
            utf8_percent_encode(message_id, SEGMENT)
        );
        let mut lease = match self.inner.tokens.get().await {
            Ok(lease) => lease,
            Err(detail) => return Outcome::NoToken { detail },
        };
        let mut refused_before = false;
        loop {
            match self.send(&url, &lease, body).await {
                Answer::Outcome(outcome) => return outcome,
                Answer::BadToken { status, detail } => {
                    self.inner.tokens.invalidate(lease.generation);
                    if refused_before {
                        return Outcome::Transient {
                            status: Some(status),
                            detail: format!("Zoom refused a fresh access token too: {detail}"),
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

    /// One PUT, with its metrics.
    async fn send(&self, url: &str, lease: &TokenLease, body: &[u8]) -> Answer {
        let metrics = &self.inner.metrics;
        let started = Instant::now();
        let sent = self
            .inner
            .http
            .put(url)
            .bearer_auth(lease.secret.expose())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(error) => {
                metrics
                    .zoom_request_duration
                    .observe(started.elapsed().as_secs_f64());
                metrics.zoom_responses.with_label_values(&["network"]).inc();
                let detail = describe(&error);
                tracing::debug!(%detail, "edit request failed");
                return Answer::Outcome(Outcome::Transient {
                    status: None,
                    detail,
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
        let answer = reply::classify(status, response.headers(), &answer_body, SystemTime::now());
        tracing::debug!(status = status.as_u16(), ?answer, "edit answered");
        answer
    }
}

impl fmt::Debug for ZoomClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoomClient")
            .field("messages_url", &self.inner.messages_url)
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
