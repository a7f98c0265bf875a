//! Coalesces concurrent proposals to a group this node leads into batch log entries.
//!
//! Every proposal would otherwise be its own Raft entry: its own log record on three
//! replicas, its own bookkeeping in openraft, its own pass through `apply`. Under load
//! many proposals for the same group arrive together, so each group the node leads has
//! a queue and a task that turns whatever is queued into one [`Command::Batch`] entry.
//! The task never waits for more to arrive: a proposal on an idle group goes out alone
//! at once. Batches form from backpressure instead: at most [`IN_FLIGHT_BATCHES`] are
//! uncommitted at a time, and what queues meanwhile becomes the next batch.
//!
//! Proposals enter openraft in queue order (the task hands each batch over before
//! forming the next), so two proposals from one caller keep their order in the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::ClientWriteError;
use openraft::impls::ProgressResponder;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::placement::GroupId;
use crate::types::{Command, CommandResponse, GroupRaft, TypeConfig};

/// Uncommitted batches per group; more proposals wait and join the next batch.
pub const IN_FLIGHT_BATCHES: usize = 2;
/// Most commands in one batch entry.
const MAX_BATCH_COMMANDS: usize = 512;
/// A batch stops growing once its payloads reach this many bytes (one command larger
/// than this still goes out, alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

type Reply = oneshot::Sender<Result<CommandResponse, ApiError>>;

struct Proposal {
    cmd: Command,
    bytes: usize,
    reply: Reply,
}

/// The proposal queues of the groups this node leads or led.
pub struct Proposer {
    metrics: Arc<Metrics>,
    queues: Mutex<HashMap<GroupId, mpsc::UnboundedSender<Proposal>>>,
}

/// Whether `cmd` may share a log entry with others (metadata and slot assignments go
/// alone: they are rare, and their effects are watched per entry).
pub fn is_batchable(cmd: &Command) -> bool {
    matches!(cmd, Command::Append(_) | Command::Messaging { .. })
}

fn size_of(cmd: &Command) -> usize {
    match cmd {
        Command::Append(a) => {
            a.payload.len() + a.conversation.len() + a.sender.len() + a.client_msg_id.len()
        }
        _ => 64,
    }
}

/// The API error for a write openraft refused.
pub fn write_error(group: GroupId, e: ClientWriteError<TypeConfig>) -> ApiError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ApiError::NotLeader {
            group,
            leader: f.leader_id,
        },
        other => ApiError::Unavailable(format!("group {group}: {other}")),
    }
}

impl Proposer {
    pub fn new(metrics: Arc<Metrics>) -> Proposer {
        Proposer {
            metrics,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Proposes `cmd` (batchable) through `raft`'s queue and waits until it is applied.
    pub async fn propose(
        &self,
        group: GroupId,
        raft: &GroupRaft,
        cmd: Command,
    ) -> Result<CommandResponse, ApiError> {
        let (tx, rx) = oneshot::channel();
        let proposal = Proposal {
            bytes: size_of(&cmd),
            cmd,
            reply: tx,
        };
        self.queue(group, raft)
            .send(proposal)
            .map_err(|_| ApiError::Unavailable(format!("group {group}: proposer stopped")))?;
        rx.await
            .map_err(|_| ApiError::Unavailable(format!("group {group}: replica stopped")))?
    }

    /// The queue of `group`, with a task started for `raft` if there is none (or the
    /// previous one stopped with its replica).
    fn queue(&self, group: GroupId, raft: &GroupRaft) -> mpsc::UnboundedSender<Proposal> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(&group) {
            if !q.is_closed() {
                return q.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(group, raft.clone(), rx, self.metrics.clone()));
        queues.insert(group, tx.clone());
        tx
    }

    /// Forgets the queue of a group whose replica left this node.
    pub fn forget(&self, group: GroupId) {
        if let Ok(mut queues) = self.queues.lock() {
            queues.remove(&group);
        }
    }
}

/// Turns the queue of one group into batch entries until the replica stops.
async fn run(
    group: GroupId,
    raft: GroupRaft,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    metrics: Arc<Metrics>,
) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT_BATCHES));
    while let Some(first) = rx.recv().await {
        // While earlier batches are uncommitted, later proposals queue up behind this one.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        metrics.proposal_batch.observe(batch.len() as f64);
        let (cmds, replies): (Vec<Command>, Vec<Reply>) =
            batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        let single = cmds.len() == 1;
        let cmd = if single {
            cmds.into_iter()
                .next()
                .unwrap_or(Command::Batch(Vec::new()))
        } else {
            Command::Batch(cmds)
        };
        let (responder, done) = ProgressResponder::<TypeConfig, _>::complete_only();
        if raft.client_write_ff(cmd, Some(responder)).await.is_err() {
            for r in replies {
                let _ = r.send(Err(ApiError::Unavailable(format!(
                    "group {group}: replica stopped"
                ))));
            }
            break;
        }
        tokio::spawn(async move {
            let result = done.await;
            drop(permit);
            let outcome = match result {
                Err(_) => Err(ApiError::Unavailable(format!(
                    "group {group}: replica stopped"
                ))),
                Ok(Err(e)) => Err(write_error(group, e)),
                Ok(Ok(resp)) => Ok(resp.data),
            };
            match outcome {
                Ok(resp) if single => {
                    if let Some(r) = replies.into_iter().next() {
                        let _ = r.send(Ok(resp));
                    }
                }
                Ok(CommandResponse::Batch(responses)) if responses.len() == replies.len() => {
                    for (r, resp) in replies.into_iter().zip(responses) {
                        let _ = r.send(Ok(resp));
                    }
                }
                Ok(other) => {
                    let e = ApiError::Internal(format!(
                        "group {group}: unexpected reply to a batch: {other:?}"
                    ));
                    for r in replies {
                        let _ = r.send(Err(e.clone()));
                    }
                }
                Err(e) => {
                    for r in replies {
                        let _ = r.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
