//! The client registry: which node owns each client id, under which epoch.
//!
//! Claiming a client id raises its epoch. Everything a node does for a session on its own
//! initiative later (session expiry, a delayed will, discarding the session) first checks
//! that its epoch is still the current one, so an old owner (a node that was paused,
//! partitioned, or just slow to notice a takeover elsewhere) can never remove or publish
//! for a session claimed since. On a single node the registry is in memory; the Raft store
//! replicates it (issue 13) behind the same trait.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{NodeId, StoreError};

/// An ownership generation of a client id; raised by every claim.
pub type Epoch = u64;

/// Who owns a client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The node the client is (or was last) connected to.
    pub node: NodeId,
    /// The epoch of that node's claim.
    pub epoch: Epoch,
}

/// Client id -> owner node and epoch.
#[async_trait]
pub trait ClientRegistry: Send + Sync + 'static {
    /// Claims `client_id` for `node`: returns the new epoch, higher than any before and than
    /// `above` (the highest epoch another node reported for it).
    async fn claim(&self, client_id: &str, node: NodeId, above: Epoch) -> Result<Epoch, StoreError>;
    /// The current claim of `client_id`.
    fn current(&self, client_id: &str) -> Option<Claim>;
    /// Forgets `client_id` if `epoch` is still its current epoch (the session ended);
    /// returns whether it did. A stale epoch changes nothing.
    async fn release(&self, client_id: &str, epoch: Epoch) -> Result<bool, StoreError>;
    /// Whether `epoch` is the current epoch of `client_id`.
    fn is_current(&self, client_id: &str, epoch: Epoch) -> bool {
        self.current(client_id).is_some_and(|c| c.epoch == epoch)
    }
    /// Number of client ids claimed.
    fn len(&self) -> usize;
    /// True when nothing is claimed.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The registry of a node without peers (or of several brokers in one process, in tests).
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    claims: Mutex<HashMap<Box<str>, Claim>>,
    /// Epochs keep rising across releases, so a released and re-claimed id never reuses
    /// an epoch an old timer may still hold.
    next: Mutex<Epoch>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every claim and the epoch counter.
    pub fn export(&self) -> (Vec<(String, Claim)>, Epoch) {
        let claims = self.claims.lock().map(|c| c.iter().map(|(id, c)| (id.to_string(), *c)).collect()).unwrap_or_default();
        (claims, self.next.lock().map(|n| *n).unwrap_or(0))
    }

    /// The nodes that claim at least one client id.
    pub fn owners(&self) -> std::collections::BTreeSet<NodeId> {
        self.claims.lock().map(|c| c.values().map(|claim| claim.node).collect()).unwrap_or_default()
    }

    /// Whether any client id is claimed by `node`.
    pub fn owns_any(&self, node: NodeId) -> bool {
        self.claims.lock().is_ok_and(|c| c.values().any(|claim| claim.node == node))
    }

    /// Replaces every claim and the counter (a snapshot being installed).
    pub fn replace_all(&self, claims: Vec<(String, Claim)>, next: Epoch) -> Result<(), StoreError> {
        *self.claims.lock().map_err(|_| StoreError::Poisoned)? = claims.into_iter().map(|(id, c)| (id.into_boxed_str(), c)).collect();
        *self.next.lock().map_err(|_| StoreError::Poisoned)? = next;
        Ok(())
    }
}

#[async_trait]
impl ClientRegistry for MemoryRegistry {
    async fn claim(&self, client_id: &str, node: NodeId, above: Epoch) -> Result<Epoch, StoreError> {
        let mut next = self.next.lock().map_err(|_| StoreError::Poisoned)?;
        *next = (*next).max(above) + 1;
        let epoch = *next;
        self.claims.lock().map_err(|_| StoreError::Poisoned)?.insert(Box::from(client_id), Claim { node, epoch });
        Ok(epoch)
    }

    fn current(&self, client_id: &str) -> Option<Claim> {
        self.claims.lock().ok()?.get(client_id).copied()
    }

    async fn release(&self, client_id: &str, epoch: Epoch) -> Result<bool, StoreError> {
        let mut claims = self.claims.lock().map_err(|_| StoreError::Poisoned)?;
        if claims.get(client_id).is_some_and(|c| c.epoch == epoch) {
            claims.remove(client_id);
            return Ok(true);
        }
        Ok(false)
    }

    fn len(&self) -> usize {
        self.claims.lock().map(|c| c.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_raise_the_epoch_and_stale_releases_change_nothing() -> Result<(), StoreError> {
        let r = MemoryRegistry::new();
        let first = r.claim("c", 1, 0).await?;
        let second = r.claim("c", 2, 0).await?;
        assert!(second > first);
        assert_eq!(r.current("c"), Some(Claim { node: 2, epoch: second }));
        assert!(!r.release("c", first).await?, "the old owner cannot release");
        assert!(r.is_current("c", second));
        assert!(r.release("c", second).await?);
        assert_eq!(r.current("c"), None);
        let third = r.claim("c", 1, 0).await?;
        assert!(third > second, "epochs never repeat");
        assert!(r.claim("c", 1, 100).await? > 100, "above another node's epoch");
        Ok(())
    }
}
