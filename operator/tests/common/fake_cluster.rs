//! The cluster half for tests that cannot run nodes: the controller's `ClusterApi` over
//! the in-memory [`ClusterModel`], with the pods that "answer" at each address.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use parley_operator::model::{ClusterView, NodeId};
use parley_operator::node_admin::{AdminError, ClusterApi};
use parley_operator::planner::Step;
use parley_proto::node::v1::NodeAddress;

use super::cluster_model::ClusterModel;

#[derive(Clone, Default)]
pub struct FakeCluster {
    /// `None` until bootstrapped.
    pub model: Arc<Mutex<Option<ClusterModel>>>,
    /// Pod address -> the node id answering there.
    pub answering: Arc<Mutex<BTreeMap<String, NodeId>>>,
    pub executed: Arc<Mutex<Vec<Step>>>,
    pub shard_groups: u32,
    /// Fail the n-th cluster step from now, before it takes effect (a node answering
    /// `unavailable`, or the operator dying mid-call).
    pub fail_step_in: Arc<Mutex<Option<usize>>>,
}

impl FakeCluster {
    pub fn with_model(model: ClusterModel) -> FakeCluster {
        FakeCluster {
            model: Arc::new(Mutex::new(Some(model))),
            ..Default::default()
        }
    }

    pub fn executed(&self) -> Vec<Step> {
        self.executed.lock().expect("lock").clone()
    }
}

impl ClusterApi for FakeCluster {
    fn probe<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Option<NodeId>> {
        let id = self.answering.lock().expect("lock").get(addr).copied();
        Box::pin(async move { id })
    }

    fn cluster_view<'a>(
        &'a self,
        _addrs: &'a [String],
    ) -> BoxFuture<'a, Result<Option<ClusterView>, AdminError>> {
        let model = self.model.lock().expect("lock").clone();
        let answering = !self.answering.lock().expect("lock").is_empty();
        Box::pin(async move {
            match model {
                None if answering => Ok(None),
                None => Err(AdminError::NoNodeAnswered {
                    tried: 0,
                    last: "no pod answers".into(),
                }),
                Some(m) if m.nodes.values().all(|n| !n.up) => Err(AdminError::NoNodeAnswered {
                    tried: m.nodes.len(),
                    last: "every node is down".into(),
                }),
                Some(m) => Ok(Some(m.view())),
            }
        })
    }

    fn execute<'a>(
        &'a self,
        _addrs: &'a [String],
        step: &'a Step,
        _peers: &'a BTreeMap<NodeId, NodeAddress>,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        self.executed.lock().expect("lock").push(step.clone());
        {
            let mut fail = self.fail_step_in.lock().expect("lock");
            match fail.as_mut() {
                Some(0) => {
                    *fail = None;
                    return Box::pin(async {
                        Err(AdminError::Simulated("injected: node unavailable".into()))
                    });
                }
                Some(n) => *n -= 1,
                None => {}
            }
        }
        let mut model = self.model.lock().expect("lock");
        let res = match (step, model.as_mut()) {
            (
                Step::Bootstrap {
                    nodes,
                    shard_groups,
                },
                None,
            ) if nodes.len() == 3 => {
                *model = Some(ClusterModel::bootstrap(
                    [nodes[0], nodes[1], nodes[2]],
                    *shard_groups,
                    &[],
                ));
                Ok(())
            }
            (_, Some(m)) => m.apply(step).map_err(AdminError::Simulated),
            (_, None) => Err(AdminError::Simulated("not bootstrapped".into())),
        };
        Box::pin(async move { res })
    }
}
