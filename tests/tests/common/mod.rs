//! Workload and checks shared by the end-to-end fault tests.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_proto::node::v1::{ClusterStatusReply, ClusterStatusRequest, NodeStatusRequest};
use parley_testkit::{LocalCluster, LogClient};

/// One acknowledged append.
#[derive(Debug, Clone)]
pub struct Ack {
    pub conversation: String,
    pub client_msg_id: String,
    pub seq: u64,
    pub group: u64,
    pub at: Instant,
}

/// Everything the writers saw.
#[derive(Debug, Default)]
pub struct Journal {
    pub acks: Vec<Ack>,
    /// Attempts that never got an acknowledgement (may or may not be stored, at most once).
    pub unacked: Vec<(String, String)>,
}

pub fn conversation(i: usize) -> String {
    format!("conv-{i:05}")
}

/// Runs `writers` tasks appending to `conversations` conversations (each writer owns a
/// disjoint subset, so per-conversation order of acks is the order of sends) until `stop`
/// is set. A failed send is retried with the same client_msg_id a few times, then given up.
/// Message ids are `{tag}w{writer}-m{n}`: runs that must not collide use distinct tags.
pub fn spawn_writers(
    tag: &str,
    client: LogClient,
    conversations: usize,
    writers: usize,
    payload: usize,
    journal: Arc<Mutex<Journal>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let client = client.clone();
            let journal = journal.clone();
            let stop = stop.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mine: Vec<usize> = (0..conversations).filter(|c| c % writers == w).collect();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let conv = conversation(mine[n as usize % mine.len()]);
                    let id = format!("{tag}w{w}-m{n}");
                    n += 1;
                    let body = vec![(n % 251) as u8; payload];
                    let mut acked = None;
                    for _ in 0..3 {
                        match client.append(&conv, "writer", &id, &body).await {
                            Ok(r) => {
                                acked = Some(r);
                                break;
                            }
                            Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                            Err(_) => continue,
                        }
                    }
                    let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
                    match acked {
                        Some(r) => j.acks.push(Ack {
                            conversation: conv,
                            client_msg_id: id,
                            seq: r.seq,
                            group: r.group_id,
                            at: Instant::now(),
                        }),
                        None => j.unacked.push((conv, id)),
                    }
                }
            })
        })
        .collect()
}

/// Reads a whole conversation.
pub async fn read_all(client: &LogClient, conv: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let r = client
            .read(conv, from, 1000)
            .await
            .unwrap_or_else(|e| panic!("read {conv}: {e}"));
        let n = r.entries.len();
        for e in r.entries {
            out.push((e.seq, e.client_msg_id));
        }
        if n == 0 || out.last().map(|l| l.0) >= Some(r.last_seq) {
            return out;
        }
        from = out.last().map(|l| l.0 + 1).unwrap_or(1);
    }
}

/// Every acknowledged append is present exactly once at its acknowledged seq, every
/// conversation's seqs are 1..=n in order, no message id appears twice, and the log holds
/// nothing but acknowledged or possibly-stored (unacknowledged) attempts.
/// Returns the number of entries checked.
pub async fn verify(client: &LogClient, conversations: usize, journal: &Journal) -> usize {
    let mut acked: HashMap<(String, String), u64> = HashMap::new();
    for a in &journal.acks {
        let prev = acked.insert((a.conversation.clone(), a.client_msg_id.clone()), a.seq);
        assert!(
            prev.is_none(),
            "message {} acknowledged twice",
            a.client_msg_id
        );
    }
    let unacked: std::collections::HashSet<(String, String)> =
        journal.unacked.iter().cloned().collect();
    let (mut checked, mut acked_found) = (0, 0);
    for i in 0..conversations {
        let conv = conversation(i);
        let entries = read_all(client, &conv).await;
        let mut seen = std::collections::HashSet::new();
        for (pos, (seq, id)) in entries.iter().enumerate() {
            assert_eq!(*seq, pos as u64 + 1, "{conv}: seqs not contiguous from 1");
            assert!(seen.insert(id.clone()), "{conv}: message {id} stored twice");
            let key = (conv.clone(), id.clone());
            match acked.get(&key) {
                Some(s) => {
                    assert_eq!(
                        s, seq,
                        "{conv}: {id} acknowledged at seq {s} but stored at {seq}"
                    );
                    acked_found += 1;
                }
                None => assert!(unacked.contains(&key), "{conv}: {id} stored but never sent"),
            }
        }
        checked += entries.len();
    }
    assert_eq!(
        acked_found,
        acked.len(),
        "acknowledged messages missing from the log"
    );
    checked
}

/// Checks every acknowledged append is readable (none lost).
pub async fn verify_no_ack_lost(client: &LogClient, journal: &Journal) {
    let mut by_conv: BTreeMap<&str, Vec<&Ack>> = BTreeMap::new();
    for a in &journal.acks {
        by_conv.entry(&a.conversation).or_default().push(a);
    }
    for (conv, acks) in by_conv {
        let entries: HashMap<u64, String> = read_all(client, conv).await.into_iter().collect();
        for a in acks {
            assert_eq!(
                entries.get(&a.seq),
                Some(&a.client_msg_id),
                "{conv}: acknowledged {} at seq {} lost",
                a.client_msg_id,
                a.seq
            );
        }
    }
}

/// The cluster status as seen by one particular node.
pub async fn status_from(cluster: &LocalCluster, node: u64) -> anyhow::Result<ClusterStatusReply> {
    let mut req = tonic::Request::new(ClusterStatusRequest {});
    req.set_timeout(Duration::from_secs(3));
    Ok(cluster.admin(node).cluster_status(req).await?.into_inner())
}

/// Waits until `node` has applied, in every group it hosts, at least what that group's
/// leader had applied when the wait began (it caught up).
pub async fn wait_caught_up(
    cluster: &LocalCluster,
    node: u64,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let target: HashMap<u64, u64> = {
        let s = cluster.cluster_status().await?;
        s.groups
            .iter()
            .map(|g| (g.group_id, g.applied.get(&g.leader).copied().unwrap_or(0)))
            .collect()
    };
    loop {
        let mut req = tonic::Request::new(NodeStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        if let Ok(r) = cluster.admin(node).node_status(req).await {
            let r = r.into_inner();
            let behind: Vec<u64> = target
                .iter()
                .filter(|(g, want)| {
                    r.groups
                        .iter()
                        .find(|x| x.group_id == **g)
                        .map(|x| x.applied_index)
                        < Some(**want)
                })
                .map(|(g, _)| *g)
                .collect();
            if behind.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                anyhow::bail!("node {node} still behind in groups {behind:?}");
            }
        } else if started.elapsed() > timeout {
            anyhow::bail!("node {node} does not answer");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node leading the most groups.
pub fn busiest_leader(status: &ClusterStatusReply) -> u64 {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    for g in &status.groups {
        *counts.entry(g.leader).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(n, _)| *n != 0)
        .max_by_key(|(_, c)| *c)
        .map(|(n, _)| n)
        .unwrap_or(1)
}

/// The longest interval between consecutive acknowledgements within `groups` that ends
/// after `around` (the fault instant). Under steady load this is the failover gap; a write
/// in flight at the fault may still be acknowledged just after it.
pub fn write_gap(acks: &[Ack], groups: &[u64], around: Instant) -> Duration {
    let mut times: Vec<Instant> = acks
        .iter()
        .filter(|a| groups.contains(&a.group))
        .map(|a| a.at)
        .collect();
    times.sort();
    times
        .windows(2)
        .filter(|w| w[1] >= around)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// The worst per-group write gap (see [`write_gap`]) over `groups`.
pub fn max_group_gap(acks: &[Ack], groups: &[u64], around: Instant) -> Duration {
    groups
        .iter()
        .map(|g| write_gap(acks, &[*g], around))
        .max()
        .unwrap_or_default()
}
