//! The operator's Prometheus metrics and its HTTP endpoint (`/metrics`, `/healthz`,
//! `/readyz`). Every series exists from the start, so dashboards and alerts never see a
//! missing metric on a fresh or standby operator.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every step the operator may take, as the `action` label.
pub const ACTIONS: [&str; 8] = [
    "bootstrap",
    "add_replica",
    "remove_replica",
    "transfer_leader",
    "set_node_state",
    "set_node_zone",
    "delete_pod",
    "delete_volume",
];

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounter,
    pub reconcile_errors: IntCounter,
    pub reconcile_duration: Histogram,
    pub operation_in_progress: IntGauge,
    pub actions: IntCounterVec,
    pub failovers_remaining: IntGauge,
    pub leader: IntGauge,
    pub nodes_ready: IntGauge,
    pub groups_under_replicated: IntGauge,
    pub groups_leaderless: IntGauge,
    ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            reconciliations: IntCounter::new(
                "parley_operator_reconciliations_total",
                "Reconcile passes run",
            )
            .expect("valid metric"),
            reconcile_errors: IntCounter::new(
                "parley_operator_reconcile_errors_total",
                "Reconcile passes that failed",
            )
            .expect("valid metric"),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "parley_operator_reconcile_duration_seconds",
                    "Duration of a reconcile pass",
                )
                .buckets(vec![
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
                ]),
            )
            .expect("valid metric"),
            operation_in_progress: IntGauge::new(
                "parley_operator_operation_in_progress",
                "1 while a topology operation is in flight",
            )
            .expect("valid metric"),
            actions: IntCounterVec::new(
                Opts::new("parley_operator_actions_total", "Steps taken, by action"),
                &["action"],
            )
            .expect("valid metric"),
            failovers_remaining: IntGauge::new(
                "parley_operator_failovers_remaining",
                "Failovers still allowed in the current 24 hours",
            )
            .expect("valid metric"),
            leader: IntGauge::new(
                "parley_operator_leader",
                "1 on the operator replica holding the leader lease",
            )
            .expect("valid metric"),
            nodes_ready: IntGauge::new("parley_operator_cluster_nodes_ready", "Node pods Ready")
                .expect("valid metric"),
            groups_under_replicated: IntGauge::new(
                "parley_operator_groups_under_replicated",
                "Shard groups with fewer than three live voters",
            )
            .expect("valid metric"),
            groups_leaderless: IntGauge::new(
                "parley_operator_groups_leaderless",
                "Shard groups without a leader",
            )
            .expect("valid metric"),
            ready: Arc::new(AtomicBool::new(false)),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.reconciliations.clone()),
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.operation_in_progress.clone()),
            Box::new(m.actions.clone()),
            Box::new(m.failovers_remaining.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.nodes_ready.clone()),
            Box::new(m.groups_under_replicated.clone()),
            Box::new(m.groups_leaderless.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        for a in ACTIONS {
            m.actions.with_label_values(&[a]);
        }
        m
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Marks the operator ready (it reached the API server once).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Metrics>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(m): State<Metrics>| async move {
                if m.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the API server yet",
                    )
                }
            }),
        )
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
