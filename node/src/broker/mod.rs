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
use raftmq_cluster::message::{now_ms, Message};
use raftmq_cluster::registry::{ClientRegistry, MemoryRegistry};
use raftmq_cluster::retained::{MemoryRetainedStore, RetainedLimits, RetainedStore};
use raftmq_cluster::routes::{LocalRoutes, RouteTable};
use raftmq_cluster::session::{MemorySessionStore, QueueLimits, SessionStore};
use raftmq_cluster::NodeId;
use raftmq_cluster::StoreError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::routing::index::SubscriptionIndex;
use crate::routing::shared::Dispatcher;
use crate::security::bans::{Bans, Flapping, LoginFailures};
use crate::security::enhanced::AuthMethods;
use crate::security::policy::Security;
use crate::security::verify_pool::VerifyPool;
use crate::security::SecurityError;
use crate::session::{Journal, SessionSlot};
use crate::telemetry::log_limit::LogLimits;
use crate::telemetry::stats::{Gauges, SessionSummary, Stats};

mod adopt;
mod cluster;
mod fence;
mod lifecycle;
mod publish;
pub(crate) use publish::Durable;
mod reload;
mod subscribe;

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
    registry: Arc<dyn ClientRegistry>,
    /// Where persistent sessions' changes go to the store, in order.
    journal: Arc<Journal>,
    /// The cluster this node is part of, if any (set once at start).
    mesh: std::sync::OnceLock<raftmq_cluster::mesh::Mesh>,
    /// The replicated store, when the node runs one (set once at start).
    raft: std::sync::OnceLock<Arc<raftmq_cluster::raft::RaftStore>>,
    /// This node's id in the registry (a hash of `node_name`).
    node_id: NodeId,
    dispatcher: Dispatcher,
    next_conn_id: AtomicU64,
    /// Connections handling packets they have read, right now (see
    /// `connection::let_earlier_packets_land`).
    pub handling: AtomicUsize,
    /// Waits for earlier packets to land a PUBLISH that matches nothing may make a second
    /// (each at most a millisecond of yielding): [`LAND_BUDGET`] a second.
    land_budget: std::sync::Mutex<crate::net::rate::RateLimiter>,
    /// Counters.
    pub stats: Stats,
    /// Prometheus exposition of the counters.
    pub metrics: crate::telemetry::metrics::Metrics,
    /// Cancelled at shutdown; every task watches it.
    pub shutdown: CancellationToken,
    /// Every connection and timer task, awaited at shutdown.
    pub tasks: TaskTracker,
    /// False while a node of a cluster starts: until it has recovered its persistent
    /// sessions and holds the routes of every node that owns sessions, a message published
    /// here could miss a subscriber (CONNECTs are refused as unavailable meanwhile).
    pub(crate) serving: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("node", &self.config.node_name).field("sessions", &self.sessions.len()).finish()
    }
}

/// Session operations waiting for the store at most.
const JOURNAL_QUEUE: usize = 16 * 1024;

/// Waits a second for earlier packets to land (each mostly 0.1 ms of yields): a few
/// percent of a core at most.
const LAND_BUDGET: u32 = 200;

/// A node's id in the registry: a stable hash of its name.
fn node_id(name: &str) -> NodeId {
    raftmq_cluster::stable_hash(name.as_bytes())
}

/// The shared state a broker works on: retained messages, persistent sessions, routes and
/// the client registry.
/// A single node uses the in-memory ones ([`Stores::memory`]); the cluster plugs in its
/// replicated store and gossiped route table through [`Server::start_with`](crate::server::Server::start_with).
#[derive(Clone)]
pub struct Stores {
    /// Retained messages.
    pub retained: Arc<dyn RetainedStore>,
    /// Persistent sessions.
    pub sessions: Arc<dyn SessionStore>,
    /// Routes (which nodes want which filters).
    pub routes: Arc<dyn RouteTable>,
    /// Which node owns each client id, under which epoch.
    pub registry: Arc<dyn ClientRegistry>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores").field("sessions", &self.sessions.len()).field("routes", &self.routes.count()).finish()
    }
}

impl Stores {
    /// In-memory stores with the limits of `config`: the state of a node without peers.
    pub fn memory(config: &Config) -> Stores {
        let retained = Arc::new(MemoryRetainedStore::new(RetainedLimits {
            max_messages: if config.retained.enabled { config.retained.max_messages } else { 0 },
            max_bytes: config.retained.max_bytes,
            max_payload: config.retained.max_payload,
        }));
        Stores {
            retained,
            sessions: Arc::new(MemorySessionStore::new()),
            routes: Arc::new(LocalRoutes::new()),
            registry: Arc::new(MemoryRegistry::new()),
        }
    }
}

impl Broker {
    /// A single-node broker with in-memory stores. Fails if a security file is unusable.
    /// Call it within a tokio runtime.
    pub fn new(config: Config, auth: AuthMethods) -> Result<Arc<Broker>, SecurityError> {
        let stores = Stores::memory(&config);
        Broker::with_stores(config, auth, stores)
    }

    /// A broker over the given stores (the cluster plugs its replicated stores in here).
    /// Call it within a tokio runtime: it starts the session journal's writer task.
    pub fn with_stores(config: Config, auth: AuthMethods, stores: Stores) -> Result<Arc<Broker>, SecurityError> {
        let Stores { retained, sessions: store, routes, registry } = stores;
        let journal = Journal::start(Arc::clone(&store), JOURNAL_QUEUE);
        let node_id = node_id(&config.node_name);
        let dispatcher = Dispatcher::new(config.shared.strategy);
        let security = std::sync::RwLock::new(Arc::new(Security::load(&config)?));
        let bans = Bans::from_config(&config.bans)?;
        let flapping = Flapping::new(config.flapping.clone());
        let a = &config.auth;
        let login_failures =
            LoginFailures::new(a.max_failures_per_address, a.max_failures_per_user, Duration::from_secs(a.failure_window_secs));
        let workers = a.verify_workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        let verify_pool = VerifyPool::new(workers, a.verify_queue);
        // A node of a cluster takes clients once it recovered its sessions.
        let serving = !config.cluster.active();
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
            registry,
            journal,
            mesh: std::sync::OnceLock::new(),
            raft: std::sync::OnceLock::new(),
            node_id,
            next_conn_id: AtomicU64::new(1),
            handling: AtomicUsize::new(0),
            land_budget: std::sync::Mutex::new(crate::net::rate::RateLimiter::new(LAND_BUDGET)),
            stats: Stats::default(),
            metrics: crate::telemetry::metrics::Metrics::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            serving: std::sync::atomic::AtomicBool::new(serving),
        }))
    }

    /// The authenticator and ACL in force.
    pub fn security(&self) -> Arc<Security> {
        Arc::clone(&self.security.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// This node's id (a stable hash of `node_name`).
    pub fn node_id(&self) -> NodeId {
        self.node_id
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

    /// Whether a PUBLISH that matches nothing may wait for earlier packets to land (see
    /// `connection::let_earlier_packets_land`): at most [`LAND_BUDGET`] a second.
    pub fn take_land_budget(&self) -> bool {
        self.land_budget.lock().map(|mut b| b.take().is_none()).unwrap_or(false)
    }

    /// The Prometheus text exposition of this broker's counters and gauges.
    pub fn render_metrics(&self) -> String {
        let gauges = Gauges {
            sessions: self.session_summary(),
            subscriptions: self.subscription_filter_count(),
            shared_subscriptions: self.shared_subscription_count(),
            routes: self.route_count(),
            retained_messages: self.retained_count(),
            retained_bytes: self.retained_bytes(),
            journal_lost: self.journal.lost(),
            cluster: self.mesh().map(|mesh| crate::telemetry::stats::ClusterGauges {
                peers: mesh.nodes().into_iter().skip(1).collect(),
                undeliverable: mesh.undeliverable(),
                redelivered: mesh.redelivered(),
                failed_dials: mesh.failed_dials(),
                forward_queue_capacity: self.config.cluster.forward_queue,
            }),
            raft: self.raft().map(|r| r.view()),
        };
        self.metrics.render(&self.stats, &gauges)
    }

    /// Sessions, persistent sessions, queued and inflight messages, summed over all slots.
    pub fn session_summary(&self) -> SessionSummary {
        let mut sum = SessionSummary::default();
        for slot in self.sessions.iter() {
            let (persistent, queued, inflight) = slot.counts();
            sum.sessions += 1;
            sum.persistent += usize::from(persistent);
            sum.queued += queued;
            sum.inflight += inflight;
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

    /// Retained messages matching `filter`: for a new subscription and the admin API's
    /// listing alike.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
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
