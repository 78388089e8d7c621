//! The app's access token (OAuth client credentials): fetch, cache, refresh ahead of expiry,
//! invalidate after Zoom refuses it, and back off while the token endpoint fails.
//!
//! Design constraints:
//! - **Single flight.** Zoom invalidates earlier tokens when too many are issued, so at most one
//!   token request is ever in flight. The `refresh` mutex is held across the request; callers
//!   without a usable token wait on it and then reuse whatever the holder stored (a token, or a
//!   backoff that makes them fail fast).
//! - **Refresh ahead.** A token is refreshed 60 s before it expires (at half its lifetime when
//!   that is under 120 s). During that window callers that find a refresh in progress keep
//!   using the still-valid token instead of queueing behind the request.
//! - **Generations.** Every stored token gets a new generation number; a 401 invalidates only
//!   the generation it was seen with, so a late 401 never drops a newer token.
//! - **Loud failure, quiet waiting.** Each failed request logs one error, counts in
//!   `token_failures` and sets the health error; while backing off, callers get the last error
//!   without touching the network.
//!
//! The secret and the token never appear in logs, errors or `Debug` output: both are
//! [`Secret`]s and endpoint text is scrubbed of the secret before it is kept.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::header::ACCEPT;
use serde_json::Value;
use tokio::time::Instant;

use super::reply;
use crate::config::Secret;
use crate::health::Health;
use crate::metrics::Metrics;

/// Zoom's own client refreshes this long before expiry.
const REFRESH_AHEAD: Duration = Duration::from_secs(60);
/// Assumed lifetime when the endpoint does not say (Zoom documents 3600 s).
const DEFAULT_LIFETIME: u64 = 3600;

/// A token handed to one edit, with the generation to quote when invalidating it.
pub(super) struct TokenLease {
    pub secret: Secret,
    pub generation: u64,
}

/// Delay policy of the token endpoint: exponential from `initial` up to `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub(super) struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    /// Delay after the `failures`-th failure in a row (1-based): `initial·2^(n-1)` capped at
    /// `max`, stretched by up to 25 % so that several daemons sharing one app drift apart.
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        let base = self.initial.saturating_mul(1 << doublings).min(self.max);
        base.mul_f64(rand::random_range(1.0..1.25)).min(self.max)
    }
}

pub(super) struct TokenCache {
    http: reqwest::Client,
    /// `token_url` with `grant_type=client_credentials` appended.
    url: reqwest::Url,
    client_id: String,
    client_secret: Secret,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    backoff: Backoff,
    /// What is known; locked only briefly, never across an `.await`.
    state: Mutex<State>,
    /// Held by the one caller talking to the token endpoint, for the whole request.
    refresh: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    current: Option<Token>,
    last_generation: u64,
    /// Failed requests in a row; reset by a success.
    failures: u32,
    /// No request before this instant (set after a failure).
    retry_at: Option<Instant>,
    /// The last failure, as shown to callers during the backoff.
    last_error: String,
}

struct Token {
    secret: Secret,
    generation: u64,
    refresh_at: Instant,
    expires_at: Instant,
}

impl Token {
    fn lease(&self) -> TokenLease {
        TokenLease {
            secret: self.secret.clone(),
            generation: self.generation,
        }
    }
}

/// What a caller should do, decided under the state lock.
enum Decision {
    Use(TokenLease),
    Fail(String),
    /// A request is due; `fallback` is a still-valid token to use if someone else is already
    /// refreshing (or the refresh fails).
    Refresh {
        fallback: Option<TokenLease>,
    },
}

impl TokenCache {
    pub fn new(
        http: reqwest::Client,
        url: reqwest::Url,
        client_id: String,
        client_secret: Secret,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        backoff: Backoff,
    ) -> TokenCache {
        TokenCache {
            http,
            url,
            client_id,
            client_secret,
            metrics,
            health,
            backoff,
            state: Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// A usable token, fetching one if needed, or why there is none.
    pub async fn get(&self) -> Result<TokenLease, String> {
        let fallback = match self.decide() {
            Decision::Use(lease) => return Ok(lease),
            Decision::Fail(detail) => return Err(detail),
            Decision::Refresh { fallback } => fallback,
        };
        let _refreshing = match fallback {
            // Refresh ahead of expiry: only if nobody else is already doing it.
            Some(lease) => match self.refresh.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(lease),
            },
            None => self.refresh.lock().await,
        };
        // While we waited, the previous holder may have stored a token or a backoff.
        match self.decide() {
            Decision::Use(lease) => return Ok(lease),
            Decision::Fail(detail) => return Err(detail),
            Decision::Refresh { .. } => {}
        }
        match self.fetch().await {
            Ok(lease) => Ok(lease),
            // The failure started a backoff; an older token may still be good until it ends.
            Err(detail) => match self.decide() {
                Decision::Use(lease) => Ok(lease),
                Decision::Fail(detail) => Err(detail),
                Decision::Refresh { .. } => Err(detail),
            },
        }
    }

    /// Whether [`TokenCache::get`] would answer at once with a token, without waiting for a
    /// token request. The dispatcher takes no rate-limit slot before this holds: a request that
    /// waits for a token leaves late, and its late arrival at Zoom would crowd the next ones
    /// into one second.
    pub fn ready(&self) -> bool {
        match self.decide() {
            Decision::Use(_) | Decision::Refresh { fallback: Some(_) } => true,
            Decision::Fail(_) | Decision::Refresh { fallback: None } => false,
        }
    }

    /// Whether a token request is due: no token and no backoff running, or a refresh ahead of
    /// expiry. (During a backoff the answer is no: the request would fail at once.)
    pub fn wanted(&self) -> bool {
        matches!(self.decide(), Decision::Refresh { .. })
    }

    /// Drops the token of `generation` after Zoom refused it, unless it was already replaced.
    pub fn invalidate(&self, generation: u64) {
        let mut state = self.lock();
        if state
            .current
            .as_ref()
            .is_some_and(|t| t.generation == generation)
        {
            state.current = None;
            self.metrics.token_valid.set(0);
            tracing::warn!(
                generation,
                "Zoom refused the access token; fetching a new one"
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn decide(&self) -> Decision {
        let now = Instant::now();
        let mut state = self.lock();
        if state.current.as_ref().is_some_and(|t| now >= t.expires_at) {
            state.current = None;
            self.metrics.token_valid.set(0);
        }
        let backing_off = state.retry_at.filter(|at| now < *at);
        match (&state.current, backing_off) {
            (Some(token), _) if now < token.refresh_at => Decision::Use(token.lease()),
            (Some(token), Some(_)) => Decision::Use(token.lease()),
            (Some(token), None) => Decision::Refresh {
                fallback: Some(token.lease()),
            },
            (None, Some(at)) => Decision::Fail(format!(
                "{}; next token request in {:.1}s",
                state.last_error,
                (at - now).as_secs_f64()
            )),
            (None, None) => Decision::Refresh { fallback: None },
        }
    }

    /// One request to the token endpoint, recording its result. Callers hold `refresh`.
    async fn fetch(&self) -> Result<TokenLease, String> {
        let started = Instant::now();
        match self.request().await {
            Ok((secret, lifetime)) => {
                let refresh_in = if lifetime >= 2 * REFRESH_AHEAD {
                    lifetime - REFRESH_AHEAD
                } else {
                    lifetime / 2
                };
                let mut state = self.lock();
                state.last_generation += 1;
                let token = Token {
                    secret,
                    generation: state.last_generation,
                    // Counted from when the request started: the token may be that old.
                    refresh_at: started + refresh_in,
                    expires_at: started + lifetime,
                };
                let lease = token.lease();
                state.current = Some(token);
                state.failures = 0;
                state.retry_at = None;
                drop(state);
                self.metrics.token_refreshes.inc();
                self.metrics.token_valid.set(1);
                self.health.set_token_error(None);
                tracing::info!(
                    generation = lease.generation,
                    expires_in_s = lifetime.as_secs(),
                    "obtained a Zoom access token"
                );
                Ok(lease)
            }
            Err(problem) => {
                let problem = self.scrub(&problem);
                let mut state = self.lock();
                state.failures += 1;
                let delay = self.backoff.delay(state.failures);
                state.retry_at = Some(Instant::now() + delay);
                state.last_error = problem.clone();
                let failures = state.failures;
                let holds_valid = state.current.is_some();
                drop(state);
                self.metrics.token_failures.inc();
                if !holds_valid {
                    self.metrics.token_valid.set(0);
                }
                self.health.set_token_error(Some(problem.clone()));
                tracing::error!(
                    error = %problem,
                    failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "cannot obtain a Zoom access token"
                );
                Err(format!(
                    "{problem}; next token request in {:.1}s",
                    delay.as_secs_f64()
                ))
            }
        }
    }

    /// POSTs the client credentials; returns the token and its lifetime, or what went wrong.
    async fn request(&self) -> Result<(Secret, Duration), String> {
        let mut response = self
            .http
            .post(self.url.clone())
            .basic_auth(&self.client_id, Some(self.client_secret.expose()))
            .header(ACCEPT, "application/json")
            .send()
            .await
            .map_err(|error| format!("token request failed: {}", super::describe(&error)))?;
        let status = response.status();
        let body = reply::read_capped(&mut response).await;
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let text = |key: &str| {
            json.get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        if !status.is_success() {
            let (error, reason) = (text("error"), text("reason"));
            let said = match (error.is_empty(), reason.is_empty()) {
                (false, false) => format!("{error}: {reason}"),
                (false, true) => error.clone(),
                _ => reply::parse_error_body(&body).message,
            };
            let said = if said.is_empty() {
                String::new()
            } else {
                format!(": {}", reply::excerpt(said.as_bytes()))
            };
            return Err(if error == "invalid_client" {
                format!(
                    "the token endpoint refused the client credentials (HTTP {status}{said}); \
                     check zoom.client_id and the client secret"
                )
            } else {
                format!("the token endpoint answered HTTP {status}{said}")
            });
        }
        let access_token = text("access_token");
        if access_token.is_empty() {
            return Err(format!(
                "the token endpoint answered HTTP {status} without an access_token"
            ));
        }
        let lifetime = match json.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(DEFAULT_LIFETIME);
        Ok((Secret::new(access_token), Duration::from_secs(lifetime)))
    }

    /// Removes the client secret from text that came from elsewhere (the endpoint may echo it).
    fn scrub(&self, text: &str) -> String {
        let secret = self.client_secret.expose();
        if secret.is_empty() {
            text.to_string()
        } else {
            text.replace(secret, "<redacted>")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_max_with_jitter() {
        let backoff = Backoff::DEFAULT;
        let first = backoff.delay(1);
        assert!(
            first >= Duration::from_secs(1) && first <= Duration::from_millis(1250),
            "{first:?}"
        );
        let fourth = backoff.delay(4);
        assert!(
            fourth >= Duration::from_secs(8) && fourth <= Duration::from_secs(10),
            "{fourth:?}"
        );
        for failures in [7, 8, 30, u32::MAX] {
            assert_eq!(backoff.delay(failures), Duration::from_secs(60));
        }
    }
}
