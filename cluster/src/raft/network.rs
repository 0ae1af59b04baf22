//! Raft's RPCs over the cluster's gRPC service: openraft's request and response structs
//! travel postcard-encoded in `RaftPayload` (openraft 0.9 ships no protobuf mapping), on
//! one cached client per peer that carries the cluster secret and TLS like every link.

use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use raftmq_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Node, NodeId, TypeConfig};
use crate::mesh::service::{client, LinkClient};
use crate::mesh::Shared;

/// The three Raft RPCs.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Rpc {
    Append,
    Vote,
    Snapshot,
}

/// Makes a [`Connection`] per peer; without a mesh (a node alone) every peer is
/// unreachable, which a group of one never asks for.
#[derive(Clone)]
pub struct Network {
    pub(crate) mesh: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("mesh", &self.mesh.is_some()).finish()
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Connection {
        Connection { mesh: self.mesh.clone(), target, address: node.addr.clone(), client: None }
    }
}

/// The link to one peer, dialled on first use and again after a failure.
pub struct Connection {
    mesh: Option<Arc<Shared>>,
    target: NodeId,
    address: String,
    client: Option<LinkClient>,
}

/// Why a Raft RPC failed before the peer answered.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no cluster mesh on this node")]
    NoMesh,
    #[error("dial {0}")]
    Dial(String),
    #[error("rpc: {0}")]
    Status(#[from] tonic::Status),
    #[error("encoding: {0}")]
    Encoding(#[from] postcard::Error),
}

impl Connection {
    async fn call<Req, Resp, E>(&mut self, rpc: Rpc, request: &Req, option: &RPCOption) -> Result<Resp, RPCError<NodeId, Node, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Result<Resp, E>, CallError> = async {
            let payload = postcard::to_allocvec(request)?;
            if self.client.is_none() {
                let shared = self.mesh.as_ref().ok_or(CallError::NoMesh)?;
                // Where the mesh reaches the peer now; the group's record may be older.
                let address = shared.peers.get(&self.target).map_or_else(|| self.address.clone(), |p| p.address.clone());
                self.client = Some(client(shared, &address).await.map_err(|e| CallError::Dial(e.to_string()))?);
            }
            let Some(client) = self.client.as_mut() else { return Err(CallError::NoMesh) };
            let mut req = tonic::Request::new(pb::RaftPayload { payload: payload.into() });
            req.set_timeout(option.hard_ttl());
            let reply = match rpc {
                Rpc::Append => client.raft_append(req).await,
                Rpc::Vote => client.raft_vote(req).await,
                Rpc::Snapshot => client.raft_snapshot(req).await,
            };
            let reply = reply.inspect_err(|_| self.client = None)?;
            Ok(postcard::from_bytes(&reply.into_inner().payload)?)
        }
        .await;
        match answer {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            Err(e @ (CallError::NoMesh | CallError::Dial(_))) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The serving side: decodes a peer's request, hands it to the local Raft, encodes the
/// outcome (a Raft error included) for the caller.
pub(crate) async fn serve_rpc(raft: &openraft::Raft<TypeConfig>, kind: Rpc, payload: &[u8]) -> Result<Vec<u8>, tonic::Status> {
    let bad = |e: postcard::Error| tonic::Status::invalid_argument(format!("undecodable {kind:?} request: {e}"));
    let encoded = match kind {
        Rpc::Append => postcard::to_allocvec(&raft.append_entries(postcard::from_bytes(payload).map_err(bad)?).await),
        Rpc::Vote => postcard::to_allocvec(&raft.vote(postcard::from_bytes(payload).map_err(bad)?).await),
        Rpc::Snapshot => postcard::to_allocvec(&raft.install_snapshot(postcard::from_bytes(payload).map_err(bad)?).await),
    };
    encoded.map_err(|e| tonic::Status::internal(format!("encoding the {kind:?} reply: {e}")))
}
