//! The local subscription index: topic filter -> (session slot -> options).
//!
//! Routing a message asks the index which sessions match, folds several matching
//! subscriptions of one client into a single delivery (highest QoS, every subscription
//! identifier [MQTT-3.3.4-3], [MQTT-3.3.4-5]) and honours No Local [MQTT-3.8.3-3].
//! Ordinary subscriptions hold the session slot itself, so a delivery goes straight into
//! its queue without a lookup by client id.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use raftmq_cluster::message::Message;
use raftmq_cluster::routes::{Route, RouteChange};
use raftmq_cluster::session::{QueuedMessage, ShareTarget, SubscriptionOptions};
use raftmq_cluster::topic::TopicTrie;

use crate::session::SessionSlot;

/// A session in the index, compared by identity: a discarded and recreated session of the
/// same client id is another subscriber.
#[derive(Debug, Clone)]
pub struct Subscriber(pub Arc<SessionSlot>);

impl PartialEq for Subscriber {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Subscriber {}

impl std::hash::Hash for Subscriber {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

/// Key of a shared subscription in the index: which group and filter, which member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SharedKey {
    /// The group and filter.
    pub target: Arc<ShareTarget>,
    /// The member's client id.
    pub client_id: Arc<str>,
}

/// Members of one shared subscription that match a message, sorted by client id.
pub type SharedMatch = (Arc<ShareTarget>, Vec<(Arc<str>, SubscriptionOptions)>);

/// Subscriptions of every client on this node.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// std `RwLock`: many concurrent routers read, subscribe/unsubscribe write briefly.
    trie: RwLock<TopicTrie<Subscriber, SubscriptionOptions>>,
    /// Shared subscriptions, indexed by their filter (without the `$share/{group}/` prefix).
    shared: RwLock<TopicTrie<SharedKey, SubscriptionOptions>>,
    /// Number of shared subscription memberships, so routing skips the shared trie when 0.
    shared_members: std::sync::atomic::AtomicUsize,
    /// Sequence number of the last route change decided (under the trie's write lock).
    route_seq: std::sync::atomic::AtomicU64,
}

impl SubscriptionIndex {
    /// The next route change, numbered. Called with the write lock of the trie it concerns
    /// held, so changes of one route are numbered in the order they happened.
    fn route_change(&self, group: Option<&Arc<str>>, filter: &str, members: u32) -> RouteChange {
        let seq = self.route_seq.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        RouteChange { seq, route: Route { group: group.cloned(), filter: Arc::from(filter) }, members }
    }

    /// Adds or replaces a subscription. Returns whether the client already had this filter,
    /// and the route change if the filter is new on this node.
    pub fn subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> (bool, Option<RouteChange>) {
        let mut trie = self.trie.write().unwrap_or_else(|p| p.into_inner());
        let (previous, new_route) = trie.insert(filter, Subscriber(Arc::clone(slot)), options);
        (previous.is_some(), new_route.then(|| self.route_change(None, filter, 1)))
    }

    /// Removes a subscription. Returns whether it existed, and the route change if the filter
    /// has no subscribers left on this node.
    pub fn unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> (bool, Option<RouteChange>) {
        let mut trie = self.trie.write().unwrap_or_else(|p| p.into_inner());
        let (removed, route_gone) = trie.remove(filter, &Subscriber(Arc::clone(slot)));
        if route_gone {
            trie.prune(filter);
        }
        (removed.is_some(), route_gone.then(|| self.route_change(None, filter, 0)))
    }

    /// Adds or replaces a shared subscription. Returns whether the member existed, and the
    /// route change (the group's member count here) if it joined.
    pub fn subscribe_shared(&self, key: SharedKey, options: SubscriptionOptions) -> (bool, Option<RouteChange>) {
        let mut trie = self.shared.write().unwrap_or_else(|p| p.into_inner());
        let filter = Arc::clone(&key.target.filter);
        let (previous, _) = trie.insert(&filter, key.clone(), options);
        if previous.is_some() {
            return (true, None);
        }
        self.shared_members.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let members = Self::members_of(&trie, &key.target);
        (false, Some(self.route_change(Some(&key.target.group), &filter, members)))
    }

    /// Removes a shared subscription. Returns whether it existed, and the route change (the
    /// members left here; 0 withdraws the group's route) if it did.
    pub fn unsubscribe_shared(&self, key: &SharedKey) -> (bool, Option<RouteChange>) {
        let mut trie = self.shared.write().unwrap_or_else(|p| p.into_inner());
        let (removed, filter_empty) = trie.remove(&key.target.filter, key);
        if filter_empty {
            trie.prune(&key.target.filter);
        }
        if removed.is_none() {
            return (false, None);
        }
        self.shared_members.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let members = Self::members_of(&trie, &key.target);
        (true, Some(self.route_change(Some(&key.target.group), &key.target.filter, members)))
    }

    fn members_of(trie: &TopicTrie<SharedKey, SubscriptionOptions>, target: &ShareTarget) -> u32 {
        let mut members = 0u32;
        trie.for_each_filter_value(&target.filter, |k, _| members += u32::from(*k.target == *target));
        members
    }

    /// Whether any subscription (plain, not excluded by No Local, or shared) matches the
    /// message: the walk stops at the first, and builds no delivery.
    pub fn matches_any(&self, message: &Message) -> bool {
        let plain = self
            .trie
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .any_match(&message.topic, |sub, opts| !(opts.no_local && *sub.0.client_id == *message.publisher));
        plain
            || (self.shared_members.load(std::sync::atomic::Ordering::Relaxed) > 0
                && self.shared.read().unwrap_or_else(|p| p.into_inner()).any_match(&message.topic, |_, _| true))
    }

    /// Every shared subscription matching the message, with its members.
    pub fn shared_matches(&self, message: &Message) -> Vec<SharedMatch> {
        if self.shared_members.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut groups: HashMap<Arc<ShareTarget>, Vec<(Arc<str>, SubscriptionOptions)>> = HashMap::new();
        let trie = self.shared.read().unwrap_or_else(|p| p.into_inner());
        trie.for_each_match(&message.topic, |key, opts| {
            groups.entry(Arc::clone(&key.target)).or_default().push((Arc::clone(&key.client_id), *opts));
        });
        drop(trie);
        let mut out: Vec<SharedMatch> = groups.into_iter().collect();
        for (_, members) in &mut out {
            members.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out
    }

    /// Members of one shared subscription, sorted by client id.
    pub fn shared_members(&self, target: &ShareTarget) -> Vec<(Arc<str>, SubscriptionOptions)> {
        let trie = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let mut members = Vec::new();
        trie.for_each_filter_value(&target.filter, |k, v| {
            if *k.target == *target {
                members.push((Arc::clone(&k.client_id), *v));
            }
        });
        members.sort_by(|a, b| a.0.cmp(&b.0));
        members
    }

    /// Number of distinct shared subscriptions (group and filter).
    pub fn shared_count(&self) -> usize {
        let trie = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let mut targets = std::collections::HashSet::new();
        trie.for_each_value(|k, _| {
            targets.insert(Arc::clone(&k.target));
        });
        targets.len()
    }

    /// Number of distinct filters (ordinary and shared).
    pub fn filter_count(&self) -> usize {
        self.trie.read().map(|t| t.filter_count()).unwrap_or(0) + self.shared.read().map(|t| t.filter_count()).unwrap_or(0)
    }

    /// One delivery per matching session. Matches are collected into one vector and a
    /// session matched by several filters is folded by sorting on the slot's address,
    /// without a map per message.
    pub fn deliveries(&self, message: &Arc<Message>) -> Vec<(Arc<SessionSlot>, QueuedMessage)> {
        let mut matches: Vec<(Arc<SessionSlot>, SubscriptionOptions)> = Vec::new();
        {
            let trie = self.trie.read().unwrap_or_else(|p| p.into_inner());
            trie.for_each_match(&message.topic, |sub, opts| {
                if !(opts.no_local && *sub.0.client_id == *message.publisher) {
                    matches.push((Arc::clone(&sub.0), *opts));
                }
            });
        }
        if matches.len() > 1 {
            matches.sort_unstable_by_key(|(slot, _)| Arc::as_ptr(slot) as usize);
        }
        let mut out: Vec<(Arc<SessionSlot>, QueuedMessage)> = Vec::with_capacity(matches.len());
        for (slot, opts) in matches {
            let qos = opts.qos.min(message.qos);
            let retain = opts.retain_as_published && message.retain;
            match out.last_mut() {
                Some((last, entry)) if Arc::ptr_eq(last, &slot) => {
                    entry.qos = entry.qos.max(qos);
                    entry.retain |= retain;
                    entry.subscription_ids.extend(opts.subscription_identifier);
                }
                _ => out.push((
                    slot,
                    QueuedMessage {
                        message: Arc::clone(message),
                        qos,
                        retain,
                        subscription_ids: opts.subscription_identifier.into_iter().collect(),
                        shared: None,
                        seq: 0,
                        origin: None,
                    },
                )),
            }
        }
        out
    }
}
