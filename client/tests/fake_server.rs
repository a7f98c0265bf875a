//! The SDK against an in-process fake server: handshake, sync, auto-ack, token refresh,
//! reconnect with resend under the same `client_msg_id`, de-duplication, rate limits
//! and close. Each test drives the server side frame by frame.

use std::future::Future;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use parley_client::proto::{
    client_frame, event, reply, server_frame, Authenticated, ClientFrame, CursorSet, ErrorCode,
    Event, LoggedIn, Message, Reply, Sent, ServerFrame, SyncComplete,
};
use parley_client::{Client, ClientConfig, ClientError, ClientEvent, Credentials, Events};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

const LIMIT: Duration = Duration::from_secs(10);
const CONV: &str = "dm:alice:bob";

/// Fails the test if `f` takes longer than [`LIMIT`].
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Listeners whose accepted WebSockets are handed to the test, tagged with the
/// listener's index.
struct FakeCluster {
    endpoints: Vec<String>,
    accepted: mpsc::UnboundedReceiver<FakeConn>,
}

impl FakeCluster {
    async fn start(nodes: usize) -> Self {
        let (tx, accepted) = mpsc::unbounded_channel();
        let mut endpoints = Vec::new();
        for node in 0..nodes {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            endpoints.push(listener.local_addr().expect("addr").to_string());
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                        let _ = tx.send(FakeConn { ws, node });
                    }
                }
            });
        }
        Self {
            endpoints,
            accepted,
        }
    }

    async fn next_conn(&mut self) -> FakeConn {
        within("a connection", self.accepted.recv())
            .await
            .expect("listeners run")
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            request_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..ClientConfig::new(self.endpoints.clone())
        }
    }
}

/// The server side of one client connection.
struct FakeConn {
    ws: WebSocketStream<TcpStream>,
    node: usize,
}

impl FakeConn {
    /// The next client frame; `None` when the client closed the connection.
    async fn recv(&mut self) -> Option<(u64, client_frame::Body)> {
        loop {
            match within("a client frame", self.ws.next()).await {
                Some(Ok(WsMessage::Binary(bytes))) => {
                    let frame = ClientFrame::decode(&bytes[..]).expect("a valid ClientFrame");
                    assert_ne!(frame.request_id, 0, "request ids are non-zero");
                    return Some((frame.request_id, frame.body.expect("a body")));
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn expect(&mut self) -> (u64, client_frame::Body) {
        self.recv().await.expect("the client sent a frame")
    }

    async fn send(&mut self, body: server_frame::Body) {
        let bytes = ServerFrame { body: Some(body) }.encode_to_vec();
        self.ws
            .send(WsMessage::binary(bytes))
            .await
            .expect("server write");
    }

    async fn reply(&mut self, request_id: u64, result: reply::Result) {
        self.send(server_frame::Body::Reply(Reply {
            request_id,
            result: Some(result),
        }))
        .await;
    }

    async fn error(&mut self, request_id: u64, code: ErrorCode, retry_after_ms: u64) {
        self.send(server_frame::Body::Error(parley_client::proto::Error {
            request_id,
            code: code as i32,
            message: format!("fake {}", code.as_str_name()),
            retry_after_ms,
        }))
        .await;
    }

    async fn message(&mut self, seq: u64) {
        self.send(server_frame::Body::Event(Event {
            kind: Some(event::Kind::Message(message(seq))),
        }))
        .await;
    }

    /// Accepts `Authenticate` (with `token`), then answers `Sync` with these messages.
    async fn accept_session(&mut self, token: &str, sync_seqs: &[u64]) {
        let (id, body) = self.expect().await;
        match body {
            client_frame::Body::Authenticate(a) => assert_eq!(a.token, token),
            other => panic!("expected Authenticate, got {other:?}"),
        }
        self.reply(
            id,
            reply::Result::Authenticated(Authenticated {
                user_id: "alice".into(),
                device_id: "phone".into(),
                home_node: self.node as u64 + 1,
                server_time_ms: 1,
            }),
        )
        .await;
        let (id, body) = self.expect().await;
        assert!(
            matches!(body, client_frame::Body::Sync(_)),
            "expected Sync, got {body:?}"
        );
        for &seq in sync_seqs {
            self.message(seq).await;
        }
        self.reply(
            id,
            reply::Result::SyncComplete(SyncComplete {
                conversations: u32::from(!sync_seqs.is_empty()),
                messages: sync_seqs.len() as u32,
            }),
        )
        .await;
    }

    /// Answers every `Ack` until one reaches `seq`; returns how many came.
    async fn acks_until(&mut self, seq: u64) -> usize {
        let mut count = 0;
        loop {
            let (id, body) = self.expect().await;
            let client_frame::Body::Ack(ack) = body else {
                panic!("expected Ack, got {body:?}");
            };
            assert_eq!(ack.conversation_id, CONV);
            count += 1;
            self.reply(
                id,
                reply::Result::CursorSet(CursorSet {
                    conversation_id: CONV.into(),
                    delivered_seq: ack.delivered_seq,
                    read_seq: 0,
                }),
            )
            .await;
            if ack.delivered_seq >= seq {
                return count;
            }
        }
    }
}

fn message(seq: u64) -> Message {
    Message {
        conversation_id: CONV.into(),
        seq,
        sender: "bob".into(),
        client_msg_id: format!("m{seq}"),
        server_time_ms: 1000 + seq as i64,
        body: format!("hello {seq}").into_bytes(),
    }
}

fn credentials() -> Credentials {
    Credentials {
        user_id: "alice".into(),
        device_id: "phone".into(),
        device_secret: "secret".into(),
        token: "token-1".into(),
        token_expires_at_ms: 0,
    }
}

/// Connects the client while the fake server accepts the session.
async fn connect(
    cluster: &mut FakeCluster,
    config: Option<ClientConfig>,
    sync_seqs: &[u64],
) -> (Client, Events, FakeConn) {
    let config = config.unwrap_or_else(|| cluster.config());
    let connecting = tokio::spawn(Client::connect(config, credentials()));
    let mut conn = cluster.next_conn().await;
    conn.accept_session("token-1", sync_seqs).await;
    let (client, events) = within("connect", connecting)
        .await
        .expect("task")
        .expect("connects");
    (client, events, conn)
}

async fn next_event(events: &mut Events) -> ClientEvent {
    within("an event", events.recv())
        .await
        .expect("the event stream is open")
}

/// The next message seq, skipping other events.
async fn next_seq(events: &mut Events) -> u64 {
    loop {
        if let ClientEvent::Message(m) = next_event(events).await {
            return m.seq;
        }
    }
}

#[tokio::test]
async fn sync_delivers_in_order_and_acks_are_coalesced() {
    let mut cluster = FakeCluster::start(1).await;
    let (client, mut events, mut conn) = connect(&mut cluster, None, &[1, 2, 3]).await;
    assert_eq!(
        next_event(&mut events).await,
        ClientEvent::Connected {
            home_node: 1,
            node_endpoint: cluster.endpoints[0].clone()
        }
    );
    for seq in 1..=3 {
        assert_eq!(
            next_event(&mut events).await,
            ClientEvent::Message(message(seq))
        );
    }
    assert_eq!(
        next_event(&mut events).await,
        ClientEvent::SyncComplete {
            conversations: 1,
            messages: 3
        }
    );
    // Waiting for more drains the stream: the acks go out, coalesced.
    let waiting = tokio::spawn(async move {
        let next = events.recv().await;
        (events, next)
    });
    let acks = conn.acks_until(3).await;
    assert!(acks <= 3, "{acks} acks for 3 messages");
    conn.message(4).await;
    let (mut events, next) = within("message 4", waiting).await.expect("task");
    assert_eq!(next, Some(ClientEvent::Message(message(4))));
    let waiting = tokio::spawn(async move { events.recv().await });
    assert_eq!(conn.acks_until(4).await, 1);
    client.close().await;
    assert_eq!(
        within("the stream to end", waiting).await.expect("task"),
        None
    );
}

#[tokio::test]
async fn reconnect_resends_with_the_same_id_and_drops_duplicates() {
    let mut cluster = FakeCluster::start(2).await;
    let config = ClientConfig {
        auto_ack: false,
        ..cluster.config()
    };
    let (client, mut events, mut first) = connect(&mut cluster, Some(config), &[1, 2]).await;
    assert_eq!(first.node, 0);
    assert_eq!(next_seq(&mut events).await, 1);
    assert_eq!(next_seq(&mut events).await, 2);
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::SyncComplete { .. }
    ));

    let sender = client.clone();
    let sending = tokio::spawn(async move { sender.send("bob", b"hi".to_vec()).await });
    let (_, body) = first.expect().await;
    let client_frame::Body::Send(send) = body else {
        panic!("expected Send, got {body:?}");
    };
    // The node dies with the send in flight.
    drop(first);

    // The client moves on to the next endpoint, syncs (getting 1 and 2 again, and 3)...
    let mut second = cluster.next_conn().await;
    assert_eq!(second.node, 1, "reconnects to the next endpoint");
    second.accept_session("token-1", &[1, 2, 3]).await;
    // ...and sends again under the same idempotency key.
    let (id, body) = second.expect().await;
    let client_frame::Body::Send(again) = body else {
        panic!("expected Send, got {body:?}");
    };
    assert_eq!(again.client_msg_id, send.client_msg_id);
    assert_eq!(again.body, b"hi");
    second
        .reply(
            id,
            reply::Result::Sent(Sent {
                conversation_id: CONV.into(),
                seq: 4,
                server_time_ms: 5,
                duplicate: true,
            }),
        )
        .await;
    let sent = within("send", sending)
        .await
        .expect("task")
        .expect("send succeeds after the reconnect");
    assert_eq!((sent.seq, sent.duplicate), (4, true));

    let mut seen = Vec::new();
    loop {
        match next_event(&mut events).await {
            ClientEvent::Message(m) => seen.push(m.seq),
            ClientEvent::SyncComplete { .. } => break,
            ClientEvent::Disconnected { .. } => seen.push(0),
            ClientEvent::Connected { home_node, .. } => assert_eq!(home_node, 2),
            ClientEvent::Receipt(_) => {}
        }
    }
    // 0 marks the disconnect; 1 and 2 were handed over before and are not repeated.
    assert_eq!(seen, vec![0, 3]);
    client.close().await;
}

#[tokio::test]
async fn expired_token_logs_in_again() {
    let mut cluster = FakeCluster::start(1).await;
    let connecting = tokio::spawn(Client::connect(cluster.config(), credentials()));
    let mut conn = cluster.next_conn().await;
    let (id, _) = conn.expect().await;
    conn.error(id, ErrorCode::TokenExpired, 0).await;
    let (id, body) = conn.expect().await;
    match body {
        client_frame::Body::Login(login) => {
            assert_eq!(
                (login.user_id.as_str(), login.device_id.as_str()),
                ("alice", "phone")
            );
            assert_eq!(login.device_secret, "secret");
        }
        other => panic!("expected Login, got {other:?}"),
    }
    conn.reply(
        id,
        reply::Result::LoggedIn(LoggedIn {
            token: "token-2".into(),
            token_expires_at_ms: 99,
        }),
    )
    .await;
    conn.accept_session("token-2", &[]).await;
    let (client, _events) = within("connect", connecting)
        .await
        .expect("task")
        .expect("connects");
    let refreshed = client.credentials();
    assert_eq!(refreshed.token, "token-2");
    assert_eq!(refreshed.token_expires_at_ms, 99);
    client.close().await;
}

#[tokio::test]
async fn bad_credentials_fail_the_connect() {
    let mut cluster = FakeCluster::start(1).await;
    let connecting = tokio::spawn(Client::connect(cluster.config(), credentials()));
    let mut conn = cluster.next_conn().await;
    let (id, _) = conn.expect().await;
    conn.error(id, ErrorCode::TokenInvalid, 0).await;
    let (id, _) = conn.expect().await;
    conn.error(id, ErrorCode::BadCredentials, 0).await;
    let result = within("connect", connecting).await.expect("task");
    match result {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::BadCredentials),
        other => panic!("expected BAD_CREDENTIALS, got {other:?}"),
    }
}

#[tokio::test]
async fn rate_limited_sends_wait_and_retry() {
    let mut cluster = FakeCluster::start(1).await;
    let (client, _events, mut conn) = connect(&mut cluster, None, &[]).await;
    let sender = client.clone();
    let sending = tokio::spawn(async move { sender.send_text("bob", "hi").await });
    let (id, body) = conn.expect().await;
    let client_frame::Body::Send(first) = body else {
        panic!("expected Send");
    };
    let refused_at = tokio::time::Instant::now();
    conn.error(id, ErrorCode::RateLimited, 100).await;
    let (id, body) = conn.expect().await;
    assert!(refused_at.elapsed() >= Duration::from_millis(100));
    let client_frame::Body::Send(second) = body else {
        panic!("expected Send");
    };
    assert_eq!(first.client_msg_id, second.client_msg_id);
    conn.reply(
        id,
        reply::Result::Sent(Sent {
            conversation_id: CONV.into(),
            seq: 1,
            server_time_ms: 1,
            duplicate: false,
        }),
    )
    .await;
    let sent = within("send", sending).await.expect("task").expect("sent");
    assert_eq!(sent.seq, 1);

    // A refusal that retrying cannot fix comes back at once.
    let sender = client.clone();
    let sending = tokio::spawn(async move { sender.send_text("nobody", "hi").await });
    let (id, _) = conn.expect().await;
    conn.error(id, ErrorCode::UnknownUser, 0).await;
    let err = within("send", sending).await.expect("task").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownUser));
    client.close().await;
}

#[tokio::test]
async fn going_away_reconnects_and_close_stops_everything() {
    let mut cluster = FakeCluster::start(1).await;
    let (client, mut events, mut conn) = connect(&mut cluster, None, &[]).await;
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Connected { .. }
    ));
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::SyncComplete { .. }
    ));
    conn.error(0, ErrorCode::GoingAway, 0).await;
    match next_event(&mut events).await {
        ClientEvent::Disconnected { reason } => assert!(reason.contains("going away"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let mut conn = cluster.next_conn().await;
    conn.accept_session("token-1", &[]).await;
    assert!(matches!(
        next_event(&mut events).await,
        ClientEvent::Connected { .. }
    ));

    // A ping works on the new connection.
    let pinger = client.clone();
    let pinging = tokio::spawn(async move { pinger.ping().await });
    let (id, body) = conn.expect().await;
    let client_frame::Body::Ping(ping) = body else {
        panic!("expected Ping");
    };
    conn.reply(
        id,
        reply::Result::Pong(parley_client::proto::Pong {
            nonce: ping.nonce,
            server_time_ms: 7,
        }),
    )
    .await;
    let pong = within("ping", pinging).await.expect("task").expect("pong");
    assert_eq!(pong.nonce, ping.nonce);

    client.close().await;
    assert!(conn.recv().await.is_none(), "the client closed the socket");
    let err = client.send_text("bob", "late").await.unwrap_err();
    assert!(matches!(err, ClientError::Closed { .. }), "{err:?}");
    loop {
        if within("the stream to end", events.recv()).await.is_none() {
            break;
        }
    }
}

#[tokio::test]
async fn long_texts_are_refused_before_sending() {
    let mut cluster = FakeCluster::start(1).await;
    let (client, _events, _conn) = connect(&mut cluster, None, &[]).await;
    let text = "x".repeat(parley_client::MAX_TEXT_CHARS + 1);
    let err = client.send_text("bob", &text).await.unwrap_err();
    assert!(matches!(err, ClientError::TextTooLong { .. }), "{err:?}");
    client.close().await;
}

#[tokio::test]
async fn unconfirmed_acks_are_sent_again_after_a_reconnect() {
    let mut cluster = FakeCluster::start(1).await;
    let (client, mut events, mut first) = connect(&mut cluster, None, &[1, 2]).await;
    assert_eq!(next_seq(&mut events).await, 1);
    assert_eq!(next_seq(&mut events).await, 2);
    let reading = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while let Some(event) = events.recv().await {
            if let ClientEvent::Message(m) = event {
                seqs.push(m.seq);
            }
        }
        seqs
    });
    // The acknowledgement arrives but the node dies before confirming it.
    let (_, body) = first.expect().await;
    assert!(matches!(body, client_frame::Body::Ack(_)), "{body:?}");
    drop(first);

    let mut second = cluster.next_conn().await;
    // The sync resends 1 and 2 (not acknowledged) and 3 (new).
    second.accept_session("token-1", &[1, 2, 3]).await;
    second.acks_until(3).await;
    client.close().await;
    let seqs = within("the reader", reading).await.expect("task");
    assert_eq!(seqs, vec![3], "1 and 2 are not handed over twice");
}
