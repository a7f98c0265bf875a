//! The Raft log of one group, stored under the group's prefix in the shared RocksDB.
//!
//! The newest entries are also kept in memory (the [`Tail`]): right after an append the
//! leader's replication streams and, once committed, every replica's state machine read
//! them back, and serving those reads from memory spares a RocksDB seek and a decode per
//! entry. Older entries (a follower far behind, a restart) are read from RocksDB.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use rocksdb::WriteBatch;

use super::engine::io_err;
use super::{log_key, meta_key, Engine, CF_LOG, CF_META};
use crate::placement::GroupId;
use crate::types::{decode, encode, Entry, LogId, TypeConfig, Vote};

const TAG_VOTE: u8 = b'v';
const TAG_PURGED: u8 = b'p';

/// Encoded bytes of recent entries a group keeps in memory (at least the last entry is
/// kept whatever its size).
const TAIL_BYTES: usize = 2 << 20;

/// The newest entries of the log, contiguous and ending at the log's last entry; empty
/// until the first append after opening.
#[derive(Debug, Default)]
struct Tail {
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index())
    }

    /// Adds an entry just written at the end of the log.
    fn push(&mut self, entry: Entry, size: usize) {
        match self.last_index() {
            // Appends replace a conflicting suffix (openraft truncates first; be safe).
            Some(last) if entry.index() <= last => self.truncate_from(entry.index()),
            Some(last) if entry.index() != last + 1 => self.clear(),
            _ => {}
        }
        self.bytes += size;
        self.entries.push_back((entry, size));
        while self.bytes > TAIL_BYTES && self.entries.len() > 1 {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries at and after `index`.
    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops entries up to and including `index`.
    fn purge_to(&mut self, index: u64) {
        while self.first_index().is_some_and(|first| first <= index) {
            if let Some((_, size)) = self.entries.pop_front() {
                self.bytes -= size;
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// The entries in `[start, end]` (`end` past the last entry reads to the end), or
    /// `None` when `start` is not in memory.
    fn read(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start < first {
            return None;
        }
        if start > last || end < start {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let to = (end.min(last) - first) as usize;
        Some(
            self.entries
                .range(from..=to)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// Log storage for one group.
#[derive(Debug, Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    group: GroupId,
    /// Shared with the log readers handed to openraft.
    tail: Arc<Mutex<Tail>>,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, group: GroupId) -> Self {
        LogStore {
            engine,
            group,
            tail: Arc::default(),
        }
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_meta<T: for<'de> serde::Deserialize<'de>>(&self, tag: u8) -> std::io::Result<Option<T>> {
        let cf = self.engine.cf_io(CF_META)?;
        match self
            .engine
            .db()
            .get_pinned_cf(cf, meta_key(self.group, tag))
            .map_err(io_err)?
        {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn last_entry_log_id(&self) -> std::io::Result<Option<LogId>> {
        let cf = self.engine.cf_io(CF_LOG)?;
        let mut it = self.engine.db().raw_iterator_cf(cf);
        it.seek_for_prev(log_key(self.group, u64::MAX));
        if let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key.len() == 16 && key[..8] == self.group.to_be_bytes() {
                let entry: Entry = decode(value)?;
                return Ok(Some(entry.log_id()));
            }
        }
        it.status().map_err(io_err)?;
        Ok(None)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> std::io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(*x),
            Bound::Excluded(x) => x.checked_sub(1),
            Bound::Unbounded => Some(u64::MAX),
        };
        let Some(end) = end else {
            return Ok(Vec::new());
        };
        if let Some(entries) = self.tail().read(start, end) {
            return Ok(entries);
        }
        let cf = self.engine.cf_io(CF_LOG)?;
        let mut it = self.engine.db().raw_iterator_cf(cf);
        it.seek(log_key(self.group, start));
        let mut entries = Vec::new();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if key.len() != 16 || key[..8] != self.group.to_be_bytes() {
                break;
            }
            let mut idx = [0u8; 8];
            idx.copy_from_slice(&key[8..]);
            if !range.contains(&u64::from_be_bytes(idx)) {
                break;
            }
            entries.push(decode(value)?);
            it.next();
        }
        it.status().map_err(io_err)?;
        Ok(entries)
    }

    async fn read_vote(&mut self) -> std::io::Result<Option<Vote>> {
        self.get_meta(TAG_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> std::io::Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId> = self.get_meta(TAG_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> std::io::Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.engine.cf_io(CF_META)?,
            meta_key(self.group, TAG_VOTE),
            encode(vote)?,
        );
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.write_sync(batch))
            .await
            .map_err(std::io::Error::other)?
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.engine.cf_io(CF_LOG)?;
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for entry in entries {
            let bytes = encode(&entry)?;
            batch.put_cf(cf, log_key(self.group, entry.index()), &bytes);
            written.push((entry, bytes.len()));
        }
        // Written now so the entries are readable when this returns; durable once synced.
        self.engine.db().write(batch).map_err(io_err)?;
        let mut tail = self.tail();
        for (entry, size) in written {
            tail.push(entry, size);
        }
        drop(tail);
        self.engine.sync_then(move |res| callback.io_completed(res));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> std::io::Result<()> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        let cf = self.engine.cf_io(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_key(self.group, from), log_key(self.group, u64::MAX));
        // Also the entry at u64::MAX, excluded by the half-open range.
        batch.delete_cf(cf, log_key(self.group, u64::MAX));
        self.engine.db().write(batch).map_err(io_err)?;
        self.tail().truncate_from(from);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> std::io::Result<()> {
        let mut batch = WriteBatch::default();
        // Record the purge point first (same batch): entries up to it are ignored from now on.
        batch.put_cf(
            self.engine.cf_io(CF_META)?,
            meta_key(self.group, TAG_PURGED),
            encode(&log_id)?,
        );
        batch.delete_range_cf(
            self.engine.cf_io(CF_LOG)?,
            log_key(self.group, 0),
            log_key(self.group, log_id.index() + 1),
        );
        self.engine.db().write(batch).map_err(io_err)?;
        self.tail().purge_to(log_id.index());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::testing::blank_ent;

    fn ent(index: u64) -> Entry {
        blank_ent::<TypeConfig>(1, 1, index)
    }

    fn indexes(entries: Option<Vec<Entry>>) -> Option<Vec<u64>> {
        entries.map(|v| v.iter().map(|e| e.index()).collect())
    }

    fn tail_of(range: std::ops::RangeInclusive<u64>, size: usize) -> Tail {
        let mut tail = Tail::default();
        for i in range {
            tail.push(ent(i), size);
        }
        tail
    }

    #[test]
    fn reads_only_what_it_holds() {
        let tail = tail_of(5..=9, 10);
        assert_eq!(indexes(tail.read(5, 9)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(indexes(tail.read(7, u64::MAX)), Some(vec![7, 8, 9]));
        assert_eq!(indexes(tail.read(6, 7)), Some(vec![6, 7]));
        // Past the end: nothing more exists in the log either.
        assert_eq!(indexes(tail.read(10, 20)), Some(vec![]));
        // Before the first held entry: the caller must read RocksDB.
        assert_eq!(indexes(tail.read(4, 9)), None);
        assert_eq!(indexes(Tail::default().read(0, 9)), None);
    }

    #[test]
    fn truncation_and_purge_drop_entries() {
        let mut tail = tail_of(1..=10, 10);
        tail.truncate_from(8);
        assert_eq!(tail.last_index(), Some(7));
        assert_eq!(tail.bytes, 70);
        tail.purge_to(3);
        assert_eq!(tail.first_index(), Some(4));
        assert_eq!(indexes(tail.read(3, 7)), None);
        assert_eq!(indexes(tail.read(4, 100)), Some(vec![4, 5, 6, 7]));
        // A conflicting append replaces the suffix it overlaps.
        tail.push(ent(6), 10);
        assert_eq!(indexes(tail.read(4, 100)), Some(vec![4, 5, 6]));
        // A gap (never produced by openraft) empties it rather than holding a hole.
        tail.push(ent(9), 10);
        assert_eq!(indexes(tail.read(9, 9)), Some(vec![9]));
        assert_eq!(tail.first_index(), Some(9));
    }

    #[test]
    fn stays_within_its_byte_budget() {
        let size = TAIL_BYTES / 4;
        let tail = tail_of(1..=10, size);
        assert_eq!(tail.first_index(), Some(7));
        assert_eq!(tail.bytes, 4 * size);
        // One entry larger than the budget is still held.
        let big = tail_of(1..=2, TAIL_BYTES * 2);
        assert_eq!(indexes(big.read(2, 2)), Some(vec![2]));
        assert_eq!(big.first_index(), Some(2));
    }
}
