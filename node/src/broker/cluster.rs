//! The broker as a member of a cluster: what it does with messages peers forward to it,
//! and what it tells about the mesh (nodes, readiness, peer metrics, `$SYS` events).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use raftmq_cluster::mesh::{Delivered, HandOver, HandOverRequest, Incoming, LocalBroker, Mesh, NodeView};
use raftmq_cluster::message::Message;
use raftmq_cluster::registry::ClientRegistry;
use raftmq_cluster::routes::Route;
use raftmq_cluster::NodeId;

use super::Broker;

/// What the mesh asks of this broker. Weak: the mesh must not keep a stopped broker alive.
struct Local(Weak<Broker>);

#[async_trait]
impl LocalBroker for Local {
    async fn deliver(&self, batch: Vec<Incoming>) -> Delivered {
        let Some(broker) = self.0.upgrade() else { return Delivered::nothing(batch.len()) };
        broker.deliver_forwarded(&batch)
    }

    async fn redeliver(&self, message: Arc<Message>, group: Route, not_on: NodeId) -> bool {
        match self.0.upgrade() {
            Some(broker) => broker.redeliver(&message, group, not_on).await,
            None => false,
        }
    }

    async fn hand_over(&self, request: HandOverRequest) -> HandOver {
        match self.0.upgrade() {
            Some(broker) => broker.hand_over(request).await,
            None => HandOver::NotHere,
        }
    }
}

impl Broker {
    /// Joins the broker to `mesh`: forwarded messages are delivered here, node events
    /// are logged and published on `$SYS`.
    pub fn join(self: &Arc<Self>, mesh: Mesh) {
        mesh.set_broker(Arc::new(Local(Arc::downgrade(self))));
        let mut events = mesh.events();
        let broker = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = events.recv() => e,
                    _ = shutdown.cancelled() => return,
                };
                let event = match event {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let Some(broker) = broker.upgrade() else { return };
                crate::telemetry::sys::node_event(&broker, &event.name, event.up).await;
            }
        });
        let _ = self.mesh.set(mesh);
    }

    /// The mesh this broker is part of (none on a node without peers).
    pub fn mesh(&self) -> Option<&Mesh> {
        self.mesh.get()
    }

    /// The replicated store this node runs, if any.
    pub fn raft(&self) -> Option<&Arc<raftmq_cluster::raft::RaftStore>> {
        self.raft.get()
    }

    /// Runs on `store` from now on.
    pub fn use_raft(&self, store: Arc<raftmq_cluster::raft::RaftStore>) {
        let _ = self.raft.set(store);
    }

    /// Brings back the persistent sessions the store holds for this node (in a cluster,
    /// the ones the registry says this node owns; the others belong to their nodes, or are
    /// adopted by the leader when their node is gone). A clustered node first reads what
    /// the group committed (waiting for a leader as long as it takes: until then the node
    /// refuses clients).
    pub async fn recover_own_sessions(self: &Arc<Self>) {
        let Some(store) = self.raft.get() else {
            self.serving.store(true, Ordering::Release);
            return;
        };
        // Not before the local state machine holds everything the group committed: a node
        // restarted with the others (F8) may hold sessions older than what was
        // acknowledged, and serving them would roll them back. Without a quorum there is
        // nothing to serve persistent sessions from anyway.
        let mut attempts = 0u32;
        while let Err(e) = store.read_index().await {
            attempts += 1;
            if attempts == 1 {
                tracing::warn!(error = %e, "waiting for the cluster's commit before recovering sessions");
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        if attempts > 0 {
            tracing::info!(attempts, "caught up with the cluster's commit");
        }
        let clustered = store.clustered();
        let me = self.node_id;
        let sessions: Vec<_> = store
            .data()
            .sessions
            .export()
            .into_iter()
            .filter_map(|mut s| match store.data().registry.current(&s.client_id) {
                // Under the registry's epoch: a claim applied before the crash whose
                // session claim was not would otherwise leave the slot writing under an
                // epoch the store fences (every message for it refused until its client
                // came back; the fault suite's F8 saw the stall).
                Some(claim) if claim.node == me => {
                    s.epoch = s.epoch.max(claim.epoch);
                    Some(s)
                }
                Some(_) => None,
                None => (!clustered).then_some(s),
            })
            .collect();
        let n = self.recover_sessions(sessions);
        if n > 0 {
            tracing::info!(sessions = n, "persistent sessions recovered from the data directory");
        }
        if let Some(mesh) = self.mesh() {
            mesh.routes_ready();
            self.wait_for_owners_routes(store).await;
        }
        self.serving.store(true, Ordering::Release);
    }

    /// Whether this node takes clients (see [`Broker::serving`]).
    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Waits until this node holds the routes of every other node that owns a session (a
    /// node that restarted with the others sends them once it recovered its own), bounded
    /// by the write timeout and the failure timeout: a node that does not come back has
    /// its sessions adopted by the leader, which sends their routes.
    async fn wait_for_owners_routes(&self, store: &raftmq_cluster::raft::store::RaftStore) {
        let Some(mesh) = self.mesh() else { return };
        let bound = Duration::from_millis(self.config.raft.write_timeout_ms + self.config.cluster.failure_timeout_ms);
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let owners = store.data().registry.owners();
            let missing: Vec<NodeId> = owners.into_iter().filter(|n| *n != self.node_id && !mesh.has_routes_of(*n)).collect();
            if missing.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(nodes = ?missing, "serving without the routes of nodes that own sessions");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this node has applied everything the cluster's group committed before
    /// the call (nothing to wait for on a node alone).
    pub async fn sync_with_cluster(&self) -> Result<(), raftmq_cluster::StoreError> {
        match self.raft.get() {
            Some(raft) if raft.clustered() => raft.read_index().await,
            _ => Ok(()),
        }
    }

    /// Waits (bounded) until this node has applied every entry it knows is committed: no
    /// round trip, so a write acknowledged on another node a moment ago may not be here yet
    /// if the leader has not told this node of its commit (it does at once, one hop).
    pub async fn catch_up_with_cluster(&self) {
        if let Some(raft) = self.raft.get().filter(|r| r.clustered()) {
            raft.catch_up().await;
        }
    }

    /// Every node of the cluster, this one first (only this one without a cluster).
    pub fn cluster_nodes(&self) -> Vec<NodeView> {
        match self.mesh.get() {
            Some(mesh) => mesh.nodes(),
            None => vec![NodeView {
                name: self.config.node_name.clone(),
                address: String::new(),
                status: raftmq_cluster::mesh::PeerStatus::Myself,
                routes: self.route_count(),
                forwarded: 0,
                forwarded_bytes: 0,
                forward_dropped: 0,
                forward_queue: 0,
                raft: None,
            }],
        }
    }

    /// Another node's client connected with `request.client_id`: disconnects the
    /// connection here (MQTT 5: 0x8E) and, when the client resumes its session, gives the
    /// session up (returned, with its pending will) instead of ending it here.
    pub async fn hand_over(self: &Arc<Self>, request: HandOverRequest) -> HandOver {
        let Some(slot) = self.slot(&request.client_id) else { return HandOver::NotHere };
        let _guard = match slot.connect_lock.try_lock() {
            Ok(guard) => guard,
            // A CONNECT with this id is being attached here while the other node claims it:
            // both wait for each other's answer. The node with the higher id wins: a lower
            // one lets its attach finish and hands over after; a higher one answers at once
            // and claims on the other node, which then hands its new connection over.
            Err(_) if request.from > self.node_id => slot.connect_lock.lock().await,
            Err(_) => return HandOver::NotHere,
        };
        if slot.is_removed() {
            return HandOver::NotHere;
        }
        if request.check_owner && slot.owner().is_some_and(|o| o.identity.username != request.username) {
            return HandOver::NotOwner;
        }
        let epoch = slot.epoch();
        self.take_over(&slot, crate::codec::reason::SESSION_TAKEN_OVER).await;
        if slot.is_removed() {
            // A transient session ended with its connection.
            return HandOver::Moved { session: None, epoch };
        }
        if !request.resume {
            // A clean start elsewhere ends the session here (a pending will goes out).
            if let Err(e) = self.discard(&slot).await {
                tracing::warn!(error = %e, "failed to end a session taken over by another node");
            }
            return HandOver::Moved { session: None, epoch };
        }
        // The slot stays (its deliveries failing) until the new owner's claim is applied
        // here: forgotten at once, its routes would go before the new owner's come, and a
        // message published in between would be acknowledged for nobody (the fault
        // suite's rolling restart caught that).
        let claims = self.raft().map(|r| r.data().claims());
        let session = slot.hand_off();
        let broker = Arc::clone(self);
        let client_id = request.client_id.clone();
        let moved = Arc::clone(&slot);
        self.tasks.spawn(async move {
            if let Some(claims) = claims {
                broker.claimed_above(&client_id, epoch, claims).await;
            }
            broker.forget_moved(&moved).await;
        });
        HandOver::Moved { session: Some(Box::new(session)), epoch }
    }

    /// Waits until a claim of `client_id` above `epoch` is applied here (or it is released),
    /// bounded by the takeover timeout.
    async fn claimed_above(
        &self,
        client_id: &str,
        epoch: u64,
        mut claims: tokio::sync::broadcast::Receiver<raftmq_cluster::raft::state_machine::ClaimApplied>,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.config.mqtt.takeover_timeout_secs.max(1));
        loop {
            if self.registry.current(client_id).is_none_or(|c| c.epoch > epoch) {
                return;
            }
            match tokio::time::timeout_at(deadline, claims.recv()).await {
                Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => return,
            }
        }
    }

    /// Whether the cluster view is complete: every known peer up and its routes received,
    /// and the replicated store has a leader (writes can commit).
    pub fn cluster_ready(&self) -> bool {
        self.mesh.get().is_none_or(Mesh::ready) && self.raft.get().is_none_or(|r| r.has_leader())
    }
}
