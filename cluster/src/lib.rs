//! raftmq-cluster: the state raftmq shares between nodes, as data.
//!
//! This crate speaks of topics, messages, sessions and routes, never of MQTT packets. The
//! broker (`raftmq-node`) owns the wire protocol and calls in here through three seams:
//!
//! - [`session::SessionStore`]: persistent sessions (subscriptions, queues, inflight, wills);
//! - [`retained::RetainedStore`]: retained messages;
//! - [`routes::RouteTable`]: which nodes want which topics.
//!
//! Each has an in-memory implementation for a single node. Writes resolve only when durable,
//! so the Raft-replicated implementations plug in without touching the broker.

pub mod convert;
pub mod message;
pub mod retained;
pub mod routes;
pub mod session;
pub mod topic;

/// Identifier of a node in the cluster.
pub type NodeId = u64;

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A lock was poisoned by a panicking writer; the store refuses further use.
    #[error("store lock poisoned")]
    Poisoned,
    /// The store could not make the write durable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}
