//! The operator's cluster half against real `parley-node` processes on loopback, under a
//! running client workload.
//!
//! Kubernetes itself cannot run here, so this test plays its part with processes: a
//! "StatefulSet" that starts one node process per ordinal up to the size the planner's
//! status asks for (and stops the ones above it), replaces pods at or above the partition
//! when the template revision changes, recreates deleted pods, and a "volume" per ordinal
//! (a data directory with a uid). Everything on the cluster side is real: the planner's
//! steps go through `NodeAdmin` to the nodes' admin API, and the nodes move replicas and
//! leaderships by Raft membership changes.
//!
//! Scenario: bootstrap 3 nodes; scale 3 -> 5 and end balanced; SIGKILL a node and keep it
//! down (its Kubernetes node is gone), so after the short failover timeout its replicas
//! are re-created elsewhere and its pod is replaced under a new node id; scale 5 -> 3 by
//! draining; a rolling restart that moves leaderships off each pod before it stops.
//! Meanwhile a workload appends to 300 conversations; at the end every acknowledged
//! append is present exactly once and in order.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parley_operator::crd::{MemberState, OperationType, ParleyClusterSpec, ParleyClusterStatus};
use parley_operator::model::{
    ClusterView, KubeView, Observed, PodView, StatefulSetView, VolumeView,
};
use parley_operator::node_admin::NodeAdmin;
use parley_operator::planner::{self, Step};
use parley_proto::node::v1::NodeAddress;
use parley_testkit::{node_binary, LogClient};

fn spec(nodes: i32) -> ParleyClusterSpec {
    let mut spec: ParleyClusterSpec = serde_yaml::from_str(
        r#"
nodes: 3
image: parley-node
version: test
shardGroups: 8
storage: {size: 1Gi}
secrets: {tokenSigningKey: {name: k, key: token.pem}}
"#,
    )
    .expect("spec parses");
    spec.nodes = nodes;
    // Short enough for a test; the CRD's floor (30 s) is for real clusters.
    spec.failover.timeout_seconds = 4;
    spec.rebalancing.concurrent_moves = 2;
    spec
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One ordinal's fixed addresses (a pod's stable network identity).
#[derive(Clone)]
struct Slot {
    grpc: SocketAddr,
    http: SocketAddr,
    client: SocketAddr,
}

struct Pod {
    child: Child,
    uid: String,
    revision: String,
    node_id: u64,
}

/// Kubernetes played by processes: pods, volumes, a StatefulSet and a kubelet.
struct World {
    bin: PathBuf,
    root: PathBuf,
    token_key: PathBuf,
    slots: Vec<Slot>,
    pods: BTreeMap<i32, Pod>,
    /// ordinal -> volume uid (the data directory exists while the volume does).
    volumes: BTreeMap<i32, String>,
    /// Ordinals whose Kubernetes node is gone: their pod cannot be scheduled.
    lost_hosts: Vec<i32>,
    replicas: i32,
    partition: i32,
    update_revision: String,
    next_uid: u64,
    /// For each restart of the rollout: leaderships the node still held when it stopped.
    leaders_at_restart: Vec<(i32, u32)>,
}

impl World {
    fn uid(&mut self, kind: &str) -> String {
        self.next_uid += 1;
        format!("{kind}-{}", self.next_uid)
    }

    fn volume_dir(&self, ordinal: i32) -> PathBuf {
        self.root.join(format!("pvc-{ordinal}"))
    }

    fn address(&self, ordinal: i32, node_id: u64) -> NodeAddress {
        let s = &self.slots[ordinal as usize];
        NodeAddress {
            node_id,
            addr: s.grpc.to_string(),
            http_addr: s.http.to_string(),
            zone: String::new(),
            client_addr: s.client.to_string(),
        }
    }

    fn grpc_addrs(&self) -> Vec<String> {
        self.pods
            .keys()
            .map(|o| self.slots[*o as usize].grpc.to_string())
            .collect()
    }

    /// Starts the pod of `ordinal` as `node_id` (the operator's per-pod config).
    fn start_pod(&mut self, ordinal: i32, node_id: u64) {
        if !self.volumes.contains_key(&ordinal) {
            let uid = self.uid("pvc");
            self.volumes.insert(ordinal, uid);
        }
        let s = self.slots[ordinal as usize].clone();
        let data = self.volume_dir(ordinal);
        std::fs::create_dir_all(&data).expect("volume dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(format!("pod-{ordinal}.log")))
            .expect("log file");
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "run",
            "--node-id",
            &node_id.to_string(),
            "--listen",
            &s.grpc.to_string(),
            "--http",
            &s.http.to_string(),
            "--data-dir",
            &data.display().to_string(),
            "--client-listen",
            &s.client.to_string(),
            "--token-key-file",
            &self.token_key.display().to_string(),
        ]);
        // Every node but the first three bootstrap nodes registers through a peer.
        if node_id > 3 {
            for o in 0..3 {
                cmd.args(["--join", &self.slots[o].grpc.to_string()]);
            }
        }
        cmd.env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let child = parley_testkit::process::spawn_tied(cmd).expect("node starts");
        let uid = self.uid("pod");
        let revision = self.update_revision.clone();
        self.pods.insert(
            ordinal,
            Pod {
                child,
                uid,
                revision,
                node_id,
            },
        );
    }

    fn kill(&mut self, ordinal: i32) {
        if let Some(mut pod) = self.pods.remove(&ordinal) {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit (the node hands off leaderships first).
    async fn stop(&mut self, ordinal: i32) {
        if let Some(mut pod) = self.pods.remove(&ordinal) {
            let pid = nix::unistd::Pid::from_raw(pod.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = pod.child.try_wait() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }

    async fn ready(&self, ordinal: i32) -> bool {
        let url = format!("http://{}/readyz", self.slots[ordinal as usize].http);
        let client = reqwest::Client::new();
        matches!(
            client.get(url).timeout(Duration::from_millis(500)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// What the operator would read from the API server, plus each pod's admin answer.
    async fn observe_kube(&mut self, admin: &NodeAdmin) -> KubeView {
        let mut pods = BTreeMap::new();
        let ordinals: Vec<i32> = self.pods.keys().copied().collect();
        for o in ordinals {
            let ready = self.ready(o).await;
            let addr = self.slots[o as usize].grpc.to_string();
            let answering_as = admin.probe(&addr).await;
            let pod = &self.pods[&o];
            pods.insert(
                o,
                PodView {
                    uid: pod.uid.clone(),
                    ready,
                    revision: pod.revision.clone(),
                    answering_as,
                    host_gone: false,
                    zone: format!("zone-{}", o % 3),
                    terminating: false,
                },
            );
        }
        for o in &self.lost_hosts {
            // A pod whose host vanished shows as unschedulable with its node gone.
            pods.entry(*o).or_insert(PodView {
                uid: format!("lost-{o}"),
                host_gone: true,
                revision: self.update_revision.clone(),
                ..Default::default()
            });
        }
        let volumes = self
            .volumes
            .iter()
            .map(|(o, uid)| {
                (
                    *o,
                    VolumeView {
                        uid: uid.clone(),
                        volume_gone: false,
                    },
                )
            })
            .collect();
        KubeView {
            statefulset: Some(StatefulSetView {
                replicas: self.replicas,
                partition: self.partition,
                update_revision: self.update_revision.clone(),
                template_hash: None,
            }),
            pods,
            volumes,
        }
    }

    /// The StatefulSet controller and kubelet: pods for ordinals below `replicas` (with
    /// the node id the operator's config gives each), none above, and pods at or above
    /// the partition on the newest revision, one at a time.
    async fn converge(&mut self, status: &ParleyClusterStatus, admin: &NodeAdmin) {
        self.replicas = planner::desired_pods(status);
        self.partition = planner::partition(status);
        let above: Vec<i32> = self
            .pods
            .keys()
            .copied()
            .filter(|o| *o >= self.replicas)
            .collect();
        for o in above {
            self.stop(o).await;
        }
        for m in &status.members {
            if m.ordinal >= self.replicas
                || self.pods.contains_key(&m.ordinal)
                || self.lost_hosts.contains(&m.ordinal)
            {
                continue;
            }
            self.start_pod(m.ordinal, m.node_id);
        }
        // Rolling update, highest ordinal first, only at or above the partition.
        let stale = self
            .pods
            .iter()
            .filter(|(o, p)| **o >= self.partition && p.revision != self.update_revision)
            .map(|(o, p)| (*o, p.node_id))
            .max();
        if let Some((o, node_id)) = stale {
            let view = admin.cluster_view(&self.grpc_addrs()).await.ok().flatten();
            let leading = view
                .map(|v| {
                    v.all_groups()
                        .filter(|(_, g)| g.leader == Some(node_id))
                        .count() as u32
                })
                .unwrap_or(0);
            self.leaders_at_restart.push((o, leading));
            self.stop(o).await;
            self.start_pod(o, node_id);
        }
    }

    /// Kubernetes steps the planner asks for.
    fn execute(&mut self, step: &Step) {
        match step {
            Step::DeletePod { ordinal, uid } => {
                if self.pods.get(ordinal).is_some_and(|p| &p.uid == uid) {
                    self.kill(*ordinal);
                }
                // A pod on a lost host is force-deleted: its replacement can schedule.
                if uid == &format!("lost-{ordinal}") {
                    self.lost_hosts.retain(|o| o != ordinal);
                }
            }
            Step::DeleteVolume { ordinal, uid } => {
                if self.volumes.get(ordinal) == Some(uid) && !self.pods.contains_key(ordinal) {
                    self.volumes.remove(ordinal);
                    let _ = std::fs::remove_dir_all(self.volume_dir(*ordinal));
                } else if self.volumes.get(ordinal) == Some(uid) {
                    // In use: Kubernetes deletes it once the pod is gone.
                    self.pending_volume_delete(*ordinal);
                }
            }
            _ => unreachable!("cluster steps go to NodeAdmin"),
        }
    }

    fn pending_volume_delete(&mut self, ordinal: i32) {
        // The pvc-protection finalizer: the data directory goes when the pod goes; model
        // it by deleting at once if the pod is on a lost host (it never runs again).
        if self.lost_hosts.contains(&ordinal) {
            self.volumes.remove(&ordinal);
            let _ = std::fs::remove_dir_all(self.volume_dir(ordinal));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for (_, mut pod) in std::mem::take(&mut self.pods) {
            let _ = pod.child.kill();
            let _ = pod.child.wait();
        }
    }
}

/// The operator's loop: observe, plan, record status, converge Kubernetes, run steps.
struct Operator {
    admin: NodeAdmin,
    status: ParleyClusterStatus,
    spec: ParleyClusterSpec,
    generation: i64,
    cluster: Option<ClusterView>,
    log: Vec<String>,
}

impl Operator {
    async fn pass(&mut self, world: &mut World) {
        let kube = world.observe_kube(&self.admin).await;
        let addrs = world.grpc_addrs();
        self.cluster = match self.admin.cluster_view(&addrs).await {
            Ok(Some(v)) => Some(v),
            Ok(None) => Some(ClusterView::default()),
            Err(_) => None,
        };
        let obs = Observed {
            now: now(),
            generation: self.generation,
            spec: self.spec.clone(),
            status: self.status.clone(),
            kube,
            cluster: self.cluster.clone().filter(|c| !c.nodes.is_empty()),
        };
        let plan = planner::plan(&obs);
        // The intent is recorded before anything is done.
        self.status = plan.status;
        for n in &plan.notices {
            self.log.push(format!("{}: {}", n.reason, n.note));
        }
        world.converge(&self.status, &self.admin).await;
        let peers: BTreeMap<u64, NodeAddress> = self
            .status
            .members
            .iter()
            .map(|m| (m.node_id, world.address(m.ordinal, m.node_id)))
            .collect();
        for step in &plan.steps {
            self.log.push(format!("step: {}", step.describe()));
            match step {
                Step::DeletePod { .. } | Step::DeleteVolume { .. } => world.execute(step),
                _ => {
                    if let Err(e) = self.admin.execute(&addrs, step, &peers).await {
                        self.log.push(format!("step failed: {e}"));
                    }
                }
            }
        }
    }

    /// Runs passes until `done` holds for the status and cluster view, or panics.
    async fn until(
        &mut self,
        world: &mut World,
        what: &str,
        limit: Duration,
        done: impl Fn(&ParleyClusterStatus, Option<&ClusterView>) -> bool,
    ) {
        let deadline = Instant::now() + limit;
        loop {
            self.pass(world).await;
            if done(&self.status, self.cluster.as_ref()) {
                eprintln!("[operator] {what}: done");
                return;
            }
            if Instant::now() > deadline {
                let tail: Vec<&String> = self.log.iter().rev().take(40).collect();
                panic!(
                    "{what}: not done in {limit:?}\nstatus: {:#?}\nlast log lines (newest first): {tail:#?}",
                    self.status
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn idle(st: &ParleyClusterStatus) -> bool {
    st.operation.is_none()
}

/// Settled and spread: `nodes` active nodes, every group with three voters in three
/// distinct zones and a leader, replica counts within one per node inside each zone.
/// (Leadership balance is the planner's own "nothing left to move", checked by `idle`.)
fn balanced(c: Option<&ClusterView>, nodes: usize) -> bool {
    let Some(c) = c else { return false };
    let counts = c.replica_counts();
    let active: Vec<u64> = c
        .nodes
        .iter()
        .filter(|(_, n)| n.state == parley_operator::model::NodeState::Active && n.reachable)
        .map(|(id, _)| *id)
        .collect();
    let zone = |id: &u64| c.nodes.get(id).map(|n| n.zone.clone()).unwrap_or_default();
    let zones: std::collections::BTreeSet<String> = active.iter().map(zone).collect();
    let even_in_zones = zones.iter().all(|z| {
        let n: Vec<usize> = active
            .iter()
            .filter(|id| zone(id) == *z)
            .map(|id| counts.get(id).copied().unwrap_or(0))
            .collect();
        n.iter().max().unwrap_or(&0) - n.iter().min().unwrap_or(&0) <= 1
    });
    let distinct_zones = c.all_groups().all(|(_, g)| {
        g.voters
            .iter()
            .map(zone)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == g.voters.len()
    });
    active.len() == nodes
        && zones.len() == 3
        && even_in_zones
        && distinct_zones
        && c.leaderless().is_empty()
        && c.under_replicated().is_empty()
        && c.all_groups()
            .all(|(_, g)| g.voters.len() == 3 && g.learners.is_empty())
}

/// Per conversation: (sequence number, payload) of every acknowledged append.
type Acked = HashMap<String, Vec<(u64, Vec<u8>)>>;

/// Appends to many conversations until stopped; records what was acknowledged.
fn start_workload(endpoints: Vec<String>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Acked> {
    tokio::spawn(async move {
        let client = LogClient::new(endpoints).expect("log client");
        let acked = Arc::new(Mutex::new(Acked::new()));
        let mut tasks = Vec::new();
        for w in 0..6 {
            let client = client.clone();
            let stop = stop.clone();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let conv = format!("op-conv-{}", (i * 6 + w) % 300);
                    let payload = format!("w{w}-m{i}").into_bytes();
                    if let Ok(reply) = client
                        .append(
                            &conv,
                            &format!("writer-{w}"),
                            &format!("w{w}-{i}"),
                            &payload,
                        )
                        .await
                    {
                        acked
                            .lock()
                            .expect("ack lock")
                            .entry(conv)
                            .or_default()
                            .push((reply.seq, payload));
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let map = acked.lock().expect("ack lock").clone();
        map
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_scales_fails_over_drains_and_rolls_real_nodes_without_losing_messages() {
    let root = tempfile::tempdir().expect("temp dir");
    let bin = node_binary().expect("parley-node is built");
    let token_key = root.path().join("token.pem");
    let out = Command::new(&bin)
        .args(["gen-token-key", &token_key.display().to_string()])
        .output()
        .expect("gen-token-key runs");
    assert!(out.status.success(), "gen-token-key: {out:?}");
    let slots = (0..5)
        .map(|_| Slot {
            grpc: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
            client: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port())),
        })
        .collect::<Vec<_>>();
    let mut world = World {
        bin,
        root: root.path().to_path_buf(),
        token_key,
        slots,
        pods: BTreeMap::new(),
        volumes: BTreeMap::new(),
        lost_hosts: vec![],
        replicas: 0,
        partition: 0,
        update_revision: "rev-1".into(),
        next_uid: 0,
        leaders_at_restart: vec![],
    };
    let mut op = Operator {
        admin: NodeAdmin::with_timeouts(Duration::from_secs(2), Duration::from_secs(60)),
        status: ParleyClusterStatus::default(),
        spec: spec(3),
        generation: 1,
        cluster: None,
        log: vec![],
    };
    let result = std::panic::AssertUnwindSafe(async {
        // Bootstrap.
        op.until(&mut world, "bootstrap", Duration::from_secs(60), |st, c| {
            st.bootstrapped
                && idle(st)
                && c.is_some_and(|c| c.leaderless().is_empty() && !c.groups.is_empty())
        })
        .await;
        let endpoints: Vec<String> = (0..3)
            .map(|o| format!("http://{}", world.slots[o].grpc))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let workload = start_workload(endpoints, stop.clone());

        // Scale out 3 -> 5.
        op.spec = spec(5);
        op.generation += 1;
        op.until(
            &mut world,
            "scale 3 -> 5, balanced",
            Duration::from_secs(180),
            |st, c| {
                idle(st)
                    && st
                        .members
                        .iter()
                        .filter(|m| m.state == MemberState::Active)
                        .count()
                        == 5
                    && balanced(c, 5)
            },
        )
        .await;
        let ids_before: Vec<u64> = op.status.members.iter().map(|m| m.node_id).collect();

        // SIGKILL ordinal 1 and lose its host: failover re-replicates, then replaces it.
        let victim_id = op.status.members[1].node_id;
        world.kill(1);
        world.lost_hosts.push(1);
        op.until(
            &mut world,
            "failover of a SIGKILLed node",
            Duration::from_secs(240),
            |st, c| {
                idle(st)
                    && st.members[1].node_id != victim_id
                    && st.members[1].state == MemberState::Active
                    && c.is_some_and(|c| {
                        c.nodes.get(&victim_id).map(|n| n.state)
                            == Some(parley_operator::model::NodeState::Removed)
                    })
                    && balanced(c, 5)
            },
        )
        .await;
        assert!(
            op.status.failovers.len() == 1,
            "one failover counted: {:?}",
            op.status.failovers
        );
        assert!(
            op.status.members[1].node_id > *ids_before.iter().max().expect("ids"),
            "the replaced node got a new, never used id"
        );

        // Scale in 5 -> 3 by draining the highest ordinals.
        op.spec.nodes = 3;
        op.generation += 1;
        op.until(
            &mut world,
            "scale 5 -> 3",
            Duration::from_secs(240),
            |st, c| idle(st) && st.members.len() == 3 && balanced(c, 3),
        )
        .await;
        assert!(world.pods.keys().all(|o| *o < 3), "pods 3 and 4 are gone");
        assert!(
            world.volumes.keys().all(|o| *o < 3),
            "their volumes were deleted"
        );

        // Rolling restart: a new template revision.
        world.update_revision = "rev-2".into();
        op.generation += 1;
        op.until(
            &mut world,
            "rolling restart",
            Duration::from_secs(240),
            |st, c| idle(st) && balanced(c, 3),
        )
        .await;
        assert!(
            world.pods.values().all(|p| p.revision == "rev-2"),
            "every pod runs the new revision"
        );
        let restarts = world.leaders_at_restart.clone();
        assert_eq!(restarts.len(), 3, "each pod restarted once: {restarts:?}");
        assert!(
            restarts.iter().all(|(_, leading)| *leading == 0),
            "leaderships were moved off before each restart: {restarts:?}\n{:#?}",
            op.log.iter().rev().take(60).collect::<Vec<_>>()
        );
        let rollouts = op
            .log
            .iter()
            .filter(|l| l.starts_with(&format!("{:?}Started", OperationType::RollingUpgrade)))
            .count();
        assert_eq!(rollouts, 1, "one rollout operation");

        stop.store(true, Ordering::Relaxed);
        let acked = workload.await.expect("workload task");
        verify(&world, acked).await;
    });
    let outcome = futures::FutureExt::catch_unwind(result).await;
    if outcome.is_err() {
        let keep = root.keep();
        eprintln!("node data and logs kept in {}", keep.display());
        std::panic::resume_unwind(Box::new("operator real-node test failed"));
    }
}

/// Every acknowledged append is present exactly once, and each conversation's sequence
/// numbers are contiguous from 1.
async fn verify(world: &World, acked: Acked) {
    let endpoints: Vec<String> = world
        .pods
        .keys()
        .map(|o| format!("http://{}", world.slots[*o as usize].grpc))
        .collect();
    let client = LogClient::new(endpoints).expect("log client");
    let mut total = 0;
    assert!(
        acked.len() >= 100,
        "the workload reached many conversations"
    );
    for (conv, acks) in acked {
        let mut entries = Vec::new();
        loop {
            let from = entries.len() as u64 + 1;
            let reply = client
                .read(&conv, from, 1000)
                .await
                .expect("read conversation");
            let n = reply.entries.len();
            entries.extend(reply.entries);
            if n == 0 || entries.len() as u64 >= reply.last_seq {
                break;
            }
        }
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(
                e.seq,
                i as u64 + 1,
                "{conv}: sequence numbers are contiguous"
            );
        }
        for (seq, payload) in &acks {
            let e = entries
                .get(*seq as usize - 1)
                .unwrap_or_else(|| panic!("{conv}: acknowledged seq {seq} is missing"));
            assert_eq!(
                &e.payload, payload,
                "{conv}: seq {seq} holds what was acknowledged"
            );
            let copies = entries.iter().filter(|x| &x.payload == payload).count();
            assert_eq!(copies, 1, "{conv}: seq {seq} stored once");
        }
        total += acks.len();
    }
    eprintln!("[operator] {total} acknowledged appends verified");
    assert!(total > 500, "the workload ran throughout ({total} appends)");
}
