//! `parley-node`: the Parley server.
//!
//! A node hosts replicas of many Raft groups (openraft, three voters each): shard groups
//! that own ranges of conversation hash slots and replicate their conversation logs, and
//! the metadata group that replicates the node registry and placement map. All groups on
//! a node share one RocksDB instance ([`storage`]) and one gRPC transport ([`transport`]).
//! Any node accepts any request and carries it to the right group's leader
//! ([`conversation`], [`cluster`]).
//!
//! This crate owns consensus, durability, placement and routing. It must not interpret
//! message payloads: they are opaque (end-to-end encrypted) bytes.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod conversation;
pub mod error;
pub mod group_lifecycle;
pub mod http;
pub mod metrics;
pub mod placement;
pub mod replicas;
pub mod server;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod types;
