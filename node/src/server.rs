//! Starting and stopping a node: loads the security files and certificates (refusing to
//! start if any is unusable), binds the listeners, spawns their loops, and shuts everything
//! down in order (stop accepting, disconnect clients, wait for tasks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raftmq_cluster::mesh::Mesh;
use raftmq_cluster::raft::{RaftConfig, RaftStore};
use raftmq_cluster::retained::RetainedLimits;
use tokio::net::TcpListener;

use crate::broker::{Broker, Stores};
use crate::config::{Config, ListenerKind};
use crate::net::listener::{self, Limits, Transport};
use crate::net::transport::{self as tls, TlsSetupError};
use crate::security::enhanced::AuthMethods;
use crate::security::SecurityError;

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A password file, ACL file or JWT key is unusable.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The cluster listener could not start.
    #[error(transparent)]
    Cluster(#[from] raftmq_cluster::mesh::MeshError),
    /// The replicated store on the data directory could not start.
    #[error(transparent)]
    Store(#[from] raftmq_cluster::raft::RaftStartError),
    /// The store's group found no leader in time.
    #[error("the replicated store elected no leader within {0} s (are a majority of the nodes up?)")]
    NoLeader(u64),
    /// A listener's certificate or key is unusable.
    #[error("listener {addr}: {source}")]
    Tls {
        /// Listener address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: TlsSetupError,
    },
}

/// A running node.
pub struct Server {
    /// The broker state (for tests and the admin API).
    pub broker: Arc<Broker>,
    /// Bound MQTT TCP address (the real port when 0 was asked for).
    pub mqtt_addr: SocketAddr,
    /// Every other bound listener, in configuration order.
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    /// Bound admin HTTP address, when enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Where the binary installs its run-time log control for the admin API.
    pub log_control: Arc<std::sync::OnceLock<crate::admin::LogControl>>,
}

async fn bind(addr: SocketAddr, backlog: u32) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind = || {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    let tcp = bind().map_err(|source| StartError::Bind { addr, source })?;
    let local = tcp.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    Ok((tcp, local))
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("mqtt_addr", &self.mqtt_addr)
            .field("listeners", &self.listeners)
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with_auth(config, AuthMethods::default()).await
    }

    /// Like [`Server::start`], with enhanced authentication methods registered. With
    /// `[cluster]` seeds (or DNS discovery, or `enabled`) the node joins the mesh first and
    /// routes over it.
    pub async fn start_with_auth(config: Config, auth: AuthMethods) -> Result<Server, StartError> {
        let mut stores = Stores::memory(&config);
        let mesh = if config.cluster.active() {
            let mesh = Mesh::start(config.cluster.mesh(&config.node_name)).await?;
            tracing::info!(addr = %mesh.local_addr, node = %config.node_name, "cluster listener started");
            stores.routes = mesh.routes();
            Some(mesh)
        } else {
            None
        };
        let raft = RaftStore::open(raft_config(&config, mesh.as_ref()), mesh.as_ref()).await?;
        // A node alone must have its group of one before it serves. A clustered node starts
        // serving at once and is not ready until its group has a leader: nodes start in any
        // order and wait for each other.
        if !raft.clustered() && !raft.wait_for_leader(Duration::from_secs(config.raft.start_timeout_secs)).await {
            raft.shutdown().await;
            return Err(StartError::NoLeader(config.raft.start_timeout_secs));
        }
        (stores.sessions, stores.retained, stores.registry) = raft.stores();
        let server = match Server::start_with(config, auth, stores).await {
            Ok(server) => server,
            Err(e) => {
                raft.shutdown().await;
                return Err(e);
            }
        };
        let clustered = raft.clustered();
        server.broker.use_raft(raft);
        if let Some(mesh) = mesh {
            server.broker.join(mesh);
            server.broker.spawn_adopter();
            server.broker.spawn_fence_watch();
        }
        if clustered {
            let broker = Arc::clone(&server.broker);
            server.broker.tasks.spawn(async move { broker.recover_own_sessions().await });
        } else {
            server.broker.recover_own_sessions().await;
        }
        Ok(server)
    }

    /// Like [`Server::start`], over the given stores and route table (the cluster's, or a
    /// test's) and with enhanced authentication methods registered.
    pub async fn start_with(config: Config, auth: AuthMethods, stores: Stores) -> Result<Server, StartError> {
        // Everything that can be refused is checked before any port is opened.
        let mut transports = Vec::new();
        for l in &config.listeners {
            let acceptor = || tls::tls_acceptor(l).map_err(|source| StartError::Tls { addr: l.addr(), source });
            transports.push(match l.kind {
                ListenerKind::Tcp => Transport::Tcp,
                ListenerKind::Ws => Transport::Ws(l.clone()),
                ListenerKind::Tls => Transport::Tls(acceptor()?, l.clone()),
                ListenerKind::Wss => Transport::Wss(acceptor()?, l.clone()),
            });
        }
        let addrs: Vec<SocketAddr> = config.listeners.iter().map(|l| l.addr()).collect();
        let backlog = config.mqtt.listen_backlog;
        let admin = if config.admin.enabled { Some(bind(config.admin.listen, 128).await?) } else { None };
        let (tcp, mqtt_addr) = bind(config.mqtt.listen, backlog).await?;
        let mut bound = Vec::new();
        for addr in addrs {
            bound.push(bind(addr, backlog).await?);
        }
        let broker = Broker::with_stores(config, auth, stores)?;
        let limits = Limits::new(&broker);
        tokio::spawn(listener::run(Arc::clone(&broker), tcp, Arc::new(Transport::Tcp), Arc::clone(&limits)));
        let mut listeners = Vec::new();
        for ((socket, addr), (transport, l)) in bound.into_iter().zip(transports.into_iter().zip(broker.config.listeners.clone())) {
            tracing::info!(kind = ?l.kind, %addr, "listener started");
            listeners.push((l.kind, addr));
            tokio::spawn(listener::run(Arc::clone(&broker), socket, Arc::new(transport), Arc::clone(&limits)));
        }
        let log_control = Arc::new(std::sync::OnceLock::new());
        let admin_addr = admin.as_ref().map(|(_, a)| *a);
        if let Some((socket, addr)) = admin {
            tracing::info!(%addr, "admin HTTP listener started");
            tokio::spawn(crate::admin::serve(Arc::clone(&broker), socket, Arc::clone(&log_control)));
        }
        crate::telemetry::sys::spawn(Arc::clone(&broker));
        spawn_flapping_sweeper(&broker);
        spawn_session_sweeper(&broker);
        tracing::info!(node = %broker.config.node_name, %mqtt_addr, "raftmq listening");
        Ok(Server { broker, mqtt_addr, listeners, admin_addr, log_control })
    }

    /// The bound address of the first listener of `kind`.
    pub fn listener_addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners.iter().find(|(k, _)| *k == kind).map(|(_, a)| *a)
    }

    /// Graceful shutdown: MQTT 5 clients get DISCONNECT 0x8B (waits up to `grace` for
    /// the connections to close, their last writes replicating through the cluster); a
    /// leader hands its leadership to a caught-up voter; then the cluster's peers are told
    /// this node leaves (they drop its routes once it owns no session) and the group stops.
    pub async fn shutdown(&self, grace: Duration) {
        self.broker.shutdown(grace).await;
        if let Some(raft) = self.broker.raft() {
            raft.hand_over().await;
        }
        if let Some(mesh) = self.broker.mesh() {
            mesh.leave().await;
        }
        if let Some(raft) = self.broker.raft() {
            raft.shutdown().await;
        }
    }

    /// Shutdown after the store failed (see [`Server::failed`]): clients are told to go
    /// and the peers that this node leaves; there is no group left to hand over or stop.
    /// Bounded: a node that cannot store must not linger.
    pub async fn shutdown_failed(&self) {
        let stop = async {
            self.broker.shutdown(Duration::from_secs(2)).await;
            if let Some(mesh) = self.broker.mesh() {
                mesh.leave().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), stop).await;
    }

    /// Resolves (with the reason) if the replicated store stopped on an error it cannot
    /// go on from: the process must then stop (see `RaftStore::failed`).
    pub async fn failed(&self) -> String {
        match self.broker.raft() {
            Some(raft) => raft.failed().await,
            None => std::future::pending().await,
        }
    }

    /// The bound cluster gRPC address, when the node is in a cluster.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.broker.mesh().map(|m| m.local_addr)
    }
}

/// Where and how this node keeps its replicated store.
fn raft_config(config: &Config, mesh: Option<&Mesh>) -> RaftConfig {
    let r = &config.raft;
    RaftConfig {
        data_dir: config.data_dir.clone(),
        node_id: raftmq_cluster::stable_hash(config.node_name.as_bytes()),
        node_name: config.node_name.clone(),
        address: mesh.map_or_else(|| config.cluster.listen.to_string(), |m| m.advertise().to_owned()),
        snapshot_every: r.snapshot_every,
        keep_behind_snapshot: r.keep_behind_snapshot,
        max_batch: r.max_batch,
        queue: r.queue,
        heartbeat: r.heartbeat(),
        election_timeout: r.election_timeout(),
        formation: config.cluster.active().then(|| config.cluster.formation()),
        write_timeout: Duration::from_millis(r.write_timeout_ms.max(1)),
        retained: RetainedLimits {
            max_messages: if config.retained.enabled { config.retained.max_messages } else { 0 },
            max_bytes: config.retained.max_bytes,
            max_payload: config.retained.max_payload,
        },
    }
}

/// Once a second: keep-alive expiry and forgotten QoS 2 packet ids, for every session. One
/// pass over the sessions costs less than a timer in every connection.
fn spawn_session_sweeper(broker: &Arc<Broker>) {
    let broker = Arc::clone(broker);
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let multiplier = broker.config.mqtt.keepalive_multiplier;
        let rel_timeout = Duration::from_secs(broker.config.mqtt.await_rel_timeout_secs);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    broker.sweep_sessions(multiplier, rel_timeout);
                }
                _ = broker.shutdown.cancelled() => return,
            }
        }
    });
}

fn spawn_flapping_sweeper(broker: &Arc<Broker>) {
    let broker = Arc::clone(broker);
    let tasks = broker.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(broker.flapping.window());
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    broker.flapping.sweep();
                    broker.login_failures.sweep();
                }
                _ = broker.shutdown.cancelled() => return,
            }
        }
    });
}
