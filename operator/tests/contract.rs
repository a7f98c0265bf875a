//! HTTP contract tests: the real reconcile function against a mocked API server (kube-rs'
//! tower-test pattern, with a small stateful store behind it) and an in-memory cluster.
//! They assert the exact requests the operator makes: server-side applies with the
//! operator's field manager, status patches that record the intent before any side
//! effect, deletes with uid preconditions, and events, for create, scale out, scale in,
//! failover and upgrade. No Kubernetes API server runs here; this tier proves the
//! requests, not the API server's behaviour.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use common::cluster_model::ClusterModel;
use common::fake_apiserver::{self, SharedStore, Store};
use common::fake_cluster::FakeCluster;
use parley_operator::controller::{self, Context};
use parley_operator::crd::{
    MemberState, MemberStatus, OperationType, ParleyCluster, ParleyClusterStatus,
};
use parley_operator::model::NodeState;
use parley_operator::planner::Step;
use parley_operator::resources;
use serde_json::{json, Value};

const NS: &str = "default";
const PCS: &str = "/apis/parley.io/v1alpha1/namespaces/default/parleyclusters";
const PODS: &str = "/api/v1/namespaces/default/pods";
const PVCS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";
const STS: &str = "/apis/apps/v1/namespaces/default/statefulsets";

struct Harness {
    store: SharedStore,
    cluster: FakeCluster,
    clock: Arc<AtomicI64>,
    ctx: Arc<Context>,
}

impl Harness {
    fn new(cluster: FakeCluster) -> Harness {
        let store: SharedStore = Arc::new(Mutex::new(Store::default()));
        let clock = Arc::new(AtomicI64::new(1_800_000_000));
        let c = clock.clone();
        let ctx = Arc::new(Context::with_parts(
            fake_apiserver::client(store.clone()),
            Arc::new(cluster.clone()),
            Arc::new(move || c.load(Ordering::Relaxed)),
            true,
        ));
        Harness {
            store,
            cluster,
            clock,
            ctx,
        }
    }

    fn put_cluster(&self, nodes: i32, version: &str, status: Option<ParleyClusterStatus>) {
        let mut obj = json!({
            "apiVersion": "parley.io/v1alpha1",
            "kind": "ParleyCluster",
            "metadata": {"name": "chat", "namespace": NS, "finalizers": ["parley.io/cleanup"], "generation": 1},
            "spec": {
                "nodes": nodes, "image": "parley-node", "version": version, "shardGroups": 4,
                "storage": {"size": "10Gi"},
                "failover": {"timeoutSeconds": 60, "maxPerDay": 3},
                "secrets": {"tokenSigningKey": {"name": "k", "key": "token.pem"}}
            }
        });
        if let Some(st) = status {
            obj["status"] = serde_json::to_value(st).expect("status json");
        }
        self.store.lock().expect("lock").put(PCS, "chat", obj);
    }

    fn cluster_object(&self) -> ParleyCluster {
        fake_apiserver::object(&self.store, PCS, "chat")
    }

    fn status(&self) -> ParleyClusterStatus {
        self.cluster_object().status.unwrap_or_default()
    }

    fn put_pod(&self, ordinal: i32, ready: bool, revision: &str, host: &str) {
        let name = format!("chat-{ordinal}");
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS,
                "labels": {"app.kubernetes.io/name": "parley", "app.kubernetes.io/component": "node",
                           "app.kubernetes.io/instance": "chat", "controller-revision-hash": revision}},
            "spec": {"nodeName": host, "containers": [{"name": "parley-node"}]},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        });
        let pvc = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": format!("data-chat-{ordinal}"), "namespace": NS,
                "labels": {"app.kubernetes.io/instance": "chat"}},
            "spec": {"volumeName": format!("pv-{ordinal}")}
        });
        let mut s = self.store.lock().expect("lock");
        s.put(PODS, &name, pod);
        if s.get(PVCS, &format!("data-chat-{ordinal}")).is_none() {
            s.put(PVCS, &format!("data-chat-{ordinal}"), pvc);
        }
        s.put(
            "/api/v1/persistentvolumes",
            &format!("pv-{ordinal}"),
            json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {}}),
        );
        s.put(
            "/api/v1/nodes",
            host,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {}}),
        );
    }

    fn answer(&self, ordinal: i32, node: u64) {
        let pc = self.cluster_object();
        self.cluster
            .answering
            .lock()
            .expect("lock")
            .insert(resources::pod_address(&pc, ordinal), node);
    }

    async fn pass(&self) {
        let pc = Arc::new(self.cluster_object());
        self.store.lock().expect("lock").mutations.clear();
        controller::reconcile(pc, self.ctx.clone())
            .await
            .expect("reconcile succeeds");
    }

    fn summaries(&self) -> Vec<String> {
        self.store
            .lock()
            .expect("lock")
            .mutations
            .iter()
            .map(|m| m.summary())
            .collect()
    }

    fn sts(&self) -> Value {
        self.store
            .lock()
            .expect("lock")
            .get(STS, "chat")
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn event_reasons(&self) -> Vec<String> {
        self.store
            .lock()
            .expect("lock")
            .mutations
            .iter()
            .filter(|m| m.summary() == "POST events")
            .map(|m| m.body["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

fn member(ordinal: i32, node_id: u64) -> MemberStatus {
    MemberStatus {
        ordinal,
        node_id,
        state: MemberState::Active,
        ready: true,
        replicas: 0,
        leaders: 0,
        down_since: None,
    }
}

fn running(members: usize) -> ParleyClusterStatus {
    ParleyClusterStatus {
        members: (0..members)
            .map(|o| member(o as i32, o as u64 + 1))
            .collect(),
        next_node_id: members as u64 + 1,
        bootstrapped: true,
        current_version: Some("1.0".into()),
        ..Default::default()
    }
}

/// The applies of one pass, in the order the operator must send them: the status (the
/// intent) first, then the ConfigMap, Services, PDB and StatefulSet.
const APPLY_ORDER: [&str; 6] = [
    "PATCH parleyclusters/chat/status",
    "PATCH configmaps/chat-config",
    "PATCH services/chat-peers",
    "PATCH services/chat",
    "PATCH poddisruptionbudgets/chat",
    "PATCH statefulsets/chat",
];

#[tokio::test]
async fn create_applies_owned_objects_after_recording_status() {
    let h = Harness::new(FakeCluster::default());
    h.put_cluster(3, "1.0", None);
    h.pass().await;
    let got = h.summaries();
    assert_eq!(&got[..6], &APPLY_ORDER, "requests: {got:#?}");
    assert_eq!(h.event_reasons(), vec!["BootstrapStarted"]);
    let store = h.store.lock().expect("lock");
    for m in store.mutations.iter().filter(|m| m.method == "PATCH") {
        assert!(
            m.content_type.starts_with("application/apply-patch"),
            "server-side apply: {}",
            m.summary()
        );
        assert!(
            m.query.contains("fieldManager=parley-operator") && m.query.contains("force=true"),
            "field manager on {}: {}",
            m.summary(),
            m.query
        );
    }
    let status = &store.mutations[0].body["status"];
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(status["operation"]["type"], "Bootstrap");
    let sts = &store.mutations[5].body;
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(
        sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"],
        3
    );
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"],
        json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
    );
    assert_eq!(
        sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        resources::TERMINATION_GRACE_SECONDS
    );
    assert_eq!(
        sts["spec"]["template"]["spec"]["containers"][0]["image"],
        "parley-node:1.0"
    );
    assert_eq!(
        sts["metadata"]["ownerReferences"][0]["kind"],
        "ParleyCluster"
    );
    let cm = &store.mutations[1].body["data"];
    for o in 0..3 {
        let toml = cm[format!("chat-{o}.toml")]
            .as_str()
            .expect("per-pod config");
        assert!(toml.contains(&format!("node_id = {}", o + 1)), "{toml}");
    }
    let pdb = &store.mutations[4].body;
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
}

#[tokio::test]
async fn bootstrap_goes_to_the_nodes_once_all_three_answer() {
    let h = Harness::new(FakeCluster::default());
    h.put_cluster(3, "1.0", None);
    h.pass().await;
    for o in 0..3 {
        h.put_pod(o, false, "rev-1", "k8s-a");
        h.answer(o, o as u64 + 1);
    }
    h.pass().await;
    assert_eq!(
        h.cluster.executed(),
        vec![Step::Bootstrap {
            nodes: vec![1, 2, 3],
            shard_groups: 4
        }]
    );
    assert!(h.event_reasons().contains(&"Step".to_string()));
    h.pass().await;
    let st = h.status();
    assert!(st.bootstrapped && st.operation.is_none(), "{st:#?}");
}

fn model_with(nodes: &[u64]) -> ClusterModel {
    let mut m = ClusterModel::bootstrap([1, 2, 3], 4, &[]);
    for id in nodes.iter().filter(|id| **id > 3) {
        m.register(*id, "").expect("register");
    }
    m
}

#[tokio::test]
async fn scale_out_adds_one_pod_with_a_new_node_id() {
    let h = Harness::new(FakeCluster::with_model(model_with(&[1, 2, 3])));
    h.put_cluster(4, "1.0", Some(running(3)));
    for o in 0..3 {
        h.put_pod(o, true, "rev-1", "k8s-a");
        h.answer(o, o as u64 + 1);
    }
    h.pass().await;
    let got = h.summaries();
    assert_eq!(&got[..6], &APPLY_ORDER, "requests: {got:#?}");
    let store = h.store.lock().expect("lock");
    let status = &store.mutations[0].body["status"];
    assert_eq!(status["operation"]["type"], "ScaleOut");
    assert_eq!(status["members"][3]["nodeId"], 4);
    assert_eq!(status["members"][3]["state"], "Pending");
    assert!(
        store.mutations[1].body["data"]["chat-3.toml"]
            .as_str()
            .is_some_and(|t| t.contains("node_id = 4")),
        "the new pod's config is written before the StatefulSet grows"
    );
    assert_eq!(store.mutations[5].body["spec"]["replicas"], 4);
    drop(store);
    assert!(h.event_reasons().contains(&"ScaleOutStarted".to_string()));
}

#[tokio::test]
async fn scale_in_drains_removes_then_shrinks_and_deletes_the_volume_by_uid() {
    let mut model = model_with(&[1, 2, 3, 4]);
    // Give node 4 a share of the replicas.
    for g in [1, 2] {
        model
            .apply(&Step::AddReplica { group: g, node: 4 })
            .expect("add");
        let victim = model.groups[&g].voters[1];
        model
            .apply(&Step::RemoveReplica {
                group: g,
                node: victim,
            })
            .expect("remove");
    }
    let h = Harness::new(FakeCluster::with_model(model));
    h.put_cluster(3, "1.0", Some(running(4)));
    for o in 0..4 {
        h.put_pod(o, true, "rev-1", "k8s-a");
        h.answer(o, o as u64 + 1);
    }
    h.pass().await;
    assert_eq!(
        h.cluster.executed(),
        vec![Step::SetNodeState {
            node: 4,
            state: NodeState::Draining
        }]
    );
    assert_eq!(h.sts()["spec"]["replicas"], 4, "no shrink before the drain");
    let mut deleted = None;
    for _ in 0..40 {
        h.pass().await;
        // The StatefulSet controller: the pod above the size goes away.
        if h.sts()["spec"]["replicas"] == 3 {
            h.store.lock().expect("lock").remove(PODS, "chat-3");
        }
        let muts = h.store.lock().expect("lock").mutations_like("DELETE");
        if let Some(m) = muts.first() {
            deleted = Some(m.clone());
        }
        if h.status().operation.is_none() {
            break;
        }
    }
    let executed = h.cluster.executed();
    let removed_at = executed
        .iter()
        .position(|s| {
            *s == Step::SetNodeState {
                node: 4,
                state: NodeState::Removed,
            }
        })
        .expect("node 4 removed from membership");
    assert!(
        executed[..removed_at]
            .iter()
            .filter(|s| matches!(s, Step::RemoveReplica { node: 4, .. }))
            .count()
            >= 2,
        "its replicas moved first: {executed:?}"
    );
    let m = deleted.expect("the volume was deleted");
    assert_eq!(m.summary(), "DELETE persistentvolumeclaims/data-chat-3");
    assert!(
        m.body["preconditions"]["uid"].as_str().is_some(),
        "uid precondition"
    );
    let st = h.status();
    assert_eq!(st.members.len(), 3, "{st:#?}");
    assert_eq!(h.sts()["spec"]["replicas"], 3);
}

#[tokio::test]
async fn failover_re_replicates_then_replaces_pod_and_volume_with_their_uids() {
    let model = model_with(&[1, 2, 3, 4]);
    let h = Harness::new(FakeCluster::with_model(model));
    h.put_cluster(4, "1.0", Some(running(4)));
    for o in 0..4 {
        h.put_pod(o, true, "rev-1", &format!("k8s-{o}"));
        h.answer(o, o as u64 + 1);
    }
    // Node 2 (pod 1) dies.
    h.put_pod(1, false, "rev-1", "k8s-1");
    h.cluster
        .answering
        .lock()
        .expect("lock")
        .retain(|_, id| *id != 2);
    h.cluster
        .model
        .lock()
        .expect("lock")
        .as_mut()
        .expect("model")
        .set_up(2, false);
    h.pass().await;
    assert!(h.status().members[1].down_since.is_some());
    assert!(
        h.cluster.executed().is_empty(),
        "nothing before the timeout"
    );
    h.clock.fetch_add(120, Ordering::Relaxed);
    let mut evidence_given = false;
    let mut all = Vec::new();
    for _ in 0..60 {
        h.pass().await;
        all.extend(h.store.lock().expect("lock").mutations.clone());
        let st = h.status();
        if st.members[1].state == MemberState::FailedOver && !evidence_given {
            // The Kubernetes node is gone: positive evidence for replacement.
            h.store
                .lock()
                .expect("lock")
                .remove("/api/v1/nodes", "k8s-1");
            evidence_given = true;
        }
        if evidence_given
            && st.operation.is_none()
            && st.members[1].state != MemberState::FailedOver
        {
            break;
        }
        if st
            .operation
            .as_ref()
            .is_some_and(|o| o.phase == "Replacing")
            && st.members[1].state == MemberState::Pending
            && h.store.lock().expect("lock").get(PODS, "chat-1").is_none()
        {
            // The old pod and volume are gone and the pod's configuration names the new
            // id: the recreated pod registers as it.
            let new_id = st.members[1].node_id;
            h.put_pod(1, true, "rev-1", "k8s-9");
            h.answer(1, new_id);
            h.cluster
                .model
                .lock()
                .expect("lock")
                .as_mut()
                .expect("model")
                .register(new_id, "")
                .expect("register");
        }
    }
    let st = h.status();
    assert_eq!(st.failovers.len(), 1);
    assert_eq!(st.members[1].node_id, 5, "a new node id: {st:#?}");
    let summaries: Vec<String> = all.iter().map(|m| m.summary()).collect();
    let pvc_del = summaries
        .iter()
        .position(|s| s == "DELETE persistentvolumeclaims/data-chat-1")
        .expect("volume deleted");
    let pod_del = summaries
        .iter()
        .position(|s| s == "DELETE pods/chat-1")
        .expect("pod deleted");
    // The new id is reserved in status before anything is deleted, while the pod's
    // configuration is withheld; it names the new id only once the old pod and volume
    // are gone, so the new id never starts on the old node's data.
    let status_with_new_id = all.iter().position(|m| {
        m.summary() == "PATCH parleyclusters/chat/status"
            && m.body["status"]["members"][1]["nodeId"] == 5
            && m.body["status"]["members"][1]["state"] == "Replacing"
    });
    assert!(
        status_with_new_id.is_some_and(|c| c < pvc_del && c < pod_del),
        "{summaries:#?}"
    );
    let config_withheld = all.iter().position(|m| {
        m.summary() == "PATCH configmaps/chat-config"
            && m.body["data"]["chat-0.toml"].is_string()
            && m.body["data"]["chat-1.toml"].is_null()
    });
    assert!(config_withheld.is_some_and(|c| c < pvc_del && c < pod_del));
    let config_with_new_id = all.iter().position(|m| {
        m.summary() == "PATCH configmaps/chat-config"
            && m.body["data"]["chat-1.toml"]
                .as_str()
                .is_some_and(|t| t.contains("node_id = 5"))
    });
    assert!(config_with_new_id.is_some_and(|c| c > pvc_del && c > pod_del));
    for i in [pvc_del, pod_del] {
        assert!(all[i].body["preconditions"]["uid"].as_str().is_some());
    }
    let executed = h.cluster.executed();
    assert!(executed.contains(&Step::SetNodeState {
        node: 2,
        state: NodeState::Removed
    }));
}

#[tokio::test]
async fn upgrade_moves_leaders_before_lowering_the_partition() {
    let h = Harness::new(FakeCluster::with_model(model_with(&[1, 2, 3])));
    h.put_cluster(3, "2.0", Some(running(3)));
    for o in 0..3 {
        h.put_pod(o, true, "rev-1", "k8s-a");
        h.answer(o, o as u64 + 1);
    }
    {
        let mut s = h.store.lock().expect("lock");
        s.put(
            STS,
            "chat",
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {},
                   "spec": {"replicas": 3, "updateStrategy": {"rollingUpdate": {"partition": 3}}},
                   "status": {"updateRevision": "rev-2"}}),
        );
    }
    let mut partitions = Vec::new();
    let mut steps_before_partition = None;
    for _ in 0..12 {
        h.pass().await;
        let p = h.sts()["spec"]["updateStrategy"]["rollingUpdate"]["partition"].clone();
        // Keep the StatefulSet status (the fake store replaces spec on apply only).
        let mut s = h.store.lock().expect("lock");
        if let Some(obj) = s.get(STS, "chat").cloned() {
            let mut obj = obj;
            obj["status"] = json!({"updateRevision": "rev-2"});
            s.put(STS, "chat", obj);
        }
        drop(s);
        if p == 2 && steps_before_partition.is_none() {
            steps_before_partition = Some(h.cluster.executed());
        }
        partitions.push(p);
    }
    assert!(
        h.sts()["spec"]["template"]["spec"]["containers"][0]["image"] == "parley-node:2.0",
        "the template carries the new version"
    );
    assert_eq!(
        partitions[0], 3,
        "no pod is replaced before the leaders move"
    );
    let steps = steps_before_partition.expect("the partition was lowered to the highest ordinal");
    assert_eq!(
        steps.first(),
        Some(&Step::SetNodeState {
            node: 3,
            state: NodeState::Maintenance
        }),
        "{steps:?}"
    );
    let model = h
        .cluster
        .model
        .lock()
        .expect("lock")
        .clone()
        .expect("model");
    let led_by_3 = model
        .view()
        .all_groups()
        .filter(|(_, g)| g.leader == Some(3))
        .count();
    assert_eq!(led_by_3, 0, "node 3 leads nothing when its pod may restart");
    assert_eq!(
        h.status().operation.map(|o| o.type_),
        Some(OperationType::RollingUpgrade)
    );
}

#[tokio::test]
async fn a_failed_apply_leaves_the_recorded_intent_for_the_next_pass() {
    let h = Harness::new(FakeCluster::with_model(model_with(&[1, 2, 3])));
    h.put_cluster(4, "1.0", Some(running(3)));
    for o in 0..3 {
        h.put_pod(o, true, "rev-1", "k8s-a");
        h.answer(o, o as u64 + 1);
    }
    // The StatefulSet apply (the 6th mutation) fails: a crash between side effects.
    h.store.lock().expect("lock").fail_mutation_in = Some(5);
    let pc = Arc::new(h.cluster_object());
    let res = controller::reconcile(pc, h.ctx.clone()).await;
    assert!(res.is_err(), "the pass reports the failure");
    let st = h.status();
    assert_eq!(st.members.len(), 4, "the intent was recorded first");
    assert_eq!(st.members[3].node_id, 4);
    h.pass().await;
    let st = h.status();
    assert_eq!(
        st.members.len(),
        4,
        "the next pass resumes, not restarts: {st:#?}"
    );
    assert_eq!(st.next_node_id, 5, "no id was handed out twice");
    assert_eq!(h.sts()["spec"]["replicas"], 4);
}
