//! One WebSocket connection to a node, driven request by request: opening it, calling
//! one request at a time, and the authentication handshake. The background session
//! ([`crate::session`]) takes the connection over once it is authenticated.

use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use parley_proto::v1::{
    client_frame, event, reply, Authenticate, Authenticated, ErrorCode, LoggedIn, Login,
};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::account::Credentials;
use crate::error::ClientError;
use crate::frame::{decode_server, encode_request, request_name, result_name, Incoming};

/// The WebSocket type of a client connection.
pub(crate) type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The URL of a node's client WebSocket: `ws://{endpoint}/v1/ws`. A leading `ws://` in
/// the endpoint is accepted and not doubled.
pub(crate) fn ws_url(endpoint: &str) -> String {
    let host = endpoint.strip_prefix("ws://").unwrap_or(endpoint);
    format!("ws://{}/v1/ws", host.trim_end_matches('/'))
}

/// Describes how the server closed a connection, for `Disconnected` reasons.
pub(crate) fn describe_close(frame: Option<&CloseFrame>) -> String {
    match frame {
        Some(f) if f.reason.is_empty() => format!("closed by the server (code {})", f.code),
        Some(f) => format!("closed by the server (code {}: {})", f.code, f.reason),
        None => "closed by the server".to_owned(),
    }
}

/// An open WebSocket to one node, used one request at a time.
pub(crate) struct Connection {
    /// The socket.
    pub(crate) ws: WsStream,
    /// The node's client address, host:port.
    pub(crate) endpoint: String,
    /// The id the next request gets.
    pub(crate) next_request_id: u64,
    /// Events that arrived while waiting for a reply, oldest first.
    pub(crate) early_events: Vec<event::Kind>,
}

impl Connection {
    /// Opens a WebSocket to `endpoint` within `limit`; request ids start at `first_request_id`.
    pub(crate) async fn open(
        endpoint: &str,
        first_request_id: u64,
        limit: Duration,
    ) -> Result<Self, ClientError> {
        let url = ws_url(endpoint);
        let config = WebSocketConfig::default();
        let connecting =
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true);
        let (ws, _response) = tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| ClientError::Timeout {
                request: "WebSocket connect",
                after: limit,
            })?
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_owned(),
                source: Box::new(source),
            })?;
        Ok(Self {
            ws,
            endpoint: endpoint.to_owned(),
            next_request_id: first_request_id.max(1),
            early_events: Vec::new(),
        })
    }

    /// Sends one request and waits up to `limit` for its answer, keeping events that
    /// arrive meanwhile in `early_events`.
    pub(crate) async fn call(
        &mut self,
        body: client_frame::Body,
        limit: Duration,
    ) -> Result<Option<reply::Result>, ClientError> {
        let request = request_name(&body);
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let deadline = Instant::now() + limit;
        let frame = WsMessage::binary(encode_request(request_id, body));
        match timeout_at(deadline, self.ws.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(self.ws_error(source)),
            Err(_) => {
                return Err(ClientError::Timeout {
                    request,
                    after: limit,
                })
            }
        }
        loop {
            let next =
                timeout_at(deadline, self.ws.next())
                    .await
                    .map_err(|_| ClientError::Timeout {
                        request,
                        after: limit,
                    })?;
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(source)) => return Err(self.ws_error(source)),
                None => {
                    return Err(ClientError::Disconnected {
                        request,
                        reason: "the connection ended".to_owned(),
                    })
                }
            };
            let bytes = match message {
                WsMessage::Binary(bytes) => bytes,
                WsMessage::Close(frame) => {
                    return Err(ClientError::Disconnected {
                        request,
                        reason: describe_close(frame.as_ref()),
                    })
                }
                WsMessage::Text(_) => {
                    tracing::warn!(endpoint = %self.endpoint, "ignoring a text frame from the server");
                    continue;
                }
                // Pings are answered by the WebSocket library.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => continue,
            };
            let incoming = decode_server(&bytes).map_err(|e| ClientError::Decode {
                endpoint: self.endpoint.clone(),
                detail: e.to_string(),
            })?;
            match incoming {
                Incoming::Reply {
                    request_id: id,
                    result,
                } if id == request_id => return Ok(result),
                Incoming::Error(error)
                    if error.request_id == request_id || error.request_id == 0 =>
                {
                    return Err(ClientError::from_frame(&error))
                }
                Incoming::Event(kind) => self.early_events.push(kind),
                Incoming::Reply { request_id: id, .. } => {
                    tracing::debug!(id, "ignoring a reply to an unknown request")
                }
                Incoming::Error(error) => {
                    tracing::debug!(
                        id = error.request_id,
                        "ignoring an error for an unknown request"
                    )
                }
                Incoming::Empty => {}
            }
        }
    }

    /// Sends `Login` and returns the fresh token.
    pub(crate) async fn login(
        &mut self,
        user_id: &str,
        device_id: &str,
        device_secret: &str,
        limit: Duration,
    ) -> Result<LoggedIn, ClientError> {
        let body = client_frame::Body::Login(Login {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
            device_secret: device_secret.to_owned(),
        });
        match self.call(body, limit).await? {
            Some(reply::Result::LoggedIn(logged_in)) => Ok(logged_in),
            other => Err(ClientError::UnexpectedReply {
                request: "Login",
                got: result_name(&other),
            }),
        }
    }

    /// Sends `Authenticate` with `token`.
    pub(crate) async fn authenticate(
        &mut self,
        token: &str,
        limit: Duration,
    ) -> Result<Authenticated, ClientError> {
        let body = client_frame::Body::Authenticate(Authenticate {
            token: token.to_owned(),
        });
        match self.call(body, limit).await? {
            Some(reply::Result::Authenticated(authenticated)) => Ok(authenticated),
            other => Err(ClientError::UnexpectedReply {
                request: "Authenticate",
                got: result_name(&other),
            }),
        }
    }

    /// Authenticates with the stored token; if the server refuses it as expired or
    /// invalid (or there is none) and a device secret is known, logs in for a fresh token,
    /// stores it in `credentials` and authenticates with that.
    pub(crate) async fn handshake(
        &mut self,
        credentials: &mut Credentials,
        limit: Duration,
    ) -> Result<Authenticated, ClientError> {
        let can_login = !credentials.device_secret.is_empty();
        if !credentials.token.is_empty() {
            match self.authenticate(&credentials.token, limit).await {
                Ok(authenticated) => return Ok(authenticated),
                Err(ClientError::Server { code, .. })
                    if can_login
                        && matches!(code, ErrorCode::TokenExpired | ErrorCode::TokenInvalid) =>
                {
                    tracing::info!(user = %credentials.user_id, code = code.as_str_name(), "token refused; logging in again");
                }
                Err(e) => return Err(e),
            }
        } else if !can_login {
            return Err(ClientError::Server {
                code: ErrorCode::Unauthenticated,
                message: "the credentials have neither a token nor a device secret".to_owned(),
                retry_after_ms: 0,
            });
        }
        let logged_in = self
            .login(
                &credentials.user_id,
                &credentials.device_id,
                &credentials.device_secret,
                limit,
            )
            .await?;
        credentials.token = logged_in.token;
        credentials.token_expires_at_ms = logged_in.token_expires_at_ms;
        self.authenticate(&credentials.token, limit).await
    }

    /// Closes the connection politely; errors are irrelevant at that point.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }

    fn ws_error(&self, source: tokio_tungstenite::tungstenite::Error) -> ClientError {
        ClientError::WebSocket {
            endpoint: self.endpoint.clone(),
            source: Box::new(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    #[test]
    fn urls() {
        assert_eq!(ws_url("127.0.0.1:7102"), "ws://127.0.0.1:7102/v1/ws");
        assert_eq!(ws_url("ws://node-1:9000/"), "ws://node-1:9000/v1/ws");
    }

    #[test]
    fn close_descriptions() {
        assert_eq!(describe_close(None), "closed by the server");
        let frame = CloseFrame {
            code: CloseCode::Away,
            reason: "shutting down".into(),
        };
        assert_eq!(
            describe_close(Some(&frame)),
            "closed by the server (code 1001: shutting down)"
        );
    }
}
