//! raftmq-cluster: the state raftmq shares between nodes, as data.
//!
//! This crate speaks of topics, messages, sessions and routes, never of MQTT packets. The
//! broker (`raftmq-node`) owns the wire protocol and calls in here through three seams:
//!
//! - [`session::SessionStore`]: persistent sessions (subscriptions, queues, inflight, wills),
//!   changed by the commands of [`session_ops`], applied by one pure function;
//! - [`retained::RetainedStore`]: retained messages;
//! - [`routes::RouteTable`]: which nodes want which topics ([`mesh`] is the cluster's, over gRPC);
//! - [`registry::ClientRegistry`]: which node owns each client id, under which epoch.
//!
//! Each has an in-memory implementation for a single node. Writes resolve only when durable,
//! so the Raft-replicated implementations plug in without touching the broker.

pub mod convert;
pub mod histogram;
pub mod mesh;
pub mod message;
pub mod raft;
pub mod registry;
pub mod retained;
pub mod routes;
pub mod session;
pub mod session_ops;
pub mod topic;

/// Identifier of a node in the cluster.
pub type NodeId = u64;

/// A hash that is the same on every node and in every release (64-bit FNV-1a): node ids
/// from node names, short stand-ins for long client ids.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A failed store operation. Each kind tells the broker what to tell the client: a write
/// that did not happen is refused (CONNACK 0x88 / 0x89, PUBACK / PUBREC 0x80), never
/// acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A lock was poisoned by a panicking writer; the store refuses further use.
    #[error("store lock poisoned")]
    Poisoned,
    /// The store could not make the write durable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// This node cannot write now: it is not the leader and knows none to forward to.
    #[error("not the leader")]
    NotLeader,
    /// The write carried an older epoch than the session's: another node owns it now.
    #[error("fenced: the session is owned elsewhere")]
    Fenced,
    /// The write did not complete in time (it may still complete).
    #[error("store timed out")]
    Timeout,
}

impl StoreError {
    /// The `reason` label of `raftmq_store_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Poisoned => "poisoned",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::NotLeader => "not_leader",
            StoreError::Fenced => "fenced",
            StoreError::Timeout => "timeout",
        }
    }

    /// Whether trying again soon may succeed (the client is told the server is busy rather
    /// than unavailable).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::NotLeader | StoreError::Timeout)
    }
}
