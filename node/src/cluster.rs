//! This node's handle on the cluster: its replicas, the placement it has seen, and
//! how to reach the leader of any group (locally or by forwarding to a peer).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::{GetPlacementRequest, MetaProposal};
use tonic::transport::Channel;

use crate::config::NodeConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::placement::{GroupId, MetaCommand, MetaResponse, NodeId, PlacementMap};
use crate::proposer::{is_batchable, write_error, Proposer};
use crate::replicas::Replicas;
use crate::transport::PeerPool;
use crate::types::{decode, encode, Command, CommandResponse, GroupRaft, METADATA_GROUP};

/// Shared state of a running node, handed to every service.
pub struct Cluster {
    pub config: NodeConfig,
    pub replicas: Arc<Replicas>,
    pub metrics: Arc<Metrics>,
    /// Last leader seen per group, for groups this node does not host.
    leader_hints: Mutex<HashMap<GroupId, NodeId>>,
    /// Coalesces proposals to the groups this node leads into batch entries.
    pub proposer: Proposer,
}

/// One step of retry backoff, capped.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((10u64 << attempt.min(5)).min(250))
}

impl Cluster {
    pub fn new(config: NodeConfig, replicas: Arc<Replicas>, metrics: Arc<Metrics>) -> Arc<Cluster> {
        Arc::new(Cluster {
            config,
            replicas,
            proposer: Proposer::new(metrics.clone()),
            metrics,
            leader_hints: Mutex::new(HashMap::new()),
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.replicas.node_id()
    }

    pub fn pool(&self) -> &Arc<PeerPool> {
        self.replicas.pool()
    }

    pub fn placement(&self) -> Arc<PlacementMap> {
        self.replicas.placement()
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// The gRPC address of a node, from the placement map or any local group's membership.
    pub fn node_addr(&self, node: NodeId) -> Option<String> {
        if let Some(info) = self.placement().nodes.get(&node) {
            return Some(info.addr.clone());
        }
        self.replicas.hosted().into_iter().find_map(|(_, raft)| {
            let m = raft.metrics().borrow_watched().membership_config.clone();
            m.get_node(&node).map(|n| n.addr.clone())
        })
    }

    /// A gRPC channel to `node`, unless fault injection cut the link.
    pub fn channel_to(&self, node: NodeId) -> Result<Channel, ApiError> {
        if self.pool().faults.is_blocked(node) {
            return Err(ApiError::Unavailable(format!(
                "link to node {node} cut by fault injection"
            )));
        }
        let addr = self
            .node_addr(node)
            .ok_or_else(|| ApiError::Unavailable(format!("address of node {node} unknown")))?;
        self.pool()
            .channel(&addr)
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// Who leads `group`, as far as this node knows.
    pub fn leader_of(&self, group: GroupId) -> Option<NodeId> {
        if let Some(raft) = self.replicas.get(group) {
            if let Some(l) = raft.metrics().borrow_watched().current_leader {
                return Some(l);
            }
        }
        if let Some(l) = self
            .leader_hints
            .lock()
            .ok()
            .and_then(|h| h.get(&group).copied())
        {
            return Some(l);
        }
        if group == METADATA_GROUP {
            return self.placement().metadata_voters.first().copied();
        }
        self.placement()
            .groups
            .get(&group)
            .and_then(|g| g.voters.first().copied())
    }

    pub fn note_leader(&self, group: GroupId, leader: Option<NodeId>) {
        if let Ok(mut h) = self.leader_hints.lock() {
            match leader {
                Some(l) => h.insert(group, l),
                None => h.remove(&group),
            };
        }
    }

    /// The local replica of `group` if it is the leader.
    pub fn local_leader(&self, group: GroupId) -> Option<GroupRaft> {
        self.replicas
            .get(group)
            .filter(|r| r.metrics().borrow_watched().state == ServerState::Leader)
    }

    /// Proposes `cmd` on the local replica of `group` and waits for it to be committed and applied.
    pub async fn propose_local(
        &self,
        group: GroupId,
        raft: &GroupRaft,
        cmd: Command,
    ) -> Result<CommandResponse, ApiError> {
        if self.replicas.engine().is_disk_full() {
            return Err(ApiError::DiskFull {
                node: self.node_id(),
            });
        }
        let started = Instant::now();
        let write = async {
            if is_batchable(&cmd) {
                self.proposer.propose(group, raft, cmd).await
            } else {
                match raft.client_write(cmd).await {
                    Ok(resp) => Ok(resp.data),
                    Err(e) => Err(match e.into_api_error() {
                        Some(e) => write_error(group, e),
                        None => ApiError::Unavailable(format!("group {group}: replica stopped")),
                    }),
                }
            }
        };
        match tokio::time::timeout(self.request_timeout(), write).await {
            Err(_) => Err(ApiError::Timeout(format!(
                "group {group}: not committed within the deadline"
            ))),
            Ok(Ok(resp)) => {
                self.metrics
                    .raft_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(resp)
            }
            Ok(Err(e)) => {
                if let ApiError::NotLeader { leader, .. } = &e {
                    self.note_leader(group, *leader);
                }
                Err(e)
            }
        }
    }

    /// The placement map as the metadata leader has it now (admin operations validate
    /// against this, not against a cache that may be a tick behind).
    pub async fn fresh_placement(&self) -> Arc<PlacementMap> {
        if self.local_leader(METADATA_GROUP).is_some() {
            return self.placement();
        }
        if let Some(leader) = self
            .leader_of(METADATA_GROUP)
            .filter(|l| *l != self.node_id())
        {
            if let Ok(channel) = self.channel_to(leader) {
                let mut req = tonic::Request::new(GetPlacementRequest {
                    known_epoch: self.placement().epoch,
                });
                req.set_timeout(Duration::from_secs(2));
                if let Ok(reply) = AdminClient::new(channel).get_placement(req).await {
                    if let Ok(map) = decode::<PlacementMap>(&reply.into_inner().placement) {
                        self.replicas.offer_placement(Arc::new(map));
                    }
                }
            }
        }
        self.placement()
    }

    /// Proposes a placement change through the metadata group, forwarding to its leader.
    pub async fn propose_meta(&self, cmd: MetaCommand) -> Result<u64, ApiError> {
        match self.propose_meta_raw(cmd, 0).await? {
            MetaResponse::Ok { epoch } => Ok(epoch),
            MetaResponse::Refused(e) => Err(ApiError::Refused(e)),
        }
    }

    /// As [`Self::propose_meta`], returning the raw response; `hops` counts forwards so far.
    pub async fn propose_meta_raw(
        &self,
        cmd: MetaCommand,
        hops: u32,
    ) -> Result<MetaResponse, ApiError> {
        let deadline = Instant::now() + self.request_timeout();
        let mut attempt = 0;
        loop {
            let res = self.try_propose_meta(&cmd, hops).await;
            match res {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() && Instant::now() < deadline && hops == 0 => {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_propose_meta(
        &self,
        cmd: &MetaCommand,
        hops: u32,
    ) -> Result<MetaResponse, ApiError> {
        if let Some(raft) = self.local_leader(METADATA_GROUP) {
            return match self
                .propose_local(METADATA_GROUP, &raft, Command::Meta(cmd.clone()))
                .await?
            {
                CommandResponse::Meta(r) => Ok(r),
                other => Err(ApiError::Internal(format!(
                    "unexpected metadata response {other:?}"
                ))),
            };
        }
        if hops >= 2 {
            return Err(ApiError::NotLeader {
                group: METADATA_GROUP,
                leader: self.leader_of(METADATA_GROUP),
            });
        }
        let leader = self.leader_of(METADATA_GROUP).ok_or(ApiError::NotLeader {
            group: METADATA_GROUP,
            leader: None,
        })?;
        if leader == self.node_id() {
            return Err(ApiError::NotLeader {
                group: METADATA_GROUP,
                leader: None,
            });
        }
        let mut client = AdminClient::new(self.channel_to(leader)?);
        let command = encode(cmd).map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut req = tonic::Request::new(MetaProposal {
            command,
            hops: hops + 1,
        });
        req.set_timeout(self.request_timeout());
        match client.propose_meta(req).await {
            Ok(reply) => {
                decode(&reply.into_inner().command).map_err(|e| ApiError::Internal(e.to_string()))
            }
            Err(status) => {
                let e = ApiError::from_status(&status);
                if let ApiError::NotLeader { leader, .. } = &e {
                    self.note_leader(METADATA_GROUP, *leader);
                } else {
                    // The hinted node may be down: try the next metadata voter next time.
                    let voters = self.placement().metadata_voters.clone();
                    let next = voters
                        .iter()
                        .position(|v| *v == leader)
                        .map(|i| voters[(i + 1) % voters.len()]);
                    self.note_leader(METADATA_GROUP, next);
                }
                Err(e)
            }
        }
    }
}
