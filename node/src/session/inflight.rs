//! Outbound QoS 1/2 messages in flight, in send order.

use std::collections::{BTreeMap, VecDeque};

use raftmq_cluster::message::QoS;
use raftmq_cluster::session::{ForwardOrigin, InflightMessage, InflightStage};
use raftmq_cluster::session_ops::SessionOp;

use super::{Durability, SessionSlot, SlotInner};

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

impl SlotInner {
    /// The packet id a delivery goes out with: for one with a stored sequence number, the
    /// id that number gives, so a node that takes the session over after its sender died
    /// (before the `Sent` reached the store) sends it again under the same id and the
    /// subscriber recognises a QoS 2 resend [MQTT-4.4.0-1] (the fault suite caught one
    /// received twice under a new id); otherwise, or if that id is in flight already, the
    /// next free one.
    pub(super) fn packet_id_for(&mut self, seq: u64) -> Option<u16> {
        if seq != 0 {
            let id = ((seq - 1) % u64::from(u16::MAX)) as u16 + 1;
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        self.next_packet_id()
    }

    /// Next free outbound packet id [MQTT-2.2.1-4], `None` if all 65,535 are in use.
    pub(super) fn next_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.last_packet_id = self.last_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.last_packet_id) {
                return Some(self.last_packet_id);
            }
        }
        None
    }

    /// Records PUBACK (stage `Published`: QoS 1) or PUBCOMP (stage `Released`: QoS 2).
    pub(super) fn complete(&mut self, packet_id: u16, stage: InflightStage) -> Ack {
        let Some(m) = self.inflight.get(&packet_id) else { return Ack::Unknown };
        let fits = match stage {
            InflightStage::Published => m.queued.qos == QoS::AtLeastOnce,
            InflightStage::Released => m.stage == InflightStage::Released,
        };
        if !fits {
            return Ack::WrongKind;
        }
        self.inflight.remove(&packet_id);
        Ack::Known
    }

    /// Records PUBREC: the message moves to the PUBREL stage; a PUBREC with an error
    /// reason ends the exchange. A repeated PUBREC for a released message is known.
    pub(super) fn received(&mut self, packet_id: u16, failed: bool) -> Ack {
        match self.inflight.get_mut(&packet_id) {
            Some(m) if m.queued.qos == QoS::ExactlyOnce => {
                if failed {
                    self.inflight.remove(&packet_id);
                } else {
                    m.stage = InflightStage::Released;
                }
                Ack::Known
            }
            Some(_) => Ack::WrongKind,
            None => Ack::Unknown,
        }
    }
}

impl SessionSlot {
    /// Records PUBACK (stage `Published`: QoS 1) or PUBCOMP (stage `Released`: QoS 2).
    /// Returns where a forwarded shared delivery came from, when it was its PUBACK.
    pub fn complete(&self, packet_id: u16, stage: InflightStage) -> (Ack, Option<ForwardOrigin>) {
        let mut inner = self.lock();
        let origin = inner.inflight.get(&packet_id).and_then(|m| m.queued.origin).filter(|_| stage == InflightStage::Published);
        let ack = inner.complete(packet_id, stage);
        if ack == Ack::Known {
            self.log(&mut inner, SessionOp::Acked { packet_id });
        }
        (ack, origin.filter(|_| ack == Ack::Known))
    }

    /// Records PUBREC; a PUBREC with an error reason ends the exchange. Returns where a
    /// forwarded shared delivery came from (the client has it, or refused it, now), and
    /// the durability of the new stage: the PUBREL waits for it, so a session resumed on
    /// another node after this one died sends PUBREL again, never the PUBLISH.
    pub fn received(&self, packet_id: u16, failed: bool) -> (Ack, Option<ForwardOrigin>, Durability) {
        let mut inner = self.lock();
        let origin = inner.inflight.get(&packet_id).and_then(|m| m.queued.origin);
        let ack = inner.received(packet_id, failed);
        let mut durability = Durability::Memory;
        if ack == Ack::Known {
            if failed {
                self.log(&mut inner, SessionOp::Acked { packet_id });
            } else {
                durability = self.log_pending(&mut inner, SessionOp::Received { packet_id });
            }
        }
        (ack, origin.filter(|_| ack == Ack::Known), durability)
    }

    /// Calls `f` with every message in flight, oldest first (a resume resends them).
    pub fn for_each_inflight(&self, mut f: impl FnMut(u16, &InflightMessage)) {
        let inner = self.lock();
        for (id, m) in inner.inflight.iter() {
            f(*id, m);
        }
    }

    /// Whether inbound QoS 2 `packet_id` awaits PUBREL, and how many do.
    pub fn inbound_pending(&self, packet_id: u16) -> (bool, usize) {
        let inner = self.lock();
        (inner.awaiting_rel.contains_key(&packet_id), inner.awaiting_rel.len())
    }

    /// An inbound QoS 2 PUBLISH that delivers nothing was accepted: its id awaits PUBREL
    /// (exactly once), recorded in the store at once.
    pub fn inbound_received(&self, packet_id: u16) -> Durability {
        self.inbound_accepted(packet_id);
        self.inbound_record(packet_id)
    }

    /// An inbound QoS 2 PUBLISH was accepted: its id awaits PUBREL from now on, so a
    /// resend to this node is acknowledged and never delivered again [MQTT-4.3.3-10].
    /// Returns whether the id must also be recorded in the store
    /// ([`SessionSlot::inbound_record`]) before the PUBREC goes out.
    pub fn inbound_accepted(&self, packet_id: u16) -> bool {
        let mut inner = self.lock();
        inner.awaiting_rel.insert(packet_id, std::time::Instant::now());
        Self::journaled(&inner)
    }

    /// Records an accepted inbound id in the store; the PUBREC waits for the returned
    /// durability, so a PUBLISH re-sent to another node after this one died is not
    /// delivered twice. Called only once the message's copies are stored: an id recorded
    /// before them says "delivered" for a message that a crash of every node holding it
    /// could still lose, and the re-sent PUBLISH would be acknowledged and dropped (the
    /// fault suite's F8 caught that).
    pub fn inbound_record(&self, packet_id: u16) -> Durability {
        let mut inner = self.lock();
        if !inner.awaiting_rel.contains_key(&packet_id) {
            return Durability::Memory;
        }
        self.log_pending(&mut inner, SessionOp::InboundReceived { packet_id })
    }

    /// PUBREL for an inbound QoS 2 id; false if it was not awaited.
    pub fn inbound_released(&self, packet_id: u16) -> bool {
        let mut inner = self.lock();
        let known = inner.awaiting_rel.remove(&packet_id).is_some();
        if known {
            self.log(&mut inner, SessionOp::InboundReleased { packet_id });
        }
        known
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use raftmq_cluster::message::{Message, MessageProperties};
    use raftmq_cluster::session::QueuedMessage;

    fn sent(qos: QoS) -> InflightMessage {
        let message = Message {
            topic: "t".into(),
            payload: bytes::Bytes::new(),
            qos,
            retain: false,
            properties: MessageProperties::default(),
            received_at_us: 0,
            publisher: String::new(),
        };
        let queued = QueuedMessage {
            message: Arc::new(message),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
            seq: 0,
            origin: None,
        };
        InflightMessage { queued, stage: InflightStage::Published }
    }

    /// [MQTT-4.6.0-1]: resends go out in the order of the original sends, also after the
    /// packet ids wrapped around.
    #[test]
    fn inflight_keeps_send_order_across_packet_id_wraparound_and_out_of_order_acks() {
        let mut inner = SlotInner { last_packet_id: u16::MAX - 1, ..SlotInner::default() };
        let mut ids = Vec::new();
        for _ in 0..4 {
            let id = inner.next_packet_id().unwrap_or_default();
            inner.inflight.insert(id, sent(QoS::AtLeastOnce));
            ids.push(id);
        }
        assert_eq!(ids, [u16::MAX, 1, 2, 3]);
        assert_eq!(inner.complete(2, InflightStage::Published), Ack::Known);
        assert_eq!(inner.complete(2, InflightStage::Published), Ack::Unknown, "a second PUBACK for the same id is unknown");
        assert_eq!(inner.complete(u16::MAX, InflightStage::Published), Ack::Known);
        let left: Vec<u16> = inner.inflight.iter().map(|(id, _)| *id).collect();
        assert_eq!(left, [1, 3]);
        // An id still in flight is skipped when ids come round again.
        inner.last_packet_id = 0;
        assert_eq!(inner.next_packet_id(), Some(2));
    }

    /// [MQTT-4.4.0-1]: a stored delivery gets the packet id its sequence number gives, so
    /// whichever node sends it (again) uses the same one; an id in flight already falls
    /// back to the next free one.
    #[test]
    fn a_stored_delivery_always_gets_the_packet_id_of_its_sequence_number() {
        let mut inner = SlotInner::default();
        assert_eq!(inner.packet_id_for(1), Some(1));
        assert_eq!(inner.packet_id_for(70_000), Some(((70_000u64 - 1) % 65_535 + 1) as u16));
        assert_eq!(inner.packet_id_for(65_535), Some(u16::MAX));
        inner.inflight.insert(5, sent(QoS::ExactlyOnce));
        inner.last_packet_id = 4;
        assert_eq!(inner.packet_id_for(5 + 65_535), Some(6), "5 is in flight: the next free id");
        // Without a sequence number (a transient session), the next free id.
        inner.last_packet_id = 0;
        assert_eq!(inner.packet_id_for(0), Some(1));
    }

    #[test]
    fn qos2_inflight_moves_to_released_and_completes_on_pubcomp() {
        let mut inner = SlotInner::default();
        let id = inner.next_packet_id().unwrap_or_default();
        inner.inflight.insert(id, sent(QoS::ExactlyOnce));
        assert_eq!(inner.complete(id, InflightStage::Released), Ack::WrongKind, "PUBCOMP before PUBREC");
        assert_eq!(inner.complete(id, InflightStage::Published), Ack::WrongKind, "PUBACK for QoS 2");
        assert_eq!(inner.received(id, false), Ack::Known);
        assert_eq!(inner.inflight.get(&id).map(|m| m.stage), Some(InflightStage::Released));
        assert_eq!(inner.complete(id, InflightStage::Released), Ack::Known);
        assert!(inner.inflight.is_empty());
    }
}
