//! Outbound QoS 1/2 messages in flight, in send order.

use std::collections::{BTreeMap, VecDeque};

use raftmq_cluster::session::InflightMessage;

/// Outbound messages sent and not fully acknowledged, in the order they were sent.
///
/// Clients acknowledge in order almost always, so a ring searched from the oldest end makes
/// the acknowledgement a pop; a B-tree keyed by packet id shifted its large entries on every
/// removal. The window (`max_inflight`) bounds the length, so searches stay short.
#[derive(Debug, Default, Clone)]
pub struct Inflight {
    entries: VecDeque<(u16, InflightMessage)>,
}

impl Inflight {
    /// From stored state (ordered by packet id).
    pub fn from_map(map: BTreeMap<u16, InflightMessage>) -> Inflight {
        Inflight { entries: map.into_iter().collect() }
    }

    /// For the session store.
    pub fn to_map(&self) -> BTreeMap<u16, InflightMessage> {
        self.entries.iter().cloned().collect()
    }

    /// Number of messages in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a message just sent with `packet_id`.
    pub fn insert(&mut self, packet_id: u16, message: InflightMessage) {
        self.entries.push_back((packet_id, message));
    }

    fn position(&self, packet_id: u16) -> Option<usize> {
        self.entries.iter().position(|(id, _)| *id == packet_id)
    }

    /// Whether `packet_id` is in use.
    pub fn contains_key(&self, packet_id: &u16) -> bool {
        self.position(*packet_id).is_some()
    }

    /// The message sent with `packet_id`.
    pub fn get(&self, packet_id: &u16) -> Option<&InflightMessage> {
        self.position(*packet_id).and_then(|i| self.entries.get(i)).map(|(_, m)| m)
    }

    /// The message sent with `packet_id`, to change its stage.
    pub fn get_mut(&mut self, packet_id: &u16) -> Option<&mut InflightMessage> {
        let i = self.position(*packet_id)?;
        self.entries.get_mut(i).map(|(_, m)| m)
    }

    /// Forgets `packet_id` (acknowledged), returning its message.
    pub fn remove(&mut self, packet_id: &u16) -> Option<InflightMessage> {
        let i = self.position(*packet_id)?;
        self.entries.remove(i).map(|(_, m)| m)
    }

    /// Every message in flight with its packet id, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&u16, &InflightMessage)> {
        self.entries.iter().map(|(id, m)| (id, m))
    }
}

/// How an acknowledgement from the client matched the messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// It acknowledged a message in flight.
    Known,
    /// No message is in flight with its packet id.
    Unknown,
    /// Its packet id is in flight, but at another QoS or stage (PUBREC for QoS 1, PUBACK
    /// for QoS 2): a protocol error.
    WrongKind,
}
