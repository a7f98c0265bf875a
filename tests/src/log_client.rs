//! A retrying client of the `ConversationLog` service over several nodes.
//!
//! Any node accepts any request and forwards it to the right group leader, so
//! the client simply rotates through its endpoints: each call starts at the next
//! endpoint in turn and moves on after every retryable failure, backing off
//! exponentially until the call's deadline. Retrying an append is safe because
//! `(conversation, sender, client_msg_id)` is an idempotency key.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parley_proto::node::v1::conversation_log_client::ConversationLogClient;
use parley_proto::node::v1::{AppendReply, AppendRequest, ReadReply, ReadRequest};
use rand::Rng as _;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

/// Typed Parley error codes (metadata [`parley_proto::ERROR_CODE_KEY`]) after
/// which a call is retried, possibly on another node.
pub const RETRYABLE_ERROR_CODES: &[&str] = &["not_leader", "moved", "unavailable", "timeout"];

/// The typed Parley error code of a failed call, if the server attached one.
pub fn error_code(status: &Status) -> Option<&str> {
    status
        .metadata()
        .get(parley_proto::ERROR_CODE_KEY)
        .and_then(|value| value.to_str().ok())
}

/// Whether a failed call may succeed if repeated, here or on another node.
///
/// With a typed Parley error code, only [`RETRYABLE_ERROR_CODES`] are
/// retryable (`payload_too_large`, `invalid_argument`, `disk_full`, … are
/// not). Without one the failure happened in transport, and it is retryable
/// when its gRPC code says so: `Unavailable` (connection refused or reset),
/// `DeadlineExceeded`, `Cancelled` (tonic's client-side timeout) and `Unknown`
/// (a connection that broke mid-call).
pub fn is_retryable(status: &Status) -> bool {
    match error_code(status) {
        Some(code) => RETRYABLE_ERROR_CODES.contains(&code),
        None => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
    }
}

/// How long and how often [`LogClient`] retries a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total time budget of one call, all attempts and back-off included.
    pub deadline: Duration,
    /// Time limit of a single attempt (capped by what is left of `deadline`).
    pub attempt_timeout: Duration,
    /// Back-off after the first failed attempt; doubled after each further one.
    pub initial_backoff: Duration,
    /// Upper bound of the back-off.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 10 s per call, 2 s per attempt, back-off from 20 ms up to 500 ms.
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// A `ConversationLog` client over a list of node endpoints that retries
/// retryable failures (see [`is_retryable`]) according to a [`RetryPolicy`].
///
/// Cloning is cheap and clones share connections and the rotation counter.
#[derive(Debug, Clone)]
pub struct LogClient {
    clients: Arc<[ConversationLogClient<Channel>]>,
    next: Arc<AtomicUsize>,
    policy: RetryPolicy,
}

impl LogClient {
    /// A client for the given endpoints (`http://host:port`), connecting lazily.
    pub fn new<I, S>(endpoints: I) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let channels = endpoints
            .into_iter()
            .map(|uri| {
                let uri = uri.as_ref();
                let endpoint = Endpoint::from_shared(uri.to_owned())
                    .with_context(|| format!("invalid endpoint {uri:?}"))?;
                Ok(endpoint
                    .connect_timeout(Duration::from_secs(1))
                    .tcp_nodelay(true)
                    .connect_lazy())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !channels.is_empty(),
            "a LogClient needs at least one endpoint"
        );
        Ok(Self::from_channels(channels))
    }

    /// A client over existing channels; `channels` must not be empty.
    pub(crate) fn from_channels(channels: Vec<Channel>) -> Self {
        Self {
            clients: channels
                .into_iter()
                .map(ConversationLogClient::new)
                .collect(),
            next: Arc::new(AtomicUsize::new(0)),
            policy: RetryPolicy::default(),
        }
    }

    /// The same client with another retry policy.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The retry policy in force.
    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// Appends a message, retrying retryable failures until the deadline.
    ///
    /// Returns the last error when the deadline passes, or the first
    /// non-retryable one.
    pub async fn append(
        &self,
        conversation_id: &str,
        sender: &str,
        client_msg_id: &str,
        payload: &[u8],
    ) -> Result<AppendReply, Status> {
        self.call(|mut client, timeout| {
            let mut request = Request::new(AppendRequest {
                conversation_id: conversation_id.to_owned(),
                sender: sender.to_owned(),
                client_msg_id: client_msg_id.to_owned(),
                payload: payload.to_vec(),
                hops: 0,
            });
            request.set_timeout(timeout);
            async move { client.append(request).await }
        })
        .await
    }

    /// Reads up to `limit` entries from `from_seq` on, retrying like [`append`](Self::append).
    pub async fn read(
        &self,
        conversation_id: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<ReadReply, Status> {
        self.call(|mut client, timeout| {
            let mut request = Request::new(ReadRequest {
                conversation_id: conversation_id.to_owned(),
                from_seq,
                limit,
                hops: 0,
            });
            request.set_timeout(timeout);
            async move { client.read(request).await }
        })
        .await
    }

    /// Runs `attempt` (given a client and the attempt's time limit) until it
    /// succeeds, fails for good, or the policy's deadline passes.
    async fn call<T, F, Fut>(&self, mut attempt: F) -> Result<T, Status>
    where
        F: FnMut(ConversationLogClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.policy.deadline;
        let mut index = self.next.fetch_add(1, Ordering::Relaxed);
        let mut backoff = self.policy.initial_backoff;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let client = self.clients[index % self.clients.len()].clone();
            let status = match attempt(client, self.policy.attempt_timeout.min(left)).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if !is_retryable(&status) {
                return Err(status);
            }
            // Full jitter in [backoff/2, backoff] keeps many clients from retrying in step.
            let pause = rand::rng().random_range(backoff / 2..=backoff);
            if Instant::now() + pause >= deadline {
                return Err(status);
            }
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.policy.max_backoff);
            index = index.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn with_code(code: Code, parley_code: &'static str) -> Status {
        let mut status = Status::new(code, "test");
        status.metadata_mut().insert(
            parley_proto::ERROR_CODE_KEY,
            MetadataValue::from_static(parley_code),
        );
        status
    }

    #[test]
    fn typed_codes_decide_retryability() {
        for code in RETRYABLE_ERROR_CODES {
            assert!(is_retryable(&with_code(Code::Unavailable, code)), "{code}");
        }
        for code in ["payload_too_large", "invalid_argument", "disk_full"] {
            // Even on a gRPC code that would otherwise be retried.
            assert!(!is_retryable(&with_code(Code::Unavailable, code)), "{code}");
        }
        assert_eq!(
            error_code(&with_code(Code::FailedPrecondition, "moved")),
            Some("moved")
        );
    }

    #[test]
    fn transport_failures_are_retryable() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
        ] {
            assert!(is_retryable(&Status::new(code, "transport")), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            assert!(!is_retryable(&Status::new(code, "server")), "{code:?}");
        }
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_when_nothing_listens() -> anyhow::Result<()> {
        let port = crate::process::free_loopback_ports(1)?[0];
        let client =
            LogClient::new([format!("http://127.0.0.1:{port}")])?.with_policy(RetryPolicy {
                deadline: Duration::from_millis(300),
                attempt_timeout: Duration::from_millis(100),
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(40),
            });
        let started = Instant::now();
        let status = client
            .append("c", "s", "m", b"x")
            .await
            .expect_err("nothing listens on the port");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(started.elapsed() < Duration::from_secs(2));
        Ok(())
    }

    #[test]
    fn rejects_an_empty_endpoint_list() {
        assert!(LogClient::new(Vec::<String>::new()).is_err());
    }
}
