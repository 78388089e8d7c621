//! Configuration: the TOML file's schema, its defaults (this file is the one place they live), and
//! validation into typed values. No other module reads environment variables or secret files.
//!
//! Reading a file reports *every* problem at once, one line each, `FILE:LINE:COL: KEY: MESSAGE`
//! (position or key left out when unknown), so `zoomq check-config` can print them all:
//!
//! 1. The text is parsed into a TOML document with spans. A syntax error stops here: the first
//!    one is reported, with the key of its line found by scanning the raw lines (`scan`).
//! 2. Each key is deserialized on its own, as a document holding only that key: the sections are
//!    `deny_unknown_fields, default`, so an unknown key or a value of the wrong type names exactly
//!    its key, and the problems of all keys are found in one go (`check_keys`).
//! 3. The keys without problems make the [`Config`]; the checks of values follow, as in ripgrep's
//!    `LowArgs → HiArgs`, each problem naming its key, located in the document.
//!
//! Secrets: no output ever shows the value of a secret-bearing key ([`is_secret_key`]: a list,
//! and a rule on names for keys anywhere else) nor any line of the file. The TOML crate's errors
//! are never formatted (their `Display` quotes the offending line, their `Debug` holds the whole
//! file): only their message and span are used, and for a secret-bearing key serde's message,
//! which quotes the value, is cut to its expectation. As a second line of defence every output
//! line is scrubbed of the values written on secret-bearing lines and of the loaded secret.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

use crate::plan::Plan;

mod nats;
mod read;
#[cfg(test)]
mod tests;

use self::read::*;
pub use nats::{Backend, NatsConfig};

/// The standard socket path, used when neither `--socket` nor a config file names one.
pub const DEFAULT_SOCKET_PATH: &str = "/run/zoomq/zoomq.sock";
/// Environment variable that may carry the Zoom client secret.
pub const SECRET_ENV: &str = "ZOOMQ_CLIENT_SECRET";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub socket: SocketConfig,
    pub storage: StorageConfig,
    pub zoom: ZoomConfig,
    pub delivery: DeliveryConfig,
    pub metrics: MetricsConfig,
    /// The cluster mode's NATS (`storage.backend = "nats"`).
    pub nats: NatsConfig,
    /// Per-account overrides, keyed by Zoom `account_id`.
    pub accounts: BTreeMap<String, AccountConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// Where producers connect. Ignored when systemd passes a listening socket.
    pub path: PathBuf,
    /// File mode of the socket, as an octal string.
    #[serde(deserialize_with = "de_mode")]
    pub mode: u32,
    /// Connections served at once; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest request line accepted; longer lines get `too_large`.
    pub max_line_bytes: usize,
    /// Requests of one connection being processed at once (pipelining depth).
    pub max_pipelined: usize,
    /// A connection with no request for this long is closed. "0s" disables.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A client that does not read its responses for this long is disconnected.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// When non-empty, only these peer uids (SO_PEERCRED) may connect, besides `allowed_gids`.
    pub allowed_uids: Vec<u32>,
    /// When non-empty, peers whose primary gid is listed may connect.
    pub allowed_gids: Vec<u32>,
    /// Longest `wait` a `status` request may ask for; longer ones are refused.
    #[serde(deserialize_with = "de_duration")]
    pub max_status_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where the queue lives: `sled` (embedded, under `path`) or `nats` (several daemons as
    /// one service, see `[nats]`).
    pub backend: Backend,
    /// Directory of the sled database (unused with the `nats` backend).
    pub path: PathBuf,
    /// Pending edits beyond which enqueue answers `queue_full`.
    pub max_pending: u64,
    /// sled's page cache, in bytes (sled's own default is 1 GiB). A queue reads each record
    /// about once, so a small cache costs little; sled's resident memory overshoots it
    /// (BENCHMARKS.md, "Scale").
    pub cache_capacity: u64,
    /// New edits are refused (`unavailable`) while the filesystem has less free space than
    /// this, so the database never runs into a full disk mid-write.
    pub min_free_bytes: u64,
    /// When nothing is pending, in flight or dead and the database's files take more than
    /// this, they are rebuilt empty, giving back the space a large backlog took (sled reuses
    /// its file's space but never shrinks it). 0: never.
    pub shrink_above_bytes: u64,
    /// A message named by a `ref` (and a deleted message) is remembered this long after its
    /// last use, then forgotten: its ref is free again and answers `not_found`.
    #[serde(deserialize_with = "de_duration")]
    pub ref_retention: Duration,
    /// Most messages remembered at once (by ref, or as deleted): about 0.5 KB of memory each
    /// (the default, 100,000, about 50 MB).
    /// A send of a new ref or a delete of a new message beyond it answers `queue_full`.
    pub max_refs: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZoomConfig {
    pub api_base: String,
    pub token_url: String,
    pub client_id: String,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    /// Default plan of every account without an override.
    pub plan: Plan,
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Requests to Zoom in flight at once, over all accounts.
    pub concurrency: usize,
    /// First retry delay after a transient failure (before jitter).
    #[serde(deserialize_with = "de_duration")]
    pub retry_initial: Duration,
    /// Longest retry delay.
    #[serde(deserialize_with = "de_duration")]
    pub retry_max: Duration,
    /// An edit failing for longer than this goes to the dead letters.
    #[serde(deserialize_with = "de_duration")]
    pub max_age: Duration,
    /// On SIGTERM, how long in-flight requests and owed answers may take to finish; at most
    /// `crate::SHUTDOWN_GRACE_MAX` (1 s) whatever is set.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Limiter state of an account idle this long is released.
    #[serde(deserialize_with = "de_duration")]
    pub account_idle: Duration,
    /// Share of the plan rate actually used, for safety margin (0 < x <= 1).
    pub rate_margin: f64,
    /// A send whose outcome is unknown (the request was written and no answer says whether
    /// Zoom posted it): `retry` it (at least once: a duplicate is possible) or make it a
    /// `dead` letter with its later edits (at most once).
    pub send_in_doubt: SendInDoubt,
}

/// See [`DeliveryConfig::send_in_doubt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendInDoubt {
    Retry,
    Dead,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`); empty disables it.
    pub listen: String,
    /// Per-account series for at most this many accounts (the largest backlogs); 0 disables.
    pub per_account_series: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// This account's plan.
    pub plan: Option<Plan>,
    /// An explicit rate in requests per second, overriding the plan's.
    pub rate: Option<f64>,
}

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Debug for ZoomConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoomConfig")
            .field("api_base", &self.api_base)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "client_secret_file",
                &self.client_secret_file.as_ref().map(|_| "<not shown>"),
            )
            .field("plan", &self.plan)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl Default for SocketConfig {
    fn default() -> Self {
        SocketConfig {
            path: PathBuf::from(DEFAULT_SOCKET_PATH),
            mode: 0o660,
            max_connections: 1024,
            max_line_bytes: 1024 * 1024,
            max_pipelined: 1024,
            idle_timeout: Duration::from_secs(600),
            write_timeout: Duration::from_secs(30),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_status_wait: Duration::from_secs(60),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Sled,
            path: PathBuf::from("/var/lib/zoomq"),
            max_pending: 1_000_000,
            cache_capacity: 8 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
            shrink_above_bytes: 64 * 1024 * 1024,
            ref_retention: Duration::from_secs(7 * 24 * 3600),
            max_refs: 100_000,
        }
    }
}

impl Default for ZoomConfig {
    fn default() -> Self {
        ZoomConfig {
            api_base: "https://api.zoom.us/v2".into(),
            token_url: "https://zoom.us/oauth/token".into(),
            client_id: String::new(),
            client_secret: None,
            client_secret_file: None,
            plan: Plan::Pro,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 256,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
            shutdown_timeout: Duration::from_secs(1),
            account_idle: Duration::from_secs(600),
            rate_margin: 0.995,
            send_in_doubt: SendInDoubt::Retry,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
            per_account_series: 10,
        }
    }
}

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> ConfigError {
        ConfigError {
            problems: vec![problem],
        }
    }
}

/// Keys whose value is a secret, or says where one is kept: their values and the text of their
/// lines never appear in any output. Keys not listed are still covered by `SECRET_WORDS`.
pub const SECRET_KEYS: &[&str] = &[
    "zoom.client_secret",
    "zoom.client_secret_file",
    "nats.credentials_file",
    "nats.tls_key_file",
];

/// A key (or table) whose name contains one of these is taken for secret-bearing wherever it
/// appears, misspelt or in the wrong table: `nats_password`, `tls.private_key`, `creds_file`...
const SECRET_WORDS: &[&str] = &[
    "secret", "pass", "token", "key", "seed", "private", "cred", "auth", "jwt",
];

/// Keys that contain one of [`SECRET_WORDS`] and yet hold no secret.
const NOT_SECRET_KEYS: &[&str] = &["zoom.token_url"];

/// The tables of the file, as in [`Config`].
const SECTIONS: &[&str] = &[
    "socket", "storage", "zoom", "delivery", "metrics", "nats", "accounts",
];

/// Whether the value at this key (path of table names and key) must never be shown.
pub fn is_secret_key<S: AsRef<str>>(path: &[S]) -> bool {
    let key = dotted(path);
    if SECRET_KEYS.contains(&key.as_str()) {
        return true;
    }
    if NOT_SECRET_KEYS.contains(&key.as_str()) {
        return false;
    }
    // Account ids are data, not names chosen by zoomq: `accounts."turnkey".plan` is no secret.
    let account_id = |i: usize| i == 1 && path[0].as_ref() == "accounts";
    (0..path.len()).any(|i| !account_id(i) && looks_secret(path[i].as_ref()))
}

fn looks_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| name.contains(word))
}

impl Config {
    /// Reads, parses and validates a configuration file, reporting every problem (see the module
    /// documentation); resolves the client secret too, so a missing or unreadable one is reported.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::read_file(path, true)
    }

    /// Reads and parses a configuration file without validating values or looking for the
    /// secret: for client commands that only need `socket.path`. Errors are just as safe.
    pub fn load_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        Config::read_file(path, false)
    }

    /// Parses TOML text; unknown keys and values of the wrong type are errors naming the key and
    /// its position (`LINE:COL: key: message`). Values are not validated.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        from_text(text, None, false)
    }

    fn read_file(path: &Path, validate: bool) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path)
            .map_err(|e| ConfigError::one(format!("cannot read {name}: {e}")))?;
        match String::from_utf8(bytes) {
            Ok(text) => from_text(&text, Some(&name), validate),
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let valid = std::str::from_utf8(valid).unwrap_or_default();
                let message = "the file is not UTF-8 text";
                Err(syntax_error(valid, Some(&name), Some(valid.len()), message))
            }
        }
    }

    /// Checks every value, returning all problems found, each `key: message`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.check_values();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                problems: problems
                    .iter()
                    .map(|p| format!("{}: {}", p.key, p.message))
                    .collect(),
            })
        }
    }

    fn check_values(&self) -> Vec<Problem> {
        let (socket, storage, zoom, delivery) =
            (&self.socket, &self.storage, &self.zoom, &self.delivery);
        let checks = [
            (
                !socket.path.as_os_str().is_empty(),
                "socket.path",
                "must not be empty",
            ),
            (
                socket.mode <= 0o777,
                "socket.mode",
                "expected an octal file mode such as \"0660\"",
            ),
            (
                socket.max_connections >= 1,
                "socket.max_connections",
                "expected at least 1",
            ),
            (
                (1024..=64 * 1024 * 1024).contains(&socket.max_line_bytes),
                "socket.max_line_bytes",
                "expected between 1024 and 67108864",
            ),
            (
                socket.max_pipelined >= 1,
                "socket.max_pipelined",
                "expected at least 1",
            ),
            (
                !socket.write_timeout.is_zero(),
                "socket.write_timeout",
                "expected a positive duration",
            ),
            (
                !storage.path.as_os_str().is_empty(),
                "storage.path",
                "must not be empty",
            ),
            (
                storage.max_pending >= 1,
                "storage.max_pending",
                "expected at least 1",
            ),
            (
                storage.cache_capacity >= 1024 * 1024,
                "storage.cache_capacity",
                "expected at least 1048576 bytes",
            ),
            (
                !zoom.client_id.is_empty(),
                "zoom.client_id",
                "must be set to the app's client id",
            ),
            (
                zoom.client_secret.is_none() || zoom.client_secret_file.is_none(),
                "zoom.client_secret_file",
                "set either zoom.client_secret or zoom.client_secret_file, not both",
            ),
            (
                !zoom.connect_timeout.is_zero(),
                "zoom.connect_timeout",
                "expected a positive duration",
            ),
            (
                !zoom.request_timeout.is_zero(),
                "zoom.request_timeout",
                "expected a positive duration",
            ),
            (
                (1..=10_000).contains(&delivery.concurrency),
                "delivery.concurrency",
                "expected between 1 and 10000",
            ),
            (
                !delivery.retry_initial.is_zero(),
                "delivery.retry_initial",
                "expected a positive duration",
            ),
            (
                delivery.retry_max >= delivery.retry_initial,
                "delivery.retry_max",
                "expected at least delivery.retry_initial",
            ),
            (
                !delivery.max_age.is_zero(),
                "delivery.max_age",
                "expected a positive duration",
            ),
            (
                delivery.rate_margin > 0.0 && delivery.rate_margin <= 1.0,
                "delivery.rate_margin",
                "expected a number above 0 and at most 1",
            ),
            (
                self.storage.ref_retention >= Duration::from_secs(60),
                "storage.ref_retention",
                "expected at least 1m (producers name their messages by ref for that long)",
            ),
        ];
        let mut problems: Vec<Problem> = checks
            .into_iter()
            .filter(|(ok, _, _)| !ok)
            .map(|(_, key, message)| Problem::new(key, message))
            .collect();
        for (key, url) in [
            ("zoom.api_base", &zoom.api_base),
            ("zoom.token_url", &zoom.token_url),
        ] {
            if let Err(e) = reqwest::Url::parse(url) {
                problems.push(Problem::new(
                    key,
                    format!("expected an http(s) URL, got {url:?} ({e})"),
                ));
            } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(Problem::new(
                    key,
                    format!("expected an http(s) URL, got {url:?}"),
                ));
            }
        }
        if let Err(problem) = self.find_client_secret() {
            problems.push(problem);
        }
        let listen = &self.metrics.listen;
        if !listen.is_empty() && listen.parse::<SocketAddr>().is_err() {
            problems.push(Problem::new(
                "metrics.listen",
                format!(
                    "expected an address such as \"127.0.0.1:9464\" (or \"\" to disable), got {listen:?}"
                ),
            ));
        }
        nats::check(self, &mut problems);
        for (account, settings) in &self.accounts {
            if let Some(rate) = settings.rate {
                if !(rate > 0.0 && rate <= 10_000.0) {
                    problems.push(Problem::new(
                        dotted(&["accounts", account, "rate"]),
                        format!(
                            "expected requests per second above 0 and at most 10000, got {rate}"
                        ),
                    ));
                }
            }
        }
        problems
    }

    /// The Zoom client secret, from (in order) `zoom.client_secret`, `zoom.client_secret_file`,
    /// the systemd credential `$CREDENTIALS_DIRECTORY/client_secret`, or `$ZOOMQ_CLIENT_SECRET`.
    /// Errors never contain the secret, nor the path `zoom.client_secret_file` names.
    pub fn client_secret(&self) -> Result<Secret, String> {
        self.find_client_secret()
            .map_err(|p| format!("{}: {}", p.key, p.message))
    }

    fn find_client_secret(&self) -> Result<Secret, Problem> {
        if let Some(secret) = &self.zoom.client_secret {
            return non_empty(secret.clone(), "zoom.client_secret");
        }
        if let Some(path) = &self.zoom.client_secret_file {
            // The path is not shown: a secret written here by mistake would be.
            return read_secret_file(path, "zoom.client_secret_file", "the file it names");
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join("client_secret");
            if path.exists() {
                let shown = path.display().to_string();
                return read_secret_file(&path, "systemd credential client_secret", &shown);
            }
        }
        if let Ok(secret) = std::env::var(SECRET_ENV) {
            return non_empty(secret, SECRET_ENV);
        }
        Err(Problem::new(
            "zoom.client_secret",
            format!(
                "not set; set zoom.client_secret or zoom.client_secret_file, \
                 pass the systemd credential client_secret, or set {SECRET_ENV}"
            ),
        ))
    }

    /// Sets the secret directly (the demo and tests use this).
    pub fn set_client_secret(&mut self, secret: &str) {
        self.zoom.client_secret = Some(secret.to_string());
        self.zoom.client_secret_file = None;
    }

    /// Zoom's limit for an account in requests per second: its `rate` override, else its plan's
    /// Medium limit.
    pub fn account_limit(&self, account_id: &str) -> f64 {
        match self.accounts.get(account_id) {
            Some(AccountConfig {
                rate: Some(rate), ..
            }) => *rate,
            Some(AccountConfig {
                plan: Some(plan), ..
            }) => f64::from(plan.per_second()),
            _ => f64::from(self.zoom.plan.per_second()),
        }
    }

    /// The rate (requests per second) the daemon paces an account at, before adaptive
    /// decrease: its limit times `delivery.rate_margin`, the slack that absorbs jitter between
    /// our send times and Zoom's arrival times.
    pub fn account_rate(&self, account_id: &str) -> f64 {
        self.account_limit(account_id) * self.delivery.rate_margin
    }

    /// The daily request cap of an account, if its plan has one.
    pub fn account_daily_limit(&self, account_id: &str) -> Option<u32> {
        self.accounts
            .get(account_id)
            .and_then(|a| a.plan)
            .unwrap_or(self.zoom.plan)
            .per_day()
    }
}

fn non_empty(secret: String, source: &str) -> Result<Secret, Problem> {
    if secret.is_empty() {
        Err(Problem::new(source, "the client secret is empty"))
    } else {
        Ok(Secret(secret))
    }
}

fn read_secret_file(path: &Path, source: &str, shown: &str) -> Result<Secret, Problem> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problem::new(source, format!("cannot read {shown}: {e}")))?;
    non_empty(text.trim_end_matches(['\n', '\r']).to_string(), source)
}

fn de_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "expected a duration such as \"1s\", \"250ms\" or \"5m\", got {text:?} ({e})"
        ))
    })
}

fn de_mode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    let text = String::deserialize(deserializer)?;
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected an octal file mode such as \"0660\", got {text:?}"
            ))
        })
}
