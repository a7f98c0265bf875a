//! The client gateway: the WebSocket endpoint every node serves (`/v1/ws` on the
//! client port), the unauthenticated part of a connection (register, login,
//! authenticate), and proxying to the user's home node.
//!
//! A connection that authenticates on a node that is not the user's home is relayed,
//! frame by frame, to the home node over a second WebSocket marked with the
//! `x-parley-proxied-by` header (the home node then serves it without routing again,
//! so views that briefly disagree cannot bounce a connection around). The protocol is
//! in docs/protocol.md.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use futures::{FutureExt, SinkExt, StreamExt};
use parley_proto::v1::{
    client_frame, reply, server_frame, ClientFrame, ErrorCode, Reply, ServerFrame,
};
use prometheus::IntGauge;
use prost::Message as _;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::accounts::Accounts;
use crate::client_error::ClientError;
use crate::config::NodeConfig;
use crate::delivery::Delivery;
use crate::messaging::Messaging;
use crate::metrics::Metrics;
use crate::router::Router;
use crate::session::{self, Identity};

/// Header a proxying node sets on its connection to the home node.
pub const PROXIED_BY_HEADER: &str = "x-parley-proxied-by";
/// Time a new connection has to authenticate.
const AUTH_DEADLINE: Duration = Duration::from_secs(10);
/// Time to open the relay connection to a home node.
const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of protobuf envelope allowed on top of the payload limit.
const FRAME_OVERHEAD: usize = 4096;
/// Bytes read from a socket at a time. The read buffer is allocated (and touched) for
/// every connection, so it is small: idle connections stay cheap, and a typical frame
/// (a few hundred bytes) still fits; larger frames are read in several pieces.
const READ_BUFFER: usize = 1024;
/// Bytes of outgoing frames buffered before a write to the socket (grows only with use).
const WRITE_BUFFER: usize = 4096;

/// WebSocket close codes Parley uses.
pub mod close_code {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// Whether a read failed because the peer sent a frame over the size limit (then the
/// connection is closed with [`close_code::TOO_BIG`] rather than dropped).
pub fn is_oversized(e: &axum::Error) -> bool {
    use std::error::Error as _;
    matches!(
        e.source()
            .and_then(|s| s.downcast_ref::<tungstenite::Error>()),
        Some(tungstenite::Error::Capacity(_))
    )
}

/// Everything the endpoint needs, shared by every connection.
pub struct Gateway {
    pub config: NodeConfig,
    pub accounts: Arc<Accounts>,
    pub messaging: Arc<Messaging>,
    pub delivery: Arc<Delivery>,
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    /// Flips to true when the node starts shutting down.
    pub shutdown: watch::Receiver<bool>,
}

/// The HTTP routes of the client port.
pub fn routes(gw: Arc<Gateway>) -> axum::Router {
    axum::Router::new()
        .route("/v1/ws", get(upgrade))
        .with_state(gw)
}

async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let proxied = headers.contains_key(PROXIED_BY_HEADER);
    let max = gw.max_frame();
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let kind = if proxied { "proxied_in" } else { "direct" };
            let counted = Counted::new(gw.metrics.connections.with_label_values(&[kind]));
            serve(gw, socket, proxied, counted).await;
        })
}

/// Counts a connection in `parley_connections` for as long as it is held, whichever task
/// holds it.
struct Counted(IntGauge);

impl Counted {
    fn new(gauge: IntGauge) -> Counted {
        gauge.inc();
        Counted(gauge)
    }

    /// Runs `work` as a task of its own that keeps the connection counted. (A combinator,
    /// not an `async` block: a block that moves `work` would hold it twice.)
    fn spawn(self, work: impl Future<Output = ()> + Send + 'static) {
        tokio::spawn(work.map(move |()| drop(self)));
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A reply frame.
pub fn reply_frame(request_id: u64, result: reply::Result) -> WsMessage {
    encode(ServerFrame {
        body: Some(server_frame::Body::Reply(Reply {
            request_id,
            result: Some(result),
        })),
    })
}

/// An error frame.
pub fn error_frame(request_id: u64, e: &ClientError) -> WsMessage {
    encode(ServerFrame {
        body: Some(server_frame::Body::Error(e.to_frame(request_id))),
    })
}

fn encode(frame: ServerFrame) -> WsMessage {
    WsMessage::Binary(frame.encode_to_vec().into())
}

impl Gateway {
    /// Largest accepted frame.
    pub fn max_frame(&self) -> usize {
        self.config.max_payload_bytes + FRAME_OVERHEAD
    }

    pub fn count_error(&self, e: &ClientError) {
        self.metrics
            .client_errors_total
            .with_label_values(&[e.label()])
            .inc();
    }

    /// Decodes a client frame; on failure, the request id to answer (0 if unknown) and why.
    pub fn decode(&self, bytes: &[u8]) -> Result<ClientFrame, (u64, ClientError)> {
        let fail = |id: u64, msg: String| {
            let e = ClientError::new(ErrorCode::MalformedFrame, msg);
            self.count_error(&e);
            Err((id, e))
        };
        match ClientFrame::decode(bytes) {
            Err(e) => fail(0, format!("not a ClientFrame: {e}")),
            Ok(f) if f.request_id == 0 => fail(0, "request_id must be non-zero".into()),
            Ok(f) if f.body.is_none() => fail(f.request_id, "frame has no body".into()),
            Ok(f) => Ok(f),
        }
    }
}

/// The unauthenticated part of a connection, then a session here or a relay to the home.
async fn serve(gw: Arc<Gateway>, mut socket: WebSocket, proxied: bool, counted: Counted) {
    let deadline = tokio::time::Instant::now() + AUTH_DEADLINE;
    let mut shutdown = gw.shutdown.clone();
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout_at(deadline, socket.recv()) => r,
            _ = stopped(&mut shutdown) => {
                let e = ClientError::new(ErrorCode::GoingAway, "node shutting down; reconnect");
                let _ = socket.send(error_frame(0, &e)).await;
                close(socket, close_code::GOING_AWAY, "node shutting down").await;
                return;
            }
        };
        let bytes = match next {
            Err(_) => {
                close(socket, close_code::POLICY, "authentication timeout").await;
                return;
            }
            Ok(Some(Err(e))) if is_oversized(&e) => {
                close(socket, close_code::TOO_BIG, "frame too large").await;
                return;
            }
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(WsMessage::Close(_)))) => return,
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            Ok(Some(Ok(WsMessage::Text(_)))) => {
                let e = ClientError::new(ErrorCode::MalformedFrame, "text frames are not accepted");
                gw.count_error(&e);
                if socket.send(error_frame(0, &e)).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Ok(WsMessage::Binary(b)))) => b,
        };
        let frame = match gw.decode(&bytes) {
            Ok(f) => f,
            Err((id, e)) => {
                if socket.send(error_frame(id, &e)).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let id = frame.request_id;
        let result = match frame.body {
            // Boxed: these futures are large and transient, and an unboxed one would be
            // part of every connection's task for the connection's whole life.
            Some(client_frame::Body::Register(r)) => {
                Box::pin(gw.accounts.register(&r.user_id, &r.device_id))
                    .await
                    .map(reply::Result::Registered)
            }
            Some(client_frame::Body::Login(l)) => Box::pin(gw.accounts.login(
                &l.user_id,
                &l.device_id,
                &l.device_secret,
            ))
            .await
            .map(reply::Result::LoggedIn),
            Some(client_frame::Body::Ping(p)) => Ok(reply::Result::Pong(parley_proto::v1::Pong {
                nonce: p.nonce,
                server_time_ms: 0,
            })),
            Some(client_frame::Body::Authenticate(a)) => match gw.accounts.authenticate(&a.token) {
                Ok(claims) => {
                    let who = Identity {
                        user: claims.sub,
                        device: claims.dev,
                    };
                    // The session or relay runs as a task of its own and this one ends:
                    // an idle connection then holds only the state of the path it took,
                    // not the upgrade's and the handshake's as well.
                    if !proxied {
                        Box::pin(relay_if_remote(gw, socket, who, id, bytes, counted)).await;
                    } else {
                        counted.spawn(session::run(gw, socket, who, id));
                    }
                    return;
                }
                Err(e) => Err(e),
            },
            Some(_) => Err(ClientError::new(
                ErrorCode::Unauthenticated,
                "authenticate before anything else",
            )),
            None => Err(ClientError::new(
                ErrorCode::MalformedFrame,
                "frame has no body",
            )),
        };
        let out = match result {
            Ok(r) => reply_frame(id, r),
            Err(e) => {
                gw.count_error(&e);
                error_frame(id, &e)
            }
        };
        if socket.send(out).await.is_err() {
            return;
        }
    }
}

/// Resolves once the node starts shutting down.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

type HomeSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Serves the session here if this node is the user's home, else relays it to the
/// first home candidate that can be reached.
async fn relay_if_remote(
    gw: Arc<Gateway>,
    socket: WebSocket,
    who: Identity,
    auth_request_id: u64,
    auth_frame: axum::body::Bytes,
    counted: Counted,
) {
    let me = gw.router.node_id();
    for home in gw.router.ranked(&who.user).into_iter().take(3) {
        // Each path runs as its own task, so that a connection holds only the state of
        // the path it took (a session here, or a relay), not the largest of them.
        if home.node == me {
            counted.spawn(session::run(gw, socket, who, auth_request_id));
            return;
        }
        match Box::pin(connect_home(&gw, &home.client_addr)).await {
            Ok(upstream) => {
                counted.spawn(relay(gw, socket, upstream, auth_frame));
                return;
            }
            Err(e) => {
                tracing::info!(node = home.node, error = %e, "home node unreachable; trying the next");
                gw.router.mark_down(home.node);
            }
        }
    }
    // Nobody else reachable: serve here rather than refuse.
    counted.spawn(session::run(gw, socket, who, auth_request_id));
}

async fn connect_home(gw: &Gateway, addr: &str) -> Result<HomeSocket, String> {
    let mut request = format!("ws://{addr}/v1/ws")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        PROXIED_BY_HEADER,
        gw.router
            .node_id()
            .to_string()
            .parse()
            .map_err(|e: axum::http::header::InvalidHeaderValue| e.to_string())?,
    );
    let max = gw.max_frame();
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(PROXY_CONNECT_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Relays frames between the client and its home node until either side closes.
async fn relay(
    gw: Arc<Gateway>,
    client: WebSocket,
    mut upstream: HomeSocket,
    auth_frame: axum::body::Bytes,
) {
    let gauge = gw.metrics.connections.with_label_values(&["proxied_out"]);
    gauge.inc();
    if upstream
        .send(tungstenite::Message::Binary(auth_frame))
        .await
        .is_err()
    {
        gauge.dec();
        return;
    }
    let (mut client_tx, mut client_rx) = client.split();
    let (mut up_tx, mut up_rx) = upstream.split();
    let idle = Duration::from_millis(gw.config.ws_idle_timeout_ms);
    let mut ping = tokio::time::interval(Duration::from_millis(gw.config.ws_ping_interval_ms));
    ping.tick().await;
    let mut shutdown = gw.shutdown.clone();
    loop {
        tokio::select! {
            m = tokio::time::timeout(idle, client_rx.next()) => match m {
                Ok(Some(Ok(WsMessage::Binary(b)))) => {
                    if up_tx.send(tungstenite::Message::Binary(b)).await.is_err() { break; }
                }
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    let text = tungstenite::Utf8Bytes::from(t.as_str());
                    if up_tx.send(tungstenite::Message::Text(text)).await.is_err() { break; }
                }
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => {}
                Ok(Some(Err(e))) if is_oversized(&e) => {
                    let _ = client_tx.send(WsMessage::Close(Some(CloseFrame {
                        code: close_code::TOO_BIG, reason: "frame too large".into(),
                    }))).await;
                    let _ = up_tx.send(tungstenite::Message::Close(None)).await;
                    break;
                }
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    let _ = up_tx.send(tungstenite::Message::Close(None)).await;
                    break;
                }
                Err(_) => {
                    let _ = client_tx.send(WsMessage::Close(Some(CloseFrame {
                        code: close_code::GOING_AWAY, reason: "idle timeout".into(),
                    }))).await;
                    let _ = up_tx.send(tungstenite::Message::Close(None)).await;
                    break;
                }
            },
            m = up_rx.next() => match m {
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    if client_tx.send(WsMessage::Binary(b)).await.is_err() { break; }
                }
                Some(Ok(tungstenite::Message::Close(f))) => {
                    let frame = f.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() });
                    let _ = client_tx.send(WsMessage::Close(frame)).await;
                    break;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    // The home node went away: tell the client to reconnect.
                    let e = ClientError::new(ErrorCode::GoingAway, "home node unreachable; reconnect");
                    let _ = client_tx.send(error_frame(0, &e)).await;
                    let _ = client_tx.send(WsMessage::Close(Some(CloseFrame {
                        code: close_code::GOING_AWAY, reason: "home node unreachable".into(),
                    }))).await;
                    break;
                }
            },
            _ = ping.tick() => {
                if client_tx.send(WsMessage::Ping(Default::default())).await.is_err() { break; }
            }
            _ = stopped(&mut shutdown) => {
                let e = ClientError::new(ErrorCode::GoingAway, "node shutting down; reconnect");
                let _ = client_tx.send(error_frame(0, &e)).await;
                let _ = client_tx.send(WsMessage::Close(Some(CloseFrame {
                    code: close_code::GOING_AWAY, reason: "node shutting down".into(),
                }))).await;
                let _ = up_tx.send(tungstenite::Message::Close(None)).await;
                break;
            }
        }
    }
    gauge.dec();
}
