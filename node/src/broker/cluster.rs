//! The broker as a member of a cluster: what it does with messages peers forward to it,
//! and what it tells about the mesh (nodes, readiness, peer metrics, `$SYS` events).

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use raftmq_cluster::mesh::{Deliver, Mesh, NodeView};
use raftmq_cluster::message::Message;
use raftmq_cluster::routes::Route;
use raftmq_cluster::StoreError;

use super::Broker;

/// Forwarded messages go to the broker's local sessions. Weak: the mesh must not keep a
/// stopped broker alive.
struct LocalDelivery(Weak<Broker>);

#[async_trait]
impl Deliver for LocalDelivery {
    async fn deliver(&self, message: Arc<Message>, group: Option<Route>) -> Result<bool, StoreError> {
        let Some(broker) = self.0.upgrade() else { return Ok(false) };
        broker.deliver_forwarded(&message, group).await
    }
}

impl Broker {
    /// Joins the broker to `mesh`: forwarded messages are delivered here, node events
    /// are logged and published on `$SYS`.
    pub fn join(self: &Arc<Self>, mesh: Mesh) {
        mesh.set_deliver(Arc::new(LocalDelivery(Arc::downgrade(self))));
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
            }],
        }
    }

    /// Whether the cluster view is complete: every known peer up and its routes received.
    pub fn cluster_ready(&self) -> bool {
        self.mesh.get().is_none_or(Mesh::ready)
    }
}
