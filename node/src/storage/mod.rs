//! Durable storage: one RocksDB instance per node, shared by every group it hosts.
//!
//! Column families:
//! - `raft_log`: `group(8 BE) ++ index(8 BE)` -> bincode log entry;
//! - `raft_meta`: `group(8 BE) ++ tag` -> vote, last purged log id, snapshot descriptor;
//! - `state`: `group(8 BE) ++ kind ++ ...` -> the group's state machine (see `state_machine`).
//!
//! Log appends are written without sync (the WAL is only buffered in memory: manual WAL
//! flush) and then handed to a single WAL-sync thread that writes and fsyncs the WAL once
//! for every append that queued meanwhile, across all groups (group commit); while appends
//! keep coming it waits 250 µs before each fsync so one covers more of them. Raft is told
//! an entry is durable only after that fsync. Each group's newest entries are also kept in
//! memory, where replication and `apply` read them back.

mod engine;
mod log_store;

pub use engine::{io_err as engine_io_err, Engine, StorageError, CF_LOG, CF_META, CF_STATE};
pub use log_store::LogStore;

use crate::placement::GroupId;

/// The 8-byte key prefix of everything a group stores.
pub fn group_prefix(group: GroupId) -> [u8; 8] {
    group.to_be_bytes()
}

/// Key of log entry `index` of `group`.
pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Key of a per-group metadata value in `raft_meta`.
pub fn meta_key(group: GroupId, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// The first key after every key of `group`.
pub fn group_end(group: GroupId) -> [u8; 8] {
    group.saturating_add(1).to_be_bytes()
}
