//! From the first byte to CONNACK: CONNECT validation, authentication (the password
//! pool, enhanced AUTH), bans and limits, the session attach.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use raftmq_cluster::message::{now_ms, Message};
use raftmq_cluster::session::WillMessage;
use raftmq_cluster::topic::{self};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::broker::{AttachError, Attached, Broker};
use crate::codec::{self, connack_v3, reason, Auth, ConnAck, Connect, DecodeError, Packet, Properties, Protocol};
use crate::net::rate::RateLimiter;
use crate::net::transport::ClientStream;
use crate::security::acl::{Access, Subject};
use crate::security::bans::BanTarget;
use crate::security::enhanced::AuthStep;
use crate::security::verify_pool::Busy;
use crate::security::{Credentials, Identity, IdentitySource, Owner, Verdict};
use crate::session::ConnInfo;
use crate::telemetry::printable::{Printable, PrintableOpt};
use crate::telemetry::stats::ConnectResult;
use crate::telemetry::sys::{self, ClientEvent};

use super::client::Client;
use super::framed::Framed;
use super::outbound::resend_inflight;
use super::{Connection, ConnectionError};

/// Reads CONNECT and answers it; `None` when the connection was refused or went away.
pub(super) async fn handshake<S>(broker: Arc<Broker>, stream: S, peer: SocketAddr, cert_user: Option<String>) -> Option<Connection<S>>
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
            broker.stats.connect_result(ConnectResult::UnsupportedProtocol);
            framed.send(&Packet::ConnAck(ConnAck { code, ..ConnAck::default() }));
            let _ = framed.flush().await;
            return None;
        }
        Ok(Err(e)) => {
            broker.stats.connect_result(ConnectResult::Malformed);
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
pub(super) async fn refuse<S: AsyncRead + AsyncWrite + Unpin, T>(
    framed: &mut Framed<S>,
    protocol: Protocol,
    v5_code: u8,
    v3_code: u8,
    why: &str,
) -> Option<T> {
    tracing::debug!(reason = why, "CONNECT refused");
    framed.broker.stats.connect_result(ConnectResult::of_refusal(v5_code));
    let mut ack = ConnAck { code: if protocol.is_v5() { v5_code } else { v3_code }, ..ConnAck::default() };
    if protocol.is_v5() {
        ack.properties.reason_string = Some(why.to_owned());
    }
    framed.send(&Packet::ConnAck(ack));
    let _ = framed.flush().await;
    None
}

/// Most AUTH round trips one exchange may take before it is abandoned.
pub(super) const MAX_AUTH_ROUNDS: u32 = 16;

/// Runs an enhanced authentication exchange during CONNECT [MQTT-4.12.0-..]. Returns the
/// data for CONNACK, or the reason code and text to refuse with.
pub(super) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
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

pub(super) fn will_message(client_id: &str, connect: &Connect) -> Option<WillMessage> {
    let w = connect.will.as_ref()?;
    Some(WillMessage {
        // Its receive time is set when it is published.
        message: Message::new(w.topic.clone(), w.payload.clone(), w.qos, w.retain, client_id.to_owned())
            .with_properties(w.properties.application()),
        delay_secs: w.properties.will_delay_interval.unwrap_or(0),
    })
}

pub(super) static AUTO_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A server-assigned client id, unique on this node (and, by its node id, in the cluster).
pub(super) fn assign_client_id(node_id: u64) -> String {
    let n = AUTO_ID.fetch_add(1, Ordering::Relaxed);
    format!("raftmq-{:08x}-{:x}-{n:x}", node_id as u32, now_ms())
}

/// Checks a decoded CONNECT (client id, bans, authentication, will, keep alive), attaches
/// the session and sends CONNACK.
pub(super) async fn accept<S: ClientStream>(
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
        let id = assign_client_id(broker.node_id());
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
            broker.stats.connect_result(ConnectResult::Malformed);
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
        broker.stats.connect_result(ConnectResult::Malformed);
        tracing::debug!(%peer, max = framed.max_out, "CONNACK does not fit the client's maximum packet size");
        return None;
    }
    if !broker.is_serving() {
        // A node of a cluster that is starting: its persistent sessions or the routes of
        // its peers' are not all back yet, so a message published now could miss a
        // subscriber. The client tries again in a moment (MQTT 5: 0x88 Server unavailable).
        broker.stats.connect_result(ConnectResult::ServerUnavailable);
        return refuse(&mut framed, protocol, reason::SERVER_UNAVAILABLE, connack_v3::SERVER_UNAVAILABLE, "the node is starting").await;
    }
    let conn_id = broker.next_conn_id();
    let info = ConnInfo { protocol: protocol.level(), keep_alive, clean_start: connect.clean_start, connected_at_ms: now_ms() };
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
            broker.stats.store_error(&e);
            if let Some(suppressed) = broker.log_limits.overload.allow() {
                tracing::warn!(%peer, error = %e, suppressed, "CONNECT refused: session store");
            }
            // A store that may answer in a moment (no leader yet, a timeout) is busy; one
            // that cannot is unavailable. MQTT 3 has one code for both.
            let code = if e.is_transient() { reason::SERVER_BUSY } else { reason::SERVER_UNAVAILABLE };
            return refuse(&mut framed, protocol, code, connack_v3::SERVER_UNAVAILABLE, "session store unavailable").await;
        }
    };
    if expiry > 0 {
        if let Some(will) = will_message(&client_id, &connect) {
            // A persistent session's will is stored while the client is connected: if this
            // node dies, the node adopting the session publishes it.
            if let Err(e) = Box::pin(slot.stored(slot.arm_will(will))).await {
                tracing::debug!(client_id = %Printable(&client_id), error = %e, "the will could not be stored");
            }
        }
    }
    connack.session_present = session_present;
    framed.send(&Packet::ConnAck(connack));
    broker.stats.connect_result(ConnectResult::Success);
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
        deferred: Vec::new(),
        pending_rel: Vec::new(),
    };

    // Resume: resend unacknowledged PUBLISH with DUP and PUBREL [MQTT-4.4.0-1].
    if session_present {
        resend_inflight(&broker, &slot, &mut client, &mut framed);
    }
    Some(Connection { framed, client, slot })
}
