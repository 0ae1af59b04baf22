//! The life of a session: attach (ownership check, takeover, resume or clean start),
//! detach (will, expiry), discard, and the will-delay and expiry timers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use raftmq_cluster::mesh::{ClaimError, HandOverRequest};
use raftmq_cluster::message::now_ms;
use raftmq_cluster::session::WillMessage;
use raftmq_cluster::session_ops::{SessionCommand, SessionOp};
use raftmq_cluster::StoreError;

use super::{AttachError, Attached, Broker, EndKind};
use crate::security::Owner;
use crate::session::{Attach, ConnHandle, ConnInfo, Detached, Discarded, SessionSlot};
use crate::telemetry::printable::Printable;

impl Broker {
    /// Attaches connection `conn_id` to the session of `client_id`, taking it over from any
    /// previous connection. `clean_start` discards an existing session [MQTT-3.1.2-4];
    /// otherwise it is resumed [MQTT-3.1.2-5]. `expiry_secs` 0 makes the session end with
    /// the connection.
    pub async fn attach(
        &self,
        client_id: &str,
        conn_id: u64,
        clean_start: bool,
        expiry_secs: u32,
        info: ConnInfo,
        owner: Arc<Owner>,
    ) -> Result<Attached, AttachError> {
        loop {
            let id: Arc<str> = Arc::from(client_id);
            let mut fresh = false;
            let slot = self
                .sessions
                .entry(Arc::clone(&id))
                .or_insert_with(|| {
                    fresh = true;
                    Arc::new(SessionSlot::new(id, Arc::clone(&self.journal)))
                })
                .clone();
            if fresh && self.sessions.len() > self.config.mqtt.max_sessions {
                // A flood of new client ids must not grow memory without bound.
                slot.mark_removed();
                self.sessions.remove_if(client_id, |_, s| Arc::ptr_eq(s, &slot));
                return Err(AttachError::TooManySessions);
            }
            let _guard = slot.connect_lock.lock().await;
            if slot.is_removed() {
                continue;
            }
            if slot.is_moved() {
                // Handed to another node a moment ago: this CONNECT claims it back from
                // there, not from the copy left here.
                self.forget_moved(&slot).await;
                continue;
            }
            // A session, live or stored, is only for the identity that created it: checked
            // before anything is kicked, taken over or cleaned.
            let live_owner = slot.owner();
            let mut stored = if live_owner.is_none() { self.load_stored(client_id, !clean_start).await? } else { None };
            if self.config.auth.bind_session_to_user {
                let claimed_by = match (&live_owner, &stored) {
                    (Some(o), _) => Some(o.identity.username.as_deref()),
                    (None, Some(state)) => Some(state.owner.as_deref()),
                    (None, None) => None,
                };
                if claimed_by.is_some_and(|user| user != owner.identity.username.as_deref()) {
                    if fresh {
                        self.drop_if_unused(&slot);
                    }
                    return Err(AttachError::NotOwner);
                }
            }
            // Not held here: any other node's connection with this id is disconnected, and
            // the node holding the session hands it over when the client resumes it.
            let mut above = 0;
            let mut handed_over = false;
            if let (None, Some(mesh)) = (&live_owner, self.mesh()) {
                let request = HandOverRequest {
                    client_id: client_id.to_owned(),
                    username: owner.identity.username.clone(),
                    resume: !clean_start,
                    check_owner: self.config.auth.bind_session_to_user,
                    from: self.node_id,
                };
                match mesh.claim(request).await {
                    Ok(claimed) => {
                        above = claimed.epoch;
                        if let Some(session) = claimed.session {
                            stored = Some(session);
                            handed_over = true;
                        }
                    }
                    Err(ClaimError::NotOwner) => {
                        if fresh {
                            self.drop_if_unused(&slot);
                        }
                        return Err(AttachError::NotOwner);
                    }
                }
            }
            self.take_over(&slot, crate::codec::reason::SESSION_TAKEN_OVER).await;
            if slot.is_removed() {
                // The previous owner's session ended with its connection.
                continue;
            }
            let mut session_present = false;
            let mut from_store = false;
            let existed = slot.has_session();
            if clean_start {
                if existed {
                    self.discard(&slot).await?;
                    continue;
                }
                // A fresh slot may still have a stored session (another node, or a restart):
                // a persistent clean start replaces it with one claim below; a transient
                // one removes it, under the new epoch.
            } else if existed {
                session_present = true;
            } else if let Some(state) = stored.take() {
                // Restored before its subscriptions are indexed: a message routed to the
                // slot in between would otherwise find no persistent session (dropped) or
                // be overwritten by the restored queue (the fault suite caught both).
                let subscriptions = state.subscriptions.clone();
                // Read from the store rather than handed over: the old owner (cut off, or
                // busy) may still append until the claim below fences it, so the slot
                // takes no delivery until it is read again after the claim.
                from_store = !handed_over;
                slot.set_claiming(from_store);
                slot.restore(state, !handed_over);
                // The resumed subscriptions are routed everywhere before the CONNACK.
                self.route_restored(&slot, &subscriptions).await;
                session_present = true;
            }
            // This node owns the client id from now on, under a new epoch: whatever an
            // earlier owner still has pending for it (expiry, a delayed will) is void.
            let claimed = self.registry.claim(client_id, self.node_id, above).await;
            if from_store {
                // Everything the old owner stored before the claim, nothing after it.
                let fresh = match &claimed {
                    Ok(_) => self.load_stored(client_id, true).await,
                    Err(e) => Err(e.clone()),
                };
                match fresh {
                    Ok(Some(state)) => slot.restore(state, true),
                    Ok(None) => {}
                    Err(e) => {
                        self.abandon(&slot);
                        return Err(e.into());
                    }
                }
                slot.set_claiming(false);
            }
            let epoch = claimed?;
            if clean_start && stored.is_some() && expiry_secs == 0 {
                let remove = SessionCommand { client_id: client_id.to_owned(), epoch, op: SessionOp::Remove };
                self.journal.write(vec![remove]).await?;
            }
            let conn = ConnHandle::new(conn_id, info);
            slot.attach(Attach { conn, epoch, expiry_secs, owner, clean: clean_start }).await.map_err(AttachError::Store)?;
            return Ok(Attached { slot: Arc::clone(&slot), session_present });
        }
    }

    /// The stored session of `client_id`, once every operation queued before is applied.
    /// In a cluster another node may have written it last: a client resuming its session
    /// reads what the group committed (`linearizable`: a read index from the leader); a
    /// clean start, which only discards what it finds, reads what this node has learnt is
    /// committed (no round trip: a CONNECT storm must not cost one each).
    pub(super) async fn load_stored(
        &self,
        client_id: &str,
        linearizable: bool,
    ) -> Result<Option<raftmq_cluster::session::SessionState>, StoreError> {
        self.journal.flush().await?;
        if linearizable {
            self.sync_with_cluster().await?;
        } else {
            self.catch_up_with_cluster().await;
        }
        self.store.load(client_id).await
    }

    /// Indexes the subscriptions of a session just restored into `slot` and waits until
    /// every live peer routes them here.
    pub(super) async fn route_restored(
        &self,
        slot: &Arc<SessionSlot>,
        subscriptions: &std::collections::BTreeMap<String, raftmq_cluster::session::SubscriptionOptions>,
    ) {
        let mut last_change = None;
        for (filter, options) in subscriptions {
            last_change = self.index_subscribe(slot, filter, *options).1.or(last_change);
        }
        if let Some(seq) = last_change {
            self.routes.settle(seq).await;
        }
    }

    /// Drops the local copy of a session restored for a takeover that did not complete
    /// (its index entries and the slot); the store keeps the session for the next try.
    pub(super) fn abandon(&self, slot: &Arc<SessionSlot>) {
        let Discarded { filters, .. } = slot.discard();
        for filter in filters {
            self.index_unsubscribe(slot, &filter);
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
    }

    /// Removes a slot made for a CONNECT that was refused before attaching, unless another
    /// connection started using it meanwhile.
    pub(super) fn drop_if_unused(&self, slot: &Arc<SessionSlot>) {
        if slot.remove_if_unused() {
            self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        }
    }

    /// Drops a session that moved to another node: subscriptions, the local copy in the
    /// store and the registry entry go; its will moved with it and is not published here.
    pub(super) async fn forget_moved(&self, slot: &Arc<SessionSlot>) {
        let Discarded { filters, epoch, stored, .. } = slot.discard();
        for filter in filters {
            self.index_unsubscribe(slot, &filter);
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        if stored {
            let remove = SessionCommand { client_id: slot.client_id.to_string(), epoch, op: SessionOp::Remove };
            if let Err(e) = self.journal.write(vec![remove]).await {
                tracing::warn!(error = %e, "failed to forget a session that moved");
            }
        }
        if epoch != 0 {
            let _ = self.registry.release(&slot.client_id, epoch).await;
        }
    }

    /// Kicks the connection attached to `slot` (if any) with `reason` and waits for it to
    /// detach.
    pub(super) async fn take_over(&self, slot: &Arc<SessionSlot>, reason: u8) {
        let released = slot.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if !slot.kick(reason) {
            return;
        }
        if reason == crate::codec::reason::SESSION_TAKEN_OVER {
            self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
        }
        let timeout = Duration::from_secs(self.config.mqtt.takeover_timeout_secs);
        if tokio::time::timeout(timeout, released).await.is_err() {
            // The old task is stuck (for example in a blocked write); fence it off.
            tracing::warn!(client_id = %Printable(&slot.client_id), "previous connection did not release the session in time");
            slot.fence_off();
        }
    }

    /// Ends a session: subscriptions, queue, store entry; publishes a pending will. The
    /// stored session, the registry entry and the will are only touched while this node's
    /// epoch is still current: a session claimed elsewhere since is not this node's to
    /// remove, and its will is not this node's to publish (only the local slot goes).
    pub(super) async fn discard(&self, slot: &Arc<SessionSlot>) -> Result<(), StoreError> {
        let Discarded { filters, will, epoch, stored } = slot.discard();
        for filter in filters {
            self.index_unsubscribe(slot, &filter);
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        let ours = epoch == 0 || self.registry.is_current(&slot.client_id, epoch);
        if !ours {
            tracing::debug!(client_id = %Printable(&slot.client_id), epoch, "session claimed elsewhere: only the local copy is dropped");
            return Ok(());
        }
        if stored {
            let remove = SessionCommand { client_id: slot.client_id.to_string(), epoch, op: SessionOp::Remove };
            self.journal.write(vec![remove]).await?;
        }
        if epoch != 0 {
            self.registry.release(&slot.client_id, epoch).await?;
        }
        if let Some(will) = will {
            self.publish_will_now(will.message).await;
        }
        Ok(())
    }

    /// Detaches connection `conn_id` from its slot when the connection ends.
    pub async fn detach(self: &Arc<Self>, slot: &Arc<SessionSlot>, conn_id: u64, end: EndKind, will: Option<WillMessage>) {
        let will = will.filter(|_| end != EndKind::Normal);
        let Detached { fenced, persistent, generation, expiry_secs } = slot.detach(conn_id, now_ms());
        if fenced {
            if let Some(will) = will {
                self.publish_will_now(will.message).await;
            }
            return;
        }
        self.redispatch_shared(slot, persistent).await;
        if !persistent {
            if let Err(e) = self.discard(slot).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to remove session");
            }
            if let Some(will) = will {
                self.publish_will_now(will.message).await;
            }
        } else {
            match will {
                Some(will) if will.delay_secs > 0 => {
                    let delay = Duration::from_secs(u64::from(will.delay_secs.min(expiry_secs)));
                    slot.hold_will(will);
                    self.spawn_will_timer(Arc::clone(slot), generation, delay);
                }
                Some(will) => {
                    self.publish_will_now(will.message).await;
                    slot.disarm_will();
                }
                None => slot.disarm_will(),
            }
            self.spawn_expiry_timer(Arc::clone(slot), generation, Duration::from_secs(u64::from(expiry_secs)));
        }
        slot.released.notify_waiters();
    }

    /// Brings back the persistent sessions the store held at start: each is detached, its
    /// subscriptions route again (messages published meanwhile are queued), its expiry and
    /// a held will run from the time the client went away (the start, when unknown: the
    /// connection was lost with the node). Returns how many came back.
    pub fn recover_sessions(self: &Arc<Self>, sessions: Vec<raftmq_cluster::session::SessionState>) -> usize {
        let mut recovered = 0;
        for state in sessions {
            // A client that connected before this ran restored its session itself.
            let Some(slot) = self.vacant_slot(&state.client_id) else { continue };
            let filters: Vec<(String, raftmq_cluster::session::SubscriptionOptions)> =
                state.subscriptions.iter().map(|(f, o)| (f.clone(), *o)).collect();
            self.recover_into(&slot, state);
            for (filter, options) in filters {
                self.index_subscribe(&slot, &filter, options);
            }
            recovered += 1;
        }
        recovered
    }

    /// A new slot for `client_id`, unless one exists.
    pub(super) fn vacant_slot(&self, client_id: &str) -> Option<Arc<SessionSlot>> {
        let client_id: Arc<str> = Arc::from(client_id);
        match self.sessions.entry(Arc::clone(&client_id)) {
            dashmap::mapref::entry::Entry::Occupied(_) => None,
            dashmap::mapref::entry::Entry::Vacant(v) => {
                Some(Arc::clone(v.insert(Arc::new(SessionSlot::new(client_id, Arc::clone(&self.journal)))).value()))
            }
        }
    }

    /// Restores `state` into `slot`, detached, and starts its expiry and held-will timers
    /// from the time the client went away (the start, when unknown). Subscriptions are
    /// indexed by the caller.
    pub(super) fn recover_into(self: &Arc<Self>, slot: &Arc<SessionSlot>, state: raftmq_cluster::session::SessionState) {
        let now = now_ms();
        let gone_at = if state.disconnected_at_ms == 0 { now } else { state.disconnected_at_ms.min(now) };
        let elapsed = Duration::from_millis(now - gone_at);
        let expiry = Duration::from_secs(u64::from(state.expiry_secs));
        let will_delay = state.will.as_ref().map(|w| Duration::from_secs(u64::from(w.delay_secs.min(state.expiry_secs))));
        let generation = slot.recover(state);
        if let Some(delay) = will_delay {
            self.spawn_will_timer(Arc::clone(slot), generation, delay.saturating_sub(elapsed));
        }
        self.spawn_expiry_timer(Arc::clone(slot), generation, expiry.saturating_sub(elapsed));
    }

    pub(super) fn spawn_will_timer(self: &Arc<Self>, slot: Arc<SessionSlot>, generation: u64, delay: Duration) {
        let broker = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            // Claimed by another node since: its owner decides about the will now.
            let will = slot.take_will(generation, |epoch| broker.registry.is_current(&slot.client_id, epoch));
            if let Some(will) = will {
                broker.publish_will_now(will.message).await;
            }
        });
    }

    pub(super) fn spawn_expiry_timer(self: &Arc<Self>, slot: Arc<SessionSlot>, generation: u64, after: Duration) {
        let broker = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            let _guard = slot.connect_lock.lock().await;
            if slot.generation() != generation {
                return;
            }
            tracing::debug!(client_id = %Printable(&slot.client_id), "session expired");
            if let Err(e) = broker.discard(&slot).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to expire session");
            }
        });
    }

    /// Disconnects the client (MQTT 5: DISCONNECT 0x98 Administrative action); its session
    /// stays if it is persistent. Returns false if it was not connected.
    pub async fn kick(&self, client_id: &str) -> bool {
        let Some(slot) = self.slot(client_id) else { return false };
        if !slot.is_online() {
            return false;
        }
        let _guard = slot.connect_lock.lock().await;
        self.take_over(&slot, crate::codec::reason::ADMINISTRATIVE_ACTION).await;
        true
    }

    /// Ends a session: disconnects its client if connected, then discards subscriptions,
    /// queue and stored state. Returns false if there was no session.
    pub async fn discard_session(&self, client_id: &str) -> Result<bool, StoreError> {
        let Some(slot) = self.slot(client_id) else { return Ok(false) };
        let _guard = slot.connect_lock.lock().await;
        self.take_over(&slot, crate::codec::reason::ADMINISTRATIVE_ACTION).await;
        if slot.is_removed() {
            return Ok(true);
        }
        self.discard(&slot).await?;
        Ok(true)
    }
}
