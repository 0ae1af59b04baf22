//! Subscriptions: the session's own list, the subscription index and the route table.

use std::sync::Arc;

use raftmq_cluster::session::{ShareTarget, SubscriptionOptions};
use raftmq_cluster::StoreError;

use super::Broker;
use crate::routing::index::SharedKey;
use crate::routing::shared::{self};
use crate::session::SessionSlot;

impl Broker {
    pub(super) fn shared_key(client_id: &Arc<str>, filter: &str) -> Option<SharedKey> {
        match shared::parse(filter) {
            Ok(Some((group, topic))) => Some(SharedKey {
                target: Arc::new(ShareTarget { group: Arc::from(group), filter: Arc::from(topic) }),
                client_id: Arc::clone(client_id),
            }),
            _ => None,
        }
    }

    /// Adds a subscription to the index and hands the route change it decided (numbered
    /// under the index lock) straight to the route table, with no await in between.
    /// Returns whether the subscription existed, and the number of the route change it
    /// made (if it made one).
    pub(super) fn index_subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> (bool, Option<u64>) {
        let (existed, change) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => self.index.subscribe_shared(key, options),
            None => self.index.subscribe(slot, filter, options),
        };
        let seq = change.map(|change| {
            let seq = change.seq;
            self.routes.apply(change);
            seq
        });
        (existed, seq)
    }

    /// Removes a subscription from the index, and its route change from the route table.
    pub(super) fn index_unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> bool {
        let (existed, change) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => {
                let result = self.index.unsubscribe_shared(&key);
                if result.1.as_ref().is_some_and(|c| c.members == 0) {
                    self.dispatcher.forget(&key.target);
                }
                result
            }
            None => self.index.unsubscribe(slot, filter),
        };
        if let Some(change) = change {
            self.routes.apply(change);
        }
        existed
    }

    /// Adds or replaces a subscription of the session in `slot`. Returns whether it already
    /// existed (for Retain Handling 1). A persistent session's store gets the change as one
    /// operation; the call resolves once it is durable and every live peer has the route.
    pub async fn subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> Result<bool, StoreError> {
        let stored = slot.subscribe(filter, options).await;
        let (existed, change) = self.index_subscribe(slot, filter, options);
        if let Some(seq) = change {
            // Every live peer knows the route before the SUBACK goes out.
            let started = std::time::Instant::now();
            self.routes.settle(seq).await;
            if self.mesh().is_some() {
                self.metrics.route_settled(started.elapsed().as_micros() as u64);
            }
        }
        stored.map(|()| existed)
    }

    /// Removes a subscription. Returns whether it existed.
    pub async fn unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> Result<bool, StoreError> {
        let stored = slot.unsubscribe(filter).await;
        let existed = self.index_unsubscribe(slot, filter);
        stored.map(|()| existed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Issue 11, item 4: route changes are numbered under the index lock and applied in that
    /// order, so racing last-unsubscribes and first-subscribes of one filter (plain and
    /// shared) always leave the route table agreeing with the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn route_table_agrees_with_the_index_under_concurrent_subscribe_and_unsubscribe() -> Result<(), crate::security::SecurityError> {
        let broker = Broker::new(Config::default(), Default::default())?;
        let mut tasks = Vec::new();
        for n in 0..8 {
            let broker = Arc::clone(&broker);
            tasks.push(tokio::spawn(async move {
                let slot = Arc::new(SessionSlot::new(Arc::from(format!("c{n}")), crate::session::Journal::detached()));
                for round in 0..300 {
                    let filter = if round % 2 == 0 { "race/+" } else { "$share/g/race/#" };
                    let _ = broker.subscribe(&slot, filter, SubscriptionOptions::default()).await;
                    tokio::task::yield_now().await;
                    let _ = broker.unsubscribe(&slot, filter).await;
                }
                // Half the clients keep a subscription of each kind.
                if n % 2 == 0 {
                    let _ = broker.subscribe(&slot, "race/+", SubscriptionOptions::default()).await;
                    let _ = broker.subscribe(&slot, "$share/g/race/#", SubscriptionOptions::default()).await;
                }
                slot
            }));
        }
        let mut slots = Vec::new();
        for t in tasks {
            slots.push(t.await.map_err(|e| crate::security::SecurityError::Invalid(e.to_string()))?);
        }
        assert_eq!(broker.subscription_filter_count(), 2);
        assert_eq!(broker.route_count(), 2, "one plain route and one shared group");
        for slot in &slots {
            let _ = broker.unsubscribe(slot, "race/+").await;
            let _ = broker.unsubscribe(slot, "$share/g/race/#").await;
        }
        assert_eq!((broker.subscription_filter_count(), broker.route_count()), (0, 0));
        Ok(())
    }
}
