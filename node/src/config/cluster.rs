//! `[cluster]`: how this node finds and talks to the other nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use raftmq_cluster::mesh::{Discovery, MeshConfig, MeshTls};
use raftmq_cluster::raft::Formation;
use serde::{Deserialize, Deserializer};

/// How peers are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryKind {
    /// The `seeds` list.
    #[default]
    Static,
    /// The addresses `dns_name` resolves to (a Kubernetes headless service).
    Dns,
}

/// Mutual TLS between nodes (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsConfig {
    /// This node's certificate chain.
    pub certfile: PathBuf,
    /// This node's private key.
    pub keyfile: PathBuf,
    /// The CA every node's certificate must chain to.
    pub cacertfile: PathBuf,
    /// The name in the nodes' certificates (default `raftmq`).
    #[serde(default = "default_server_name")]
    pub server_name: String,
}

fn default_server_name() -> String {
    "raftmq".into()
}

/// Cluster settings. Without seeds, DNS discovery or `enabled`, the node runs alone and
/// opens no cluster port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Run the cluster listener even without seeds (a first node others will seed from).
    pub enabled: bool,
    /// Address of the gRPC listener for peers.
    pub listen: SocketAddr,
    /// The `host:port` peers dial (default: the listen address, or this host's name and
    /// the listen port when listening on every interface).
    pub advertise: Option<String>,
    /// `host:port` of nodes to join (may include this node); a list, or one string with
    /// commas (`RAFTMQ_CLUSTER__SEEDS=n1:5370,n2:5370`).
    #[serde(deserialize_with = "comma_list")]
    pub seeds: Vec<String>,
    /// `static` (the seeds) or `dns`.
    pub discovery: DiscoveryKind,
    /// Name to resolve for `dns` discovery.
    pub dns_name: Option<String>,
    /// Cluster port of the resolved addresses.
    pub dns_port: u16,
    /// Seconds between DNS lookups.
    pub dns_interval_secs: u64,
    /// Secret every node must present; set it whenever the cluster port is reachable by
    /// anyone else.
    pub secret: Option<String>,
    /// Milliseconds between heartbeats.
    pub heartbeat_ms: u64,
    /// A peer silent this long (ms) is down: its routes are dropped.
    pub failure_timeout_ms: u64,
    /// How long (ms) a SUBACK waits for every live peer to acknowledge the new route.
    pub route_ack_timeout_ms: u64,
    /// Messages waiting for one peer at most.
    pub forward_queue: usize,
    /// Messages per forwarded batch at most.
    pub forward_batch: usize,
    /// How long (ms) a publisher waits for room in a peer's full queue before the copy
    /// for that peer is dropped.
    pub forward_wait_ms: u64,
    /// Mutual TLS between nodes.
    pub tls: Option<ClusterTlsConfig>,
    /// Nodes that must have met (this one included) before a new cluster initializes its
    /// Raft group; 0: every static seed must have answered (DNS discovery: 3 nodes).
    pub bootstrap_expect: usize,
    /// Voters of the Raft group at most; nodes beyond are learners (replicas that do not
    /// vote).
    pub max_voters: usize,
    /// Seconds a member may be gone before the leader removes it from the Raft group (0:
    /// never; like EMQX's `cluster.autoclean`, 24 h).
    pub autoclean_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 5370)),
            advertise: None,
            seeds: Vec::new(),
            discovery: DiscoveryKind::Static,
            dns_name: None,
            dns_port: 5370,
            dns_interval_secs: 5,
            secret: None,
            heartbeat_ms: 500,
            failure_timeout_ms: 3000,
            route_ack_timeout_ms: 1000,
            forward_queue: 10_000,
            forward_batch: 256,
            forward_wait_ms: 500,
            tls: None,
            bootstrap_expect: 0,
            max_voters: 5,
            autoclean_secs: 86_400,
        }
    }
}

fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        OneOrMany::Many(v) => v,
    })
}

impl ClusterConfig {
    /// Whether this node joins a cluster.
    pub fn active(&self) -> bool {
        self.enabled || !self.seeds.is_empty() || self.discovery == DiscoveryKind::Dns
    }

    /// Checks what the types cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.discovery == DiscoveryKind::Dns && self.dns_name.as_deref().is_none_or(str::is_empty) {
            return Err("cluster.discovery = \"dns\" needs cluster.dns_name".into());
        }
        if self.heartbeat_ms == 0 || self.failure_timeout_ms <= self.heartbeat_ms {
            return Err("cluster.failure_timeout_ms must be longer than cluster.heartbeat_ms (> 0)".into());
        }
        if self.max_voters == 0 {
            return Err("cluster.max_voters must be at least 1".into());
        }
        if self.forward_queue == 0 || self.forward_batch == 0 {
            return Err("cluster.forward_queue and cluster.forward_batch must be at least 1".into());
        }
        Ok(())
    }

    /// How this node forms or joins the cluster's Raft group.
    pub fn formation(&self) -> Formation {
        Formation {
            bootstrap_expect: self.bootstrap_expect,
            max_voters: self.max_voters,
            autoclean: (self.autoclean_secs > 0).then(|| std::time::Duration::from_secs(self.autoclean_secs)),
        }
    }

    /// The mesh settings for node `name`.
    pub fn mesh(&self, name: &str) -> MeshConfig {
        let advertise = self.advertise.clone().unwrap_or_else(|| {
            if self.listen.ip().is_unspecified() {
                format!("{}:{}", host_name(), self.listen.port())
            } else {
                self.listen.to_string()
            }
        });
        let discovery = match self.discovery {
            DiscoveryKind::Static => Discovery::Static(self.seeds.clone()),
            DiscoveryKind::Dns => Discovery::Dns {
                name: self.dns_name.clone().unwrap_or_default(),
                port: self.dns_port,
                interval: Duration::from_secs(self.dns_interval_secs.max(1)),
            },
        };
        MeshConfig {
            advertise,
            discovery,
            secret: self.secret.clone().filter(|s| !s.is_empty()),
            tls: self.tls.as_ref().map(|t| MeshTls {
                cert: t.certfile.clone(),
                key: t.keyfile.clone(),
                ca: t.cacertfile.clone(),
                server_name: t.server_name.clone(),
            }),
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            failure_timeout: Duration::from_millis(self.failure_timeout_ms),
            route_ack_timeout: Duration::from_millis(self.route_ack_timeout_ms),
            forward_queue: self.forward_queue,
            forward_batch: self.forward_batch,
            forward_wait: Duration::from_millis(self.forward_wait_ms),
            // A node of a cluster recovers its persistent sessions before its routes count.
            hold_routes: true,
            ..MeshConfig::new(name, self.listen, Vec::new())
        }
    }
}

/// This host's name (what other machines in a cluster, or pods in a StatefulSet, resolve).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_take_a_list_or_a_comma_separated_string() {
        let from_list: ClusterConfig = toml::from_str(r#"seeds = ["a:1", "b:2"]"#).unwrap_or_default();
        let from_string: ClusterConfig = toml::from_str(r#"seeds = "a:1, b:2""#).unwrap_or_default();
        assert_eq!(from_list.seeds, ["a:1", "b:2"]);
        assert_eq!(from_string.seeds, from_list.seeds);
        assert!(from_list.active());
        assert!(!ClusterConfig::default().active());
    }
}
