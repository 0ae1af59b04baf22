//! The gRPC side of the mesh: the `Cluster` service peers call (introductions, their route
//! streams, their forwarded messages, goodbyes), the shared-secret check on every call,
//! and the client every link dials with.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use raftmq_proto::v1 as pb;
use raftmq_proto::v1::cluster_client::ClusterClient;
use raftmq_proto::v1::cluster_server::{Cluster, ClusterServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::config::MeshTls;
use super::Shared;
use crate::raft::network::Rpc;
use crate::routes::Route;

/// The metadata key the shared secret travels in.
const SECRET_KEY: &str = "x-raftmq-secret";
/// Settlements waiting to go back to one forwarding node at most (beyond, they are lost:
/// that node redelivers a little more if this one dies).
const SETTLE_QUEUE: usize = 65_536;

/// Largest gRPC message accepted or sent: a batch of forwarded messages, or one message of
/// the largest size MQTT allows.
const MAX_MESSAGE: usize = 300 << 20;

/// TLS settings for both directions.
#[derive(Debug, Clone)]
pub(crate) struct TlsConfigs {
    pub(crate) server: ServerTlsConfig,
    pub(crate) client: ClientTlsConfig,
}

/// Loads the PEM files for mutual TLS between nodes.
pub(crate) fn tls_configs(tls: &MeshTls) -> Result<TlsConfigs, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let identity = tonic::transport::Identity::from_pem(read(&tls.cert)?, read(&tls.key)?);
    let ca = tonic::transport::Certificate::from_pem(read(&tls.ca)?);
    Ok(TlsConfigs {
        server: ServerTlsConfig::new().identity(identity.clone()).client_ca_root(ca.clone()),
        client: ClientTlsConfig::new().identity(identity).ca_certificate(ca).domain_name(tls.server_name.clone()),
    })
}

/// Adds the shared secret to every outgoing call.
#[derive(Debug, Clone)]
pub(crate) struct AddSecret(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for AddSecret {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.0 {
            req.metadata_mut().insert(SECRET_KEY, secret.clone());
        }
        Ok(req)
    }
}

/// A client of one peer.
pub(crate) type LinkClient = ClusterClient<InterceptedService<Channel, AddSecret>>;

/// A client for the node at `address`, carrying the secret on every call.
pub(crate) async fn client(shared: &Shared, address: &str) -> Result<LinkClient, tonic::transport::Error> {
    let scheme = if shared.client_tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))?
        .connect_timeout(shared.config.failure_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(shared.config.heartbeat)
        .keep_alive_timeout(shared.config.failure_timeout);
    if let Some(tls) = &shared.client_tls {
        endpoint = endpoint.tls_config(tls.clone())?;
    }
    let channel = endpoint.connect().await?;
    let secret = shared.config.secret.as_deref().and_then(|s| s.parse().ok());
    Ok(ClusterClient::with_interceptor(channel, AddSecret(secret))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Serves the `Cluster` service on `listener` until the mesh stops.
pub(crate) fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener, tls: Option<ServerTlsConfig>) {
    let secret = shared.config.secret.clone().unwrap_or_default();
    let check = move |req: Request<()>| {
        let given = req.metadata().get(SECRET_KEY).map(|v| v.as_bytes()).unwrap_or_default();
        if constant_time_eq(given, secret.as_bytes()) {
            Ok(req)
        } else {
            let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(peer = %peer, "cluster call refused: wrong or missing cluster secret");
            Err(Status::unauthenticated("wrong cluster secret"))
        }
    };
    let service = ClusterServer::with_interceptor(Service { shared: Arc::clone(&shared) }, check);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut builder = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(shared.config.heartbeat))
            .http2_keepalive_timeout(Some(shared.config.failure_timeout));
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cluster TLS configuration refused");
                    return;
                }
            };
        }
        // Served from our own listener, so tonic's `tcp_nodelay` does not reach these
        // sockets: without it, small acknowledgements wait for Nagle and delayed ACKs
        // (tens of milliseconds per round trip).
        let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |socket| {
            if let Ok(s) = &socket {
                let _ = s.set_nodelay(true);
            }
            socket
        });
        if let Err(e) = builder.add_service(service).serve_with_incoming_shutdown(incoming, shutdown.cancelled()).await {
            tracing::error!(error = %e, "cluster listener stopped");
        }
    });
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Service {
    shared: Arc<Shared>,
}

/// What a node whose Raft group is not open yet (it is starting) answers to Raft calls:
/// nothing was done, so a caller may simply call again.
pub(crate) const NO_GROUP: &str = "no raft group on this node yet";

impl Service {
    fn raft(&self) -> Result<&openraft::Raft<crate::raft::TypeConfig>, Status> {
        self.shared.raft.get().ok_or_else(|| Status::unavailable(NO_GROUP))
    }

    async fn raft_rpc(&self, kind: Rpc, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let raft = self.raft()?;
        let payload = crate::raft::network::serve_rpc(raft, kind, &request.into_inner().payload).await?;
        Ok(Response::new(pb::RaftPayload { payload: payload.into() }))
    }
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

fn route_of(change: &pb::RouteChange) -> Route {
    Route {
        group: (!change.share_group.is_empty()).then(|| Arc::from(change.share_group.as_str())),
        filter: Arc::from(change.filter.as_str()),
    }
}

#[tonic::async_trait]
impl Cluster for Service {
    async fn hello(&self, request: Request<pb::HelloRequest>) -> Result<Response<pb::HelloReply>, Status> {
        let caller = request.into_inner().node.unwrap_or_default();
        let shared = &self.shared;
        // A node that found us first: link back to it.
        super::discovery::learn(shared, std::iter::once((caller.name, caller.address)));
        let known =
            shared.peers.iter().map(|p| pb::NodeInfo { name: p.name.clone(), address: p.address.clone(), incarnation: 0 }).collect();
        Ok(Response::new(pb::HelloReply { node: Some(super::peer::me(shared)), known, version: 1 }))
    }

    type RoutesStream = Stream<pb::RouteAck>;

    async fn routes(&self, request: Request<Streaming<pb::RouteUpdate>>) -> Result<Response<Self::RoutesStream>, Status> {
        let mut updates = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            let timeout = shared.config.failure_timeout;
            let mut origin: Option<(crate::NodeId, u64)> = None;
            let mut last = 0u64;
            let mut want_snapshot = false;
            loop {
                let update = tokio::select! {
                    next = tokio::time::timeout(timeout, updates.message()) => match next {
                        Ok(Ok(Some(update))) => update,
                        _ => break,
                    },
                    _ = shared.shutdown.cancelled() => break,
                };
                let (node, generation) = match origin {
                    Some(o) => o,
                    None => {
                        let node = crate::stable_hash(update.origin.as_bytes());
                        let o = (node, shared.remote.begin(node));
                        origin = Some(o);
                        o
                    }
                };
                if let Some(position) = &update.raft {
                    shared.raft_positions.insert(node, super::RaftPosition::from(position));
                }
                if update.snapshot {
                    let routes = update.changes.iter().map(|c| (route_of(c), c.members)).collect();
                    shared.remote.replace(node, generation, routes);
                    last = update.seq;
                    want_snapshot = false;
                } else if !want_snapshot {
                    for change in &update.changes {
                        if change.seq != last + 1 {
                            want_snapshot = true;
                            break;
                        }
                        shared.remote.apply(node, generation, route_of(change), change.members);
                        last = change.seq;
                    }
                    if update.seq != last {
                        want_snapshot = true;
                    }
                }
                if tx.send(Ok(pb::RouteAck { seq: last, resync: want_snapshot })).await.is_err() {
                    break;
                }
            }
            if let Some((node, generation)) = origin {
                super::routes_gone(&shared, node, Some(generation));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ForwardStream = Stream<pb::ForwardAck>;

    async fn raft_append(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        self.raft_rpc(Rpc::Append, request).await
    }

    async fn raft_vote(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        self.raft_rpc(Rpc::Vote, request).await
    }

    async fn raft_snapshot(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        self.raft_rpc(Rpc::Snapshot, request).await
    }

    async fn propose(&self, request: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        let raft = self.raft()?;
        Ok(Response::new(crate::raft::leader::serve_propose(raft, request.into_inner().batch).await?))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let raft = self.raft()?;
        let request = request.into_inner();
        Ok(Response::new(crate::raft::leader::serve_join(raft, request.node, request.address).await?))
    }

    async fn read_index(&self, _request: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        let raft = self.raft()?;
        Ok(Response::new(crate::raft::leader::serve_read_index(raft).await?))
    }

    async fn remove_node(&self, request: Request<pb::RemoveRequest>) -> Result<Response<pb::RemoveReply>, Status> {
        let raft = self.raft()?;
        Ok(Response::new(crate::raft::leader::serve_remove(raft, request.into_inner().node).await?))
    }

    async fn campaign(&self, request: Request<pb::CampaignRequest>) -> Result<Response<pb::CampaignReply>, Status> {
        let raft = self.raft()?;
        Ok(Response::new(crate::raft::leader::serve_campaign(raft, request.into_inner().last_index).await?))
    }

    async fn forward(&self, request: Request<Streaming<pb::ForwardBatch>>) -> Result<Response<Self::ForwardStream>, Status> {
        let mut batches = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::clone(&self.shared);
        // Batches are delivered as they arrive; their acknowledgements go out in order once
        // each batch's persistent appends are stored, so a commit never holds the next
        // batch back (acknowledgements are cumulative: one may not overtake another).
        let (stored_tx, stored_rx) = mpsc::channel::<Acknowledge>(MAX_STORING);
        let (settle_tx, settle_rx) = mpsc::channel::<u64>(SETTLE_QUEUE);
        tokio::spawn(acknowledge(stored_rx, settle_rx, tx, Arc::clone(&shared)));
        tokio::spawn(async move {
            let mut origin: Option<crate::NodeId> = None;
            loop {
                let batch = tokio::select! {
                    next = batches.message() => match next {
                        Ok(Some(batch)) => batch,
                        _ => break,
                    },
                    _ = shared.shutdown.cancelled() => break,
                };
                let node = crate::stable_hash(batch.origin.as_bytes());
                if origin.is_none() {
                    shared.settlements.insert(node, settle_tx.clone());
                    origin = Some(node);
                }
                let mut failed = 0u32;
                let mut settled = Vec::new();
                let mut incoming = Vec::with_capacity(batch.messages.len());
                let mut ids = Vec::with_capacity(batch.messages.len());
                for item in batch.messages {
                    match item.message.map(crate::message::Message::try_from) {
                        Some(Ok(message)) => {
                            let group = (!item.share_group.is_empty()).then(|| Route {
                                group: Some(Arc::from(item.share_group.as_str())),
                                filter: Arc::from(item.share_filter.as_str()),
                            });
                            let origin = (item.id != 0).then_some(crate::session::ForwardOrigin { node, id: item.id });
                            incoming.push(super::Incoming { message: Arc::new(message), group, origin });
                            ids.push(item.id);
                        }
                        _ => {
                            failed += 1;
                            if item.id != 0 {
                                settled.push(item.id);
                            }
                        }
                    }
                }
                let delivered = match shared.broker.get() {
                    Some(broker) => broker.deliver(incoming).await,
                    None => super::Delivered::nothing(ids.len()),
                };
                let ack = Acknowledge { seq: batch.seq, failed, settled, ids, delivered };
                if stored_tx.send(ack).await.is_err() {
                    break;
                }
            }
            if let Some(node) = origin {
                shared.settlements.remove_if(&node, |_, s| s.same_channel(&settle_tx));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn takeover(&self, request: Request<pb::TakeoverBatch>) -> Result<Response<pb::TakeoverReplies>, Status> {
        let Some(broker) = self.shared.broker.get() else { return Err(Status::unavailable("starting")) };
        let handovers = request.into_inner().requests.into_iter().map(|r| {
            broker.hand_over(super::HandOverRequest {
                client_id: r.client_id,
                username: r.has_username.then_some(r.username),
                resume: r.resume,
                check_owner: r.check_owner,
                from: crate::stable_hash(r.from.as_bytes()),
            })
        });
        use pb::takeover_reply::Outcome;
        let replies = futures_util::future::join_all(handovers)
            .await
            .into_iter()
            .map(|handed| match handed {
                super::HandOver::NotHere => pb::TakeoverReply { outcome: Outcome::NotHere as i32, session: None, epoch: 0 },
                super::HandOver::NotOwner => pb::TakeoverReply { outcome: Outcome::NotOwner as i32, session: None, epoch: 0 },
                super::HandOver::Moved { session, epoch } => {
                    pb::TakeoverReply { outcome: Outcome::Moved as i32, session: session.as_deref().map(pb::Session::from), epoch }
                }
            })
            .collect();
        Ok(Response::new(pb::TakeoverReplies { replies }))
    }

    async fn leave(&self, request: Request<pb::LeaveRequest>) -> Result<Response<pb::Ack>, Status> {
        let name = request.into_inner().name;
        let node = crate::stable_hash(name.as_bytes());
        let shared = &self.shared;
        super::routes_gone(shared, node, None);
        if let Some((_, peer)) = shared.peers.remove(&node) {
            super::discovery::forget(shared, peer.address());
            peer.mark_left(shared);
        }
        tracing::info!(peer = %name, "cluster peer left");
        Ok(Response::new(pb::Ack {}))
    }
}

/// Forwarded batches delivered and being stored at most, per forwarding node.
const MAX_STORING: usize = 64;

/// A delivered batch waiting for its appends to be stored before it is acknowledged.
struct Acknowledge {
    seq: u64,
    failed: u32,
    settled: Vec<u64>,
    ids: Vec<u64>,
    delivered: super::Delivered,
}

/// Sends a forwarding node its acknowledgements, in batch order, each once the batch is
/// stored; settlements of tracked shared deliveries ride along with the last batch
/// acknowledged.
async fn acknowledge(
    mut stored: mpsc::Receiver<Acknowledge>,
    mut settlements: mpsc::Receiver<u64>,
    tx: mpsc::Sender<Result<pb::ForwardAck, Status>>,
    shared: Arc<Shared>,
) {
    let mut last_seq = 0;
    loop {
        let ack = tokio::select! {
            ack = stored.recv() => match ack {
                Some(ack) => ack,
                None => return,
            },
            Some(id) = settlements.recv() => {
                let mut settled = vec![id];
                while let Ok(id) = settlements.try_recv() {
                    settled.push(id);
                }
                if tx.send(Ok(pb::ForwardAck { seq: last_seq, failed: 0, settled, unstored: false })).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Acknowledge { seq, mut failed, mut settled, ids, delivered } = ack;
        let stored_ok = delivered.stored.await;
        let unstored = !stored_ok;
        for (taken, id) in delivered.taken.into_iter().zip(ids) {
            if !(taken && stored_ok) {
                failed += 1;
                if id != 0 {
                    settled.push(id);
                }
            }
        }
        shared.undeliverable.fetch_add(u64::from(failed), Ordering::Relaxed);
        last_seq = seq;
        if tx.send(Ok(pb::ForwardAck { seq, failed, settled, unstored })).await.is_err() {
            return;
        }
    }
}
