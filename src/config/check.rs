//! The checks of values, after every key parsed: each problem names its key, and all of them
//! are found in one go (the `[nats]` section's checks are in `nats.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use super::read::{dotted, Problem};
use super::{nats, Config, ConfigError};

impl Config {
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

    pub(super) fn check_values(&self) -> Vec<Problem> {
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
}
