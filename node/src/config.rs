//! Node configuration: one struct with defaults, read from a TOML file and overridden
//! by command-line flags (which also read `PARLEY_*` environment variables).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::placement::NodeId;

/// Everything a node needs to run. Every field has a default except `node_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique, never reused id of this node (>= 1).
    pub node_id: NodeId,
    /// gRPC listen address (Raft, forwarding, admin).
    pub listen: String,
    /// Address peers use to reach `listen`; defaults to `listen`.
    pub advertise: Option<String>,
    /// HTTP admin address: /metrics, /healthz, /readyz.
    pub http: String,
    pub data_dir: PathBuf,
    /// Zone label, used to spread replicas.
    pub zone: String,
    /// Existing nodes to register with on start (nodes added after bootstrap).
    pub join: Vec<String>,
    /// Largest accepted append payload, bytes.
    pub max_payload_bytes: usize,
    /// Deadline for a client request, including forwarding and leader changes.
    pub request_timeout_ms: u64,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    /// Entries applied since the last snapshot that trigger a new one.
    pub snapshot_every_entries: u64,
    /// Writes are refused while free space on the data volume is below this.
    pub min_free_disk_bytes: u64,
    /// Allow the `SetFaults` admin call (tests only).
    pub fault_injection: bool,
    /// Client WebSocket listen address; empty serves no clients.
    pub client_listen: String,
    /// Address clients and peers (proxying) use to reach `client_listen`; defaults to it.
    pub client_advertise: Option<String>,
    /// Ed25519 private key (PKCS#8 PEM) that signs and checks client tokens; the same
    /// on every node. Required when `client_listen` is set.
    pub token_key_file: Option<PathBuf>,
    /// Lifetime of a client token.
    pub token_ttl_secs: u64,
    /// Sends per user per second (token bucket refill rate).
    pub rate_limit_per_s: u32,
    /// Token bucket size: the burst a user may send at once.
    pub rate_limit_burst: u32,
    /// Server WebSocket ping interval.
    pub ws_ping_interval_ms: u64,
    /// A connection silent (no frame, ping or pong) this long is closed.
    pub ws_idle_timeout_ms: u64,
    /// Outgoing frames queued per connection before a slow reader is disconnected.
    pub ws_send_queue: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: 0,
            listen: "127.0.0.1:7000".into(),
            advertise: None,
            http: "127.0.0.1:8000".into(),
            data_dir: PathBuf::from("parley-data"),
            zone: String::new(),
            join: Vec::new(),
            max_payload_bytes: 256 * 1024,
            request_timeout_ms: 10_000,
            heartbeat_ms: 100,
            election_timeout_ms: 600,
            snapshot_every_entries: 20_000,
            min_free_disk_bytes: 64 * 1024 * 1024,
            fault_injection: false,
            client_listen: "127.0.0.1:9000".into(),
            client_advertise: None,
            token_key_file: None,
            token_ttl_secs: 24 * 3600,
            rate_limit_per_s: 200,
            rate_limit_burst: 400,
            ws_ping_interval_ms: 20_000,
            ws_idle_timeout_ms: 60_000,
            ws_send_queue: 1024,
        }
    }
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads a TOML file (fields as in [`NodeConfig`]).
    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// The address peers should use.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }

    /// The client address peers and clients should use; empty when no client endpoint.
    pub fn client_advertised(&self) -> String {
        self.client_advertise
            .clone()
            .unwrap_or_else(|| self.client_listen.clone())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be set and >= 1".into()));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 16 * 1024 * 1024 {
            return Err(ConfigError::Invalid(
                "max_payload_bytes must be in 1..=16 MiB".into(),
            ));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms < 4 * self.heartbeat_ms {
            return Err(ConfigError::Invalid(
                "election_timeout_ms must be at least 4x heartbeat_ms".into(),
            ));
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err()
            || self.http.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid(
                "listen and http must be ip:port socket addresses".into(),
            ));
        }
        if !self.client_listen.is_empty() {
            if self.client_listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::Invalid(
                    "client_listen must be an ip:port socket address".into(),
                ));
            }
            if self.token_key_file.is_none() {
                return Err(ConfigError::Invalid(
                    "token_key_file is required when client_listen is set \
                     (create one with `parley-node gen-token-key PATH`)"
                        .into(),
                ));
            }
        }
        if self.rate_limit_per_s == 0 || self.rate_limit_burst == 0 {
            return Err(ConfigError::Invalid(
                "rate_limit_per_s and rate_limit_burst must be >= 1".into(),
            ));
        }
        if self.ws_send_queue == 0 || self.ws_ping_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "ws_send_queue and ws_ping_interval_ms must be >= 1".into(),
            ));
        }
        if self.ws_idle_timeout_ms <= self.ws_ping_interval_ms {
            return Err(ConfigError::Invalid(
                "ws_idle_timeout_ms must exceed ws_ping_interval_ms".into(),
            ));
        }
        Ok(())
    }

    /// The openraft configuration every group on this node uses.
    pub fn raft_config(&self) -> Result<openraft::Config, ConfigError> {
        let c = openraft::Config {
            cluster_name: "parley".into(),
            heartbeat_interval: self.heartbeat_ms,
            // Under load, replication traffic proves liveness; skip redundant heartbeats.
            heartbeat_min_interval: Some(self.heartbeat_ms),
            election_timeout_min: self.election_timeout_ms,
            // openraft's leader lease equals the max timeout; keep failover near one second.
            election_timeout_max: self.election_timeout_ms * 3 / 2,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            // Keep a tenth of a snapshot interval of log so slightly lagging followers
            // catch up from the log rather than a snapshot.
            max_in_snapshot_log_to_keep: self.snapshot_every_entries / 10,
            install_snapshot_timeout: 10_000,
            enable_pre_vote: Some(true),
            // State is applied without the WAL and the commit index is not persisted, so a
            // restarted node's state machine may be behind what it had acknowledged. Restored
            // leadership would serve linearizable reads from that stale state (the read index
            // of a restored leader is its old noop); an election in a new term makes the
            // leader commit a fresh noop, and reads wait until everything before it is applied.
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        c.validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "node_id = 7\nlisten = \"127.0.0.1:7100\"\nmax_payload_bytes = 1024\n",
        )
        .expect("write");
        let c = NodeConfig::from_file(&path).expect("parse");
        assert_eq!(c.node_id, 7);
        assert_eq!(c.max_payload_bytes, 1024);
        assert_eq!(c.http, NodeConfig::default().http);
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid(_))),
            "no token key"
        );
        let c = NodeConfig {
            token_key_file: Some(dir.path().join("key.pem")),
            ..c
        };
        c.validate().expect("valid");
        c.raft_config().expect("raft config");
    }

    #[test]
    fn bad_files_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = \"seven\"").expect("write");
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        std::fs::write(&path, "no_such_field = 1").expect("write");
        assert!(matches!(
            NodeConfig::from_file(&path),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            NodeConfig::from_file(&dir.path().join("missing.toml")),
            Err(ConfigError::Read { .. })
        ));
        assert!(matches!(
            NodeConfig::default().validate(),
            Err(ConfigError::Invalid(_))
        ));
    }
}
