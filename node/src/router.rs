//! The router: which node is a user's home.
//!
//! A user's home node holds their sessions, so "where is user B connected" needs no
//! lookup table: it is a pure function of the user id and the set of live nodes.
//! Parley uses **rendezvous (highest-random-weight) hashing**: every candidate node
//! gets the score `xxh3_64(user id, seed = node id)` and the highest score wins. Why
//! rendezvous rather than a ring with virtual nodes: it needs no ring state or tuning
//! (virtual-node counts), it is balanced in expectation for any node count, and when a
//! node leaves only the users whose top choice it was move (to their second choice),
//! while a joining node takes only the users for which it scores highest. The cost,
//! O(nodes) hashes per lookup, is nothing at the node counts of a cluster.
//!
//! Candidates are the nodes of the placement map that are not removed and have a
//! client address, minus nodes this node currently believes down. Liveness comes from
//! probes (the `Delivery.Probe` RPC every 500 ms) and from failed connections; views
//! of different nodes can disagree for about a second while a node dies or returns.
//! Callers therefore walk the ranking ([`Router::ranked`]) and skip a node that cannot
//! be reached, and clients always `Sync` after connecting, so a message pushed to a
//! stale home is never lost, only picked up by that sync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_proto::node::v1::delivery_client::DeliveryClient;
use parley_proto::node::v1::ProbeRequest;

use crate::cluster::Cluster;
use crate::placement::{NodeId, NodeState};

/// How often peers are probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long a probe may take before the peer counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Ranks `nodes` for `user`, best first (highest rendezvous score).
pub fn rendezvous_rank(user: &str, nodes: &[NodeId]) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = nodes
        .iter()
        .map(|n| {
            (
                xxhash_rust::xxh3::xxh3_64_with_seed(user.as_bytes(), *n),
                *n,
            )
        })
        .collect();
    // Ties (practically impossible) break on node id so every node ranks alike.
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, n)| n).collect()
}

/// A candidate home node and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    pub node: NodeId,
    pub client_addr: String,
}

/// This node's view of which nodes are live, and user -> home lookups on it.
pub struct Router {
    cluster: Arc<Cluster>,
    /// Peers believed down (failed probe or connection) until a probe succeeds.
    down: Mutex<HashMap<NodeId, bool>>,
    /// Set while this node shuts down: it stops being anyone's home.
    leaving: std::sync::atomic::AtomicBool,
}

impl Router {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Router> {
        Arc::new(Router {
            cluster,
            down: Mutex::new(HashMap::new()),
            leaving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.cluster.node_id()
    }

    fn is_down(&self, node: NodeId) -> bool {
        if node == self.node_id() {
            return self.leaving.load(std::sync::atomic::Ordering::Relaxed);
        }
        self.down
            .lock()
            .map(|d| d.get(&node).copied().unwrap_or(false))
            .unwrap_or(false)
    }

    /// Candidate homes for `user`, best first: live nodes with a client address.
    pub fn ranked(&self, user: &str) -> Vec<Home> {
        let placement = self.cluster.placement();
        let live: Vec<NodeId> = placement
            .nodes
            .iter()
            .filter(|(id, info)| {
                info.state != NodeState::Removed
                    && !info.client_addr.is_empty()
                    && !self.is_down(**id)
            })
            .map(|(id, _)| *id)
            .collect();
        rendezvous_rank(user, &live)
            .into_iter()
            .filter_map(|node| {
                placement.nodes.get(&node).map(|info| Home {
                    node,
                    client_addr: info.client_addr.clone(),
                })
            })
            .collect()
    }

    /// The user's home node as this node sees it.
    pub fn home_of(&self, user: &str) -> Option<Home> {
        self.ranked(user).into_iter().next()
    }

    /// Records that `node` could not be reached; it stops being a candidate until a
    /// probe reaches it again.
    pub fn mark_down(&self, node: NodeId) {
        if node == self.node_id() {
            return;
        }
        if let Ok(mut d) = self.down.lock() {
            if d.insert(node, true) != Some(true) {
                tracing::info!(node, "router: node marked down");
            }
        }
    }

    fn mark_up(&self, node: NodeId) {
        if let Ok(mut d) = self.down.lock() {
            if d.insert(node, false) == Some(true) {
                tracing::info!(node, "router: node is back");
            }
        }
    }

    /// This node is shutting down: stop choosing it as a home.
    pub fn leave(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Probes every other node forever.
    pub async fn run_probes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.node_id();
            let peers: Vec<NodeId> = self
                .cluster
                .placement()
                .nodes
                .iter()
                .filter(|(id, info)| **id != me && info.state != NodeState::Removed)
                .map(|(id, _)| *id)
                .collect();
            let probes = peers.into_iter().map(|peer| {
                let this = self.clone();
                async move {
                    let ok = this.probe(peer).await;
                    if ok {
                        this.mark_up(peer);
                    } else {
                        this.mark_down(peer);
                    }
                }
            });
            futures::future::join_all(probes).await;
        }
    }

    /// Whether `peer` answers and is not leaving.
    async fn probe(&self, peer: NodeId) -> bool {
        let Ok(channel) = self.cluster.channel_to(peer) else {
            return false;
        };
        let mut req = tonic::Request::new(ProbeRequest {
            from_node: self.node_id(),
        });
        req.set_timeout(PROBE_TIMEOUT);
        match tokio::time::timeout(PROBE_TIMEOUT, DeliveryClient::new(channel).probe(req)).await {
            Ok(Ok(reply)) => !reply.into_inner().draining,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Vec<String> {
        (0..20_000).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn ranking_is_stable_and_ignores_input_order() {
        assert_eq!(
            rendezvous_rank("alice", &[1, 2, 3]),
            rendezvous_rank("alice", &[3, 1, 2])
        );
        assert_eq!(rendezvous_rank("alice", &[1, 2, 3]).len(), 3);
        assert!(rendezvous_rank("alice", &[]).is_empty());
    }

    #[test]
    fn users_spread_evenly() {
        let nodes = [1, 2, 3, 4, 5];
        let mut count: HashMap<NodeId, usize> = HashMap::new();
        for u in users() {
            *count.entry(rendezvous_rank(&u, &nodes)[0]).or_default() += 1;
        }
        let expected = 20_000 / nodes.len();
        for n in nodes {
            let c = count[&n];
            // Within 10% of an even share.
            assert!(c.abs_diff(expected) < expected / 10, "node {n}: {c}");
        }
    }

    #[test]
    fn a_leaving_node_moves_only_its_users_and_a_joining_node_takes_only_new_ones() {
        let before = [1, 2, 3, 4];
        let after_leave = [1, 2, 4];
        let after_join = [1, 2, 3, 4, 5];
        for u in users() {
            let home = rendezvous_rank(&u, &before)[0];
            let left = rendezvous_rank(&u, &after_leave)[0];
            if home != 3 {
                assert_eq!(home, left, "{u} moved although its home stayed");
            } else {
                // It moves to its second choice.
                assert_eq!(left, rendezvous_rank(&u, &before)[1]);
            }
            let joined = rendezvous_rank(&u, &after_join)[0];
            assert!(joined == home || joined == 5, "{u} moved between old nodes");
        }
    }
}
