//! `parley-bench connections`: how much server memory an idle, authenticated client
//! connection costs.
//!
//! Registers `--connections` users, then opens one WebSocket per user (spread over the
//! nodes as a load balancer would, and over several loopback source addresses so the
//! ephemeral ports of one address never run out), authenticates it and syncs it, and
//! holds them all open and idle (each answering the server's pings) for
//! `--hold-seconds`. The nodes' resident memory is read before the connections open
//! and after they have all settled; the difference over the number of connections is
//! the figure. Connections that land on a node other than the user's home are proxied
//! to the home node, so they cost memory on two nodes: that is included, as it is in
//! production behind a load balancer.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use clap::Args;
use futures::{stream, StreamExt as _};
use parley_proto::v1::{client_frame, reply, Authenticate, Sync};
use parley_testkit::{RawConnection, Received};
use tokio::time::Instant;

use crate::local::{register_all, rss_kib, run_tag, with_workdir, Cluster, ClusterArgs};

/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 64;
/// Time for the nodes' memory to settle before and after the connections open.
const SETTLE: Duration = Duration::from_secs(3);
/// File descriptors this process keeps for itself beyond one per connection.
const SPARE_FDS: u64 = 256;

#[derive(Debug, Args)]
pub struct ConnectionsArgs {
    /// Idle connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Loopback source addresses to spread the connections over (127.0.0.2 onwards).
    #[arg(long, default_value_t = 8)]
    source_addrs: u8,
    /// Seconds to hold the connections open once all are up (the server pings every 20 s).
    #[arg(long, default_value_t = 25)]
    hold_seconds: u64,
    /// Connect every user straight to its home node (as a client that remembers where
    /// it was sent), so that no connection is proxied; local clusters only.
    #[arg(long)]
    direct: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub async fn run(args: ConnectionsArgs) -> anyhow::Result<()> {
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        !args.direct || args.cluster.endpoints.is_empty(),
        "--direct needs a local cluster (node ids of --endpoints are unknown)"
    );
    ensure!(
        (1..=250).contains(&args.source_addrs),
        "--source-addrs must be 1..=250"
    );
    raise_fd_limit(args.connections as u64 + SPARE_FDS)?;
    let data_root = args.cluster.data_root.clone();
    with_workdir(data_root.as_deref(), |root| async move {
        let cluster = Cluster::start(&args.cluster, &root).await?;
        measure(&args, &cluster).await
    })
    .await
}

/// Raises this process's open-file limit to `need` (up to the hard limit).
fn raise_fd_limit(need: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft >= need {
        return Ok(());
    }
    ensure!(
        hard >= need,
        "{need} file descriptors needed but the hard limit is {hard}: \
         lower --connections or raise the limit (ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, need, hard).context("raising RLIMIT_NOFILE")?;
    Ok(())
}

/// The nodes' total resident memory and each node's, in KiB.
fn nodes_rss(pids: &[(u64, u32)]) -> anyhow::Result<(u64, Vec<(u64, u64)>)> {
    let mut per_node = Vec::with_capacity(pids.len());
    for &(node, pid) in pids {
        per_node.push((node, rss_kib(pid)?));
    }
    Ok((per_node.iter().map(|(_, kib)| kib).sum(), per_node))
}

async fn measure(args: &ConnectionsArgs, cluster: &Cluster) -> anyhow::Result<()> {
    let pids = cluster.pids();
    let tag = run_tag();
    let users: Vec<String> = (0..args.connections)
        .map(|i| format!("c{tag}-{i}"))
        .collect();
    eprintln!("registering {} users", users.len());
    let started = Instant::now();
    let credentials = register_all(&cluster.endpoints, users).await?;
    eprintln!(
        "registered in {:.1} s; letting the nodes settle",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let before = nodes_rss(&pids)?;

    eprintln!(
        "opening {} connections from {} source addresses",
        credentials.len(),
        args.source_addrs
    );
    let closed = Arc::new(AtomicU64::new(0));
    let proxied = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let endpoints = &cluster.endpoints;
    let opened: Vec<anyhow::Result<()>> = stream::iter(credentials.into_iter().enumerate())
        .map(|(i, creds)| {
            let endpoint = endpoints[i % endpoints.len()].clone();
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                2 + (i % usize::from(args.source_addrs)) as u8,
            ));
            let (closed, proxied) = (closed.clone(), proxied.clone());
            let entry_node = (i % endpoints.len()) as u64;
            let direct = args.direct.then_some(endpoints);
            async move {
                let mut conn = open(&endpoint, source, &creds.token, entry_node)
                    .await
                    .with_context(|| format!("connection {i} to {endpoint} from {source}"))?;
                if let Some((home, endpoints)) = conn.1.zip(direct) {
                    // Replace it by one to the home node (the first one closes on drop).
                    let at_home = &endpoints[(home - 1) as usize % endpoints.len()];
                    conn = open(at_home, source, &creds.token, home - 1)
                        .await
                        .with_context(|| format!("connection {i} to its home {at_home}"))?;
                }
                let (mut conn, away) = conn;
                if away.is_some() {
                    proxied.fetch_add(1, Ordering::Relaxed);
                }
                // Hold it: reading answers the server's pings; the task ends on close.
                tokio::spawn(async move {
                    loop {
                        match conn.recv(Duration::from_secs(3600)).await {
                            Ok(Received::Closed(_)) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    closed.fetch_add(1, Ordering::Relaxed);
                });
                Ok(())
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let failed: Vec<String> = opened
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if let Some(first) = failed.first() {
        bail!(
            "{} of {} connections failed; first: {first}",
            failed.len(),
            args.connections
        );
    }
    let open_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} connections up in {open_secs:.1} s; holding {} s",
        args.connections, args.hold_seconds
    );
    tokio::time::sleep(Duration::from_secs(args.hold_seconds).max(SETTLE)).await;
    let dropped = closed.load(Ordering::Relaxed);
    ensure!(
        dropped == 0,
        "{dropped} idle connections were closed by the server while held"
    );
    let held = args.connections as u64;

    let proxied = if cluster.local.is_some() {
        proxied.load(Ordering::Relaxed).to_string()
    } else {
        "unknown".to_string()
    };
    println!(
        "connections: {held} idle authenticated connections held {} s ({proxied} proxied to \
         the user's home node), opened in {open_secs:.1} s",
        args.hold_seconds,
    );
    if pids.is_empty() {
        println!("server memory: not measured (--endpoints given, no local node processes)");
        println!("RESULT idle_connections={held} server_kib_per_conn=NA");
        return Ok(());
    }
    let after = nodes_rss(&pids)?;
    println!("| node | RSS before (KiB) | RSS with connections (KiB) | delta (KiB) |");
    println!("|---:|---:|---:|---:|");
    for ((node, b), (_, a)) in before.1.iter().zip(&after.1) {
        println!("| {node} | {b} | {a} | {} |", *a as i64 - *b as i64);
    }
    let per_conn = after.0.saturating_sub(before.0) as f64 / held as f64;
    println!("RESULT idle_connections={held} server_kib_per_conn={per_conn:.2}");
    Ok(())
}

/// Opens one connection from `source`, authenticates and syncs it. Returns it with the
/// user's home node when that is not the node behind `endpoint` (the connection is
/// proxied).
async fn open(
    endpoint: &str,
    source: IpAddr,
    token: &str,
    entry_node: u64,
) -> anyhow::Result<(RawConnection, Option<u64>)> {
    let mut away = None;
    let mut conn = RawConnection::connect_from(endpoint, Some(source)).await?;
    let (answer, _) = conn
        .call(client_frame::Body::Authenticate(Authenticate {
            token: token.to_owned(),
        }))
        .await?;
    match answer.map_err(|e| anyhow::anyhow!("{e}"))?.result {
        Some(reply::Result::Authenticated(a)) => {
            // Node ids are 1-based and endpoints are in node order for a local cluster.
            if a.home_node != entry_node + 1 {
                away = Some(a.home_node);
            }
        }
        other => bail!("unexpected answer to Authenticate: {other:?}"),
    }
    let (answer, _) = conn.call(client_frame::Body::Sync(Sync {})).await?;
    match answer.map_err(|e| anyhow::anyhow!("{e}"))?.result {
        Some(reply::Result::SyncComplete(_)) => Ok((conn, away)),
        other => bail!("unexpected answer to Sync: {other:?}"),
    }
}
