//! The retained message index: one message per topic, answered locally for any filter.
//!
//! API boundary: [`RetainedStore::set`] resolves when the write is durable (replicated, in a
//! cluster); reads ([`RetainedStore::matching`]) are local, because every node applies every
//! retained write to its own index.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::message::Message;
use crate::StoreError;

/// Caps on the retained index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Maximum number of retained topics (0 = none allowed).
    pub max_messages: usize,
    /// Maximum total bytes (see [`Message::weight`]).
    pub max_bytes: usize,
    /// Maximum payload of one retained message.
    pub max_payload: usize,
}

/// What happened to a retained write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainOutcome {
    /// Stored or replaced.
    Stored,
    /// Empty payload: the topic's retained message is gone (or there was none).
    Deleted,
    /// Refused by a cap; the message is still delivered to live subscribers.
    Refused,
}

/// Durable retained messages.
#[async_trait]
pub trait RetainedStore: Send + Sync + 'static {
    /// Stores `message` as the topic's retained message; an empty payload deletes it.
    async fn set(&self, message: Arc<Message>) -> Result<RetainOutcome, StoreError>;
    /// Every unexpired retained message whose topic matches `filter`.
    fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>>;
    /// Number of retained topics.
    fn count(&self) -> usize;
    /// Bytes held.
    fn bytes(&self) -> usize;
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    value: Option<Arc<Message>>,
}

fn walk_mut<'a>(mut node: &'a mut Node, levels: &[&str]) -> Option<&'a mut Node> {
    for level in levels {
        node = node.children.get_mut(*level)?;
    }
    Some(node)
}

#[derive(Debug, Default)]
struct Index {
    root: Node,
    count: usize,
    bytes: usize,
}

impl Index {
    fn set(&mut self, message: Arc<Message>, limits: RetainedLimits) -> RetainOutcome {
        let delete = message.payload.is_empty();
        let mut node = &mut self.root;
        for level in message.topic.split('/') {
            if delete && !node.children.contains_key(level) {
                return RetainOutcome::Deleted;
            }
            node = node.children.entry(level.into()).or_default();
        }
        let old_weight = node.value.as_ref().map_or(0, |m| m.weight());
        if delete {
            if node.value.take().is_some() {
                self.count -= 1;
                self.bytes -= old_weight;
            }
            self.prune(&message.topic);
            return RetainOutcome::Deleted;
        }
        let new_count = self.count + usize::from(node.value.is_none());
        let new_bytes = self.bytes - old_weight + message.weight();
        if message.payload.len() > limits.max_payload || new_count > limits.max_messages || new_bytes > limits.max_bytes {
            if node.value.is_none() {
                self.prune(&message.topic);
            }
            return RetainOutcome::Refused;
        }
        node.value = Some(message);
        self.count = new_count;
        self.bytes = new_bytes;
        RetainOutcome::Stored
    }

    /// Removes empty nodes along `topic`, deepest first, so deleted topics leave nothing.
    fn prune(&mut self, topic: &str) {
        let levels: Vec<&str> = topic.split('/').collect();
        for depth in (1..=levels.len()).rev() {
            let Some(node) = walk_mut(&mut self.root, &levels[..depth - 1]) else { continue };
            let leaf = levels[depth - 1];
            if node.children.get(leaf).is_some_and(|n| n.value.is_none() && n.children.is_empty()) {
                node.children.remove(leaf);
            }
        }
    }

    fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        let mut stack: Vec<(&Node, usize)> = vec![(&self.root, 0)];
        let keep = |m: &Arc<Message>, out: &mut Vec<Arc<Message>>| {
            if !m.is_expired(now_ms) {
                out.push(Arc::clone(m));
            }
        };
        while let Some((node, depth)) = stack.pop() {
            let Some(level) = levels.get(depth) else {
                if let Some(m) = &node.value {
                    keep(m, &mut out);
                }
                continue;
            };
            match *level {
                "#" => {
                    // The parent level matches too ("a/#" matches "a").
                    if let Some(m) = node.value.as_ref().filter(|_| depth > 0) {
                        keep(m, &mut out);
                    }
                    let mut sub: Vec<&Node> =
                        node.children.iter().filter(|(name, _)| !(depth == 0 && name.starts_with('$'))).map(|(_, n)| n).collect();
                    while let Some(n) = sub.pop() {
                        if let Some(m) = &n.value {
                            keep(m, &mut out);
                        }
                        sub.extend(n.children.values());
                    }
                }
                "+" => {
                    for (name, child) in &node.children {
                        if !(depth == 0 && name.starts_with('$')) {
                            stack.push((child, depth + 1));
                        }
                    }
                }
                literal => {
                    if let Some(child) = node.children.get(literal) {
                        stack.push((child, depth + 1));
                    }
                }
            }
        }
        out
    }
}

/// Single-node, in-memory [`RetainedStore`].
#[derive(Debug)]
pub struct MemoryRetainedStore {
    /// std `RwLock`: sections are short and never await.
    index: RwLock<Index>,
    limits: RetainedLimits,
}

impl MemoryRetainedStore {
    /// An empty index with the given caps.
    pub fn new(limits: RetainedLimits) -> Self {
        MemoryRetainedStore { index: RwLock::new(Index::default()), limits }
    }

    /// Sets `message` within `limits` (the replicated store applies the proposer's caps, so
    /// every node decides alike).
    pub fn set_within(&self, message: Arc<Message>, limits: RetainedLimits) -> Result<RetainOutcome, StoreError> {
        Ok(self.index.write().map_err(|_| StoreError::Poisoned)?.set(message, limits))
    }

    /// Every retained message (expired ones too: expiry is decided when read).
    pub fn export(&self) -> Vec<Arc<Message>> {
        let Ok(index) = self.index.read() else { return Vec::new() };
        let mut out = Vec::with_capacity(index.count);
        let mut stack = vec![&index.root];
        while let Some(node) = stack.pop() {
            out.extend(node.value.iter().cloned());
            stack.extend(node.children.values());
        }
        out
    }

    /// Replaces everything with `messages` (a snapshot being installed), without caps.
    pub fn replace_all(&self, messages: Vec<Arc<Message>>) -> Result<(), StoreError> {
        let mut index = self.index.write().map_err(|_| StoreError::Poisoned)?;
        *index = Index::default();
        let unbounded = RetainedLimits { max_messages: usize::MAX, max_bytes: usize::MAX, max_payload: usize::MAX };
        for m in messages {
            index.set(m, unbounded);
        }
        Ok(())
    }
}

#[async_trait]
impl RetainedStore for MemoryRetainedStore {
    async fn set(&self, message: Arc<Message>) -> Result<RetainOutcome, StoreError> {
        let mut index = self.index.write().map_err(|_| StoreError::Poisoned)?;
        Ok(index.set(message, self.limits))
    }

    fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        self.index.read().map(|i| i.matching(filter, now_ms)).unwrap_or_default()
    }

    fn count(&self) -> usize {
        self.index.read().map(|i| i.count).unwrap_or(0)
    }

    fn bytes(&self) -> usize {
        self.index.read().map(|i| i.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;
    use crate::topic;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            received_at_us: 0,
            publisher: String::new(),
        })
    }

    const BIG: RetainedLimits = RetainedLimits { max_messages: 1000, max_bytes: usize::MAX, max_payload: usize::MAX };

    #[tokio::test]
    async fn latest_wins_and_empty_deletes() {
        let s = MemoryRetainedStore::new(BIG);
        assert_eq!(s.set(msg("a/b", "1")).await.ok(), Some(RetainOutcome::Stored));
        assert_eq!(s.set(msg("a/b", "2")).await.ok(), Some(RetainOutcome::Stored));
        assert_eq!(s.count(), 1);
        let got = s.matching("a/+", 0);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].payload[..], b"2");
        assert_eq!(s.set(msg("a/b", "")).await.ok(), Some(RetainOutcome::Deleted));
        assert_eq!(s.count(), 0);
        assert_eq!(s.bytes(), 0);
        assert!(s.matching("#", 0).is_empty());
    }

    #[tokio::test]
    async fn caps_refuse_new_topics() {
        let s = MemoryRetainedStore::new(RetainedLimits { max_messages: 1, max_bytes: usize::MAX, max_payload: 4 });
        assert_eq!(s.set(msg("a", "1")).await.ok(), Some(RetainOutcome::Stored));
        assert_eq!(s.set(msg("b", "1")).await.ok(), Some(RetainOutcome::Refused));
        assert_eq!(s.set(msg("a", "12345")).await.ok(), Some(RetainOutcome::Refused));
        assert_eq!(s.set(msg("a", "2")).await.ok(), Some(RetainOutcome::Stored));
        assert_eq!(s.count(), 1);
    }

    proptest! {
        /// The index answers every filter exactly like a scan with the reference matcher.
        #[test]
        fn index_matches_like_scan(topics in proptest::collection::vec(proptest::collection::vec(proptest::sample::select(vec!["a", "b", "", "$s"]), 1..4), 0..12),
                                   filter in proptest::collection::vec(proptest::sample::select(vec!["a", "b", "", "+", "$s"]), 1..4), hash in any::<bool>()) {
            let mut index = Index::default();
            let mut topics: Vec<String> = topics.into_iter().map(|t| t.join("/")).collect();
            topics.sort();
            topics.dedup();
            for t in &topics {
                index.set(msg(t, "x"), BIG);
            }
            let mut filter = filter.join("/");
            if hash { filter.push_str("/#"); }
            let mut got: Vec<String> = index.matching(&filter, 0).iter().map(|m| m.topic.clone()).collect();
            got.sort();
            let want: Vec<String> = topics.iter().filter(|t| topic::matches(&filter, t)).cloned().collect();
            prop_assert_eq!(got, want);
        }
    }
}
