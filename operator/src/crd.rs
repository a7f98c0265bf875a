//! The `ParleyCluster` custom resource (group `parley.io`, version `v1alpha1`): the spec
//! people write, with the CEL rules the API server enforces, and the status the operator
//! keeps, including the ledger of the one operation in flight.
//!
//! The CRD YAML in `crds/` is generated from these types (`parley-operator crd`); a test
//! fails when the checked-in file differs.

// Repeated `type_ = ...` keys inside separate `printcolumn(...)` entries are distinct
// columns, not duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Parley resource.
pub const GROUP: &str = "parley.io";
/// The replication factor of every shard group; fixed, the spec may only restate it.
pub const REPLICATION_FACTOR: i32 = 3;

/// A Parley cluster: a StatefulSet of `parley-node` pods and the shard groups they host.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "parley.io",
    version = "v1alpha1",
    kind = "ParleyCluster",
    namespaced,
    shortname = "pc",
    status = "ParleyClusterStatus",
    derive = "PartialEq",
    cel,
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "nodes ready / nodes in the spec",
        json_path = ".status.nodesReady"
    ),
    printcolumn(
        name = "Groups",
        type_ = "string",
        description = "shard groups healthy / total",
        json_path = ".status.groupsHealthy"
    ),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(
        name = "Progressing",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Progressing\")].status"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].status"
    ),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ParleyClusterSpec {
    /// Number of nodes (pods). At least 3: every shard group has 3 voters on distinct nodes.
    #[x_kube(validation = Rule::new("self >= 3").message("a Parley cluster needs at least 3 nodes"))]
    #[x_kube(validation = Rule::new("self <= 256").message("at most 256 nodes per cluster"))]
    pub nodes: i32,
    /// Container image of `parley-node`, without the tag.
    #[x_kube(validation = Rule::new("self != ''").message("image must not be empty"))]
    pub image: String,
    /// Parley version: the image tag. Changing it starts a rolling upgrade.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$')").message("version must be a valid image tag"))]
    pub version: String,
    /// Shard groups created at bootstrap; fixed afterwards (slot ranges are assigned once).
    #[serde(default = "default_shard_groups")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 4096").message("shardGroups must be in 1..4096"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("shardGroups is immutable"))]
    pub shard_groups: i32,
    /// Replicas per shard group. Always 3.
    #[serde(default = "default_replication_factor")]
    #[x_kube(validation = Rule::new("self == 3").message("replicationFactor must be 3"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor is immutable"))]
    pub replication_factor: i32,
    /// The per-node volume.
    pub storage: StorageSpec,
    /// CPU and memory of each node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node label that names a zone; replicas and pods are spread over its values.
    #[serde(default = "default_zone_key")]
    pub zone_key: String,
    #[serde(default)]
    pub failover: FailoverSpec,
    #[serde(default)]
    pub rebalancing: RebalancingSpec,
    #[serde(default)]
    pub upgrade: UpgradeSpec,
    pub secrets: SecretRefs,
    #[serde(default)]
    pub client_service: ClientServiceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverrides>,
    /// What happens to node volumes when the ParleyCluster is deleted.
    #[serde(default)]
    pub volume_reclaim_policy: VolumeReclaimPolicy,
    /// Stop every action; status is still kept current.
    #[serde(default)]
    pub paused: bool,
}

fn default_shard_groups() -> i32 {
    64
}
fn default_replication_factor() -> i32 {
    REPLICATION_FACTOR
}
fn default_zone_key() -> String {
    "topology.kubernetes.io/zone".into()
}

/// The persistent volume of each node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)").message("storageClassName is immutable"))]
pub struct StorageSpec {
    /// Volume size, a Kubernetes quantity (e.g. `100Gi`). May grow, never shrink.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("size must be a positive quantity such as 100Gi"))]
    #[x_kube(validation = Rule::new("!quantity(self).isLessThan(quantity(oldSelf))").message("storage size may grow but never shrink"))]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// When and how much the operator re-replicates the data of a node that is down.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// A node unreachable and not Ready this long has its replicas re-created elsewhere.
    #[serde(default = "default_failover_timeout")]
    #[x_kube(validation = Rule::new("self >= 30").message("failover timeout must be at least 30 seconds"))]
    pub timeout_seconds: i64,
    /// At most this many nodes failed over in any 24 hours; then a human decides.
    #[serde(default = "default_failovers_per_day")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 10").message("maxPerDay must be in 0..10"))]
    pub max_per_day: i32,
    /// Replace a failed node's pod and volume (under a new node id) once the Kubernetes
    /// node or the volume is positively gone.
    #[serde(default = "default_true")]
    pub replace_pods: bool,
}

fn default_failover_timeout() -> i64 {
    300
}
fn default_failovers_per_day() -> i32 {
    3
}
fn default_true() -> bool {
    true
}

impl Default for FailoverSpec {
    fn default() -> Self {
        FailoverSpec {
            timeout_seconds: default_failover_timeout(),
            max_per_day: default_failovers_per_day(),
            replace_pods: true,
        }
    }
}

/// Moving replicas and leaderships so every node carries an even share.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RebalancingSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Replica moves in flight at once (each moves one replica of one group).
    #[serde(default = "default_concurrent_moves")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 8").message("concurrentMoves must be in 1..8"))]
    pub concurrent_moves: i32,
}

fn default_concurrent_moves() -> i32 {
    1
}

impl Default for RebalancingSpec {
    fn default() -> Self {
        RebalancingSpec {
            enabled: true,
            concurrent_moves: default_concurrent_moves(),
        }
    }
}

/// Rolling upgrades.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    /// Restart pods even when the health gate says no (a group under-replicated or a node
    /// down). Use only when the rollout itself is the fix.
    #[serde(default)]
    pub force: bool,
}

/// Secrets the nodes need, by reference.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRefs {
    /// Ed25519 private key (PKCS#8 PEM) that signs client tokens; the same on every node.
    pub token_signing_key: SecretKeyRef,
}

/// One key of a Secret in the cluster's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[x_kube(validation = Rule::new("self != ''").message("secret name must not be empty"))]
    pub name: String,
    #[x_kube(validation = Rule::new("self != ''").message("secret key must not be empty"))]
    pub key: String,
}

/// The Service clients connect to (WebSocket).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientServiceSpec {
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service types the client Service may take.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Additions to the node pod template.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverrides {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// Whether deleting the ParleyCluster deletes the node volumes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VolumeReclaimPolicy {
    /// Keep every volume (the default: data outlives the resource).
    #[default]
    Retain,
    Delete,
}

/// What the operator observed and what it is doing.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ParleyClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// "ready/desired", for `kubectl get`.
    #[serde(default)]
    pub nodes_ready: String,
    #[serde(default)]
    pub ready_nodes: i32,
    #[serde(default)]
    pub total_nodes: i32,
    /// Per ordinal: which cluster node id the pod runs as, and what it holds.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Node ids are never reused: the next one handed out.
    #[serde(default)]
    pub next_node_id: u64,
    /// Whether the initial three nodes have been bootstrapped into a cluster.
    #[serde(default)]
    pub bootstrapped: bool,
    #[serde(default)]
    pub groups: GroupCounts,
    /// "healthy/total", for `kubectl get`.
    #[serde(default)]
    pub groups_healthy: String,
    /// The single topology operation in flight, recorded before each of its side effects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// Version every pod runs once the last rollout finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// StatefulSet partition during a rollout; unset, it holds at the pod count so the
    /// StatefulSet controller replaces no pod on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    /// Unix times (seconds) of failovers in the last 24 hours, for the daily cap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failovers: Vec<i64>,
}

/// A status condition (the Kubernetes convention: Available, Progressing, Degraded).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One StatefulSet ordinal and the cluster node behind it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub ordinal: i32,
    pub node_id: u64,
    pub state: MemberState,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub replicas: u32,
    #[serde(default)]
    pub leaders: u32,
    /// Unix seconds since when the node has been unreachable and not Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down_since: Option<i64>,
}

/// Where a member is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Assigned an id; its pod has not registered with the cluster yet.
    Pending,
    /// Registered and taking replicas.
    Active,
    /// Replicas being moved off (scale-in); reversible.
    Draining,
    /// Its replicas were re-created elsewhere after it failed.
    FailedOver,
    /// Its pod and volume are being replaced; the new node id is reserved, and its
    /// configuration is withheld until the old volume is gone, so the new id never
    /// starts on the old node's data.
    Replacing,
    /// Removed from cluster membership; the pod and volume go next.
    Removed,
}

/// Counts of shard groups by health.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupCounts {
    pub total: u32,
    pub healthy: u32,
    pub under_replicated: u32,
    pub leaderless: u32,
}

/// The kinds of topology operation; one runs at a time.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationType {
    Bootstrap,
    ScaleOut,
    ScaleIn,
    Failover,
    Rebalance,
    RollingUpgrade,
}

/// The operation in flight and how far it got.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    #[serde(rename = "type")]
    pub type_: OperationType,
    /// Where in its sequence the operation is (e.g. "Draining", "Removing").
    pub phase: String,
    /// Ordinals the operation acts on.
    pub targets: Vec<i32>,
    pub done: u32,
    pub total: u32,
    /// Past this the operation can no longer be cancelled by changing the spec.
    #[serde(default)]
    pub point_of_no_return: bool,
    /// Unix seconds.
    pub started_at: i64,
    #[serde(default)]
    pub message: String,
    /// Replacement only: the uids of the failed node's pod and volume, so the deletes can
    /// never hit their successors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_volume_uid: Option<String>,
    /// Failover only: the failed node's id, when its pod was replaced before its
    /// replicas could move (no other node could take them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_node: Option<u64>,
    /// A rolling upgrade: the StatefulSet revision it rolls out. A newer revision
    /// mid-rollout starts it over from the highest ordinal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}
