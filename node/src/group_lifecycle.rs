//! Keeps this node's replicas in line with the placement map: fetches the newest map,
//! opens replicas the map assigns here, initializes new groups, hands leadership back to
//! each group's preferred leader, and deletes replicas the map moved away.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::{GetPlacementRequest, JoinRequest, NodeAddress};

use crate::cluster::Cluster;
use crate::placement::{GroupId, MetaCommand, NodeState, PlacementMap};
use crate::types::{decode, Command, GroupRaft, METADATA_GROUP};

const TICK: Duration = Duration::from_millis(250);
/// A leader keeps leadership at least this long before handing it to the preferred leader.
const LEADER_SETTLE: Duration = Duration::from_secs(5);
/// Applied-vs-logged gap under which a replica counts as caught up for readiness.
const READY_LAG: u64 = 1_000;

/// Background reconciliation of hosted groups; owns the node's readiness flag.
pub struct GroupLifecycle {
    cluster: Arc<Cluster>,
    pub ready: AtomicBool,
    joined: AtomicBool,
}

impl GroupLifecycle {
    pub fn new(cluster: Arc<Cluster>) -> Arc<Self> {
        let joined = cluster.config.join.is_empty();
        Arc::new(GroupLifecycle {
            cluster,
            ready: AtomicBool::new(false),
            joined: AtomicBool::new(joined),
        })
    }

    /// Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut leader_since: HashMap<GroupId, Instant> = HashMap::new();
        let mut last_transfer: HashMap<GroupId, Instant> = HashMap::new();
        let mut last_gauges = Instant::now() - Duration::from_secs(10);
        loop {
            if !self.joined.load(Ordering::Relaxed) {
                self.try_join().await;
            }
            self.refresh_placement().await;
            let placement = self.cluster.placement();
            if placement.epoch > 0 {
                self.reconcile(&placement, &mut leader_since, &mut last_transfer)
                    .await;
            }
            if last_gauges.elapsed() >= Duration::from_secs(1) {
                self.update_gauges(&placement);
                last_gauges = Instant::now();
            }
            tokio::time::sleep(TICK).await;
        }
    }

    async fn try_join(&self) {
        let c = &self.cluster.config;
        let me = NodeAddress {
            node_id: c.node_id,
            addr: c.advertised(),
            http_addr: c.http.clone(),
            zone: c.zone.clone(),
            client_addr: c.client_advertised(),
        };
        for peer in &c.join {
            let Ok(channel) = self.cluster.pool().channel(peer) else {
                continue;
            };
            let mut req = tonic::Request::new(JoinRequest {
                node: Some(me.clone()),
            });
            req.set_timeout(Duration::from_secs(5));
            match AdminClient::new(channel).join(req).await {
                Ok(_) => {
                    tracing::info!(peer, "registered with the cluster");
                    self.joined.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => tracing::debug!(peer, error = %e, "join attempt failed"),
            }
        }
    }

    /// Asks a metadata voter (or a join peer) for a newer placement map.
    async fn refresh_placement(&self) {
        let current = self.cluster.placement();
        // Metadata voters get the map from their own state machine.
        let meta = self.cluster.replicas.get(METADATA_GROUP);
        if let Some(raft) = &meta {
            if raft.metrics().borrow_watched().current_leader.is_some()
                && current.metadata_voters.contains(&self.cluster.node_id())
            {
                return;
            }
        }
        let mut addrs: Vec<String> = Vec::new();
        if let Some(l) = self.cluster.leader_of(METADATA_GROUP) {
            if l != self.cluster.node_id() {
                addrs.extend(self.cluster.node_addr(l));
            }
        }
        for v in &current.metadata_voters {
            if *v != self.cluster.node_id() && !self.cluster.pool().faults.is_blocked(*v) {
                addrs.extend(self.cluster.node_addr(*v));
            }
        }
        addrs.extend(self.cluster.config.join.iter().cloned());
        addrs.dedup();
        for addr in addrs {
            let Ok(channel) = self.cluster.pool().channel(&addr) else {
                continue;
            };
            let mut req = tonic::Request::new(GetPlacementRequest {
                known_epoch: current.epoch,
            });
            req.set_timeout(Duration::from_secs(1));
            if let Ok(reply) = AdminClient::new(channel).get_placement(req).await {
                let reply = reply.into_inner();
                if reply.epoch > current.epoch && !reply.placement.is_empty() {
                    if let Ok(map) = decode::<PlacementMap>(&reply.placement) {
                        self.cluster.replicas.offer_placement(Arc::new(map));
                    }
                }
                return;
            }
        }
    }

    async fn reconcile(
        &self,
        placement: &PlacementMap,
        leader_since: &mut HashMap<GroupId, Instant>,
        last_transfer: &mut HashMap<GroupId, Instant>,
    ) {
        let me = self.cluster.node_id();
        for (group, gp) in &placement.groups {
            if !gp.hosts(me) {
                continue;
            }
            let raft = match self.cluster.replicas.ensure(*group).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(group, error = %e, "cannot open replica");
                    continue;
                }
            };
            if !gp.initialized {
                self.initialize_group(placement, *group, &raft).await;
                continue;
            }
            self.prefer_leader(*group, &gp.voters, &raft, leader_since, last_transfer)
                .await;
        }
        // Replicas the map no longer assigns here: the group's membership already excludes us.
        for (group, _) in self.cluster.replicas.hosted() {
            if group == METADATA_GROUP {
                continue;
            }
            let assigned = placement.groups.get(&group).is_some_and(|g| g.hosts(me));
            if !assigned {
                self.cluster.proposer.forget(group);
                if let Err(e) = self.cluster.replicas.remove(group).await {
                    tracing::error!(group, error = %e, "cannot delete moved replica");
                }
            }
        }
    }

    /// First start of a group: its preferred leader initializes the Raft membership; whoever
    /// leads then assigns the slot range and marks the group initialized in the placement.
    async fn initialize_group(&self, placement: &PlacementMap, group: GroupId, raft: &GroupRaft) {
        let gp = &placement.groups[&group];
        if gp.voters.first() == Some(&self.cluster.node_id())
            && matches!(raft.is_initialized().await, Ok(false))
        {
            let members: BTreeMap<u64, BasicNode> = gp
                .voters
                .iter()
                .filter_map(|v| {
                    placement.nodes.get(v).map(|n| {
                        (
                            *v,
                            BasicNode {
                                addr: n.addr.clone(),
                            },
                        )
                    })
                })
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(group, "group initialized"),
                Err(e) => tracing::debug!(group, error = %e, "initialize"),
            }
        }
        if let Some(leader) = self.cluster.local_leader(group) {
            let cmd = Command::AssignSlots {
                start: gp.slot_start,
                end: gp.slot_end,
                epoch: placement.epoch,
            };
            if self
                .cluster
                .propose_local(group, &leader, cmd)
                .await
                .is_ok()
            {
                if let Err(e) = self
                    .cluster
                    .propose_meta(MetaCommand::GroupInitialized { group })
                    .await
                {
                    tracing::warn!(group, error = %e, "cannot record group initialization");
                }
            }
        }
    }

    /// Hands leadership to the group's preferred leader once it is caught up, so leaders
    /// stay spread evenly after failures and restarts.
    async fn prefer_leader(
        &self,
        group: GroupId,
        voters: &[u64],
        raft: &GroupRaft,
        leader_since: &mut HashMap<GroupId, Instant>,
        last_transfer: &mut HashMap<GroupId, Instant>,
    ) {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            leader_since.remove(&group);
            return;
        }
        let since = *leader_since.entry(group).or_insert_with(Instant::now);
        let Some(&preferred) = voters.first() else {
            return;
        };
        // A node being drained or restarted is not handed leaderships back.
        let preferred_active = self
            .cluster
            .placement()
            .nodes
            .get(&preferred)
            .is_some_and(|n| n.state == NodeState::Active);
        if preferred == self.cluster.node_id()
            || !preferred_active
            || since.elapsed() < LEADER_SETTLE
            || last_transfer
                .get(&group)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
            || self.cluster.pool().faults.is_blocked(preferred)
        {
            return;
        }
        let last = m.last_log_index.unwrap_or(0);
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&preferred).cloned().flatten())
            .map(|l| l.index)
            .unwrap_or(0);
        if matched + 10 >= last && matched > 0 {
            tracing::info!(
                group,
                to = preferred,
                "handing leadership to the preferred leader"
            );
            last_transfer.insert(group, Instant::now());
            let _ = raft.trigger().transfer_leader(preferred).await;
        }
    }

    fn update_gauges(&self, placement: &PlacementMap) {
        let metrics = &self.cluster.metrics;
        let engine = self.cluster.replicas.engine();
        let hosted = self.cluster.replicas.hosted();
        let mut leaders = 0;
        let mut max_lag = 0;
        let mut all_ready = placement.epoch > 0;
        for (group, raft) in &hosted {
            let m = raft.metrics().borrow_watched().clone();
            if m.state == ServerState::Leader {
                leaders += 1;
            }
            let lag = m
                .last_log_index
                .unwrap_or(0)
                .saturating_sub(m.last_applied.as_ref().map(|l| l.index).unwrap_or(0));
            max_lag = max_lag.max(lag);
            let expected = if *group == METADATA_GROUP {
                placement.metadata_voters.contains(&self.cluster.node_id())
            } else {
                placement.groups.get(group).is_some_and(|g| g.initialized)
            };
            if expected && (m.current_leader.is_none() || lag > READY_LAG) {
                all_ready = false;
            }
        }
        metrics.leaders.set(leaders);
        metrics.replicas.set(hosted.len() as i64);
        metrics.apply_lag_entries.set(max_lag as i64);
        metrics.placement_epoch.set(placement.epoch as i64);
        metrics.rocksdb_size_bytes.set(engine.size_bytes() as i64);
        // Disk space floor; fault injection may also have set the flag.
        if let Ok(total) = fs4::total_space(engine.dir()) {
            metrics.disk_capacity_bytes.set(total as i64);
        }
        if let Ok(free) = fs4::available_space(engine.dir()) {
            metrics.disk_available_bytes.set(free as i64);
            let low = free < self.cluster.config.min_free_disk_bytes;
            if engine.set_disk_low(low) {
                if low {
                    tracing::error!(free, "free disk space below the floor: refusing writes");
                } else {
                    tracing::info!(
                        free,
                        "free disk space back above the floor: accepting writes"
                    );
                }
            }
        }
        metrics.disk_full.set(i64::from(engine.is_disk_full()));
        self.ready.store(all_ready, Ordering::Relaxed);
    }
}
