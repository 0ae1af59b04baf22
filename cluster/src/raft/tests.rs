//! openraft's storage conformance suite on the sled log store and state machine.

// The suite's own error type.
#![allow(clippy::result_large_err)]

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

use super::{LogStore, NodeId, StateMachine, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let io = |e: std::io::Error| StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e);
        let dir = tempfile::tempdir().map_err(io)?;
        let db = sled::Config::new().path(dir.path()).open().map_err(|e| io(std::io::Error::other(e)))?;
        let log = LogStore::open(&db).map_err(|e| io(std::io::Error::other(e)))?;
        let sm = StateMachine::open(&db).map_err(|e| io(std::io::Error::other(e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn the_sled_store_passes_openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(SledBuilder)
}

/// A proposal that did not fit into the previous entry goes into the next one at once,
/// without waiting for another proposal to arrive.
#[tokio::test]
async fn a_proposal_left_over_from_a_full_entry_is_not_stranded() -> Result<(), Box<dyn std::error::Error>> {
    use super::{RaftConfig, RaftStore, Reply, StoreOp};
    use crate::retained::RetainedLimits;
    let dir = tempfile::tempdir()?;
    let config = RaftConfig {
        data_dir: dir.path().to_path_buf(),
        node_id: 1,
        node_name: "n1".into(),
        address: "127.0.0.1:0".into(),
        snapshot_every: 100,
        keep_behind_snapshot: 10,
        max_batch: 2,
        queue: 16,
        heartbeat: std::time::Duration::from_millis(50),
        election_timeout: std::time::Duration::from_millis(150),
        retained: RetainedLimits { max_messages: 10, max_bytes: 1 << 20, max_payload: 1 << 20 },
        formation: None,
        write_timeout: std::time::Duration::from_secs(5),
    };
    let store = RaftStore::open(config, None).await?;
    assert!(store.wait_for_leader(std::time::Duration::from_secs(10)).await);
    let claim = |id: &str| StoreOp::Claim { client_id: id.into(), node: 1, above: 0 };
    // Both are queued before the writer runs (one runtime thread): one op, then two, with
    // room for two per entry, so the second is left over.
    let both = async { tokio::join!(store.propose(vec![claim("a")]), store.propose(vec![claim("b"), claim("c")])) };
    let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(10), both).await?;
    assert!(matches!(first?.as_slice(), [Reply::Claimed(_)]));
    assert!(matches!(second?.as_slice(), [Reply::Claimed(_), Reply::Claimed(_)]));
    store.shutdown().await;
    Ok(())
}
