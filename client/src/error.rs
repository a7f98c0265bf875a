//! [`ClientError`]: everything an SDK call can fail with.

use std::time::Duration;

use parley_proto::v1::ErrorCode;

/// The error of every fallible SDK call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration lists no endpoint to connect to.
    #[error("no endpoint configured")]
    NoEndpoints,
    /// The WebSocket connection to a node could not be opened.
    #[error("cannot connect to ws://{endpoint}/v1/ws: {source}")]
    Connect {
        /// The node's client address, host:port.
        endpoint: String,
        /// What the WebSocket library reported.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// Reading from or writing to an open WebSocket failed.
    #[error("WebSocket error talking to {endpoint}: {source}")]
    WebSocket {
        /// The node's client address, host:port.
        endpoint: String,
        /// What the WebSocket library reported.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The server sent a binary frame that is not a valid `ServerFrame`.
    #[error("undecodable frame from {endpoint}: {detail}")]
    Decode {
        /// The node's client address, host:port.
        endpoint: String,
        /// What was wrong with it.
        detail: String,
    },
    /// The server answered a request with a reply of the wrong kind.
    #[error("unexpected reply to {request}: {got}")]
    UnexpectedReply {
        /// The request that was answered.
        request: &'static str,
        /// A description of what came back.
        got: String,
    },
    /// The server refused a request with an `Error` frame.
    #[error("server error {}: {message}", code.as_str_name())]
    Server {
        /// The protocol error code (see docs/protocol.md, "Error codes").
        code: ErrorCode,
        /// The server's human-readable detail.
        message: String,
        /// For `RATE_LIMITED` and `UNAVAILABLE`: when to try again (0: not given).
        retry_after_ms: u64,
    },
    /// No answer came within the time limit.
    #[error("no answer to {request} within {after:?}")]
    Timeout {
        /// The request that timed out.
        request: &'static str,
        /// The time limit.
        after: Duration,
    },
    /// The connection dropped while the request was in flight; it may or may not have
    /// been carried out.
    #[error("disconnected while waiting for {request}: {reason}")]
    Disconnected {
        /// The request that lost its connection.
        request: &'static str,
        /// Why the connection dropped.
        reason: String,
    },
    /// The client was closed (by [`Client::close`](crate::Client::close), by dropping
    /// every handle, or after a permanent failure such as revoked credentials).
    #[error("client closed: {reason}")]
    Closed {
        /// Why the client stopped.
        reason: String,
    },
    /// [`Client::send_text`](crate::Client::send_text) refused a text longer than the limit.
    #[error("text of {chars} characters is longer than the limit of {limit}")]
    TextTooLong {
        /// Characters in the refused text.
        chars: usize,
        /// The limit, [`MAX_TEXT_CHARS`](crate::MAX_TEXT_CHARS).
        limit: usize,
    },
}

impl ClientError {
    /// The protocol error code, if this is a server error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether repeating the same request (with the same ids) may succeed: transport
    /// failures, timeouts, disconnects, `UNAVAILABLE`, `RATE_LIMITED`, `GOING_AWAY`.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::WebSocket { .. }
            | ClientError::Timeout { .. }
            | ClientError::Disconnected { .. } => true,
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::GoingAway
            ),
            _ => false,
        }
    }

    /// For a retryable server error, how long the server asked to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after_ms, .. } if *retry_after_ms > 0 => {
                Some(Duration::from_millis(*retry_after_ms))
            }
            _ => None,
        }
    }

    /// Builds the error for a protocol `Error` frame.
    pub(crate) fn from_frame(error: &parley_proto::v1::Error) -> Self {
        ClientError::Server {
            code: ErrorCode::try_from(error.code).unwrap_or(ErrorCode::Unspecified),
            message: error.message.clone(),
            retry_after_ms: error.retry_after_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_show_the_protocol_code_name() {
        let err = ClientError::from_frame(&parley_proto::v1::Error {
            request_id: 7,
            code: ErrorCode::RateLimited as i32,
            message: "slow down".into(),
            retry_after_ms: 250,
        });
        assert_eq!(err.to_string(), "server error RATE_LIMITED: slow down");
        assert!(err.is_retryable());
        assert_eq!(err.retry_after(), Some(Duration::from_millis(250)));
        assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    }

    #[test]
    fn unknown_codes_become_unspecified_and_are_final() {
        let err = ClientError::from_frame(&parley_proto::v1::Error {
            request_id: 1,
            code: 999,
            message: String::new(),
            retry_after_ms: 0,
        });
        assert_eq!(err.code(), Some(ErrorCode::Unspecified));
        assert!(!err.is_retryable());
        assert_eq!(err.retry_after(), None);
    }
}
