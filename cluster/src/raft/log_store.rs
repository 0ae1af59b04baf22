//! The Raft log on sled: entries keyed by big-endian index in tree `log`, the vote, the
//! committed id and the last purged id in tree `meta`. Every record carries a CRC32 of its
//! bytes, so a torn or corrupted record is reported, never applied.
//!
//! Architecture invariant: `append` reports its entries persisted only after
//! `flush_async` returned (openraft's contract: acknowledged means on disk).

// openraft's trait methods return its `StorageError` (over 200 bytes); the helpers here
// return it too rather than converting at every call.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Entry, NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// A record that failed its checksum or could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Shorter than its checksum, or the checksum does not match.
    #[error("record checksum mismatch (corrupt data directory)")]
    Checksum,
    /// Not what this version writes.
    #[error("record undecodable: {0}")]
    Decode(#[from] postcard::Error),
}

/// Serializes `value` behind a CRC32 of the serialized bytes.
pub(crate) fn seal<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    let body = postcard::to_allocvec(value)?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks and deserializes a record written by [`seal`].
pub(crate) fn open<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    let (crc, body) = bytes.split_at_checked(4).ok_or(RecordError::Checksum)?;
    if crc32fast::hash(body).to_be_bytes() != crc {
        return Err(RecordError::Checksum);
    }
    Ok(postcard::from_bytes(body)?)
}

fn io_error(subject: ErrorSubject<NodeId>, verb: ErrorVerb, e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn read_logs_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_error(ErrorSubject::Logs, ErrorVerb::Read, e)
}

fn write_logs_error(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    io_error(ErrorSubject::Logs, ErrorVerb::Write, e)
}

/// The log store (cheap to clone: sled trees are shared handles).
#[derive(Debug, Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// The last committed index openraft reported (for the metrics).
    committed: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    /// The log kept in `db`.
    pub fn open(db: &sled::Db) -> Result<LogStore, sled::Error> {
        Ok(LogStore { db: db.clone(), log: db.open_tree("log")?, meta: db.open_tree("meta")?, committed: Default::default() })
    }

    /// The counter behind [`LogStore::committed_index`], shared.
    pub(crate) fn committed_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        std::sync::Arc::clone(&self.committed)
    }

    /// The last committed index this node knows of.
    pub fn committed_index(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8], subject: ErrorSubject<NodeId>) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(key).map_err(|e| io_error(subject.clone(), ErrorVerb::Read, e))? {
            Some(bytes) => Ok(Some(open(&bytes).map_err(|e| io_error(subject, ErrorVerb::Read, e))?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &[u8], value: &T, subject: ErrorSubject<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = seal(value).map_err(|e| io_error(subject.clone(), ErrorVerb::Write, e))?;
        self.meta.insert(key, bytes).map_err(|e| io_error(subject.clone(), ErrorVerb::Write, e))?;
        self.db.flush_async().await.map_err(|e| io_error(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        match self.log.last().map_err(read_logs_error)? {
            Some((_, bytes)) => Ok(Some(open::<Entry>(&bytes).map_err(read_logs_error)?.log_id)),
            None => Ok(None),
        }
    }

    /// Number of entries held (the `raftmq_raft_log_entries` gauge).
    pub fn len(&self) -> usize {
        self.log.len()
    }

    /// True when the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.log.is_empty()
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => key(*i),
            Bound::Excluded(i) => key(i.saturating_add(1)),
            Bound::Unbounded => key(0),
        };
        let mut entries = Vec::new();
        for item in self.log.range(start..) {
            let (k, bytes) = item.map_err(read_logs_error)?;
            let index = u64::from_be_bytes(k.as_ref().try_into().map_err(|_| read_logs_error(RecordError::Checksum))?);
            if !range.contains(&index) {
                break;
            }
            entries.push(open::<Entry>(&bytes).map_err(read_logs_error)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(LAST_PURGED, ErrorSubject::Logs)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed on its own: a lost committed id only means re-applying less at start,
        // and the next append's flush carries it.
        let bytes = seal(&committed).map_err(write_logs_error)?;
        self.meta.insert(COMMITTED, bytes).map_err(write_logs_error)?;
        self.committed.store(committed.map_or(0, |c| c.index), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED, ErrorSubject::Logs)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = seal(&entry).map_err(|e| io_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, e))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.log.apply_batch(batch).map_err(write_logs_error)?;
        let flushed = self.db.flush_async().await.map(|_| ()).map_err(std::io::Error::other);
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(write_logs_error)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_logs_error)?;
        self.db.flush_async().await.map_err(write_logs_error)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // The purge mark first: a crash in between leaves entries below the mark, which
        // reads skip, never a hole above it.
        self.put_meta(LAST_PURGED, &log_id, ErrorSubject::Logs).await?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(write_logs_error)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_logs_error)?;
        Ok(())
    }
}
