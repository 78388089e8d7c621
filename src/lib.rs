//! zoomq: a durable, rate-limited delivery daemon for Zoom chat-bot message edits.
//!
//! Layout (ARCHITECTURE.md has the full map and an edit's way from socket to Zoom):
//! - [`config`]: the TOML schema, defaults and validation; [`plan`]: Zoom's rate table.
//! - [`protocol`]: the producer line protocol; [`ingest`]: the Unix-socket server.
//! - [`queue`]: the durable coalescing queue (the only module that touches sled).
//! - [`dispatch`]: fair per-account dispatch, [`limiter`]: per-account pacing,
//!   [`retry`]: the retry delay policy, [`zoom`]: the HTTP client and token.
//! - [`metrics`], [`http`], [`health`], [`systemd`]: what operators see.
//! - [`client`]: the CLI's side of the protocol; [`sandbox`]: a local fake Zoom; [`demo`].
#![deny(unsafe_code)]

pub mod client;
pub mod config;
pub mod demo;
pub mod dispatch;
pub mod health;
pub mod http;
pub mod ingest;
pub mod limiter;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod queue;
pub mod retry;
pub mod sandbox;
pub mod systemd;
pub mod zoom;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::queue::Queue;

/// Binds the producer socket at `socket.path` with `socket.mode`, replacing a stale socket
/// file left by a crashed daemon but refusing to steal one a live daemon is serving.
pub fn bind_socket(
    config: &config::SocketConfig,
) -> anyhow::Result<std::os::unix::net::UnixListener> {
    let path = &config.path;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| {
            format!("cannot create the socket's directory {}", parent.display())
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another process is serving the socket {}; is zoomq already running?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot bind the producer socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

/// Runs the daemon until `cancel` fires, then shuts down gracefully: stop accepting, let
/// in-flight work finish (bounded by `delivery.shutdown_timeout`), commit, return.
pub async fn run(
    config: Config,
    listener: std::os::unix::net::UnixListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let storage = config.storage.clone();
    let queue_metrics = metrics.clone();
    let zoom_settings = zoom::ZoomSettings::from_config(&config)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let zoom = zoom::ZoomClient::new(zoom_settings, metrics.clone(), health.clone())
        .context("cannot build the Zoom client")?;
    let (queue, ready_rx, recovery) =
        tokio::task::spawn_blocking(move || Queue::open(&storage, queue_metrics))
            .await?
            .with_context(|| {
                format!("cannot open the queue in {}", config.storage.path.display())
            })?;
    tracing::info!(
        pending = recovery.pending,
        dead = recovery.dead,
        superseded = recovery.superseded,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "queue recovered"
    );

    let tracker = TaskTracker::new();
    let http_cancel = CancellationToken::new();
    if !config.metrics.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics.listen)
            .await
            .with_context(|| {
                format!("cannot listen on metrics.listen {}", config.metrics.listen)
            })?;
        let observe_queue = queue.clone();
        let observe: http::Observe = Arc::new(move || observe_queue.observe());
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            observe,
            http_cancel.clone(),
        ));
    }

    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    health.set_socket_bound(true);
    let ingest = Arc::new(ingest::Ingest {
        queue: queue.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        config: config.socket.clone(),
    });
    let ingest_cancel = cancel.child_token();
    let ingest_task = tokio::spawn(ingest.serve(listener, ingest_cancel, tracker.clone()));
    let dispatcher = dispatch::Dispatcher::new(
        queue.clone(),
        ready_rx,
        zoom,
        limiter::Limiters::from_config(&config),
        dispatch::DispatchSettings {
            concurrency: config.delivery.concurrency,
            retry: retry::RetryPolicy {
                initial: config.delivery.retry_initial,
                max: config.delivery.retry_max,
            },
            max_age: config.delivery.max_age,
            shutdown_timeout: config.delivery.shutdown_timeout,
            per_account_series: config.metrics.per_account_series,
        },
        metrics.clone(),
        health.clone(),
    );
    let dispatch_cancel = CancellationToken::new();
    let dispatch_task = tokio::spawn(dispatcher.run(dispatch_cancel.clone()));
    let supervisor = tokio::spawn(supervise(queue.clone(), health.clone(), cancel.clone()));
    systemd::notify_ready(&status_line(&queue));
    tracing::info!(socket = %config.socket.path.display(), "zoomq is ready");

    cancel.cancelled().await;
    systemd::notify_stopping();
    tracing::info!("shutting down");
    // 1. Stop accepting and answer what producers already sent.
    let _ = ingest_task.await;
    tracker.close();
    if tokio::time::timeout(config.delivery.shutdown_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("producer connections did not finish in time");
    }
    health.set_socket_bound(false);
    // 2. Stop dispatching; in-flight requests finish (bounded) and their outcomes are stored.
    dispatch_cancel.cancel();
    let _ = dispatch_task.await;
    let _ = supervisor.await;
    http_cancel.cancel();
    tokio::task::spawn_blocking(move || queue.close()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Keeps systemd informed: a STATUS line with the backlog every few seconds, and watchdog
/// pings only while the dispatcher loop keeps turning (it turns at least once a second), so a
/// wedged daemon is restarted.
async fn supervise(queue: Queue, health: Arc<Health>, cancel: CancellationToken) {
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog
        .map(|interval| interval / 3)
        .unwrap_or(std::time::Duration::from_secs(5))
        .min(std::time::Duration::from_secs(5));
    let mut ticker = tokio::time::interval(tick);
    // The first tick is immediate; start measuring progress from there.
    ticker.tick().await;
    let mut last_turns = health.dispatcher_turns();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = cancel.cancelled() => return,
        }
        systemd::notify_status(&status_line(&queue));
        let turns = health.dispatcher_turns();
        if watchdog.is_some() {
            if turns != last_turns {
                systemd::notify_watchdog();
            } else {
                tracing::error!("the dispatcher made no progress; withholding the watchdog ping");
            }
        }
        last_turns = turns;
    }
}

/// The one-line summary systemd shows in `systemctl status`.
fn status_line(queue: &Queue) -> String {
    let stats = queue.stats();
    format!(
        "{} pending, {} in flight, {} dead",
        stats.pending, stats.in_flight, stats.dead
    )
}

/// Removes the socket file at shutdown if it is still ours.
pub fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}
