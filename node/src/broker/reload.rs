//! Reloading the security files, and revoking what the new ones no longer allow.

use std::sync::Arc;

use super::Broker;
use crate::routing::shared::{self};
use crate::security::acl::{Access, Subject};
use crate::security::policy::Security;
use crate::security::SecurityError;
use crate::telemetry::printable::Printable;

impl Broker {
    /// Re-reads the password, JWT key and ACL files. On failure the previous settings stay
    /// in force and the error is returned.
    pub async fn reload_security(&self) -> Result<(), SecurityError> {
        let fresh = Arc::new(Security::load(&self.config)?);
        *self.security.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&fresh);
        self.revoke(&fresh).await;
        Ok(())
    }

    /// Applies a reloaded security bundle to the sessions that exist: a connected client
    /// whose user is gone (or an anonymous one once anonymous access is off) is
    /// disconnected (MQTT 5: DISCONNECT 0x87), and subscriptions the new rules no longer
    /// allow are removed, online or offline.
    pub(super) async fn revoke(&self, security: &Security) {
        let (mut kicked, mut removed) = (0usize, 0usize);
        for slot in self.slots() {
            let Some(owner) = slot.owner() else { continue };
            let filters: Vec<String> = slot.subscriptions().into_iter().map(|(f, _)| f).collect();
            if !security.authenticator.still_valid(&owner.identity) && slot.kick(crate::codec::reason::NOT_AUTHORIZED) {
                kicked += 1;
            }
            let subject = Subject { client_id: &slot.client_id, identity: &owner.identity, peer: owner.peer.ip() };
            for filter in filters {
                let topic_filter = shared::topic_filter(&filter).unwrap_or(&filter);
                if !security.allows(&subject, Access::Subscribe, topic_filter) {
                    if let Err(e) = self.unsubscribe(&slot, &filter).await {
                        tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to remove a revoked subscription");
                    }
                    removed += 1;
                }
            }
        }
        if kicked + removed > 0 {
            tracing::info!(disconnected = kicked, subscriptions_removed = removed, "reload revoked access");
        }
    }
}
