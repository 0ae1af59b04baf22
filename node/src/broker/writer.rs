//! Session operations a connection hands to the store without waiting: inbound QoS 2 ids
//! received and released, expiry changes. A bounded queue feeds one task that applies them
//! in order, in batches, with [`SessionStore::apply`](raftmq_cluster::session::SessionStore::apply).
//! A full queue never blocks the connection: the operation is dropped and counted, and the
//! session's whole state still reaches the store when its client disconnects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use raftmq_cluster::session::SessionStore;
use raftmq_cluster::session_ops::SessionCommand;
use tokio::sync::mpsc;

/// Operations one batch applies at most.
const BATCH: usize = 256;

/// The sending side, held by the broker.
#[derive(Debug)]
pub struct StoreWriter {
    tx: mpsc::Sender<SessionCommand>,
    /// Operations dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl StoreWriter {
    /// A writer with room for `capacity` operations; its task runs until the broker (the
    /// last sender) is gone.
    pub fn start(store: Arc<dyn SessionStore>, capacity: usize) -> StoreWriter {
        let (tx, mut rx) = mpsc::channel::<SessionCommand>(capacity.max(1));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                if let Err(e) = store.apply(std::mem::take(&mut batch)).await {
                    tracing::warn!(error = %e, "session operations not stored");
                }
            }
        });
        StoreWriter { tx, dropped: AtomicU64::new(0) }
    }

    /// Queues an operation; never waits.
    pub fn submit(&self, cmd: SessionCommand) {
        if self.tx.try_send(cmd).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
