//! Incoming message bookkeeping: de-duplication by sequence number and coalescing of
//! delivery acknowledgements (no I/O).

use std::collections::HashMap;

/// What to do with an incoming message, decided by [`SeqTracker::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Hand it to the application: it follows the previous one.
    Deliver,
    /// Hand it to the application, but messages between the previous one and this one
    /// never arrived (`missing` of them).
    DeliverAfterGap {
        /// How many sequence numbers were skipped.
        missing: u64,
    },
    /// Drop it: a message with this sequence number was already handed over.
    Duplicate,
}

/// The highest sequence number handed to the application, per conversation.
#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    highest: HashMap<String, u64>,
}

impl SeqTracker {
    /// Decides about message `seq` of `conversation_id` and, unless it is a duplicate,
    /// records it as handed over. The first message seen of a conversation is never a
    /// gap: earlier ones may have been acknowledged before this client started.
    pub fn admit(&mut self, conversation_id: &str, seq: u64) -> Admission {
        match self.highest.get_mut(conversation_id) {
            Some(highest) if seq <= *highest => Admission::Duplicate,
            Some(highest) => {
                let missing = seq - *highest - 1;
                *highest = seq;
                if missing == 0 {
                    Admission::Deliver
                } else {
                    Admission::DeliverAfterGap { missing }
                }
            }
            None => {
                self.highest.insert(conversation_id.to_owned(), seq);
                Admission::Deliver
            }
        }
    }

    /// The highest sequence number handed over in a conversation (0: none).
    pub fn highest(&self, conversation_id: &str) -> u64 {
        self.highest.get(conversation_id).copied().unwrap_or(0)
    }
}

/// Delivery acknowledgements waiting to be sent: the highest sequence number per
/// conversation, so one `Ack` covers any number of messages.
#[derive(Debug, Default, Clone)]
pub struct AckCoalescer {
    pending: HashMap<String, u64>,
}

impl AckCoalescer {
    /// Records that everything up to `seq` in a conversation may be acknowledged.
    pub fn record(&mut self, conversation_id: &str, seq: u64) {
        match self.pending.get_mut(conversation_id) {
            Some(highest) => *highest = (*highest).max(seq),
            None => {
                self.pending.insert(conversation_id.to_owned(), seq);
            }
        }
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Takes every waiting acknowledgement as `(conversation_id, delivered_seq)`, sorted
    /// by conversation.
    pub fn take(&mut self) -> Vec<(String, u64)> {
        let mut acks: Vec<(String, u64)> = self.pending.drain().collect();
        acks.sort();
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_dropped_and_gaps_reported() {
        let mut t = SeqTracker::default();
        assert_eq!(t.highest("c"), 0);
        // The first message seen may start anywhere.
        assert_eq!(t.admit("c", 5), Admission::Deliver);
        assert_eq!(t.admit("c", 6), Admission::Deliver);
        assert_eq!(t.admit("c", 6), Admission::Duplicate);
        assert_eq!(t.admit("c", 2), Admission::Duplicate);
        assert_eq!(t.admit("c", 9), Admission::DeliverAfterGap { missing: 2 });
        assert_eq!(t.admit("c", 8), Admission::Duplicate);
        assert_eq!(t.highest("c"), 9);
        // Conversations are independent.
        assert_eq!(t.admit("d", 1), Admission::Deliver);
        assert_eq!(t.admit("d", 2), Admission::Deliver);
        assert_eq!(t.highest("c"), 9);
    }

    #[test]
    fn acks_coalesce_to_the_highest_seq_per_conversation() {
        let mut a = AckCoalescer::default();
        assert!(a.is_empty());
        a.record("dm:a:b", 3);
        a.record("dm:a:b", 7);
        a.record("dm:a:b", 5);
        a.record("dm:a:c", 1);
        assert!(!a.is_empty());
        assert_eq!(
            a.take(),
            vec![("dm:a:b".to_owned(), 7), ("dm:a:c".to_owned(), 1)]
        );
        assert!(a.is_empty());
        assert!(a.take().is_empty());
        a.record("dm:a:b", 2);
        assert_eq!(a.take(), vec![("dm:a:b".to_owned(), 2)]);
    }
}
