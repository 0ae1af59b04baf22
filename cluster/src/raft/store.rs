//! [`RaftStore`]: the Raft group on this node's data directory, the writer that batches
//! operations into log entries, and the broker's store traits over it (sessions, retained
//! messages, client registry: reads from the applied state, writes through the log).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, Raft, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot};

use super::leader::{CallFailure, LeaderLink, Proposed};
use super::membership::Formation;
use super::network::Network;
use super::ops::{encode_tagged_batch, Reply, StoreOp, Tag};
use super::{Command, LogStore, Node, NodeId, Replicated, StateMachine, TypeConfig};
use crate::message::Message;
use crate::registry::{Claim, ClientRegistry, Epoch};
use crate::retained::{RetainOutcome, RetainedLimits, RetainedStore};
use crate::session::{SessionState, SessionStore};
use crate::session_ops::{Applied, OpError, SessionCommand};
use crate::StoreError;

/// Where and how this node keeps the replicated store.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// The data directory (the store lives in `raft/` inside it).
    pub data_dir: PathBuf,
    /// This node's id ([`crate::stable_hash`] of its name).
    pub node_id: NodeId,
    /// This node's name (checked against the data directory's owner).
    pub node_name: String,
    /// The address peers reach this node's cluster listener at.
    pub address: String,
    /// Entries applied between snapshots.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot (for peers slightly behind).
    pub keep_behind_snapshot: u64,
    /// Most operations in one log entry.
    pub max_batch: usize,
    /// Operations waiting for the writer at most (beyond, writers wait: backpressure).
    pub queue: usize,
    /// Raft heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout range, lower bound (the upper is twice it).
    pub election_timeout: Duration,
    /// Caps of retained messages this node proposes.
    pub retained: RetainedLimits,
    /// How a clustered node forms or joins the cluster's group; `None`: a group of one.
    pub formation: Option<Formation>,
    /// How long a write may wait for a leader (an election, a leader to be found).
    pub write_timeout: Duration,
}

/// Why the store could not start: each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RaftStartError {
    /// The directory cannot be created or opened (permissions, a full disk, another
    /// process using it).
    #[error("data directory {dir}: {source} (is another raftmq using it? check its permissions and free space, or pass --data-dir)")]
    Open {
        /// The directory.
        dir: String,
        /// What sled said.
        source: sled::Error,
    },
    /// The directory belongs to another node.
    #[error("data directory {dir} belongs to node {owner:?}, not {name:?}: start with --node-name {owner} or use another --data-dir")]
    Foreign {
        /// The directory.
        dir: String,
        /// The node that wrote it.
        owner: String,
        /// This node's name.
        name: String,
    },
    /// A record failed its checksum or could not be read.
    #[error("data directory {dir} is corrupt ({detail}): restore it from a backup, or move it away to start empty (a cluster member then catches up from its peers)")]
    Corrupt {
        /// The directory.
        dir: String,
        /// What failed.
        detail: String,
    },
    /// openraft refused to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// A batch of operations waiting for its entry.
struct Proposal {
    ops: Vec<StoreOp>,
    done: oneshot::Sender<Result<Vec<Reply>, StoreError>>,
}

/// The replicated store of this node.
pub struct RaftStore {
    raft: Raft<TypeConfig>,
    data: Arc<Replicated>,
    writer: mpsc::Sender<Proposal>,
    /// Handles for [`RaftStore::view`]; dropped at shutdown so the data directory's lock
    /// goes with the group (a restart in the same process can open it again).
    handles: std::sync::Mutex<Option<(LogStore, StateMachine)>>,
    config: RaftConfig,
    stats: Arc<WriterStats>,
    link: Arc<LeaderLink>,
    /// The last committed index this node knows of (kept by the log store).
    committed: Arc<AtomicU64>,
    /// Since when this node leads, and in which term (see [`RaftStore::hand_over`]).
    leading_since: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>,
}

/// What the writer did since start.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Log entries proposed.
    pub entries: AtomicU64,
    /// Operations in them.
    pub ops: AtomicU64,
    /// Proposals that failed.
    pub errors: AtomicU64,
    /// From proposing an entry to its being applied here.
    pub latency: crate::histogram::Histogram,
}

impl std::fmt::Debug for RaftStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStore").field("node", &self.config.node_name).field("dir", &self.config.data_dir).finish()
    }
}

/// What `GET /api/v1/cluster` and the metrics show of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    /// Leader, follower, candidate or learner.
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// The leader's id, if known.
    pub leader: Option<NodeId>,
    /// Index of the last entry in the log.
    pub last_log_index: u64,
    /// Index of the last entry known committed (0 until openraft reports one).
    pub committed_index: u64,
    /// Index of the last applied entry.
    pub applied_index: u64,
    /// Entries held in the log.
    pub log_entries: usize,
    /// Snapshots built since start.
    pub snapshots: u64,
    /// Index the last snapshot covers.
    pub snapshot_index: u64,
    /// Voters of the group.
    pub voters: Vec<NodeId>,
    /// Learners of the group (replicated to, not voting).
    pub learners: Vec<NodeId>,
    /// Per member, the last log index the leader knows it holds (on the leader only).
    pub matched: BTreeMap<NodeId, u64>,
    /// Log entries this node's writer proposed.
    pub proposals: u64,
    /// Operations in them.
    pub proposed_ops: u64,
    /// Proposals that failed.
    pub proposal_errors: u64,
    /// Proposal latency ([`crate::histogram::Histogram::read`]).
    pub proposal_latency: ([u64; crate::histogram::BOUNDS_US.len() + 1], u64),
    /// Snapshot build times ([`crate::histogram::Histogram::read`]).
    pub snapshot_build: ([u64; crate::histogram::BOUNDS_US.len() + 1], u64),
}

impl RaftStore {
    /// Opens (or creates) the store in `config.data_dir` and starts the group: a node whose
    /// group was never initialized becomes a group of one.
    pub async fn open(mut config: RaftConfig, mesh: Option<&crate::mesh::Mesh>) -> Result<Arc<RaftStore>, RaftStartError> {
        let dir = config.data_dir.join("raft");
        let shown = dir.display().to_string();
        let open_err = |source| RaftStartError::Open { dir: shown.clone(), source };
        std::fs::create_dir_all(&dir).map_err(|e| open_err(sled::Error::Io(e)))?;
        let db = sled::Config::new().path(&dir).open().map_err(open_err)?;
        let owner = db.open_tree("identity").map_err(open_err)?;
        match owner.get(b"node_name").map_err(open_err)? {
            Some(name) if name.as_ref() != config.node_name.as_bytes() => {
                return Err(RaftStartError::Foreign {
                    dir: shown,
                    owner: String::from_utf8_lossy(&name).into_owned(),
                    name: config.node_name.clone(),
                });
            }
            Some(_) => {}
            None => {
                owner.insert(b"node_name", config.node_name.as_bytes()).map_err(open_err)?;
                db.flush_async().await.map_err(open_err)?;
            }
        }
        let log = LogStore::open(&db).map_err(open_err)?;
        let sm = StateMachine::open(&db).map_err(|e| RaftStartError::Corrupt { dir: shown.clone(), detail: e.to_string() })?;
        let data = sm.data();
        data.set_local(config.node_id);
        let raft_config = Config {
            cluster_name: "raftmq".into(),
            heartbeat_interval: config.heartbeat.as_millis() as u64,
            election_timeout_min: config.election_timeout.as_millis() as u64,
            election_timeout_max: 2 * config.election_timeout.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: config.keep_behind_snapshot,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate().map_err(|e| RaftStartError::Raft(e.to_string()))?);
        let network = Network { mesh: mesh.map(|m| m.shared()) };
        let raft = Raft::new(config.node_id, raft_config, network, log.clone(), sm.clone())
            .await
            .map_err(|e| RaftStartError::Corrupt { dir: shown.clone(), detail: e.to_string() })?;
        let clustered = config.formation.filter(|_| mesh.is_some());
        config.formation = clustered;
        if clustered.is_none() && !raft.is_initialized().await.map_err(|e| RaftStartError::Raft(e.to_string()))? {
            let members = BTreeMap::from([(config.node_id, Node { addr: config.address.clone() })]);
            raft.initialize(members).await.map_err(|e| RaftStartError::Raft(e.to_string()))?;
        }
        // One call to the leader may take two election timeouts at most: by then a paused
        // leader has been replaced and the writer asks the new one.
        let link = Arc::new(LeaderLink::new(mesh.map(|m| m.shared()), 2 * config.election_timeout));
        if let (Some(formation), Some(mesh)) = (clustered, mesh) {
            let task = super::membership::run(raft.clone(), mesh.shared(), Arc::clone(&link), formation, config.address.clone());
            tokio::spawn(task);
        }
        let (writer, proposals) = mpsc::channel(config.queue.max(1));
        let committed = log.committed_counter();
        let store = Arc::new(RaftStore {
            raft: raft.clone(),
            data,
            writer,
            handles: std::sync::Mutex::new(Some((log, sm))),
            config,
            stats: Arc::default(),
            link,
            committed,
            leading_since: Arc::default(),
        });
        tokio::spawn(watch_leadership(store.raft.clone(), store.config.node_id, Arc::clone(&store.leading_since)));
        if let Some(mesh) = mesh {
            mesh.set_raft(raft.clone(), Arc::clone(&store.data));
        }
        let submitter = Submitter {
            raft,
            link: Arc::clone(&store.link),
            data: Arc::clone(&store.data),
            me: store.config.node_id,
            timeout: store.config.write_timeout,
            seq: AtomicU64::new(0),
        };
        tokio::spawn(write_batches(submitter, proposals, store.config.max_batch.max(1), Arc::clone(&store.stats)));
        Ok(store)
    }

    /// Waits until the group has a leader (bounded): a node serves clients only once its
    /// writes can commit.
    pub async fn wait_for_leader(&self, bound: Duration) -> bool {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if metrics.borrow().current_leader.is_some() {
                return true;
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => return metrics.borrow().current_leader.is_some(),
            }
        }
    }

    /// Proposes `ops` (batched with others into one entry); resolves with their outcomes
    /// once the entry is committed and applied.
    pub async fn propose(&self, ops: Vec<StoreOp>) -> Result<Vec<Reply>, StoreError> {
        self.enqueue(ops).await?.await.map_err(|_| StoreError::Unavailable("the store stopped".into()))?
    }

    /// Queues `ops` for the writer behind everything queued before (entries commit in that
    /// order) and returns where their outcomes arrive.
    async fn enqueue(&self, ops: Vec<StoreOp>) -> Result<oneshot::Receiver<Result<Vec<Reply>, StoreError>>, StoreError> {
        let (done, answer) = oneshot::channel();
        if ops.is_empty() {
            let _ = done.send(Ok(Vec::new()));
            return Ok(answer);
        }
        self.writer.send(Proposal { ops, done }).await.map_err(|_| StoreError::Unavailable("the store stopped".into()))?;
        Ok(answer)
    }

    /// Waits until this node has applied every entry committed before the call (a read
    /// after it is linearizable: it sees every write acknowledged before). A node alone is
    /// always there.
    pub async fn read_index(&self) -> Result<(), StoreError> {
        if self.config.formation.is_none() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.config.write_timeout;
        linearize(&self.raft, &self.link, &self.data, self.config.node_id, deadline).await
    }

    /// Waits until this node has applied every entry it knows is committed (bounded by the
    /// write timeout; no round trip). A leader knows every commit; a follower learns of
    /// each with the leader's next message, sent at once after the commit.
    pub async fn catch_up(&self) {
        let committed = self.committed.load(Ordering::Relaxed);
        if self.data.applied_index() >= committed {
            return;
        }
        let _ = tokio::time::timeout(self.config.write_timeout, self.data.applied_up_to(committed)).await;
    }

    /// Removes `node` from the group (voter first, then member), through the leader.
    pub async fn remove_node(&self, node: NodeId) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.write_timeout;
        loop {
            let reply = match leader(&self.raft, &self.link, self.config.node_id, deadline).await? {
                Leader::Me => {
                    super::leader::serve_remove(&self.raft, node).await.map_err(|s| StoreError::Unavailable(s.message().to_owned()))?
                }
                Leader::Other(address, _) => match self.link.remove(&address, node).await {
                    Ok(reply) => reply,
                    // Removing twice is harmless: ask again.
                    Err(CallFailure::Unreachable(_) | CallFailure::TimedOut(_)) => Default::default(),
                    Err(e) => return Err(e.into()),
                },
            };
            if reply.removed {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Hands this node's leadership to another voter before it stops (SIGTERM), so the
    /// group does not wait out a lease and an election timeout for a successor. Picks the
    /// voter with the most of the log, waits until it holds all of it, and asks it to
    /// campaign; this node, leader for longer than the lease, grants the vote and steps
    /// down, which in a group of three is already a majority. Bounded by two election
    /// timeouts; returns the new leader. Does nothing on a follower or a group of one.
    pub async fn hand_over(&self) -> Option<NodeId> {
        let me = self.config.node_id;
        // A voter refuses to vote while its leader's lease (the longest election timeout)
        // runs, counted on the leader itself from its election: a leader elected just now
        // waits it out, or its successor's campaign would fail and cost a term.
        let lease = 2 * self.config.election_timeout;
        let since = self.leading_since.lock().ok().and_then(|s| *s).map(|(_, at)| at)?;
        let deadline = since.max(tokio::time::Instant::now()) + lease + 2 * self.config.election_timeout;
        tokio::time::sleep_until(since + lease + LEASE_MARGIN).await;
        let mut metrics = self.raft.metrics();
        let (successor, last_index) = loop {
            let picked = {
                let m = metrics.borrow_and_update();
                if m.current_leader != Some(me) {
                    return None;
                }
                let last = m.last_log_index.unwrap_or(0);
                let matched = |id: &NodeId| m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map_or(0, |l| l.index);
                let voters = m.membership_config.membership().voter_ids().filter(|v| *v != me);
                voters.map(|v| (matched(&v), v)).max().map(|(index, v)| (v, index >= last, last))
            };
            match picked {
                None => return None,
                Some((v, true, last)) => break (v, last),
                Some(_) => {}
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                tracing::warn!("no voter caught up in time; stopping without handing leadership over");
                return None;
            }
        };
        let address = self.link.member_address(&self.raft.metrics().borrow(), successor)?;
        // Once stepped down this node must not stand again (it is going).
        self.raft.runtime_config().elect(false);
        match self.link.campaign(&address, last_index).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(successor, "the successor does not hold the whole log; stopping without handing over");
                return None;
            }
            Err(e) => {
                tracing::warn!(successor, error = ?e, "could not ask a successor to take over");
                return None;
            }
        }
        loop {
            if let Some(leader) = metrics.borrow_and_update().current_leader.filter(|l| *l != me) {
                tracing::info!(leader, "leadership handed over");
                return Some(leader);
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                tracing::warn!(successor, "no successor took over in time");
                return None;
            }
        }
    }

    /// Whether the group has a leader this node knows of.
    pub fn has_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader.is_some()
    }

    /// Whether this node leads the group.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.node_id)
    }

    /// Whether this node runs in a cluster's group (not a group of one).
    pub fn clustered(&self) -> bool {
        self.config.formation.is_some()
    }

    /// The applied state.
    pub fn data(&self) -> &Arc<Replicated> {
        &self.data
    }

    /// The group as this node sees it.
    pub fn view(&self) -> RaftView {
        let m = self.raft.metrics().borrow().clone();
        let role = super::role_label(m.state);
        let applied_index = m.last_applied.map_or(0, |l| l.index);
        let handles = self.handles.lock().ok().and_then(|h| h.clone());
        RaftView {
            role,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index,
            committed_index: handles.as_ref().map_or(0, |(log, _)| log.committed_index()).max(applied_index),
            log_entries: handles.as_ref().map_or(0, |(log, _)| log.len()),
            snapshots: handles.as_ref().map_or(0, |(_, sm)| sm.snapshots_built()),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            matched: m.replication.iter().flatten().map(|(id, l)| (*id, l.map_or(0, |l| l.index))).collect(),
            proposals: self.stats.entries.load(Ordering::Relaxed),
            proposed_ops: self.stats.ops.load(Ordering::Relaxed),
            proposal_errors: self.stats.errors.load(Ordering::Relaxed),
            proposal_latency: self.stats.latency.read(),
            snapshot_build: handles.as_ref().map_or_else(Default::default, |(_, sm)| sm.build_times()),
        }
    }

    /// Resolves when the group stopped on its own, on an error it cannot go on from (the
    /// disk full or read-only, a record that cannot be written): the node must stop too
    /// (fail-stop, like etcd on a failed fsync), so that its peers treat it as gone
    /// instead of as a member that answers but stores nothing. Pending forever while the
    /// group runs or after an orderly [`RaftStore::shutdown`].
    pub async fn failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow_and_update().running_state {
                if !matches!(fatal, openraft::error::Fatal::Stopped) {
                    return fatal.to_string();
                }
            }
            if metrics.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stops the group (pending proposals fail) and closes the data directory.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Ok(mut handles) = self.handles.lock() {
            handles.take();
        }
    }

    /// The broker's store traits over this store.
    pub fn stores(self: &Arc<Self>) -> (Arc<dyn SessionStore>, Arc<dyn RetainedStore>, Arc<dyn ClientRegistry>) {
        let s = Arc::new(Stores(Arc::clone(self)));
        (s.clone(), s.clone(), s)
    }
}

/// Where this node's writes go: the local group when it leads, the leader over gRPC when
/// it follows. A write resolves once its entry is applied on this node too, so what a
/// client was told is written is what this node reads next.
struct Submitter {
    raft: Raft<TypeConfig>,
    link: Arc<LeaderLink>,
    data: Arc<Replicated>,
    me: NodeId,
    timeout: Duration,
    /// The number of the last batch this node proposed.
    seq: AtomicU64,
}

/// The leader as this node knows it.
enum Leader {
    Me,
    /// Its address, and the term this node knew it in.
    Other(String, u64),
}

/// Pause between attempts while the group has no usable leader (an election runs).
const RETRY: Duration = Duration::from_millis(50);

/// How a proposed entry goes on.
enum Started {
    /// Appended to this leader's log: the outcome arrives once it is committed and applied.
    Appending(oneshot::Receiver<openraft::raft::ClientWriteResult<TypeConfig>>),
    /// Handed to the leader (or failed): the outcome is known.
    Done(Result<Vec<Reply>, StoreError>),
}

impl Submitter {
    /// Proposes an entry. On the leader the entry is appended at once and the writer goes
    /// on with the next (the log keeps their order; the leader flushes many together); on
    /// a follower the entry goes to the leader and the writer waits for it (two calls in
    /// flight could overtake each other).
    async fn start(&self, batch: bytes::Bytes, seq: u64) -> Started {
        let deadline = tokio::time::Instant::now() + self.timeout;
        match leader(&self.raft, &self.link, self.me, deadline).await {
            Ok(Leader::Me) => match self.raft.client_write_ff(Command { batch: batch.clone() }).await {
                Ok(answer) => Started::Appending(answer),
                Err(e) => Started::Done(Err(StoreError::Unavailable(e.to_string()))),
            },
            Ok(Leader::Other(..)) => Started::Done(self.submit(batch, seq).await),
            Err(e) => Started::Done(Err(e)),
        }
    }

    /// The tag of the next batch this node proposes.
    fn next_tag(&self) -> Tag {
        Tag { proposer: self.me, seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1 }
    }

    async fn submit(&self, batch: bytes::Bytes, seq: u64) -> Result<Vec<Reply>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match leader(&self.raft, &self.link, self.me, deadline).await? {
                Leader::Me => match self.raft.client_write(Command { batch: batch.clone() }).await {
                    Ok(response) => return Ok(response.data),
                    // Lost the leadership before the entry was appended: nothing was written.
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
                    Err(other) => return Err(StoreError::Unavailable(other.to_string())),
                },
                // The term is the one this node learnt the leader in (together, from the
                // leader's own messages): a leader of a later term is another leader.
                // A leader of a later term ends the wait for this one's answer (a dead
                // leader may leave a dial or a call hanging until its bound).
                Leader::Other(address, term) => match tokio::select! {
                    proposed = self.link.propose(&address, batch.clone()) => proposed,
                    () = newer_leader(&self.raft, term) => Err(CallFailure::TimedOut(format!("{address}: a leader of a later term was elected"))),
                } {
                    Ok(Proposed::Applied { replies, index }) => {
                        self.applied(index, deadline).await?;
                        return Ok(replies);
                    }
                    // Not (or no longer) the leader there, or it could not be dialled:
                    // nothing was written, so trying again is safe.
                    Ok(Proposed::NotLeader) | Err(CallFailure::Unreachable(_)) => {}
                    // Sent, and no answer or a failure: find out whether it was written
                    // before proposing it again (never twice).
                    Err(CallFailure::TimedOut(_) | CallFailure::Failed(_)) => {
                        if let Some(replies) = self.settle_unanswered(seq, term, deadline).await? {
                            return Ok(replies);
                        }
                    }
                },
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout);
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// A batch the leader of term `sent_in` did not answer for. Once a leader of a later
    /// term is known and this node has applied what it committed (its read index covers
    /// the first entry of its term), the batch was either applied (its outcome is noted
    /// here) or is gone for good, since an entry of an older term that the new leader
    /// does not hold can never commit: `None` says to propose it again. While the old
    /// leader keeps its term, only its own answer (the noted outcome) can settle it.
    async fn settle_unanswered(&self, seq: u64, sent_in: u64, deadline: tokio::time::Instant) -> Result<Option<Vec<Reply>>, StoreError> {
        let mut metrics = self.raft.metrics();
        let mut applied = self.data.applied_changes();
        loop {
            if let Some(replies) = self.data.own_outcome(seq) {
                return Ok(Some(replies));
            }
            let newer_leader = {
                let m = metrics.borrow_and_update();
                m.current_term > sent_in && m.current_leader.is_some()
            };
            if newer_leader {
                linearize(&self.raft, &self.link, &self.data, self.me, deadline).await?;
                return Ok(self.data.own_outcome(seq));
            }
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return Err(StoreError::Unavailable("the store stopped".into())) },
                changed = applied.changed() => if changed.is_err() { return Err(StoreError::Unavailable("the store stopped".into())) },
                _ = tokio::time::sleep_until(deadline) => return Err(StoreError::Timeout),
            }
        }
    }

    /// Waits until this node has applied the entry at `index`.
    async fn applied(&self, index: u64, deadline: tokio::time::Instant) -> Result<(), StoreError> {
        tokio::time::timeout_at(deadline, self.data.applied_up_to(index)).await.map_err(|_| StoreError::Timeout)
    }
}

/// Waits until this node has applied everything the leader had committed when it
/// confirmed its leadership (a read index), trying again (until `deadline`) while the
/// leader changes.
async fn linearize(
    raft: &Raft<TypeConfig>,
    link: &LeaderLink,
    data: &Replicated,
    me: NodeId,
    deadline: tokio::time::Instant,
) -> Result<(), StoreError> {
    loop {
        let index = match leader(raft, link, me, deadline).await? {
            Leader::Me => match raft.get_read_log_id().await {
                Ok((read, _)) => Some(super::leader::read_index(raft, read.map_or(0, |l| l.index))),
                Err(RaftError::APIError(_)) => None,
                Err(e) => return Err(StoreError::Unavailable(e.to_string())),
            },
            Leader::Other(address, _) => match link.read_index(&address).await {
                Ok(Ok(index)) => Some(index),
                // Reading twice is harmless: ask again (the leader may have changed).
                Ok(Err(_)) | Err(_) => None,
            },
        };
        if let Some(index) = index {
            return tokio::time::timeout_at(deadline, data.applied_up_to(index)).await.map_err(|_| StoreError::Timeout);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Timeout);
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Resolves once this node knows a leader of a term later than `term`.
async fn newer_leader(raft: &Raft<TypeConfig>, term: u64) {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            if m.current_term > term && m.current_leader.is_some() {
                return;
            }
        }
        if metrics.changed().await.is_err() {
            // The store stopped: the call's own bound ends the wait.
            std::future::pending::<()>().await;
        }
    }
}

/// Slack past a leader's lease before its successor campaigns (the lease is counted from
/// a moment just before this node learns it leads).
const LEASE_MARGIN: Duration = Duration::from_millis(50);

/// Keeps `leading_since` up to date: when this node became leader, per term.
async fn watch_leadership(raft: Raft<TypeConfig>, me: NodeId, leading_since: Arc<std::sync::Mutex<Option<(u64, tokio::time::Instant)>>>) {
    let mut metrics = raft.metrics();
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term)
        };
        if let Ok(mut since) = leading_since.lock() {
            if leader != Some(me) {
                *since = None;
            } else if since.is_none_or(|(t, _)| t != term) {
                *since = Some((term, tokio::time::Instant::now()));
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// The current leader, waiting for one (until `deadline`) while there is none. Its
/// address is where the mesh reaches it (what the group recorded may be older).
async fn leader(raft: &Raft<TypeConfig>, link: &LeaderLink, me: NodeId, deadline: tokio::time::Instant) -> Result<Leader, StoreError> {
    let mut metrics = raft.metrics();
    loop {
        {
            let m = metrics.borrow_and_update();
            match m.current_leader {
                Some(id) if id == me => return Ok(Leader::Me),
                Some(id) => {
                    if let Some(address) = link.member_address(&m, id) {
                        return Ok(Leader::Other(address, m.current_term));
                    }
                }
                None => {}
            }
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(StoreError::Unavailable("the store stopped".into())),
            Err(_) => return Err(StoreError::NotLeader),
        }
    }
}

/// Collects proposals into entries of at most `max_batch` operations: while one entry is
/// being committed the next fills, so the batch grows with the load and a lone write waits
/// for nobody.
async fn write_batches(submitter: Submitter, mut proposals: mpsc::Receiver<Proposal>, max_batch: usize, stats: Arc<WriterStats>) {
    let (in_flight, resolving) = mpsc::channel(MAX_IN_FLIGHT);
    tokio::spawn(resolve_in_order(resolving, Arc::clone(&stats)));
    let mut waiting: Vec<Proposal> = Vec::new();
    loop {
        if waiting.is_empty() {
            if proposals.recv_many(&mut waiting, max_batch).await == 0 {
                return;
            }
        } else {
            // What did not fit into the last entry goes now, with whatever arrived meanwhile.
            while waiting.len() < max_batch {
                match proposals.try_recv() {
                    Ok(p) => waiting.push(p),
                    Err(_) => break,
                }
            }
        }
        // Operations, not proposals, bound the entry; what does not fit waits for the next.
        let mut ops = 0;
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        for p in waiting.drain(..) {
            if !batch.is_empty() && ops + p.ops.len() > max_batch {
                rest.push(p);
                continue;
            }
            ops += p.ops.len();
            batch.push(p);
        }
        waiting = rest;
        let tag = submitter.next_tag();
        let encoded = encode_tagged_batch(batch.iter().flat_map(|p: &Proposal| p.ops.iter()), tag);
        let started = std::time::Instant::now();
        let outcome = submitter.start(encoded, tag.seq).await;
        stats.entries.fetch_add(1, Ordering::Relaxed);
        stats.ops.fetch_add(ops as u64, Ordering::Relaxed);
        if in_flight.send(InFlight { batch, outcome, started }).await.is_err() {
            return;
        }
    }
}

/// An entry on its way: the proposals in it and where its outcome arrives.
struct InFlight {
    batch: Vec<Proposal>,
    outcome: Started,
    started: std::time::Instant,
}

/// Entries proposed and not yet committed at most (the leader appends them together).
const MAX_IN_FLIGHT: usize = 32;

/// Resolves the proposals of entries in the order they were proposed.
async fn resolve_in_order(mut in_flight: mpsc::Receiver<InFlight>, stats: Arc<WriterStats>) {
    while let Some(InFlight { batch, outcome, started }) = in_flight.recv().await {
        let outcome = match outcome {
            Started::Done(result) => result,
            Started::Appending(answer) => match answer.await {
                Ok(Ok(response)) => Ok(response.data),
                Ok(Err(ClientWriteError::ForwardToLeader(_))) => Err(StoreError::NotLeader),
                Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
                Err(_) => Err(StoreError::Unavailable("the store stopped".into())),
            },
        };
        stats.latency.record_duration(started.elapsed());
        match outcome {
            Ok(replies) => {
                let mut replies = replies.into_iter();
                for p in batch {
                    let mine: Vec<Reply> = replies.by_ref().take(p.ops.len()).collect();
                    let _ = p.done.send(Ok(mine));
                }
            }
            Err(error) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                for p in batch {
                    let _ = p.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// [`SessionStore`], [`RetainedStore`] and [`ClientRegistry`] over a [`RaftStore`].
#[derive(Debug)]
struct Stores(Arc<RaftStore>);

fn one(mut replies: Vec<Reply>) -> Result<Reply, StoreError> {
    replies.pop().ok_or_else(|| StoreError::Unavailable("no outcome for the operation".into()))
}

#[async_trait]
impl SessionStore for Stores {
    async fn load(&self, client_id: &str) -> Result<Option<SessionState>, StoreError> {
        self.0.data.sessions.load(client_id).await
    }

    async fn apply(&self, batch: Vec<SessionCommand>) -> Result<Vec<Result<Applied, OpError>>, StoreError> {
        let replies = self.0.propose(batch.into_iter().map(StoreOp::Session).collect()).await?;
        Ok(replies.into_iter().map(Reply::session).collect())
    }

    async fn submit(&self, batch: Vec<SessionCommand>) -> Result<crate::session::Submitted, StoreError> {
        let answer = self.0.enqueue(batch.into_iter().map(StoreOp::Session).collect()).await?;
        Ok(Box::pin(async move {
            let replies = answer.await.map_err(|_| StoreError::Unavailable("the store stopped".into()))??;
            Ok(replies.into_iter().map(Reply::session).collect())
        }))
    }

    fn len(&self) -> usize {
        self.0.data.sessions.len()
    }
}

#[async_trait]
impl RetainedStore for Stores {
    async fn set(&self, message: Arc<Message>) -> Result<RetainOutcome, StoreError> {
        let limits = self.0.config.retained;
        // Refused here already: a message over the caps never costs a log entry.
        if message.payload.len() > limits.max_payload {
            return Ok(RetainOutcome::Refused);
        }
        Ok(one(self.0.propose(vec![StoreOp::Retain { message, limits }]).await?)?.retain_outcome())
    }

    fn matching(&self, filter: &str, now_ms: u64) -> Vec<Arc<Message>> {
        self.0.data.retained.matching(filter, now_ms)
    }

    fn count(&self) -> usize {
        self.0.data.retained.count()
    }

    fn bytes(&self) -> usize {
        self.0.data.retained.bytes()
    }
}

#[async_trait]
impl ClientRegistry for Stores {
    async fn claim(&self, client_id: &str, node: NodeId, above: Epoch) -> Result<Epoch, StoreError> {
        match one(self.0.propose(vec![StoreOp::Claim { client_id: client_id.to_owned(), node, above }]).await?)? {
            Reply::Claimed(epoch) => Ok(epoch),
            other => Err(StoreError::Unavailable(format!("unexpected claim outcome {other:?}"))),
        }
    }

    fn current(&self, client_id: &str) -> Option<Claim> {
        self.0.data.registry.current(client_id)
    }

    async fn release(&self, client_id: &str, epoch: Epoch) -> Result<bool, StoreError> {
        Ok(matches!(one(self.0.propose(vec![StoreOp::Release { client_id: client_id.to_owned(), epoch }]).await?)?, Reply::Released(true)))
    }

    fn len(&self) -> usize {
        self.0.data.registry.len()
    }
}
