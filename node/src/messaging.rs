//! 1:1 messaging: sending, delivery and read cursors, history, and what a syncing
//! device needs, on top of the replicated conversation log and messaging state.
//!
//! A 1:1 conversation's id is derived from its two members (`dm:<a>:<b>`, ids in byte
//! order), so membership needs no lookup. Before the first message of a conversation
//! this node has seen, the conversation is recorded in both members' conversation
//! indexes (idempotent), so it is in the recipient's index before any message of it is
//! acknowledged: a reconnecting device always finds it.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use parley_proto::node::v1::{AppendRequest, ReadRequest};
use parley_proto::v1::{event, CursorSet, ErrorCode, Event, History, Message, Receipt, Send, Sent};

use crate::accounts::{validate_name, Accounts};
use crate::client_error::ClientError;
use crate::conversation::{ConversationService, MAX_ID_BYTES, MAX_READ_LIMIT};
use crate::delivery::Delivery;
use crate::messaging_state::{
    MemberCursors, MessagingOp, MessagingQuery, MessagingResponse, QueryResult,
};
use crate::metrics::Metrics;

/// Conversations remembered as indexed before the set is cleared (and rebuilt lazily).
const INDEXED_LIMIT: usize = 1_000_000;

/// The 1:1 conversation id of two users.
pub fn dm_conversation(a: &str, b: &str) -> String {
    if a <= b {
        format!("dm:{a}:{b}")
    } else {
        format!("dm:{b}:{a}")
    }
}

/// The other member of a 1:1 conversation `user` belongs to.
pub fn peer_in(conversation: &str, user: &str) -> Result<String, ClientError> {
    let not_member = || {
        ClientError::new(
            ErrorCode::NotMember,
            format!("{user} is not a member of {conversation}"),
        )
    };
    let rest = conversation.strip_prefix("dm:").ok_or_else(not_member)?;
    let (a, b) = rest.split_once(':').ok_or_else(not_member)?;
    if dm_conversation(a, b) != conversation {
        return Err(not_member());
    }
    match (a == user, b == user) {
        (true, _) => Ok(b.into()),
        (_, true) => Ok(a.into()),
        _ => Err(not_member()),
    }
}

/// What a syncing device needs to know about one conversation.
#[derive(Debug, Clone)]
pub struct ConversationSync {
    pub conversation: String,
    pub peer: String,
    pub last_seq: u64,
    pub device_delivered: u64,
    pub peer_cursors: MemberCursors,
}

/// Messaging operations of authenticated users.
pub struct Messaging {
    log: Arc<ConversationService>,
    accounts: Arc<Accounts>,
    delivery: Arc<Delivery>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    indexed: Mutex<HashSet<String>>,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl Messaging {
    pub fn new(
        log: Arc<ConversationService>,
        accounts: Arc<Accounts>,
        delivery: Arc<Delivery>,
        rate_per_s: u32,
        burst: u32,
    ) -> Arc<Messaging> {
        let per_s = NonZeroU32::new(rate_per_s).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(per_s);
        let config = &log.cluster.config;
        Arc::new(Messaging {
            metrics: log.cluster.metrics.clone(),
            max_payload: config.max_payload_bytes,
            log,
            accounts,
            delivery,
            indexed: Mutex::new(HashSet::new()),
            limiter: RateLimiter::dashmap(Quota::per_second(per_s).allow_burst(burst)),
        })
    }

    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    /// Forgets idle rate-limiter buckets; called periodically.
    pub fn trim_rate_limits(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    fn rate_limit(&self, user: &str) -> Result<(), ClientError> {
        match self.limiter.check_key(&user.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(ClientError {
                    code: ErrorCode::RateLimited,
                    message: format!("{user} is sending too fast"),
                    retry_after_ms: (wait.as_millis() as u64).max(1),
                })
            }
        }
    }

    /// Records the conversation in both members' indexes unless known done.
    async fn ensure_indexed(
        &self,
        conversation: &str,
        user: &str,
        peer: &str,
    ) -> Result<(), ClientError> {
        if self
            .indexed
            .lock()
            .map(|s| s.contains(conversation))
            .unwrap_or(false)
        {
            return Ok(());
        }
        if self.accounts.user(peer).await?.is_none() {
            return Err(ClientError::new(
                ErrorCode::UnknownUser,
                format!("no user {peer}"),
            ));
        }
        let add = |who: &str, other: &str| MessagingOp::AddConversation {
            user: who.into(),
            conversation: conversation.into(),
            peer: other.into(),
        };
        let (mine, theirs) = (add(user, peer), add(peer, user));
        let (a, b) = tokio::join!(
            self.log.propose(user, &mine),
            self.log.propose(peer, &theirs),
        );
        a?;
        b?;
        if let Ok(mut s) = self.indexed.lock() {
            if s.len() >= INDEXED_LIMIT {
                s.clear();
            }
            s.insert(conversation.into());
        }
        Ok(())
    }

    /// Sends a 1:1 message; answers once it is committed, then pushes it to the recipient.
    pub async fn send(&self, user: &str, req: Send) -> Result<Sent, ClientError> {
        if req.client_msg_id.is_empty() || req.client_msg_id.len() > MAX_ID_BYTES {
            return Err(ClientError::invalid(format!(
                "client_msg_id must be 1-{MAX_ID_BYTES} bytes"
            )));
        }
        validate_name("recipient", &req.recipient)?;
        if req.recipient == user {
            return Err(ClientError::invalid("cannot send to oneself"));
        }
        if req.body.len() > self.max_payload {
            return Err(ClientError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "body of {} bytes exceeds the limit of {} bytes",
                    req.body.len(),
                    self.max_payload
                ),
            ));
        }
        self.rate_limit(user)?;
        let conversation = dm_conversation(user, &req.recipient);
        self.ensure_indexed(&conversation, user, &req.recipient)
            .await?;
        let reply = self
            .log
            .append_entry(AppendRequest {
                conversation_id: conversation.clone(),
                sender: user.into(),
                client_msg_id: req.client_msg_id.clone(),
                payload: req.body.clone(),
                hops: 0,
            })
            .await?;
        let committed = Instant::now();
        if !reply.duplicate {
            self.metrics
                .messages_total
                .with_label_values(&["sent"])
                .inc();
        }
        let event = Event {
            kind: Some(event::Kind::Message(Message {
                conversation_id: conversation.clone(),
                seq: reply.seq,
                sender: user.into(),
                client_msg_id: req.client_msg_id,
                server_time_ms: reply.server_time_ms,
                body: req.body,
            })),
        };
        let delivery = self.delivery.clone();
        let metrics = self.metrics.clone();
        let recipient = req.recipient;
        tokio::spawn(async move {
            let sessions = delivery.push(&recipient, vec![event], "").await;
            if sessions == 0 {
                metrics.offline_messages_total.inc();
            } else {
                metrics
                    .delivery_seconds
                    .observe(committed.elapsed().as_secs_f64());
            }
        });
        Ok(Sent {
            conversation_id: conversation,
            seq: reply.seq,
            server_time_ms: reply.server_time_ms,
            duplicate: reply.duplicate,
        })
    }

    /// Moves this device's delivered cursor and, with `read`, the user's read cursor;
    /// tells the other member when the user's cursors moved.
    pub async fn set_cursor(
        &self,
        user: &str,
        device: &str,
        conversation: &str,
        delivered: u64,
        read: u64,
    ) -> Result<CursorSet, ClientError> {
        let peer = peer_in(conversation, user)?;
        let op = MessagingOp::SetCursor {
            conversation: conversation.into(),
            user: user.into(),
            device: device.into(),
            delivered,
            read,
        };
        let (previous, member) = match self.log.propose(conversation, &op).await? {
            MessagingResponse::Cursors {
                previous, member, ..
            } => (previous, member),
            other => {
                return Err(ClientError::new(
                    ErrorCode::Internal,
                    format!("unexpected reply to a cursor update: {other:?}"),
                ))
            }
        };
        if member != previous {
            self.metrics
                .messages_total
                .with_label_values(&["delivered"])
                .inc_by(member.delivered - previous.delivered);
            self.metrics
                .messages_total
                .with_label_values(&["read"])
                .inc_by(member.read - previous.read);
            let shares = self.accounts.read_receipts(user).await.unwrap_or(false);
            let receipt = Event {
                kind: Some(event::Kind::Receipt(Receipt {
                    conversation_id: conversation.into(),
                    user_id: user.into(),
                    delivered_seq: member.delivered,
                    read_seq: if shares { member.read } else { 0 },
                })),
            };
            let delivery = self.delivery.clone();
            tokio::spawn(async move {
                delivery.push(&peer, vec![receipt], "").await;
            });
        }
        Ok(CursorSet {
            conversation_id: conversation.into(),
            delivered_seq: member.delivered,
            read_seq: member.read,
        })
    }

    /// A conversation's history for one of its members.
    pub async fn fetch(
        &self,
        user: &str,
        conversation: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<History, ClientError> {
        peer_in(conversation, user)?;
        let limit = limit.clamp(1, MAX_READ_LIMIT);
        let (messages, last_seq) = self.read(conversation, from_seq, limit).await?;
        Ok(History {
            conversation_id: conversation.into(),
            messages,
            last_seq,
        })
    }

    /// Messages `from_seq..` (at most `limit`) and the conversation's last seq.
    pub async fn read(
        &self,
        conversation: &str,
        from_seq: u64,
        limit: u32,
    ) -> Result<(Vec<Message>, u64), ClientError> {
        let reply = self
            .log
            .read_entries(ReadRequest {
                conversation_id: conversation.into(),
                from_seq,
                limit,
                hops: 0,
            })
            .await?;
        let messages = reply
            .entries
            .into_iter()
            .map(|e| Message {
                conversation_id: conversation.into(),
                seq: e.seq,
                sender: e.sender,
                client_msg_id: e.client_msg_id,
                server_time_ms: e.server_time_ms,
                body: e.payload,
            })
            .collect();
        Ok((messages, reply.last_seq))
    }

    /// The state of one conversation for a device of one of its members.
    pub async fn conversation_sync(
        &self,
        conversation: &str,
        peer: &str,
        user: &str,
        device: &str,
    ) -> Result<ConversationSync, ClientError> {
        let q = MessagingQuery::ConversationState {
            conversation: conversation.into(),
            user: user.into(),
            device: device.into(),
        };
        match self.log.query(conversation, &q).await? {
            QueryResult::ConversationState {
                last_seq,
                members,
                device_delivered,
            } => Ok(ConversationSync {
                conversation: conversation.into(),
                peer: peer.into(),
                last_seq,
                device_delivered,
                peer_cursors: members
                    .into_iter()
                    .find(|(m, _)| m == peer)
                    .map(|(_, c)| c)
                    .unwrap_or_default(),
            }),
            other => Err(ClientError::new(
                ErrorCode::Internal,
                format!("unexpected reply to a conversation query: {other:?}"),
            )),
        }
    }

    /// The user's conversations and their peers.
    pub async fn conversations(&self, user: &str) -> Result<Vec<(String, String)>, ClientError> {
        let q = MessagingQuery::Conversations { user: user.into() };
        match self.log.query(user, &q).await? {
            QueryResult::Conversations(list) => Ok(list),
            other => Err(ClientError::new(
                ErrorCode::Internal,
                format!("unexpected reply to a conversations query: {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_ids_are_symmetric_and_membership_is_exact() {
        assert_eq!(dm_conversation("bob", "alice"), "dm:alice:bob");
        assert_eq!(dm_conversation("alice", "bob"), "dm:alice:bob");
        assert_eq!(peer_in("dm:alice:bob", "alice").expect("member"), "bob");
        assert_eq!(peer_in("dm:alice:bob", "bob").expect("member"), "alice");
        for (conv, user) in [
            ("dm:alice:bob", "carol"),
            ("dm:bob:alice", "alice"),
            ("group:x", "alice"),
            ("dm:alice", "alice"),
            ("", "alice"),
        ] {
            let e = peer_in(conv, user).expect_err(conv);
            assert_eq!(e.code, ErrorCode::NotMember, "{conv}");
        }
    }
}
