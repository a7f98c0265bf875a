//! openraft's own storage test suite against Parley's RocksDB log store and state machine.

use std::sync::Arc;

use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::StorageError;
use parley_node::metrics::Metrics;
use parley_node::state_machine::GroupStateMachine;
use parley_node::storage::{Engine, LogStore};
use parley_node::types::TypeConfig;
use tempfile::TempDir;

/// Builds a fresh engine in a temp dir and opens group 7's log and state machine on it.
struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, GroupStateMachine, TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, GroupStateMachine), StorageError<TypeConfig>> {
        let dir = TempDir::new().map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let engine = Engine::open(dir.path(), Arc::new(Metrics::new()))
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        let log = LogStore::new(engine.clone(), 7);
        let sm = GroupStateMachine::open(engine, 7, None)
            .map_err(|e| StorageError::read(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes_on_rocksdb() {
    Suite::test_all(RocksBuilder)
        .await
        .expect("openraft storage suite");
}
