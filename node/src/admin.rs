//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics`, and the JSON API under
//! `/api/v1` (clients, sessions, subscriptions, retained messages, bans, publish, log level),
//! described by `/api/v1/openapi.json` (docs/openapi.json).
//!
//! Authentication: `Authorization: Bearer <api_key>` or basic auth with the configured user.
//! With no credential configured, the API answers loopback peers only, so a broker started
//! with no configuration cannot be driven from the network.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use bytes::Bytes;
use raftmq_cluster::message::{now_ms, Message, QoS};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::broker::Broker;

/// Changes the log filter at run time; set by the binary, absent in embedded use.
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

#[derive(Clone)]
struct AppState {
    broker: Arc<Broker>,
    log: Arc<OnceLock<LogControl>>,
}

/// The router of the admin listener.
pub fn router(broker: Arc<Broker>, log: Arc<OnceLock<LogControl>>) -> Router {
    let state = AppState { broker, log };
    let api = Router::new()
        .route("/status", get(status))
        .route("/cluster", get(cluster))
        .route("/cluster/join", axum::routing::post(cluster_join))
        .route("/cluster/nodes/{name}", axum::routing::delete(cluster_leave))
        .route("/clients", get(list_clients))
        .route("/clients/{client_id}", get(get_client).delete(kick_client))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{client_id}", get(get_session).delete(discard_session))
        .route("/subscriptions", get(list_subscriptions))
        .route("/retained", get(list_retained))
        .route("/retained/{*topic}", get(get_retained).delete(delete_retained))
        .route("/bans", get(list_bans).post(add_ban))
        .route("/bans/{who}", axum::routing::delete(delete_ban))
        .route("/publish", axum::routing::post(publish))
        .route("/log_level", put(set_log_level))
        .route("/openapi.json", get(openapi));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn authenticate(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: axum::extract::Request,
    next: Next,
) -> Response {
    let cfg = &state.broker.config.admin;
    let path = request.uri().path();
    let open = (cfg.open_health && (path == "/healthz" || path == "/readyz")) || (cfg.open_metrics && path == "/metrics");
    if open || authorized(cfg, peer, &headers) {
        return next.run(request).await;
    }
    let mut resp = error(StatusCode::UNAUTHORIZED, "authentication required");
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer, Basic realm=\"raftmq\""));
    resp
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(cfg: &crate::config::AdminConfig, peer: SocketAddr, headers: &HeaderMap) -> bool {
    if !cfg.has_credentials() {
        return peer.ip().is_loopback();
    }
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    if let (Some(token), Some(key)) = (value.strip_prefix("Bearer "), cfg.api_key.as_deref()) {
        return same(token.trim().as_bytes(), key.as_bytes());
    }
    if let (Some(encoded), Some(user), Some(password)) = (value.strip_prefix("Basic "), cfg.username.as_deref(), cfg.password.as_deref()) {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else { return false };
        let expected = format!("{user}:{password}");
        return same(&decoded, expected.as_bytes());
    }
    false
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.broker.shutdown.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if state.broker.raft().is_some_and(|r| !r.has_leader()) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the replicated store has no leader (are a majority of the nodes up?)");
    }
    if !state.broker.cluster_ready() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "waiting for the routes of every cluster peer");
    }
    if !state.broker.is_serving() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "recovering persistent sessions and the routes of the nodes that own sessions");
    }
    "ready".into_response()
}

async fn cluster(State(state): State<AppState>) -> Json<serde_json::Value> {
    let raft = state.broker.raft().map(|r| r.view());
    let me = raftmq_cluster::stable_hash(state.broker.config.node_name.as_bytes());
    let nodes_seen = state.broker.cluster_nodes();
    let name_of = |id: u64| nodes_seen.iter().find(|n| raftmq_cluster::stable_hash(n.name.as_bytes()) == id).map(|n| n.name.clone());
    let nodes: Vec<serde_json::Value> = nodes_seen
        .iter()
        .map(|n| {
            let id = raftmq_cluster::stable_hash(n.name.as_bytes());
            let mut node = json!({
                "name": n.name, "address": n.address, "status": n.status.label(), "routes": n.routes,
                "forwarded_messages": n.forwarded, "forwarded_bytes": n.forwarded_bytes,
                "forward_dropped": n.forward_dropped, "forward_queue": n.forward_queue,
            });
            if let Some(r) = &raft {
                let member = if r.voters.contains(&id) {
                    "voter"
                } else if r.learners.contains(&id) {
                    "learner"
                } else {
                    "none"
                };
                let role = match (id == me, r.leader == Some(id), member) {
                    (true, _, _) => r.role,
                    (false, true, _) => "leader",
                    (false, false, "voter") => "follower",
                    (false, false, "learner") => "learner",
                    _ => "none",
                };
                node["raft_member"] = json!(member);
                node["raft_role"] = json!(role);
                if id == me {
                    node["raft_term"] = json!(r.term);
                    node["raft_last_log_index"] = json!(r.last_log_index);
                    node["raft_commit_index"] = json!(r.committed_index);
                    node["raft_applied_index"] = json!(r.applied_index);
                } else {
                    if let Some(p) = n.raft.as_ref().filter(|_| n.status == raftmq_cluster::mesh::PeerStatus::Up) {
                        // As the peer last reported it (with its route heartbeats).
                        node["raft_role"] = json!(p.role);
                        node["raft_term"] = json!(p.term);
                        node["raft_last_log_index"] = json!(p.last_log_index);
                        node["raft_applied_index"] = json!(p.applied_index);
                    }
                    if let Some(matched) = r.matched.get(&id) {
                        // Known to the leader only: how far the node's log matches its own.
                        node["raft_matched_index"] = json!(matched);
                    }
                }
            }
            node
        })
        .collect();
    let raft = raft.map(|r| {
        let names = |ids: &[u64]| ids.iter().map(|id| name_of(*id).unwrap_or_else(|| id.to_string())).collect::<Vec<_>>();
        json!({
            "leader": r.leader.map(|id| name_of(id).unwrap_or_else(|| id.to_string())),
            "term": r.term,
            "voters": names(&r.voters),
            "learners": names(&r.learners),
        })
    });
    Json(json!({ "self": state.broker.config.node_name, "nodes": nodes, "raft": raft }))
}

#[derive(serde::Deserialize)]
struct JoinRequest {
    address: String,
}

/// `ctl cluster join ADDR`: link with the node at ADDR (this node joins its group when it
/// belongs to none yet).
async fn cluster_join(State(state): State<AppState>, Json(req): Json<JoinRequest>) -> Response {
    let Some(mesh) = state.broker.mesh() else {
        return error(StatusCode::CONFLICT, "this node runs alone: start it with --seeds or cluster.enabled to cluster it");
    };
    if req.address.parse::<SocketAddr>().is_err() && !req.address.contains(':') {
        return error(StatusCode::BAD_REQUEST, "address must be host:port of the node's cluster listener");
    }
    mesh.introduce(&req.address);
    Json(json!({ "joining": req.address })).into_response()
}

/// `ctl cluster leave NODE`: remove NODE from the Raft group.
async fn cluster_leave(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(raft) = state.broker.raft().filter(|r| r.clustered()) else {
        return error(StatusCode::CONFLICT, "this node runs alone");
    };
    match raft.remove_node(raftmq_cluster::stable_hash(name.as_bytes())).await {
        Ok(_) => Json(json!({ "removed": name })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.broker.render_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status(State(state): State<AppState>) -> Json<serde_json::Value> {
    let b = &state.broker;
    let s = &b.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let sessions = b.session_summary();
    Json(json!({
        "node": b.config.node_name,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": b.metrics.uptime_secs(),
        "connections": s.connections.load(std::sync::atomic::Ordering::Relaxed),
        "connections_max": s.connections_max.load(std::sync::atomic::Ordering::Relaxed),
        "sessions": sessions.sessions,
        "sessions_persistent": sessions.persistent,
        "subscriptions": b.subscription_filter_count(),
        "retained": b.retained_count(),
        "queued": sessions.queued,
        "inflight": sessions.inflight,
        "messages_received": s.messages_received(),
        "messages_sent": s.messages_sent(),
        "messages_dropped": s.messages_dropped(),
        "bytes_received": load(&s.bytes_received),
        "bytes_sent": load(&s.bytes_sent),
    }))
}

/// One page of a listing.
#[derive(Debug, Serialize)]
struct Page<T> {
    data: Vec<T>,
    page: usize,
    limit: usize,
    total: usize,
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    page: Option<usize>,
    limit: Option<usize>,
    username: Option<String>,
    client_id: Option<String>,
    topic: Option<String>,
    filter: Option<String>,
}

fn paginate<T>(items: Vec<T>, q: &ListQuery) -> Page<T> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let page = q.page.unwrap_or(1).max(1);
    let total = items.len();
    let data = items.into_iter().skip((page - 1).saturating_mul(limit)).take(limit).collect();
    Page { data, page, limit, total }
}

/// A session as the API shows it (a client is an online session).
#[derive(Debug, Serialize)]
struct SessionView {
    client_id: String,
    connected: bool,
    username: Option<String>,
    ip_address: Option<String>,
    port: Option<u16>,
    proto_ver: Option<u8>,
    keepalive: Option<u16>,
    clean_start: Option<bool>,
    connected_at_ms: Option<u64>,
    persistent: bool,
    expiry_interval_secs: u32,
    subscriptions: usize,
    queued: usize,
    inflight: usize,
    dropped: u64,
}

fn view(slot: &crate::session::SessionSlot) -> SessionView {
    let v = slot.view();
    // The owner is the identity and address of the connection attached now.
    let owner = v.owner.as_ref();
    let info = v.conn.as_ref();
    SessionView {
        client_id: slot.client_id.to_string(),
        connected: info.is_some(),
        username: owner.and_then(|o| o.identity.username.clone()),
        ip_address: owner.map(|o| o.peer.ip().to_string()),
        port: owner.map(|o| o.peer.port()),
        proto_ver: info.map(|i| i.protocol),
        keepalive: info.map(|i| i.keep_alive),
        clean_start: info.map(|i| i.clean_start),
        connected_at_ms: info.map(|i| i.connected_at_ms),
        persistent: v.persistent,
        expiry_interval_secs: v.expiry_secs,
        subscriptions: v.subscriptions,
        queued: v.queued,
        inflight: v.inflight,
        dropped: v.dropped,
    }
}

fn filtered_sessions(broker: &Broker, q: &ListQuery, online_only: bool) -> Vec<SessionView> {
    broker
        .slots()
        .iter()
        .map(|s| view(s))
        .filter(|v| !online_only || v.connected)
        .filter(|v| q.username.as_ref().is_none_or(|u| v.username.as_ref() == Some(u)))
        .filter(|v| q.client_id.as_ref().is_none_or(|prefix| v.client_id.starts_with(prefix.as_str())))
        .collect()
}

async fn list_clients(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Json<Page<SessionView>> {
    Json(paginate(filtered_sessions(&state.broker, &q, true), &q))
}

async fn get_client(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    match state.broker.slot(&client_id).map(|s| view(&s)).filter(|v| v.connected) {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, "client not connected"),
    }
}

async fn kick_client(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    if state.broker.kick(&client_id).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "client not connected")
    }
}

async fn list_sessions(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Json<Page<SessionView>> {
    Json(paginate(filtered_sessions(&state.broker, &q, false), &q))
}

async fn get_session(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    match state.broker.slot(&client_id) {
        Some(slot) => Json(view(&slot)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such session"),
    }
}

async fn discard_session(State(state): State<AppState>, Path(client_id): Path<String>) -> Response {
    match state.broker.discard_session(&client_id).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, "no such session"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Debug, Serialize)]
struct SubscriptionView {
    client_id: String,
    topic: String,
    qos: u8,
    no_local: bool,
    retain_as_published: bool,
    retain_handling: u8,
    subscription_identifier: Option<u32>,
}

async fn list_subscriptions(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Json<Page<SubscriptionView>> {
    let mut out = Vec::new();
    for slot in state.broker.slots() {
        if q.client_id.as_ref().is_some_and(|c| **c != *slot.client_id) {
            continue;
        }
        for (filter, o) in slot.subscriptions() {
            // `topic` selects the subscriptions that would receive a message on that topic.
            let inner_filter = crate::routing::shared::topic_filter(&filter).unwrap_or(&filter);
            if q.topic.as_ref().is_some_and(|t| !raftmq_cluster::topic::matches(inner_filter, t)) {
                continue;
            }
            out.push(SubscriptionView {
                client_id: slot.client_id.to_string(),
                topic: filter.to_string(),
                qos: o.qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling,
                subscription_identifier: o.subscription_identifier,
            });
        }
    }
    Json(paginate(out, &q))
}

#[derive(Debug, Serialize)]
struct RetainedView {
    topic: String,
    qos: u8,
    payload: String,
    payload_encoding: &'static str,
    size: usize,
    received_at_ms: u64,
}

fn retained_view(m: &Message) -> RetainedView {
    let (payload, payload_encoding) = match std::str::from_utf8(&m.payload) {
        Ok(text) => (text.to_owned(), "plain"),
        Err(_) => (base64::engine::general_purpose::STANDARD.encode(&m.payload), "base64"),
    };
    RetainedView {
        topic: m.topic.clone(),
        qos: m.qos as u8,
        payload,
        payload_encoding,
        size: m.payload.len(),
        received_at_ms: m.received_at_us / 1000,
    }
}

async fn list_retained(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let filter = q.filter.clone().unwrap_or_else(|| "#".to_owned());
    if raftmq_cluster::topic::validate_topic_filter(&filter, usize::MAX).is_err() {
        return error(StatusCode::BAD_REQUEST, "invalid topic filter");
    }
    let mut items: Vec<RetainedView> = state.broker.retained_matching(&filter).iter().map(|m| retained_view(m)).collect();
    items.sort_by(|a, b| a.topic.cmp(&b.topic));
    Json(paginate(items, &q)).into_response()
}

async fn get_retained(State(state): State<AppState>, Path(topic): Path<String>) -> Response {
    if raftmq_cluster::topic::validate_topic_name(&topic, usize::MAX).is_err() {
        return error(StatusCode::BAD_REQUEST, "invalid topic name");
    }
    match state.broker.retained_matching(&topic).first() {
        Some(m) => Json(retained_view(m)).into_response(),
        None => error(StatusCode::NOT_FOUND, "no retained message"),
    }
}

async fn delete_retained(State(state): State<AppState>, Path(topic): Path<String>) -> Response {
    if raftmq_cluster::topic::validate_topic_name(&topic, usize::MAX).is_err() {
        return error(StatusCode::BAD_REQUEST, "invalid topic name");
    }
    if state.broker.retained_matching(&topic).is_empty() {
        return error(StatusCode::NOT_FOUND, "no retained message");
    }
    let empty = Arc::new(Message::new(topic, Bytes::new(), QoS::AtMostOnce, true, String::new()));
    match state.broker.retain(&empty).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct BanView {
    who: String,
    until: Option<u64>,
}

async fn list_bans(State(state): State<AppState>) -> Json<Vec<BanView>> {
    Json(state.broker.bans.list().into_iter().map(|(who, until)| BanView { who, until }).collect())
}

async fn add_ban(State(state): State<AppState>, Json(ban): Json<BanView>) -> Response {
    if ban.until.is_some_and(|u| u <= now_ms() / 1000) {
        return error(StatusCode::BAD_REQUEST, "until is in the past");
    }
    match state.broker.bans.ban_subject(&ban.who, ban.until) {
        Ok(()) => {
            // A banned client that is connected now is disconnected as well.
            if let Some(id) = ban.who.strip_prefix("client:") {
                state.broker.kick(id).await;
            }
            (StatusCode::CREATED, Json(ban)).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

async fn delete_ban(State(state): State<AppState>, Path(who): Path<String>) -> Response {
    if state.broker.bans.unban(&who) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such ban")
    }
}

#[derive(Debug, Deserialize)]
struct PublishRequest {
    topic: String,
    payload: String,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
}

async fn publish(State(state): State<AppState>, Json(req): Json<PublishRequest>) -> Response {
    let broker = &state.broker;
    if raftmq_cluster::topic::validate_topic_name(&req.topic, broker.config.mqtt.max_topic_levels).is_err() || req.topic.starts_with("$SYS")
    {
        return error(StatusCode::BAD_REQUEST, "invalid topic name");
    }
    let Some(qos) = QoS::from_u8(req.qos) else { return error(StatusCode::BAD_REQUEST, "qos must be 0, 1 or 2") };
    let payload = match req.payload_encoding.as_deref() {
        None | Some("plain") => Bytes::from(req.payload.into_bytes()),
        Some("base64") => match base64::engine::general_purpose::STANDARD.decode(req.payload) {
            Ok(b) => Bytes::from(b),
            Err(_) => return error(StatusCode::BAD_REQUEST, "payload is not base64"),
        },
        Some(_) => return error(StatusCode::BAD_REQUEST, "payload_encoding must be plain or base64"),
    };
    if payload.len() > broker.config.mqtt.max_packet_size {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "payload larger than mqtt.max_packet_size");
    }
    let message = Arc::new(Message::new(req.topic, payload, qos, req.retain, String::new()));
    match broker.publish(&message).await {
        Ok(routed) => Json(json!({ "matched": routed.matched })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct LogLevel {
    filter: String,
}

async fn set_log_level(State(state): State<AppState>, Json(req): Json<LogLevel>) -> Response {
    let Some(control) = state.log.get() else { return error(StatusCode::NOT_IMPLEMENTED, "log level is not controllable in this process") };
    match control(&req.filter) {
        Ok(()) => {
            tracing::info!(filter = %req.filter, "log filter changed");
            Json(json!({ "filter": req.filter })).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}

/// Serves the admin API on `listener` until the broker shuts down.
pub async fn serve(broker: Arc<Broker>, listener: tokio::net::TcpListener, log: Arc<OnceLock<LogControl>>) {
    let shutdown = broker.shutdown.clone();
    let app = router(broker, log).into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::error!(error = %e, "admin listener failed");
    }
}
