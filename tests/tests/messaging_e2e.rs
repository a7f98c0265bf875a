//! Messaging end to end through the `parley-client` SDK, against 3 real node processes:
//! ordering of 10,000 messages over many pairs, offline storage and sync, the status of
//! a message (sent, delivered, read) and the read-receipt privacy rule, idempotent
//! retries, proxying, and SIGKILL of a user's home node while messages flow.
//!
//! Every wait has a deadline; nothing sleeps a fixed time to let things happen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use parley_client::proto::{
    client_frame::Body, reply, Authenticate, ErrorCode, Fetch, Message, Receipt, Send,
};
use parley_client::{Client, ClientConfig, ClientError, ClientEvent, Credentials, Events};
use parley_testkit::{ClusterOptions, LocalCluster, RawConnection, Received};
use tokio::sync::watch;
use tokio::time::Instant;

/// Longest wait for any single outcome.
const T: Duration = Duration::from_secs(30);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn cluster() -> anyhow::Result<LocalCluster> {
    LocalCluster::start(ClusterOptions::default()).await
}

/// Everything a client's event stream produced, shared with the test.
#[derive(Clone)]
struct Inbox {
    events: Arc<Mutex<Vec<ClientEvent>>>,
    changed: watch::Receiver<usize>,
}

impl Inbox {
    /// Drains `events` in a background task (taking an event acknowledges its delivery
    /// when the client auto-acknowledges).
    fn spawn(mut events: Events) -> Inbox {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0usize);
        let sink = log.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                let n = {
                    let mut l = lock(&sink);
                    l.push(e);
                    l.len()
                };
                tx.send_replace(n);
            }
        });
        Inbox {
            events: log,
            changed: rx,
        }
    }

    /// Waits until `check` over the events so far returns `Some`, for at most `limit`.
    async fn wait<R>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&[ClientEvent]) -> Option<R>,
    ) -> anyhow::Result<R> {
        let deadline = Instant::now() + limit;
        let mut changed = self.changed.clone();
        loop {
            if let Some(r) = check(&lock(&self.events)) {
                return Ok(r);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    // The stream ended: one last look.
                    if let Some(r) = check(&lock(&self.events)) {
                        return Ok(r);
                    }
                    anyhow::bail!("event stream ended before {what}");
                }
                Err(_) => anyhow::bail!("no {what} within {limit:?}"),
            }
        }
    }

    /// The messages of one conversation received so far, in arrival order.
    fn messages(&self, conversation: &str) -> Vec<Message> {
        messages_of(&lock(&self.events), conversation)
    }

    /// The receipts received so far.
    fn receipts(&self) -> Vec<Receipt> {
        receipts_of(&lock(&self.events))
    }

    /// Waits for at least `n` messages in `conversation`; returns them all.
    async fn wait_messages(&self, conversation: &str, n: usize) -> anyhow::Result<Vec<Message>> {
        self.wait(&format!("{n} messages in {conversation}"), T, |ev| {
            let m = messages_of(ev, conversation);
            (m.len() >= n).then_some(m)
        })
        .await
    }

    /// Waits for the `n`th `SyncComplete` (counting from 1); returns its message count.
    async fn wait_sync(&self, n: usize) -> anyhow::Result<u32> {
        self.wait(&format!("sync #{n}"), T, |ev| {
            ev.iter()
                .filter_map(|e| match e {
                    ClientEvent::SyncComplete { messages, .. } => Some(*messages),
                    _ => None,
                })
                .nth(n - 1)
        })
        .await
    }

    /// Waits for a receipt from `user` matching `pred`.
    async fn wait_receipt(
        &self,
        what: &str,
        pred: impl Fn(&Receipt) -> bool,
    ) -> anyhow::Result<Receipt> {
        self.wait(what, T, |ev| {
            ev.iter().rev().find_map(|e| match e {
                ClientEvent::Receipt(r) if pred(r) => Some(r.clone()),
                _ => None,
            })
        })
        .await
    }
}

fn receipts_of(events: &[ClientEvent]) -> Vec<Receipt> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Receipt(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn messages_of(events: &[ClientEvent], conversation: &str) -> Vec<Message> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Message(m) if m.conversation_id == conversation => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// Registers `user` (device "phone") through the first endpoint.
async fn register(cluster: &LocalCluster, user: &str) -> anyhow::Result<Credentials> {
    let ep = &cluster.client_endpoints()[0];
    Ok(parley_client::register(ep, user, "phone").await?)
}

/// Connects `credentials` with `endpoints` tried in that order.
async fn connect(
    endpoints: Vec<String>,
    credentials: Credentials,
    auto_ack: bool,
) -> anyhow::Result<(Client, Inbox)> {
    let config = ClientConfig {
        auto_ack,
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..ClientConfig::new(endpoints)
    };
    let (client, events) = Client::connect(config, credentials).await?;
    Ok((client, Inbox::spawn(events)))
}

/// Asserts `messages` are exactly seqs `1..=n` in order.
fn assert_contiguous(what: &str, messages: &[Message]) {
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    let want: Vec<u64> = (1..=messages.len() as u64).collect();
    assert_eq!(seqs, want, "{what}: seqs not 1..=n in order");
}

/// Reads a whole conversation through `client`.
async fn history(client: &Client, conversation: &str) -> anyhow::Result<Vec<Message>> {
    let mut out: Vec<Message> = Vec::new();
    loop {
        let from = out.last().map_or(1, |m| m.seq + 1);
        let h = client.fetch(conversation, from, 1000).await?;
        let done = h.messages.is_empty() || h.messages.last().map(|m| m.seq) >= Some(h.last_seq);
        out.extend(h.messages);
        if done {
            return Ok(out);
        }
    }
}

/// Sends pipelined on ONE raw connection (no waiting between them) are committed in
/// the order they were sent (FR1), and each gets its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_on_one_connection_keep_their_order() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let alice = register(&cluster, "alice").await?;
    let _bob = register(&cluster, "bob").await?;
    let _carol = register(&cluster, "carol").await?;
    let eps = cluster.client_endpoints();
    let mut c = RawConnection::connect(&eps[1]).await?;
    let (r, _) = c
        .call(Body::Authenticate(Authenticate {
            token: alice.token.clone(),
        }))
        .await?;
    anyhow::ensure!(
        matches!(r?.result, Some(reply::Result::Authenticated(_))),
        "not authenticated"
    );
    const N: usize = 300;
    // Interleave two conversations so per-conversation order is checked with other
    // sends in flight, all written before any answer is read.
    let mut ids = HashMap::new();
    for i in 0..N {
        let to = if i % 3 == 0 { "carol" } else { "bob" };
        let id = c
            .request(Body::Send(Send {
                client_msg_id: format!("p{i}"),
                recipient: to.into(),
                body: format!("{i}").into_bytes(),
            }))
            .await?;
        ids.insert(id, i);
    }
    let mut answered = HashSet::new();
    let deadline = Instant::now() + T;
    while answered.len() < N {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.recv(left).await? {
            Received::Reply(r) => {
                anyhow::ensure!(
                    matches!(r.result, Some(reply::Result::Sent(_))),
                    "unexpected reply {r:?}"
                );
                anyhow::ensure!(ids.contains_key(&r.request_id), "unknown request id");
                anyhow::ensure!(answered.insert(r.request_id), "answered twice");
            }
            Received::Error(e) => anyhow::bail!("send refused: {e:?}"),
            Received::Event(_) => {}
            Received::Closed(code) => anyhow::bail!("closed {code:?}"),
        }
    }
    for (conversation, peer, want) in [
        (
            "dm:alice:bob",
            "bob",
            (0..N).filter(|i| i % 3 != 0).collect::<Vec<_>>(),
        ),
        (
            "dm:alice:carol",
            "carol",
            (0..N).filter(|i| i % 3 == 0).collect(),
        ),
    ] {
        let (r, _) = c
            .call(Body::Fetch(Fetch {
                conversation_id: conversation.into(),
                from_seq: 1,
                limit: 1000,
            }))
            .await?;
        let Some(reply::Result::History(h)) = r?.result else {
            anyhow::bail!("no history for {conversation}");
        };
        let got: Vec<usize> = h
            .messages
            .iter()
            .map(|m| {
                String::from_utf8_lossy(&m.body)
                    .parse()
                    .unwrap_or(usize::MAX)
            })
            .collect();
        assert_eq!(
            got, want,
            "{conversation} (to {peer}): stored out of send order"
        );
    }
    Ok(())
}

/// The client endpoints with node `first` first, then the others in id order.
fn endpoints_from(cluster: &LocalCluster, first: u64) -> Vec<String> {
    let mut ids = cluster.node_ids();
    ids.retain(|id| *id != first);
    ids.insert(0, first);
    ids.into_iter()
        .map(|id| cluster.client_addr(id).to_string())
        .collect()
}

/// The home node of `user` while every node is up (rendezvous over the node ids, as
/// the router computes it).
fn home_of(cluster: &LocalCluster, user: &str) -> u64 {
    parley_node::router::rendezvous_rank(user, &cluster.node_ids())[0]
}

/// A user id with the given home node, from `prefix` plus a counter.
fn user_homed_on(cluster: &LocalCluster, prefix: &str, home: u64) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| home_of(cluster, u) == home)
        .unwrap_or_else(|| unreachable!("the search is unbounded"))
}

/// Sum over the nodes of a metric sample (`name{labels}` exactly as exported).
async fn metric_sum(cluster: &LocalCluster, sample: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for id in cluster.node_ids() {
        if !cluster.is_running(id) {
            continue;
        }
        total += metric(cluster, id, sample).await?;
    }
    Ok(total)
}

/// One node's value of a metric sample (0 when absent).
async fn metric(cluster: &LocalCluster, node: u64, sample: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{}/metrics", cluster.http_addr(node)))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}

/// Polls `f` until it returns true, for at most `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 50 pairs exchange 200 messages each (10,000 in all), every sender pipelining 8
/// sends at a time, with users spread over all three entry nodes (most connections
/// proxied): every recipient gets exactly seqs 1..=200, in order, in send order, with
/// the ids and seqs the sender was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_between_fifty_pairs_arrive_in_order_exactly_once(
) -> anyhow::Result<()> {
    const PAIRS: usize = 50;
    const PER_PAIR: usize = 200;
    let cluster = cluster().await?;
    let ids = cluster.node_ids();
    let users: Vec<String> = (0..PAIRS)
        .flat_map(|p| [format!("s{p}"), format!("r{p}")])
        .collect();
    let creds: Vec<Credentials> = futures::stream::iter(users.iter())
        .map(|u| register(&cluster, u))
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut clients = Vec::new();
    for (i, c) in creds.into_iter().enumerate() {
        clients.push(connect(endpoints_from(&cluster, ids[i % ids.len()]), c, true).await?);
    }
    for (_, inbox) in &clients {
        inbox.wait_sync(1).await?;
    }
    let started = Instant::now();
    let mut senders = Vec::new();
    for p in 0..PAIRS {
        let client = clients[2 * p].0.clone();
        let to = format!("r{p}");
        senders.push(tokio::spawn(async move {
            futures::stream::iter(0..PER_PAIR)
                .map(|i| {
                    let (client, to) = (client.clone(), to.clone());
                    async move {
                        let sent = client
                            .send_with_id(&to, &format!("s{p}-{i}"), format!("{i}").into_bytes())
                            .await?;
                        anyhow::Ok((i, sent))
                    }
                })
                .buffered(8)
                .collect::<Vec<_>>()
                .await
        }));
    }
    for (p, task) in senders.into_iter().enumerate() {
        for r in task.await? {
            let (i, sent) = r?;
            assert_eq!(
                (sent.seq, sent.duplicate),
                (i as u64 + 1, false),
                "pair {p}: message {i} committed out of send order"
            );
        }
    }
    let sent_in = started.elapsed();
    for p in 0..PAIRS {
        let conversation = format!("dm:r{p}:s{p}");
        let got = clients[2 * p + 1]
            .1
            .wait_messages(&conversation, PER_PAIR)
            .await?;
        assert_contiguous(&conversation, &got);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(
                (
                    m.client_msg_id.as_str(),
                    m.body.as_slice(),
                    m.sender.as_str()
                ),
                (
                    format!("s{p}-{i}").as_str(),
                    format!("{i}").as_bytes(),
                    format!("s{p}").as_str()
                ),
                "{conversation}: message at seq {} is not the {i}th sent",
                m.seq
            );
        }
    }
    eprintln!(
        "{} messages committed in {:?}, all delivered in {:?}",
        PAIRS * PER_PAIR,
        sent_in,
        started.elapsed()
    );
    // Each conversation's log holds each message once.
    for p in (0..PAIRS).step_by(10) {
        let conversation = format!("dm:r{p}:s{p}");
        let log = history(&clients[2 * p].0, &conversation).await?;
        assert_contiguous(&conversation, &log);
        assert_eq!(log.len(), PER_PAIR, "{conversation}: stored count");
    }
    let sent = metric_sum(&cluster, "parley_messages_total{stage=\"sent\"}").await?;
    assert!(sent >= (PAIRS * PER_PAIR) as f64, "sent counter {sent}");
    for (client, _) in &clients {
        client.close().await;
    }
    Ok(())
}

/// Messages to a user with no open connection are stored and arrive, in order, at the
/// user's next connection; they stay pending (sent again by every sync) until the
/// device acknowledges them, and only what is new arrives after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_are_stored_and_delivered_in_order_on_reconnect() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let eps = cluster.client_endpoints();
    let alice = register(&cluster, "alice").await?;
    let bob = register(&cluster, "bob").await?;
    let (alice_c, alice_in) = connect(eps.clone(), alice, true).await?;
    const N: usize = 120;
    for i in 0..N {
        let sent = alice_c
            .send_with_id("bob", &format!("o{i}"), format!("{i}").into_bytes())
            .await?;
        assert_eq!(sent.seq, i as u64 + 1);
    }
    let offline = metric_sum(&cluster, "parley_offline_messages_total").await?;
    assert!(offline >= N as f64, "offline counter {offline}");
    eventually("pending offline gauge counts them", T, || async {
        Ok(metric_sum(&cluster, "parley_pending_offline_messages").await? >= N as f64)
    })
    .await?;

    // First connection, not acknowledging: everything arrives in order through sync.
    let conversation = "dm:alice:bob";
    let (bob_c, bob_in) = connect(eps.clone(), bob.clone(), false).await?;
    let synced = bob_in.wait_sync(1).await?;
    assert_eq!(synced as usize, N, "sync reported {synced} messages");
    let got = bob_in.wait_messages(conversation, N).await?;
    assert_contiguous("first sync", &got);
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(bodies, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
    eventually("pending offline gauge cleared by the sync", T, || async {
        Ok(metric_sum(&cluster, "parley_pending_offline_messages").await? == 0.0)
    })
    .await?;
    bob_c.close().await;

    // Nothing was acknowledged: the next connection gets all of it again, and this time
    // acknowledges it (alice sees the double tick).
    let (bob_c, bob_in) = connect(endpoints_from(&cluster, 3), bob.clone(), true).await?;
    assert_eq!(bob_in.wait_sync(1).await? as usize, N);
    let again = bob_in.wait_messages(conversation, N).await?;
    assert_contiguous("second sync", &again);
    alice_in
        .wait_receipt("delivered receipt for everything", |r| {
            r.conversation_id == conversation && r.delivered_seq == N as u64
        })
        .await?;
    // While online, new messages arrive live, after the old ones.
    for i in N..N + 5 {
        alice_c
            .send_with_id("bob", &format!("o{i}"), format!("{i}").into_bytes())
            .await?;
    }
    let live = bob_in.wait_messages(conversation, N + 5).await?;
    assert_contiguous("live after sync", &live);
    alice_in
        .wait_receipt("delivered receipt for the live ones", |r| {
            r.delivered_seq == (N + 5) as u64
        })
        .await?;
    bob_c.close().await;

    // Offline again: only what came meanwhile arrives at the next connection. The pushes
    // to bob's home node run after `Sent`; once they found no session the messages are
    // counted pending, and the next connection gets them through its sync (a push still in
    // flight would reach the new session live instead, in order but not counted by sync).
    eventually(
        "bob's session gone from the server (only alice's left)",
        T,
        || async { Ok(metric_sum(&cluster, "parley_sessions").await? == 1.0) },
    )
    .await?;
    for i in N + 5..N + 15 {
        alice_c
            .send_with_id("bob", &format!("o{i}"), format!("{i}").into_bytes())
            .await?;
    }
    eventually("pending offline gauge counts the ten", T, || async {
        Ok(metric_sum(&cluster, "parley_pending_offline_messages").await? >= 10.0)
    })
    .await?;
    let (bob_c, bob_in) = connect(endpoints_from(&cluster, 2), bob, true).await?;
    assert_eq!(bob_in.wait_sync(1).await?, 10);
    let rest = bob_in.wait_messages(conversation, 10).await?;
    let seqs: Vec<u64> = rest.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, ((N + 6) as u64..=(N + 15) as u64).collect::<Vec<_>>());
    bob_c.close().await;
    alice_c.close().await;
    Ok(())
}

/// The sender sees its message go sent -> delivered (double tick) -> read (blue tick);
/// a user with read receipts off still has reads stored, sends no read receipt and
/// sees none, while delivery receipts keep flowing both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_moves_sent_delivered_read_and_privacy_hides_read_receipts() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let eps = cluster.client_endpoints();
    let (alice_c, alice_in) =
        connect(eps.clone(), register(&cluster, "alice").await?, true).await?;
    // Bob acknowledges by hand, so each step is visible.
    let (bob_c, bob_in) = connect(
        endpoints_from(&cluster, 2),
        register(&cluster, "bob").await?,
        false,
    )
    .await?;
    bob_in.wait_sync(1).await?;
    let conversation = "dm:alice:bob";
    for i in 1..=3u64 {
        let sent = alice_c.send_text("bob", &format!("m{i}")).await?;
        assert_eq!((sent.seq, sent.conversation_id.as_str()), (i, conversation));
    }
    bob_in.wait_messages(conversation, 3).await?;
    // Sent, not delivered yet: no receipt moved past 0 (the one sync receipt is 0/0).
    assert!(
        alice_in
            .receipts()
            .iter()
            .all(|r| r.delivered_seq == 0 && r.read_seq == 0),
        "a receipt before any acknowledgement: {:?}",
        alice_in.receipts()
    );
    let set = bob_c.ack(conversation, 3).await?;
    assert_eq!((set.delivered_seq, set.read_seq), (3, 0));
    let r = alice_in
        .wait_receipt("double tick", |r| r.delivered_seq == 3)
        .await?;
    assert_eq!((r.user_id.as_str(), r.read_seq), ("bob", 0));
    bob_c.mark_read(conversation, 2).await?;
    let r = alice_in
        .wait_receipt("blue tick up to 2", |r| r.read_seq == 2)
        .await?;
    assert_eq!(r.delivered_seq, 3);

    // Bob turns read receipts off and reads the rest: stored, but never shown to alice.
    assert!(!bob_c.set_privacy(false).await?.read_receipts);
    let before = alice_in.receipts().len();
    let set = bob_c.mark_read(conversation, 3).await?;
    assert_eq!(set.read_seq, 3, "bob's read cursor is still stored");
    // The cursor moved, so alice gets a receipt: without the read.
    let r = alice_in
        .wait("the receipt of bob's hidden read", T, |ev| {
            receipts_of(ev).get(before).cloned()
        })
        .await?;
    assert_eq!((r.delivered_seq, r.read_seq), (3, 0), "read receipt leaked");
    // Delivery receipts still flow.
    alice_c.send_text("bob", "m4").await?;
    bob_in.wait_messages(conversation, 4).await?;
    bob_c.ack(conversation, 4).await?;
    alice_in
        .wait_receipt("double tick for m4", |r| r.delivered_seq == 4)
        .await?;
    let later = alice_in.receipts()[before..].to_vec();
    assert!(
        later.iter().all(|r| r.read_seq == 0),
        "a read receipt leaked with read receipts off: {later:?}"
    );

    // Reciprocal: bob sees no read receipt from alice either, only delivery.
    bob_c.send_text("alice", "b1").await?;
    alice_in.wait_messages(conversation, 1).await?;
    // Alice acknowledges automatically; then she reads it.
    bob_in
        .wait_receipt("alice's delivery receipt", |r| {
            r.user_id == "alice" && r.delivered_seq == 5
        })
        .await?;
    let before = bob_in.receipts().len();
    alice_c.mark_read(conversation, 5).await?;
    let r = bob_in
        .wait("the receipt of alice's read", T, |ev| {
            receipts_of(ev).get(before).cloned()
        })
        .await?;
    assert_eq!(
        (r.user_id.as_str(), r.delivered_seq, r.read_seq),
        ("alice", 5, 0),
        "bob sees read receipts while his are off"
    );
    // A fresh connection of alice reports bob's cursors the same way.
    let (alice2, alice2_in) =
        connect(endpoints_from(&cluster, 3), alice_c.credentials(), true).await?;
    alice2_in.wait_sync(1).await?;
    let r = alice2_in
        .wait_receipt("sync receipt", |r| r.user_id == "bob")
        .await?;
    assert_eq!((r.delivered_seq, r.read_seq), (4, 0));
    alice2.close().await;

    // Back on: the next read is shown again.
    assert!(bob_c.set_privacy(true).await?.read_receipts);
    bob_c.mark_read(conversation, 4).await?;
    alice_in
        .wait_receipt("blue tick after privacy on", |r| r.read_seq == 4)
        .await?;
    let read = metric_sum(&cluster, "parley_messages_total{stage=\"read\"}").await?;
    let delivered = metric_sum(&cluster, "parley_messages_total{stage=\"delivered\"}").await?;
    assert!(
        read >= 5.0 && delivered >= 5.0,
        "read {read}, delivered {delivered}"
    );
    alice_c.close().await;
    bob_c.close().await;
    Ok(())
}

/// Sending again with the same client_msg_id, on the same connection or after
/// reconnecting through another node, returns the original seq marked duplicate; the
/// message is stored once and pushed to the recipient once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_with_the_same_client_msg_id_is_stored_once() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let eps = cluster.client_endpoints();
    let alice = register(&cluster, "alice").await?;
    let bob = register(&cluster, "bob").await?;
    // Bob on a raw connection: what the server pushes, before any SDK de-duplication.
    let mut bob_raw = RawConnection::connect(&eps[2]).await?;
    bob_raw
        .call(Body::Authenticate(Authenticate { token: bob.token }))
        .await?
        .0?;
    bob_raw
        .call(Body::Sync(parley_client::proto::Sync {}))
        .await?
        .0?;

    let (a1, _in1) = connect(endpoints_from(&cluster, 1), alice.clone(), true).await?;
    let first = a1.send_with_id("bob", "retry-1", b"once".to_vec()).await?;
    assert_eq!((first.seq, first.duplicate), (1, false));
    let again = a1.send_with_id("bob", "retry-1", b"once".to_vec()).await?;
    assert_eq!((again.seq, again.duplicate), (1, true));
    a1.close().await;
    // "Reconnect" through another node (a new session) and retry once more.
    let (a2, _in2) = connect(endpoints_from(&cluster, 2), alice, true).await?;
    let third = a2.send_with_id("bob", "retry-1", b"once".to_vec()).await?;
    assert_eq!((third.seq, third.duplicate), (1, true));
    let next = a2.send_with_id("bob", "retry-2", b"twice".to_vec()).await?;
    assert_eq!((next.seq, next.duplicate), (2, false));

    let log = history(&a2, "dm:alice:bob").await?;
    let ids: Vec<&str> = log.iter().map(|m| m.client_msg_id.as_str()).collect();
    assert_eq!(ids, ["retry-1", "retry-2"]);
    // Bob's wire: seq 1 once, then seq 2.
    let mut pushed = Vec::new();
    let deadline = Instant::now() + T;
    while !pushed.contains(&2) {
        match bob_raw
            .recv(deadline.saturating_duration_since(Instant::now()))
            .await?
        {
            Received::Event(e) => {
                if let Some(parley_client::proto::event::Kind::Message(m)) = e.kind {
                    pushed.push(m.seq);
                }
            }
            Received::Closed(code) => anyhow::bail!("bob's connection closed ({code:?})"),
            _ => {}
        }
    }
    assert_eq!(pushed, [1, 2], "pushed to bob");
    let sent = metric_sum(&cluster, "parley_messages_total{stage=\"sent\"}").await?;
    assert_eq!(sent, 2.0, "duplicates counted as sent");
    a2.close().await;
    Ok(())
}

/// A client given only a node that is not its home is relayed to the home node: it is
/// told the home's id, and messages and receipts flow both ways through the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_connection_to_a_non_home_node_is_proxied() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let home = home_of(&cluster, "dave");
    let entry = cluster
        .node_ids()
        .into_iter()
        .find(|id| *id != home)
        .ok_or_else(|| anyhow::anyhow!("no second node"))?;
    let dave = register(&cluster, "dave").await?;
    let eve = register(&cluster, "eve").await?;
    let entry_ep = cluster.client_addr(entry).to_string();
    let (dave_c, dave_in) = connect(vec![entry_ep.clone()], dave, true).await?;
    let (node, via) = dave_in
        .wait("connected", T, |ev| {
            ev.iter().find_map(|e| match e {
                ClientEvent::Connected {
                    home_node,
                    node_endpoint,
                } => Some((*home_node, node_endpoint.clone())),
                _ => None,
            })
        })
        .await?;
    assert_eq!((node, via.as_str()), (home, entry_ep.as_str()));
    assert!(metric(&cluster, entry, "parley_connections{kind=\"proxied_out\"}").await? >= 1.0);
    assert!(metric(&cluster, home, "parley_connections{kind=\"proxied_in\"}").await? >= 1.0);
    assert!(metric(&cluster, home, "parley_sessions").await? >= 1.0);
    assert_eq!(metric(&cluster, entry, "parley_sessions").await?, 0.0);

    let (eve_c, eve_in) = connect(endpoints_from(&cluster, home), eve, true).await?;
    dave_in.wait_sync(1).await?;
    eve_c.send_text("dave", "through the relay").await?;
    let got = dave_in.wait_messages("dm:dave:eve", 1).await?;
    assert_eq!(got[0].body, b"through the relay");
    // Dave's automatic acknowledgement goes back through the relay too.
    eve_in
        .wait_receipt("dave's delivery receipt", |r| r.delivered_seq == 1)
        .await?;
    let sent = dave_c.send_text("eve", "and back").await?;
    assert_eq!(sent.seq, 2);
    let got = eve_in.wait_messages("dm:dave:eve", 1).await?;
    assert_eq!(got[0].body, b"and back");
    dave_c.close().await;
    eve_c.close().await;
    Ok(())
}

/// What one sender was told.
#[derive(Default)]
struct SendLog {
    /// client_msg_id -> seq, for every send answered `Sent`.
    acked: BTreeMap<String, u64>,
    /// Sends that got no `Sent` (may or may not be stored; at most once).
    failed: Vec<String>,
}

/// Sends to `to` one message after another until `stop`, recording the answers.
fn spawn_sender(
    client: Client,
    to: String,
    tag: &'static str,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<SendLog> {
    tokio::spawn(async move {
        let mut log = SendLog::default();
        let mut i = 0u64;
        while !*stop.borrow() {
            let id = format!("{tag}{i}");
            i += 1;
            match client.send_with_id(&to, &id, id.clone().into_bytes()).await {
                Ok(sent) => {
                    log.acked.insert(id, sent.seq);
                }
                Err(_) => log.failed.push(id),
            }
        }
        log
    })
}

/// SIGKILL of a user's home node while two others send to them: the client reconnects
/// through another node, and receives every message acknowledged `Sent`, each once, in
/// seq order with no gap; the log holds each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_home_node_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let victim = 2;
    // Bob lives on the node that dies; his correspondents live elsewhere.
    let bob_name = user_homed_on(&cluster, "bob", victim);
    let alice_name = user_homed_on(&cluster, "alice", 3);
    let carol_name = user_homed_on(&cluster, "carol", 1);
    let bob = register(&cluster, &bob_name).await?;
    let alice = register(&cluster, &alice_name).await?;
    let carol = register(&cluster, &carol_name).await?;
    let victim_ep = cluster.client_addr(victim).to_string();
    let (bob_c, bob_in) = connect(endpoints_from(&cluster, victim), bob, true).await?;
    let home = bob_in
        .wait("bob connected", T, |ev| {
            ev.iter().find_map(|e| match e {
                ClientEvent::Connected { home_node, .. } => Some(*home_node),
                _ => None,
            })
        })
        .await?;
    assert_eq!(home, victim, "bob is not homed on node {victim}");
    bob_in.wait_sync(1).await?;
    let (alice_c, _a) = connect(endpoints_from(&cluster, 3), alice, true).await?;
    let (carol_c, _c) = connect(endpoints_from(&cluster, 1), carol, true).await?;
    let conv_a = parley_client::dm_conversation_id(&alice_name, &bob_name);
    let conv_c = parley_client::dm_conversation_id(&carol_name, &bob_name);

    let (stop_tx, stop) = watch::channel(false);
    let senders = [
        (
            conv_a.clone(),
            spawn_sender(alice_c.clone(), bob_name.clone(), "a", stop.clone()),
        ),
        (
            conv_c.clone(),
            spawn_sender(carol_c.clone(), bob_name.clone(), "c", stop),
        ),
    ];
    bob_in.wait_messages(&conv_a, 50).await?;
    bob_in.wait_messages(&conv_c, 50).await?;
    cluster.kill(victim).await?;
    let killed_at = Instant::now();
    // Bob's client notices and reconnects through a surviving node.
    let (new_home, via) = bob_in
        .wait("bob reconnected", T, |ev| {
            let dropped = ev
                .iter()
                .position(|e| matches!(e, ClientEvent::Disconnected { .. }))?;
            ev[dropped..].iter().find_map(|e| match e {
                ClientEvent::Connected {
                    home_node,
                    node_endpoint,
                } => Some((*home_node, node_endpoint.clone())),
                _ => None,
            })
        })
        .await?;
    let reconnected_in = killed_at.elapsed();
    assert_ne!(new_home, victim);
    assert_ne!(via, victim_ep);
    // Keep sending until both conversations moved well past the reconnection.
    let past = (
        bob_in.messages(&conv_a).len() + 50,
        bob_in.messages(&conv_c).len() + 50,
    );
    bob_in.wait_messages(&conv_a, past.0).await?;
    bob_in.wait_messages(&conv_c, past.1).await?;
    stop_tx.send_replace(true);
    let mut total = 0;
    for (conversation, sender) in senders {
        let log = sender.await?;
        let last_acked = log.acked.values().copied().max().unwrap_or(0);
        let got = bob_in
            .wait_messages(&conversation, last_acked as usize)
            .await?;
        assert_contiguous(&conversation, &got);
        let at: HashMap<u64, &str> = got
            .iter()
            .map(|m| (m.seq, m.client_msg_id.as_str()))
            .collect();
        for (id, seq) in &log.acked {
            assert_eq!(
                at.get(seq).copied(),
                Some(id.as_str()),
                "{conversation}: acknowledged {id} (seq {seq}) not received at its seq"
            );
        }
        // Anything received beyond the acknowledged ones is a send that got no answer.
        for m in &got {
            assert!(
                log.acked.contains_key(&m.client_msg_id) || log.failed.contains(&m.client_msg_id),
                "{conversation}: received {} that was never sent",
                m.client_msg_id
            );
        }
        let stored = history(&bob_c, &conversation).await?;
        assert_contiguous(&conversation, &stored);
        let unique: HashSet<&str> = stored.iter().map(|m| m.client_msg_id.as_str()).collect();
        assert_eq!(
            unique.len(),
            stored.len(),
            "{conversation}: a message stored twice"
        );
        assert_eq!(
            stored.len(),
            got.len(),
            "{conversation}: received != stored"
        );
        total += log.acked.len();
        eprintln!(
            "{conversation}: {} acknowledged, {} without answer",
            log.acked.len(),
            log.failed.len()
        );
    }
    eprintln!("{total} messages checked; bob reconnected {reconnected_in:?} after the kill");
    for c in [&alice_c, &carol_c, &bob_c] {
        c.close().await;
    }
    Ok(())
}

/// Refusals reach SDK callers as the documented codes: expired and forged tokens
/// (and a login with the device secret when the token expired), non-members, bodies over
/// the limit, unknown recipients; rate limiting is waited out by the SDK's retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_surfaces_the_documented_errors() -> anyhow::Result<()> {
    let cluster = LocalCluster::start(ClusterOptions {
        extra_args: [
            "--rate-limit-per-s",
            "5",
            "--rate-limit-burst",
            "5",
            "--max-payload-bytes",
            "1024",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterOptions::default()
    })
    .await?;
    let eps = cluster.client_endpoints();
    let alice = register(&cluster, "alice").await?;
    register(&cluster, "bob").await?;
    register(&cluster, "carol").await?;
    let server_code = |e: &ClientError| e.code();

    let key = parley_node::tokens::TokenAuthority::from_pem_file(
        &cluster.token_key_path(),
        Duration::from_secs(60),
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let (expired, _) = key.issue_at("alice", "phone", now - 100, now - 10)?;
    let no_secret = Credentials {
        token: expired.clone(),
        device_secret: String::new(),
        ..alice.clone()
    };
    let e = Client::connect(ClientConfig::new(eps.clone()), no_secret)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("connected with an expired token"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::TokenExpired), "{e}");
    let other = parley_node::tokens::TokenAuthority::from_pem(
        &parley_node::tokens::new_key_pem()?,
        Duration::from_secs(60),
    )
    .map_err(anyhow::Error::msg)?;
    let (forged, _) = other.issue("alice", "phone")?;
    let e = Client::connect(
        ClientConfig::new(eps.clone()),
        Credentials {
            token: forged,
            device_secret: String::new(),
            ..alice.clone()
        },
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("connected with a forged token"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::TokenInvalid), "{e}");
    let e = Client::connect(
        ClientConfig::new(eps.clone()),
        Credentials {
            token: String::new(),
            device_secret: String::new(),
            ..alice.clone()
        },
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("connected without credentials"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::Unauthenticated), "{e}");
    let e = Client::connect(
        ClientConfig::new(eps.clone()),
        Credentials {
            token: expired.clone(),
            device_secret: "0".repeat(64),
            ..alice.clone()
        },
    )
    .await
    .err()
    .ok_or_else(|| anyhow::anyhow!("logged in with a wrong secret"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::BadCredentials), "{e}");
    // An expired token with the device secret: the SDK logs in again by itself.
    let (client, inbox) = connect(
        eps.clone(),
        Credentials {
            token: expired.clone(),
            ..alice.clone()
        },
        true,
    )
    .await?;
    inbox.wait_sync(1).await?;
    assert_ne!(client.credentials().token, expired, "token not refreshed");

    for e in [
        client.fetch("dm:bob:carol", 1, 10).await.err(),
        client.mark_read("dm:bob:carol", 1).await.err(),
        client.ack("dm:carol:alice", 1).await.err(),
    ] {
        let e = e.ok_or_else(|| anyhow::anyhow!("a non-member was served"))?;
        assert_eq!(server_code(&e), Some(ErrorCode::NotMember), "{e}");
    }
    let started = Instant::now();
    let e = client
        .send("bob", vec![7u8; 1025])
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an oversized body was accepted"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::PayloadTooLarge), "{e}");
    assert!(!e.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a final error was retried"
    );
    let e = client
        .send_text("bob", &"x".repeat(parley_client::MAX_TEXT_CHARS + 1))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("an over-long text was sent"))?;
    assert!(matches!(e, ClientError::TextTooLong { .. }), "{e}");
    let e = client
        .send("ghost", b"x".to_vec())
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("sent to an unknown user"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::UnknownUser), "{e}");
    let e = client
        .send("alice", b"x".to_vec())
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("sent to oneself"))?;
    assert_eq!(server_code(&e), Some(ErrorCode::InvalidArgument), "{e}");
    // Nothing refused was stored.
    assert!(history(&client, "dm:alice:bob").await?.is_empty());

    // 5 per second: 12 sends need the SDK to wait out RATE_LIMITED; all succeed, in order.
    for i in 1..=12u64 {
        let sent = client
            .send_with_id("bob", &format!("r{i}"), vec![1])
            .await?;
        assert_eq!((sent.seq, sent.duplicate), (i, false));
    }
    let limited = metric_sum(
        &cluster,
        "parley_client_errors_total{code=\"RATE_LIMITED\"}",
    )
    .await?;
    assert!(limited >= 1.0, "no rate-limit rejection counted");
    client.close().await;
    Ok(())
}
