//! What the operator observes before it plans: the Kubernetes objects it owns and the
//! Parley cluster's own view (node registry, shard groups, leaders), reduced to the
//! facts the planner decides on. Plain data, so the planner stays a pure function.

use std::collections::BTreeMap;

use crate::crd::{ParleyClusterSpec, ParleyClusterStatus};

pub type NodeId = u64;
pub type GroupId = u64;
/// The metadata group's id in the cluster's admin API.
pub const METADATA_GROUP: GroupId = 0;

/// Everything one reconcile pass knows.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Unix seconds.
    pub now: i64,
    pub generation: i64,
    pub spec: ParleyClusterSpec,
    /// The status last written: the operation ledger and member ids live here.
    pub status: ParleyClusterStatus,
    pub kube: KubeView,
    /// `None` when no node answered: the operator may be on the wrong side of a partition,
    /// so it changes nothing.
    pub cluster: Option<ClusterView>,
}

/// The Kubernetes objects the operator owns.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct KubeView {
    pub statefulset: Option<StatefulSetView>,
    /// By ordinal.
    pub pods: BTreeMap<i32, PodView>,
    /// Node volumes by ordinal.
    pub volumes: BTreeMap<i32, VolumeView>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StatefulSetView {
    pub replicas: i32,
    pub partition: i32,
    /// The revision pods are updated to.
    pub update_revision: String,
    /// The pod-template digest it was last applied with (`parley.io/template-hash`);
    /// `None` before the first apply or when the annotation is missing.
    pub template_hash: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct PodView {
    pub uid: String,
    pub ready: bool,
    /// The StatefulSet revision the pod was created from.
    pub revision: String,
    /// The node id the pod's `parley-node` reports, when its admin API answers.
    pub answering_as: Option<NodeId>,
    /// Positive evidence that the Kubernetes node the pod was scheduled on no longer exists.
    pub host_gone: bool,
    /// The zone label (`spec.zoneKey`) of the pod's Kubernetes node; empty when unknown.
    pub zone: String,
    pub terminating: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct VolumeView {
    /// The claim's uid: deletes carry it as a precondition.
    pub uid: String,
    /// Positive evidence that the bound volume (or the node it is pinned to) is gone.
    pub volume_gone: bool,
}

/// The cluster's own view, from a node's admin API.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClusterView {
    pub nodes: BTreeMap<NodeId, NodeView>,
    /// Shard groups (not the metadata group).
    pub groups: BTreeMap<GroupId, GroupView>,
    pub metadata: GroupView,
}

/// Registry state of a node, as the metadata group records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeState {
    Active,
    Draining,
    Maintenance,
    Removed,
}

impl NodeState {
    pub fn parse(s: &str) -> Option<NodeState> {
        Some(match s {
            "active" => NodeState::Active,
            "draining" => NodeState::Draining,
            "maintenance" => NodeState::Maintenance,
            "removed" => NodeState::Removed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Active => "active",
            NodeState::Draining => "draining",
            NodeState::Maintenance => "maintenance",
            NodeState::Removed => "removed",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub state: NodeState,
    /// Answered the cluster's status probe.
    pub reachable: bool,
    /// Caught up with every group it hosts.
    pub ready: bool,
    pub zone: String,
    /// What the node reported of its storage; `None` when it did not say.
    pub disk: Option<DiskView>,
}

/// A node's data size and the file system holding it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskView {
    pub data: u64,
    pub available: u64,
    pub capacity: u64,
}

/// One Raft group: voters (the first is the preferred leader), learners, current leader.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GroupView {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub leader: Option<NodeId>,
}

impl GroupView {
    pub fn hosts(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }
}

impl ClusterView {
    /// The metadata group and then every shard group, in id order.
    pub fn all_groups(&self) -> impl Iterator<Item = (GroupId, &GroupView)> {
        std::iter::once((METADATA_GROUP, &self.metadata))
            .chain(self.groups.iter().map(|(id, g)| (*id, g)))
    }

    pub fn group(&self, id: GroupId) -> Option<&GroupView> {
        if id == METADATA_GROUP {
            Some(&self.metadata)
        } else {
            self.groups.get(&id)
        }
    }

    /// Whether `node` is registered, reachable and in the given state.
    pub fn is_live(&self, node: NodeId) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|n| n.reachable && n.state != NodeState::Removed)
    }

    /// Replicas (voters and learners, metadata included) each non-removed node holds.
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state != NodeState::Removed)
            .map(|(id, _)| (*id, 0))
            .collect();
        for (_, g) in self.all_groups() {
            for n in g.voters.iter().chain(&g.learners) {
                *counts.entry(*n).or_default() += 1;
            }
        }
        counts
    }

    /// Groups each node is the preferred leader of (first voter).
    pub fn preferred_leader_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts: BTreeMap<NodeId, usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(id, _)| (*id, 0))
            .collect();
        for g in self.groups.values() {
            if let Some(first) = g.voters.first() {
                *counts.entry(*first).or_default() += 1;
            }
        }
        counts
    }

    /// Groups with no leader: they cannot commit, and nothing automatic may touch them.
    pub fn leaderless(&self) -> Vec<GroupId> {
        self.all_groups()
            .filter(|(_, g)| g.leader.is_none())
            .map(|(id, _)| id)
            .collect()
    }

    /// Groups with fewer than three voters on live nodes.
    pub fn under_replicated(&self) -> Vec<GroupId> {
        self.all_groups()
            .filter(|(_, g)| g.voters.iter().filter(|n| self.is_live(**n)).count() < 3)
            .map(|(id, _)| id)
            .collect()
    }
}
