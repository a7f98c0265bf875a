//! Starts and controls local clusters of real `parley-node` processes on
//! loopback, for end-to-end tests and benchmarks. Owns process lifecycle only;
//! it knows nothing of Parley's internals beyond its CLI and gRPC admin API.
//!
//! - [`LocalCluster`] starts `parley-node run` processes on 127.0.0.1,
//!   bootstraps them through `Admin.Bootstrap` and waits for shard-group
//!   leaders; it kills, stops, restarts, pauses and resumes single nodes and
//!   injects faults through `Admin.SetFaults`.
//! - [`LogClient`] is a `ConversationLog` client over several nodes that retries
//!   retryable failures with exponential back-off.
//! - [`RawConnection`] is a bare client WebSocket for protocol tests.
//! - [`process`] has the lower-level pieces: children that die with their
//!   parent and free loopback ports, also used for the benchmark's etcd cluster.
//!
//! The node binary is found by [`node_binary`]; build it before running tests
//! (`cargo build -p parley-node`) or point `PARLEY_NODE_BIN` at it.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use parley_testkit::{ClusterOptions, LocalCluster};
//!
//! let cluster = LocalCluster::start(ClusterOptions::default()).await?;
//! let log = cluster.log_client();
//! let reply = log.append("conversation-1", "alice", "msg-1", b"hello").await?;
//! cluster.kill(reply.group_id % 3 + 1).await?;
//! # Ok(())
//! # }
//! ```

mod cluster;
mod log_client;
pub mod process;
mod ws_client;

pub use cluster::{
    leader_counts, node_binary, workspace_binary, ClusterOptions, LocalCluster, KEEP_DATA_ENV,
    NODE_BIN_ENV, TOKEN_KEY_FILE,
};
pub use log_client::{error_code, is_retryable, LogClient, RetryPolicy, RETRYABLE_ERROR_CODES};
pub use ws_client::{RawConnection, Received, ServerError};
