//! The planner (unit tier), driven pass by pass through an in-memory world: a StatefulSet
//! controller (pods by replicas and partition, volumes reused by ordinal, rolling updates
//! at or above the partition, one pod at a time), kubelets (a pod runs a few passes after
//! it is created), PodGC, volumes deleted with uid preconditions, and the in-memory cluster
//! model that pods register with under the node id their member entry gives.
//!
//! Regression tests, one per failure class of stateful operators: a drain cancelled by a
//! scale-up, a transient pod loss, quorum loss, a metadata outage, an unreachable
//! cluster, a rollout blocked by an under-replicated group, an operator restart
//! mid-operation, the daily failover budget, replacement only on positive evidence, pause,
//! a scale-in blocked by a node that is down.
//!
//! Property tests: generated clusters (3..=7 nodes, 1..=24 groups, no zones or three),
//! faults (a node down for a while, a host lost with or without its volume), spec changes
//! (nodes, version, template revision, pause), operator restarts and crashes between two
//! side effects. After every pass: no step takes a group below quorum or three voters,
//! one operation at a time and never replaced by another, the same observation plans the
//! same, pods go only after their node left membership, node ids are never reused. Once
//! faults stop and the spec is fixed, the cluster converges within a bounded number of
//! passes.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::cluster_model::ClusterModel;
use parley_operator::crd::{
    Condition, MemberState, MemberStatus, Operation, OperationType, ParleyClusterSpec,
    ParleyClusterStatus,
};
use parley_operator::model::{
    ClusterView, DiskView, KubeView, NodeId, NodeState, Observed, PodView, StatefulSetView,
    VolumeView, METADATA_GROUP,
};
use parley_operator::planner::{self, Plan, Step};
use proptest::prelude::*;

/// Simulated clock at the first pass (Unix seconds).
const T0: i64 = 1_800_000_000;
/// Seconds between two reconcile passes.
const TICK: i64 = 5;
const DAY: i64 = 24 * 3600;
/// A crash that lasts until the test ends it.
const NEVER: u64 = u64::MAX;
/// Passes allowed for convergence once faults stopped and the spec is fixed.
const SETTLE_PASSES: u64 = 600;

fn spec(nodes: i32, shard_groups: i32) -> ParleyClusterSpec {
    let mut spec: ParleyClusterSpec = serde_yaml::from_str(
        r#"
nodes: 3
image: parley-node
version: "1.1"
shardGroups: 8
storage: {size: 10Gi}
failover: {timeoutSeconds: 30}
secrets: {tokenSigningKey: {name: k, key: token.pem}}
"#,
    )
    .expect("spec parses");
    spec.nodes = nodes;
    spec.shard_groups = shard_groups;
    spec
}

/// A pod of the StatefulSet.
#[derive(Clone, Debug)]
struct Pod {
    uid: String,
    revision: String,
    /// The node id its per-ordinal config gave it when it was created.
    node_id: NodeId,
    /// The pass from which its process runs.
    runs_from: u64,
    /// The pass its Kubernetes node vanished; it never runs again and stays until deleted.
    host_gone: Option<u64>,
}

/// A node's volume claim.
#[derive(Clone, Debug)]
struct Volume {
    uid: String,
    /// The bound volume (a local disk) is gone with its host.
    gone: bool,
    /// Deleted while a pod uses it: it goes once the pod does.
    deleting: bool,
    /// The node id that first ran on it: its data belongs to that node.
    owner: Option<NodeId>,
}

/// Where the operator process dies in a pass (the next pass starts from the stored
/// status only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum CrashPoint {
    #[default]
    Never,
    /// Planned, but the status was not written.
    BeforeStatus,
    /// Status written; the StatefulSet was not updated and no step ran.
    BeforeStatefulSet,
    /// Status and StatefulSet written; no step ran.
    BeforeSteps,
    /// The first step ran, the others did not.
    AfterFirstStep,
}

/// The node id of a pod that started without a ConfigMap entry.
const NO_CONFIG: NodeId = 0;

#[derive(Clone, Debug)]
struct Restart {
    ordinal: i32,
    node: NodeId,
    /// Leaderships the node held when its pod was restarted.
    leaders: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StsState {
    replicas: i32,
    partition: i32,
}

/// Kubernetes and the Parley cluster, in memory, and the operator's only memory: the
/// status it wrote.
#[derive(Clone, Debug)]
struct World {
    pass: u64,
    now: i64,
    spec: ParleyClusterSpec,
    generation: i64,
    status: ParleyClusterStatus,
    cluster: Option<ClusterModel>,
    zones: bool,
    pods: BTreeMap<i32, Pod>,
    volumes: BTreeMap<i32, Volume>,
    sts: Option<StsState>,
    /// Template revisions so far; the newest is the StatefulSet's update revision.
    revisions: u32,
    /// The revision pods below the partition are created from.
    current_revision: String,
    /// Ordinals whose process is down, until the given pass.
    crashed: BTreeMap<i32, u64>,
    /// Passes from pod creation to a running process.
    start_delay: u64,
    /// Passes after a host vanished before PodGC deletes its pods.
    podgc_after: u64,
    /// Whether any node's admin API answers the operator.
    reachable: bool,
    crash_point: CrashPoint,
    /// Round-trip the status through JSON before every pass (an operator restart).
    restart_every_pass: bool,
    next_uid: u64,
    // What the checks remember.
    ids_seen: BTreeMap<NodeId, i32>,
    max_id: NodeId,
    last_down: u64,
    partition_since: u64,
    restarts: Vec<Restart>,
    steps: Vec<(u64, Step)>,
    notices: Vec<(u64, String)>,
    trace: Vec<String>,
}

fn op_key(op: &Operation) -> (OperationType, i64, Vec<i32>) {
    // A rollout consumes its targets as it goes; the other operations keep theirs.
    let targets = if op.type_ == OperationType::RollingUpgrade {
        vec![]
    } else {
        op.targets.clone()
    };
    (op.type_, op.started_at, targets)
}

fn condition<'a>(st: &'a ParleyClusterStatus, type_: &str) -> &'a Condition {
    st.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} is set: {:?}", st.conditions))
}

fn leaderships(c: &ClusterModel, node: NodeId) -> u32 {
    std::iter::once(&c.metadata)
        .chain(c.groups.values())
        .filter(|g| g.leader == Some(node))
        .count() as u32
}

impl World {
    fn new(spec: ParleyClusterSpec, zones: bool) -> World {
        World {
            pass: 0,
            now: T0,
            spec,
            generation: 1,
            status: ParleyClusterStatus::default(),
            cluster: None,
            zones,
            pods: BTreeMap::new(),
            volumes: BTreeMap::new(),
            sts: None,
            revisions: 1,
            current_revision: "rev-1".into(),
            crashed: BTreeMap::new(),
            start_delay: 1,
            podgc_after: NEVER,
            reachable: true,
            crash_point: CrashPoint::Never,
            restart_every_pass: false,
            next_uid: 0,
            ids_seen: BTreeMap::new(),
            max_id: 0,
            last_down: 0,
            partition_since: 0,
            restarts: vec![],
            steps: vec![],
            notices: vec![],
            trace: vec![],
        }
    }

    /// A cluster of `nodes` nodes that reached its spec: settled, balanced, idle.
    fn running(nodes: i32, groups: i32, zones: bool) -> World {
        let mut w = World::new(spec(nodes, groups), zones);
        w.settle_or_panic();
        w
    }

    fn update_revision(&self) -> String {
        format!("rev-{}", self.revisions)
    }

    fn uid(&mut self, kind: &str) -> String {
        self.next_uid += 1;
        format!("{kind}-{}", self.next_uid)
    }

    fn zone(&self, ordinal: i32) -> String {
        if self.zones {
            format!("zone-{}", ordinal % 3)
        } else {
            String::new()
        }
    }

    fn log(&mut self, line: String) {
        self.trace.push(format!("[{}] {line}", self.pass));
    }

    fn member(&self, ordinal: i32) -> &MemberStatus {
        self.status
            .members
            .iter()
            .find(|m| m.ordinal == ordinal)
            .unwrap_or_else(|| panic!("member {ordinal} exists: {:?}", self.status.members))
    }

    fn ids(&self) -> Vec<NodeId> {
        self.status.members.iter().map(|m| m.node_id).collect()
    }

    fn op(&self) -> Option<&Operation> {
        self.status.operation.as_ref()
    }

    fn model(&self) -> &ClusterModel {
        self.cluster.as_ref().expect("bootstrapped")
    }

    fn registry(&self, node: NodeId) -> Option<NodeState> {
        self.cluster
            .as_ref()
            .and_then(|c| c.nodes.get(&node))
            .map(|n| n.state)
    }

    fn hosted(&self, node: NodeId) -> usize {
        let c = self.model();
        std::iter::once(&c.metadata)
            .chain(c.groups.values())
            .filter(|g| g.voters.contains(&node) || g.learners.contains(&node))
            .count()
    }

    fn set_nodes(&mut self, nodes: i32) {
        self.spec.nodes = nodes;
        self.generation += 1;
        self.log(format!("spec: nodes = {nodes}"));
    }

    fn bump_version(&mut self) {
        self.revisions += 1;
        self.spec.version = format!("1.{}", self.revisions);
        self.generation += 1;
        self.log(format!("spec: version {}", self.spec.version));
    }

    /// The operator's pod template changed (a new operator version): a new revision with
    /// the same Parley version.
    fn bump_template(&mut self) {
        self.revisions += 1;
        self.log(format!("template: {}", self.update_revision()));
    }

    fn set_paused(&mut self, paused: bool) {
        if self.spec.paused != paused {
            self.spec.paused = paused;
            self.generation += 1;
            self.log(format!("spec: paused = {paused}"));
        }
    }

    fn crash(&mut self, ordinal: i32, passes: u64) {
        self.crashed
            .insert(ordinal, self.pass.saturating_add(passes).saturating_add(1));
        self.log(format!("fault: pod {ordinal} down for {passes} passes"));
    }

    fn revive(&mut self, ordinal: i32) {
        self.crashed.remove(&ordinal);
        self.log(format!("pod {ordinal} back"));
    }

    /// The pod's Kubernetes node vanishes (and with it a local volume).
    fn lose_host(&mut self, ordinal: i32, local_volume: bool) {
        // Whatever kept the process down was on that host.
        self.crashed.remove(&ordinal);
        let pass = self.pass;
        if let Some(p) = self.pods.get_mut(&ordinal) {
            p.host_gone = Some(pass);
        }
        if local_volume {
            if let Some(v) = self.volumes.get_mut(&ordinal) {
                v.gone = true;
            }
        }
        self.log(format!(
            "fault: host of pod {ordinal} lost (local volume: {local_volume})"
        ));
    }

    /// An operator restart: it knows only what it reads back from the status.
    fn restart_operator(&mut self) -> Result<(), String> {
        let json = serde_json::to_string(&self.status).map_err(|e| e.to_string())?;
        let back: ParleyClusterStatus = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        if back != self.status {
            return Err(format!(
                "the status does not survive a round trip through JSON:\n{:?}\n{back:?}",
                self.status
            ));
        }
        self.status = back;
        Ok(())
    }

    /// Whether a pod uses its volume claim (pvc-protection counts scheduled pods only: a
    /// pod whose local volume is gone with its host cannot be scheduled).
    fn uses_volume(&self, ordinal: i32) -> bool {
        self.pods.get(&ordinal).is_some_and(|p| {
            p.host_gone.is_some() || self.volumes.get(&ordinal).is_some_and(|v| !v.gone)
        })
    }

    /// Whether the ConfigMap has an entry for the pod (not while its member is replaced).
    fn configured(&self, ordinal: i32) -> bool {
        self.status
            .members
            .iter()
            .find(|m| m.ordinal == ordinal)
            .is_none_or(|m| m.state != MemberState::Replacing)
    }

    fn runs(&self, ordinal: i32, p: &Pod) -> bool {
        p.node_id != NO_CONFIG
            && p.host_gone.is_none()
            && !self.crashed.contains_key(&ordinal)
            && self.pass >= p.runs_from
            && self.volumes.get(&ordinal).is_some_and(|v| !v.gone)
    }

    /// A node's process stopped.
    fn node_down(&mut self, node: NodeId) {
        if let Some(m) = self.cluster.as_mut() {
            if m.nodes.get(&node).is_some_and(|n| n.up) {
                m.set_up(node, false);
                self.last_down = self.pass;
            }
        }
    }

    /// Kubelets and PodGC: crashes end, pods on vanished hosts are collected, running
    /// processes are up in the cluster and register under their id.
    fn kubelet(&mut self) -> Result<(), String> {
        let pass = self.pass;
        self.crashed.retain(|_, until| *until > pass);
        // A pod that found no configuration restarts until its entry appears.
        let waiting: Vec<i32> = self
            .pods
            .iter()
            .filter(|(o, p)| p.node_id == NO_CONFIG && self.configured(**o))
            .map(|(o, _)| *o)
            .collect();
        for o in waiting {
            let Some(id) = self
                .status
                .members
                .iter()
                .find(|m| m.ordinal == o)
                .map(|m| m.node_id)
            else {
                continue;
            };
            if let Some(p) = self.pods.get_mut(&o) {
                p.node_id = id;
                p.runs_from = pass + self.start_delay;
            }
            self.log(format!("pod {o} found its configuration: node {id}"));
        }
        let collect: Vec<i32> = self
            .pods
            .iter()
            .filter(|(_, p)| {
                p.host_gone
                    .is_some_and(|t| pass >= t.saturating_add(self.podgc_after))
            })
            .map(|(o, _)| *o)
            .collect();
        for o in collect {
            self.pods.remove(&o);
            self.log(format!("PodGC deleted pod {o} (its host is gone)"));
        }
        let running: BTreeMap<i32, NodeId> = self
            .pods
            .iter()
            .filter(|(o, p)| self.runs(**o, p))
            .map(|(o, p)| (*o, p.node_id))
            .collect();
        for (o, id) in &running {
            let v = self
                .volumes
                .get_mut(o)
                .expect("a running pod has its volume");
            match v.owner {
                Some(owner) if owner != *id => {
                    return Err(format!(
                        "pass {pass}: pod {o} runs as node {id} on the volume of node {owner}"
                    ))
                }
                _ => v.owner = Some(*id),
            }
        }
        let up: BTreeSet<NodeId> = running.values().copied().collect();
        let mut registered = Vec::new();
        if let Some(m) = self.cluster.as_mut() {
            let ids: Vec<NodeId> = m.nodes.keys().copied().collect();
            for id in ids {
                let was = m.nodes[&id].up;
                let is = up.contains(&id);
                if was != is {
                    if was {
                        self.last_down = pass;
                    }
                    m.set_up(id, is);
                }
            }
            for id in &up {
                if !m.nodes.contains_key(id) && m.register(*id, "").is_ok() {
                    registered.push(*id);
                }
            }
            m.elect();
        }
        for id in registered {
            self.log(format!("node {id} registered"));
        }
        Ok(())
    }

    fn observe(&self) -> Observed {
        let pods = self
            .pods
            .iter()
            .map(|(o, p)| {
                let running = self.runs(*o, p);
                (
                    *o,
                    PodView {
                        uid: p.uid.clone(),
                        ready: running,
                        revision: p.revision.clone(),
                        answering_as: running.then_some(p.node_id),
                        host_gone: p.host_gone.is_some(),
                        zone: self.zone(*o),
                        terminating: false,
                    },
                )
            })
            .collect();
        let volumes = self
            .volumes
            .iter()
            .map(|(o, v)| {
                (
                    *o,
                    VolumeView {
                        uid: v.uid.clone(),
                        volume_gone: v.gone,
                    },
                )
            })
            .collect();
        let cluster = self
            .cluster
            .as_ref()
            .filter(|_| self.reachable)
            .filter(|m| {
                m.nodes
                    .values()
                    .any(|n| n.up && n.state != NodeState::Removed)
            })
            .map(|m| m.view());
        Observed {
            now: self.now,
            generation: self.generation,
            spec: self.spec.clone(),
            status: self.status.clone(),
            kube: KubeView {
                statefulset: self.sts.map(|s| StatefulSetView {
                    replicas: s.replicas,
                    partition: s.partition,
                    update_revision: self.update_revision(),
                    template_hash: None,
                }),
                pods,
                volumes,
            },
            cluster,
        }
    }

    /// Checks of one plan against what it was planned from.
    fn check_plan(&self, obs: &Observed, plan: &Plan) -> Result<(), String> {
        let pass = self.pass;
        let reasons: Vec<&str> = plan.notices.iter().map(|n| n.reason.as_str()).collect();
        // An operation ends only by finishing; a new one starts only after that (the
        // bootstrap finishes and a scale-out may start in the same pass).
        let before_op = obs.status.operation.as_ref();
        let after_op = plan.status.operation.as_ref();
        let same = matches!((before_op, after_op), (Some(a), Some(b)) if op_key(a) == op_key(b));
        if let Some(a) = before_op.filter(|_| !same) {
            let finished = format!("{:?}Finished", a.type_);
            if !reasons.contains(&finished.as_str()) {
                return Err(format!(
                    "pass {pass}: operation {a:?} ended without finishing (now {after_op:?}): {reasons:?}"
                ));
            }
        }
        if let Some(b) = after_op.filter(|_| !same) {
            let started = format!("{:?}Started", b.type_);
            if b.started_at != obs.now || !reasons.contains(&started.as_str()) {
                return Err(format!(
                    "pass {pass}: operation {b:?} appeared without starting: {reasons:?}"
                ));
            }
        }
        // The desired size shrinks only once the node left membership.
        let before = planner::desired_pods(&obs.status);
        let after = planner::desired_pods(&plan.status);
        if after < before {
            for m in obs
                .status
                .members
                .iter()
                .filter(|m| m.ordinal >= after && m.state != MemberState::Removed)
            {
                let state = self.registry(m.node_id);
                if state.is_some_and(|s| s != NodeState::Removed) {
                    return Err(format!(
                        "pass {pass}: desired pods {before} -> {after} while node {} (pod {}) is {state:?}",
                        m.node_id, m.ordinal
                    ));
                }
            }
        }
        if plan.status.next_node_id < obs.status.next_node_id {
            return Err(format!(
                "pass {pass}: next_node_id went back from {} to {}",
                obs.status.next_node_id, plan.status.next_node_id
            ));
        }
        Ok(())
    }

    /// The StatefulSet controller: size and partition from the status, pods above the
    /// size go, missing pods are created, the highest stale pod at or above the partition
    /// is replaced once every pod above it is healthy.
    fn statefulset(&mut self) -> Result<(), String> {
        let pass = self.pass;
        let replicas = planner::desired_pods(&self.status);
        let partition = planner::partition(&self.status);
        let members = self
            .status
            .members
            .iter()
            .filter(|m| m.state != MemberState::Removed)
            .count() as i32;
        if replicas < members {
            return Err(format!(
                "pass {pass}: StatefulSet size {replicas} below {members} members"
            ));
        }
        if self.sts.map(|s| s.partition) != Some(partition) {
            self.partition_since = pass;
        }
        self.sts = Some(StsState {
            replicas,
            partition,
        });
        let above: Vec<i32> = self.pods.range(replicas..).map(|(o, _)| *o).collect();
        for o in above {
            let pod = self.pods.remove(&o).expect("listed");
            let state = self.registry(pod.node_id);
            if state.is_some_and(|s| s != NodeState::Removed) {
                return Err(format!(
                    "pass {pass}: pod {o} deleted while node {} is {state:?}",
                    pod.node_id
                ));
            }
            self.node_down(pod.node_id);
            self.log(format!("StatefulSet: pod {o} deleted (size {replicas})"));
        }
        let released: Vec<i32> = self
            .volumes
            .iter()
            .filter(|(o, v)| v.deleting && !self.uses_volume(**o))
            .map(|(o, _)| *o)
            .collect();
        for o in released {
            self.volumes.remove(&o);
            self.log(format!("volume {o} deleted (no pod uses it any more)"));
        }
        // A Pending pod whose claim is missing gets a new one.
        let missing: Vec<i32> = self
            .pods
            .keys()
            .filter(|o| !self.volumes.contains_key(o))
            .copied()
            .collect();
        for o in missing {
            self.new_volume(o);
        }
        let update = self.update_revision();
        let members: Vec<(i32, NodeId)> = self
            .status
            .members
            .iter()
            .filter(|m| m.ordinal < replicas && !self.pods.contains_key(&m.ordinal))
            .map(|m| (m.ordinal, m.node_id))
            .collect();
        for (o, id) in members {
            let revision = if o >= partition {
                update.clone()
            } else {
                self.current_revision.clone()
            };
            self.create_pod(o, id, revision);
        }
        for o in (partition.max(0)..replicas).rev() {
            let Some(p) = self.pods.get(&o) else { break };
            if p.revision != update {
                self.restart_pod(o)?;
                break;
            }
            if !self.runs(o, p) {
                break;
            }
        }
        if (0..replicas).all(|o| self.pods.get(&o).is_some_and(|p| p.revision == update)) {
            self.current_revision = update;
        }
        Ok(())
    }

    fn new_volume(&mut self, ordinal: i32) {
        let uid = self.uid("pvc");
        self.log(format!("StatefulSet: volume {ordinal} created ({uid})"));
        self.volumes.insert(
            ordinal,
            Volume {
                uid,
                gone: false,
                deleting: false,
                owner: None,
            },
        );
    }

    fn create_pod(&mut self, ordinal: i32, node_id: NodeId, revision: String) {
        if !self.volumes.contains_key(&ordinal) {
            self.new_volume(ordinal);
        }
        // A member being replaced has no configuration yet: its process cannot start.
        let node_id = if self.configured(ordinal) {
            node_id
        } else {
            NO_CONFIG
        };
        let uid = self.uid("pod");
        self.log(format!(
            "StatefulSet: pod {ordinal} created as node {node_id} ({revision}, {uid})"
        ));
        self.pods.insert(
            ordinal,
            Pod {
                uid,
                revision,
                node_id,
                runs_from: self.pass + self.start_delay,
                host_gone: None,
            },
        );
    }

    /// A rolling-update replacement: the old pod stops, a new one on the update revision
    /// starts. The node must not lead anything at that moment unless something went down
    /// after the partition moved (elections may then land anywhere).
    fn restart_pod(&mut self, ordinal: i32) -> Result<(), String> {
        let running = self
            .pods
            .get(&ordinal)
            .is_some_and(|p| self.runs(ordinal, p));
        let pod = self.pods.remove(&ordinal).expect("pod exists");
        let leaders = self
            .cluster
            .as_ref()
            .map(|c| leaderships(c, pod.node_id))
            .unwrap_or(0);
        // The planner lowered the partition knowing everything that went down before.
        let quiet = self.last_down < self.partition_since;
        if quiet && running && !self.spec.upgrade.force {
            if leaders > 0 {
                return Err(format!(
                    "pass {}: pod {ordinal} restarted while node {} leads {leaders} groups",
                    self.pass, pod.node_id
                ));
            }
            if let Some(c) = self.cluster.as_ref() {
                let live = |v: &NodeId| {
                    *v != pod.node_id
                        && c.nodes
                            .get(v)
                            .is_some_and(|n| n.up && n.state != NodeState::Removed)
                };
                for (gid, g) in std::iter::once((&METADATA_GROUP, &c.metadata)).chain(&c.groups) {
                    if g.voters.contains(&pod.node_id)
                        && g.voters.iter().filter(|v| live(v)).count() * 2 <= g.voters.len()
                    {
                        return Err(format!(
                            "pass {}: restarting pod {ordinal} leaves group {gid} ({:?}) without a live majority",
                            self.pass, g.voters
                        ));
                    }
                }
            }
        }
        self.restarts.push(Restart {
            ordinal,
            node: pod.node_id,
            leaders,
        });
        self.node_down(pod.node_id);
        let id = self
            .status
            .members
            .iter()
            .find(|m| m.ordinal == ordinal)
            .map(|m| m.node_id)
            .unwrap_or(pod.node_id);
        let update = self.update_revision();
        self.log(format!("StatefulSet: pod {ordinal} restarts for {update}"));
        self.create_pod(ordinal, id, update);
        Ok(())
    }

    fn execute(&mut self, step: &Step) -> Result<(), String> {
        let pass = self.pass;
        self.steps.push((pass, step.clone()));
        self.log(format!("step: {}", step.describe()));
        // Deletes never hit a live member: a running pod whose node is still a member, or
        // the volume of such a node.
        let live_member = |w: &World, id: NodeId| {
            w.cluster.as_ref().is_some_and(|c| {
                c.nodes
                    .get(&id)
                    .is_some_and(|n| n.up && n.state != NodeState::Removed)
            })
        };
        match step {
            Step::DeletePod { ordinal, uid } => {
                if let Some(p) = self.pods.get(ordinal).filter(|p| &p.uid == uid) {
                    if self.runs(*ordinal, p) && live_member(self, p.node_id) {
                        return Err(format!(
                            "pass {pass}: deletes pod {ordinal} of live node {}",
                            p.node_id
                        ));
                    }
                }
                if self.pods.get(ordinal).is_some_and(|p| &p.uid == uid) {
                    let pod = self.pods.remove(ordinal).expect("exists");
                    self.node_down(pod.node_id);
                } else {
                    self.log(format!("delete of pod {ordinal}: uid precondition failed"));
                }
            }
            Step::DeleteVolume { ordinal, uid } => {
                if let Some(owner) = self
                    .volumes
                    .get(ordinal)
                    .filter(|v| &v.uid == uid)
                    .and_then(|v| v.owner)
                {
                    if live_member(self, owner) {
                        return Err(format!(
                            "pass {pass}: deletes the volume of live node {owner}"
                        ));
                    }
                }
                let in_use = self.uses_volume(*ordinal);
                match self.volumes.get_mut(ordinal) {
                    Some(v) if &v.uid == uid && in_use => v.deleting = true,
                    Some(v) if &v.uid == uid => {
                        self.volumes.remove(ordinal);
                    }
                    _ => self.log(format!(
                        "delete of volume {ordinal}: uid precondition failed"
                    )),
                }
            }
            Step::Bootstrap {
                nodes,
                shard_groups,
            } => {
                let running: BTreeSet<NodeId> = self
                    .pods
                    .iter()
                    .filter(|(o, p)| self.runs(**o, p))
                    .map(|(_, p)| p.node_id)
                    .collect();
                if self.cluster.is_some() {
                    self.log("bootstrap refused: already bootstrapped".into());
                } else if nodes.len() != 3 || !nodes.iter().all(|n| running.contains(n)) {
                    return Err(format!(
                        "pass {pass}: bootstrap of {nodes:?} while running {running:?}"
                    ));
                } else {
                    self.cluster = Some(ClusterModel::bootstrap(
                        [nodes[0], nodes[1], nodes[2]],
                        *shard_groups,
                        &[],
                    ));
                }
            }
            _ => {
                let Some(m) = self.cluster.as_mut() else {
                    self.log("step failed: no cluster".into());
                    return Ok(());
                };
                if let Step::RemoveReplica { group, node } = step {
                    let g = if *group == METADATA_GROUP {
                        Some(&m.metadata)
                    } else {
                        m.groups.get(group)
                    };
                    if let Some(g) = g.filter(|g| g.voters.contains(node)) {
                        if g.voters.len() <= 3 {
                            return Err(format!(
                                "pass {pass}: {} would leave group {group} with voters {:?} minus one",
                                step.describe(),
                                g.voters
                            ));
                        }
                    }
                }
                if let Err(e) = m.apply(step) {
                    self.log(format!("step failed: {e}"));
                }
            }
        }
        Ok(())
    }

    fn check_after(&mut self) -> Result<(), String> {
        let pass = self.pass;
        if let Some(v) = self.cluster.as_ref().map(|c| &c.violations) {
            if !v.is_empty() {
                return Err(format!("pass {pass}: quorum violated: {v:?}"));
            }
        }
        for m in &self.status.members {
            match self.ids_seen.get(&m.node_id) {
                Some(o) if *o != m.ordinal => {
                    return Err(format!(
                        "pass {pass}: node id {} moved from pod {o} to pod {}",
                        m.node_id, m.ordinal
                    ))
                }
                Some(_) => {}
                None => {
                    if m.node_id <= self.max_id {
                        return Err(format!(
                            "pass {pass}: node id {} handed out after {}",
                            m.node_id, self.max_id
                        ));
                    }
                    self.ids_seen.insert(m.node_id, m.ordinal);
                    self.max_id = m.node_id;
                }
            }
        }
        Ok(())
    }

    /// One reconcile pass: time moves, kubelets act, the operator observes and plans
    /// (twice, to check that planning is a function of the observation), records the
    /// status, sets the StatefulSet and runs the steps.
    fn pass(&mut self) -> Result<Plan, String> {
        self.pass += 1;
        self.now += TICK;
        if self.restart_every_pass {
            self.restart_operator()?;
        }
        self.kubelet()?;
        let obs = self.observe();
        let plan = planner::plan(&obs);
        let again = planner::plan(&obs.clone());
        if plan != again {
            return Err(format!(
                "pass {}: the same observation planned twice differs:\n{plan:?}\n{again:?}",
                self.pass
            ));
        }
        self.check_plan(&obs, &plan)?;
        let crash = std::mem::take(&mut self.crash_point);
        if crash != CrashPoint::Never {
            self.log(format!("operator crash: {crash:?}"));
        }
        if crash == CrashPoint::BeforeStatus {
            return Ok(plan);
        }
        for n in &plan.notices {
            self.notices.push((self.pass, n.reason.clone()));
            self.trace
                .push(format!("[{}] {}: {}", self.pass, n.reason, n.note));
        }
        self.status = plan.status.clone();
        if crash != CrashPoint::BeforeStatefulSet {
            self.statefulset()?;
            for (i, step) in plan.steps.iter().enumerate() {
                if crash == CrashPoint::BeforeSteps
                    || (crash == CrashPoint::AfterFirstStep && i > 0)
                {
                    break;
                }
                self.execute(step)?;
            }
        }
        self.check_after()?;
        Ok(plan)
    }

    fn tick(&mut self) -> Plan {
        match self.pass() {
            Ok(plan) => plan,
            Err(e) => panic!("{e}\n{}", self.dump()),
        }
    }

    fn run(&mut self, passes: u64) -> Result<(), String> {
        for _ in 0..passes {
            self.pass()?;
        }
        Ok(())
    }

    fn run_until(&mut self, what: &str, limit: u64, done: impl Fn(&World) -> bool) {
        for _ in 0..limit {
            self.tick();
            if done(self) {
                return;
            }
        }
        panic!("{what}: not reached in {limit} passes\n{}", self.dump());
    }

    /// Why the world has not converged yet, or `None` once it has: no operation, every
    /// group settled, balanced and (with three zones) spread, as many pods as the spec
    /// asks, all running the newest revision, every member active, no volume left over,
    /// and the conditions say done at the current generation.
    fn unconverged(&self) -> Option<String> {
        if let Some(op) = self.op() {
            return Some(format!("operation in flight: {op:?}"));
        }
        let Some(c) = self.cluster.as_ref() else {
            return Some("not bootstrapped".into());
        };
        if !c.is_settled() {
            return Some("groups not settled".into());
        }
        if !c.is_balanced() {
            return Some("not balanced".into());
        }
        if self.zones && !c.zone_conflicts().is_empty() {
            return Some(format!("zone conflicts in groups {:?}", c.zone_conflicts()));
        }
        let nodes = self.spec.nodes;
        if planner::desired_pods(&self.status) != nodes {
            return Some(format!(
                "desired pods {} != {nodes}",
                planner::desired_pods(&self.status)
            ));
        }
        if self.status.members.len() as i32 != nodes
            || self
                .status
                .members
                .iter()
                .any(|m| m.state != MemberState::Active)
        {
            return Some("members not all active".into());
        }
        let update = self.update_revision();
        for o in 0..nodes {
            match self.pods.get(&o) {
                Some(p) if self.runs(o, p) && p.revision == update => {}
                Some(p) => return Some(format!("pod {o} not running {update}: {p:?}")),
                None => return Some(format!("pod {o} missing")),
            }
        }
        if self.pods.len() as i32 != nodes {
            return Some("extra pods".into());
        }
        // A volume above the size is left over; one no node ever ran on is tolerated here
        // (see a_cancelled_scale_out_leaves_no_volume_behind).
        let used_leftover = self.volumes.range(nodes..).any(|(_, v)| v.owner.is_some());
        if (0..nodes).any(|o| !self.volumes.contains_key(&o)) || used_leftover {
            return Some(format!(
                "volumes {:?} for {nodes} pods",
                self.volumes.keys().collect::<Vec<_>>()
            ));
        }
        if self.status.current_version.as_deref() != Some(self.spec.version.as_str()) {
            return Some("current version not set".into());
        }
        for (type_, want) in [
            ("Available", "True"),
            ("Progressing", "False"),
            ("Degraded", "False"),
        ] {
            let c = condition(&self.status, type_);
            if c.status != want || c.observed_generation != Some(self.generation) {
                return Some(format!("condition {c:?}"));
            }
        }
        None
    }

    /// Runs passes until the world converged; the number of passes it took.
    fn settle(&mut self, limit: u64) -> Result<u64, String> {
        for n in 0..limit {
            if self.unconverged().is_none() {
                return Ok(n);
            }
            if let Err(e) = self.pass() {
                return Err(format!("{e}\n{}", self.dump()));
            }
        }
        match self.unconverged() {
            None => Ok(limit),
            Some(why) => Err(format!(
                "no convergence in {limit} passes: {why}\n{}",
                self.dump()
            )),
        }
    }

    fn settle_or_panic(&mut self) -> u64 {
        self.settle(SETTLE_PASSES).unwrap_or_else(|e| panic!("{e}"))
    }

    fn dump(&self) -> String {
        let view = self.cluster.as_ref().map(|c| c.view());
        let tail: Vec<&String> = self.trace.iter().rev().take(80).collect();
        format!(
            "spec: nodes {} version {} paused {}\noperation: {:?}\nconditions: {:#?}\nmembers: {:#?}\npods: {:?}\nvolumes: {:?}\nsts: {:?} update {}\ncluster: {:#?}\ntrace (newest first): {tail:#?}",
            self.spec.nodes,
            self.spec.version,
            self.spec.paused,
            self.status.operation,
            self.status.conditions,
            self.status.members,
            self.pods,
            self.volumes,
            self.sts,
            self.update_revision(),
            view.as_ref().map(summary),
        )
    }

    fn deletes(&self) -> Vec<Step> {
        self.steps
            .iter()
            .filter(|(_, s)| matches!(s, Step::DeletePod { .. } | Step::DeleteVolume { .. }))
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn started(&self, type_: OperationType) -> usize {
        let reason = format!("{type_:?}Started");
        self.notices.iter().filter(|(_, r)| *r == reason).count()
    }

    /// Whether faults may strike now: bootstrapped, nothing down, every replica of every
    /// group on a live node (three replicas per group survive one failure, not two).
    fn healthy(&self) -> bool {
        let Some(c) = self.cluster.as_ref() else {
            return false;
        };
        let live = |v: &NodeId| {
            c.nodes
                .get(v)
                .is_some_and(|n| n.up && n.state != NodeState::Removed)
        };
        self.crashed.is_empty()
            && self.pods.values().all(|p| p.host_gone.is_none())
            && self.volumes.values().all(|v| !v.gone)
            && std::iter::once(&c.metadata)
                .chain(c.groups.values())
                .all(|g| g.leader.is_some() && g.voters.iter().chain(&g.learners).all(live))
    }
}

/// A readable cluster view: nodes, then each group's voters / learners / leader.
fn summary(c: &ClusterView) -> String {
    let mut s = String::new();
    for (id, n) in &c.nodes {
        s.push_str(&format!(
            "node {id}: {:?} reachable {} zone {:?}\n",
            n.state, n.reachable, n.zone
        ));
    }
    for (id, g) in c.all_groups() {
        s.push_str(&format!(
            "group {id}: {:?} learners {:?} leader {:?}\n",
            g.voters, g.learners, g.leader
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Regression tests, one per failure class.
// ---------------------------------------------------------------------------------------

#[test]
fn a_new_cluster_bootstraps_three_nodes_then_grows_to_the_spec() {
    let mut w = World::new(spec(5, 12), true);
    let first = w.tick();
    assert_eq!(
        first.status.members.len(),
        3,
        "three members first: {first:?}"
    );
    assert_eq!(
        first.status.operation.as_ref().map(|o| o.type_),
        Some(OperationType::Bootstrap)
    );
    assert_eq!(planner::desired_pods(&first.status), 3);
    w.settle_or_panic();
    assert_eq!(w.ids(), vec![1, 2, 3, 4, 5]);
    assert_eq!(w.started(OperationType::Bootstrap), 1);
    assert_eq!(w.started(OperationType::ScaleOut), 2);
    assert!(w.model().zone_conflicts().is_empty());
    assert!(w.deletes().is_empty());
}

#[test]
fn scale_up_during_scale_in_cancels_the_drain() {
    let mut w = World::running(5, 8, false);
    let ids = w.ids();
    let id4 = w.member(4).node_id;
    let hosted = w.hosted(id4);
    assert!(hosted > 0);

    // 5 -> 4: ordinal 4 drains; some replicas already left it.
    w.set_nodes(4);
    w.run_until("the drain of pod 4 under way", 100, |w| {
        w.op().is_some_and(|o| {
            o.type_ == OperationType::ScaleIn && o.phase == "Draining" && o.targets == [4]
        }) && w.registry(id4) == Some(NodeState::Draining)
            && w.hosted(id4) < hosted
    });
    assert_eq!(w.member(4).state, MemberState::Draining);
    assert!(!w.op().expect("scale-in").point_of_no_return);

    // Back to 5 while draining: cancelled, the node is active again, nothing removed.
    // The registry mark is cleared first, while the operation still records the drain.
    w.set_nodes(5);
    let plan = w.tick();
    assert!(
        plan.steps.contains(&Step::SetNodeState {
            node: id4,
            state: NodeState::Active
        }),
        "{plan:?}"
    );
    assert!(plan.status.operation.is_some(), "{plan:?}");
    let plan = w.tick();
    assert!(plan.status.operation.is_none(), "{plan:?}");
    assert_eq!(w.member(4).state, MemberState::Active);
    assert_eq!(w.registry(id4), Some(NodeState::Active));
    assert_eq!(w.sts.map(|s| s.replicas), Some(5));
    w.settle_or_panic();
    assert_eq!(w.ids(), ids, "no member was removed or replaced");
    assert!(w.deletes().is_empty(), "{:?}", w.deletes());
    assert!(w.steps.iter().all(|(_, s)| !matches!(
        s,
        Step::SetNodeState {
            state: NodeState::Removed,
            ..
        }
    )));

    // Past the point of no return, raising the size does not bring the id back: the
    // removal completes and a new pod joins under a new id.
    w.set_nodes(4);
    w.run_until("pod 4 past the point of no return", 300, |w| {
        w.op()
            .is_some_and(|o| o.type_ == OperationType::ScaleIn && o.point_of_no_return)
    });
    w.set_nodes(5);
    for _ in 0..SETTLE_PASSES {
        if w.unconverged().is_none() {
            break;
        }
        w.tick();
        assert_ne!(
            w.registry(id4),
            Some(NodeState::Active),
            "the removed node came back"
        );
    }
    w.settle_or_panic();
    assert_eq!(w.registry(id4), Some(NodeState::Removed));
    let new4 = w.member(4).node_id;
    assert!(
        new4 > *ids.iter().max().expect("ids"),
        "new id {new4} after {ids:?}"
    );
    assert_eq!(&w.ids()[..4], &ids[..4]);
    assert!(
        w.deletes()
            .iter()
            .any(|s| matches!(s, Step::DeleteVolume { ordinal: 4, .. })),
        "the drained node's volume was deleted before its ordinal was reused"
    );
}

#[test]
fn transient_pod_loss_does_not_shrink_the_statefulset_or_fail_over() {
    let mut w = World::running(5, 8, false);
    let ids = w.ids();
    // Down for 20 s, under the 30 s failover timeout.
    w.crash(2, 4);
    let mut seen_down = false;
    for _ in 0..40 {
        let plan = w.tick();
        seen_down |= plan.status.members[2].down_since.is_some();
        assert_eq!(planner::desired_pods(&plan.status), 5);
        assert_eq!(w.sts.map(|s| s.replicas), Some(5));
        assert!(
            plan.status
                .operation
                .as_ref()
                .is_none_or(|o| o.type_ != OperationType::Failover),
            "{plan:?}"
        );
    }
    assert!(seen_down, "the planner saw the pod down");
    w.settle_or_panic();
    assert_eq!(w.started(OperationType::Failover), 0);
    assert!(w.status.failovers.is_empty());
    assert!(w.deletes().is_empty());
    assert_eq!(w.ids(), ids);
}

/// Two voters of one shard group down for far longer than the failover timeout.
#[test]
fn no_failover_while_a_group_has_lost_quorum() {
    let mut w = World::running(5, 8, false);
    let ids = w.ids();
    let ordinal_of = |w: &World, id: NodeId| {
        w.status
            .members
            .iter()
            .find(|m| m.node_id == id)
            .expect("member")
            .ordinal
    };
    let meta = w.model().metadata.voters.clone();
    // A shard group whose lost voters do not include a majority of the metadata group.
    let (gid, pair) = w
        .model()
        .groups
        .iter()
        .find_map(|(gid, g)| {
            let pair: Vec<NodeId> = g.voters.iter().copied().take(2).collect();
            (pair.iter().filter(|v| meta.contains(v)).count() < 2).then_some((*gid, pair))
        })
        .expect("some group");
    let (a, b) = (ordinal_of(&w, pair[0]), ordinal_of(&w, pair[1]));
    w.crash(a, 100);
    w.crash(b, 100);
    for _ in 0..60 {
        let plan = w.tick();
        assert!(plan.steps.is_empty(), "{plan:?}");
        assert!(plan.status.operation.is_none(), "{plan:?}");
        assert_eq!(planner::desired_pods(&plan.status), 5);
    }
    assert!(w.model().groups[&gid].leader.is_none());
    assert_eq!(condition(&w.status, "Available").reason, "QuorumLost");
    assert_eq!(condition(&w.status, "Degraded").status, "True");
    assert!(w.status.failovers.is_empty());
    w.run(50).expect("passes");
    w.settle_or_panic();
    assert_eq!(w.started(OperationType::Failover), 0);
    assert_eq!(w.ids(), ids);
}

#[test]
fn no_failover_during_a_metadata_outage() {
    let mut w = World::running(5, 8, false);
    let ids = w.ids();
    let meta = w.model().metadata.voters.clone();
    let ordinals: Vec<i32> = w
        .status
        .members
        .iter()
        .filter(|m| meta[1..].contains(&m.node_id))
        .map(|m| m.ordinal)
        .collect();
    assert_eq!(ordinals.len(), 2);
    for o in &ordinals {
        w.crash(*o, 100);
    }
    for _ in 0..60 {
        let plan = w.tick();
        assert!(plan.steps.is_empty(), "{plan:?}");
        assert!(plan.status.operation.is_none(), "{plan:?}");
    }
    assert!(w.model().metadata.leader.is_none());
    let available = condition(&w.status, "Available");
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("False", "QuorumLost")
    );
    let degraded = condition(&w.status, "Degraded");
    assert_eq!(degraded.status, "True");
    assert!(w.status.failovers.is_empty());
    w.run(50).expect("passes");
    w.settle_or_panic();
    assert_eq!(w.started(OperationType::Failover), 0);
    assert_eq!(w.ids(), ids);
}

#[test]
fn operator_cannot_reach_any_node_changes_nothing() {
    let mut w = World::running(5, 8, false);
    let members = w.status.members.clone();
    w.reachable = false;
    w.crash(1, 80);
    w.set_nodes(3);
    w.bump_version();
    for _ in 0..60 {
        let plan = w.tick();
        assert!(plan.steps.is_empty(), "{plan:?}");
        assert!(plan.status.operation.is_none(), "{plan:?}");
        assert_eq!(planner::desired_pods(&plan.status), 5);
        let ids: Vec<(i32, NodeId, MemberState)> = plan
            .status
            .members
            .iter()
            .map(|m| (m.ordinal, m.node_id, m.state))
            .collect();
        let before: Vec<(i32, NodeId, MemberState)> = members
            .iter()
            .map(|m| (m.ordinal, m.node_id, m.state))
            .collect();
        assert_eq!(ids, before);
    }
    assert!(w.restarts.is_empty(), "no pod was restarted");
    let available = condition(&w.status, "Available");
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("Unknown", "ClusterUnreachable")
    );
    let degraded = condition(&w.status, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "ClusterUnreachable")
    );
    // Once a node answers again, the operator catches up with the spec.
    w.reachable = true;
    w.run(30).expect("passes");
    w.settle_or_panic();
    assert_eq!(w.status.members.len(), 3);
}

#[test]
fn upgrade_with_a_group_already_under_replicated_waits_and_says_why() {
    let mut w = World::running(4, 8, false);
    // No failover may heal the group: the rollout has to wait or be forced.
    w.spec.failover.max_per_day = 0;
    w.crash(1, NEVER);
    w.run(2).expect("passes");
    assert!(!w.model().view().under_replicated().is_empty());
    w.bump_version();
    w.tick();
    for _ in 0..40 {
        w.tick();
        let op = w.op().expect("a rollout");
        assert_eq!(
            (op.type_, op.phase.as_str()),
            (OperationType::RollingUpgrade, "Gate")
        );
        assert!(op.message.contains("under-replicated"), "{op:?}");
    }
    assert!(w.restarts.is_empty());
    assert!(!w.steps.iter().any(|(_, s)| matches!(
        s,
        Step::SetNodeState {
            state: NodeState::Maintenance,
            ..
        }
    )));
    assert_eq!(condition(&w.status, "Degraded").status, "True");
    assert_eq!(condition(&w.status, "Progressing").reason, "RollingUpgrade");

    // The documented force: the rollout goes on.
    w.spec.upgrade.force = true;
    w.generation += 1;
    w.run_until("a forced restart", 100, |w| !w.restarts.is_empty());
    w.revive(1);
    w.settle_or_panic();
    assert_eq!(w.started(OperationType::RollingUpgrade), 1);
}

/// A named point in an operation: how to tell it was reached, and what starts it.
type CheckpointCase = (&'static str, fn(&World) -> bool, fn(&mut World));

/// The operator keeps no memory but the status: reading it back after a restart (a JSON
/// round trip) in the middle of each kind of operation reaches exactly the same end as
/// not restarting; restarting before every pass, and crashing between status write and
/// steps, still converges to the same members.
#[test]
fn operator_restart_mid_operation_resumes_from_the_ledger() {
    let mut w = World::running(5, 8, true);
    let checkpoints: [CheckpointCase; 4] = [
        (
            "scale-in draining",
            |w| {
                w.op().is_some_and(|o| {
                    o.type_ == OperationType::ScaleIn && o.phase == "Draining" && o.done >= 2
                })
            },
            |w| w.set_nodes(3),
        ),
        (
            "rollout restarting a pod",
            |w| {
                w.op().is_some_and(|o| {
                    o.type_ == OperationType::RollingUpgrade
                        && o.phase == "Restarting"
                        && o.done >= 1
                })
            },
            |w| w.bump_version(),
        ),
        (
            "failover re-replicating",
            |w| {
                w.op().is_some_and(|o| {
                    o.type_ == OperationType::Failover && o.phase == "ReReplicating" && o.done >= 1
                })
            },
            |w| w.lose_host(0, false),
        ),
        (
            "scale-out registering",
            |w| w.op().is_some_and(|o| o.type_ == OperationType::ScaleOut),
            |w| w.set_nodes(5),
        ),
    ];
    for (what, reached, change) in checkpoints {
        change(&mut w);
        w.run_until(what, 300, reached);
        let mut restarted = w.clone();
        restarted.restart_operator().expect("round trip");
        let mut always = w.clone();
        always.restart_every_pass = true;
        let mut crashing = w.clone();
        crashing.restart_every_pass = true;

        w.settle_or_panic();
        restarted.settle_or_panic();
        always.settle_or_panic();
        for k in 0..SETTLE_PASSES {
            if crashing.unconverged().is_none() {
                break;
            }
            crashing.crash_point = match k % 4 {
                0 => CrashPoint::BeforeSteps,
                1 => CrashPoint::AfterFirstStep,
                2 => CrashPoint::BeforeStatefulSet,
                _ => CrashPoint::Never,
            };
            crashing.tick();
        }
        crashing.settle_or_panic();

        assert_eq!(restarted.status, w.status, "{what}: restarted once");
        assert_eq!(
            restarted.model().view(),
            w.model().view(),
            "{what}: restarted once"
        );
        assert_eq!(always.status, w.status, "{what}: restarted every pass");
        assert_eq!(
            crashing.ids(),
            w.ids(),
            "{what}: crashing between side effects"
        );
        let registry = |w: &World| -> Vec<(NodeId, NodeState)> {
            w.model()
                .nodes
                .iter()
                .map(|(id, n)| (*id, n.state))
                .collect()
        };
        assert_eq!(registry(&crashing), registry(&w), "{what}");
    }
}

#[test]
fn failover_budget_caps_replacements_per_day() {
    let mut w = World::running(5, 8, false);
    w.spec.failover.max_per_day = 1;
    w.generation += 1;
    let b = w.member(2).node_id;
    w.crash(1, NEVER);
    w.run_until("the first failover", 200, |w| {
        w.member(1).state == MemberState::FailedOver && w.op().is_none()
    });
    assert_eq!(w.status.failovers.len(), 1);
    let failovers = w.started(OperationType::Failover);

    w.crash(2, NEVER);
    for _ in 0..100 {
        w.tick();
        assert!(
            w.op().is_none_or(|o| o.type_ != OperationType::Failover),
            "{:?}",
            w.op()
        );
    }
    assert_eq!(w.started(OperationType::Failover), failovers);
    assert_eq!(w.member(2).state, MemberState::Active);
    assert!(w.member(2).down_since.is_some());
    assert_eq!(w.registry(b), Some(NodeState::Active));
    assert_eq!(condition(&w.status, "Degraded").status, "True");

    // A day later the budget has room again.
    w.now += DAY;
    w.run_until("the second failover, a day later", 300, |w| {
        w.member(2).state == MemberState::FailedOver && w.op().is_none()
    });
    assert_eq!(w.registry(b), Some(NodeState::Removed));
    assert_eq!(w.status.failovers.len(), 1, "the first one aged out");
    assert!(w.model().is_settled());
    assert!(w.model().violations.is_empty());
}

#[test]
fn replacement_only_on_positive_evidence() {
    // Evidence: the pod's Kubernetes node is gone.
    let mut w = World::running(5, 8, false);
    let ids = w.ids();
    let old = w.member(3).node_id;
    w.crash(3, NEVER);
    w.run_until("pod 3 failed over", 200, |w| {
        w.member(3).state == MemberState::FailedOver && w.op().is_none()
    });
    assert_eq!(w.registry(old), Some(NodeState::Removed));
    for _ in 0..100 {
        w.tick();
    }
    assert!(
        w.deletes().is_empty(),
        "no evidence, no delete: {:?}",
        w.deletes()
    );
    assert_eq!(w.member(3).node_id, old);
    assert_eq!(w.member(3).state, MemberState::FailedOver);
    let pod_uid = w.pods[&3].uid.clone();
    let volume_uid = w.volumes[&3].uid.clone();
    w.lose_host(3, false);
    w.run_until("pod 3 replaced", 200, |w| {
        w.member(3).state == MemberState::Active && w.op().is_none()
    });
    let deletes = w.deletes();
    assert!(deletes.contains(&Step::DeletePod {
        ordinal: 3,
        uid: pod_uid.clone()
    }));
    assert!(deletes.contains(&Step::DeleteVolume {
        ordinal: 3,
        uid: volume_uid.clone()
    }));
    assert!(
        deletes.iter().all(|s| *s
            == Step::DeletePod {
                ordinal: 3,
                uid: pod_uid.clone()
            }
            || *s
                == Step::DeleteVolume {
                    ordinal: 3,
                    uid: volume_uid.clone()
                }),
        "deletes only ever name the failed pod's objects: {deletes:?}"
    );
    let new = w.member(3).node_id;
    assert!(new > *ids.iter().max().expect("ids"), "{new} after {ids:?}");
    w.settle_or_panic();

    // Evidence: the pod answers again, as the id that was removed.
    let ids = w.ids();
    let old = w.member(2).node_id;
    w.crash(2, NEVER);
    w.run_until("pod 2 failed over", 200, |w| {
        w.member(2).state == MemberState::FailedOver && w.op().is_none()
    });
    let before = w.deletes().len();
    w.run(20).expect("passes");
    assert_eq!(w.deletes().len(), before);
    let pod_uid = w.pods[&2].uid.clone();
    w.revive(2);
    w.run_until("pod 2 replaced", 200, |w| {
        w.member(2).state == MemberState::Active && w.op().is_none()
    });
    assert!(w.deletes()[before..].contains(&Step::DeletePod {
        ordinal: 2,
        uid: pod_uid
    }));
    assert!(w.member(2).node_id > *ids.iter().max().expect("ids"));
    assert_eq!(w.registry(old), Some(NodeState::Removed));
    w.settle_or_panic();

    // Replacement turned off: the host is gone, still nothing is deleted.
    let mut w = World::running(4, 8, false);
    w.spec.failover.replace_pods = false;
    w.generation += 1;
    w.lose_host(1, true);
    w.run_until("pod 1 failed over", 300, |w| {
        w.member(1).state == MemberState::FailedOver && w.op().is_none()
    });
    w.run(60).expect("passes");
    assert!(w.deletes().is_empty(), "{:?}", w.deletes());
}

#[test]
fn paused_takes_no_action_but_keeps_status_current() {
    let mut w = World::running(5, 8, false);
    let members = w.status.members.clone();
    // Paused in the middle of a scale-in: the ledger stays as it is.
    w.set_nodes(4);
    w.run_until("a drain under way", 100, |w| {
        w.op()
            .is_some_and(|o| o.type_ == OperationType::ScaleIn && o.done >= 1)
    });
    w.set_paused(true);
    let op = w.op().cloned();
    w.crash(1, NEVER);
    w.set_nodes(3);
    w.bump_version();
    let generation = w.generation;
    for _ in 0..60 {
        let plan = w.tick();
        assert!(plan.steps.is_empty(), "{plan:?}");
        assert_eq!(plan.status.operation, op);
        assert_eq!(planner::desired_pods(&plan.status), 5);
    }
    assert!(w.restarts.is_empty());
    let st = &w.status;
    assert_eq!(st.observed_generation, Some(generation));
    let m1 = w.member(1);
    assert!(!m1.ready && m1.down_since.is_some(), "{m1:?}");
    assert_eq!(m1.node_id, members[1].node_id);
    assert_eq!(st.ready_nodes, 4);
    assert!(st.groups.under_replicated > 0, "{:?}", st.groups);
    let progressing = condition(st, "Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", "Paused")
    );
    // Unpaused, it acts again and gets there.
    w.set_paused(false);
    w.revive(1);
    w.settle_or_panic();
    assert_eq!(w.status.members.len(), 3);
}

#[test]
fn scale_in_waits_while_a_node_is_down() {
    let mut w = World::running(5, 8, false);
    w.spec.failover.timeout_seconds = 600;
    let ids = w.ids();
    w.crash(1, 40);
    w.run(2).expect("passes");
    w.set_nodes(4);
    for _ in 0..20 {
        let plan = w.tick();
        assert!(plan.status.operation.is_none(), "{plan:?}");
        assert!(plan.steps.is_empty(), "{plan:?}");
    }
    assert_eq!(w.registry(ids[4]), Some(NodeState::Active));
    assert_eq!(condition(&w.status, "Degraded").status, "True");
    w.settle_or_panic();
    assert_eq!(w.ids(), ids[..4]);
    assert_eq!(w.registry(ids[4]), Some(NodeState::Removed));
}

#[test]
fn rolling_upgrade_moves_leaders_off_each_pod_before_it_restarts() {
    let mut w = World::running(5, 12, true);
    w.bump_version();
    w.settle_or_panic();
    let order: Vec<i32> = w.restarts.iter().map(|r| r.ordinal).collect();
    assert_eq!(
        order,
        vec![4, 3, 2, 1, 0],
        "highest ordinal first, once each"
    );
    assert!(
        w.restarts.iter().all(|r| r.leaders == 0),
        "{:?}",
        w.restarts
    );
    assert_eq!(w.started(OperationType::RollingUpgrade), 1);
    // No maintenance mark is left behind.
    assert!(w
        .model()
        .nodes
        .values()
        .all(|n| n.state == NodeState::Active));
    assert!(w
        .restarts
        .iter()
        .all(|r| w.member(r.ordinal).node_id == r.node));
}

#[test]
fn a_paused_cluster_still_reports_what_is_degraded() {
    let mut w = World::running(5, 8, false);
    w.set_paused(true);
    w.crash(1, NEVER);
    w.run(10).expect("passes");
    assert!(w.status.groups.under_replicated > 0);
    let degraded = condition(&w.status, "Degraded");
    assert_eq!(degraded.status, "True", "{degraded:?}");
}

/// A host lost while a rollout moves leaderships off the next pod: with its local volume
/// gone the pod cannot come back, the StatefulSet will not restart the target below an
/// unhealthy pod (or the target itself cannot start), and the rollout must give way to
/// the failover instead of waiting for ever.
#[test]
fn a_host_lost_during_a_rollout_is_failed_over() {
    for lost in [3, 2] {
        let mut w = World::running(4, 8, false);
        // PodGC collects pods of vanished hosts, as in every cluster.
        w.podgc_after = 8;
        w.bump_version();
        w.run_until("the rollout moving leaderships off pod 2", 200, |w| {
            w.op().is_some_and(|o| {
                o.type_ == OperationType::RollingUpgrade
                    && o.phase == "MovingLeaders"
                    && o.targets.first() == Some(&2)
            })
        });
        let old = w.member(lost).node_id;
        w.lose_host(lost, true);
        w.settle(SETTLE_PASSES)
            .unwrap_or_else(|e| panic!("host of pod {lost} lost: {e}"));
        assert_eq!(w.registry(old), Some(NodeState::Removed));
        assert!(w.member(lost).node_id > old);
    }
}

/// A new template revision (a second version bump) while a rollout is between two pods:
/// the StatefulSet must not restart the already updated pods above the partition on its
/// own, without the health gate and without moving their leaderships off first.
#[test]
fn a_new_revision_mid_rollout_restarts_no_pod_behind_the_operators_back() {
    let mut w = World::running(5, 8, false);
    w.bump_version();
    w.run_until("pods 4 and 3 updated, pod 2 next", 200, |w| {
        w.op().is_some_and(|o| {
            o.type_ == OperationType::RollingUpgrade
                && o.phase == "MovingLeaders"
                && o.targets.first() == Some(&2)
        })
    });
    assert_eq!(
        w.status.partition,
        Some(3),
        "the partition is held at pod 3"
    );
    w.bump_version();
    w.settle_or_panic();
    let unmanaged: Vec<&Restart> = w.restarts.iter().filter(|r| r.leaders > 0).collect();
    assert!(unmanaged.is_empty(), "{unmanaged:?}");
}

/// A scale-out cancelled before its pod registered: the pod goes, and so must the volume
/// the StatefulSet created for it.
#[test]
fn a_cancelled_scale_out_leaves_no_volume_behind() {
    let mut w = World::running(3, 8, false);
    w.start_delay = 3;
    w.set_nodes(4);
    w.tick();
    assert!(w.pods.contains_key(&3) && w.volumes.contains_key(&3));
    w.set_nodes(3);
    w.tick();
    assert!(planner::desired_pods(&w.status) == 3 && !w.pods.contains_key(&3));
    w.settle_or_panic();
    assert_eq!(
        w.volumes.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "the volume of the cancelled pod is deleted"
    );
}

/// The failed pod is already gone (PodGC collected it from its vanished host) when the
/// replacement starts: the StatefulSet recreates the pod at once with the member's config,
/// so the new node id must not be given out while the old node's volume still exists.
#[test]
fn a_replacement_never_starts_the_new_id_on_the_old_volume() {
    let mut w = World::running(5, 8, false);
    w.crash(0, NEVER);
    w.run_until("pod 0 failed over", 200, |w| {
        w.member(0).state == MemberState::FailedOver && w.op().is_none()
    });
    // The host vanishes and PodGC deletes the pod before the operator looks again.
    w.podgc_after = 0;
    w.lose_host(0, false);
    w.settle_or_panic();
}

/// A host lost while a scale-in drains another node: the drain soon needs the lost node
/// to take a replica, and the failover needs the operation slot. The drain is still
/// reversible and must give way (or the failover go first) rather than block for ever.
#[test]
fn a_host_lost_during_a_drain_is_failed_over() {
    let mut w = World::running(4, 8, false);
    w.podgc_after = 8;
    let ids = w.ids();
    w.set_nodes(3);
    w.run_until("the drain of pod 3 under way", 100, |w| {
        w.op()
            .is_some_and(|o| o.type_ == OperationType::ScaleIn && o.phase == "Draining")
            && w.registry(ids[3]) == Some(NodeState::Draining)
    });
    w.lose_host(0, true);
    w.settle_or_panic();
    assert_eq!(w.registry(ids[0]), Some(NodeState::Removed));
    assert_eq!(w.registry(ids[3]), Some(NodeState::Removed));
}

/// A node goes down after the health gate let the next pod through: the restart must
/// wait (or the gate be taken again), as restarting now leaves the groups the two nodes
/// share without a live majority.
#[test]
fn a_node_down_after_the_gate_holds_the_restart() {
    let mut w = World::running(4, 8, false);
    w.bump_version();
    w.run_until("the rollout moving leaderships off pod 3", 100, |w| {
        w.op().is_some_and(|o| {
            o.type_ == OperationType::RollingUpgrade
                && o.phase == "MovingLeaders"
                && o.targets.first() == Some(&3)
        })
    });
    w.crash(0, 30);
    w.settle_or_panic();
}

/// The operator dies right after the pass that finished a pod's restart wrote its status,
/// before the step clearing the pod's maintenance mark ran. The ledger has moved on to the
/// next pod; the mark must still be cleared before that pod restarts.
#[test]
fn a_maintenance_mark_never_outlives_its_restart() {
    let mut w = World::running(4, 8, false);
    w.bump_version();
    let mut crashed = false;
    for _ in 0..SETTLE_PASSES {
        if w.unconverged().is_none() {
            break;
        }
        let finishing = w.op().is_some_and(|o| {
            o.phase == "Restarting"
                && o.targets.first().is_some_and(|t| {
                    w.pods.get(t).is_some_and(|p| {
                        p.revision == w.update_revision() && w.pass + 1 >= p.runs_from
                    })
                })
        });
        if finishing && !crashed {
            w.crash_point = CrashPoint::BeforeSteps;
            crashed = true;
        }
        w.tick();
        let target = w
            .op()
            .filter(|o| o.type_ == OperationType::RollingUpgrade)
            .and_then(|o| o.targets.first())
            .map(|t| w.member(*t).node_id);
        let marked: Vec<NodeId> = w
            .model()
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Maintenance)
            .map(|(id, _)| *id)
            .collect();
        assert!(
            marked.iter().all(|id| Some(*id) == target),
            "pass {}: nodes {marked:?} in maintenance while the rollout is on {target:?}",
            w.pass
        );
    }
    assert!(crashed);
    w.settle_or_panic();
}

/// The Degraded condition names what blocks progress, not only the symptom: each case
/// above has an under-replicated group or a node down as well, and the reason the user
/// needs is the one that says what the operator is waiting for.
#[test]
fn degraded_reason_names_what_blocks_progress() {
    // Metadata outage.
    let mut w = World::running(5, 8, false);
    let meta = w.model().metadata.voters.clone();
    for o in w
        .status
        .members
        .iter()
        .filter(|m| meta[1..].contains(&m.node_id))
        .map(|m| m.ordinal)
        .collect::<Vec<_>>()
    {
        w.crash(o, NEVER);
    }
    w.run(3).expect("passes");
    let mut reasons = vec![(
        "QuorumLost",
        condition(&w.status, "Degraded").reason.clone(),
    )];

    // Rollout blocked by an under-replicated group.
    let mut w = World::running(4, 8, false);
    w.spec.failover.max_per_day = 0;
    w.crash(1, NEVER);
    w.bump_version();
    w.run(5).expect("passes");
    reasons.push((
        "RolloutBlocked",
        condition(&w.status, "Degraded").reason.clone(),
    ));

    // Failover budget exhausted.
    let mut w = World::running(5, 8, false);
    w.spec.failover.max_per_day = 0;
    w.crash(1, NEVER);
    w.run(20).expect("passes");
    reasons.push((
        "FailoverBudgetExhausted",
        condition(&w.status, "Degraded").reason.clone(),
    ));

    // Scale-in blocked by a node that is down.
    let mut w = World::running(5, 8, false);
    w.spec.failover.timeout_seconds = 600;
    w.crash(1, NEVER);
    w.set_nodes(4);
    w.run(5).expect("passes");
    reasons.push((
        "ScaleInBlocked",
        condition(&w.status, "Degraded").reason.clone(),
    ));

    let wrong: Vec<_> = reasons.iter().filter(|(want, got)| want != got).collect();
    assert!(wrong.is_empty(), "(wanted, got): {wrong:?}");
}

// ---------------------------------------------------------------------------------------
// Properties over generated situations.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Event {
    Nodes(i32),
    Version,
    Template,
    /// A node's process down for some passes (it comes back).
    Crash {
        ordinal: i32,
        passes: u64,
    },
    /// A node's Kubernetes node vanishes for good (with a local volume, or not).
    HostLost {
        ordinal: i32,
        local_volume: bool,
    },
    Pause(bool),
    /// The operator restarts: it reads its status back.
    OperatorRestart,
    /// The operator dies in the middle of its next pass.
    OperatorCrash(CrashPoint),
}

#[derive(Clone, Debug)]
struct Scenario {
    nodes: i32,
    groups: i32,
    zones: bool,
    start_delay: u64,
    podgc_after: u64,
    concurrent_moves: i32,
    /// (passes before the event, event)
    events: Vec<(u64, Event)>,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => (3..=7i32).prop_map(Event::Nodes),
        2 => Just(Event::Version),
        1 => Just(Event::Template),
        3 => (0..7i32, 1..=40u64).prop_map(|(ordinal, passes)| Event::Crash { ordinal, passes }),
        2 => (0..7i32, any::<bool>())
            .prop_map(|(ordinal, local_volume)| Event::HostLost { ordinal, local_volume }),
        1 => any::<bool>().prop_map(Event::Pause),
        1 => Just(Event::OperatorRestart),
        2 => prop_oneof![
            Just(CrashPoint::BeforeStatus),
            Just(CrashPoint::BeforeStatefulSet),
            Just(CrashPoint::BeforeSteps),
            Just(CrashPoint::AfterFirstStep),
        ]
        .prop_map(Event::OperatorCrash),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        3..=7i32,
        1..=24i32,
        any::<bool>(),
        1..=3u64,
        // PodGC soon after a host vanished, or never (the pod stays until the operator
        // deletes it); a PodGC that collects a failed-over pod's pod before its
        // replacement is a_replacement_never_starts_the_new_id_on_the_old_volume.
        prop_oneof![Just(8u64), Just(NEVER)],
        1..=3i32,
        prop::collection::vec((1..=40u64, event()), 0..=8),
    )
        .prop_map(
            |(nodes, groups, zones, start_delay, podgc_after, concurrent_moves, events)| Scenario {
                nodes,
                groups,
                zones,
                start_delay,
                podgc_after,
                concurrent_moves,
                events,
            },
        )
}

/// At most this many faults per run: within the daily failover budget (3).
const MAX_FAULTS: u32 = 3;

impl World {
    fn rollout(&self) -> bool {
        self.op()
            .is_some_and(|o| o.type_ == OperationType::RollingUpgrade)
    }

    fn apply_event(&mut self, ev: &Event, faults: &mut u32) -> Result<(), String> {
        match ev {
            Event::Nodes(n) => self.set_nodes(*n),
            // Not while a rollout runs: see
            // a_new_revision_mid_rollout_restarts_no_pod_behind_the_operators_back.
            Event::Version | Event::Template if self.rollout() => {}
            Event::Version => self.bump_version(),
            Event::Template => self.bump_template(),
            Event::Crash { ordinal, passes } => {
                // Not while a rollout runs: see a_node_down_after_the_gate_holds_the_restart.
                if *faults < MAX_FAULTS
                    && self.healthy()
                    && !self.pods.is_empty()
                    && !self.rollout()
                {
                    let o = ordinal % self.pods.len() as i32;
                    if self.pods.contains_key(&o) {
                        *faults += 1;
                        self.crash(o, *passes);
                    }
                }
            }
            Event::HostLost {
                ordinal,
                local_volume,
            } => {
                let active: Vec<i32> = self
                    .status
                    .members
                    .iter()
                    .filter(|m| {
                        m.state == MemberState::Active && self.pods.contains_key(&m.ordinal)
                    })
                    .map(|m| m.ordinal)
                    .collect();
                // Not while a rollout or a drain runs: see
                // a_host_lost_during_a_rollout_is_failed_over and
                // a_host_lost_during_a_drain_is_failed_over.
                let blocking = self.op().is_some_and(|o| {
                    matches!(
                        o.type_,
                        OperationType::RollingUpgrade | OperationType::ScaleIn
                    )
                });
                if *faults < MAX_FAULTS && self.healthy() && !active.is_empty() && !blocking {
                    *faults += 1;
                    let o = active[*ordinal as usize % active.len()];
                    self.lose_host(o, *local_volume);
                }
            }
            Event::Pause(p) => self.set_paused(*p),
            Event::OperatorRestart => {
                self.log("operator restart".into());
                self.restart_operator()?;
            }
            // Not while a rollout runs: see a_maintenance_mark_never_outlives_its_restart.
            Event::OperatorCrash(_) if self.rollout() => {}
            Event::OperatorCrash(point) => self.crash_point = *point,
        }
        Ok(())
    }
}

/// Runs a scenario with every invariant checked after each pass; the passes convergence
/// took once faults stopped.
fn run_scenario(sc: &Scenario) -> Result<u64, String> {
    let mut w = World::new(spec(sc.nodes, sc.groups), sc.zones);
    w.start_delay = sc.start_delay;
    w.podgc_after = sc.podgc_after;
    w.spec.rebalancing.concurrent_moves = sc.concurrent_moves;
    let mut faults = 0;
    let mut events = || -> Result<(), String> {
        for (gap, ev) in &sc.events {
            w.run(*gap)?;
            w.apply_event(ev, &mut faults)?;
        }
        // Faults stop: the last crash ends, nothing is paused, the spec stays as it is.
        w.set_paused(false);
        while !w.crashed.is_empty() {
            w.pass()?;
        }
        Ok(())
    };
    if let Err(e) = events() {
        return Err(format!("{sc:?}\n{e}\n{}", w.dump()));
    }
    let r = w.settle(SETTLE_PASSES).map_err(|e| format!("{sc:?}\n{e}"));
    if std::env::var("PARLEY_PLANNER_STATS").is_ok() {
        let mut reasons: Vec<&str> = w.notices.iter().map(|(_, r)| r.as_str()).collect();
        reasons.sort();
        reasons.dedup();
        eprintln!(
            "STATS faults={faults} settle={:?} passes={} {}",
            r.as_ref().ok(),
            w.pass,
            reasons.join(",")
        );
    }
    r
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PARLEY_PLANNER_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        failure_persistence: None,
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_clusters_keep_every_invariant_and_converge(sc in scenario()) {
        if let Err(e) = run_scenario(&sc) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The slowest convergence over a fixed set of scenarios, to keep the bound honest.
#[test]
fn convergence_bound_has_headroom() {
    let sc = Scenario {
        nodes: 7,
        groups: 24,
        zones: true,
        start_delay: 3,
        podgc_after: NEVER,
        concurrent_moves: 1,
        events: vec![
            (40, Event::Nodes(3)),
            (30, Event::Version),
            (1, Event::Nodes(7)),
        ],
    };
    let passes = run_scenario(&sc).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        passes * 2 < SETTLE_PASSES,
        "{passes} passes to converge leaves little headroom under {SETTLE_PASSES}"
    );
}

/// A host lost, its pod replaced, and the replacement's host lost as well.
#[test]
fn a_host_lost_twice_converges() {
    let sc = Scenario {
        nodes: 3,
        groups: 7,
        zones: false,
        start_delay: 3,
        podgc_after: NEVER,
        concurrent_moves: 1,
        events: vec![
            (
                5,
                Event::HostLost {
                    ordinal: 0,
                    local_volume: false,
                },
            ),
            (
                28,
                Event::HostLost {
                    ordinal: 0,
                    local_volume: false,
                },
            ),
        ],
    };
    run_scenario(&sc).unwrap_or_else(|e| panic!("{e}"));
}

/// Scale-in pre-check: the nodes that stay must have room for the drained node's data
/// (with a margin, keeping a tenth of each volume free); until they do, nothing is
/// drained and Degraded says why.
#[test]
fn scale_in_waits_until_the_other_nodes_have_room() {
    const GIB: u64 = 1 << 30;
    fn disks(w: &mut World, available: u64) {
        for n in w.cluster.as_mut().expect("bootstrapped").nodes.values_mut() {
            n.disk = Some(DiskView {
                data: 6 * GIB,
                available,
                capacity: 10 * GIB,
            });
        }
    }
    let mut w = World::running(4, 8, false);
    // Three nodes with 3 GiB free each can take 6 GiB above the floor: not 6 GiB + half.
    disks(&mut w, 3 * GIB);
    w.set_nodes(3);
    w.run(10).expect("passes");
    assert_eq!(w.started(OperationType::ScaleIn), 0);
    assert_eq!(planner::desired_pods(&w.status), 4);
    let degraded = condition(&w.status, "Degraded");
    assert_eq!(degraded.reason, "ScaleInBlocked", "{degraded:?}");
    assert!(degraded.message.contains("not enough room"), "{degraded:?}");
    // The volumes grew: 12 GiB of room for 9 GiB wanted.
    disks(&mut w, 5 * GIB);
    w.settle_or_panic();
    assert_eq!(w.status.members.len(), 3);
}
