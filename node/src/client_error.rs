//! Errors answered to WebSocket clients: a protocol [`ErrorCode`] (docs/protocol.md,
//! "Error codes"), a human-readable message, and a retry hint.

use parley_proto::v1::{Error as ErrorFrame, ErrorCode};

use crate::error::ApiError;

/// A request refused with a documented code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ClientError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: u64,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ClientError {
        ClientError {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ClientError {
        ClientError::new(ErrorCode::InvalidArgument, message)
    }

    /// The error frame answering request `request_id`.
    pub fn to_frame(&self, request_id: u64) -> ErrorFrame {
        ErrorFrame {
            request_id,
            code: self.code as i32,
            message: self.message.clone(),
            retry_after_ms: self.retry_after_ms,
        }
    }

    /// The code as a metric label.
    pub fn label(&self) -> &'static str {
        self.code.as_str_name()
    }
}

impl From<ApiError> for ClientError {
    fn from(e: ApiError) -> ClientError {
        let code = match &e {
            ApiError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            ApiError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            ApiError::Forwarded { code, .. } if code == "payload_too_large" => {
                ErrorCode::PayloadTooLarge
            }
            ApiError::Forwarded { code, .. } if code == "invalid_argument" => {
                ErrorCode::InvalidArgument
            }
            ApiError::Internal(_) => ErrorCode::Internal,
            // Leader changes, moved slots, full disks, timeouts: the cluster could not
            // serve it now; the same request may be retried.
            _ => ErrorCode::Unavailable,
        };
        let retry_after_ms = if code == ErrorCode::Unavailable {
            500
        } else {
            0
        };
        ClientError {
            code,
            message: e.to_string(),
            retry_after_ms,
        }
    }
}
