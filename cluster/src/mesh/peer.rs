//! One outgoing link to a peer: `Hello`, then this node's route stream and forward stream
//! to it, with heartbeats and failure detection; reconnects with backoff until the peer
//! leaves or this node stops.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmq_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;

use super::{NodeEvent, NodeView, Shared};
use crate::message::Message;
use crate::routes::{CatchUp, Route, RouteChange};
use crate::NodeId;

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerStatus {
    /// This node.
    Myself,
    /// Dialling or introducing itself.
    Connecting,
    /// Streams open and acknowledgements arriving.
    Up,
    /// Not reachable now; the link keeps trying.
    Down,
}

impl PeerStatus {
    /// The label in the admin API and metrics.
    pub fn label(self) -> &'static str {
        match self {
            PeerStatus::Myself | PeerStatus::Up => "up",
            PeerStatus::Connecting | PeerStatus::Down => "down",
        }
    }
}

/// One message on its way to a peer.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) message: Arc<Message>,
    pub(crate) group: Option<Route>,
    /// Told whether the peer delivered it (QoS >= 1 only).
    pub(crate) done: Option<oneshot::Sender<bool>>,
    /// Held here until the member acknowledged it (a QoS 1/2 shared delivery), to give it
    /// to another member if the peer dies first.
    pub(crate) track: bool,
}

/// Tracked shared deliveries the peer has not settled yet.
#[derive(Debug, Default)]
struct Held {
    next: u64,
    items: HashMap<u64, (Arc<Message>, Route)>,
}

/// Tracked deliveries held per peer at most; beyond, new ones go untracked (counted as
/// dropped from redelivery, never from delivery).
const HELD_CAP: usize = 100_000;

/// Batches sent and not yet acknowledged, at most.
const MAX_UNACKED_BATCHES: usize = 16;
/// Bytes of payload in one forwarded batch, at most (one larger message goes alone).
const BATCH_BYTES: usize = 1 << 20;
/// How often a link asks its peer which nodes it knows.
const MEMBERSHIP_INTERVAL: Duration = Duration::from_secs(1);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The link to one peer.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: NodeId,
    pub(crate) name: String,
    pub(crate) address: String,
    status: AtomicU8,
    /// The peer has applied this node's route changes up to here.
    pub(crate) acked: watch::Sender<u64>,
    forward_tx: mpsc::Sender<Outgoing>,
    forward_rx: tokio::sync::Mutex<mpsc::Receiver<Outgoing>>,
    /// Drop the streams and reconnect (the peer did not acknowledge a route in time).
    restart: Notify,
    /// The peer left the cluster: the link ends for good.
    left: AtomicBool,
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped: AtomicU64,
    held: Mutex<Held>,
    /// The peer's process start time from its last `Hello` (0 before the first).
    incarnation: AtomicU64,
    /// Client-id claims for the peer, sent in batches while the link is up.
    claims_tx: mpsc::Sender<Claim>,
    claims_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Claim>>>,
}

/// One client-id claim waiting for its batch.
#[derive(Debug)]
pub(crate) struct Claim {
    request: pb::TakeoverRequest,
    reply: oneshot::Sender<pb::TakeoverReply>,
}

/// Stops a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Claims one takeover call carries at most.
const CLAIM_BATCH: usize = 512;
/// Claims waiting for one peer at most; beyond, a claim does not ask that peer (as when its
/// link is down).
const CLAIM_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("call: {0}")]
    Call(#[from] tonic::Status),
    #[error("the node at this address is {0}, not the peer expected")]
    Renamed(String),
    #[error("no acknowledgement within the failure timeout")]
    Silent,
    #[error("stream closed")]
    Closed,
    #[error("restarted after an acknowledgement timeout")]
    Restart,
}

fn status_from(v: u8) -> PeerStatus {
    match v {
        2 => PeerStatus::Up,
        3 => PeerStatus::Down,
        _ => PeerStatus::Connecting,
    }
}

fn status_code(s: PeerStatus) -> u8 {
    match s {
        PeerStatus::Up => 2,
        PeerStatus::Down => 3,
        _ => 1,
    }
}

/// This node's introduction.
pub(crate) fn hello_request(shared: &Shared) -> pb::HelloRequest {
    pb::HelloRequest { node: Some(me(shared)), version: 1 }
}

/// This node as peers see it.
pub(crate) fn me(shared: &Shared) -> pb::NodeInfo {
    pb::NodeInfo { name: shared.config.name.clone(), address: shared.config.advertise.clone(), incarnation: shared.incarnation }
}

pub(crate) fn wire_change(c: &RouteChange) -> pb::RouteChange {
    pb::RouteChange {
        filter: c.route.filter.to_string(),
        share_group: c.route.group.as_deref().unwrap_or_default().to_owned(),
        members: c.members,
        seq: c.seq,
    }
}

impl Peer {
    pub(crate) fn new(id: NodeId, name: String, address: String, queue: usize) -> Peer {
        let (forward_tx, forward_rx) = mpsc::channel(queue.max(1));
        let (claims_tx, claims_rx) = mpsc::channel(CLAIM_QUEUE);
        Peer {
            id,
            name,
            address,
            status: AtomicU8::new(status_code(PeerStatus::Connecting)),
            acked: watch::channel(0).0,
            forward_tx,
            forward_rx: tokio::sync::Mutex::new(forward_rx),
            restart: Notify::new(),
            left: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            held: Mutex::new(Held::default()),
            incarnation: AtomicU64::new(0),
            claims_tx,
            claims_rx: Arc::new(tokio::sync::Mutex::new(claims_rx)),
        }
    }

    pub(crate) fn status(&self) -> PeerStatus {
        status_from(self.status.load(Ordering::Acquire))
    }

    fn set_status(&self, shared: &Shared, status: PeerStatus) {
        let before = status_from(self.status.swap(status_code(status), Ordering::AcqRel));
        let (was_up, is_up) = (before == PeerStatus::Up, status == PeerStatus::Up);
        if was_up != is_up {
            if is_up {
                tracing::info!(peer = %self.name, "cluster peer up");
            } else {
                tracing::warn!(peer = %self.name, "cluster peer down");
            }
            let _ = shared.events.send(NodeEvent { name: self.name.clone(), up: is_up });
        }
    }

    /// Asks the peer to let go of a client id (batched with the other claims queued now);
    /// `None` if the link is down, the queue is full or no answer came within `bound`.
    pub(crate) async fn claim(&self, request: pb::TakeoverRequest, bound: Duration) -> Option<pb::TakeoverReply> {
        if self.status() != PeerStatus::Up {
            return None;
        }
        let (reply, answer) = oneshot::channel();
        self.claims_tx.try_send(Claim { request, reply }).ok()?;
        tokio::time::timeout(bound, answer).await.ok()?.ok()
    }

    /// Sends queued claims in batches while the link lives.
    fn spawn_claims(&self, client: super::service::LinkClient) -> tokio::task::JoinHandle<()> {
        let queue = Arc::clone(&self.claims_rx);
        tokio::spawn(async move {
            let mut queue = queue.lock().await;
            let mut claims = Vec::with_capacity(CLAIM_BATCH);
            while queue.recv_many(&mut claims, CLAIM_BATCH).await > 0 {
                let (requests, replies): (Vec<_>, Vec<_>) = claims.drain(..).map(|c| (c.request, c.reply)).unzip();
                let Ok(answer) = client.clone().takeover(pb::TakeoverBatch { requests }).await else { continue };
                for (reply, r) in replies.into_iter().zip(answer.into_inner().replies) {
                    let _ = reply.send(r);
                }
            }
        })
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) fn view(&self, routes: usize) -> NodeView {
        NodeView {
            name: self.name.clone(),
            address: self.address.clone(),
            status: self.status(),
            routes,
            forwarded: self.forwarded.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            forward_dropped: self.dropped.load(Ordering::Relaxed),
            forward_queue: self.forward_tx.max_capacity() - self.forward_tx.capacity(),
            raft: None,
        }
    }

    /// Drops the streams and reconnects (a peer that did not acknowledge in time is
    /// treated as failing; it gets a snapshot when it comes back).
    pub(crate) fn restart(&self) {
        self.restart.notify_one();
    }

    /// The peer left: the link stops for good.
    pub(crate) fn mark_left(&self, shared: &Shared) {
        self.left.store(true, Ordering::Release);
        self.set_status(shared, PeerStatus::Down);
        self.restart.notify_one();
    }

    /// Queues a message for the peer if there is room now: `Ok(false)` (counted as
    /// dropped) if the link is down, `Err` with the message if the queue is full.
    pub(crate) fn try_enqueue(&self, item: Outgoing) -> Result<bool, Outgoing> {
        if self.status() != PeerStatus::Up {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        match self.forward_tx.try_send(item) {
            Ok(()) => Ok(true),
            Err(mpsc::error::TrySendError::Full(item)) => Err(item),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    /// Queues a message for the peer, waiting at most `wait` for room; false (counted as
    /// dropped) if the link is down or the queue stayed full.
    pub(crate) async fn enqueue(&self, item: Outgoing, wait: Duration) -> bool {
        if self.status() != PeerStatus::Up {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        // Room now (the common case) costs no timer; a full queue waits, bounded.
        let item = match self.forward_tx.try_send(item) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Full(item)) => item,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        match self.forward_tx.send_timeout(item, wait).await {
            Ok(()) => true,
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Says goodbye (bounded by the failure timeout).
    pub(crate) async fn leave(&self, shared: &Shared) {
        if self.status() != PeerStatus::Up {
            return;
        }
        let call = async {
            let mut client = super::service::client(shared, &self.address).await.ok()?;
            client.leave(pb::LeaveRequest { name: shared.config.name.clone() }).await.ok()
        };
        let _ = tokio::time::timeout(shared.config.failure_timeout, call).await;
    }

    /// Runs the link until the peer leaves or the node stops.
    pub(crate) async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if shared.shutdown.is_cancelled() || self.left.load(Ordering::Acquire) {
                break;
            }
            self.set_status(&shared, PeerStatus::Connecting);
            let started = Instant::now();
            let result = self.serve(&shared).await;
            self.set_status(&shared, PeerStatus::Down);
            self.fail_queued();
            self.redeliver_if_still_down(&shared);
            if let Err(e) = result {
                tracing::debug!(peer = %self.name, error = %e, "cluster link ended");
            }
            if started.elapsed() > shared.config.failure_timeout {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shared.shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.set_status(&shared, PeerStatus::Down);
        self.fail_queued();
        shared.peers.remove_if(&self.id, |_, p| Arc::ptr_eq(p, &self));
    }

    /// Once the peer has been down for the failure timeout, gives the shared deliveries it
    /// had not settled to other members (it is taken for dead: what it held is lost).
    fn redeliver_if_still_down(self: &Arc<Self>, shared: &Arc<Shared>) {
        if self.held.lock().map(|h| h.items.is_empty()).unwrap_or(true) {
            return;
        }
        let (peer, shared) = (Arc::clone(self), Arc::clone(shared));
        tokio::spawn(async move {
            tokio::time::sleep(shared.config.failure_timeout).await;
            if peer.status() != PeerStatus::Up {
                peer.redeliver_held(&shared).await;
            }
        });
    }

    /// Gives every unsettled shared delivery to another member.
    async fn redeliver_held(&self, shared: &Shared) {
        let items: Vec<(Arc<Message>, Route)> = match self.held.lock() {
            Ok(mut held) => held.items.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        let Some(broker) = shared.broker.get() else { return };
        if !items.is_empty() {
            tracing::info!(peer = %self.name, count = items.len(), "giving shared deliveries the peer held to other members");
        }
        for (message, route) in items {
            if broker.redeliver(message, route, self.id).await {
                shared.redelivered.fetch_add(1, Ordering::Relaxed);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Fails every message still queued (the publishers waiting for them learn at once).
    fn fail_queued(&self) {
        if let Ok(mut rx) = self.forward_rx.try_lock() {
            while let Ok(item) = rx.try_recv() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(done) = item.done {
                    let _ = done.send(false);
                }
            }
        }
    }

    async fn serve(&self, shared: &Arc<Shared>) -> Result<(), LinkError> {
        let config = &shared.config;
        let mut client = super::service::client(shared, &self.address).await?;
        let reply = tokio::time::timeout(config.failure_timeout, client.hello(hello_request(shared)))
            .await
            .map_err(|_| LinkError::Silent)??
            .into_inner();
        let name = reply.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        if name != self.name {
            return Err(LinkError::Renamed(name));
        }
        let incarnation = reply.node.as_ref().map_or(0, |n| n.incarnation);
        let before = self.incarnation.swap(incarnation, Ordering::AcqRel);
        if before != 0 && before != incarnation {
            // The peer restarted: what it held in memory is gone.
            self.redeliver_held(shared).await;
        }
        super::discovery::learn(shared, reply.known.iter().map(|n| (n.name.clone(), n.address.clone())));

        // A restarted node's routes go out once its sessions are recovered (bounded by the
        // node: recovery always ends, if need be with what this node has). The peer counts
        // as up meanwhile: the two can form the Raft group recovery waits for.
        let mut ready = shared.routes_ready.subscribe();
        if !*ready.borrow() {
            self.set_status(shared, PeerStatus::Up);
            tokio::select! {
                _ = ready.wait_for(|r| *r) => {}
                _ = shared.shutdown.cancelled() => return Ok(()),
            }
        }
        let (routes_tx, routes_rx) = mpsc::channel::<pb::RouteUpdate>(16);
        let mut acks = client.routes(ReceiverStream::new(routes_rx)).await?.into_inner();
        let (batches_tx, batches_rx) = mpsc::channel::<pb::ForwardBatch>(4);
        let mut batch_acks = client.forward(ReceiverStream::new(batches_rx)).await?.into_inner();

        let mut sent = self.send_routes(shared, &routes_tx, None).await?;
        // Dropped (the task stopped) however this function ends, so the next link can
        // take the claim queue over.
        let _claims = AbortOnDrop(self.spawn_claims(client.clone()));
        self.set_status(shared, PeerStatus::Up);
        let mut local_seq = shared.local_seq.subscribe();
        let mut heartbeat = tokio::time::interval(config.heartbeat);
        // Nodes that joined since: asked for again every so often, so two nodes that
        // reached the cluster through the same seed at the same moment still meet.
        let mut membership = tokio::time::interval(MEMBERSHIP_INTERVAL);
        membership.tick().await;
        let mut last_heard = Instant::now();
        let mut queue = self.forward_rx.lock().await;
        let mut unacked: VecDeque<(u64, Vec<oneshot::Sender<bool>>)> = VecDeque::new();
        let mut next_batch = 1u64;
        let mut items = Vec::with_capacity(config.forward_batch);
        let result = loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break Ok(()),
                _ = self.restart.notified() => break Err(LinkError::Restart),
                changed = local_seq.changed() => {
                    if changed.is_err() {
                        break Ok(());
                    }
                    sent = self.send_routes(shared, &routes_tx, Some(sent)).await?;
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > config.failure_timeout {
                        break Err(LinkError::Silent);
                    }
                    sent = self.send_routes(shared, &routes_tx, Some(sent)).await?;
                }
                _ = membership.tick() => {
                    let mut client = client.clone();
                    let shared = Arc::clone(shared);
                    let hello = hello_request(&shared);
                    tokio::spawn(async move {
                        if let Ok(Ok(reply)) = tokio::time::timeout(shared.config.failure_timeout, client.hello(hello)).await {
                            super::discovery::learn(&shared, reply.into_inner().known.into_iter().map(|n| (n.name, n.address)));
                        }
                    });
                }
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => {
                        last_heard = Instant::now();
                        if ack.resync {
                            sent = self.send_routes(shared, &routes_tx, None).await?;
                        } else {
                            self.acked.send_if_modified(|a| std::mem::replace(a, ack.seq.max(*a)) != *a);
                        }
                    }
                    Ok(None) => break Err(LinkError::Closed),
                    Err(status) => break Err(status.into()),
                },
                n = queue.recv_many(&mut items, config.forward_batch), if items.is_empty() && unacked.len() < MAX_UNACKED_BATCHES => {
                    if n == 0 {
                        break Ok(());
                    }
                    let (batch, dones) = self.batch(shared, next_batch, &mut items);
                    unacked.push_back((next_batch, dones));
                    next_batch += 1;
                    if batches_tx.send(batch).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                }
                // What did not fit into the last batch goes next.
                _ = std::future::ready(()), if !items.is_empty() && unacked.len() < MAX_UNACKED_BATCHES => {
                    let (batch, dones) = self.batch(shared, next_batch, &mut items);
                    unacked.push_back((next_batch, dones));
                    next_batch += 1;
                    if batches_tx.send(batch).await.is_err() {
                        break Err(LinkError::Closed);
                    }
                }
                ack = batch_acks.message() => match ack {
                    Ok(Some(ack)) => {
                        last_heard = Instant::now();
                        while unacked.front().is_some_and(|(seq, _)| *seq <= ack.seq) {
                            if let Some((seq, dones)) = unacked.pop_front() {
                                // A batch whose copies were not all stored there is no
                                // delivery its publishers may be told of.
                                let kept = !(ack.unstored && seq == ack.seq);
                                for done in dones {
                                    let _ = done.send(kept);
                                }
                            }
                        }
                        if ack.failed > 0 {
                            self.dropped.fetch_add(u64::from(ack.failed), Ordering::Relaxed);
                        }
                        if !ack.settled.is_empty() {
                            if let Ok(mut held) = self.held.lock() {
                                for id in &ack.settled {
                                    held.items.remove(id);
                                }
                            }
                        }
                    }
                    Ok(None) => break Err(LinkError::Closed),
                    Err(status) => break Err(status.into()),
                },
            }
        };
        // Sent and never acknowledged: the publishers waiting for them are told so.
        for (_, dones) in unacked {
            for done in dones {
                let _ = done.send(false);
            }
        }
        result
    }

    /// Turns the first of `items` (bounded in bytes; one larger message goes alone) into
    /// one wire batch; the rest stay in `items`.
    fn batch(&self, shared: &Shared, seq: u64, items: &mut Vec<Outgoing>) -> (pb::ForwardBatch, Vec<oneshot::Sender<bool>>) {
        let mut bytes = 0usize;
        let fit = items
            .iter()
            .position(|item| {
                bytes += item.message.payload.len();
                bytes > BATCH_BYTES
            })
            .map_or(items.len(), |over| over.max(1));
        let rest = items.split_off(fit);
        let mut messages = Vec::with_capacity(items.len());
        let mut dones = Vec::new();
        let mut held = self.held.lock().ok();
        for item in std::mem::replace(items, rest) {
            let id = match (&item.group, held.as_deref_mut()) {
                (Some(route), Some(held)) if item.track && held.items.len() < HELD_CAP => {
                    held.next += 1;
                    held.items.insert(held.next, (Arc::clone(&item.message), route.clone()));
                    held.next
                }
                _ => 0,
            };
            self.forwarded.fetch_add(1, Ordering::Relaxed);
            self.forwarded_bytes.fetch_add(item.message.payload.len() as u64, Ordering::Relaxed);
            messages.push(pb::Forwarded {
                message: Some(pb::Message::from(item.message.as_ref())),
                share_group: item.group.as_ref().and_then(|g| g.group.as_deref()).unwrap_or_default().to_owned(),
                share_filter: item.group.as_ref().map(|g| g.filter.to_string()).unwrap_or_default(),
                id,
            });
            dones.extend(item.done);
        }
        (pb::ForwardBatch { origin: shared.config.name.clone(), seq, messages }, dones)
    }

    /// Sends what the peer needs after `since` (a snapshot without `since`, or when the
    /// log no longer reaches back), or a heartbeat; returns the sequence number sent.
    async fn send_routes(&self, shared: &Shared, tx: &mpsc::Sender<pb::RouteUpdate>, since: Option<u64>) -> Result<u64, LinkError> {
        let (seq, catch_up) = shared.local.catch_up(since);
        let (snapshot, changes) = match catch_up {
            CatchUp::Snapshot(all) => (true, all),
            CatchUp::Changes(changes) => (false, changes),
        };
        let update = pb::RouteUpdate {
            origin: shared.config.name.clone(),
            seq,
            snapshot,
            changes: changes.iter().map(wire_change).collect(),
            raft: shared.raft.get().map(raft_position),
        };
        tx.send(update).await.map_err(|_| LinkError::Closed)?;
        Ok(seq)
    }
}

/// This node's place in the Raft group, as its peers show it.
fn raft_position(raft: &openraft::Raft<crate::raft::TypeConfig>) -> pb::RaftPosition {
    let m = raft.metrics().borrow().clone();
    pb::RaftPosition {
        role: crate::raft::role_label(m.state).to_owned(),
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
    }
}
