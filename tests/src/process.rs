//! Child processes that cannot outlive the process that started them, and free
//! loopback ports to give them.
//!
//! [`LocalCluster`](crate::LocalCluster) kills its nodes when dropped, but `Drop`
//! does not run when the test binary itself is killed (a harness timeout, an
//! abort). As a second line of defence every child started through
//! [`spawn_tied`] asks the kernel for `SIGKILL` when its parent goes away
//! (`PR_SET_PDEATHSIG`). The kernel ties that to the *thread* that forked, so
//! all children are forked from one dedicated thread that lives as long as the
//! process.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread;

use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};

/// A spawn request for the spawner thread and where to send its outcome.
type SpawnJob = (Command, mpsc::Sender<io::Result<Child>>);

/// The spawner thread's queue; created on first use and never closed.
static SPAWNER: Mutex<Option<mpsc::Sender<SpawnJob>>> = Mutex::new(None);

/// Spawns `command` so that the kernel kills the child with `SIGKILL` if this
/// process dies, even without unwinding.
///
/// Standard streams are whatever `command` configures; the child stays in this
/// process's process group, so Ctrl-C in a terminal reaches it too.
pub fn spawn_tied(mut command: Command) -> io::Result<Child> {
    let parent = getpid();
    // SAFETY: the closure runs between fork and exec in the child; it only makes
    // the async-signal-safe prctl(2) and getppid(2) system calls and allocates
    // nothing on the success path.
    unsafe {
        command.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The parent may have died between fork and prctl; then the signal
            // would never come.
            if getppid() != parent {
                return Err(io::Error::other("parent exited before the child started"));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()?
        .send((command, reply_tx))
        .map_err(|_| io::Error::other("the process spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the process spawner thread dropped a request"))?
}

/// The queue of the long-lived spawner thread, starting the thread on first use.
fn spawner() -> io::Result<mpsc::Sender<SpawnJob>> {
    let mut slot = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(sender) = slot.as_ref() {
        return Ok(sender.clone());
    }
    let (sender, jobs) = mpsc::channel::<SpawnJob>();
    thread::Builder::new()
        .name("parley-testkit-spawner".into())
        .spawn(move || {
            for (mut command, reply) in jobs {
                // The requester may have given up waiting; nothing to do then.
                let _ = reply.send(command.spawn());
            }
        })?;
    *slot = Some(sender.clone());
    Ok(sender)
}

/// Finds `count` distinct TCP ports on 127.0.0.1 that are free right now.
///
/// All listeners are held until every port is chosen, so the ports are
/// distinct; another process may still take one before the caller binds it.
pub fn free_loopback_ports(count: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|addr| addr.port()))
        .collect()
}

/// The last `lines` lines of a log file, headed by its path, for error
/// messages; a note instead if it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            format!(
                "last lines of {}:\n{}",
                path.display(),
                all[start..].join("\n")
            )
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::process::Stdio;

    #[test]
    fn free_ports_are_distinct_and_nonzero() -> io::Result<()> {
        let ports = free_loopback_ports(16)?;
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), 16);
        assert!(ports.iter().all(|&port| port != 0));
        Ok(())
    }

    #[test]
    fn log_tail_keeps_the_last_lines() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.log");
        fs::write(&path, "one\ntwo\nthree\n")?;
        assert!(log_tail(&path, 2).ends_with(":\ntwo\nthree"));
        assert!(log_tail(&dir.path().join("missing.log"), 2).starts_with("(cannot read"));
        Ok(())
    }

    #[test]
    fn spawn_tied_runs_the_command() -> io::Result<()> {
        let mut command = Command::new("true");
        command.stdin(Stdio::null());
        let status = spawn_tied(command)?.wait()?;
        assert!(status.success());
        Ok(())
    }

    #[test]
    fn spawn_tied_reports_a_missing_binary() {
        let result = spawn_tied(Command::new("/nonexistent/parley-testkit-binary"));
        assert!(result.is_err());
    }
}
