//! `[raft]`: the replicated store on the data directory (sessions, retained messages, the
//! client registry), a Raft group of one on a node alone.

use std::time::Duration;

use serde::Deserialize;

/// Raft and store settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSettings {
    /// Entries applied between snapshots (the log is purged behind each).
    pub snapshot_every: u64,
    /// Entries kept behind the last snapshot, so a peer slightly behind catches up from
    /// the log instead of a whole snapshot.
    pub keep_behind_snapshot: u64,
    /// Most operations in one log entry (the writer batches what waits).
    pub max_batch: usize,
    /// Operations waiting for the writer at most; beyond, writers wait (backpressure).
    pub queue: usize,
    /// Leader heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout, milliseconds (randomized up to twice this).
    pub election_timeout_ms: u64,
    /// How long the start waits for the group to have a leader before giving up.
    pub start_timeout_secs: u64,
    /// How long a write waits for the group to have a leader (during an election, or a
    /// node cut off from the majority) before its client is refused.
    pub write_timeout_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
            max_batch: 2_048,
            queue: 16_384,
            heartbeat_ms: 250,
            election_timeout_ms: 1_000,
            start_timeout_secs: 30,
            write_timeout_ms: 5_000,
        }
    }
}

impl RaftSettings {
    /// The heartbeat as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(10))
    }

    /// The election timeout as a duration (at least three heartbeats).
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.election_timeout_ms.max(3 * self.heartbeat_ms.max(10)))
    }
}
