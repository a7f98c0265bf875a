//! Replicated messaging state beside the conversation log, in the same shard groups:
//! delivery and read cursors (in the conversation's group), user accounts and each
//! user's conversation index (in the user's group, keyed by user id).
//!
//! Keys, after the group's 8-byte prefix (see [`crate::state_machine`] for the rest):
//! - `0x07 ++ len16 ++ conversation ++ len16 ++ user ++ device` -> device delivered seq;
//! - `0x08 ++ len16 ++ conversation ++ user` -> [`MemberCursors`] (user level);
//! - `0x09 ++ user` -> [`UserRecord`];
//! - `0x0A ++ len16 ++ user ++ conversation` -> peer user id.
//!
//! Cursors only move forward and never past the conversation's last seq, so retried or
//! reordered acknowledgements are harmless and status is exact.

use std::collections::BTreeMap;

use rocksdb::ReadOptions;
use serde::{Deserialize, Serialize};

use crate::placement::GroupId;
use crate::storage::{Engine, CF_STATE};
use crate::types::{decode, encode};

const KEY_DEVICE_CURSOR: u8 = 0x07;
const KEY_MEMBER_CURSORS: u8 = 0x08;
const KEY_USER: u8 = 0x09;
const KEY_USER_CONVERSATION: u8 = 0x0A;

/// A registered device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    /// SHA-256 of the device secret (the secret itself is never stored).
    pub secret_sha256: Vec<u8>,
    pub created_ms: i64,
}

/// A user account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: String,
    pub devices: Vec<DeviceRecord>,
    /// Read-receipt privacy switch (reciprocal): false sends and sees none.
    pub read_receipts: bool,
    pub created_ms: i64,
}

/// One member's cursors in a conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCursors {
    /// Highest seq delivered to any of the member's devices.
    pub delivered: u64,
    /// Highest seq the member read.
    pub read: u64,
}

/// A change to messaging state; replicated in a shard group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessagingOp {
    /// Create a user with its first device (user's group).
    CreateUser { user: String, device: DeviceRecord },
    /// Set the read-receipt switch (user's group).
    SetPrivacy { user: String, read_receipts: bool },
    /// Record that `user` is in `conversation` with `peer` (user's group; idempotent).
    AddConversation {
        user: String,
        conversation: String,
        peer: String,
    },
    /// Move a device's delivered cursor and the member's read cursor forward
    /// (conversation's group). `read` implies delivered up to it.
    SetCursor {
        conversation: String,
        user: String,
        device: String,
        delivered: u64,
        read: u64,
    },
}

/// What applying a [`MessagingOp`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessagingResponse {
    UserCreated,
    UserExists,
    UnknownUser,
    PrivacySet,
    ConversationAdded,
    /// The member's cursors before and after the change, and the device's cursor.
    Cursors {
        previous: MemberCursors,
        member: MemberCursors,
        device_delivered: u64,
    },
}

/// A read of messaging state, served by a group's leader after a read-index check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessagingQuery {
    GetUser {
        user: String,
    },
    /// The user's conversations with their peers (user's group).
    Conversations {
        user: String,
    },
    /// A conversation's last seq and every member's cursors, plus one device's delivered
    /// cursor (conversation's group).
    ConversationState {
        conversation: String,
        user: String,
        device: String,
    },
}

/// The answer to a [`MessagingQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryResult {
    User(Option<UserRecord>),
    Conversations(Vec<(String, String)>),
    ConversationState {
        last_seq: u64,
        members: Vec<(String, MemberCursors)>,
        device_delivered: u64,
    },
}

fn key(group: GroupId, kind: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + parts.iter().map(|p| p.len() + 2).sum::<usize>());
    k.extend_from_slice(&crate::storage::group_prefix(group));
    k.push(kind);
    for (i, part) in parts.iter().enumerate() {
        // Every part but the last is length-prefixed so keys never collide.
        if i + 1 < parts.len() {
            k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        }
        k.extend_from_slice(part);
    }
    k
}

fn device_cursor_key(g: GroupId, conv: &str, user: &str, device: &str) -> Vec<u8> {
    key(
        g,
        KEY_DEVICE_CURSOR,
        &[conv.as_bytes(), user.as_bytes(), device.as_bytes()],
    )
}

fn member_key(g: GroupId, conv: &str, user: &str) -> Vec<u8> {
    key(g, KEY_MEMBER_CURSORS, &[conv.as_bytes(), user.as_bytes()])
}

/// Prefix of every member-cursor key of a conversation (an empty last part).
fn member_prefix(g: GroupId, conv: &str) -> Vec<u8> {
    key(g, KEY_MEMBER_CURSORS, &[conv.as_bytes(), b""])
}

fn user_key(g: GroupId, user: &str) -> Vec<u8> {
    key(g, KEY_USER, &[user.as_bytes()])
}

fn user_conversation_key(g: GroupId, user: &str, conv: &str) -> Vec<u8> {
    key(
        g,
        KEY_USER_CONVERSATION,
        &[user.as_bytes(), conv.as_bytes()],
    )
}

fn user_conversation_prefix(g: GroupId, user: &str) -> Vec<u8> {
    key(g, KEY_USER_CONVERSATION, &[user.as_bytes(), b""])
}

/// Every state write of the batch being applied, by key: visible to later commands of the
/// same batch, and written in key order at the end (see `state_machine`).
pub type Overlay = BTreeMap<Vec<u8>, Vec<u8>>;

fn get<T: for<'de> Deserialize<'de>>(
    engine: &Engine,
    overlay: &Overlay,
    key: &[u8],
) -> std::io::Result<Option<T>> {
    if let Some(v) = overlay.get(key) {
        return decode(v).map(Some);
    }
    let cf = engine.cf_io(CF_STATE)?;
    match engine
        .db()
        .get_pinned_cf(cf, key)
        .map_err(crate::storage::engine_io_err)?
    {
        Some(v) => decode(&v).map(Some),
        None => Ok(None),
    }
}

fn put<T: Serialize>(overlay: &mut Overlay, key: Vec<u8>, value: &T) -> std::io::Result<()> {
    overlay.insert(key, encode(value)?);
    Ok(())
}

/// Applies one op. `last_seq` gives a conversation's last seq (cursors are clamped to it).
pub fn apply(
    engine: &Engine,
    group: GroupId,
    op: &MessagingOp,
    overlay: &mut Overlay,
    last_seq: impl Fn(&str) -> std::io::Result<u64>,
) -> std::io::Result<MessagingResponse> {
    match op {
        MessagingOp::CreateUser { user, device } => {
            let k = user_key(group, user);
            if get::<UserRecord>(engine, overlay, &k)?.is_some() {
                return Ok(MessagingResponse::UserExists);
            }
            let record = UserRecord {
                user_id: user.clone(),
                devices: vec![device.clone()],
                read_receipts: true,
                created_ms: device.created_ms,
            };
            put(overlay, k, &record)?;
            Ok(MessagingResponse::UserCreated)
        }
        MessagingOp::SetPrivacy {
            user,
            read_receipts,
        } => {
            let k = user_key(group, user);
            let Some(mut record) = get::<UserRecord>(engine, overlay, &k)? else {
                return Ok(MessagingResponse::UnknownUser);
            };
            record.read_receipts = *read_receipts;
            put(overlay, k, &record)?;
            Ok(MessagingResponse::PrivacySet)
        }
        MessagingOp::AddConversation {
            user,
            conversation,
            peer,
        } => {
            let k = user_conversation_key(group, user, conversation);
            if get::<String>(engine, overlay, &k)?.is_none() {
                put(overlay, k, peer)?;
            }
            Ok(MessagingResponse::ConversationAdded)
        }
        MessagingOp::SetCursor {
            conversation,
            user,
            device,
            delivered,
            read,
        } => {
            let last = last_seq(conversation)?;
            let read = (*read).min(last);
            let delivered = (*delivered).max(read).min(last);
            let dk = device_cursor_key(group, conversation, user, device);
            let mk = member_key(group, conversation, user);
            let old_device: u64 = get(engine, overlay, &dk)?.unwrap_or(0);
            let old: MemberCursors = get(engine, overlay, &mk)?.unwrap_or_default();
            let device_delivered = old_device.max(delivered);
            let member = MemberCursors {
                delivered: old.delivered.max(device_delivered),
                read: old.read.max(read),
            };
            if device_delivered != old_device {
                put(overlay, dk, &device_delivered)?;
            }
            if member != old {
                put(overlay, mk, &member)?;
            }
            Ok(MessagingResponse::Cursors {
                previous: old,
                member,
                device_delivered,
            })
        }
    }
}

/// Iterates the keys under `prefix`, decoding values.
fn scan<T: for<'de> Deserialize<'de>>(
    engine: &Engine,
    prefix: &[u8],
) -> std::io::Result<Vec<(Vec<u8>, T)>> {
    let cf = engine.cf_io(CF_STATE)?;
    let mut upper = prefix.to_vec();
    // Prefixes end in the bytes of an id (UTF-8, never 0xff): incrementing the last
    // byte gives the exclusive upper bound.
    if let Some(last) = upper.last_mut() {
        *last = last.saturating_add(1);
    }
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(upper);
    let mut it = engine.db().raw_iterator_cf_opt(cf, opts);
    it.seek(prefix);
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(prefix) {
            break;
        }
        out.push((k[prefix.len()..].to_vec(), decode(v)?));
        it.next();
    }
    it.status().map_err(crate::storage::engine_io_err)?;
    Ok(out)
}

/// Serves a query from the local state (the caller has confirmed it is current).
pub fn query(
    engine: &Engine,
    group: GroupId,
    q: &MessagingQuery,
    last_seq: impl Fn(&str) -> std::io::Result<u64>,
) -> std::io::Result<QueryResult> {
    let none = Overlay::new();
    match q {
        MessagingQuery::GetUser { user } => Ok(QueryResult::User(get(
            engine,
            &none,
            &user_key(group, user),
        )?)),
        MessagingQuery::Conversations { user } => {
            let rows = scan::<String>(engine, &user_conversation_prefix(group, user))?;
            Ok(QueryResult::Conversations(
                rows.into_iter()
                    .map(|(k, peer)| (String::from_utf8_lossy(&k).into_owned(), peer))
                    .collect(),
            ))
        }
        MessagingQuery::ConversationState {
            conversation,
            user,
            device,
        } => {
            let rows = scan::<MemberCursors>(engine, &member_prefix(group, conversation))?;
            let device_delivered = get(
                engine,
                &none,
                &device_cursor_key(group, conversation, user, device),
            )?
            .unwrap_or(0);
            Ok(QueryResult::ConversationState {
                last_seq: last_seq(conversation)?,
                members: rows
                    .into_iter()
                    .map(|(k, c)| (String::from_utf8_lossy(&k).into_owned(), c))
                    .collect(),
                device_delivered,
            })
        }
    }
}
