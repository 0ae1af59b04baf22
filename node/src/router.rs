//! The local subscription index: topic filter -> (client id -> options).
//!
//! Routing a message asks the index which clients match, folds several matching
//! subscriptions of one client into a single delivery (highest QoS, every subscription
//! identifier [MQTT-3.3.4-3], [MQTT-3.3.4-5]) and honours No Local [MQTT-3.8.3-3].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use raftmq_cluster::message::{Message, QoS};
use raftmq_cluster::session::{QueuedMessage, SubscriptionOptions};
use raftmq_cluster::topic::TopicTrie;

/// Subscriptions of every client on this node.
#[derive(Debug, Default)]
pub struct SubscriptionIndex {
    /// std `RwLock`: many concurrent routers read, subscribe/unsubscribe write briefly.
    trie: RwLock<TopicTrie<Arc<str>, SubscriptionOptions>>,
}

impl SubscriptionIndex {
    /// Adds or replaces a subscription. Returns whether the client already had this filter
    /// and whether the filter is new on this node (a route to announce).
    pub fn subscribe(&self, client_id: &Arc<str>, filter: &str, options: SubscriptionOptions) -> (bool, bool) {
        let mut trie = self.trie.write().unwrap_or_else(|p| p.into_inner());
        let (previous, new_route) = trie.insert(filter, Arc::clone(client_id), options);
        (previous.is_some(), new_route)
    }

    /// Removes a subscription. Returns whether it existed and whether the filter has no
    /// subscribers left on this node (a route to withdraw).
    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &str) -> (bool, bool) {
        let mut trie = self.trie.write().unwrap_or_else(|p| p.into_inner());
        let (removed, route_gone) = trie.remove(filter, client_id);
        if route_gone {
            trie.prune(filter);
        }
        (removed.is_some(), route_gone)
    }

    /// Number of distinct filters.
    pub fn filter_count(&self) -> usize {
        self.trie.read().map(|t| t.filter_count()).unwrap_or(0)
    }

    /// One delivery per matching client.
    pub fn deliveries(&self, message: &Arc<Message>) -> Vec<(Arc<str>, QueuedMessage)> {
        let mut per_client: HashMap<Arc<str>, QueuedMessage> = HashMap::new();
        let trie = self.trie.read().unwrap_or_else(|p| p.into_inner());
        trie.for_each_match(&message.topic, |client, opts| {
            if opts.no_local && **client == *message.publisher {
                return;
            }
            let qos = opts.qos.min(message.qos);
            let retain = opts.retain_as_published && message.retain;
            let entry = per_client.entry(Arc::clone(client)).or_insert_with(|| QueuedMessage {
                message: Arc::clone(message),
                qos: QoS::AtMostOnce,
                retain: false,
                subscription_ids: Vec::new(),
            });
            entry.qos = entry.qos.max(qos);
            entry.retain |= retain;
            if let Some(id) = opts.subscription_identifier {
                entry.subscription_ids.push(id);
            }
        });
        drop(trie);
        per_client.into_iter().collect()
    }
}
