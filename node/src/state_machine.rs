//! The replicated state machine of a group, stored in the `state` column family.
//!
//! Shard groups hold conversation logs; the metadata group (id 0) holds the
//! [`PlacementMap`]. Keys, after the group's 8-byte prefix:
//! - `0x01` applied log id and membership;
//! - `0x02` owned slot range `(start, end, epoch)`;
//! - `0x03` the placement map (metadata group);
//! - `0x05 ++ len16 ++ conversation ++ seq(8 BE)` -> [`StoredMessage`];
//! - `0x06 ++ SHA-256(conversation, sender, client_msg_id)[..16]` -> `(seq, server time)`
//!   (the idempotency record of an append).
//!
//! (`0x04` held conversation heads in earlier versions; it is no longer written.)
//! A conversation's head (last seq and server time) is its last message: found by one
//! reverse seek and then kept in memory, so an append writes two keys, its message and
//! its idempotency record. Idempotency keys are a fixed 16-byte digest whatever the id
//! lengths, which keeps memtable comparisons short; a collision needs about 2^64 chosen
//! ids.
//!
//! Each `apply` call writes one batch that includes the applied log id, so the state
//! on disk is always exactly "everything up to the applied index". The batch is built
//! as a sorted write set and written in key order, which lets the memtable start each
//! insert from where the previous one ended.
//!
//! Snapshots are files: every key of the group, read from a RocksDB snapshot (a
//! consistent point-in-time view) and written as length-prefixed records.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use rocksdb::{ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::messaging_state;
use crate::placement::{GroupId, PlacementMap, Slot};
use crate::storage::{group_end, group_prefix, meta_key, Engine, CF_META, CF_STATE};
use crate::types::{
    decode, encode, AppendCommand, Command, CommandResponse, LogId, Snapshot, SnapshotData,
    SnapshotMeta, StoredMembership, TypeConfig,
};

const KEY_APPLIED: u8 = 0x01;
const KEY_SLOTS: u8 = 0x02;
const KEY_PLACEMENT: u8 = 0x03;
const KEY_MESSAGE: u8 = 0x05;
const KEY_DEDUPE: u8 = 0x06;
const TAG_SNAPSHOT: u8 = b's';
const SNAPSHOT_MAGIC: &[u8; 8] = b"PRLYSNP1";

/// One stored conversation-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub sender: String,
    pub client_msg_id: String,
    pub server_time_ms: i64,
    pub payload: Vec<u8>,
}

/// A [`StoredMessage`] borrowing its fields from the command being applied: it encodes
/// to the same bytes, without copying the payload first.
#[derive(Serialize)]
struct StoredMessageRef<'a> {
    sender: &'a str,
    client_msg_id: &'a str,
    server_time_ms: i64,
    payload: &'a [u8],
}

/// Slot range owned by a shard group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRange {
    pub start: Slot,
    pub end: Slot,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotDescriptor {
    meta: SnapshotMeta,
    file: String,
}

fn state_key(group: GroupId, kind: u8, rest: &[&[u8]]) -> Vec<u8> {
    let len = 9 + rest.iter().map(|r| r.len() + 2).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(&group_prefix(group));
    k.push(kind);
    for (i, part) in rest.iter().enumerate() {
        // Every part but the last is length-prefixed so keys never collide.
        if i + 1 < rest.len() {
            k.extend_from_slice(&(part.len() as u16).to_be_bytes());
        }
        k.extend_from_slice(part);
    }
    k
}

/// Key of message `seq` of a conversation.
pub fn message_key(group: GroupId, conversation: &str, seq: u64) -> Vec<u8> {
    state_key(
        group,
        KEY_MESSAGE,
        &[conversation.as_bytes(), &seq.to_be_bytes()],
    )
}

fn dedupe_key(group: GroupId, conversation: &str, sender: &str, client_msg_id: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    for part in [conversation, sender] {
        h.update((part.len() as u16).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(client_msg_id.as_bytes());
    let digest = h.finalize();
    state_key(group, KEY_DEDUPE, &[&digest[..16]])
}

/// Read options bounding an iterator to a conversation's messages.
fn conversation_bounds(group: GroupId, conversation: &str) -> ReadOptions {
    let mut opts = ReadOptions::default();
    opts.set_iterate_lower_bound(message_key(group, conversation, 0));
    opts.set_iterate_upper_bound(message_key(group, conversation, u64::MAX));
    opts
}

/// A conversation's `(last seq, last server time)` from its last stored message;
/// `(0, 0)` when it has none. `it` must be bounded by [`conversation_bounds`].
fn head_from<D: rocksdb::DBAccess>(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, D>,
) -> std::io::Result<(u64, i64)> {
    it.seek_to_last();
    match (it.key(), it.value()) {
        (Some(key), Some(value)) => {
            let seq = key
                .len()
                .checked_sub(8)
                .and_then(|at| key.get(at..))
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "short message key")
                })?;
            let msg: StoredMessage = decode(value)?;
            Ok((seq, msg.server_time_ms))
        }
        _ => {
            it.status().map_err(crate::storage::engine_io_err)?;
            Ok((0, 0))
        }
    }
}

/// The head of `conversation` as stored in `engine` now.
fn stored_head(engine: &Engine, group: GroupId, conversation: &str) -> std::io::Result<(u64, i64)> {
    let cf = engine.cf_io(CF_STATE)?;
    head_from(
        engine
            .db()
            .raw_iterator_cf_opt(cf, conversation_bounds(group, conversation)),
    )
}

/// The state machine of one group.
pub struct GroupStateMachine {
    engine: Arc<Engine>,
    group: GroupId,
    applied: Option<LogId>,
    membership: StoredMembership,
    slots: Option<SlotRange>,
    /// Metadata group only: the placement map and where to publish it.
    placement: PlacementMap,
    placement_tx: Option<watch::Sender<Arc<PlacementMap>>>,
    /// Conversation heads `(last seq, last time)` already read or written: saves a lookup
    /// per append. Exact (updated after every applied batch), cleared on snapshot install.
    heads: HashMap<String, (u64, i64)>,
}

/// Writes of the batch being applied that later commands of the same batch must see.
#[derive(Default)]
struct Pending {
    /// Conversation heads moved by this batch (kept in memory after it is written).
    heads: HashMap<String, (u64, i64)>,
    dedupe: HashMap<Vec<u8>, (u64, i64)>,
    /// Every other state write of the batch, sorted by key.
    writes: messaging_state::Overlay,
}

/// Heads cached per group before the cache is dropped and refilled from disk.
const HEAD_CACHE_LIMIT: usize = 200_000;

impl GroupStateMachine {
    /// Opens the state machine of `group` from disk. `placement_tx` is given for the metadata group.
    pub fn open(
        engine: Arc<Engine>,
        group: GroupId,
        placement_tx: Option<watch::Sender<Arc<PlacementMap>>>,
    ) -> std::io::Result<Self> {
        let mut sm = GroupStateMachine {
            engine,
            group,
            applied: None,
            membership: StoredMembership::default(),
            slots: None,
            placement: PlacementMap::default(),
            placement_tx,
            heads: HashMap::new(),
        };
        sm.load()?;
        Ok(sm)
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> std::io::Result<Option<T>> {
        let cf = self.engine.cf_io(CF_STATE)?;
        match self
            .engine
            .db()
            .get_pinned_cf(cf, key)
            .map_err(crate::storage::engine_io_err)?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Reloads the in-memory view (applied state, slot range, placement) from disk.
    fn load(&mut self) -> std::io::Result<()> {
        self.heads.clear();
        let (applied, membership) = self
            .get::<(Option<LogId>, StoredMembership)>(&state_key(self.group, KEY_APPLIED, &[]))?
            .unwrap_or_default();
        self.applied = applied;
        self.membership = membership;
        self.slots = self.get(&state_key(self.group, KEY_SLOTS, &[]))?;
        self.placement = self
            .get(&state_key(self.group, KEY_PLACEMENT, &[]))?
            .unwrap_or_default();
        if let Some(tx) = &self.placement_tx {
            let map = Arc::new(self.placement.clone());
            tx.send_if_modified(|cur| {
                if map.epoch > cur.epoch {
                    *cur = map;
                    true
                } else {
                    false
                }
            });
        }
        Ok(())
    }

    /// `Some(moved)` when this group does not own `slot`.
    fn check_slot(&self, slot: Slot) -> Option<CommandResponse> {
        let Some(range) = self.slots else {
            return Some(CommandResponse::Moved { epoch: 0 });
        };
        if !(range.start..=range.end).contains(&slot) {
            return Some(CommandResponse::Moved { epoch: range.epoch });
        }
        None
    }

    /// A conversation's `(last seq, last time)`, seeing this batch's appends.
    fn head_of(
        &self,
        conversation: &str,
        heads: &HashMap<String, (u64, i64)>,
    ) -> std::io::Result<(u64, i64)> {
        match heads
            .get(conversation)
            .or_else(|| self.heads.get(conversation))
        {
            Some(h) => Ok(*h),
            None => stored_head(&self.engine, self.group, conversation),
        }
    }

    fn apply_append(
        &self,
        cmd: &AppendCommand,
        pending: &mut Pending,
    ) -> std::io::Result<CommandResponse> {
        if let Some(moved) = self.check_slot(cmd.slot) {
            return Ok(moved);
        }
        let Pending {
            heads,
            dedupe,
            writes,
        } = pending;
        let dkey = dedupe_key(
            self.group,
            &cmd.conversation,
            &cmd.sender,
            &cmd.client_msg_id,
        );
        let prior = match dedupe.get(&dkey) {
            Some(v) => Some(*v),
            None => self.get::<(u64, i64)>(&dkey)?,
        };
        if let Some((seq, server_time_ms)) = prior {
            return Ok(CommandResponse::Appended {
                seq,
                server_time_ms,
                duplicate: true,
            });
        }
        let (last_seq, last_time) = self.head_of(&cmd.conversation, heads)?;
        let seq = last_seq + 1;
        let server_time_ms = cmd.proposed_at_ms.max(last_time);
        let msg = StoredMessageRef {
            sender: &cmd.sender,
            client_msg_id: &cmd.client_msg_id,
            server_time_ms,
            payload: &cmd.payload,
        };
        writes.insert(
            message_key(self.group, &cmd.conversation, seq),
            encode(&msg)?,
        );
        writes.insert(dkey.clone(), encode(&(seq, server_time_ms))?);
        heads.insert(cmd.conversation.clone(), (seq, server_time_ms));
        dedupe.insert(dkey, (seq, server_time_ms));
        Ok(CommandResponse::Appended {
            seq,
            server_time_ms,
            duplicate: false,
        })
    }

    fn apply_command(
        &mut self,
        cmd: &Command,
        pending: &mut Pending,
    ) -> std::io::Result<CommandResponse> {
        let is_meta = self.placement_tx.is_some();
        match cmd {
            Command::Append(a) if !is_meta => self.apply_append(a, pending),
            Command::Batch(cmds) if !is_meta => {
                let mut responses = Vec::with_capacity(cmds.len());
                for c in cmds {
                    responses.push(match c {
                        Command::Batch(_) => CommandResponse::Rejected("nested batch".into()),
                        c => self.apply_command(c, pending)?,
                    });
                }
                Ok(CommandResponse::Batch(responses))
            }
            Command::Messaging { slot, op } if !is_meta => {
                if let Some(moved) = self.check_slot(*slot) {
                    return Ok(moved);
                }
                let Pending { heads, writes, .. } = pending;
                let heads = &*heads;
                let resp = messaging_state::apply(&self.engine, self.group, op, writes, |conv| {
                    self.head_of(conv, heads).map(|h| h.0)
                })?;
                Ok(CommandResponse::Messaging(resp))
            }
            Command::AssignSlots { start, end, epoch } if !is_meta => {
                let range = SlotRange {
                    start: *start,
                    end: *end,
                    epoch: *epoch,
                };
                pending
                    .writes
                    .insert(state_key(self.group, KEY_SLOTS, &[]), encode(&range)?);
                self.slots = Some(range);
                Ok(CommandResponse::SlotsAssigned)
            }
            Command::Meta(m) if is_meta => {
                let resp = self.placement.apply(m);
                pending.writes.insert(
                    state_key(self.group, KEY_PLACEMENT, &[]),
                    encode(&self.placement)?,
                );
                Ok(CommandResponse::Meta(resp))
            }
            other => Ok(CommandResponse::Rejected(format!(
                "group {} does not accept {}",
                self.group,
                match other {
                    Command::Meta(_) => "metadata commands",
                    _ => "conversation commands",
                }
            ))),
        }
    }

    /// Writes what a batch of entries produced, with the applied log id, in key order.
    fn write_pending(&mut self, mut pending: Pending) -> std::io::Result<()> {
        pending.writes.insert(
            state_key(self.group, KEY_APPLIED, &[]),
            encode(&(self.applied, self.membership.clone()))?,
        );
        let cf = self.engine.cf_io(CF_STATE)?;
        let mut batch = WriteBatch::default();
        for (key, value) in &pending.writes {
            batch.put_cf(cf, key, value);
        }
        // No WAL for state: it is rebuilt from the (synced) Raft log after a crash. The batch
        // carries its applied log id, so whatever survives in flushed tables is a consistent
        // prefix; snapshots flush the state first, so the log is never purged past it.
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        self.engine
            .db()
            .write_opt(batch, &wo)
            .map_err(crate::storage::engine_io_err)?;
        if self.heads.len() + pending.heads.len() > HEAD_CACHE_LIMIT {
            self.heads.clear();
        }
        self.heads.extend(pending.heads);
        Ok(())
    }

    fn descriptor(&self) -> std::io::Result<Option<SnapshotDescriptor>> {
        let cf = self.engine.cf_io(CF_META)?;
        match self
            .engine
            .db()
            .get_pinned_cf(cf, meta_key(self.group, TAG_SNAPSHOT))
            .map_err(crate::storage::engine_io_err)?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Serves a messaging query from local state (the caller confirmed it is current).
    pub fn messaging_query(
        engine: &Engine,
        group: GroupId,
        q: &messaging_state::MessagingQuery,
    ) -> std::io::Result<messaging_state::QueryResult> {
        messaging_state::query(engine, group, q, |conv| {
            Ok(stored_head(engine, group, conv)?.0)
        })
    }

    /// Reads a conversation's entries `from_seq..` (at most `limit`) and its last seq.
    pub fn read_conversation(
        engine: &Engine,
        group: GroupId,
        conversation: &str,
        from_seq: u64,
        limit: usize,
    ) -> std::io::Result<(Vec<(u64, StoredMessage)>, u64)> {
        let cf = engine.cf_io(CF_STATE)?;
        let db = engine.db();
        let snap = db.snapshot();
        let (last_seq, _) =
            head_from(snap.raw_iterator_cf_opt(cf, conversation_bounds(group, conversation)))?;
        let mut out = Vec::new();
        let from = from_seq.max(1);
        if from > last_seq || limit == 0 {
            return Ok((out, last_seq));
        }
        let start = message_key(group, conversation, from);
        let end = message_key(group, conversation, last_seq);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(message_key(group, conversation, last_seq.saturating_add(1)));
        let mut it = snap.raw_iterator_cf_opt(cf, opts);
        it.seek(&start);
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key > end.as_slice() || out.len() >= limit {
                break;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(&key[key.len() - 8..]);
            out.push((u64::from_be_bytes(seq), decode(value)?));
            it.next();
        }
        it.status().map_err(crate::storage::engine_io_err)?;
        Ok((out, last_seq))
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> std::io::Result<(Option<LogId>, StoredMembership)> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> std::io::Result<()>
    where
        Strm: Stream<Item = std::io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut pending = Pending::default();
        let mut replies = Vec::new();
        let mut placement_changed = false;
        while let Some((entry, responder)) = entries.try_next().await? {
            self.applied = Some(entry.log_id());
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Normal(cmd) => {
                    placement_changed |= matches!(cmd, Command::Meta(_));
                    self.apply_command(cmd, &mut pending)?
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id()), m.clone());
                    CommandResponse::None
                }
            };
            if let Some(r) = responder {
                replies.push((r, resp));
            }
        }
        self.write_pending(pending)?;
        if placement_changed {
            if let Some(tx) = &self.placement_tx {
                let map = Arc::new(self.placement.clone());
                tx.send_if_modified(|cur| {
                    if map.epoch > cur.epoch {
                        *cur = map;
                        true
                    } else {
                        false
                    }
                });
            }
        }
        for (r, resp) in replies {
            r.send(resp);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            engine: self.engine.clone(),
            group: self.group,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> std::io::Result<()> {
        let engine = self.engine.clone();
        let group = self.group;
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || install_snapshot_file(&engine, group, &meta, snapshot))
            .await
            .map_err(std::io::Error::other)??;
        self.load()
    }

    async fn get_current_snapshot(&mut self) -> std::io::Result<Option<Snapshot>> {
        let Some(desc) = self.descriptor()? else {
            return Ok(None);
        };
        let path = self.engine.snapshot_dir().join(&desc.file);
        match std::fs::File::open(&path) {
            Ok(file) => Ok(Some(Snapshot {
                meta: desc.meta,
                snapshot: file,
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Builds a snapshot file of one group from a consistent RocksDB view.
pub struct SnapshotBuilder {
    engine: Arc<Engine>,
    group: GroupId,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> std::io::Result<Snapshot> {
        let engine = self.engine.clone();
        let group = self.group;
        tokio::task::spawn_blocking(move || build_snapshot_file(&engine, group))
            .await
            .map_err(std::io::Error::other)?
    }
}

/// A fresh, unique file name for a snapshot of `group` up to `last`.
fn snapshot_file_name(group: GroupId, last: Option<&LogId>) -> String {
    let index = last.map(|l| l.index()).unwrap_or(0);
    format!("g{group}-i{index}-{:016x}.snap", rand::random::<u64>())
}

fn write_record(w: &mut impl Write, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    w.write_all(&(key.len() as u32).to_be_bytes())?;
    w.write_all(key)?;
    w.write_all(&(value.len() as u32).to_be_bytes())?;
    w.write_all(value)
}

/// Reads one record; `None` at a clean end of file.
fn read_record(r: &mut impl Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let klen = u32::from_be_bytes(len) as usize;
    if klen > 1 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "snapshot key too long",
        ));
    }
    let mut key = vec![0u8; klen];
    r.read_exact(&mut key)?;
    r.read_exact(&mut len)?;
    let vlen = u32::from_be_bytes(len) as usize;
    if vlen > 64 << 20 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "snapshot value too long",
        ));
    }
    let mut value = vec![0u8; vlen];
    r.read_exact(&mut value)?;
    Ok(Some((key, value)))
}

fn build_snapshot_file(engine: &Engine, group: GroupId) -> std::io::Result<Snapshot> {
    let db = engine.db();
    let cf = engine.cf_io(CF_STATE)?;
    let view = db.snapshot();
    // State is written without the WAL: flush it (a superset of the view just taken) so it is
    // durable before the log it came from may be purged on the strength of this snapshot.
    db.flush_cf(cf).map_err(crate::storage::engine_io_err)?;
    let (applied, membership): (Option<LogId>, StoredMembership) = match view
        .get_cf(cf, state_key(group, KEY_APPLIED, &[]))
        .map_err(crate::storage::engine_io_err)?
    {
        Some(v) => decode(&v)?,
        None => Default::default(),
    };
    let file_name = snapshot_file_name(group, applied.as_ref());
    let dir = engine.snapshot_dir();
    let tmp = dir.join(format!("{file_name}.tmp"));
    {
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(SNAPSHOT_MAGIC)?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(group_end(group).to_vec());
        let mut it = view.raw_iterator_cf_opt(cf, opts);
        it.seek(group_prefix(group));
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            // Keys are stored without the group prefix so the format is group-independent.
            write_record(&mut w, &key[8..], value)?;
            it.next();
        }
        it.status().map_err(crate::storage::engine_io_err)?;
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(&file_name))?;
    let meta = SnapshotMeta {
        last_log_id: applied,
        last_membership: membership,
    };
    set_current_snapshot(engine, group, &meta, &file_name)?;
    let file = std::fs::File::open(dir.join(&file_name))?;
    Ok(Snapshot {
        meta,
        snapshot: file,
    })
}

/// Records `file_name` as the group's current snapshot and removes the previous file.
fn set_current_snapshot(
    engine: &Engine,
    group: GroupId,
    meta: &SnapshotMeta,
    file_name: &str,
) -> std::io::Result<()> {
    let cf = engine.cf_io(CF_META)?;
    let key = meta_key(group, TAG_SNAPSHOT);
    let previous: Option<SnapshotDescriptor> = match engine
        .db()
        .get_pinned_cf(cf, key)
        .map_err(crate::storage::engine_io_err)?
    {
        Some(v) => decode(&v).ok(),
        None => None,
    };
    let mut batch = WriteBatch::default();
    batch.put_cf(
        cf,
        key,
        encode(&SnapshotDescriptor {
            meta: meta.clone(),
            file: file_name.to_string(),
        })?,
    );
    engine.write_sync(batch)?;
    if let Some(prev) = previous {
        if prev.file != file_name {
            let _ = std::fs::remove_file(engine.snapshot_dir().join(prev.file));
        }
    }
    Ok(())
}

fn install_snapshot_file(
    engine: &Engine,
    group: GroupId,
    meta: &SnapshotMeta,
    file: std::fs::File,
) -> std::io::Result<()> {
    let cf = engine.cf_io(CF_STATE)?;
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != SNAPSHOT_MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a Parley snapshot",
        ));
    }
    // One atomic batch: the group's state is either the old one or exactly the snapshot.
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(cf, group_prefix(group), group_end(group));
    while let Some((key, value)) = read_record(&mut r)? {
        let mut full = group_prefix(group).to_vec();
        full.extend_from_slice(&key);
        batch.put_cf(cf, &full, &value);
    }
    batch.put_cf(
        cf,
        state_key(group, KEY_APPLIED, &[]),
        encode(&(meta.last_log_id, meta.last_membership.clone()))?,
    );
    engine.write_sync(batch)?;
    // Keep the installed snapshot as this replica's current one, so it can serve it too.
    let file_name = snapshot_file_name(group, meta.last_log_id.as_ref());
    let path: PathBuf = engine.snapshot_dir().join(&file_name);
    {
        let mut src = r.into_inner();
        src.seek(std::io::SeekFrom::Start(0))?;
        let mut dst = std::fs::File::create(&path)?;
        std::io::copy(&mut src, &mut dst)?;
        dst.sync_all()?;
    }
    set_current_snapshot(engine, group, meta, &file_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn engine() -> (tempfile::TempDir, Arc<Engine>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(dir.path(), Arc::new(Metrics::new())).expect("engine");
        (dir, engine)
    }

    fn append(conv: &str, id: &str, slot: Slot, at: i64) -> Command {
        Command::Append(AppendCommand {
            conversation: conv.into(),
            sender: "alice".into(),
            client_msg_id: id.into(),
            slot,
            proposed_at_ms: at,
            payload: id.as_bytes().to_vec(),
        })
    }

    #[test]
    fn borrowed_message_encodes_like_the_stored_one() {
        let stored = StoredMessage {
            sender: "alice".into(),
            client_msg_id: "m-1".into(),
            server_time_ms: 1_700_000_000_123,
            payload: vec![0, 1, 2, 255],
        };
        let borrowed = StoredMessageRef {
            sender: &stored.sender,
            client_msg_id: &stored.client_msg_id,
            server_time_ms: stored.server_time_ms,
            payload: &stored.payload,
        };
        let bytes = encode(&borrowed).expect("encode");
        assert_eq!(bytes, encode(&stored).expect("encode"));
        assert_eq!(decode::<StoredMessage>(&bytes).expect("decode"), stored);
    }

    /// Applies commands as one batch, the way `apply` does, and returns the responses.
    fn apply_all(sm: &mut GroupStateMachine, cmds: &[Command]) -> Vec<CommandResponse> {
        let mut pending = Pending::default();
        let out = cmds
            .iter()
            .map(|c| sm.apply_command(c, &mut pending).expect("apply"))
            .collect();
        sm.write_pending(pending).expect("write");
        out
    }

    fn messaging(slot: Slot, op: messaging_state::MessagingOp) -> Command {
        Command::Messaging { slot, op }
    }

    fn cursor(delivered: u64, read: u64, device: &str) -> Command {
        messaging(
            5,
            messaging_state::MessagingOp::SetCursor {
                conversation: "c".into(),
                user: "bob".into(),
                device: device.into(),
                delivered,
                read,
            },
        )
    }

    #[test]
    fn cursors_only_move_forward_and_never_past_the_last_message() {
        use messaging_state::{MemberCursors, MessagingQuery, MessagingResponse, QueryResult};
        let (_dir, engine) = engine();
        let mut sm = GroupStateMachine::open(engine.clone(), 3, None).expect("open");
        apply_all(
            &mut sm,
            &[Command::AssignSlots {
                start: 0,
                end: 99,
                epoch: 1,
            }],
        );
        // A slot the group does not own is refused like an append.
        assert_eq!(
            apply_all(
                &mut sm,
                &[messaging(
                    500,
                    messaging_state::MessagingOp::SetPrivacy {
                        user: "x".into(),
                        read_receipts: false,
                    }
                )]
            ),
            vec![CommandResponse::Moved { epoch: 1 }]
        );
        let r = apply_all(
            &mut sm,
            &[
                append("c", "m1", 5, 1),
                append("c", "m2", 5, 1),
                append("c", "m3", 5, 1),
                // Past the end: clamped to 3. In the same batch as the appends.
                cursor(10, 0, "phone"),
                // Backwards: a no-op.
                cursor(1, 0, "phone"),
                // Read implies delivered; another device does not lower the member cursor.
                cursor(0, 2, "laptop"),
            ],
        );
        let cursors: Vec<_> = r[3..].to_vec();
        assert_eq!(
            cursors,
            vec![
                CommandResponse::Messaging(MessagingResponse::Cursors {
                    previous: MemberCursors::default(),
                    member: MemberCursors {
                        delivered: 3,
                        read: 0
                    },
                    device_delivered: 3,
                }),
                CommandResponse::Messaging(MessagingResponse::Cursors {
                    previous: MemberCursors {
                        delivered: 3,
                        read: 0
                    },
                    member: MemberCursors {
                        delivered: 3,
                        read: 0
                    },
                    device_delivered: 3,
                }),
                CommandResponse::Messaging(MessagingResponse::Cursors {
                    previous: MemberCursors {
                        delivered: 3,
                        read: 0
                    },
                    member: MemberCursors {
                        delivered: 3,
                        read: 2
                    },
                    device_delivered: 2,
                }),
            ]
        );
        let q = MessagingQuery::ConversationState {
            conversation: "c".into(),
            user: "bob".into(),
            device: "laptop".into(),
        };
        assert_eq!(
            GroupStateMachine::messaging_query(&engine, 3, &q).expect("query"),
            QueryResult::ConversationState {
                last_seq: 3,
                members: vec![(
                    "bob".into(),
                    MemberCursors {
                        delivered: 3,
                        read: 2
                    }
                )],
                device_delivered: 2,
            }
        );
    }

    #[test]
    fn users_are_created_once_and_conversations_indexed_once() {
        use messaging_state::{
            DeviceRecord, MessagingOp, MessagingQuery, MessagingResponse, QueryResult,
        };
        let (_dir, engine) = engine();
        let mut sm = GroupStateMachine::open(engine.clone(), 3, None).expect("open");
        apply_all(
            &mut sm,
            &[Command::AssignSlots {
                start: 0,
                end: 99,
                epoch: 1,
            }],
        );
        let create = |secret: u8| {
            messaging(
                7,
                MessagingOp::CreateUser {
                    user: "alice".into(),
                    device: DeviceRecord {
                        device_id: "phone".into(),
                        secret_sha256: vec![secret; 32],
                        created_ms: 1,
                    },
                },
            )
        };
        let add = |conv: &str, peer: &str| {
            messaging(
                7,
                MessagingOp::AddConversation {
                    user: "alice".into(),
                    conversation: conv.into(),
                    peer: peer.into(),
                },
            )
        };
        let r = apply_all(
            &mut sm,
            &[
                create(1),
                create(2),
                add("dm:alice:bob", "bob"),
                add("dm:alice:bob", "bob"),
                add("dm:alice:carol", "carol"),
            ],
        );
        assert_eq!(
            r[0],
            CommandResponse::Messaging(MessagingResponse::UserCreated)
        );
        assert_eq!(
            r[1],
            CommandResponse::Messaging(MessagingResponse::UserExists)
        );
        let user = GroupStateMachine::messaging_query(
            &engine,
            3,
            &MessagingQuery::GetUser {
                user: "alice".into(),
            },
        )
        .expect("query");
        match user {
            // The first registration's secret stands.
            QueryResult::User(Some(u)) => assert_eq!(u.devices[0].secret_sha256, vec![1; 32]),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            GroupStateMachine::messaging_query(
                &engine,
                3,
                &MessagingQuery::Conversations {
                    user: "alice".into()
                }
            )
            .expect("query"),
            QueryResult::Conversations(vec![
                ("dm:alice:bob".into(), "bob".into()),
                ("dm:alice:carol".into(), "carol".into()),
            ])
        );
        // Another user's index is separate even when one id prefixes the other.
        assert_eq!(
            GroupStateMachine::messaging_query(
                &engine,
                3,
                &MessagingQuery::Conversations {
                    user: "alic".into()
                }
            )
            .expect("query"),
            QueryResult::Conversations(vec![])
        );
    }

    #[test]
    fn batch_entries_answer_each_command_like_separate_entries() {
        let (_dir, engine) = engine();
        let mut sm = GroupStateMachine::open(engine.clone(), 3, None).expect("open");
        apply_all(
            &mut sm,
            &[Command::AssignSlots {
                start: 0,
                end: 99,
                epoch: 2,
            }],
        );
        let appended = |seq, t| CommandResponse::Appended {
            seq,
            server_time_ms: t,
            duplicate: false,
        };
        let r = apply_all(
            &mut sm,
            &[
                Command::Batch(vec![
                    append("c", "m1", 5, 10),
                    append("c", "m2", 5, 11),
                    // A retry inside the same batch gets the original seq.
                    append("c", "m1", 5, 12),
                    // A foreign slot is refused for that command only.
                    append("z", "m1", 500, 1),
                    Command::Batch(vec![append("c", "m9", 5, 1)]),
                    append("d", "m1", 6, 3),
                ]),
                // The entry after the batch sees everything the batch wrote.
                append("c", "m3", 5, 13),
            ],
        );
        assert_eq!(
            r,
            vec![
                CommandResponse::Batch(vec![
                    appended(1, 10),
                    appended(2, 11),
                    CommandResponse::Appended {
                        seq: 1,
                        server_time_ms: 10,
                        duplicate: true
                    },
                    CommandResponse::Moved { epoch: 2 },
                    CommandResponse::Rejected("nested batch".into()),
                    appended(1, 3),
                ]),
                appended(3, 13),
            ]
        );
        let (entries, last) =
            GroupStateMachine::read_conversation(&engine, 3, "c", 1, 10).expect("read");
        assert_eq!(last, 3);
        let ids: Vec<_> = entries
            .iter()
            .map(|(seq, m)| (*seq, m.client_msg_id.as_str()))
            .collect();
        assert_eq!(ids, vec![(1, "m1"), (2, "m2"), (3, "m3")]);
        // The head survives a reopen (it is written once per batch, not per message).
        drop(sm);
        let mut sm = GroupStateMachine::open(engine.clone(), 3, None).expect("reopen");
        assert_eq!(
            apply_all(&mut sm, &[append("c", "m4", 5, 14)]),
            vec![appended(4, 14)]
        );
    }

    #[test]
    fn seqs_are_contiguous_retries_deduplicated_and_foreign_slots_refused() {
        let (_dir, engine) = engine();
        let mut sm = GroupStateMachine::open(engine.clone(), 3, None).expect("open");
        // Before the slot range is assigned, nothing is accepted.
        assert_eq!(
            apply_all(&mut sm, &[append("c", "m0", 5, 1)]),
            vec![CommandResponse::Moved { epoch: 0 }]
        );
        apply_all(
            &mut sm,
            &[Command::AssignSlots {
                start: 0,
                end: 99,
                epoch: 4,
            }],
        );
        let r = apply_all(
            &mut sm,
            &[
                append("c", "m1", 5, 10),
                append("c", "m2", 5, 5),
                append("c", "m1", 5, 20),
                append("d", "m1", 6, 1),
            ],
        );
        assert_eq!(
            r,
            vec![
                CommandResponse::Appended {
                    seq: 1,
                    server_time_ms: 10,
                    duplicate: false
                },
                // Server time never goes backwards within a conversation.
                CommandResponse::Appended {
                    seq: 2,
                    server_time_ms: 10,
                    duplicate: false
                },
                // Same (conversation, sender, id) within the batch: the original seq.
                CommandResponse::Appended {
                    seq: 1,
                    server_time_ms: 10,
                    duplicate: true
                },
                CommandResponse::Appended {
                    seq: 1,
                    server_time_ms: 1,
                    duplicate: false
                },
            ]
        );
        // Across batches too, and a slot outside the range is refused with the epoch.
        let r = apply_all(
            &mut sm,
            &[
                append("c", "m2", 5, 30),
                append("c", "m3", 5, 30),
                append("e", "x", 100, 1),
            ],
        );
        assert_eq!(
            r[0],
            CommandResponse::Appended {
                seq: 2,
                server_time_ms: 10,
                duplicate: true
            }
        );
        assert_eq!(
            r[1],
            CommandResponse::Appended {
                seq: 3,
                server_time_ms: 30,
                duplicate: false
            }
        );
        assert_eq!(r[2], CommandResponse::Moved { epoch: 4 });
        // Metadata commands are not for shard groups.
        let r = apply_all(
            &mut sm,
            &[Command::Meta(
                crate::placement::MetaCommand::GroupInitialized { group: 1 },
            )],
        );
        assert!(matches!(r[0], CommandResponse::Rejected(_)));

        let (entries, last) =
            GroupStateMachine::read_conversation(&engine, 3, "c", 1, 10).expect("read");
        assert_eq!(last, 3);
        let ids: Vec<(u64, &str)> = entries
            .iter()
            .map(|(s, m)| (*s, m.client_msg_id.as_str()))
            .collect();
        assert_eq!(ids, vec![(1, "m1"), (2, "m2"), (3, "m3")]);
        let (page, _) = GroupStateMachine::read_conversation(&engine, 3, "c", 2, 1).expect("read");
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].0, 2);
        // The head survives a reopen (the cache is only a cache).
        let mut reopened = GroupStateMachine::open(engine, 3, None).expect("reopen");
        assert_eq!(
            apply_all(&mut reopened, &[append("c", "m4", 5, 40)]),
            vec![CommandResponse::Appended {
                seq: 4,
                server_time_ms: 40,
                duplicate: false
            }]
        );
    }

    #[tokio::test]
    async fn snapshots_carry_the_whole_group_to_another_node() {
        let (_a, leader) = engine();
        let mut sm = GroupStateMachine::open(leader.clone(), 2, None).expect("open");
        apply_all(
            &mut sm,
            &[Command::AssignSlots {
                start: 0,
                end: crate::placement::SLOT_COUNT - 1,
                epoch: 1,
            }],
        );
        let cmds: Vec<Command> = (0..500)
            .map(|i| append(&format!("c{}", i % 7), &format!("m{i}"), 1, i))
            .collect();
        apply_all(&mut sm, &cmds);
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        // A group sharing the engine is untouched by the other group's snapshot.
        let (_b, follower) = engine();
        let mut other = GroupStateMachine::open(follower.clone(), 9, None).expect("open");
        apply_all(
            &mut other,
            &[Command::AssignSlots {
                start: 0,
                end: 5,
                epoch: 1,
            }],
        );
        let mut target = GroupStateMachine::open(follower.clone(), 2, None).expect("open");
        target
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .expect("install");
        for c in 0..7 {
            let conv = format!("c{c}");
            let a = GroupStateMachine::read_conversation(&leader, 2, &conv, 1, 1000).expect("read");
            let b =
                GroupStateMachine::read_conversation(&follower, 2, &conv, 1, 1000).expect("read");
            assert_eq!(a, b, "{conv} differs after snapshot install");
            assert!(a.1 > 70);
        }
        // Installed state keeps deduplicating and numbering where the leader left off.
        let next = apply_all(
            &mut target,
            &[append("c0", "m0", 1, 0), append("c0", "new", 1, 999)],
        );
        assert!(matches!(
            next[0],
            CommandResponse::Appended {
                seq: 1,
                duplicate: true,
                ..
            }
        ));
        assert!(matches!(
            next[1],
            CommandResponse::Appended {
                duplicate: false,
                ..
            }
        ));
        assert_eq!(
            other.slots,
            Some(SlotRange {
                start: 0,
                end: 5,
                epoch: 1
            })
        );
        let reopened = GroupStateMachine::open(follower, 9, None).expect("reopen");
        assert_eq!(
            reopened.slots,
            Some(SlotRange {
                start: 0,
                end: 5,
                epoch: 1
            })
        );
    }

    #[test]
    fn corrupt_snapshot_files_are_errors_not_panics() {
        let (dir, engine) = engine();
        let path = dir.path().join("bad.snap");
        std::fs::write(&path, b"not a snapshot at all").expect("write");
        let meta = SnapshotMeta::default();
        let file = std::fs::File::open(&path).expect("open");
        assert!(install_snapshot_file(&engine, 1, &meta, file).is_err());
        let mut truncated = SNAPSHOT_MAGIC.to_vec();
        truncated.extend_from_slice(&[0, 0, 0, 9, 1, 2]);
        std::fs::write(&path, &truncated).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        assert!(install_snapshot_file(&engine, 1, &meta, file).is_err());
    }
}
