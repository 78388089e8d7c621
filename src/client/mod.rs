//! The client side of the producer protocol, used by the `post`, `edit`, `send`, `delete`,
//! `status`, `stats` and `dead` subcommands: connect, send one request line, read one answer
//! line.

mod commands;
mod render;

pub use commands::{
    dead_list, dead_purge, dead_retry, delete, edit, post, stats, status, Body, Content, Message,
    Recipient,
};
pub use render::{format_dead_list, format_stats, format_status};

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long an answer may take: an edit waits for a group commit, a dead-letter list reads the
/// store; anything longer means the daemon is stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends one request and returns the daemon's answer. An `ok:false` answer becomes an error
/// carrying the daemon's code and message.
pub async fn request(
    socket: &Path,
    request: &serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    request_within(socket, request, Duration::ZERO).await
}

/// [`request`] for a request the daemon may hold up to `held` on purpose (`status` with
/// `wait`), so the answer's usual deadline is extended by that.
pub async fn request_within(
    socket: &Path,
    request: &serde_json::Value,
    held: Duration,
) -> anyhow::Result<serde_json::Value> {
    let stream = tokio::time::timeout(Duration::from_secs(10), UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow!("timed out connecting to {}", socket.display()))?
        .with_context(|| {
            format!(
                "cannot connect to the zoomq socket {} (is the daemon running?)",
                socket.display()
            )
        })?;
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    writer
        .write_all(&line)
        .await
        .context("sending the request")?;
    let mut answer = String::new();
    let read = tokio::time::timeout(
        ANSWER_TIMEOUT.saturating_add(held),
        BufReader::new(reader).read_line(&mut answer),
    )
    .await
    .map_err(|_| anyhow!("timed out waiting for the daemon's answer"))?
    .context("reading the answer")?;
    if read == 0 {
        return Err(anyhow!(
            "the daemon closed the connection without answering"
        ));
    }
    let value: serde_json::Value =
        serde_json::from_str(&answer).context("the daemon's answer is not JSON")?;
    if value["ok"] == serde_json::Value::Bool(true) {
        Ok(value)
    } else {
        Err(anyhow!(
            "{}: {}",
            value["error"].as_str().unwrap_or("error"),
            value["message"].as_str().unwrap_or("(no message)")
        ))
    }
}
