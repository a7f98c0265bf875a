//! The Raft log of one group, stored under the group's prefix in the shared RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

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

/// Log storage for one group.
#[derive(Debug, Clone)]
pub struct LogStore {
    engine: Arc<Engine>,
    group: GroupId,
}

impl LogStore {
    pub fn new(engine: Arc<Engine>, group: GroupId) -> Self {
        LogStore { engine, group }
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
        for entry in entries {
            batch.put_cf(cf, log_key(self.group, entry.index()), encode(&entry)?);
        }
        // Written now so the entries are readable when this returns; durable once synced.
        self.engine.db().write(batch).map_err(io_err)?;
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
        self.engine.db().write(batch).map_err(io_err)
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
        self.engine.db().write(batch).map_err(io_err)
    }
}
