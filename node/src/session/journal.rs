//! The session journal: how a persistent session's changes reach the session store.
//!
//! A slot changes its own state and hands the matching [`SessionOp`] to the journal in the
//! same critical section, so the store sees each session's operations in exactly the order
//! the slot applied them. One task drains the journal in batches into
//! [`SessionStore::submit`] (in order, several batches on their way at once) and another
//! resolves them in the same order; an operation that must be durable before the client
//! hears of it (a subscription, a message a publisher is about to be acknowledged for)
//! carries a [`Pending`] its caller awaits.
//!
//! Backpressure: the queue is bounded. Connection tasks never wait on it (`try_send`);
//! when it is full the operation is lost, counted, and the slot marks itself out of step,
//! so the next awaited write sends the whole session instead ([`SessionOp::Reset`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use raftmq_cluster::session::{SessionStore, Submitted};
use raftmq_cluster::session_ops::{Applied, OpError, SessionCommand};
use raftmq_cluster::StoreError;
use tokio::sync::{mpsc, oneshot};

/// Operations one batch applies at most.
const BATCH: usize = 1024;

/// Batches submitted to the store and not yet resolved at most.
const IN_FLIGHT: usize = 16;

/// What the store made of one operation.
pub type Outcome = Result<Result<Applied, OpError>, StoreError>;

/// One queued operation; `cmd: None` is a barrier (resolves once everything before it is
/// applied).
#[derive(Debug)]
struct Entry {
    cmd: Option<SessionCommand>,
    done: Option<oneshot::Sender<Outcome>>,
    mark: Option<Mark>,
}

/// What a stored append tells its slot: every delivery up to `seq` is in the store (a
/// slot's operations apply in order), so a QoS 2 one may go out (see
/// `SessionSlot::stored_seq`).
#[derive(Debug)]
pub struct Mark {
    /// The slot's highest stored sequence number.
    pub stored: Arc<AtomicU64>,
    /// This append's sequence number.
    pub seq: u64,
    /// The slot's connection, woken to send what waited.
    pub wake: Arc<tokio::sync::Notify>,
}

impl Mark {
    fn reached(&self) {
        raise(&self.stored, self.seq, &self.wake);
    }
}

/// Raises a slot's stored sequence number to `seq`, waking its connection if that let
/// anything go out.
pub(crate) fn raise(stored: &AtomicU64, seq: u64, wake: &tokio::sync::Notify) {
    if stored.fetch_max(seq, Ordering::AcqRel) < seq {
        wake.notify_one();
    }
}

/// The sending side, shared by the broker and every slot.
#[derive(Debug)]
pub struct Journal {
    tx: mpsc::Sender<Entry>,
    lost: AtomicU64,
    /// Operations queued and not yet applied (shared with the writer task).
    unapplied: Arc<AtomicUsize>,
}

/// An operation on its way to the store; await [`Pending::wait`] for its outcome.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Outcome>);

impl Pending {
    /// The store's outcome (a writer that went away is an unavailable store).
    pub async fn wait(self) -> Outcome {
        self.0.await.unwrap_or_else(|_| Err(StoreError::Unavailable("session journal stopped".into())))
    }
}

/// Room reserved in the journal, to fill under a slot's lock without waiting.
#[derive(Debug)]
pub struct Reserved<'a> {
    permits: mpsc::PermitIterator<'a, Entry>,
    unapplied: &'a AtomicUsize,
}

impl Reserved<'_> {
    /// Queues `cmd` in reserved room; `None` if all the reserved room is used.
    pub fn submit(&mut self, cmd: SessionCommand) -> Option<Pending> {
        let permit = self.permits.next()?;
        self.unapplied.fetch_add(1, Ordering::AcqRel);
        let (done, rx) = oneshot::channel();
        permit.send(Entry { cmd: Some(cmd), done: Some(done), mark: None });
        Some(Pending(rx))
    }
}

impl Journal {
    /// A journal with room for `capacity` operations and its writer task, which runs
    /// until the last sender is gone. Call within a tokio runtime.
    pub fn start(store: Arc<dyn SessionStore>, capacity: usize) -> Arc<Journal> {
        let (tx, mut rx) = mpsc::channel::<Entry>(capacity.max(1));
        let unapplied = Arc::new(AtomicUsize::new(0));
        let applied_count = Arc::clone(&unapplied);
        // The writer submits batch after batch (the store keeps their order); a second task
        // resolves them in that order as their outcomes arrive, so several batches are on
        // their way at once (a Raft leader commits them together).
        let (submitted_tx, mut submitted) = mpsc::channel::<(Vec<Entry>, Option<Submitted>)>(IN_FLIGHT);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let entries = std::mem::take(&mut batch);
                let cmds: Vec<SessionCommand> = entries.iter().filter_map(|e| e.cmd.clone()).collect();
                let outcome = if cmds.is_empty() {
                    None
                } else {
                    match store.submit(cmds).await {
                        Ok(future) => Some(future),
                        Err(e) => Some(Box::pin(std::future::ready(Err(e))) as Submitted),
                    }
                };
                if submitted_tx.send((entries, outcome)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some((entries, outcome)) = submitted.recv().await {
                let result = match outcome {
                    Some(future) => future.await,
                    None => Ok(Vec::new()),
                };
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "session operations not stored");
                }
                let mut outcomes = result.as_ref().map(|o| o.iter().cloned());
                for entry in entries {
                    let outcome = match (&entry.cmd, &mut outcomes) {
                        (None, _) => Ok(Ok(Applied::default())),
                        (Some(_), Ok(o)) => Ok(o.next().unwrap_or(Err(OpError::NoSession))),
                        (Some(_), Err(e)) => Err(e.clone()),
                    };
                    if entry.cmd.is_some() {
                        applied_count.fetch_sub(1, Ordering::AcqRel);
                    }
                    if let (Some(mark), Ok(Ok(_))) = (&entry.mark, &outcome) {
                        mark.reached();
                    }
                    if let Some(done) = entry.done {
                        let _ = done.send(outcome);
                    }
                }
            }
        });
        Arc::new(Journal { tx, lost: AtomicU64::new(0), unapplied })
    }

    /// A journal that stores nothing (every operation is lost): for slots in tests.
    pub fn detached() -> Arc<Journal> {
        let (tx, _) = mpsc::channel(1);
        Arc::new(Journal { tx, lost: AtomicU64::new(0), unapplied: Arc::new(AtomicUsize::new(0)) })
    }

    /// Queues an operation without waiting; false (and counted) if there was no room.
    pub fn try_submit(&self, cmd: SessionCommand) -> bool {
        self.unapplied.fetch_add(1, Ordering::AcqRel);
        let sent = self.tx.try_send(Entry { cmd: Some(cmd), done: None, mark: None }).is_ok();
        if !sent {
            self.unapplied.fetch_sub(1, Ordering::AcqRel);
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Queues an operation whose outcome the caller will await, without waiting for room;
    /// `None` (and counted) if there was none.
    pub fn try_submit_pending(&self, cmd: SessionCommand, mark: Option<Mark>) -> Option<Pending> {
        let (done, rx) = oneshot::channel();
        self.unapplied.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(Entry { cmd: Some(cmd), done: Some(done), mark }) {
            Ok(()) => Some(Pending(rx)),
            Err(_) => {
                self.unapplied.fetch_sub(1, Ordering::AcqRel);
                self.lost.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Waits for room for `n` operations.
    pub async fn reserve(&self, n: usize) -> Result<Reserved<'_>, StoreError> {
        let permits = self.tx.reserve_many(n).await.map_err(|_| StoreError::Unavailable("session journal stopped".into()))?;
        Ok(Reserved { permits, unapplied: &self.unapplied })
    }

    /// Writes operations that belong to no slot (a removal, a claim of a stored session)
    /// and waits for their outcomes.
    pub async fn write(&self, cmds: Vec<SessionCommand>) -> Result<Vec<Result<Applied, OpError>>, StoreError> {
        let mut reserved = self.reserve(cmds.len()).await?;
        let pending: Vec<Pending> = cmds.into_iter().filter_map(|c| reserved.submit(c)).collect();
        let mut outcomes = Vec::with_capacity(pending.len());
        for p in pending {
            outcomes.push(p.wait().await?);
        }
        Ok(outcomes)
    }

    /// Resolves once every operation queued before it has been applied, so a read of the
    /// store sees them (at once when none is waiting).
    pub async fn flush(&self) -> Result<(), StoreError> {
        if self.unapplied.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Entry { cmd: None, done: Some(done), mark: None })
            .await
            .map_err(|_| StoreError::Unavailable("session journal stopped".into()))?;
        Pending(rx).wait().await.map(|_| ())
    }

    /// Whether an operation would find room now.
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Operations lost because the journal was full.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use raftmq_cluster::message::{Message, QoS};
    use raftmq_cluster::session::{DropPolicy, MemorySessionStore, QueueLimits, QueuedMessage, SubscriptionOptions};

    use super::*;
    use crate::security::{Identity, Owner};
    use crate::session::{Attach, ConnHandle, ConnInfo, Durability, SessionSlot};

    fn delivery(n: u8) -> QueuedMessage {
        let message = Message::new(format!("t/{n}"), vec![n].into(), QoS::AtLeastOnce, false, "p".into());
        QueuedMessage {
            message: Arc::new(message),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
            seq: 0,
            origin: None,
        }
    }

    /// Operations lost to a full journal are not lost to the store: the slot falls out of
    /// step, and its next durable write is the whole session, after which the store holds
    /// exactly what the slot holds.
    #[tokio::test]
    async fn a_slot_out_of_step_sends_its_whole_session_and_the_store_catches_up() -> Result<(), StoreError> {
        let store = Arc::new(MemorySessionStore::new());
        let journal = Journal::start(Arc::clone(&store) as Arc<dyn SessionStore>, 2);
        let slot = SessionSlot::new(Arc::from("c"), Arc::clone(&journal));
        let owner = Arc::new(Owner { identity: Identity::default(), peer: SocketAddr::from(([127, 0, 0, 1], 1)) });
        let conn = ConnHandle::new(1, ConnInfo::default());
        slot.attach(Attach { conn, epoch: 1, expiry_secs: 60, owner, clean: true }).await?;
        slot.subscribe("t/#", SubscriptionOptions::default()).await?;
        // The writer task cannot run while this test does not yield: the journal fills.
        let limits = QueueLimits { max_len: 100, max_bytes: 1 << 20, policy: DropPolicy::DropOldest };
        let mut resync = false;
        for n in 0..10 {
            let offered = slot.offer(delivery(n), limits, false, u64::MAX);
            resync |= matches!(offered.durability, Durability::Resync);
        }
        assert!(resync, "a full journal puts the slot out of step");
        assert!(journal.lost() > 0);
        slot.resync().await?;
        journal.flush().await?;
        let stored = store.load("c").await?;
        assert_eq!(stored, Some(slot.snapshot()));
        assert_eq!(slot.snapshot().queue.len(), 10);
        Ok(())
    }
}
