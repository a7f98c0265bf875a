//! The Parley client SDK and the `parley` command line tool.
//!
//! This crate owns the client side of the Parley protocol (`parley.v1`, protobuf frames
//! over a WebSocket; docs/protocol.md is the reference):
//!
//! - accounts: [`register`] and [`login`] return [`Credentials`];
//! - [`Client`]: an authenticated session that matches replies to requests, retries
//!   sends with the same idempotency key, reconnects with jittered exponential backoff
//!   across the cluster's nodes, logs in again when its token expires, and `Sync`s after
//!   every connect;
//! - [`Events`]: the pushed messages and receipts, de-duplicated and in order per
//!   conversation, with delivery acknowledged automatically (coalesced) unless
//!   [`ClientConfig::auto_ack`] is off.
//!
//! Message bodies are opaque bytes sent as given: end-to-end encryption is **not**
//! implemented here yet (a later change adds it to the SDK).
//!
//! The `parley` binary (src/bin/parley) is built on this library: `parley dev` runs a
//! local cluster, and `register`, `send`, `chat`, `status` and `privacy` talk to one.

mod account;
mod client;
mod connection;
mod conversation;
pub mod delivery;
mod error;
mod frame;
pub mod reconnect;
mod session;

pub use account::{login, register, Credentials, ACCOUNT_TIMEOUT};
pub use client::{new_client_msg_id, parse_endpoints, Client, ClientConfig, ClientEvent, Events};
pub use conversation::{check_text, dm_conversation_id, MAX_TEXT_CHARS};
pub use error::ClientError;
/// The protocol's message types, re-exported for convenience.
pub use parley_proto::v1 as proto;
