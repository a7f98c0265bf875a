//! The `parley-operator` binary: `run` starts the controller, `crd` prints the
//! CustomResourceDefinition.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use parley_operator::controller::{self, Context};
use parley_operator::lease::{LeaderElector, RENEW_EVERY};
use parley_operator::metrics::{self, Metrics};

#[derive(Parser)]
#[command(
    name = "parley-operator",
    about = "Kubernetes operator for Parley clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (leader-elected) and serve /metrics, /healthz and /readyz.
    Run {
        /// Address of the metrics and health endpoint.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Namespace to watch; empty watches all namespaces.
        #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
        watch_namespace: String,
        /// This replica's name in the leader election (the pod name).
        #[arg(long, env = "POD_NAME", default_value = "parley-operator")]
        pod_name: String,
        /// Namespace of the leader-election Lease (the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        pod_namespace: String,
    },
    /// Print the ParleyCluster CustomResourceDefinition as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Crd => print!("{}", parley_operator::crd_yaml()?),
        Command::Run {
            metrics_addr,
            watch_namespace,
            pod_name,
            pod_namespace,
        } => run(metrics_addr, watch_namespace, pod_name, pod_namespace).await?,
    }
    Ok(())
}

async fn run(
    metrics_addr: SocketAddr,
    watch_namespace: String,
    pod_name: String,
    pod_namespace: String,
) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    // Metrics and health first: they must answer even while the API server does not.
    let server = tokio::spawn(metrics::serve(metrics_addr, metrics.clone()));
    tracing::info!(%metrics_addr, "serving /metrics, /healthz and /readyz");
    let client = kube::Client::try_default().await?;
    let leader = Arc::new(AtomicBool::new(false));
    let elector = LeaderElector::new(client.clone(), &pod_namespace, pod_name.clone());
    {
        let leader = leader.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                match elector.try_acquire().await {
                    Ok(held) => {
                        metrics.set_ready(true);
                        if held != leader.swap(held, Ordering::Relaxed) {
                            tracing::info!(leader = held, "leadership changed");
                        }
                        metrics.leader.set(i64::from(held));
                    }
                    Err(e) => {
                        // Unsure whether the lease is still ours: stop acting.
                        tracing::warn!(error = %e, "leader election: API server unreachable");
                        leader.store(false, Ordering::Relaxed);
                        metrics.leader.set(0);
                    }
                }
                tokio::time::sleep(RENEW_EVERY).await;
            }
        });
    }
    let ctx = Arc::new(Context::new(client, metrics, &pod_name, leader));
    let namespace = (!watch_namespace.is_empty()).then_some(watch_namespace);
    tokio::select! {
        _ = controller::run(ctx, namespace) => {}
        res = server => { res??; }
    }
    Ok(())
}
