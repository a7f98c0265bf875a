//! The admin service: bootstrap, joins, status, and the replica moves the operator
//! drives (add, remove, transfer leadership, drain). Membership changes run on the
//! group's leader; a node that is not the leader forwards the call once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, ServerState};
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::admin_server::Admin;
use parley_proto::node::v1::*;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::group_lifecycle::GroupLifecycle;
use crate::placement::{
    GroupId, MetaCommand, MetaResponse, NodeId, NodeInfo, NodeState, PlacementError,
};
use crate::types::{decode, encode, GroupRaft, METADATA_GROUP};

/// Header marking an admin call forwarded to a group leader (forwarded at most once).
const FORWARDED: &str = "parley-forwarded";
/// How long a new replica may take to catch up before promotion gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

pub struct AdminService {
    pub cluster: Arc<Cluster>,
    pub lifecycle: Arc<GroupLifecycle>,
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
    }
}

/// `ip:port` or `dns-name:port` (in Kubernetes, peers are addressed by stable pod DNS names).
fn is_host_port(addr: &str) -> bool {
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p > 0)
        && !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn forwarded_request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    req.set_timeout(timeout);
    req
}

/// Status of one local replica.
pub fn replica_status(group: GroupId, raft: &GroupRaft) -> GroupReplicaStatus {
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership().clone();
    GroupReplicaStatus {
        group_id: group,
        role: role(m.state).into(),
        term: m.current_term,
        leader: m.current_leader.unwrap_or(0),
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        snapshot_index: m.snapshot.as_ref().map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.as_ref().map(|l| l.index).unwrap_or(0),
        matched: m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(n, l)| (*n, l.as_ref().map(|l| l.index).unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Waits until the leader `raft` has replicated its log up to `index` to `node`.
async fn wait_for_match(raft: &GroupRaft, node: NodeId, index: u64) -> Result<(), ()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    while Instant::now() < deadline {
        let m = raft.metrics().borrow_watched().clone();
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&node).cloned().flatten())
            .map(|l| l.index);
        if matched >= Some(index) {
            return Ok(());
        }
        if m.state != ServerState::Leader {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(())
}

impl AdminService {
    fn node_status(&self) -> NodeStatusReply {
        NodeStatusReply {
            node_id: self.cluster.node_id(),
            placement_epoch: self.cluster.placement().epoch,
            groups: self
                .cluster
                .replicas
                .hosted()
                .iter()
                .map(|(g, r)| replica_status(*g, r))
                .collect(),
            ready: self
                .lifecycle
                .ready
                .load(std::sync::atomic::Ordering::Relaxed),
            db_bytes: self.cluster.replicas.engine().size_bytes(),
            disk_available_bytes: fs4::available_space(self.cluster.replicas.engine().dir())
                .unwrap_or(0),
            disk_capacity_bytes: fs4::total_space(self.cluster.replicas.engine().dir())
                .unwrap_or(0),
        }
    }

    async fn bootstrap(&self, req: BootstrapRequest) -> Result<BootstrapReply, ApiError> {
        let me = self.cluster.node_id();
        let mut nodes = BTreeMap::new();
        for n in &req.nodes {
            if n.node_id == 0 || !is_host_port(&n.addr) {
                return Err(ApiError::InvalidArgument(format!(
                    "node {} needs an id >= 1 and a host:port address",
                    n.node_id
                )));
            }
            let info = NodeInfo {
                addr: n.addr.clone(),
                http_addr: n.http_addr.clone(),
                zone: n.zone.clone(),
                state: NodeState::Active,
                client_addr: n.client_addr.clone(),
            };
            nodes.insert(n.node_id, info);
        }
        if nodes.len() != crate::placement::REPLICATION_FACTOR {
            return Err(PlacementError::WrongNodeCount { got: nodes.len() }.into());
        }
        if !nodes.contains_key(&me) {
            return Err(ApiError::InvalidArgument(format!(
                "bootstrap must be sent to one of its nodes, not node {me}"
            )));
        }
        let placement = self.cluster.fresh_placement().await;
        if placement.epoch > 0 {
            return Err(PlacementError::AlreadyBootstrapped {
                epoch: placement.epoch,
            }
            .into());
        }
        let raft = self
            .cluster
            .replicas
            .ensure(METADATA_GROUP)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if matches!(raft.is_initialized().await, Ok(false)) {
            let members: BTreeMap<u64, BasicNode> = nodes
                .iter()
                .map(|(id, n)| {
                    (
                        *id,
                        BasicNode {
                            addr: n.addr.clone(),
                        },
                    )
                })
                .collect();
            raft.initialize(members)
                .await
                .map_err(|e| ApiError::Unavailable(format!("initializing metadata group: {e}")))?;
        }
        let epoch = self
            .cluster
            .propose_meta(MetaCommand::Bootstrap {
                nodes,
                shard_groups: req.shard_groups,
            })
            .await?;
        tracing::info!(epoch, groups = req.shard_groups, "cluster bootstrapped");
        Ok(BootstrapReply {
            epoch,
            shard_groups: req.shard_groups,
        })
    }

    async fn cluster_status(&self) -> Result<ClusterStatusReply, ApiError> {
        let placement = self.cluster.fresh_placement().await;
        if placement.epoch == 0 {
            return Err(ApiError::NotBootstrapped);
        }
        // Ask every registered node for its own view, in parallel, briefly.
        let calls = placement
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Removed)
            .map(|(id, _)| {
                let id = *id;
                async move {
                    if id == self.cluster.node_id() {
                        return (id, Some(self.node_status()));
                    }
                    let Ok(channel) = self.cluster.channel_to(id) else {
                        return (id, None);
                    };
                    let mut req = Request::new(NodeStatusRequest {});
                    req.set_timeout(Duration::from_millis(800));
                    (
                        id,
                        AdminClient::new(channel)
                            .node_status(req)
                            .await
                            .ok()
                            .map(|r| r.into_inner()),
                    )
                }
            });
        let statuses: BTreeMap<NodeId, Option<NodeStatusReply>> =
            futures::future::join_all(calls).await.into_iter().collect();
        let mut groups = Vec::new();
        for (gid, gp) in &placement.groups {
            let mut g = ClusterGroup {
                group_id: *gid,
                slot_start: gp.slot_start,
                slot_end: gp.slot_end,
                voters: gp.voters.clone(),
                learners: gp.learners.clone(),
                ..Default::default()
            };
            for (node, status) in &statuses {
                let Some(r) = status
                    .as_ref()
                    .and_then(|s| s.groups.iter().find(|r| r.group_id == *gid))
                else {
                    continue;
                };
                g.applied.insert(*node, r.applied_index);
                if r.role == "leader" && r.term >= g.term {
                    g.leader = *node;
                    g.term = r.term;
                    g.commit_index = r.last_log_index;
                }
            }
            let leader_applied = g.applied.get(&g.leader).copied().unwrap_or(0);
            g.max_lag = gp
                .voters
                .iter()
                .chain(&gp.learners)
                .map(|n| leader_applied.saturating_sub(g.applied.get(n).copied().unwrap_or(0)))
                .max()
                .unwrap_or(0);
            groups.push(g);
        }
        let nodes = placement
            .nodes
            .iter()
            .map(|(id, n)| {
                let st = statuses.get(id).cloned().flatten();
                ClusterNode {
                    address: Some(NodeAddress {
                        node_id: *id,
                        addr: n.addr.clone(),
                        http_addr: n.http_addr.clone(),
                        zone: n.zone.clone(),
                        client_addr: n.client_addr.clone(),
                    }),
                    state: n.state.as_str().into(),
                    reachable: st.is_some(),
                    replicas: groups
                        .iter()
                        .filter(|g| g.voters.contains(id) || g.learners.contains(id))
                        .count() as u32,
                    leaders: groups.iter().filter(|g| g.leader == *id).count() as u32,
                    ready: st.as_ref().is_some_and(|s| s.ready),
                    db_bytes: st.as_ref().map_or(0, |s| s.db_bytes),
                    disk_available_bytes: st.as_ref().map_or(0, |s| s.disk_available_bytes),
                    disk_capacity_bytes: st.as_ref().map_or(0, |s| s.disk_capacity_bytes),
                }
            })
            .collect();
        let metadata_leader = statuses
            .iter()
            .filter_map(|(id, s)| s.as_ref().map(|s| (id, s)))
            .find(|(_, s)| {
                s.groups
                    .iter()
                    .any(|r| r.group_id == METADATA_GROUP && r.role == "leader")
            })
            .map(|(id, _)| *id)
            .unwrap_or(0);
        Ok(ClusterStatusReply {
            epoch: placement.epoch,
            nodes,
            groups,
            metadata_leader,
            metadata_voters: placement.metadata_voters.clone(),
        })
    }

    /// Runs `op` on the leader of `group`: here if this node leads it, else forwarded once.
    async fn on_leader<T, Op, Fwd, FwdFut>(
        &self,
        group: GroupId,
        forwarded: bool,
        op: Op,
        forward: Fwd,
    ) -> Result<T, ApiError>
    where
        Op: AsyncFnOnce(GroupRaft) -> Result<T, ApiError>,
        Fwd: Fn(AdminClient<tonic::transport::Channel>) -> FwdFut,
        FwdFut: std::future::Future<Output = Result<T, Status>>,
    {
        // A leadership in transition (an election, a hand-back to the preferred leader)
        // answers `not_leader` for a moment: the node the request arrived at waits and
        // tries again until the request deadline. A forwarded request is tried once; its
        // sender owns the retries.
        let deadline = Instant::now() + self.cluster.request_timeout();
        let mut attempt = 0;
        loop {
            if let Some(raft) = self.cluster.local_leader(group) {
                return op(raft).await;
            }
            let leader = self.cluster.leader_of(group);
            let refused = match leader {
                Some(l) if !forwarded && l != self.cluster.node_id() => {
                    let client = AdminClient::new(self.cluster.channel_to(l)?);
                    match forward(client).await {
                        Ok(v) => return Ok(v),
                        Err(s) => match ApiError::from_status(&s) {
                            ApiError::NotLeader { leader, .. } => {
                                self.cluster.note_leader(group, leader);
                                ApiError::NotLeader { group, leader }
                            }
                            _ => return Err(ApiError::forwarded(&s)),
                        },
                    }
                }
                _ => ApiError::NotLeader { group, leader },
            };
            if forwarded || Instant::now() >= deadline {
                return Err(refused);
            }
            attempt += 1;
            tokio::time::sleep(crate::cluster::backoff(attempt)).await;
        }
    }

    async fn add_replica(
        &self,
        group: GroupId,
        node: NodeId,
        forwarded: bool,
    ) -> Result<u64, ApiError> {
        let placement = self.cluster.fresh_placement().await;
        let gp = placement
            .replica_set(group)
            .ok_or(PlacementError::UnknownGroup(group))?;
        if gp.voters.contains(&node) {
            return Err(PlacementError::AlreadyHosted { group, node }.into());
        }
        let addr = placement
            .nodes
            .get(&node)
            .ok_or(PlacementError::UnknownNode(node))?
            .addr
            .clone();
        let timeout = CATCH_UP_TIMEOUT + self.cluster.request_timeout();
        let msg = ReplicaChangeRequest {
            group_id: group,
            node_id: node,
        };
        self.on_leader(
            group,
            forwarded,
            async |raft: GroupRaft| {
                // Shard replicas are recorded as learners first, so the new node opens its
                // replica; every node already runs a (dormant) metadata replica.
                if group != METADATA_GROUP && !gp.learners.contains(&node) {
                    self.cluster
                        .propose_meta(MetaCommand::AddLearner { group, node })
                        .await?;
                }
                let added = raft
                    .add_learner(node, BasicNode { addr }, false)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("adding learner: {e}")))?;
                // openraft's own "blocking" wait accepts a lag of thousands of entries; a
                // learner is promoted only once it holds everything up to its own addition.
                wait_for_match(&raft, node, added.log_id.index)
                    .await
                    .map_err(|_| {
                        ApiError::Timeout(format!(
                            "node {node} did not catch up with group {group}"
                        ))
                    })?;
                raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node])), false)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("promoting learner: {e}")))?;
                let cmd = if group == METADATA_GROUP {
                    let mut voters = gp.voters.clone();
                    voters.push(node);
                    MetaCommand::SetMetadataVoters { voters }
                } else {
                    MetaCommand::PromoteLearner { group, node }
                };
                self.cluster.propose_meta(cmd).await
            },
            |mut c| {
                let request = forwarded_request(msg, timeout);
                async move { c.add_replica(request).await.map(|r| r.into_inner().epoch) }
            },
        )
        .await
    }

    async fn remove_replica(
        &self,
        group: GroupId,
        node: NodeId,
        forwarded: bool,
    ) -> Result<u64, ApiError> {
        let placement = self.cluster.fresh_placement().await;
        let gp = placement
            .replica_set(group)
            .ok_or(PlacementError::UnknownGroup(group))?;
        if !gp.hosts(node) {
            return Err(PlacementError::NotHosted { group, node }.into());
        }
        let is_voter = gp.voters.contains(&node);
        if is_voter && gp.voters.len() <= crate::placement::REPLICATION_FACTOR {
            return Err(PlacementError::BelowReplicationFactor {
                group,
                left: gp.voters.len() - 1,
            }
            .into());
        }
        // The leader does not remove itself: hand leadership to another voter first.
        if is_voter && self.cluster.leader_of(group) == Some(node) {
            let to = gp
                .voters
                .iter()
                .copied()
                .find(|v| *v != node)
                .ok_or(ApiError::Internal("no other voter".into()))?;
            self.transfer_leader(group, to, false).await?;
        }
        let msg = ReplicaChangeRequest {
            group_id: group,
            node_id: node,
        };
        let timeout = self.cluster.request_timeout();
        self.on_leader(
            group,
            forwarded,
            async |raft: GroupRaft| {
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([node]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([node]))
                };
                raft.change_membership(change, false)
                    .await
                    .map_err(|e| ApiError::Unavailable(format!("removing replica: {e}")))?;
                // Only now may the node delete its copy: the group no longer counts on it.
                let cmd = if group == METADATA_GROUP {
                    let voters = gp.voters.iter().copied().filter(|v| *v != node).collect();
                    MetaCommand::SetMetadataVoters { voters }
                } else {
                    MetaCommand::RemoveReplica { group, node }
                };
                self.cluster.propose_meta(cmd).await
            },
            |mut c| {
                let request = forwarded_request(msg, timeout);
                async move {
                    c.remove_replica(request)
                        .await
                        .map(|r| r.into_inner().epoch)
                }
            },
        )
        .await
    }

    async fn transfer_leader(
        &self,
        group: GroupId,
        to: NodeId,
        forwarded: bool,
    ) -> Result<u64, ApiError> {
        let placement = self.cluster.fresh_placement().await;
        let gp = placement
            .replica_set(group)
            .ok_or(PlacementError::UnknownGroup(group))?;
        if !gp.voters.contains(&to) {
            return Err(PlacementError::NotHosted { group, node: to }.into());
        }
        // Make `to` the preferred leader so the balancer keeps it there.
        let epoch = if group == METADATA_GROUP {
            placement.epoch
        } else {
            self.cluster
                .propose_meta(MetaCommand::SetPreferredLeader { group, node: to })
                .await?
        };
        if self.cluster.leader_of(group) == Some(to) {
            return Ok(epoch);
        }
        let msg = TransferLeaderRequest {
            group_id: group,
            to_node: to,
        };
        let timeout = self.cluster.request_timeout();
        self.on_leader(
            group,
            forwarded,
            async |raft: GroupRaft| {
                raft.trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if raft.metrics().borrow_watched().current_leader == Some(to) {
                        return Ok(epoch);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(ApiError::Timeout(format!(
                    "node {to} did not take leadership of group {group}"
                )))
            },
            |mut c| {
                let request = forwarded_request(msg, timeout);
                async move {
                    c.transfer_leader(request)
                        .await
                        .map(|r| r.into_inner().epoch)
                }
            },
        )
        .await
    }

    /// Moves every replica off `node`, one group at a time (add the new one, then remove).
    async fn drain(&self, node: NodeId) -> Result<(u64, String), ApiError> {
        self.cluster
            .propose_meta(MetaCommand::SetNodeState {
                node_id: node,
                state: NodeState::Draining,
            })
            .await?;
        let mut moved = 0;
        let groups: Vec<GroupId> = self
            .cluster
            .fresh_placement()
            .await
            .groups
            .iter()
            .filter(|(_, g)| g.hosts(node))
            .map(|(id, _)| *id)
            .collect();
        for group in groups {
            let placement = self.cluster.fresh_placement().await;
            let Some(gp) = placement.groups.get(&group) else {
                continue;
            };
            if gp.voters.len() <= crate::placement::REPLICATION_FACTOR {
                let target = placement.pick_target(group).ok_or_else(|| {
                    ApiError::Unavailable(format!("no node can take group {group}'s replica"))
                })?;
                self.add_replica(group, target, false).await?;
            }
            self.remove_replica(group, node, false).await?;
            moved += 1;
        }
        let placement = self.cluster.fresh_placement().await;
        if placement.metadata_voters.contains(&node) {
            // The metadata group moves too: add a voter on the least loaded active node
            // that is not one yet, then remove the drained node.
            let counts = placement.replica_counts();
            let target = placement
                .nodes
                .iter()
                .filter(|(id, n)| {
                    n.state == NodeState::Active && !placement.metadata_voters.contains(id)
                })
                .min_by_key(|(id, _)| (counts.get(id).copied().unwrap_or(0), **id))
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    ApiError::Unavailable("no node can take the metadata replica".into())
                })?;
            self.add_replica(METADATA_GROUP, target, false).await?;
            self.remove_replica(METADATA_GROUP, node, false).await?;
            moved += 1;
        }
        let epoch = self.cluster.fresh_placement().await.epoch;
        Ok((epoch, format!("moved {moved} replicas off node {node}")))
    }
}

fn reply<T>(cluster: &Cluster, res: Result<T, ApiError>) -> Result<Response<T>, Status> {
    res.map(Response::new).map_err(|e| {
        cluster
            .metrics
            .grpc_errors_total
            .with_label_values(&["admin", e.code()])
            .inc();
        e.into()
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn bootstrap(
        &self,
        request: Request<BootstrapRequest>,
    ) -> Result<Response<BootstrapReply>, Status> {
        reply(&self.cluster, self.bootstrap(request.into_inner()).await)
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let res = async {
            let n = request
                .into_inner()
                .node
                .ok_or(ApiError::InvalidArgument("node is required".into()))?;
            if n.node_id == 0 || !is_host_port(&n.addr) {
                return Err(ApiError::InvalidArgument(
                    "node needs an id >= 1 and a host:port address".into(),
                ));
            }
            let info = NodeInfo {
                addr: n.addr,
                http_addr: n.http_addr,
                zone: n.zone,
                state: NodeState::Active,
                client_addr: n.client_addr,
            };
            let epoch = self
                .cluster
                .propose_meta(MetaCommand::RegisterNode {
                    node_id: n.node_id,
                    info,
                })
                .await?;
            Ok(JoinReply { epoch })
        }
        .await;
        reply(&self.cluster, res)
    }

    async fn node_status(
        &self,
        _: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusReply>, Status> {
        Ok(Response::new(self.node_status()))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusReply>, Status> {
        reply(&self.cluster, self.cluster_status().await)
    }

    async fn get_placement(
        &self,
        request: Request<GetPlacementRequest>,
    ) -> Result<Response<GetPlacementReply>, Status> {
        let map = self.cluster.placement();
        let placement = if map.epoch > request.into_inner().known_epoch {
            encode(&*map).map_err(|e| Status::internal(e.to_string()))?
        } else {
            Vec::new()
        };
        Ok(Response::new(GetPlacementReply {
            epoch: map.epoch,
            placement,
        }))
    }

    async fn add_replica(
        &self,
        request: Request<ReplicaChangeRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let fwd = is_forwarded(&request);
        let r = request.into_inner();
        let res = self.add_replica(r.group_id, r.node_id, fwd).await;
        reply(
            &self.cluster,
            res.map(|epoch| AdminReply {
                epoch,
                detail: format!("node {} now votes in group {}", r.node_id, r.group_id),
            }),
        )
    }

    async fn remove_replica(
        &self,
        request: Request<ReplicaChangeRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let fwd = is_forwarded(&request);
        let r = request.into_inner();
        let res = self.remove_replica(r.group_id, r.node_id, fwd).await;
        reply(
            &self.cluster,
            res.map(|epoch| AdminReply {
                epoch,
                detail: format!("node {} left group {}", r.node_id, r.group_id),
            }),
        )
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let fwd = is_forwarded(&request);
        let r = request.into_inner();
        let res = self.transfer_leader(r.group_id, r.to_node, fwd).await;
        reply(
            &self.cluster,
            res.map(|epoch| AdminReply {
                epoch,
                detail: format!("node {} leads group {}", r.to_node, r.group_id),
            }),
        )
    }

    async fn set_node_state(
        &self,
        request: Request<SetNodeStateRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let r = request.into_inner();
        let res = async {
            let state = NodeState::parse(&r.state).ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "unknown node state {:?}: use active, draining, maintenance or removed",
                    r.state
                ))
            })?;
            let epoch = self
                .cluster
                .propose_meta(MetaCommand::SetNodeState {
                    node_id: r.node_id,
                    state,
                })
                .await?;
            Ok(AdminReply {
                epoch,
                detail: format!("node {} is {}", r.node_id, state.as_str()),
            })
        }
        .await;
        reply(&self.cluster, res)
    }

    async fn set_node_zone(
        &self,
        request: Request<SetNodeZoneRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let r = request.into_inner();
        let res = async {
            if r.zone.len() > 63 {
                return Err(ApiError::InvalidArgument(
                    "a zone name is at most 63 bytes".into(),
                ));
            }
            let epoch = self
                .cluster
                .propose_meta(MetaCommand::SetNodeZone {
                    node_id: r.node_id,
                    zone: r.zone.clone(),
                })
                .await?;
            Ok(AdminReply {
                epoch,
                detail: format!("node {} is in zone {:?}", r.node_id, r.zone),
            })
        }
        .await;
        reply(&self.cluster, res)
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let res = self.drain(request.into_inner().node_id).await;
        reply(
            &self.cluster,
            res.map(|(epoch, detail)| AdminReply { epoch, detail }),
        )
    }

    async fn set_faults(
        &self,
        request: Request<SetFaultsRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        if !self.cluster.config.fault_injection {
            return reply(&self.cluster, Err(ApiError::FaultInjectionDisabled));
        }
        let r = request.into_inner();
        self.cluster
            .pool()
            .faults
            .set_blocked(r.blocked_peers.iter().copied());
        let engine = self.cluster.replicas.engine();
        engine.inject_disk_full(r.disk_full);
        self.cluster
            .metrics
            .disk_full
            .set(i64::from(engine.is_disk_full()));
        tracing::warn!(blocked = ?r.blocked_peers, disk_full = r.disk_full, "fault injection changed");
        Ok(Response::new(AdminReply {
            epoch: self.cluster.placement().epoch,
            detail: "faults set".into(),
        }))
    }

    async fn propose_meta(
        &self,
        request: Request<MetaProposal>,
    ) -> Result<Response<MetaProposal>, Status> {
        let r = request.into_inner();
        let res = async {
            let cmd: MetaCommand =
                decode(&r.command).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            let resp: MetaResponse = self.cluster.propose_meta_raw(cmd, r.hops).await?;
            Ok(MetaProposal {
                command: encode(&resp).map_err(|e| ApiError::Internal(e.to_string()))?,
                hops: r.hops,
            })
        }
        .await;
        reply(&self.cluster, res)
    }
}

#[cfg(test)]
mod tests {
    use super::is_host_port;

    #[test]
    fn peer_addresses_are_ip_or_dns_name_with_port() {
        for ok in [
            "127.0.0.1:7000",
            "[::1]:7000",
            "parley-0.parley-peers.chat.svc:7000",
            "localhost:1",
        ] {
            assert!(is_host_port(ok), "{ok}");
        }
        for bad in [
            "",
            "parley-0",
            "parley-0:",
            "parley-0:0",
            "parley-0:99999",
            ":7000",
            "-bad.example:7000",
            "a..b:7000",
            "white space:7000",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }
}
