//! Fault tests on three real `parley-node` processes: a leader SIGKILLed under load,
//! a full-cluster restart, and a leader cut off from its peers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use parley_testkit::{ClusterOptions, LocalCluster, RetryPolicy};

const CONVERSATIONS: usize = 1_200;
const WRITERS: usize = 48;

fn options(fault_injection: bool) -> ClusterOptions {
    ClusterOptions {
        shard_groups: 8,
        fault_injection,
        ..ClusterOptions::default()
    }
}

fn take(journal: &Arc<Mutex<Journal>>) -> Journal {
    std::mem::take(&mut *journal.lock().unwrap_or_else(|p| p.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_sigkill_and_full_restart_lose_no_acknowledged_append() {
    let cluster = LocalCluster::start(options(false))
        .await
        .expect("cluster starts");
    let client = cluster.log_client();
    let journal = Arc::new(Mutex::new(Journal::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(
        "",
        client.clone(),
        CONVERSATIONS,
        WRITERS,
        64,
        journal.clone(),
        stop.clone(),
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = cluster.cluster_status().await.expect("status");
    let victim = busiest_leader(&before);
    let led: Vec<u64> = before
        .groups
        .iter()
        .filter(|g| g.leader == victim)
        .map(|g| g.group_id)
        .collect();
    let killed_at = Instant::now();
    cluster.kill(victim).await.expect("kill -9");
    println!("killed node {victim}, leader of groups {led:?}");

    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let journal = take(&journal);
    let after: Vec<&Ack> = journal
        .acks
        .iter()
        .filter(|a| a.at > killed_at && led.contains(&a.group))
        .collect();
    assert!(
        !after.is_empty(),
        "no write to the killed leader's groups succeeded after the kill"
    );
    let gap = max_group_gap(&journal.acks, &led, killed_at);
    for g in &led {
        println!(
            "group {g}: write gap across the kill {} ms",
            write_gap(&journal.acks, &[*g], killed_at).as_millis()
        );
    }
    println!(
        "acked {} appends ({} unacked attempts); write gap on the killed leader's groups: {} ms",
        journal.acks.len(),
        journal.unacked.len(),
        gap.as_millis()
    );
    assert!(
        journal.acks.len() > 500,
        "load too small to mean anything: {}",
        journal.acks.len()
    );

    // Everything acknowledged is there exactly once, in order, with no gaps.
    let checked = verify(&client, CONVERSATIONS, &journal).await;
    println!("verified {checked} stored entries over {CONVERSATIONS} conversations");

    // The killed node comes back from its own RocksDB and catches up.
    cluster.restart(victim).await.expect("restart");
    let took = wait_caught_up(&cluster, victim, Duration::from_secs(60))
        .await
        .expect("restarted node catches up");
    println!(
        "node {victim} caught up {} ms after restart",
        took.as_millis()
    );
    cluster
        .wait_ready(victim, Duration::from_secs(30))
        .await
        .expect("restarted node ready");

    // Its preferred leaderships come back: leaders end up spread evenly again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.cluster_status().await.expect("status");
        let counts = parley_testkit::leader_counts(&s);
        let per_node: Vec<usize> = cluster
            .node_ids()
            .iter()
            .map(|n| counts.get(n).copied().unwrap_or(0))
            .collect();
        let spread = per_node.iter().max().unwrap_or(&0) - per_node.iter().min().unwrap_or(&0);
        if spread <= 1 {
            println!("leaders per node after recovery: {per_node:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaders stayed unbalanced: {per_node:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // A full-cluster crash and restart loses nothing.
    for id in cluster.node_ids() {
        cluster.kill(id).await.expect("kill");
    }
    for id in cluster.node_ids() {
        cluster.restart(id).await.expect("restart");
    }
    cluster
        .wait_for_leaders(Duration::from_secs(60))
        .await
        .expect("leaders after full restart");
    let checked = verify(&client, CONVERSATIONS, &journal).await;
    println!("after full restart: verified {checked} entries, nothing lost");
}

/// A whole-cluster crash loses the state machines' unflushed writes (state is applied
/// without the WAL and rebuilt from the Raft log). Reads served right after the restart
/// must still see every acknowledged append: no node may serve them from a state machine
/// that has not yet re-applied everything committed before the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_right_after_a_full_crash_see_every_acknowledged_append() {
    let cluster = LocalCluster::start(options(false))
        .await
        .expect("cluster starts");
    let client = cluster.log_client();
    let conversations = 200;
    let journal = Arc::new(Mutex::new(Journal::default()));
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = spawn_writers(
            &format!("r{round}"),
            client.clone(),
            conversations,
            16,
            64,
            journal.clone(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }
        // Crash every node at once and bring them straight back: no waiting for leaders
        // before reading (reads retry until some node can serve them).
        for id in cluster.node_ids() {
            cluster.kill(id).await.expect("kill -9");
        }
        let restarts = cluster.node_ids().into_iter().map(|id| cluster.restart(id));
        for r in futures::future::join_all(restarts).await {
            r.expect("restart");
        }
        let snapshot = {
            let j = journal.lock().unwrap_or_else(|p| p.into_inner());
            Journal {
                acks: j.acks.clone(),
                unacked: j.unacked.clone(),
            }
        };
        let checked = verify(&client, conversations, &snapshot).await;
        println!(
            "round {round}: {} acknowledged, {checked} entries read back right after the crash",
            snapshot.acks.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_acknowledges_nothing_and_converges_after_healing() {
    let cluster = LocalCluster::start(options(true))
        .await
        .expect("cluster starts");
    let status = cluster
        .wait_for_leaders(Duration::from_secs(30))
        .await
        .expect("leaders");
    let isolated = busiest_leader(&status);
    let led: Vec<u64> = status
        .groups
        .iter()
        .filter(|g| g.leader == isolated)
        .map(|g| g.group_id)
        .collect();
    assert!(!led.is_empty());
    let others: Vec<u64> = cluster
        .node_ids()
        .into_iter()
        .filter(|n| *n != isolated)
        .collect();
    let majority = parley_testkit::LogClient::new(others.iter().map(|n| cluster.endpoint(*n)))
        .expect("client");

    // Warm up so every group has data, then cut the leader off in both directions.
    let journal = Arc::new(Mutex::new(Journal::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(
        "",
        majority.clone(),
        CONVERSATIONS,
        16,
        64,
        journal.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster
        .set_faults(isolated, others.clone(), false)
        .await
        .expect("isolate");
    for n in &others {
        cluster
            .set_faults(*n, vec![isolated], false)
            .await
            .expect("isolate");
    }
    let cut_at = Instant::now();
    println!("cut off node {isolated}, leader of groups {led:?}");

    // The isolated node must acknowledge nothing.
    let lonely = parley_testkit::LogClient::new([cluster.endpoint(isolated)])
        .expect("client")
        .with_policy(RetryPolicy {
            deadline: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(2),
            ..RetryPolicy::default()
        });
    let mut isolated_attempts = Vec::new();
    for i in 0..12 {
        let conv = conversation(i);
        let id = format!("isolated-{i}");
        let res = lonely
            .append(&conv, "writer", &id, b"must not be acknowledged")
            .await;
        assert!(
            res.is_err(),
            "isolated node acknowledged {conv}/{id}: {res:?}"
        );
        isolated_attempts.push((conv, id));
    }

    // The majority elects new leaders and goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let s = loop {
        let s = status_from(&cluster, others[0])
            .await
            .expect("status from the majority");
        if s.groups
            .iter()
            .all(|g| g.leader != 0 && g.leader != isolated)
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the majority did not elect leaders for every group: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for g in &s.groups {
        println!(
            "after the cut: group {} led by {} (term {})",
            g.group_id, g.leader, g.term
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let mut journal = take(&journal);
    for g in &led {
        println!(
            "group {g}: write gap across the cut {} ms",
            write_gap(&journal.acks, &[*g], cut_at).as_millis()
        );
    }
    let gap = max_group_gap(&journal.acks, &led, cut_at);
    let resumed = journal
        .acks
        .iter()
        .filter(|a| a.at > cut_at && led.contains(&a.group))
        .count();
    println!("majority acked {resumed} appends to the cut-off leader's groups after the cut; write gap {} ms", gap.as_millis());
    assert!(
        resumed > 0,
        "majority made no progress on the isolated leader's groups"
    );

    // Heal: the old leader steps down, drops what it could not commit, and converges.
    cluster
        .set_faults(isolated, vec![], false)
        .await
        .expect("heal");
    for n in &others {
        cluster.set_faults(*n, vec![], false).await.expect("heal");
    }
    let took = wait_caught_up(&cluster, isolated, Duration::from_secs(60))
        .await
        .expect("healed node converges");
    println!(
        "node {isolated} converged {} ms after healing",
        took.as_millis()
    );

    // Isolated attempts were never acknowledged, so they count as "maybe stored"; assert
    // they were in fact discarded, then the usual checks.
    let everyone = cluster.log_client();
    for (conv, id) in &isolated_attempts {
        let stored = read_all(&everyone, conv).await;
        assert!(
            !stored.iter().any(|(_, x)| x == id),
            "{conv}: uncommitted {id} from the isolated leader survived"
        );
    }
    journal.unacked.extend(isolated_attempts);
    let checked = verify(&everyone, CONVERSATIONS, &journal).await;
    println!("verified {checked} entries after healing");
}
