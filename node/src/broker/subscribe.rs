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

    pub(super) async fn index_subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> bool {
        let (existed, new_route) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => self.index.subscribe_shared(key, options),
            None => self.index.subscribe(slot, filter, options),
        };
        if new_route {
            self.routes.add(filter).await;
        }
        existed
    }

    pub(super) async fn index_unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> bool {
        let (existed, route_gone) = match Self::shared_key(&slot.client_id, filter) {
            Some(key) => {
                let result = self.index.unsubscribe_shared(&key);
                if result.1 {
                    self.dispatcher.forget(&key.target);
                }
                result
            }
            None => self.index.unsubscribe(slot, filter),
        };
        if route_gone {
            self.routes.remove(filter).await;
        }
        existed
    }

    /// Adds or replaces a subscription of the session in `slot`. Returns whether it already
    /// existed (for Retain Handling 1).
    pub async fn subscribe(&self, slot: &Arc<SessionSlot>, filter: &str, options: SubscriptionOptions) -> Result<bool, StoreError> {
        slot.lock().subscriptions.insert(Box::from(filter), options);
        let existed = self.index_subscribe(slot, filter, options).await;
        self.save_if_persistent(slot).await?;
        Ok(existed)
    }

    /// Removes a subscription. Returns whether it existed.
    pub async fn unsubscribe(&self, slot: &Arc<SessionSlot>, filter: &str) -> Result<bool, StoreError> {
        slot.lock().subscriptions.remove(filter);
        let existed = self.index_unsubscribe(slot, filter).await;
        self.save_if_persistent(slot).await?;
        Ok(existed)
    }

    pub(super) async fn save_if_persistent(&self, slot: &Arc<SessionSlot>) -> Result<(), StoreError> {
        if slot.lock().persistent {
            self.store.save(slot.snapshot()).await?;
        }
        Ok(())
    }
}
