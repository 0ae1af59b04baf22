//! Wire types of raftmq's node-to-node protocol (`cluster.proto`, package
//! `raftmq.cluster.v1`).
//!
//! API boundary: this crate is generated code only. Domain types live in `raftmq-cluster`,
//! which converts to and from these types at the edge so the wire can evolve separately.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the cluster protocol.
pub mod v1 {
    tonic::include_proto!("raftmq.cluster.v1");
}
