//! The `parley-node` binary: `run` starts a node; `admin` drives a running cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use parley_node::config::NodeConfig;
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::*;

/// Rust allocations of the node go through mimalloc (RocksDB's own C++ allocations
/// do not): under load glibc's malloc and free cost several percent of the CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "parley-node", version, about = "Parley server node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run(Box<RunArgs>),
    /// Administer a running cluster through one of its nodes.
    Admin(AdminArgs),
    /// Write a new Ed25519 client-token signing key (PKCS#8 PEM) to PATH; refuses to
    /// overwrite an existing file.
    GenTokenKey { path: PathBuf },
}

/// Flags override the TOML file, which overrides the defaults.
#[derive(Args)]
struct RunArgs {
    /// TOML configuration file (fields as in docs/architecture.md, "Configuration").
    #[arg(long, env = "PARLEY_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "PARLEY_NODE_ID")]
    node_id: Option<u64>,
    /// gRPC listen address, ip:port.
    #[arg(long, env = "PARLEY_LISTEN")]
    listen: Option<String>,
    /// Address peers use to reach this node, host:port.
    #[arg(long, env = "PARLEY_ADVERTISE")]
    advertise: Option<String>,
    /// HTTP admin address (metrics, health), ip:port.
    #[arg(long, env = "PARLEY_HTTP")]
    http: Option<String>,
    #[arg(long, env = "PARLEY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "PARLEY_ZONE")]
    zone: Option<String>,
    /// Register with the cluster through this node (repeatable); for nodes added after bootstrap.
    #[arg(long)]
    join: Vec<String>,
    #[arg(long, env = "PARLEY_MAX_PAYLOAD_BYTES")]
    max_payload_bytes: Option<usize>,
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    #[arg(long)]
    election_timeout_ms: Option<u64>,
    #[arg(long)]
    snapshot_every_entries: Option<u64>,
    #[arg(long)]
    min_free_disk_bytes: Option<u64>,
    /// Allow the SetFaults admin call (tests only).
    #[arg(long)]
    fault_injection: bool,
    /// Client WebSocket listen address, ip:port ("" for none).
    #[arg(long, env = "PARLEY_CLIENT_LISTEN")]
    client_listen: Option<String>,
    /// Address clients and proxying peers use to reach the client port, host:port.
    #[arg(long, env = "PARLEY_CLIENT_ADVERTISE")]
    client_advertise: Option<String>,
    /// Ed25519 PKCS#8 PEM key that signs client tokens (same file on every node).
    #[arg(long, env = "PARLEY_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,
    #[arg(long)]
    token_ttl_secs: Option<u64>,
    #[arg(long)]
    rate_limit_per_s: Option<u32>,
    #[arg(long)]
    rate_limit_burst: Option<u32>,
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            node_id,
            listen,
            http,
            data_dir,
            zone,
            max_payload_bytes,
            request_timeout_ms,
            heartbeat_ms,
            election_timeout_ms,
            snapshot_every_entries,
            min_free_disk_bytes,
            client_listen,
            token_ttl_secs,
            rate_limit_per_s,
            rate_limit_burst
        );
        if self.advertise.is_some() {
            c.advertise = self.advertise;
        }
        if self.client_advertise.is_some() {
            c.client_advertise = self.client_advertise;
        }
        if self.token_key_file.is_some() {
            c.token_key_file = self.token_key_file;
        }
        if !self.join.is_empty() {
            c.join = self.join;
        }
        c.fault_injection |= self.fault_injection;
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args)]
struct AdminArgs {
    /// A node's gRPC address, host:port.
    #[arg(long, default_value = "127.0.0.1:7000")]
    endpoint: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// One-time: create the metadata group on three nodes and the initial shard groups.
    Bootstrap {
        /// ID=GRPC_ADDR[,HTTP_ADDR[,CLIENT_ADDR]], exactly three times.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        #[arg(long, default_value_t = 12)]
        shard_groups: u32,
    },
    /// Nodes, groups, replicas, leaders, applied index and lag.
    Status {
        #[arg(long)]
        json: bool,
    },
    AddReplica {
        #[arg(long)]
        group: u64,
        #[arg(long)]
        node: u64,
    },
    RemoveReplica {
        #[arg(long)]
        group: u64,
        #[arg(long)]
        node: u64,
    },
    TransferLeader {
        #[arg(long)]
        group: u64,
        #[arg(long)]
        to: u64,
    },
    /// Move every replica off a node.
    Drain {
        #[arg(long)]
        node: u64,
    },
}

fn parse_node(spec: &str) -> anyhow::Result<NodeAddress> {
    let (id, addrs) = spec
        .split_once('=')
        .context("expected ID=GRPC_ADDR[,HTTP_ADDR[,CLIENT_ADDR]]")?;
    let mut parts = addrs.split(',');
    let addr = parts.next().unwrap_or_default();
    let http = parts.next().unwrap_or_default();
    let client = parts.next().unwrap_or_default();
    Ok(NodeAddress {
        node_id: id.parse().context("node id")?,
        addr: addr.into(),
        http_addr: http.into(),
        zone: String::new(),
        client_addr: client.into(),
    })
}

async fn admin(args: AdminArgs) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.endpoint))?
        .timeout(Duration::from_secs(300))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.endpoint))?;
    let mut c = AdminClient::new(channel);
    match args.command {
        AdminCommand::Bootstrap {
            nodes,
            shard_groups,
        } => {
            let nodes = nodes
                .iter()
                .map(|s| parse_node(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = c
                .bootstrap(BootstrapRequest {
                    nodes,
                    shard_groups,
                })
                .await?
                .into_inner();
            println!(
                "bootstrapped: epoch {}, {} shard groups",
                r.epoch, r.shard_groups
            );
        }
        AdminCommand::Status { json } => {
            let s = c
                .cluster_status(ClusterStatusRequest {})
                .await?
                .into_inner();
            if json {
                println!("{s:#?}");
            } else {
                print_status(&s);
            }
        }
        AdminCommand::AddReplica { group, node } => {
            let r = c
                .add_replica(ReplicaChangeRequest {
                    group_id: group,
                    node_id: node,
                })
                .await?
                .into_inner();
            println!("{} (epoch {})", r.detail, r.epoch);
        }
        AdminCommand::RemoveReplica { group, node } => {
            let r = c
                .remove_replica(ReplicaChangeRequest {
                    group_id: group,
                    node_id: node,
                })
                .await?
                .into_inner();
            println!("{} (epoch {})", r.detail, r.epoch);
        }
        AdminCommand::TransferLeader { group, to } => {
            let r = c
                .transfer_leader(TransferLeaderRequest {
                    group_id: group,
                    to_node: to,
                })
                .await?
                .into_inner();
            println!("{} (epoch {})", r.detail, r.epoch);
        }
        AdminCommand::Drain { node } => {
            let r = c
                .drain_node(DrainNodeRequest { node_id: node })
                .await?
                .into_inner();
            println!("{} (epoch {})", r.detail, r.epoch);
        }
    }
    Ok(())
}

fn print_status(s: &ClusterStatusReply) {
    println!(
        "placement epoch {}, metadata leader {}",
        s.epoch, s.metadata_leader
    );
    println!(
        "{:<6} {:<22} {:<9} {:<10} {:>8} {:>8} {:<6}",
        "node", "address", "state", "reachable", "replicas", "leaders", "ready"
    );
    for n in &s.nodes {
        let a = n.address.clone().unwrap_or_default();
        println!(
            "{:<6} {:<22} {:<9} {:<10} {:>8} {:>8} {:<6}",
            a.node_id, a.addr, n.state, n.reachable, n.replicas, n.leaders, n.ready
        );
    }
    println!(
        "{:<6} {:<12} {:<14} {:<8} {:>6} {:>10} {:>8}",
        "group", "slots", "voters", "leader", "term", "commit", "max lag"
    );
    for g in &s.groups {
        let voters = g
            .voters
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<6} {:<12} {:<14} {:<8} {:>6} {:>10} {:>8}",
            g.group_id,
            format!("{}-{}", g.slot_start, g.slot_end),
            voters,
            g.leader,
            g.term,
            g.commit_index,
            g.max_lag
        );
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let config = args.into_config()?;
            parley_node::server::run(config, shutdown_signal()).await?;
            // Everything acknowledged is synced. Exit now rather than racing RocksDB's
            // background threads through static destructors.
            std::process::exit(0)
        }
        Command::Admin(args) => admin(args).await,
        Command::GenTokenKey { path } => {
            parley_node::tokens::write_new_key(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
    .or_else(|e| {
        if e.downcast_ref::<tonic::Status>().is_some() {
            bail!("{e}")
        } else {
            Err(e)
        }
    })
}
