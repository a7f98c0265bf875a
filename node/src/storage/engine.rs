use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::metrics::Metrics;
use crate::placement::GroupId;

pub const CF_LOG: &str = "raft_log";
pub const CF_META: &str = "raft_meta";
pub const CF_STATE: &str = "state";

/// A storage failure, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("opening RocksDB at {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("RocksDB column family {0} missing")]
    MissingColumnFamily(&'static str),
    #[error("creating directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Memtable size of the state column family (see [`cf_options`]).
const STATE_WRITE_BUFFER: usize = 16 << 20;
/// Level-0 files of the state column family that start a compaction.
const STATE_L0_TRIGGER: i32 = 4;
/// Memtable size of the log and metadata column families.
const LOG_WRITE_BUFFER: usize = 64 << 20;
/// Block cache shared by every column family (data blocks: recent messages being read).
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// How long the WAL-sync thread waits for more appends before an fsync while busy.
const SYNC_LINGER: std::time::Duration = std::time::Duration::from_micros(250);

type SyncCallback = Box<dyn FnOnce(std::io::Result<()>) + Send>;

/// The node's RocksDB instance and its WAL-sync thread.
pub struct Engine {
    db: Arc<DB>,
    dir: PathBuf,
    /// `None` only while dropping.
    sync_tx: Option<mpsc::Sender<SyncCallback>>,
    sync_thread: Option<std::thread::JoinHandle<()>>,
    /// Set by fault injection: behave as if the disk were full.
    disk_full_injected: AtomicBool,
    /// Set while free disk space is below the configured floor.
    disk_low: AtomicBool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("dir", &self.dir).finish()
    }
}

impl Engine {
    /// Opens (or creates) the node's database under `dir`.
    pub fn open(dir: &Path, metrics: Arc<Metrics>) -> Result<Arc<Engine>, StorageError> {
        let db_dir = dir.join("db");
        for d in [&db_dir, &dir.join("snapshots")] {
            std::fs::create_dir_all(d).map_err(|source| StorageError::Dir {
                path: d.clone(),
                source,
            })?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Compactions read their inputs in 2 MiB chunks instead of one block per read call.
        opts.set_compaction_readahead_size(2 << 20);
        opts.set_bytes_per_sync(1 << 20);
        // The log column family uses a vector memtable (below), which takes inserts one
        // writer at a time.
        opts.set_allow_concurrent_memtable_write(false);
        // Writes only buffer the WAL; the WAL-sync thread writes and fsyncs it once for
        // everything queued (a synced write also flushes it first).
        opts.set_manual_wal_flush(true);
        let cache = rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES).map_err(|source| {
            StorageError::Open {
                path: db_dir.clone(),
                source,
            }
        })?;
        let cfs = [CF_LOG, CF_META, CF_STATE]
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options(name, &cache)));
        let db =
            DB::open_cf_descriptors(&opts, &db_dir, cfs).map_err(|source| StorageError::Open {
                path: db_dir.clone(),
                source,
            })?;
        let db = Arc::new(db);
        let (sync_tx, sync_rx) = mpsc::channel::<SyncCallback>();
        let sync_db = db.clone();
        let sync_thread = std::thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || wal_sync_loop(sync_db, sync_rx, metrics))
            .map_err(|source| StorageError::Dir {
                path: db_dir,
                source,
            })?;

        let engine = Engine {
            db,
            dir: dir.to_path_buf(),
            sync_tx: Some(sync_tx),
            sync_thread: Some(sync_thread),
            disk_full_injected: AtomicBool::new(false),
            disk_low: AtomicBool::new(false),
        };
        for cf in [CF_LOG, CF_META, CF_STATE] {
            engine.cf(cf)?;
        }
        Ok(Arc::new(engine))
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }

    pub fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StorageError> {
        self.db
            .cf_handle(name)
            .ok_or(StorageError::MissingColumnFamily(name))
    }

    /// Column family handle for internal use after `open` verified they all exist.
    pub(crate) fn cf_io(&self, name: &'static str) -> std::io::Result<&ColumnFamily> {
        self.cf(name).map_err(std::io::Error::other)
    }

    /// Calls `done` once everything written so far is fsync'd.
    pub fn sync_then(&self, done: impl FnOnce(std::io::Result<()>) + Send + 'static) {
        let Some(tx) = &self.sync_tx else {
            return done(Err(std::io::Error::other("WAL sync thread stopped")));
        };
        if let Err(mpsc::SendError(done)) = tx.send(Box::new(done)) {
            done(Err(std::io::Error::other("WAL sync thread stopped")));
        }
    }

    /// Flushes and fsyncs the WAL now (before a clean exit).
    pub fn sync_now(&self) -> std::io::Result<()> {
        self.db.flush_wal(true).map_err(io_err)
    }

    /// Writes a batch and waits for it to be fsync'd (for rare writes: votes, snapshots).
    pub fn write_sync(&self, batch: WriteBatch) -> std::io::Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(io_err)
    }

    /// Whether writes must be refused for lack of disk space.
    pub fn is_disk_full(&self) -> bool {
        self.disk_full_injected.load(Ordering::Relaxed) || self.disk_low.load(Ordering::Relaxed)
    }

    /// Fault injection: behave as if the disk were full.
    pub fn inject_disk_full(&self, full: bool) {
        self.disk_full_injected.store(full, Ordering::Relaxed);
    }

    /// Records whether free space is below the floor; returns true when this changed.
    pub fn set_disk_low(&self, low: bool) -> bool {
        self.disk_low.swap(low, Ordering::Relaxed) != low
    }

    /// Bytes of live data in all column families (SST files plus memtables).
    pub fn size_bytes(&self) -> u64 {
        [CF_LOG, CF_META, CF_STATE]
            .iter()
            .filter_map(|name| self.db.cf_handle(name))
            .map(|cf| {
                let sst = self
                    .db
                    .property_int_value_cf(cf, "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten();
                let mem = self
                    .db
                    .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten();
                sst.unwrap_or(0) + mem.unwrap_or(0)
            })
            .sum()
    }

    /// Removes every key a group owns in every column family (the group left this node).
    pub fn delete_group(&self, group: GroupId) -> std::io::Result<()> {
        let mut batch = WriteBatch::default();
        let (start, end) = (super::group_prefix(group), super::group_end(group));
        for cf in [CF_LOG, CF_META, CF_STATE] {
            batch.delete_range_cf(self.cf_io(cf)?, start, end);
        }
        self.write_sync(batch)
    }

    /// Group ids that have anything in `raft_meta` (groups this node hosted before a restart).
    pub fn stored_groups(&self) -> std::io::Result<Vec<GroupId>> {
        let mut groups = Vec::new();
        let cf = self.cf_io(CF_META)?;
        let mut it = self.db.raw_iterator_cf(cf);
        it.seek_to_first();
        while let Some(key) = it.key() {
            let Some(prefix) = key.get(..8) else { break };
            let mut b = [0u8; 8];
            b.copy_from_slice(prefix);
            let g = u64::from_be_bytes(b);
            groups.push(g);
            match g.checked_add(1) {
                Some(next) => it.seek(next.to_be_bytes()),
                None => break,
            }
        }
        it.status().map_err(io_err)?;
        Ok(groups)
    }
}

/// Per column family tuning.
///
/// The state machine does a point lookup per append that usually misses (the idempotency
/// key of a new message), so it gets whole-key Bloom filters in the memtable and in table
/// files. Filter and index blocks stay with their open table files rather than in the
/// block cache: evicted from the cache, every miss would read a filter block back from
/// disk and verify its checksum. Its memtables are kept small (`STATE_WRITE_BUFFER`):
/// appends insert keys scattered over every conversation, and each skiplist insert
/// costs a cache miss per level, so a smaller memtable is cheaper per write than the extra
/// flushes it causes. The log is written once, read sequentially and deleted by range.
fn cf_options(name: &str, cache: &rocksdb::Cache) -> Options {
    let mut o = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_block_cache(cache);
    if name == CF_STATE {
        o.set_write_buffer_size(STATE_WRITE_BUFFER);
        // Level 1 as large as level 0 at its compaction trigger, so an L0 -> L1
        // compaction rewrites about as much as it brings in (appends scatter keys over
        // every conversation, so each one overlaps all of level 1); the upper levels,
        // rewritten most often, stay uncompressed, the lower ones use LZ4.
        o.set_level_zero_file_num_compaction_trigger(STATE_L0_TRIGGER);
        o.set_max_bytes_for_level_base((STATE_WRITE_BUFFER * STATE_L0_TRIGGER as usize) as u64);
        o.set_target_file_size_base(STATE_WRITE_BUFFER as u64);
        o.set_compression_per_level(&[
            rocksdb::DBCompressionType::None,
            rocksdb::DBCompressionType::None,
            rocksdb::DBCompressionType::Lz4,
            rocksdb::DBCompressionType::Lz4,
            rocksdb::DBCompressionType::Lz4,
            rocksdb::DBCompressionType::Lz4,
            rocksdb::DBCompressionType::Lz4,
        ]);
        table.set_bloom_filter(10.0, false);
        table.set_cache_index_and_filter_blocks(false);
        o.set_memtable_whole_key_filtering(true);
        o.set_memtable_prefix_bloom_ratio(0.1);
    } else {
        o.set_write_buffer_size(LOG_WRITE_BUFFER);
        if name == CF_LOG {
            // Log keys arrive in order per group and are read back from the log store's
            // in-memory tail, so an unsorted memtable (sorted once, at flush) saves the
            // skiplist insert of every entry; a read that reaches it sorts a copy.
            o.set_memtable_factory(rocksdb::MemtableFactory::Vector);
            // Entries live until the next snapshot lets the log be purged, and their
            // payloads are client ciphertext: compressing them is wasted work.
            o.set_compression_type(rocksdb::DBCompressionType::None);
        }
    }
    o.set_block_based_table_factory(&table);
    o
}

impl Drop for Engine {
    /// Stops the WAL-sync thread and waits for it, so the database is closed here and not
    /// by a detached thread racing process exit.
    fn drop(&mut self) {
        drop(self.sync_tx.take());
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
        // Writes made without a sync are only buffered (manual WAL flush): persist them.
        let _ = self.db.flush_wal(true);
    }
}

fn wal_sync_loop(db: Arc<DB>, rx: mpsc::Receiver<SyncCallback>, metrics: Arc<Metrics>) {
    let mut busy = false;
    while let Ok(first) = rx.recv() {
        if busy {
            // Appends are arriving faster than fsyncs complete: wait a moment so this
            // fsync covers more of them (an fsync costs far more than the wait).
            std::thread::sleep(SYNC_LINGER);
        }
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        busy = waiting.len() > 1;
        let started = Instant::now();
        let res = db.flush_wal(true);
        metrics
            .wal_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.wal_sync_batch.observe(waiting.len() as f64);
        for done in waiting {
            done(
                res.as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    }
}

pub fn io_err(e: rocksdb::Error) -> std::io::Error {
    let msg = e.to_string();
    if msg.contains("No space left") {
        std::io::Error::new(std::io::ErrorKind::StorageFull, msg)
    } else {
        std::io::Error::other(msg)
    }
}
