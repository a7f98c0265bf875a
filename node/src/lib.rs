//! `parley-node`: the Parley server.
//!
//! A node hosts replicas of many Raft groups (openraft, three voters each): shard groups
//! that own ranges of conversation hash slots and replicate their conversation logs, and
//! the metadata group that replicates the node registry and placement map. All groups on
//! a node share one RocksDB instance ([`storage`]) and one gRPC transport ([`transport`]).
//! Any node accepts any request and carries it to the right group's leader
//! ([`conversation`], [`cluster`]).
//!
//! Every node also serves clients: the WebSocket [`gateway`] (protocol in
//! docs/protocol.md) with [`accounts`] and tokens, the [`router`] that gives each user a
//! home node, [`session`]s and [`delivery`] of events to them, and 1:1 [`messaging`]
//! whose cursors and indexes live in [`messaging_state`] beside the conversation log.
//!
//! This crate owns consensus, durability, placement, routing and delivery. It must not
//! interpret message payloads: they are opaque (end-to-end encrypted) bytes.

pub mod accounts;
pub mod admin;
pub mod append_stream;
pub mod client_error;
pub mod cluster;
pub mod config;
pub mod conversation;
pub mod delivery;
pub mod error;
pub mod gateway;
pub mod group_lifecycle;
pub mod http;
pub mod messaging;
pub mod messaging_state;
pub mod metrics;
pub mod placement;
pub mod proposer;
pub mod replicas;
pub mod router;
pub mod server;
pub mod session;
pub mod state_machine;
pub mod storage;
pub mod tokens;
pub mod transport;
pub mod types;
