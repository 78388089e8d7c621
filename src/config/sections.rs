//! The file's sections: one struct per table (`[nats]` has a file of its own), what each key
//! means, and its default; and the two notations values are written in besides TOML's own:
//! durations (`"250ms"`) and octal file modes (`"0660"`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{Backend, DEFAULT_SOCKET_PATH};
use crate::plan::Plan;

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
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
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

pub(super) fn de_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Duration, D::Error> {
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
