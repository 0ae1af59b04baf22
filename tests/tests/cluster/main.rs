//! The cluster (issue 12): several raftmq nodes behave as one broker. `in_process` runs
//! three nodes inside this test process, linked over loopback gRPC; `processes` runs real
//! `raftmq` processes.

mod deploy;
mod in_process;
mod monitoring;
mod processes;
mod replicated;

use std::time::Duration;

/// How long any single expectation may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Connects with `connect`, again while the broker refuses as busy or unavailable (MQTT 5:
/// 0x88, 0x89; MQTT 3: 3): a CONNECT whose client id cannot be claimed during a Raft
/// election is refused, never half accepted, and a client tries again, as this does
/// (bounded by [`DEADLINE`]).
pub async fn connect_accepted(
    addr: std::net::SocketAddr,
    connect: raftmq_node::codec::Connect,
) -> anyhow::Result<(raftmq_tests::Raw, raftmq_node::codec::ConnAck)> {
    let started = std::time::Instant::now();
    loop {
        let (raw, ack) = raftmq_tests::Raw::connect_with(addr, connect.clone()).await?;
        if !matches!(ack.code, 0x88 | 0x89 | 3) || started.elapsed() > DEADLINE {
            return Ok((raw, ack));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
