//! The controller: watches ParleyClusters (and the objects they own), and for each runs
//! one reconcile pass: observe Kubernetes and the cluster, plan, record the plan's status
//! (the intent) first, apply the owned objects by server-side apply, then carry out the
//! planned steps and publish an Event for each.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::watcher;
use kube::runtime::Controller;
use kube::{Client, Resource, ResourceExt};
use parley_proto::node::v1::NodeAddress;
use serde::Serialize;
use serde_json::json;

use crate::crd::{ParleyCluster, ParleyClusterStatus, VolumeReclaimPolicy};
use crate::metrics::Metrics;
use crate::model::{ClusterView, KubeView, Observed, PodView, StatefulSetView, VolumeView};
use crate::node_admin::{ClusterApi, NodeAdmin};
use crate::planner::{self, Plan, Step};
use crate::resources::{self, names, ordinal_of, selector_labels};

/// Field manager of every apply, and the finalizer's name.
pub const MANAGER: &str = "parley-operator";
pub const FINALIZER: &str = "parley.io/cleanup";
/// Requeue while an operation runs, and when idle.
const BUSY_REQUEUE: Duration = Duration::from_secs(3);
const IDLE_REQUEUE: Duration = Duration::from_secs(120);

/// Why a reconcile pass failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// Unix seconds; injected so the simulation controls time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub admin: Arc<dyn ClusterApi>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Set while this replica holds the leader lease.
    pub leader: Arc<AtomicBool>,
    pub clock: Clock,
}

impl Context {
    pub fn new(client: Client, metrics: Metrics, identity: &str, leader: Arc<AtomicBool>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.into()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            admin: Arc::new(NodeAdmin::default()),
            metrics,
            leader,
            clock: Arc::new(|| jiff::Timestamp::now().as_second()),
        }
    }

    /// A context over another cluster API and clock (tests, simulation).
    pub fn with_parts(
        client: Client,
        admin: Arc<dyn ClusterApi>,
        clock: Clock,
        leader: bool,
    ) -> Self {
        let mut ctx = Context::new(
            client,
            Metrics::new(),
            "test",
            Arc::new(AtomicBool::new(leader)),
        );
        ctx.admin = admin;
        ctx.clock = clock;
        ctx
    }
}

/// One pass for one ParleyCluster.
pub async fn reconcile(pc: Arc<ParleyCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leader.load(Ordering::Relaxed) {
        // A standby replica watches but never acts.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let started = Instant::now();
    ctx.metrics.reconciliations.inc();
    let ns = pc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pc.name_any()))?;
    let api: Api<ParleyCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let res = finalizer(&api, FINALIZER, pc, |event| async {
        match event {
            FinalizerEvent::Apply(pc) => apply(pc, ctx.clone()).await,
            FinalizerEvent::Cleanup(pc) => cleanup(pc, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    res
}

/// Failed passes are retried after a short wait.
pub fn error_policy(_pc: Arc<ParleyCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    ctx.metrics.reconcile_errors.inc();
    Action::requeue(Duration::from_secs(10))
}

async fn apply(pc: Arc<ParleyCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pc.name_any()))?;
    let obs = observe(&pc, &ctx, &ns).await?;
    let plan = planner::plan(&obs);
    // The intent goes into status before any side effect.
    patch_status(&ctx, &pc, &ns, &plan.status).await?;
    let mut planned = (*pc).clone();
    planned.status = Some(plan.status.clone());
    if !pc.spec.paused {
        let live_hash = obs
            .kube
            .statefulset
            .as_ref()
            .map(|s| s.template_hash.as_deref());
        apply_owned(&ctx, &planned, &ns, live_hash).await?;
    }
    run_steps(&ctx, &planned, &ns, &plan).await;
    for n in &plan.notices {
        publish(
            &ctx,
            &pc,
            n.reason.clone(),
            n.note.clone(),
            n.warning,
            "Reconcile",
        )
        .await;
    }
    record_gauges(&ctx, &obs, &plan);
    Ok(
        if plan.status.operation.is_some() || !plan.steps.is_empty() {
            Action::requeue(BUSY_REQUEUE)
        } else {
            Action::requeue(IDLE_REQUEUE)
        },
    )
}

fn record_gauges(ctx: &Context, obs: &Observed, plan: &Plan) {
    let st = &plan.status;
    let m = &ctx.metrics;
    m.operation_in_progress
        .set(i64::from(st.operation.is_some()));
    m.nodes_ready.set(i64::from(st.ready_nodes));
    m.groups_under_replicated
        .set(i64::from(st.groups.under_replicated));
    m.groups_leaderless.set(i64::from(st.groups.leaderless));
    m.failovers_remaining.set(
        i64::from(obs.spec.failover.max_per_day)
            .saturating_sub(st.failovers.len() as i64)
            .max(0),
    );
}

async fn patch_status(
    ctx: &Context,
    pc: &ParleyCluster,
    ns: &str,
    status: &ParleyClusterStatus,
) -> Result<(), Error> {
    let api: Api<ParleyCluster> = Api::namespaced(ctx.client.clone(), ns);
    let body = json!({
        "apiVersion": "parley.io/v1alpha1",
        "kind": "ParleyCluster",
        "status": status,
    });
    api.patch_status(
        &pc.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn ssa<K>(ctx: &Context, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

/// The ConfigMap first (a new pod must find its node id), then Services, the PDB and
/// the StatefulSet, whose size and partition follow the status just recorded.
///
/// `live_hash` is the live StatefulSet's template digest (`None` when there is no
/// StatefulSet yet): a changed template goes in with the partition closed.
pub async fn apply_owned(
    ctx: &Context,
    pc: &ParleyCluster,
    ns: &str,
    live_hash: Option<Option<&str>>,
) -> Result<(), Error> {
    ssa(ctx, ns, &resources::config_map(pc)).await?;
    ssa(ctx, ns, &resources::peer_service(pc)).await?;
    ssa(ctx, ns, &resources::client_service(pc)).await?;
    ssa(ctx, ns, &resources::pdb(pc)).await?;
    let mut sts = resources::statefulset(pc);
    if let Some(live) = live_hash {
        resources::hold_partition_on_template_change(&mut sts, live);
    }
    ssa(ctx, ns, &sts).await?;
    Ok(())
}

async fn run_steps(ctx: &Context, pc: &ParleyCluster, ns: &str, plan: &Plan) {
    let addrs = member_addresses(pc);
    let peers: BTreeMap<u64, NodeAddress> = plan
        .status
        .members
        .iter()
        .map(|m| {
            (
                m.node_id,
                NodeAddress {
                    node_id: m.node_id,
                    addr: resources::pod_address(pc, m.ordinal),
                    http_addr: String::new(),
                    zone: String::new(),
                    client_addr: String::new(),
                },
            )
        })
        .collect();
    for step in &plan.steps {
        ctx.metrics
            .actions
            .with_label_values(&[step.action()])
            .inc();
        let result = match step {
            Step::DeletePod { ordinal, uid } => {
                let name = format!("{}-{ordinal}", names(pc).statefulset);
                delete_with_uid::<Pod>(ctx, ns, &name, uid).await
            }
            Step::DeleteVolume { ordinal, uid } => {
                let name = format!("data-{}-{ordinal}", names(pc).statefulset);
                delete_with_uid::<PersistentVolumeClaim>(ctx, ns, &name, uid).await
            }
            _ => ctx
                .admin
                .execute(&addrs, step, &peers)
                .await
                .map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => {
                publish(
                    ctx,
                    pc,
                    "Step".into(),
                    step.describe(),
                    false,
                    step.action(),
                )
                .await;
            }
            Err(e) => {
                publish(
                    ctx,
                    pc,
                    "StepFailed".into(),
                    format!("{}: {e} (retried next pass)", step.describe()),
                    true,
                    step.action(),
                )
                .await;
                // Later steps of the same plan may depend on this one.
                break;
            }
        }
    }
}

/// Deletes `name` only if it still has `uid`; gone or replaced counts as done.
async fn delete_with_uid<K>(ctx: &Context, ns: &str, name: &str, uid: &str) -> Result<(), String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

async fn publish(
    ctx: &Context,
    pc: &ParleyCluster,
    reason: String,
    note: String,
    warning: bool,
    action: &str,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason,
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &pc.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

/// gRPC addresses of the members' pods (any of them answers admin calls).
fn member_addresses(pc: &ParleyCluster) -> Vec<String> {
    let status = pc.status.clone().unwrap_or_default();
    let mut addrs: Vec<String> = status
        .members
        .iter()
        .map(|m| resources::pod_address(pc, m.ordinal))
        .collect();
    if addrs.is_empty() {
        addrs = (0..3).map(|o| resources::pod_address(pc, o)).collect();
    }
    addrs
}

/// Reads what the plan needs: the StatefulSet, pods, volume claims (with evidence that a
/// pod's Kubernetes node or a volume is gone) and the cluster's own view.
pub async fn observe(pc: &ParleyCluster, ctx: &Context, ns: &str) -> Result<Observed, Error> {
    let n = names(pc);
    let selector = selector_labels(pc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let lp = ListParams::default().labels(&selector);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let statefulset = sts_api.get_opt(&n.statefulset).await?.map(|s| {
        let spec = s.spec.unwrap_or_default();
        StatefulSetView {
            replicas: spec.replicas.unwrap_or(0),
            partition: spec
                .update_strategy
                .and_then(|u| u.rolling_update)
                .and_then(|r| r.partition)
                .unwrap_or(0),
            update_revision: s
                .status
                .and_then(|st| st.update_revision)
                .unwrap_or_default(),
            template_hash: s
                .metadata
                .annotations
                .and_then(|a| a.get(resources::TEMPLATE_HASH).cloned()),
        }
    });
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut pods = BTreeMap::new();
    for pod in pods_api.list(&lp).await? {
        let Some(ordinal) = ordinal_of(&pod.name_any(), &n.statefulset) else {
            continue;
        };
        let host = match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            Some(name) => Some(nodes_api.get_opt(&name).await?),
            None => None,
        };
        let host_gone = matches!(host, Some(None));
        let zone = host
            .flatten()
            .and_then(|n| n.labels().get(&pc.spec.zone_key).cloned())
            .unwrap_or_default();
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let answering_as = ctx.admin.probe(&resources::pod_address(pc, ordinal)).await;
        pods.insert(
            ordinal,
            PodView {
                uid: pod.uid().unwrap_or_default(),
                ready,
                revision: pod
                    .labels()
                    .get("controller-revision-hash")
                    .cloned()
                    .unwrap_or_default(),
                answering_as,
                host_gone,
                zone,
                terminating: pod.metadata.deletion_timestamp.is_some(),
            },
        );
    }
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let pv_api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut volumes = BTreeMap::new();
    for pvc in pvc_api.list(&lp).await? {
        let Some(ordinal) = ordinal_of(&pvc.name_any(), &n.statefulset) else {
            continue;
        };
        let volume_gone = match pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) {
            Some(pv) => pv_api.get_opt(&pv).await?.is_none(),
            None => false,
        };
        volumes.insert(
            ordinal,
            VolumeView {
                uid: pvc.uid().unwrap_or_default(),
                volume_gone,
            },
        );
    }
    let cluster = match ctx.admin.cluster_view(&member_addresses(pc)).await {
        Ok(Some(view)) => Some(view),
        Ok(None) => Some(ClusterView::default()).filter(|c| !c.nodes.is_empty()),
        Err(e) => {
            tracing::debug!(error = %e, "no node answered");
            None
        }
    };
    Ok(Observed {
        now: (ctx.clock)(),
        generation: pc.metadata.generation.unwrap_or(0),
        spec: pc.spec.clone(),
        status: pc.status.clone().unwrap_or_default(),
        kube: KubeView {
            statefulset,
            pods,
            volumes,
        },
        cluster,
    })
}

/// The resource is being deleted: owned objects go by garbage collection (owner
/// references); volumes stay unless the spec asks to delete them.
async fn cleanup(pc: Arc<ParleyCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = pc
        .namespace()
        .ok_or_else(|| Error::NoNamespace(pc.name_any()))?;
    if pc.spec.volume_reclaim_policy == VolumeReclaimPolicy::Delete {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let selector = selector_labels(&pc)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        for pvc in api.list(&ListParams::default().labels(&selector)).await? {
            let uid = pvc.uid().unwrap_or_default();
            if let Err(e) =
                delete_with_uid::<PersistentVolumeClaim>(&ctx, &ns, &pvc.name_any(), &uid).await
            {
                tracing::warn!(error = %e, "deleting a volume claim failed");
            }
        }
        publish(
            &ctx,
            &pc,
            "VolumesDeleted".into(),
            "node volumes deleted (volumeReclaimPolicy: Delete)".into(),
            false,
            "Cleanup",
        )
        .await;
    } else {
        publish(
            &ctx,
            &pc,
            "VolumesRetained".into(),
            "node volumes kept (volumeReclaimPolicy: Retain)".into(),
            false,
            "Cleanup",
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Runs the controller until the process stops. `namespace` `None` watches all.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    let (clusters, stss, svcs, cms) = match &namespace {
        Some(ns) => (
            Api::<ParleyCluster>::namespaced(client.clone(), ns),
            Api::<StatefulSet>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<ParleyCluster>::all(client.clone()),
            Api::<StatefulSet>::all(client.clone()),
            Api::<Service>::all(client.clone()),
            Api::<ConfigMap>::all(client.clone()),
        ),
    };
    let pdbs = match &namespace {
        Some(ns) => Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        None => Api::<PodDisruptionBudget>::all(client.clone()),
    };
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=parley-operator");
    Controller::new(clusters, watcher::Config::default())
        .owns(stss, managed.clone())
        .owns(svcs, managed.clone())
        .owns(cms, managed.clone())
        .owns(pdbs, managed)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile loop");
            }
        })
        .await;
}
