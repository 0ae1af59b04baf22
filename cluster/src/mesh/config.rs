//! How this node joins the mesh: its name and addresses, how it finds peers, the shared
//! secret, and the timing of heartbeats, failure detection and route acknowledgements.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How a node finds its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// A fixed list of `host:port` seeds (which may include the node itself).
    Static(Vec<String>),
    /// The addresses a DNS name resolves to (a Kubernetes headless service), re-resolved
    /// every `interval`.
    Dns {
        /// The name to resolve.
        name: String,
        /// The cluster port on every address.
        port: u16,
        /// How often to resolve again.
        interval: Duration,
    },
}

/// PEM files for mutual TLS between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshTls {
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// The CA every peer's certificate must chain to.
    pub ca: PathBuf,
    /// The name peers' certificates are checked against.
    pub server_name: String,
}

/// Everything the mesh needs to run.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This node's name, unique in the cluster.
    pub name: String,
    /// Where the gRPC listener binds.
    pub listen: SocketAddr,
    /// The `host:port` peers dial to reach this node.
    pub advertise: String,
    /// How peers are found.
    pub discovery: Discovery,
    /// Carried by every call; a call without it is refused.
    pub secret: Option<String>,
    /// Mutual TLS between nodes.
    pub tls: Option<MeshTls>,
    /// Interval of heartbeats on the route stream.
    pub heartbeat: Duration,
    /// A peer not heard from for this long is down: its routes are dropped.
    pub failure_timeout: Duration,
    /// How long a SUBACK waits for the peers to acknowledge a new route.
    pub route_ack_timeout: Duration,
    /// Messages waiting for one peer at most.
    pub forward_queue: usize,
    /// Messages per forwarded batch at most.
    pub forward_batch: usize,
    /// How long a publisher waits for room in a full forward queue before the message is
    /// dropped for that peer.
    pub forward_wait: Duration,
    /// Route changes remembered for peers that reconnect (older ones get a snapshot).
    pub route_log: usize,
    /// Hold this node's routes back from its peers until [`super::Mesh::routes_ready`]:
    /// a restarted node sends them only once it has recovered its persistent sessions, so
    /// no peer takes an incomplete set for the whole.
    pub hold_routes: bool,
}

impl MeshConfig {
    /// A configuration for node `name` listening on `listen` (advertised as is), with
    /// `seeds`, and the default timings.
    pub fn new(name: impl Into<String>, listen: SocketAddr, seeds: Vec<String>) -> MeshConfig {
        MeshConfig {
            name: name.into(),
            listen,
            advertise: listen.to_string(),
            discovery: Discovery::Static(seeds),
            secret: None,
            tls: None,
            heartbeat: Duration::from_millis(500),
            failure_timeout: Duration::from_secs(3),
            route_ack_timeout: Duration::from_secs(1),
            forward_queue: 10_000,
            forward_batch: 256,
            forward_wait: Duration::from_millis(500),
            route_log: 65_536,
            hold_routes: false,
        }
    }
}
