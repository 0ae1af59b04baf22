//! Sessions whose node is gone. The Raft leader adopts every persistent session the
//! registry assigns to a node that has not been up for the failure timeout: it claims the
//! client id under a new epoch (the old owner, if it was only cut off, is fenced from then
//! on) and holds the session detached, so its subscriptions route here, messages published
//! meanwhile are queued, and its expiry and held will run. The client id of a transient
//! session is released. A client that reconnects anywhere gets the session from here the
//! usual way (the adopting node hands it over).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmq_cluster::mesh::PeerStatus;
use raftmq_cluster::session::SessionStore;
use raftmq_cluster::NodeId;

use super::Broker;
use crate::telemetry::printable::Printable;

/// How often the leader looks for orphaned sessions.
const SWEEP: Duration = Duration::from_millis(500);

impl Broker {
    /// Starts the adoption sweep (a node in a cluster only).
    pub(crate) fn spawn_adopter(self: &Arc<Self>) {
        let broker = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        let failure_timeout = Duration::from_millis(self.config.cluster.failure_timeout_ms);
        self.tasks.spawn(async move {
            // Since when each node has been seen not up (by this node, while it leads).
            let mut absent: HashMap<NodeId, Instant> = HashMap::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP) => {}
                    _ = shutdown.cancelled() => return,
                }
                let Some(broker) = broker.upgrade() else { return };
                broker.adopt_orphans(&mut absent, failure_timeout).await;
            }
        });
    }

    async fn adopt_orphans(self: &Arc<Self>, absent: &mut HashMap<NodeId, Instant>, failure_timeout: Duration) {
        let (Some(raft), Some(mesh)) = (self.raft.get(), self.mesh.get()) else { return };
        // A node still starting does not judge its peers gone: its own links to them wait
        // for its recovery.
        if !raft.is_leader() || !self.is_serving() {
            absent.clear();
            return;
        }
        let up: HashSet<NodeId> = mesh
            .nodes()
            .iter()
            .filter(|n| matches!(n.status, PeerStatus::Up | PeerStatus::Myself))
            .map(|n| raftmq_cluster::stable_hash(n.name.as_bytes()))
            .collect();
        let (claims, _) = raft.data().registry.export();
        let now = Instant::now();
        absent.retain(|node, _| !up.contains(node));
        let mut orphans = Vec::new();
        for (client_id, claim) in claims {
            if up.contains(&claim.node) {
                continue;
            }
            let since = *absent.entry(claim.node).or_insert(now);
            if now.duration_since(since) >= failure_timeout {
                orphans.push((client_id, claim));
            }
        }
        if orphans.is_empty() {
            return;
        }
        if let Err(e) = raft.read_index().await {
            tracing::debug!(error = %e, "adoption postponed: the store is not readable");
            return;
        }
        let mut adopted = 0;
        for (client_id, claim) in orphans {
            if self.sessions.contains_key(client_id.as_str()) {
                // A client connected here meanwhile: its attach claims the id itself.
                continue;
            }
            let state = raft.data().sessions.load(&client_id).await.ok().flatten();
            let Some(state) = state else {
                // A transient session died with its node: only the client id goes.
                let _ = self.registry.release(&client_id, claim.epoch).await;
                continue;
            };
            match self.adopt(&client_id, state, claim.epoch).await {
                Ok(true) => adopted += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(client_id = %Printable(&client_id), error = %e, "could not adopt a session whose node is gone");
                }
            }
        }
        if adopted > 0 {
            self.stats.adopted.fetch_add(adopted as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(sessions = adopted, "adopted the persistent sessions of nodes that are gone");
        }
    }

    /// Adopts one session, in the order that loses nothing when its node was only cut off
    /// and still appends: its routes here first (the slot, restored from what was read,
    /// refuses deliveries meanwhile), then the claim that fences the old owner, then the
    /// session read again, with everything the old owner stored before the claim. The old
    /// owner lets go only once it sees the claim, when these routes are already in place,
    /// so no message finds neither (the fault suite's F4 at scale 10 caught one that did).
    async fn adopt(
        self: &Arc<Self>,
        client_id: &str,
        state: raftmq_cluster::session::SessionState,
        above: raftmq_cluster::registry::Epoch,
    ) -> Result<bool, raftmq_cluster::StoreError> {
        let Some(slot) = self.vacant_slot(client_id) else { return Ok(false) };
        slot.set_claiming(true);
        let subscriptions = state.subscriptions.clone();
        slot.restore(state, true);
        self.route_restored(&slot, &subscriptions).await;
        let fresh = match self.registry.claim(client_id, self.node_id, above).await {
            Ok(epoch) => self.load_stored(client_id, true).await.map(|s| s.map(|s| (s, epoch))),
            Err(e) => Err(e),
        };
        match fresh {
            Ok(Some((mut state, epoch))) => {
                state.epoch = epoch;
                self.recover_into(&slot, state);
                slot.set_claiming(false);
                Ok(true)
            }
            Ok(None) => {
                self.abandon(&slot);
                Ok(false)
            }
            Err(e) => {
                self.abandon(&slot);
                Err(e)
            }
        }
    }
}
