//! The client side of `ConversationLog.AppendStream`: many appends in flight on one
//! long-lived gRPC stream, each matched to its reply by id.
//!
//! A unary call costs a new HTTP/2 stream, a header block each way and a trip through
//! the whole tower stack; on a stream an append is one length-prefixed message, and
//! messages queued together leave in one write. Nodes use this to forward appends to a
//! group's leader ([`crate::conversation`]); benchmarks and tests use it as a client.
//!
//! The stream is opened on the first append and again after it breaks. When it breaks,
//! every append still waiting fails with a retryable `unavailable`: it may or may not
//! have been committed, and a retry with the same idempotency key is safe.

use std::collections::HashMap;
use std::time::Duration;

use parley_proto::node::v1::append_stream_reply::Result as StreamResult;
use parley_proto::node::v1::conversation_log_client::ConversationLogClient;
use parley_proto::node::v1::{AppendReply, AppendRequest, AppendStreamReply, AppendStreamRequest};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::error::ApiError;

/// Appends queued for the stream task; beyond this, callers wait (backpressure).
const QUEUE: usize = 4096;
/// Largest message accepted on the stream, both ways.
const MAX_MESSAGE: usize = 16 << 20;

type Waiter = oneshot::Sender<Result<AppendReply, ApiError>>;

/// A handle to one stream of appends to one node; cheap to clone.
#[derive(Clone, Debug)]
pub struct AppendStreamClient {
    tx: mpsc::Sender<(AppendRequest, Waiter)>,
}

impl AppendStreamClient {
    /// A client for the node behind `channel`; the stream opens on first use. `label`
    /// names the peer in errors.
    pub fn new(channel: Channel, label: impl Into<String>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drive(channel, label.into(), rx));
        AppendStreamClient { tx }
    }

    /// Appends and waits for the reply, at most `timeout`.
    pub async fn append(
        &self,
        req: AppendRequest,
        timeout: Duration,
    ) -> Result<AppendReply, ApiError> {
        let (done_tx, done_rx) = oneshot::channel();
        let work = async {
            self.tx
                .send((req, done_tx))
                .await
                .map_err(|_| ApiError::Unavailable("append stream task stopped".into()))?;
            done_rx
                .await
                .map_err(|_| ApiError::Unavailable("append stream task stopped".into()))?
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout(format!(
                "no reply on the append stream within {timeout:?}"
            ))),
        }
    }

    /// Whether the stream task has stopped (every handle but this one dropped it).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Ids and the queue of the stream being written.
struct Outbox {
    next_id: u64,
    tx: mpsc::Sender<AppendStreamRequest>,
}

impl Outbox {
    /// Queues `req` on the stream and records who waits for its reply.
    fn push(&mut self, req: AppendRequest, waiter: Waiter, pending: &mut HashMap<u64, Waiter>) {
        let id = self.next_id;
        self.next_id += 1;
        let msg = AppendStreamRequest {
            id,
            append: Some(req),
        };
        // The queue is drained by the HTTP/2 stream; a full queue means the peer stopped
        // reading, which the inbound side reports soon.
        match self.tx.try_send(msg) {
            Ok(()) => {
                pending.insert(id, waiter);
            }
            Err(e) => {
                let _ = waiter.send(Err(ApiError::Unavailable(format!(
                    "append stream is backed up or closed: {e}"
                ))));
            }
        }
    }
}

/// Owns the stream: sends queued appends, matches replies, reopens after a failure.
async fn drive(channel: Channel, label: String, mut rx: mpsc::Receiver<(AppendRequest, Waiter)>) {
    let mut next_id: u64 = 1;
    // Wait for work before opening a stream, and again after each failure.
    while let Some((req, waiter)) = rx.recv().await {
        let (out_tx, out_rx) = mpsc::channel::<AppendStreamRequest>(QUEUE);
        let mut outbox = Outbox {
            next_id,
            tx: out_tx,
        };
        let mut pending: HashMap<u64, Waiter> = HashMap::new();
        outbox.push(req, waiter, &mut pending);
        let mut client = ConversationLogClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let opened = client.append_stream(ReceiverStream::new(out_rx)).await;
        let mut inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(status) => {
                next_id = outbox.next_id;
                let e = ApiError::Unavailable(format!(
                    "opening the append stream to {label}: {}",
                    status.message()
                ));
                fail_all(&mut pending, &e);
                continue;
            }
        };
        let broken = loop {
            tokio::select! {
                biased;
                reply = inbound.message() => match reply {
                    Ok(Some(r)) => resolve(&mut pending, r),
                    Ok(None) => break format!("append stream to {label} ended"),
                    Err(status) => {
                        break format!("append stream to {label} failed: {}", status.message())
                    }
                },
                next = rx.recv() => match next {
                    Some((req, waiter)) => outbox.push(req, waiter, &mut pending),
                    None => {
                        // Every handle dropped: finish what is in flight, then stop.
                        drop(outbox);
                        while !pending.is_empty() {
                            match inbound.message().await {
                                Ok(Some(r)) => resolve(&mut pending, r),
                                _ => break,
                            }
                        }
                        fail_all(&mut pending, &ApiError::Unavailable("append stream closed".into()));
                        return;
                    }
                },
            }
        };
        next_id = outbox.next_id;
        fail_all(&mut pending, &ApiError::Unavailable(broken));
    }
}

fn resolve(pending: &mut HashMap<u64, Waiter>, reply: AppendStreamReply) {
    let Some(waiter) = pending.remove(&reply.id) else {
        return;
    };
    let result = match reply.result {
        Some(StreamResult::Ok(ok)) => Ok(ok),
        Some(StreamResult::Error(e)) => Err(if ApiError::from_wire(&e).is_retryable() {
            ApiError::from_wire(&e)
        } else {
            ApiError::forwarded_wire(&e)
        }),
        None => Err(ApiError::Internal(
            "append stream reply without a result".into(),
        )),
    };
    let _ = waiter.send(result);
}

fn fail_all(pending: &mut HashMap<u64, Waiter>, e: &ApiError) {
    for (_, waiter) in pending.drain() {
        let _ = waiter.send(Err(e.clone()));
    }
}
