//! What the client-side benchmarks (`delivery`, `connections`) share: starting a
//! local cluster unless endpoints are given, registering many users, and reading a
//! process's resident memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use clap::Args;
use futures::{stream, StreamExt as _, TryStreamExt as _};
use parley_client::Credentials;
use parley_testkit::{ClusterOptions, LocalCluster};

/// Time limit for a local cluster to come up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 32;

/// Where the load goes: a local cluster started for the run, or running nodes.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Client endpoints (host:port of the nodes' WebSocket ports, comma-separated) of a
    /// running cluster on this machine; by default a local 3-node cluster is started.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Shard groups of the local cluster.
    #[arg(long, default_value_t = 8)]
    pub shard_groups: u32,
    /// The parley-node binary (default: $PARLEY_NODE_BIN, else next to this program).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Extra argument for every `parley-node run` (repeatable).
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Directory in which the run's temporary data directory is created.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
}

/// The cluster under load and how to reach it.
pub struct Cluster {
    /// `None` when `--endpoints` named a running cluster.
    pub local: Option<LocalCluster>,
    /// Client WebSocket endpoints (host:port).
    pub endpoints: Vec<String>,
}

impl Cluster {
    /// Starts a local 3-node cluster under `root`, or takes `--endpoints` (loopback only).
    pub async fn start(args: &ClusterArgs, root: &Path) -> anyhow::Result<Cluster> {
        if !args.endpoints.is_empty() {
            for endpoint in &args.endpoints {
                let host = endpoint.rsplit_once(':').map_or(&endpoint[..], |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                ensure!(loopback, "endpoint {endpoint:?} is not on loopback");
            }
            return Ok(Cluster {
                local: None,
                endpoints: args.endpoints.clone(),
            });
        }
        let local = start_local(
            args.shard_groups,
            args.node_bin.clone(),
            args.node_args.clone(),
            root,
        )
        .await?;
        let endpoints = local.client_endpoints();
        Ok(Cluster {
            local: Some(local),
            endpoints,
        })
    }

    /// Process ids of the local nodes (empty for `--endpoints`).
    pub fn pids(&self) -> Vec<(u64, u32)> {
        let Some(local) = &self.local else {
            return Vec::new();
        };
        local
            .node_ids()
            .into_iter()
            .filter_map(|id| local.pid(id).map(|pid| (id, pid)))
            .collect()
    }
}

/// Starts a local 3-node cluster with its data under `root`.
pub async fn start_local(
    shard_groups: u32,
    node_bin: Option<PathBuf>,
    node_args: Vec<String>,
    root: &Path,
) -> anyhow::Result<LocalCluster> {
    eprintln!(
        "starting 3 parley-node processes ({shard_groups} shard groups) in {}",
        root.display()
    );
    LocalCluster::start(ClusterOptions {
        nodes: 3,
        shard_groups,
        data_root: Some(root.to_path_buf()),
        node_bin,
        extra_args: node_args,
        startup_timeout: STARTUP_TIMEOUT,
        ..ClusterOptions::default()
    })
    .await
    .context("cannot start the Parley cluster")
}

/// A temporary directory for the run's data, kept (and named on stderr) if the run fails.
pub async fn with_workdir<F, Fut>(data_root: Option<&Path>, run: F) -> anyhow::Result<()>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let parent = data_root.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let workdir = tempfile::Builder::new()
        .prefix("parley-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a data directory in {}", parent.display()))?;
    let outcome = run(workdir.path().to_path_buf()).await;
    if outcome.is_err() {
        eprintln!(
            "parley-bench: data and logs kept in {}",
            workdir.keep().display()
        );
    }
    outcome
}

/// Registers `users` (device "bench"), spread over the endpoints, a few at a time.
pub async fn register_all(
    endpoints: &[String],
    users: Vec<String>,
) -> anyhow::Result<Vec<Credentials>> {
    ensure!(!endpoints.is_empty(), "no endpoints");
    stream::iter(users.into_iter().enumerate())
        .map(|(i, user)| {
            let endpoint = endpoints[i % endpoints.len()].clone();
            async move {
                parley_client::register(&endpoint, &user, "bench")
                    .await
                    .with_context(|| format!("registering {user} at {endpoint}"))
            }
        })
        .buffered(REGISTER_CONCURRENCY)
        .try_collect()
        .await
}

/// Resident memory of process `pid`, in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// A run id, so users of different runs against the same cluster never collide.
pub fn run_tag() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_rss() -> anyhow::Result<()> {
        let kib = rss_kib(std::process::id())?;
        assert!(kib > 0);
        Ok(())
    }
}
