//! A node that held a session another node has claimed since lets go of it. The live
//! takeover (the claiming node asks this one) covers a node that answers; this covers one
//! that did not (paused, cut off): as soon as it applies the claim from the log, it
//! disconnects the client it still had (MQTT 5: 0x8E Session taken over) and drops its
//! copy of the session without writing anything (the store fences its writes anyway).

use std::sync::Arc;
use std::time::Duration;

use raftmq_cluster::raft::ClaimApplied;
use tokio::sync::broadcast::error::RecvError;

use super::Broker;
use crate::session::SessionSlot;
use crate::telemetry::printable::Printable;

/// How often every local session is compared with the registry as well (a snapshot
/// installed from the leader carries claims no event announced).
const SWEEP: Duration = Duration::from_secs(2);

impl Broker {
    /// Starts watching claims (a node in a cluster only).
    pub(crate) fn spawn_fence_watch(self: &Arc<Self>) {
        let Some(raft) = self.raft.get() else { return };
        let mut claims = raft.data().claims();
        let broker = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let mut sweep = tokio::time::interval(SWEEP);
            loop {
                let event = tokio::select! {
                    e = claims.recv() => Some(e),
                    _ = sweep.tick() => None,
                    _ = shutdown.cancelled() => return,
                };
                let Some(broker) = broker.upgrade() else { return };
                match event {
                    Some(Ok(ClaimApplied { client_id, node, epoch })) => {
                        if node != broker.node_id {
                            broker.let_go_if_older(&client_id, epoch).await;
                        }
                    }
                    Some(Err(RecvError::Closed)) => return,
                    Some(Err(RecvError::Lagged(_))) | None => broker.let_go_of_claimed().await,
                }
            }
        });
    }

    /// Compares every local session with the registry.
    async fn let_go_of_claimed(&self) {
        let held: Vec<(Arc<str>, u64)> = self.sessions.iter().map(|s| (Arc::clone(s.key()), s.value().epoch())).collect();
        for (client_id, epoch) in held {
            if epoch == 0 {
                continue;
            }
            if let Some(claim) = self.registry.current(&client_id).filter(|c| c.node != self.node_id && c.epoch > epoch) {
                self.let_go_if_older(&client_id, claim.epoch).await;
            }
        }
    }

    /// Drops the local session of `client_id` if it is of an epoch older than `epoch`.
    async fn let_go_if_older(&self, client_id: &str, epoch: u64) {
        let Some(slot) = self.slot(client_id) else { return };
        let _guard = slot.connect_lock.lock().await;
        let held = slot.epoch();
        if slot.is_removed() || held == 0 || held >= epoch {
            return;
        }
        tracing::info!(client_id = %Printable(client_id), held, epoch, "the session was claimed by another node: letting go");
        self.take_over(&slot, crate::codec::reason::SESSION_TAKEN_OVER).await;
        self.drop_claimed(&slot);
    }

    /// Forgets a session another node owns now: routes and the local copy go; nothing is
    /// written (the store belongs to the new owner) and no will is published here.
    fn drop_claimed(&self, slot: &Arc<SessionSlot>) {
        let discarded = slot.discard();
        for filter in discarded.filters {
            self.index_unsubscribe(slot, &filter);
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
    }
}
