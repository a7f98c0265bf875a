//! End-to-end tests of the admin API (replica moves with snapshot catch-up, leadership
//! transfer, drain), typed errors for bad input, a full disk, metrics, and graceful stop.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use parley_proto::node::v1::raft_transport_client::RaftTransportClient;
use parley_proto::node::v1::*;
use parley_testkit::{error_code, ClusterOptions, LocalCluster};
use tonic::Request;

/// Appends `n` messages over `conversations` conversations with `writers` tasks.
async fn load(
    tag: &str,
    client: &parley_testkit::LogClient,
    conversations: usize,
    writers: usize,
    secs: u64,
) -> Journal {
    let journal = Arc::new(Mutex::new(Journal::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = spawn_writers(
        tag,
        client.clone(),
        conversations,
        writers,
        200,
        journal.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("writer");
    }
    let mut j = journal.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::take(&mut *j)
}

async fn node_status(cluster: &LocalCluster, node: u64) -> NodeStatusReply {
    let mut req = Request::new(NodeStatusRequest {});
    req.set_timeout(Duration::from_secs(3));
    cluster
        .admin(node)
        .node_status(req)
        .await
        .expect("node status")
        .into_inner()
}

fn replica(status: &NodeStatusReply, group: u64) -> Option<&GroupReplicaStatus> {
    status.groups.iter().find(|g| g.group_id == group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_move_by_snapshot_and_drain_without_losing_data() {
    let options = ClusterOptions {
        nodes: 4,
        shard_groups: 4,
        fault_injection: true,
        // Frequent snapshots and short logs: a new replica must catch up from a snapshot.
        extra_args: vec!["--snapshot-every-entries".into(), "200".into()],
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::start(options).await.expect("cluster starts");
    let client = cluster.log_client();
    let journal = load("a", &client, 200, 16, 4).await;
    println!("wrote {} messages", journal.acks.len());
    assert!(journal.acks.len() > 600);

    // Group 1 lives on nodes 1-3; its log has been purged past its start.
    // Write until group 1's leader has purged part of its log (a slow machine may need
    // more than one round), so a new replica can only catch up from a snapshot.
    let mut journal = journal;
    let mut round = 0;
    let (g1, leader, purged) = loop {
        let status = cluster.cluster_status().await.expect("status");
        let g1 = status
            .groups
            .iter()
            .find(|g| g.group_id == 1)
            .expect("group 1")
            .clone();
        let leader = node_status(&cluster, g1.leader).await;
        let purged = replica(&leader, 1).map(|r| r.purged_index).unwrap_or(0);
        if purged > 0 {
            break (g1, leader, purged);
        }
        round += 1;
        assert!(
            round < 6,
            "group 1's log was never purged; the test would not exercise snapshots"
        );
        let more = load(&format!("a{round}-"), &client, 200, 16, 2).await;
        journal.acks.extend(more.acks);
        journal.unacked.extend(more.unacked);
    };
    assert!(!g1.voters.contains(&4));
    println!(
        "group 1 leader {} at applied index {}",
        g1.leader,
        replica(&leader, 1).map(|r| r.applied_index).unwrap_or(0)
    );

    let mut admin = cluster.admin(4);
    let started = Instant::now();
    admin
        .add_replica(ReplicaChangeRequest {
            group_id: 1,
            node_id: 4,
        })
        .await
        .expect("add replica");
    println!(
        "node 4 joined group 1 (snapshot + log catch-up) in {} ms",
        started.elapsed().as_millis()
    );
    let s4 = node_status(&cluster, 4).await;
    let r4 = replica(&s4, 1).expect("node 4 hosts group 1");
    assert!(
        r4.voters.contains(&4),
        "node 4 is a voter of group 1: {r4:?}"
    );
    assert!(
        r4.snapshot_index > 0 && r4.applied_index >= purged,
        "node 4 caught up without a snapshot: {r4:?}"
    );
    println!(
        "node 4 installed a snapshot up to index {} (leader purged up to {purged})",
        r4.snapshot_index
    );

    // Node 4 leads group 1 and serves every acknowledged message from its snapshot-built state.
    admin
        .transfer_leader(TransferLeaderRequest {
            group_id: 1,
            to_node: 4,
        })
        .await
        .expect("transfer");
    assert_eq!(cluster.leader_of(1).await.expect("leader"), Some(4));
    verify(&client, 200, &journal).await;

    // Back to three voters; the removed node deletes its copy.
    admin
        .remove_replica(ReplicaChangeRequest {
            group_id: 1,
            node_id: 1,
        })
        .await
        .expect("remove replica");
    let deadline = Instant::now() + Duration::from_secs(10);
    while replica(&node_status(&cluster, 1).await, 1).is_some() {
        assert!(
            Instant::now() < deadline,
            "node 1 still hosts group 1 after its removal"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Never below three voters: a typed refusal.
    let err = admin
        .remove_replica(ReplicaChangeRequest {
            group_id: 1,
            node_id: 2,
        })
        .await
        .expect_err("must refuse");
    assert_eq!(error_code(&err), Some("refused"), "{err}");

    // More writes, then drain node 4: its replica moves away, the data stays.
    let more = load("b", &client, 200, 16, 2).await;
    journal.acks.extend(more.acks);
    journal.unacked.extend(more.unacked);
    let reply = admin
        .drain_node(DrainNodeRequest { node_id: 4 })
        .await
        .expect("drain")
        .into_inner();
    println!("drain: {}", reply.detail);
    let status = cluster.cluster_status().await.expect("status");
    for g in &status.groups {
        assert!(
            !g.voters.contains(&4) && !g.learners.contains(&4),
            "group {} still on node 4",
            g.group_id
        );
        assert_eq!(
            g.voters.len(),
            3,
            "group {} has {} voters",
            g.group_id,
            g.voters.len()
        );
    }
    assert_eq!(
        status
            .nodes
            .iter()
            .find(|n| n.address.as_ref().map(|a| a.node_id) == Some(4))
            .map(|n| n.state.as_str()),
        Some("draining")
    );
    let checked = verify(&client, 200, &journal).await;
    println!("verified {checked} entries after moves and drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_errors_and_the_node_stays_up() {
    let options = ClusterOptions {
        fault_injection: true,
        extra_args: vec!["--max-payload-bytes".into(), "1024".into()],
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::start(options).await.expect("cluster starts");
    let mut c = cluster.client(1);
    let append = |conv: &str, id: &str, size: usize| AppendRequest {
        conversation_id: conv.into(),
        sender: "alice".into(),
        client_msg_id: id.into(),
        payload: vec![7; size],
        hops: 0,
    };
    let ok = c
        .append(append("limits", "m1", 1024))
        .await
        .expect("payload at the limit")
        .into_inner();
    assert_eq!(ok.seq, 1);
    for (req, code) in [
        (append("limits", "m2", 1025), "payload_too_large"),
        (append("", "m3", 1), "invalid_argument"),
        (append(&"c".repeat(300), "m4", 1), "invalid_argument"),
        (append("limits", "", 1), "invalid_argument"),
    ] {
        let err = c.append(req).await.expect_err("must be refused");
        assert_eq!(error_code(&err), Some(code), "{err}");
    }
    let err = c
        .read(ReadRequest {
            conversation_id: "limits".into(),
            from_seq: 1,
            limit: 0,
            hops: 0,
        })
        .await
        .expect_err("limit 0");
    assert_eq!(error_code(&err), Some("invalid_argument"));
    // Nothing refused was stored.
    let r = c
        .read(ReadRequest {
            conversation_id: "limits".into(),
            from_seq: 1,
            limit: 10,
            hops: 0,
        })
        .await
        .expect("read");
    assert_eq!(r.into_inner().entries.len(), 1);

    // Garbage on the Raft transport: typed statuses, no crash.
    let channel = tonic::transport::Endpoint::from_shared(cluster.endpoint(2))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut raft = RaftTransportClient::new(channel);
    let mut seed = 17u64;
    for i in 0..200u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (seed >> 33) as usize % 300;
        let payload: Vec<u8> = (0..len).map(|j| (seed >> (j % 56)) as u8).collect();
        // Groups this cluster does not have: the decoder sees every message, and no real
        // group is disturbed by garbage that happens to decode.
        let msg = RaftMessage {
            group_id: 1_000 + i,
            from_node: 1,
            payload,
        };
        let err = raft
            .append_entries(msg.clone())
            .await
            .expect_err("garbage refused");
        assert!(
            matches!(
                err.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound
            ),
            "{err}"
        );
        let err = raft.vote(msg).await.expect_err("garbage refused");
        assert!(
            matches!(
                err.code(),
                tonic::Code::InvalidArgument | tonic::Code::NotFound
            ),
            "{err}"
        );
    }
    // Replication streams: without their metadata, for a group not hosted here, with a
    // request that does not decode, and with a message of another group. The last two are
    // refused as the stream's final status, before anything reaches the group.
    let err = raft
        .stream_append(futures::stream::empty::<RaftMessage>())
        .await
        .expect_err("no metadata");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let stream_of = |group: u64, msgs: Vec<RaftMessage>| {
        let mut req = Request::new(futures::stream::iter(msgs));
        req.metadata_mut()
            .insert("x-parley-group", group.to_string().parse().expect("ascii"));
        req.metadata_mut()
            .insert("x-parley-from", "1".parse().expect("ascii"));
        req
    };
    let err = raft
        .stream_append(stream_of(999, Vec::new()))
        .await
        .expect_err("group not hosted");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let undecodable = RaftMessage {
        group_id: 1,
        from_node: 1,
        payload: Vec::new(),
    };
    let other_group = RaftMessage {
        group_id: 2,
        from_node: 1,
        payload: vec![0; 10],
    };
    for msg in [undecodable, other_group] {
        let mut replies = raft
            .stream_append(stream_of(1, vec![msg]))
            .await
            .expect("the stream opens")
            .into_inner();
        let err = replies.message().await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    let err = cluster
        .admin(3)
        .propose_meta(MetaProposal {
            command: vec![0xff; 40],
            hops: 0,
        })
        .await
        .expect_err("garbage");
    assert_eq!(error_code(&err), Some("invalid_argument"));
    // Bootstrapping twice is refused.
    let nodes = vec![NodeAddress {
        node_id: 1,
        addr: "127.0.0.1:1".into(),
        ..Default::default()
    }];
    let err = cluster
        .admin(1)
        .bootstrap(BootstrapRequest {
            nodes,
            shard_groups: 4,
        })
        .await
        .expect_err("twice");
    assert_eq!(error_code(&err), Some("refused"));
    // Fault injection needs the flag, which this cluster has; the error for a node without
    // it is covered by the unit tests of the error mapping.
    for id in cluster.node_ids() {
        cluster
            .wait_healthy(id, Duration::from_secs(5))
            .await
            .expect("node still up");
    }
    let ok = c
        .append(append("limits", "m5", 10))
        .await
        .expect("still accepting")
        .into_inner();
    assert_eq!(ok.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_refuses_writes_and_keeps_data() {
    let cluster = LocalCluster::start(ClusterOptions {
        fault_injection: true,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.log_client();
    let journal = load("a", &client, 50, 8, 2).await;
    for id in cluster.node_ids() {
        cluster
            .set_faults(id, vec![], true)
            .await
            .expect("disk full");
    }
    let mut c = cluster.client(2);
    let req = AppendRequest {
        conversation_id: conversation(1),
        sender: "writer".into(),
        client_msg_id: "while-full".into(),
        payload: b"x".to_vec(),
        hops: 0,
    };
    let err = c
        .append(req.clone())
        .await
        .expect_err("disk full refuses writes");
    assert_eq!(error_code(&err), Some("disk_full"), "{err}");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let metrics = reqwest::get(format!("http://{}/metrics", cluster.http_addr(2)))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.lines().any(|l| l.trim() == "parley_disk_full 1"),
        "disk_full gauge not set"
    );
    // Reads still work and nothing was lost.
    verify(&client, 50, &journal).await;
    for id in cluster.node_ids() {
        cluster
            .set_faults(id, vec![], false)
            .await
            .expect("disk back");
    }
    let ok = c.append(req).await.expect("writes resume").into_inner();
    assert!(ok.seq >= 1);
    let mut journal = journal;
    journal.unacked.push((conversation(1), "while-full".into()));
    verify(&client, 50, &journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_are_exported_and_sigterm_hands_off_leadership() {
    let cluster = LocalCluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts");
    let client = cluster.log_client();
    let journal = load("a", &client, 100, 8, 2).await;
    let body = reqwest::get(format!("http://{}/metrics", cluster.http_addr(1)))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for name in [
        "parley_raft_commit_seconds_bucket",
        "parley_appends_total",
        "parley_apply_lag_entries",
        "parley_raft_leaders",
        "parley_raft_replicas",
        "parley_rocksdb_size_bytes",
        "parley_wal_sync_seconds_bucket",
        "parley_placement_epoch",
        "parley_disk_full",
    ] {
        assert!(body.contains(name), "metric {name} missing from /metrics");
    }
    let ready = reqwest::get(format!("http://{}/readyz", cluster.http_addr(1)))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);

    // SIGTERM: the node hands its leaderships to other voters before exiting cleanly.
    let status = cluster.cluster_status().await.expect("status");
    let victim = busiest_leader(&status);
    let exit = cluster.stop(victim).await.expect("stop");
    assert!(exit.success(), "node {victim} exited with {exit}");
    let after = status_from(&cluster, if victim == 1 { 2 } else { 1 })
        .await
        .expect("status");
    let leaderless: Vec<u64> = after
        .groups
        .iter()
        .filter(|g| g.leader == 0 || g.leader == victim)
        .map(|g| g.group_id)
        .collect();
    assert!(
        leaderless.is_empty(),
        "groups {leaderless:?} lost their leader instead of being handed off"
    );
    verify(&client, 100, &journal).await;
}

/// Free bytes on the filesystem holding `path`, from `df`.
fn free_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df output")
}

async fn disk_full_gauge(cluster: &LocalCluster, node: u64) -> bool {
    let body = reqwest::get(format!("http://{}/metrics", cluster.http_addr(node)))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    body.lines().any(|l| l.trim() == "parley_disk_full 1")
}

/// Unmounts the test's tmpfs even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A real, nearly full volume (a small tmpfs filled with a file): the nodes notice the
/// free-space floor, refuse writes with `disk_full`, keep serving reads, and accept
/// writes again once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nearly_full_volume_refuses_writes_until_space_is_freed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=768m", "parley-test"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(mounted, "mounting a tmpfs needs root (CI runs as root)");
    let _mount = Mount(dir.path().to_path_buf());
    let floor: u64 = 192 << 20;
    let options = ClusterOptions {
        data_root: Some(dir.path().join("cluster")),
        extra_args: vec!["--min-free-disk-bytes".into(), floor.to_string()],
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::start(options).await.expect("cluster starts");
    let client = cluster.log_client();
    let journal = load("a", &client, 50, 8, 2).await;

    // Fill the volume until less than the floor is free.
    let filler = dir.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 1 << 20];
        while free_bytes(dir.path()) > floor - (32 << 20) {
            f.write_all(&chunk).expect("fill");
        }
        f.sync_all().expect("sync filler");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !disk_full_gauge(&cluster, 1).await {
        assert!(
            Instant::now() < deadline,
            "node 1 did not notice the full volume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = cluster.client(1);
    let req = AppendRequest {
        conversation_id: conversation(3),
        sender: "writer".into(),
        client_msg_id: "on-full-volume".into(),
        payload: b"x".to_vec(),
        hops: 0,
    };
    let err = c
        .append(req.clone())
        .await
        .expect_err("writes refused on a full volume");
    assert_eq!(error_code(&err), Some("disk_full"), "{err}");
    verify(&client, 50, &journal).await;

    std::fs::remove_file(&filler).expect("free space");
    let deadline = Instant::now() + Duration::from_secs(10);
    while disk_full_gauge(&cluster, 1).await {
        assert!(
            Instant::now() < deadline,
            "node 1 did not notice the freed space"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.append(req).await.expect("writes accepted again");
    let mut journal = journal;
    journal
        .unacked
        .push((conversation(3), "on-full-volume".into()));
    verify(&client, 50, &journal).await;
    drop(cluster);
}

/// Draining a node that holds a metadata replica moves the metadata group too: afterwards
/// the node can die and the cluster (placement changes included) goes on without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_metadata_voter_moves_the_metadata_group() {
    let options = ClusterOptions {
        nodes: 4,
        shard_groups: 4,
        ..ClusterOptions::default()
    };
    let cluster = LocalCluster::start(options).await.expect("cluster starts");
    let client = cluster.log_client();
    let journal = load("a", &client, 100, 8, 2).await;

    let reply = cluster
        .admin(2)
        .drain_node(DrainNodeRequest { node_id: 1 })
        .await
        .expect("drain")
        .into_inner();
    println!("drain: {}", reply.detail);
    let status = status_from(&cluster, 2).await.expect("status");
    for g in &status.groups {
        assert!(
            !g.voters.contains(&1),
            "group {} still on node 1",
            g.group_id
        );
        assert_eq!(g.voters.len(), 3);
    }
    let s2 = node_status(&cluster, 2).await;
    let meta = replica(&s2, 0).expect("node 2 hosts the metadata group");
    let mut voters = meta.voters.clone();
    voters.sort();
    assert_eq!(voters, vec![2, 3, 4], "metadata voters after the drain");

    // Node 1 is gone for good; everything keeps working without it.
    cluster.kill(1).await.expect("kill");
    let more = load("b", &client, 100, 8, 2).await;
    assert!(
        !more.acks.is_empty(),
        "no writes after the drained node died"
    );
    let to = status.groups[0]
        .voters
        .iter()
        .copied()
        .find(|v| *v != status.groups[0].leader)
        .expect("voter");
    cluster
        .admin(3)
        .transfer_leader(TransferLeaderRequest {
            group_id: status.groups[0].group_id,
            to_node: to,
        })
        .await
        .expect("placement changes still commit without node 1");
    let mut journal = journal;
    journal.acks.extend(more.acks);
    journal.unacked.extend(more.unacked);
    verify(&client, 100, &journal).await;
}
