//! The etcd baseline: a three-member etcd cluster on loopback, started from
//! the Debian `etcd` binary with default settings (so every write is fsynced,
//! as in Parley), and a [`Target`] that puts into it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use etcd_client::{Client, ConnectOptions};
use parley_testkit::process::{free_loopback_ports, log_tail, spawn_tied};
use tokio::time::{sleep, Instant};

use crate::load::Target;
use crate::parley::Route;

/// Number of etcd members.
const MEMBERS: usize = 3;
/// Time limit of one put.
const PUT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running three-member etcd cluster; dropping it kills the members.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_url: String,
    log_path: PathBuf,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts the members with data and logs under `root` and waits up to
    /// `timeout` until the cluster accepts a write.
    pub async fn start(binary: &Path, root: &Path, timeout: Duration) -> anyhow::Result<Self> {
        fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
        let ports = free_loopback_ports(2 * MEMBERS).context("cannot find free loopback ports")?;
        let names: Vec<String> = (1..=MEMBERS).map(|n| format!("e{n}")).collect();
        let client_urls: Vec<String> = ports
            .iter()
            .step_by(2)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        let peer_urls: Vec<String> = ports
            .iter()
            .skip(1)
            .step_by(2)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        let initial_cluster = names
            .iter()
            .zip(&peer_urls)
            .map(|(name, url)| format!("{name}={url}"))
            .collect::<Vec<_>>()
            .join(",");

        let mut cluster = Self {
            members: Vec::new(),
        };
        for ((name, client_url), peer_url) in names.iter().zip(&client_urls).zip(&peer_urls) {
            let log_path = root.join(format!("{name}.log"));
            let log = File::create(&log_path)
                .with_context(|| format!("cannot create {}", log_path.display()))?;
            let stderr = log
                .try_clone()
                .context("cannot duplicate the log file handle")?;
            let mut command = Command::new(binary);
            command
                .arg("--name")
                .arg(name)
                .arg("--data-dir")
                .arg(root.join(name))
                .args(["--listen-client-urls", client_url])
                .args(["--advertise-client-urls", client_url])
                .args(["--listen-peer-urls", peer_url])
                .args(["--initial-advertise-peer-urls", peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "parley-bench"])
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr);
            let child = spawn_tied(command)
                .with_context(|| format!("cannot start {}", binary.display()))?;
            cluster.members.push(Member {
                name: name.clone(),
                client_url: client_url.clone(),
                log_path,
                child: Some(child),
            });
        }
        cluster.wait_writable(timeout).await?;
        Ok(cluster)
    }

    /// The members' client URLs.
    pub fn client_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| member.client_url.clone())
            .collect()
    }

    /// Waits until a put through all members' endpoints succeeds, failing early
    /// if a member exits.
    async fn wait_writable(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        loop {
            for member in &mut self.members {
                member.check_alive()?;
            }
            let attempt = async {
                let mut client = Client::connect(self.client_urls(), Some(options.clone())).await?;
                client.put("parley-bench/ready", "1", None).await
            };
            let last = match attempt.await {
                Ok(_) => return Ok(()),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|member| log_tail(&member.log_path, 10))
                    .collect();
                bail!(
                    "etcd did not accept a write within {timeout:?} (last: {last})\n{}",
                    logs.join("\n")
                );
            }
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills every member and waits for it.
    pub fn kill(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // Errors mean the process is already gone, which is the goal.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Member {
    /// An error with the tail of the member's log if it has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("etcd member {} was killed", self.name);
        };
        let Some(status) = child
            .try_wait()
            .with_context(|| format!("cannot wait for etcd member {}", self.name))?
        else {
            return Ok(());
        };
        self.child = None;
        bail!(
            "etcd member {} exited ({status})\n{}",
            self.name,
            log_tail(&self.log_path, 20)
        )
    }
}

/// Puts a payload under one key per conversation; worker `w` talks to member
/// `w % members` (of one, the leader, with [`Route::Leader`]).
#[derive(Clone)]
pub struct EtcdTarget {
    clients: Arc<[Client]>,
    payload: Arc<[u8]>,
}

impl EtcdTarget {
    /// Connects to every member (`Route::Any`: worker `w` puts through member
    /// `w % members`, which forwards to the leader) or only to the leader
    /// (`Route::Leader`, found from the members' status).
    pub async fn connect(
        client_urls: &[String],
        route: Route,
        payload: Arc<[u8]>,
    ) -> anyhow::Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(PUT_TIMEOUT);
        let mut clients = Vec::with_capacity(client_urls.len());
        for url in client_urls {
            let client = Client::connect([url], Some(options.clone()))
                .await
                .with_context(|| format!("cannot connect to etcd at {url}"))?;
            clients.push(client);
        }
        anyhow::ensure!(!clients.is_empty(), "no etcd endpoints");
        if route == Route::Leader {
            let mut leader = None;
            for client in &mut clients {
                let status = client.status().await.context("etcd member status")?;
                let me = status.header().map(|h| h.member_id());
                if me.is_some() && me == Some(status.leader()) {
                    leader = Some(client.clone());
                }
            }
            let leader = leader.context("no etcd member reports itself the leader")?;
            clients = vec![leader];
        }
        Ok(Self {
            clients: clients.into(),
            payload,
        })
    }
}

impl Target for EtcdTarget {
    async fn op(&self, worker: usize, conversation: usize) -> anyhow::Result<()> {
        let mut kv = self.clients[worker % self.clients.len()].kv_client();
        kv.put(
            format!("parley-bench/conv-{conversation}"),
            self.payload.to_vec(),
            None,
        )
        .await?;
        Ok(())
    }
}
