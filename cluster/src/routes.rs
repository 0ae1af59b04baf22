//! The route table: which nodes have subscribers for which filters.
//!
//! API boundary: the node's subscription index decides every change of this node's routes
//! under its own lock and numbers it (a per-node sequence); the broker hands the changes to
//! [`RouteTable::apply`], which applies them in sequence order even when they arrive out of
//! order, so a concurrent last-unsubscribe and first-subscribe of one filter cannot end in
//! the wrong state. The same ordered stream is what peers receive (issue 12). A route is a
//! parsed (share group, filter); a shared route carries how many members of its group this
//! node has. [`RouteTable::remote_matches`] answers which other nodes, and which shared
//! groups without a local member, want a topic: nothing, on a node without peers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::message::Message;
use crate::{NodeId, StoreError};

/// A filter a node has subscribers for: plain, or for one shared group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    /// The share group (`$share/{group}/...`), `None` for a plain subscription.
    pub group: Option<Arc<str>>,
    /// The topic filter (without any `$share/{group}/` prefix).
    pub filter: Arc<str>,
}

/// A change of this node's routes, numbered in the order the index decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    /// Per-node sequence number, from 1, without gaps.
    pub seq: u64,
    /// The route.
    pub route: Route,
    /// Local subscribers now: for a shared route the group's members on this node, for a
    /// plain one 1; 0 withdraws the route.
    pub members: u32,
}

/// What other nodes want of a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteMatch {
    /// Nodes with at least one plain subscription matching the topic.
    pub nodes: Vec<NodeId>,
    /// Shared groups matching the topic that have members on other nodes, with how many
    /// members each node has (the publishing node picks one member cluster-wide).
    pub groups: Vec<RemoteGroup>,
}

impl RemoteMatch {
    /// Nothing wanted elsewhere.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.groups.is_empty()
    }

    /// The other nodes' members of shared route `route`.
    pub fn group(&self, route: &Route) -> Option<&RemoteGroup> {
        self.groups.iter().find(|g| g.route == *route)
    }
}

/// A shared group's members on other nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteGroup {
    /// The (group, filter).
    pub route: Route,
    /// Nodes with members, and how many each has.
    pub members: Vec<(NodeId, u32)>,
}

/// Where one forwarded copy goes: a node's plain subscribers, or one member of a shared
/// group on that node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTarget {
    /// The node.
    pub node: NodeId,
    /// The shared group, for a shared delivery.
    pub group: Option<Route>,
}

/// Copies on their way to other nodes: how many could not be sent, and the delivery
/// confirmations still to come (QoS >= 1).
#[derive(Debug, Default)]
pub struct ForwardReceipt {
    /// Copies that could not be queued for their peer.
    pub failed: usize,
    pending: Vec<tokio::sync::oneshot::Receiver<bool>>,
    bound: std::time::Duration,
}

impl ForwardReceipt {
    /// `failed` copies, nothing to wait for.
    pub fn failed(failed: usize) -> ForwardReceipt {
        ForwardReceipt { failed, ..ForwardReceipt::default() }
    }

    /// Copies queued whose delivery is confirmed through `pending`, each within `bound`.
    pub fn pending(failed: usize, pending: Vec<tokio::sync::oneshot::Receiver<bool>>, bound: std::time::Duration) -> ForwardReceipt {
        ForwardReceipt { failed, pending, bound }
    }

    /// Adds another receipt's copies to this one.
    pub fn merge(&mut self, other: ForwardReceipt) {
        self.failed += other.failed;
        self.pending.extend(other.pending);
        self.bound = self.bound.max(other.bound);
    }

    /// Nothing left to wait for.
    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Waits for the confirmations; returns how many copies were not delivered.
    pub async fn wait(self) -> usize {
        let mut failed = self.failed;
        for delivered in self.pending {
            if !matches!(tokio::time::timeout(self.bound, delivered).await, Ok(Ok(true))) {
                failed += 1;
            }
        }
        failed
    }
}

/// Cluster-wide map of routes -> nodes.
#[async_trait]
pub trait RouteTable: Send + Sync + 'static {
    /// Applies a change of this node's routes (in `seq` order, whatever the arrival order).
    /// Not async: it is called right after the index decided the change, with no await in
    /// between that a cancelled task could stop at, so no sequence number is ever lost.
    /// (A cluster table queues the change for its peers here; [`RouteTable::settle`]
    /// waits for their acknowledgement.)
    fn apply(&self, change: RouteChange);
    /// Resolves once every live peer has applied this node's changes up to `seq`, or has
    /// failed to within the configured bound (and is treated as failing): what a SUBACK
    /// waits for, so a PUBLISH to any node afterwards reaches the subscriber.
    async fn settle(&self, _seq: u64) {}
    /// What other nodes want of `topic`.
    fn remote_matches(&self, topic: &str) -> RemoteMatch;
    /// Queues `message` for `targets` without waiting (the common case, and no
    /// allocation for a future): returns the receipt of what was queued or failed, and the
    /// targets whose queues were full, for [`RouteTable::forward`] to wait for.
    fn try_forward(&self, message: &Arc<Message>, targets: Vec<ForwardTarget>) -> (ForwardReceipt, Vec<ForwardTarget>);
    /// Queues `message` for `targets` (once per node and group, however many subscribers
    /// there are there); resolves once queued (waiting for room at most the configured
    /// bound). The receipt says what could not be queued and, for QoS >= 1, resolves once
    /// the peers delivered it.
    async fn forward(&self, message: Arc<Message>, targets: Vec<ForwardTarget>) -> Result<ForwardReceipt, StoreError>;
    /// Number of routes this node holds (local and remote).
    fn count(&self) -> usize;
    /// The last change applied: what a peer's snapshot is consistent with.
    fn applied_seq(&self) -> u64;
}

/// The route table of a node without peers: its own routes, kept in sequence order.
#[derive(Debug, Default)]
pub struct LocalRoutes {
    state: Mutex<LocalState>,
}

#[derive(Debug, Default)]
struct LocalState {
    /// Plain filters with local subscribers. Sets of boxed strings, not tries: nothing is
    /// matched against local routes (the subscription index does that), and a set costs a
    /// fraction of the memory per filter.
    plain: HashSet<Box<str>>,
    /// Shared routes and their member counts on this node.
    shared: HashMap<(Box<str>, Box<str>), u32>,
    /// Last sequence number applied.
    applied: u64,
    /// Changes that arrived ahead of their turn.
    early: BTreeMap<u64, RouteChange>,
    /// The latest applied changes, oldest first, for peers catching up (at most
    /// `log_cap`; a peer further behind gets a snapshot).
    log: VecDeque<RouteChange>,
    log_cap: usize,
}

impl LocalState {
    fn apply_one(&mut self, change: RouteChange) {
        let RouteChange { seq, route, members } = change;
        match route.group {
            None if members > 0 => {
                self.plain.insert(Box::from(&*route.filter));
            }
            None => {
                self.plain.remove(&*route.filter);
            }
            Some(group) => {
                let key = (Box::from(&*group), Box::from(&*route.filter));
                if members > 0 {
                    self.shared.insert(key, members);
                } else {
                    self.shared.remove(&key);
                }
            }
        }
        self.applied = seq;
    }
}

/// What a peer needs to catch up with this node's routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// The changes after the peer's last sequence number, in order.
    Changes(Vec<RouteChange>),
    /// Every route (the peer is too far behind, or new): replaces what it holds.
    Snapshot(Vec<RouteChange>),
}

impl LocalRoutes {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table that remembers its latest `log_cap` changes for peers.
    pub fn with_log(log_cap: usize) -> Self {
        LocalRoutes { state: Mutex::new(LocalState { log_cap, ..LocalState::default() }) }
    }

    /// Applies `change` in sequence order; returns the sequence number applied up to.
    pub fn apply_in_order(&self, change: RouteChange) -> u64 {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if change.seq > state.applied {
            state.early.insert(change.seq, change);
        }
        loop {
            let next = state.applied + 1;
            let Some(change) = state.early.remove(&next) else { break };
            if state.log_cap > 0 {
                if state.log.len() >= state.log_cap {
                    state.log.pop_front();
                }
                state.log.push_back(change.clone());
            }
            state.apply_one(change);
        }
        state.applied
    }

    /// What a peer that has applied up to `since` needs, and the sequence number it
    /// brings the peer to.
    pub fn catch_up(&self, since: Option<u64>) -> (u64, CatchUp) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let applied = state.applied;
        if let Some(since) = since {
            let covered = since >= applied || state.log.front().is_some_and(|c| c.seq <= since + 1);
            if covered {
                let changes = state.log.iter().filter(|c| c.seq > since).cloned().collect();
                return (applied, CatchUp::Changes(changes));
            }
        }
        let plain =
            state.plain.iter().map(|f| RouteChange { seq: applied, route: Route { group: None, filter: Arc::from(&**f) }, members: 1 });
        let shared = state.shared.iter().map(|((g, f), n)| RouteChange {
            seq: applied,
            route: Route { group: Some(Arc::from(&**g)), filter: Arc::from(&**f) },
            members: *n,
        });
        (applied, CatchUp::Snapshot(plain.chain(shared).collect()))
    }

    /// Members of a shared group on this node (0 without a route).
    #[cfg(test)]
    fn shared_members(&self, group: &str, filter: &str) -> u32 {
        self.state.lock().map(|s| s.shared.get(&(Box::from(group), Box::from(filter))).copied().unwrap_or(0)).unwrap_or(0)
    }

    /// Whether a plain route exists for `filter`.
    #[cfg(test)]
    fn has_plain(&self, filter: &str) -> bool {
        self.state.lock().map(|s| s.plain.contains(filter)).unwrap_or(false)
    }
}

#[async_trait]
impl RouteTable for LocalRoutes {
    fn apply(&self, change: RouteChange) {
        self.apply_in_order(change);
    }

    fn remote_matches(&self, _topic: &str) -> RemoteMatch {
        RemoteMatch::default()
    }

    fn try_forward(&self, _message: &Arc<Message>, targets: Vec<ForwardTarget>) -> (ForwardReceipt, Vec<ForwardTarget>) {
        (ForwardReceipt::failed(targets.len()), Vec::new())
    }

    async fn forward(&self, _message: Arc<Message>, targets: Vec<ForwardTarget>) -> Result<ForwardReceipt, StoreError> {
        // A node without peers has nowhere to send to.
        Ok(ForwardReceipt::failed(targets.len()))
    }

    fn count(&self) -> usize {
        self.state.lock().map(|s| s.plain.len() + s.shared.len()).unwrap_or(0)
    }

    fn applied_seq(&self) -> u64 {
        self.state.lock().map(|s| s.applied).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(seq: u64, group: Option<&str>, filter: &str, members: u32) -> RouteChange {
        RouteChange { seq, route: Route { group: group.map(Arc::from), filter: Arc::from(filter) }, members }
    }

    #[test]
    fn changes_apply_in_sequence_order_whatever_the_arrival_order() {
        let r = LocalRoutes::new();
        // The last unsubscribe (2) arrives before the first subscribe (1): the route must
        // end withdrawn, then come back with 3.
        r.apply(change(2, None, "a/+", 0));
        assert_eq!((r.count(), r.applied_seq()), (0, 0), "2 waits for 1");
        r.apply(change(1, None, "a/+", 1));
        assert_eq!((r.has_plain("a/+"), r.applied_seq()), (false, 2));
        r.apply(change(4, Some("g"), "b/#", 2));
        r.apply(change(3, Some("g"), "b/#", 1));
        assert_eq!(r.shared_members("g", "b/#"), 2);
        r.apply(change(3, Some("g"), "b/#", 7));
        assert_eq!(r.shared_members("g", "b/#"), 2, "a change already applied is ignored");
        r.apply(change(5, Some("g"), "b/#", 0));
        assert_eq!((r.count(), r.applied_seq()), (0, 5));
        assert_eq!(r.remote_matches("a/b"), RemoteMatch::default());
    }

    /// A peer a few changes behind gets exactly those changes; one further behind than
    /// the log reaches, or new, gets a snapshot of every route.
    #[test]
    fn peers_catch_up_with_changes_or_a_snapshot() {
        let r = LocalRoutes::with_log(2);
        r.apply(change(1, None, "a", 1));
        r.apply(change(2, Some("g"), "b", 3));
        r.apply(change(3, None, "c", 1));
        assert_eq!(r.catch_up(Some(2)), (3, CatchUp::Changes(vec![change(3, None, "c", 1)])));
        assert_eq!(r.catch_up(Some(3)), (3, CatchUp::Changes(vec![])));
        let (seq, CatchUp::Snapshot(mut all)) = r.catch_up(Some(0)) else { unreachable!("snapshot expected") };
        all.sort_by(|a, b| a.route.cmp(&b.route));
        assert_eq!((seq, all.len()), (3, 3));
        assert!(matches!(r.catch_up(None), (3, CatchUp::Snapshot(_))));
    }
}
