//! The daemon inside the bench's own process: [`zoomq::run`], the code `zoomq serve` runs, on
//! the bench's tokio runtime, started on a configuration the bench made (usually
//! [`zoomq::sandbox::Sandbox::daemon_config`]) and stopped by cancelling it, which is its
//! graceful shutdown. Shared by the benches that measure the daemon without a process
//! boundary (enqueue, drain's in-process scenarios).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use zoomq::config::Config;

/// A daemon running on this process's runtime.
pub struct Embedded {
    pub socket: PathBuf,
    /// Stops the daemon; [`Embedded::stop`] fires it and waits for the graceful shutdown.
    cancel: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Embedded {
    /// Validates `config`, binds its socket, runs the daemon on a task of this runtime and
    /// waits until it answers a ping: it accepts only once its queue is open.
    pub async fn start(config: Config) -> anyhow::Result<Embedded> {
        config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let socket = config.socket.path.clone();
        let listener = zoomq::bind_socket(&config.socket)?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(zoomq::run(config, listener, cancel.clone()));
        zoomq::client::request(&socket, &json!({"op": "ping"}))
            .await
            .context("the daemon did not answer a ping")?;
        Ok(Embedded {
            socket,
            cancel,
            task,
        })
    }

    /// The daemon's `stats` answer.
    pub async fn stats(&self) -> anyhow::Result<Value> {
        zoomq::client::request(&self.socket, &json!({"op": "stats"})).await
    }

    /// Cancels the daemon and waits until its shutdown is done.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await?
    }
}
