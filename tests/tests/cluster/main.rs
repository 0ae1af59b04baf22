//! The cluster (issue 12): several raftmq nodes behave as one broker. `in_process` runs
//! three nodes inside this test process, linked over loopback gRPC; `processes` runs real
//! `raftmq` processes.

mod deploy;
mod in_process;
mod monitoring;
mod processes;
mod replicated;

pub use raftmq_tests::processes::{connect_accepted, CLUSTER_DEADLINE as DEADLINE};
