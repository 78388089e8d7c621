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

pub mod backend;
pub mod client;
pub mod cluster;
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
pub mod testkit;
pub mod zoom;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Queue;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::queue::LocalQueue;

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

/// The longest a stop waits for producers' outstanding answers and in-flight requests to Zoom
/// before it closes those connections and abandons those requests.
///
/// It is the bulk of the stop's budget: SIGTERM to exit within 2 s whatever hangs (Zoom, its
/// token endpoint, a producer that does not read). Stopping to accept, to read and to claim
/// is immediate; then answers and requests get this grace, both at once; what is left is
/// dropped at once (no edit is lost: an abandoned request's job is still on disk and pending
/// again after the restart; an unanswered producer sends its edit again); then the queue
/// commits what the grace recorded (one group commit, milliseconds) and the runtime is torn
/// down without waiting for stuck blocking calls (`main.rs`). That leaves most of a second
/// for the commit's fsync on a busy disk. systemd's `TimeoutStopSec=` (deploy/systemd) is
/// kept well above the whole.
pub const SHUTDOWN_GRACE_MAX: Duration = Duration::from_secs(1);

/// The grace of a stop: `delivery.shutdown_timeout`, at most [`SHUTDOWN_GRACE_MAX`]. Waiting
/// longer for a request would only spare Zoom a second copy of an idempotent edit.
pub fn shutdown_grace(config: &Config) -> Duration {
    config.delivery.shutdown_timeout.min(SHUTDOWN_GRACE_MAX)
}

/// Runs the daemon until `cancel` fires, then shuts down gracefully: stop accepting, reading
/// and claiming; give outstanding answers and in-flight requests [`shutdown_grace`]; close the
/// connections and abandon the requests still unfinished; commit; return.
pub async fn run(
    config: Config,
    listener: std::os::unix::net::UnixListener,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let storage = config.storage.clone();
    let opened: Arc<std::sync::OnceLock<Queue>> = Arc::default();
    let queue_metrics = metrics.clone();
    let zoom_settings = zoom::ZoomSettings::from_config(&config)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let zoom = zoom::ZoomClient::new(zoom_settings, metrics.clone(), health.clone())
        .context("cannot build the Zoom client")?;
    let tracker = TaskTracker::new();
    let http_cancel = CancellationToken::new();
    let mut http_task = None;
    if !config.metrics.listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics.listen)
            .await
            .with_context(|| {
                format!("cannot listen on metrics.listen {}", config.metrics.listen)
            })?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        // Served from the start: /readyz says "not ready" while the queue opens (in the
        // cluster mode, while NATS does not answer yet).
        let observe_queue = opened.clone();
        let observe: http::Observe = Arc::new(move || {
            if let Some(queue) = observe_queue.get() {
                queue.observe();
            }
        });
        http_task = Some(tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            observe,
            http_cancel.clone(),
        )));
    }

    let (queue, ready_rx) = match config.storage.backend {
        // The index is rebuilt in the background from here on (the queue logs "queue
        // recovered" when done); edits are accepted and restored jobs delivered meanwhile.
        config::Backend::Sled => {
            let (queue, ready_rx) =
                tokio::task::spawn_blocking(move || LocalQueue::open(&storage, queue_metrics))
                    .await?
                    .with_context(|| {
                        format!("cannot open the queue in {}", config.storage.path.display())
                    })?;
            (Queue::Local(queue), ready_rx)
        }
        // Retries until NATS answers; partitions are taken over in the background.
        config::Backend::Nats => {
            systemd::notify_status("joining the cluster (waiting for NATS)");
            match cluster::Cluster::start(&config, queue_metrics, &cancel).await {
                Ok((cluster, ready_rx)) => (Queue::Cluster(cluster), ready_rx),
                // Stopped while NATS did not answer: nothing was accepted, nothing to save.
                Err(_) if cancel.is_cancelled() => {
                    http_cancel.cancel();
                    tracing::info!("stopped before joining the cluster");
                    return Ok(());
                }
                Err(e) => return Err(e.context("cannot join the cluster")),
            }
        }
    };

    let _ = opened.set(queue.clone());

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
    let connections_abort = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest.serve(
        listener,
        ingest_cancel,
        connections_abort.clone(),
        tracker.clone(),
    ));
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
            shutdown_grace: shutdown_grace(&config),
            per_account_series: config.metrics.per_account_series,
            send_in_doubt: config.delivery.send_in_doubt,
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
    let grace = shutdown_grace(&config);
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
    let deadline = tokio::time::Instant::now() + grace;
    // 1. Stop at once: accepting and reading producers' lines (`cancel`), claiming jobs, and
    //    accepting scrapes. /readyz says not ready from now on.
    health.set_socket_bound(false);
    dispatch_cancel.cancel();
    http_cancel.cancel();
    let _ = ingest_task.await;
    tracker.close();
    // 2. Within the grace, both at once: producers get the answers to what they already sent,
    //    in-flight requests finish and their outcomes are recorded. Then connections still
    //    open are closed and requests still running are abandoned (see `dispatch`).
    let connections = async {
        if tokio::time::timeout_at(deadline, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = tracker.len(),
                "closing producer connections whose answers were not all sent in time"
            );
            connections_abort.cancel();
            tracker.wait().await;
        }
    };
    let (_, dispatched) = tokio::join!(connections, dispatch_task);
    if let Err(e) = dispatched {
        tracing::error!(error = %e, "the dispatcher failed");
    }
    let _ = supervisor.await;
    if let Some(http_task) = http_task {
        // A scrape still running now is cut off.
        http_task.abort();
        let _ = http_task.await;
    }
    // 3. Commit everything recorded (acknowledged edits were committed before their answer).
    queue.close().await;
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
