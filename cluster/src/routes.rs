//! The route table: which nodes have subscribers for which filters.
//!
//! API boundary: the broker reports the first subscriber of a filter on this node
//! ([`RouteTable::add`]) and the last one leaving ([`RouteTable::remove`]), and asks which
//! other nodes want a topic ([`RouteTable::remote_nodes`]). On a single node there are no
//! peers, so [`LocalRoutes`] only keeps the local routes (for counting and for the snapshot
//! a peer gets when it joins).

use std::collections::HashSet;
use std::sync::RwLock;

use async_trait::async_trait;

use crate::NodeId;

/// Cluster-wide map of filter -> nodes.
#[async_trait]
pub trait RouteTable: Send + Sync + 'static {
    /// This node has its first subscriber on `filter`.
    async fn add(&self, filter: &str);
    /// This node's last subscriber on `filter` has gone.
    async fn remove(&self, filter: &str);
    /// Other nodes with at least one subscription matching `topic`.
    fn remote_nodes(&self, topic: &str) -> Vec<NodeId>;
    /// Number of routes this node holds (local and remote).
    fn count(&self) -> usize;
}

/// The route table of a node without peers.
#[derive(Debug, Default)]
pub struct LocalRoutes {
    /// The filters with local subscribers. A set, not a trie: nothing is matched against
    /// local routes (the subscription index does that), and a set costs a fraction of the
    /// memory per filter. std `RwLock`: updates are rare and short.
    local: RwLock<HashSet<Box<str>>>,
}

impl LocalRoutes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl RouteTable for LocalRoutes {
    async fn add(&self, filter: &str) {
        if let Ok(mut t) = self.local.write() {
            t.insert(Box::from(filter));
        }
    }

    async fn remove(&self, filter: &str) {
        if let Ok(mut t) = self.local.write() {
            t.remove(filter);
        }
    }

    fn remote_nodes(&self, _topic: &str) -> Vec<NodeId> {
        Vec::new()
    }

    fn count(&self) -> usize {
        self.local.read().map(|t| t.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_routes_count_filters() {
        let r = LocalRoutes::new();
        r.add("a/+").await;
        r.add("a/+").await;
        r.add("b").await;
        assert_eq!(r.count(), 2);
        r.remove("a/+").await;
        assert_eq!(r.count(), 1);
        assert!(r.remote_nodes("b").is_empty());
    }
}
