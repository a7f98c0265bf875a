//! Node-to-node transport: one gRPC channel per peer, shared by every group.
//!
//! The client side implements openraft's network traits for a (group, peer) pair by
//! sending bincode-encoded Raft messages tagged with the group id; the server side
//! ([`RaftTransportService`]) hands each message to the local replica of that group.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend};
use parley_proto::node::v1::raft_transport_client::RaftTransportClient;
use parley_proto::node::v1::raft_transport_server::RaftTransport;
use parley_proto::node::v1::{RaftMessage, SnapshotChunk};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::placement::{GroupId, NodeId};
use crate::replicas::Replicas;
use crate::types::{decode, encode, Snapshot, SnapshotMeta, TypeConfig, Vote};

const SNAPSHOT_CHUNK: usize = 1 << 20;
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

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = crate::types::SnapshotData;

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
