//! Shared subscriptions (`$share/{group}/{filter}` and `$queue/{filter}`): parsing, and the
//! choice of one member per message by the configured strategy.
//!
//! A message matching a shared subscription goes to exactly one member of the group.
//! Members with a live connection are preferred; when none is online, an offline persistent
//! member queues the message.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use raftmq_cluster::message::Message;
use raftmq_cluster::session::ShareTarget;
use raftmq_cluster::NodeId;
use serde::Deserialize;

/// How a shared group picks the member for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Take turns per (group, filter).
    #[default]
    RoundRobin,
    /// Take turns per group, across all of its filters.
    RoundRobinPerGroup,
    /// Pick uniformly at random.
    Random,
    /// Keep sending to one member until it leaves.
    Sticky,
    /// Same publisher, same member.
    HashClientid,
    /// Same topic, same member.
    HashTopic,
    /// Prefer members on this node (on a single node: random).
    Local,
    /// The member with the fewest messages in flight and queued.
    LeastInflight,
}

/// Why a shared subscription filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    /// `$share/{group}` without a filter.
    #[error("shared subscription without a topic filter")]
    MissingFilter,
    /// Empty share name or one containing `+` or `#` [MQTT-4.8.2-1], [MQTT-4.8.2-2].
    #[error("invalid share name")]
    InvalidShareName,
}

/// Group name used for `$queue/{filter}` subscriptions.
pub const QUEUE_GROUP: &str = "$queue";

/// Splits a shared subscription filter into (group, filter); `Ok(None)` for an ordinary one.
pub fn parse(filter: &str) -> Result<Option<(&str, &str)>, ShareError> {
    if let Some(rest) = filter.strip_prefix("$queue/") {
        return Ok(Some((QUEUE_GROUP, rest)));
    }
    if filter == "$share" || filter == "$queue" {
        return Err(ShareError::MissingFilter);
    }
    let Some(rest) = filter.strip_prefix("$share/") else { return Ok(None) };
    let (group, topic) = rest.split_once('/').ok_or(ShareError::MissingFilter)?;
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(ShareError::InvalidShareName);
    }
    Ok(Some((group, topic)))
}

/// The topic filter a subscription matches with: without its `$share/{group}/` (or
/// `$queue/`) prefix; `None` for a malformed shared filter.
pub fn topic_filter(filter: &str) -> Option<&str> {
    match parse(filter) {
        Ok(Some((_, inner))) => Some(inner),
        Ok(None) => Some(filter),
        Err(_) => None,
    }
}

/// What the dispatcher needs to know about a candidate member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLoad {
    /// A connection is attached.
    pub online: bool,
    /// Messages in flight plus queued.
    pub pending: usize,
}

/// Strategy state: turn counters and sticky choices.
#[derive(Debug, Default)]
pub struct Dispatcher {
    strategy: Strategy,
    /// std `Mutex`: one short map update per shared delivery.
    turns: Mutex<HashMap<Arc<ShareTarget>, usize>>,
    group_turns: Mutex<HashMap<Arc<str>, usize>>,
    sticky: Mutex<HashMap<Arc<ShareTarget>, Arc<str>>>,
    /// Turns across the cluster's members (which node delivers).
    node_turns: Mutex<HashMap<Arc<ShareTarget>, usize>>,
}

/// The same on every node (hash strategies must agree across the cluster).
fn hash_of(s: &str) -> usize {
    raftmq_cluster::stable_hash(s.as_bytes()) as usize
}

fn next_turn<K: Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: K) -> usize {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    let turn = map.entry(key).or_insert(0);
    let now = *turn;
    *turn = turn.wrapping_add(1);
    now
}

impl Dispatcher {
    /// A dispatcher for `strategy`.
    pub fn new(strategy: Strategy) -> Dispatcher {
        Dispatcher { strategy, ..Dispatcher::default() }
    }

    /// Orders `members` (client ids, sorted) by preference for `message`: the strategy's
    /// choice first, then the others as fallbacks. Offline members come after online ones.
    pub fn order(
        &self,
        target: &Arc<ShareTarget>,
        members: &[Arc<str>],
        message: &Message,
        load: impl Fn(&str) -> MemberLoad,
    ) -> Vec<Arc<str>> {
        let loads: Vec<MemberLoad> = members.iter().map(|m| load(m)).collect();
        let online: Vec<usize> = (0..members.len()).filter(|i| loads[*i].online).collect();
        let pool: Vec<usize> = if online.is_empty() { (0..members.len()).collect() } else { online };
        if pool.is_empty() {
            return Vec::new();
        }
        let n = pool.len();
        let first = match self.strategy {
            Strategy::RoundRobin => next_turn(&self.turns, Arc::clone(target)) % n,
            Strategy::RoundRobinPerGroup => next_turn(&self.group_turns, Arc::clone(&target.group)) % n,
            Strategy::Random | Strategy::Local => fastrand::usize(..n),
            Strategy::HashClientid => hash_of(&message.publisher) % n,
            Strategy::HashTopic => hash_of(&message.topic) % n,
            Strategy::LeastInflight => (0..n).min_by_key(|i| loads[pool[*i]].pending).unwrap_or(0),
            Strategy::Sticky => {
                let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
                let current = sticky.get(target).and_then(|c| pool.iter().position(|i| members[*i] == *c));
                match current {
                    Some(pos) => pos,
                    None => {
                        let pos = fastrand::usize(..n);
                        sticky.insert(Arc::clone(target), Arc::clone(&members[pool[pos]]));
                        pos
                    }
                }
            }
        };
        let mut order: Vec<Arc<str>> = (0..n).map(|k| Arc::clone(&members[pool[(first + k) % n]])).collect();
        // Offline members are the last resort when every online member refused.
        if pool.len() < members.len() {
            order.extend((0..members.len()).filter(|i| !loads[*i].online).map(|i| Arc::clone(&members[i])));
        }
        order
    }

    /// Picks the node that delivers a message to a group with `local` members on this
    /// node (`me`) and `remote` members elsewhere: `None` for this node. Every member in the
    /// cluster weighs the same; nodes are taken in id order, so the hash strategies pick
    /// the same node from every publishing node.
    pub fn pick_node(
        &self,
        target: &Arc<ShareTarget>,
        me: NodeId,
        local: usize,
        remote: &[(NodeId, u32)],
        message: &Message,
    ) -> Option<NodeId> {
        let mut nodes: Vec<(NodeId, usize)> = remote.iter().map(|(n, c)| (*n, *c as usize)).filter(|(n, c)| *c > 0 && *n != me).collect();
        if nodes.is_empty() {
            return None;
        }
        if local > 0 {
            if self.strategy == Strategy::Local {
                return None;
            }
            nodes.push((me, local));
        }
        nodes.sort_unstable();
        let total: usize = nodes.iter().map(|(_, c)| c).sum();
        let mut at = match self.strategy {
            Strategy::Random | Strategy::Local | Strategy::LeastInflight | Strategy::Sticky => fastrand::usize(..total),
            Strategy::HashClientid => hash_of(&message.publisher) % total,
            Strategy::HashTopic => hash_of(&message.topic) % total,
            Strategy::RoundRobin | Strategy::RoundRobinPerGroup => next_turn(&self.node_turns, Arc::clone(target)) % total,
        };
        for (node, count) in nodes {
            if at < count {
                return (node != me).then_some(node);
            }
            at -= count;
        }
        None
    }

    /// Forgets the state of a group/filter that has no members left.
    pub fn forget(&self, target: &ShareTarget) {
        self.turns.lock().unwrap_or_else(|p| p.into_inner()).remove(target);
        self.sticky.lock().unwrap_or_else(|p| p.into_inner()).remove(target);
        self.node_turns.lock().unwrap_or_else(|p| p.into_inner()).remove(target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_cluster::message::QoS;

    #[test]
    fn parse_share_filters_b18() {
        assert_eq!(parse("$share/g/a/b"), Ok(Some(("g", "a/b"))));
        assert_eq!(parse("$queue/a/#"), Ok(Some(("$queue", "a/#"))));
        assert_eq!(parse("a/b"), Ok(None));
        assert_eq!(parse("$share/g"), Err(ShareError::MissingFilter));
        assert_eq!(parse("$share//t"), Err(ShareError::InvalidShareName));
        assert_eq!(parse("$share/g+/t"), Err(ShareError::InvalidShareName));
        assert_eq!(parse("$share/g/"), Ok(Some(("g", ""))));
    }

    fn msg(publisher: &str) -> Message {
        Message {
            topic: "t".into(),
            payload: Default::default(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Default::default(),
            received_at_us: 0,
            publisher: publisher.into(),
        }
    }

    #[test]
    fn round_robin_takes_turns_and_prefers_online() {
        let d = Dispatcher::new(Strategy::RoundRobin);
        let t = Arc::new(ShareTarget { group: "g".into(), filter: "t".into() });
        let members: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let online = |_: &str| MemberLoad { online: true, pending: 0 };
        let firsts: Vec<String> = (0..6).map(|_| d.order(&t, &members, &msg("p"), online)[0].to_string()).collect();
        assert_eq!(firsts, ["a", "b", "c", "a", "b", "c"]);
        let only_b = |m: &str| MemberLoad { online: m == "b", pending: 0 };
        let order = d.order(&t, &members, &msg("p"), only_b);
        assert_eq!(order[0].as_ref(), "b");
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn every_strategy_picks_an_online_member_first() {
        let t = Arc::new(ShareTarget { group: "g".into(), filter: "t".into() });
        let members: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let only_c = |m: &str| MemberLoad { online: m == "c", pending: 0 };
        for strategy in [
            Strategy::RoundRobin,
            Strategy::RoundRobinPerGroup,
            Strategy::Random,
            Strategy::Sticky,
            Strategy::HashClientid,
            Strategy::HashTopic,
            Strategy::Local,
            Strategy::LeastInflight,
        ] {
            let d = Dispatcher::new(strategy);
            for _ in 0..5 {
                let order = d.order(&t, &members, &msg("p"), only_c);
                assert_eq!(order[0].as_ref(), "c", "{strategy:?}");
                assert_eq!(order.len(), 3, "offline members stay as fallbacks");
            }
        }
    }

    #[test]
    fn round_robin_per_group_turns_across_filters() {
        let d = Dispatcher::new(Strategy::RoundRobinPerGroup);
        let t1 = Arc::new(ShareTarget { group: "g".into(), filter: "x".into() });
        let t2 = Arc::new(ShareTarget { group: "g".into(), filter: "y".into() });
        let members: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        let online = |_: &str| MemberLoad { online: true, pending: 0 };
        assert_eq!(d.order(&t1, &members, &msg("p"), online)[0].as_ref(), "a");
        assert_eq!(d.order(&t2, &members, &msg("p"), online)[0].as_ref(), "b");
        assert_eq!(d.order(&t1, &members, &msg("p"), online)[0].as_ref(), "a");
    }

    #[test]
    fn random_spreads_over_members() {
        let d = Dispatcher::new(Strategy::Random);
        let t = Arc::new(ShareTarget { group: "g".into(), filter: "t".into() });
        let members: Vec<Arc<str>> = vec!["a".into(), "b".into()];
        let online = |_: &str| MemberLoad { online: true, pending: 0 };
        let a = (0..1000).filter(|_| d.order(&t, &members, &msg("p"), online)[0].as_ref() == "a").count();
        assert!((350..650).contains(&a), "{a}");
    }

    #[test]
    fn hash_and_sticky_and_least_inflight_are_stable() {
        let t = Arc::new(ShareTarget { group: "g".into(), filter: "t".into() });
        let members: Vec<Arc<str>> = vec!["a".into(), "b".into(), "c".into()];
        let online = |_: &str| MemberLoad { online: true, pending: 0 };
        let d = Dispatcher::new(Strategy::HashClientid);
        let first = d.order(&t, &members, &msg("p1"), online)[0].clone();
        assert!((0..10).all(|_| d.order(&t, &members, &msg("p1"), online)[0] == first));
        let d = Dispatcher::new(Strategy::Sticky);
        let first = d.order(&t, &members, &msg("x"), online)[0].clone();
        assert!((0..10).all(|_| d.order(&t, &members, &msg("y"), online)[0] == first));
        let d = Dispatcher::new(Strategy::LeastInflight);
        let busy = |m: &str| MemberLoad { online: true, pending: if m == "b" { 0 } else { 5 } };
        assert_eq!(d.order(&t, &members, &msg("x"), busy)[0].as_ref(), "b");
    }
}
