//! Configuration: the TOML file's schema, its defaults (`sections.rs` is the one place they live,
//! `nats.rs` for `[nats]`), and validation into typed values. No other module reads environment
//! variables or secret files.
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
//!
//! Besides this file (the whole file's struct, reading it, the secret-bearing keys, per-account
//! figures): `sections.rs` the tables and every default, `check.rs` the checks of values,
//! `secret.rs` the client secret, `read.rs` reading the text, `nats.rs` the `[nats]` section.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::de::{DeString, DeTable, DeValue};
use toml::Spanned;

mod check;
mod nats;
mod read;
mod secret;
mod sections;
#[cfg(test)]
mod tests;

use self::read::*;
pub use nats::{Backend, NatsConfig};
pub use secret::{Secret, SECRET_ENV};
pub use sections::{
    AccountConfig, DeliveryConfig, MetricsConfig, SendInDoubt, SocketConfig, StorageConfig,
    ZoomConfig,
};

/// The standard socket path, used when neither `--socket` nor a config file names one.
pub const DEFAULT_SOCKET_PATH: &str = "/run/zoomq/zoomq.sock";

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
