//! The background task behind a [`Client`](crate::Client): it owns the WebSocket,
//! writes queued requests, matches answers to them, forwards events, acknowledges
//! delivered messages and reconnects when the connection drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use parley_proto::v1::{client_frame, event, reply, Ack, Authenticated, ErrorCode, Sync};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::account::Credentials;
use crate::client::{ClientConfig, ClientEvent};
use crate::connection::{describe_close, Connection, WsStream};
use crate::delivery::{AckCoalescer, Admission, SeqTracker};
use crate::error::ClientError;
use crate::frame::{decode_server, encode_request, request_name, Incoming};
use crate::reconnect::{Backoff, EndpointRing};

/// How long acknowledgements of delivered messages are held to coalesce them.
pub(crate) const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// How long a graceful close waits for outstanding acknowledgements to be confirmed.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The answer to one request, as the session hands it back.
pub(crate) type Answer = Result<Option<reply::Result>, ClientError>;

/// A request queued by a [`Client`](crate::Client) method.
pub(crate) struct Command {
    /// What to send.
    pub(crate) body: client_frame::Body,
    /// Where the answer goes; dropped by the caller when it stops waiting.
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// State shared by every handle of one client and its session task.
pub(crate) struct Shared {
    /// The configuration the client was built with.
    pub(crate) config: ClientConfig,
    /// The current credentials (the token changes when the session logs in again).
    pub(crate) credentials: Mutex<Credentials>,
    /// Why the session stopped, once it has.
    pub(crate) stop_reason: Mutex<Option<String>>,
    /// Delivery acknowledgements waiting to be sent.
    pub(crate) acks: AckQueue,
    /// Set to true to ask the session to close.
    pub(crate) shutdown: watch::Sender<bool>,
    /// Set to true by the session when it has ended.
    pub(crate) done: watch::Sender<bool>,
}

/// Locks a mutex, ignoring poisoning (the data stay consistent: every critical section
/// is a plain assignment or map update).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Records why the client stopped, unless a reason is already recorded.
    pub(crate) fn set_stop_reason(&self, reason: &str) {
        lock(&self.stop_reason).get_or_insert_with(|| reason.to_owned());
    }

    /// The error for a request on a stopped client.
    pub(crate) fn closed_error(&self) -> ClientError {
        ClientError::Closed {
            reason: lock(&self.stop_reason)
                .clone()
                .unwrap_or_else(|| "the client was closed".to_owned()),
        }
    }
}

/// Acknowledgements of messages the application has received, shared between the
/// [`Events`](crate::Events) stream (which records them) and the session (which sends them).
#[derive(Default)]
pub(crate) struct AckQueue {
    state: Mutex<AckState>,
    notify: Notify,
}

#[derive(Default)]
struct AckState {
    /// What to acknowledge next.
    waiting: AckCoalescer,
    /// Highest sequence number the application has received, per conversation.
    handed: HashMap<String, u64>,
    /// Flush at once: the application has drained the event stream.
    urgent: bool,
}

impl AckQueue {
    /// The application received message `seq` of a conversation.
    pub(crate) fn handed(&self, conversation_id: &str, seq: u64) {
        let mut state = lock(&self.state);
        let handed = state.handed.entry(conversation_id.to_owned()).or_default();
        *handed = (*handed).max(seq);
        state.waiting.record(conversation_id, seq);
        drop(state);
        self.notify.notify_one();
    }

    /// The application found the event stream empty: send what is waiting now.
    pub(crate) fn idle(&self) {
        let mut state = lock(&self.state);
        if !state.waiting.is_empty() && !state.urgent {
            state.urgent = true;
            drop(state);
            self.notify.notify_one();
        }
    }

    /// A message the application already received came again (a `Sync` after a
    /// reconnect resends what was not acknowledged yet): acknowledge it again.
    fn redelivered(&self, conversation_id: &str, seq: u64) {
        let mut state = lock(&self.state);
        if state.handed.get(conversation_id).is_some_and(|&h| h >= seq) {
            state.waiting.record(conversation_id, seq);
            drop(state);
            self.notify.notify_one();
        }
    }

    /// An acknowledgement that was sent but not confirmed: send it again later.
    fn retry(&self, conversation_id: &str, seq: u64) {
        lock(&self.state).waiting.record(conversation_id, seq);
    }

    /// Whether anything is waiting.
    fn has_waiting(&self) -> bool {
        !lock(&self.state).waiting.is_empty()
    }

    /// Clears and returns the urgent flag.
    fn take_urgent(&self) -> bool {
        std::mem::take(&mut lock(&self.state).urgent)
    }

    /// Takes everything waiting.
    fn take(&self) -> Vec<(String, u64)> {
        let mut state = lock(&self.state);
        state.urgent = false;
        state.waiting.take()
    }
}

/// A request sent on the current connection and not answered yet.
enum Pending {
    /// A [`Client`](crate::Client) method waits for it.
    Caller {
        request: &'static str,
        reply: oneshot::Sender<Answer>,
    },
    /// The session's own `Sync`.
    Sync,
    /// The session's own `Ack`.
    Ack { conversation_id: String, seq: u64 },
}

/// How serving one connection ended.
enum Ended {
    /// The connection dropped: reconnect.
    Dropped(String),
    /// The application closed the client (or dropped every handle).
    Shutdown,
}

/// One thing the serve loop reacts to.
enum Step {
    Shutdown,
    Incoming(Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>),
    Command(Option<Command>),
    AckNotified,
    FlushAcks,
    Keepalive,
}

/// The background task of one client.
pub(crate) struct Session {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<ClientEvent>,
    shutdown: watch::Receiver<bool>,
    ring: EndpointRing,
    backoff: Backoff,
    next_request_id: u64,
    seqs: SeqTracker,
}

/// Marks the session as done when dropped, even by a panic.
struct DoneGuard(Arc<Shared>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.set_stop_reason("the client's background task ended");
        self.0.done.send_replace(true);
    }
}

impl Session {
    /// A session that starts on an established connection.
    pub(crate) fn new(
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<ClientEvent>,
        ring: EndpointRing,
    ) -> Self {
        let shutdown = shared.shutdown.subscribe();
        let backoff = Backoff::new(shared.config.backoff_min, shared.config.backoff_max);
        Self {
            shared,
            commands,
            events,
            shutdown,
            ring,
            backoff,
            next_request_id: 1,
            seqs: SeqTracker::default(),
        }
    }

    /// Runs until the client is closed or fails permanently, starting on `first` (a
    /// connection to the ring's current endpoint that has just authenticated).
    pub(crate) async fn run(mut self, first: (Connection, Authenticated)) {
        let _done = DoneGuard(self.shared.clone());
        let mut established = Some(first);
        loop {
            let (conn, authenticated) = match established.take() {
                Some(pair) => pair,
                None => match self.connect().await {
                    Ok(Some(pair)) => pair,
                    Ok(None) => return self.stop("closed by the application").await,
                    Err(e) if attempt_is_retryable(&e) => {
                        tracing::warn!(endpoint = self.ring.current(), error = %e, "connection attempt failed");
                        self.ring.advance();
                        if !self.pause().await {
                            return self.stop("closed by the application").await;
                        }
                        continue;
                    }
                    Err(e) => {
                        let reason = format!("cannot authenticate: {e}");
                        tracing::error!(%reason, "giving up");
                        return self.stop(&reason).await;
                    }
                },
            };
            self.backoff.reset();
            let endpoint = conn.endpoint.clone();
            tracing::info!(%endpoint, home_node = authenticated.home_node, "connected");
            self.emit(ClientEvent::Connected {
                home_node: authenticated.home_node,
                node_endpoint: endpoint.clone(),
            })
            .await;
            match self.serve(conn).await {
                Ended::Shutdown => return self.stop("closed by the application").await,
                Ended::Dropped(reason) => {
                    tracing::warn!(%endpoint, %reason, "disconnected; reconnecting");
                    self.emit(ClientEvent::Disconnected { reason }).await;
                    self.ring.advance();
                    if !self.pause().await {
                        return self.stop("closed by the application").await;
                    }
                }
            }
        }
    }

    /// Records the stop reason and fails every queued request.
    async fn stop(&mut self, reason: &str) {
        self.shared.set_stop_reason(reason);
        self.commands.close();
        while let Some(command) = self.commands.recv().await {
            let _ = command.reply.send(Err(self.shared.closed_error()));
        }
    }

    /// Waits out the backoff delay; false if the client was closed meanwhile.
    async fn pause(&mut self) -> bool {
        let delay = self.backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = self.shutdown.wait_for(|s| *s) => false,
        }
    }

    /// One connection attempt to the ring's current endpoint; `None` if the client was
    /// closed meanwhile.
    async fn connect(&mut self) -> Result<Option<(Connection, Authenticated)>, ClientError> {
        let endpoint = self.ring.current().to_owned();
        let attempt = establish(&self.shared, &endpoint, self.next_request_id);
        tokio::select! {
            result = attempt => result.map(Some),
            _ = self.shutdown.wait_for(|s| *s) => Ok(None),
        }
    }

    /// Hands an event to the application, waiting for room in the event buffer (unless
    /// the client is being closed). Events nobody listens to are dropped.
    async fn emit(&mut self, event: ClientEvent) {
        tokio::select! {
            _ = self.events.send(event) => {}
            _ = self.shutdown.wait_for(|s| *s) => {}
        }
    }

    /// Serves one authenticated connection until it drops or the client closes.
    async fn serve(&mut self, conn: Connection) -> Ended {
        let Connection {
            ws,
            endpoint,
            next_request_id,
            early_events,
        } = conn;
        self.next_request_id = next_request_id;
        let (mut sink, mut stream) = ws.split();
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let config = self.shared.config.clone();

        let result = async {
            for kind in early_events {
                self.on_event(kind).await;
            }
            let sync = client_frame::Body::Sync(Sync {});
            self.write(&mut sink, &mut pending, sync, Pending::Sync)
                .await?;
            let mut ack_deadline = self.shared.acks.has_waiting().then(Instant::now);
            let mut keepalive = tokio::time::interval_at(
                Instant::now() + config.keepalive_interval,
                config.keepalive_interval,
            );
            keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_heard = Instant::now();
            loop {
                let flush_at = ack_deadline.unwrap_or_else(Instant::now);
                let step = tokio::select! {
                    biased;
                    _ = self.shutdown.wait_for(|s| *s) => Step::Shutdown,
                    message = stream.next() => Step::Incoming(message),
                    command = self.commands.recv() => Step::Command(command),
                    _ = self.shared.acks.notify.notified() => Step::AckNotified,
                    _ = sleep_until(flush_at), if ack_deadline.is_some() => Step::FlushAcks,
                    _ = keepalive.tick() => Step::Keepalive,
                };
                match step {
                    Step::Shutdown | Step::Command(None) => return Ok(()),
                    Step::Incoming(message) => {
                        last_heard = Instant::now();
                        self.on_message(message, &mut pending).await?;
                    }
                    Step::Command(Some(command)) => {
                        if command.reply.is_closed() {
                            continue; // The caller gave up while it was queued.
                        }
                        let request = request_name(&command.body);
                        let waiter = Pending::Caller {
                            request,
                            reply: command.reply,
                        };
                        self.write(&mut sink, &mut pending, command.body, waiter)
                            .await?;
                    }
                    Step::AckNotified => {
                        if self.shared.acks.take_urgent() {
                            ack_deadline = Some(Instant::now());
                        } else if ack_deadline.is_none() {
                            ack_deadline = Some(Instant::now() + ACK_FLUSH_INTERVAL);
                        }
                    }
                    Step::FlushAcks => {
                        ack_deadline = None;
                        self.flush_acks(&mut sink, &mut pending).await?;
                    }
                    Step::Keepalive => {
                        let silent = last_heard.elapsed();
                        if silent >= config.idle_timeout {
                            return Err(format!("nothing heard from the server for {silent:?}"));
                        }
                        let ping = WsMessage::Ping(Vec::new().into());
                        write_message(&mut sink, ping, config.request_timeout).await?;
                    }
                }
            }
        }
        .await;

        match result {
            Ok(()) => {
                self.close_gracefully(&mut sink, &mut stream, &mut pending)
                    .await;
                for (_, waiter) in pending.drain() {
                    if let Pending::Caller { reply, .. } = waiter {
                        let _ = reply.send(Err(self.shared.closed_error()));
                    }
                }
                Ended::Shutdown
            }
            Err(reason) => {
                let reason = format!("{endpoint}: {reason}");
                for (_, waiter) in pending.drain() {
                    match waiter {
                        Pending::Caller { request, reply } => {
                            let _ = reply.send(Err(ClientError::Disconnected {
                                request,
                                reason: reason.clone(),
                            }));
                        }
                        Pending::Ack {
                            conversation_id,
                            seq,
                        } => self.shared.acks.retry(&conversation_id, seq),
                        Pending::Sync => {}
                    }
                }
                Ended::Dropped(reason)
            }
        }
    }

    /// Sends what is waiting to be acknowledged, waits (briefly) for the confirmations,
    /// then closes the WebSocket.
    async fn close_gracefully(
        &mut self,
        sink: &mut SplitSink<WsStream, WsMessage>,
        stream: &mut SplitStream<WsStream>,
        pending: &mut HashMap<u64, Pending>,
    ) {
        let grace = self.shared.config.request_timeout.min(CLOSE_GRACE);
        if self.flush_acks(sink, pending).await.is_ok() {
            let deadline = Instant::now() + grace;
            while pending.values().any(|p| matches!(p, Pending::Ack { .. })) {
                let Ok(Some(Ok(WsMessage::Binary(bytes)))) =
                    tokio::time::timeout_at(deadline, stream.next()).await
                else {
                    break;
                };
                match decode_server(&bytes) {
                    Ok(Incoming::Reply { request_id, .. }) => {
                        pending.remove(&request_id);
                    }
                    Ok(Incoming::Error(error)) => {
                        pending.remove(&error.request_id);
                    }
                    _ => {}
                }
            }
        }
        let _ = tokio::time::timeout(grace, sink.close()).await;
    }

    /// Writes one request and records it as pending.
    async fn write(
        &mut self,
        sink: &mut SplitSink<WsStream, WsMessage>,
        pending: &mut HashMap<u64, Pending>,
        body: client_frame::Body,
        waiter: Pending,
    ) -> Result<(), String> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let message = WsMessage::binary(encode_request(request_id, body));
        pending.insert(request_id, waiter);
        write_message(sink, message, self.shared.config.request_timeout).await
    }

    /// Sends an `Ack` per conversation with something waiting.
    async fn flush_acks(
        &mut self,
        sink: &mut SplitSink<WsStream, WsMessage>,
        pending: &mut HashMap<u64, Pending>,
    ) -> Result<(), String> {
        for (conversation_id, seq) in self.shared.acks.take() {
            let body = client_frame::Body::Ack(Ack {
                conversation_id: conversation_id.clone(),
                delivered_seq: seq,
            });
            let waiter = Pending::Ack {
                conversation_id,
                seq,
            };
            self.write(sink, pending, body, waiter).await?;
        }
        Ok(())
    }

    /// Handles one WebSocket message; `Err` with a reason if the connection is over.
    async fn on_message(
        &mut self,
        message: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
        pending: &mut HashMap<u64, Pending>,
    ) -> Result<(), String> {
        let bytes = match message {
            None => return Err("the connection ended".to_owned()),
            Some(Err(e)) => return Err(format!("WebSocket error: {e}")),
            Some(Ok(WsMessage::Close(frame))) => return Err(describe_close(frame.as_ref())),
            Some(Ok(WsMessage::Binary(bytes))) => bytes,
            Some(Ok(WsMessage::Text(_))) => {
                tracing::warn!("ignoring a text frame from the server");
                return Ok(());
            }
            // Pings are answered by the WebSocket library; any of these shows the
            // connection is alive, which the caller has noted.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                return Ok(())
            }
        };
        let incoming = match decode_server(&bytes) {
            Ok(incoming) => incoming,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an undecodable frame from the server");
                return Ok(());
            }
        };
        match incoming {
            Incoming::Reply { request_id, result } => match pending.remove(&request_id) {
                Some(Pending::Caller { reply, .. }) => {
                    let _ = reply.send(Ok(result));
                }
                Some(Pending::Sync) => match result {
                    Some(reply::Result::SyncComplete(done)) => {
                        tracing::debug!(
                            conversations = done.conversations,
                            messages = done.messages,
                            "sync complete"
                        );
                        self.emit(ClientEvent::SyncComplete {
                            conversations: done.conversations,
                            messages: done.messages,
                        })
                        .await;
                    }
                    other => {
                        return Err(format!(
                            "unexpected reply to Sync: {}",
                            crate::frame::result_name(&other)
                        ))
                    }
                },
                Some(Pending::Ack { .. }) => {}
                None => tracing::debug!(request_id, "reply to an unknown request"),
            },
            Incoming::Error(error) => {
                let code = ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified);
                if code == ErrorCode::GoingAway {
                    return Err(format!("the server is going away: {}", error.message));
                }
                match pending.remove(&error.request_id) {
                    Some(Pending::Caller { reply, .. }) => {
                        let _ = reply.send(Err(ClientError::from_frame(&error)));
                    }
                    Some(Pending::Sync) => {
                        return Err(format!("Sync failed: {}", ClientError::from_frame(&error)))
                    }
                    Some(Pending::Ack {
                        conversation_id,
                        seq,
                    }) => {
                        let err = ClientError::from_frame(&error);
                        tracing::warn!(%conversation_id, seq, error = %err, "acknowledgement refused");
                        if err.is_retryable() {
                            self.shared.acks.retry(&conversation_id, seq);
                        }
                    }
                    None => tracing::warn!(
                        request_id = error.request_id,
                        code = code.as_str_name(),
                        message = %error.message,
                        "error from the server"
                    ),
                }
            }
            Incoming::Event(kind) => self.on_event(kind).await,
            Incoming::Empty => {}
        }
        Ok(())
    }

    /// Handles a pushed event: messages are de-duplicated, then forwarded.
    async fn on_event(&mut self, kind: event::Kind) {
        match kind {
            event::Kind::Message(message) => {
                match self.seqs.admit(&message.conversation_id, message.seq) {
                    Admission::Deliver => {}
                    Admission::DeliverAfterGap { missing } => tracing::warn!(
                        conversation = %message.conversation_id,
                        seq = message.seq,
                        missing,
                        "gap in the message sequence"
                    ),
                    Admission::Duplicate => {
                        if self.shared.config.auto_ack {
                            self.shared
                                .acks
                                .redelivered(&message.conversation_id, message.seq);
                        }
                        return;
                    }
                }
                self.emit(ClientEvent::Message(message)).await;
            }
            event::Kind::Receipt(receipt) => self.emit(ClientEvent::Receipt(receipt)).await,
        }
    }
}

/// Writes one WebSocket message within `limit`.
async fn write_message(
    sink: &mut SplitSink<WsStream, WsMessage>,
    message: WsMessage,
    limit: Duration,
) -> Result<(), String> {
    match tokio::time::timeout(limit, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("WebSocket write failed: {e}")),
        Err(_) => Err(format!("WebSocket write blocked for {limit:?}")),
    }
}

/// Opens a connection to `endpoint` and authenticates (logging in again if the token
/// is refused), storing refreshed credentials in `shared`.
pub(crate) async fn establish(
    shared: &Shared,
    endpoint: &str,
    first_request_id: u64,
) -> Result<(Connection, Authenticated), ClientError> {
    let limit = shared.config.request_timeout;
    let mut conn = Connection::open(endpoint, first_request_id, limit).await?;
    let mut credentials = lock(&shared.credentials).clone();
    let before = credentials.token.clone();
    match conn.handshake(&mut credentials, limit).await {
        Ok(authenticated) => {
            if credentials.token != before {
                *lock(&shared.credentials) = credentials;
            }
            Ok((conn, authenticated))
        }
        Err(e) => {
            conn.close().await;
            Err(e)
        }
    }
}

/// Whether a failed connection attempt is worth repeating (anything but a refusal by
/// the server that will not change, such as bad credentials).
pub(crate) fn attempt_is_retryable(error: &ClientError) -> bool {
    match error {
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::Unavailable
                | ErrorCode::RateLimited
                | ErrorCode::GoingAway
                | ErrorCode::Internal
        ),
        _ => true,
    }
}
