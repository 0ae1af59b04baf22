//! The mesh: this node's gRPC links to every other node.
//!
//! Every node dials every other (a full mesh). A link starts with `Hello` (who are you,
//! whom do you know: a node that reached one seed learns the whole cluster), then keeps two
//! streams open: `Routes`, on which this node sends its route changes (a snapshot first,
//! then changes and heartbeats) and the peer acknowledges them; and `Forward`, on which
//! this node sends messages for the peer's subscribers in acknowledged batches. A peer
//! whose acknowledgements stop for `failure_timeout` is down; the link reconnects with
//! backoff. The receiving side keeps each origin's routes ([`remote`]) for as long as the
//! origin's route stream lives.
//!
//! API boundary: the node sees the mesh as a [`crate::routes::RouteTable`]
//! ([`ClusterRoutes`]) and hands it a [`Deliver`] for the messages peers forward here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use raftmq_proto::v1 as pb;

use crate::message::Message;
use crate::registry::Epoch;
use crate::routes::{LocalRoutes, Route, RouteTable};
use crate::session::{ForwardOrigin, SessionState};
use crate::NodeId;

pub mod config;
mod discovery;
mod peer;
mod remote;
pub(crate) mod service;
mod table;

pub use config::{Discovery, MeshConfig, MeshTls};
pub use peer::PeerStatus;

pub use table::ClusterRoutes;

/// What the mesh asks of the broker on this node.
#[async_trait]
pub trait LocalBroker: Send + Sync + 'static {
    /// Delivers a batch another node forwarded, in order: each message to this node's plain
    /// subscribers, or (with a group) to one local member of that shared group; never
    /// forwards them again. Says for each whether anybody here took it (a group may have no
    /// member left here), and resolves `stored` once what persistent sessions took is
    /// durable (false: the store failed, nothing counts as delivered). One call per batch:
    /// the per-message path stays free of boxing; the next batch is delivered while this
    /// one is being stored.
    async fn deliver(&self, batch: Vec<Incoming>) -> Delivered;
    /// A shared delivery this node forwarded to `not_on`, which died before the member
    /// acknowledged it: give it to another member (here or on another node).
    async fn redeliver(&self, message: Arc<Message>, group: Route, not_on: NodeId) -> bool;
    /// A client connected to another node with `client_id`: disconnect it here (MQTT 5:
    /// 0x8E) and, with `resume`, give up its session (returned) instead of ending it.
    async fn hand_over(&self, request: HandOverRequest) -> HandOver;
}

/// What became of a forwarded batch ([`LocalBroker::deliver`]).
pub struct Delivered {
    /// Per message, whether anybody here took it.
    pub taken: Vec<bool>,
    /// Resolves once the persistent sessions' appends are stored: true, or false if the
    /// store failed.
    pub stored: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
}

impl Delivered {
    /// Nobody took any of `n` messages.
    pub fn nothing(n: usize) -> Delivered {
        Delivered { taken: vec![false; n], stored: Box::pin(std::future::ready(true)) }
    }
}

/// A message another node forwarded here.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The message.
    pub message: Arc<Message>,
    /// The shared group it is for (plain subscribers without).
    pub group: Option<Route>,
    /// Where a tracked shared delivery came from (to settle it once acknowledged).
    pub origin: Option<ForwardOrigin>,
}

/// A peer asks for a client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOverRequest {
    /// The client id.
    pub client_id: String,
    /// User name of the connecting identity.
    pub username: Option<String>,
    /// The client resumes its session (Clean Start 0).
    pub resume: bool,
    /// Sessions are bound to the identity that created them.
    pub check_owner: bool,
    /// The claiming node (on the wire, its name).
    pub from: NodeId,
}

/// What became of a client id a peer asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum HandOver {
    /// No session for it here.
    NotHere,
    /// Disconnected here; with a resume, the session that moved.
    Moved {
        /// The session, when the client resumes it.
        session: Option<Box<SessionState>>,
        /// This node's epoch for the client id.
        epoch: Epoch,
    },
    /// The session here belongs to another identity: nothing was touched.
    NotOwner,
}

/// What the peers said about a client id this node is claiming.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claimed {
    /// The session handed over by the node that held it.
    pub session: Option<SessionState>,
    /// The highest epoch any peer held for the client id.
    pub epoch: Epoch,
}

/// Why a claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// Another identity's session holds the client id on a peer.
    #[error("the session belongs to another identity")]
    NotOwner,
}

/// A node as the mesh knows it (`GET /api/v1/cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its name.
    pub name: String,
    /// Its advertised cluster address.
    pub address: String,
    /// Up, down, or this node.
    pub status: PeerStatus,
    /// Its routes held here.
    pub routes: usize,
    /// Messages forwarded to it.
    pub forwarded: u64,
    /// Bytes of payload forwarded to it.
    pub forwarded_bytes: u64,
    /// Messages for it dropped (queue full, link down).
    pub forward_dropped: u64,
    /// Messages waiting in its forward queue.
    pub forward_queue: usize,
    /// Its place in the Raft group as it last reported it (peers only).
    pub raft: Option<RaftPosition>,
}

/// A node's place in the Raft group, as it reports it with its route heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftPosition {
    /// leader, follower, candidate or learner.
    pub role: String,
    /// Its term.
    pub term: u64,
    /// The last entry in its log.
    pub last_log_index: u64,
    /// The last entry it applied.
    pub applied_index: u64,
}

impl From<&pb::RaftPosition> for RaftPosition {
    fn from(p: &pb::RaftPosition) -> RaftPosition {
        RaftPosition { role: p.role.clone(), term: p.term, last_log_index: p.last_log_index, applied_index: p.applied_index }
    }
}

/// A peer came up or went down (for `$SYS` and the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    /// The peer's name.
    pub name: String,
    /// Up (true) or down.
    pub up: bool,
}

/// State shared by the mesh's tasks.
pub(crate) struct Shared {
    pub(crate) config: MeshConfig,
    pub(crate) id: NodeId,
    /// This node's routes, with the log peers catch up from.
    pub(crate) local: LocalRoutes,
    /// The sequence number of this node's routes, for the links to follow.
    pub(crate) local_seq: tokio::sync::watch::Sender<u64>,
    pub(crate) remote: remote::RemoteRoutes,
    /// Outgoing links by peer id.
    pub(crate) peers: DashMap<NodeId, Arc<peer::Peer>>,
    /// Addresses being dialled or known to be this node.
    pub(crate) dialled: DashMap<String, ()>,
    /// Addresses where a node answered (this one's own aliases too).
    pub(crate) met: DashMap<String, ()>,
    pub(crate) broker: OnceLock<Arc<dyn LocalBroker>>,
    /// TLS for outgoing links.
    pub(crate) client_tls: Option<tonic::transport::ClientTlsConfig>,
    pub(crate) events: tokio::sync::broadcast::Sender<NodeEvent>,
    pub(crate) shutdown: CancellationToken,
    /// Forwarded messages this node received and could not deliver.
    pub(crate) undeliverable: AtomicU64,
    /// When this process started (its incarnation, as peers see it).
    pub(crate) incarnation: u64,
    /// When the mesh started (readiness gives the seeds this long).
    pub(crate) started: std::time::Instant,
    /// Per forwarding node, where settlements of its tracked shared deliveries go (the
    /// acknowledgement stream of its forward call).
    pub(crate) settlements: DashMap<NodeId, tokio::sync::mpsc::Sender<u64>>,
    /// Tracked shared deliveries given to another member after their node died.
    pub(crate) redelivered: AtomicU64,
    /// Introductions to a new address that failed (unreachable, refused, wrong secret or
    /// certificate).
    pub(crate) failed_dials: AtomicU64,
    /// The Raft group this node's store runs, once started (its RPCs arrive here).
    pub(crate) raft: OnceLock<openraft::Raft<crate::raft::TypeConfig>>,
    /// What the group applied: whose client ids are claimed decides when a gone node's
    /// routes may be dropped ([`routes_gone`]).
    pub(crate) replicated: OnceLock<Arc<crate::raft::state_machine::Replicated>>,
    /// Each peer's place in the Raft group, from its route updates.
    pub(crate) raft_positions: DashMap<NodeId, RaftPosition>,
    /// Whether this node's routes may go to its peers ([`MeshConfig::hold_routes`]).
    pub(crate) routes_ready: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Whether a node answered at every static seed (DNS discovery has no fixed list).
    pub(crate) fn seeds_met(&self) -> bool {
        match &self.config.discovery {
            Discovery::Static(seeds) => seeds.iter().all(|s| *s == self.config.advertise || self.met.contains_key(s)),
            Discovery::Dns { .. } => true,
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("name", &self.config.name).field("peers", &self.peers.len()).finish()
    }
}

/// Why the mesh could not start.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The gRPC listener could not bind.
    #[error("cannot listen on {addr} for the cluster: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file is unusable.
    #[error("cluster TLS: {0}")]
    Tls(String),
}

/// A running mesh: the gRPC listener, the discovery loop and a link per peer.
#[derive(Debug, Clone)]
pub struct Mesh {
    shared: Arc<Shared>,
    /// The address the listener bound (the configured one, with port 0 resolved).
    pub local_addr: std::net::SocketAddr,
}

impl Mesh {
    /// Binds the cluster listener and starts finding peers. Call within a tokio runtime.
    pub async fn start(mut config: MeshConfig) -> Result<Mesh, MeshError> {
        let listener =
            tokio::net::TcpListener::bind(config.listen).await.map_err(|source| MeshError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| MeshError::Bind { addr: config.listen, source })?;
        if config.advertise.ends_with(":0") {
            // Listening on an ephemeral port (tests): advertise the port it got.
            config.advertise = format!("{}:{}", config.advertise.trim_end_matches(":0"), local_addr.port());
        }
        let tls = match &config.tls {
            Some(tls) => Some(service::tls_configs(tls).map_err(MeshError::Tls)?),
            None => None,
        };
        let (local_seq, _) = tokio::sync::watch::channel(0);
        let (events, _) = tokio::sync::broadcast::channel(64);
        let hold_routes = config.hold_routes;
        let shared = Arc::new(Shared {
            id: crate::stable_hash(config.name.as_bytes()),
            local: LocalRoutes::with_log(config.route_log),
            local_seq,
            remote: remote::RemoteRoutes::default(),
            peers: DashMap::new(),
            dialled: DashMap::new(),
            met: DashMap::new(),
            broker: OnceLock::new(),
            client_tls: tls.as_ref().map(|t| t.client.clone()),
            events,
            shutdown: CancellationToken::new(),
            undeliverable: AtomicU64::new(0),
            incarnation: crate::message::now_ms(),
            started: std::time::Instant::now(),
            settlements: DashMap::new(),
            redelivered: AtomicU64::new(0),
            failed_dials: AtomicU64::new(0),
            raft: OnceLock::new(),
            raft_positions: DashMap::new(),
            replicated: OnceLock::new(),
            routes_ready: tokio::sync::watch::Sender::new(!hold_routes),
            config,
        });
        if config_has_no_secret(&shared.config) {
            tracing::warn!("cluster.secret is not set: any host that reaches the cluster port can join this cluster");
        }
        service::serve(Arc::clone(&shared), listener, tls.as_ref().map(|t| t.server.clone()));
        discovery::start(Arc::clone(&shared));
        Ok(Mesh { shared, local_addr })
    }

    /// The route table the broker uses.
    pub fn routes(&self) -> Arc<ClusterRoutes> {
        Arc::new(ClusterRoutes::new(Arc::clone(&self.shared)))
    }

    /// Hands the mesh the local broker (once, at start-up).
    pub fn set_broker(&self, broker: Arc<dyn LocalBroker>) {
        let _ = self.shared.broker.set(broker);
    }

    /// Claims a client id cluster-wide: every live peer disconnects its connection with
    /// that id, and the one holding its session hands it over when `request.resume`. One
    /// round trip to all peers at once, each bounded by the failure timeout.
    pub async fn claim(&self, request: HandOverRequest) -> Result<Claimed, ClaimError> {
        let wire = pb::TakeoverRequest {
            client_id: request.client_id.clone(),
            username: request.username.clone().unwrap_or_default(),
            has_username: request.username.is_some(),
            resume: request.resume,
            check_owner: request.check_owner,
            from: self.shared.config.name.clone(),
        };
        let peers: Vec<Arc<peer::Peer>> = self.shared.peers.iter().map(|p| Arc::clone(&p)).collect();
        let bound = self.shared.config.failure_timeout;
        let calls = peers.iter().map(|p| p.claim(wire.clone(), bound));
        let mut claimed = Claimed::default();
        for reply in futures_util::future::join_all(calls).await.into_iter().flatten() {
            match pb::takeover_reply::Outcome::try_from(reply.outcome) {
                Ok(pb::takeover_reply::Outcome::NotOwner) => return Err(ClaimError::NotOwner),
                Ok(pb::takeover_reply::Outcome::Moved) => {
                    claimed.epoch = claimed.epoch.max(reply.epoch);
                    if let Some(session) = reply.session.and_then(|s| SessionState::try_from(s).ok()) {
                        if claimed.session.as_ref().is_none_or(|held| held.epoch < session.epoch) {
                            claimed.session = Some(session);
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(claimed)
    }

    /// Dials `address` (an operator's `cluster join`): once a node answers there, the two
    /// link and learn each other's peers.
    pub fn introduce(&self, address: &str) {
        discovery::forget(&self.shared, address);
        discovery::dial(&self.shared, address.to_owned());
    }

    /// The address peers dial this node at.
    pub fn advertise(&self) -> &str {
        &self.shared.config.advertise
    }

    /// What the mesh shares with its tasks (the Raft network dials through it).
    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves the Raft RPCs of `raft` from now on.
    pub fn set_raft(&self, raft: openraft::Raft<crate::raft::TypeConfig>, replicated: Arc<crate::raft::state_machine::Replicated>) {
        let _ = self.shared.raft.set(raft);
        let _ = self.shared.replicated.set(replicated);
    }

    /// This node's routes are complete (its persistent sessions recovered): its links send
    /// them to its peers from now on.
    pub fn routes_ready(&self) {
        self.shared.routes_ready.send_replace(true);
    }

    /// Whether this node has the routes of `node` (a stream from it began, or a gone node's
    /// are kept).
    pub fn has_routes_of(&self, node: NodeId) -> bool {
        self.shared.remote.has_origin(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// Every node known, this one first.
    pub fn nodes(&self) -> Vec<NodeView> {
        let me = NodeView {
            name: self.shared.config.name.clone(),
            address: self.shared.config.advertise.clone(),
            status: PeerStatus::Myself,
            routes: self.shared.local.count(),
            forwarded: 0,
            forwarded_bytes: 0,
            forward_dropped: 0,
            forward_queue: 0,
            raft: None,
        };
        let position = |id: &NodeId| self.shared.raft_positions.get(id).map(|r| r.clone());
        let mut peers: Vec<NodeView> =
            self.shared.peers.iter().map(|p| NodeView { raft: position(&p.id), ..p.view(self.shared.remote.count_of(p.id)) }).collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        std::iter::once(me).chain(peers).collect()
    }

    /// Node up/down events from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Whether this node can route for its clients (what `/readyz` waits for): every live
    /// peer has sent its routes, and a node that has seeds reached one of them or gave it
    /// the failure timeout. A peer that is down does not hold readiness back (the rest of
    /// the cluster keeps serving while a node is dead).
    pub fn ready(&self) -> bool {
        let mut any_up = false;
        for p in self.shared.peers.iter() {
            if p.status() == PeerStatus::Up {
                any_up = true;
                if !self.shared.remote.has_origin(p.id) {
                    return false;
                }
            }
        }
        let alone =
            matches!(&self.shared.config.discovery, Discovery::Static(seeds) if seeds.iter().all(|s| *s == self.shared.config.advertise));
        any_up || alone || self.shared.started.elapsed() >= self.shared.config.failure_timeout
    }

    /// A tracked shared delivery forwarded here was acknowledged by its member (or nobody
    /// here could take it): its node forgets it.
    pub fn settled(&self, origin: ForwardOrigin) {
        if let Some(tx) = self.shared.settlements.get(&origin.node) {
            let _ = tx.try_send(origin.id);
        }
    }

    /// Shared deliveries given to another member because the node they were forwarded to
    /// died first.
    pub fn redelivered(&self) -> u64 {
        self.shared.redelivered.load(Ordering::Relaxed)
    }

    /// Introductions to new addresses that failed (a node that cannot join sees them grow).
    pub fn failed_dials(&self) -> u64 {
        self.shared.failed_dials.load(Ordering::Relaxed)
    }

    /// Forwarded messages received here that no local session could take.
    pub fn undeliverable(&self) -> u64 {
        self.shared.undeliverable.load(Ordering::Relaxed)
    }

    /// Tells every peer this node leaves (so they drop its routes at once) and stops the
    /// links.
    pub async fn leave(&self) {
        let peers: Vec<Arc<peer::Peer>> = self.shared.peers.iter().map(|p| Arc::clone(&p)).collect();
        let calls = peers.iter().map(|p| p.leave(&self.shared));
        futures_util::future::join_all(calls).await;
        self.shared.shutdown.cancel();
    }
}

/// How often a gone node's routes are looked at.
const ROUTES_GONE_ROUND: std::time::Duration = std::time::Duration::from_millis(200);

/// `node`'s route stream ended (it died, left or was cut off), stream `generation` (`None`:
/// whichever is current). Its routes stay while it may still own sessions: a message
/// matching them then fails to forward, so its QoS 1/2 publisher is refused rather than
/// acknowledged for subscribers who would never get it (a persistent session of a dead
/// node is owed every message until the leader adopts it or its client resumes
/// elsewhere). They are dropped once no client id is claimed by the node any more, or at
/// once without a replicated registry, or kept when a new stream from the node replaced
/// them.
pub(crate) fn routes_gone(shared: &Arc<Shared>, node: NodeId, generation: Option<u64>) {
    let Some(generation) = generation.or_else(|| shared.remote.generation_of(node)) else { return };
    let Some(replicated) = shared.replicated.get().cloned() else {
        shared.remote.drop_origin(node, Some(generation));
        return;
    };
    let shared = Arc::clone(shared);
    // Claims moving (an adoption, a client resuming elsewhere) are the events to look at.
    let mut claims = replicated.claims();
    tokio::spawn(async move {
        loop {
            if !shared.remote.is_current(node, generation) {
                return;
            }
            if !replicated.registry.owns_any(node) {
                tracing::debug!(node, "a gone node owns no session any more: its routes are dropped");
                shared.remote.drop_origin(node, Some(generation));
                return;
            }
            tokio::select! {
                _ = claims.recv() => {}
                _ = tokio::time::sleep(ROUTES_GONE_ROUND) => {}
                _ = shared.shutdown.cancelled() => return,
            }
        }
    });
}

fn config_has_no_secret(config: &MeshConfig) -> bool {
    config.secret.as_deref().is_none_or(str::is_empty)
}
