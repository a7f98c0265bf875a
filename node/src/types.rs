//! The Raft type configuration shared by every group on a node, and the commands
//! that groups replicate.
//!
//! One type configuration serves both the metadata group and the shard groups: a
//! command is either a conversation-log operation or a metadata operation, and a
//! group's state machine refuses the kind it does not own.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::messaging_state::{MessagingOp, MessagingResponse};
use crate::placement::{GroupId, MetaCommand, MetaResponse, NodeId, Slot};

/// Payload of one conversation-log append, as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendCommand {
    pub conversation: String,
    pub sender: String,
    pub client_msg_id: String,
    /// Hash slot of `conversation`; the state machine refuses slots it does not own.
    pub slot: Slot,
    /// Leader's wall clock when it proposed; the state machine keeps times monotonic.
    pub proposed_at_ms: i64,
    pub payload: Vec<u8>,
}

/// A command replicated through a group's Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Shard groups: append to a conversation.
    Append(AppendCommand),
    /// Shard groups: take ownership of a slot range (the first entry of a new group).
    AssignSlots { start: Slot, end: Slot, epoch: u64 },
    /// Metadata group: change the node registry or the placement map.
    Meta(MetaCommand),
    /// Shard groups: cursors, accounts, conversation indexes. `slot` is the slot of the
    /// op's routing key (conversation id or user id).
    Messaging { slot: Slot, op: MessagingOp },
    /// Shard groups: several of the commands above in one log entry, applied in order,
    /// each with its own response. The leader coalesces concurrent proposals this way.
    Batch(Vec<Command>),
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Append(a) => {
                write!(f, "append({}, {} bytes)", a.conversation, a.payload.len())
            }
            Command::AssignSlots { start, end, epoch } => {
                write!(f, "assign-slots({start}-{end}@{epoch})")
            }
            Command::Meta(m) => write!(f, "meta({m:?})"),
            Command::Messaging { op, .. } => write!(f, "messaging({op:?})"),
            Command::Batch(cmds) => write!(f, "batch({} commands)", cmds.len()),
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Blank and membership entries.
    None,
    Appended {
        seq: u64,
        server_time_ms: i64,
        duplicate: bool,
    },
    /// The group does not own the slot: the placement moved on.
    Moved {
        epoch: u64,
    },
    SlotsAssigned,
    Meta(MetaResponse),
    Messaging(MessagingResponse),
    /// The command is not valid for this kind of group.
    Rejected(String),
    /// One response per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResponse>),
}

openraft::declare_raft_types!(
    /// Raft types for every Parley group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// Snapshot data travels as a file on disk, streamed in chunks by the transport.
pub type SnapshotData = std::fs::File;

/// Handle to one group's Raft instance.
pub type GroupRaft = openraft::Raft<TypeConfig, crate::state_machine::GroupStateMachine>;

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, SnapshotData>;

/// Raft group id of the metadata group.
pub const METADATA_GROUP: GroupId = 0;

/// Encodes a value for the log, the state machine and the wire.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, std::io::Error> {
    bincode::serialize(value).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Decodes a value written by [`encode`]; corrupt input is an `InvalidData` error, never a panic.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, std::io::Error> {
    bincode::deserialize_from(Cursor::new(bytes))
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
