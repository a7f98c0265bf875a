//! Every metric the Helm chart's alerts (`charts/parley/files/alerts.yaml`) and Grafana
//! dashboard (`charts/parley/files/dashboards/parley.json`) query is really exported:
//! node metrics by a real 3-node cluster after a little traffic (labelled metrics appear
//! only once observed), operator metrics by a `parley-operator` process whose Kubernetes
//! API server is unreachable (it registers them all at start).
//!
//! A renamed metric otherwise leaves an alert that never fires and an empty panel.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use parley_client::proto::{client_frame::Body, Send};
use parley_client::{Client, ClientConfig, ClientEvent};
use parley_testkit::process::{free_loopback_ports, log_tail, spawn_tied};
use parley_testkit::{ClusterOptions, LocalCluster, RawConnection};
use tokio::time::{sleep, timeout, Instant};

/// Longest wait for any single outcome.
const T: Duration = Duration::from_secs(30);
/// Environment variable naming the `parley-operator` binary to run.
const OPERATOR_BIN_ENV: &str = "PARLEY_OPERATOR_BIN";
/// Prefix of the operator's metrics; every other `parley_` metric is a node's.
const OPERATOR_PREFIX: &str = "parley_operator_";

fn repo_root() -> PathBuf {
    // tests/ is one level below the repository root. The value cargo and nextest set when
    // running the test follows this checkout even when the binary was built from another
    // one sharing the target directory.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// `parley_*` metric names in a PromQL expression, histogram series suffixes
/// (`_bucket`, `_sum`, `_count`) removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let is_name_char = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(offset) = expr[i..].find("parley_") {
        let start = i + offset;
        let end = start
            + expr[start..]
                .bytes()
                .take_while(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                .count();
        // Only a whole identifier: `xparley_a` is not a Parley metric.
        if start == 0 || !is_name_char(bytes[start - 1]) {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end.max(start + 1);
    }
    names
}

/// The `expr` of every rule of a Prometheus rules file: inline, quoted or a block
/// scalar (`expr: |`). Read without a YAML parser, so it insists on finding one
/// `expr` per rule.
fn rule_expressions(yaml: &str) -> anyhow::Result<Vec<String>> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let mut body = String::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > indent(line))
            {
                body.push_str(lines[i]);
                body.push('\n');
                i += 1;
            }
            exprs.push(body);
        } else {
            exprs.push(rest.trim_matches(|c| c == '"' || c == '\'').to_string());
        }
    }
    let rules = lines
        .iter()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    ensure!(
        rules > 0 && exprs.len() == rules,
        "found {} expr fields for {rules} rules: the rules file has a form this reader does not know",
        exprs.len()
    );
    Ok(exprs)
}

/// Every query string of a Grafana dashboard: panel targets' `expr` (rows' nested
/// panels included) and template variables' queries.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The `parley_` metric names the alerts and the dashboard use: (node, operator).
fn referenced_metrics() -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>)> {
    let chart = repo_root().join("charts/parley/files");
    let alerts_path = chart.join("alerts.yaml");
    let alerts = fs::read_to_string(&alerts_path)
        .with_context(|| format!("reading {}", alerts_path.display()))?;
    let dashboard_path = chart.join("dashboards/parley.json");
    let dashboard: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&dashboard_path)
            .with_context(|| format!("reading {}", dashboard_path.display()))?,
    )
    .with_context(|| format!("parsing {}", dashboard_path.display()))?;
    let mut queries = rule_expressions(&alerts)?;
    let alert_queries = queries.len();
    dashboard_queries(&dashboard, &mut queries);
    ensure!(
        queries.len() > alert_queries,
        "no queries found in {}",
        dashboard_path.display()
    );
    let names: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let (operator, node): (BTreeSet<String>, BTreeSet<String>) = names
        .into_iter()
        .partition(|n| n.starts_with(OPERATOR_PREFIX));
    ensure!(
        !node.is_empty() && !operator.is_empty(),
        "expected both node and operator metrics in the alerts and dashboard, found node {node:?}, operator {operator:?}"
    );
    Ok((node, operator))
}

/// Names of the samples in a Prometheus text exposition.
fn exported_samples(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// The referenced names nothing exports (a histogram is exported as `<name>_bucket`).
fn missing<'a>(wanted: &'a BTreeSet<String>, exported: &BTreeSet<String>) -> Vec<&'a str> {
    wanted
        .iter()
        .filter(|n| !exported.contains(*n) && !exported.contains(&format!("{n}_bucket")))
        .map(String::as_str)
        .collect()
}

async fn scrape(addr: impl std::fmt::Display) -> anyhow::Result<String> {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .with_context(|| format!("GET http://{addr}/metrics"))?;
    ensure!(
        response.status() == reqwest::StatusCode::OK,
        "GET http://{addr}/metrics: {}",
        response.status()
    );
    Ok(response.text().await?)
}

/// A little of every kind of traffic whose metrics carry labels: a conversation-log
/// append (`parley_appends_total{result}`), a message sent, delivered and read between
/// two connected users (`parley_messages_total{stage}`, `parley_connections{kind}`), and
/// a request refused (`parley_client_errors_total{code}`).
async fn traffic(cluster: &LocalCluster) -> anyhow::Result<()> {
    cluster
        .log_client()
        .append("dashboard-metrics", "probe", "probe-1", b"x")
        .await
        .context("append")?;

    let endpoints = cluster.client_endpoints();
    let alice = parley_client::register(&endpoints[0], "alice", "phone").await?;
    let bob = parley_client::register(&endpoints[0], "bob", "phone").await?;
    let (alice, _alice_events) =
        Client::connect(ClientConfig::new(endpoints.clone()), alice).await?;
    let (bob, mut bob_events) = Client::connect(ClientConfig::new(endpoints.clone()), bob).await?;
    let sent = alice.send_text("bob", "hello").await?;
    timeout(T, async {
        while let Some(event) = bob_events.recv().await {
            if let ClientEvent::Message(m) = event {
                if m.conversation_id == sent.conversation_id && m.seq == sent.seq {
                    return Ok(());
                }
            }
        }
        bail!("bob's event stream ended before the message came")
    })
    .await
    .map_err(|_| anyhow!("bob did not receive the message within {T:?}"))??;
    bob.mark_read(&sent.conversation_id, sent.seq).await?;

    // A send before authenticating is refused with an error frame.
    let mut raw = RawConnection::connect(&endpoints[1]).await?;
    let (answer, _) = raw
        .call(Body::Send(Send {
            client_msg_id: "unauthenticated-1".into(),
            recipient: "bob".into(),
            body: b"x".to_vec(),
        }))
        .await?;
    ensure!(
        answer.is_err(),
        "a send before authentication was accepted: {answer:?}"
    );
    alice.close().await;
    bob.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_used_by_alerts_and_dashboard_are_exported() -> anyhow::Result<()> {
    let (wanted, _) = referenced_metrics()?;
    let cluster = LocalCluster::start(ClusterOptions::default()).await?;
    traffic(&cluster).await?;
    // Per-node metrics land where the work happened (group leaders, home nodes):
    // Prometheus sees them all, so the test looks at all nodes.
    let mut exported = BTreeSet::new();
    for id in cluster.node_ids() {
        exported.extend(exported_samples(&scrape(cluster.http_addr(id)).await?));
    }
    let absent = missing(&wanted, &exported);
    ensure!(
        absent.is_empty(),
        "metrics used by charts/parley/files (alerts.yaml, dashboards/parley.json) that no \
         node exports: {absent:?}\nnode metrics exported: {:?}",
        exported
            .iter()
            .filter(|n| n.starts_with("parley_"))
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// The `parley-operator` binary: `$PARLEY_OPERATOR_BIN`, or one next to this test's
/// executable or in an ancestor directory (the target directory, where `parley-node` is).
fn operator_binary() -> anyhow::Result<PathBuf> {
    parley_testkit::workspace_binary("parley-operator", OPERATOR_BIN_ENV)
}

/// Kills the child when dropped, so a failed assertion leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_metrics_used_by_alerts_and_dashboard_are_exported() -> anyhow::Result<()> {
    let (_, wanted) = referenced_metrics()?;
    let binary = operator_binary()?;
    let dir = tempfile::tempdir()?;
    // A Kubernetes API server that cannot be reached: the operator must still serve
    // /metrics at once.
    let kubeconfig = dir.path().join("kubeconfig");
    fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\n\
         clusters:\n- name: unreachable\n  cluster:\n    server: https://127.0.0.1:1\n    \
         insecure-skip-tls-verify: true\n\
         contexts:\n- name: unreachable\n  context:\n    cluster: unreachable\n    user: nobody\n    \
         namespace: default\n\
         current-context: unreachable\n\
         users:\n- name: nobody\n  user:\n    token: not-a-token\n",
    )?;
    let port = free_loopback_ports(1)?[0];
    let addr = format!("127.0.0.1:{port}");
    let log_path = dir.path().join("operator.log");
    let log = File::create(&log_path)?;
    let mut command = Command::new(&binary);
    command
        .args(["run", "--metrics-addr", &addr])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env("POD_NAME", "parley-operator-test")
        .env("POD_NAMESPACE", "default")
        .env("WATCH_NAMESPACE", "default")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut operator =
        KillOnDrop(spawn_tied(command).with_context(|| format!("starting {}", binary.display()))?);

    let deadline = Instant::now() + T;
    let text = loop {
        if let Some(status) = operator.0.try_wait()? {
            bail!(
                "parley-operator exited ({status}) without a reachable API server; it must keep \
                 serving /metrics\n{}",
                log_tail(&log_path, 30)
            );
        }
        match scrape(&addr).await {
            Ok(text) => break text,
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "parley-operator served no /metrics on {addr} within {T:?}: {e:#}\n{}",
                    log_tail(&log_path, 30)
                )
            }
            Err(_) => sleep(Duration::from_millis(100)).await,
        }
    };
    let exported = exported_samples(&text);
    let absent = missing(&wanted, &exported);
    ensure!(
        absent.is_empty(),
        "metrics used by charts/parley/files (alerts.yaml, dashboards/parley.json) that \
         parley-operator does not export before its first reconcile: {absent:?}\nexported: {:?}",
        exported
            .iter()
            .filter(|n| n.starts_with("parley_"))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn metric_names_are_whole_identifiers_without_histogram_suffixes() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(parley_raft_commit_seconds_bucket[5m]))) \
         / xparley_other + parley_operator_leader{job=\"parley-operator\"} + parley_a_count",
    );
    let want: BTreeSet<String> = [
        "parley_raft_commit_seconds",
        "parley_operator_leader",
        "parley_a",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, want);
}

#[test]
fn rule_expressions_reads_inline_quoted_and_block_exprs() -> anyhow::Result<()> {
    let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        \
                for: 1m\n      - alert: B\n        expr: \"parley_x > 1\"\n      - alert: C\n        \
                expr: |\n          parley_y\n          > 2\n        for: 5m\n";
    let exprs = rule_expressions(yaml)?;
    assert_eq!(exprs.len(), 3);
    assert_eq!(exprs[0], "up == 0");
    assert_eq!(exprs[1], "parley_x > 1");
    assert!(exprs[2].contains("parley_y") && exprs[2].contains("> 2") && !exprs[2].contains("for"));
    Ok(())
}
