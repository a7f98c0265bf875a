//! Deterministic simulation: the real reconcile function (controller, planner, resource
//! builders, through a kube Client) against an in-memory world, for many seeded runs.
//!
//! The world: a fake API server's object store; a StatefulSet controller and kubelets
//! acting on it between passes (pods per ordinal up to `replicas`, volumes reused by
//! ordinal, rolling updates at or above the partition, a pod Ready a tick after it
//! starts, hosts that can vanish); an in-memory Parley cluster (node registry, groups,
//! leaders, elections) that pods join with the node id their ConfigMap entry gives.
//! Seeded faults: pods killed (transient loss), hosts lost (permanent), API requests and
//! cluster steps failing mid-pass (a crash between two side effects; the next pass starts
//! from the stored status only, with a new operator context), spec changes (scale up and
//! down, new versions) at random times. Hosts carry zone labels (three zones).
//!
//! After every pass: no step took a group below quorum or under three voters, at most
//! one operation, node ids never reused, no pod removed while its node is still a
//! member. Once faults stop: convergence to the spec, settled and balanced.
//!
//! `PARLEY_SIM_RUNS` sets the number of seeds (default 200; CI uses the default).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use common::cluster_model::ClusterModel;
use common::fake_apiserver::{self, SharedStore, Store};
use common::fake_cluster::FakeCluster;
use parley_operator::controller::{self, Context};
use parley_operator::crd::{MemberState, ParleyCluster, ParleyClusterStatus};
use parley_operator::model::NodeState;
use parley_operator::resources;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const NS: &str = "sim";
const PCS: &str = "/apis/parley.io/v1alpha1/namespaces/sim/parleyclusters";
const PODS: &str = "/api/v1/namespaces/sim/pods";
const PVCS: &str = "/api/v1/namespaces/sim/persistentvolumeclaims";
const STS: &str = "/apis/apps/v1/namespaces/sim/statefulsets";
const CMS: &str = "/api/v1/namespaces/sim/configmaps";
const NODES: &str = "/api/v1/nodes";
const TICK_SECONDS: i64 = 5;
const FAULT_TICKS: u32 = 120;
const SETTLE_TICKS: u32 = 500;

struct Sim {
    rng: StdRng,
    store: SharedStore,
    cluster: FakeCluster,
    clock: Arc<AtomicI64>,
    /// Hosts (Kubernetes nodes) that exist.
    hosts: Vec<String>,
    next_host: u32,
    /// Pods that started this tick become Ready on the next.
    starting: BTreeSet<String>,
    /// Every node id ever seen on an ordinal.
    ids_seen: BTreeMap<u64, i32>,
    max_id_seen: u64,
    trace: Vec<String>,
    spec_nodes: i32,
    version: u32,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let spec_nodes = rng.random_range(3..=5);
        let store: SharedStore = Arc::new(Mutex::new(Store::default()));
        let hosts: Vec<String> = (0..6).map(|i| format!("host-{i}")).collect();
        {
            let mut s = store.lock().expect("lock");
            for (i, h) in hosts.iter().enumerate() {
                s.put(NODES, h, host_object(i as u32));
            }
        }
        let mut sim = Sim {
            rng,
            store,
            cluster: FakeCluster::default(),
            clock: Arc::new(AtomicI64::new(1_800_000_000)),
            hosts,
            next_host: 6,
            starting: BTreeSet::new(),
            ids_seen: BTreeMap::new(),
            max_id_seen: 0,
            trace: Vec::new(),
            spec_nodes,
            version: 1,
        };
        sim.write_spec();
        sim
    }

    fn write_spec(&mut self) {
        let mut s = self.store.lock().expect("lock");
        let existing = s.get(PCS, "chat").cloned();
        let mut obj = existing.unwrap_or_else(|| {
            json!({
                "apiVersion": "parley.io/v1alpha1", "kind": "ParleyCluster",
                "metadata": {"name": "chat", "namespace": NS, "finalizers": ["parley.io/cleanup"], "generation": 1},
            })
        });
        obj["spec"] = json!({
            "nodes": self.spec_nodes, "image": "parley-node", "version": format!("1.{}", self.version),
            "shardGroups": 6, "storage": {"size": "10Gi"},
            "failover": {"timeoutSeconds": 30, "maxPerDay": 3},
            "rebalancing": {"concurrentMoves": 2},
            "secrets": {"tokenSigningKey": {"name": "k", "key": "token.pem"}}
        });
        let g = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(g);
        s.put(PCS, "chat", obj);
    }

    fn cluster_object(&self) -> ParleyCluster {
        fake_apiserver::object(&self.store, PCS, "chat")
    }

    fn status(&self) -> ParleyClusterStatus {
        self.cluster_object().status.unwrap_or_default()
    }

    fn model<R>(&self, f: impl FnOnce(&mut ClusterModel) -> R) -> Option<R> {
        self.cluster.model.lock().expect("lock").as_mut().map(f)
    }

    /// The StatefulSet controller and kubelets, one tick.
    fn kubernetes_tick(&mut self, pc: &ParleyCluster) {
        let mut s = self.store.lock().expect("lock");
        let Some(mut sts) = s.get(STS, "chat").cloned() else {
            return;
        };
        let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(0) as i32;
        let partition = sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"]
            .as_i64()
            .unwrap_or(0) as i32;
        let template = sts["spec"]["template"].to_string();
        let update_revision = format!("rev-{:x}", fxhash(&template));
        let current_revision = sts["status"]["currentRevision"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| update_revision.clone());
        let config: Value = s.get(CMS, "chat-config").cloned().unwrap_or(Value::Null);
        let pods: BTreeMap<String, Value> = s
            .list(PODS)
            .into_iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap_or("").to_string(), p))
            .collect();
        // Pods above the size go.
        for name in pods.keys() {
            if resources::ordinal_of(name, "chat").is_some_and(|o| o >= replicas) {
                s.remove(PODS, name);
            }
        }
        let all_ready = (0..replicas).all(|o| {
            pods.get(&format!("chat-{o}"))
                .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
        });
        // Rolling update: the highest stale pod at or above the partition, when all are Ready.
        if all_ready {
            let stale = (partition..replicas).rev().find(|o| {
                pods.get(&format!("chat-{o}")).is_some_and(|p| {
                    p["metadata"]["labels"]["controller-revision-hash"] != update_revision.as_str()
                })
            });
            if let Some(o) = stale {
                s.remove(PODS, &format!("chat-{o}"));
            }
        }
        // Missing pods are created, on a live host, with the right revision.
        let existing: BTreeSet<String> = s
            .list(PODS)
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect();
        for o in 0..replicas {
            let name = format!("chat-{o}");
            if existing.contains(&name) {
                continue;
            }
            let revision = if o >= partition {
                update_revision.clone()
            } else {
                current_revision.clone()
            };
            // Anti-affinity: a host without a node pod if there is one.
            let used: BTreeSet<String> = s
                .list(PODS)
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str().map(String::from))
                .collect();
            let free: Vec<String> = self
                .hosts
                .iter()
                .filter(|h| !used.contains(*h))
                .cloned()
                .collect();
            let pool = if free.is_empty() {
                self.hosts.clone()
            } else {
                free
            };
            let host = pool[self.rng.random_range(0..pool.len())].clone();
            let pvc = format!("data-chat-{o}");
            if s.get(PVCS, &pvc).is_none() {
                s.put(
                    PVCS,
                    &pvc,
                    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": pvc, "namespace": NS}, "spec": {}}),
                );
            }
            s.put(
                PODS,
                &name,
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": name, "namespace": NS,
                           "labels": {"controller-revision-hash": revision}},
                       "spec": {"nodeName": host},
                       "status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            );
            self.starting.insert(name.clone());
            // The node process starts with the id its ConfigMap entry gives.
            let addr = resources::pod_address(pc, o);
            let mut answering = self.cluster.answering.lock().expect("lock");
            match configured_id(&config, o) {
                Some(id) => answering.insert(addr, id),
                // No entry: the process does not start (nothing answers there).
                None => answering.remove(&addr),
            };
        }
        // A pod that found no ConfigMap entry (its member is being replaced) restarts
        // until the entry appears, then runs as the id it names.
        let hosts: BTreeSet<String> = self.hosts.iter().cloned().collect();
        for p in s.list(PODS) {
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let Some(o) = resources::ordinal_of(&name, "chat") else {
                continue;
            };
            let addr = resources::pod_address(pc, o);
            let on_live_host = p["spec"]["nodeName"]
                .as_str()
                .is_some_and(|h| hosts.contains(h));
            let mut answering = self.cluster.answering.lock().expect("lock");
            if on_live_host && !answering.contains_key(&addr) && !self.starting.contains(&name) {
                if let Some(id) = configured_id(&config, o) {
                    answering.insert(addr, id);
                    self.starting.insert(name);
                }
            }
        }
        // Kubelets: started pods become Ready; pods on lost hosts never run.
        for mut p in s.list(PODS) {
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            let on_live_host = p["spec"]["nodeName"]
                .as_str()
                .is_some_and(|h| hosts.contains(h));
            let ready = on_live_host && !self.starting.contains(&name);
            p["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
            s.put(PODS, &name, p);
        }
        self.starting.clear();
        // Status of the StatefulSet: once every pod runs the update revision, it is current.
        let pods_now = s.list(PODS);
        let all_updated = pods_now.iter().all(|p| {
            p["metadata"]["labels"]["controller-revision-hash"] == update_revision.as_str()
        });
        sts["status"] = json!({
            "updateRevision": update_revision,
            "currentRevision": if all_updated { update_revision.clone() } else { current_revision },
        });
        s.put(STS, "chat", sts);
        drop(s);
        self.sync_cluster(pc);
    }

    /// Pods that run on a live host are up in the cluster (registered with their id).
    fn sync_cluster(&mut self, pc: &ParleyCluster) {
        let s = self.store.lock().expect("lock");
        let hosts: BTreeSet<String> = self.hosts.iter().cloned().collect();
        let mut up: BTreeMap<u64, bool> = BTreeMap::new();
        let answering = self.cluster.answering.lock().expect("lock").clone();
        let mut live_answering = BTreeMap::new();
        for p in s.list(PODS) {
            let name = p["metadata"]["name"].as_str().unwrap_or("");
            let Some(o) = resources::ordinal_of(name, "chat") else {
                continue;
            };
            let addr = resources::pod_address(pc, o);
            let running = p["spec"]["nodeName"]
                .as_str()
                .is_some_and(|h| hosts.contains(h));
            if let Some(id) = answering.get(&addr) {
                if running {
                    up.insert(*id, true);
                    live_answering.insert(addr, *id);
                }
            }
        }
        drop(s);
        *self.cluster.answering.lock().expect("lock") = live_answering;
        self.model(|m| {
            let ids: Vec<u64> = m.nodes.keys().copied().collect();
            for id in ids {
                m.set_up(id, up.contains_key(&id));
            }
            for id in up.keys() {
                let _ = m.register(*id, "");
            }
            m.elect();
        });
    }

    fn inject_fault(&mut self) {
        match self.rng.random_range(0..100) {
            0..=3 => {
                // A pod is killed: the StatefulSet controller recreates it.
                let o = self.rng.random_range(0..6);
                self.store
                    .lock()
                    .expect("lock")
                    .remove(PODS, &format!("chat-{o}"));
                self.trace.push(format!("fault: pod {o} killed"));
            }
            4 => {
                // A host vanishes for good (its Node object goes); a new one joins. One
                // permanent failure at a time: only while the cluster is healthy, as
                // three replicas per group are meant to survive one.
                let healthy = self
                    .model(|m| {
                        m.is_settled()
                            && m.nodes
                                .values()
                                .all(|n| n.up || n.state == NodeState::Removed)
                    })
                    .unwrap_or(false)
                    && self.status().operation.is_none();
                if healthy {
                    let i = self.rng.random_range(0..self.hosts.len());
                    let h = self.hosts.remove(i);
                    let new = format!("host-{}", self.next_host);
                    self.next_host += 1;
                    let mut s = self.store.lock().expect("lock");
                    s.remove(NODES, &h);
                    s.put(NODES, &new, host_object(self.next_host - 1));
                    self.hosts.push(new);
                    self.trace.push(format!("fault: {h} lost"));
                }
            }
            5..=7 => {
                // The next few API requests fail: the pass stops between side effects.
                let n = self.rng.random_range(0..8);
                self.store.lock().expect("lock").fail_mutation_in = Some(n);
                self.trace
                    .push(format!("fault: API request {n} from now fails"));
            }
            10..=11 => {
                // A cluster step fails before it takes effect.
                let n = self.rng.random_range(0..3);
                *self.cluster.fail_step_in.lock().expect("lock") = Some(n);
                self.trace
                    .push(format!("fault: cluster step {n} from now fails"));
            }
            8 => {
                self.spec_nodes = self.rng.random_range(3..=6);
                self.write_spec();
                self.trace
                    .push(format!("spec: nodes = {}", self.spec_nodes));
            }
            9 => {
                self.version += 1;
                self.write_spec();
                self.trace.push(format!("spec: version 1.{}", self.version));
            }
            _ => {}
        }
    }

    fn check_invariants(&mut self, tick: u32) -> Result<(), String> {
        let st = self.status();
        if let Some(v) = self
            .model(|m| m.violations.clone())
            .filter(|v| !v.is_empty())
        {
            return Err(format!("tick {tick}: quorum violated: {v:?}"));
        }
        for m in &st.members {
            match self.ids_seen.get(&m.node_id) {
                Some(o) if *o != m.ordinal => {
                    return Err(format!(
                        "tick {tick}: node id {} reused on ordinal {}",
                        m.node_id, m.ordinal
                    ))
                }
                Some(_) => {}
                None => {
                    if m.node_id <= self.max_id_seen {
                        return Err(format!(
                            "tick {tick}: node id {} handed out again",
                            m.node_id
                        ));
                    }
                    self.ids_seen.insert(m.node_id, m.ordinal);
                    self.max_id_seen = m.node_id;
                }
            }
        }
        let sts_replicas = self
            .store
            .lock()
            .expect("lock")
            .get(STS, "chat")
            .and_then(|s| s["spec"]["replicas"].as_i64());
        // The StatefulSet may lag a scale-out whose apply failed, but a member's pod
        // is gone only after its node left membership.
        if let Some(r) = sts_replicas {
            for m in st.members.iter().filter(|m| i64::from(m.ordinal) >= r) {
                let state = self
                    .model(|c| c.nodes.get(&m.node_id).map(|n| n.state))
                    .flatten();
                if matches!(state, Some(NodeState::Active) | Some(NodeState::Draining)) {
                    return Err(format!(
                        "tick {tick}: pod {} removed while node {} is still {:?}",
                        m.ordinal, m.node_id, state
                    ));
                }
            }
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        let st = self.status();
        let pods = self.store.lock().expect("lock").list(PODS);
        let ready = pods
            .iter()
            .filter(|p| p["status"]["conditions"][0]["status"] == "True")
            .count();
        let settled = self
            .model(|m| m.is_settled() && m.is_balanced() && m.violations.is_empty())
            .unwrap_or(false);
        let active = st
            .members
            .iter()
            .filter(|m| m.state == MemberState::Active)
            .count();
        st.operation.is_none()
            && settled
            && st.members.len() as i32 == self.spec_nodes
            && active as i32 == self.spec_nodes
            && ready as i32 == self.spec_nodes
            && st.current_version.as_deref() == Some(format!("1.{}", self.version).as_str())
    }
}

/// A Kubernetes node in one of three zones.
fn host_object(i: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"labels": {"topology.kubernetes.io/zone": format!("zone-{}", i % 3)}}})
}

/// A small stable hash for template revisions.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

async fn run(seed: u64) -> Result<u32, String> {
    let mut sim = Sim::new(seed);
    let clock = sim.clock.clone();
    let mut ctx = Arc::new(Context::with_parts(
        fake_apiserver::client(sim.store.clone()),
        Arc::new(sim.cluster.clone()),
        Arc::new(move || clock.load(Ordering::Relaxed)),
        true,
    ));
    for tick in 0..FAULT_TICKS + SETTLE_TICKS {
        sim.clock.fetch_add(TICK_SECONDS, Ordering::Relaxed);
        if tick < FAULT_TICKS && tick > 10 {
            sim.inject_fault();
        }
        let pc = sim.cluster_object();
        if controller::reconcile(Arc::new(pc.clone()), ctx.clone())
            .await
            .is_err()
        {
            // The operator "crashes": a new one starts with nothing but the store.
            let clock = sim.clock.clone();
            ctx = Arc::new(Context::with_parts(
                fake_apiserver::client(sim.store.clone()),
                Arc::new(sim.cluster.clone()),
                Arc::new(move || clock.load(Ordering::Relaxed)),
                true,
            ));
        }
        sim.store.lock().expect("lock").mutations.clear();
        let pc = sim.cluster_object();
        sim.kubernetes_tick(&pc);
        sim.check_invariants(tick)
            .map_err(|e| format!("seed {seed}: {e}\ntrace: {:?}", sim.trace))?;
        if tick >= FAULT_TICKS && sim.converged() {
            return Ok(tick - FAULT_TICKS);
        }
    }
    let st = sim.status();
    Err(format!(
        "seed {seed}: no convergence {SETTLE_TICKS} ticks after faults stopped\nspec nodes {} version 1.{}\noperation: {:?}\nconditions: {:?}\nmembers: {:?}\ncluster: {:?}\ntrace: {:?}",
        sim.spec_nodes,
        sim.version,
        st.operation,
        st.conditions,
        st.members,
        sim.model(|m| m.view()),
        sim.trace
    ))
}

#[tokio::test(flavor = "current_thread")]
async fn seeded_runs_keep_invariants_and_converge_once_faults_stop() {
    let runs: u64 = std::env::var("PARLEY_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let started = std::time::Instant::now();
    let mut worst = 0;
    let mut failures = Vec::new();
    for seed in 0..runs {
        match run(seed).await {
            Ok(ticks) => worst = worst.max(ticks),
            Err(e) => failures.push(e),
        }
        if failures.len() >= 3 {
            break;
        }
    }
    eprintln!(
        "simulation: {runs} seeds, slowest convergence {worst} ticks after faults stopped, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The node id the ConfigMap gives pod `ordinal`, if it has an entry.
fn configured_id(config: &Value, ordinal: i32) -> Option<u64> {
    config["data"][format!("chat-{ordinal}.toml")]
        .as_str()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("node_id = ")))
        .and_then(|v| v.trim().parse::<u64>().ok())
}
