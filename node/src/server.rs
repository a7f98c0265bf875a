//! Assembles a node: storage, replicas, services, background loops, and a graceful
//! shutdown that hands leaderships to other voters before stopping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use parley_proto::node::v1::admin_server::AdminServer;
use parley_proto::node::v1::conversation_log_server::ConversationLogServer;
use parley_proto::node::v1::delivery_server::DeliveryServer;
use parley_proto::node::v1::raft_transport_server::RaftTransportServer;

use crate::accounts::Accounts;
use crate::admin::AdminService;
use crate::cluster::Cluster;
use crate::config::NodeConfig;
use crate::conversation::ConversationService;
use crate::delivery::{CloseReason, Delivery, DeliveryService};
use crate::gateway::Gateway;
use crate::group_lifecycle::GroupLifecycle;
use crate::messaging::Messaging;
use crate::metrics::Metrics;
use crate::replicas::Replicas;
use crate::router::Router;
use crate::storage::Engine;
use crate::transport::{Faults, PeerPool, RaftTransportService};
use crate::transport::{CONNECTION_WINDOW, STREAM_WINDOW};

/// Largest gRPC message accepted (a maximal payload plus framing).
const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let tokens = match &config.token_key_file {
        Some(path) => Some(crate::tokens::TokenAuthority::from_pem_file(
            path,
            Duration::from_secs(config.token_ttl_secs),
        )?),
        None => None,
    };
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

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let log = ConversationService::new(cluster.clone(), stop_rx.clone());
    let router = Router::new(cluster.clone());
    tokio::spawn(router.clone().run_probes());
    let delivery = Delivery::new(cluster.clone(), router.clone());

    let grpc_addr = config.listen.parse().context("listen address")?;
    let grpc = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Many appends share one stream or connection; the 64 KiB HTTP/2 default window
        // would stall them behind flow control.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .add_service(
            RaftTransportServer::new(RaftTransportService {
                replicas: replicas.clone(),
                stopping: stop_rx.clone(),
            })
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            ConversationLogServer::from_arc(log.clone())
                .max_decoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(
            DeliveryServer::new(DeliveryService {
                delivery: delivery.clone(),
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
    let http = axum::serve(
        http_listener,
        crate::http::router(metrics.clone(), lifecycle),
    );
    let client_task = match tokens {
        Some(tokens) if !config.client_listen.is_empty() => {
            let accounts = Accounts::new(log.clone(), tokens);
            let messaging = Messaging::new(
                log.clone(),
                accounts.clone(),
                delivery.clone(),
                config.rate_limit_per_s,
                config.rate_limit_burst,
            );
            let trim = messaging.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    trim.trim_rate_limits();
                }
            });
            let gw = Arc::new(Gateway {
                config: config.clone(),
                accounts,
                messaging,
                delivery: delivery.clone(),
                router: router.clone(),
                metrics: metrics.clone(),
                shutdown: stop_rx.clone(),
            });
            let listener = tokio::net::TcpListener::bind(&config.client_listen)
                .await
                .with_context(|| format!("binding {}", config.client_listen))?;
            let mut client_stop = stop_rx.clone();
            let app = crate::gateway::routes(gw);
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = client_stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        _ => None,
    };
    tracing::info!(node = config.node_id, grpc = %config.listen, http = %config.http,
        client = %config.client_listen, "node started");

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
    // Stop being anyone's home, then close client sessions: clients reconnect to other
    // nodes (peers see this node as leaving at their next probe) and sync.
    router.leave();
    let sessions = delivery.close_all(CloseReason::ShuttingDown);
    tracing::info!(
        sessions,
        "shutting down: sessions closed, handing leaderships to other voters"
    );
    hand_off_leaderships(&cluster, Duration::from_secs(10)).await;
    let _ = stop_tx.send(true);
    replicas.shutdown().await;
    // Peers may hold streams open; they are ended above, but never wait on them forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http_task).await;
    if let Some(t) = client_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
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
