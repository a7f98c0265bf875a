//! Placement: conversation id -> hash slot -> shard group -> replicas on nodes.
//!
//! The slot function is part of the on-disk format and must never change:
//! `slot = CRC-16/XMODEM(conversation id bytes) mod 16384`, the same function Redis
//! Cluster uses. Slots are split into contiguous ranges, one per shard group.
//!
//! The [`PlacementMap`] is the state of the metadata Raft group. Every change bumps its
//! epoch; nodes cache the newest epoch they have seen and requests routed on an older
//! view are answered with a typed `moved` error rather than written to the wrong group.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Identifies a node for its whole life; never reused.
pub type NodeId = u64;
/// Identifies a Raft group; 0 is the metadata group.
pub type GroupId = u64;
/// A hash slot in `0..SLOT_COUNT`.
pub type Slot = u32;

/// The fixed number of hash slots. Changing it would move every conversation.
pub const SLOT_COUNT: Slot = 16384;
/// Voters per group.
pub const REPLICATION_FACTOR: usize = 3;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The hash slot of a conversation (stable forever).
pub fn slot_of(conversation: &str) -> Slot {
    Slot::from(CRC16.checksum(conversation.as_bytes())) % SLOT_COUNT
}

/// Lifecycle of a node in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Active,
    /// Being emptied; never chosen as a target for new replicas.
    Draining,
    /// Left the cluster; holds no replicas.
    Removed,
    /// About to restart (a rolling upgrade): keeps its replicas, takes no new ones, and
    /// is not handed leaderships back.
    Maintenance,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Removed => "removed",
            NodeState::Maintenance => "maintenance",
        }
    }

    /// Parses the names [`NodeState::as_str`] gives.
    pub fn parse(name: &str) -> Option<NodeState> {
        match name {
            "active" => Some(NodeState::Active),
            "draining" => Some(NodeState::Draining),
            "removed" => Some(NodeState::Removed),
            "maintenance" => Some(NodeState::Maintenance),
            _ => None,
        }
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// gRPC address (Raft, forwarding, delivery, admin).
    pub addr: String,
    pub http_addr: String,
    pub zone: String,
    pub state: NodeState,
    /// Client WebSocket address; empty for a node that serves no clients.
    pub client_addr: String,
}

/// Where one shard group lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPlacement {
    /// First slot owned, inclusive.
    pub slot_start: Slot,
    /// Last slot owned, inclusive.
    pub slot_end: Slot,
    /// Voters; the first is the preferred leader.
    pub voters: Vec<NodeId>,
    /// Replicas being added, catching up before promotion.
    pub learners: Vec<NodeId>,
    /// Set once the group's Raft log has been initialized, so it is never initialized twice.
    pub initialized: bool,
}

impl GroupPlacement {
    pub fn hosts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }

    pub fn owns(&self, slot: Slot) -> bool {
        (self.slot_start..=self.slot_end).contains(&slot)
    }
}

/// The cluster's node registry and placement, replicated by the metadata group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMap {
    /// Bumped by every change; 0 means "not bootstrapped".
    pub epoch: u64,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    /// Shard groups by id (ids start at 1).
    pub groups: BTreeMap<GroupId, GroupPlacement>,
    /// Voters of the metadata group.
    pub metadata_voters: Vec<NodeId>,
}

/// A change to the placement map, replicated through the metadata group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// One-time creation of the registry and the initial shard groups.
    Bootstrap {
        nodes: BTreeMap<NodeId, NodeInfo>,
        shard_groups: u32,
    },
    RegisterNode {
        node_id: NodeId,
        info: NodeInfo,
    },
    SetNodeState {
        node_id: NodeId,
        state: NodeState,
    },
    GroupInitialized {
        group: GroupId,
    },
    AddLearner {
        group: GroupId,
        node: NodeId,
    },
    PromoteLearner {
        group: GroupId,
        node: NodeId,
    },
    RemoveReplica {
        group: GroupId,
        node: NodeId,
    },
    /// Reorders voters so `node` is the preferred leader.
    SetPreferredLeader {
        group: GroupId,
        node: NodeId,
    },
    /// Records the metadata group's voters after a membership change of group 0.
    SetMetadataVoters {
        voters: Vec<NodeId>,
    },
    /// Sets a node's zone (in Kubernetes the operator learns it from the pod's host).
    SetNodeZone {
        node_id: NodeId,
        zone: String,
    },
}

/// Outcome of a [`MetaCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    Ok { epoch: u64 },
    Refused(PlacementError),
}

/// Why a placement change was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PlacementError {
    #[error("cluster already bootstrapped at epoch {epoch}")]
    AlreadyBootstrapped { epoch: u64 },
    #[error("cluster not bootstrapped yet")]
    NotBootstrapped,
    #[error("bootstrap needs exactly {REPLICATION_FACTOR} nodes, got {got}")]
    WrongNodeCount { got: usize },
    #[error("shard group count must be between 1 and {max}, got {got}")]
    WrongGroupCount { got: u32, max: u32 },
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("unknown shard group {0}")]
    UnknownGroup(GroupId),
    #[error("node {node} already hosts group {group}")]
    AlreadyHosted { group: GroupId, node: NodeId },
    #[error("node {node} does not host group {group}")]
    NotHosted { group: GroupId, node: NodeId },
    #[error("node {node} is {} and takes no new replicas", state.as_str())]
    NodeNotActive { node: NodeId, state: NodeState },
    #[error("group {group} would drop to {left} voters, below the replication factor")]
    BelowReplicationFactor { group: GroupId, left: usize },
    #[error("node {node} registered with another address ({existing})")]
    AddressConflict { node: NodeId, existing: String },
    #[error("node {0} was removed from the cluster; node ids are never reused")]
    NodeRemoved(NodeId),
    #[error("node {node} still hosts {replicas} replicas; drain it before removing it")]
    NotEmpty { node: NodeId, replicas: usize },
}

impl PlacementMap {
    /// The shard group that owns `slot`.
    pub fn group_for_slot(&self, slot: Slot) -> Option<(GroupId, &GroupPlacement)> {
        self.groups
            .iter()
            .find(|(_, g)| g.owns(slot))
            .map(|(id, g)| (*id, g))
    }

    /// Where `group` lives; for the metadata group, its voters (it has no slots).
    pub fn replica_set(&self, group: GroupId) -> Option<GroupPlacement> {
        if group == 0 {
            return (self.epoch > 0).then(|| GroupPlacement {
                slot_start: 0,
                slot_end: 0,
                voters: self.metadata_voters.clone(),
                learners: vec![],
                initialized: true,
            });
        }
        self.groups.get(&group).cloned()
    }

    /// Replicas (voters and learners) held by each active or draining node.
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Removed)
            .map(|(id, _)| (*id, 0))
            .collect();
        for g in self.groups.values() {
            for n in g.voters.iter().chain(&g.learners) {
                *counts.entry(*n).or_default() += 1;
            }
        }
        counts
    }

    /// The best node to receive a new replica of `group`: active, not already hosting it,
    /// preferring a zone the group does not use yet, then the fewest replicas, then the lowest id.
    pub fn pick_target(&self, group: GroupId) -> Option<NodeId> {
        let g = self.groups.get(&group)?;
        let counts = self.replica_counts();
        let used_zones: BTreeSet<&str> = g
            .voters
            .iter()
            .filter_map(|n| self.nodes.get(n))
            .map(|n| n.zone.as_str())
            .collect();
        self.nodes
            .iter()
            .filter(|(id, n)| n.state == NodeState::Active && !g.hosts(**id))
            .min_by_key(|(id, n)| {
                let zone_penalty =
                    usize::from(!n.zone.is_empty() && used_zones.contains(n.zone.as_str()));
                (zone_penalty, counts.get(id).copied().unwrap_or(0), **id)
            })
            .map(|(id, _)| *id)
    }

    /// Applies a command; a refused command leaves the map unchanged.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResponse {
        match self.try_apply(cmd) {
            Ok(()) => {
                self.epoch += 1;
                MetaResponse::Ok { epoch: self.epoch }
            }
            Err(e) => MetaResponse::Refused(e),
        }
    }

    fn try_apply(&mut self, cmd: &MetaCommand) -> Result<(), PlacementError> {
        if self.epoch == 0 && !matches!(cmd, MetaCommand::Bootstrap { .. }) {
            return Err(PlacementError::NotBootstrapped);
        }
        match cmd {
            MetaCommand::Bootstrap {
                nodes,
                shard_groups,
            } => {
                if self.epoch != 0 {
                    return Err(PlacementError::AlreadyBootstrapped { epoch: self.epoch });
                }
                if nodes.len() != REPLICATION_FACTOR {
                    return Err(PlacementError::WrongNodeCount { got: nodes.len() });
                }
                let max = SLOT_COUNT / 16;
                if *shard_groups == 0 || *shard_groups > max {
                    return Err(PlacementError::WrongGroupCount {
                        got: *shard_groups,
                        max,
                    });
                }
                self.nodes = nodes.clone();
                self.metadata_voters = nodes.keys().copied().collect();
                let ids: Vec<NodeId> = nodes.keys().copied().collect();
                let per = SLOT_COUNT / shard_groups;
                for i in 0..*shard_groups {
                    let start = i * per;
                    let end = if i + 1 == *shard_groups {
                        SLOT_COUNT - 1
                    } else {
                        start + per - 1
                    };
                    // Rotate the voter order so preferred leaders spread evenly.
                    let voters = (0..REPLICATION_FACTOR)
                        .map(|k| ids[(i as usize + k) % ids.len()])
                        .collect();
                    self.groups.insert(
                        GroupId::from(i) + 1,
                        GroupPlacement {
                            slot_start: start,
                            slot_end: end,
                            voters,
                            learners: vec![],
                            initialized: false,
                        },
                    );
                }
                Ok(())
            }
            MetaCommand::RegisterNode { node_id, info } => {
                // A node registers on every start: a known node keeps its state (a drain
                // survives a restart); a removed id is never taken again.
                let state = match self.nodes.get(node_id) {
                    Some(existing) if existing.state == NodeState::Removed => {
                        return Err(PlacementError::NodeRemoved(*node_id));
                    }
                    Some(existing) if existing.addr != info.addr => {
                        return Err(PlacementError::AddressConflict {
                            node: *node_id,
                            existing: existing.addr.clone(),
                        });
                    }
                    Some(existing) => existing.state,
                    None => NodeState::Active,
                };
                // A zone set by the operator survives a restart of a node that has none
                // configured.
                let zone = match self.nodes.get(node_id) {
                    Some(existing) if info.zone.is_empty() => existing.zone.clone(),
                    _ => info.zone.clone(),
                };
                self.nodes.insert(
                    *node_id,
                    NodeInfo {
                        state,
                        zone,
                        ..info.clone()
                    },
                );
                Ok(())
            }
            MetaCommand::SetNodeState { node_id, state } => {
                let hosted = self.groups.values().filter(|g| g.hosts(*node_id)).count()
                    + usize::from(self.metadata_voters.contains(node_id));
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or(PlacementError::UnknownNode(*node_id))?;
                if node.state == *state {
                    return Ok(());
                }
                if node.state == NodeState::Removed {
                    return Err(PlacementError::NodeRemoved(*node_id));
                }
                if *state == NodeState::Removed && hosted > 0 {
                    return Err(PlacementError::NotEmpty {
                        node: *node_id,
                        replicas: hosted,
                    });
                }
                node.state = *state;
                Ok(())
            }
            MetaCommand::GroupInitialized { group } => {
                self.group_mut(*group)?.initialized = true;
                Ok(())
            }
            MetaCommand::AddLearner { group, node } => {
                let info = self
                    .nodes
                    .get(node)
                    .ok_or(PlacementError::UnknownNode(*node))?;
                if info.state != NodeState::Active {
                    return Err(PlacementError::NodeNotActive {
                        node: *node,
                        state: info.state,
                    });
                }
                let g = self.group_mut(*group)?;
                if g.hosts(*node) {
                    return Err(PlacementError::AlreadyHosted {
                        group: *group,
                        node: *node,
                    });
                }
                g.learners.push(*node);
                Ok(())
            }
            MetaCommand::PromoteLearner { group, node } => {
                let g = self.group_mut(*group)?;
                if g.voters.contains(node) {
                    return Ok(());
                }
                let pos =
                    g.learners
                        .iter()
                        .position(|n| n == node)
                        .ok_or(PlacementError::NotHosted {
                            group: *group,
                            node: *node,
                        })?;
                g.learners.remove(pos);
                g.voters.push(*node);
                Ok(())
            }
            MetaCommand::RemoveReplica { group, node } => {
                let g = self.group_mut(*group)?;
                if let Some(pos) = g.learners.iter().position(|n| n == node) {
                    g.learners.remove(pos);
                    return Ok(());
                }
                let pos =
                    g.voters
                        .iter()
                        .position(|n| n == node)
                        .ok_or(PlacementError::NotHosted {
                            group: *group,
                            node: *node,
                        })?;
                if g.voters.len() <= REPLICATION_FACTOR {
                    return Err(PlacementError::BelowReplicationFactor {
                        group: *group,
                        left: g.voters.len() - 1,
                    });
                }
                g.voters.remove(pos);
                Ok(())
            }
            MetaCommand::SetMetadataVoters { voters } => {
                let distinct: BTreeSet<&NodeId> = voters.iter().collect();
                if distinct.len() != voters.len() || voters.len() < REPLICATION_FACTOR {
                    return Err(PlacementError::BelowReplicationFactor {
                        group: 0,
                        left: distinct.len(),
                    });
                }
                for v in voters {
                    match self.nodes.get(v) {
                        None => return Err(PlacementError::UnknownNode(*v)),
                        Some(n) if n.state == NodeState::Removed => {
                            return Err(PlacementError::NodeNotActive {
                                node: *v,
                                state: n.state,
                            })
                        }
                        Some(_) => {}
                    }
                }
                self.metadata_voters = voters.clone();
                Ok(())
            }
            MetaCommand::SetNodeZone { node_id, zone } => {
                let node = self
                    .nodes
                    .get_mut(node_id)
                    .ok_or(PlacementError::UnknownNode(*node_id))?;
                node.zone = zone.clone();
                Ok(())
            }
            MetaCommand::SetPreferredLeader { group, node } => {
                let g = self.group_mut(*group)?;
                let pos =
                    g.voters
                        .iter()
                        .position(|n| n == node)
                        .ok_or(PlacementError::NotHosted {
                            group: *group,
                            node: *node,
                        })?;
                g.voters.swap(0, pos);
                Ok(())
            }
        }
    }

    fn group_mut(&mut self, group: GroupId) -> Result<&mut GroupPlacement, PlacementError> {
        self.groups
            .get_mut(&group)
            .ok_or(PlacementError::UnknownGroup(group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(addr: &str) -> NodeInfo {
        NodeInfo {
            addr: addr.into(),
            http_addr: String::new(),
            zone: String::new(),
            state: NodeState::Active,
            client_addr: String::new(),
        }
    }

    fn bootstrapped(groups: u32) -> PlacementMap {
        let mut map = PlacementMap::default();
        let nodes = (1..=3)
            .map(|i| (i, node(&format!("127.0.0.1:{i}"))))
            .collect();
        assert_eq!(
            map.apply(&MetaCommand::Bootstrap {
                nodes,
                shard_groups: groups
            }),
            MetaResponse::Ok { epoch: 1 }
        );
        map
    }

    #[test]
    fn slot_function_is_stable() {
        // These values are part of the on-disk format: if this test fails, data moved.
        assert_eq!(slot_of(""), 0);
        assert_eq!(slot_of("123456789"), 0x31C3 % SLOT_COUNT);
        assert_eq!(slot_of("dm:alice:bob"), slot_of("dm:alice:bob"));
        assert!(slot_of("anything at all") < SLOT_COUNT);
    }

    #[test]
    fn bootstrap_covers_every_slot_once_and_spreads_leaders() {
        let map = bootstrapped(12);
        for slot in 0..SLOT_COUNT {
            let owners = map.groups.values().filter(|g| g.owns(slot)).count();
            assert_eq!(owners, 1, "slot {slot}");
        }
        let mut preferred = BTreeMap::new();
        for g in map.groups.values() {
            assert_eq!(g.voters.iter().collect::<BTreeSet<_>>().len(), 3);
            *preferred.entry(g.voters[0]).or_insert(0) += 1;
        }
        assert_eq!(
            preferred.values().copied().collect::<Vec<_>>(),
            vec![4, 4, 4]
        );
    }

    #[test]
    fn bootstrap_is_one_time_and_validated() {
        let mut map = bootstrapped(4);
        let again = MetaCommand::Bootstrap {
            nodes: map.nodes.clone(),
            shard_groups: 4,
        };
        assert_eq!(
            map.apply(&again),
            MetaResponse::Refused(PlacementError::AlreadyBootstrapped { epoch: 1 })
        );
        let mut fresh = PlacementMap::default();
        let two = (1..=2).map(|i| (i, node("a"))).collect();
        assert_eq!(
            fresh.apply(&MetaCommand::Bootstrap {
                nodes: two,
                shard_groups: 4
            }),
            MetaResponse::Refused(PlacementError::WrongNodeCount { got: 2 })
        );
        assert_eq!(
            fresh.apply(&MetaCommand::GroupInitialized { group: 1 }),
            MetaResponse::Refused(PlacementError::NotBootstrapped)
        );
    }

    #[test]
    fn replica_moves_never_go_below_the_replication_factor() {
        let mut map = bootstrapped(2);
        assert!(matches!(
            map.apply(&MetaCommand::RemoveReplica { group: 1, node: 1 }),
            MetaResponse::Refused(PlacementError::BelowReplicationFactor { .. })
        ));
        map.apply(&MetaCommand::RegisterNode {
            node_id: 4,
            info: node("127.0.0.1:4"),
        });
        assert_eq!(map.pick_target(1), Some(4));
        assert!(matches!(
            map.apply(&MetaCommand::AddLearner { group: 1, node: 4 }),
            MetaResponse::Ok { .. }
        ));
        assert!(matches!(
            map.apply(&MetaCommand::AddLearner { group: 1, node: 4 }),
            MetaResponse::Refused(PlacementError::AlreadyHosted { .. })
        ));
        assert!(matches!(
            map.apply(&MetaCommand::PromoteLearner { group: 1, node: 4 }),
            MetaResponse::Ok { .. }
        ));
        assert!(matches!(
            map.apply(&MetaCommand::RemoveReplica { group: 1, node: 1 }),
            MetaResponse::Ok { .. }
        ));
        assert_eq!(map.groups[&1].voters, vec![2, 3, 4]);
    }

    #[test]
    fn metadata_voters_are_validated() {
        let mut map = bootstrapped(1);
        map.apply(&MetaCommand::RegisterNode {
            node_id: 4,
            info: node("4"),
        });
        let set = |v: Vec<NodeId>| MetaCommand::SetMetadataVoters { voters: v };
        assert!(matches!(
            map.apply(&set(vec![2, 3, 4])),
            MetaResponse::Ok { .. }
        ));
        assert_eq!(map.replica_set(0).map(|g| g.voters), Some(vec![2, 3, 4]));
        assert!(matches!(
            map.apply(&set(vec![2, 3])),
            MetaResponse::Refused(PlacementError::BelowReplicationFactor { .. })
        ));
        assert!(matches!(
            map.apply(&set(vec![2, 2, 3])),
            MetaResponse::Refused(PlacementError::BelowReplicationFactor { .. })
        ));
        assert_eq!(
            map.apply(&set(vec![2, 3, 9])),
            MetaResponse::Refused(PlacementError::UnknownNode(9))
        );
        assert_eq!(map.metadata_voters, vec![2, 3, 4]);
    }

    #[test]
    fn draining_nodes_take_no_replicas() {
        let mut map = bootstrapped(2);
        map.apply(&MetaCommand::RegisterNode {
            node_id: 4,
            info: node("x"),
        });
        map.apply(&MetaCommand::SetNodeState {
            node_id: 4,
            state: NodeState::Draining,
        });
        assert_eq!(map.pick_target(1), None);
        assert!(matches!(
            map.apply(&MetaCommand::AddLearner { group: 1, node: 4 }),
            MetaResponse::Refused(PlacementError::NodeNotActive { .. })
        ));
    }

    #[test]
    fn targets_prefer_unused_zones() {
        let mut map = bootstrapped(1);
        for (id, zone) in [(1, "a"), (2, "a"), (3, "b")] {
            if let Some(n) = map.nodes.get_mut(&id) {
                n.zone = zone.into();
            }
        }
        map.apply(&MetaCommand::RegisterNode {
            node_id: 4,
            info: NodeInfo {
                zone: "a".into(),
                ..node("4")
            },
        });
        map.apply(&MetaCommand::RegisterNode {
            node_id: 5,
            info: NodeInfo {
                zone: "c".into(),
                ..node("5")
            },
        });
        assert_eq!(map.pick_target(1), Some(5));
    }
    #[test]
    fn node_states_survive_re_registration_and_removed_ids_stay_removed() {
        let mut map = bootstrapped(2);
        let four = MetaCommand::RegisterNode {
            node_id: 4,
            info: node("127.0.0.1:4"),
        };
        assert!(matches!(map.apply(&four), MetaResponse::Ok { .. }));
        let drain = MetaCommand::SetNodeState {
            node_id: 4,
            state: NodeState::Draining,
        };
        assert!(matches!(map.apply(&drain), MetaResponse::Ok { .. }));
        // A restart registers again: the drain must not be forgotten.
        assert!(matches!(map.apply(&four), MetaResponse::Ok { .. }));
        assert_eq!(map.nodes[&4].state, NodeState::Draining);
        let remove = MetaCommand::SetNodeState {
            node_id: 4,
            state: NodeState::Removed,
        };
        assert!(matches!(map.apply(&remove), MetaResponse::Ok { .. }));
        assert_eq!(
            map.apply(&four),
            MetaResponse::Refused(PlacementError::NodeRemoved(4))
        );
        assert_eq!(
            map.apply(&MetaCommand::SetNodeState {
                node_id: 4,
                state: NodeState::Active
            }),
            MetaResponse::Refused(PlacementError::NodeRemoved(4))
        );
    }

    #[test]
    fn a_node_that_still_hosts_replicas_cannot_be_removed() {
        let mut map = bootstrapped(2);
        assert_eq!(
            map.apply(&MetaCommand::SetNodeState {
                node_id: 1,
                state: NodeState::Removed
            }),
            MetaResponse::Refused(PlacementError::NotEmpty {
                node: 1,
                replicas: 3
            })
        );
        assert_eq!(map.nodes[&1].state, NodeState::Active);
    }

    #[test]
    fn a_zone_set_by_the_operator_survives_re_registration() {
        let mut map = bootstrapped(1);
        let zone = MetaCommand::SetNodeZone {
            node_id: 2,
            zone: "eu-1b".into(),
        };
        assert!(matches!(map.apply(&zone), MetaResponse::Ok { .. }));
        let again = MetaCommand::RegisterNode {
            node_id: 2,
            info: node("127.0.0.1:2"),
        };
        assert!(matches!(map.apply(&again), MetaResponse::Ok { .. }));
        assert_eq!(map.nodes[&2].zone, "eu-1b");
        assert_eq!(
            map.apply(&MetaCommand::SetNodeZone {
                node_id: 9,
                zone: "x".into()
            }),
            MetaResponse::Refused(PlacementError::UnknownNode(9))
        );
    }
}
