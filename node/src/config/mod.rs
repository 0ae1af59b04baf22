//! Configuration: defaults that work with no file, a TOML file, `RAFTMQ_` environment
//! variables, then command-line flags, each layer overriding the one before.
//!
//! Environment variables name a key path with `__` between sections:
//! `RAFTMQ_NODE_NAME=n1`, `RAFTMQ_MQTT__MAX_INFLIGHT=64`. Values are parsed as TOML
//! (numbers, booleans), falling back to a string.

use std::net::SocketAddr;
use std::path::PathBuf;

use raftmq_cluster::session::DropPolicy;
use serde::Deserialize;

mod cluster;
mod load;
mod raft;
pub use cluster::{ClusterConfig, ClusterTlsConfig, DiscoveryKind};
pub use raft::RaftSettings;

/// A configuration that could not be loaded; the broker refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML or a value in it is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Everything a node needs to run.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of this node in logs, `$SYS` and the cluster.
    pub node_name: String,
    /// Directory for persistent data.
    pub data_dir: PathBuf,
    /// Log filter (RUST_LOG syntax); the `RUST_LOG` variable wins when set.
    pub log: String,
    /// MQTT protocol settings and limits.
    pub mqtt: MqttConfig,
    /// Retained message settings.
    pub retained: RetainedConfig,
    /// Admin HTTP listener (health, API, metrics).
    pub admin: AdminConfig,
    /// Shared subscriptions.
    pub shared: SharedConfig,
    /// `$SYS` topics.
    pub sys: SysConfig,
    /// Listeners besides `mqtt.listen`: TLS, WebSocket, secure WebSocket, more TCP.
    pub listeners: Vec<ListenerConfig>,
    /// Authentication.
    pub auth: AuthConfig,
    /// Authorization (ACL).
    pub acl: AclConfig,
    /// Banned clients, users and addresses.
    pub bans: Vec<BanConfig>,
    /// Automatic bans for clients that reconnect too often.
    pub flapping: FlappingConfig,
    /// Other nodes: discovery, the gRPC link, forwarding.
    pub cluster: ClusterConfig,
    /// The replicated store on the data directory.
    pub raft: RaftSettings,
    /// `RAFTMQ_*` variables that named no configuration key and were skipped (reported
    /// once at start).
    #[serde(skip)]
    pub ignored_env: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: "raftmq@127.0.0.1".into(),
            data_dir: PathBuf::from("./data"),
            log: "info".into(),
            mqtt: MqttConfig::default(),
            retained: RetainedConfig::default(),
            admin: AdminConfig::default(),
            shared: SharedConfig::default(),
            sys: SysConfig::default(),
            listeners: vec![ListenerConfig::default()],
            auth: AuthConfig::default(),
            acl: AclConfig::default(),
            bans: Vec::new(),
            flapping: FlappingConfig::default(),
            cluster: ClusterConfig::default(),
            raft: RaftSettings::default(),
            ignored_env: Vec::new(),
        }
    }
}

/// What to drop when a session queue is full (config spelling of [`DropPolicy`]).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueueDropPolicy {
    /// Drop the oldest QoS 0 message, else the oldest message.
    #[default]
    DropOldest,
    /// Refuse the new message.
    DropNew,
}

impl From<QueueDropPolicy> for DropPolicy {
    fn from(p: QueueDropPolicy) -> Self {
        match p {
            QueueDropPolicy::DropOldest => DropPolicy::DropOldest,
            QueueDropPolicy::DropNew => DropPolicy::DropNew,
        }
    }
}

/// MQTT listener, protocol and limit settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// TCP listener address.
    pub listen: SocketAddr,
    /// Largest packet accepted or sent, in bytes (MQTT 5 Maximum Packet Size).
    pub max_packet_size: usize,
    /// Largest packet accepted before CONNECT has been accepted (capped by `max_packet_size`).
    pub max_connect_packet_size: usize,
    /// Seconds a new connection has to send a complete CONNECT.
    pub connect_timeout_secs: u64,
    /// Largest keep alive accepted (0 = no limit). MQTT 5 clients asking for more (or for
    /// 0) get this as Server Keep Alive; MQTT 3 clients are refused with 0x02.
    pub max_keepalive: u16,
    /// Keep alive tolerance: the connection closes after this many keep-alive periods of silence.
    pub keepalive_multiplier: f64,
    /// Longest client identifier accepted, in bytes.
    pub max_client_id_len: usize,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Outbound QoS 1/2 messages in flight per client (never above its Receive Maximum).
    pub max_inflight: u16,
    /// Inbound QoS 1/2 messages in flight per client, advertised as Receive Maximum.
    pub receive_maximum: u16,
    /// Inbound QoS 2 messages awaiting PUBREL per client (MQTT 3 clients; MQTT 5 clients are
    /// bounded by `receive_maximum`).
    pub max_awaiting_rel: usize,
    /// Seconds an inbound QoS 2 packet id may wait for its PUBREL.
    pub await_rel_timeout_secs: u64,
    /// Messages queued per session.
    pub max_queue_len: usize,
    /// Bytes queued per session.
    pub max_queue_bytes: usize,
    /// Queue QoS 0 messages for offline persistent sessions.
    pub queue_qos0: bool,
    /// What to drop when a queue is full.
    pub queue_drop_policy: QueueDropPolicy,
    /// Milliseconds a publisher's connection stops reading while an online subscriber its
    /// messages go to has a queue over half full (until it is down to a quarter). 0: never
    /// hold publishers back; full queues then drop by `queue_drop_policy`.
    pub publish_backpressure_ms: u64,
    /// Session expiry of MQTT 3 persistent sessions (clean session 0), seconds.
    pub session_expiry_secs: u32,
    /// Longest session expiry granted to any client, seconds.
    pub max_session_expiry_secs: u32,
    /// Subscriptions per client.
    pub max_subscriptions: usize,
    /// Concurrent connections on this node.
    pub max_connections: usize,
    /// Most sessions (online and offline) the node holds; a CONNECT that would create one
    /// more is refused (MQTT 5 0x97, MQTT 3 0x03).
    pub max_sessions: usize,
    /// New connections each listener accepts per second; beyond it accepting pauses (the
    /// kernel's backlog holds the rest). 0: no limit.
    pub max_connection_rate: u32,
    /// Seconds a packet may take to arrive once its first byte has, whatever the keep
    /// alive (a client with keep alive 0 cannot hold a half-sent packet forever).
    pub packet_timeout_secs: u64,
    /// Seconds a takeover waits for the old connection to hand its session over.
    pub takeover_timeout_secs: u64,
    /// Seconds a write to a client may block before the connection is dropped.
    pub write_timeout_secs: u64,
    /// Topic aliases a client may define (advertised as Topic Alias Maximum; 0 disables).
    pub max_topic_alias: u16,
    /// Concurrent connections from one IP address (0 = no limit).
    pub max_connections_per_ip: usize,
    /// Accept queue length of every MQTT listener (the kernel caps it at `somaxconn`). A
    /// short queue drops SYNs during connection storms; the clients retry after a second.
    pub listen_backlog: u32,
    /// PUBLISH packets per second a client may send (0 = no limit).
    pub max_publish_rate: u32,
    /// What happens above `max_publish_rate`.
    pub publish_rate_action: RateAction,
    /// Sent as Response Information to MQTT 5 clients that request it.
    pub response_information: Option<String>,
}

/// What to do with a client publishing faster than allowed.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RateAction {
    /// Stop reading from the client until it is back under the rate (TCP backpressure).
    #[default]
    Throttle,
    /// Disconnect it (MQTT 5: DISCONNECT 0x96 Message rate too high).
    Disconnect,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            max_packet_size: 1024 * 1024,
            max_connect_packet_size: 128 * 1024,
            connect_timeout_secs: 10,
            max_keepalive: 0,
            keepalive_multiplier: 1.5,
            max_client_id_len: 65535,
            max_topic_levels: 128,
            max_inflight: 32,
            receive_maximum: 32,
            max_awaiting_rel: 100,
            await_rel_timeout_secs: 300,
            max_queue_len: 1000,
            max_queue_bytes: 16 * 1024 * 1024,
            queue_qos0: false,
            publish_backpressure_ms: 100,
            queue_drop_policy: QueueDropPolicy::DropOldest,
            session_expiry_secs: 7200,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_subscriptions: 1000,
            max_connections: 100_000,
            max_sessions: 1_000_000,
            max_connection_rate: 10_000,
            packet_timeout_secs: 60,
            takeover_timeout_secs: 5,
            write_timeout_secs: 30,
            max_topic_alias: 16,
            max_connections_per_ip: 0,
            listen_backlog: 1024,
            max_publish_rate: 0,
            publish_rate_action: RateAction::Throttle,
            response_information: None,
        }
    }
}

/// Retained message settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RetainedConfig {
    /// Accept retained messages (advertised as Retain Available).
    pub enabled: bool,
    /// Most retained topics.
    pub max_messages: usize,
    /// Most retained bytes.
    pub max_bytes: usize,
    /// Largest retained payload.
    pub max_payload: usize,
}

impl Default for RetainedConfig {
    fn default() -> Self {
        RetainedConfig { enabled: true, max_messages: 100_000, max_bytes: 256 * 1024 * 1024, max_payload: 1024 * 1024 }
    }
}

/// Shared subscription settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SharedConfig {
    /// How a group picks the member for each message.
    pub strategy: crate::routing::shared::Strategy,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    #[default]
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

/// Which part of a client certificate becomes the MQTT user name.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PeerCertUsername {
    /// The certificate does not set the user name.
    #[default]
    None,
    /// The subject's Common Name.
    Cn,
    /// The first DNS or e-mail Subject Alternative Name.
    San,
}

/// One listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    /// Transport.
    pub kind: ListenerKind,
    /// Address; defaults to 0.0.0.0 and 1883 (tcp), 8883 (tls), 8083 (ws), 8084 (wss).
    pub bind: Option<SocketAddr>,
    /// HTTP path of a WebSocket listener.
    pub path: String,
    /// Server certificate chain (PEM), for tls and wss.
    pub certfile: Option<PathBuf>,
    /// Server private key (PEM), for tls and wss.
    pub keyfile: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    pub cacertfile: Option<PathBuf>,
    /// Require a valid client certificate (mutual TLS).
    pub verify_peer: bool,
    /// Use a part of the client certificate as the user name.
    pub peer_cert_as_username: PeerCertUsername,
    /// WebSocket Origin values accepted (empty: any).
    pub allowed_origins: Vec<String>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            kind: ListenerKind::Ws,
            bind: None,
            path: "/mqtt".to_owned(),
            certfile: None,
            keyfile: None,
            cacertfile: None,
            verify_peer: false,
            peer_cert_as_username: PeerCertUsername::None,
            allowed_origins: Vec::new(),
        }
    }
}

impl ListenerConfig {
    /// The address to bind.
    pub fn addr(&self) -> SocketAddr {
        let port = match self.kind {
            ListenerKind::Tcp => 1883,
            ListenerKind::Tls => 8883,
            ListenerKind::Ws => 8083,
            ListenerKind::Wss => 8084,
        };
        self.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], port)))
    }

    /// Whether the transport is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.kind, ListenerKind::Tls | ListenerKind::Wss)
    }
}

/// An authentication source, for `auth.chain`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthSource {
    /// `auth.password_file`.
    PasswordFile,
    /// `auth.jwt`.
    Jwt,
}

/// Authentication settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients without credentials. Default: true, unless an authenticator is
    /// configured.
    pub allow_anonymous: Option<bool>,
    /// File of `user:argon2id-hash` lines, managed with `raftmq passwd`.
    pub password_file: Option<PathBuf>,
    /// JSON Web Token authentication.
    pub jwt: Option<JwtConfig>,
    /// Order in which authenticators are tried (default: password_file, then jwt).
    pub chain: Vec<AuthSource>,
    /// Threads that verify passwords (argon2id, 19 MiB each). Default: the number of
    /// cores.
    pub verify_workers: Option<usize>,
    /// Password checks that may wait for a verify worker; a CONNECT beyond them is
    /// refused as busy (MQTT 5 0x89, MQTT 3 0x03).
    pub verify_queue: usize,
    /// Failed logins per address within `failure_window_secs`; beyond it the address is
    /// refused without a password check (0x9F / 0x05). 0: no limit.
    pub max_failures_per_address: u32,
    /// Failed logins per user name within `failure_window_secs`; beyond it only addresses
    /// without failures of their own may still try that user. 0: no limit.
    pub max_failures_per_user: u32,
    /// Window of the failure limits, seconds.
    pub failure_window_secs: u64,
    /// A persistent session can only be resumed (or taken over, or cleaned) by the
    /// identity (user name) that created it; another is refused with 0x87 / 0x05.
    pub bind_session_to_user: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            jwt: None,
            chain: Vec::new(),
            verify_workers: None,
            verify_queue: 64,
            max_failures_per_address: 60,
            max_failures_per_user: 10,
            failure_window_secs: 60,
            bind_session_to_user: true,
        }
    }
}

/// JWT signature algorithm.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    #[default]
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256 and a public key.
    RS256,
    /// ECDSA P-256 with SHA-256 and a public key.
    ES256,
}

/// JWT authentication: the token comes in the password field.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Signature algorithm.
    pub algorithm: JwtAlgorithm,
    /// Shared secret (HS256).
    pub secret: Option<String>,
    /// Public key PEM file (RS256, ES256).
    pub public_key_file: Option<PathBuf>,
    /// The claim that names the user (default `sub`): the client's identity for the ACL
    /// and session ownership. A CONNECT with another user name is refused.
    pub username_claim: String,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig { algorithm: JwtAlgorithm::HS256, secret: None, public_key_file: None, username_claim: "sub".to_owned() }
    }
}

/// What an ACL decides.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AclDecision {
    /// Permit.
    Allow,
    /// Refuse.
    Deny,
}

/// What happens to a client whose PUBLISH the ACL denies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DenyAction {
    /// Drop the message (MQTT 5 QoS 1/2: answer 0x87).
    #[default]
    Ignore,
    /// Disconnect the client (MQTT 5: DISCONNECT 0x87).
    Disconnect,
}

/// Authorization settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Rule file; without one every client may publish and subscribe to anything but `$SYS`
    /// publishes.
    pub file: Option<PathBuf>,
    /// Decision when no rule matches (default: deny).
    pub no_match: Option<AclDecision>,
    /// Reaction to a denied PUBLISH.
    pub deny_action: DenyAction,
    /// Without an ACL file, unauthenticated clients from these networks may still
    /// subscribe to `$SYS/#` and `#`; others may not (default: loopback).
    pub trusted_networks: Vec<String>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            file: None,
            no_match: None,
            deny_action: DenyAction::Ignore,
            trusted_networks: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
        }
    }
}

/// One ban.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct BanConfig {
    /// `client:ID`, `user:NAME` or `ip:ADDRESS[/PREFIX]`.
    pub who: String,
    /// Unix time (seconds) the ban ends; absent: never.
    pub until: Option<u64>,
}

/// Flapping detection.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FlappingConfig {
    /// Detect flapping clients.
    pub enabled: bool,
    /// Connects of one client id within `window_secs` that trigger a ban.
    pub max_count: u32,
    /// Window, seconds.
    pub window_secs: u64,
    /// Ban length, seconds.
    pub ban_secs: u64,
}

impl Default for FlappingConfig {
    fn default() -> Self {
        // Off by default, as in EMQX: a device or a test suite that reconnects in a loop
        // with a fixed client id must not be banned by surprise.
        FlappingConfig { enabled: false, max_count: 15, window_secs: 60, ban_secs: 300 }
    }
}

/// `$SYS` topic settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SysConfig {
    /// Seconds between `$SYS` broker information and statistics messages (0 disables them).
    pub interval_secs: u64,
    /// Publish `$SYS/brokers/<node>/clients/<clientid>/connected|disconnected` events.
    pub client_events: bool,
}

impl Default for SysConfig {
    fn default() -> Self {
        SysConfig { interval_secs: 10, client_events: true }
    }
}

/// Admin HTTP listener settings (health, metrics, REST API).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin listener.
    pub enabled: bool,
    /// Address of the admin HTTP listener.
    pub listen: SocketAddr,
    /// Bearer token accepted by `/api/v1` (`Authorization: Bearer KEY`).
    pub api_key: Option<String>,
    /// User name for basic authentication.
    pub username: Option<String>,
    /// Password for basic authentication.
    pub password: Option<String>,
    /// Serve `/healthz` and `/readyz` without credentials.
    pub open_health: bool,
    /// Serve `/metrics` without credentials.
    pub open_metrics: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 18083)),
            api_key: None,
            username: None,
            password: None,
            open_health: true,
            open_metrics: true,
        }
    }
}

impl AdminConfig {
    /// Whether any credential is configured; without one the API answers loopback only.
    pub fn has_credentials(&self) -> bool {
        self.api_key.is_some() || (self.username.is_some() && self.password.is_some())
    }
}
