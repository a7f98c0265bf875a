//! [`Client`]: a reconnecting, authenticated messaging session, and [`Events`], the
//! stream of what the server pushes to it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use parley_proto::v1::{
    client_frame, reply, CursorSet, Fetch, History, MarkRead, Message, Ping, Pong, PrivacySet,
    Receipt, Send, Sent, SetPrivacy,
};
use rand::RngCore as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::account::Credentials;
use crate::conversation::check_text;
use crate::error::ClientError;
use crate::frame::{request_name, result_name};
use crate::reconnect::{Backoff, EndpointRing};
use crate::session::{self, attempt_is_retryable, lock, AckQueue, Command, Session, Shared};

/// Requests queued for the session task before callers wait for room.
const COMMAND_QUEUE: usize = 1024;

/// How a [`Client`] connects, times out and retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client addresses (host:port) of the cluster's nodes, tried in turn.
    pub endpoints: Vec<String>,
    /// Time limit of one request (and of connecting and authenticating). Default 10 s.
    pub request_timeout: Duration,
    /// How long [`Client::send`] keeps retrying (across reconnects, `UNAVAILABLE`,
    /// `RATE_LIMITED`) with the same `client_msg_id`. Default 30 s.
    pub send_deadline: Duration,
    /// Shortest reconnection delay. Default 100 ms.
    pub backoff_min: Duration,
    /// Longest reconnection delay. Default 5 s.
    pub backoff_max: Duration,
    /// Acknowledge delivery of every message the application takes from [`Events`].
    /// Default true.
    pub auto_ack: bool,
    /// Events buffered for the application; when full, the client stops reading from
    /// the server until the application catches up. Default 4096.
    pub event_buffer: usize,
    /// How often the client pings the server. Default 20 s.
    pub keepalive_interval: Duration,
    /// A connection from which nothing arrived for this long is dropped and replaced.
    /// Default 45 s (the server pings every 20 s).
    pub idle_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            request_timeout: Duration::from_secs(10),
            send_deadline: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            auto_ack: true,
            event_buffer: 4096,
            keepalive_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

impl ClientConfig {
    /// The default configuration with these endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// Splits a comma-separated endpoint list (`a:1,b:2`), dropping blanks.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Something that happened on a [`Client`]'s connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A new message (from the peer, or from this user's other devices). Each
    /// conversation's messages come in `seq` order, each once.
    Message(Message),
    /// The other member's delivery and read cursors moved.
    Receipt(Receipt),
    /// A connection was established and authenticated (a `Sync` follows).
    Connected {
        /// The node holding this user's sessions.
        home_node: u64,
        /// The endpoint the client connected to.
        node_endpoint: String,
    },
    /// The connection dropped; the client is reconnecting.
    Disconnected {
        /// What happened.
        reason: String,
    },
    /// The `Sync` after a connection finished: everything missed has been delivered.
    SyncComplete {
        /// Conversations that had undelivered messages.
        conversations: u32,
        /// Messages the sync delivered (before de-duplication).
        messages: u32,
    },
}

/// The stream of [`ClientEvent`]s of a client; it ends when the client is closed.
///
/// With [`ClientConfig::auto_ack`], taking a message from this stream acknowledges its
/// delivery (coalesced per conversation, sent within about 20 ms or as soon as the
/// stream is drained). Keep reading it: when its buffer is full the client stops
/// reading from the server.
pub struct Events {
    rx: mpsc::Receiver<ClientEvent>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("buffered", &self.rx.len())
            .finish_non_exhaustive()
    }
}

impl Events {
    /// The next event; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<ClientEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                if let ClientEvent::Message(m) = &event {
                    if self.shared.config.auto_ack {
                        self.shared.acks.handed(&m.conversation_id, m.seq);
                    }
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                self.shared.acks.idle();
                Poll::Pending
            }
        }
    }
}

impl Stream for Events {
    type Item = ClientEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        self.get_mut().poll_event(cx)
    }
}

/// A messaging session of one device: authenticated, reconnecting by itself. Cheap to
/// clone; every clone drives the same connection. Dropping every clone closes it.
///
/// Retries: [`send`](Self::send) retries until [`ClientConfig::send_deadline`] with the
/// same `client_msg_id` after a timeout, a dropped connection, `UNAVAILABLE` or
/// `RATE_LIMITED` (waiting `retry_after_ms`); the server de-duplicates, so a message is
/// stored once. [`ack`](Self::ack), [`mark_read`](Self::mark_read),
/// [`set_privacy`](Self::set_privacy) and [`fetch`](Self::fetch) are idempotent and
/// retry the same way within [`ClientConfig::request_timeout`]. [`ping`](Self::ping)
/// is tried once and returns [`ClientError::Disconnected`] if the connection drops.
/// Requests made while the client is reconnecting wait for the new connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user_id", &lock(&self.shared.credentials).user_id)
            .field("endpoints", &self.shared.config.endpoints)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and authenticates (logging in again if the token has expired and the
    /// credentials hold the device secret), then keeps the connection up in a background
    /// task. Tries the endpoints in turn, with backoff, for up to
    /// [`ClientConfig::request_timeout`] (at least once each); fails at once if the
    /// server refuses the credentials.
    pub async fn connect(
        config: ClientConfig,
        credentials: Credentials,
    ) -> Result<(Client, Events), ClientError> {
        let mut ring =
            EndpointRing::new(config.endpoints.clone()).ok_or(ClientError::NoEndpoints)?;
        let (shutdown, _) = watch::channel(false);
        let (done, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            config: config.clone(),
            credentials: Mutex::new(credentials),
            stop_reason: Mutex::new(None),
            acks: AckQueue::default(),
            shutdown,
            done,
        });

        let started = Instant::now();
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        let mut attempts = 0;
        let first = loop {
            attempts += 1;
            match session::establish(&shared, ring.current(), 1).await {
                Ok(pair) => break pair,
                Err(e) if attempt_is_retryable(&e) => {
                    tracing::debug!(endpoint = ring.current(), error = %e, "connection attempt failed");
                    ring.advance();
                    let delay = backoff.next_delay(&mut rand::rng());
                    let out_of_time = started.elapsed() + delay >= config.request_timeout;
                    if attempts >= ring.len() && out_of_time {
                        return Err(e);
                    }
                    if attempts >= ring.len() {
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(e) => return Err(e),
            }
        };

        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(config.event_buffer.max(1));
        let session = Session::new(shared.clone(), commands_rx, events_tx, ring);
        tokio::spawn(session.run(first));
        Ok((
            Client {
                shared: shared.clone(),
                commands: commands_tx,
            },
            Events {
                rx: events_rx,
                shared,
            },
        ))
    }

    /// The current credentials; the token is refreshed when the client logs in again,
    /// so save these rather than the ones passed to [`connect`](Self::connect).
    pub fn credentials(&self) -> Credentials {
        lock(&self.shared.credentials).clone()
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.shared.config
    }

    /// Sends `body` to `recipient` under a fresh random `client_msg_id`; returns once the
    /// message is committed.
    pub async fn send(&self, recipient: &str, body: Vec<u8>) -> Result<Sent, ClientError> {
        self.send_with_id(recipient, &new_client_msg_id(), body)
            .await
    }

    /// Sends `text` (UTF-8) to `recipient`; refuses more than
    /// [`MAX_TEXT_CHARS`](crate::MAX_TEXT_CHARS) characters without sending.
    pub async fn send_text(&self, recipient: &str, text: &str) -> Result<Sent, ClientError> {
        check_text(text)?;
        self.send(recipient, text.as_bytes().to_vec()).await
    }

    /// Sends `body` to `recipient` with the caller's idempotency key: sending the same
    /// `client_msg_id` again returns the original `seq` with `duplicate: true`.
    pub async fn send_with_id(
        &self,
        recipient: &str,
        client_msg_id: &str,
        body: Vec<u8>,
    ) -> Result<Sent, ClientError> {
        let request = client_frame::Body::Send(Send {
            client_msg_id: client_msg_id.to_owned(),
            recipient: recipient.to_owned(),
            body,
        });
        match self
            .call_retrying(request, self.shared.config.send_deadline)
            .await?
        {
            Some(reply::Result::Sent(sent)) => Ok(sent),
            other => Err(unexpected("Send", &other)),
        }
    }

    /// Acknowledges delivery of everything up to `delivered_seq` in a conversation.
    pub async fn ack(
        &self,
        conversation_id: &str,
        delivered_seq: u64,
    ) -> Result<CursorSet, ClientError> {
        let request = client_frame::Body::Ack(parley_proto::v1::Ack {
            conversation_id: conversation_id.to_owned(),
            delivered_seq,
        });
        self.cursor_request(request).await
    }

    /// Marks everything up to `read_seq` in a conversation as read (and delivered).
    pub async fn mark_read(
        &self,
        conversation_id: &str,
        read_seq: u64,
    ) -> Result<CursorSet, ClientError> {
        let request = client_frame::Body::MarkRead(MarkRead {
            conversation_id: conversation_id.to_owned(),
            read_seq,
        });
        self.cursor_request(request).await
    }

    /// Turns read receipts on or off for this user (off: none sent, none seen).
    pub async fn set_privacy(&self, read_receipts: bool) -> Result<PrivacySet, ClientError> {
        let request = client_frame::Body::SetPrivacy(SetPrivacy { read_receipts });
        match self
            .call_retrying(request, self.shared.config.request_timeout)
            .await?
        {
            Some(reply::Result::PrivacySet(set)) => Ok(set),
            other => Err(unexpected("SetPrivacy", &other)),
        }
    }

    /// Reads up to `limit` (at most 1,000) messages of a conversation from `from_seq` on.
    pub async fn fetch(
        &self,
        conversation_id: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<History, ClientError> {
        let request = client_frame::Body::Fetch(Fetch {
            conversation_id: conversation_id.to_owned(),
            from_seq,
            limit,
        });
        match self
            .call_retrying(request, self.shared.config.request_timeout)
            .await?
        {
            Some(reply::Result::History(history)) => Ok(history),
            other => Err(unexpected("Fetch", &other)),
        }
    }

    /// Round trip to the server; the reply carries the server's clock.
    pub async fn ping(&self) -> Result<Pong, ClientError> {
        let nonce = rand::rng().next_u64();
        let request = client_frame::Body::Ping(Ping { nonce });
        match self
            .call_once(request, self.shared.config.request_timeout)
            .await?
        {
            Some(reply::Result::Pong(pong)) => Ok(pong),
            other => Err(unexpected("Ping", &other)),
        }
    }

    /// Closes the client: sends pending acknowledgements, closes the connection, stops
    /// reconnecting and ends [`Events`]. Requests still waiting fail with
    /// [`ClientError::Closed`]. Returns when the background task has ended.
    pub async fn close(&self) {
        self.shared.set_stop_reason("closed by the application");
        self.shared.shutdown.send_replace(true);
        let mut done = self.shared.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    async fn cursor_request(&self, request: client_frame::Body) -> Result<CursorSet, ClientError> {
        let name = request_name(&request);
        match self
            .call_retrying(request, self.shared.config.request_timeout)
            .await?
        {
            Some(reply::Result::CursorSet(set)) => Ok(set),
            other => Err(unexpected(name, &other)),
        }
    }

    /// Sends a request once and waits up to `limit` for its answer.
    async fn call_once(
        &self,
        body: client_frame::Body,
        limit: Duration,
    ) -> Result<Option<reply::Result>, ClientError> {
        let request = request_name(&body);
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.commands
                .send(Command { body, reply })
                .await
                .map_err(|_| self.shared.closed_error())?;
            answer.await.map_err(|_| self.shared.closed_error())?
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                request,
                after: limit,
            })?
    }

    /// Sends an idempotent request, repeating it after retryable failures until `budget`
    /// has passed.
    async fn call_retrying(
        &self,
        body: client_frame::Body,
        budget: Duration,
    ) -> Result<Option<reply::Result>, ClientError> {
        let deadline = Instant::now() + budget;
        let config = &self.shared.config;
        let mut pause = config.backoff_min;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let limit = remaining.min(config.request_timeout);
            let error = match self.call_once(body.clone(), limit).await {
                Ok(result) => return Ok(result),
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            let wait = match &error {
                ClientError::Timeout { .. } => Duration::ZERO,
                e => e.retry_after().unwrap_or(pause),
            };
            pause = (pause * 2).min(config.backoff_max);
            if Instant::now() + wait >= deadline {
                return Err(error);
            }
            tracing::debug!(error = %error, ?wait, "retrying {}", request_name(&body));
            tokio::time::sleep(wait).await;
        }
    }
}

/// A fresh random idempotency key: 16 random bytes, hex.
pub fn new_client_msg_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn unexpected(request: &'static str, got: &Option<reply::Result>) -> ClientError {
    ClientError::UnexpectedReply {
        request,
        got: result_name(got),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists() {
        assert_eq!(
            parse_endpoints(" 127.0.0.1:7102, 127.0.0.1:7112,,"),
            vec!["127.0.0.1:7102", "127.0.0.1:7112"]
        );
        assert!(parse_endpoints("").is_empty());
        let config = ClientConfig::new(["a:1", "b:2"]);
        assert_eq!(config.endpoints, vec!["a:1", "b:2"]);
        assert!(config.auto_ack);
        assert_eq!(config.send_deadline, Duration::from_secs(30));
    }

    #[test]
    fn client_msg_ids_are_random_hex() {
        let a = new_client_msg_id();
        let b = new_client_msg_id();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn connect_without_endpoints_fails() {
        let credentials = Credentials {
            user_id: "a".into(),
            device_id: "d".into(),
            device_secret: String::new(),
            token: "t".into(),
            token_expires_at_ms: 0,
        };
        let result = Client::connect(ClientConfig::default(), credentials).await;
        assert!(matches!(result, Err(ClientError::NoEndpoints)));
    }
}
