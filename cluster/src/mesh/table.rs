//! The cluster's route table: this node's routes (streamed to every peer) and every
//! peer's (as their streams delivered them), and forwarding to peers.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::peer::{Outgoing, Peer, PeerStatus};
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

    /// The copy of `message` for `target`'s peer, with the confirmation to wait for
    /// (QoS >= 1); `None` if the peer is unknown.
    fn outgoing(&self, message: &Arc<Message>, target: &ForwardTarget) -> Option<(Arc<Peer>, Outgoing, Option<oneshot::Receiver<bool>>)> {
        let peer = self.shared.peers.get(&target.node).map(|p| Arc::clone(&p))?;
        let (done, delivered) = if message.qos == QoS::AtMostOnce {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        };
        // A QoS 1/2 shared delivery is held until its member acknowledged it.
        let track = done.is_some() && target.group.is_some();
        Some((peer, Outgoing { message: Arc::clone(message), group: target.group.clone(), done, track }, delivered))
    }

    /// A receipt bounded by how long a peer may take: its queue wait plus failure detection.
    fn receipt(&self, pending: Vec<oneshot::Receiver<bool>>) -> ForwardReceipt {
        ForwardReceipt::pending(0, pending, self.shared.config.failure_timeout + self.shared.config.forward_wait)
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
        let mut receipt = self.receipt(Vec::new());
        let mut full = Vec::new();
        for target in targets {
            let Some((peer, item, delivered)) = self.outgoing(message, &target) else {
                receipt.failed += 1;
                continue;
            };
            match peer.try_enqueue(item) {
                Ok(true) => receipt.merge(self.receipt(delivered.into_iter().collect())),
                Ok(false) => receipt.failed += 1,
                Err(_) => full.push(target),
            }
        }
        (receipt, full)
    }

    async fn forward(&self, message: Arc<Message>, targets: Vec<ForwardTarget>) -> Result<ForwardReceipt, StoreError> {
        let mut receipt = self.receipt(Vec::new());
        for target in targets {
            let Some((peer, item, delivered)) = self.outgoing(&message, &target) else {
                receipt.failed += 1;
                continue;
            };
            if peer.enqueue(item, self.shared.config.forward_wait).await {
                receipt.merge(self.receipt(delivered.into_iter().collect()));
            } else {
                receipt.failed += 1;
            }
        }
        Ok(receipt)
    }

    fn count(&self) -> usize {
        self.shared.local.count() + self.shared.remote.count()
    }

    fn applied_seq(&self) -> u64 {
        self.shared.local.applied_seq()
    }
}
