//! Configuration: the TOML file's schema, its defaults (this file is the one place they live), and
//! validation into typed values. No other module reads environment variables or secret files.
//!
//! Parsing is two steps, as in ripgrep's `LowArgs → HiArgs`: serde reads the file into plain
//! structs that reject unknown keys, then [`Config::validate`] checks every value and collects
//! *every* problem, each naming its key, so `zoomq check-config` can print them all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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
            .field("client_secret_file", &self.client_secret_file)
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
            concurrency: 32,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
            shutdown_timeout: Duration::from_secs(10),
            account_idle: Duration::from_secs(600),
            rate_margin: 0.97,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".into(),
            per_account_series: 0,
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

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("cannot read {}: {e}", path.display())))?;
        let config = Config::parse(&text)
            .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; unknown keys and values of the wrong type are errors naming the key.
    pub fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every value, returning all problems found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        need(
            !self.socket.path.as_os_str().is_empty(),
            "socket.path: must not be empty",
        );
        need(
            self.socket.mode <= 0o777,
            "socket.mode: expected an octal file mode such as \"0660\"",
        );
        need(
            self.socket.max_connections >= 1,
            "socket.max_connections: expected at least 1",
        );
        need(
            (1024..=64 * 1024 * 1024).contains(&self.socket.max_line_bytes),
            "socket.max_line_bytes: expected between 1024 and 67108864",
        );
        need(
            self.socket.max_pipelined >= 1,
            "socket.max_pipelined: expected at least 1",
        );
        need(
            !self.socket.write_timeout.is_zero(),
            "socket.write_timeout: expected a positive duration",
        );
        need(
            !self.storage.path.as_os_str().is_empty(),
            "storage.path: must not be empty",
        );
        need(
            self.storage.max_pending >= 1,
            "storage.max_pending: expected at least 1",
        );
        need(
            self.storage.cache_capacity >= 1024 * 1024,
            "storage.cache_capacity: expected at least 1048576 bytes",
        );
        for (key, url) in [
            ("zoom.api_base", &self.zoom.api_base),
            ("zoom.token_url", &self.zoom.token_url),
        ] {
            if let Err(e) = reqwest::Url::parse(url) {
                problems.push(format!("{key}: expected an http(s) URL, got {url:?} ({e})"));
            } else if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!("{key}: expected an http(s) URL, got {url:?}"));
            }
        }
        if self.zoom.client_id.is_empty() {
            problems.push("zoom.client_id: must be set to the app's client id".into());
        }
        if self.zoom.client_secret.is_some() && self.zoom.client_secret_file.is_some() {
            problems.push(
                "zoom.client_secret_file: set either zoom.client_secret or zoom.client_secret_file, not both"
                    .into(),
            );
        }
        if let Err(e) = self.client_secret() {
            problems.push(e);
        }
        let mut need = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        need(
            !self.zoom.connect_timeout.is_zero(),
            "zoom.connect_timeout: expected a positive duration",
        );
        need(
            !self.zoom.request_timeout.is_zero(),
            "zoom.request_timeout: expected a positive duration",
        );
        need(
            (1..=10_000).contains(&self.delivery.concurrency),
            "delivery.concurrency: expected between 1 and 10000",
        );
        need(
            !self.delivery.retry_initial.is_zero(),
            "delivery.retry_initial: expected a positive duration",
        );
        need(
            self.delivery.retry_max >= self.delivery.retry_initial,
            "delivery.retry_max: expected at least delivery.retry_initial",
        );
        need(
            !self.delivery.max_age.is_zero(),
            "delivery.max_age: expected a positive duration",
        );
        need(
            self.delivery.rate_margin > 0.0 && self.delivery.rate_margin <= 1.0,
            "delivery.rate_margin: expected a number above 0 and at most 1",
        );
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "metrics.listen: expected an address such as \"127.0.0.1:9464\" (or \"\" to disable), got {:?}",
                self.metrics.listen
            ));
        }
        for (account, settings) in &self.accounts {
            if let Some(rate) = settings.rate {
                if !(rate > 0.0 && rate <= 10_000.0) {
                    problems.push(format!(
                        "accounts.\"{account}\".rate: expected requests per second above 0 and at most 10000, got {rate}"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }

    /// The Zoom client secret, from (in order) `zoom.client_secret`, `zoom.client_secret_file`,
    /// the systemd credential `$CREDENTIALS_DIRECTORY/client_secret`, or `$ZOOMQ_CLIENT_SECRET`.
    /// Errors never contain the secret.
    pub fn client_secret(&self) -> Result<Secret, String> {
        if let Some(secret) = &self.zoom.client_secret {
            return non_empty(secret.clone(), "zoom.client_secret");
        }
        if let Some(path) = &self.zoom.client_secret_file {
            return read_secret_file(path, "zoom.client_secret_file");
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let path = Path::new(&dir).join("client_secret");
            if path.exists() {
                return read_secret_file(&path, "systemd credential client_secret");
            }
        }
        if let Ok(secret) = std::env::var(SECRET_ENV) {
            return non_empty(secret, SECRET_ENV);
        }
        Err(format!(
            "zoom.client_secret: not set; set zoom.client_secret or zoom.client_secret_file, \
             pass the systemd credential client_secret, or set {SECRET_ENV}"
        ))
    }

    /// Sets the secret directly (the demo and tests use this).
    pub fn set_client_secret(&mut self, secret: &str) {
        self.zoom.client_secret = Some(secret.to_string());
        self.zoom.client_secret_file = None;
    }

    /// The rate (requests per second) the daemon allows itself on an account, before adaptive
    /// decrease, with the safety margin applied to plan rates (explicit rates are taken as is).
    pub fn account_rate(&self, account_id: &str) -> f64 {
        match self.accounts.get(account_id) {
            Some(AccountConfig {
                rate: Some(rate), ..
            }) => *rate,
            Some(AccountConfig {
                plan: Some(plan), ..
            }) => f64::from(plan.per_second()) * self.delivery.rate_margin,
            _ => f64::from(self.zoom.plan.per_second()) * self.delivery.rate_margin,
        }
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

fn non_empty(secret: String, source: &str) -> Result<Secret, String> {
    if secret.is_empty() {
        Err(format!("{source}: the client secret is empty"))
    } else {
        Ok(Secret(secret))
    }
}

fn read_secret_file(path: &Path, source: &str) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{source}: cannot read {}: {e}", path.display()))?;
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
        assert_eq!(config.account_rate("acct-r"), 7.5);
        assert!(config.account_rate("acct-b") > 55.0 && config.account_rate("acct-b") <= 60.0);
        assert_eq!(config.account_daily_limit("other"), Some(2000));
        assert_eq!(config.account_daily_limit("acct-b"), None);
    }
}
