//! Persistent session state as data, and the store that keeps it durable.
//!
//! API boundary: the broker changes a stored session only through [`SessionStore::apply`],
//! with the operations of [`crate::session_ops`] (claim, subscribe, append, sent, acked,
//! ...), in the order the owning node decided them; each batch resolves once durable.
//! [`MemorySessionStore`] keeps everything in memory for a single node; the Raft state
//! machine applies the very same operations.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::message::{Message, QoS};
use crate::session_ops::{Applied, OpError, SessionCommand};
use crate::StoreError;

/// What to drop when a session queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DropPolicy {
    /// Drop the oldest QoS 0 message, else the oldest message, to make room (EMQX default).
    #[default]
    DropOldest,
    /// Refuse the new message.
    DropNew,
}

/// Per-subscription options (MQTT 5 §3.8.3.1; MQTT 3 uses only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS granted.
    pub qos: QoS,
    /// Do not deliver the subscriber's own publishes.
    pub no_local: bool,
    /// Keep the RETAIN flag of live messages as published.
    pub retain_as_published: bool,
    /// 0 = send retained at subscribe, 1 = only for a new subscription, 2 = never.
    pub retain_handling: u8,
    /// Subscription Identifier to attach to matching deliveries.
    pub subscription_identifier: Option<u32>,
}

/// The shared subscription (`$share/{group}/{filter}`) a delivery was chosen for; if the
/// member cannot take the message after all, it goes to another member of the group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareTarget {
    /// Share name (`$queue/` subscriptions use the group `$queue`).
    pub group: Arc<str>,
    /// The topic filter after the share prefix.
    pub filter: Arc<str>,
}

/// A message waiting in a session queue, with what the delivery needs besides the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// Shared message.
    pub message: Arc<Message>,
    /// QoS to deliver with: min(published, granted).
    pub qos: QoS,
    /// RETAIN flag to deliver with.
    pub retain: bool,
    /// Subscription identifiers of every matching subscription.
    pub subscription_ids: Vec<u32>,
    /// Set when the delivery came through a shared subscription.
    pub shared: Option<Arc<ShareTarget>>,
    /// The session's number for this delivery, assigned when it is queued, so later
    /// operations (sent, discarded) name it exactly; 0 = not in the store (a QoS 0 delivery
    /// to an online client, or a transient session).
    pub seq: u64,
    /// For a shared delivery another node forwarded here: that node and its number for
    /// it, told once the member acknowledged it (until then that node can give it to
    /// another member if this one dies).
    pub origin: Option<ForwardOrigin>,
}

/// Where a forwarded shared delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForwardOrigin {
    /// The forwarding node.
    pub node: crate::NodeId,
    /// Its number for the delivery.
    pub id: u64,
}

/// Where an unacknowledged outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightStage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

/// One outbound message the client has not fully acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightMessage {
    /// The delivery.
    pub queued: QueuedMessage,
    /// Handshake stage.
    pub stage: InflightStage,
}

/// A will message held by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillMessage {
    /// The message to publish.
    pub message: Message,
    /// MQTT 5 Will Delay Interval in seconds.
    pub delay_secs: u32,
}

/// The whole state of one persistent session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionState {
    /// Client identifier.
    pub client_id: String,
    /// Subscriptions by filter.
    pub subscriptions: BTreeMap<String, SubscriptionOptions>,
    /// Messages not yet sent to the client.
    pub queue: VecDeque<QueuedMessage>,
    /// Messages sent but not acknowledged, by packet id.
    pub inflight: BTreeMap<u16, InflightMessage>,
    /// Inbound QoS 2 packet ids awaiting PUBREL.
    pub awaiting_rel: Vec<u16>,
    /// Session Expiry Interval in seconds after disconnect.
    pub expiry_secs: u32,
    /// Will message, if any.
    pub will: Option<WillMessage>,
    /// Time the client disconnected (ms since the Unix epoch), 0 while connected.
    pub disconnected_at_ms: u64,
    /// User name of the identity that created the session (`None`: anonymous); only that
    /// identity may resume it.
    pub owner: Option<String>,
    /// Epoch of the owning node's claim; commands of older epochs are refused.
    pub epoch: crate::registry::Epoch,
}

/// Bounds applied by the store to a session queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Maximum queued messages.
    pub max_len: usize,
    /// Maximum queued bytes (see [`Message::weight`]).
    pub max_bytes: usize,
    /// Which message to drop when full.
    pub policy: DropPolicy,
}

/// The outcomes of a submitted batch, to await ([`SessionStore::submit`]).
pub type Submitted = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Result<Applied, OpError>>, StoreError>> + Send>>;

/// Durable home of persistent sessions.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The stored state of `client_id`, if any.
    async fn load(&self, client_id: &str) -> Result<Option<SessionState>, StoreError>;
    /// Applies session commands in order (one write for the batch) with
    /// [`crate::session_ops::apply`]; each gets its own outcome (a fenced or orphaned command
    /// is refused, the others apply).
    async fn apply(&self, batch: Vec<SessionCommand>) -> Result<Vec<Result<Applied, OpError>>, StoreError>;
    /// Queues `batch` behind every batch submitted before it (they apply in submission
    /// order) and returns the future of its outcomes, so a writer can have several batches
    /// on their way at once. Resolves once the batch is queued (waiting for room). The
    /// default applies the batch before returning.
    async fn submit(&self, batch: Vec<SessionCommand>) -> Result<Submitted, StoreError> {
        let outcomes = self.apply(batch).await;
        Ok(Box::pin(std::future::ready(outcomes)))
    }
    /// Number of stored sessions.
    fn len(&self) -> usize;
    /// True when no session is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many of the oldest queued messages `DropOldest` searches for a QoS 0 victim.
pub const DROP_SCAN: usize = 16;

/// Pushes `item` onto `queue` within `limits`; returns the number of messages dropped.
pub fn push_bounded(queue: &mut VecDeque<QueuedMessage>, bytes: &mut usize, item: QueuedMessage, limits: QueueLimits) -> u64 {
    push_bounded_with(queue, bytes, item, limits, |_| {})
}

/// [`push_bounded`], telling `evicted` about each older message it drops to make room.
pub fn push_bounded_with(
    queue: &mut VecDeque<QueuedMessage>,
    bytes: &mut usize,
    item: QueuedMessage,
    limits: QueueLimits,
    mut evicted: impl FnMut(&QueuedMessage),
) -> u64 {
    let weight = item.message.weight();
    let mut dropped = 0;
    let full = |q: &VecDeque<QueuedMessage>, b: usize| q.len() >= limits.max_len || b + weight > limits.max_bytes;
    if full(queue, *bytes) {
        if limits.policy == DropPolicy::DropNew || limits.max_len == 0 || weight > limits.max_bytes {
            return 1;
        }
        while full(queue, *bytes) {
            // QoS 0 first, looking only at the oldest few so a full queue of QoS 1/2
            // messages costs O(1) per push, not O(queue length).
            let idx = queue.iter().take(DROP_SCAN).position(|q| q.qos == QoS::AtMostOnce).unwrap_or(0);
            match queue.remove(idx) {
                Some(old) => {
                    *bytes = bytes.saturating_sub(old.message.weight());
                    evicted(&old);
                    dropped += 1;
                }
                None => break,
            }
        }
    }
    *bytes += weight;
    queue.push_back(item);
    dropped
}

/// Single-node, in-memory [`SessionStore`]. Writes are durable as soon as they return
/// because nothing outlives the process anyway.
#[derive(Debug, Default)]
pub struct MemorySessionStore {
    /// Each session with the bytes its queue holds, so an append is O(1).
    sessions: DashMap<String, (SessionState, usize)>,
}

/// Bytes a session's queue holds (see [`Message::weight`]).
pub fn queue_bytes(state: &SessionState) -> usize {
    state.queue.iter().map(|q| q.message.weight()).sum()
}

impl MemorySessionStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every stored session.
    pub fn export(&self) -> Vec<SessionState> {
        self.sessions.iter().map(|s| s.value().0.clone()).collect()
    }

    /// Replaces every session with `sessions` (a snapshot being installed).
    pub fn replace_all(&self, sessions: Vec<SessionState>) {
        self.sessions.clear();
        for s in sessions {
            let bytes = queue_bytes(&s);
            self.sessions.insert(s.client_id.clone(), (s, bytes));
        }
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn load(&self, client_id: &str) -> Result<Option<SessionState>, StoreError> {
        Ok(self.sessions.get(client_id).map(|s| s.0.clone()))
    }

    async fn apply(&self, batch: Vec<SessionCommand>) -> Result<Vec<Result<Applied, OpError>>, StoreError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for cmd in batch {
            let (mut state, mut bytes) = match self.sessions.remove(&cmd.client_id) {
                Some((_, (state, bytes))) => (Some(state), bytes),
                None => (None, 0),
            };
            outcomes.push(crate::session_ops::apply(&mut state, &mut bytes, &cmd));
            if let Some(state) = state {
                self.sessions.insert(cmd.client_id, (state, bytes));
            }
        }
        Ok(outcomes)
    }

    fn len(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn item(qos: QoS, n: u8) -> QueuedMessage {
        QueuedMessage {
            message: Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(vec![n]),
                qos,
                retain: false,
                properties: Default::default(),
                received_at_us: 0,
                publisher: String::new(),
            }),
            qos,
            retain: false,
            subscription_ids: vec![],
            shared: None,
            seq: u64::from(n),
            origin: None,
        }
    }

    #[test]
    fn drop_oldest_prefers_qos0() {
        let limits = QueueLimits { max_len: 2, max_bytes: usize::MAX, policy: DropPolicy::DropOldest };
        let mut q = VecDeque::new();
        let mut b = 0;
        assert_eq!(push_bounded(&mut q, &mut b, item(QoS::AtLeastOnce, 1), limits), 0);
        assert_eq!(push_bounded(&mut q, &mut b, item(QoS::AtMostOnce, 2), limits), 0);
        assert_eq!(push_bounded(&mut q, &mut b, item(QoS::AtLeastOnce, 3), limits), 1);
        let left: Vec<u8> = q.iter().map(|i| i.message.payload[0]).collect();
        assert_eq!(left, vec![1, 3]);
        assert_eq!(push_bounded(&mut q, &mut b, item(QoS::AtLeastOnce, 4), limits), 1);
        let left: Vec<u8> = q.iter().map(|i| i.message.payload[0]).collect();
        assert_eq!(left, vec![3, 4]);
    }

    #[test]
    fn drop_new_refuses() {
        let limits = QueueLimits { max_len: 1, max_bytes: usize::MAX, policy: DropPolicy::DropNew };
        let mut q = VecDeque::new();
        let mut b = 0;
        push_bounded(&mut q, &mut b, item(QoS::AtLeastOnce, 1), limits);
        assert_eq!(push_bounded(&mut q, &mut b, item(QoS::AtLeastOnce, 2), limits), 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].message.payload[0], 1);
    }

    #[tokio::test]
    async fn memory_store_round_trip() {
        use crate::session_ops::{SessionCommand, SessionOp};
        let store = MemorySessionStore::new();
        let limits = QueueLimits { max_len: 10, max_bytes: usize::MAX, policy: DropPolicy::DropOldest };
        let cmd = |client: &str, op| SessionCommand { client_id: client.into(), epoch: 1, op };
        let outcomes = store
            .apply(vec![
                cmd("c", SessionOp::Claim { clean: true, owner: None, expiry_secs: 10 }),
                cmd("c", SessionOp::Append { item: item(QoS::AtLeastOnce, 7), limits }),
                cmd("nobody", SessionOp::Append { item: item(QoS::AtLeastOnce, 8), limits }),
            ])
            .await
            .unwrap_or_default();
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes[2].is_err(), "only a claim creates a session");
        let loaded = store.load("c").await.ok().flatten();
        assert_eq!(loaded.map(|s| s.queue.len()), Some(1));
        assert_eq!(store.len(), 1);
        assert!(store.apply(vec![cmd("c", SessionOp::Remove)]).await.is_ok());
        assert!(store.is_empty());
    }
}
