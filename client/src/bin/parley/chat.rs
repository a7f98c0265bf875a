//! `parley chat`: a line-oriented interactive conversation with ticks.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use parley_client::proto::{Message, Receipt};
use parley_client::{dm_conversation_id, Client, ClientEvent};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::commands;
use crate::Context;

/// Messages of history shown when the chat starts.
const HISTORY: u32 = 20;

/// How far one of the user's own messages got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tick {
    /// Committed by the server.
    Sent,
    /// On the peer's device.
    Delivered,
    /// Read by the peer.
    Read,
}

/// What the chat has shown and the ticks of the user's own messages.
struct ChatView {
    me: String,
    conversation_id: String,
    shown: BTreeSet<u64>,
    own: BTreeMap<u64, Tick>,
    /// Highest seq of the peer's messages shown (what to mark read).
    peer_highest: u64,
}

impl ChatView {
    fn new(me: &str, peer: &str) -> Self {
        Self {
            me: me.to_owned(),
            conversation_id: dm_conversation_id(me, peer),
            shown: BTreeSet::new(),
            own: BTreeMap::new(),
            peer_highest: 0,
        }
    }

    /// The line for a message of this conversation, or `None` if it was shown already.
    fn show(&mut self, message: &Message) -> Option<String> {
        if !self.shown.insert(message.seq) {
            return None;
        }
        let mine = message.sender == self.me;
        if mine {
            self.own.entry(message.seq).or_insert(Tick::Sent);
        } else {
            self.peer_highest = self.peer_highest.max(message.seq);
        }
        let who = if mine { "you" } else { message.sender.as_str() };
        Some(format!(
            "[{}] #{} {who}: {}{}",
            clock(message.server_time_ms),
            message.seq,
            String::from_utf8_lossy(&message.body),
            if mine { " ✓" } else { "" }
        ))
    }

    /// Lines for the ticks a receipt adds to the user's own messages.
    fn receipt(&mut self, receipt: &Receipt) -> Vec<String> {
        let mut delivered = Vec::new();
        let mut read = Vec::new();
        for (&seq, tick) in self.own.iter_mut() {
            if seq <= receipt.read_seq && *tick < Tick::Read {
                *tick = Tick::Read;
                read.push(seq);
            } else if seq <= receipt.delivered_seq && *tick < Tick::Delivered {
                *tick = Tick::Delivered;
                delivered.push(seq);
            }
        }
        let mut lines = Vec::new();
        for (seqs, what) in [(delivered, "delivered"), (read, "read")] {
            if !seqs.is_empty() {
                lines.push(format!("  {} ✓✓ {what}", describe_seqs(&seqs)));
            }
        }
        lines
    }
}

/// `seq 5`, or `seqs 3, 4, 5`.
fn describe_seqs(seqs: &[u64]) -> String {
    match seqs {
        [one] => format!("seq {one}"),
        _ => {
            let list: Vec<String> = seqs.iter().map(u64::to_string).collect();
            format!("seqs {}", list.join(", "))
        }
    }
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Marks the peer's messages read up to `seq`, in the background.
fn mark_read(client: &Client, conversation_id: &str, seq: u64) {
    let client = client.clone();
    let conversation_id = conversation_id.to_owned();
    tokio::spawn(async move {
        if let Err(e) = client.mark_read(&conversation_id, seq).await {
            eprintln!("  (could not mark seq {seq} read: {e})");
        }
    });
}

/// Runs the chat until end of input or `/quit`.
pub async fn run(ctx: &Context, me: &str, peer: &str) -> anyhow::Result<()> {
    let (client, mut events) = commands::connect(ctx, me, true).await?;
    let before = client.credentials();
    let mut view = ChatView::new(me, peer);
    let conversation_id = view.conversation_id.clone();

    match recent_history(&client, &conversation_id).await {
        Ok(messages) => {
            for message in &messages {
                if let Some(line) = view.show(message) {
                    println!("{line}");
                }
            }
        }
        Err(e) => eprintln!("  (no history: {e:#})"),
    }
    if view.peer_highest > 0 {
        mark_read(&client, &conversation_id, view.peer_highest);
    }
    println!(
        "--- chatting with {peer} as {me}: type a line to send it; /quit or Ctrl-D to leave ---"
    );

    let mut input = BufReader::new(tokio::io::stdin()).lines();
    let result: anyhow::Result<()> = loop {
        tokio::select! {
            line = input.next_line() => {
                let line = match line.context("cannot read standard input") {
                    Ok(Some(line)) => line,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
                let text = line.trim_end();
                if text == "/quit" {
                    break Ok(());
                }
                if text.is_empty() {
                    continue;
                }
                match client.send_text(peer, text).await {
                    Ok(sent) => {
                        let echo = Message {
                            conversation_id: sent.conversation_id,
                            seq: sent.seq,
                            sender: me.to_owned(),
                            client_msg_id: String::new(),
                            server_time_ms: sent.server_time_ms,
                            body: text.as_bytes().to_vec(),
                        };
                        if let Some(line) = view.show(&echo) {
                            println!("{line}");
                        }
                    }
                    Err(e) => eprintln!("  (not sent: {e})"),
                }
            }
            event = events.recv() => {
                let Some(event) = event else {
                    break Err(anyhow::anyhow!("the client stopped"));
                };
                match event {
                    ClientEvent::Message(message) if message.conversation_id == conversation_id => {
                        if let Some(line) = view.show(&message) {
                            println!("{line}");
                            if message.sender != me {
                                mark_read(&client, &conversation_id, message.seq);
                            }
                        }
                    }
                    ClientEvent::Message(message) => println!(
                        "  (new message from {} in {})",
                        message.sender, message.conversation_id
                    ),
                    ClientEvent::Receipt(receipt) if receipt.conversation_id == conversation_id => {
                        for line in view.receipt(&receipt) {
                            println!("{line}");
                        }
                    }
                    ClientEvent::Receipt(_) => {}
                    ClientEvent::Connected { home_node, node_endpoint } => {
                        println!("-- connected to {node_endpoint} (home node {home_node})");
                    }
                    ClientEvent::Disconnected { reason } => {
                        println!("-- disconnected ({reason}); reconnecting");
                    }
                    ClientEvent::SyncComplete { .. } => {}
                }
            }
        }
    };
    commands::save_if_refreshed(ctx, &before, &client)?;
    client.close().await;
    result
}

/// The last [`HISTORY`] messages of a conversation, oldest first.
async fn recent_history(client: &Client, conversation_id: &str) -> anyhow::Result<Vec<Message>> {
    let head = client.fetch(conversation_id, 1, 1).await?;
    if head.last_seq == 0 {
        return Ok(Vec::new());
    }
    let from = head.last_seq.saturating_sub(u64::from(HISTORY) - 1).max(1);
    Ok(client.fetch(conversation_id, from, HISTORY).await?.messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, sender: &str) -> Message {
        Message {
            conversation_id: "dm:alice:bob".into(),
            seq,
            sender: sender.into(),
            client_msg_id: String::new(),
            server_time_ms: 3_723_000,
            body: b"hi".to_vec(),
        }
    }

    fn receipt(delivered_seq: u64, read_seq: u64) -> Receipt {
        Receipt {
            conversation_id: "dm:alice:bob".into(),
            user_id: "bob".into(),
            delivered_seq,
            read_seq,
        }
    }

    #[test]
    fn clock_formats_utc() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock(3_723_000), "01:02:03");
        assert_eq!(clock(86_400_000 + 59_000), "00:00:59");
    }

    #[test]
    fn messages_show_once_and_track_the_peer() {
        let mut view = ChatView::new("alice", "bob");
        assert_eq!(
            view.show(&message(1, "bob")).as_deref(),
            Some("[01:02:03] #1 bob: hi")
        );
        assert_eq!(view.show(&message(1, "bob")), None);
        assert_eq!(
            view.show(&message(2, "alice")).as_deref(),
            Some("[01:02:03] #2 you: hi ✓")
        );
        assert_eq!(view.peer_highest, 1);
    }

    #[test]
    fn receipts_tick_own_messages_once() {
        let mut view = ChatView::new("alice", "bob");
        for seq in 1..=3 {
            view.show(&message(seq, "alice"));
        }
        view.show(&message(4, "bob"));
        assert_eq!(
            view.receipt(&receipt(2, 0)),
            vec!["  seqs 1, 2 ✓✓ delivered"]
        );
        assert!(view.receipt(&receipt(2, 0)).is_empty());
        assert_eq!(
            view.receipt(&receipt(3, 1)),
            vec!["  seq 3 ✓✓ delivered", "  seq 1 ✓✓ read"]
        );
        assert_eq!(view.receipt(&receipt(4, 4)), vec!["  seqs 2, 3 ✓✓ read"]);
    }
}
