//! The cluster half of the operator: reads the cluster's own view through a node's admin
//! API and carries out the planner's cluster steps (bootstrap, replica moves, leadership
//! moves, node states). Every call has a deadline; a failed call is reported, never
//! retried here: the next reconcile observes again and plans again.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::{
    BootstrapRequest, ClusterStatusRequest, NodeAddress, NodeStatusRequest, ReplicaChangeRequest,
    SetNodeStateRequest, SetNodeZoneRequest, TransferLeaderRequest,
};
use tonic::transport::{Channel, Endpoint};

use crate::model::{ClusterView, DiskView, GroupView, NodeId, NodeState, NodeView};
use crate::planner::Step;

/// What the controller needs from the cluster: the nodes' admin API in production, an
/// in-memory cluster in tests and the simulation.
pub trait ClusterApi: Send + Sync {
    /// The node id the node at `addr` runs as, when it answers.
    fn probe<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Option<NodeId>>;
    /// The cluster's view; `Ok(None)` before bootstrap.
    fn cluster_view<'a>(
        &'a self,
        addrs: &'a [String],
    ) -> BoxFuture<'a, Result<Option<ClusterView>, AdminError>>;
    /// Runs one cluster step.
    fn execute<'a>(
        &'a self,
        addrs: &'a [String],
        step: &'a Step,
        peers: &'a BTreeMap<NodeId, NodeAddress>,
    ) -> BoxFuture<'a, Result<(), AdminError>>;
}

impl ClusterApi for NodeAdmin {
    fn probe<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Option<NodeId>> {
        Box::pin(NodeAdmin::probe(self, addr))
    }

    fn cluster_view<'a>(
        &'a self,
        addrs: &'a [String],
    ) -> BoxFuture<'a, Result<Option<ClusterView>, AdminError>> {
        Box::pin(NodeAdmin::cluster_view(self, addrs))
    }

    fn execute<'a>(
        &'a self,
        addrs: &'a [String],
        step: &'a Step,
        peers: &'a BTreeMap<NodeId, NodeAddress>,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(NodeAdmin::execute(self, addrs, step, peers))
    }
}

/// Why a call to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{endpoint}: invalid endpoint: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("no node answered ({tried} tried): {last}")]
    NoNodeAnswered { tried: usize, last: String },
    #[error("{step}: {code}: {message}")]
    Refused {
        step: String,
        code: String,
        message: String,
    },
    #[error("the node reported an unknown node state {0:?}")]
    UnknownState(String),
    #[error("{0} is not a cluster step")]
    NotAClusterStep(String),
    /// A refusal from an in-memory cluster (tests and simulation).
    #[error("{0}")]
    Simulated(String),
}

/// Talks to Parley nodes' admin API.
#[derive(Clone, Debug)]
pub struct NodeAdmin {
    timeout: Duration,
    /// Long calls: adding a replica waits for it to catch up.
    move_timeout: Duration,
}

impl Default for NodeAdmin {
    fn default() -> Self {
        NodeAdmin {
            timeout: Duration::from_secs(3),
            move_timeout: Duration::from_secs(150),
        }
    }
}

fn code_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(parley_proto::ERROR_CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

impl NodeAdmin {
    pub fn with_timeouts(timeout: Duration, move_timeout: Duration) -> NodeAdmin {
        NodeAdmin {
            timeout,
            move_timeout,
        }
    }

    fn client(&self, addr: &str) -> Result<AdminClient<Channel>, AdminError> {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|source| AdminError::Endpoint {
                endpoint: addr.into(),
                source,
            })?
            .connect_timeout(self.timeout)
            .connect_lazy();
        Ok(AdminClient::new(channel))
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(timeout);
        req
    }

    /// The node id the node at `addr` runs as, when it answers.
    pub async fn probe(&self, addr: &str) -> Option<NodeId> {
        let mut client = self.client(addr).ok()?;
        let reply = tokio::time::timeout(
            self.timeout,
            client.node_status(self.request(NodeStatusRequest {}, self.timeout)),
        )
        .await
        .ok()?
        .ok()?;
        Some(reply.into_inner().node_id)
    }

    /// The cluster's view from the first of `addrs` that answers. `Ok(None)` when a node
    /// answered that the cluster is not bootstrapped yet.
    pub async fn cluster_view(&self, addrs: &[String]) -> Result<Option<ClusterView>, AdminError> {
        let mut last = String::from("no addresses");
        for addr in addrs {
            let mut client = match self.client(addr) {
                Ok(c) => c,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let req = self.request(ClusterStatusRequest {}, self.timeout);
            match tokio::time::timeout(self.timeout * 2, client.cluster_status(req)).await {
                Ok(Ok(reply)) => return convert(reply.into_inner()).map(Some),
                Ok(Err(status)) if code_of(&status) == "not_bootstrapped" => return Ok(None),
                Ok(Err(status)) => last = format!("{addr}: {status}"),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        Err(AdminError::NoNodeAnswered {
            tried: addrs.len(),
            last,
        })
    }

    /// Runs one cluster step through the node at one of `addrs` (any node forwards to the
    /// group's leader). Kubernetes steps are refused.
    pub async fn execute(
        &self,
        addrs: &[String],
        step: &Step,
        peers: &BTreeMap<NodeId, NodeAddress>,
    ) -> Result<(), AdminError> {
        let mut last = String::from("no addresses");
        for addr in addrs {
            let mut client = self.client(addr)?;
            let res = match step {
                Step::Bootstrap {
                    nodes,
                    shard_groups,
                } => {
                    let nodes = nodes
                        .iter()
                        .filter_map(|id| peers.get(id).cloned())
                        .collect();
                    client
                        .bootstrap(self.request(
                            BootstrapRequest {
                                nodes,
                                shard_groups: *shard_groups,
                            },
                            self.timeout * 5,
                        ))
                        .await
                        .map(|_| ())
                }
                Step::AddReplica { group, node } => client
                    .add_replica(self.request(
                        ReplicaChangeRequest {
                            group_id: *group,
                            node_id: *node,
                        },
                        self.move_timeout,
                    ))
                    .await
                    .map(|_| ()),
                Step::RemoveReplica { group, node } => client
                    .remove_replica(self.request(
                        ReplicaChangeRequest {
                            group_id: *group,
                            node_id: *node,
                        },
                        self.move_timeout,
                    ))
                    .await
                    .map(|_| ()),
                Step::TransferLeader { group, to } => client
                    .transfer_leader(self.request(
                        TransferLeaderRequest {
                            group_id: *group,
                            to_node: *to,
                        },
                        self.timeout * 5,
                    ))
                    .await
                    .map(|_| ()),
                Step::SetNodeState { node, state } => client
                    .set_node_state(self.request(
                        SetNodeStateRequest {
                            node_id: *node,
                            state: state.as_str().into(),
                        },
                        self.timeout * 5,
                    ))
                    .await
                    .map(|_| ()),
                Step::SetNodeZone { node, zone } => client
                    .set_node_zone(self.request(
                        SetNodeZoneRequest {
                            node_id: *node,
                            zone: zone.clone(),
                        },
                        self.timeout * 5,
                    ))
                    .await
                    .map(|_| ()),
                Step::DeletePod { .. } | Step::DeleteVolume { .. } => {
                    return Err(AdminError::NotAClusterStep(step.describe()))
                }
            };
            match res {
                Ok(()) => return Ok(()),
                // Transport failures try the next node; answers from the cluster stand.
                Err(status)
                    if code_of(&status).is_empty()
                        && matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ) =>
                {
                    last = format!("{addr}: {status}");
                }
                Err(status) => {
                    return Err(AdminError::Refused {
                        step: step.describe(),
                        code: code_of(&status),
                        message: status.message().to_string(),
                    })
                }
            }
        }
        Err(AdminError::NoNodeAnswered {
            tried: addrs.len(),
            last,
        })
    }
}

/// The admin API's cluster status as the planner's [`ClusterView`].
pub fn convert(
    reply: parley_proto::node::v1::ClusterStatusReply,
) -> Result<ClusterView, AdminError> {
    let mut nodes = BTreeMap::new();
    for n in &reply.nodes {
        let Some(addr) = &n.address else { continue };
        let state = NodeState::parse(&n.state).ok_or(AdminError::UnknownState(n.state.clone()))?;
        nodes.insert(
            addr.node_id,
            NodeView {
                state,
                reachable: n.reachable,
                ready: n.ready,
                zone: addr.zone.clone(),
                disk: (n.disk_capacity_bytes > 0).then_some(DiskView {
                    data: n.db_bytes,
                    available: n.disk_available_bytes,
                    capacity: n.disk_capacity_bytes,
                }),
            },
        );
    }
    let groups = reply
        .groups
        .iter()
        .map(|g| {
            (
                g.group_id,
                GroupView {
                    voters: g.voters.clone(),
                    learners: g.learners.clone(),
                    leader: (g.leader != 0).then_some(g.leader),
                },
            )
        })
        .collect();
    Ok(ClusterView {
        nodes,
        groups,
        metadata: GroupView {
            voters: reply.metadata_voters.clone(),
            learners: vec![],
            leader: (reply.metadata_leader != 0).then_some(reply.metadata_leader),
        },
    })
}
