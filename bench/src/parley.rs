//! The Parley side: a [`Target`] appending to conversations, and the write-gap
//! measurement around a `SIGKILL` of the busiest leader.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use parley_node::append_stream::AppendStreamClient;
use parley_node::placement::{slot_of, Slot};
use parley_node::transport::{CONNECTION_WINDOW, STREAM_WINDOW};
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::conversation_log_client::ConversationLogClient;
use parley_proto::node::v1::{AppendRequest, ClusterStatusRequest};
use parley_testkit::{leader_counts, LocalCluster, LogClient, RetryPolicy};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::load::Target;

/// Time limit of one append in the throughput levels (no retries there).
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The name of conversation number `n`; etcd keys use the same numbering.
fn conversation_id(n: usize) -> String {
    format!("bench-conv-{n}")
}

/// How the benchmark client sends appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppendRpc {
    /// One long-lived `AppendStream` per endpoint, many appends in flight on it.
    Stream,
    /// One unary `Append` call per append.
    Unary,
}

/// Which node an append is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    /// Worker `w` uses endpoint `w % endpoints`, whatever the conversation: the node
    /// forwards appends for groups it does not lead (two thirds of them on 3 nodes),
    /// as a gateway does for its users' messages.
    Any,
    /// Each append goes to the node leading its conversation's group (from one
    /// `ClusterStatus` read before the load), so no append takes a forwarding hop.
    Leader,
}

impl Route {
    /// Where appends go, for the run's header line.
    pub fn describe(self) -> &'static str {
        match self {
            Route::Any => "any node (which forwards to the leader)",
            Route::Leader => "each group's leader",
        }
    }
}

/// One endpoint, reached by either RPC.
#[derive(Clone)]
struct ParleyEndpoint {
    unary: ConversationLogClient<Channel>,
    stream: AppendStreamClient,
    admin: AdminClient<Channel>,
}

/// Appends `payload` with a fresh client message id per operation; worker `w`
/// talks to endpoint `w % endpoints`, one attempt per operation.
#[derive(Clone)]
pub struct ParleyTarget {
    clients: Arc<[ParleyEndpoint]>,
    rpc: AppendRpc,
    /// For [`Route::Leader`]: inclusive slot ranges and the index of the endpoint
    /// leading each, sorted by range start.
    leaders: Option<Arc<[(Slot, Slot, usize)]>>,
    payload: Arc<[u8]>,
    /// Distinguishes this run's client message ids from earlier runs'.
    run_id: Arc<str>,
    next_msg: Arc<AtomicU64>,
}

impl ParleyTarget {
    /// Connects to every endpoint (`http://host:port`).
    pub async fn connect(
        endpoints: &[String],
        rpc: AppendRpc,
        route: Route,
        payload: Arc<[u8]>,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::with_capacity(endpoints.len());
        for uri in endpoints {
            let channel = Endpoint::from_shared(uri.clone())
                .with_context(|| format!("invalid endpoint {uri:?}"))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {uri}"))?;
            clients.push(ParleyEndpoint {
                unary: ConversationLogClient::new(channel.clone()),
                admin: AdminClient::new(channel.clone()),
                stream: AppendStreamClient::new(channel, uri.clone()),
            });
        }
        anyhow::ensure!(!clients.is_empty(), "no Parley endpoints");
        let leaders = match route {
            Route::Any => None,
            Route::Leader => Some(leader_routes(endpoints, clients[0].admin.clone()).await?),
        };
        Ok(Self {
            clients: clients.into(),
            rpc,
            leaders,
            payload,
            run_id: format!("{:016x}", rand::rng().random::<u64>()).into(),
            next_msg: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl Target for ParleyTarget {
    async fn op(&self, worker: usize, conversation: usize) -> anyhow::Result<()> {
        let conversation_id = conversation_id(conversation);
        let index = match &self.leaders {
            None => worker,
            Some(ranges) => {
                let slot = slot_of(&conversation_id);
                let at = ranges.partition_point(|&(start, _, _)| start <= slot);
                match at.checked_sub(1).and_then(|i| ranges.get(i)) {
                    Some(&(_, end, endpoint)) if slot <= end => endpoint,
                    _ => worker,
                }
            }
        };
        let endpoint = &self.clients[index % self.clients.len()];
        let msg = self.next_msg.fetch_add(1, Ordering::Relaxed);
        let append = AppendRequest {
            conversation_id,
            sender: format!("bench-{worker}"),
            client_msg_id: format!("{}-{msg}", self.run_id),
            payload: self.payload.to_vec(),
            hops: 0,
        };
        match self.rpc {
            AppendRpc::Stream => {
                endpoint.stream.append(append, APPEND_TIMEOUT).await?;
            }
            AppendRpc::Unary => {
                let mut request = Request::new(append);
                request.set_timeout(APPEND_TIMEOUT);
                endpoint.unary.clone().append(request).await?;
            }
        }
        Ok(())
    }
}

/// Slot ranges of the shard groups and the endpoint (index into `endpoints`) of each
/// group's leader, from the cluster status one node reports. Groups without a leader, or
/// led by a node that is not among the endpoints, are left out (their appends go to any
/// node, which forwards them).
async fn leader_routes(
    endpoints: &[String],
    mut admin: AdminClient<Channel>,
) -> anyhow::Result<Arc<[(Slot, Slot, usize)]>> {
    let status = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .context("cannot read the cluster status for leader routing")?
        .into_inner();
    let endpoint_of = |node: u64| {
        let addr = status
            .nodes
            .iter()
            .filter_map(|n| n.address.as_ref())
            .find(|a| a.node_id == node)?;
        endpoints
            .iter()
            .position(|e| e.trim_end_matches('/') == format!("http://{}", addr.addr))
    };
    let mut ranges: Vec<(Slot, Slot, usize)> = status
        .groups
        .iter()
        .filter_map(|g| Some((g.slot_start, g.slot_end, endpoint_of(g.leader)?)))
        .collect();
    ranges.sort_unstable();
    anyhow::ensure!(
        !ranges.is_empty(),
        "no group leader is among the endpoints {endpoints:?}"
    );
    Ok(ranges.into())
}

/// How to run the write-gap measurement.
#[derive(Debug, Clone)]
pub struct GapOptions {
    /// Concurrent appending tasks.
    pub concurrency: usize,
    /// Load before the kill.
    pub warmup: Duration,
    /// Load after the kill.
    pub after_kill: Duration,
    pub conversations: usize,
    pub payload: Arc<[u8]>,
}

/// The longest pause in acknowledged appends of one shard group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupGap {
    pub group_id: u64,
    /// The longest interval between consecutive acknowledgements from the
    /// last one before the kill to the end of the load.
    pub gap: Duration,
    /// Whether any append to the group was acknowledged after the kill.
    pub recovered: bool,
}

/// Result of [`measure_write_gap`].
#[derive(Debug, Clone)]
pub struct GapReport {
    /// The killed node.
    pub victim: u64,
    /// One entry per group the victim led at the kill.
    pub groups: Vec<GroupGap>,
    /// Acknowledged appends during the whole measurement.
    pub appends: u64,
    /// Appends that failed even after retries.
    pub errors: u64,
}

impl GapReport {
    /// The longest gap over all affected groups.
    pub fn max(&self) -> Duration {
        self.groups
            .iter()
            .map(|group| group.gap)
            .max()
            .unwrap_or_default()
    }

    /// The median over the affected groups of each group's longest gap.
    pub fn median(&self) -> Duration {
        let mut gaps: Vec<Duration> = self.groups.iter().map(|group| group.gap).collect();
        gaps.sort_unstable();
        gaps.get(gaps.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or_default()
    }
}

/// Runs a steady retrying append load, kills (`SIGKILL`) the node leading the
/// most groups, and measures for each group it led the longest interval
/// without an acknowledged append. The node is left dead; the caller restarts it.
pub async fn measure_write_gap(
    cluster: &LocalCluster,
    options: &GapOptions,
) -> anyhow::Result<GapReport> {
    let status = cluster.cluster_status().await?;
    let victim = leader_counts(&status)
        .into_iter()
        // Most groups first, then the lowest node id.
        .max_by_key(|&(node, led)| (led, std::cmp::Reverse(node)))
        .map(|(node, _)| node)
        .ok_or_else(|| anyhow!("no shard group has a leader"))?;
    let victim_groups: Vec<u64> = status
        .groups
        .iter()
        .filter(|group| group.leader == victim)
        .map(|group| group.group_id)
        .collect();

    // Short back-off so the first append after the failover is not held back
    // by a long sleep; per-attempt timeout so a stuck call moves on.
    let log = cluster.log_client().with_policy(RetryPolicy {
        deadline: options.after_kill + Duration::from_secs(5),
        attempt_timeout: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = format!("{:016x}", rand::rng().random::<u64>());
    let mut workers = JoinSet::new();
    for worker in 0..options.concurrency {
        workers.spawn(gap_worker(
            log.clone(),
            Arc::clone(&stop),
            worker,
            format!("{run_id}-{worker}"),
            options.clone(),
        ));
    }

    tokio::time::sleep(options.warmup).await;
    let killed_at = Instant::now();
    let kill = cluster.kill(victim).await;
    if kill.is_ok() {
        tokio::time::sleep(options.after_kill).await;
    }
    stop.store(true, Ordering::Relaxed);
    let end = Instant::now();

    let mut acks: BTreeMap<u64, Vec<Instant>> = BTreeMap::new();
    let mut report = GapReport {
        victim,
        groups: Vec::new(),
        appends: 0,
        errors: 0,
    };
    while let Some(joined) = workers.join_next().await {
        let tally = joined.context("a write-gap worker panicked")?;
        report.errors += tally.errors;
        for (group, at) in tally.acks {
            report.appends += 1;
            acks.entry(group).or_default().push(at);
        }
    }
    kill.with_context(|| format!("cannot kill node {victim}"))?;
    report.groups = victim_groups
        .iter()
        .map(|&group_id| {
            let mut times = acks.remove(&group_id).unwrap_or_default();
            times.sort_unstable();
            longest_gap(group_id, &times, killed_at, end)
        })
        .collect();
    Ok(report)
}

/// The longest interval without an acknowledgement among `acks` (sorted),
/// from the last one before `killed_at` (or `killed_at` itself) to `end`.
fn longest_gap(group_id: u64, acks: &[Instant], killed_at: Instant, end: Instant) -> GroupGap {
    let after = acks.partition_point(|&at| at < killed_at);
    let start = after.checked_sub(1).map_or(killed_at, |last| acks[last]);
    let following: Vec<Instant> = acks[after..]
        .iter()
        .copied()
        .filter(|&at| at <= end)
        .collect();
    let points = std::iter::once(start)
        .chain(following.iter().copied())
        .chain(std::iter::once(end));
    let gap = points
        .clone()
        .zip(points.skip(1))
        .map(|(earlier, later)| later.saturating_duration_since(earlier))
        .max()
        .unwrap_or_default();
    GroupGap {
        group_id,
        gap,
        recovered: !following.is_empty(),
    }
}

/// What one write-gap worker saw.
struct GapTally {
    /// `(group, when)` of every acknowledged append.
    acks: Vec<(u64, Instant)>,
    errors: u64,
}

async fn gap_worker(
    log: LogClient,
    stop: Arc<AtomicBool>,
    worker: usize,
    msg_prefix: String,
    options: GapOptions,
) -> GapTally {
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let sender = format!("bench-gap-{worker}");
    let mut tally = GapTally {
        acks: Vec::new(),
        errors: 0,
    };
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let conversation = conversation_id(rng.random_range(0..options.conversations));
        n += 1;
        let msg = format!("{msg_prefix}-{n}");
        match log
            .append(&conversation, &sender, &msg, &options.payload)
            .await
        {
            Ok(reply) => tally.acks.push((reply.group_id, Instant::now())),
            Err(_) => tally.errors += 1,
        }
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn gap_spans_the_failover() {
        let t0 = Instant::now();
        let acks = [t0, t0 + ms(10), t0 + ms(20), t0 + ms(900), t0 + ms(910)];
        let gap = longest_gap(7, &acks, t0 + ms(25), t0 + ms(920));
        assert_eq!(
            gap,
            GroupGap {
                group_id: 7,
                gap: ms(880),
                recovered: true
            }
        );
    }

    #[test]
    fn unrecovered_group_gap_runs_to_the_end() {
        let t0 = Instant::now();
        let gap = longest_gap(1, &[t0], t0 + ms(5), t0 + ms(500));
        assert_eq!(gap.gap, ms(500));
        assert!(!gap.recovered);
        let never = longest_gap(1, &[], t0, t0 + ms(300));
        assert_eq!(never.gap, ms(300));
    }

    #[test]
    fn report_max_and_median() {
        let group = |gap| GroupGap {
            group_id: 0,
            gap: ms(gap),
            recovered: true,
        };
        let report = GapReport {
            victim: 1,
            groups: vec![group(300), group(100), group(200), group(400)],
            appends: 0,
            errors: 0,
        };
        assert_eq!(report.max(), ms(400));
        assert_eq!(report.median(), ms(200));
    }
}
