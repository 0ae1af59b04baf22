//! The replicated store: one Raft group (openraft) per cluster over sled, holding
//! persistent sessions, retained messages and the client registry.
//!
//! - [`ops`]: the operations and their outcomes; a log entry carries a batch of them,
//!   encoded as `StoreBatch` (`cluster.proto`).
//! - [`log_store`]: the log, vote and committed id on sled, every record checksummed.
//! - [`state_machine`]: the state the log builds, in memory, snapshotted to sled.
//! - [`network`]: Raft's RPCs over the cluster's gRPC service.
//! - [`leader`]: what followers ask of the leader (proposals, read index, join, remove).
//! - [`membership`]: forming the group, joining it, promoting learners.
//! - [`store`]: the group on this node, the batching writer, the broker's store traits.
//!
//! A node without peers is a group of one on its data directory: it keeps retained
//! messages and persistent sessions across a restart like every member of a cluster. The
//! nodes of a cluster share one group.

pub(crate) mod leader;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod ops;
pub mod state_machine;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use log_store::LogStore;
pub use membership::Formation;
pub use ops::{Reply, StoreOp};
pub use state_machine::{ClaimApplied, Replicated, StateMachine};
pub use store::{RaftConfig, RaftStartError, RaftStore, RaftView};

/// Node ids are the mesh's: [`crate::stable_hash`] of the node name.
pub type NodeId = crate::NodeId;
/// What the group knows of a member: the address of its cluster gRPC listener.
pub type Node = openraft::BasicNode;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;

/// A log entry's application data: one batch of [`StoreOp`]s, encoded as `StoreBatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The encoded batch.
    pub batch: bytes::Bytes,
}

openraft::declare_raft_types!(
    /// openraft's types for raftmq's store.
    pub TypeConfig:
        D = Command,
        R = Vec<Reply>,
        NodeId = NodeId,
        Node = Node,
);

#[cfg(test)]
mod tests;

/// The label of a Raft role in the admin API, metrics and the route heartbeats.
pub fn role_label(state: openraft::ServerState) -> &'static str {
    match state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    }
}
