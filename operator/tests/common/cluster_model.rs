//! An in-memory model of a Parley cluster's placement, for planner property tests and the
//! simulation: nodes (registry state, up or down, zone), groups (voters, learners,
//! leader), and the admin API's rules for each step, including the ones the real node
//! enforces (a group keeps three voters; a removed id is never reused; only an empty
//! node can be removed). Elections are immediate: a group whose leader is gone elects
//! its first live voter if a majority of voters is live.

#![allow(dead_code)]

use std::collections::BTreeMap;

use parley_operator::model::{
    ClusterView, DiskView, GroupId, GroupView, NodeId, NodeState, NodeView, METADATA_GROUP,
};
use parley_operator::planner::Step;

#[derive(Clone, Debug)]
pub struct NodeModel {
    pub state: NodeState,
    pub up: bool,
    pub zone: String,
    /// Storage the node reports (none by default: the planner cannot tell).
    pub disk: Option<DiskView>,
}

#[derive(Clone, Debug, Default)]
pub struct GroupModel {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub leader: Option<NodeId>,
}

#[derive(Clone, Debug, Default)]
pub struct ClusterModel {
    pub nodes: BTreeMap<NodeId, NodeModel>,
    pub groups: BTreeMap<GroupId, GroupModel>,
    pub metadata: GroupModel,
    /// Violations seen while applying steps (a group taken below quorum, ...).
    pub violations: Vec<String>,
}

impl ClusterModel {
    /// A bootstrapped cluster on three nodes, voters rotated as the node does.
    pub fn bootstrap(ids: [NodeId; 3], groups: u32, zones: &[&str]) -> ClusterModel {
        let mut m = ClusterModel::default();
        for (i, id) in ids.iter().enumerate() {
            m.nodes.insert(
                *id,
                NodeModel {
                    state: NodeState::Active,
                    up: true,
                    zone: zones.get(i).map(|z| z.to_string()).unwrap_or_default(),
                    disk: None,
                },
            );
        }
        for g in 0..groups {
            let voters: Vec<NodeId> = (0..3).map(|k| ids[(g as usize + k) % 3]).collect();
            m.groups.insert(
                u64::from(g) + 1,
                GroupModel {
                    leader: Some(voters[0]),
                    voters,
                    learners: vec![],
                },
            );
        }
        m.metadata = GroupModel {
            voters: ids.to_vec(),
            learners: vec![],
            leader: Some(ids[0]),
        };
        m
    }

    pub fn register(&mut self, id: NodeId, zone: &str) -> Result<(), String> {
        match self.nodes.get_mut(&id) {
            Some(n) if n.state == NodeState::Removed => Err(format!("node {id} was removed")),
            Some(n) => {
                n.up = true;
                Ok(())
            }
            None => {
                self.nodes.insert(
                    id,
                    NodeModel {
                        state: NodeState::Active,
                        up: true,
                        zone: zone.into(),
                        disk: None,
                    },
                );
                Ok(())
            }
        }
    }

    pub fn set_up(&mut self, id: NodeId, up: bool) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.up = up;
        }
        self.elect();
    }

    fn live(&self, id: NodeId) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.up && n.state != NodeState::Removed)
    }

    fn groups_mut(&mut self) -> impl Iterator<Item = (GroupId, &mut GroupModel)> {
        std::iter::once((METADATA_GROUP, &mut self.metadata))
            .chain(self.groups.iter_mut().map(|(id, g)| (*id, g)))
    }

    /// Leaders on dead nodes step down; a group with a live majority elects.
    pub fn elect(&mut self) {
        let live: BTreeMap<NodeId, bool> = self
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.up && n.state != NodeState::Removed))
            .collect();
        for (_, g) in self.groups_mut() {
            if g.leader
                .is_some_and(|l| !live.get(&l).copied().unwrap_or(false))
            {
                g.leader = None;
            }
            let up = g
                .voters
                .iter()
                .filter(|v| live.get(v).copied().unwrap_or(false))
                .count();
            // A leader that cannot reach a majority steps down.
            if up * 2 <= g.voters.len() {
                g.leader = None;
            }
            if g.leader.is_none() && up * 2 > g.voters.len() {
                g.leader = g
                    .voters
                    .iter()
                    .copied()
                    .find(|v| live.get(v).copied().unwrap_or(false));
            }
        }
    }

    pub fn view(&self) -> ClusterView {
        let conv = |g: &GroupModel| GroupView {
            voters: g.voters.clone(),
            learners: g.learners.clone(),
            leader: g.leader,
        };
        ClusterView {
            nodes: self
                .nodes
                .iter()
                .map(|(id, n)| {
                    (
                        *id,
                        NodeView {
                            state: n.state,
                            reachable: n.up,
                            ready: n.up,
                            zone: n.zone.clone(),
                            disk: n.disk,
                        },
                    )
                })
                .collect(),
            groups: self.groups.iter().map(|(id, g)| (*id, conv(g))).collect(),
            metadata: conv(&self.metadata),
        }
    }

    fn group_mut(&mut self, id: GroupId) -> Result<&mut GroupModel, String> {
        if id == METADATA_GROUP {
            Ok(&mut self.metadata)
        } else {
            self.groups
                .get_mut(&id)
                .ok_or_else(|| format!("unknown group {id}"))
        }
    }

    fn check_quorum(&mut self, gid: GroupId, what: &str) {
        let live: Vec<bool> = {
            let g = if gid == METADATA_GROUP {
                &self.metadata
            } else {
                &self.groups[&gid]
            };
            g.voters.iter().map(|v| self.live(*v)).collect()
        };
        let up = live.iter().filter(|l| **l).count();
        if up * 2 <= live.len() {
            self.violations.push(format!(
                "{what} left group {gid} without a live majority ({up}/{})",
                live.len()
            ));
        }
        if live.len() < 3 {
            self.violations.push(format!(
                "{what} left group {gid} with {} voters",
                live.len()
            ));
        }
    }

    /// Applies a cluster step with the node's rules; `Err` is what the node would answer.
    pub fn apply(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::AddReplica { group, node } => {
                let target_ok = self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.state == NodeState::Active && n.up);
                let g = self.group_mut(*group)?;
                if g.leader.is_none() {
                    return Err(format!("group {group} has no leader"));
                }
                if g.voters.contains(node) {
                    return Err(format!("node {node} already hosts group {group}"));
                }
                if !target_ok {
                    return Err(format!("node {node} is not an active live node"));
                }
                g.learners.retain(|l| l != node);
                g.voters.push(*node);
                self.check_quorum(*group, "add");
                Ok(())
            }
            Step::RemoveReplica { group, node } => {
                let g = self.group_mut(*group)?;
                if g.leader.is_none() {
                    return Err(format!("group {group} has no leader"));
                }
                if let Some(pos) = g.learners.iter().position(|l| l == node) {
                    g.learners.remove(pos);
                    return Ok(());
                }
                let Some(pos) = g.voters.iter().position(|v| v == node) else {
                    return Err(format!("node {node} does not host group {group}"));
                };
                if g.voters.len() <= 3 {
                    return Err(format!("group {group} would drop below three voters"));
                }
                g.voters.remove(pos);
                if g.leader == Some(*node) {
                    g.leader = None;
                }
                self.elect();
                self.check_quorum(*group, "remove");
                Ok(())
            }
            Step::TransferLeader { group, to } => {
                let live = self.live(*to);
                let g = self.group_mut(*group)?;
                if g.leader.is_none() {
                    return Err(format!("group {group} has no leader"));
                }
                let Some(pos) = g.voters.iter().position(|v| v == to) else {
                    return Err(format!("node {to} is not a voter of group {group}"));
                };
                if !live {
                    return Err(format!("node {to} is down"));
                }
                if *group != METADATA_GROUP {
                    g.voters.swap(0, pos);
                }
                g.leader = Some(*to);
                Ok(())
            }
            Step::SetNodeState { node, state } => {
                let hosted = self
                    .groups
                    .values()
                    .chain(std::iter::once(&self.metadata))
                    .filter(|g| g.voters.contains(node) || g.learners.contains(node))
                    .count();
                let n = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| format!("unknown node {node}"))?;
                if n.state == *state {
                    return Ok(());
                }
                if n.state == NodeState::Removed {
                    return Err(format!("node {node} was removed"));
                }
                if *state == NodeState::Removed && hosted > 0 {
                    return Err(format!("node {node} still hosts {hosted} replicas"));
                }
                n.state = *state;
                Ok(())
            }
            Step::SetNodeZone { node, zone } => {
                let n = self
                    .nodes
                    .get_mut(node)
                    .ok_or_else(|| format!("unknown node {node}"))?;
                n.zone = zone.clone();
                Ok(())
            }
            Step::Bootstrap { .. } => Err("already bootstrapped".into()),
            Step::DeletePod { .. } | Step::DeleteVolume { .. } => Err("not a cluster step".into()),
        }
    }

    /// Replica counts of active live nodes, for balance checks.
    pub fn is_balanced(&self) -> bool {
        let view = self.view();
        let counts = view.replica_counts();
        let active: Vec<usize> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active && n.up)
            .map(|(id, _)| counts.get(id).copied().unwrap_or(0))
            .collect();
        let leads: Vec<usize> = view.preferred_leader_counts().into_values().collect();
        let spread = |v: &[usize]| v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0);
        let zones: std::collections::BTreeSet<&str> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.up && !n.zone.is_empty())
            .map(|n| n.zone.as_str())
            .collect();
        let replicas_even = if zones.len() >= 3 {
            // Zones hold one replica of every group each: even within each zone.
            zones.iter().all(|z| {
                let in_zone: Vec<usize> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.state == NodeState::Active && n.up && n.zone == *z)
                    .map(|(id, _)| counts.get(id).copied().unwrap_or(0))
                    .collect();
                spread(&in_zone) <= 1
            }) && self.zone_conflicts().is_empty()
        } else {
            spread(&active) <= 1
        };
        replicas_even && (spread(&leads) <= 1 || !self.leader_chain_exists())
    }

    /// Whether a chain of preferred-leader hand-overs (each to another voter of the same
    /// group) leads from a node with the most preferred leaderships to one with at least
    /// two fewer. Without one, leaders are as even as the replica layout allows.
    pub fn leader_chain_exists(&self) -> bool {
        let view = self.view();
        let leads = view.preferred_leader_counts();
        let Some(&max) = leads.values().max() else {
            return false;
        };
        let active = |id: &NodeId| {
            self.nodes
                .get(id)
                .is_some_and(|n| n.state == NodeState::Active && n.up)
        };
        let mut seen: std::collections::BTreeSet<NodeId> = leads
            .iter()
            .filter(|(_, n)| **n == max)
            .map(|(id, _)| *id)
            .collect();
        let mut queue: Vec<NodeId> = seen.iter().copied().collect();
        while let Some(u) = queue.pop() {
            if leads.get(&u).copied().unwrap_or(0) + 2 <= max {
                return true;
            }
            for g in self.groups.values() {
                if g.voters.first() == Some(&u) {
                    for v in g.voters.iter().skip(1).filter(|v| active(v)) {
                        if seen.insert(*v) {
                            queue.push(*v);
                        }
                    }
                }
            }
        }
        false
    }

    /// Every group: three voters on distinct nodes, no learner, a leader.
    pub fn is_settled(&self) -> bool {
        std::iter::once(&self.metadata)
            .chain(self.groups.values())
            .all(|g| {
                let mut v = g.voters.clone();
                v.sort_unstable();
                v.dedup();
                v.len() == 3 && g.voters.len() == 3 && g.learners.is_empty() && g.leader.is_some()
            })
    }

    /// Voters of some group share a zone while three or more zones have live nodes.
    pub fn zone_conflicts(&self) -> Vec<GroupId> {
        let zones: std::collections::BTreeSet<&str> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Active && n.up && !n.zone.is_empty())
            .map(|n| n.zone.as_str())
            .collect();
        if zones.len() < 3 {
            return vec![];
        }
        self.groups
            .iter()
            .filter(|(_, g)| {
                let mut z: Vec<&str> = g
                    .voters
                    .iter()
                    .filter_map(|v| self.nodes.get(v))
                    .map(|n| n.zone.as_str())
                    .collect();
                z.sort_unstable();
                let before = z.len();
                z.dedup();
                z.len() != before
            })
            .map(|(id, _)| *id)
            .collect()
    }
}
