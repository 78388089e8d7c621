//! The client side of the producer protocol, used by the `send`, `stats` and `dead`
//! subcommands: connect, send one request line, read one answer line.

mod render;

pub use render::{format_dead_list, format_stats};

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Sends one request and returns the daemon's answer. An `ok:false` answer becomes an error
/// carrying the daemon's code and message.
pub async fn request(
    socket: &Path,
    request: &serde_json::Value,
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
        Duration::from_secs(60),
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
