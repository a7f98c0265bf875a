//! The `parley` command line tool end to end: `parley dev` starts a local cluster, the
//! CLI registers two users and sends a message that the other user's SDK session
//! receives and acknowledges, `parley status` shows the cluster, and Ctrl-C (SIGINT)
//! stops every node cleanly.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use parley_client::{Client, ClientConfig, ClientEvent, Credentials};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `parley` binary next to this test's executable (built by `cargo build --bins`).
fn parley_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|dir| dir.join("parley"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!(
                "no parley binary near {}: cargo build --bins",
                exe.display()
            )
        })
}

/// A base port whose nine ports `parley dev` uses (base+10i+{0,1,2}) are all free now.
fn free_base_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let base = 20_000 + rand::random::<u16>() % 20_000;
        let ports = (0..3u16).flat_map(|i| (0..3u16).map(move |j| base + 10 * i + j));
        let all_free = ports
            .into_iter()
            .all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("no free block of ports found")
}

/// Runs one `parley` command against the dev cluster and returns its stdout.
async fn parley(
    bin: &Path,
    endpoints: &str,
    profiles: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(bin)
            .arg("--endpoint")
            .arg(endpoints)
            .arg("--profile-dir")
            .arg(profiles)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("parley {args:?} timed out"))??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "parley {args:?} failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Reads `dev`'s stdout until the banner says the cluster is up.
async fn wait_until_up(dev: &mut Child) -> anyhow::Result<Vec<String>> {
    let stdout = dev.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let reading = async {
        while let Some(line) = lines.next_line().await? {
            let up = line.contains("Parley dev cluster is up");
            seen.push(line);
            if up {
                return Ok::<_, anyhow::Error>(true);
            }
        }
        Ok(false)
    };
    let up = tokio::time::timeout(Duration::from_secs(90), reading)
        .await
        .map_err(|_| anyhow!("cluster not up within 90 s; output: {seen:?}"))??;
    ensure!(up, "parley dev exited before the cluster was up");
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_dev_runs_a_cluster_that_the_cli_chats_through_and_ctrl_c_stops(
) -> anyhow::Result<()> {
    let bin = parley_binary()?;
    let dir = tempfile::tempdir()?;
    let base = free_base_port()?;
    let started = Instant::now();
    let mut dev = Command::new(&bin)
        .args(["dev", "--base-port", &base.to_string(), "--dir"])
        .arg(dir.path().join("cluster"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting parley dev")?;
    wait_until_up(&mut dev).await?;
    println!(
        "parley dev: cluster up in {} ms",
        started.elapsed().as_millis()
    );

    let endpoints = (0..3u16)
        .map(|i| format!("127.0.0.1:{}", base + 10 * i + 2))
        .collect::<Vec<_>>();
    let joined = endpoints.join(",");
    let profiles = dir.path().join("profiles");
    let out = parley(&bin, &joined, &profiles, &["register", "alice"]).await?;
    ensure!(
        out.contains("registered user alice"),
        "register said: {out}"
    );
    parley(&bin, &joined, &profiles, &["register", "bob"]).await?;

    // Bob is online through the SDK with the credentials the CLI saved.
    let bob: Credentials = serde_json::from_str(
        &std::fs::read_to_string(profiles.join("bob.json")).context("bob's saved credentials")?,
    )?;
    let (bob_client, mut bob_events) =
        Client::connect(ClientConfig::new(endpoints.clone()), bob).await?;
    // Bob's app takes what arrives (which acknowledges delivery, for alice's double tick).
    let bob_inbox = tokio::spawn(async move {
        while let Some(e) = bob_events.recv().await {
            if let ClientEvent::Message(m) = e {
                return Some(m);
            }
        }
        None
    });

    let out = parley(
        &bin,
        &joined,
        &profiles,
        &[
            "send",
            "--as",
            "alice",
            "bob",
            "hello",
            "bob",
            "--wait",
            "delivered",
        ],
    )
    .await?;
    ensure!(
        out.contains("sent seq=1 conversation=dm:alice:bob") && out.contains("delivered seq=1"),
        "send said: {out}"
    );
    let got = tokio::time::timeout(Duration::from_secs(10), bob_inbox)
        .await??
        .context("bob's session ended")?;
    assert_eq!((got.seq, got.sender.as_str()), (1, "alice"));
    assert_eq!(got.body, b"hello bob");
    bob_client.close().await;

    let admin = (0..3u16)
        .map(|i| format!("127.0.0.1:{}", base + 10 * i))
        .collect::<Vec<_>>()
        .join(",");
    let status = parley(&bin, &joined, &profiles, &["status", "--admin", &admin]).await?;
    ensure!(!status.trim().is_empty(), "status printed nothing");

    // Ctrl-C: every node stops and `parley dev` exits successfully.
    let pid = dev.id().context("parley dev has no pid")?;
    kill(Pid::from_raw(pid as i32), Signal::SIGINT)?;
    let exit = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .context("parley dev did not exit within 30 s of Ctrl-C")??;
    assert!(exit.success(), "parley dev exited with {exit}");
    for i in 0..3u16 {
        let port = base + 10 * i + 2;
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "node {} still listening on {port} after Ctrl-C",
            i + 1
        );
    }
    Ok(())
}
