//! Errors returned to clients and peers, each with a stable code.
//!
//! On the wire an error is a gRPC status whose metadata key `parley-error` holds
//! [`ApiError::code`]; `parley-epoch` and `parley-leader` carry hints where useful.
//! Inside a stream (`AppendStream`), where there is no status per message, the same
//! parts travel as a [`WireError`].

use parley_proto::node::v1::WireError;
use parley_proto::{EPOCH_KEY, ERROR_CODE_KEY, LEADER_KEY};
use tonic::{Code, Status};

use crate::placement::{GroupId, NodeId, PlacementError};

/// An error answered to a client or peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, empty, too long or malformed. Not retryable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The payload is larger than the configured limit. Not retryable.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    /// The node is not the leader and could not forward. Retry (on another node).
    #[error("group {group} has no reachable leader (last known: {leader:?})")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    /// The request was routed with an old placement; refresh and retry.
    #[error("slot moved; placement epoch is now {epoch}")]
    Moved { epoch: u64 },
    /// The cluster has not been bootstrapped yet.
    #[error("cluster not bootstrapped")]
    NotBootstrapped,
    /// The node is out of disk space and refuses writes; its data is intact. Retry elsewhere.
    #[error("disk full on node {node}: writes refused")]
    DiskFull { node: NodeId },
    /// The operation did not complete within its deadline; it may or may not have happened
    /// (retry with the same idempotency key).
    #[error("timed out: {0}")]
    Timeout(String),
    /// A transient failure (peer down, group electing). Retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A placement change was refused.
    #[error("refused: {0}")]
    Refused(#[from] PlacementError),
    /// Fault injection is disabled on this node.
    #[error("fault injection is disabled on this node")]
    FaultInjectionDisabled,
    #[error("internal error: {0}")]
    Internal(String),
    /// A peer's non-retryable error, passed through unchanged when forwarding.
    #[error("{message}")]
    Forwarded {
        code: String,
        grpc_code: i32,
        message: String,
    },
}

impl ApiError {
    /// The stable error code sent in `parley-error`.
    pub fn code(&self) -> &str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::Moved { .. } => "moved",
            ApiError::NotBootstrapped => "not_bootstrapped",
            ApiError::DiskFull { .. } => "disk_full",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Refused(_) => "refused",
            ApiError::FaultInjectionDisabled => "fault_injection_disabled",
            ApiError::Internal(_) => "internal",
            ApiError::Forwarded { code, .. } => code,
        }
    }

    /// Whether a client may retry the same request (with the same idempotency key).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NotLeader { .. }
                | ApiError::Moved { .. }
                | ApiError::Timeout(_)
                | ApiError::Unavailable(_)
        )
    }

    fn grpc_code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::PayloadTooLarge { .. } => Code::OutOfRange,
            ApiError::NotLeader { .. } | ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Moved { .. } => Code::Aborted,
            ApiError::NotBootstrapped | ApiError::Refused(_) => Code::FailedPrecondition,
            ApiError::DiskFull { .. } => Code::ResourceExhausted,
            ApiError::Timeout(_) => Code::DeadlineExceeded,
            ApiError::FaultInjectionDisabled => Code::PermissionDenied,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Forwarded { grpc_code, .. } => Code::from_i32(*grpc_code),
        }
    }

    /// Keeps a peer's status as it is, to hand back to the caller.
    pub fn forwarded(status: &Status) -> ApiError {
        Self::forwarded_wire(&wire_of_status(status))
    }

    /// Keeps a peer's streamed error as it is, to hand back to the caller.
    pub fn forwarded_wire(w: &WireError) -> ApiError {
        ApiError::Forwarded {
            code: if w.code.is_empty() {
                "internal".to_string()
            } else {
                w.code.clone()
            },
            grpc_code: w.grpc_code,
            message: w.message.clone(),
        }
    }

    /// Rebuilds an error from a peer's status (used when forwarding).
    pub fn from_status(status: &Status) -> ApiError {
        Self::from_wire(&wire_of_status(status))
    }

    /// Rebuilds an error from a peer's streamed error (used when forwarding).
    pub fn from_wire(w: &WireError) -> ApiError {
        let msg = w.message.clone();
        match w.code.as_str() {
            "invalid_argument" => ApiError::InvalidArgument(msg),
            "payload_too_large" => ApiError::InvalidArgument(msg),
            "not_leader" => ApiError::NotLeader {
                group: 0,
                leader: (w.leader != 0).then_some(w.leader),
            },
            "moved" => ApiError::Moved { epoch: w.epoch },
            "not_bootstrapped" => ApiError::NotBootstrapped,
            "disk_full" => ApiError::DiskFull { node: 0 },
            "timeout" => ApiError::Timeout(msg),
            "refused" => ApiError::Internal(msg),
            "internal" => ApiError::Internal(msg),
            _ => match Code::from_i32(w.grpc_code) {
                Code::DeadlineExceeded => ApiError::Timeout(msg),
                c => ApiError::Unavailable(format!("{c}: {msg}")),
            },
        }
    }

    /// The error as carried inside a stream.
    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code().to_string(),
            message: self.to_string(),
            grpc_code: self.grpc_code() as i32,
            epoch: match self {
                ApiError::Moved { epoch } => *epoch,
                _ => 0,
            },
            leader: match self {
                ApiError::NotLeader {
                    leader: Some(l), ..
                } => *l,
                _ => 0,
            },
        }
    }
}

/// The parts of a status that [`ApiError`] is rebuilt from.
fn wire_of_status(status: &Status) -> WireError {
    let meta = |key: &str| {
        status
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let num = |key: &str| meta(key).and_then(|v| v.parse().ok()).unwrap_or(0);
    WireError {
        code: meta(ERROR_CODE_KEY).unwrap_or_default(),
        message: status.message().to_string(),
        grpc_code: status.code() as i32,
        epoch: num(EPOCH_KEY),
        leader: num(LEADER_KEY),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let mut status = Status::new(e.grpc_code(), e.to_string());
        if let Ok(code) = e.code().parse() {
            status.metadata_mut().insert(ERROR_CODE_KEY, code);
        }
        match &e {
            ApiError::Moved { epoch } => {
                if let Ok(v) = epoch.to_string().parse() {
                    status.metadata_mut().insert(EPOCH_KEY, v);
                }
            }
            ApiError::NotLeader {
                leader: Some(l), ..
            } => {
                if let Ok(v) = l.to_string().parse() {
                    status.metadata_mut().insert(LEADER_KEY, v);
                }
            }
            _ => {}
        }
        status
    }
}
