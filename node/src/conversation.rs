//! The conversation-log service: append and read, and the messaging state beside the
//! log (cursors, accounts, conversation indexes), accepted by any node and carried to
//! the leader of the shard group that owns the routing key's slot.
//!
//! The gateway calls the same entry points in process ([`ConversationService::append_entry`],
//! [`ConversationService::propose`], ...); peers reach them over gRPC.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use openraft::ReadPolicy;
use parley_proto::node::v1::append_stream_reply::Result as StreamResult;
use parley_proto::node::v1::conversation_log_client::ConversationLogClient;
use parley_proto::node::v1::conversation_log_server::ConversationLog;
use parley_proto::node::v1::{
    AppendReply, AppendRequest, AppendStreamReply, AppendStreamRequest, LogEntry, ProposeReply,
    ProposeRequest, QueryReply, QueryRequest, ReadReply, ReadRequest,
};
use tokio::sync::{mpsc, watch, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::append_stream::AppendStreamClient;
use crate::cluster::{backoff, Cluster};
use crate::error::ApiError;
use crate::messaging_state::{MessagingOp, MessagingQuery, MessagingResponse, QueryResult};
use crate::placement::{slot_of, GroupId, NodeId};
use crate::state_machine::GroupStateMachine;
use crate::types::{decode, encode, AppendCommand, Command, CommandResponse};

/// Longest accepted conversation id, sender and idempotency key, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Most entries one read returns.
pub const MAX_READ_LIMIT: u32 = 1_000;
/// Forwarding hops before a request gives up on this path and lets the caller retry.
const MAX_HOPS: u32 = 2;
/// Appends of one `AppendStream` served at once; the stream is not read further meanwhile.
const STREAM_IN_FLIGHT: usize = 4096;

/// The conversation-log service of one node.
pub struct ConversationService {
    pub cluster: Arc<Cluster>,
    /// This service, for the tasks that serve streamed appends.
    me: Weak<ConversationService>,
    /// Append streams to the peers this node forwards to, by node id (and address).
    streams: Mutex<HashMap<NodeId, (String, AppendStreamClient)>>,
    /// Becomes true when the node stops: served append streams end at once, so that the
    /// gRPC server's graceful shutdown is not held open by peers' long-lived streams.
    stopping: watch::Receiver<bool>,
}

fn check_id(field: &str, value: &str, allow_empty: bool) -> Result<(), ApiError> {
    if value.is_empty() && !allow_empty {
        return Err(ApiError::InvalidArgument(format!("{field} is empty")));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "{field} is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Checks an append before anything is proposed.
pub fn validate_append(req: &AppendRequest, max_payload: usize) -> Result<(), ApiError> {
    check_id("conversation_id", &req.conversation_id, false)?;
    check_id("sender", &req.sender, false)?;
    check_id("client_msg_id", &req.client_msg_id, false)?;
    if req.payload.len() > max_payload {
        return Err(ApiError::PayloadTooLarge {
            size: req.payload.len(),
            limit: max_payload,
        });
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What one attempt produced: a reply, or an error and whether to retry.
enum Attempt<T> {
    Done(T),
    Retry(ApiError),
}

impl ConversationService {
    pub fn new(cluster: Arc<Cluster>, stopping: watch::Receiver<bool>) -> Arc<ConversationService> {
        Arc::new_cyclic(|me| ConversationService {
            cluster,
            me: me.clone(),
            streams: Mutex::new(HashMap::new()),
            stopping,
        })
    }

    /// The append stream to `node`, opened on first use and reused by every group.
    fn stream_to(&self, node: NodeId) -> Result<AppendStreamClient, ApiError> {
        let addr = self
            .cluster
            .node_addr(node)
            .ok_or_else(|| ApiError::Unavailable(format!("address of node {node} unknown")))?;
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, client)) = streams.get(&node) {
            if *a == addr && !client.is_closed() {
                return Ok(client.clone());
            }
        }
        let channel = self.cluster.channel_to(node)?;
        let client = AppendStreamClient::new(channel, format!("node {node}"));
        streams.insert(node, (addr, client.clone()));
        Ok(client)
    }

    fn group_for(&self, conversation: &str) -> Result<(GroupId, u32), ApiError> {
        let placement = self.cluster.placement();
        if placement.epoch == 0 {
            if self.cluster.replicas.restarted() {
                // A restarted node re-applies its metadata log before it knows the map.
                return Err(ApiError::Unavailable(
                    "placement map not loaded yet after a restart".into(),
                ));
            }
            return Err(ApiError::NotBootstrapped);
        }
        let slot = slot_of(conversation);
        let (group, _) = placement.group_for_slot(slot).ok_or(ApiError::Moved {
            epoch: placement.epoch,
        })?;
        Ok((group, slot))
    }

    /// Runs `attempt` until it succeeds, fails for good, or the deadline passes.
    async fn with_retries<T, F, Fut>(&self, mut attempt: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ApiError>>,
    {
        let deadline = Instant::now() + self.cluster.request_timeout();
        let mut n = 0;
        loop {
            match attempt().await? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(e) => {
                    if Instant::now() + backoff(n) >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(backoff(n)).await;
                    n += 1;
                }
            }
        }
    }

    fn classify<T>(e: ApiError) -> Result<Attempt<T>, ApiError> {
        if e.is_retryable() {
            Ok(Attempt::Retry(e))
        } else {
            Err(e)
        }
    }

    async fn append_once(&self, req: &AppendRequest) -> Result<Attempt<AppendReply>, ApiError> {
        let (group, slot) = match self.group_for(&req.conversation_id) {
            Ok(v) => v,
            Err(e) => return Self::classify(e),
        };
        if let Some(raft) = self.cluster.local_leader(group) {
            let cmd = Command::Append(AppendCommand {
                conversation: req.conversation_id.clone(),
                sender: req.sender.clone(),
                client_msg_id: req.client_msg_id.clone(),
                slot,
                proposed_at_ms: now_ms(),
                payload: req.payload.clone(),
            });
            return match self.cluster.propose_local(group, &raft, cmd).await {
                Ok(CommandResponse::Appended {
                    seq,
                    server_time_ms,
                    duplicate,
                }) => {
                    let result = if duplicate { "duplicate" } else { "ok" };
                    self.cluster
                        .metrics
                        .appends_total
                        .with_label_values(&[result])
                        .inc();
                    Ok(Attempt::Done(AppendReply {
                        seq,
                        server_time_ms,
                        duplicate,
                        group_id: group,
                    }))
                }
                Ok(CommandResponse::Moved { epoch }) => {
                    Ok(Attempt::Retry(ApiError::Moved { epoch }))
                }
                Ok(other) => Err(ApiError::Internal(format!(
                    "unexpected append response {other:?}"
                ))),
                Err(e) => Self::classify(e),
            };
        }
        self.forward_append(group, req).await
    }

    /// Sends an append this node cannot serve to the node it believes leads `group`, on
    /// the append stream to that node, once; the caller's retry loop handles the rest.
    async fn forward_append(
        &self,
        group: GroupId,
        req: &AppendRequest,
    ) -> Result<Attempt<AppendReply>, ApiError> {
        let Some(target) = self.begin_forward(group, req.hops, "append") else {
            return Ok(Attempt::Retry(ApiError::NotLeader {
                group,
                leader: None,
            }));
        };
        let stream = match self.stream_to(target) {
            Ok(s) => s,
            Err(e) => return Self::forward_failed(&self.cluster, group, target, e),
        };
        let mut fwd = req.clone();
        fwd.hops += 1;
        match stream.append(fwd, self.cluster.request_timeout()).await {
            Ok(reply) => {
                self.cluster.note_leader(group, Some(target));
                Ok(Attempt::Done(reply))
            }
            Err(e) => Self::forward_error(&self.cluster, group, target, e),
        }
    }

    /// Sends a request this node cannot serve to the node it believes leads `group`,
    /// once; the caller's retry loop handles what comes back.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        group: GroupId,
        hops: u32,
        service: &str,
        fwd: Req,
        call: F,
    ) -> Result<Attempt<Resp>, ApiError>
    where
        F: FnOnce(ConversationLogClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
    {
        let Some(target) = self.begin_forward(group, hops, service) else {
            return Ok(Attempt::Retry(ApiError::NotLeader {
                group,
                leader: None,
            }));
        };
        let channel = match self.cluster.channel_to(target) {
            Ok(c) => c,
            Err(e) => return Self::forward_failed(&self.cluster, group, target, e),
        };
        let mut request = Request::new(fwd);
        request.set_timeout(self.cluster.request_timeout());
        match call(ConversationLogClient::new(channel), request).await {
            Ok(reply) => {
                self.cluster.note_leader(group, Some(target));
                Ok(Attempt::Done(reply.into_inner()))
            }
            Err(status) => Self::forward_status(&self.cluster, group, target, status),
        }
    }

    /// The node to forward a `service` request for `group` to, counted in the forwarding
    /// metric; `None` when out of hops.
    fn begin_forward(&self, group: GroupId, hops: u32, service: &str) -> Option<NodeId> {
        let target = self.forward_target(group, hops)?;
        self.cluster
            .metrics
            .forwarded_total
            .with_label_values(&[service])
            .inc();
        Some(target)
    }

    /// Where to send a request for `group` this node cannot serve, or `None` when out of hops.
    fn forward_target(&self, group: GroupId, hops: u32) -> Option<NodeId> {
        if hops >= MAX_HOPS {
            return None;
        }
        self.cluster
            .leader_of(group)
            .filter(|l| *l != self.cluster.node_id())
            .or_else(|| {
                // No leader known: ask another voter, which may know.
                let p = self.cluster.placement();
                p.groups
                    .get(&group)?
                    .voters
                    .iter()
                    .copied()
                    .find(|v| *v != self.cluster.node_id())
            })
    }

    fn forward_failed<T>(
        cluster: &Cluster,
        group: GroupId,
        target: NodeId,
        e: ApiError,
    ) -> Result<Attempt<T>, ApiError> {
        // Rotate to another voter next time.
        let voters = cluster
            .placement()
            .groups
            .get(&group)
            .map(|g| g.voters.clone())
            .unwrap_or_default();
        let next = voters
            .iter()
            .position(|v| *v == target)
            .map(|i| voters[(i + 1) % voters.len()]);
        cluster.note_leader(group, next);
        Ok(Attempt::Retry(e))
    }

    fn forward_status<T>(
        cluster: &Cluster,
        group: GroupId,
        target: NodeId,
        status: Status,
    ) -> Result<Attempt<T>, ApiError> {
        let e = ApiError::from_status(&status);
        if !e.is_retryable() {
            // Pass the peer's typed error through unchanged.
            return Err(ApiError::forwarded(&status));
        }
        Self::forward_error(cluster, group, target, e)
    }

    /// What to do after a forwarded request failed with `e` at (or on the way to) `target`.
    fn forward_error<T>(
        cluster: &Cluster,
        group: GroupId,
        target: NodeId,
        e: ApiError,
    ) -> Result<Attempt<T>, ApiError> {
        if !e.is_retryable() {
            return Err(e);
        }
        match &e {
            ApiError::NotLeader {
                leader: Some(l), ..
            } if *l != target => cluster.note_leader(group, Some(*l)),
            _ => return Self::forward_failed(cluster, group, target, e),
        }
        Ok(Attempt::Retry(e))
    }

    async fn read_once(&self, req: &ReadRequest) -> Result<Attempt<ReadReply>, ApiError> {
        let (group, _) = match self.group_for(&req.conversation_id) {
            Ok(v) => v,
            Err(e) => return Self::classify(e),
        };
        if let Some(raft) = self.cluster.local_leader(group) {
            // Linearizable: confirm leadership with a quorum, then wait until applied.
            if let Err(e) = raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                return Ok(Attempt::Retry(ApiError::NotLeader {
                    group,
                    leader: e.forward_to_leader().and_then(|f| f.leader_id),
                }));
            }
            let engine = self.cluster.replicas.engine().clone();
            let (conv, from, limit) = (
                req.conversation_id.clone(),
                req.from_seq,
                req.limit.min(MAX_READ_LIMIT) as usize,
            );
            let (entries, last_seq) = tokio::task::spawn_blocking(move || {
                GroupStateMachine::read_conversation(&engine, group, &conv, from, limit)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            let entries = entries
                .into_iter()
                .map(|(seq, m)| LogEntry {
                    seq,
                    sender: m.sender,
                    client_msg_id: m.client_msg_id,
                    server_time_ms: m.server_time_ms,
                    payload: m.payload,
                })
                .collect();
            return Ok(Attempt::Done(ReadReply { entries, last_seq }));
        }
        let mut fwd = req.clone();
        fwd.hops += 1;
        self.forward(
            group,
            req.hops,
            "read",
            fwd,
            |mut client, request| async move { client.read(request).await },
        )
        .await
    }

    /// Runs `once` a single time for a forwarded request (the first node owns the retry
    /// loop), or with retries until the deadline for a request that starts here.
    async fn serve<T, F, Fut>(&self, hops: u32, mut once: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ApiError>>,
    {
        if hops > 0 {
            return match once().await? {
                Attempt::Done(r) => Ok(r),
                Attempt::Retry(e) => Err(e),
            };
        }
        self.with_retries(once).await
    }

    /// Validates and appends; returns once the entry is committed and applied.
    pub async fn append_entry(&self, req: AppendRequest) -> Result<AppendReply, ApiError> {
        let res = async {
            validate_append(&req, self.cluster.config.max_payload_bytes)?;
            if self.cluster.replicas.engine().is_disk_full() {
                return Err(ApiError::DiskFull {
                    node: self.cluster.node_id(),
                });
            }
            self.serve(req.hops, || self.append_once(&req)).await
        }
        .await;
        if let Err(e) = &res {
            self.record_error("append", e);
        }
        res
    }

    /// Reads entries (linearizable, at the group's leader).
    pub async fn read_entries(&self, req: ReadRequest) -> Result<ReadReply, ApiError> {
        let res = async {
            check_id("conversation_id", &req.conversation_id, false)?;
            if req.limit == 0 {
                return Err(ApiError::InvalidArgument("limit must be at least 1".into()));
            }
            self.serve(req.hops, || self.read_once(&req)).await
        }
        .await;
        if let Err(e) = &res {
            self.record_error("read", e);
        }
        res
    }

    /// Commits a messaging op in the group owning `routing_key` and returns its result.
    pub async fn propose(
        &self,
        routing_key: &str,
        op: &MessagingOp,
    ) -> Result<MessagingResponse, ApiError> {
        let req = ProposeRequest {
            routing_key: routing_key.into(),
            op: encode(op).map_err(|e| ApiError::Internal(e.to_string()))?,
            hops: 0,
        };
        let reply = self.propose_request(req).await?;
        decode(&reply.response).map_err(|e| ApiError::Internal(format!("propose reply: {e}")))
    }

    /// Reads messaging state in the group owning `routing_key` (linearizable).
    pub async fn query(
        &self,
        routing_key: &str,
        q: &MessagingQuery,
    ) -> Result<QueryResult, ApiError> {
        let req = QueryRequest {
            routing_key: routing_key.into(),
            query: encode(q).map_err(|e| ApiError::Internal(e.to_string()))?,
            hops: 0,
        };
        let reply = self.query_request(req).await?;
        decode(&reply.result).map_err(|e| ApiError::Internal(format!("query reply: {e}")))
    }

    async fn propose_request(&self, req: ProposeRequest) -> Result<ProposeReply, ApiError> {
        let res = async {
            check_id("routing_key", &req.routing_key, false)?;
            let op: MessagingOp = decode(&req.op)
                .map_err(|e| ApiError::InvalidArgument(format!("undecodable op: {e}")))?;
            if self.cluster.replicas.engine().is_disk_full() {
                return Err(ApiError::DiskFull {
                    node: self.cluster.node_id(),
                });
            }
            self.serve(req.hops, || self.propose_once(&req, &op)).await
        }
        .await;
        if let Err(e) = &res {
            self.record_error("propose", e);
        }
        res
    }

    async fn propose_once(
        &self,
        req: &ProposeRequest,
        op: &MessagingOp,
    ) -> Result<Attempt<ProposeReply>, ApiError> {
        let (group, slot) = match self.group_for(&req.routing_key) {
            Ok(v) => v,
            Err(e) => return Self::classify(e),
        };
        if let Some(raft) = self.cluster.local_leader(group) {
            let cmd = Command::Messaging {
                slot,
                op: op.clone(),
            };
            return match self.cluster.propose_local(group, &raft, cmd).await {
                Ok(CommandResponse::Messaging(r)) => Ok(Attempt::Done(ProposeReply {
                    response: encode(&r).map_err(|e| ApiError::Internal(e.to_string()))?,
                })),
                Ok(CommandResponse::Moved { epoch }) => {
                    Ok(Attempt::Retry(ApiError::Moved { epoch }))
                }
                Ok(other) => Err(ApiError::Internal(format!(
                    "unexpected messaging response {other:?}"
                ))),
                Err(e) => Self::classify(e),
            };
        }
        let mut fwd = req.clone();
        fwd.hops += 1;
        self.forward(
            group,
            req.hops,
            "propose",
            fwd,
            |mut client, request| async move { client.propose(request).await },
        )
        .await
    }

    async fn query_request(&self, req: QueryRequest) -> Result<QueryReply, ApiError> {
        let res = async {
            check_id("routing_key", &req.routing_key, false)?;
            let q: MessagingQuery = decode(&req.query)
                .map_err(|e| ApiError::InvalidArgument(format!("undecodable query: {e}")))?;
            self.serve(req.hops, || self.query_once(&req, &q)).await
        }
        .await;
        if let Err(e) = &res {
            self.record_error("query", e);
        }
        res
    }

    async fn query_once(
        &self,
        req: &QueryRequest,
        q: &MessagingQuery,
    ) -> Result<Attempt<QueryReply>, ApiError> {
        let (group, _) = match self.group_for(&req.routing_key) {
            Ok(v) => v,
            Err(e) => return Self::classify(e),
        };
        if let Some(raft) = self.cluster.local_leader(group) {
            if let Err(e) = raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                return Ok(Attempt::Retry(ApiError::NotLeader {
                    group,
                    leader: e.forward_to_leader().and_then(|f| f.leader_id),
                }));
            }
            let engine = self.cluster.replicas.engine().clone();
            let q = q.clone();
            let result = tokio::task::spawn_blocking(move || {
                GroupStateMachine::messaging_query(&engine, group, &q)
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            return Ok(Attempt::Done(QueryReply {
                result: encode(&result).map_err(|e| ApiError::Internal(e.to_string()))?,
            }));
        }
        let mut fwd = req.clone();
        fwd.hops += 1;
        self.forward(
            group,
            req.hops,
            "query",
            fwd,
            |mut client, request| async move { client.query(request).await },
        )
        .await
    }

    fn record_error(&self, service: &str, e: &ApiError) {
        self.cluster
            .metrics
            .grpc_errors_total
            .with_label_values(&[service, e.code()])
            .inc();
        if service == "append" {
            self.cluster
                .metrics
                .appends_total
                .with_label_values(&[e.code()])
                .inc();
        }
    }
}

type ReplyStream =
    Pin<Box<dyn futures::Stream<Item = Result<AppendStreamReply, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ConversationLog for ConversationService {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendReply>, Status> {
        self.append_entry(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    type AppendStreamStream = ReplyStream;

    /// Serves every append of the stream as its own task (at most [`STREAM_IN_FLIGHT`] at
    /// once) and answers each with its id as soon as it is done.
    async fn append_stream(
        &self,
        request: Request<Streaming<AppendStreamRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Status::unavailable("node shutting down"))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<AppendStreamReply, Status>>(STREAM_IN_FLIGHT);
        let in_flight = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
        tokio::spawn(async move {
            // A malformed message or a broken connection ends the stream; what is in
            // flight is still answered if the connection allows.
            while let Ok(Some(msg)) = inbound.message().await {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let (svc, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let result = match msg.append {
                        Some(append) => svc.append_entry(append).await,
                        None => Err(ApiError::InvalidArgument(
                            "stream request without an append".into(),
                        )),
                    };
                    let result = match result {
                        Ok(reply) => StreamResult::Ok(reply),
                        Err(e) => StreamResult::Error(e.to_wire()),
                    };
                    let _ = tx
                        .send(Ok(AppendStreamReply {
                            id: msg.id,
                            result: Some(result),
                        }))
                        .await;
                });
            }
        });
        // The reply stream ends when the node stops; appends still in flight then fail on
        // the sender's side with a retryable error (a retry with the same key is safe).
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        Ok(Response::new(Box::pin(futures::StreamExt::take_until(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            stopped,
        ))))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        self.read_entries(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeReply>, Status> {
        self.propose_request(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn query(&self, request: Request<QueryRequest>) -> Result<Response<QueryReply>, Status> {
        self.query_request(request.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(conv: &str, payload: usize) -> AppendRequest {
        AppendRequest {
            conversation_id: conv.into(),
            sender: "alice".into(),
            client_msg_id: "m1".into(),
            payload: vec![0; payload],
            hops: 0,
        }
    }

    #[test]
    fn appends_are_validated_with_typed_errors() {
        assert_eq!(validate_append(&req("c", 10), 10), Ok(()));
        assert_eq!(
            validate_append(&req("c", 11), 10),
            Err(ApiError::PayloadTooLarge {
                size: 11,
                limit: 10
            })
        );
        assert!(matches!(
            validate_append(&req("", 1), 10),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(
            validate_append(&req(&"x".repeat(MAX_ID_BYTES + 1), 1), 10),
            Err(ApiError::InvalidArgument(_))
        ));
        let mut no_key = req("c", 1);
        no_key.client_msg_id.clear();
        assert!(matches!(
            validate_append(&no_key, 10),
            Err(ApiError::InvalidArgument(_))
        ));
    }

    #[test]
    fn error_codes_survive_the_wire() {
        let status: Status = ApiError::Moved { epoch: 9 }.into();
        assert_eq!(ApiError::from_status(&status), ApiError::Moved { epoch: 9 });
        let status: Status = ApiError::NotLeader {
            group: 3,
            leader: Some(2),
        }
        .into();
        assert_eq!(
            ApiError::from_status(&status),
            ApiError::NotLeader {
                group: 0,
                leader: Some(2)
            }
        );
        let status: Status = ApiError::PayloadTooLarge { size: 2, limit: 1 }.into();
        assert!(!ApiError::from_status(&status).is_retryable());
    }
}
