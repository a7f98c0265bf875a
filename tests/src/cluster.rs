//! [`LocalCluster`]: a cluster of `parley-node` processes on 127.0.0.1.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::conversation_log_client::ConversationLogClient;
use parley_proto::node::v1::{
    BootstrapRequest, ClusterStatusReply, ClusterStatusRequest, NodeAddress, SetFaultsRequest,
};
use tempfile::TempDir;
use tokio::time::{sleep, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::log_client::{is_retryable, LogClient};
use crate::process::{free_loopback_ports, log_tail, spawn_tied};

/// Environment variable naming the `parley-node` binary to run.
pub const NODE_BIN_ENV: &str = "PARLEY_NODE_BIN";
/// Environment variable that, when set to anything but `0`, keeps a temporary
/// data root (node data and logs) after the cluster is dropped.
pub const KEEP_DATA_ENV: &str = "PARLEY_KEEP_DATA";

/// File in the data root holding the client-token signing key all nodes share.
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// Number of nodes that [`LocalCluster::start`] bootstraps the cluster with.
const BOOTSTRAP_NODES: u64 = 3;
/// How long [`LocalCluster::stop`] waits after `SIGTERM` before `SIGKILL`.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Time limit of one admin call made while polling.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time limit of calls made through [`LocalCluster::client`] and [`LocalCluster::admin`].
const CLIENT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of a health endpoint or the cluster status.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of a node's log quoted in startup errors.
const LOG_TAIL_LINES: usize = 30;

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Number of nodes, ids `1..=nodes`; at least 3. Nodes 1–3 are
    /// bootstrapped, the others start with `--join` to node 1. Default 3.
    pub nodes: u64,
    /// Shard groups created at bootstrap. Default 8.
    pub shard_groups: u32,
    /// `None` (the default) picks free loopback ports. `Some(p)` gives node
    /// `i` gRPC port `p + 3(i-1)`, HTTP port `p + 3(i-1) + 1` and client
    /// (WebSocket) port `p + 3(i-1) + 2`.
    pub base_port: Option<u16>,
    /// Start every node with `--fault-injection` (needed by
    /// [`LocalCluster::set_faults`]). Default off.
    pub fault_injection: bool,
    /// Arguments appended to every node's `run` command line.
    pub extra_args: Vec<String>,
    /// Directory holding `node-<id>/` data directories. `None` (the default)
    /// uses a fresh temporary directory, removed on drop unless the thread is
    /// panicking or [`KEEP_DATA_ENV`] is set.
    pub data_root: Option<PathBuf>,
    /// Directory for the nodes' `node-<id>.log` files (stdout and stderr).
    /// `None` (the default) uses the data root.
    pub log_dir: Option<PathBuf>,
    /// The `parley-node` binary; `None` (the default) uses [`node_binary`].
    pub node_bin: Option<PathBuf>,
    /// Time limit of each startup phase: nodes healthy, bootstrap accepted,
    /// every group led. Also bounds [`LocalCluster::restart`]. Default 60 s.
    pub startup_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            shard_groups: 8,
            base_port: None,
            fault_injection: false,
            extra_args: Vec::new(),
            data_root: None,
            log_dir: None,
            node_bin: None,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// Finds the `parley-node` binary: `$PARLEY_NODE_BIN` if set, else a
/// `parley-node` in the directory of the running executable or one of its
/// ancestors (so `target/debug/deps/some-test` finds `target/debug/parley-node`
/// and `target/release/parley-bench` finds `target/release/parley-node`).
pub fn node_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("parley-node", NODE_BIN_ENV)
}

/// Finds the workspace binary `name`: the path in the environment variable `env` if set,
/// else `name` in the directory of the running executable or one of its ancestors.
pub fn workspace_binary(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        ensure!(path.is_file(), "{env}={} is not a file", path.display());
        return Ok(path);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no {name} binary near {}: build it first (`cargo build -p {name}`, with \
                 --release for a release build, or `cargo build --workspace --bins`) or set {env}",
                exe.display()
            )
        })
}

/// A running cluster of `parley-node` processes on 127.0.0.1, bootstrapped
/// and with a leader in every shard group once [`start`](Self::start) returns.
///
/// Methods taking a node id panic if the id is not in `1..=nodes`: that is a
/// bug in the calling test. Lifecycle calls for one node (`kill`, `stop`,
/// `restart`, `pause`, `resume`) must not run concurrently with each other;
/// everything else may be called from several tasks through an `Arc`.
///
/// Dropping the cluster kills every node with `SIGKILL`. A temporary data
/// root is then removed, unless the thread is panicking (a failing test), in
/// which case it is kept for inspection and its path printed to stderr.
#[derive(Debug)]
pub struct LocalCluster {
    nodes: BTreeMap<u64, Node>,
    shard_groups: u32,
    startup_timeout: Duration,
    data_root: PathBuf,
    temp_root: Option<TempDir>,
    http: reqwest::Client,
}

/// One node: its fixed configuration and its current process, if any.
#[derive(Debug)]
struct Node {
    id: u64,
    grpc: SocketAddr,
    http: SocketAddr,
    client: SocketAddr,
    data_dir: PathBuf,
    log_path: PathBuf,
    binary: PathBuf,
    args: Vec<String>,
    /// Shared by every client of the node; reconnects by itself after a restart.
    channel: Channel,
    process: Mutex<Process>,
}

/// The process state of a node.
#[derive(Debug, Default)]
struct Process {
    child: Option<Child>,
    paused: bool,
    /// How the last process ended, once it has been reaped.
    exit: Option<ExitStatus>,
}

impl Process {
    /// Whether a started process has not exited yet, reaping it if it has.
    fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.child = None;
                self.paused = false;
                self.exit = Some(status);
                false
            }
            // The child was reaped elsewhere or cannot be waited for: it is no
            // longer ours to control.
            Err(_) => {
                self.child = None;
                self.paused = false;
                false
            }
        }
    }

    /// The process id of the running child, or an error naming how it ended.
    fn running_pid(&mut self, id: u64) -> anyhow::Result<Pid> {
        if !self.is_running() {
            match self.exit {
                Some(status) => bail!("node {id} is not running (last exit: {status})"),
                None => bail!("node {id} is not running"),
            }
        }
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("node {id} is not running"))?;
        let raw = i32::try_from(child.id()).context("process id out of range")?;
        Ok(Pid::from_raw(raw))
    }
}

impl Node {
    fn process(&self) -> MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.process().running_pid(self.id)?;
        signal::kill(pid, signal)
            .with_context(|| format!("cannot send {signal} to node {}", self.id))
    }

    fn address(&self) -> NodeAddress {
        NodeAddress {
            node_id: self.id,
            addr: self.grpc.to_string(),
            http_addr: self.http.to_string(),
            zone: String::new(),
            client_addr: self.client.to_string(),
        }
    }

    /// Starts the node's process, appending its output to its log file.
    fn spawn(&self) -> anyhow::Result<()> {
        let mut process = self.process();
        ensure!(!process.is_running(), "node {} is already running", self.id);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        writeln!(
            log,
            "=== parley-testkit: starting node {}: {} {}",
            self.id,
            self.binary.display(),
            self.args.join(" ")
        )
        .with_context(|| format!("cannot write {}", self.log_path.display()))?;
        let stderr = log
            .try_clone()
            .context("cannot duplicate the log file handle")?;
        let mut command = Command::new(&self.binary);
        command
            .args(&self.args)
            // Plain text logs: the output goes to a file, not a terminal.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr);
        let child = spawn_tied(command)
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        *process = Process {
            child: Some(child),
            paused: false,
            exit: None,
        };
        Ok(())
    }

    /// Waits up to `limit` for the process to exit; `None` if it has not.
    async fn wait_exit(&self, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut process = self.process();
                let Some(child) = process.child.as_mut() else {
                    bail!("node {} has no process to wait for", self.id);
                };
                if let Some(status) = child
                    .try_wait()
                    .with_context(|| format!("cannot wait for node {}", self.id))?
                {
                    process.child = None;
                    process.paused = false;
                    process.exit = Some(status);
                    return Ok(Some(status));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// The last lines of the node's log, for error messages.
    fn log_tail(&self) -> String {
        log_tail(&self.log_path, LOG_TAIL_LINES)
    }
}

impl LocalCluster {
    /// Starts the nodes, bootstraps the cluster through node 1 and waits until
    /// every shard group has a leader (and every joined node is registered).
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        ensure!(
            options.nodes >= BOOTSTRAP_NODES,
            "a cluster needs at least {BOOTSTRAP_NODES} nodes, not {}",
            options.nodes
        );
        ensure!(
            options.shard_groups > 0,
            "a cluster needs at least one shard group"
        );
        let binary = match &options.node_bin {
            Some(path) => path.clone(),
            None => node_binary()?,
        };
        ensure!(
            binary.is_file(),
            "the parley-node binary {} does not exist",
            binary.display()
        );
        let (data_root, temp_root) = match &options.data_root {
            Some(root) => {
                fs::create_dir_all(root)
                    .with_context(|| format!("cannot create {}", root.display()))?;
                (root.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("parley-cluster-")
                    .tempdir()
                    .context("cannot create a temporary data root")?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let log_dir = options.log_dir.clone().unwrap_or_else(|| data_root.clone());
        fs::create_dir_all(&log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let ports = node_ports(options.nodes, options.base_port)?;
        let join_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports[0].0));
        let token_key = data_root.join(TOKEN_KEY_FILE);
        if !token_key.exists() {
            let out = Command::new(&binary)
                .arg("gen-token-key")
                .arg(&token_key)
                .output()
                .context("cannot run parley-node gen-token-key")?;
            ensure!(
                out.status.success(),
                "parley-node gen-token-key failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut nodes = BTreeMap::new();
        for (id, &(grpc_port, http_port, client_port)) in (1..=options.nodes).zip(&ports) {
            let grpc = SocketAddr::from((Ipv4Addr::LOCALHOST, grpc_port));
            let http = SocketAddr::from((Ipv4Addr::LOCALHOST, http_port));
            let client = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
            let data_dir = data_root.join(format!("node-{id}"));
            let mut args = vec![
                "run".to_owned(),
                "--node-id".to_owned(),
                id.to_string(),
                "--listen".to_owned(),
                grpc.to_string(),
                "--http".to_owned(),
                http.to_string(),
                "--data-dir".to_owned(),
                data_dir.display().to_string(),
                "--client-listen".to_owned(),
                client.to_string(),
                "--token-key-file".to_owned(),
                token_key.display().to_string(),
            ];
            if options.fault_injection {
                args.push("--fault-injection".to_owned());
            }
            if id > BOOTSTRAP_NODES {
                args.extend(["--join".to_owned(), join_addr.to_string()]);
            }
            args.extend(options.extra_args.iter().cloned());
            let channel = Endpoint::from_shared(format!("http://{grpc}"))
                .context("invalid node endpoint")?
                .connect_timeout(Duration::from_secs(1))
                .timeout(CLIENT_CALL_TIMEOUT)
                .tcp_nodelay(true)
                .connect_lazy();
            let node = Node {
                id,
                grpc,
                http,
                client,
                log_path: log_dir.join(format!("node-{id}.log")),
                data_dir,
                binary: binary.clone(),
                args,
                channel,
                process: Mutex::new(Process::default()),
            };
            nodes.insert(id, node);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .context("cannot build the HTTP client")?;
        // From here on, dropping `cluster` on an error kills what was started.
        let mut cluster = Self {
            nodes,
            shard_groups: options.shard_groups,
            startup_timeout: options.startup_timeout,
            data_root,
            temp_root,
            http,
        };
        if let Err(err) = cluster.bring_up().await {
            // The logs explain the failure: keep them past the drop.
            if let Some(temp) = cluster.temp_root.take() {
                let _ = temp.keep();
            }
            let root = cluster.data_root.display().to_string();
            return Err(err.context(format!("cluster startup failed; node logs are in {root}")));
        }
        Ok(cluster)
    }

    /// The startup sequence of [`start`](Self::start) on created but not yet started nodes.
    async fn bring_up(&self) -> anyhow::Result<()> {
        let timeout = self.startup_timeout;
        let founders: Vec<u64> = (1..=BOOTSTRAP_NODES).collect();
        for &id in &founders {
            self.node(id).spawn()?;
        }
        for &id in &founders {
            self.wait_http(id, "/healthz", timeout).await?;
        }
        self.bootstrap(timeout).await?;
        let joiners: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|&id| id > BOOTSTRAP_NODES)
            .collect();
        for &id in &joiners {
            self.node(id).spawn()?;
        }
        for &id in &joiners {
            self.wait_http(id, "/healthz", timeout).await?;
        }
        let status = self.wait_for_leaders(timeout).await?;
        if !joiners.is_empty() {
            self.wait_registered(status, timeout).await?;
        }
        Ok(())
    }

    /// Calls `Admin.Bootstrap` on node 1 with nodes 1–3, retrying transient failures.
    async fn bootstrap(&self, timeout: Duration) -> anyhow::Result<()> {
        let request = BootstrapRequest {
            nodes: (1..=BOOTSTRAP_NODES)
                .map(|id| self.node(id).address())
                .collect(),
            shard_groups: self.shard_groups,
        };
        let deadline = Instant::now() + timeout;
        loop {
            let mut call = Request::new(request.clone());
            // Creating the groups may take a while; a retry after a timed-out
            // but successful first call would be refused as a second bootstrap.
            call.set_timeout(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(POLL_CALL_TIMEOUT),
            );
            match self.admin(1).bootstrap(call).await {
                Ok(_) => return Ok(()),
                Err(status) if is_retryable(&status) && Instant::now() < deadline => {
                    sleep(POLL_INTERVAL).await;
                }
                Err(status) => {
                    return Err(anyhow!("{status}")).with_context(|| {
                        format!(
                            "bootstrap through node 1 failed\n{}",
                            self.node(1).log_tail()
                        )
                    });
                }
            }
        }
    }

    /// Waits until every node id appears in the cluster's node registry.
    async fn wait_registered(
        &self,
        mut status: ClusterStatusReply,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let registered: Vec<u64> = status
                .nodes
                .iter()
                .filter_map(|node| node.address.as_ref().map(|address| address.node_id))
                .collect();
            let missing: Vec<u64> = self
                .nodes
                .keys()
                .copied()
                .filter(|id| !registered.contains(id))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nodes {missing:?} did not join within {timeout:?}");
            }
            sleep(POLL_INTERVAL).await;
            status = self.cluster_status().await?;
        }
    }

    fn node(&self, id: u64) -> &Node {
        self.nodes.get(&id).unwrap_or_else(|| {
            panic!(
                "node {id} is not part of this cluster (ids 1..={})",
                self.nodes.len()
            )
        })
    }

    /// The gRPC endpoint of a node, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self, id: u64) -> String {
        format!("http://{}", self.node(id).grpc)
    }

    /// The gRPC endpoints of all nodes, in id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.keys().map(|&id| self.endpoint(id)).collect()
    }

    /// The gRPC listen address of a node.
    pub fn grpc_addr(&self, id: u64) -> SocketAddr {
        self.node(id).grpc
    }

    /// The HTTP (health, metrics) listen address of a node.
    /// The client WebSocket address (host:port) of node `id`.
    pub fn client_addr(&self, id: u64) -> SocketAddr {
        self.node(id).client
    }

    /// The client WebSocket addresses of every node.
    pub fn client_endpoints(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.client.to_string()).collect()
    }

    /// The client-token signing key the nodes share (tests mint tokens with it).
    pub fn token_key_path(&self) -> PathBuf {
        self.data_root.join(TOKEN_KEY_FILE)
    }

    pub fn http_addr(&self, id: u64) -> SocketAddr {
        self.node(id).http
    }

    /// All node ids, ascending.
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// The directory holding every node's data directory.
    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    /// A node's data directory, `<data root>/node-<id>`.
    pub fn data_dir(&self, id: u64) -> &Path {
        &self.node(id).data_dir
    }

    /// A node's log file (stdout and stderr of all its runs).
    pub fn log_path(&self, id: u64) -> &Path {
        &self.node(id).log_path
    }

    /// Whether a node's process is alive (a paused process counts as alive).
    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).process().is_running()
    }

    /// The process id of a node's running process (to read its memory use, say).
    pub fn pid(&self, id: u64) -> Option<u32> {
        let mut process = self.node(id).process();
        if !process.is_running() {
            return None;
        }
        process.child.as_ref().map(Child::id)
    }

    /// Whether a node is paused by [`pause`](Self::pause).
    pub fn is_paused(&self, id: u64) -> bool {
        let mut process = self.node(id).process();
        process.is_running() && process.paused
    }

    /// Kills a node with `SIGKILL` and waits for the process to end.
    pub async fn kill(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id);
        node.signal(Signal::SIGKILL)?;
        match node.wait_exit(STOP_GRACE).await? {
            Some(_) => Ok(()),
            None => bail!("node {id} did not exit within {STOP_GRACE:?} of SIGKILL"),
        }
    }

    /// Stops a node with `SIGTERM`, escalating to `SIGKILL` after 10 s, and
    /// returns how it exited. A paused node is resumed so it can handle the signal.
    pub async fn stop(&self, id: u64) -> anyhow::Result<ExitStatus> {
        let node = self.node(id);
        node.signal(Signal::SIGTERM)?;
        if node.process().paused {
            node.signal(Signal::SIGCONT)?;
        }
        if let Some(status) = node.wait_exit(STOP_GRACE).await? {
            return Ok(status);
        }
        node.signal(Signal::SIGKILL)?;
        node.wait_exit(STOP_GRACE)
            .await?
            .ok_or_else(|| anyhow!("node {id} did not exit within {STOP_GRACE:?} of SIGKILL"))
    }

    /// Starts a stopped or killed node again with the same command line and
    /// data directory, and waits until its `/healthz` answers 200.
    pub async fn restart(&self, id: u64) -> anyhow::Result<()> {
        self.node(id).spawn()?;
        self.wait_http(id, "/healthz", self.startup_timeout).await
    }

    /// Freezes a node with `SIGSTOP`: its sockets stay open but it answers nothing.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id);
        node.signal(Signal::SIGSTOP)?;
        node.process().paused = true;
        Ok(())
    }

    /// Continues a node frozen by [`pause`](Self::pause) with `SIGCONT`.
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        let node = self.node(id);
        node.signal(Signal::SIGCONT)?;
        node.process().paused = false;
        Ok(())
    }

    /// The cluster status as seen by the first running, unpaused node that answers.
    pub async fn cluster_status(&self) -> anyhow::Result<ClusterStatusReply> {
        let mut failures = Vec::new();
        for (&id, node) in &self.nodes {
            {
                let mut process = node.process();
                if !process.is_running() || process.paused {
                    continue;
                }
            }
            let mut request = Request::new(ClusterStatusRequest {});
            request.set_timeout(POLL_CALL_TIMEOUT);
            match self.admin(id).cluster_status(request).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) => failures.push(format!("node {id}: {status}")),
            }
        }
        if failures.is_empty() {
            bail!("no node is running");
        }
        bail!("no node answered ClusterStatus: {}", failures.join("; "))
    }

    /// The leader of a shard group, `None` if the group is unknown or leaderless.
    pub async fn leader_of(&self, group_id: u64) -> anyhow::Result<Option<u64>> {
        let status = self.cluster_status().await?;
        Ok(status
            .groups
            .iter()
            .find(|group| group.group_id == group_id)
            .map(|group| group.leader)
            .filter(|&leader| leader != 0))
    }

    /// Waits until the cluster reports at least the configured number of shard
    /// groups and a leader in each, and returns that status.
    pub async fn wait_for_leaders(&self, timeout: Duration) -> anyhow::Result<ClusterStatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let problem = match self.cluster_status().await {
                Ok(status) => {
                    let leaderless: Vec<u64> = status
                        .groups
                        .iter()
                        .filter(|group| group.leader == 0)
                        .map(|group| group.group_id)
                        .collect();
                    if status.groups.len() < self.shard_groups as usize {
                        format!(
                            "{} of {} shard groups exist",
                            status.groups.len(),
                            self.shard_groups
                        )
                    } else if !leaderless.is_empty() {
                        format!("groups {leaderless:?} have no leader")
                    } else {
                        return Ok(status);
                    }
                }
                Err(err) => format!("{err:#}"),
            };
            if Instant::now() >= deadline {
                bail!("shard groups not all led within {timeout:?}: {problem}");
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Waits until a node's `/readyz` answers 200.
    pub async fn wait_ready(&self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        self.wait_http(id, "/readyz", timeout).await
    }

    /// Waits until a node's `/healthz` answers 200.
    pub async fn wait_healthy(&self, id: u64, timeout: Duration) -> anyhow::Result<()> {
        self.wait_http(id, "/healthz", timeout).await
    }

    /// Polls `path` on a node's HTTP address until it answers 200, failing
    /// early (with the log's tail) if the process exits.
    async fn wait_http(&self, id: u64, path: &str, timeout: Duration) -> anyhow::Result<()> {
        let node = self.node(id);
        let url = format!("http://{}{path}", node.http);
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut process = node.process();
                if !process.is_running() {
                    let how = process.exit.map_or_else(
                        || "is not running".to_owned(),
                        |status| format!("exited ({status})"),
                    );
                    bail!(
                        "node {id} {how} while waiting for {path}\n{}",
                        node.log_tail()
                    );
                }
            }
            let last = match self.http.get(&url).send().await {
                Ok(response) if response.status() == reqwest::StatusCode::OK => return Ok(()),
                Ok(response) => format!("HTTP {}", response.status()),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "node {id}: {url} not 200 within {timeout:?} (last: {last})\n{}",
                    node.log_tail()
                );
            }
            sleep(POLL_INTERVAL).await;
        }
    }

    /// Sets a node's injected faults (`Admin.SetFaults`); needs
    /// [`ClusterOptions::fault_injection`].
    pub async fn set_faults(
        &self,
        id: u64,
        blocked_peers: Vec<u64>,
        disk_full: bool,
    ) -> anyhow::Result<()> {
        let mut request = Request::new(SetFaultsRequest {
            blocked_peers,
            disk_full,
        });
        request.set_timeout(POLL_CALL_TIMEOUT);
        self.admin(id)
            .set_faults(request)
            .await
            .map_err(|status| anyhow!("{status}"))
            .with_context(|| format!("SetFaults on node {id}"))?;
        Ok(())
    }

    /// A `ConversationLog` client of one node, sharing the node's connection;
    /// calls time out after 30 s unless the request sets a shorter timeout.
    pub fn client(&self, id: u64) -> ConversationLogClient<Channel> {
        ConversationLogClient::new(self.node(id).channel.clone())
    }

    /// An `Admin` client of one node, sharing the node's connection; calls
    /// time out after 30 s unless the request sets a shorter timeout.
    pub fn admin(&self, id: u64) -> AdminClient<Channel> {
        AdminClient::new(self.node(id).channel.clone())
    }

    /// A retrying [`LogClient`] over all nodes.
    pub fn log_client(&self) -> LogClient {
        // A cluster has at least three nodes, so the list is not empty.
        LogClient::from_channels(
            self.nodes
                .values()
                .map(|node| node.channel.clone())
                .collect(),
        )
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in self.nodes.values() {
            let mut process = node.process();
            if let Some(mut child) = process.child.take() {
                // Errors mean the process is already gone, which is the goal.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let keep = std::thread::panicking()
            || std::env::var_os(KEEP_DATA_ENV).is_some_and(|value| value != "0");
        if let Some(temp) = self.temp_root.take() {
            if keep {
                let path = temp.keep();
                eprintln!(
                    "parley-testkit: node data and logs kept in {}",
                    path.display()
                );
            }
        }
    }
}

/// `(grpc, http)` ports for nodes `1..=count`, from `base_port` or free ones.
fn node_ports(count: u64, base_port: Option<u16>) -> anyhow::Result<Vec<(u16, u16, u16)>> {
    let count = usize::try_from(count).context("too many nodes")?;
    match base_port {
        None => {
            let free = free_loopback_ports(3 * count).context("cannot find free loopback ports")?;
            Ok(free.chunks_exact(3).map(|p| (p[0], p[1], p[2])).collect())
        }
        Some(base) => (0..count)
            .map(|index| {
                let port = |k: usize| {
                    u16::try_from(index * 3 + k)
                        .ok()
                        .and_then(|offset| base.checked_add(offset))
                };
                match (port(0), port(1), port(2)) {
                    (Some(g), Some(h), Some(c)) => Ok((g, h, c)),
                    _ => Err(anyhow!("base port {base} leaves no room for {count} nodes")),
                }
            })
            .collect(),
    }
}

/// How many shard groups each node leads, from a cluster status.
pub fn leader_counts(status: &ClusterStatusReply) -> HashMap<u64, usize> {
    let mut counts = HashMap::new();
    for group in status.groups.iter().filter(|group| group.leader != 0) {
        *counts.entry(group.leader).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_proto::node::v1::ClusterGroup;

    #[test]
    fn ports_from_a_base_are_consecutive_triples() -> anyhow::Result<()> {
        assert_eq!(
            node_ports(3, Some(7000))?,
            vec![(7000, 7001, 7002), (7003, 7004, 7005), (7006, 7007, 7008)]
        );
        assert!(node_ports(2, Some(u16::MAX - 3)).is_err());
        Ok(())
    }

    #[test]
    fn free_ports_are_all_distinct() -> anyhow::Result<()> {
        let ports = node_ports(5, None)?;
        let mut all: Vec<u16> = ports
            .iter()
            .flat_map(|&(grpc, http, client)| [grpc, http, client])
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 15);
        Ok(())
    }

    #[test]
    fn counts_leaders_per_node() {
        let group = |group_id, leader| ClusterGroup {
            group_id,
            leader,
            ..ClusterGroup::default()
        };
        let status = ClusterStatusReply {
            groups: vec![group(1, 2), group(2, 2), group(3, 1), group(4, 0)],
            ..ClusterStatusReply::default()
        };
        let counts = leader_counts(&status);
        assert_eq!(counts.get(&2), Some(&2));
        assert_eq!(counts.get(&1), Some(&1));
        assert_eq!(counts.get(&0), None);
    }

    #[tokio::test]
    async fn start_fails_cleanly_with_a_missing_binary() {
        let options = ClusterOptions {
            node_bin: Some(PathBuf::from("/nonexistent/parley-node")),
            ..ClusterOptions::default()
        };
        let err = LocalCluster::start(options)
            .await
            .expect_err("the binary does not exist");
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
    }
}
