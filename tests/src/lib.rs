//! Test harness: in-process raftmq brokers on loopback and a raw MQTT client that speaks
//! the wire format byte for byte, for cases a well-behaved client library cannot produce.
//!
//! Every wait has a deadline; nothing sleeps and hopes.

pub mod netns;
pub mod pki;
pub mod processes;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{self, ConnAck, Connect, Packet, Properties, Protocol, PubKind, PubResponse, Publish, Subscribe};
use raftmq_node::config::Config;
use raftmq_node::server::Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Any byte stream a test client can speak MQTT over (TCP, TLS, WebSocket).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Default deadline for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// A broker running inside the test process on an ephemeral loopback port.
pub struct TestBroker {
    /// The running server.
    pub server: Server,
    /// Its MQTT address.
    pub addr: SocketAddr,
}

/// A password file and an ACL file in a temporary directory (removed when dropped).
pub struct SecurityFiles {
    _dir: tempfile::TempDir,
    /// The password file.
    pub passwd: std::path::PathBuf,
    /// The ACL file.
    pub acl: std::path::PathBuf,
}

/// Writes `users` (name, password) into a password file and `acl` into an ACL file.
pub fn security_files(users: &[(&str, &str)], acl: &str) -> anyhow::Result<SecurityFiles> {
    let dir = tempfile::tempdir()?;
    let passwd = dir.path().join("passwd");
    let mut file = raftmq_node::security::passwd::PasswordFile::default();
    for (user, password) in users {
        file.set(user, raftmq_node::security::passwd::hash_password(password.as_bytes())?);
    }
    file.save(&passwd)?;
    let acl_path = dir.path().join("acl");
    std::fs::write(&acl_path, acl)?;
    Ok(SecurityFiles { _dir: dir, passwd, acl: acl_path })
}

/// An HS256 JSON Web Token with `claims`, signed with `secret`.
pub fn jwt_hs256(secret: &str, claims: serde_json::Value) -> anyhow::Result<String> {
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?)
}

/// The configuration of a test broker: MQTT on an ephemeral loopback port, no other
/// listener, no admin API; then `tweak`.
pub fn test_config(tweak: impl FnOnce(&mut Config)) -> Config {
    let mut config = Config { data_dir: fresh_data_dir(), ..Config::default() };
    config.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    // No default WebSocket listener on a fixed port: tests add listeners on port 0.
    config.listeners.clear();
    config.admin.enabled = false;
    tweak(&mut config);
    config
}

/// The directory under which test brokers keep their data (one fresh directory each,
/// removed when the broker is dropped).
fn test_data_root() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("raftmq-test-data-{}", std::process::id()))
}

/// A data directory no other broker of this run uses.
pub fn fresh_data_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    test_data_root().join(format!("broker-{n}"))
}

/// Removes a directory handed out by [`fresh_data_dir`] when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes `config`'s data directory when the test's runtime ends (a task holding the
/// guard is dropped with it), if the harness handed it out: a test that restarts a broker
/// on a directory of its own keeps it.
fn clean_up_later(config: &Config) {
    if config.data_dir.starts_with(test_data_root()) {
        let guard = RemoveOnDrop(config.data_dir.clone());
        tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
    }
}

/// Starts a broker with default settings adjusted by `tweak`.
pub async fn start_broker(tweak: impl FnOnce(&mut Config)) -> anyhow::Result<TestBroker> {
    let config = test_config(tweak);
    config.validate()?;
    clean_up_later(&config);
    let server = Server::start(config).await?;
    let addr = server.mqtt_addr;
    Ok(TestBroker { server, addr })
}

/// Starts a broker over the given stores (a shared or failing session store, a registry
/// shared with another broker).
pub async fn start_broker_over(config: Config, stores: raftmq_node::broker::Stores) -> anyhow::Result<TestBroker> {
    config.validate()?;
    let server = Server::start_with(config, Default::default(), stores).await?;
    let addr = server.mqtt_addr;
    Ok(TestBroker { server, addr })
}

/// Starts `n` brokers in this process that form one cluster over loopback: the first
/// listens for peers on an ephemeral port, the others use it as their seed (they find each
/// other through it). Returns once every node sees every other up and holds its routes.
pub async fn start_cluster(n: usize, tweak: impl Fn(&mut Config)) -> anyhow::Result<Vec<TestBroker>> {
    let node = |i: usize, seeds: Vec<String>| {
        test_config(|c| {
            c.node_name = format!("node{i}");
            c.cluster.enabled = true;
            c.cluster.listen = SocketAddr::from(([127, 0, 0, 1], 0));
            c.cluster.seeds = seeds;
            c.cluster.secret = Some("test-secret".into());
            c.cluster.heartbeat_ms = 200;
            c.cluster.failure_timeout_ms = 1500;
            tweak(c);
        })
    };
    let first = start_config(node(1, Vec::new())).await?;
    let seed = first.server.cluster_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut nodes = vec![first];
    for i in 2..=n {
        nodes.push(start_config(node(i, vec![seed.clone()])).await?);
    }
    wait_for_cluster(&nodes, n).await?;
    Ok(nodes)
}

async fn start_config(config: Config) -> anyhow::Result<TestBroker> {
    config.validate()?;
    clean_up_later(&config);
    let server = Server::start(config).await?;
    let addr = server.mqtt_addr;
    Ok(TestBroker { server, addr })
}

/// Waits until each of `nodes` sees `n` nodes up (itself included) and has every peer's
/// routes.
pub async fn wait_for_cluster(nodes: &[TestBroker], n: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let complete = nodes.iter().all(|b| {
            let up = b.server.broker.cluster_nodes().iter().filter(|v| v.status.label() == "up").count();
            up == n && b.server.broker.cluster_ready()
        });
        if complete {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let views: Vec<_> = nodes.iter().map(|b| b.server.broker.cluster_nodes()).collect();
            bail!("the cluster did not form: {views:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A raw MQTT client over any byte stream.
pub struct Raw {
    stream: Box<dyn Io>,
    buf: BytesMut,
    /// Protocol used to encode and decode.
    pub protocol: Protocol,
}

impl Raw {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr, protocol: Protocol) -> anyhow::Result<Raw> {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await??;
        stream.set_nodelay(true)?;
        Ok(Raw::over(stream, protocol))
    }

    /// A client over an already established stream.
    pub fn over(stream: impl Io + 'static, protocol: Protocol) -> Raw {
        Raw { stream: Box::new(stream), buf: BytesMut::new(), protocol }
    }

    /// Sends CONNECT over an established stream and returns the CONNACK.
    pub async fn handshake(mut self, connect: Connect) -> anyhow::Result<(Raw, ConnAck)> {
        self.send(&Packet::Connect(Box::new(connect))).await?;
        match self.recv().await? {
            Packet::ConnAck(ack) => Ok((self, ack)),
            other => bail!("expected CONNACK, got {other:?}"),
        }
    }

    /// Opens a connection and completes a CONNECT with `client_id`; returns the CONNACK.
    pub async fn connect(addr: SocketAddr, protocol: Protocol, client_id: &str, clean_start: bool) -> anyhow::Result<(Raw, ConnAck)> {
        let mut c = connect_packet(protocol, client_id, clean_start);
        if protocol.is_v5() && !clean_start {
            c.properties.session_expiry_interval = Some(300);
        }
        Raw::connect_with(addr, c).await
    }

    /// Opens a connection and sends `connect`; returns the CONNACK.
    pub async fn connect_with(addr: SocketAddr, connect: Connect) -> anyhow::Result<(Raw, ConnAck)> {
        Raw::open(addr, connect.protocol).await?.handshake(connect).await
    }

    /// Sends one packet.
    pub async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        codec::encode(packet, self.protocol, &mut out);
        self.send_bytes(&out).await
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        // WebSocket and TLS streams buffer until flushed.
        self.stream.flush().await?;
        Ok(())
    }

    /// Receives the next packet within [`DEADLINE`].
    pub async fn recv(&mut self) -> anyhow::Result<Packet> {
        self.recv_within(DEADLINE).await?.ok_or_else(|| anyhow!("connection closed"))
    }

    /// Receives the next packet within `deadline`; `Ok(None)` if the broker closed.
    pub async fn recv_within(&mut self, deadline: Duration) -> anyhow::Result<Option<Packet>> {
        tokio::time::timeout(deadline, async {
            loop {
                if let Some(p) = codec::decode(&mut self.buf, Some(self.protocol), usize::MAX)? {
                    return Ok(Some(p));
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return Ok(None),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            }
        })
        .await
        .context("timed out waiting for a packet")?
    }

    /// Expects the broker to close the connection within `deadline`, ignoring at most a
    /// DISCONNECT or CONNACK before it; returns that packet.
    pub async fn expect_closed(&mut self, deadline: Duration) -> anyhow::Result<Option<Packet>> {
        let mut last = None;
        loop {
            match self.recv_within(deadline).await? {
                None => return Ok(last),
                Some(p @ (Packet::Disconnect(_) | Packet::ConnAck(_))) if last.is_none() => last = Some(p),
                Some(p) => bail!("expected close, got {p:?}"),
            }
        }
    }

    /// Asserts nothing arrives for `quiet` (used after a positive wait proved delivery works).
    pub async fn expect_silence(&mut self, quiet: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(quiet, self.recv_within(quiet + Duration::from_secs(1))).await {
            Err(_) => Ok(()),
            Ok(Err(e)) => Err(e),
            Ok(Ok(None)) => bail!("connection closed"),
            Ok(Ok(Some(p))) => bail!("expected silence, got {p:?}"),
        }
    }

    /// Subscribes to `filter` and waits for the SUBACK; returns its codes.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) -> anyhow::Result<Vec<u8>> {
        let opts = SubscriptionOptions { qos, ..SubscriptionOptions::default() };
        self.subscribe_with(packet_id, vec![(filter.to_owned(), opts)], Properties::default()).await
    }

    /// Sends SUBSCRIBE and returns the whole SUBACK (codes and properties).
    pub async fn suback_for(&mut self, packet_id: u16, filters: Vec<(String, SubscriptionOptions)>) -> anyhow::Result<codec::SubAck> {
        self.send(&Packet::Subscribe(Subscribe { packet_id, properties: Properties::default(), filters })).await?;
        match self.recv().await? {
            Packet::SubAck(s) if s.packet_id == packet_id => Ok(s),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribes with full options and waits for the SUBACK.
    pub async fn subscribe_with(
        &mut self,
        packet_id: u16,
        filters: Vec<(String, SubscriptionOptions)>,
        properties: Properties,
    ) -> anyhow::Result<Vec<u8>> {
        self.send(&Packet::Subscribe(Subscribe { packet_id, properties, filters })).await?;
        match self.recv().await? {
            Packet::SubAck(s) if s.packet_id == packet_id => Ok(s.codes),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes and completes the QoS handshake; returns the ack's reason code.
    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) -> anyhow::Result<u8> {
        self.send(&Packet::Publish(publish(topic, payload, qos, retain, packet_id))).await?;
        match qos {
            QoS::AtMostOnce => Ok(0),
            QoS::AtLeastOnce => match self.recv().await? {
                Packet::PubResponse(r) if r.kind == PubKind::PubAck && r.packet_id == packet_id => Ok(r.reason),
                other => bail!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                let rec = match self.recv().await? {
                    Packet::PubResponse(r) if r.kind == PubKind::PubRec && r.packet_id == packet_id => r.reason,
                    other => bail!("expected PUBREC, got {other:?}"),
                };
                self.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, packet_id, 0))).await?;
                match self.recv().await? {
                    Packet::PubResponse(r) if r.kind == PubKind::PubComp && r.packet_id == packet_id => Ok(rec),
                    other => bail!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    /// Waits for the next PUBLISH, answering PINGs nowhere (none are expected).
    pub async fn recv_publish(&mut self) -> anyhow::Result<Publish> {
        match self.recv().await? {
            Packet::Publish(p) => Ok(p),
            other => bail!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Checks the broker still answers a PINGREQ on this connection.
    pub async fn ping(&mut self) -> anyhow::Result<()> {
        self.send(&Packet::PingReq).await?;
        match self.recv().await? {
            Packet::PingResp => Ok(()),
            other => bail!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// Checks a Prometheus exposition with `promtool check metrics` (Debian's `prometheus`
/// package); skipped when promtool is missing, unless `REQUIRE_PROMTOOL` is set.
pub async fn promtool_check(text: &str) -> anyhow::Result<()> {
    let found = std::process::Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        anyhow::ensure!(std::env::var_os("REQUIRE_PROMTOOL").is_none(), "promtool not found but REQUIRE_PROMTOOL is set");
        eprintln!("skipping promtool check: promtool not installed");
        return Ok(());
    }
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).await?;
    }
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output()).await??;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "promtool check metrics failed:\n{report}");
    anyhow::ensure!(!report.to_lowercase().contains("error"), "{report}");
    Ok(())
}

/// Puts `state` into a session store the way a node that owned it would have: a claim
/// under epoch 1, then the whole session.
pub async fn store_session(
    store: &dyn raftmq_cluster::session::SessionStore,
    state: raftmq_cluster::session::SessionState,
) -> anyhow::Result<()> {
    use raftmq_cluster::session_ops::{SessionCommand, SessionOp};
    let cmd = |op| SessionCommand { client_id: state.client_id.clone(), epoch: 1, op };
    let claim = SessionOp::Claim { clean: true, owner: state.owner.clone(), expiry_secs: state.expiry_secs };
    let outcomes = store.apply(vec![cmd(claim), cmd(SessionOp::Reset(Box::new(state.clone())))]).await?;
    anyhow::ensure!(outcomes.iter().all(|o| o.is_ok()), "{outcomes:?}");
    Ok(())
}

/// The reason code of the DISCONNECT that preceded a close (`None`: closed without one).
pub fn disconnect_reason(last: Option<Packet>) -> Option<u8> {
    match last {
        Some(Packet::Disconnect(d)) => Some(d.reason),
        _ => None,
    }
}

/// A CONNECT with keep alive 60 and nothing else.
pub fn connect_packet(protocol: Protocol, client_id: &str, clean_start: bool) -> Connect {
    Connect {
        protocol,
        clean_start,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }
}

/// A PUBLISH packet.
pub fn publish(topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.to_owned(),
        packet_id: if qos == QoS::AtMostOnce { 0 } else { packet_id },
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Asserts a good client can still connect and ping: the broker keeps serving others.
pub async fn assert_serving(addr: SocketAddr) -> anyhow::Result<()> {
    let (mut raw, ack) = Raw::connect(addr, Protocol::V311, "", true).await?;
    anyhow::ensure!(ack.code == 0, "CONNACK {:#x}", ack.code);
    raw.ping().await
}
