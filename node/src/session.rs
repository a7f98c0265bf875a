//! One authenticated client session on the user's home node: reads requests, answers
//! each exactly once, and writes events in per-conversation order.
//!
//! Three tasks share a connection: the reader (this function's loop) decodes frames
//! and runs each request as its own task (at most [`MAX_IN_FLIGHT`] at once, so a
//! client that pipelines cannot grow memory without bound), except that sends to the
//! same conversation wait for one another in arrival order ([`SendOrder`]), so
//! pipelined sends are committed in the order the client sent them; the writer drains the
//! bounded outgoing queue into the socket and pings; the delivery task turns mailbox
//! events into frames. The delivery task keeps, per conversation, the last seq written
//! to this device: an event at or below it is dropped, and a gap (events can arrive out
//! of order from concurrent senders) is filled from the log first, so the device sees
//! every conversation in seq order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::{SinkExt, StreamExt};
use parley_proto::v1::{
    client_frame, event, reply, server_frame, Authenticated, ClientFrame, ErrorCode, Event,
    Message, PrivacySet, Receipt, ServerFrame, SyncComplete,
};
use prost::Message as _;
use tokio::sync::{oneshot, Semaphore};

use crate::client_error::ClientError;
use crate::delivery::{CloseReason, Closer, Mail};
use crate::gateway::{close_code, error_frame, is_oversized, reply_frame, stopped, Gateway};
use crate::messaging::dm_conversation;

/// Requests of one connection processed at once; further frames wait unread.
pub const MAX_IN_FLIGHT: usize = 64;
/// Entries read per page when a sync or a gap fill reads the log.
const PAGE: u32 = 1_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Who is on the other end of an authenticated connection.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: String,
    pub device: String,
}

/// Runs an authenticated session until the client leaves, misbehaves or the node stops.
pub async fn run(gw: Arc<Gateway>, socket: WebSocket, who: Identity, auth_request_id: u64) {
    let config = &gw.config;
    let (sink, mut stream) = socket.split();
    // flume's queues allocate as messages arrive, so an idle session's two queues cost a
    // few hundred bytes (tokio's preallocate a block of 32 slots each).
    let (out_tx, out_rx) = flume::bounded::<WsMessage>(config.ws_send_queue);
    let (mail_tx, mail_rx) = flume::bounded::<Mail>(config.ws_send_queue);
    let closer = Arc::new(Closer::default());
    let _guard = gw
        .delivery
        .attach(&who.user, &who.device, mail_tx.clone(), closer.clone());
    let authenticated = reply_frame(
        auth_request_id,
        reply::Result::Authenticated(Authenticated {
            user_id: who.user.clone(),
            device_id: who.device.clone(),
            home_node: gw.router.node_id(),
            server_time_ms: now_ms(),
        }),
    );
    if out_tx.send_async(authenticated).await.is_err() {
        return;
    }
    let writer = tokio::spawn(write_loop(
        sink,
        out_rx,
        Duration::from_millis(config.ws_ping_interval_ms),
    ));
    let deliverer = tokio::spawn(
        DeliveryTask {
            gw: gw.clone(),
            who: who.clone(),
            out: out_tx.clone(),
            last_written: HashMap::new(),
        }
        .run(mail_rx, closer.clone()),
    );

    let idle = Duration::from_millis(config.ws_idle_timeout_ms);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let send_order = Arc::new(SendOrder::default());
    let mut shutdown = gw.shutdown.clone();
    let close: Option<(u16, &str, Option<ClientError>)> = loop {
        let next = tokio::select! {
            r = tokio::time::timeout(idle, stream.next()) => r,
            reason = closer.closed() => break Some(match reason {
                CloseReason::SlowConsumer => (close_code::POLICY, "slow consumer", None),
                CloseReason::ShuttingDown => (close_code::GOING_AWAY, "node shutting down",
                    Some(ClientError::new(ErrorCode::GoingAway, "node shutting down; reconnect"))),
            }),
            _ = stopped(&mut shutdown) => break Some((close_code::GOING_AWAY, "node shutting down",
                Some(ClientError::new(ErrorCode::GoingAway, "node shutting down; reconnect")))),
        };
        let msg = match next {
            Err(_) => break Some((close_code::GOING_AWAY, "idle timeout", None)),
            Ok(Some(Err(e))) if is_oversized(&e) => {
                break Some((close_code::TOO_BIG, "frame too large", None))
            }
            Ok(None) | Ok(Some(Err(_))) => break None,
            Ok(Some(Ok(m))) => m,
        };
        let bytes = match msg {
            WsMessage::Binary(b) => b,
            WsMessage::Close(_) => break None,
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            WsMessage::Text(_) => {
                let e = ClientError::new(ErrorCode::MalformedFrame, "text frames are not accepted");
                gw.count_error(&e);
                if out_tx.send_async(error_frame(0, &e)).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        let frame = match gw.decode(&bytes) {
            Ok(f) => f,
            Err((id, e)) => {
                if out_tx.send_async(error_frame(id, &e)).await.is_err() {
                    break None;
                }
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break None;
        };
        // Taken here, in arrival order, so the spawned tasks start sends in that order.
        let turn = match &frame.body {
            Some(client_frame::Body::Send(s)) => {
                Some(send_order.queue(dm_conversation(&who.user, &s.recipient)))
            }
            _ => None,
        };
        let (gw, who, out, mail) = (gw.clone(), who.clone(), out_tx.clone(), mail_tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let answer = match turn {
                Some(mut turn) => {
                    turn.wait().await;
                    let answer = handle(&gw, &who, frame, &mail).await;
                    drop(turn);
                    answer
                }
                None => handle(&gw, &who, frame, &mail).await,
            };
            if let Some(answer) = answer {
                let _ = out.send_async(answer).await;
            }
        });
    };
    if let Some((code, reason, err)) = close {
        if let Some(e) = err {
            let _ = out_tx.try_send(error_frame(0, &e));
        }
        let _ = out_tx.try_send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })));
    }
    deliverer.abort();
    drop(out_tx);
    drop(mail_tx);
    // Let the writer flush what is queued (the close frame last), but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Orders the sends of one connection per conversation: a send starts only once the
/// previous send to the same conversation on this connection has been answered (its
/// entry committed or refused), so sends pipelined without waiting for `Sent` are
/// committed in the order they arrived (FR1). Sends to other conversations and all
/// other requests stay concurrent.
#[derive(Default)]
struct SendOrder {
    tails: Mutex<Tails>,
}

#[derive(Default)]
struct Tails {
    next_ticket: u64,
    /// Per conversation with a send queued or running: the latest send's ticket and a
    /// receiver that resolves when it is done.
    latest: HashMap<String, (u64, oneshot::Receiver<()>)>,
}

/// One send's place in its conversation's queue; dropping it lets the next one start.
struct Turn {
    order: Arc<SendOrder>,
    conversation: String,
    ticket: u64,
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl SendOrder {
    /// Queues a send to `conversation` behind the ones queued before it.
    fn queue(self: &Arc<Self>, conversation: String) -> Turn {
        let (done, finished) = oneshot::channel();
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        tails.next_ticket += 1;
        let ticket = tails.next_ticket;
        let previous = tails
            .latest
            .insert(conversation.clone(), (ticket, finished))
            .map(|(_, rx)| rx);
        Turn {
            order: self.clone(),
            conversation,
            ticket,
            previous,
            done: Some(done),
        }
    }

    /// Conversations with a send queued or running.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.tails
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latest
            .len()
    }
}

impl Turn {
    /// Waits until the previous send to the conversation is done (or was dropped).
    async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = previous.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        let mut tails = self.order.tails.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the conversation unless a later send queued behind this one.
        if tails
            .latest
            .get(&self.conversation)
            .is_some_and(|(t, _)| *t == self.ticket)
        {
            tails.latest.remove(&self.conversation);
        }
    }
}

/// Drains the outgoing queue into the socket and pings the client.
async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, WsMessage>,
    out: flume::Receiver<WsMessage>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    loop {
        let msg = tokio::select! {
            m = out.recv_async() => match m {
                Ok(m) => m,
                Err(_) => break,
            },
            _ = ping.tick() => WsMessage::Ping(Default::default()),
        };
        let is_close = matches!(msg, WsMessage::Close(_));
        if sink.send(msg).await.is_err() || is_close {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Answers one request; `None` when the answer comes later (sync).
async fn handle(
    gw: &Gateway,
    who: &Identity,
    frame: ClientFrame,
    mail: &flume::Sender<Mail>,
) -> Option<WsMessage> {
    let id = frame.request_id;
    let Some(body) = frame.body else {
        return Some(error_frame(
            id,
            &ClientError::new(ErrorCode::MalformedFrame, "frame has no body"),
        ));
    };
    let result: Result<reply::Result, ClientError> = match body {
        client_frame::Body::Register(_)
        | client_frame::Body::Login(_)
        | client_frame::Body::Authenticate(_) => Err(ClientError::new(
            ErrorCode::AlreadyAuthenticated,
            "this connection is already authenticated",
        )),
        client_frame::Body::Send(s) => gw
            .messaging
            .send(&who.user, s)
            .await
            .map(reply::Result::Sent),
        client_frame::Body::Ack(a) => gw
            .messaging
            .set_cursor(
                &who.user,
                &who.device,
                &a.conversation_id,
                a.delivered_seq,
                0,
            )
            .await
            .map(reply::Result::CursorSet),
        client_frame::Body::MarkRead(r) => gw
            .messaging
            .set_cursor(
                &who.user,
                &who.device,
                &r.conversation_id,
                r.read_seq,
                r.read_seq,
            )
            .await
            .map(reply::Result::CursorSet),
        client_frame::Body::Fetch(f) => gw
            .messaging
            .fetch(&who.user, &f.conversation_id, f.from_seq, f.limit)
            .await
            .map(reply::Result::History),
        client_frame::Body::SetPrivacy(p) => gw
            .accounts
            .set_privacy(&who.user, p.read_receipts)
            .await
            .map(|()| {
                reply::Result::PrivacySet(PrivacySet {
                    read_receipts: p.read_receipts,
                })
            }),
        client_frame::Body::Ping(p) => Ok(reply::Result::Pong(parley_proto::v1::Pong {
            nonce: p.nonce,
            server_time_ms: now_ms(),
        })),
        client_frame::Body::Sync(_) => {
            // Serialized with pushes by the delivery task, which answers it.
            if mail
                .send_async(Mail::Sync { request_id: id })
                .await
                .is_err()
            {
                return None;
            }
            return None;
        }
    };
    Some(match result {
        Ok(r) => reply_frame(id, r),
        Err(e) => {
            gw.count_error(&e);
            error_frame(id, &e)
        }
    })
}

/// Writes events to one device in per-conversation seq order.
struct DeliveryTask {
    gw: Arc<Gateway>,
    who: Identity,
    out: flume::Sender<WsMessage>,
    /// Last seq written (or known delivered) per conversation.
    last_written: HashMap<String, u64>,
}

fn event_frame(kind: event::Kind) -> WsMessage {
    WsMessage::Binary(
        ServerFrame {
            body: Some(server_frame::Body::Event(Event { kind: Some(kind) })),
        }
        .encode_to_vec()
        .into(),
    )
}

impl DeliveryTask {
    async fn run(mut self, mail: flume::Receiver<Mail>, closer: Arc<Closer>) {
        while let Ok(m) = mail.recv_async().await {
            // Boxed: the task rests at `recv` for most of a session's life, so its own
            // allocation should not be sized for these (large, transient) futures.
            let outcome = match m {
                Mail::Events(events) => Box::pin(self.deliver(events)).await,
                Mail::Sync { request_id } => Box::pin(self.sync(request_id)).await,
            };
            if let Err(e) = outcome {
                // The log could not be read to keep order (cluster unavailable): close,
                // and let the client reconnect and sync rather than skip anything.
                tracing::warn!(user = %self.who.user, error = %e, "closing session: delivery failed");
                closer.close(CloseReason::SlowConsumer);
                return;
            }
        }
    }

    async fn write(&self, frame: WsMessage) -> Result<(), ClientError> {
        self.out
            .send_async(frame)
            .await
            .map_err(|_| ClientError::new(ErrorCode::GoingAway, "connection closed"))
    }

    async fn deliver(&mut self, events: Vec<Event>) -> Result<(), ClientError> {
        for ev in events {
            match ev.kind {
                Some(event::Kind::Message(m)) => self.deliver_message(m).await?,
                Some(event::Kind::Receipt(r)) => {
                    let r = self.filter_receipt(r).await;
                    self.write(event_frame(event::Kind::Receipt(r))).await?;
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Blue ticks are reciprocal: a user who shares no read receipts sees none.
    async fn filter_receipt(&self, mut r: Receipt) -> Receipt {
        if r.read_seq > 0
            && !self
                .gw
                .accounts
                .read_receipts(&self.who.user)
                .await
                .unwrap_or(false)
        {
            r.read_seq = 0;
        }
        r
    }

    async fn deliver_message(&mut self, m: Message) -> Result<(), ClientError> {
        let last = match self.last_written.get(&m.conversation_id) {
            Some(l) => *l,
            None => {
                let peer = m.sender.clone();
                self.gw
                    .messaging
                    .conversation_sync(&m.conversation_id, &peer, &self.who.user, &self.who.device)
                    .await?
                    .device_delivered
            }
        };
        if m.seq <= last {
            self.last_written.insert(m.conversation_id, last);
            return Ok(());
        }
        let conversation = m.conversation_id.clone();
        if m.seq > last + 1 {
            self.write_range(&conversation, last + 1, m.seq - 1).await?;
        }
        if m.sender != self.who.user {
            self.write(event_frame(event::Kind::Message(m.clone())))
                .await?;
        }
        self.last_written.insert(conversation, m.seq);
        Ok(())
    }

    /// Writes messages `from..=to` of a conversation from the log (others' only).
    async fn write_range(
        &mut self,
        conversation: &str,
        from: u64,
        to: u64,
    ) -> Result<u32, ClientError> {
        let mut next = from;
        let mut written = 0;
        while next <= to {
            let limit = PAGE.min((to - next + 1) as u32);
            let (page, _) = self.gw.messaging.read(conversation, next, limit).await?;
            let Some(last) = page.last().map(|m| m.seq) else {
                break;
            };
            for m in page {
                if m.sender != self.who.user {
                    self.write(event_frame(event::Kind::Message(m))).await?;
                    written += 1;
                }
            }
            next = last + 1;
        }
        Ok(written)
    }

    async fn sync(&mut self, request_id: u64) -> Result<(), ClientError> {
        match self.sync_inner().await {
            Ok(done) => {
                self.gw.delivery.synced(&self.who.user);
                self.gw
                    .metrics
                    .sync_messages_total
                    .inc_by(u64::from(done.messages));
                self.write(reply_frame(request_id, reply::Result::SyncComplete(done)))
                    .await
            }
            Err(e) if e.code == ErrorCode::GoingAway => Err(e),
            Err(e) => {
                self.gw.count_error(&e);
                self.write(error_frame(request_id, &e)).await
            }
        }
    }

    async fn sync_inner(&mut self) -> Result<SyncComplete, ClientError> {
        let (user, device) = (self.who.user.clone(), self.who.device.clone());
        let mut done = SyncComplete::default();
        let shares = self.gw.accounts.read_receipts(&user).await?;
        for (conversation, peer) in self.gw.messaging.conversations(&user).await? {
            let state = self
                .gw
                .messaging
                .conversation_sync(&conversation, &peer, &user, &device)
                .await?;
            let already = self
                .last_written
                .get(&conversation)
                .copied()
                .unwrap_or(0)
                .max(state.device_delivered);
            if state.last_seq > already {
                let n = self
                    .write_range(&conversation, already + 1, state.last_seq)
                    .await?;
                if n > 0 {
                    done.conversations += 1;
                    done.messages += n;
                }
            }
            let last = self.last_written.entry(conversation.clone()).or_default();
            *last = (*last).max(state.last_seq);
            let peer_shares = self.gw.accounts.read_receipts_fresh(&peer).await?;
            let receipt = Receipt {
                conversation_id: conversation,
                user_id: peer,
                delivered_seq: state.peer_cursors.delivered,
                read_seq: if shares && peer_shares {
                    state.peer_cursors.read
                } else {
                    0
                },
            };
            self.write(event_frame(event::Kind::Receipt(receipt)))
                .await?;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_to_one_conversation_run_in_queue_order() {
        let order = Arc::new(SendOrder::default());
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let mut turn = order.queue("dm:a:b".into());
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                turn.wait().await;
                // Later sends finish their work faster: only the queue keeps them in order.
                tokio::time::sleep(Duration::from_micros(u64::from(50 - i) * 20)).await;
                log.lock().unwrap_or_else(|p| p.into_inner()).push(i);
            }));
        }
        // Tasks are awaited in reverse so none is polled in queue order by accident.
        for t in tasks.into_iter().rev() {
            t.await.expect("task");
        }
        let got = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(order.busy(), 0, "finished conversations are forgotten");
    }

    #[tokio::test]
    async fn other_conversations_do_not_wait_and_a_dropped_turn_releases_the_next() {
        let order = Arc::new(SendOrder::default());
        let first = order.queue("dm:a:b".into());
        let mut other = order.queue("dm:a:c".into());
        tokio::time::timeout(Duration::from_secs(1), other.wait())
            .await
            .expect("a send to another conversation waited");
        let mut second = order.queue("dm:a:b".into());
        let (started_tx, mut started) = oneshot::channel();
        let task = tokio::spawn(async move {
            second.wait().await;
            let _ = started_tx.send(());
            second
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            started.try_recv().is_err(),
            "the second send did not wait for the first"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the second send was not released")
            .expect("task");
        assert_eq!(order.busy(), 2);
        drop(other);
        assert_eq!(order.busy(), 1);
        drop(second);
        assert_eq!(order.busy(), 0);
    }
}
