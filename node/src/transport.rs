//! Node-to-node transport: one gRPC channel per peer, shared by every group.
//!
//! The client side implements openraft's network traits for a (group, peer) pair by
//! sending bincode-encoded Raft messages tagged with the group id; the server side
//! ([`RaftTransportService`]) hands each message to the local replica of that group.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use parley_proto::node::v1::raft_transport_client::RaftTransportClient;
use parley_proto::node::v1::raft_transport_server::RaftTransport;
use parley_proto::node::v1::{RaftMessage, SnapshotChunk};
use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::placement::{GroupId, NodeId};
use crate::replicas::Replicas;
use crate::types::{decode, encode, Snapshot, SnapshotMeta, TypeConfig, Vote};

const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Request metadata of a `StreamAppend` call: the group replicated and the leader's node id.
const GROUP_HEADER: &str = "x-parley-group";
const FROM_HEADER: &str = "x-parley-from";
/// Least time a replication stream waits for the reply to a request before it fails:
/// openraft's per-request timeout is the heartbeat interval, which a follower working
/// through a pipeline of requests on a busy machine can exceed without being gone.
const MIN_STREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 flow-control windows of node connections, both ways: every group's Raft
/// traffic and forwarded appends share one connection per peer.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// Links cut on purpose (fault injection for tests): traffic to and from these peers is dropped.
#[derive(Debug, Default)]
pub struct Faults {
    blocked: RwLock<HashSet<NodeId>>,
}

impl Faults {
    pub fn set_blocked(&self, peers: impl IntoIterator<Item = NodeId>) {
        if let Ok(mut b) = self.blocked.write() {
            *b = peers.into_iter().collect();
        }
    }

    pub fn is_blocked(&self, peer: NodeId) -> bool {
        self.blocked
            .read()
            .map(|b| b.contains(&peer))
            .unwrap_or(false)
    }
}

/// gRPC channels to peers, one per address, reused by every group and service.
#[derive(Debug)]
pub struct PeerPool {
    pub node_id: NodeId,
    channels: Mutex<HashMap<String, Channel>>,
    pub faults: Arc<Faults>,
}

impl PeerPool {
    pub fn new(node_id: NodeId, faults: Arc<Faults>) -> Arc<Self> {
        Arc::new(PeerPool {
            node_id,
            channels: Mutex::new(HashMap::new()),
            faults,
        })
    }

    /// The shared channel to `addr` (host:port), created lazily.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// Creates Raft network clients for one group.
pub struct NetworkFactory {
    pub group: GroupId,
    pub pool: Arc<PeerPool>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerLink {
        PeerLink {
            group: self.group,
            target,
            addr: node.addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// The Raft messages of one group to one peer.
pub struct PeerLink {
    group: GroupId,
    target: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
}

impl PeerLink {
    fn client(&self) -> Result<RaftTransportClient<Channel>, Unreachable<TypeConfig>> {
        if self.pool.faults.is_blocked(self.target) {
            return Err(Unreachable::from_string(format!(
                "link to node {} cut by fault injection",
                self.target
            )));
        }
        let channel = self
            .pool
            .channel(&self.addr)
            .map_err(|e| Unreachable::new(&e))?;
        Ok(RaftTransportClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    fn message<T: serde::Serialize>(
        &self,
        body: &T,
        option: &RPCOption,
    ) -> Result<Request<RaftMessage>, RPCError<TypeConfig>> {
        let payload = encode(body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut req = Request::new(RaftMessage {
            group_id: self.group,
            from_node: self.pool.node_id,
            payload,
        });
        req.set_timeout(option.hard_ttl());
        Ok(req)
    }
}

fn status_to_rpc(status: Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::NotFound | tonic::Code::DeadlineExceeded => {
            RPCError::Unreachable(Unreachable::from_string(format!(
                "{}: {}",
                status.code(),
                status.message()
            )))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{}: {}",
            status.code(),
            status.message()
        ))),
    }
}

fn decode_reply<R: for<'de> serde::Deserialize<'de>>(
    msg: RaftMessage,
) -> Result<R, RPCError<TypeConfig>> {
    let res: Result<R, String> =
        decode(&msg.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
    res.map_err(|e| RPCError::Network(NetworkError::from_string(e)))
}

/// One reply of a pipelined replication stream, as openraft wants it.
type StreamReply = Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>;

/// Requests sent and replies received on one replication stream.
#[derive(Debug, Default)]
struct StreamProgress {
    sent: AtomicU64,
    answered: AtomicU64,
}

/// The reply side of a replication stream: decodes replies, and fails the stream when a
/// request goes unanswered for the RPC timeout or the link is cut by fault injection.
struct ReplyStream {
    replies: Streaming<RaftMessage>,
    progress: Arc<StreamProgress>,
    ttl: Duration,
    faults: Arc<Faults>,
    target: NodeId,
}

impl ReplyStream {
    /// The next reply; `None` (with the state) once the stream ended or failed.
    async fn next(state: Option<Self>) -> Option<(StreamReply, Option<Self>)> {
        let mut st = state?;
        loop {
            if st.faults.is_blocked(st.target) {
                let e = Unreachable::from_string(format!(
                    "link to node {} cut by fault injection",
                    st.target
                ));
                return Some((Err(RPCError::Unreachable(e)), None));
            }
            // A request sent before this wait and still unanswered after it has waited at
            // least `ttl`; one sent during the wait gets its full `ttl` in the next round.
            let waiting_before = st.progress.sent.load(Ordering::Relaxed)
                > st.progress.answered.load(Ordering::Relaxed);
            let msg = match tokio::time::timeout(st.ttl, st.replies.message()).await {
                Err(_) if waiting_before => {
                    let e = Unreachable::from_string(format!(
                        "node {} did not answer an AppendEntries within {:?}",
                        st.target, st.ttl
                    ));
                    return Some((Err(RPCError::Unreachable(e)), None));
                }
                Err(_) => continue,
                Ok(Err(status)) => return Some((Err(status_to_rpc(status)), None)),
                Ok(Ok(None)) => return None,
                Ok(Ok(Some(msg))) => msg,
            };
            st.progress.answered.fetch_add(1, Ordering::Relaxed);
            let reply = decode_reply::<StreamAppendResult<TypeConfig>>(msg);
            let keep_going = matches!(reply, Ok(Ok(_)));
            return Some((reply, keep_going.then_some(st)));
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = crate::types::SnapshotData;

    /// One AppendEntries as a unary call. openraft replicates and sends heartbeats through
    /// [`Self::stream_append`], so this is only the trait's required fallback.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.message(&rpc, &option)?;
        let reply = self
            .client()?
            .append_entries(req)
            .await
            .map_err(status_to_rpc)?;
        decode_reply(reply.into_inner())
    }

    /// Pipelined replication: one `StreamAppend` call per replication session, requests
    /// sent as openraft produces them, replies matched in order by the follower.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, StreamReply>, RPCError<TypeConfig>>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            // openraft backs off after failures while it produces a request: connect only
            // once there is one, or an unreachable peer is retried in a tight loop.
            let mut input = input;
            let Some(first) = input.next().await else {
                let none: BoxStream<'s, StreamReply> = Box::pin(futures::stream::empty());
                return Ok(none);
            };
            let input = futures::stream::once(futures::future::ready(first)).chain(input);
            let mut client = self.client().map_err(RPCError::Unreachable)?;
            let progress = Arc::new(StreamProgress::default());
            let (group, from) = (self.group, self.pool.node_id);
            let sent = progress.clone();
            let requests = tokio_stream::StreamExt::map_while(input, move |req| {
                let payload = match encode(&req) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!(group, error = %e, "cannot encode AppendEntries; stream ends");
                        return None;
                    }
                };
                sent.sent.fetch_add(1, Ordering::Relaxed);
                Some(RaftMessage {
                    group_id: group,
                    from_node: from,
                    payload,
                })
            });
            let mut request = Request::new(requests);
            request
                .metadata_mut()
                .insert(GROUP_HEADER, MetadataValue::from(group));
            request
                .metadata_mut()
                .insert(FROM_HEADER, MetadataValue::from(from));
            let replies = client
                .stream_append(request)
                .await
                .map_err(status_to_rpc)?
                .into_inner();
            let state = ReplyStream {
                replies,
                progress,
                ttl: option.hard_ttl().max(MIN_STREAM_REPLY_TIMEOUT),
                faults: self.pool.faults.clone(),
                target: self.target,
            };
            let replies: BoxStream<'s, StreamReply> =
                Box::pin(futures::stream::unfold(Some(state), ReplyStream::next));
            Ok(replies)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.message(&rpc, &option)?;
        let reply = self.client()?.vote(req).await.map_err(status_to_rpc)?;
        decode_reply(reply.into_inner())
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.message(&rpc, &option)?;
        let reply = self.client()?.pre_vote(req).await.map_err(status_to_rpc)?;
        decode_reply(reply.into_inner())
    }

    async fn transfer_leader(
        &mut self,
        rpc: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.message(&rpc, &option)?;
        let reply = self
            .client()?
            .transfer_leader(req)
            .await
            .map_err(status_to_rpc)?;
        decode_reply(reply.into_inner())
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = encode(&(vote, snapshot.meta.clone()))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let (group, from) = (self.group, self.pool.node_id);
        let mut file = snapshot.snapshot;
        // Read the file in chunks on a blocking thread and stream them.
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut first = Some(header);
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let n = match file.read(&mut buf) {
                    Ok(n) => n,
                    Err(_) => return,
                };
                buf.truncate(n);
                let done = n == 0;
                let chunk = SnapshotChunk {
                    group_id: group,
                    from_node: from,
                    header: first.take().unwrap_or_default(),
                    data: buf,
                };
                if tx.blocking_send(chunk).is_err() || done {
                    return;
                }
            }
        });
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.set_timeout(option.hard_ttl().max(Duration::from_secs(60)));
        let mut client = self.client().map_err(StreamingError::Unreachable)?;
        let reply = client
            .install_snapshot(req)
            .await
            .map_err(|s| match status_to_rpc(s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                other => StreamingError::Network(NetworkError::new(&other)),
            })?;
        decode_reply(reply.into_inner()).map_err(|e| StreamingError::Network(NetworkError::new(&e)))
    }
}

/// Serves Raft messages for every group hosted on this node.
pub struct RaftTransportService {
    pub replicas: Arc<Replicas>,
    /// Becomes true when the node stops: replication streams from peers end at once, so
    /// the gRPC server's graceful shutdown is not held open by them.
    pub stopping: watch::Receiver<bool>,
}

/// A `u64` from request metadata.
fn metadata_u64(req: &Request<Streaming<RaftMessage>>, key: &str) -> Result<u64, Status> {
    req.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::invalid_argument(format!("missing or invalid {key} metadata")))
}

type RaftFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl RaftTransportService {
    async fn dispatch<Req, Resp, F>(
        &self,
        msg: RaftMessage,
        call: F,
    ) -> Result<Response<RaftMessage>, Status>
    where
        Req: for<'de> serde::Deserialize<'de>,
        Resp: serde::Serialize,
        F: for<'a> FnOnce(&'a crate::types::GroupRaft, Req) -> RaftFuture<'a, Result<Resp, String>>,
    {
        if self.replicas.pool().faults.is_blocked(msg.from_node) {
            return Err(Status::unavailable("link cut by fault injection"));
        }
        // Decode first: a malformed message is refused the same way whatever its group.
        let req: Req = decode(&msg.payload)
            .map_err(|e| Status::invalid_argument(format!("bad raft message: {e}")))?;
        let Some(raft) = self.replicas.get(msg.group_id) else {
            return Err(Status::not_found(format!(
                "group {} not hosted here",
                msg.group_id
            )));
        };
        let res = call(&raft, req).await;
        let payload = encode(&res).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage {
            group_id: msg.group_id,
            from_node: self.replicas.node_id(),
            payload,
        }))
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(
            request.into_inner(),
            |raft, req: AppendEntriesRequest<TypeConfig>| {
                Box::pin(async move { raft.append_entries(req).await.map_err(|e| e.to_string()) })
            },
        )
        .await
    }

    type StreamAppendStream = BoxStream<'static, Result<RaftMessage, Status>>;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let group = metadata_u64(&request, GROUP_HEADER)?;
        let from = metadata_u64(&request, FROM_HEADER)?;
        if *self.stopping.borrow() {
            return Err(Status::unavailable("node is stopping"));
        }
        let faults = self.replicas.pool().faults.clone();
        if faults.is_blocked(from) {
            return Err(Status::unavailable("link cut by fault injection"));
        }
        let Some(raft) = self.replicas.get(group) else {
            return Err(Status::not_found(format!("group {group} not hosted here")));
        };
        // Requests in order until the stream ends, breaks, carries something malformed or
        // the link is cut; openraft answers what it received and ends the replies, and a
        // malformed request is then reported as the stream's final status.
        let refused: Arc<Mutex<Option<Status>>> = Arc::default();
        let refuse = refused.clone();
        let requests = tokio_stream::StreamExt::map_while(request.into_inner(), move |msg| {
            let msg = msg.ok()?;
            if faults.is_blocked(from) {
                return None;
            }
            let bad = if msg.group_id != group {
                Status::invalid_argument(format!(
                    "replication stream of group {group} carries a message of group {}",
                    msg.group_id
                ))
            } else {
                match decode::<AppendEntriesRequest<TypeConfig>>(&msg.payload) {
                    Ok(req) => return Some(req),
                    Err(e) => Status::invalid_argument(format!("bad AppendEntries: {e}")),
                }
            };
            tracing::warn!(group, from, error = %bad.message(), "replication stream refused");
            if let Ok(mut r) = refuse.lock() {
                *r = Some(bad);
            }
            None
        });
        let me = self.replicas.node_id();
        let replies = raft.stream_append(requests).map(move |res| {
            let res: Result<StreamAppendResult<TypeConfig>, String> =
                res.map_err(|e| e.to_string());
            let payload = encode(&res).map_err(|e| Status::internal(e.to_string()))?;
            Ok(RaftMessage {
                group_id: group,
                from_node: me,
                payload,
            })
        });
        let refusal = futures::stream::once(async move {
            refused.lock().ok().and_then(|mut r| r.take()).map(Err)
        })
        .filter_map(futures::future::ready);
        let mut stopping = self.stopping.clone();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let replies = replies.chain(refusal).take_until(stopped);
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(
            request.into_inner(),
            |raft, req: VoteRequest<TypeConfig>| {
                Box::pin(async move { raft.vote(req).await.map_err(|e| e.to_string()) })
            },
        )
        .await
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(
            request.into_inner(),
            |raft, req: VoteRequest<TypeConfig>| {
                Box::pin(async move { raft.pre_vote(req).await.map_err(|e| e.to_string()) })
            },
        )
        .await
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.dispatch(
            request.into_inner(),
            |raft, req: TransferLeaderRequest<TypeConfig>| {
                Box::pin(async move {
                    raft.handle_transfer_leader(req)
                        .await
                        .map_err(|e| e.to_string())
                })
            },
        )
        .await
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        if self.replicas.pool().faults.is_blocked(first.from_node) {
            return Err(Status::unavailable("link cut by fault injection"));
        }
        let group = first.group_id;
        let Some(raft) = self.replicas.get(group) else {
            return Err(Status::not_found(format!("group {group} not hosted here")));
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.header)
            .map_err(|e| Status::invalid_argument(format!("bad snapshot header: {e}")))?;
        let path = self
            .replicas
            .engine()
            .snapshot_dir()
            .join(format!("incoming-g{group}-{}.tmp", rand::random::<u64>()));
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        use tokio::io::AsyncWriteExt;
        file.write_all(&first.data)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        while let Some(chunk) = stream.message().await? {
            file.write_all(&chunk.data)
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        file.sync_all()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        drop(file);
        let file = std::fs::File::open(&path).map_err(|e| Status::internal(e.to_string()))?;
        // The file handle stays valid after unlinking; the state machine copies what it keeps.
        let _ = std::fs::remove_file(&path);
        let res = raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: file,
                },
            )
            .await
            .map_err(|e| e.to_string());
        let payload = encode(&res).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(RaftMessage {
            group_id: group,
            from_node: self.replicas.node_id(),
            payload,
        }))
    }
}
