//! Real-cluster tier: against a live Kubernetes cluster (`KUBECONFIG` set), install the
//! chart, create a ParleyCluster, scale it, kill a pod, and wait for it to be Available
//! again. It needs `helm` on PATH and images the cluster can pull
//! (`PARLEY_OPERATOR_IMAGE`, `PARLEY_NODE_IMAGE`, `PARLEY_VERSION`).
//!
//! These tests are `#[ignore]`d: no API server runs on the machine CI uses, so this tier
//! does not run there. Run them with
//! `KUBECONFIG=... cargo test -p parley-operator --test real_cluster -- --ignored`.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use parley_operator::crd::ParleyCluster;

const NS: &str = "parley-e2e";

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn require_cluster() -> bool {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("real-cluster tier: KUBECONFIG is not set, nothing to test against");
        return false;
    }
    true
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    panic!("{what}: not within {limit:?}");
}

fn condition(pc: &ParleyCluster, type_: &str) -> Option<String> {
    pc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

async fn available_with(api: &Api<ParleyCluster>, nodes: i32) -> bool {
    let Ok(pc) = api.get("chat").await else {
        return false;
    };
    let st = pc.status.clone().unwrap_or_default();
    condition(&pc, "Available").as_deref() == Some("True")
        && condition(&pc, "Progressing").as_deref() == Some("False")
        && st.ready_nodes == nodes
        && st.groups.healthy == st.groups.total
        && st.observed_generation == pc.metadata.generation
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG), helm and pullable images"]
async fn chart_installs_and_the_operator_scales_and_heals_a_cluster() {
    if !require_cluster() {
        return;
    }
    let client = Client::try_default().await.expect("kube client");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))
                .expect("namespace"),
        )
        .await;
    // The run-time value follows this checkout even when the binary was built elsewhere.
    let root = std::env::var("CARGO_MANIFEST_DIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string())
        + "/..";
    run(Command::new("kubectl").args([
        "apply",
        "--server-side",
        "-f",
        &format!("{root}/charts/parley/crds/"),
    ]));
    run(Command::new("helm").args([
        "upgrade",
        "--install",
        "parley",
        &format!("{root}/charts/parley"),
        "--namespace",
        NS,
        "--set",
        &format!(
            "operator.image.repository={}",
            env("PARLEY_OPERATOR_IMAGE", "ghcr.io/parley/parley-operator")
        ),
        "--wait",
    ]));
    // The token signing key the nodes share.
    let key_dir = tempfile::tempdir().expect("temp dir");
    let key = key_dir.path().join("token.pem");
    run(Command::new(env("PARLEY_NODE_BIN", "parley-node"))
        .args(["gen-token-key", &key.display().to_string()]));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let pem = std::fs::read_to_string(&key).expect("key");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "chat-token-key"},
        "stringData": {"token.pem": pem}
    }))
    .expect("secret");
    let _ = secrets
        .patch(
            "chat-token-key",
            &PatchParams::apply("parley-e2e").force(),
            &Patch::Apply(&secret),
        )
        .await;
    let api: Api<ParleyCluster> = Api::namespaced(client.clone(), NS);
    let pc: ParleyCluster = serde_json::from_value(serde_json::json!({
        "apiVersion": "parley.io/v1alpha1", "kind": "ParleyCluster",
        "metadata": {"name": "chat"},
        "spec": {
            "nodes": 3,
            "image": env("PARLEY_NODE_IMAGE", "ghcr.io/parley/parley-node"),
            "version": env("PARLEY_VERSION", "0.1.0"),
            "shardGroups": 16,
            "storage": {"size": "1Gi"},
            "failover": {"timeoutSeconds": 60},
            "secrets": {"tokenSigningKey": {"name": "chat-token-key", "key": "token.pem"}}
        }
    }))
    .expect("cluster");
    api.patch(
        "chat",
        &PatchParams::apply("parley-e2e").force(),
        &Patch::Apply(&pc),
    )
    .await
    .expect("create ParleyCluster");
    wait_until("3 nodes Available", Duration::from_secs(600), async || {
        available_with(&api, 3).await
    })
    .await;

    // Scale out to 5.
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"nodes": 5}})),
    )
    .await
    .expect("scale");
    wait_until("5 nodes Available", Duration::from_secs(900), async || {
        available_with(&api, 5).await
    })
    .await;

    // Kill a pod: the StatefulSet recreates it and the cluster is whole again.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let victim = pods.get("chat-2").await.expect("pod chat-2");
    pods.delete(&victim.name_any(), &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    wait_until(
        "Available after a pod loss",
        Duration::from_secs(600),
        async || available_with(&api, 5).await,
    )
    .await;

    // Scale back in to 3 by draining.
    api.patch(
        "chat",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"nodes": 3}})),
    )
    .await
    .expect("scale in");
    wait_until(
        "3 nodes Available again",
        Duration::from_secs(900),
        async || available_with(&api, 3).await,
    )
    .await;
    let _ = api.delete("chat", &DeleteParams::default()).await;
}
