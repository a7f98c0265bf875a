//! `parley dev`: a local cluster of `parley-node` processes on 127.0.0.1, kept running
//! until Ctrl-C (or SIGTERM), then stopped gracefully.
//!
//! Every node is forked from the main thread (the CLI runs a single-threaded runtime)
//! with `PR_SET_PDEATHSIG`, so the kernel kills the nodes if `parley dev` dies without
//! stopping them; the signal is tied to the forking thread, which lives as long as the
//! process. Nodes get their own process group so that Ctrl-C in the terminal reaches
//! only `parley dev`, which then stops them in order.

use std::fs::{self, File};
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context as _};
use clap::Args;
use nix::sys::prctl;
use nix::sys::signal::{self, Signal};
use nix::unistd::{getpid, getppid, Pid};
use parley_proto::node::v1::admin_client::AdminClient;
use parley_proto::node::v1::{BootstrapRequest, NodeAddress};
use tokio::signal::unix::{signal as unix_signal, SignalKind};
use tokio::time::{sleep, Instant};

/// Nodes that form the initial cluster (the metadata group's voters).
const FOUNDERS: u64 = 3;
/// Limit of each startup phase (ports open, bootstrap, readiness).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(200);
/// Lines of a node's log shown when it fails.
const LOG_TAIL: usize = 20;

/// Options of `parley dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Data directory (node-<i>/ data, node-<i>.log, the token key). Default: a new
    /// directory under the system temporary directory. Reusing one restarts its cluster.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of nodes (at least 3).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Node i listens on base+10(i-1) (gRPC), +1 (HTTP) and +2 (client WebSocket).
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Shard groups created when the cluster is bootstrapped.
    #[arg(long, default_value_t = 12)]
    shard_groups: u32,
    /// The parley-node binary. Default: next to this executable, else on PATH.
    #[arg(long)]
    node_bin: Option<PathBuf>,
}

/// The ports of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NodePorts {
    grpc: u16,
    http: u16,
    client: u16,
}

/// Ports of node `id` (1-based) for a base port; `None` if they do not fit.
fn node_ports(base: u16, id: u64) -> Option<NodePorts> {
    let offset = id.checked_sub(1)?.checked_mul(10)?;
    let grpc = u16::try_from(u64::from(base).checked_add(offset)?).ok()?;
    Some(NodePorts {
        grpc,
        http: grpc.checked_add(1)?,
        client: grpc.checked_add(2)?,
    })
}

fn local(port: u16) -> String {
    SocketAddr::from(([127, 0, 0, 1], port)).to_string()
}

/// One node of the dev cluster.
struct DevNode {
    id: u64,
    ports: NodePorts,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl DevNode {
    fn address(&self) -> NodeAddress {
        NodeAddress {
            node_id: self.id,
            addr: local(self.ports.grpc),
            http_addr: local(self.ports.http),
            zone: String::new(),
            client_addr: local(self.ports.client),
        }
    }

    /// The node's `run` command line.
    fn args(&self, token_key: &Path, join: Option<u16>) -> Vec<String> {
        let mut args = vec![
            "run".to_owned(),
            "--node-id".to_owned(),
            self.id.to_string(),
            "--listen".to_owned(),
            local(self.ports.grpc),
            "--http".to_owned(),
            local(self.ports.http),
            "--client-listen".to_owned(),
            local(self.ports.client),
            "--data-dir".to_owned(),
            self.data_dir.display().to_string(),
            "--token-key-file".to_owned(),
            token_key.display().to_string(),
        ];
        if let Some(port) = join {
            args.extend(["--join".to_owned(), local(port)]);
        }
        args
    }

    /// An error if the process has exited, quoting its log.
    fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("node {} is not running", self.id);
        };
        if let Some(status) = child.try_wait().context("cannot wait for a node")? {
            self.child = None;
            bail!(
                "node {} exited ({status})\n{}",
                self.id,
                log_tail(&self.log_path)
            );
        }
        Ok(())
    }
}

/// The running nodes; dropping it kills any that are still running.
struct DevCluster {
    binary: PathBuf,
    token_key: PathBuf,
    nodes: Vec<DevNode>,
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // An error means it is gone already.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl DevCluster {
    /// Starts node `index` (0-based), appending its output to its log.
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let join = self.nodes[0].ports.grpc;
        let node = &mut self.nodes[index];
        let join = (node.id > FOUNDERS).then_some(join);
        fs::create_dir_all(&node.data_dir)
            .with_context(|| format!("cannot create {}", node.data_dir.display()))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&node.log_path)
            .with_context(|| format!("cannot open {}", node.log_path.display()))?;
        let stderr = log.try_clone().context("cannot duplicate a file handle")?;
        let mut command = Command::new(&self.binary);
        command
            .args(node.args(&self.token_key, join))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .process_group(0);
        let parent = getpid();
        // SAFETY: runs between fork and exec; makes only the async-signal-safe prctl(2)
        // and getppid(2) calls and allocates nothing on the success path.
        unsafe {
            command.pre_exec(move || {
                prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
                if getppid() != parent {
                    return Err(io::Error::other(
                        "parley dev exited before the node started",
                    ));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until every listed node accepts connections on its gRPC port.
    async fn wait_grpc(&mut self, indexes: &[usize]) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for &i in indexes {
            loop {
                self.nodes[i].check_running()?;
                let addr = local(self.nodes[i].ports.grpc);
                if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "node {} did not open {addr} within {STARTUP_TIMEOUT:?}\n{}",
                        self.nodes[i].id,
                        log_tail(&self.nodes[i].log_path)
                    );
                }
                sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// `Admin.Bootstrap` on node 1 with the founders, retrying while the nodes warm up.
    async fn bootstrap(&mut self, shard_groups: u32) -> anyhow::Result<()> {
        let request = BootstrapRequest {
            nodes: self.nodes[..FOUNDERS as usize]
                .iter()
                .map(DevNode::address)
                .collect(),
            shard_groups,
        };
        let endpoint = format!("http://{}", local(self.nodes[0].ports.grpc));
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            self.nodes[0].check_running()?;
            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .context("invalid node endpoint")?
                .connect_timeout(Duration::from_secs(2))
                // Creating the groups takes a while; a retry after a timed-out but
                // successful call would be refused as a second bootstrap.
                .timeout(Duration::from_secs(120))
                .connect()
                .await;
            let outcome = match channel {
                Ok(channel) => match AdminClient::new(channel).bootstrap(request.clone()).await {
                    Ok(reply) => {
                        let reply = reply.into_inner();
                        println!(
                            "bootstrapped: epoch {}, {} shard groups",
                            reply.epoch, reply.shard_groups
                        );
                        return Ok(());
                    }
                    Err(status) if status.message().contains("already bootstrapped") => {
                        println!("already bootstrapped");
                        return Ok(());
                    }
                    Err(status) if status.code() == tonic::Code::Unavailable => {
                        format!("{}: {}", status.code(), status.message())
                    }
                    Err(status) => {
                        bail!("bootstrap refused: {}: {}", status.code(), status.message())
                    }
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!("bootstrap did not succeed within {STARTUP_TIMEOUT:?}: {outcome}");
            }
            sleep(POLL).await;
        }
    }

    /// Waits until every node's `/readyz` answers 200, printing progress.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("cannot build an HTTP client")?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for i in 0..self.nodes.len() {
            let url = format!("http://{}/readyz", local(self.nodes[i].ports.http));
            loop {
                self.nodes[i].check_running()?;
                let last = match http.get(&url).send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::OK => break,
                    Ok(r) => format!("HTTP {}", r.status()),
                    Err(e) => e.to_string(),
                };
                if Instant::now() >= deadline {
                    bail!(
                        "node {} not ready within {STARTUP_TIMEOUT:?} ({url}: {last})\n{}",
                        self.nodes[i].id,
                        log_tail(&self.nodes[i].log_path)
                    );
                }
                sleep(POLL).await;
            }
            println!("node {} ready", self.nodes[i].id);
        }
        Ok(())
    }

    /// Reports nodes that exited on their own since the last call.
    fn report_exits(&mut self) {
        for node in &mut self.nodes {
            if node.child.is_some() {
                if let Err(e) = node.check_running() {
                    eprintln!("warning: {e:#}");
                }
            }
        }
    }

    /// SIGTERM to every node, then SIGKILL to those still running after the grace time.
    async fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = &node.child {
                if let Ok(pid) = i32::try_from(child.id()) {
                    // An error means it is gone already.
                    let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            let mut running = 0;
            for node in &mut self.nodes {
                if let Some(child) = node.child.as_mut() {
                    match child.try_wait() {
                        Ok(Some(status)) => {
                            println!("node {} stopped ({status})", node.id);
                            node.child = None;
                        }
                        Ok(None) => running += 1,
                        Err(_) => node.child = None,
                    }
                }
            }
            if running == 0 {
                return;
            }
            if Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(100)).await;
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                eprintln!(
                    "node {} did not stop within {STOP_GRACE:?}; killing it",
                    node.id
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The last lines of a log, headed by its path.
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(LOG_TAIL);
            format!(
                "last lines of {}:\n{}",
                path.display(),
                lines[start..].join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds the parley-node binary: the flag, else next to this executable, else PATH.
fn find_node_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        ensure!(
            path.is_file(),
            "--node-bin {} is not a file",
            path.display()
        );
        return Ok(path);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(candidate) = exe.parent().map(|dir| dir.join("parley-node")) {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("parley-node"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            anyhow!(
                "cannot find parley-node next to this executable or on PATH: build it \
                 (`cargo build -p parley-node`) or pass --node-bin"
            )
        })
}

/// Creates the token signing key with `parley-node gen-token-key` unless it exists.
fn ensure_token_key(binary: &Path, key: &Path) -> anyhow::Result<()> {
    if key.exists() {
        return Ok(());
    }
    let output = Command::new(binary)
        .arg("gen-token-key")
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    ensure!(
        output.status.success(),
        "`parley-node gen-token-key {}` failed ({}): {}",
        key.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn stop_signal() -> anyhow::Result<()> {
    let mut interrupt = unix_signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = unix_signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Runs `parley dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    ensure!(
        args.nodes >= FOUNDERS,
        "a cluster needs at least {FOUNDERS} nodes, not {}",
        args.nodes
    );
    ensure!(args.shard_groups > 0, "--shard-groups must be at least 1");
    let ports: Vec<NodePorts> = (1..=args.nodes)
        .map(|id| node_ports(args.base_port, id))
        .collect::<Option<_>>()
        .with_context(|| {
            format!(
                "{} nodes do not fit above port {}",
                args.nodes, args.base_port
            )
        })?;
    let binary = find_node_binary(args.node_bin)?;
    let dir = match args.dir {
        Some(dir) => {
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            dir
        }
        None => tempfile::Builder::new()
            .prefix("parley-dev-")
            .tempdir()
            .context("cannot create a temporary directory")?
            .keep(),
    };
    let dir = dir.canonicalize().unwrap_or(dir);
    println!("data directory: {}", dir.display());
    let token_key = dir.join("token-key.pem");
    ensure_token_key(&binary, &token_key)?;

    let nodes = (1..=args.nodes)
        .zip(ports)
        .map(|(id, ports)| DevNode {
            id,
            ports,
            data_dir: dir.join(format!("node-{id}")),
            log_path: dir.join(format!("node-{id}.log")),
            child: None,
        })
        .collect();
    let mut cluster = DevCluster {
        binary,
        token_key,
        nodes,
    };
    // Register the handlers before starting anything, so an early Ctrl-C stops cleanly.
    let stop = stop_signal();
    tokio::pin!(stop);

    let marker = dir.join("bootstrapped");
    let startup = start(&mut cluster, &marker, args.shard_groups);
    let started = tokio::select! {
        result = startup => Some(result),
        result = &mut stop => { result?; None }
    };
    match started {
        None => {
            println!("stopping the nodes");
            cluster.stop().await;
            return Ok(());
        }
        Some(Err(e)) => {
            cluster.stop().await;
            return Err(e.context(format!("node logs are in {}", dir.display())));
        }
        Some(Ok(())) => {}
    }
    print_banner(&cluster, &dir);

    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            result = &mut stop => { result?; break; }
            _ = check.tick() => cluster.report_exits(),
        }
    }
    println!("stopping the nodes");
    cluster.stop().await;
    Ok(())
}

/// Starts the founders, bootstraps (once per data directory), starts the others and
/// waits until all are ready.
async fn start(cluster: &mut DevCluster, marker: &Path, shard_groups: u32) -> anyhow::Result<()> {
    let founders: Vec<usize> = (0..FOUNDERS as usize).collect();
    let others: Vec<usize> = (FOUNDERS as usize..cluster.nodes.len()).collect();
    println!(
        "starting {} nodes ({})",
        cluster.nodes.len(),
        cluster.binary.display()
    );
    for &i in &founders {
        cluster.spawn(i)?;
    }
    cluster.wait_grpc(&founders).await?;
    if !marker.exists() {
        cluster.bootstrap(shard_groups).await?;
        fs::write(marker, b"").with_context(|| format!("cannot create {}", marker.display()))?;
    }
    for &i in &others {
        cluster.spawn(i)?;
    }
    cluster.wait_grpc(&others).await?;
    cluster.wait_ready().await
}

fn print_banner(cluster: &DevCluster, dir: &Path) {
    let clients: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| local(n.ports.client))
        .collect();
    let admins: Vec<String> = cluster.nodes.iter().map(|n| local(n.ports.grpc)).collect();
    let clients = clients.join(",");
    let admins = admins.join(",");
    println!();
    println!("Parley dev cluster is up ({} nodes)", cluster.nodes.len());
    println!("  data directory:   {}", dir.display());
    println!("  client endpoints: {clients}");
    println!("  admin endpoints:  {admins}");
    println!("  node logs:        {}/node-<i>.log", dir.display());
    println!();
    println!("Try, in another terminal:");
    println!("  export PARLEY_ENDPOINT={clients}");
    println!("  parley register alice && parley register bob");
    println!("  parley send --as alice bob hello --wait delivered");
    println!("  parley chat --as bob alice");
    println!("  parley status --admin {admins}");
    println!();
    println!(
        "Ctrl-C stops the cluster; `parley dev --dir {}` restarts it.",
        dir.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_layout() {
        assert_eq!(
            node_ports(7100, 1),
            Some(NodePorts {
                grpc: 7100,
                http: 7101,
                client: 7102
            })
        );
        assert_eq!(
            node_ports(7100, 3),
            Some(NodePorts {
                grpc: 7120,
                http: 7121,
                client: 7122
            })
        );
        assert_eq!(node_ports(7100, 0), None);
        assert_eq!(node_ports(65_534, 1), None);
        assert!(node_ports(65_533, 1).is_some());
        assert_eq!(node_ports(65_000, 100), None);
    }

    #[test]
    fn node_command_lines() {
        let node = DevNode {
            id: 4,
            ports: NodePorts {
                grpc: 7130,
                http: 7131,
                client: 7132,
            },
            data_dir: PathBuf::from("/d/node-4"),
            log_path: PathBuf::from("/d/node-4.log"),
            child: None,
        };
        let args = node
            .args(Path::new("/d/token-key.pem"), Some(7100))
            .join(" ");
        assert_eq!(
            args,
            "run --node-id 4 --listen 127.0.0.1:7130 --http 127.0.0.1:7131 \
             --client-listen 127.0.0.1:7132 --data-dir /d/node-4 \
             --token-key-file /d/token-key.pem --join 127.0.0.1:7100"
        );
        let address = node.address();
        assert_eq!(address.client_addr, "127.0.0.1:7132");
        assert_eq!(address.http_addr, "127.0.0.1:7131");
    }

    #[test]
    fn explicit_node_binary_must_exist() {
        assert!(find_node_binary(Some(PathBuf::from("/nonexistent/parley-node"))).is_err());
    }
}
