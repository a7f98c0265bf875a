//! The HTTP admin port: `/metrics` (Prometheus), `/healthz` (process up), `/readyz`
//! (bootstrapped and caught up with every group it hosts).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::group_lifecycle::GroupLifecycle;
use crate::metrics::Metrics;

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    lifecycle: Arc<GroupLifecycle>,
}

pub fn router(metrics: Arc<Metrics>, lifecycle: Arc<GroupLifecycle>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(HttpState { metrics, lifecycle })
}

async fn metrics_text(
    State(s): State<HttpState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.lifecycle.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not bootstrapped or catching up",
        )
    }
}
