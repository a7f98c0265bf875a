//! The replicas this node hosts: one openraft instance per group, all sharing the
//! node's RocksDB engine and peer channels.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::placement::{GroupId, NodeId, PlacementMap};
use crate::state_machine::GroupStateMachine;
use crate::storage::{Engine, LogStore};
use crate::transport::{NetworkFactory, PeerPool};
use crate::types::{GroupRaft, METADATA_GROUP};

/// Every group replica on this node, and the newest placement map it has seen.
pub struct Replicas {
    node_id: NodeId,
    engine: Arc<Engine>,
    pool: Arc<PeerPool>,
    raft_config: Arc<openraft::Config>,
    groups: RwLock<HashMap<GroupId, GroupRaft>>,
    placement_tx: watch::Sender<Arc<PlacementMap>>,
    create: tokio::sync::Mutex<()>,
    /// Whether storage held Raft state when the node started: it was part of a cluster
    /// before, so an empty placement map means "not loaded yet", not "never bootstrapped".
    restarted: bool,
}

impl Replicas {
    /// Opens the metadata replica and every group found on disk.
    pub async fn open(
        node_id: NodeId,
        engine: Arc<Engine>,
        pool: Arc<PeerPool>,
        raft_config: Arc<openraft::Config>,
    ) -> std::io::Result<Arc<Replicas>> {
        let (placement_tx, _) = watch::channel(Arc::new(PlacementMap::default()));
        let stored = engine.stored_groups()?;
        let replicas = Arc::new(Replicas {
            node_id,
            engine: engine.clone(),
            pool,
            raft_config,
            groups: RwLock::new(HashMap::new()),
            placement_tx,
            create: tokio::sync::Mutex::new(()),
            restarted: !stored.is_empty(),
        });
        replicas.ensure(METADATA_GROUP).await?;
        for g in stored {
            replicas.ensure(g).await?;
        }
        Ok(replicas)
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Whether this node held Raft state when it started (see the field).
    pub fn restarted(&self) -> bool {
        self.restarted
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn pool(&self) -> &Arc<PeerPool> {
        &self.pool
    }

    pub fn get(&self, group: GroupId) -> Option<GroupRaft> {
        self.groups.read().ok().and_then(|g| g.get(&group).cloned())
    }

    /// Every hosted group, sorted by id.
    pub fn hosted(&self) -> Vec<(GroupId, GroupRaft)> {
        let mut v: Vec<_> = self
            .groups
            .read()
            .map(|g| g.iter().map(|(id, r)| (*id, r.clone())).collect())
            .unwrap_or_default();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    /// The replica of `group`, created (empty, uninitialized) if this node has none yet.
    pub async fn ensure(&self, group: GroupId) -> std::io::Result<GroupRaft> {
        if let Some(r) = self.get(group) {
            return Ok(r);
        }
        let _guard = self.create.lock().await;
        if let Some(r) = self.get(group) {
            return Ok(r);
        }
        let tx = (group == METADATA_GROUP).then(|| self.placement_tx.clone());
        let sm = GroupStateMachine::open(self.engine.clone(), group, tx)?;
        let log = LogStore::new(self.engine.clone(), group);
        let network = NetworkFactory {
            group,
            pool: self.pool.clone(),
        };
        let raft = openraft::Raft::new(self.node_id, self.raft_config.clone(), network, log, sm)
            .await
            .map_err(std::io::Error::other)?;
        if let Ok(mut groups) = self.groups.write() {
            groups.insert(group, raft.clone());
        }
        tracing::info!(group, "replica opened");
        Ok(raft)
    }

    /// Stops this node's replica of `group` and deletes its data (the group moved away).
    pub async fn remove(&self, group: GroupId) -> std::io::Result<()> {
        let raft = self.groups.write().ok().and_then(|mut g| g.remove(&group));
        if let Some(raft) = raft {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, error = %e, "replica shutdown failed");
            }
        }
        self.engine.delete_group(group)?;
        tracing::info!(group, "replica removed and its data deleted");
        Ok(())
    }

    /// Stops every replica (node shutdown); data stays.
    pub async fn shutdown(&self) {
        for (group, raft) in self.hosted() {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, error = %e, "replica shutdown failed");
            }
        }
    }

    /// The newest placement map this node knows.
    pub fn placement(&self) -> Arc<PlacementMap> {
        self.placement_tx.borrow().clone()
    }

    pub fn watch_placement(&self) -> watch::Receiver<Arc<PlacementMap>> {
        self.placement_tx.subscribe()
    }

    /// Adopts `map` if it is newer than the one held.
    pub fn offer_placement(&self, map: Arc<PlacementMap>) -> bool {
        self.placement_tx.send_if_modified(|cur| {
            if map.epoch > cur.epoch {
                *cur = map;
                true
            } else {
                false
            }
        })
    }
}
