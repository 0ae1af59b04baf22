//! The cluster (issue 12): several raftmq nodes behave as one broker. `in_process` runs
//! three nodes inside this test process, linked over loopback gRPC; `processes` runs real
//! `raftmq` processes.

mod in_process;
mod processes;
mod replicated;

use std::time::Duration;

/// How long any single expectation may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
