//! Prometheus metrics of a node, served on the admin port at `/metrics`.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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
    pub wal_sync_seconds: Histogram,
    /// Appends made durable by one WAL fsync.
    pub wal_sync_batch: Histogram,
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
            Box::new(m.wal_sync_seconds.clone()),
            Box::new(m.wal_sync_batch.clone()),
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
