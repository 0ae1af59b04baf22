//! The life of a session: attach (ownership check, takeover, resume or clean start),
//! detach (will, expiry), discard, and the will-delay and expiry timers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use raftmq_cluster::message::now_ms;
use raftmq_cluster::session::WillMessage;
use raftmq_cluster::session_ops::{OpError, SessionCommand, SessionOp};
use raftmq_cluster::StoreError;

use super::{AttachError, Attached, Broker, EndKind};
use crate::security::Owner;
use crate::session::{ConnHandle, ConnInfo, SessionSlot};
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
                    Arc::new(SessionSlot::new(id))
                })
                .clone();
            if fresh && self.sessions.len() > self.config.mqtt.max_sessions {
                // A flood of new client ids must not grow memory without bound.
                slot.lock().removed = true;
                self.sessions.remove_if(client_id, |_, s| Arc::ptr_eq(s, &slot));
                return Err(AttachError::TooManySessions);
            }
            let _guard = slot.connect_lock.lock().await;
            if slot.lock().removed {
                continue;
            }
            // A session, live or stored, is only for the identity that created it: checked
            // before anything is kicked, taken over or cleaned.
            let live_owner = slot.lock().owner.clone();
            let stored = if live_owner.is_none() { self.store.load(client_id).await? } else { None };
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
            self.take_over(&slot, crate::codec::reason::SESSION_TAKEN_OVER).await;
            if slot.lock().removed {
                // The previous owner's session ended with its connection.
                continue;
            }
            let mut session_present = false;
            let mut stored_was_used = false;
            let existed = {
                let inner = slot.lock();
                inner.persistent || !inner.subscriptions.is_empty() || !inner.queue.is_empty()
            };
            if clean_start {
                if existed {
                    self.discard(&slot).await?;
                    continue;
                }
                // A fresh slot may still have a stored session (another node, or a restart):
                // a persistent clean start replaces it with one claim below; a transient
                // one removes it.
                if stored.is_some() && expiry_secs == 0 {
                    self.store.remove(client_id).await?;
                }
            } else if existed {
                session_present = true;
            } else if let Some(state) = stored {
                stored_was_used = true;
                for (filter, opts) in &state.subscriptions {
                    self.index_subscribe(&slot, filter, *opts);
                }
                slot.restore(state);
                session_present = true;
            }
            // This node owns the client id from now on, under a new epoch: whatever an
            // earlier owner still has pending for it (expiry, a delayed will) is void.
            let epoch = self.registry.claim(client_id, self.node_id).await?;
            {
                let mut inner = slot.lock();
                inner.epoch = epoch;
                inner.conn = Some(ConnHandle {
                    conn_id,
                    info: info.clone(),
                    kick: None,
                    last_packet: std::time::Instant::now(),
                    partial_since: None,
                });
                inner.generation += 1;
                inner.persistent = expiry_secs > 0;
                inner.expiry_secs = expiry_secs;
                inner.owner = Some(Arc::clone(&owner));
                // A reconnect before the will delay passed cancels the will [MQTT-3.1.3-9].
                inner.pending_will = None;
            }
            if expiry_secs > 0 {
                // One operation: the claim under the new epoch (a clean start empties the
                // stored session in the same step), then the state this node holds.
                let owner_name = owner.identity.username.clone();
                let claim = SessionOp::Claim { clean: clean_start, owner: owner_name, expiry_secs };
                let cmd = SessionCommand { client_id: client_id.to_owned(), epoch, op: claim };
                if let Some(Err(OpError::Fenced { .. })) = self.store.apply(vec![cmd]).await?.pop() {
                    return Err(AttachError::Store(StoreError::Fenced));
                }
                if session_present && stored_was_used {
                    // Resumed from the store: it already holds this state.
                } else {
                    self.store.save(slot.snapshot()).await?;
                }
            }
            return Ok(Attached { slot: Arc::clone(&slot), session_present });
        }
    }

    /// Removes a slot made for a CONNECT that was refused before attaching, unless another
    /// connection started using it meanwhile.
    pub(super) fn drop_if_unused(&self, slot: &Arc<SessionSlot>) {
        let mut inner = slot.lock();
        if inner.conn.is_none() && inner.owner.is_none() && inner.subscriptions.is_empty() && inner.queue.is_empty() {
            inner.removed = true;
            drop(inner);
            self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
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
            let mut inner = slot.lock();
            inner.conn = None;
            inner.generation += 1;
        }
    }

    /// Ends a session: subscriptions, queue, store entry; publishes a pending will. The
    /// stored session, the registry entry and the will are only touched while this node's
    /// epoch is still current: a session claimed elsewhere since is not this node's to
    /// remove, and its will is not this node's to publish (only the local slot goes).
    pub(super) async fn discard(&self, slot: &Arc<SessionSlot>) -> Result<(), StoreError> {
        let (filters, will, epoch) = {
            let mut inner = slot.lock();
            inner.removed = true;
            inner.generation += 1;
            let filters: Vec<String> = inner.subscriptions.drain().map(|(f, _)| f.into_string()).collect();
            (filters, inner.pending_will.take(), inner.epoch)
        };
        for filter in filters {
            self.index_unsubscribe(slot, &filter);
        }
        self.sessions.remove_if(&slot.client_id, |_, s| Arc::ptr_eq(s, slot));
        let ours = epoch == 0 || self.registry.is_current(&slot.client_id, epoch);
        if !ours {
            tracing::debug!(client_id = %Printable(&slot.client_id), epoch, "session claimed elsewhere: only the local copy is dropped");
            return Ok(());
        }
        self.store.remove(&slot.client_id).await?;
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
        let (fenced, persistent, generation, expiry) = {
            let mut inner = slot.lock();
            let mine = inner.conn.as_ref().is_some_and(|c| c.conn_id == conn_id);
            if mine {
                inner.conn = None;
                inner.generation += 1;
                // Publishers held back for this client go on.
                inner.congested = false;
                slot.drained.notify_waiters();
            }
            // Not ours any more: a takeover that timed out fenced this connection off.
            let fenced = !mine && inner.conn.is_some();
            (fenced, inner.persistent && !inner.removed, inner.generation, inner.expiry_secs)
        };
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
                    slot.lock().pending_will = Some(Box::new(will.clone()));
                    let delay = Duration::from_secs(u64::from(will.delay_secs.min(expiry)));
                    self.spawn_will_timer(Arc::clone(slot), generation, delay);
                }
                Some(will) => self.publish_will_now(will.message).await,
                None => {}
            }
            let mut state = slot.snapshot();
            state.disconnected_at_ms = now_ms();
            if let Err(e) = self.store.save(state).await {
                tracing::warn!(client_id = %Printable(&slot.client_id), error = %e, "failed to save session");
            }
            self.spawn_expiry_timer(Arc::clone(slot), generation, Duration::from_secs(u64::from(expiry)));
        }
        slot.released.notify_waiters();
    }

    pub(super) fn spawn_will_timer(self: &Arc<Self>, slot: Arc<SessionSlot>, generation: u64, delay: Duration) {
        let broker = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = broker.shutdown.cancelled() => return,
            }
            let will = {
                let mut inner = slot.lock();
                if inner.generation != generation {
                    return;
                }
                // Claimed by another node since: its owner decides about the will now.
                if !broker.registry.is_current(&slot.client_id, inner.epoch) {
                    return;
                }
                inner.pending_will.take()
            };
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
            if slot.lock().generation != generation {
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
        if slot.lock().conn.is_none() {
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
        if slot.lock().removed {
            return Ok(true);
        }
        self.discard(&slot).await?;
        Ok(true)
    }
}
