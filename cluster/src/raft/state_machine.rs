//! The replicated state machine: persistent sessions, retained messages and the client
//! registry, held in memory (the same stores a lone node used before) and rebuilt at start
//! from the last snapshot plus the committed log.
//!
//! Architecture invariant: apply is deterministic. It reads only the entry and the state:
//! timestamps, epochs, node ids and caps travel in the operations, set by the proposer.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use prost::Message as _;
use raftmq_proto::v1 as pb;
use tokio::sync::{watch, Mutex};

use super::log_store::{open, seal};
use super::ops::{decode_tagged_batch, Reply, StoreOp, Tag};
use super::{Entry, Node, NodeId, TypeConfig};
use crate::convert::ConvertError;
use crate::message::Message;
use crate::registry::{Claim, ClientRegistry, MemoryRegistry};
use crate::retained::{MemoryRetainedStore, RetainedLimits};
use crate::session::{MemorySessionStore, SessionState, SessionStore};

const SNAPSHOT_META: &[u8] = b"meta";
const SNAPSHOT_DATA: &[u8] = b"data";

/// The state every node holds alike, readable by the broker at any time.
#[derive(Debug)]
pub struct Replicated {
    /// Persistent sessions.
    pub sessions: MemorySessionStore,
    /// Retained messages.
    pub retained: MemoryRetainedStore,
    /// Client id -> owner node and epoch.
    pub registry: MemoryRegistry,
    /// Index of the last applied entry: reads wait here for what they must see.
    applied: watch::Sender<u64>,
    /// Every claim applied (a node holding a session of an older epoch must let go).
    claims: tokio::sync::broadcast::Sender<ClaimApplied>,
    /// This node's id (batches it proposed are noted in `own`).
    local: std::sync::OnceLock<NodeId>,
    /// Outcomes of the last batches this node proposed, by number: a proposer that lost
    /// its leader's answer looks here once the new leader's term is applied.
    own: std::sync::Mutex<std::collections::VecDeque<(u64, Vec<Reply>)>>,
}

/// Outcomes of this node's own batches kept (the proposer asks about its latest only).
const OWN_KEPT: usize = 64;

/// A claim the log applied: `node` owns `client_id` under `epoch` from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimApplied {
    /// The client id.
    pub client_id: String,
    /// Its owner now.
    pub node: NodeId,
    /// The new epoch.
    pub epoch: crate::registry::Epoch,
}

/// Claims waiting for a slow watcher at most (one that lags compares everything instead).
const CLAIM_EVENTS: usize = 4096;

impl Replicated {
    fn new() -> Replicated {
        let unbounded = RetainedLimits { max_messages: usize::MAX, max_bytes: usize::MAX, max_payload: usize::MAX };
        Replicated {
            sessions: MemorySessionStore::new(),
            retained: MemoryRetainedStore::new(unbounded),
            registry: MemoryRegistry::new(),
            applied: watch::Sender::new(0),
            claims: tokio::sync::broadcast::Sender::new(CLAIM_EVENTS),
            local: std::sync::OnceLock::new(),
            own: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Sets this node's id (once, at start).
    pub(crate) fn set_local(&self, id: NodeId) {
        let _ = self.local.set(id);
    }

    fn note_own(&self, tag: Tag, replies: &[Reply]) {
        if tag.seq == 0 || self.local.get() != Some(&tag.proposer) {
            return;
        }
        if let Ok(mut own) = self.own.lock() {
            if own.len() == OWN_KEPT {
                own.pop_front();
            }
            own.push_back((tag.seq, replies.to_vec()));
        }
    }

    /// The outcomes of this node's batch `seq`, if it was applied (and is recent).
    pub(crate) fn own_outcome(&self, seq: u64) -> Option<Vec<Reply>> {
        self.own.lock().ok()?.iter().find(|(s, _)| *s == seq).map(|(_, r)| r.clone())
    }

    /// Claims applied from now on.
    pub fn claims(&self) -> tokio::sync::broadcast::Receiver<ClaimApplied> {
        self.claims.subscribe()
    }

    /// Waits until the entry at `index` has been applied here.
    pub async fn applied_up_to(&self, index: u64) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|applied| *applied >= index).await;
    }

    /// The applied index, to watch.
    pub(crate) fn applied_changes(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    async fn apply_op(&self, op: StoreOp) -> Reply {
        match op {
            // The registry fences too: once another node claimed the client id, an
            // operation of the old owner's epoch is refused even before the new owner's
            // first session operation lands (a paused or partitioned owner writes nothing).
            StoreOp::Session(cmd) => match self.registry.current(&cmd.client_id).filter(|c| c.epoch > cmd.epoch) {
                Some(claim) => Reply::Fenced { command: cmd.epoch, session: claim.epoch },
                None => match self.sessions.apply(vec![cmd]).await {
                    Ok(mut outcomes) => outcomes.pop().map_or(Reply::Invalid, Reply::from),
                    Err(_) => Reply::Invalid,
                },
            },
            StoreOp::Retain { message, limits } => {
                // Copied out of the entry's buffer, so a kept message does not pin a batch.
                let mut owned = Message::clone(&message);
                owned.payload = bytes::Bytes::copy_from_slice(&message.payload);
                self.retained.set_within(Arc::new(owned), limits).map_or(Reply::Invalid, Reply::retained)
            }
            StoreOp::Claim { client_id, node, above } => match self.registry.claim(&client_id, node, above).await {
                Ok(epoch) => {
                    if self.claims.receiver_count() > 0 {
                        let _ = self.claims.send(ClaimApplied { client_id, node, epoch });
                    }
                    Reply::Claimed(epoch)
                }
                Err(_) => Reply::Invalid,
            },
            StoreOp::Release { client_id, epoch } => self.registry.release(&client_id, epoch).await.map_or(Reply::Invalid, Reply::Released),
        }
    }

    fn export(&self) -> pb::StoreSnapshot {
        let (claims, next_epoch) = self.registry.export();
        pb::StoreSnapshot {
            sessions: self.sessions.export().iter().map(pb::Session::from).collect(),
            retained: self.retained.export().iter().map(|m| pb::Message::from(m.as_ref())).collect(),
            registry: claims.into_iter().map(|(client_id, c)| pb::RegistryEntry { client_id, node: c.node, epoch: c.epoch }).collect(),
            next_epoch,
        }
    }

    fn import(&self, snapshot: pb::StoreSnapshot) -> Result<(), ConvertError> {
        let sessions = snapshot.sessions.into_iter().map(SessionState::try_from).collect::<Result<Vec<_>, _>>()?;
        let retained = snapshot.retained.into_iter().map(|m| Message::try_from(m).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        let claims = snapshot.registry.into_iter().map(|e| (e.client_id, Claim { node: e.node, epoch: e.epoch })).collect();
        self.sessions.replace_all(sessions);
        self.retained.replace_all(retained).map_err(|_| ConvertError::Missing("a usable retained index"))?;
        self.registry.replace_all(claims, snapshot.next_epoch).map_err(|_| ConvertError::Missing("a usable registry"))?;
        Ok(())
    }
}

/// A snapshot as kept in sled: its meta and the encoded `StoreSnapshot`.
type StoredSnapshot = (SnapshotMeta<NodeId, Node>, Vec<u8>);

/// What apply has reached.
#[derive(Debug, Default)]
struct Applied {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

/// openraft's view of [`Replicated`] (cheap to clone: every clone is the same machine).
#[derive(Debug, Clone)]
pub struct StateMachine {
    data: Arc<Replicated>,
    /// Held while applying and while exporting a snapshot, so a snapshot is the state after
    /// exactly its `last_log_id`.
    applied: Arc<Mutex<Applied>>,
    snapshots: sled::Tree,
    built: Arc<AtomicU64>,
    /// How long building snapshots took.
    build_times: Arc<crate::histogram::Histogram>,
}

fn sm_error(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::StateMachine, verb, AnyError::new(&e)).into()
}

fn snapshot_error(verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::new(&e)).into()
}

/// A snapshot on disk that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The sled tree failed.
    #[error("snapshot store: {0}")]
    Sled(#[from] sled::Error),
    /// A record failed its checksum or could not be decoded.
    #[error("snapshot record: {0}")]
    Record(#[from] super::log_store::RecordError),
    /// The snapshot's content is not what this version writes.
    #[error("snapshot content: {0}")]
    Content(String),
}

impl StateMachine {
    /// The state machine of `db`, loaded from its last snapshot (the log entries after it
    /// are applied again by openraft at start).
    pub fn open(db: &sled::Db) -> Result<StateMachine, SnapshotError> {
        let sm = StateMachine {
            data: Arc::new(Replicated::new()),
            applied: Arc::new(Mutex::new(Applied::default())),
            snapshots: db.open_tree("snapshot")?,
            built: Arc::new(AtomicU64::new(0)),
            build_times: Arc::default(),
        };
        if let Some((meta, data)) = sm.stored()? {
            let snapshot = pb::StoreSnapshot::decode(data.as_slice()).map_err(|e| SnapshotError::Content(e.to_string()))?;
            sm.data.import(snapshot).map_err(|e| SnapshotError::Content(e.to_string()))?;
            sm.data.applied.send_replace(meta.last_log_id.map_or(0, |l| l.index));
            let mut applied = sm.applied.try_lock().map_err(|e| SnapshotError::Content(e.to_string()))?;
            applied.last = meta.last_log_id;
            applied.membership = meta.last_membership;
        }
        Ok(sm)
    }

    /// The replicated data.
    pub fn data(&self) -> Arc<Replicated> {
        Arc::clone(&self.data)
    }

    /// How long building snapshots took ([`crate::histogram::Histogram::read`]).
    pub fn build_times(&self) -> ([u64; crate::histogram::BOUNDS_US.len() + 1], u64) {
        self.build_times.read()
    }

    /// Number of snapshots built since start (the snapshot counter).
    pub fn snapshots_built(&self) -> u64 {
        self.built.load(Ordering::Relaxed)
    }

    fn stored(&self) -> Result<Option<StoredSnapshot>, SnapshotError> {
        let (Some(meta), Some(data)) = (self.snapshots.get(SNAPSHOT_META)?, self.snapshots.get(SNAPSHOT_DATA)?) else {
            return Ok(None);
        };
        let meta: SnapshotMeta<NodeId, Node> = open(&meta)?;
        let data: Vec<u8> = open(&data)?;
        Ok(Some((meta, data)))
    }

    async fn store(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META, seal(meta).map_err(|e| snapshot_error(ErrorVerb::Write, e))?);
        batch.insert(SNAPSHOT_DATA, seal(&data).map_err(|e| snapshot_error(ErrorVerb::Write, e))?);
        self.snapshots.apply_batch(batch).map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        self.snapshots.flush_async().await.map_err(|e| snapshot_error(ErrorVerb::Write, e))?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let started = std::time::Instant::now();
        let (meta, data) = {
            let applied = self.applied.lock().await;
            let data = self.data.export().encode_to_vec();
            let n = self.built.fetch_add(1, Ordering::Relaxed) + 1;
            let id = match applied.last {
                Some(last) => format!("{}-{}-{n}", last.leader_id, last.index),
                None => format!("--{n}"),
            };
            (SnapshotMeta { last_log_id: applied.last, last_membership: applied.membership.clone(), snapshot_id: id }, data)
        };
        self.store(&meta, &data).await?;
        self.build_times.record_duration(started.elapsed());
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let applied = self.applied.lock().await;
        Ok((applied.last, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Reply>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut applied = self.applied.lock().await;
        let mut replies = Vec::new();
        for entry in entries {
            applied.last = Some(entry.log_id);
            let mut out = Vec::new();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => {
                    let (tag, ops) = decode_tagged_batch(&command.batch);
                    for op in ops {
                        out.push(match op {
                            Ok(op) => self.data.apply_op(op).await,
                            Err(e) => {
                                tracing::error!(index = entry.log_id.index, error = %e, "undecodable store operation skipped");
                                Reply::Invalid
                            }
                        });
                    }
                    self.data.note_own(tag, &out);
                }
                EntryPayload::Membership(m) => applied.membership = StoredMembership::new(Some(entry.log_id), m),
            }
            self.data.applied.send_replace(entry.log_id.index);
            replies.push(out);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let decoded = pb::StoreSnapshot::decode(data.as_slice()).map_err(|e| snapshot_error(ErrorVerb::Read, e))?;
        {
            let mut applied = self.applied.lock().await;
            self.data.import(decoded).map_err(|e| sm_error(ErrorVerb::Write, e))?;
            applied.last = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            self.data.applied.send_replace(meta.last_log_id.map_or(0, |l| l.index));
        }
        self.store(meta, &data).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        match self.stored() {
            Ok(Some((meta, data))) => Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })),
            Ok(None) => Ok(None),
            Err(e) => Err(snapshot_error(ErrorVerb::Read, e)),
        }
    }
}
