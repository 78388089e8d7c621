//! The operator HTTP endpoint on `metrics.listen`: `/metrics` (Prometheus text format),
//! `/healthz` (the process answers) and `/readyz` (storage open and producer socket bound).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::Metrics;

/// Refreshes gauges that mirror other modules' state right before a scrape.
pub type Observe = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    observe: Observe,
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    observe: Observe,
    cancel: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(Ctx {
            metrics,
            health,
            observe,
        });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

async fn metrics_handler(State(ctx): State<Ctx>) -> impl IntoResponse {
    let observe = ctx.observe.clone();
    // Observing reads sled (oldest job, size on disk): keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || observe()).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}

async fn ready_handler(State(ctx): State<Ctx>) -> impl IntoResponse {
    if ctx.health.socket_bound() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: producer socket not bound\n",
        )
    }
}
