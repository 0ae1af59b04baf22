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
