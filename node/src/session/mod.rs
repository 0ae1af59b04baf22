//! A session slot: everything the broker holds for one client id, online or offline.
//!
//! The slot outlives connections. Routing pushes deliveries into its bounded queue; the
//! connection task that owns the slot drains the queue into the socket within the inflight
//! window and records acknowledgements. A takeover moves the slot from one connection task
//! to the next, so the queue, the inflight messages and the packet ids carry over.
//!
//! Every change goes through a method of [`SessionSlot`] (the state is private): the method
//! applies the change and, for a persistent session, hands the matching operation to the
//! [`Journal`] under the same lock, so the store (and later every replica) sees exactly
//! the owner's changes in the owner's order. Every QoS >= 1 delivery to a persistent
//! session is an `Append`, online or not; sending it is `Sent`, acknowledging it `Acked`.
//!
//! Concurrency: `inner` is a std `Mutex` because every critical section is short and never
//! awaits; `wake` tells the owning task there is work; `released` tells a taking-over task
//! that the previous owner let go.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use raftmq_cluster::message::QoS;
use raftmq_cluster::registry::Epoch;
use raftmq_cluster::session::{QueuedMessage, SessionState, SubscriptionOptions, WillMessage};
use raftmq_cluster::session_ops::{OpError, SessionCommand, SessionOp};
use raftmq_cluster::StoreError;
use tokio::sync::Notify;

use crate::security::Owner;

mod inflight;
mod journal;
mod queue;
pub use inflight::{Ack, Inflight};
pub use journal::{Journal, Pending};
pub use queue::{Durability, Offer, Offered, Pumped, Window};

/// What the admin API shows about a live connection (who it is and from where is the
/// slot's owner).
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

impl ConnHandle {
    /// A connection attaching now.
    pub fn new(conn_id: u64, info: ConnInfo) -> ConnHandle {
        ConnHandle { conn_id, info, kick: None, last_packet: std::time::Instant::now(), partial_since: None }
    }
}

/// Mutable state of a slot; only the slot's methods touch it.
#[derive(Debug, Default)]
struct SlotInner {
    /// Attached connection, `None` while offline.
    conn: Option<ConnHandle>,
    /// This node's claim on the client id (see `ClientRegistry`); 0 before the first.
    epoch: Epoch,
    /// The identity that created the session: only it may resume the session.
    owner: Option<Arc<Owner>>,
    /// Bumped at every attach and detach; timers compare it to know they are stale.
    generation: u64,
    /// The session outlives the connection (expiry > 0): its changes are journaled.
    persistent: bool,
    /// The store holds this session (it was claimed there or restored from there).
    stored: bool,
    /// Operations were lost on the way to the store (a full journal): the next one sent
    /// is the whole session.
    out_of_step: bool,
    /// Session expiry after disconnect, seconds.
    expiry_secs: u32,
    /// When the client disconnected, ms since the Unix epoch; 0 while connected.
    disconnected_at_ms: u64,
    /// Subscriptions by filter.
    subscriptions: HashMap<Box<str>, SubscriptionOptions>,
    /// Messages waiting for the inflight window or for the client to come back.
    queue: VecDeque<QueuedMessage>,
    /// Retained messages for new subscriptions, sent before the queue within the same
    /// window. Bounded by `retained.max_messages`; kept in the slot across a takeover.
    /// Boxed: most slots never hold any, and an idle slot should stay small (8 bytes, not 32).
    #[allow(clippy::box_collection)]
    retained: Option<Box<VecDeque<QueuedMessage>>>,
    /// Bytes in `queue`.
    queue_bytes: usize,
    /// Last delivery number handed out ([`QueuedMessage::seq`]).
    last_seq: u64,
    /// Outbound messages sent and not fully acknowledged, in send order.
    inflight: Inflight,
    /// Last packet id handed out.
    last_packet_id: u16,
    /// Inbound QoS 2 packet ids awaiting PUBREL, with the time they arrived.
    awaiting_rel: BTreeMap<u16, std::time::Instant>,
    /// A will waiting for its delay to pass.
    pending_will: Option<Box<WillMessage>>,
    /// The connected client's will is in the store (see [`SessionSlot::arm_will`]).
    will_armed: bool,
    /// The slot has been removed from the broker; nothing may be added any more.
    removed: bool,
    /// The session was handed over to another node; until that node's claim is applied
    /// here and the slot forgotten, a delivery offered to it fails (its publisher is
    /// refused) rather than vanish with a copy the new owner never got.
    moved: bool,
    /// Restored from the store for a takeover whose claim is not applied yet: the old owner
    /// may still append to the stored session until then, so the slot is read again after
    /// the claim, and a delivery offered to it meanwhile fails (its publisher is refused
    /// and sends again) instead of landing in a copy about to be replaced.
    claiming: bool,
    /// Messages dropped because the queue was full or they could not be queued.
    dropped: u64,
    /// The queue went over half full while online: publishers feeding it wait on
    /// `drained` until it is down to a quarter.
    congested: bool,
    /// The queue stopped shrinking while publishers waited for it: publishers no longer
    /// wait for this client until its queue is down to a quarter again.
    stalled: bool,
    /// When the connection last took a message from the queue, or (0) the queue has become
    /// non-empty since and the clock starts at the next congestion check (µs since the Unix
    /// epoch): how the broker tells a draining client from a stalled one.
    progress_us: u64,
}

/// Everything the broker holds for one client id.
#[derive(Debug)]
pub struct SessionSlot {
    /// Client identifier.
    pub client_id: Arc<str>,
    inner: Mutex<SlotInner>,
    /// Where a persistent session's changes go.
    journal: Arc<Journal>,
    /// Work for the owning connection task (a delivery or a kick).
    pub wake: Arc<Notify>,
    /// The highest sequence number of this slot's deliveries known to be in the store. A
    /// QoS 2 delivery waits for it before it goes out: sent earlier, a crash of this node
    /// could leave the client holding its packet id awaiting PUBREL while the session the
    /// next node resumes from the store never had it, and reuses the id for another
    /// message, which the client would then take for a resend and drop (the fault suite
    /// caught that).
    stored_seq: Arc<std::sync::atomic::AtomicU64>,
    /// The owning connection detached.
    pub released: Notify,
    /// A congested queue drained (or its client went away): throttled publishers go on.
    pub drained: Notify,
    /// Serialises CONNECTs for this client id (takeover races, F15).
    pub connect_lock: tokio::sync::Mutex<()>,
}

/// A connection taking a slot: what [`SessionSlot::attach`] records.
#[derive(Debug)]
pub struct Attach {
    /// The connection.
    pub conn: ConnHandle,
    /// This node's claim on the client id.
    pub epoch: Epoch,
    /// Session Expiry Interval granted (0: the session ends with the connection).
    pub expiry_secs: u32,
    /// Who connected.
    pub owner: Arc<Owner>,
    /// Clean Start: the stored session starts empty.
    pub clean: bool,
}

/// What [`SessionSlot::detach`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detached {
    /// Another connection holds the slot now (a takeover that timed out fenced this one).
    pub fenced: bool,
    /// The session outlives the connection.
    pub persistent: bool,
    /// Generation after the detach, for the timers.
    pub generation: u64,
    /// Session expiry, seconds.
    pub expiry_secs: u32,
}

/// What a slot gives up when it is discarded.
#[derive(Debug)]
pub struct Discarded {
    /// Its subscriptions.
    pub filters: Vec<String>,
    /// A will still waiting for its delay.
    pub will: Option<Box<WillMessage>>,
    /// The epoch it was held under.
    pub epoch: Epoch,
    /// The store holds the session.
    pub stored: bool,
}

/// A slot as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SlotView {
    /// The attached connection, if any.
    pub conn: Option<ConnInfo>,
    /// Identity and address of the attached connection.
    pub owner: Option<Arc<Owner>>,
    /// The session outlives the connection.
    pub persistent: bool,
    /// Session expiry, seconds.
    pub expiry_secs: u32,
    /// Number of subscriptions.
    pub subscriptions: usize,
    /// Queued messages.
    pub queued: usize,
    /// Messages in flight.
    pub inflight: usize,
    /// Messages dropped for this session.
    pub dropped: u64,
}

impl SessionSlot {
    /// A fresh, offline, empty slot whose persistent changes go to `journal`.
    pub fn new(client_id: Arc<str>, journal: Arc<Journal>) -> SessionSlot {
        SessionSlot {
            client_id,
            inner: Mutex::new(SlotInner::default()),
            journal,
            wake: Arc::new(Notify::new()),
            stored_seq: Arc::default(),
            released: Notify::new(),
            drained: Notify::new(),
            connect_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Locks the slot state. A poisoned lock (a panic elsewhere) still yields the data: the
    /// state is plain collections that stay consistent between statements.
    fn lock(&self) -> MutexGuard<'_, SlotInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&self, inner: &SlotInner, op: SessionOp) -> SessionCommand {
        SessionCommand { client_id: self.client_id.to_string(), epoch: inner.epoch, op }
    }

    /// Whether changes of this slot go to the store.
    fn journaled(inner: &SlotInner) -> bool {
        inner.persistent && inner.stored && !inner.removed
    }

    /// Hands `op`, just applied to `inner`, to the journal without waiting. Call with the
    /// lock held: that is what keeps the store's order the slot's order. If the journal
    /// has no room the slot falls out of step and its next journaled change is the whole
    /// session.
    fn log(&self, inner: &mut SlotInner, op: SessionOp) {
        if !Self::journaled(inner) {
            return;
        }
        if inner.out_of_step {
            if self.journal.has_room() {
                let whole = SessionOp::Reset(Box::new(self.state_of(inner)));
                inner.out_of_step = !self.journal.try_submit(self.command(inner, whole));
            }
            return;
        }
        if !self.journal.try_submit(self.command(inner, op)) {
            inner.out_of_step = true;
        }
    }

    /// Like [`Self::log`], for a change whose durability the caller waits for.
    fn log_pending(&self, inner: &mut SlotInner, op: SessionOp) -> Durability {
        self.log_pending_marked(inner, op, None)
    }

    /// Like [`Self::log_pending`], for the append of delivery `seq`: once stored, the
    /// slot's stored sequence number reaches it ([`SessionSlot::may_send`]).
    fn log_pending_marked(&self, inner: &mut SlotInner, op: SessionOp, seq: Option<u64>) -> Durability {
        if !Self::journaled(inner) {
            return Durability::Memory;
        }
        if inner.out_of_step {
            return Durability::Resync;
        }
        let mark = seq.map(|seq| crate::session::journal::Mark { stored: Arc::clone(&self.stored_seq), seq, wake: Arc::clone(&self.wake) });
        match self.journal.try_submit_pending(self.command(inner, op), mark) {
            Some(pending) => Durability::Pending(pending),
            None => {
                inner.out_of_step = true;
                Durability::Resync
            }
        }
    }

    /// Waits until a change whose [`Durability`] a method returned is stored. A change the
    /// store fenced (the session moved meanwhile) is no failure here: the new owner answers
    /// for the session from then on. A delivery to a slot already handed over
    /// ([`Durability::Moved`]) never reached the session: that is one.
    pub async fn stored(&self, durability: Durability) -> Result<(), StoreError> {
        match durability {
            Durability::Memory => Ok(()),
            Durability::Pending(p) => p.wait().await.map(|_| ()),
            Durability::Resync => self.resync().await,
            Durability::Moved => Err(StoreError::Fenced),
        }
    }

    /// Like [`SessionSlot::stored`], but a change the store fenced is an error: for a
    /// PUBREL, whose stage the new owner does not have (it would send the PUBLISH again,
    /// which the client, told to release the id, would take as new).
    pub async fn stored_here(&self, durability: Durability) -> Result<(), StoreError> {
        match durability {
            Durability::Pending(p) => fenced_is_error(p.wait().await?),
            other => self.stored(other).await,
        }
    }

    /// Sends the whole session to the store if operations were lost on the way, and waits
    /// until it is durable.
    pub async fn resync(&self) -> Result<(), StoreError> {
        let mut room = self.journal.reserve(1).await?;
        let (pending, last_seq) = {
            let mut inner = self.lock();
            if !inner.out_of_step || !Self::journaled(&inner) {
                return Ok(());
            }
            inner.out_of_step = false;
            let whole = SessionOp::Reset(Box::new(self.state_of(&inner)));
            (room.submit(self.command(&inner, whole)), inner.last_seq)
        };
        match pending {
            Some(p) => {
                fenced_is_error(p.wait().await?)?;
                self.stored_up_to(last_seq);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Every delivery up to `seq` is in the store.
    fn stored_up_to(&self, seq: u64) {
        journal::raise(&self.stored_seq, seq, &self.wake);
    }

    /// Whether delivery `item` may go out now: anything but a QoS 2 delivery of a stored
    /// session always; that once its append is stored (see `stored_seq`).
    fn may_send(&self, inner: &SlotInner, item: &QueuedMessage) -> bool {
        item.qos != QoS::ExactlyOnce
            || item.seq == 0
            || !Self::journaled(inner)
            || item.seq <= self.stored_seq.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Applies a change and waits until its operation is durable: subscriptions, whose
    /// SUBACK / UNSUBACK promises them.
    async fn change_durably(&self, change: impl FnOnce(&mut SlotInner) -> SessionOp) -> Result<(), StoreError> {
        let journaled = Self::journaled(&self.lock());
        let mut room = if journaled { Some(self.journal.reserve(1).await?) } else { None };
        let pending = {
            let mut inner = self.lock();
            let op = change(&mut inner);
            match room.as_mut() {
                Some(room) if Self::journaled(&inner) => {
                    let op = if std::mem::take(&mut inner.out_of_step) { SessionOp::Reset(Box::new(self.state_of(&inner))) } else { op };
                    room.submit(self.command(&inner, op))
                }
                _ => {
                    // Became journaled while we looked (it never does mid-connection);
                    // the next change will carry the whole session.
                    inner.out_of_step |= Self::journaled(&inner);
                    None
                }
            }
        };
        match pending {
            Some(p) => fenced_is_error(p.wait().await?),
            None => Ok(()),
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
                let stale: Vec<u16> =
                    inner.awaiting_rel.iter().filter(|(_, since)| now.duration_since(**since) >= rel_timeout).map(|(id, _)| *id).collect();
                for packet_id in stale {
                    inner.awaiting_rel.remove(&packet_id);
                    self.log(&mut inner, SessionOp::InboundReleased { packet_id });
                }
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

    /// The session as data, for the session store.
    pub fn snapshot(&self) -> SessionState {
        self.state_of(&self.lock())
    }

    /// The session, handed to another node: from now on deliveries to this slot fail
    /// ([`Durability::Moved`]) until it is forgotten.
    pub fn hand_off(&self) -> SessionState {
        let mut inner = self.lock();
        inner.moved = true;
        self.state_of(&inner)
    }

    /// Marks the slot as restored for a takeover not claimed yet (see `claiming`), or no
    /// longer.
    pub fn set_claiming(&self, claiming: bool) {
        self.lock().claiming = claiming;
    }

    /// Whether the session was handed to another node ([`SessionSlot::hand_off`]).
    pub fn is_moved(&self) -> bool {
        self.lock().moved
    }

    fn state_of(&self, inner: &SlotInner) -> SessionState {
        // Retained messages waiting for a new subscription are deliveries like the queue's,
        // and go out first.
        let retained = inner.retained.iter().flat_map(|r| r.iter()).filter(|q| q.seq != 0);
        SessionState {
            client_id: self.client_id.to_string(),
            subscriptions: inner.subscriptions.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            queue: retained.chain(inner.queue.iter().filter(|q| q.seq != 0)).cloned().collect(),
            inflight: inner.inflight.to_map(),
            awaiting_rel: inner.awaiting_rel.keys().copied().collect(),
            expiry_secs: inner.expiry_secs,
            will: inner.pending_will.as_deref().cloned(),
            disconnected_at_ms: inner.disconnected_at_ms,
            owner: inner.owner.as_ref().and_then(|o| o.identity.username.clone()),
            epoch: inner.epoch,
        }
    }

    /// Restores a slot from a session that lived on another node or before a restart;
    /// `in_store`: the session store holds it already (else the next attach writes it).
    pub fn restore(&self, state: SessionState, in_store: bool) {
        let mut inner = self.lock();
        inner.persistent = true;
        inner.stored = in_store;
        inner.expiry_secs = state.expiry_secs;
        inner.subscriptions = state.subscriptions.into_iter().map(|(k, v)| (k.into_boxed_str(), v)).collect();
        inner.queue_bytes = state.queue.iter().map(|q| q.message.weight()).sum();
        let last_queued = state.queue.iter().map(|q| q.seq).max().unwrap_or(0);
        let last_sent = state.inflight.values().map(|m| m.queued.seq).max().unwrap_or(0);
        inner.last_seq = last_queued.max(last_sent);
        inner.queue = state.queue;
        inner.last_packet_id = state.inflight.keys().next_back().copied().unwrap_or(0);
        inner.inflight = Inflight::from_map(state.inflight);
        let now = std::time::Instant::now();
        inner.awaiting_rel = state.awaiting_rel.into_iter().map(|id| (id, now)).collect();
        inner.pending_will = state.will.map(Box::new);
        if in_store {
            self.stored_up_to(inner.last_seq);
        }
    }

    /// Restores a session the store held when this node started (it was this node's):
    /// detached, under its stored epoch; returns the generation timers must match.
    pub fn recover(&self, state: SessionState) -> u64 {
        let (epoch, disconnected_at_ms) = (state.epoch, state.disconnected_at_ms);
        self.restore(state, true);
        let mut inner = self.lock();
        inner.epoch = epoch;
        inner.disconnected_at_ms = disconnected_at_ms;
        inner.generation += 1;
        inner.generation
    }

    /// Attaches a connection under a new epoch. A persistent session is claimed in the
    /// store (a clean start empties it there in the same step) and, if the store does not
    /// hold what this slot holds yet, given the whole session; resolves once durable.
    pub async fn attach(&self, a: Attach) -> Result<(), StoreError> {
        let persistent = a.expiry_secs > 0;
        let mut room = if persistent { Some(self.journal.reserve(2).await?) } else { None };
        let last_seq;
        let pending = {
            let mut inner = self.lock();
            let known_to_store = inner.stored && inner.persistent;
            let holds_state = !inner.subscriptions.is_empty() || !inner.queue.is_empty() || !inner.inflight.is_empty();
            inner.epoch = a.epoch;
            inner.conn = Some(a.conn);
            inner.generation += 1;
            inner.persistent = persistent;
            inner.expiry_secs = a.expiry_secs;
            inner.disconnected_at_ms = 0;
            let username = a.owner.identity.username.clone();
            inner.owner = Some(a.owner);
            // A reconnect before the will delay passed cancels the will [MQTT-3.1.3-9]
            // (a claim clears the stored will too).
            inner.pending_will = None;
            inner.will_armed = false;
            let mut pending = Vec::new();
            last_seq = inner.last_seq;
            if let Some(room) = room.as_mut() {
                inner.stored = true;
                let claim = SessionOp::Claim { clean: a.clean, owner: username, expiry_secs: a.expiry_secs };
                pending.extend(room.submit(self.command(&inner, claim)));
                if std::mem::take(&mut inner.out_of_step) || (!known_to_store && holds_state) {
                    let whole = SessionOp::Reset(Box::new(self.state_of(&inner)));
                    pending.extend(room.submit(self.command(&inner, whole)));
                }
            }
            pending
        };
        for p in pending {
            fenced_is_error(p.wait().await?)?;
        }
        // What the session held is in the store now (a session handed over from another
        // node came with deliveries that node may not have stored).
        self.stored_up_to(last_seq);
        Ok(())
    }

    /// Detaches connection `conn_id` when it ends; a persistent session records the time.
    pub fn detach(&self, conn_id: u64, now_ms: u64) -> Detached {
        let mut inner = self.lock();
        let mine = inner.conn.as_ref().is_some_and(|c| c.conn_id == conn_id);
        if mine {
            inner.conn = None;
            inner.generation += 1;
            inner.disconnected_at_ms = now_ms;
            self.log(&mut inner, SessionOp::Disconnected { at_ms: now_ms });
            // Publishers held back for this client go on.
            inner.congested = false;
            self.drained.notify_waiters();
        }
        Detached {
            fenced: !mine && inner.conn.is_some(),
            persistent: inner.persistent && !inner.removed,
            generation: inner.generation,
            expiry_secs: inner.expiry_secs,
        }
    }

    /// Fences off an attached connection that did not let go in time: it can no longer
    /// deliver or detach for this slot.
    pub fn fence_off(&self) {
        let mut inner = self.lock();
        inner.conn = None;
        inner.generation += 1;
    }

    /// Records the connected client's will in the store only (it is not pending while the
    /// client is connected), so the node that adopts the session after this one died
    /// publishes it. The CONNACK waits for the returned durability.
    pub fn arm_will(&self, will: WillMessage) -> Durability {
        let mut inner = self.lock();
        inner.will_armed = true;
        self.log_pending(&mut inner, SessionOp::SetWill(Some(will)))
    }

    /// The client went away without a will left to publish: the stored one goes.
    pub fn disarm_will(&self) {
        let mut inner = self.lock();
        if std::mem::take(&mut inner.will_armed) && inner.pending_will.is_none() {
            self.log(&mut inner, SessionOp::SetWill(None));
        }
    }

    /// Holds a will until its delay passes (the store holds it too).
    pub fn hold_will(&self, will: WillMessage) {
        let mut inner = self.lock();
        inner.will_armed = false;
        inner.pending_will = Some(Box::new(will.clone()));
        self.log(&mut inner, SessionOp::SetWill(Some(will)));
    }

    /// Takes the pending will for publication, if the slot is still at `generation` and
    /// `current(epoch)` says this node still owns the client id.
    pub fn take_will(&self, generation: u64, current: impl FnOnce(Epoch) -> bool) -> Option<Box<WillMessage>> {
        let mut inner = self.lock();
        if inner.generation != generation || !current(inner.epoch) {
            return None;
        }
        let will = inner.pending_will.take()?;
        self.log(&mut inner, SessionOp::SetWill(None));
        Some(will)
    }

    /// Marks the slot removed and gives up its subscriptions and pending will.
    pub fn discard(&self) -> Discarded {
        let mut inner = self.lock();
        inner.removed = true;
        inner.generation += 1;
        Discarded {
            filters: inner.subscriptions.drain().map(|(f, _)| f.into_string()).collect(),
            will: inner.pending_will.take(),
            epoch: inner.epoch,
            stored: inner.stored,
        }
    }

    /// Marks a slot nobody uses removed (a CONNECT refused before attaching); false if a
    /// connection or any state is there.
    pub fn remove_if_unused(&self) -> bool {
        let mut inner = self.lock();
        let unused = inner.conn.is_none() && inner.owner.is_none() && inner.subscriptions.is_empty() && inner.queue.is_empty();
        if unused {
            inner.removed = true;
        }
        unused
    }

    /// Marks the slot removed.
    pub fn mark_removed(&self) {
        self.lock().removed = true;
    }

    /// This node's claim on the client id (0 before the first).
    pub fn epoch(&self) -> Epoch {
        self.lock().epoch
    }

    /// Bumped at every attach and detach: timers compare it to know they are stale.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The slot has been removed from the broker.
    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }

    /// The identity that created the session.
    pub fn owner(&self) -> Option<Arc<Owner>> {
        self.lock().owner.clone()
    }

    /// A connection is attached.
    pub fn is_online(&self) -> bool {
        self.lock().conn.is_some()
    }

    /// The slot holds a session worth resuming (persistent, or with subscriptions or queued
    /// messages).
    pub fn has_session(&self) -> bool {
        let inner = self.lock();
        inner.persistent || !inner.subscriptions.is_empty() || !inner.queue.is_empty()
    }

    /// Changes the Session Expiry Interval (MQTT 5 DISCONNECT).
    pub fn set_expiry(&self, expiry_secs: u32) {
        let mut inner = self.lock();
        inner.expiry_secs = expiry_secs;
        self.log(&mut inner, SessionOp::SetExpiry(expiry_secs));
        inner.persistent = expiry_secs > 0;
    }

    /// Adds or replaces a subscription in the session; resolves once durable.
    pub async fn subscribe(&self, filter: &str, options: SubscriptionOptions) -> Result<(), StoreError> {
        self.change_durably(|inner| {
            inner.subscriptions.insert(Box::from(filter), options);
            SessionOp::Subscribe { filter: filter.to_owned(), options }
        })
        .await
    }

    /// Removes a subscription from the session; resolves once durable.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), StoreError> {
        self.change_durably(|inner| {
            inner.subscriptions.remove(filter);
            SessionOp::Unsubscribe { filter: filter.to_owned() }
        })
        .await
    }

    /// Whether one more subscription would pass `max` (a filter already there replaces).
    pub fn subscriptions_full(&self, filter: &str, max: usize) -> bool {
        let inner = self.lock();
        !inner.subscriptions.contains_key(filter) && inner.subscriptions.len() >= max
    }

    /// The session's subscriptions, sorted by filter.
    pub fn subscriptions(&self) -> Vec<(String, SubscriptionOptions)> {
        let inner = self.lock();
        let mut subs: Vec<(String, SubscriptionOptions)> = inner.subscriptions.iter().map(|(f, o)| (f.to_string(), *o)).collect();
        subs.sort_by(|a, b| a.0.cmp(&b.0));
        subs
    }

    /// The slot as the admin API shows it.
    pub fn view(&self) -> SlotView {
        let inner = self.lock();
        SlotView {
            conn: inner.conn.as_ref().map(|c| c.info.clone()),
            owner: inner.owner.clone().filter(|_| inner.conn.is_some()),
            persistent: inner.persistent,
            expiry_secs: inner.expiry_secs,
            subscriptions: inner.subscriptions.len(),
            queued: inner.queue.len(),
            inflight: inner.inflight.len(),
            dropped: inner.dropped,
        }
    }
}

/// A fenced operation is the client's problem (the session lives elsewhere now); a session
/// the store no longer has takes nothing and is no error.
fn fenced_is_error(outcome: Result<raftmq_cluster::session_ops::Applied, OpError>) -> Result<(), StoreError> {
    match outcome {
        Err(OpError::Fenced { .. }) => Err(StoreError::Fenced),
        _ => Ok(()),
    }
}
