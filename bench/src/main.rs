//! `parley-bench`: benchmark programs for Parley, run by hand and never as
//! timed tests.
//!
//! `parley-bench replication` measures replicated, fsynced writes on this
//! machine, all on loopback and bounded in time:
//!
//! 1. starts a local 3-node Parley cluster (release binaries, through
//!    `parley-testkit`) unless `--endpoints` names a running one, and a
//!    3-member etcd cluster with default (fsync-per-write) settings;
//! 2. per concurrency level runs that many closed-loop appenders against
//!    Parley for a fixed time (random conversation, unique client message id,
//!    fixed-size payload), then as many putters against etcd (same size, as
//!    many keys), recording throughput, latency percentiles and errors; the
//!    two systems alternate level by level so each pair is measured seconds
//!    apart on a shared machine;
//!    writers use every node (which forwards to the group's leader) and every
//!    etcd member, or with `--route leader` only the leaders on both sides;
//! 3. stops etcd and, under a steady load, kills (`SIGKILL`) the node leading
//!    the most shard groups and reports the longest time each of its groups
//!    went without an acknowledged append, then restarts the node;
//! 4. prints both side by side, ending with a single `RESULT` line for the
//!    highest level.
//!
//! `parley-bench delivery` (module [`delivery`]) measures 1:1 messages end to
//! end through real SDK sessions at stepped send rates; `parley-bench
//! connections` (module [`connections`]) measures server memory per idle
//! authenticated connection. Both start their own local 3-node cluster unless
//! given `--endpoints`.
//!
//! Build with `cargo build --release -p parley-node -p parley-bench`; progress
//! goes to stderr, results to stdout.

mod connections;
mod delivery;
mod etcd;
mod load;
mod local;
mod parley;
mod report;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use clap::{Args, Parser, Subcommand};
use parley_testkit::LocalCluster;
use rand::Rng as _;

use crate::etcd::{EtcdCluster, EtcdTarget};
use crate::load::{run_level, LevelResult, Target};
use crate::parley::{measure_write_gap, AppendRpc, GapOptions, GapReport, ParleyTarget, Route};

/// Parley nodes and etcd members started by the benchmark.
const CLUSTER_SIZE: u64 = 3;
/// Time limit for a cluster to come up or recover.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(version, about = "Benchmark programs for Parley")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replicated write throughput and latency of Parley against etcd on local
    /// 3-node clusters, and Parley's write gap after a leader SIGKILL.
    Replication(ReplicationArgs),
    /// End-to-end 1:1 message latency (send to the recipient's SDK) and throughput at
    /// stepped send rates, through real WebSocket sessions.
    Delivery(delivery::DeliveryArgs),
    /// Server memory per idle authenticated WebSocket connection (10,000 by default).
    Connections(connections::ConnectionsArgs),
}

#[derive(Debug, Args)]
struct ReplicationArgs {
    /// Concurrency levels (concurrent writers), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    concurrency: Vec<usize>,
    /// Seconds of load per level.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Number of conversations (etcd keys) the writes are spread over.
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Size of each appended payload and put value.
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// Shard groups of the local Parley cluster.
    #[arg(long, default_value_t = 8)]
    shard_groups: u32,
    /// Concurrent writers during the write-gap measurement.
    #[arg(long, default_value_t = 32)]
    gap_concurrency: usize,
    /// Seconds of load after the leader SIGKILL.
    #[arg(long, default_value_t = 10)]
    gap_seconds: u64,
    /// Smoke run: levels 1,16 for 2 s each and 5 s after the SIGKILL
    /// (overrides --concurrency, --seconds and --gap-seconds).
    #[arg(long)]
    quick: bool,
    /// gRPC endpoints (http://127.0.0.1:PORT, comma-separated) of a running
    /// Parley cluster on this machine to load instead of starting one; the
    /// write-gap phase is then skipped.
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// The parley-node binary (default: $PARLEY_NODE_BIN, else next to this program).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Extra argument for every `parley-node run` (repeatable).
    #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// How the Parley client sends appends: many in flight on one stream per node
    /// (`stream`), or one unary call each (`unary`, as etcd's client does for puts).
    #[arg(long, value_enum, default_value = "stream")]
    append_rpc: AppendRpc,
    /// Which node each append is sent to: any (the worker's, which forwards it to the
    /// group's leader, as etcd's members forward puts) or the leader of its group
    /// (no forwarding hop; measures the replicated core alone).
    #[arg(long, value_enum, default_value = "any")]
    route: Route,
    /// The etcd server binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd_bin: PathBuf,
    /// Directory in which the run's temporary data directory is created
    /// (default: the system's). Kept, with all logs, if the run fails.
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Run only the etcd half (to check the baseline without parley-node).
    #[arg(long, hide = true)]
    etcd_only: bool,
    /// Run only the Parley half (no comparison, no RESULT line; for profiling).
    #[arg(long, hide = true, conflicts_with = "etcd_only")]
    parley_only: bool,
}

/// The measurement plan derived from the arguments.
struct Plan {
    levels: Vec<usize>,
    per_level: Duration,
    conversations: usize,
    payload: Arc<[u8]>,
    gap: GapOptions,
}

impl Plan {
    fn new(args: &ReplicationArgs) -> anyhow::Result<Self> {
        let (levels, per_level, warmup, after_kill) = if args.quick {
            (vec![1, 16], 2, 1, 5)
        } else {
            (args.concurrency.clone(), args.seconds, 2, args.gap_seconds)
        };
        ensure!(!levels.is_empty(), "no concurrency levels");
        ensure!(
            levels.iter().all(|&level| level > 0),
            "concurrency levels must be at least 1"
        );
        ensure!(per_level > 0, "--seconds must be at least 1");
        ensure!(args.conversations > 0, "--conversations must be at least 1");
        ensure!(
            args.gap_concurrency > 0,
            "--gap-concurrency must be at least 1"
        );
        // Clients encrypt payloads, so random bytes are the realistic content.
        let mut payload = vec![0u8; args.payload_bytes];
        rand::rng().fill(&mut payload[..]);
        let payload: Arc<[u8]> = payload.into();
        Ok(Self {
            levels,
            per_level: Duration::from_secs(per_level),
            conversations: args.conversations,
            gap: GapOptions {
                concurrency: args.gap_concurrency,
                warmup: Duration::from_secs(warmup),
                after_kill: Duration::from_secs(after_kill),
                conversations: args.conversations,
                payload: Arc::clone(&payload),
            },
            payload,
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Replication(args) => replication(&args).await,
        Command::Delivery(args) => delivery::run(args).await,
        Command::Connections(args) => connections::run(args).await,
    }
}

async fn replication(args: &ReplicationArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    for endpoint in &args.endpoints {
        ensure_loopback(endpoint)?;
    }
    local::with_workdir(args.data_root.as_deref(), |root| async move {
        run(args, &plan, &root).await
    })
    .await
}

async fn run(args: &ReplicationArgs, plan: &Plan, root: &Path) -> anyhow::Result<()> {
    eprintln!(
        "parley-bench replication: levels {:?}, {} s each, {} conversations, {}-byte payloads, \
         sent to {}",
        plan.levels,
        plan.per_level.as_secs(),
        plan.conversations,
        plan.payload.len(),
        args.route.describe()
    );
    if args.etcd_only {
        let (_cluster, target) = start_etcd(args, plan, &root.join("etcd")).await?;
        let levels = run_levels("etcd", &target, plan).await?;
        println!(
            "{}",
            report::single_table("etcd puts (3 members)", "puts/s", &levels)
        );
        return Ok(());
    }
    let parley_side = ParleySide::start(args, plan, &root.join("parley")).await?;
    if args.parley_only {
        let levels = run_levels("Parley", &parley_side.target, plan).await?;
        parley_side.write_gap(plan).await?;
        println!(
            "{}",
            report::single_table("Parley appends (3 nodes)", "appends/s", &levels)
        );
        return Ok(());
    }
    // Both clusters stay up and the levels alternate (Parley, then etcd, at each level), so
    // each pair is measured seconds apart on this shared machine rather than minutes; the
    // idle cluster only sends heartbeats meanwhile.
    let (mut etcd_cluster, etcd_target) = start_etcd(args, plan, &root.join("etcd")).await?;
    let mut parley_levels = Vec::with_capacity(plan.levels.len());
    let mut etcd = Vec::with_capacity(plan.levels.len());
    for &concurrency in &plan.levels {
        parley_levels.push(run_one("Parley", &parley_side.target, concurrency, plan).await?);
        etcd.push(run_one("etcd", &etcd_target, concurrency, plan).await?);
    }
    etcd_cluster.kill();
    let gap = parley_side.write_gap(plan).await?;
    println!("{}", report::comparison_table(&parley_levels, &etcd));
    match &gap {
        Some(gap) => {
            let unrecovered = gap.groups.iter().filter(|group| !group.recovered).count();
            if unrecovered > 0 {
                println!(
                    "{unrecovered} of {} groups acknowledged no append after the kill; \
                     their gap runs to the end of the load",
                    gap.groups.len()
                );
            }
            println!(
                "write gap after leader SIGKILL: max {} ms, p50 across groups {} ms",
                gap.max().as_millis(),
                gap.median().as_millis()
            );
        }
        None => println!("write gap after leader SIGKILL: not measured (--endpoints given)"),
    }
    // Both ran the plan's levels in its order; the RESULT line is the highest.
    let index = (0..plan.levels.len())
        .max_by_key(|&i| plan.levels[i])
        .context("no levels were run")?;
    let (parley_top, etcd_top) = parley_levels
        .get(index)
        .zip(etcd.get(index))
        .context("a level is missing its result")?;
    ensure!(
        parley_top.ok > 0 && etcd_top.ok > 0,
        "no RESULT: a system completed no writes at concurrency {} (see the errors above)",
        parley_top.concurrency
    );
    println!("{}", report::result_line(parley_top, etcd_top));
    Ok(())
}

/// The Parley cluster under test: a local one (killed when dropped), or `--endpoints`.
struct ParleySide {
    cluster: Option<LocalCluster>,
    target: ParleyTarget,
}

impl ParleySide {
    async fn start(args: &ReplicationArgs, plan: &Plan, root: &Path) -> anyhow::Result<Self> {
        if !args.endpoints.is_empty() {
            let target = ParleyTarget::connect(
                &args.endpoints,
                args.append_rpc,
                args.route,
                Arc::clone(&plan.payload),
            )
            .await?;
            return Ok(Self {
                cluster: None,
                target,
            });
        }
        let cluster = local::start_local(
            args.shard_groups,
            args.node_bin.clone(),
            args.node_args.clone(),
            root,
        )
        .await?;
        let target = ParleyTarget::connect(
            &cluster.endpoints(),
            args.append_rpc,
            args.route,
            Arc::clone(&plan.payload),
        )
        .await?;
        Ok(Self {
            cluster: Some(cluster),
            target,
        })
    }

    /// The write gap after the busiest leader's `SIGKILL` (the node is restarted
    /// afterwards); `None` for `--endpoints`, where there is no local node to kill.
    async fn write_gap(self, plan: &Plan) -> anyhow::Result<Option<GapReport>> {
        let Some(cluster) = self.cluster else {
            eprintln!("write gap: skipped, --endpoints given (no local node to kill)");
            return Ok(None);
        };
        eprintln!(
            "write gap: {} writers, SIGKILL of the busiest leader after {} s, then {} s of load",
            plan.gap.concurrency,
            plan.gap.warmup.as_secs(),
            plan.gap.after_kill.as_secs()
        );
        let gap = measure_write_gap(&cluster, &plan.gap).await?;
        for group in &gap.groups {
            eprintln!(
                "  group {}: {} ms{}",
                group.group_id,
                group.gap.as_millis(),
                if group.recovered {
                    ""
                } else {
                    " (no append acknowledged after the kill)"
                }
            );
        }
        eprintln!(
            "  node {} led {} groups; {} appends acknowledged, {} failed after retries",
            gap.victim,
            gap.groups.len(),
            gap.appends,
            gap.errors
        );
        cluster
            .restart(gap.victim)
            .await
            .with_context(|| format!("cannot restart node {}", gap.victim))?;
        cluster.wait_for_leaders(STARTUP_TIMEOUT).await?;
        eprintln!("  node {} restarted; every group has a leader", gap.victim);
        Ok(Some(gap))
    }
}

/// A fresh local etcd cluster (killed when dropped) and a client of it.
async fn start_etcd(
    args: &ReplicationArgs,
    plan: &Plan,
    root: &Path,
) -> anyhow::Result<(EtcdCluster, EtcdTarget)> {
    eprintln!(
        "starting {CLUSTER_SIZE} etcd members ({}) in {}",
        args.etcd_bin.display(),
        root.display()
    );
    let cluster = EtcdCluster::start(&args.etcd_bin, root, STARTUP_TIMEOUT)
        .await
        .context("cannot start the etcd cluster")?;
    let target = EtcdTarget::connect(
        &cluster.client_urls(),
        args.route,
        Arc::clone(&plan.payload),
    )
    .await?;
    Ok((cluster, target))
}

/// One level against `target`, reported on stderr.
async fn run_one<T: Target>(
    system: &str,
    target: &T,
    concurrency: usize,
    plan: &Plan,
) -> anyhow::Result<LevelResult> {
    let result = run_level(target, concurrency, plan.per_level, plan.conversations)
        .await
        .with_context(|| format!("{system} at concurrency {concurrency}"))?;
    eprintln!("{system:>6}: {}", report::level_row(&result));
    Ok(result)
}

/// Runs every level of the plan against `target`, reporting each on stderr.
async fn run_levels<T: Target>(
    system: &str,
    target: &T,
    plan: &Plan,
) -> anyhow::Result<Vec<LevelResult>> {
    let mut results = Vec::with_capacity(plan.levels.len());
    for &concurrency in &plan.levels {
        results.push(run_one(system, target, concurrency, plan).await?);
    }
    Ok(results)
}

/// Refuses endpoints that are not on this machine's loopback interface.
fn ensure_loopback(endpoint: &str) -> anyhow::Result<()> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .with_context(|| format!("invalid endpoint {endpoint:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("endpoint {endpoint:?} has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    ensure!(loopback, "endpoint {endpoint:?} is not a loopback address");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_endpoints_are_accepted() {
        for ok in [
            "http://127.0.0.1:7000",
            "http://localhost:1",
            "http://[::1]:80",
        ] {
            assert!(ensure_loopback(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:7000", "http://example.com:1", "not a uri"] {
            assert!(ensure_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quick_overrides_levels_and_durations() -> anyhow::Result<()> {
        let cli =
            Cli::try_parse_from(["parley-bench", "replication", "--quick", "--seconds", "30"])?;
        let Command::Replication(args) = cli.command else {
            anyhow::bail!("parsed as another command");
        };
        let plan = Plan::new(&args)?;
        assert_eq!(plan.levels, vec![1, 16]);
        assert_eq!(plan.per_level, Duration::from_secs(2));
        assert_eq!(plan.payload.len(), 256);
        Ok(())
    }

    #[test]
    fn levels_are_comma_separated() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["parley-bench", "replication", "--concurrency", "2,8"])?;
        let Command::Replication(args) = cli.command else {
            anyhow::bail!("parsed as another command");
        };
        assert_eq!(Plan::new(&args)?.levels, vec![2, 8]);
        Ok(())
    }
}
