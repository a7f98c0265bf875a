//! `parley status`: the cluster's nodes and shard groups, from `Admin.ClusterStatus`.

use std::time::Duration;

use anyhow::{bail, Context as _};
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::{ClusterStatusReply, ClusterStatusRequest};

/// Time limit of connecting to a node and of the call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the first admin endpoint that answers and prints the status.
pub async fn run(admin_endpoints: &[String]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for endpoint in admin_endpoints {
        match cluster_status(endpoint).await {
            Ok(status) => {
                print!("{}", render(&status));
                return Ok(());
            }
            Err(e) => failures.push(format!("{endpoint}: {e:#}")),
        }
    }
    if failures.is_empty() {
        bail!("--admin lists no endpoint");
    }
    bail!("no node answered: {}", failures.join("; "))
}

/// Calls `Admin.ClusterStatus` on one node.
pub async fn cluster_status(endpoint: &str) -> anyhow::Result<ClusterStatusReply> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .context("invalid admin endpoint")?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .context("cannot connect")?;
    let reply = AdminClient::new(channel)
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("{}: {}", status.code(), status.message()))?;
    Ok(reply.into_inner())
}

/// The status as text tables.
fn render(s: &ClusterStatusReply) -> String {
    let mut out = format!(
        "placement epoch {}, metadata leader {}\n\n",
        s.epoch, s.metadata_leader
    );
    out += &format!(
        "{:<5} {:<21} {:<21} {:<9} {:<9} {:<5} {:>8} {:>7}\n",
        "node", "address", "client address", "state", "reachable", "ready", "replicas", "leaders"
    );
    for n in &s.nodes {
        let a = n.address.clone().unwrap_or_default();
        let client = if a.client_addr.is_empty() {
            "-"
        } else {
            &a.client_addr
        };
        out += &format!(
            "{:<5} {:<21} {:<21} {:<9} {:<9} {:<5} {:>8} {:>7}\n",
            a.node_id,
            a.addr,
            client,
            n.state,
            yes_no(n.reachable),
            yes_no(n.ready),
            n.replicas,
            n.leaders
        );
    }
    out += &format!(
        "\n{:<5} {:<13} {:<12} {:<6} {:>7}\n",
        "group", "slots", "voters", "leader", "max lag"
    );
    for g in &s.groups {
        let voters: Vec<String> = g.voters.iter().map(u64::to_string).collect();
        let leader = if g.leader == 0 {
            "-".to_owned()
        } else {
            g.leader.to_string()
        };
        out += &format!(
            "{:<5} {:<13} {:<12} {:<6} {:>7}\n",
            g.group_id,
            format!("{}-{}", g.slot_start, g.slot_end),
            voters.join(","),
            leader,
            g.max_lag
        );
    }
    out
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::node::v1::{ClusterGroup, ClusterNode, NodeAddress};

    #[test]
    fn renders_nodes_and_groups() {
        let status = ClusterStatusReply {
            epoch: 7,
            metadata_leader: 2,
            metadata_voters: vec![1, 2, 3],
            nodes: vec![ClusterNode {
                address: Some(NodeAddress {
                    node_id: 1,
                    addr: "127.0.0.1:7100".into(),
                    http_addr: "127.0.0.1:7101".into(),
                    zone: String::new(),
                    client_addr: "127.0.0.1:7102".into(),
                }),
                state: "active".into(),
                reachable: true,
                replicas: 9,
                leaders: 3,
                ready: true,
                ..Default::default()
            }],
            groups: vec![ClusterGroup {
                group_id: 1,
                slot_start: 0,
                slot_end: 1023,
                voters: vec![1, 2, 3],
                leader: 0,
                max_lag: 4,
                ..Default::default()
            }],
        };
        let text = render(&status);
        assert!(text.starts_with("placement epoch 7, metadata leader 2\n"));
        assert!(text.contains("127.0.0.1:7102"));
        assert!(text.contains("active"));
        assert!(text.contains("0-1023"));
        assert!(text.contains("1,2,3"));
        let group_line = text.lines().last().unwrap_or_default();
        assert!(group_line.contains(" - "), "{group_line}");
    }
}
