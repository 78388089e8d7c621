//! The local Zoom sandbox: a fake Zoom that speaks the real protocol over HTTP on loopback.
//!
//! It serves the calls zoomq makes: `POST /oauth/token` and Zoom's three chatbot message calls,
//! send (`POST /v2/im/chat/messages`), edit (`PUT /v2/im/chat/messages/{message_id}`) and delete
//! (`DELETE /v2/im/chat/messages/{message_id}?account_id=..&robot_jid=..`), with Zoom's request
//! checks, response bodies, rate limits and 429 headers, plus injectable faults, and records
//! what it saw so tests, benchmarks and bot authors can check what a client did. The integration
//! tests, the benchmarks and the `zoomq sandbox` command all start it through [`Sandbox::start`]
//! / [`Sandbox::start_on`].
//!
//! This file owns the public API: configuration ([`SandboxConfig`], [`AccountSettings`],
//! [`Faults`], [`Scripted`]) and the [`Sandbox`] handle. It deliberately knows nothing about
//! HTTP; the submodules split the rest:
//!
//! - `http.rs`: the server, its routes, the token endpoint and the `/sandbox/*` views.
//! - `calls.rs`: the send, edit and delete endpoints and the order in which a request is checked.
//! - `schema.rs`: each call's parameters as Zoom's schema has them (400 code 7001).
//! - `fault.rs`: the random faults drawn for one request.
//! - `reply.rs`: Zoom's response bodies and headers.
//! - `state.rs`: the shared state behind one mutex, the messages and the quota bookkeeping.
//! - `stats.rs`: the observation types ([`MessageRecord`], [`AccountStats`],
//!   [`SandboxStats`], [`RequestRecord`]).
//! - `conn.rs`: the listener whose connections a handler can reset without answering.
//! - `tests.rs`: unit tests of what `tests/sandbox/` does not cover (injected 429s).
//!
//! # Messages
//!
//! A send creates a message under a new opaque id (letters, digits, `-` and `_`, in the two
//! shapes Zoom's examples show), which edits and deletes then name. Ids the sandbox never saw
//! are taken as messages sent before it started: an edit of one succeeds, and so does a delete,
//! after which the id is deleted like any other. An edit or delete of a deleted message, or of
//! an id in [`SandboxConfig::missing_messages`] / [`SandboxConfig::missing_prefix`], answers
//! 404 code 8001.
//!
//! # Rate-limit model
//!
//! Zoom does not document its window, so the sandbox picks the strict reading and says so:
//!
//! - All three message calls share one per-account quota, as Zoom's Medium label has it: a
//!   send, an edit and a delete each count as one request of the account.
//! - Per-second limits use **fixed one-second windows aligned to the sandbox's start instant**
//!   (window `n` covers `[start + n s, start + (n + 1) s)` on the monotonic clock), not to
//!   wall-clock seconds. Tests therefore see the same windows however the wall clock ticks.
//! - Every request of the three calls that carries a live token and names an `account_id` (in
//!   the body of a send or edit, in the query of a delete) counts toward that account's
//!   per-second window, whatever it is answered (429s, 400s, 404s, injected faults included):
//!   Zoom counts what reaches it. Requests answered by a [`Scripted`] status or reset, and
//!   requests rejected before the account is known (bad token, unparsable body, no
//!   `account_id`) do not count.
//! - Daily limits count the requests that got past the per-second check, and reset at 00:00 UTC
//!   on the wall clock.
//! - `X-RateLimit-Limit` reports the account's *plan* limit; `X-RateLimit-Remaining` reports what
//!   is left of the account's *capacity* (which a [`AccountSettings::capacity_per_second`]
//!   override can make smaller, as when another app shares the quota).
//! - [`Sandbox::inject_429`] forces a 429 on an account's next requests that pass both checks,
//!   as when another app's burst or Zoom itself refuses one request; they count like any other.
//!
//! # Faults
//!
//! A client must survive a Zoom that fails before doing anything and one that does the work and
//! then fails to say so; for a send, which Zoom cannot deduplicate, only the second can post a
//! message twice. So faults come in two kinds: [`Faults::reset`], [`Faults::error_5xx`] and
//! [`Faults::spurious_429`] answer without applying the request, while
//! [`Faults::reset_after_apply`] and [`Faults::error_5xx_after_apply`] apply it (create, edit
//! or delete the message) and then reset the connection or answer a 5xx. [`Scripted`] steps
//! offer the same two kinds for one chosen request.

mod calls;
mod conn;
mod fault;
mod http;
mod reply;
mod schema;
mod state;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::plan::Plan;

pub use stats::{AccountStats, MessageRecord, RequestRecord, SandboxStats};

/// Everything the sandbox does, as plain data. All fields are public so a CLI can fill them
/// from flags; [`Default`] gives a well-behaved Pro-plan Zoom with no faults.
///
/// Every field can also be changed while the sandbox runs ([`Sandbox::configure`]), except
/// `seed`, which is read once at start.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The app's client id, checked by `POST /oauth/token`.
    pub client_id: String,
    /// The app's client secret, checked by `POST /oauth/token`. Never logged.
    pub client_secret: String,
    /// How long an issued token stays valid. `expires_in` reports it in whole seconds
    /// (rounded down, at least 1), so a test can use e.g. 1500 ms.
    pub token_ttl: Duration,
    /// How many tokens may be live at once; issuing one more invalidates the oldest, as Zoom
    /// does when an app fetches too many. `None`: unlimited.
    pub max_live_tokens: Option<usize>,
    /// How long the token endpoint takes to answer, so overlapping token requests are
    /// observable in [`SandboxStats::token_max_concurrent`].
    pub token_delay: Duration,
    /// Plan of every account without an [`AccountSettings::plan`].
    pub default_plan: Plan,
    /// Per-account overrides, keyed by `account_id`.
    pub accounts: HashMap<String, AccountSettings>,
    /// Daily cap of accounts whose plan has one (Free), replacing the plan's 2,000 so tests can
    /// reach it. `None`: the plan's own cap.
    pub daily_limit: Option<u32>,
    /// Form of the `Retry-After` sent with a daily-limit 429 (the next 00:00 UTC). `None`: no
    /// `Retry-After`. Default: ISO-8601, as in Zoom's documented example.
    pub daily_retry_after: Option<RetryAfterForm>,
    /// Form of the `Retry-After` sent with a per-second 429 (the start of the next window).
    /// `None` (default): no `Retry-After`, as Zoom usually does.
    pub qps_retry_after: Option<RetryAfterForm>,
    /// Answer successful edits with `204 No Content` instead of Zoom's documented 200 + body,
    /// as one production client reports. Sends and deletes keep their bodies: a send without
    /// its `message_id` would be useless.
    pub respond_204: bool,
    /// `robot_jid`s answered with 404 code 7002 (by all three calls).
    pub unknown_robots: HashSet<String>,
    /// `robot_jid`s answered with 403 code 7004 (by all three calls).
    pub forbidden_robots: HashSet<String>,
    /// Message ids whose edits and deletes are answered with 404 code 8001.
    pub missing_messages: HashSet<String>,
    /// Message ids starting with this prefix are answered with 404 code 8001 by edits and
    /// deletes. Default: `Some("missing-")`.
    pub missing_prefix: Option<String>,
    /// Injected faults.
    pub faults: Faults,
    /// Seed of the random number generators that decide faults and the random part of sent
    /// message ids, so a campaign replays the same faults for the same sequence of requests.
    pub seed: u64,
    /// How many [`RequestRecord`]s to keep; older ones are dropped first.
    pub request_log_capacity: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            client_id: "sandbox-client".to_string(),
            client_secret: "sandbox-secret".to_string(),
            token_ttl: Duration::from_secs(3600),
            max_live_tokens: None,
            token_delay: Duration::ZERO,
            default_plan: Plan::Pro,
            accounts: HashMap::new(),
            daily_limit: None,
            daily_retry_after: Some(RetryAfterForm::Iso8601),
            qps_retry_after: None,
            respond_204: false,
            unknown_robots: HashSet::new(),
            forbidden_robots: HashSet::new(),
            missing_messages: HashSet::new(),
            missing_prefix: Some("missing-".to_string()),
            faults: Faults::default(),
            seed: 0,
            request_log_capacity: 200_000,
        }
    }
}

/// Overrides for one account. `None` fields fall back to the sandbox-wide settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountSettings {
    /// The account's plan. `None`: [`SandboxConfig::default_plan`].
    pub plan: Option<Plan>,
    /// Requests per second left for this app, below the plan's limit, as when another app on the
    /// same account uses the rest. `None`: the plan's limit.
    pub capacity_per_second: Option<u32>,
    /// Requests per UTC day, whatever the plan. `None`: the plan's cap (or
    /// [`SandboxConfig::daily_limit`] for plans with one).
    pub daily_limit: Option<u32>,
}

/// How a `Retry-After` header spells its instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfterForm {
    /// Delta seconds, rounded up: `Retry-After: 2`.
    Seconds,
    /// RFC 9110 HTTP-date: `Retry-After: Sun, 31 May 2020 00:00:00 GMT`.
    HttpDate,
    /// ISO-8601 UTC instant, Zoom's documented form: `Retry-After: 2020-05-31T00:00:00Z`.
    Iso8601,
}

/// Random faults, each drawn independently per request (send, edit or delete) from the seeded
/// generator. Probabilities are in `0.0..=1.0`; all default to `0.0`.
///
/// They apply after the rate-limit check, so faulted requests use quota like any request Zoom
/// received. At most one outcome happens per request, in this order of precedence:
///
/// 1. `reset`, 2. `error_5xx`, 3. `spurious_429`: the request is not applied;
/// 4. `reset_after_apply`, 5. `error_5xx_after_apply`: the request is applied first.
///
/// An after-apply fault only shows on a request that would have succeeded: one answered 400 or
/// 404 applied nothing, so it gets its error answer. A slow response combines with any outcome
/// (the delay comes before the request is applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Probability of answering 500, 502 or 503 with a Zoom-style body, without applying the
    /// request.
    pub error_5xx: f64,
    /// Probability of closing the connection without any response and without applying the
    /// request (the client sees a transport error).
    pub reset: f64,
    /// Probability of delaying the response by a uniform draw from `slow_min..=slow_max`.
    pub slow: f64,
    pub slow_min: Duration,
    pub slow_max: Duration,
    /// Probability of a 429 although the account is within its quota.
    pub spurious_429: f64,
    /// Form of the spurious 429's `Retry-After`. `None`: a bare 429 with no rate-limit
    /// headers at all (Zoom sometimes sends those).
    pub spurious_429_retry_after: Option<RetryAfterForm>,
    /// How far in the future the spurious 429's `Retry-After` points. Not enforced.
    pub spurious_429_delay: Duration,
    /// Probability of applying the request (creating the message of a send, applying the edit,
    /// deleting the message) and then closing the connection without answering: a response
    /// lost on the way back. A client that repeats such a send posts the message twice.
    pub reset_after_apply: f64,
    /// Probability of applying the request and then answering 500, 502 or 504, as a gateway
    /// that timed out after passing the request on does.
    pub error_5xx_after_apply: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_5xx: 0.0,
            reset: 0.0,
            slow: 0.0,
            slow_min: Duration::from_millis(100),
            slow_max: Duration::from_millis(500),
            spurious_429: 0.0,
            spurious_429_retry_after: Some(RetryAfterForm::Seconds),
            spurious_429_delay: Duration::from_secs(1),
            reset_after_apply: 0.0,
            error_5xx_after_apply: 0.0,
        }
    }
}

/// Which limit an injected 429 names in `X-RateLimit-Type` (see [`Sandbox::inject_429`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedLimit {
    /// `QPS`, with Zoom's per-second message.
    Qps,
    /// `Daily-limit`, with Zoom's daily message.
    Daily,
}

/// A 429 forced on one request of an account (see [`Sandbox::inject_429`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected429 {
    pub limit: InjectedLimit,
    /// `Retry-After` this far after the answer, in delta seconds (rounded up). `None`: no
    /// `Retry-After`.
    pub retry_after: Option<Duration>,
}

/// One scripted answer to the next request of a message id (edits and deletes, see
/// [`Sandbox::script`]) or to the next send to a `to_jid` (see [`Sandbox::script_send`]).
/// Steps are consumed in order, one per request, before any other handling.
#[derive(Debug, Clone, PartialEq)]
pub enum Scripted {
    /// Answer with this status, these headers and this JSON body. `body: None` sends Zoom's
    /// error shape `{"code": <status>, "message": <reason>}` (no body for 204). Nothing is
    /// applied, and no quota is used.
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: Option<serde_json::Value>,
    },
    /// Close the connection without answering. Nothing is applied, and no quota is used.
    Reset,
    /// Wait this long, then handle the request normally.
    Delay(Duration),
    /// Handle the request normally (lets a script say "fail, succeed, fail").
    Pass,
    /// Handle the request normally (token, quota, random faults, checks); if it is applied,
    /// close the connection instead of answering. A request that fails on its own gets its
    /// own answer, and the step is used up all the same.
    ResetAfterApply,
    /// Handle the request normally, then wait this long before answering: the request is
    /// applied while its client still waits (a client killed meanwhile never learns it).
    DelayAfterApply(Duration),
    /// Like [`Scripted::ResetAfterApply`], but answer with this status, these headers and this
    /// body (as [`Scripted::Status`] does) once the request is applied.
    StatusAfterApply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Option<serde_json::Value>,
    },
}

impl Scripted {
    /// `Status` with Zoom's default body and no extra headers.
    pub fn status(status: u16) -> Scripted {
        Scripted::Status {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    /// `StatusAfterApply` with Zoom's default body and no extra headers.
    pub fn status_after_apply(status: u16) -> Scripted {
        Scripted::StatusAfterApply {
            status,
            headers: Vec::new(),
            body: None,
        }
    }

    /// A 429 with Zoom's per-second body, and `Retry-After: <retry_after>` when given.
    pub fn too_many_requests(retry_after: Option<&str>) -> Scripted {
        Scripted::Status {
            status: 429,
            headers: retry_after
                .map(|value| vec![("Retry-After".to_string(), value.to_string())])
                .unwrap_or_default(),
            body: None,
        }
    }
}

/// A running sandbox. Dropping it stops the server (without waiting); [`Sandbox::shutdown`]
/// stops it and waits.
pub struct Sandbox {
    /// Where the listener is bound.
    addr: SocketAddr,
    /// State shared with every request handler; the handle only reads and reconfigures it.
    shared: Arc<state::Shared>,
    /// Cancelled by `shutdown` or drop: stops accepting, cuts injected delays short, and lets
    /// in-flight requests finish.
    cancel: CancellationToken,
    /// The axum server task; taken by `shutdown` to wait for it.
    task: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Binds `127.0.0.1:0` and starts serving.
    pub async fn start(cfg: SandboxConfig) -> std::io::Result<Sandbox> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Sandbox::start_on(listener, cfg).await
    }

    /// Starts serving on an already bound listener (the `zoomq sandbox` command binds the
    /// address the user asked for).
    pub async fn start_on(listener: TcpListener, cfg: SandboxConfig) -> std::io::Result<Sandbox> {
        let mut addr = listener.local_addr()?;
        // A wildcard bind is reachable on loopback; advertise that in URLs.
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        let cancel = CancellationToken::new();
        let shared = Arc::new(state::Shared::new(cfg, addr, cancel.clone()));
        let task = tokio::spawn(http::serve(listener, shared.clone(), cancel.clone()));
        tracing::debug!(%addr, "zoom sandbox listening");
        Ok(Sandbox {
            addr,
            shared,
            cancel,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Origin of the fixed per-second windows: window `n` is `[started + n s, started + (n+1) s)`.
    pub fn started(&self) -> std::time::Instant {
        self.shared.started
    }

    /// `http://127.0.0.1:PORT/v2`, the sandbox's equivalent of `https://api.zoom.us/v2`.
    pub fn api_base(&self) -> String {
        format!("http://{}/v2", self.addr)
    }

    /// `http://127.0.0.1:PORT/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth/token", self.addr)
    }

    /// A daemon configuration that delivers to this sandbox with its credentials and plan,
    /// keeping its socket (`zoomq.sock`) and database (`data/`) under `dir`, metrics off.
    /// The demo and the benchmarks start their daemons from it.
    pub fn daemon_config(&self, dir: &std::path::Path) -> crate::config::Config {
        let (client_id, client_secret, plan) = {
            let state = self.shared.lock();
            (
                state.cfg.client_id.clone(),
                state.cfg.client_secret.clone(),
                state.cfg.default_plan,
            )
        };
        let mut config = crate::config::Config::default();
        config.socket.path = dir.join("zoomq.sock");
        config.storage.path = dir.join("data");
        config.zoom.api_base = self.api_base();
        config.zoom.token_url = self.token_url();
        config.zoom.client_id = client_id;
        config.set_client_secret(&client_secret);
        config.zoom.plan = plan;
        config.metrics.listen = String::new();
        config
    }

    /// What the sandbox knows about a message id, if a send created it or any edit or delete
    /// request named it.
    pub fn message(&self, message_id: &str) -> Option<MessageRecord> {
        self.shared.lock().message(message_id)
    }

    /// Every message id the sandbox has a record of (see [`Sandbox::message`]), in the order it
    /// first saw them: a client's sends can be checked against what it meant to post.
    pub fn messages(&self) -> Vec<MessageRecord> {
        self.shared.lock().messages()
    }

    /// Figures for one account, including its arrival log, if it was seen or configured.
    pub fn account(&self, account_id: &str) -> Option<AccountStats> {
        self.shared.lock().account_stats(account_id)
    }

    /// Global and per-account figures.
    pub fn stats(&self) -> SandboxStats {
        self.shared.stats()
    }

    /// The request log, oldest first (bounded by [`SandboxConfig::request_log_capacity`]).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// Empties the request log (counters are kept).
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
    }

    pub fn faults(&self) -> Faults {
        self.shared.lock().cfg.faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.configure(|cfg| cfg.faults = faults);
    }

    /// Queues scripted answers for the next edit and delete requests of `message_id`, after
    /// any still queued.
    pub fn script(&self, message_id: &str, steps: Vec<Scripted>) {
        let mut state = self.shared.lock();
        state
            .scripts
            .entry(message_id.to_string())
            .or_default()
            .extend(steps);
    }

    /// Queues scripted answers for the next send requests whose body names `to_jid`, after any
    /// still queued. A send has no message id before it is applied, so its script is keyed by
    /// where it goes.
    pub fn script_send(&self, to_jid: &str, steps: Vec<Scripted>) {
        let mut state = self.shared.lock();
        state
            .send_scripts
            .entry(to_jid.to_string())
            .or_default()
            .extend(steps);
    }

    /// Answers the next `count` requests (sends, edits and deletes) naming `account_id` that pass the daily and
    /// per-second checks with `answer` instead (after any injections still queued). They use
    /// quota like any request Zoom received, and random faults do not apply to them.
    pub fn inject_429(&self, account_id: &str, answer: Injected429, count: u32) {
        let mut state = self.shared.lock();
        let injected = &mut state
            .accounts
            .entry(account_id.to_string())
            .or_default()
            .injected;
        injected.extend(std::iter::repeat_n(answer, count as usize));
    }

    pub fn set_account(&self, account_id: &str, settings: AccountSettings) {
        self.configure(|cfg| {
            cfg.accounts.insert(account_id.to_string(), settings);
        });
    }

    pub fn set_token_delay(&self, delay: Duration) {
        self.configure(|cfg| cfg.token_delay = delay);
    }

    /// Changes any setting while running (`seed` excepted).
    pub fn configure(&self, change: impl FnOnce(&mut SandboxConfig)) {
        change(&mut self.shared.lock().cfg);
    }

    /// Every issued token becomes invalid now.
    pub fn expire_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// Stops accepting, cuts injected delays short, and waits (at most two seconds) for
    /// in-flight requests to finish.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
