//! The Zoom client secret: a string that never shows in `Debug`, and where it is found (the
//! configuration, a file it names, a systemd credential, an environment variable). Errors never
//! contain the secret, nor the path of the file that holds it.

use std::fmt;
use std::path::Path;

use super::read::Problem;
use super::Config;

/// Environment variable that may carry the Zoom client secret.
pub const SECRET_ENV: &str = "ZOOMQ_CLIENT_SECRET";

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

impl Config {
    /// The Zoom client secret, from (in order) `zoom.client_secret`, `zoom.client_secret_file`,
    /// the systemd credential `$CREDENTIALS_DIRECTORY/client_secret`, or `$ZOOMQ_CLIENT_SECRET`.
    /// Errors never contain the secret, nor the path `zoom.client_secret_file` names.
    pub fn client_secret(&self) -> Result<Secret, String> {
        self.find_client_secret()
            .map_err(|p| format!("{}: {}", p.key, p.message))
    }

    pub(super) fn find_client_secret(&self) -> Result<Secret, Problem> {
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
