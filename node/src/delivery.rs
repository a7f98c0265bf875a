//! Delivery: the sessions of the users homed on this node, and getting events to them.
//!
//! Every open, authenticated connection registers a session here with a bounded
//! mailbox. Events for a user (a committed message, a receipt) are pushed to the user's
//! home node ([`crate::router`]) with the `Delivery.Push` RPC, or queued directly when
//! this node is the home. A session whose mailbox is full is closed as a slow consumer:
//! memory stays bounded, and nothing is lost because a message stays pending until the
//! device acknowledges it and the next `Sync` sends it again.
//!
//! The `parley_pending_offline_messages` gauge counts, per node, the messages pushed
//! here for users homed here who had no open session, until one of their devices syncs
//! here. It is approximate by design: a push that reaches no node is not counted, and a
//! count made while nodes disagreed about a user's home lingers until the user syncs on
//! that node (or it restarts).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_proto::node::v1::delivery_client::DeliveryClient;
use parley_proto::node::v1::delivery_server::Delivery as DeliveryRpc;
use parley_proto::node::v1::{ProbeReply, ProbeRequest, PushReply, PushRequest};
use parley_proto::v1::{event, Event};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::router::Router;

/// How long a push to a peer may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Offline users whose pending messages are counted; beyond, new ones are not.
const PENDING_USERS_LIMIT: usize = 1_000_000;

/// What a session's delivery task is asked to do.
#[derive(Debug)]
pub enum Mail {
    /// Events to write to the device, in order.
    Events(Vec<Event>),
    /// Run a sync and answer request `request_id` when done.
    Sync { request_id: u64 },
}

/// Why the server closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    SlowConsumer,
    ShuttingDown,
}

/// Lets others close a session.
#[derive(Default)]
pub struct Closer {
    notify: Notify,
    reason: Mutex<Option<CloseReason>>,
}

impl Closer {
    pub fn close(&self, reason: CloseReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.notify.notify_one();
    }

    /// Resolves once [`Closer::close`] was called, with the first reason given.
    pub async fn closed(&self) -> CloseReason {
        self.notify.notified().await;
        self.reason
            .lock()
            .ok()
            .and_then(|r| *r)
            .unwrap_or(CloseReason::ShuttingDown)
    }
}

struct SessionHandle {
    id: u64,
    device: String,
    mailbox: flume::Sender<Mail>,
    closer: Arc<Closer>,
}

/// The sessions held by this node and the way to reach any user's sessions.
pub struct Delivery {
    cluster: Arc<Cluster>,
    router: Arc<Router>,
    sessions: Mutex<HashMap<String, Vec<SessionHandle>>>,
    next_id: AtomicU64,
    /// Messages pushed to offline users homed here, per user, until they sync.
    pending_offline: Mutex<HashMap<String, u64>>,
}

/// Unregisters a session when dropped.
pub struct SessionGuard {
    delivery: Arc<Delivery>,
    user: String,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.delivery.detach(&self.user, self.id);
    }
}

impl Delivery {
    pub fn new(cluster: Arc<Cluster>, router: Arc<Router>) -> Arc<Delivery> {
        Arc::new(Delivery {
            cluster,
            router,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            pending_offline: Mutex::new(HashMap::new()),
        })
    }

    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Registers a session of `user`'s `device`.
    pub fn attach(
        self: &Arc<Self>,
        user: &str,
        device: &str,
        mailbox: flume::Sender<Mail>,
        closer: Arc<Closer>,
    ) -> SessionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.sessions.lock() {
            s.entry(user.into()).or_default().push(SessionHandle {
                id,
                device: device.into(),
                mailbox,
                closer,
            });
        }
        self.cluster.metrics.sessions.inc();
        SessionGuard {
            delivery: self.clone(),
            user: user.into(),
            id,
        }
    }

    fn detach(&self, user: &str, id: u64) {
        if let Ok(mut s) = self.sessions.lock() {
            if let Some(list) = s.get_mut(user) {
                list.retain(|h| h.id != id);
                if list.is_empty() {
                    s.remove(user);
                }
            }
        }
        self.cluster.metrics.sessions.dec();
    }

    /// Queues events on every local session of `user` except `except_device`'s; returns
    /// how many sessions took them. A session with a full mailbox is closed.
    pub fn deliver_local(&self, user: &str, events: &[Event], except_device: &str) -> u32 {
        let Ok(s) = self.sessions.lock() else {
            return 0;
        };
        let Some(list) = s.get(user) else {
            drop(s);
            self.count_pending(user, events);
            return 0;
        };
        let mut n = 0;
        for h in list.iter().filter(|h| h.device != except_device) {
            match h.mailbox.try_send(Mail::Events(events.to_vec())) {
                Ok(()) => n += 1,
                Err(flume::TrySendError::Full(_)) => {
                    self.cluster.metrics.slow_consumers_total.inc();
                    h.closer.close(CloseReason::SlowConsumer);
                }
                Err(flume::TrySendError::Disconnected(_)) => {}
            }
        }
        n
    }

    /// Counts the messages among `events` as pending for `user`, who has no session.
    fn count_pending(&self, user: &str, events: &[Event]) {
        let messages = events
            .iter()
            .filter(|e| matches!(e.kind, Some(event::Kind::Message(_))))
            .count() as u64;
        if messages == 0 {
            return;
        }
        let Ok(mut pending) = self.pending_offline.lock() else {
            return;
        };
        if pending.len() >= PENDING_USERS_LIMIT && !pending.contains_key(user) {
            return;
        }
        *pending.entry(user.into()).or_default() += messages;
        self.cluster
            .metrics
            .pending_offline_messages
            .add(messages as i64);
    }

    /// A device of `user` synced here: what was pending for the user has been handed over.
    pub fn synced(&self, user: &str) {
        let Ok(mut pending) = self.pending_offline.lock() else {
            return;
        };
        if let Some(n) = pending.remove(user) {
            self.cluster.metrics.pending_offline_messages.sub(n as i64);
        }
    }

    /// Delivers events to `user`'s sessions wherever they are (the user's home node,
    /// skipping candidates that cannot be reached). Returns how many sessions took them;
    /// 0 means the user is offline and the events wait for the next sync.
    pub async fn push(&self, user: &str, events: Vec<Event>, except_device: &str) -> u32 {
        for home in self.router.ranked(user).into_iter().take(3) {
            if home.node == self.cluster.node_id() {
                return self.deliver_local(user, &events, except_device);
            }
            let Ok(channel) = self.cluster.channel_to(home.node) else {
                self.router.mark_down(home.node);
                continue;
            };
            let mut req = Request::new(PushRequest {
                user_id: user.into(),
                events: events.clone(),
                except_device: except_device.into(),
            });
            req.set_timeout(PUSH_TIMEOUT);
            match DeliveryClient::new(channel).push(req).await {
                Ok(reply) => return reply.into_inner().sessions,
                Err(status) => {
                    tracing::debug!(node = home.node, %status, "push failed; trying the next candidate");
                    self.router.mark_down(home.node);
                }
            }
        }
        0
    }

    /// Closes every session (the node is stopping); returns how many there were.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let Ok(s) = self.sessions.lock() else {
            return 0;
        };
        let mut n = 0;
        for h in s.values().flatten() {
            h.closer.close(reason);
            n += 1;
        }
        n
    }

    /// Open sessions on this node.
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .map(|s| s.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

/// The `Delivery` gRPC service: pushes from peers and the router's probes.
pub struct DeliveryService {
    pub delivery: Arc<Delivery>,
}

#[tonic::async_trait]
impl DeliveryRpc for DeliveryService {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushReply>, Status> {
        let req = request.into_inner();
        let sessions = self
            .delivery
            .deliver_local(&req.user_id, &req.events, &req.except_device);
        Ok(Response::new(PushReply { sessions }))
    }

    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeReply>, Status> {
        Ok(Response::new(ProbeReply {
            node_id: self.delivery.cluster.node_id(),
            draining: self.delivery.router.is_leaving(),
        }))
    }
}
