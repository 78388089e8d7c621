//! The demo's producers' side of the daemon's socket, as a bot would write it: requests
//! pipelined on one connection without waiting for their answers (which come back in request
//! order, each once its request is durable), and single questions on a connection of their own.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One connection with requests in flight. Each request carries a tag (what the producer
/// needs to know about it); a reader task matches answers to tags in order and folds them into
/// the producer's state `S`.
pub(super) struct Pipeline<T, S> {
    writer: OwnedWriteHalf,
    sent: mpsc::UnboundedSender<T>,
    reader: JoinHandle<anyhow::Result<S>>,
}

impl<T: Send + 'static, S: Send + 'static> Pipeline<T, S> {
    /// Connects; `on_answer` gets each request's tag with its answer (`ok:false` included) and
    /// ends the pipeline with its error.
    pub async fn open(
        socket: &Path,
        mut state: S,
        mut on_answer: impl FnMut(&mut S, T, Value) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<Pipeline<T, S>> {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        let (reader, writer) = stream.into_split();
        let mut answers = BufReader::new(reader).lines();
        let (sent, mut tags) = mpsc::unbounded_channel::<T>();
        let reader = tokio::spawn(async move {
            while let Some(tag) = tags.recv().await {
                let line = answers
                    .next_line()
                    .await?
                    .context("the daemon closed the connection")?;
                let answer: Value = serde_json::from_str(&line)
                    .with_context(|| format!("the daemon's answer is not JSON: {line}"))?;
                on_answer(&mut state, tag, answer)?;
            }
            Ok(state)
        });
        Ok(Pipeline {
            writer,
            sent,
            reader,
        })
    }

    /// Writes one request; its answer reaches `on_answer` later.
    pub async fn send(&mut self, request: &Value, tag: T) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        // The reader only stops early on an error, which `finish` reports.
        let _ = self.sent.send(tag);
        Ok(())
    }

    /// Waits for every answer and returns the state they built.
    pub async fn finish(self) -> anyhow::Result<S> {
        drop(self.sent);
        self.reader.await?
    }
}

/// Sends one request on a connection of its own and returns the daemon's answer as it is,
/// `ok:false` included: the demo checks what a bot is told, errors too. A `status` may be held
/// up to its `wait`, hence the long deadline.
pub(super) async fn ask(socket: &Path, request: &Value) -> anyhow::Result<Value> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| format!("cannot connect to {}", socket.display()))?;
        let (reader, mut writer) = stream.into_split();
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        writer.write_all(&line).await?;
        let line = BufReader::new(reader)
            .lines()
            .next_line()
            .await?
            .context("the daemon closed the connection without answering")?;
        serde_json::from_str(&line)
            .with_context(|| format!("the daemon's answer is not JSON: {line}"))
    };
    tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .context("the daemon did not answer within a minute")?
}
