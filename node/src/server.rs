//! Assembles a node: storage, replicas, services, background loops, and a graceful
//! shutdown that hands leaderships to other voters before stopping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use parley_proto::node::v1::admin_server::AdminServer;
use parley_proto::node::v1::conversation_log_server::ConversationLogServer;
use parley_proto::node::v1::raft_transport_server::RaftTransportServer;

use crate::admin::AdminService;
use crate::cluster::Cluster;
use crate::config::NodeConfig;
use crate::conversation::ConversationService;
use crate::group_lifecycle::GroupLifecycle;
use crate::metrics::Metrics;
use crate::replicas::Replicas;
use crate::storage::Engine;
use crate::transport::{Faults, PeerPool, RaftTransportService};

/// Largest gRPC message accepted (a maximal payload plus framing).
const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let raft_config = Arc::new(config.raft_config()?);
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::open(&config.data_dir, metrics.clone()).context("opening storage")?;
    let pool = PeerPool::new(config.node_id, Arc::new(Faults::default()));
    let replicas = Replicas::open(config.node_id, engine, pool, raft_config)
        .await
        .context("opening replicas")?;
    let cluster = Cluster::new(config.clone(), replicas.clone(), metrics.clone());
    let lifecycle = GroupLifecycle::new(cluster.clone());
    tokio::spawn(lifecycle.clone().run());

    let grpc_addr = config.listen.parse().context("listen address")?;
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(
            RaftTransportServer::new(RaftTransportService {
                replicas: replicas.clone(),
            })
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            ConversationLogServer::new(ConversationService {
                cluster: cluster.clone(),
            })
            .max_decoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(AdminServer::new(AdminService {
            cluster: cluster.clone(),
            lifecycle: lifecycle.clone(),
        }));
    let http_listener = tokio::net::TcpListener::bind(&config.http)
        .await
        .with_context(|| format!("binding {}", config.http))?;
    let http = axum::serve(http_listener, crate::http::router(metrics, lifecycle));
    tracing::info!(node = config.node_id, grpc = %config.listen, http = %config.http, "node started");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let grpc_task = tokio::spawn(grpc.serve_with_shutdown(grpc_addr, async move {
        let _ = grpc_stop.wait_for(|s| *s).await;
    }));
    let mut http_stop = stop_rx;
    let http_task = tokio::spawn(async move {
        http.with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        })
        .await
    });

    shutdown.await;
    tracing::info!("shutting down: handing leaderships to other voters");
    hand_off_leaderships(&cluster, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    replicas.shutdown().await;
    let _ = grpc_task.await;
    let _ = http_task.await;
    replicas.engine().sync_now().context("final WAL sync")?;
    tracing::info!("node stopped");
    Ok(())
}

/// Transfers leadership of every group this node leads to another voter, and waits
/// (bounded) until they have moved, so clients see no election timeout.
async fn hand_off_leaderships(cluster: &Cluster, limit: Duration) {
    let me = cluster.node_id();
    let deadline = Instant::now() + limit;
    for (group, raft) in cluster.replicas.hosted() {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            continue;
        }
        // Prefer the most caught-up other voter.
        let target = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != me)
            .max_by_key(|v| {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(v).cloned().flatten())
                    .map(|l| l.index)
            });
        if let Some(to) = target {
            let _ = raft.trigger().transfer_leader(to).await;
            tracing::info!(group, to, "leadership handed off");
        }
    }
    while Instant::now() < deadline {
        let still = cluster
            .replicas
            .hosted()
            .iter()
            .filter(|(_, r)| r.metrics().borrow_watched().state == ServerState::Leader)
            .count();
        if still == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
