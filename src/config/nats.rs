//! The cluster mode's settings: `storage.backend` and the `[nats]` table, their defaults and
//! their checks. Every daemon of a deployment has the same `[nats]` (and `[zoom]`, accounts).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::read::Problem;
use super::sections::de_duration;
use super::Config;

/// Where the queue lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Embedded: a sled database under `storage.path`, one daemon.
    #[default]
    Sled,
    /// NATS JetStream: several daemons as one service (`[nats]`).
    Nats,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// The NATS servers, `nats://host:port` (or `tls://`); the client finds the others.
    pub servers: Vec<String>,
    /// The first part of every stream, bucket and subject name zoomq uses, so that several
    /// deployments can share one NATS.
    pub prefix: String,
    /// Copies JetStream keeps of everything (a quorum of them must store a write before it is
    /// acknowledged); 1 only for a single-node NATS.
    pub replicas: usize,
    /// How long an account's owner may be silent before another daemon takes its accounts
    /// over. A failover takes about this plus a fifth of it plus 1.1 s.
    #[serde(deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// A NATS credentials file (JWT and seed), if the servers ask for one.
    pub credentials_file: Option<PathBuf>,
    /// The CA that signed the servers' certificates (TLS is required when set).
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: Vec::new(),
            prefix: "zoomq".into(),
            replicas: 3,
            lease_ttl: Duration::from_secs(5),
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl NatsConfig {
    /// Whether TLS is asked for, by a `tls://` server or a TLS file.
    pub fn wants_tls(&self) -> bool {
        self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.servers.iter().any(|s| s.starts_with("tls://"))
    }
}

/// The checks of `storage.backend` and `[nats]`. The `[nats]` table is checked whenever it is
/// set, so a mistake shows before the day the backend is switched.
pub(super) fn check(config: &Config, problems: &mut Vec<Problem>) {
    let nats = &config.nats;
    if config.storage.backend == Backend::Nats && nats.servers.is_empty() {
        problems.push(Problem::new(
            "nats.servers",
            "storage.backend = \"nats\" needs the NATS servers, such as \
             [\"nats://10.0.0.1:4222\", \"nats://10.0.0.2:4222\", \"nats://10.0.0.3:4222\"]",
        ));
    }
    for server in &nats.servers {
        if let Err(message) = check_server(server) {
            problems.push(Problem::new("nats.servers", message));
        }
    }
    let prefix_ok = !nats.prefix.is_empty()
        && nats.prefix.len() <= 32
        && nats
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !prefix_ok {
        problems.push(Problem::new(
            "nats.prefix",
            format!(
                "expected 1 to 32 letters, digits, '_' or '-' (it begins stream and subject \
                 names), got {:?}",
                nats.prefix
            ),
        ));
    }
    if !(1..=5).contains(&nats.replicas) {
        problems.push(Problem::new(
            "nats.replicas",
            format!(
                "expected 1 to 5 (JetStream's range; 3 for a 3-node cluster), got {}",
                nats.replicas
            ),
        ));
    }
    if !(Duration::from_secs(2)..=Duration::from_secs(300)).contains(&nats.lease_ttl) {
        problems.push(Problem::new(
            "nats.lease_ttl",
            "expected between 2s and 5m (shorter: a slow NATS round trip loses the lease; \
             longer: a failover waits that long)",
        ));
    }
    if nats.tls_cert_file.is_some() != nats.tls_key_file.is_some() {
        problems.push(Problem::new(
            "nats.tls_key_file",
            "set both nats.tls_cert_file and nats.tls_key_file, or neither",
        ));
    }
    // The paths of secret files are not shown: a secret pasted there by mistake would be.
    let files = [
        ("nats.credentials_file", &nats.credentials_file, false),
        ("nats.tls_ca_file", &nats.tls_ca_file, true),
        ("nats.tls_cert_file", &nats.tls_cert_file, true),
        ("nats.tls_key_file", &nats.tls_key_file, false),
    ];
    for (key, path, show) in files {
        if let Some(path) = path {
            if let Err(e) = std::fs::File::open(path) {
                let what = if show {
                    path.display().to_string()
                } else {
                    "the file it names".into()
                };
                problems.push(Problem::new(key, format!("cannot read {what}: {e}")));
            }
        }
    }
}

/// A server URL as it may be shown: a URL may carry a user and password, so what comes before
/// '@' never is.
pub fn shown_server(server: &str) -> String {
    match server.rsplit_once('@') {
        Some((scheme_user, host)) => {
            let scheme = scheme_user.split_once("://").map_or("", |(s, _)| s);
            format!("{scheme}://<user>@{host}")
        }
        None => server.to_string(),
    }
}

impl NatsConfig {
    /// The servers as they may be logged (see [`shown_server`]).
    pub fn shown_servers(&self) -> Vec<String> {
        self.servers.iter().map(|s| shown_server(s)).collect()
    }
}

fn check_server(server: &str) -> Result<(), String> {
    let shown = || shown_server(server);
    let rest = ["nats://", "tls://"]
        .iter()
        .find_map(|scheme| server.strip_prefix(scheme))
        .ok_or_else(|| {
            format!(
                "expected a server URL such as \"nats://10.0.0.1:4222\" (or tls://), got {:?}",
                shown()
            )
        })?;
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let port_ok = host_port
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!(
            "expected host:port after the scheme, such as \"nats://10.0.0.1:4222\", got {:?}",
            shown()
        ));
    }
    Ok(())
}
