//! The broker: session slots by client id, the subscription index, routing, wills and
//! session expiry. Connection tasks call in here; nothing here knows about sockets or
//! packets.
//!
//! Architecture invariant: a slot has at most one attached connection. Attaching takes the
//! slot's `connect_lock`, kicks the previous owner and waits for it to detach (bounded by
//! `takeover_timeout_secs`), so two connections never deliver for one session.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use raftmq_cluster::message::{now_ms, now_us, Message, QoS};
use raftmq_cluster::retained::{MemoryRetainedStore, RetainOutcome, RetainedLimits, RetainedStore};
use raftmq_cluster::routes::{LocalRoutes, RouteTable};
use raftmq_cluster::session::{
    InflightStage, MemorySessionStore, QueueLimits, QueuedMessage, SessionStore, ShareTarget, SubscriptionOptions, WillMessage,
};
use raftmq_cluster::StoreError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::routing::index::{SharedKey, SubscriptionIndex};
use crate::routing::shared::{self, Dispatcher, MemberLoad};
use crate::security::acl::{Access, Subject};
use crate::security::bans::{Bans, Flapping, LoginFailures};
use crate::security::enhanced::AuthMethods;
use crate::security::verify_pool::VerifyPool;
use crate::security::{Owner, Security, SecurityError};
use crate::session::{ConnHandle, ConnInfo, Offer, Offered, SessionSlot};
use crate::telemetry::log_limit::LogLimits;
use crate::telemetry::printable::Printable;
use crate::telemetry::stats::{DropReason, SessionSummary, Stats};

/// Why a connection ended, as far as wills and sessions care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// DISCONNECT with reason 0x00: discard the will.
    Normal,
    /// DISCONNECT 0x04, or any abnormal end: publish the will.
    PublishWill,
    /// Another connection took the session over.
    TakenOver,
}

/// Where a client's message went.
#[derive(Debug)]
pub struct Routed {
    /// Sessions and shared groups that matched.
    pub matched: usize,
    /// An online subscriber whose queue is over half full.
    pub congested: Option<Arc<SessionSlot>>,
}

/// Why a connection could not attach to its session.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The session belongs to another identity (`auth.bind_session_to_user`).
    #[error("the session belongs to another user")]
    NotOwner,
    /// `mqtt.max_sessions` sessions exist already.
    #[error("too many sessions")]
    TooManySessions,
    /// The session store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a connection gets when it attaches to a session.
#[derive(Debug)]
pub struct Attached {
    /// The slot now owned by the connection.
    pub slot: Arc<SessionSlot>,
    /// Whether an existing session was resumed (CONNACK Session Present).
    pub session_present: bool,
}

/// The shared state of one node.
pub struct Broker {
    /// Configuration in force.
    pub config: Arc<Config>,
    /// Enhanced authentication methods (MQTT 5 AUTH).
    pub auth: AuthMethods,
    /// Authenticator chain and ACL; std `RwLock` so a reload swaps them at once.
    security: std::sync::RwLock<Arc<Security>>,
    /// Banned clients, users and networks.
    pub bans: Bans,
    /// Reconnect-storm detection.
    pub flapping: Flapping,
    /// Failed logins per address and user name.
    pub login_failures: LoginFailures,
    /// Password checks, on a fixed pool with a bounded queue.
    pub verify_pool: VerifyPool,
    /// Log lines a client can provoke, rate-limited.
    pub log_limits: LogLimits,
    sessions: DashMap<Arc<str>, Arc<SessionSlot>>,
    index: SubscriptionIndex,
    retained: Arc<dyn RetainedStore>,
    store: Arc<dyn SessionStore>,
    routes: Arc<dyn RouteTable>,
    dispatcher: Dispatcher,
    next_conn_id: AtomicU64,
    /// Connections handling packets they have read, right now (see
    /// `connection::let_earlier_packets_land`).
    pub handling: AtomicUsize,
    /// Counters.
    pub stats: Stats,
    /// Prometheus exposition of the counters.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// Cancelled at shutdown; every task watches it.
    pub shutdown: CancellationToken,
    /// Every connection and timer task, awaited at shutdown.
    pub tasks: TaskTracker,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("node", &self.config.node_name).field("sessions", &self.sessions.len()).finish()
    }
}

impl Broker {
    /// A single-node broker with in-memory stores. Fails if a security file is unusable.
    pub fn new(config: Config, auth: AuthMethods) -> Result<Arc<Broker>, SecurityError> {
        let retained = Arc::new(MemoryRetainedStore::new(RetainedLimits {
            max_messages: if config.retained.enabled { config.retained.max_messages } else { 0 },
            max_bytes: config.retained.max_bytes,
            max_payload: config.retained.max_payload,
        }));
        Broker::with_stores(config, auth, retained, Arc::new(MemorySessionStore::new()), Arc::new(LocalRoutes::new()))
    }

    /// A broker over the given stores (the cluster plugs its replicated stores in here).
    pub fn with_stores(
        config: Config,
        auth: AuthMethods,
        retained: Arc<dyn RetainedStore>,
        store: Arc<dyn SessionStore>,
        routes: Arc<dyn RouteTable>,
    ) -> Result<Arc<Broker>, SecurityError> {
        let dispatcher = Dispatcher::new(config.shared.strategy);
        let security = std::sync::RwLock::new(Arc::new(Security::load(&config)?));
        let bans = Bans::from_config(&config.bans)?;
        let flapping = Flapping::new(config.flapping.clone());
        let a = &config.auth;
        let login_failures =
            LoginFailures::new(a.max_failures_per_address, a.max_failures_per_user, Duration::from_secs(a.failure_window_secs));
        let workers = a.verify_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let verify_pool = VerifyPool::new(workers, a.verify_queue);
        Ok(Arc::new(Broker {
            security,
            bans,
            flapping,
            login_failures,
            verify_pool,
            log_limits: LogLimits::default(),
            auth,
            dispatcher,
            config: Arc::new(config),
            sessions: DashMap::new(),
            index: SubscriptionIndex::default(),
            retained,
            store,
            routes,
            next_conn_id: AtomicU64::new(1),
            handling: AtomicUsize::new(0),
            stats: Stats::default(),
            metrics: crate::telemetry::metrics::Metrics::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    /// The authenticator and ACL in force.
    pub fn security(&self) -> Arc<Security> {
        Arc::clone(&self.security.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Re-reads the password, JWT key and ACL files. On failure the previous settings stay
    /// in force and the error is returned.
    pub async fn reload_security(&self) -> Result<(), SecurityError> {
        let fresh = Arc::new(Security::load(&self.config)?);
        *self.security.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        self.revoke(&fresh).await;
        Ok(())
    }

    /// Applies a reloaded security bundle to the sessions that exist: a connected client
    /// whose user is gone (or an anonymous one once anonymous access is off) is
    /// disconnected (MQTT 5: DISCONNECT 0x87), and subscriptions the new rules no longer
    /// allow are removed, online or offline.
    async fn revoke(&self, security: &Security) {
        let (mut kicked, mut removed) = (0usize, 0usize);
        for slot in self.slots() {
            let (owner, filters) = {
                let inner = slot.lock();
                let Some(owner) = inner.owner.clone() else { continue };
                (owner, inner.subscriptions.keys().map(|f| f.to_string()).collect::<Vec<String>>())
            };
            if !security.authenticator.still_valid(&owner.identity) && slot.kick(crate::codec::reason::NOT_AUTHORIZED) {
                kicked += 1;
            }
            let subject = Subject { client_id: &slot.client_id, identity: &owner.identity, peer: owner.peer.ip() };
            for filter in filters {
                let topic_filter = match shared::parse(&filter) {
                    Ok(Some((_, inner))) => inner,
                    _ => filter.as_str(),
                };
                if !security.allows(&subject, Access::Subscribe, topic_filter) {
                    if let Err(e) = self.unsubscribe(&slot, &filter).await {
                        tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to remove a revoked subscription");
                    }
                    removed += 1;
                }
            }
        }
        if kicked + removed > 0 {
            tracing::info!(disconnected = kicked, subscriptions_removed = removed, "reload revoked access");
        }
    }

    /// A fresh connection number.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Number of sessions (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of distinct subscribed filters.
    pub fn subscription_filter_count(&self) -> usize {
        self.index.filter_count()
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.count()
    }

    /// Bytes held by retained messages.
    pub fn retained_bytes(&self) -> usize {
        self.retained.bytes()
    }

    /// Number of routes.
    pub fn route_count(&self) -> usize {
        self.routes.count()
    }

    /// Number of distinct shared subscriptions.
    pub fn shared_subscription_count(&self) -> usize {
        self.index.shared_count()
    }

    /// Sessions, persistent sessions, queued and inflight messages, summed over all slots.
    pub fn session_summary(&self) -> SessionSummary {
        let mut sum = SessionSummary::default();
        for slot in self.sessions.iter() {
            let inner = slot.lock();
            sum.sessions += 1;
            sum.persistent += usize::from(inner.persistent);
            sum.queued += inner.queue.len();
            sum.inflight += inner.inflight.len();
        }
        sum
    }

    /// Runs [`SessionSlot::sweep`] over every session.
    pub fn sweep_sessions(&self, keepalive_multiplier: f64, rel_timeout: Duration) {
        let now = std::time::Instant::now();
        let packet_timeout = Duration::from_secs(self.config.mqtt.packet_timeout_secs);
        for slot in self.sessions.iter() {
            slot.sweep(now, keepalive_multiplier, rel_timeout, packet_timeout);
        }
    }

    /// How long an online client may take nothing from its queue before publishers stop
    /// waiting for it: a quarter of `publish_backpressure_ms`, in microseconds.
    pub fn stall_us(&self) -> u64 {
        (self.config.mqtt.publish_backpressure_ms * 1000 / 4).max(5_000)
    }

    /// The queue bounds of every session.
    pub fn queue_limits(&self) -> QueueLimits {
        let m = &self.config.mqtt;
        QueueLimits { max_len: m.max_queue_len, max_bytes: m.max_queue_bytes, policy: m.queue_drop_policy.into() }
    }

    /// Attaches connection `conn_id` to the session of `client_id`, taking it over from any
    /// previous connection. `clean_start` discards an existing session [MQTT-3.1.2-4];
    /// otherwise it is resumed [MQTT-3.1.2-5]. `expiry_secs` 0 makes the session end with
    /// the connection.
    pub async fn attach(
        &self,
        client_id: &str,
        conn_id: u64,
        clean_start: bool,
        expiry_secs: u32,
        info: ConnInfo,
        owner: Arc<Owner>,
    ) -> Result<Attached, AttachError> {
        loop {
            let id: Arc<str> = Arc::from(client_id);
            let mut fresh = false;
            let slot = self
                .sessions
                .entry(Arc::clone(&id))
                .or_insert_with(|| {
                    fresh = true;
                    Arc::new(SessionSlot::new(id))
                })
                .clone();
            if fresh && self.sessions.len() > self.config.mqtt.max_sessions {
                // A flood of new client ids must not grow memory without bound.
                slot.lock().removed = true;
                self.sessions.remove_if(client_id, |_, s| Arc::ptr_eq(s, &slot));
                return Err(AttachError::TooManySessions);
            }
            let _guard = slot.connect_lock.lock().await;
            if slot.lock().removed {
                continue;
            }
            // A session, live or stored, is only for the identity that created it: checked
            // before anything is kicked, taken over or cleaned.
            let live_owner = slot.lock().owner.clone();
            let stored = if live_owner.is_none() { self.store.load(client_id).await? } else { None };
            if self.config.auth.bind_session_to_user {
                let claimed_by = match (&live_owner, &stored) {
                    (Some(o), _) => Some(o.identity.username.as_deref()),
                    (None, Some(state)) => Some(state.owner.as_deref()),
                    (None, None) => None,
                };
                if claimed_by.is_some_and(|user| user != owner.identity.username.as_deref()) {
                    if fresh {
                        self.drop_if_unused(&slot);
                    }
                    return Err(AttachError::NotOwner);
                }
            }
            self.take_over(&slot, crate::codec::reason::SESSION_TAKEN_OVER).await;
            if slot.lock().removed {
                // The previous owner's session ended with its connection.
                continue;
            }
            let mut session_present = false;
            let existed = {
                let inner = slot.lock();
                inner.persistent || !inner.subscriptions.is_empty() || !inner.queue.is_empty()
            };
            if clean_start {
                if existed {
                    self.discard(&slot).await?;
                    continue;
                }
                // A fresh slot may still have a stored session (another node, or a restart).
                if stored.is_some() {
                    self.store.remove(client_id).await?;
                }
            } else if existed {
                session_present = true;
            } else if let Some(state) = stored {
                for (filter, opts) in &state.subscriptions {
                    self.index_subscribe(&slot, filter, *opts).await;
                }
                slot.restore(state);
                session_present = true;
            }
            {
                let mut inner = slot.lock();
                inner.conn = Some(ConnHandle {
                    conn_id,
                    info: info.clone(),
                    kick: None,
                    last_packet: std::time::Instant::now(),
                    partial_since: None,
                });
                inner.generation += 1;
                inner.persistent = expiry_secs > 0;
                inner.expiry_secs = expiry_secs;
                inner.owner = Some(Arc::clone(&owner));
                // A reconnect before the will delay passed cancels the will [MQTT-3.1.3-9].
                inner.pending_will = None;
            }
            if expiry_secs > 0 {
                self.store.save(slot.snapshot()).await?;
            }
            return Ok(Attached { slot: Arc::clone(&slot), session_present });
        }
    }

    /// Removes a slot made for a CONNECT that was refused before attaching, unless another
    /// connection started using it meanwhile.
    fn drop_if_unused(&self, slot: &Arc<SessionSlot>) {
        let mut inner = slot.lock();
        if inner.conn.is_none() && inner.owner.is_none() && inner.subscriptions.is_empty() && inner.queue.is_empty() {
            inner.removed = true;
            drop(inner);
            self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        }
    }

    /// Kicks the connection attached to `slot` (if any) with `reason` and waits for it to
    /// detach.
    async fn take_over(&self, slot: &Arc<SessionSlot>, reason: u8) {
        let released = slot.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if !slot.kick(reason) {
            return;
        }
        if reason == crate::codec::reason::SESSION_TAKEN_OVER {
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        let timeout = Duration::from_secs(self.config.mqtt.takeover_timeout_secs);
        if tokio::time::timeout(timeout, released).await.is_err() {
            // The old task is stuck (for example in a blocked write); fence it off.
            tracing::warn!(client_id = %Printable(&slot.client_id), "previous connection did not release the session in time");
            let mut inner = slot.lock();
            inner.conn = None;
            inner.generation += 1;
        }
    }

    /// Ends a session: subscriptions, queue, store entry; publishes a pending will.
    async fn discard(&self, slot: &Arc<SessionSlot>) -> Result<(), StoreError> {
        let (filters, will) = {
            let mut inner = slot.lock();
            inner.removed = true;
            inner.generation += 1;
            let filters: Vec<String> = inner.subscriptions.drain().map(|(f, _)| f.into_string()).collect();
            (filters, inner.pending_will.take())
        };
        for filter in filters {
            self.index_unsubscribe(slot, &filter).await;
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        self.store.remove(&slot.client_id).await?;
        if let Some(will) = will {
            self.publish_will_now(will.message).await;
        }
        Ok(())
    }

    /// Detaches connection `conn_id` from its slot when the connection ends.
    pub async fn detach(self: &Arc<Self>, slot: &Arc<SessionSlot>, conn_id: u64, end: EndKind, will: Option<WillMessage>) {
        let will = will.filter(|_| end != EndKind::Normal);
        let (fenced, persistent, generation, expiry) = {
            let mut inner = slot.lock();
            let mine = inner.conn.as_ref().is_some_and(|c| c.conn_id == conn_id);
            if mine {
                inner.conn = None;
                inner.generation += 1;
                // Publishers held back for this client go on.
                inner.congested = false;
                slot.drained.notify_waiters();
            }
            // Not ours any more: a takeover that timed out fenced this connection off.
            let fenced = !mine && inner.conn.is_some();
            (fenced, inner.persistent && !inner.removed, inner.generation, inner.expiry_secs)
        };
        if fenced {
            if let Some(will) = will {
                self.publish_will_now(will.message).await;
            }
            return;
        }
        self.redispatch_shared(slot, persistent).await;
        if !persistent {
            if let Err(e) = self.discard(slot).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to remove session");
            }
            if let Some(will) = will {
                self.publish_will_now(will.message).await;
            }
        } else {
            match will {
                Some(will) if will.delay_secs > 0 => {
                    slot.lock().pending_will = Some(Box::new(will.clone()));
                    let delay = Duration::from_secs(u64::from(will.delay_secs.min(expiry)));
                    self.spawn_will_timer(Arc::clone(slot), generation, delay);
                }
                Some(will) => self.publish_will_now(will.message).await,
                None => {}
            }
            let mut state = slot.snapshot();
            state.disconnected_at_ms = now_ms();
            if let Err(e) = self.store.save(state).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to save session");
            }
            self.spawn_expiry_timer(Arc::clone(slot), generation, Duration::from_secs(u64::from(expiry)));
        }
        slot.released.notify_waiters();
    }

    fn spawn_will_timer(self: &Arc<Self>, slot: Arc<SessionSlot>, generation: u64, delay: Duration) {
        let broker = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            let will = {
                let mut inner = slot.lock();
                if inner.generation != generation {
                    return;
                }
                inner.pending_will.take()
            };
            if let Some(will) = will {
                broker.publish_will_now(will.message).await;
            }
        });
    }

    fn spawn_expiry_timer(self: &Arc<Self>, slot: Arc<SessionSlot>, generation: u64, after: Duration) {
        let broker = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            let _guard = slot.connect_lock.lock().await;
            if slot.lock().generation != generation {
                return;
            }
            tracing::debug!(client_id = %Printable(&slot.client_id), "session expired");
            if let Err(e) = broker.discard(&slot).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to expire session");
            }
        });
    }

    /// Publishes a will message as if its client had published it.
    pub async fn publish_will_now(&self, message: Message) {
        self.stats.wills_published.fetch_add(1, Ordering::Relaxed);
        let mut message = message;
        message.received_at_us = now_us();
        if let Err(e) = self.publish(&Arc::new(message)).await {
            tracing::warn!(error = %e, "failed to publish will message");
        }
    }

    /// Publishes a message: stores it as the topic's retained message when its RETAIN flag
    /// is set, then routes it. Resolves once durable; says where it went (see
    /// [`Broker::route`]). Every publisher (clients, wills, `$SYS`, the admin API)
    /// goes through here.
    pub async fn publish(&self, message: &Arc<Message>) -> Result<Routed, StoreError> {
        if message.retain {
            self.retain(message).await?;
        }
        self.route(message).await
    }

    /// Stores or deletes a retained message.
    pub async fn retain(&self, message: &Arc<Message>) -> Result<RetainOutcome, StoreError> {
        let outcome = self.retained.set(Arc::clone(message)).await?;
        if outcome == RetainOutcome::Refused {
            if let Some(suppressed) = self.log_limits.retained_refused.allow() {
                tracing::warn!(topic = %Printable(&message.topic), suppressed, "retained message refused by limits");
            }
        }
        Ok(outcome)
    }

    /// Routes a message to every matching session. Resolves once every persistent
    /// subscriber's copy is durable. Says how many sessions and groups matched, and names a
    /// subscriber whose queue is filling up, so a publishing client can be held back.
    pub async fn route(&self, message: &Arc<Message>) -> Result<Routed, StoreError> {
        let deliveries = self.index.deliveries(message);
        let mut routed = Routed { matched: deliveries.len(), congested: None };
        let limits = self.queue_limits();
        let queue_qos0 = self.config.mqtt.queue_qos0;
        let stall_us = self.stall_us();
        let mut durable = Vec::new();
        for (slot, item) in deliveries {
            let qos = item.qos;
            let copy = (qos != QoS::AtMostOnce).then(|| item.clone());
            let Offered { offer, lost, congested } = slot.offer(item, limits, queue_qos0, stall_us);
            if congested && routed.congested.is_none() {
                routed.congested = Some(Arc::clone(&slot));
            }
            let reason = if offer == Offer::Dropped { DropReason::NotQueued } else { DropReason::QueueFull };
            if lost > 0 {
                tracing::debug!(client_id = %Printable(&slot.client_id), reason = reason.label(), dropped = lost, topic = %Printable(&message.topic), "message dropped");
            }
            self.stats.drop(reason, lost);
            if let (Offer::Offline, Some(copy)) = (offer, copy) {
                durable.push((slot.client_id.to_string(), copy));
            }
        }
        let shared_groups = self.index.shared_matches(message);
        routed.matched += shared_groups.len();
        for (target, members) in shared_groups {
            let ids: Vec<Arc<str>> = members.iter().map(|(c, _)| Arc::clone(c)).collect();
            let pick = |client: &Arc<str>| members.iter().find(|(c, _)| c == client).map(|(_, o)| *o);
            let order = self.dispatcher.order(&target, &ids, message, |c| self.member_load(c));
            let mut delivered = false;
            for client in order {
                let Some(opts) = pick(&client) else { continue };
                let item = QueuedMessage {
                    message: Arc::clone(message),
                    qos: opts.qos.min(message.qos),
                    retain: opts.retain_as_published && message.retain,
                    subscription_ids: opts.subscription_identifier.into_iter().collect(),
                    shared: Some(Arc::clone(&target)),
                };
                if let Some(durable_copy) = self.offer_shared(&client, item) {
                    delivered = true;
                    if let Some(copy) = durable_copy {
                        durable.push((client.to_string(), copy));
                    }
                    break;
                }
            }
            if !delivered {
                self.stats.drop(DropReason::QueueFull, 1);
            }
        }
        if !durable.is_empty() {
            self.store.append(durable, limits).await?;
        }
        Ok(routed)
    }

    /// Whether no subscription (plain or shared) matches `message` now.
    pub fn matches_nothing(&self, message: &Arc<Message>) -> bool {
        self.index.deliveries(message).is_empty() && self.index.shared_matches(message).is_empty()
    }

    fn member_load(&self, client_id: &str) -> MemberLoad {
        match self.sessions.get(client_id) {
            Some(slot) => {
                let inner = slot.lock();
                MemberLoad { online: inner.conn.is_some(), pending: inner.inflight.len() + inner.queue.len() }
            }
            None => MemberLoad { online: false, pending: usize::MAX },
        }
    }

    /// Offers a shared delivery to one member without evicting anything: a full member
    /// refuses, so the next member gets a chance. `None` if refused; `Some(copy)` with the
    /// copy to make durable when the member is offline.
    fn offer_shared(&self, client_id: &Arc<str>, item: QueuedMessage) -> Option<Option<QueuedMessage>> {
        let slot = self.sessions.get(client_id).map(|s| Arc::clone(&s))?;
        let limits = QueueLimits { policy: raftmq_cluster::session::DropPolicy::DropNew, ..self.queue_limits() };
        let copy = (item.qos != QoS::AtMostOnce).then(|| item.clone());
        match slot.offer(item, limits, self.config.mqtt.queue_qos0, self.stall_us()) {
            Offered { offer: Offer::Dropped, .. } | Offered { lost: 1.., .. } => None,
            Offered { offer: Offer::Online, .. } => Some(None),
            Offered { offer: Offer::Offline, .. } => Some(copy),
        }
    }

    /// Hands the shared deliveries a leaving member still holds (queued, or sent and not
    /// yet acknowledged) to the other members of their groups, so none is lost with it.
    /// What no other member takes stays with a persistent session, or is dropped.
    async fn redispatch_shared(&self, slot: &Arc<SessionSlot>, keep_leftovers: bool) {
        let items: Vec<QueuedMessage> = {
            let mut inner = slot.lock();
            let mut taken: Vec<QueuedMessage> = Vec::new();
            let ids: Vec<u16> = inner
                .inflight
                .iter()
                .filter(|(_, m)| m.queued.shared.is_some() && m.stage == InflightStage::Published)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(m) = inner.inflight.remove(&id) {
                    taken.push(m.queued);
                }
            }
            let (shared_items, rest): (Vec<QueuedMessage>, Vec<QueuedMessage>) = inner.queue.drain(..).partition(|q| q.shared.is_some());
            inner.queue = rest.into();
            inner.queue_bytes = inner.queue.iter().map(|q| q.message.weight()).sum();
            taken.extend(shared_items);
            taken
        };
        if items.is_empty() {
            return;
        }
        let mut durable = Vec::new();
        let mut leftovers = Vec::new();
        for item in items {
            let Some(target) = item.shared.clone() else { continue };
            let others: Vec<Arc<str>> =
                self.index.shared_members(&target).into_iter().map(|(c, _)| c).filter(|c| *c != slot.client_id).collect();
            let order = self.dispatcher.order(&target, &others, &item.message, |c| self.member_load(c));
            let mut placed = false;
            for client in order {
                if let Some(copy) = self.offer_shared(&client, item.clone()) {
                    if let Some(copy) = copy {
                        durable.push((client.to_string(), copy));
                    }
                    placed = true;
                    break;
                }
            }
            if !placed {
                leftovers.push(item);
            }
        }
        if keep_leftovers {
            let mut inner = slot.lock();
            for item in leftovers {
                inner.queue_bytes += item.message.weight();
                inner.queue.push_back(item);
            }
        } else {
            self.stats.drop(DropReason::QueueFull, leftovers.len() as u64);
        }
        if !durable.is_empty() {
            if let Err(e) = self.store.append(durable, self.queue_limits()).await {
                tracing::warn!(error = %e, "failed to persist redispatched shared messages");
            }
        }
    }

    fn shared_key(client_id: &Arc<str>, filter: &str) -> Option<SharedKey> {
        match shared::parse(filter) {
            Ok(Some((group, topic))) => Some(SharedKey {
                target: Arc::new(ShareTarget { group: Arc::from(group), filter: Arc::from(topic) }),
                client_id: Arc::clone(client_id),
            }),
            _ => None,
        }
    }

    async fn index_subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> bool {
        let (existed, new_route) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => self.index.subscribe_shared(key, options),
            None => self.index.subscribe(slot, filter, options),
        };
        if new_route {
            self.routes.add(filter).await;
        }
        existed
    }

    async fn index_unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> bool {
        let (existed, route_gone) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => {
                let result = self.index.unsubscribe_shared(&key);
                if result.1 {
                    self.dispatcher.forget(&key.target);
                }
                result
            }
            None => self.index.unsubscribe(slot, filter),
        };
        if route_gone {
            self.routes.remove(filter).await;
        }
        existed
    }

    /// Adds or replaces a subscription of the session in `slot`. Returns whether it already
    /// existed (for Retain Handling 1).
    pub async fn subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> Result<bool, StoreError> {
        slot.lock().subscriptions.insert(Box::from(filter), options);
        let existed = self.index_subscribe(slot, filter, options).await;
        self.save_if_persistent(slot).await?;
        Ok(existed)
    }

    /// Removes a subscription. Returns whether it existed.
    pub async fn unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> Result<bool, StoreError> {
        slot.lock().subscriptions.remove(filter);
        let existed = self.index_unsubscribe(slot, filter).await;
        self.save_if_persistent(slot).await?;
        Ok(existed)
    }

    async fn save_if_persistent(&self, slot: &Arc<SessionSlot>) -> Result<(), StoreError> {
        if slot.lock().persistent {
            self.store.save(slot.snapshot()).await?;
        }
        Ok(())
    }

    /// Every session slot (online and offline), for the admin API.
    pub fn slots(&self) -> Vec<Arc<SessionSlot>> {
        let mut slots: Vec<Arc<SessionSlot>> = self.sessions.iter().map(|s| Arc::clone(&s)).collect();
        slots.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        slots
    }

    /// The session slot of `client_id`.
    pub fn slot(&self, client_id: &str) -> Option<Arc<SessionSlot>> {
        self.sessions.get(client_id).map(|s| Arc::clone(&s))
    }

    /// Disconnects the client (MQTT 5: DISCONNECT 0x98 Administrative action); its session
    /// stays if it is persistent. Returns false if it was not connected.
    pub async fn kick(&self, client_id: &str) -> bool {
        let Some(slot) = self.slot(client_id) else { return false };
        if slot.lock().conn.is_none() {
            return false;
        }
        let _guard = slot.connect_lock.lock().await;
        self.take_over(&slot, crate::codec::reason::ADMINISTRATIVE_ACTION).await;
        true
    }

    /// Ends a session: disconnects its client if connected, then discards subscriptions,
    /// queue and stored state. Returns false if there was no session.
    pub async fn discard_session(&self, client_id: &str) -> Result<bool, StoreError> {
        let Some(slot) = self.slot(client_id) else { return Ok(false) };
        let _guard = slot.connect_lock.lock().await;
        self.take_over(&slot, crate::codec::reason::ADMINISTRATIVE_ACTION).await;
        if slot.lock().removed {
            return Ok(true);
        }
        self.discard(&slot).await?;
        Ok(true)
    }

    /// Retained messages matching `filter` (the admin API's listing).
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        self.retained.matching(filter, now_ms())
    }

    /// Retained messages matching `filter`, for a new subscription.
    pub fn retained_for(&self, filter: &str) -> Vec<Arc<Message>> {
        self.retained.matching(filter, now_ms())
    }

    /// Asks every connection to close (server shutting down) and waits for them.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        // Connections past their handshake do not watch the token (it would cost every idle
        // connection a waiter); they are kicked. One attaching right now checks the token
        // before it waits.
        for slot in self.sessions.iter() {
            slot.kick(crate::codec::reason::SERVER_SHUTTING_DOWN);
        }
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait()).await.is_err() {
            tracing::warn!("some connections did not close within the shutdown grace period");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_counters_in_label_order() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        let stats = Stats::default();
        stats.drop(DropReason::Expired, 2);
        stats.drop(DropReason::NotQueued, 1);
        assert_eq!(stats.messages_dropped(), 3);
        assert_eq!(stats.dropped_by_reason[DropReason::Expired as usize].load(Ordering::Relaxed), 2);
    }
}
