//! [`RawConnection`]: a bare `parley.v1` WebSocket connection that sends any bytes and
//! reads frames one at a time, for protocol tests (bad input, errors, limits) and for
//! holding many idle connections cheaply. Applications use the `parley-client` SDK.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures::{SinkExt, StreamExt};
use parley_proto::v1::{client_frame, server_frame, ClientFrame, Error, Event, Reply, ServerFrame};
use prost::Message as _;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// What the server sent: a frame, or the end of the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Reply(Reply),
    Error(Error),
    Event(Event),
    /// The server closed the connection, with its close code if it sent one.
    Closed(Option<u16>),
}

/// An error frame answering a request, usable with `?`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerError(pub Error);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "server error {}: {}", self.0.code, self.0.message)
    }
}

impl std::error::Error for ServerError {}

/// One client WebSocket connection to a node.
pub struct RawConnection {
    socket: Socket,
    next_id: u64,
}

impl RawConnection {
    /// Connects to `ws://{addr}/v1/ws`.
    pub async fn connect(addr: &str) -> anyhow::Result<RawConnection> {
        Self::connect_from(addr, None).await
    }

    /// Connects to `ws://{addr}/v1/ws` from the local address `source` (any port), so
    /// that many connections to one node can use several loopback addresses
    /// (127.0.0.x) when one address runs out of ephemeral ports; `None` lets the
    /// kernel choose.
    pub async fn connect_from(addr: &str, source: Option<IpAddr>) -> anyhow::Result<RawConnection> {
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(4096);
        let connecting = async {
            let target: SocketAddr = tokio::net::lookup_host(addr)
                .await
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .with_context(|| format!("{addr} resolves to nothing"))?;
            let socket = if target.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .context("creating a socket")?;
            if let Some(ip) = source {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("binding to {ip}"))?;
            }
            let stream = socket
                .connect(target)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true).context("setting TCP_NODELAY")?;
            let (socket, _) = tokio_tungstenite::client_async_with_config(
                format!("ws://{addr}/v1/ws"),
                MaybeTlsStream::Plain(stream),
                Some(config),
            )
            .await
            .with_context(|| format!("WebSocket handshake with {addr}"))?;
            anyhow::Ok(socket)
        };
        let socket = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .context("connect timed out")??;
        Ok(RawConnection { socket, next_id: 1 })
    }

    /// Sends a frame with the next request id; returns the id.
    pub async fn request(&mut self, body: client_frame::Body) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            request_id: id,
            body: Some(body),
        };
        self.send_bytes(frame.encode_to_vec()).await?;
        Ok(id)
    }

    /// Sends arbitrary bytes as one binary frame.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .context("sending a frame")
    }

    /// Sends a text frame (which the protocol refuses).
    pub async fn send_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .context("sending a text frame")
    }

    /// The next frame from the server (pings are answered and skipped).
    pub async fn recv(&mut self, limit: Duration) -> anyhow::Result<Received> {
        loop {
            let msg = tokio::time::timeout(limit, self.socket.next())
                .await
                .context("no frame from the server in time")?;
            match msg {
                None => return Ok(Received::Closed(None)),
                Some(Err(_)) => return Ok(Received::Closed(None)),
                Some(Ok(Message::Close(f))) => {
                    return Ok(Received::Closed(f.map(|f| f.code.into())))
                }
                Some(Ok(Message::Binary(b))) => {
                    let frame =
                        ServerFrame::decode(b.as_ref()).context("undecodable server frame")?;
                    return match frame.body {
                        Some(server_frame::Body::Reply(r)) => Ok(Received::Reply(r)),
                        Some(server_frame::Body::Error(e)) => Ok(Received::Error(e)),
                        Some(server_frame::Body::Event(e)) => Ok(Received::Event(e)),
                        None => Err(anyhow!("server frame without a body")),
                    };
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until the answer to `request_id` (events before it are returned too).
    pub async fn answer(
        &mut self,
        request_id: u64,
        limit: Duration,
    ) -> anyhow::Result<(Result<Reply, ServerError>, Vec<Event>)> {
        let mut events = Vec::new();
        loop {
            match self.recv(limit).await? {
                Received::Reply(r) if r.request_id == request_id => return Ok((Ok(r), events)),
                Received::Error(e) if e.request_id == request_id => {
                    return Ok((Err(ServerError(e)), events))
                }
                Received::Event(e) => events.push(e),
                Received::Closed(code) => {
                    bail!("connection closed ({code:?}) before the answer to {request_id}")
                }
                _ => {}
            }
        }
    }

    /// Sends a request and waits for its answer.
    pub async fn call(
        &mut self,
        body: client_frame::Body,
    ) -> anyhow::Result<(Result<Reply, ServerError>, Vec<Event>)> {
        let id = self.request(body).await?;
        self.answer(id, Duration::from_secs(30)).await
    }
}
