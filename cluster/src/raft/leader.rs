//! Reaching the leader. A follower's writer hands its entries to the leader (`Propose`), a
//! follower's linearizable read asks it for its read index (`ReadIndex`), a new node asks
//! it to be added (`Join`), an operator asks it to remove one (`RemoveNode`). This file
//! holds both sides: [`LeaderLink`] calls the leader; the `serve_*` functions answer on it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft};
use raftmq_proto::v1 as pb;
use tonic::Status;

use super::ops::Reply;
use super::{Command, NodeId, TypeConfig};
use crate::mesh::service::{client, LinkClient};
use crate::mesh::Shared;
use crate::StoreError;

/// One cached gRPC client per node address, for calls to whichever node leads.
pub(crate) struct LeaderLink {
    mesh: Option<Arc<Shared>>,
    clients: Mutex<HashMap<String, LinkClient>>,
    /// How long one call may take: a leader that is paused or cut off must not hold a
    /// writer past the election that replaces it.
    bound: std::time::Duration,
}

/// Why a call to the leader failed.
#[derive(Debug)]
pub(crate) enum CallFailure {
    /// The node could not be dialled: nothing reached it, the call may be repeated.
    Unreachable(String),
    /// The call failed after it was sent: it may or may not have taken effect.
    Failed(String),
    /// No answer within the bound: it may or may not have taken effect.
    TimedOut(String),
}

impl From<CallFailure> for StoreError {
    fn from(f: CallFailure) -> StoreError {
        match f {
            CallFailure::Unreachable(e) | CallFailure::Failed(e) => StoreError::Unavailable(e),
            CallFailure::TimedOut(e) => {
                tracing::debug!(call = %e, "a call to the leader timed out");
                StoreError::Timeout
            }
        }
    }
}

/// What the leader answered to a proposal.
pub(crate) enum Proposed {
    /// Committed and applied there at `index`.
    Applied { replies: Vec<Reply>, index: u64 },
    /// The callee does not lead (nothing was written).
    NotLeader,
}

impl LeaderLink {
    pub(crate) fn new(mesh: Option<Arc<Shared>>, bound: std::time::Duration) -> LeaderLink {
        LeaderLink { mesh, clients: Mutex::new(HashMap::new()), bound }
    }

    /// Makes one call to the node at `address` (dialled, or its cached channel) within the
    /// bound; a call that times out or fails drops the cached channel.
    async fn call<R, F, Fut>(&self, address: &str, call: F) -> Result<R, CallFailure>
    where
        F: FnOnce(LinkClient) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let c = self.client(address).await?;
        match tokio::time::timeout(self.bound, call(c)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(self.failed(address, status)),
            Err(_) => {
                self.forget(address);
                Err(CallFailure::TimedOut(format!("{address}: no answer within {:?}", self.bound)))
            }
        }
    }

    /// Drops the cached channel to `address` (the next call dials again).
    fn forget(&self, address: &str) {
        if let Ok(mut clients) = self.clients.lock() {
            clients.remove(address);
        }
    }

    async fn client(&self, address: &str) -> Result<LinkClient, CallFailure> {
        if let Some(c) = self.clients.lock().ok().and_then(|c| c.get(address).cloned()) {
            return Ok(c);
        }
        let shared = self.mesh.as_ref().ok_or_else(|| CallFailure::Unreachable("no cluster mesh on this node".into()))?;
        // A host that is gone (a killed container's address) may take the whole connect
        // timeout to fail; nothing was sent either way.
        let c = match tokio::time::timeout(self.bound, client(shared, address)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(CallFailure::Unreachable(format!("dial {address}: {e}"))),
            Err(_) => return Err(CallFailure::Unreachable(format!("dial {address}: no connection within {:?}", self.bound))),
        };
        if let Ok(mut clients) = self.clients.lock() {
            clients.insert(address.to_owned(), c.clone());
        }
        Ok(c)
    }

    /// A failed call drops the cached channel (the next call dials again). A cached
    /// channel whose connection broke reconnects on the next call; tonic reports a
    /// reconnection that failed as UNAVAILABLE with the connector's message (its
    /// `ConnectError` is not kept as the source): then nothing was sent. Neither was it to
    /// a node still opening its group (a restarted leader answers so for a moment; taken
    /// for a lost call, the batch waited out the whole write timeout in the F8 suite).
    fn failed(&self, address: &str, status: Status) -> CallFailure {
        self.forget(address);
        let message = format!("{address}: {}", status.message());
        let unsent = status.message().contains("connect error") || status.message() == crate::mesh::service::NO_GROUP;
        if status.code() == tonic::Code::Unavailable && unsent {
            return CallFailure::Unreachable(message);
        }
        CallFailure::Failed(message)
    }

    pub(crate) async fn propose(&self, address: &str, batch: bytes::Bytes) -> Result<Proposed, CallFailure> {
        let reply = self.call(address, |mut c| async move { c.propose(pb::ProposeRequest { batch }).await }).await?;
        if reply.index == 0 {
            return Ok(Proposed::NotLeader);
        }
        let replies = postcard::from_bytes(&reply.replies).map_err(|e| CallFailure::Failed(format!("undecodable outcomes: {e}")))?;
        Ok(Proposed::Applied { replies, index: reply.index })
    }

    /// The leader's read index, or the leader it knows of.
    pub(crate) async fn read_index(&self, address: &str) -> Result<Result<u64, Option<NodeId>>, CallFailure> {
        let reply = self.call(address, |mut c| async move { c.read_index(pb::ReadIndexRequest {}).await }).await?;
        Ok(if reply.ok { Ok(reply.index) } else { Err((reply.leader != 0).then_some(reply.leader)) })
    }

    pub(crate) async fn join(&self, address: &str, node: NodeId, own_address: &str) -> Result<pb::JoinReply, CallFailure> {
        let request = pb::JoinRequest { node, address: own_address.to_owned() };
        self.call(address, |mut c| async move { c.join(request).await }).await
    }

    pub(crate) async fn remove(&self, address: &str, node: NodeId) -> Result<pb::RemoveReply, CallFailure> {
        self.call(address, |mut c| async move { c.remove_node(pb::RemoveRequest { node }).await }).await
    }

    /// Asks the node at `address` to stand for election (this node, the leader, stops).
    pub(crate) async fn campaign(&self, address: &str, last_index: u64) -> Result<bool, CallFailure> {
        Ok(self.call(address, |mut c| async move { c.campaign(pb::CampaignRequest { last_index }).await }).await?.started)
    }

    /// Where node `id` is reached: by the mesh now, else at the address the group
    /// recorded (which may be older).
    pub(crate) fn member_address(&self, metrics: &openraft::RaftMetrics<NodeId, BasicNode>, id: NodeId) -> Option<String> {
        let linked = self.mesh.as_ref().and_then(|m| m.peers.get(&id).map(|p| p.address.clone()));
        linked.or_else(|| metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone()))
    }
}

/// The leader a write error points at (`Some(None)`: not the leader, none known), or
/// `None` for any other error.
fn leader_of(e: &RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Option<Option<NodeId>> {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Some(f.leader_id),
        _ => None,
    }
}

/// The leader's side of `Propose`: the follower's encoded batch becomes one entry.
pub(crate) async fn serve_propose(raft: &Raft<TypeConfig>, batch: bytes::Bytes) -> Result<pb::ProposeReply, Status> {
    match raft.client_write(Command { batch }).await {
        Ok(response) => {
            let replies = postcard::to_allocvec(&response.data).map_err(|e| Status::internal(e.to_string()))?;
            Ok(pb::ProposeReply { replies: replies.into(), leader: 0, index: response.log_id.index })
        }
        Err(e) => match leader_of(&e) {
            Some(leader) => Ok(pb::ProposeReply { replies: Default::default(), leader: leader.unwrap_or(0), index: 0 }),
            None => Err(Status::unavailable(e.to_string())),
        },
    }
}

/// The leader's side of `ReadIndex`: confirms leadership with a quorum and answers the
/// index a reader must have applied.
pub(crate) async fn serve_read_index(raft: &Raft<TypeConfig>) -> Result<pb::ReadIndexReply, Status> {
    match raft.get_read_log_id().await {
        Ok((read, _)) => Ok(pb::ReadIndexReply { leader: 0, index: read_index(raft, read.map_or(0, |l| l.index)), ok: true }),
        Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
            Ok(pb::ReadIndexReply { leader: f.leader_id.unwrap_or(0), index: 0, ok: false })
        }
        Err(e) => Err(Status::unavailable(e.to_string())),
    }
}

/// The index a linearizable read waits for: openraft's read log id, or the leader's last
/// log index if that is later. A leader that restarted takes up its old term again
/// without a new first entry, and its read log id can then lag behind entries committed
/// before the crash (the fault suite's full restart resumed sessions from that state);
/// every entry of its log commits with the next round, so waiting for all of them is
/// always safe and costs a read at most one commit.
pub(crate) fn read_index(raft: &Raft<TypeConfig>, read: u64) -> u64 {
    read.max(raft.metrics().borrow().last_log_index.unwrap_or(0))
}

/// The leader's side of `Join`: the node becomes a learner (replication starts at once;
/// the membership task promotes it to voter when the group has room).
pub(crate) async fn serve_join(raft: &Raft<TypeConfig>, node: NodeId, address: String) -> Result<pb::JoinReply, Status> {
    if !raft.is_initialized().await.map_err(|e| Status::unavailable(e.to_string()))? {
        return Ok(pb::JoinReply { leader: 0, joined: false, initialized: false });
    }
    let known = raft.metrics().borrow().membership_config.membership().get_node(&node).map(|n| n.addr.clone());
    if known.as_deref() == Some(address.as_str()) {
        return Ok(pb::JoinReply { leader: 0, joined: true, initialized: true });
    }
    match raft.add_learner(node, BasicNode { addr: address }, false).await {
        Ok(_) => Ok(pb::JoinReply { leader: 0, joined: true, initialized: true }),
        Err(e) => match leader_of(&e) {
            Some(leader) => Ok(pb::JoinReply { leader: leader.unwrap_or(0), joined: false, initialized: true }),
            None => Err(Status::unavailable(e.to_string())),
        },
    }
}

/// A successor's side of `Campaign`: it stands for election at once, if it holds the
/// stopping leader's whole log (else it could not win, and a failed campaign only costs a
/// term).
pub(crate) async fn serve_campaign(raft: &Raft<TypeConfig>, last_index: u64) -> Result<pb::CampaignReply, Status> {
    let held = raft.metrics().borrow().last_log_index.unwrap_or(0);
    if held < last_index {
        return Ok(pb::CampaignReply { started: false });
    }
    raft.trigger().elect().await.map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(pb::CampaignReply { started: true })
}

/// The leader's side of `RemoveNode`: the node stops being a voter, then a member.
pub(crate) async fn serve_remove(raft: &Raft<TypeConfig>, node: NodeId) -> Result<pb::RemoveReply, Status> {
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    if membership.voter_ids().any(|v| v == node) {
        let change = ChangeMembers::RemoveVoters(BTreeSet::from([node]));
        if let Err(e) = raft.change_membership(change, true).await {
            return match leader_of(&e) {
                Some(leader) => Ok(pb::RemoveReply { leader: leader.unwrap_or(0), removed: false }),
                None => Err(Status::failed_precondition(e.to_string())),
            };
        }
    }
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    if membership.get_node(&node).is_none() {
        return Ok(pb::RemoveReply { leader: 0, removed: true });
    }
    match raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([node])), false).await {
        Ok(_) => Ok(pb::RemoveReply { leader: 0, removed: true }),
        Err(e) => match leader_of(&e) {
            Some(leader) => Ok(pb::RemoveReply { leader: leader.unwrap_or(0), removed: false }),
            None => Err(Status::failed_precondition(e.to_string())),
        },
    }
}
