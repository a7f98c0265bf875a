//! The planner: a pure function from what the operator observed to the next status and
//! at most a few idempotent steps. No I/O, no clock: the same observation always gives
//! the same plan, so every decision is unit- and property-tested.
//!
//! Rules it keeps:
//! - One topology operation at a time (bootstrap, scale-out, scale-in, failover,
//!   rebalance, rolling upgrade), recorded in `status.operation` before its side effects.
//! - No step takes a group below quorum: a replica is added (learner, catch up, promote)
//!   before one is removed, and nothing touches a cluster where a group has no leader.
//! - The desired size comes only from the spec; the StatefulSet shrinks only after the
//!   node was drained and removed from membership, and a drain starts only when no node
//!   is down, no group is under-replicated and the other nodes have room for its data.
//! - Node ids are never reused; a replaced node gets a new one.

use std::collections::{BTreeMap, BTreeSet};

use crate::crd::{
    Condition, GroupCounts, MemberState, MemberStatus, Operation, OperationType,
    ParleyClusterStatus,
};
use crate::model::{ClusterView, GroupId, NodeId, NodeState, Observed, METADATA_GROUP};

/// Replicas per group.
const RF: usize = 3;
/// Seconds in the failover budget's window.
const DAY: i64 = 24 * 3600;

/// One idempotent action. Cluster steps go to a node's admin API; Kubernetes steps to the
/// API server. The StatefulSet's size and partition are not steps: they follow from the
/// status ([`desired_pods`], [`partition`]) and are applied every pass.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Create the metadata group and the shard groups on the first three nodes.
    Bootstrap {
        nodes: Vec<NodeId>,
        shard_groups: u32,
    },
    /// Add a replica (learner, catch up, promote). "Already a voter" counts as done.
    AddReplica {
        group: GroupId,
        node: NodeId,
    },
    /// Remove a replica; the group keeps three voters. "Not hosted" counts as done.
    RemoveReplica {
        group: GroupId,
        node: NodeId,
    },
    /// Move a group's leadership (and preference) to another voter.
    TransferLeader {
        group: GroupId,
        to: NodeId,
    },
    SetNodeState {
        node: NodeId,
        state: NodeState,
    },
    /// Record the zone of the node's host in the cluster's registry.
    SetNodeZone {
        node: NodeId,
        zone: String,
    },
    /// Delete a pod; `uid` is a precondition.
    DeletePod {
        ordinal: i32,
        uid: String,
    },
    /// Delete a node's volume claim; `uid` is a precondition.
    DeleteVolume {
        ordinal: i32,
        uid: String,
    },
}

impl Step {
    /// Short name, for events and metrics.
    pub fn action(&self) -> &'static str {
        match self {
            Step::Bootstrap { .. } => "bootstrap",
            Step::AddReplica { .. } => "add_replica",
            Step::RemoveReplica { .. } => "remove_replica",
            Step::TransferLeader { .. } => "transfer_leader",
            Step::SetNodeState { .. } => "set_node_state",
            Step::SetNodeZone { .. } => "set_node_zone",
            Step::DeletePod { .. } => "delete_pod",
            Step::DeleteVolume { .. } => "delete_volume",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Step::Bootstrap {
                nodes,
                shard_groups,
            } => format!("bootstrap nodes {nodes:?} with {shard_groups} shard groups"),
            Step::AddReplica { group, node } => {
                format!("add a replica of group {group} on node {node}")
            }
            Step::RemoveReplica { group, node } => {
                format!("remove node {node}'s replica of group {group}")
            }
            Step::TransferLeader { group, to } => {
                format!("move leadership of group {group} to node {to}")
            }
            Step::SetNodeState { node, state } => format!("mark node {node} {}", state.as_str()),
            Step::SetNodeZone { node, zone } => format!("record node {node} in zone {zone:?}"),
            Step::DeletePod { ordinal, .. } => format!("delete pod {ordinal}"),
            Step::DeleteVolume { ordinal, .. } => format!("delete the volume of pod {ordinal}"),
        }
    }
}

/// Something worth an Event on the ParleyCluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub reason: String,
    pub note: String,
    pub warning: bool,
}

/// The planner's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub status: ParleyClusterStatus,
    /// Steps to run now, in order; several only for concurrent rebalancing moves of
    /// distinct groups.
    pub steps: Vec<Step>,
    pub notices: Vec<Notice>,
}

/// Pods the StatefulSet should have: one per member that is not removed.
pub fn desired_pods(status: &ParleyClusterStatus) -> i32 {
    status
        .members
        .iter()
        .filter(|m| m.state != MemberState::Removed)
        .count() as i32
}

/// The StatefulSet partition: pods at or above it run the newest template. Outside a
/// rollout it holds at the pod count, so no pod is replaced without the operator.
pub fn partition(status: &ParleyClusterStatus) -> i32 {
    status.partition.unwrap_or_else(|| desired_pods(status))
}

struct Planner<'a> {
    obs: &'a Observed,
    st: ParleyClusterStatus,
    notices: Vec<Notice>,
    /// What blocks progress (shown first in the Degraded condition).
    degraded: Vec<(String, String)>,
    /// Symptoms: under-replicated groups, nodes down (shown when nothing is blocked).
    symptoms: Vec<(String, String)>,
    progressing: Option<(String, String)>,
}

/// Plans one reconcile pass.
pub fn plan(obs: &Observed) -> Plan {
    let mut p = Planner {
        obs,
        st: obs.status.clone(),
        notices: Vec::new(),
        degraded: Vec::new(),
        symptoms: Vec::new(),
        progressing: None,
    };
    p.refresh();
    let steps = p.decide();
    p.finish_conditions();
    Plan {
        status: p.st,
        steps,
        notices: p.notices,
    }
}

impl<'a> Planner<'a> {
    fn notice(&mut self, reason: &str, note: String) {
        self.notices.push(Notice {
            reason: reason.into(),
            note,
            warning: false,
        });
    }

    fn warn(&mut self, reason: &str, note: String) {
        self.notices.push(Notice {
            reason: reason.into(),
            note,
            warning: true,
        });
    }

    fn degrade(&mut self, reason: &str, message: String) {
        self.degraded.push((reason.into(), message));
    }

    fn symptom(&mut self, reason: &str, message: String) {
        self.symptoms.push((reason.into(), message));
    }

    fn member_index(&self, ordinal: i32) -> Option<usize> {
        self.st.members.iter().position(|m| m.ordinal == ordinal)
    }

    fn node_of(&self, ordinal: i32) -> Option<NodeId> {
        self.member_index(ordinal)
            .map(|i| self.st.members[i].node_id)
    }

    /// Folds the observation into the status: readiness, replica and leader counts,
    /// down-since times, group health.
    fn refresh(&mut self) {
        let obs = self.obs;
        let now = obs.now;
        if self.st.next_node_id == 0 {
            self.st.next_node_id = 1;
        }
        self.st.failovers.retain(|t| *t > now - DAY);
        let cluster = obs.cluster.as_ref();
        let leaders: BTreeMap<NodeId, u32> = cluster
            .map(|c| {
                let mut m = BTreeMap::new();
                for (_, g) in c.all_groups() {
                    if let Some(l) = g.leader {
                        *m.entry(l).or_default() += 1;
                    }
                }
                m
            })
            .unwrap_or_default();
        let replicas = cluster.map(|c| c.replica_counts()).unwrap_or_default();
        for m in &mut self.st.members {
            let pod = obs.kube.pods.get(&m.ordinal);
            m.ready = pod.is_some_and(|p| p.ready);
            if let Some(c) = cluster {
                m.replicas = replicas.get(&m.node_id).copied().unwrap_or(0) as u32;
                m.leaders = leaders.get(&m.node_id).copied().unwrap_or(0);
                let node = c.nodes.get(&m.node_id);
                let down = matches!(m.state, MemberState::Active | MemberState::Draining)
                    && node.is_some_and(|n| !n.reachable)
                    && !m.ready;
                m.down_since = if down {
                    m.down_since.or(Some(now))
                } else {
                    None
                };
                if m.state == MemberState::Pending
                    && node.is_some_and(|n| n.state != NodeState::Removed)
                {
                    m.state = MemberState::Active;
                    self.notices.push(Notice {
                        reason: "NodeRegistered".into(),
                        note: format!("pod {} registered as node {}", m.ordinal, m.node_id),
                        warning: false,
                    });
                }
            }
        }
        let spec_nodes = obs.spec.nodes;
        self.st.ready_nodes = self.st.members.iter().filter(|m| m.ready).count() as i32;
        self.st.total_nodes = desired_pods(&self.st);
        self.st.nodes_ready = format!("{}/{}", self.st.ready_nodes, spec_nodes);
        if let Some(c) = cluster {
            let leaderless: BTreeSet<GroupId> = c.leaderless().into_iter().collect();
            let under: BTreeSet<GroupId> = c.under_replicated().into_iter().collect();
            let total = c.groups.len() as u32;
            let healthy = c
                .groups
                .keys()
                .filter(|g| !leaderless.contains(g) && !under.contains(g))
                .count() as u32;
            self.st.groups = GroupCounts {
                total,
                healthy,
                under_replicated: c.groups.keys().filter(|g| under.contains(g)).count() as u32,
                leaderless: c.groups.keys().filter(|g| leaderless.contains(g)).count() as u32,
            };
            self.st.groups_healthy = format!("{healthy}/{total}");
            if !c.groups.is_empty() || c.metadata.leader.is_some() {
                self.st.bootstrapped = true;
            }
        }
        self.st.observed_generation = Some(obs.generation);
    }

    fn decide(&mut self) -> Vec<Step> {
        let obs = self.obs;
        if self.st.members.is_empty() {
            // A new cluster: three pods with ids 1..3, bootstrapped once they answer.
            for ordinal in 0..RF as i32 {
                let id = self.st.next_node_id;
                self.st.next_node_id += 1;
                self.st.members.push(MemberStatus {
                    ordinal,
                    node_id: id,
                    state: MemberState::Pending,
                    ready: false,
                    replicas: 0,
                    leaders: 0,
                    down_since: None,
                });
            }
            self.st.total_nodes = desired_pods(&self.st);
            self.start(OperationType::Bootstrap, "CreatingPods", vec![0, 1, 2], 1);
            return vec![];
        }
        if obs.spec.paused {
            self.progressing = Some((
                "Paused".into(),
                "spec.paused is set: no action is taken".into(),
            ));
            // Status stays current while paused: health is still reported.
            if let Some(c) = obs.cluster.as_ref() {
                self.report_health(c);
                self.quorum_lost(c);
            }
            return vec![];
        }
        if !self.st.bootstrapped {
            return self.bootstrap();
        }
        if let Some(op) = &self.st.operation {
            if op.type_ == OperationType::Bootstrap {
                self.finish("bootstrapped: the metadata group and shard groups are up".into());
            }
        }
        let Some(cluster) = obs.cluster.as_ref() else {
            self.degrade(
                "ClusterUnreachable",
                "no node's admin API answered; nothing is changed until one does".into(),
            );
            return vec![];
        };
        self.report_health(cluster);
        if self.quorum_lost(cluster) {
            return vec![];
        }
        if let Some(steps) = self.continue_operation(cluster) {
            return steps;
        }
        if let Some(steps) = self.housekeeping(cluster) {
            return steps;
        }
        self.choose_operation(cluster)
    }

    /// Whether a group (or the metadata group) has no leader; says so in Degraded.
    fn quorum_lost(&mut self, c: &ClusterView) -> bool {
        let leaderless = c.leaderless();
        if leaderless.is_empty() {
            return false;
        }
        self.degrade(
            "QuorumLost",
            format!(
                "groups {leaderless:?} have no leader; no automatic action until they do \
                 (restore the missing nodes or repair by hand)"
            ),
        );
        true
    }

    fn report_health(&mut self, c: &ClusterView) {
        let under = c.under_replicated();
        if !under.is_empty() {
            self.symptom(
                "UnderReplicated",
                format!("groups {under:?} have fewer than three live voters"),
            );
        }
        let down: Vec<i32> = self
            .st
            .members
            .iter()
            .filter(|m| m.down_since.is_some())
            .map(|m| m.ordinal)
            .collect();
        if !down.is_empty() {
            self.symptom("NodeDown", format!("pods {down:?} are down"));
        }
        if let Some(sts) = &self.obs.kube.statefulset {
            let want = desired_pods(&self.st);
            if sts.replicas != want {
                self.degrade(
                    "OutOfBandChange",
                    format!(
                        "the StatefulSet has {} replicas, the operator wants {want}; \
                         size comes only from spec.nodes, the StatefulSet is set back",
                        sts.replicas
                    ),
                );
            }
        }
    }

    fn start(&mut self, type_: OperationType, phase: &str, targets: Vec<i32>, total: u32) {
        let op = Operation {
            type_,
            phase: phase.into(),
            targets,
            done: 0,
            total,
            point_of_no_return: false,
            started_at: self.obs.now,
            message: String::new(),
            old_pod_uid: None,
            old_volume_uid: None,
            replaced_node: None,
            revision: None,
        };
        self.notice(
            &format!("{type_:?}Started"),
            format!("{type_:?} of pods {:?} started", op.targets),
        );
        self.st.operation = Some(op);
    }

    fn finish(&mut self, note: String) {
        if let Some(op) = self.st.operation.take() {
            self.notice(&format!("{:?}Finished", op.type_), note);
        }
        self.st.partition = None;
    }

    fn op_mut(&mut self) -> &mut Operation {
        self.st
            .operation
            .as_mut()
            .expect("an operation is in flight")
    }

    fn set_phase(&mut self, phase: &str) {
        self.op_mut().phase = phase.into();
    }

    fn bootstrap(&mut self) -> Vec<Step> {
        let answering: Vec<NodeId> = self
            .st
            .members
            .iter()
            .take(RF)
            .filter(|m| {
                self.obs
                    .kube
                    .pods
                    .get(&m.ordinal)
                    .and_then(|p| p.answering_as)
                    == Some(m.node_id)
            })
            .map(|m| m.node_id)
            .collect();
        if answering.len() < RF {
            if let Some(op) = self.st.operation.as_mut() {
                op.phase = "CreatingPods".into();
                op.message = format!("{} of 3 nodes answer", answering.len());
            }
            self.progressing = Some((
                "Bootstrapping".into(),
                format!(
                    "waiting for the first three nodes ({} answer)",
                    answering.len()
                ),
            ));
            return vec![];
        }
        if self.st.operation.is_none() {
            self.start(OperationType::Bootstrap, "Bootstrapping", vec![0, 1, 2], 1);
        }
        self.set_phase("Bootstrapping");
        vec![Step::Bootstrap {
            nodes: answering,
            shard_groups: self.obs.spec.shard_groups.max(1) as u32,
        }]
    }

    /// Work that completes interrupted moves and clears stale marks, whatever operation
    /// is (or is not) running: a leftover learner or a fourth voter from an interrupted
    /// move, a node left in maintenance, a ghost registration.
    fn housekeeping(&mut self, c: &ClusterView) -> Option<Vec<Step>> {
        if let Some(step) = self.finish_interrupted_move(c, None) {
            return Some(vec![step]);
        }
        let rollout_target = self
            .st
            .operation
            .as_ref()
            .filter(|o| o.type_ == OperationType::RollingUpgrade)
            .and_then(|o| o.targets.first().copied())
            .and_then(|ord| self.node_of(ord));
        for (id, n) in &c.nodes {
            if n.state == NodeState::Maintenance && Some(*id) != rollout_target {
                return Some(vec![Step::SetNodeState {
                    node: *id,
                    state: NodeState::Active,
                }]);
            }
        }
        // A drain mark left by an interrupted cancel: the member is active.
        for m in &self.st.members {
            if m.state == MemberState::Active
                && c.nodes.get(&m.node_id).map(|n| n.state) == Some(NodeState::Draining)
            {
                return Some(vec![Step::SetNodeState {
                    node: m.node_id,
                    state: NodeState::Active,
                }]);
            }
        }
        // The registry learns each node's zone from its pod's Kubernetes node, so replicas
        // spread over zones.
        for m in &self.st.members {
            let zone = self
                .obs
                .kube
                .pods
                .get(&m.ordinal)
                .filter(|p| p.answering_as == Some(m.node_id))
                .map(|p| p.zone.clone())
                .unwrap_or_default();
            if !zone.is_empty() && c.nodes.get(&m.node_id).is_some_and(|n| n.zone != zone) {
                return Some(vec![Step::SetNodeZone {
                    node: m.node_id,
                    zone,
                }]);
            }
        }
        let known: BTreeSet<NodeId> = self.st.members.iter().map(|m| m.node_id).collect();
        let counts = c.replica_counts();
        for (id, n) in &c.nodes {
            if !known.contains(id)
                && n.state != NodeState::Removed
                && !n.reachable
                && counts.get(id).copied().unwrap_or(0) == 0
            {
                return Some(vec![Step::SetNodeState {
                    node: *id,
                    state: NodeState::Removed,
                }]);
            }
        }
        None
    }

    /// A group with a learner or more than three voters is mid-move: finish the move.
    /// `leaving` is the node an operation is emptying, preferred for removal.
    fn finish_interrupted_move(&self, c: &ClusterView, leaving: Option<NodeId>) -> Option<Step> {
        for (gid, g) in c.all_groups() {
            if let Some(&learner) = g.learners.first() {
                let usable = c
                    .nodes
                    .get(&learner)
                    .is_some_and(|n| n.reachable && n.state == NodeState::Active)
                    && Some(learner) != leaving;
                return Some(if usable {
                    Step::AddReplica {
                        group: gid,
                        node: learner,
                    }
                } else {
                    Step::RemoveReplica {
                        group: gid,
                        node: learner,
                    }
                });
            }
            if g.voters.len() > RF {
                let victim = self.removal_victim(c, gid, leaving)?;
                if g.leader == Some(victim) {
                    let to = self.leader_target(c, gid, victim)?;
                    return Some(Step::TransferLeader { group: gid, to });
                }
                return Some(Step::RemoveReplica {
                    group: gid,
                    node: victim,
                });
            }
        }
        None
    }

    /// Which voter of an over-replicated group goes: the node being emptied, else a
    /// dead or non-active one, else the most loaded.
    fn removal_victim(
        &self,
        c: &ClusterView,
        gid: GroupId,
        leaving: Option<NodeId>,
    ) -> Option<NodeId> {
        let g = c.group(gid)?;
        if let Some(l) = leaving.filter(|l| g.voters.contains(l)) {
            return Some(l);
        }
        let counts = c.replica_counts();
        let zoned = zones_in_use(c).len() >= RF;
        g.voters.iter().copied().max_by_key(|v| {
            let bad =
                !c.is_live(*v) || c.nodes.get(v).is_some_and(|n| n.state != NodeState::Active);
            // With zones, a voter sharing its zone with another voter goes first.
            let shares_zone = zoned && {
                let z = zone_of(c, *v);
                !z.is_empty() && g.voters.iter().filter(|o| zone_of(c, **o) == z).count() > 1
            };
            (bad, shares_zone, counts.get(v).copied().unwrap_or(0), *v)
        })
    }

    /// A live voter other than `from` to lead `gid`: the one leading the fewest groups.
    fn leader_target(&self, c: &ClusterView, gid: GroupId, from: NodeId) -> Option<NodeId> {
        let g = c.group(gid)?;
        let mut leads: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (_, g) in c.all_groups() {
            if let Some(l) = g.leader {
                *leads.entry(l).or_default() += 1;
            }
        }
        g.voters
            .iter()
            .copied()
            .filter(|v| {
                *v != from
                    && c.is_live(*v)
                    && c.nodes.get(v).is_some_and(|n| n.state == NodeState::Active)
            })
            .min_by_key(|v| (leads.get(v).copied().unwrap_or(0), *v))
    }

    /// Where a new replica of `gid` goes: an active, reachable node not hosting it, in a
    /// zone the group does not use yet when zones exist, then the least loaded.
    fn replica_target(
        &self,
        c: &ClusterView,
        gid: GroupId,
        exclude: &BTreeSet<NodeId>,
    ) -> Option<NodeId> {
        let g = c.group(gid)?;
        let counts = c.replica_counts();
        let used_zones: BTreeSet<&str> = g
            .voters
            .iter()
            .filter(|v| !exclude.contains(v) && c.is_live(**v))
            .filter_map(|v| c.nodes.get(v))
            .map(|n| n.zone.as_str())
            .filter(|z| !z.is_empty())
            .collect();
        c.nodes
            .iter()
            .filter(|(id, n)| {
                n.state == NodeState::Active
                    && n.reachable
                    && !g.hosts(**id)
                    && !exclude.contains(id)
            })
            .min_by_key(|(id, n)| {
                let same_zone = !n.zone.is_empty() && used_zones.contains(n.zone.as_str());
                (same_zone, counts.get(id).copied().unwrap_or(0), **id)
            })
            .map(|(id, _)| *id)
    }

    /// The next step that moves replicas off `node` (add elsewhere first, then remove).
    /// `Ok(None)` once it hosts nothing; `Err` says why it cannot go on.
    fn move_off(&self, c: &ClusterView, node: NodeId) -> Result<Option<Step>, String> {
        if let Some(step) = self.finish_interrupted_move(c, Some(node)) {
            return Ok(Some(step));
        }
        let exclude = BTreeSet::from([node]);
        for (gid, g) in c.all_groups() {
            if !g.hosts(node) {
                continue;
            }
            if g.learners.contains(&node) {
                return Ok(Some(Step::RemoveReplica { group: gid, node }));
            }
            let target = self
                .replica_target(c, gid, &exclude)
                .ok_or_else(|| format!("no node can take group {gid}'s replica"))?;
            return Ok(Some(Step::AddReplica {
                group: gid,
                node: target,
            }));
        }
        Ok(None)
    }

    fn hosted_by(c: &ClusterView, node: NodeId) -> u32 {
        c.all_groups().filter(|(_, g)| g.hosts(node)).count() as u32
    }

    fn continue_operation(&mut self, c: &ClusterView) -> Option<Vec<Step>> {
        let op = self.st.operation.clone()?;
        let steps = match op.type_ {
            OperationType::Bootstrap => {
                self.finish("bootstrapped".into());
                vec![]
            }
            OperationType::ScaleOut => self.continue_scale_out(c, &op),
            OperationType::ScaleIn => self.continue_scale_in(c, &op),
            OperationType::Failover => self.continue_failover(c, &op),
            OperationType::Rebalance => self.continue_rebalance(c),
            OperationType::RollingUpgrade => self.continue_rollout(c, &op),
        };
        if let Some(op) = &self.st.operation {
            self.progressing = Some((
                format!("{:?}", op.type_),
                format!(
                    "{:?} {}: {}/{} {}",
                    op.type_, op.phase, op.done, op.total, op.message
                )
                .trim_end()
                .to_string(),
            ));
        }
        Some(steps)
    }

    fn continue_scale_out(&mut self, c: &ClusterView, op: &Operation) -> Vec<Step> {
        let ordinal = op.targets[0];
        let Some(i) = self.member_index(ordinal) else {
            self.finish(format!("pod {ordinal} is gone"));
            return vec![];
        };
        let m = self.st.members[i].clone();
        if m.state == MemberState::Active {
            self.op_mut().done = 1;
            self.finish(format!("pod {ordinal} joined as node {}", m.node_id));
            return vec![];
        }
        if self.obs.spec.nodes <= ordinal && !c.nodes.contains_key(&m.node_id) {
            // Cancelled before it registered: its pod and the volume the StatefulSet made
            // for it go as in a scale-in (a late registration is marked removed).
            self.finish(format!("scale-out of pod {ordinal} cancelled by the spec"));
            self.st.members[i].state = MemberState::Removed;
            self.start(OperationType::ScaleIn, "DeletingVolume", vec![ordinal], 1);
            return vec![];
        }
        self.op_mut().message = format!("waiting for node {} to register", m.node_id);
        vec![]
    }

    fn continue_scale_in(&mut self, c: &ClusterView, op: &Operation) -> Vec<Step> {
        let ordinal = op.targets[0];
        let Some(i) = self.member_index(ordinal) else {
            self.finish(format!("pod {ordinal} removed"));
            return vec![];
        };
        let node = self.st.members[i].node_id;
        let registry = c.nodes.get(&node).map(|n| n.state);
        match op.phase.as_str() {
            "Draining" => {
                if self.obs.spec.nodes > ordinal {
                    // Raised again before the point of no return: cancel the drain.
                    return self.cancel_drain(
                        i,
                        registry,
                        format!("scale-in of pod {ordinal} cancelled: spec.nodes raised"),
                    );
                }
                if self.failover_due() {
                    // The drain is reversible and a failover needs the operation slot (and
                    // the drain may need the failed node): the failover goes first.
                    return self.cancel_drain(
                        i,
                        registry,
                        format!(
                            "scale-in of pod {ordinal} paused: a failover goes first; it \
                             resumes afterwards"
                        ),
                    );
                }
                self.st.members[i].state = MemberState::Draining;
                if registry == Some(NodeState::Active) {
                    return vec![Step::SetNodeState {
                        node,
                        state: NodeState::Draining,
                    }];
                }
                let left = Self::hosted_by(c, node);
                let total = self.op_mut().total.max(left);
                self.op_mut().total = total;
                self.op_mut().done = total - left;
                match self.move_off(c, node) {
                    Ok(Some(step)) => vec![step],
                    Ok(None) => {
                        let op = self.op_mut();
                        op.phase = "Removing".into();
                        op.point_of_no_return = true;
                        op.message = String::new();
                        vec![Step::SetNodeState {
                            node,
                            state: NodeState::Removed,
                        }]
                    }
                    Err(why) => {
                        self.op_mut().message = why.clone();
                        self.degrade("ScaleInBlocked", why);
                        vec![]
                    }
                }
            }
            "Removing" => {
                if registry.is_some() && registry != Some(NodeState::Removed) {
                    return vec![Step::SetNodeState {
                        node,
                        state: NodeState::Removed,
                    }];
                }
                self.st.members[i].state = MemberState::Removed;
                self.set_phase("DeletingVolume");
                vec![]
            }
            "DeletingVolume" => {
                if self.obs.kube.pods.contains_key(&ordinal) {
                    self.op_mut().message = format!("waiting for pod {ordinal} to stop");
                    return vec![];
                }
                match self.obs.kube.volumes.get(&ordinal) {
                    Some(v) => vec![Step::DeleteVolume {
                        ordinal,
                        uid: v.uid.clone(),
                    }],
                    None => {
                        self.st.members.remove(i);
                        self.finish(format!("pod {ordinal} (node {node}) drained and removed"));
                        vec![]
                    }
                }
            }
            other => {
                self.warn(
                    "UnknownPhase",
                    format!("scale-in phase {other:?} is unknown; restarting the drain"),
                );
                self.set_phase("Draining");
                vec![]
            }
        }
    }

    /// Ends a drain before its point of no return: the registry mark is cleared first
    /// (the operation stays until it is), then the member is active again.
    fn cancel_drain(&mut self, i: usize, registry: Option<NodeState>, note: String) -> Vec<Step> {
        let node = self.st.members[i].node_id;
        if registry == Some(NodeState::Draining) {
            self.op_mut().message = format!("clearing node {node}'s drain mark");
            return vec![Step::SetNodeState {
                node,
                state: NodeState::Active,
            }];
        }
        self.st.members[i].state = MemberState::Active;
        self.finish(note);
        vec![]
    }

    fn continue_failover(&mut self, c: &ClusterView, op: &Operation) -> Vec<Step> {
        let ordinal = op.targets[0];
        let Some(i) = self.member_index(ordinal) else {
            self.finish(format!("pod {ordinal} is gone"));
            return vec![];
        };
        let m = self.st.members[i].clone();
        // The failed node; the member carries a new id once its pod was replaced.
        let dead = op.replaced_node.unwrap_or(m.node_id);
        let replaced = m.node_id != dead;
        let registry = c.nodes.get(&dead).map(|n| n.state);
        match op.phase.as_str() {
            "ReReplicating" => {
                if !replaced && m.down_since.is_none() && registry != Some(NodeState::Removed) {
                    // Back before the point of no return (transient pod loss): stop; what
                    // moved stays moved and rebalancing evens it out.
                    self.finish(format!("node {dead} came back; failover stopped"));
                    return vec![];
                }
                let left = Self::hosted_by(c, dead);
                let total = self.op_mut().total.max(left);
                self.op_mut().total = total;
                self.op_mut().done = total - left;
                match self.move_off(c, dead) {
                    Ok(Some(step)) => vec![step],
                    Ok(None) => {
                        let op = self.op_mut();
                        op.phase = "Removing".into();
                        op.point_of_no_return = true;
                        vec![Step::SetNodeState {
                            node: dead,
                            state: NodeState::Removed,
                        }]
                    }
                    Err(why) if !replaced && self.replacement_allowed(&m) => {
                        // No live node can take the replicas (a three-node cluster):
                        // replace the pod first, then move the replicas onto it.
                        self.notice(
                            "ReplacingNode",
                            format!(
                                "{why}; replacing pod {ordinal} first (its host or volume is gone)"
                            ),
                        );
                        self.begin_replacement(i);
                        vec![]
                    }
                    Err(why) => {
                        self.op_mut().message = why.clone();
                        self.degrade("FailoverBlocked", why);
                        vec![]
                    }
                }
            }
            "Removing" => {
                if registry.is_some() && registry != Some(NodeState::Removed) {
                    return vec![Step::SetNodeState {
                        node: dead,
                        state: NodeState::Removed,
                    }];
                }
                self.st.failovers.push(self.obs.now);
                if replaced {
                    self.warn(
                        "FailedOver",
                        format!(
                            "node {dead} failed over onto node {} (pod {ordinal})",
                            m.node_id
                        ),
                    );
                } else {
                    self.st.members[i].state = MemberState::FailedOver;
                    self.st.members[i].down_since = None;
                    self.warn(
                        "FailedOver",
                        format!("node {dead} (pod {ordinal}) failed over: its replicas live on other nodes"),
                    );
                }
                self.finish(format!("node {dead} failed over"));
                vec![]
            }
            "Replacing" => {
                // The member carries its new id from the start (recorded before any
                // delete), but in state Replacing its configuration is withheld: no pod
                // starts as the new id while the old volume exists.
                if m.state == MemberState::Replacing {
                    let old_volume = op.old_volume_uid.as_deref().and_then(|uid| {
                        self.obs.kube.volumes.get(&ordinal).filter(|v| v.uid == uid)
                    });
                    let old_pod = op
                        .old_pod_uid
                        .as_deref()
                        .and_then(|uid| self.obs.kube.pods.get(&ordinal).filter(|p| p.uid == uid));
                    if old_volume.is_none() && old_pod.is_none() {
                        self.st.members[i].state = MemberState::Pending;
                        self.op_mut().message = format!(
                            "the old pod and volume are gone; starting node {}",
                            m.node_id
                        );
                        return vec![];
                    }
                    self.op_mut().message = "deleting the old pod and volume".into();
                    let mut steps = Vec::new();
                    if let Some(v) = old_volume {
                        steps.push(Step::DeleteVolume {
                            ordinal,
                            uid: v.uid.clone(),
                        });
                    }
                    // Any pod there uses the old volume or has no configuration: none is
                    // a live node. The volume goes once no pod holds it.
                    if let Some(p) = self.obs.kube.pods.get(&ordinal).filter(|p| !p.terminating) {
                        if old_volume.is_some() || old_pod.is_some() {
                            steps.push(Step::DeletePod {
                                ordinal,
                                uid: p.uid.clone(),
                            });
                        }
                    }
                    return steps;
                }
                if m.state == MemberState::Active {
                    if op.replaced_node.is_some()
                        && registry.is_some_and(|r| r != NodeState::Removed)
                    {
                        // Replaced first: now move the failed node's replicas onto it.
                        self.set_phase("ReReplicating");
                        return vec![];
                    }
                    self.finish(format!(
                        "pod {ordinal} replaced; it runs as node {}",
                        m.node_id
                    ));
                    return vec![];
                }
                self.op_mut().message = format!("waiting for node {} to register", m.node_id);
                vec![]
            }
            other => {
                self.warn(
                    "UnknownPhase",
                    format!("failover phase {other:?} is unknown; restarting it"),
                );
                self.set_phase("ReReplicating");
                vec![]
            }
        }
    }

    /// Pod and volume replacement is allowed by the spec and backed by positive evidence
    /// that the pod's Kubernetes node or its volume is gone.
    fn replacement_allowed(&self, m: &MemberStatus) -> bool {
        self.obs.spec.failover.replace_pods
            && (self
                .obs
                .kube
                .pods
                .get(&m.ordinal)
                .is_some_and(|p| p.host_gone)
                || self
                    .obs
                    .kube
                    .volumes
                    .get(&m.ordinal)
                    .is_some_and(|v| v.volume_gone))
    }

    /// Gives member `i` a new node id (its configuration withheld until the old volume is
    /// gone) and records the old pod's and volume's uids, in the operation, before
    /// anything is deleted.
    fn begin_replacement(&mut self, i: usize) {
        let new_id = self.st.next_node_id;
        self.st.next_node_id += 1;
        let ordinal = self.st.members[i].ordinal;
        let old_id = self.st.members[i].node_id;
        self.st.members[i].node_id = new_id;
        self.st.members[i].state = MemberState::Replacing;
        self.st.members[i].down_since = None;
        let old_pod_uid = self.obs.kube.pods.get(&ordinal).map(|p| p.uid.clone());
        let old_volume_uid = self.obs.kube.volumes.get(&ordinal).map(|v| v.uid.clone());
        let op = self.op_mut();
        op.phase = "Replacing".into();
        op.point_of_no_return = true;
        op.old_pod_uid = old_pod_uid;
        op.old_volume_uid = old_volume_uid;
        if op.replaced_node.is_none() {
            op.replaced_node = Some(old_id);
        }
    }

    fn continue_rebalance(&mut self, c: &ClusterView) -> Vec<Step> {
        if let Some(step) = self.finish_interrupted_move(c, None) {
            return vec![step];
        }
        let steps = self.balance_moves(c);
        if steps.is_empty() {
            self.finish("replicas and leaders balanced within one per node".into());
            return vec![];
        }
        let n = steps.len() as u32;
        let op = self.op_mut();
        op.done += n;
        op.total = op.total.max(op.done);
        steps
    }

    /// Replica moves (each the add half; the remove half follows as an interrupted move)
    /// and leadership moves that bring every active node within one of the mean.
    fn balance_moves(&self, c: &ClusterView) -> Vec<Step> {
        let max_moves = self.obs.spec.rebalancing.concurrent_moves.max(1) as usize;
        let active: BTreeSet<NodeId> = c
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active && n.reachable)
            .map(|(id, _)| *id)
            .collect();
        if active.len() < RF {
            return vec![];
        }
        let mut counts: BTreeMap<NodeId, usize> = c
            .replica_counts()
            .into_iter()
            .filter(|(id, _)| active.contains(id))
            .collect();
        let mut steps = Vec::new();
        let mut touched: BTreeSet<GroupId> = BTreeSet::new();
        if zones_in_use(c).len() >= RF {
            // Zones first: a group with two voters in one zone gets a replica in a zone it
            // lacks (the duplicate is removed as the move's second half).
            for (gid, g) in c.all_groups() {
                if steps.len() >= max_moves {
                    break;
                }
                if g.voters.len() != RF || !g.learners.is_empty() || touched.contains(&gid) {
                    continue;
                }
                let used: BTreeSet<&str> = g.voters.iter().map(|v| zone_of(c, *v)).collect();
                if used.len() == g.voters.len() {
                    continue;
                }
                let target = counts
                    .iter()
                    .filter(|(id, _)| !g.hosts(**id) && !used.contains(zone_of(c, **id)))
                    .min_by_key(|(id, n)| (**n, **id))
                    .map(|(id, _)| *id);
                if let Some(lo) = target {
                    touched.insert(gid);
                    steps.push(Step::AddReplica {
                        group: gid,
                        node: lo,
                    });
                    *counts.get_mut(&lo).expect("lo is counted") += 1;
                }
            }
            // Then even out the nodes of each zone (a move inside a zone keeps the spread).
            let zones: BTreeSet<String> = counts
                .keys()
                .map(|id| zone_of(c, *id).to_string())
                .collect();
            for zone in zones {
                let moves = Moves {
                    c,
                    max: max_moves,
                    zone_check: false,
                };
                moves.even_out(
                    &mut counts,
                    |id| zone_of(c, id) == zone,
                    &mut touched,
                    &mut steps,
                );
            }
            if !steps.is_empty() {
                return steps;
            }
        }
        let moves = Moves {
            c,
            max: max_moves,
            zone_check: true,
        };
        moves.even_out(&mut counts, |_| true, &mut touched, &mut steps);
        if !steps.is_empty() {
            return steps;
        }
        // Replicas are even: even out preferred leaders (the node keeps leadership there).
        let mut leads: BTreeMap<NodeId, usize> = c
            .preferred_leader_counts()
            .into_iter()
            .filter(|(id, _)| active.contains(id))
            .collect();
        for id in &active {
            leads.entry(*id).or_default();
        }
        let Some(&hi_n) = leads.values().max() else {
            return vec![];
        };
        let lo_n = leads.values().min().copied().unwrap_or(0);
        if hi_n <= lo_n + 1 {
            return vec![];
        }
        // A chain of leadership hand-overs from a node with the most preferred leaderships
        // to one with at least two fewer: each hop moves one group's preference to
        // another of its voters, so only the two ends change count.
        let mut edges: BTreeMap<NodeId, Vec<(GroupId, NodeId)>> = BTreeMap::new();
        for (gid, g) in &c.groups {
            if let Some(&p) = g.voters.first() {
                for v in g.voters.iter().skip(1).filter(|v| active.contains(v)) {
                    edges.entry(p).or_default().push((*gid, *v));
                }
            }
        }
        let mut came_from: BTreeMap<NodeId, Option<(NodeId, GroupId)>> = leads
            .iter()
            .filter(|(_, n)| **n == hi_n)
            .map(|(id, _)| (*id, None))
            .collect();
        let mut queue: std::collections::VecDeque<NodeId> = came_from.keys().copied().collect();
        while let Some(u) = queue.pop_front() {
            if leads.get(&u).copied().unwrap_or(0) + 2 <= hi_n {
                let mut steps = Vec::new();
                let mut at = u;
                while let Some(Some((prev, gid))) = came_from.get(&at) {
                    steps.push(Step::TransferLeader {
                        group: *gid,
                        to: at,
                    });
                    at = *prev;
                }
                steps.reverse();
                return steps;
            }
            for (gid, v) in edges.get(&u).cloned().unwrap_or_default() {
                if let std::collections::btree_map::Entry::Vacant(e) = came_from.entry(v) {
                    e.insert(Some((u, gid)));
                    queue.push_back(v);
                }
            }
        }
        vec![]
    }

    fn continue_rollout(&mut self, c: &ClusterView, op: &Operation) -> Vec<Step> {
        let update_revision = self
            .obs
            .kube
            .statefulset
            .as_ref()
            .map(|s| s.update_revision.clone())
            .unwrap_or_default();
        if op
            .revision
            .as_deref()
            .is_some_and(|r| !update_revision.is_empty() && r != update_revision)
        {
            // A newer template mid-rollout: the partition closes and the rollout starts
            // over from the highest ordinal, so no pod is replaced without the gate.
            return self.end_rollout(
                c,
                op,
                "a newer revision appeared: the rollout starts over from the highest ordinal"
                    .into(),
            );
        }
        let target = op.targets.first().and_then(|o| self.node_of(*o));
        // A mark left on an earlier target (its clearing step was lost) goes first.
        for (id, n) in &c.nodes {
            if n.state == NodeState::Maintenance && Some(*id) != target {
                return vec![Step::SetNodeState {
                    node: *id,
                    state: NodeState::Active,
                }];
            }
        }
        let Some(&ordinal) = op.targets.first() else {
            self.st.current_version = Some(self.obs.spec.version.clone());
            self.finish(format!("every pod runs version {}", self.obs.spec.version));
            return vec![];
        };
        let Some(node) = target else {
            self.next_rollout_target();
            return vec![];
        };
        let registry = c.nodes.get(&node).map(|n| n.state);
        let pod = self.obs.kube.pods.get(&ordinal);
        let restarted = pod.is_some_and(|p| p.revision == update_revision);
        // Until the pod's restart begins nothing is lost by stepping back: a node that
        // needs a failover goes first, and a node down since the gate holds the restart.
        let untouched = op.phase != "Restarting"
            || pod.is_some_and(|p| !restarted && !p.terminating && p.ready);
        if untouched {
            if self.failover_due() {
                return self.end_rollout(
                    c,
                    op,
                    "rollout paused: a failover goes first; it resumes afterwards".into(),
                );
            }
            if let Some(why) = self.rollout_blocked(c, ordinal) {
                if op.phase != "Gate" {
                    self.set_phase("Gate");
                    // Pods above this one are updated already; this one is held.
                    self.st.partition = Some(ordinal + 1);
                }
                self.op_mut().message = why.clone();
                self.degrade("RolloutBlocked", why);
                return vec![];
            }
        }
        match op.phase.as_str() {
            "Gate" => {
                self.set_phase("MovingLeaders");
                self.op_mut().message = String::new();
                if registry == Some(NodeState::Active) {
                    return vec![Step::SetNodeState {
                        node,
                        state: NodeState::Maintenance,
                    }];
                }
                vec![]
            }
            "MovingLeaders" => {
                if registry == Some(NodeState::Active) {
                    return vec![Step::SetNodeState {
                        node,
                        state: NodeState::Maintenance,
                    }];
                }
                for (gid, g) in c.all_groups() {
                    if g.leader == Some(node) {
                        let updated = (gid == METADATA_GROUP)
                            .then(|| self.updated_voter(c, gid, node, &update_revision))
                            .flatten();
                        if let Some(to) = updated.or_else(|| self.leader_target(c, gid, node)) {
                            return vec![Step::TransferLeader { group: gid, to }];
                        }
                    }
                }
                self.set_phase("Restarting");
                self.st.partition = Some(ordinal);
                vec![]
            }
            "Restarting" => {
                self.st.partition = Some(ordinal);
                let done = restarted
                    && pod.is_some_and(|p| p.ready)
                    && c.nodes.get(&node).is_some_and(|n| n.ready && n.reachable);
                if !done {
                    self.op_mut().message =
                        format!("waiting for pod {ordinal} to restart and catch up");
                    return vec![];
                }
                // The mark is cleared as soon as the pod is back, before the next one; the
                // pod stays the target until the registry shows it cleared.
                if registry == Some(NodeState::Maintenance) {
                    self.op_mut().message = format!("clearing node {node}'s maintenance mark");
                    return vec![Step::SetNodeState {
                        node,
                        state: NodeState::Active,
                    }];
                }
                self.op_mut().done += 1;
                self.op_mut().message = String::new();
                self.next_rollout_target();
                vec![]
            }
            other => {
                self.warn(
                    "UnknownPhase",
                    format!("rollout phase {other:?} is unknown; gating again"),
                );
                self.set_phase("Gate");
                vec![]
            }
        }
    }

    /// Why the rollout may not restart pod `ordinal` now (None when it may, or forced).
    fn rollout_blocked(&self, c: &ClusterView, ordinal: i32) -> Option<String> {
        if self.obs.spec.upgrade.force {
            return None;
        }
        let under = c.under_replicated();
        let not_ready: Vec<i32> = self
            .st
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active && m.ordinal != ordinal && !m.ready)
            .map(|m| m.ordinal)
            .collect();
        if under.is_empty() && not_ready.is_empty() {
            return None;
        }
        Some(format!(
            "rollout waits before pod {ordinal}: {} under-replicated groups, pods {not_ready:?} \
             not Ready (set spec.upgrade.force to go on anyway)",
            under.len()
        ))
    }

    /// Ends a rollout early: the partition closes at once; the target's maintenance mark
    /// is cleared first (the operation stays until the registry shows it).
    fn end_rollout(&mut self, c: &ClusterView, op: &Operation, note: String) -> Vec<Step> {
        self.st.partition = None;
        let target = op.targets.first().and_then(|o| self.node_of(*o));
        if let Some(node) = target.filter(|n| {
            c.nodes
                .get(n)
                .is_some_and(|v| v.state == NodeState::Maintenance)
        }) {
            self.op_mut().message = format!("clearing node {node}'s maintenance mark");
            return vec![Step::SetNodeState {
                node,
                state: NodeState::Active,
            }];
        }
        self.finish(note);
        vec![]
    }

    /// A live, active voter of `gid` other than `from` whose pod already runs the newest
    /// revision: the metadata leadership goes there during a rollout.
    fn updated_voter(
        &self,
        c: &ClusterView,
        gid: GroupId,
        from: NodeId,
        update_revision: &str,
    ) -> Option<NodeId> {
        let g = c.group(gid)?;
        g.voters.iter().copied().find(|v| {
            *v != from
                && c.is_live(*v)
                && c.nodes.get(v).is_some_and(|n| n.state == NodeState::Active)
                && self.st.members.iter().any(|m| {
                    m.node_id == *v
                        && self
                            .obs
                            .kube
                            .pods
                            .get(&m.ordinal)
                            .is_some_and(|p| p.revision == update_revision)
                })
        })
    }

    /// A member down past the failover timeout, while the daily budget allows one.
    fn failover_due(&self) -> bool {
        let spec = &self.obs.spec;
        (self.st.failovers.len() as i32) < spec.failover.max_per_day
            && self.st.members.iter().any(|m| {
                m.down_since
                    .is_some_and(|t| self.obs.now - t >= spec.failover.timeout_seconds)
            })
    }

    fn next_rollout_target(&mut self) {
        let op = self.op_mut();
        if !op.targets.is_empty() {
            op.targets.remove(0);
        }
        op.phase = "Gate".into();
    }

    fn choose_operation(&mut self, c: &ClusterView) -> Vec<Step> {
        let obs = self.obs;
        let spec = &obs.spec;
        let now = obs.now;
        // 1. Failover: a member down past the timeout.
        let overdue = self.st.members.iter().find(|m| {
            m.down_since
                .is_some_and(|t| now - t >= spec.failover.timeout_seconds)
        });
        if let Some(m) = overdue.cloned() {
            if (self.st.failovers.len() as i32) < spec.failover.max_per_day {
                self.start(
                    OperationType::Failover,
                    "ReReplicating",
                    vec![m.ordinal],
                    Self::hosted_by(c, m.node_id),
                );
                self.warn(
                    "FailoverStarted",
                    format!(
                        "node {} (pod {}) down for {} s: re-replicating its replicas",
                        m.node_id,
                        m.ordinal,
                        now - m.down_since.unwrap_or(now)
                    ),
                );
                return vec![];
            }
            self.degrade(
                "FailoverBudgetExhausted",
                format!(
                    "node {} is down but {} failovers already ran in 24 h (spec.failover.maxPerDay)",
                    m.node_id,
                    self.st.failovers.len()
                ),
            );
        }
        // 2. Replace a failed-over member's pod and volume, on positive evidence only.
        if spec.failover.replace_pods {
            let evidence = self.st.members.iter().find(|m| {
                m.state == MemberState::FailedOver && {
                    let pod = obs.kube.pods.get(&m.ordinal);
                    let vol = obs.kube.volumes.get(&m.ordinal);
                    pod.is_some_and(|p| p.host_gone || p.answering_as == Some(m.node_id))
                        || vol.is_some_and(|v| v.volume_gone)
                        || pod.is_none()
                }
            });
            if let Some(m) = evidence.cloned() {
                let i = self.member_index(m.ordinal).expect("member exists");
                self.start(OperationType::Failover, "Replacing", vec![m.ordinal], 1);
                self.begin_replacement(i);
                // The old node already left membership: nothing to move afterwards.
                self.op_mut().replaced_node = None;
                let new_id = self.st.members[i].node_id;
                self.notice(
                    "ReplacingNode",
                    format!(
                        "pod {} gets a new volume and runs as node {new_id} (was {})",
                        m.ordinal, m.node_id
                    ),
                );
                return vec![];
            }
        }
        let down = self.st.members.iter().any(|m| m.down_since.is_some());
        let members = desired_pods(&self.st);
        // 3. Scale in, highest ordinal first, after pre-checks.
        if spec.nodes < members {
            let mut blocked = Vec::new();
            if down {
                blocked.push("a node is down".to_string());
            }
            if !c.under_replicated().is_empty() {
                blocked.push("a group is under-replicated".into());
            }
            if self
                .st
                .members
                .iter()
                .any(|m| m.state == MemberState::FailedOver)
            {
                blocked.push("a failed-over pod awaits replacement".into());
            }
            let leaving = self
                .st
                .members
                .iter()
                .filter(|m| m.state != MemberState::Removed)
                .max_by_key(|m| m.ordinal)
                .map(|m| m.node_id);
            if let Some(why) = leaving.and_then(|n| self.no_room_to_drain(c, n)) {
                blocked.push(why);
            }
            if blocked.is_empty() {
                let target = self
                    .st
                    .members
                    .iter()
                    .filter(|m| m.state != MemberState::Removed)
                    .map(|m| m.ordinal)
                    .max()
                    .expect("members exist");
                let node = self.node_of(target).expect("member exists");
                if self.st.members[self.member_index(target).expect("member")].state
                    == MemberState::Pending
                    && !c.nodes.contains_key(&node)
                {
                    // Never registered: nothing to drain; its pod and volume go.
                    let i = self.member_index(target).expect("member");
                    self.st.members[i].state = MemberState::Removed;
                    self.start(OperationType::ScaleIn, "DeletingVolume", vec![target], 1);
                    return vec![];
                }
                self.start(
                    OperationType::ScaleIn,
                    "Draining",
                    vec![target],
                    Self::hosted_by(c, node),
                );
                return vec![Step::SetNodeState {
                    node,
                    state: NodeState::Draining,
                }];
            }
            let why = format!("scale-in waits: {}", blocked.join(", "));
            self.degrade("ScaleInBlocked", why);
        }
        // 4. Scale out, one pod at a time.
        if spec.nodes > members && !down {
            let ordinal = members;
            let id = self.st.next_node_id;
            self.st.next_node_id += 1;
            self.st.members.push(MemberStatus {
                ordinal,
                node_id: id,
                state: MemberState::Pending,
                ready: false,
                replicas: 0,
                leaders: 0,
                down_since: None,
            });
            self.start(OperationType::ScaleOut, "Registering", vec![ordinal], 1);
            return vec![];
        }
        // 5. Rolling upgrade: pods not on the StatefulSet's newest revision, highest first.
        // Before the StatefulSet controller reports a revision there is nothing to compare.
        if let Some(sts) = obs
            .kube
            .statefulset
            .as_ref()
            .filter(|s| !s.update_revision.is_empty())
        {
            let mut stale: Vec<i32> = self
                .st
                .members
                .iter()
                .filter(|m| m.state == MemberState::Active)
                .filter(|m| {
                    obs.kube.pods.get(&m.ordinal).is_some_and(|p| {
                        p.revision != sts.update_revision && !p.host_gone && !p.terminating
                    })
                })
                .map(|m| m.ordinal)
                .collect();
            stale.sort_unstable_by(|a, b| b.cmp(a));
            // Strictly from the highest ordinal down: a StatefulSet partition updates
            // every pod at or above it. The metadata leadership is moved onto an
            // already updated node before each restart (see MovingLeaders), so it moves
            // at most twice in a rollout.
            if !stale.is_empty() {
                let total = stale.len() as u32;
                self.start(OperationType::RollingUpgrade, "Gate", stale, total);
                self.op_mut().revision = Some(sts.update_revision.clone());
                return vec![];
            }
            if self.st.current_version.as_deref() != Some(spec.version.as_str()) {
                self.st.current_version = Some(spec.version.clone());
            }
        }
        // 6. Rebalance.
        if spec.rebalancing.enabled && !down {
            let moves = self.balance_moves(c);
            if !moves.is_empty() {
                let estimate = self.estimate_moves(c);
                self.start(OperationType::Rebalance, "Moving", vec![], estimate.max(1));
                let op = self.op_mut();
                op.done = moves.len() as u32;
                op.total = op.total.max(op.done);
                return moves;
            }
        }
        vec![]
    }

    /// Why the other active nodes cannot take `node`'s data (`None` when they can, or
    /// when a node does not report its storage and nobody can tell): the data, with
    /// half again as margin for compactions and snapshot transfers, must fit in what
    /// they have free above a tenth of each volume.
    fn no_room_to_drain(&self, c: &ClusterView, node: NodeId) -> Option<String> {
        let need = c.nodes.get(&node)?.disk?.data;
        let mut room: u64 = 0;
        for (id, n) in &c.nodes {
            if *id == node || n.state != NodeState::Active || !n.reachable {
                continue;
            }
            let d = n.disk?;
            room = room.saturating_add(d.available.saturating_sub(d.capacity / 10));
        }
        let wanted = need.saturating_add(need / 2);
        (wanted > room).then(|| {
            format!(
                "not enough room: node {node} holds {} MiB, the other nodes can take {} MiB \
                 (keeping a tenth of each volume free, with half again as margin); grow \
                 spec.storage.size first",
                need >> 20,
                room >> 20
            )
        })
    }

    /// Replica moves needed to bring every active node within one of the mean.
    fn estimate_moves(&self, c: &ClusterView) -> u32 {
        let counts: Vec<usize> = c
            .replica_counts()
            .into_iter()
            .filter(|(id, _)| {
                c.nodes
                    .get(id)
                    .is_some_and(|n| n.state == NodeState::Active && n.reachable)
            })
            .map(|(_, n)| n)
            .collect();
        if counts.is_empty() {
            return 0;
        }
        let mean = counts.iter().sum::<usize>().div_ceil(counts.len());
        counts.iter().map(|n| n.saturating_sub(mean)).sum::<usize>() as u32
    }

    fn finish_conditions(&mut self) {
        let now = self.obs.now;
        let generation = self.obs.generation;
        let available = if !self.st.bootstrapped {
            (
                "False",
                "NotBootstrapped",
                "the cluster is not bootstrapped yet".to_string(),
            )
        } else if self.obs.cluster.is_none() {
            (
                "Unknown",
                "ClusterUnreachable",
                "no node answered".to_string(),
            )
        } else if self.st.groups.leaderless > 0
            || self
                .obs
                .cluster
                .as_ref()
                .is_some_and(|c| c.metadata.leader.is_none())
        {
            (
                "False",
                "QuorumLost",
                format!("{} groups have no leader", self.st.groups.leaderless),
            )
        } else {
            (
                "True",
                "AsExpected",
                "every shard group has a leader".to_string(),
            )
        };
        let spec_nodes = self.obs.spec.nodes;
        let progressing = match (&self.progressing, &self.st.operation) {
            (Some((r, m)), _) => ("True", r.clone(), m.clone()),
            (None, Some(op)) => ("True", format!("{:?}", op.type_), op.phase.clone()),
            (None, None) if desired_pods(&self.st) != spec_nodes => (
                "True",
                "Resizing".into(),
                format!("{} nodes, spec wants {spec_nodes}", desired_pods(&self.st)),
            ),
            (None, None) => ("False", "Idle".into(), "no operation in flight".into()),
        };
        let progressing = if self.obs.spec.paused {
            (
                "False",
                "Paused".to_string(),
                "spec.paused is set".to_string(),
            )
        } else {
            progressing
        };
        let degraded = match self.degraded.first().or(self.symptoms.first()) {
            Some((r, m)) => ("True", r.clone(), m.clone()),
            None => ("False", "AsExpected".into(), "nothing is degraded".into()),
        };
        let old = std::mem::take(&mut self.st.conditions);
        for (type_, (status, reason, message)) in [
            (
                "Available",
                (available.0, available.1.to_string(), available.2),
            ),
            ("Progressing", progressing),
            ("Degraded", degraded),
        ] {
            let prev = old.iter().find(|c| c.type_ == type_);
            let last_transition_time = match prev {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => rfc3339(now),
            };
            self.st.conditions.push(Condition {
                type_: type_.into(),
                status: status.into(),
                reason,
                message,
                last_transition_time,
                observed_generation: Some(generation),
            });
        }
    }
}

/// Replica moves that even out replica counts (each move is the add half; the remove
/// half follows as an interrupted move).
struct Moves<'c> {
    c: &'c ClusterView,
    /// At most this many moves in all.
    max: usize,
    /// Whether a move must keep a group's voters in distinct zones.
    zone_check: bool,
}

impl Moves<'_> {
    /// Moves replicas from the most to the least loaded of the nodes `among` accepts
    /// until they are within one of each other, a group at a time and each group once.
    fn even_out(
        &self,
        counts: &mut BTreeMap<NodeId, usize>,
        among: impl Fn(NodeId) -> bool,
        touched: &mut BTreeSet<GroupId>,
        steps: &mut Vec<Step>,
    ) {
        let c = self.c;
        while steps.len() < self.max {
            let nodes: Vec<(NodeId, usize)> = counts
                .iter()
                .filter(|(id, _)| among(**id))
                .map(|(id, n)| (*id, *n))
                .collect();
            let Some(&(hi, hi_n)) = nodes
                .iter()
                .max_by_key(|(id, n)| (*n, std::cmp::Reverse(*id)))
            else {
                break;
            };
            let Some(&(lo, lo_n)) = nodes.iter().min_by_key(|(id, n)| (*n, *id)) else {
                break;
            };
            if hi_n <= lo_n + 1 {
                break;
            }
            let candidate = c.all_groups().find(|(gid, g)| {
                !touched.contains(gid)
                    && g.voters.contains(&hi)
                    && !g.hosts(lo)
                    && g.voters.len() == RF
                    && g.learners.is_empty()
                    && (!self.zone_check
                        || zone_ok(c, g.voters.iter().copied().filter(|v| *v != hi), lo))
            });
            let Some((gid, _)) = candidate else { break };
            touched.insert(gid);
            steps.push(Step::AddReplica {
                group: gid,
                node: lo,
            });
            *counts.get_mut(&hi).expect("hi is counted") -= 1;
            *counts.get_mut(&lo).expect("lo is counted") += 1;
        }
    }
}

/// Whether adding `node` next to `others` keeps voters in distinct zones (or no zones).
fn zone_ok(c: &ClusterView, others: impl Iterator<Item = NodeId>, node: NodeId) -> bool {
    let zone = |n: NodeId| c.nodes.get(&n).map(|v| v.zone.clone()).unwrap_or_default();
    let z = zone(node);
    if z.is_empty() {
        return true;
    }
    let zones_exist = c
        .nodes
        .values()
        .filter(|n| n.state == NodeState::Active)
        .map(|n| &n.zone)
        .collect::<BTreeSet<_>>()
        .len();
    let others: Vec<String> = others.map(zone).collect();
    // With fewer than three zones a repeat cannot be avoided.
    zones_exist < RF || !others.contains(&z)
}

/// The zone the registry records for `node` ("" when unknown).
fn zone_of(c: &ClusterView, node: NodeId) -> &str {
    c.nodes.get(&node).map(|n| n.zone.as_str()).unwrap_or("")
}

/// Zones of active, reachable nodes.
fn zones_in_use(c: &ClusterView) -> BTreeSet<&str> {
    c.nodes
        .values()
        .filter(|n| n.state == NodeState::Active && n.reachable && !n.zone.is_empty())
        .map(|n| n.zone.as_str())
        .collect()
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}
