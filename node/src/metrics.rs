//! Prometheus metrics of a node, served on the admin port at `/metrics`.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric a node exports. Names are part of the dashboards' and alerts' contract.
pub struct Metrics {
    registry: Registry,
    /// Time from proposing an entry to its commit and apply on the leader.
    pub raft_commit_seconds: Histogram,
    /// Appends by outcome: ok, duplicate, error kinds.
    pub appends_total: IntCounterVec,
    /// Requests forwarded to another node, by service.
    pub forwarded_total: IntCounterVec,
    /// gRPC calls answered with an error, by service and Parley error code.
    pub grpc_errors_total: IntCounterVec,
    /// Largest gap between last log index and applied index over hosted groups.
    pub apply_lag_entries: IntGauge,
    pub leaders: IntGauge,
    pub replicas: IntGauge,
    pub placement_epoch: IntGauge,
    pub rocksdb_size_bytes: IntGauge,
    pub disk_full: IntGauge,
    /// Space left and total size of the file system holding the data directory.
    pub disk_available_bytes: IntGauge,
    pub disk_capacity_bytes: IntGauge,
    pub wal_sync_seconds: Histogram,
    /// Appends made durable by one WAL fsync.
    pub wal_sync_batch: Histogram,
    pub proposal_batch: Histogram,
    /// Open client WebSocket connections, by kind (direct, proxied_out, proxied_in).
    pub connections: IntGaugeVec,
    /// Authenticated sessions held here (users homed on this node).
    pub sessions: IntGauge,
    /// Client messages by stage: sent (committed), delivered and read (cursor advances).
    pub messages_total: IntCounterVec,
    /// Commit of a message to its frame being queued on the recipient's sessions.
    pub delivery_seconds: Histogram,
    /// Messages committed while the recipient had no open session (they wait for a sync).
    pub offline_messages_total: IntCounter,
    /// Messages pushed to users homed here while they had no open session, not yet
    /// handed over by a sync of one of their devices here (approximate: see `delivery`).
    pub pending_offline_messages: IntGauge,
    /// Messages sent to devices by `Sync` (pending while they were away).
    pub sync_messages_total: IntCounter,
    /// Client requests refused, by error code.
    pub client_errors_total: IntCounterVec,
    /// Connections closed for a full outgoing queue.
    pub slow_consumers_total: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency = exponential_buckets(0.0002, 2.0, 16).unwrap_or_default();
        let m = Metrics {
            raft_commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "parley_raft_commit_seconds",
                    "Propose-to-apply latency on the leader",
                )
                .buckets(latency.clone()),
            )
            .expect("valid metric"),
            appends_total: IntCounterVec::new(
                Opts::new("parley_appends_total", "Conversation appends by result"),
                &["result"],
            )
            .expect("valid metric"),
            forwarded_total: IntCounterVec::new(
                Opts::new(
                    "parley_forwarded_total",
                    "Requests forwarded to another node",
                ),
                &["service"],
            )
            .expect("valid metric"),
            grpc_errors_total: IntCounterVec::new(
                Opts::new(
                    "parley_grpc_errors_total",
                    "gRPC requests answered with an error",
                ),
                &["service", "code"],
            )
            .expect("valid metric"),
            apply_lag_entries: IntGauge::new(
                "parley_apply_lag_entries",
                "Max entries logged but not applied",
            )
            .expect("valid metric"),
            leaders: IntGauge::new("parley_raft_leaders", "Groups this node leads")
                .expect("valid metric"),
            replicas: IntGauge::new("parley_raft_replicas", "Group replicas this node hosts")
                .expect("valid metric"),
            placement_epoch: IntGauge::new("parley_placement_epoch", "Newest placement epoch seen")
                .expect("valid metric"),
            rocksdb_size_bytes: IntGauge::new(
                "parley_rocksdb_size_bytes",
                "Live RocksDB data (SST + memtables)",
            )
            .expect("valid metric"),
            disk_full: IntGauge::new(
                "parley_disk_full",
                "Whether writes are refused for lack of disk space (0 or 1)",
            )
            .expect("valid metric"),
            disk_available_bytes: IntGauge::new(
                "parley_disk_available_bytes",
                "Space available to the node on the file system of its data directory",
            )
            .expect("valid metric"),
            disk_capacity_bytes: IntGauge::new(
                "parley_disk_capacity_bytes",
                "Size of the file system holding the node's data directory",
            )
            .expect("valid metric"),
            wal_sync_seconds: Histogram::with_opts(
                HistogramOpts::new("parley_wal_sync_seconds", "WAL fsync duration")
                    .buckets(latency),
            )
            .expect("valid metric"),
            wal_sync_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "parley_wal_sync_batch",
                    "Log appends made durable per fsync",
                )
                .buckets(exponential_buckets(1.0, 2.0, 12).unwrap_or_default()),
            )
            .expect("valid metric"),
            proposal_batch: Histogram::with_opts(
                HistogramOpts::new(
                    "parley_proposal_batch",
                    "Commands coalesced into one Raft log entry by a group leader",
                )
                .buckets(exponential_buckets(1.0, 2.0, 10).unwrap_or_default()),
            )
            .expect("valid metric"),
            connections: IntGaugeVec::new(
                Opts::new("parley_connections", "Open client WebSocket connections"),
                &["kind"],
            )
            .expect("valid metric"),
            sessions: IntGauge::new(
                "parley_sessions",
                "Authenticated client sessions held by this node",
            )
            .expect("valid metric"),
            messages_total: IntCounterVec::new(
                Opts::new(
                    "parley_messages_total",
                    "Client messages sent, delivered and read",
                ),
                &["stage"],
            )
            .expect("valid metric"),
            delivery_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "parley_delivery_seconds",
                    "Commit of a message to its push onto the recipient's sessions",
                )
                .buckets(exponential_buckets(0.0002, 2.0, 16).unwrap_or_default()),
            )
            .expect("valid metric"),
            offline_messages_total: IntCounter::new(
                "parley_offline_messages_total",
                "Messages committed while the recipient had no open session",
            )
            .expect("valid metric"),
            pending_offline_messages: IntGauge::new(
                "parley_pending_offline_messages",
                "Messages waiting for users homed here who have no open session",
            )
            .expect("valid metric"),
            sync_messages_total: IntCounter::new(
                "parley_sync_messages_total",
                "Pending messages sent to devices by sync",
            )
            .expect("valid metric"),
            client_errors_total: IntCounterVec::new(
                Opts::new(
                    "parley_client_errors_total",
                    "Client requests refused, by error code",
                ),
                &["code"],
            )
            .expect("valid metric"),
            slow_consumers_total: IntCounter::new(
                "parley_slow_consumers_total",
                "Connections closed because their outgoing queue was full",
            )
            .expect("valid metric"),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.raft_commit_seconds.clone()),
            Box::new(m.appends_total.clone()),
            Box::new(m.forwarded_total.clone()),
            Box::new(m.grpc_errors_total.clone()),
            Box::new(m.apply_lag_entries.clone()),
            Box::new(m.leaders.clone()),
            Box::new(m.replicas.clone()),
            Box::new(m.placement_epoch.clone()),
            Box::new(m.rocksdb_size_bytes.clone()),
            Box::new(m.disk_full.clone()),
            Box::new(m.disk_available_bytes.clone()),
            Box::new(m.disk_capacity_bytes.clone()),
            Box::new(m.wal_sync_seconds.clone()),
            Box::new(m.wal_sync_batch.clone()),
            Box::new(m.proposal_batch.clone()),
            Box::new(m.connections.clone()),
            Box::new(m.sessions.clone()),
            Box::new(m.messages_total.clone()),
            Box::new(m.delivery_seconds.clone()),
            Box::new(m.offline_messages_total.clone()),
            Box::new(m.pending_offline_messages.clone()),
            Box::new(m.sync_messages_total.clone()),
            Box::new(m.client_errors_total.clone()),
            Box::new(m.slow_consumers_total.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
