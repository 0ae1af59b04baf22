//! The slot's queue: offering deliveries under the queue bounds, draining them into the
//! connection within the inflight window, retained messages for new subscriptions, shared
//! deliveries a leaving member hands back, and the congestion signal publishers wait on.

use std::collections::VecDeque;

use raftmq_cluster::message::{now_us, QoS};
use raftmq_cluster::session::{push_bounded_with, InflightMessage, InflightStage, QueueLimits, QueuedMessage};
use raftmq_cluster::session_ops::SessionOp;

use super::journal::Pending;
use super::{SessionSlot, SlotInner};

/// What became of a delivery offered to a slot.
#[derive(Debug)]
pub struct Offered {
    /// Where it went.
    pub offer: Offer,
    /// Messages dropped to make room (or this one, if it was not queued).
    pub lost: u64,
    /// An online client's queue is over half full: the publisher should slow down.
    pub congested: bool,
    /// What the publisher waits for before it is acknowledged.
    pub durability: Durability,
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

/// How a queued delivery becomes durable.
#[derive(Debug)]
pub enum Durability {
    /// Nothing to wait for: a transient session or a QoS 0 delivery lives in memory.
    Memory,
    /// Its `Append` is on the way to the store.
    Pending(Pending),
    /// The session fell out of step with the store: [`SessionSlot::resync`] makes it durable.
    Resync,
    /// The session was handed to another node: the delivery was not taken and must fail.
    Moved,
}

/// What one pass of [`SessionSlot::pump`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pumped {
    /// The connection must close with this reason code.
    pub close: Option<u8>,
    /// Queued messages that had expired and were dropped.
    pub expired: u64,
}

/// Where a pump pass takes its deliveries from, and how it sends them.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Inflight window (the smaller of the broker's and the client's Receive Maximum).
    pub size: usize,
    /// Retained messages for new subscriptions written per pass at most.
    pub retained_batch: usize,
    /// Queue bounds (for the drained-to-a-quarter test).
    pub limits: QueueLimits,
}

impl SlotInner {
    /// Numbers a delivery the store will hold.
    fn number(&mut self, item: &mut QueuedMessage) {
        self.last_seq += 1;
        item.seq = self.last_seq;
    }
}

impl SessionSlot {
    /// Offers a delivery under the queue limits. Returns where it went, how many messages
    /// were dropped (the offered one or older ones the drop policy evicted) and, for a
    /// persistent session, the `Append` the publisher must wait for.
    ///
    /// An online client counts as congested (the publisher should wait) only while its
    /// queue is over half full and it took a message, or its queue filled, within the last
    /// `stall_us` microseconds: a client that stopped reading cannot hold publishers back.
    pub fn offer(&self, mut item: QueuedMessage, limits: QueueLimits, queue_qos0: bool, stall_us: u64) -> Offered {
        let refused = || Offered { offer: Offer::Dropped, lost: 1, congested: false, durability: Durability::Memory };
        let mut inner = self.lock();
        if inner.removed {
            return refused();
        }
        if inner.moved || inner.claiming {
            return Offered { offer: Offer::Dropped, lost: 0, congested: false, durability: Durability::Moved };
        }
        let online = inner.conn.is_some();
        if !online && (!inner.persistent || (item.qos == QoS::AtMostOnce && !queue_qos0)) {
            inner.dropped += 1;
            return refused();
        }
        // What the store keeps: QoS >= 1 deliveries, and QoS 0 ones queued while offline.
        let durable = Self::journaled(&inner) && (item.qos != QoS::AtMostOnce || !online);
        if durable {
            inner.number(&mut item);
        }
        let (seq, qos) = (item.seq, item.qos);
        let needs_ack = qos != QoS::AtMostOnce;
        let was_empty = inner.queue.is_empty();
        let mut evicted: Vec<u64> = Vec::new();
        let SlotInner { queue, queue_bytes, dropped, .. } = &mut *inner;
        let lost = push_bounded_with(queue, queue_bytes, item, limits, |old| {
            if old.seq != 0 {
                evicted.push(old.seq);
            }
        });
        *dropped += lost;
        for seq in evicted {
            self.log(&mut inner, SessionOp::Discard { seq });
        }
        let queued = inner.queue.back().is_some_and(|q| q.seq == seq);
        let mut durability = Durability::Memory;
        if durable && queued {
            let Some(item) = inner.queue.back().cloned() else { return refused() };
            let op = SessionOp::Append { item, limits };
            // The publisher waits for QoS >= 1 only: QoS 0 is never promised. A QoS 2
            // delivery goes out once stored (`may_send`).
            if needs_ack {
                let mark = (qos == QoS::ExactlyOnce).then_some(seq);
                durability = self.log_pending_marked(&mut inner, op, mark);
            } else {
                self.log(&mut inner, op);
            }
        }
        if !online {
            return Offered { offer: Offer::Offline, lost, congested: false, durability };
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
        Offered { offer: Offer::Online, lost, congested, durability }
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

    /// One pass of connection `conn_id` over its slot: records a received packet (for the
    /// keep-alive sweep) and whether a packet is half read, tells whether the connection
    /// must close, and moves deliveries into `send` within the window: retained messages for
    /// new subscriptions first (a batch per pass), then the queue. `send(item, packet_id)`
    /// writes one (packet id 0 for QoS 0) and returns false if it could not (too large for
    /// the client: dropped).
    pub fn pump(
        &self,
        conn_id: u64,
        got_packet: bool,
        partial: bool,
        window: Window,
        mut send: impl FnMut(&QueuedMessage, u16) -> bool,
    ) -> Pumped {
        let now_us = now_us();
        let now_ms = now_us / 1000;
        let mut pumped = Pumped::default();
        let mut inner = self.lock();
        match inner.conn.as_mut() {
            Some(conn) if conn.conn_id == conn_id => {
                if conn.kick.is_some() {
                    pumped.close = conn.kick;
                    return pumped;
                }
                if got_packet {
                    conn.last_packet = std::time::Instant::now();
                }
                // The partial-packet clock starts with the first byte of a packet and
                // restarts with each whole one.
                if !partial {
                    conn.partial_since = None;
                } else if got_packet || conn.partial_since.is_none() {
                    conn.partial_since = Some(std::time::Instant::now());
                }
            }
            // Fenced off after a takeover that timed out.
            _ => {
                pumped.close = Some(crate::codec::reason::SESSION_TAKEN_OVER);
                return pumped;
            }
        }
        if let Some(mut retained) = inner.retained.take() {
            let mut batch = window.retained_batch;
            while let Some(front) = retained.front() {
                if batch == 0 {
                    self.wake.notify_one();
                    break;
                }
                if front.qos != QoS::AtMostOnce && inner.inflight.len() >= window.size {
                    break;
                }
                batch -= 1;
                if !self.send_one(&mut inner, &mut retained, &mut send) {
                    break;
                }
            }
            if !retained.is_empty() {
                inner.retained = Some(retained);
            }
        }
        let queued = inner.queue.len();
        let mut queue = std::mem::take(&mut inner.queue);
        while let Some(front) = queue.front() {
            if front.qos != QoS::AtMostOnce && inner.inflight.len() >= window.size {
                break;
            }
            if front.message.is_expired(now_ms) {
                if let Some(item) = queue.pop_front() {
                    inner.queue_bytes = inner.queue_bytes.saturating_sub(item.message.weight());
                    inner.dropped += 1;
                    pumped.expired += 1;
                    if item.seq != 0 {
                        self.log(&mut inner, SessionOp::Discard { seq: item.seq });
                    }
                }
                continue;
            }
            if !self.may_send(&inner, front) {
                // Its append is on its way to the store: the mark wakes this connection.
                break;
            }
            let weight = front.message.weight();
            if !self.send_one(&mut inner, &mut queue, &mut send) {
                break;
            }
            inner.queue_bytes = inner.queue_bytes.saturating_sub(weight);
        }
        inner.queue = queue;
        if inner.queue.len() < queued {
            inner.progress_us = now_us;
        }
        if inner.congested || inner.stalled {
            let limits = window.limits;
            if inner.queue.len() <= limits.max_len / 4 && inner.queue_bytes <= limits.max_bytes / 4 {
                // Caught up: a stalled client that drained is a draining one again.
                inner.stalled = false;
                if std::mem::take(&mut inner.congested) {
                    drop(inner);
                    self.drained.notify_waiters();
                }
            }
        }
        pumped
    }

    /// Sends the front of `from`; false (nothing taken) when no packet id is free.
    fn send_one(
        &self,
        inner: &mut SlotInner,
        from: &mut VecDeque<QueuedMessage>,
        send: &mut impl FnMut(&QueuedMessage, u16) -> bool,
    ) -> bool {
        let Some(front) = from.front() else { return false };
        let packet_id = if front.qos == QoS::AtMostOnce {
            0
        } else {
            match inner.packet_id_for(front.seq) {
                Some(id) => id,
                None => return false,
            }
        };
        let Some(item) = from.pop_front() else { return false };
        let written = send(&item, packet_id);
        let seq = item.seq;
        if written && packet_id != 0 {
            inner.inflight.insert(packet_id, InflightMessage { queued: item, stage: InflightStage::Published });
            if seq != 0 {
                self.log(inner, SessionOp::Sent { seq, packet_id });
            }
        } else if seq != 0 {
            self.log(inner, SessionOp::Discard { seq });
        }
        true
    }

    /// Holds retained messages for a new subscription, to go out ahead of the queue; at
    /// most `cap` wait at once. Returns how many did not fit.
    pub fn add_retained(&self, items: Vec<QueuedMessage>, cap: usize) -> usize {
        let mut inner = self.lock();
        let waiting = inner.retained.as_ref().map_or(0, |r| r.len());
        let room = cap.saturating_sub(waiting);
        let over = items.len().saturating_sub(room);
        let journaled = Self::journaled(&inner);
        for mut item in items.into_iter().take(room) {
            if journaled && item.qos != QoS::AtMostOnce {
                inner.number(&mut item);
                let limits = raftmq_cluster::session::QueueLimits {
                    max_len: cap,
                    max_bytes: usize::MAX,
                    policy: raftmq_cluster::session::DropPolicy::DropNew,
                };
                self.log(&mut inner, SessionOp::Append { item: item.clone(), limits });
            }
            inner.retained.get_or_insert_default().push_back(item);
        }
        drop(inner);
        self.wake.notify_one();
        over
    }

    /// Takes the shared deliveries this slot holds (queued, or sent and not yet
    /// acknowledged), for the other members of their groups.
    pub fn take_shared(&self) -> Vec<QueuedMessage> {
        let mut inner = self.lock();
        let ids: Vec<u16> = inner
            .inflight
            .iter()
            .filter(|(_, m)| m.queued.shared.is_some() && m.stage == InflightStage::Published)
            .map(|(id, _)| *id)
            .collect();
        let mut taken = Vec::new();
        for packet_id in ids {
            if let Some(m) = inner.inflight.remove(&packet_id) {
                taken.push(m.queued);
                self.log(&mut inner, SessionOp::Acked { packet_id });
            }
        }
        let (shared, rest): (Vec<QueuedMessage>, Vec<QueuedMessage>) =
            std::mem::take(&mut inner.queue).into_iter().partition(|q| q.shared.is_some());
        inner.queue = rest.into();
        inner.queue_bytes = inner.queue.iter().map(|q| q.message.weight()).sum();
        for item in &shared {
            if item.seq != 0 {
                self.log(&mut inner, SessionOp::Discard { seq: item.seq });
            }
        }
        taken.extend(shared);
        taken
    }

    /// Puts back deliveries no other member took (a persistent session keeps them).
    pub fn requeue(&self, items: Vec<QueuedMessage>, limits: QueueLimits) {
        let mut inner = self.lock();
        let journaled = Self::journaled(&inner);
        for mut item in items {
            item.seq = 0;
            if journaled {
                inner.number(&mut item);
                self.log(&mut inner, SessionOp::Append { item: item.clone(), limits });
            }
            inner.queue_bytes += item.message.weight();
            inner.queue.push_back(item);
        }
    }

    /// Whether the client is online, and how many deliveries it has pending (shared
    /// dispatch prefers the least loaded member).
    pub fn load(&self) -> (bool, usize) {
        let inner = self.lock();
        (inner.conn.is_some(), inner.inflight.len() + inner.queue.len())
    }

    /// Persistent flag, queued and inflight counts, for the broker's totals.
    pub fn counts(&self) -> (bool, usize, usize) {
        let inner = self.lock();
        (inner.persistent, inner.queue.len(), inner.inflight.len())
    }
}
