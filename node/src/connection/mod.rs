//! One MQTT connection: the CONNECT handshake, then a loop over incoming packets and
//! queued deliveries that also notices kicks (takeover, admin, keep-alive expiry, shutdown)
//! left in the session slot.
//!
//! Generic over the byte stream so TCP, TLS and WebSocket share this code path. The loop's
//! `select!` is cancellation safe: a read moves bytes into the connection's buffer within
//! one poll, and writes happen outside the `select!`. The connected state is kept small
//! (see the "idle connection is small" invariant in docs/ARCHITECTURE.md).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use raftmq_cluster::message::{now_ms, now_us, Message, MessageProperties, QoS};
use raftmq_cluster::session::{InflightMessage, InflightStage, QueuedMessage, WillMessage};
use raftmq_cluster::topic::{self, TopicError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::broker::{AttachError, Attached, Broker, EndKind};
use crate::codec::{
    self, connack_v3, reason, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Protocol, PubKind, PubResponse, Publish,
    PublishRef, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::config::{DenyAction, RateAction};
use crate::net::rate::RateLimiter;
use crate::net::transport::ClientStream;
use crate::routing::shared;
use crate::security::acl::{Access, Subject};
use crate::security::bans::BanTarget;
use crate::security::enhanced::AuthStep;
use crate::security::verify_pool::Busy;
use crate::security::{Credentials, Identity, IdentitySource, Owner, Verdict};
use crate::session::{Ack, ConnInfo, SessionSlot};
use crate::telemetry::printable::{Printable, PrintableOpt};
use crate::telemetry::stats::DropReason;
use crate::telemetry::sys::{self, ClientEvent};

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Socket error or unexpected end of stream.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that are not a valid packet.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A valid packet that breaks a rule; carries the MQTT 5 reason code.
    #[error("protocol violation {reason:#04x}: {what}")]
    Violation {
        /// Reason code for DISCONNECT.
        reason: u8,
        /// What went wrong.
        what: &'static str,
    },
    /// No CONNECT, or a write, within its deadline.
    #[error("timed out")]
    Timeout,
    /// The session store failed.
    #[error("store: {0}")]
    Store(#[from] raftmq_cluster::StoreError),
}

impl ConnectionError {
    fn reason_code(&self) -> u8 {
        match self {
            ConnectionError::Decode(e) => e.reason_code(),
            ConnectionError::Violation { reason, .. } => *reason,
            ConnectionError::Store(_) => reason::IMPLEMENTATION_SPECIFIC_ERROR,
            ConnectionError::Io(_) | ConnectionError::Timeout => reason::UNSPECIFIED_ERROR,
        }
    }
}

fn violation(reason: u8, what: &'static str) -> ConnectionError {
    ConnectionError::Violation { reason, what }
}

/// Framed reads and batched writes over one byte stream.
struct Framed<S> {
    stream: S,
    /// For the byte counters.
    broker: Arc<Broker>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    protocol: Option<Protocol>,
    max_in: usize,
    /// The client's Maximum Packet Size: nothing larger is ever sent [MQTT-3.1.2-25].
    max_out: usize,
}

/// Buffers above this size are released once empty, so an idle connection stays small.
const BUF_KEEP: usize = 16 * 1024;

/// Writes smaller than this do not keep their buffer: a client that only gets the odd
/// acknowledgement or PINGRESP holds no write buffer between them.
const WBUF_SMALL: usize = 512;

/// Size of the per-thread read buffer: the most one read takes from a socket.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Sockets are read into this per-worker buffer and only the bytes read are copied into
    /// the connection's own buffer, so an idle connection holds no read buffer at all.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// Reads the next packet; `Ok(None)` at a clean end of stream. Cancellation safe.
    async fn read_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        loop {
            if let Some(packet) = self.buffered_packet()? {
                return Ok(Some(packet));
            }
            if self.fill().await? == 0 {
                if self.rbuf.is_empty() {
                    return Ok(None);
                }
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    /// Reads what the socket has (up to [`SCRATCH_LEN`]) onto the end of the read buffer;
    /// 0 at end of stream. Cancellation safe: bytes are moved within one poll.
    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    fn poll_fill(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<usize>> {
        // Before CONNECT, read no further than the largest first packet allowed.
        let limit =
            if self.protocol.is_none() { self.max_in.saturating_add(5).saturating_sub(self.rbuf.len()).max(1) } else { SCRATCH_LEN };
        SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => self.poll_read_into(cx, &mut scratch[..limit.min(SCRATCH_LEN)]),
            // Only if a stream's poll_read re-entered this function on the same thread.
            Err(_) => self.poll_read_into(cx, &mut [0; 4096][..limit.min(4096)]),
        })
    }

    fn poll_read_into(&mut self, cx: &mut std::task::Context<'_>, scratch: &mut [u8]) -> std::task::Poll<std::io::Result<usize>> {
        let mut buf = tokio::io::ReadBuf::new(scratch);
        std::task::ready!(std::pin::Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.rbuf.extend_from_slice(buf.filled());
        self.broker.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
        std::task::Poll::Ready(Ok(n))
    }

    /// Whether a whole packet is waiting in the read buffer.
    fn has_packet(&self) -> bool {
        codec::pending_len(&self.rbuf).is_some_and(|len| len <= self.rbuf.len())
    }

    /// The next packet if it is already complete in the read buffer (no I/O).
    fn buffered_packet(&mut self) -> Result<Option<Packet>, ConnectionError> {
        let packet = codec::decode(&mut self.rbuf, self.protocol, self.max_in)?;
        if let Some(p) = &packet {
            self.broker.stats.packets_received[usize::from(p.kind())].fetch_add(1, Ordering::Relaxed);
        }
        Ok(packet)
    }

    /// Lets go of an emptied read buffer: its memory is shared with the payloads just
    /// decoded, and an idle connection should not keep it.
    fn release_read_buffer(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
    }

    /// Encodes `packet` for sending. A packet over the client's Maximum Packet Size loses
    /// its Reason String and User Properties; if it still does not fit it is not sent
    /// [MQTT-3.1.2-25] and false is returned.
    fn send(&mut self, packet: &Packet) -> bool {
        let protocol = self.protocol.unwrap_or(Protocol::V311);
        let start = self.wbuf.len();
        codec::encode(packet, protocol, &mut self.wbuf);
        if self.wbuf.len() - start > self.max_out {
            self.wbuf.truncate(start);
            if let Some(slim) = packet.without_diagnostics() {
                codec::encode(&slim, protocol, &mut self.wbuf);
            }
            if self.wbuf.len() - start > self.max_out || self.wbuf.len() == start {
                self.wbuf.truncate(start);
                self.broker.stats.drop(DropReason::TooLarge, 1);
                return false;
            }
        }
        self.broker.stats.packets_sent[usize::from(packet.kind())].fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Writes everything buffered. The socket usually takes it all at once; only a write
    /// that would block waits, bounded by the write timeout, in a boxed future: the
    /// connection's own future carries no timer for it.
    async fn flush(&mut self) -> Result<(), ConnectionError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let written = self.wbuf.len();
        if !std::future::poll_fn(|cx| std::task::Poll::Ready(self.write_now(cx))).await? {
            let write_timeout = Duration::from_secs(self.broker.config.mqtt.write_timeout_secs);
            let rest = async {
                self.stream.write_all(&self.wbuf).await?;
                self.stream.flush().await
            };
            Box::pin(tokio::time::timeout(write_timeout, rest)).await.map_err(|_| ConnectionError::Timeout)??;
        }
        self.broker.stats.bytes_sent.fetch_add(written as u64, Ordering::Relaxed);
        if written < WBUF_SMALL || self.wbuf.capacity() > BUF_KEEP {
            self.wbuf = BytesMut::new();
        } else {
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Writes what the socket takes without waiting; true once everything is written and
    /// flushed.
    fn write_now(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<bool> {
        use std::task::Poll;
        while !self.wbuf.is_empty() {
            match std::pin::Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => bytes::Buf::advance(&mut self.wbuf, n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        match std::pin::Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(result) => result.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }
}

/// What a connected client negotiated.
struct Client {
    client_id: Arc<str>,
    protocol: Protocol,
    conn_id: u64,
    /// Client's Receive Maximum: our outbound window is at most this.
    receive_maximum: u16,
    will: Option<Box<WillMessage>>,
    /// Session expiry from CONNECT (a DISCONNECT may change it unless it was 0).
    connect_expiry: u32,
    /// Request Problem Information: send Reason Strings on acknowledgements.
    problem_info: bool,
    /// Authentication method of CONNECT, for re-authentication.
    auth_method: Option<Box<str>>,
    /// Topic aliases both ways, made on first use: most clients never use them.
    aliases: Option<Box<TopicAliases>>,
    /// The client's Topic Alias Maximum.
    client_alias_max: u16,
    /// Inbound PUBLISH rate limit.
    rate: Option<Box<RateLimiter>>,
    /// A subscriber whose queue this client's messages are filling: the connection waits
    /// for it to drain before reading more.
    congested: Option<Arc<SessionSlot>>,
    /// The next PUBLISH that matches nothing may yield once (see
    /// `let_earlier_packets_land`); set at each read.
    may_yield: bool,
    /// Who the client authenticated as and its address, for ACL checks; shared with the
    /// session slot, which records it as the session's owner.
    owner: Arc<Owner>,
}

/// Topic aliases of one connection.
#[derive(Default)]
struct TopicAliases {
    /// Aliases the client defined, bounded by `max_topic_alias`.
    inbound: HashMap<u16, String>,
    /// Aliases we defined, bounded by the client's Topic Alias Maximum.
    outbound: HashMap<String, u16>,
}

impl Client {
    /// A Reason String for an acknowledgement, if the client asked for them.
    fn problem(&self, why: &str) -> Properties {
        let mut p = Properties::default();
        if self.problem_info && self.protocol.is_v5() {
            p.reason_string = Some(why.to_owned());
        }
        p
    }

    /// Whether the ACL in force allows `access` to `topic`.
    fn allowed(&self, broker: &Broker, access: Access, topic: &str) -> bool {
        let security = broker.security();
        let subject = Subject { client_id: &self.client_id, identity: &self.owner.identity, peer: self.owner.peer.ip() };
        let ok = security.allows(&subject, access, topic);
        if ok {
            broker.stats.acl_allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = broker.log_limits.acl_denied.allow() {
                tracing::info!(client_id = %Printable(&self.client_id), ?access, topic = %Printable(topic), suppressed, "denied by ACL");
            }
        }
        ok
    }

    /// An acknowledgement with `code`, carrying `why` when it is a failure.
    fn ack(&self, kind: PubKind, packet_id: u16, code: u8, why: &str) -> Packet {
        let mut r = PubResponse::new(kind, packet_id, code);
        if code >= 0x80 {
            r.properties = self.problem(why);
        }
        Packet::PubResponse(r)
    }
}

/// A connection past its handshake: only what the connected loop needs, so an idle client
/// costs little memory. The handshake's state (the decoded CONNECT, authentication) lives in
/// its own boxed future and is freed before the loop starts.
struct Connection<S> {
    framed: Framed<S>,
    client: Client,
    slot: Arc<SessionSlot>,
}

/// Serves one accepted connection to its end. `cert_user` is the user name a verified
/// client certificate stands for, when the listener maps one.
///
/// The arguments go straight into the boxed handshake, so the returned future (the task's
/// memory for the connection's whole life) holds the connected state and little else.
pub fn serve<S>(broker: Arc<Broker>, stream: S, peer: SocketAddr, cert_user: Option<String>) -> impl Future<Output = ()> + Send
where
    S: ClientStream,
{
    let handshake = Box::pin(handshake(broker, stream, peer, cert_user));
    async move {
        let Some(mut conn) = handshake.await else { return };
        let c = &mut conn;
        let broker = Arc::clone(&c.framed.broker);
        let result = connected_loop(&broker, &c.slot, &mut c.client, &mut c.framed).await;
        Box::pin(close(conn, result)).await;
    }
}

/// Reads CONNECT and answers it; `None` when the connection was refused or went away.
async fn handshake<S>(broker: Arc<Broker>, stream: S, peer: SocketAddr, cert_user: Option<String>) -> Option<Connection<S>>
where
    S: ClientStream,
{
    let cfg = &broker.config.mqtt;
    let mut framed = Framed {
        stream,
        broker: Arc::clone(&broker),
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        protocol: None,
        max_in: cfg.max_connect_packet_size.min(cfg.max_packet_size),
        max_out: usize::MAX,
    };
    let connect_timeout = Duration::from_secs(cfg.connect_timeout_secs);
    let first = tokio::select! {
        r = tokio::time::timeout(connect_timeout, framed.read_packet()) => r,
        _ = broker.shutdown.cancelled() => return None,
    };
    let connect = match first {
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(_)) => return None,
        Ok(Err(ConnectionError::Decode(DecodeError::UnsupportedProtocol { level }))) => {
            // MQTT 5 and later get 0x84 in the 5.0 format, older levels 0x01 [MQTT-3.1.2-2].
            let (protocol, code) = if level >= 5 {
                (Protocol::V5, reason::UNSUPPORTED_PROTOCOL_VERSION)
            } else {
                (Protocol::V311, connack_v3::UNACCEPTABLE_PROTOCOL_VERSION)
            };
            framed.protocol = Some(protocol);
            broker.stats.connect_result("unsupported_protocol");
            framed.send(&Packet::ConnAck(ConnAck { code, ..ConnAck::default() }));
            let _ = framed.flush().await;
            return None;
        }
        Ok(Err(e)) => {
            broker.stats.connect_result("malformed");
            tracing::debug!(%peer, error = %e, "bad first packet");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT within the connect timeout");
            return None;
        }
    };
    framed.protocol = Some(connect.protocol);
    framed.max_out = connect.properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
    accept(broker, framed, connect, peer, cert_user).await
}

/// Answers CONNECT with a failure code and closes (the caller drops the stream).
/// MQTT 5 clients also get the reason as a Reason String.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin, T>(
    framed: &mut Framed<S>,
    protocol: Protocol,
    v5_code: u8,
    v3_code: u8,
    why: &str,
) -> Option<T> {
    tracing::debug!(reason = why, "CONNECT refused");
    let result = match v5_code {
        reason::BAD_USER_NAME_OR_PASSWORD => "bad_credentials",
        reason::NOT_AUTHORIZED => "not_authorized",
        reason::BANNED => "banned",
        reason::CLIENT_IDENTIFIER_NOT_VALID => "client_id_rejected",
        reason::BAD_AUTHENTICATION_METHOD => "bad_auth_method",
        reason::TOPIC_NAME_INVALID | reason::RETAIN_NOT_SUPPORTED => "invalid_will",
        reason::SERVER_UNAVAILABLE => "server_unavailable",
        reason::SERVER_BUSY => "server_busy",
        reason::CONNECTION_RATE_EXCEEDED => "too_many_failures",
        reason::QUOTA_EXCEEDED => "too_many_sessions",
        0 => "keep_alive_rejected",
        _ => "not_authorized",
    };
    framed.broker.stats.connect_result(result);
    let mut ack = ConnAck { code: if protocol.is_v5() { v5_code } else { v3_code }, ..ConnAck::default() };
    if protocol.is_v5() {
        ack.properties.reason_string = Some(why.to_owned());
    }
    framed.send(&Packet::ConnAck(ack));
    let _ = framed.flush().await;
    None
}

/// Most AUTH round trips one exchange may take before it is abandoned.
const MAX_AUTH_ROUNDS: u32 = 16;

/// Runs an enhanced authentication exchange during CONNECT [MQTT-4.12.0-..]. Returns the
/// data for CONNACK, or the reason code and text to refuse with.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    framed: &mut Framed<S>,
    client_id: &str,
    method: &str,
    mut data: Option<bytes::Bytes>,
) -> Result<Option<bytes::Bytes>, (u8, &'static str)> {
    let Some(auth) = broker.auth.find(method) else {
        return Err((reason::BAD_AUTHENTICATION_METHOD, "authentication method not supported"));
    };
    let deadline = Duration::from_secs(broker.config.mqtt.connect_timeout_secs);
    let mut state = Vec::new();
    for round in 0..MAX_AUTH_ROUNDS {
        match auth.step(client_id, round, data.take(), &mut state).await {
            AuthStep::Success(reply) => return Ok(reply),
            AuthStep::Failure(code) => return Err((code, "authentication failed")),
            AuthStep::Continue(challenge) => {
                let mut a = Auth { reason: reason::CONTINUE_AUTHENTICATION, properties: Properties::default() };
                a.properties.authentication_method = Some(method.to_owned());
                a.properties.authentication_data = Some(challenge);
                framed.send(&Packet::Auth(a));
                framed.flush().await.map_err(|_| (reason::UNSPECIFIED_ERROR, "write failed"))?;
                match tokio::time::timeout(deadline, framed.read_packet()).await {
                    Ok(Ok(Some(Packet::Auth(answer)))) => {
                        if answer.properties.authentication_method.as_deref() != Some(method) {
                            return Err((reason::PROTOCOL_ERROR, "authentication method changed"));
                        }
                        if answer.reason != reason::CONTINUE_AUTHENTICATION {
                            return Err((reason::PROTOCOL_ERROR, "unexpected AUTH reason code"));
                        }
                        data = answer.properties.authentication_data;
                    }
                    Ok(Ok(Some(_))) => return Err((reason::PROTOCOL_ERROR, "expected AUTH")),
                    _ => return Err((reason::UNSPECIFIED_ERROR, "authentication exchange interrupted")),
                }
            }
        }
    }
    Err((reason::UNSPECIFIED_ERROR, "authentication exchange too long"))
}

fn will_message(client_id: &str, connect: &Connect) -> Option<WillMessage> {
    let w = connect.will.as_ref()?;
    Some(WillMessage {
        message: Message {
            topic: w.topic.clone(),
            payload: w.payload.clone(),
            qos: w.qos,
            retain: w.retain,
            properties: message_properties(&w.properties),
            received_at_us: 0,
            publisher: client_id.to_owned(),
        },
        delay_secs: w.properties.will_delay_interval.unwrap_or(0),
    })
}

fn message_properties(p: &Properties) -> MessageProperties {
    MessageProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
    }
}

static AUTO_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A server-assigned client id, unique on this node.
fn assign_client_id(node: &str) -> String {
    let n = AUTO_ID.fetch_add(1, Ordering::Relaxed);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("raftmq-{:08x}-{:x}-{n:x}", h as u32, now_ms())
}

/// Checks a decoded CONNECT (client id, bans, authentication, will, keep alive), attaches
/// the session and sends CONNACK.
async fn accept<S: ClientStream>(
    broker: Arc<Broker>,
    mut framed: Framed<S>,
    connect: Box<Connect>,
    peer: SocketAddr,
    cert_user: Option<String>,
) -> Option<Connection<S>> {
    let cfg = &broker.config.mqtt;
    let protocol = connect.protocol;
    let v5 = protocol.is_v5();
    let props = &connect.properties;

    // Client identifier rules [MQTT-3.1.3-6..8].
    let mut assigned = None;
    let client_id = if connect.client_id.is_empty() {
        if protocol == Protocol::V31 || (!v5 && !connect.clean_start) {
            // MQTT 3.1 requires 1 to 23 characters; 3.1.1 allows an empty id only with a
            // clean session [MQTT-3.1.3-8]: refuse and close (B7).
            return refuse(
                &mut framed,
                protocol,
                reason::CLIENT_IDENTIFIER_NOT_VALID,
                connack_v3::IDENTIFIER_REJECTED,
                "empty client id needs a clean session",
            )
            .await;
        }
        let id = assign_client_id(&broker.config.node_name);
        assigned = Some(id.clone());
        id
    } else {
        connect.client_id.clone()
    };
    if client_id.len() > cfg.max_client_id_len {
        return refuse(&mut framed, protocol, reason::CLIENT_IDENTIFIER_NOT_VALID, connack_v3::IDENTIFIER_REJECTED, "client id too long")
            .await;
    }
    // Bans and reconnect storms.
    let username = cert_user.clone().or_else(|| connect.username.clone());
    let banned = broker.bans.is_banned(&BanTarget::Client(client_id.clone()))
        || username.as_ref().is_some_and(|u| broker.bans.is_banned(&BanTarget::User(u.clone())));
    if banned {
        return refuse(&mut framed, protocol, reason::BANNED, connack_v3::NOT_AUTHORIZED, "banned").await;
    }
    // Authentication: an MQTT 5 enhanced method, or the authenticator chain.
    let security = broker.security();
    let mut auth_reply = None;
    let identity = if let Some(method) = props.authentication_method.clone() {
        match Box::pin(authenticate(&broker, &mut framed, &client_id, &method, props.authentication_data.clone())).await {
            Ok(data) => {
                auth_reply = Some((method, data));
                Identity { source: IdentitySource::Enhanced, username: username.clone(), claims: Default::default() }
            }
            Err((code, why)) => return refuse(&mut framed, protocol, code, connack_v3::NOT_AUTHORIZED, why).await,
        }
    } else {
        if broker.login_failures.locked(username.as_deref(), peer.ip()) {
            // Password guessing: refused before it costs a password check.
            broker.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = broker.log_limits.auth_failure.allow() {
                tracing::info!(%peer, username = %PrintableOpt(username.as_deref()), suppressed, "login refused: too many failed attempts");
            }
            return refuse(&mut framed, protocol, reason::CONNECTION_RATE_EXCEEDED, connack_v3::NOT_AUTHORIZED, "too many failed logins")
                .await;
        }
        let checker = Arc::clone(&security);
        let (id, user, password, verified) = (client_id.clone(), username.clone(), connect.password.clone(), cert_user.is_some());
        let check = move || {
            let creds = Credentials {
                client_id: &id,
                username: user.as_deref(),
                password: password.as_deref(),
                certificate_verified: verified,
                peer: peer.ip(),
            };
            checker.authenticator.check(&creds)
        };
        // Only password hashing is slow enough to need another thread: a small fixed
        // pool with a bounded queue, so a flood of logins cannot exhaust memory.
        let verdict = if security.authenticator.is_blocking() { Box::pin(broker.verify_pool.run(check)).await } else { Ok(check()) };
        let presented = username.is_some() || connect.password.is_some();
        let failed = |broker: &Broker, why: &str| {
            broker.stats.auth_failures.fetch_add(1, Ordering::Relaxed);
            // Only credentials that were checked count toward the limits: a client without
            // any costs no check and guesses nothing.
            if presented {
                broker.login_failures.record(username.as_deref(), peer.ip());
            }
            if let Some(suppressed) = broker.log_limits.auth_failure.allow() {
                tracing::info!(%peer, client_id = %Printable(&client_id), username = %PrintableOpt(username.as_deref()), suppressed, "authentication failed: {why}");
            }
        };
        match verdict {
            Ok(Verdict::Accept(identity)) => identity,
            Err(Busy) => {
                if let Some(suppressed) = broker.log_limits.overload.allow() {
                    tracing::warn!(%peer, suppressed, "login refused: password verification saturated");
                }
                return refuse(&mut framed, protocol, reason::SERVER_BUSY, connack_v3::SERVER_UNAVAILABLE, "server busy").await;
            }
            Ok(Verdict::BadCredentials) => {
                failed(&broker, "bad credentials");
                return refuse(
                    &mut framed,
                    protocol,
                    reason::BAD_USER_NAME_OR_PASSWORD,
                    connack_v3::BAD_USER_NAME_OR_PASSWORD,
                    "bad user name or password",
                )
                .await;
            }
            Ok(Verdict::NotAuthorized) => {
                failed(&broker, "not authorized");
                return refuse(&mut framed, protocol, reason::NOT_AUTHORIZED, connack_v3::NOT_AUTHORIZED, "not authorized").await;
            }
        }
    };
    // Reconnect storms: only connects that authenticated count, so nobody can get
    // another's client id banned with wrong credentials.
    if broker.flapping.record(&client_id) {
        let until = now_ms() / 1000 + broker.flapping.ban_secs();
        tracing::warn!(%peer, client_id = %Printable(&client_id), until, "flapping client banned");
        broker.bans.ban(BanTarget::Client(client_id.clone()), Some(until));
        return refuse(&mut framed, protocol, reason::BANNED, connack_v3::NOT_AUTHORIZED, "banned for reconnecting too often").await;
    }
    if let Some(w) = &connect.will {
        if !v5 && w.topic.is_empty() {
            // [MQTT-4.7.3-1]: a protocol violation, which MQTT 3 answers by closing.
            broker.stats.connect_result("malformed");
            tracing::debug!(%peer, "empty will topic");
            return None;
        }
        if topic::validate_topic_name(&w.topic, cfg.max_topic_levels).is_err() {
            return refuse(&mut framed, protocol, reason::TOPIC_NAME_INVALID, connack_v3::NOT_AUTHORIZED, "invalid will topic").await;
        }
        if w.topic.starts_with("$SYS") {
            return refuse(&mut framed, protocol, reason::NOT_AUTHORIZED, connack_v3::NOT_AUTHORIZED, "will topic in $SYS").await;
        }
        let subject = Subject { client_id: &client_id, identity: &identity, peer: peer.ip() };
        if !security.allows(&subject, Access::Publish, &w.topic) {
            // B31: a will the client could not publish itself.
            return refuse(&mut framed, protocol, reason::NOT_AUTHORIZED, connack_v3::NOT_AUTHORIZED, "will topic not authorized").await;
        }
        if w.retain && !broker.config.retained.enabled {
            return refuse(&mut framed, protocol, reason::RETAIN_NOT_SUPPORTED, connack_v3::NOT_AUTHORIZED, "retain not supported").await;
        }
    }
    // Keep alive [MQTT-3.1.2-22..24] with an optional maximum (B27).
    let mut keep_alive = connect.keep_alive;
    let mut server_keep_alive = None;
    if cfg.max_keepalive > 0 && (keep_alive == 0 || keep_alive > cfg.max_keepalive) {
        if !v5 {
            return refuse(&mut framed, protocol, 0, connack_v3::IDENTIFIER_REJECTED, "keep alive above the maximum").await;
        }
        keep_alive = cfg.max_keepalive;
        server_keep_alive = Some(keep_alive);
    }
    // Session expiry.
    let requested_expiry = if v5 {
        props.session_expiry_interval.unwrap_or(0)
    } else if connect.clean_start {
        0
    } else {
        cfg.session_expiry_secs
    };
    let expiry = requested_expiry.min(cfg.max_session_expiry_secs);

    let mut connack = ConnAck { session_present: false, code: 0, properties: Properties::default() };
    if v5 {
        let p = &mut connack.properties;
        p.assigned_client_identifier = assigned;
        p.server_keep_alive = server_keep_alive;
        p.receive_maximum = Some(cfg.receive_maximum);
        p.maximum_packet_size = Some(cfg.max_packet_size as u32);
        p.topic_alias_maximum = (cfg.max_topic_alias > 0).then_some(cfg.max_topic_alias);
        p.retain_available = Some(u8::from(broker.config.retained.enabled));
        p.wildcard_subscription_available = Some(1);
        p.subscription_identifier_available = Some(1);
        p.shared_subscription_available = Some(1);
        if expiry != requested_expiry {
            p.session_expiry_interval = Some(expiry);
        }
        if props.request_response_information == Some(1) {
            p.response_information.clone_from(&cfg.response_information);
        }
        if let Some((method, data)) = auth_reply {
            p.authentication_method = Some(method);
            p.authentication_data = data;
        }
    }
    // A CONNACK that cannot fit the client's Maximum Packet Size is never sent
    // [MQTT-3.2.2-19]; the connection is closed before a session is touched.
    let mut probe = BytesMut::new();
    codec::encode(&Packet::ConnAck(connack.clone()), protocol, &mut probe);
    if probe.len() > framed.max_out {
        broker.stats.connect_result("malformed");
        tracing::debug!(%peer, max = framed.max_out, "CONNACK does not fit the client's maximum packet size");
        return None;
    }
    let conn_id = broker.next_conn_id();
    let info = ConnInfo {
        peer: Some(peer),
        username: identity.username.clone(),
        protocol: protocol.level(),
        keep_alive,
        clean_start: connect.clean_start,
        connected_at_ms: now_ms(),
    };
    let owner = Arc::new(Owner { identity, peer });
    let attached = Box::pin(broker.attach(&client_id, conn_id, connect.clean_start, expiry, info, Arc::clone(&owner))).await;
    let identity = &owner.identity;
    let Attached { slot, session_present } = match attached {
        Ok(a) => a,
        Err(AttachError::NotOwner) => {
            tracing::info!(%peer, client_id = %Printable(&client_id), username = %PrintableOpt(identity.username.as_deref()), "CONNECT refused: the session belongs to another user");
            return refuse(&mut framed, protocol, reason::NOT_AUTHORIZED, connack_v3::NOT_AUTHORIZED, "session belongs to another user")
                .await;
        }
        Err(AttachError::TooManySessions) => {
            if let Some(suppressed) = broker.log_limits.overload.allow() {
                tracing::warn!(%peer, suppressed, "CONNECT refused: mqtt.max_sessions reached");
            }
            return refuse(&mut framed, protocol, reason::QUOTA_EXCEEDED, connack_v3::SERVER_UNAVAILABLE, "too many sessions").await;
        }
        Err(AttachError::Store(e)) => {
            tracing::warn!(%peer, error = %e, "session store unavailable");
            return refuse(&mut framed, protocol, reason::SERVER_UNAVAILABLE, connack_v3::SERVER_UNAVAILABLE, "session store unavailable")
                .await;
        }
    };
    connack.session_present = session_present;
    framed.send(&Packet::ConnAck(connack));
    broker.stats.connect_result("success");
    framed.max_in = cfg.max_packet_size;
    framed.stream.connect_accepted();
    let count = broker.stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
    broker.stats.connections_max.fetch_max(count, Ordering::Relaxed);
    tracing::debug!(%peer, client_id = %Printable(&client_id), ?protocol, session_present, "connected");
    let event = ClientEvent::Connected {
        username: identity.username.as_deref(),
        address: peer,
        protocol: protocol.level(),
        keep_alive,
        clean_start: connect.clean_start,
    };
    Box::pin(sys::client_event(&broker, &client_id, event)).await;

    let mut client = Client {
        client_id: Arc::clone(&slot.client_id),
        protocol,
        conn_id,
        receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
        will: will_message(&client_id, &connect).map(Box::new),
        connect_expiry: expiry,
        problem_info: props.request_problem_information != Some(0),
        auth_method: props.authentication_method.as_deref().map(Box::from),
        aliases: None,
        client_alias_max: props.topic_alias_maximum.unwrap_or(0),
        rate: (cfg.max_publish_rate > 0).then(|| Box::new(RateLimiter::new(cfg.max_publish_rate))),
        congested: None,
        may_yield: false,
        owner,
    };

    // Resume: resend unacknowledged PUBLISH with DUP and PUBREL [MQTT-4.4.0-1].
    if session_present {
        resend_inflight(&broker, &slot, &mut client, &mut framed);
    }
    Some(Connection { framed, client, slot })
}

/// Ends a connection: the DISCONNECT for a protocol error, the session detached (will,
/// expiry), the disconnected event.
async fn close<S: AsyncRead + AsyncWrite + Unpin + Send>(conn: Connection<S>, result: Result<EndKind, ConnectionError>) {
    let Connection { mut framed, mut client, slot } = conn;
    let broker = Arc::clone(&framed.broker);
    let peer = client.owner.peer;
    let why = match &result {
        Ok(EndKind::Normal) => "normal".to_owned(),
        Ok(EndKind::PublishWill) => "closed without a normal DISCONNECT".to_owned(),
        Ok(EndKind::TakenOver) => "session taken over".to_owned(),
        Err(e) => e.to_string(),
    };
    let end = match &result {
        Ok(end) => *end,
        Err(e) => {
            tracing::debug!(%peer, client_id = %Printable(&client.client_id), error = %e, "connection closed with error");
            if !matches!(e, ConnectionError::Io(_) | ConnectionError::Timeout) {
                broker.stats.protocol_error(e.reason_code());
                if let Some(suppressed) = broker.log_limits.protocol_error.allow() {
                    tracing::warn!(%peer, client_id = %Printable(&client.client_id), error = %e, suppressed, "connection closed for a protocol error");
                }
                // Answers to the valid packets before the bad one still go out.
                if client.protocol.is_v5() {
                    let mut d = Disconnect::new(e.reason_code());
                    d.properties.reason_string = Some(e.to_string());
                    framed.send(&Packet::Disconnect(d));
                }
                let _ = framed.flush().await;
            }
            EndKind::PublishWill
        }
    };
    let _ = framed.stream.shutdown().await;
    broker.stats.connections.fetch_sub(1, Ordering::Relaxed);
    let will = client.will.take().map(|w| *w);
    Box::pin(broker.detach(&slot, client.conn_id, end, will)).await;
    let event = ClientEvent::Disconnected { username: client.owner.identity.username.as_deref(), reason: &why };
    Box::pin(sys::client_event(&broker, &client.client_id, event)).await;
    tracing::debug!(%peer, client_id = %Printable(&client.client_id), ?end, "disconnected");
}

fn resend_inflight<S: AsyncRead + AsyncWrite + Unpin>(broker: &Broker, slot: &SessionSlot, client: &mut Client, framed: &mut Framed<S>) {
    let now = now_us();
    let inner = slot.lock();
    for (id, m) in inner.inflight.iter() {
        match m.stage {
            InflightStage::Published => {
                encode_delivery(broker, client, framed, &m.queued, *id, true, now);
            }
            InflightStage::Released => {
                framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, *id, 0)));
            }
        }
    }
}

/// Encodes one delivery; returns false if it exceeds the client's Maximum Packet Size and
/// was discarded instead [MQTT-3.1.2-25]. Uses a topic alias when the client allows them:
/// an alias is only recorded once the packet that defines it is known to fit.
fn encode_delivery<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    client: &mut Client,
    framed: &mut Framed<S>,
    item: &QueuedMessage,
    packet_id: u16,
    dup: bool,
    now_us: u64,
) -> bool {
    let m = &item.message;
    let mut props = Properties::default();
    let mut topic = m.topic.as_str();
    let mut new_alias = None;
    if client.protocol.is_v5() {
        let mp = &m.properties;
        props.payload_format_indicator = mp.payload_format_indicator;
        props.message_expiry_interval = m.remaining_expiry(now_us / 1000);
        props.content_type.clone_from(&mp.content_type);
        props.response_topic.clone_from(&mp.response_topic);
        props.correlation_data.clone_from(&mp.correlation_data);
        props.user_properties.clone_from(&mp.user_properties);
        props.subscription_identifiers.clone_from(&item.subscription_ids);
        let defined = client.aliases.as_ref().map_or(0, |a| a.outbound.len());
        if let Some(alias) = client.aliases.as_ref().and_then(|a| a.outbound.get(&m.topic)) {
            props.topic_alias = Some(*alias);
            topic = "";
        } else if defined < usize::from(client.client_alias_max) {
            let alias = defined as u16 + 1;
            props.topic_alias = Some(alias);
            new_alias = Some(alias);
        }
    }
    let body = props.body();
    let publish = PublishRef { dup, qos: item.qos, retain: item.retain, topic, packet_id, properties: &body, payload: &m.payload };
    if publish.wire_len(client.protocol) > framed.max_out {
        broker.stats.drop(DropReason::TooLarge, 1);
        return false;
    }
    if let Some(alias) = new_alias {
        client.aliases.get_or_insert_default().outbound.insert(m.topic.clone(), alias);
    }
    publish.write(client.protocol, &mut framed.wbuf);
    let stats = &broker.stats;
    stats.sent_by_qos[item.qos as usize].fetch_add(1, Ordering::Relaxed);
    stats.packets_sent[3].fetch_add(1, Ordering::Relaxed);
    broker.metrics.delivered(m.received_at_us, now_us);
    true
}

/// Moves queued deliveries into the socket buffer within the inflight window, under the
/// same lock that records a received packet (for the keep-alive sweep) and tells whether
/// the connection must close. Returns the reason code to close with.
fn pump<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
    got_packet: bool,
) -> Option<u8> {
    let partial = !framed.rbuf.is_empty();
    let window = usize::from(broker.config.mqtt.max_inflight.min(client.receive_maximum));
    let now_us = now_us();
    let now = now_us / 1000;
    let mut inner = slot.lock();
    match inner.conn.as_mut() {
        Some(conn) if conn.conn_id == client.conn_id => {
            if conn.kick.is_some() {
                return conn.kick;
            }
            if got_packet {
                conn.last_packet = Instant::now();
            }
            // The partial-packet clock starts with the first byte of a packet and restarts
            // with each whole one.
            if !partial {
                conn.partial_since = None;
            } else if got_packet || conn.partial_since.is_none() {
                conn.partial_since = Some(Instant::now());
            }
        }
        // Fenced off after a takeover that timed out.
        _ => return Some(reason::SESSION_TAKEN_OVER),
    }
    // Retained messages for new subscriptions first, paced by the same window: at most a
    // batch of them per pass (QoS 0 ones need no window), the rest after the write.
    if let Some(mut retained) = inner.retained.take() {
        let mut batch = RETAINED_BATCH;
        while let Some(front) = retained.front() {
            if batch == 0 {
                slot.wake.notify_one();
                break;
            }
            if front.qos != QoS::AtMostOnce && inner.inflight.len() >= window {
                break;
            }
            let Some(item) = retained.pop_front() else { break };
            batch -= 1;
            if item.qos == QoS::AtMostOnce {
                encode_delivery(broker, client, framed, &item, 0, false, now_us);
                continue;
            }
            let Some(packet_id) = inner.next_packet_id() else {
                retained.push_front(item);
                break;
            };
            if encode_delivery(broker, client, framed, &item, packet_id, false, now_us) {
                inner.inflight.insert(packet_id, InflightMessage { queued: item, stage: InflightStage::Published });
            }
        }
        if !retained.is_empty() {
            inner.retained = Some(retained);
        }
    }
    let queued = inner.queue.len();
    while let Some(front) = inner.queue.front() {
        if front.qos != QoS::AtMostOnce && inner.inflight.len() >= window {
            break;
        }
        let Some(item) = inner.queue.pop_front() else { break };
        inner.queue_bytes = inner.queue_bytes.saturating_sub(item.message.weight());
        if item.message.is_expired(now) {
            inner.dropped += 1;
            broker.stats.drop(DropReason::Expired, 1);
            continue;
        }
        if item.qos == QoS::AtMostOnce {
            encode_delivery(broker, client, framed, &item, 0, false, now_us);
            continue;
        }
        let Some(packet_id) = inner.next_packet_id() else {
            inner.queue.push_front(item);
            break;
        };
        if encode_delivery(broker, client, framed, &item, packet_id, false, now_us) {
            inner.inflight.insert(packet_id, InflightMessage { queued: item, stage: InflightStage::Published });
        }
    }
    if inner.queue.len() < queued {
        inner.progress_us = now_us;
    }
    if inner.congested || inner.stalled {
        let limits = broker.queue_limits();
        if inner.queue.len() <= limits.max_len / 4 && inner.queue_bytes <= limits.max_bytes / 4 {
            // Caught up: a stalled client that drained is a draining one again.
            inner.stalled = false;
            if std::mem::take(&mut inner.congested) {
                drop(inner);
                slot.drained.notify_waiters();
            }
        }
    }
    None
}

/// Most retained messages one pass of [`pump`] writes: a subscription matching thousands
/// goes out in socket-sized steps, not in one huge write buffer.
const RETAINED_BATCH: usize = 256;

/// Longest a PUBLISH that matches nothing waits for other connections' packets.
const LAND_MAX: Duration = Duration::from_millis(1);

/// How long it waits at least: about the time it takes a parked worker thread to wake up
/// and start handling a socket that became readable before this one.
const LAND_MIN: Duration = Duration::from_micros(100);

/// Gives a SUBSCRIBE that reached the broker before this PUBLISH the chance to take effect
/// first. Sockets that become readable together are handled by tasks in no set order (and
/// on two cores in parallel), so a client that sends SUBSCRIBE and then has another client
/// publish could miss the message (83 of 200 did here; Mosquitto, single-threaded, none).
/// No rule requires the order, but request/response clients and test suites assume it.
///
/// So a PUBLISH that matches nothing yields once, letting tasks woken before it run, and
/// then keeps yielding while other connections are handling packets they have read
/// ([`Broker::handling`]) and still nothing matches, for at most [`LAND_MAX`]; then it
/// routes as usual. On a quiet broker that is one yield. Only the first PUBLISH of each
/// read pays it, so a client that publishes into the void in bulk pays once a batch.
async fn let_earlier_packets_land(broker: &Broker, message: &Arc<Message>) {
    if !broker.matches_nothing(message) {
        return;
    }
    let started = Instant::now();
    loop {
        tokio::task::yield_now().await;
        // This connection counts itself.
        let waited = started.elapsed();
        let others_busy = broker.handling.load(Ordering::Acquire) > 1;
        if (!others_busy && waited >= LAND_MIN) || waited >= LAND_MAX || !broker.matches_nothing(message) {
            return;
        }
    }
}

/// Counts a connection in [`Broker::handling`] from the moment its socket had data until
/// it has handled the packets read.
struct Handling<'a>(&'a Broker);

impl<'a> Handling<'a> {
    fn start(broker: &'a Broker) -> Handling<'a> {
        broker.handling.fetch_add(1, Ordering::AcqRel);
        Handling(broker)
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One wake-up of the connection loop.
enum Event {
    Read(std::io::Result<usize>),
    Wake,
}

/// Waits until `slot`'s queue has drained to a quarter, at most `max`, and only while it
/// drains: a subscriber whose queue did not shrink over `slice` is marked
/// stalled, and publishers stop waiting for it (its queue overflows and drops, counted)
/// until it catches up. So a client that never reads cannot throttle anyone.
async fn wait_drained(slot: Arc<SessionSlot>, max: Duration, slice: Duration) {
    let started = Instant::now();
    loop {
        let drained = slot.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        let Some(before) = slot.congested_backlog() else { return };
        let left = max.saturating_sub(started.elapsed());
        if left.is_zero() || tokio::time::timeout(slice.min(left), drained).await.is_ok() {
            return;
        }
        if slot.mark_stalled_unless_shrunk(before) {
            return;
        }
    }
}

/// What the synchronous packet handler left for the asynchronous one. Lives for one
/// statement; boxing the packet would cost an allocation per packet.
#[allow(clippy::large_enum_variant)]
enum Handled {
    Done,
    End(EndKind),
    Async(Packet),
}

async fn connected_loop<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
) -> Result<EndKind, ConnectionError> {
    let v5 = client.protocol.is_v5();
    // No timer here: the broker's sweeper kicks a client silent for longer than its keep
    // alive allows (`SessionSlot::sweep`), so an idle connection costs no timer entry.
    let mut got_packet = false;
    loop {
        let kick = pump(broker, slot, client, framed, std::mem::take(&mut got_packet));
        if let Some(code) = kick.or_else(|| broker.shutdown.is_cancelled().then_some(reason::SERVER_SHUTTING_DOWN)) {
            // Takeovers and kicks end without the will; keep-alive expiry and shutdown
            // publish it [MQTT-3.1.2-8].
            let end = match code {
                reason::SERVER_SHUTTING_DOWN | reason::KEEP_ALIVE_TIMEOUT => EndKind::PublishWill,
                _ => EndKind::TakenOver,
            };
            if v5 {
                framed.send(&Packet::Disconnect(Disconnect::new(code)));
            }
            let _ = framed.flush().await;
            return Ok(end);
        }
        framed.flush().await?;
        let event = tokio::select! {
            biased;
            r = framed.fill() => Event::Read(r),
            _ = slot.wake.notified() => Event::Wake,
        };
        let Event::Read(read) = event else { continue };
        let _handling = Handling::start(broker);
        if read? == 0 {
            if framed.rbuf.is_empty() {
                // Closed without DISCONNECT: the will is published.
                return Ok(EndKind::PublishWill);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        got_packet = framed.has_packet();
        client.may_yield = true;
        // Handle every packet already buffered before pumping and writing, so a burst of
        // acknowledgements or publishes costs one write, not one each. No packet-sized
        // temporary may live across the await below: the loop's future is the
        // per-connection memory (checked by a unit test).
        loop {
            let Some(packet) = framed.buffered_packet()? else { break };
            let packet = match handle_quick(broker, slot, client, framed, packet)? {
                Handled::Done => continue,
                Handled::End(end) => return Ok(end),
                Handled::Async(packet) => packet,
            };
            Box::pin(handle_packet(broker, slot, client, framed, packet)).await?;
            if let Some(congested) = client.congested.take() {
                // Backpressure: the acknowledgements so far go out, the rest of the burst
                // and the socket wait until the subscriber catches up (bounded).
                framed.flush().await?;
                let max = Duration::from_millis(broker.config.mqtt.publish_backpressure_ms);
                Box::pin(wait_drained(congested, max, Duration::from_micros(broker.stall_us()))).await;
            }
            // A fair share: a publisher whose socket always has more to read yields to the
            // subscribers it feeds every so many packets instead of filling their queues
            // until they overflow.
            tokio::task::coop::consume_budget().await;
        }
        framed.release_read_buffer();
    }
}

/// Handles the packets that need no waiting (acknowledgements, PINGREQ, DISCONNECT and
/// protocol errors) without allocating a future; hands the others back.
fn handle_quick<S: AsyncRead + AsyncWrite + Unpin>(
    broker: &Broker,
    slot: &SessionSlot,
    client: &mut Client,
    framed: &mut Framed<S>,
    packet: Packet,
) -> Result<Handled, ConnectionError> {
    let v5 = client.protocol.is_v5();
    match packet {
        Packet::PubResponse(r) => {
            if v5 && !codec::reason::client_may_send(r.kind, r.reason) {
                return Err(ConnectionError::Decode(DecodeError::Malformed("invalid reason code in acknowledgement")));
            }
            let failed = v5 && r.reason >= 0x80;
            match r.kind {
                PubKind::PubAck => {
                    if slot.lock().complete(r.packet_id, InflightStage::Published) == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBACK for a QoS 2 message"));
                    }
                }
                PubKind::PubRec => {
                    let ack = slot.lock().received(r.packet_id, failed);
                    if ack == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBREC for a QoS 1 message"));
                    }
                    let known = ack == Ack::Known;
                    if known && !failed {
                        framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, r.packet_id, 0)));
                    } else if !known && v5 {
                        framed.send(&client.ack(
                            PubKind::PubRel,
                            r.packet_id,
                            reason::PACKET_IDENTIFIER_NOT_FOUND,
                            "unknown packet identifier",
                        ));
                    }
                }
                PubKind::PubComp => {
                    if slot.lock().complete(r.packet_id, InflightStage::Released) == Ack::WrongKind {
                        return Err(violation(reason::PROTOCOL_ERROR, "PUBCOMP for a message not released"));
                    }
                }
                PubKind::PubRel => {
                    let known = slot.lock().awaiting_rel.remove(&r.packet_id).is_some();
                    let code = if known || !v5 { 0 } else { reason::PACKET_IDENTIFIER_NOT_FOUND };
                    framed.send(&client.ack(PubKind::PubComp, r.packet_id, code, "unknown packet identifier"));
                }
            }
        }
        Packet::PingReq => {
            framed.send(&Packet::PingResp);
        }
        Packet::Disconnect(d) => {
            if v5 && !codec::reason::client_may_disconnect_with(d.reason) {
                // Not a normal disconnect: the will is published.
                return Err(ConnectionError::Decode(DecodeError::Malformed("invalid DISCONNECT reason code")));
            }
            if let Some(new_expiry) = d.properties.session_expiry_interval {
                if client.connect_expiry == 0 && new_expiry != 0 {
                    // [MQTT-3.14.2-2]
                    return Err(violation(reason::PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 in CONNECT"));
                }
                let expiry = new_expiry.min(broker.config.mqtt.max_session_expiry_secs);
                let mut inner = slot.lock();
                inner.expiry_secs = expiry;
                inner.persistent = expiry > 0;
            }
            return Ok(Handled::End(if d.reason == reason::DISCONNECT_WITH_WILL { EndKind::PublishWill } else { EndKind::Normal }));
        }
        Packet::Connect(_) => return Err(violation(reason::PROTOCOL_ERROR, "second CONNECT")),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            return Err(violation(reason::PROTOCOL_ERROR, "server-to-client packet sent by a client"));
        }
        other @ (Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) | Packet::Auth(_)) => return Ok(Handled::Async(other)),
    }
    Ok(Handled::Done)
}

/// Handles the packets whose handling may wait: PUBLISH (a durable store, a rate limit),
/// SUBSCRIBE (retained messages), UNSUBSCRIBE and AUTH.
async fn handle_packet<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
    packet: Packet,
) -> Result<(), ConnectionError> {
    match packet {
        Packet::Publish(p) => handle_publish(broker, slot, client, framed, p).await,
        Packet::Subscribe(s) => handle_subscribe(broker, slot, client, framed, s).await,
        Packet::Unsubscribe(u) => handle_unsubscribe(broker, slot, client, framed, u).await,
        Packet::Auth(a) => reauthenticate(broker, client, framed, a).await,
        // `handle_quick` answers every other packet and never hands one over.
        _ => Ok(()),
    }
}

async fn handle_publish<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &mut Client,
    framed: &mut Framed<S>,
    p: Publish,
) -> Result<(), ConnectionError> {
    let cfg = &broker.config.mqtt;
    let v5 = client.protocol.is_v5();
    broker.stats.received_by_qos[p.qos as usize].fetch_add(1, Ordering::Relaxed);
    if let Some(limiter) = client.rate.as_mut() {
        if let Some(wait) = limiter.take() {
            match cfg.publish_rate_action {
                // Not reading while we wait is the backpressure: TCP pushes back on the client.
                RateAction::Throttle => tokio::time::sleep(wait).await,
                RateAction::Disconnect => return Err(violation(reason::MESSAGE_RATE_TOO_HIGH, "publish rate above the limit")),
            }
        }
    }
    let mut p = p;
    if let Some(alias) = p.properties.topic_alias {
        // [MQTT-3.3.2-7], [MQTT-3.3.2-8]: 0 and values above our Topic Alias Maximum are invalid.
        if alias == 0 || alias > cfg.max_topic_alias {
            return Err(violation(reason::TOPIC_ALIAS_INVALID, "topic alias out of range"));
        }
        if p.topic.is_empty() {
            match client.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                Some(t) => p.topic = t.clone(),
                None => return Err(violation(reason::PROTOCOL_ERROR, "unknown topic alias")),
            }
        } else {
            topic::validate_topic_name(&p.topic, cfg.max_topic_levels)
                .map_err(|_| violation(reason::TOPIC_NAME_INVALID, "invalid topic name"))?;
            client.aliases.get_or_insert_default().inbound.insert(alias, p.topic.clone());
        }
    }
    if !p.properties.subscription_identifiers.is_empty() {
        return Err(violation(reason::PROTOCOL_ERROR, "subscription identifier in client PUBLISH"));
    }
    if p.properties.response_topic.as_deref().is_some_and(|t| topic::validate_topic_name(t, cfg.max_topic_levels).is_err()) {
        return Err(violation(reason::PROTOCOL_ERROR, "invalid response topic"));
    }
    match topic::validate_topic_name(&p.topic, cfg.max_topic_levels) {
        Ok(()) => {}
        Err(TopicError::Empty) => return Err(violation(reason::PROTOCOL_ERROR, "empty topic without topic alias")),
        Err(_) => return Err(violation(reason::TOPIC_NAME_INVALID, "invalid topic name")),
    }
    if p.retain && !broker.config.retained.enabled {
        return Err(violation(reason::RETAIN_NOT_SUPPORTED, "retain not supported"));
    }
    let ack_kind = match p.qos {
        QoS::AtMostOnce => None,
        QoS::AtLeastOnce => Some(PubKind::PubAck),
        QoS::ExactlyOnce => Some(PubKind::PubRec),
    };
    if p.qos == QoS::ExactlyOnce {
        let inner = slot.lock();
        if inner.awaiting_rel.contains_key(&p.packet_id) {
            // A re-sent QoS 2 PUBLISH: acknowledge again, never deliver twice [MQTT-4.3.3-10].
            drop(inner);
            framed.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, p.packet_id, 0)));
            return Ok(());
        }
        let limit = if v5 { usize::from(cfg.receive_maximum) } else { cfg.max_awaiting_rel };
        if inner.awaiting_rel.len() >= limit {
            // B21, B23: more QoS 2 messages in flight than allowed.
            return Err(violation(reason::RECEIVE_MAXIMUM_EXCEEDED, "too many QoS 2 messages awaiting PUBREL"));
        }
    }
    if p.topic.starts_with("$SYS") {
        // Clients never publish to $SYS; the message is dropped.
        broker.stats.drop(DropReason::NotAuthorized, 1);
        if let (Some(kind), true) = (ack_kind, v5) {
            framed.send(&client.ack(kind, p.packet_id, reason::NOT_AUTHORIZED, "clients may not publish to $SYS"));
        } else if let Some(kind) = ack_kind {
            framed.send(&Packet::PubResponse(PubResponse::new(kind, p.packet_id, 0)));
            if kind == PubKind::PubRec {
                slot.lock().awaiting_rel.insert(p.packet_id, Instant::now());
            }
        }
        return Ok(());
    }
    if !client.allowed(broker, Access::Publish, &p.topic) {
        if broker.config.acl.deny_action == DenyAction::Disconnect {
            return Err(violation(reason::NOT_AUTHORIZED, "publish not authorized"));
        }
        broker.stats.drop(DropReason::NotAuthorized, 1);
        if let Some(kind) = ack_kind {
            // MQTT 3 has no way to say no: the handshake completes and the message is dropped.
            let code = if v5 { reason::NOT_AUTHORIZED } else { 0 };
            framed.send(&client.ack(kind, p.packet_id, code, "publish not authorized"));
            if kind == PubKind::PubRec && code == 0 {
                slot.lock().awaiting_rel.insert(p.packet_id, Instant::now());
            }
        }
        return Ok(());
    }
    if v5 && p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
        if let Some(kind) = ack_kind {
            framed.send(&client.ack(kind, p.packet_id, reason::PAYLOAD_FORMAT_INVALID, "payload is not valid UTF-8"));
            return Ok(());
        }
        return Err(violation(reason::PAYLOAD_FORMAT_INVALID, "payload is not UTF-8"));
    }
    let message = Arc::new(Message {
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        properties: message_properties(&p.properties),
        received_at_us: now_us(),
        publisher: client.client_id.to_string(),
    });
    if std::mem::take(&mut client.may_yield) {
        Box::pin(let_earlier_packets_land(broker, &message)).await;
    }
    let routed = broker.publish(&message).await?;
    let matched = routed.matched;
    if routed.congested.is_some() && cfg.publish_backpressure_ms > 0 {
        client.congested = routed.congested;
    }
    if matched == 0 {
        broker.stats.drop(DropReason::NoSubscribers, 1);
    }
    if let Some(kind) = ack_kind {
        let code = if v5 && matched == 0 { reason::NO_MATCHING_SUBSCRIBERS } else { 0 };
        framed.send(&Packet::PubResponse(PubResponse::new(kind, p.packet_id, code)));
        if kind == PubKind::PubRec {
            slot.lock().awaiting_rel.insert(p.packet_id, Instant::now());
        }
    }
    Ok(())
}

async fn handle_subscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &Client,
    framed: &mut Framed<S>,
    s: Subscribe,
) -> Result<(), ConnectionError> {
    let cfg = &broker.config.mqtt;
    let v5 = client.protocol.is_v5();
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut retained = Vec::new();
    for (filter, opts) in s.filters {
        let failure = |v5_code: u8| if v5 { v5_code } else { 0x80 };
        let (is_shared, inner_filter) = match shared::parse(&filter) {
            Ok(Some((_, inner))) => (true, inner),
            Ok(None) => (false, filter.as_str()),
            Err(_) => {
                codes.push(failure(reason::TOPIC_FILTER_INVALID));
                continue;
            }
        };
        if is_shared && opts.no_local {
            // [MQTT-3.8.3-4]
            return Err(violation(reason::PROTOCOL_ERROR, "No Local on a shared subscription"));
        }
        if topic::validate_topic_filter(inner_filter, cfg.max_topic_levels).is_err() {
            codes.push(failure(reason::TOPIC_FILTER_INVALID));
            continue;
        }
        if !client.allowed(broker, Access::Subscribe, inner_filter) {
            codes.push(failure(reason::NOT_AUTHORIZED));
            continue;
        }
        let at_limit = {
            let inner = slot.lock();
            !inner.subscriptions.contains_key(filter.as_str()) && inner.subscriptions.len() >= cfg.max_subscriptions
        };
        if at_limit {
            codes.push(failure(reason::QUOTA_EXCEEDED));
            continue;
        }
        let existed = broker.subscribe(slot, &filter, opts).await?;
        codes.push(opts.qos as u8);
        // Retained messages for a new subscription; a repeated SUBSCRIBE counts as new
        // unless Retain Handling says otherwise [MQTT-3.3.1-9..11]. Never on a shared
        // subscription [MQTT-4.8.2-..]: the group would get one copy per member.
        if !is_shared && (opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed)) {
            for m in broker.retained_for(&filter) {
                retained.push(QueuedMessage {
                    qos: m.qos.min(opts.qos),
                    retain: true,
                    subscription_ids: opts.subscription_identifier.into_iter().collect(),
                    shared: None,
                    message: m,
                });
            }
        }
    }
    let properties =
        if codes.iter().any(|c| *c >= 0x80) { client.problem("one or more subscriptions refused") } else { Properties::default() };
    framed.send(&Packet::SubAck(SubAck { packet_id: s.packet_id, properties, codes }));
    if !retained.is_empty() {
        // Every matching retained message is delivered, paced by the client's inflight
        // window, not pushed through the bounded session queue; the pending list is
        // bounded by the retained store's own cap.
        let cap = broker.config.retained.max_messages;
        let mut inner = slot.lock();
        let pending = inner.retained.get_or_insert_default();
        let room = cap.saturating_sub(pending.len());
        let over = retained.len().saturating_sub(room);
        pending.extend(retained.into_iter().take(room));
        drop(inner);
        broker.stats.drop(DropReason::QueueFull, over as u64);
        slot.wake.notify_one();
    }
    Ok(())
}

async fn handle_unsubscribe<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    slot: &Arc<SessionSlot>,
    client: &Client,
    framed: &mut Framed<S>,
    u: Unsubscribe,
) -> Result<(), ConnectionError> {
    let mut codes = Vec::with_capacity(u.filters.len());
    let max_levels = broker.config.mqtt.max_topic_levels;
    for filter in u.filters {
        let inner = match shared::parse(&filter) {
            Ok(Some((_, inner))) => Some(inner),
            Ok(None) => Some(filter.as_str()),
            Err(_) => None,
        };
        if inner.is_none_or(|f| topic::validate_topic_filter(f, max_levels).is_err()) {
            // [MQTT-4.7.3-1], [MQTT-4.8.2-2]: an empty or ill-formed filter. MQTT 3 has no
            // way to say so but closing.
            if !client.protocol.is_v5() {
                return Err(violation(reason::PROTOCOL_ERROR, "invalid topic filter in UNSUBSCRIBE"));
            }
            codes.push(reason::TOPIC_FILTER_INVALID);
            continue;
        }
        let existed = broker.unsubscribe(slot, &filter).await?;
        codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
    }
    if !client.protocol.is_v5() {
        codes.clear();
    }
    framed.send(&Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, properties: Properties::default(), codes }));
    Ok(())
}

/// MQTT 5 re-authentication [MQTT-4.12.1-..]: AUTH 0x19 with the method of CONNECT runs a
/// new exchange; success answers AUTH 0x00, failure ends the connection.
async fn reauthenticate<S: AsyncRead + AsyncWrite + Unpin + Send>(
    broker: &Arc<Broker>,
    client: &Client,
    framed: &mut Framed<S>,
    first: Auth,
) -> Result<(), ConnectionError> {
    let Some(method) = client.auth_method.as_deref() else {
        return Err(violation(reason::PROTOCOL_ERROR, "AUTH without an authentication method"));
    };
    if first.reason != reason::RE_AUTHENTICATE {
        return Err(violation(reason::PROTOCOL_ERROR, "AUTH outside an exchange"));
    }
    if first.properties.authentication_method.as_deref() != Some(method) {
        return Err(violation(reason::PROTOCOL_ERROR, "re-authentication with another method"));
    }
    match authenticate(broker, framed, &client.client_id, method, first.properties.authentication_data).await {
        Ok(data) => {
            let mut done = Auth::default();
            done.properties.authentication_method = Some(method.to_owned());
            done.properties.authentication_data = data;
            framed.send(&Packet::Auth(done));
            Ok(())
        }
        Err((code, what)) => Err(violation(code, what)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection task is the dominant per-client memory cost; keep it small.
    #[tokio::test]
    async fn connection_task_future_is_small() -> Result<(), crate::security::SecurityError> {
        let broker = Broker::new(crate::config::Config::default(), crate::security::enhanced::AuthMethods::default())?;
        let (stream, _other) = tokio::io::duplex(64);
        let fut = serve(broker, stream, SocketAddr::from(([127, 0, 0, 1], 1)), None);
        let size = std::mem::size_of_val(&fut);
        println!("serve future: {size} bytes");
        assert!(size <= 640, "the connection task grew to {size} bytes");
        Ok(())
    }
}
