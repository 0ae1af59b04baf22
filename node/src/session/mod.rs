//! A session slot: everything the broker holds for one client id, online or offline.
//!
//! The slot outlives connections. Routing pushes deliveries into its bounded queue; the
//! connection task that owns the slot drains the queue into the socket within the inflight
//! window and records acknowledgements. A takeover moves the slot from one connection task
//! to the next, so the queue, the inflight messages and the packet ids carry over.
//!
//! Concurrency: `inner` is a std `Mutex` because every critical section is short and never
//! awaits; `wake` tells the owning task there is work; `released` tells a taking-over task
//! that the previous owner let go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use raftmq_cluster::message::{now_us, QoS};
use raftmq_cluster::session::{push_bounded, InflightStage, QueueLimits, QueuedMessage, SessionState, SubscriptionOptions, WillMessage};
use tokio::sync::Notify;

mod inflight;
pub use inflight::{Ack, Inflight};

/// What the admin API shows about a live connection (who it is and from where is the
/// slot's `owner`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnInfo {
    /// Protocol level (3, 4, 5).
    pub protocol: u8,
    /// Keep alive in force, seconds.
    pub keep_alive: u16,
    /// Clean Session / Clean Start.
    pub clean_start: bool,
    /// Connect time, ms since the Unix epoch.
    pub connected_at_ms: u64,
}

/// The live connection attached to a slot.
#[derive(Debug)]
pub struct ConnHandle {
    /// Broker-wide connection number.
    pub conn_id: u64,
    /// Who is connected.
    pub info: ConnInfo,
    /// Set when the connection must close, with the MQTT 5 reason code to send (takeover,
    /// admin kick, keep-alive expiry, shutdown); the connection sees it at its next wake-up.
    pub kick: Option<u8>,
    /// When the connection last sent a whole packet, for the keep-alive sweep.
    pub last_packet: std::time::Instant,
    /// Since when a started packet has been waiting for the rest of its bytes (`None`
    /// when the read buffer ends on a packet boundary); the sweep closes the connection
    /// once `mqtt.packet_timeout_secs` pass, whatever the keep alive.
    pub partial_since: Option<std::time::Instant>,
}

/// Mutable state of a slot.
#[derive(Debug, Default)]
pub struct SlotInner {
    /// Attached connection, `None` while offline.
    pub conn: Option<ConnHandle>,
    /// This node's claim on the client id (see `ClientRegistry`); 0 before the first.
    pub epoch: raftmq_cluster::registry::Epoch,
    /// The identity that created the session: only it may resume the session.
    pub owner: Option<Arc<crate::security::Owner>>,
    /// Bumped at every attach and detach; timers compare it to know they are stale.
    pub generation: u64,
    /// The session outlives the connection (expiry > 0).
    pub persistent: bool,
    /// Session expiry after disconnect, seconds.
    pub expiry_secs: u32,
    /// Subscriptions by filter.
    pub subscriptions: HashMap<Box<str>, SubscriptionOptions>,
    /// Messages waiting for the inflight window or for the client to come back.
    pub queue: VecDeque<QueuedMessage>,
    /// Retained messages for new subscriptions, sent before the queue within the same
    /// window. Bounded by `retained.max_messages`; kept in the slot across a takeover.
    /// Boxed: most slots never hold any, and an idle slot should stay small.
    pub retained: Option<Box<VecDeque<QueuedMessage>>>,
    /// Bytes in `queue`.
    pub queue_bytes: usize,
    /// Outbound messages sent and not fully acknowledged, in send order.
    pub inflight: Inflight,
    /// Last packet id handed out.
    pub last_packet_id: u16,
    /// Inbound QoS 2 packet ids awaiting PUBREL, with the time they arrived.
    pub awaiting_rel: BTreeMap<u16, std::time::Instant>,
    /// A will waiting for its delay to pass.
    pub pending_will: Option<Box<WillMessage>>,
    /// The slot has been removed from the broker; nothing may be added any more.
    pub removed: bool,
    /// Messages dropped because the queue was full or they could not be queued.
    pub dropped: u64,
    /// The queue went over half full while online: publishers feeding it wait on
    /// `drained` until it is down to a quarter.
    pub congested: bool,
    /// The queue stopped shrinking while publishers waited for it: publishers no longer
    /// wait for this client until its queue is down to a quarter again.
    pub stalled: bool,
    /// When the connection last took a message from the queue, or (0) the queue has become
    /// non-empty since and the clock starts at the next congestion check (µs since the Unix
    /// epoch): how the broker tells a draining client from a stalled one.
    pub progress_us: u64,
}

/// What became of a delivery offered to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offered {
    /// Where it went.
    pub offer: Offer,
    /// Messages dropped to make room (or this one, if it was not queued).
    pub lost: u64,
    /// An online client's queue is over half full: the publisher should slow down.
    pub congested: bool,
}

/// Outcome of offering a delivery to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued for an online client.
    Online,
    /// Queued for an offline persistent session.
    Offline,
    /// Not queued (offline QoS 0, queue full, or session gone).
    Dropped,
}

/// Everything the broker holds for one client id.
#[derive(Debug)]
pub struct SessionSlot {
    /// Client identifier.
    pub client_id: Arc<str>,
    inner: Mutex<SlotInner>,
    /// Work for the owning connection task (a delivery or a kick).
    pub wake: Notify,
    /// The owning connection detached.
    pub released: Notify,
    /// A congested queue drained (or its client went away): throttled publishers go on.
    pub drained: Notify,
    /// Serialises CONNECTs for this client id (takeover races, F15).
    pub connect_lock: tokio::sync::Mutex<()>,
}

impl SessionSlot {
    /// A fresh, offline, empty slot.
    pub fn new(client_id: Arc<str>) -> SessionSlot {
        SessionSlot {
            client_id,
            inner: Mutex::new(SlotInner::default()),
            wake: Notify::new(),
            released: Notify::new(),
            drained: Notify::new(),
            connect_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Asks the attached connection to close with `reason` (the first reason asked for
    /// wins) and wakes it. False if no connection is attached.
    pub fn kick(&self, reason: u8) -> bool {
        {
            let mut inner = self.lock();
            let Some(conn) = inner.conn.as_mut() else { return false };
            conn.kick.get_or_insert(reason);
        }
        self.wake.notify_one();
        true
    }

    /// Run about once a second by the broker's sweeper: kicks a connection silent for
    /// longer than `multiplier` times its keep alive [MQTT-3.1.2-24] or holding a partial
    /// packet for longer than `packet_timeout`, and forgets inbound
    /// QoS 2 packet ids whose PUBREL has not come within `rel_timeout`.
    pub fn sweep(&self, now: std::time::Instant, multiplier: f64, rel_timeout: std::time::Duration, packet_timeout: std::time::Duration) {
        let expired = {
            let mut inner = self.lock();
            if !inner.awaiting_rel.is_empty() {
                inner.awaiting_rel.retain(|_, since| now.duration_since(*since) < rel_timeout);
            }
            match inner.conn.as_mut() {
                // A packet started and never finished, even with keep alive 0.
                Some(conn)
                    if conn.kick.is_none() && conn.partial_since.is_some_and(|t| now.saturating_duration_since(t) >= packet_timeout) =>
                {
                    conn.kick = Some(crate::codec::reason::KEEP_ALIVE_TIMEOUT);
                    true
                }
                Some(conn) if conn.info.keep_alive > 0 && conn.kick.is_none() => {
                    let limit = std::time::Duration::from_secs_f64(f64::from(conn.info.keep_alive) * multiplier);
                    let expired = now.saturating_duration_since(conn.last_packet) >= limit;
                    if expired {
                        conn.kick = Some(crate::codec::reason::KEEP_ALIVE_TIMEOUT);
                    }
                    expired
                }
                _ => false,
            }
        };
        if expired {
            self.wake.notify_one();
        }
    }

    /// Locks the slot state. A poisoned lock (a panic elsewhere) still yields the data: the
    /// state is plain collections that stay consistent between statements.
    pub fn lock(&self) -> MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers a delivery under the queue limits. Returns where it went and how many
    /// messages were dropped (the offered one or older ones the drop policy evicted).
    ///
    /// An online client counts as congested (the publisher should wait) only while its
    /// queue is over half full and it took a message, or its queue filled, within the last
    /// `stall_us` microseconds: a client that stopped reading cannot hold publishers back.
    pub fn offer(&self, item: QueuedMessage, limits: QueueLimits, queue_qos0: bool, stall_us: u64) -> Offered {
        let dropped = Offered { offer: Offer::Dropped, lost: 1, congested: false };
        let mut inner = self.lock();
        if inner.removed {
            return dropped;
        }
        let online = inner.conn.is_some();
        if !online && (!inner.persistent || (item.qos == QoS::AtMostOnce && !queue_qos0)) {
            inner.dropped += 1;
            return dropped;
        }
        let SlotInner { queue, queue_bytes, dropped, .. } = &mut *inner;
        let was_empty = queue.is_empty();
        let lost = push_bounded(queue, queue_bytes, item, limits);
        *dropped += lost;
        if !online {
            return Offered { offer: Offer::Offline, lost, congested: false };
        }
        if was_empty {
            // The stall clock starts again; it is read only once the queue is over half
            // full, so the hot path (a queue that is mostly empty) reads no clock.
            inner.progress_us = 0;
        }
        let over_half = inner.queue.len() > limits.max_len / 2 || inner.queue_bytes > limits.max_bytes / 2;
        let congested = over_half && !inner.stalled && {
            let now = now_us();
            if inner.progress_us == 0 {
                inner.progress_us = now;
                true
            } else if now.saturating_sub(inner.progress_us) >= stall_us {
                // Nothing taken for a while: stalled, not draining.
                inner.stalled = true;
                false
            } else {
                true
            }
        };
        inner.congested |= congested;
        drop(inner);
        // Only the first message into an empty queue wakes the connection: while the queue
        // is not empty, a wake-up is pending, or the connection's window is full and the
        // client's acknowledgements will pump it.
        if was_empty {
            self.wake.notify_one();
        }
        Offered { offer: Offer::Online, lost, congested }
    }

    /// The queue length while publishers should still hold back for this slot's client;
    /// `None` once they need not.
    pub fn congested_backlog(&self) -> Option<usize> {
        let inner = self.lock();
        (inner.congested && !inner.stalled).then_some(inner.queue.len())
    }

    /// Marks the client stalled if its queue is no shorter than `before` (and still
    /// congested), releasing every publisher waiting for it; returns whether the waiting
    /// is over.
    pub fn mark_stalled_unless_shrunk(&self, before: usize) -> bool {
        let mut inner = self.lock();
        if !inner.congested || inner.stalled {
            return true;
        }
        if inner.queue.len() < before {
            return false;
        }
        inner.stalled = true;
        inner.congested = false;
        drop(inner);
        self.drained.notify_waiters();
        true
    }

    /// The session as data, for the session store.
    pub fn snapshot(&self) -> SessionState {
        let inner = self.lock();
        SessionState {
            client_id: self.client_id.to_string(),
            subscriptions: inner.subscriptions.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            queue: inner.queue.clone(),
            inflight: inner.inflight.to_map(),
            awaiting_rel: inner.awaiting_rel.keys().copied().collect(),
            expiry_secs: inner.expiry_secs,
            will: inner.pending_will.as_deref().cloned(),
            disconnected_at_ms: 0,
            owner: inner.owner.as_ref().and_then(|o| o.identity.username.clone()),
            epoch: inner.epoch,
        }
    }

    /// Restores a slot from stored state (a session that lived on another node or before a
    /// restart).
    pub fn restore(&self, state: SessionState) {
        let mut inner = self.lock();
        inner.persistent = true;
        inner.expiry_secs = state.expiry_secs;
        inner.subscriptions = state.subscriptions.into_iter().map(|(k, v)| (k.into_boxed_str(), v)).collect();
        inner.queue_bytes = state.queue.iter().map(|q| q.message.weight()).sum();
        inner.queue = state.queue;
        inner.last_packet_id = state.inflight.keys().next_back().copied().unwrap_or(0);
        inner.inflight = Inflight::from_map(state.inflight);
        let now = std::time::Instant::now();
        inner.awaiting_rel = state.awaiting_rel.into_iter().map(|id| (id, now)).collect();
        inner.pending_will = state.will.map(Box::new);
    }
}

impl SlotInner {
    /// Next free outbound packet id [MQTT-2.2.1-4], `None` if all 65,535 are in use.
    pub fn next_packet_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.last_packet_id = self.last_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.last_packet_id) {
                return Some(self.last_packet_id);
            }
        }
        None
    }

    /// Records PUBACK (stage `Published`: QoS 1) or PUBCOMP (stage `Released`: QoS 2).
    pub fn complete(&mut self, packet_id: u16, stage: InflightStage) -> Ack {
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
    pub fn received(&mut self, packet_id: u16, failed: bool) -> Ack {
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

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_cluster::message::{Message, MessageProperties};
    use raftmq_cluster::session::InflightMessage;

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
        let queued = QueuedMessage { message: Arc::new(message), qos, retain: false, subscription_ids: Vec::new(), shared: None };
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
