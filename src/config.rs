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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the sled database.
    pub path: PathBuf,
    /// Pending edits beyond which enqueue answers `queue_full`.
    pub max_pending: u64,
    /// sled's page cache, in bytes (sled's own default is 1 GiB).
    pub cache_capacity: u64,
    /// New edits are refused (`unavailable`) while the filesystem has less free space than
    /// this, so the database never runs into a full disk mid-write.
    pub min_free_bytes: u64,
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
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// Limiter state of an account idle this long is released.
    #[serde(deserialize_with = "de_duration")]
    pub account_idle: Duration,
    /// Share of the plan rate actually used, for safety margin (0 < x <= 1).
    pub rate_margin: f64,
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
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("/var/lib/zoomq"),
            max_pending: 1_000_000,
            cache_capacity: 64 * 1024 * 1024,
            min_free_bytes: 256 * 1024 * 1024,
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
            shutdown_timeout: Duration::from_secs(10),
            account_idle: Duration::from_secs(600),
            rate_margin: 0.995,
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
/// lines never appear in any output. Cluster mode adds its NATS credentials and TLS private key
/// entries here. Keys not listed are still covered by `SECRET_WORDS`.
pub const SECRET_KEYS: &[&str] = &["zoom.client_secret", "zoom.client_secret_file"];

/// A key (or table) whose name contains one of these is taken for secret-bearing wherever it
/// appears, misspelt or in the wrong table: `nats_password`, `tls.private_key`, `creds_file`...
const SECRET_WORDS: &[&str] = &[
    "secret", "pass", "token", "key", "seed", "private", "cred", "auth", "jwt",
];

/// Keys that contain one of [`SECRET_WORDS`] and yet hold no secret.
const NOT_SECRET_KEYS: &[&str] = &["zoom.token_url"];

/// The tables of the file, as in [`Config`].
const SECTIONS: &[&str] = &[
    "socket", "storage", "zoom", "delivery", "metrics", "accounts",
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

/// One problem of a configuration: the dotted key it is about (may be empty), where it is (a
/// byte offset into the file) when known, and what is wrong.
struct Problem {
    key: String,
    at: Option<usize>,
    message: String,
}

impl Problem {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            at: None,
            message: message.into(),
        }
    }
}

/// Parses, checks every key on its own and, when asked, validates the values and looks for the
/// secret; every problem comes out as one line, secrets scrubbed.
fn from_text(text: &str, origin: Option<&str>, validate: bool) -> Result<Config, ConfigError> {
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc.into_inner(),
        // Only the message and the span: the error's Display quotes the line, its Debug holds
        // the whole text.
        Err(e) => {
            let at = e.span().map(|span| span.start);
            return Err(syntax_error(text, origin, at, e.message()));
        }
    };
    let mut report = Report::new(origin, text);
    report.add_secret_values(&mut Vec::new(), &doc);
    let Keys { mut problems, good } = check_keys(&doc);
    let config = match Config::deserialize(toml::de::Deserializer::from(Spanned::new(
        0..text.len(),
        good,
    ))) {
        Ok(config) => config,
        // Not expected once every key passed on its own; reported all the same.
        Err(e) => {
            problems.push(Problem {
                key: String::new(),
                at: e.span().map(|span| span.start),
                message: e.message().to_string(),
            });
            return Err(report.error(problems));
        }
    };
    if validate {
        // A key (or table) that is wrong already is left at its default: no second problem
        // about it or its keys.
        let bad: Vec<String> = problems.iter().map(|p| p.key.clone()).collect();
        for mut problem in config.check_values() {
            let key = &problem.key;
            if !bad
                .iter()
                .any(|bad| key == bad || key.starts_with(&format!("{bad}.")))
            {
                problem.at = position(&doc, &problem.key);
                problems.push(problem);
            }
        }
        if let Ok(secret) = config.client_secret() {
            report.add_secret(secret.expose());
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(report.error(problems))
    }
}

/// The one problem of a text that does not parse, at `at`, named by the key of its line.
fn syntax_error(text: &str, origin: Option<&str>, at: Option<usize>, message: &str) -> ConfigError {
    let key = at
        .and_then(|at| {
            scan(text)
                .into_iter()
                .nth(line_column(text.as_bytes(), at).0 - 1)
        })
        .and_then(|line| line.key)
        .map(|key| dotted(&key))
        .unwrap_or_default();
    let problem = Problem {
        key,
        at,
        message: message.to_string(),
    };
    Report::new(origin, text).error(vec![problem])
}

/// The outcome of checking each key on its own: the problems, and the document without the
/// keys that have one.
#[derive(Default)]
struct Keys<'i> {
    problems: Vec<Problem>,
    good: DeTable<'i>,
}

/// Checks every key of the document by deserializing a document holding only that key: every
/// section is `deny_unknown_fields, default`, so each unknown key and each value of the wrong
/// type is found, naming exactly its key, however many there are.
fn check_keys<'i>(doc: &DeTable<'i>) -> Keys<'i> {
    let mut keys = Keys::default();
    for (section, value) in doc.iter() {
        if !SECTIONS.contains(&section.get_ref().as_ref()) {
            keys.check(&[section], value); // unknown: serde names it and the known ones
            continue;
        }
        let Some(table) = keys.table(&[section], value) else {
            continue;
        };
        for (key, value) in table.iter() {
            if section.get_ref() != "accounts" {
                keys.check(&[section, key], value);
                continue;
            }
            let Some(account) = keys.table(&[section, key], value) else {
                continue;
            };
            if account.is_empty() {
                keys.check(&[section, key], value);
            }
            for (field, value) in account.iter() {
                keys.check(&[section, key, field], value);
            }
        }
    }
    keys
}

type Key<'i> = Spanned<DeString<'i>>;
type Value<'i> = Spanned<DeValue<'i>>;

impl<'i> Keys<'i> {
    fn check(&mut self, path: &[&Key<'i>], value: &Value<'i>) {
        let mut one = DeTable::new();
        insert_at(&mut one, path, value.clone());
        let doc = toml::de::Deserializer::from(Spanned::new(value.span(), one));
        match Config::deserialize(doc) {
            Ok(_) => insert_at(&mut self.good, path, value.clone()),
            Err(e) => {
                let names: Vec<&str> = path.iter().map(|key| key.get_ref().as_ref()).collect();
                let message = if is_secret_key(&names) {
                    without_value(e.message(), value.get_ref())
                } else {
                    e.message().to_string()
                };
                self.problems.push(Problem {
                    key: dotted(&names),
                    at: Some(e.span().unwrap_or_else(|| value.span()).start),
                    message,
                });
            }
        }
    }

    /// The value as a table, or a problem (the value not shown: it could be anything).
    fn table<'a>(&mut self, path: &[&Key<'i>], value: &'a Value<'i>) -> Option<&'a DeTable<'i>> {
        let table = value.get_ref().as_table();
        if table.is_none() {
            let names: Vec<&str> = path.iter().map(|key| key.get_ref().as_ref()).collect();
            self.problems.push(Problem {
                key: dotted(&names),
                at: Some(value.span().start),
                message: format!("expected a table, found {}", value.get_ref().type_str()),
            });
        }
        table
    }
}

/// Inserts `value` at `path`, creating the tables on the way.
fn insert_at<'i>(table: &mut DeTable<'i>, path: &[&Key<'i>], value: Value<'i>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut table = table;
    for key in parents {
        let entry = table
            .entry((*key).clone())
            .or_insert_with(|| Spanned::new(key.span(), DeValue::Table(DeTable::new())));
        let DeValue::Table(next) = entry.get_mut() else {
            return;
        };
        table = next;
    }
    table.insert((*last).clone(), value);
}

/// A deserialization message for a secret-bearing key: serde quotes the value in "invalid
/// type: string \"...\", expected ..."; only the expectation is kept.
fn without_value(message: &str, value: &DeValue<'_>) -> String {
    if message.starts_with("unknown field") {
        return message.to_string(); // names keys only
    }
    let expected = message
        .rsplit_once(", expected ")
        .map_or("another value", |(_, expected)| expected);
    format!(
        "expected {expected}, found {} (value not shown: this key holds a secret)",
        value.type_str()
    )
}

/// Where the value of a dotted key is in the document, if it is there.
fn position(doc: &DeTable<'_>, key: &str) -> Option<usize> {
    let path = parse_key(key)?;
    let (last, parents) = path.split_last()?;
    let mut table = doc;
    for name in parents {
        table = table.get(name.as_str())?.get_ref().as_table()?;
    }
    Some(table.get(last.as_str())?.span().start)
}

/// A dotted key as written in TOML, quoting the parts that need it.
fn dotted<S: AsRef<str>>(path: &[S]) -> String {
    let part = |name: &str| {
        if !name.is_empty() && name.chars().all(is_bare) {
            name.to_string()
        } else {
            format!("{name:?}")
        }
    };
    let parts: Vec<String> = path.iter().map(|name| part(name.as_ref())).collect();
    parts.join(".")
}

fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// The 1-based line and column (in characters) of a byte offset.
fn line_column(text: &[u8], at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let line = 1 + before.iter().filter(|b| **b == b'\n').count();
    let column = 1 + before[line_start..]
        .iter()
        .filter(|b| (**b & 0xC0) != 0x80)
        .count();
    (line, column)
}

/// Turns problems into output lines: `FILE:LINE:COL: key: message` (parts left out when not
/// known), with every secret value found anywhere replaced by `<redacted>`. The problems carry
/// no values of secret-bearing keys to begin with; this is the second line of defence.
struct Report<'t> {
    origin: Option<&'t str>,
    text: &'t str,
    secrets: Vec<String>,
}

impl<'t> Report<'t> {
    /// A report on `text`, set to scrub what is written on its secret-bearing lines.
    fn new(origin: Option<&'t str>, text: &'t str) -> Report<'t> {
        let mut report = Report {
            origin,
            text,
            secrets: Vec::new(),
        };
        for line in scan(text).iter().filter(|line| line.secret) {
            report.add_secret_text(line.value);
        }
        report
    }

    fn add_secret(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.chars().count() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
        }
    }

    /// The raw text of a secret-bearing value (quoted or not, closed or not): whole, and each
    /// string and bare word in it, but for the keys of an inline table.
    fn add_secret_text(&mut self, value: &str) {
        self.add_secret(value.trim().trim_matches(['"', '\'']));
        let mut rest = value;
        while let Some(start) = rest.find(|c: char| !(c.is_whitespace() || "[]{},=".contains(c))) {
            rest = &rest[start..];
            let (word, after) = match rest.chars().next() {
                Some(quote @ ('"' | '\'')) => {
                    let inner = &rest[1..];
                    let end = inner.find(quote).unwrap_or(inner.len());
                    (&inner[..end], inner.get(end + 1..).unwrap_or(""))
                }
                _ => {
                    let end = rest
                        .find(|c: char| c.is_whitespace() || "[]{},=".contains(c))
                        .unwrap_or(rest.len());
                    rest.split_at(end)
                }
            };
            if !after.trim_start().starts_with('=') {
                self.add_secret(word);
            }
            rest = after;
        }
    }

    /// Every scalar under a secret-bearing key of the parsed document (escapes decoded).
    fn add_secret_values<'a>(&mut self, path: &mut Vec<&'a str>, table: &'a DeTable<'_>) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().as_ref());
            if is_secret_key(path) {
                self.add_scalars(value.get_ref());
            } else if let DeValue::Table(table) = value.get_ref() {
                self.add_secret_values(path, table);
            }
            path.pop();
        }
    }

    fn add_scalars(&mut self, value: &DeValue<'_>) {
        match value {
            DeValue::String(s) => self.add_secret(s),
            DeValue::Integer(i) => self.add_secret(i.as_str()),
            DeValue::Float(f) => self.add_secret(f.as_str()),
            DeValue::Array(array) => array.iter().for_each(|v| self.add_scalars(v.get_ref())),
            DeValue::Table(table) => table.values().for_each(|v| self.add_scalars(v.get_ref())),
            DeValue::Boolean(_) | DeValue::Datetime(_) => {}
        }
    }

    fn error(mut self, mut problems: Vec<Problem>) -> ConfigError {
        problems.sort_by_key(|p| p.at.unwrap_or(usize::MAX));
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        ConfigError {
            problems: problems.iter().map(|p| self.line(p)).collect(),
        }
    }

    fn line(&self, problem: &Problem) -> String {
        let mut line = String::new();
        let position = problem.at.map(|at| {
            let (line, column) = line_column(self.text.as_bytes(), at);
            format!("{line}:{column}")
        });
        let location: Vec<&str> = self.origin.into_iter().chain(position.as_deref()).collect();
        if !location.is_empty() {
            line.push_str(&location.join(":"));
            line.push_str(": ");
        }
        if !problem.key.is_empty() {
            line.push_str(&problem.key);
            line.push_str(": ");
        }
        line.push_str(&problem.message);
        for secret in &self.secrets {
            line = line.replace(secret.as_str(), "<redacted>");
        }
        line
    }
}

/// A line of the raw text, seen without a TOML parser (the text may not parse).
struct RawLine<'t> {
    /// The key of the statement the line belongs to; a header's table for a header.
    key: Option<Vec<String>>,
    /// Whether that key (or, when it is no valid key, the text before `=`) is secret-bearing.
    secret: bool,
    /// The value text on this line.
    value: &'t str,
}

/// Splits the text into lines and finds for each the key it belongs to, following table
/// headers and statements that go on over several lines (multi-line strings and arrays). It
/// names the key of a syntax error's line, and finds secret values for [`Report`] to scrub.
fn scan(text: &str) -> Vec<RawLine<'_>> {
    let mut lines = Vec::new();
    let mut table: Vec<String> = Vec::new();
    let mut lexer = Lexer::default();
    let mut statement: (Option<Vec<String>>, bool) = (None, false);
    for line in text.split('\n') {
        if lexer.is_open() {
            lexer.scan(line);
            let (key, secret) = statement.clone();
            lines.push(RawLine {
                key,
                secret,
                value: line,
            });
            continue;
        }
        let trimmed = line.trim_start();
        if let Some(header) = trimmed.strip_prefix('[') {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("");
            table = parse_key(name).unwrap_or_default();
            lines.push(RawLine {
                key: Some(table.clone()).filter(|table| !table.is_empty()),
                secret: false,
                value: "",
            });
            continue;
        }
        let Some((raw_key, value)) = split_assignment(trimmed) else {
            lines.push(RawLine {
                key: None,
                secret: false,
                value: "",
            });
            continue;
        };
        let key = parse_key(raw_key).map(|key| [table.clone(), key].concat());
        let secret = match &key {
            Some(key) => is_secret_key(key),
            None => looks_secret(raw_key),
        };
        lexer.scan(value);
        statement = (key.clone(), secret);
        lines.push(RawLine { key, secret, value });
    }
    lines
}

/// `key = value` split at the first `=` outside quotes; `None` for a line without one.
fn split_assignment(line: &str) -> Option<(&str, &str)> {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(open), c) if c == open => quote = None,
            (None, '=') => return Some((&line[..i], &line[i + 1..])),
            (None, '#') => return None,
            _ => {}
        }
    }
    None
}

/// The parts of a dotted key (`a."b.c".d`); `None` unless the text is one.
fn parse_key(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut rest = text.trim();
    loop {
        let (part, after) = match rest.chars().next()? {
            quote @ ('"' | '\'') => {
                let inner = &rest[1..];
                let end = inner.find(quote)?;
                (&inner[..end], &inner[end + 1..])
            }
            _ => {
                let end = rest.find(|c| !is_bare(c)).unwrap_or(rest.len());
                if end == 0 {
                    return None;
                }
                rest.split_at(end)
            }
        };
        parts.push(part.to_string());
        let after = after.trim_start();
        if after.is_empty() {
            return Some(parts);
        }
        rest = after.strip_prefix('.')?.trim_start();
    }
}

/// Just enough of TOML's lexical structure to tell whether a statement goes on past its line:
/// inside a multi-line string, or an array or inline table not closed yet.
#[derive(Default)]
struct Lexer {
    string: Option<&'static str>,
    depth: usize,
}

impl Lexer {
    fn is_open(&self) -> bool {
        self.string.is_some() || self.depth > 0
    }

    fn scan(&mut self, line: &str) {
        let mut rest = line;
        loop {
            if let Some(delimiter) = self.string {
                let Some(end) = string_end(rest, delimiter) else {
                    if delimiter.len() == 1 {
                        self.string = None; // one-line strings end with their line, closed or not
                    }
                    return;
                };
                rest = &rest[end..];
                self.string = None;
            }
            let Some(i) = rest.find(['"', '\'', '[', ']', '{', '}', '#']) else {
                return;
            };
            rest = &rest[i..];
            match rest.as_bytes()[0] {
                b'#' => return,
                b'[' | b'{' => self.depth += 1,
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {
                    let delimiter = ["\"\"\"", "'''", "\"", "'"]
                        .into_iter()
                        .find(|delimiter| rest.starts_with(delimiter))
                        .unwrap_or("\"");
                    self.string = Some(delimiter);
                    rest = &rest[delimiter.len()..];
                    continue;
                }
            }
            rest = &rest[1..];
        }
    }
}

/// Just past the `delimiter` that closes a string in `text`, if it is there.
fn string_end(text: &str, delimiter: &str) -> Option<usize> {
    let escapes = delimiter.starts_with('"');
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        if escapes && c == '\\' {
            chars.next();
        } else if text[i..].starts_with(delimiter) {
            return Some(i + delimiter.len());
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> String {
        match Config::parse(text) {
            Err(e) => e.to_string(),
            Ok(config) => config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let message = problems("[socket]\npaht = \"/tmp/x\"\n");
        assert!(message.contains("paht"), "{message}");
    }

    #[test]
    fn bad_values_are_named() {
        let message = problems("[zoom]\nplan = \"gold\"\n");
        assert!(
            message.contains("gold") && message.contains("plan"),
            "{message}"
        );
        let message = problems("[delivery]\nretry_max = \"soon\"\n");
        assert!(
            message.contains("retry_max") && message.contains("duration"),
            "{message}"
        );
        let message = problems("[socket]\nmode = \"999\"\n");
        assert!(
            message.contains("mode") && message.contains("octal"),
            "{message}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let text = "[zoom]\nclient_id = \"\"\nclient_secret = \"s\"\napi_base = \"ftp:/x\"\n\
                    [delivery]\nconcurrency = 0\n[metrics]\nlisten = \"nope\"\n";
        let message = problems(text);
        for key in [
            "zoom.client_id",
            "zoom.api_base",
            "delivery.concurrency",
            "metrics.listen",
        ] {
            assert!(message.contains(key), "{key} missing from {message}");
        }
    }

    #[test]
    fn secret_never_in_debug() {
        let mut config = Config::default();
        config.set_client_secret("hunter2-very-secret");
        let debug = format!("{config:?} {:?}", config.client_secret().unwrap());
        assert!(!debug.contains("hunter2"), "{debug}");
        config.zoom.client_secret_file = Some("hunter2-as-a-path".into());
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn syntax_error_names_key_and_position_not_the_line() {
        let text = "[zoom]\nclient_id = \"x\"\nclient_secret = \"hunter2-secret\n";
        assert_eq!(
            problems(text),
            "3:32: zoom.client_secret: invalid basic string, expected `\"`"
        );
        // A statement going on over several lines keeps its key.
        let text = "[socket]\nallowed_uids = [\n  1,\n  x,\n]\n";
        assert!(problems(text).starts_with("4:3: socket.allowed_uids: "));
        let text = "[zoom]\nclient_secret = '''\nhunter2\n";
        assert!(problems(text).starts_with("4:1: zoom.client_secret: "));
        // Never the text of a line that is no key.
        let text = "[zoom]\nhunter2-pasted-alone\n";
        assert!(problems(text).starts_with("2:"), "{}", problems(text));
        assert!(!problems(text).contains("hunter2"));
    }

    #[test]
    fn type_and_value_errors_of_every_key_at_once() {
        let text = "[storage]\nmax_pending = -5\nmax_pendnig = 1\n[zoom]\nplan = \"platinum\"\n\
                    client_secret = 42424242\n[delivery]\nconcurrency = 0\n\
                    [accounts.\"acct-r\"]\nrate = 0.0\n[accounts.\"acct-x\"]\nplna = \"pro\"\n";
        let config_error = from_text(text, Some("f.toml"), true).unwrap_err();
        let mut problems = config_error.problems.iter();
        for expected in [
            "f.toml:2:15: storage.max_pending: invalid value: integer `-5`, expected u64",
            "f.toml:3:1: storage.max_pendnig: unknown field `max_pendnig`",
            "f.toml:5:8: zoom.plan: unknown variant `platinum`",
            "f.toml:6:17: zoom.client_secret: expected a string, found integer (value not shown",
            "f.toml:8:15: delivery.concurrency: expected between 1 and 10000",
            "f.toml:10:8: accounts.acct-r.rate: expected requests per second",
            "f.toml:12:1: accounts.acct-x.plna: unknown field `plna`",
            "f.toml: zoom.client_id: must be set",
        ] {
            let problem = problems.next().unwrap_or_else(|| panic!("{config_error}"));
            assert!(problem.starts_with(expected), "{problem}\n{config_error}");
        }
        assert!(problems.next().is_none(), "{config_error}");
        assert!(!config_error.to_string().contains("42424242"));
    }

    #[test]
    fn tables_and_sections() {
        for section in SECTIONS {
            Config::parse(&format!("[{section}]\n")).expect(section);
        }
        let message = problems("[nope]\n");
        let listed = SECTIONS
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>();
        assert!(message.ends_with(&listed.join(", ")), "{message}");
        assert_eq!(
            problems("zoom = \"hunter2\"\naccounts = { a = 1 }\n"),
            "1:8: zoom: expected a table, found string\n\
             2:18: accounts.a: expected a table, found integer"
        );
    }

    #[test]
    fn which_keys_are_secret() {
        for key in [
            "zoom.client_secret",
            "zoom.client_secret_file",
            "storage.client_secret",
            "cluster.nats_password",
            "cluster.nkey_seed",
            "cluster.tls.private_key",
            "secrets.anything",
            "zoom.auth_token",
        ] {
            assert!(is_secret_key(&key.split('.').collect::<Vec<_>>()), "{key}");
        }
        // None of the other keys of the example file, which has every key.
        let example = include_str!("../deploy/zoomq.example.toml").replace("\n#", "\n");
        let keys: Vec<String> = scan(&example)
            .into_iter()
            .filter(|line| line.secret)
            .filter_map(|line| line.key.map(|key| dotted(&key)))
            .collect();
        assert_eq!(keys, ["zoom.client_secret", "zoom.client_secret_file"]);
        assert!(!is_secret_key(&["accounts", "turnkey", "plan"]));
    }

    #[test]
    fn output_is_scrubbed_of_secret_values() {
        let text = "[zoom]\nclient_secret = \"hunter2-raw\\u0021\"\n\
                    [x]\napi_key = { id = \"keyid\", value = [\"hunter3\"] }\n";
        let mut report = Report::new(None, text);
        let doc = DeTable::parse(text).unwrap().into_inner();
        report.add_secret_values(&mut Vec::new(), &doc);
        let problem = Problem::new(
            "zoom.client_secret",
            "hunter2-raw\\u0021 hunter2-raw! keyid hunter3 value id",
        );
        assert_eq!(
            report.error(vec![problem]).to_string(),
            "zoom.client_secret: <redacted> <redacted> <redacted> <redacted> value id"
        );
    }

    /// The example file shows every default; uncommenting its `#key = value` lines must give
    /// exactly `Config::default()`, so the two cannot drift apart.
    #[test]
    fn example_file_shows_the_defaults() {
        let example = include_str!("../deploy/zoomq.example.toml");
        let parsed = Config::parse(example).expect("example parses");
        assert_eq!(parsed.zoom.client_id, "your-client-id");
        let uncommented: String = example
            .lines()
            .map(|line| match line.strip_prefix('#') {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => line,
            })
            .filter(|line| {
                !line.starts_with("[accounts")
                    && !line.starts_with("plan = \"business\"")
                    && !line.starts_with("rate = ")
            })
            .filter(|line| !line.starts_with("client_secret"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut all = Config::parse(&uncommented).expect("uncommented example parses");
        all.zoom.client_id.clear();
        assert_eq!(format!("{all:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn account_overrides() {
        let config = Config::parse(
            "[zoom]\nplan = \"free\"\n[accounts.\"acct-b\"]\nplan = \"business\"\n[accounts.\"acct-r\"]\nrate = 7.5\n",
        )
        .unwrap();
        assert_eq!(config.account_limit("acct-r"), 7.5);
        assert_eq!(
            config.account_rate("acct-r"),
            7.5 * config.delivery.rate_margin
        );
        assert_eq!(config.account_limit("acct-b"), 60.0);
        assert!(config.account_rate("acct-b") > 55.0 && config.account_rate("acct-b") <= 60.0);
        assert_eq!(config.account_daily_limit("other"), Some(2000));
        assert_eq!(config.account_daily_limit("acct-b"), None);
    }
}
