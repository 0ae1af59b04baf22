//! The cluster's route table: this node's routes (streamed to every peer) and every
//! peer's (as their streams delivered them), and forwarding to peers.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::peer::{Outgoing, PeerStatus};
use super::Shared;
use crate::message::{Message, QoS};
use crate::routes::{ForwardReceipt, ForwardTarget, RemoteMatch, RouteChange, RouteTable};
use crate::StoreError;

/// [`RouteTable`] over the mesh.
#[derive(Debug)]
pub struct ClusterRoutes {
    shared: Arc<Shared>,
}

impl ClusterRoutes {
    pub(crate) fn new(shared: Arc<Shared>) -> ClusterRoutes {
        ClusterRoutes { shared }
    }
}

#[async_trait]
impl RouteTable for ClusterRoutes {
    fn apply(&self, change: RouteChange) {
        let applied = self.shared.local.apply_in_order(change);
        // The links pick the new changes up from the log.
        self.shared.local_seq.send_if_modified(|seq| std::mem::replace(seq, applied.max(*seq)) != *seq);
    }

    async fn settle(&self, seq: u64) {
        let bound = self.shared.config.route_ack_timeout;
        let peers: Vec<_> = self.shared.peers.iter().filter(|p| p.status() == PeerStatus::Up).map(|p| Arc::clone(&p)).collect();
        let waits = peers.iter().map(|peer| async move {
            let mut acked = peer.acked.subscribe();
            let reached = tokio::time::timeout(bound, acked.wait_for(|a| *a >= seq)).await;
            if !matches!(reached, Ok(Ok(_))) && peer.status() == PeerStatus::Up {
                tracing::warn!(peer = %peer.name, seq, "peer did not acknowledge a route in time: treated as failing");
                peer.restart();
            }
        });
        futures_util::future::join_all(waits).await;
    }

    fn remote_matches(&self, topic: &str) -> RemoteMatch {
        self.shared.remote.matches(topic)
    }

    fn try_forward(&self, message: &Arc<Message>, targets: Vec<ForwardTarget>) -> (ForwardReceipt, Vec<ForwardTarget>) {
        let mut failed = 0;
        let mut pending = Vec::new();
        let mut full = Vec::new();
        for target in targets {
            let Some(peer) = self.shared.peers.get(&target.node).map(|p| Arc::clone(&p)) else {
                failed += 1;
                continue;
            };
            let (done, delivered) = if message.qos == QoS::AtMostOnce {
                (None, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            };
            let track = done.is_some() && target.group.is_some();
            match peer.try_enqueue(Outgoing { message: Arc::clone(message), group: target.group.clone(), done, track }) {
                Ok(true) => pending.extend(delivered),
                Ok(false) => failed += 1,
                Err(_) => full.push(target),
            }
        }
        let bound = self.shared.config.failure_timeout + self.shared.config.forward_wait;
        (ForwardReceipt::pending(failed, pending, bound), full)
    }

    async fn forward(&self, message: Arc<Message>, targets: Vec<ForwardTarget>) -> Result<ForwardReceipt, StoreError> {
        let wait = self.shared.config.forward_wait;
        let mut failed = 0;
        let mut pending = Vec::new();
        for target in targets {
            let Some(peer) = self.shared.peers.get(&target.node).map(|p| Arc::clone(&p)) else {
                failed += 1;
                continue;
            };
            let (done, delivered) = if message.qos == QoS::AtMostOnce {
                (None, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            };
            let track = done.is_some() && target.group.is_some();
            if !peer.enqueue(Outgoing { message: Arc::clone(&message), group: target.group, done, track }, wait).await {
                failed += 1;
                continue;
            }
            pending.extend(delivered);
        }
        // QoS >= 1: confirmed once the peers delivered (or failed).
        Ok(ForwardReceipt::pending(failed, pending, self.shared.config.failure_timeout + wait))
    }

    fn count(&self) -> usize {
        self.shared.local.count() + self.shared.remote.count()
    }

    fn applied_seq(&self) -> u64 {
        self.shared.local.applied_seq()
    }
}
