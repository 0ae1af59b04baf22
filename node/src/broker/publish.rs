//! The one publish path: retain, route to matching sessions and shared groups, wills.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use raftmq_cluster::message::{now_us, Message, QoS};
use raftmq_cluster::retained::RetainOutcome;
use raftmq_cluster::routes::{ForwardReceipt, ForwardTarget, RemoteMatch, Route};
use raftmq_cluster::session::{ForwardOrigin, QueueLimits, QueuedMessage, ShareTarget, SubscriptionOptions};
use raftmq_cluster::StoreError;

use super::{Broker, Routed};
use crate::routing::shared::MemberLoad;
use crate::session::{Durability, Offer, Offered, Pending, SessionSlot};
use crate::telemetry::printable::Printable;
use crate::telemetry::stats::DropReason;

impl Broker {
    /// Publishes a will message as if its client had published it.
    pub async fn publish_will_now(&self, message: Message) {
        self.stats.wills_published.fetch_add(1, Ordering::Relaxed);
        let mut message = message;
        message.received_at_us = now_us();
        if let Err(e) = self.publish(&Arc::new(message)).await {
            tracing::warn!(error = %e, "failed to publish will message");
        }
    }

    /// Publishes a message: stores it as the topic's retained message when its RETAIN flag
    /// is set, routes it to this node's sessions and forwards it to the other nodes that
    /// want it (once per node, and once per shared group whose chosen member is elsewhere).
    /// Resolves once durable and, for QoS >= 1, once the peers delivered it; says where it
    /// went, remote targets included. Every publisher on this node (clients, wills, `$SYS`,
    /// the admin API) goes through here.
    pub async fn publish(&self, message: &Arc<Message>) -> Result<Routed, StoreError> {
        let (routed, receipt, durable) = self.publish_routed(message).await?;
        durable.wait().await?;
        self.confirm(message.qos, receipt).await?;
        Ok(routed)
    }

    /// [`Broker::publish`] up to the copies for other nodes being queued and the local
    /// sessions' appends being on their way to the store: the receipt resolves once the
    /// copies are delivered ([`Broker::confirm`] turns it into the publisher's answer), the
    /// [`Durable`] once the appends are stored. A connection handling a burst of PUBLISHes
    /// waits for all of them at once instead of one round trip (or one commit) each.
    pub(crate) async fn publish_routed(&self, message: &Arc<Message>) -> Result<(Routed, ForwardReceipt, Durable), StoreError> {
        if message.retain {
            self.retain(message).await?;
        }
        let remote = self.routes.remote_matches(&message.topic);
        let mut targets: Vec<ForwardTarget> = remote.nodes.iter().map(|node| ForwardTarget { node: *node, group: None }).collect();
        let mut durable = Durable::default();
        let mut routed = self.route_with(message, &remote, &mut targets, &mut durable);
        routed.matched += remote.nodes.len();
        if targets.is_empty() {
            return Ok((routed, ForwardReceipt::default(), durable));
        }
        let (mut receipt, full) = self.routes.try_forward(message, targets);
        if !full.is_empty() {
            // A peer's queue is full: the publisher waits for room (bounded), like for a
            // slow local subscriber.
            receipt.merge(self.routes.forward(Arc::clone(message), full).await?);
        }
        Ok((routed, receipt, durable))
    }

    /// Waits for the copies sent to other nodes: any not delivered is counted and, for
    /// QoS >= 1, an error (the publisher is not acknowledged as if it had been delivered).
    pub async fn confirm(&self, qos: QoS, receipt: ForwardReceipt) -> Result<(), StoreError> {
        let failed = receipt.wait().await;
        self.confirmed(qos, failed)
    }

    /// [`Broker::confirm`] once the copies not delivered are counted.
    pub fn confirmed(&self, qos: QoS, failed: usize) -> Result<(), StoreError> {
        if failed > 0 {
            self.stats.drop(DropReason::ForwardFailed, failed as u64);
            if qos != QoS::AtMostOnce {
                return Err(StoreError::Unavailable(format!("{failed} forwarded copies not confirmed")));
            }
        }
        Ok(())
    }

    /// Delivers a batch of messages another node forwarded here, each to this node's
    /// sessions only, or to one local member of its group. They are not retained again
    /// (their publisher's node did that) and never forwarded again. Says for each whether
    /// anybody here took it; `stored` resolves once every append is stored (one wait for
    /// the whole batch: a commit covers many messages).
    pub fn deliver_forwarded(&self, batch: &[raftmq_cluster::mesh::Incoming]) -> raftmq_cluster::mesh::Delivered {
        if self.shutdown.is_cancelled() {
            // Stopping: its clients are leaving and its sessions are about to be taken over
            // elsewhere, so nothing more is stored here for them. The batch fails: its
            // publishers are refused and send again, to where the sessions went (a copy
            // stored here now could miss the session handed over a moment later; the
            // fault suite's rolling restart caught that).
            let stored = Box::pin(async { false });
            return raftmq_cluster::mesh::Delivered { taken: vec![false; batch.len()], stored };
        }
        let mut durable = Durable::default();
        let mut taken = Vec::with_capacity(batch.len());
        for m in batch {
            taken.push(self.deliver_one_forwarded(&m.message, m.group.clone(), m.origin, &mut durable));
        }
        let stored = Box::pin(async move {
            match durable.wait().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "forwarded messages not stored");
                    false
                }
            }
        });
        raftmq_cluster::mesh::Delivered { taken, stored }
    }

    fn deliver_one_forwarded(
        &self,
        message: &Arc<Message>,
        group: Option<Route>,
        origin: Option<ForwardOrigin>,
        durable: &mut Durable,
    ) -> bool {
        match group {
            None => self.route_plain(message, durable).matched > 0,
            Some(route) => {
                let Some(group) = route.group else { return false };
                let target = Arc::new(ShareTarget { group, filter: route.filter });
                let delivered = self.dispatch_shared(message, &target, origin, durable);
                if !delivered {
                    // Nobody here took it: its node need not hold it for us any longer.
                    if let Some(origin) = origin {
                        self.settled(origin);
                    }
                }
                delivered
            }
        }
    }

    /// A shared delivery forwarded to `not_on`, which died before its member acknowledged
    /// it: given to another member, here or on another node.
    pub async fn redeliver(&self, message: &Arc<Message>, route: Route, not_on: raftmq_cluster::NodeId) -> bool {
        let Some(group) = route.group.clone() else { return false };
        let target = Arc::new(ShareTarget { group, filter: Arc::clone(&route.filter) });
        let mut durable = Durable::default();
        if self.dispatch_shared(message, &target, None, &mut durable) {
            return durable.wait().await.is_ok();
        }
        let remote = self.routes.remote_matches(&message.topic);
        let Some(members) = remote.group(&route) else { return false };
        let elsewhere: Vec<(raftmq_cluster::NodeId, u32)> = members.members.iter().copied().filter(|(n, _)| *n != not_on).collect();
        let Some(node) = self.dispatcher.pick_node(&target, self.node_id, 0, &elsewhere, message) else { return false };
        match self.routes.forward(Arc::clone(message), vec![ForwardTarget { node, group: Some(route) }]).await {
            Ok(receipt) => receipt.wait().await == 0,
            Err(_) => false,
        }
    }

    /// A forwarded shared delivery's member acknowledged it (or it was dropped here): its
    /// node stops holding it.
    pub fn settled(&self, origin: ForwardOrigin) {
        if let Some(mesh) = self.mesh() {
            mesh.settled(origin);
        }
    }

    /// Stores or deletes a retained message.
    pub async fn retain(&self, message: &Arc<Message>) -> Result<RetainOutcome, StoreError> {
        let outcome = self.retained.set(Arc::clone(message)).await?;
        if outcome == RetainOutcome::Refused {
            if let Some(suppressed) = self.log_limits.retained_refused.allow() {
                tracing::warn!(topic = %Printable(&message.topic), suppressed, "retained message refused by limits");
            }
        }
        Ok(outcome)
    }

    /// Routes a message to every matching session on this node, and decides for each
    /// matching shared group which node delivers it (those elsewhere go to `targets`).
    /// Resolves once every persistent subscriber's copy is durable. Says how many sessions
    /// and groups matched, and names a subscriber whose queue is filling up, so a publishing
    /// client can be held back.
    fn route_with(&self, message: &Arc<Message>, remote: &RemoteMatch, targets: &mut Vec<ForwardTarget>, durable: &mut Durable) -> Routed {
        let routed = self.route_plain(message, durable);
        self.route_groups(message, remote, targets, durable, routed)
    }

    /// The non-shared part of [`Broker::route_with`]: every matching session on this node.
    /// A copy another node forwarded for its plain subscribers gets only this: the
    /// publishing node already gave it to one member of each shared group, cluster-wide
    /// (delivered to this node's members too, a QoS 2 message reached two members; the
    /// fault suite's shared group caught that).
    fn route_plain(&self, message: &Arc<Message>, durable: &mut Durable) -> Routed {
        let deliveries = self.index.deliveries(message);
        let mut routed = Routed { matched: deliveries.len(), congested: None };
        let limits = self.queue_limits();
        let queue_qos0 = self.config.mqtt.queue_qos0;
        let stall_us = self.stall_us();
        for (slot, item) in deliveries {
            let Offered { offer, lost, congested, durability } = slot.offer(item, limits, queue_qos0, stall_us);
            if congested && routed.congested.is_none() {
                routed.congested = Some(Arc::clone(&slot));
            }
            let reason = if offer == Offer::Dropped { DropReason::NotQueued } else { DropReason::QueueFull };
            if lost > 0 {
                tracing::debug!(client_id = %Printable(&slot.client_id), reason = reason.label(), dropped = lost, topic = %Printable(&message.topic), "message dropped");
            }
            self.stats.drop(reason, lost);
            durable.add(&slot, durability);
        }
        routed
    }

    /// The shared part of [`Broker::route_with`]: one member of each matching group, here
    /// or on the node picked for it.
    fn route_groups(
        &self,
        message: &Arc<Message>,
        remote: &RemoteMatch,
        targets: &mut Vec<ForwardTarget>,
        durable: &mut Durable,
        mut routed: Routed,
    ) -> Routed {
        let local_groups = self.index.shared_matches(message);
        routed.matched += local_groups.len();
        for (target, members) in &local_groups {
            let route = Route { group: Some(Arc::clone(&target.group)), filter: Arc::clone(&target.filter) };
            let elsewhere = remote.group(&route).map(|g| g.members.as_slice()).unwrap_or_default();
            if let Some(node) = self.dispatcher.pick_node(target, self.node_id, members.len(), elsewhere, message) {
                targets.push(ForwardTarget { node, group: Some(route) });
            } else if !self.dispatch_shared_to(message, target, members, None, durable) {
                self.stats.drop(DropReason::QueueFull, 1);
            }
        }
        // Groups with no member here: one member elsewhere gets the message.
        for group in &remote.groups {
            let (Some(name), filter) = (&group.route.group, &group.route.filter) else { continue };
            if local_groups.iter().any(|(t, _)| t.group == *name && t.filter == *filter) {
                continue;
            }
            let target = Arc::new(ShareTarget { group: Arc::clone(name), filter: Arc::clone(filter) });
            if let Some(node) = self.dispatcher.pick_node(&target, self.node_id, 0, &group.members, message) {
                routed.matched += 1;
                targets.push(ForwardTarget { node, group: Some(group.route.clone()) });
            }
        }
        routed
    }

    /// Gives a shared delivery to one local member of `target`; false if none took it.
    fn dispatch_shared(
        &self,
        message: &Arc<Message>,
        target: &Arc<ShareTarget>,
        origin: Option<ForwardOrigin>,
        durable: &mut Durable,
    ) -> bool {
        let members = self.index.shared_members(target);
        self.dispatch_shared_to(message, target, &members, origin, durable)
    }

    fn dispatch_shared_to(
        &self,
        message: &Arc<Message>,
        target: &Arc<ShareTarget>,
        members: &[(Arc<str>, SubscriptionOptions)],
        origin: Option<ForwardOrigin>,
        durable: &mut Durable,
    ) -> bool {
        let ids: Vec<Arc<str>> = members.iter().map(|(c, _)| Arc::clone(c)).collect();
        let pick = |client: &Arc<str>| members.iter().find(|(c, _)| c == client).map(|(_, o)| *o);
        let order = self.dispatcher.order(target, &ids, message, |c| self.member_load(c));
        for client in order {
            let Some(opts) = pick(&client) else { continue };
            let item = QueuedMessage {
                message: Arc::clone(message),
                qos: opts.qos.min(message.qos),
                retain: opts.retain_as_published && message.retain,
                subscription_ids: opts.subscription_identifier.into_iter().collect(),
                shared: Some(Arc::clone(target)),
                seq: 0,
                origin,
            };
            if self.offer_shared(&client, item, durable) {
                return true;
            }
        }
        false
    }

    /// Whether no subscription (plain or shared) matches `message` now.
    pub fn matches_nothing(&self, message: &Arc<Message>) -> bool {
        !self.index.matches_any(message)
    }

    pub(super) fn member_load(&self, client_id: &str) -> MemberLoad {
        match self.sessions.get(client_id) {
            Some(slot) => {
                let (online, pending) = slot.load();
                MemberLoad { online, pending }
            }
            None => MemberLoad { online: false, pending: usize::MAX },
        }
    }

    /// Offers a shared delivery to one member without evicting anything: a full member
    /// refuses, so the next member gets a chance. False if refused; what makes the copy
    /// durable goes to `durable`.
    pub(super) fn offer_shared(&self, client_id: &Arc<str>, item: QueuedMessage, durable: &mut Durable) -> bool {
        let Some(slot) = self.sessions.get(client_id).map(|s| Arc::clone(&s)) else { return false };
        let limits = QueueLimits { policy: raftmq_cluster::session::DropPolicy::DropNew, ..self.queue_limits() };
        match slot.offer(item, limits, self.config.mqtt.queue_qos0, self.stall_us()) {
            Offered { offer: Offer::Dropped, .. } | Offered { lost: 1.., .. } => false,
            Offered { durability, .. } => {
                durable.add(&slot, durability);
                true
            }
        }
    }

    /// Hands the shared deliveries a leaving member still holds (queued, or sent and not
    /// yet acknowledged) to the other members of their groups, so none is lost with it.
    /// What no other member takes stays with a persistent session, or is dropped.
    pub(super) async fn redispatch_shared(&self, slot: &Arc<SessionSlot>, keep_leftovers: bool) {
        let items = slot.take_shared();
        if items.is_empty() {
            return;
        }
        let mut durable = Durable::default();
        let mut leftovers = Vec::new();
        for item in items {
            let Some(target) = item.shared.clone() else { continue };
            let others: Vec<Arc<str>> =
                self.index.shared_members(&target).into_iter().map(|(c, _)| c).filter(|c| *c != slot.client_id).collect();
            let order = self.dispatcher.order(&target, &others, &item.message, |c| self.member_load(c));
            let placed = order.into_iter().any(|client| self.offer_shared(&client, QueuedMessage { seq: 0, ..item.clone() }, &mut durable));
            // No other member here: one on another node (which answers for it from now on).
            if !placed {
                if self.forward_shared(&target, &item.message).await {
                    if let Some(origin) = item.origin {
                        self.settled(origin);
                    }
                } else {
                    leftovers.push(item);
                }
            }
        }
        if keep_leftovers {
            slot.requeue(leftovers, self.queue_limits());
        } else {
            self.stats.drop(DropReason::QueueFull, leftovers.len() as u64);
        }
        if let Err(e) = durable.wait().await {
            tracing::warn!(error = %e, "failed to persist redispatched shared messages");
        }
    }
}

impl Broker {
    /// Sends a shared delivery to a member of `target` on another node (chosen by the
    /// strategy, weighted by members); false if there is none or it was not delivered.
    async fn forward_shared(&self, target: &Arc<ShareTarget>, message: &Arc<Message>) -> bool {
        let route = Route { group: Some(Arc::clone(&target.group)), filter: Arc::clone(&target.filter) };
        let remote = self.routes.remote_matches(&message.topic);
        let Some(group) = remote.group(&route) else { return false };
        let Some(node) = self.dispatcher.pick_node(target, self.node_id, 0, &group.members, message) else { return false };
        match self.routes.forward(Arc::clone(message), vec![ForwardTarget { node, group: Some(route) }]).await {
            Ok(receipt) => receipt.wait().await == 0,
            Err(_) => false,
        }
    }
}

/// The writes a publish waits for before its publisher is acknowledged: persistent
/// subscribers' appends on their way to the store, and sessions that must resend their
/// whole state first.
#[derive(Debug, Default)]
#[must_use = "a publisher is acknowledged only once its appends are stored: wait for them"]
pub(crate) struct Durable {
    pending: Vec<Pending>,
    resync: Vec<Arc<SessionSlot>>,
    /// A subscriber's session was handed to another node meanwhile: the publish fails.
    moved: bool,
}

impl Durable {
    fn add(&mut self, slot: &Arc<SessionSlot>, durability: Durability) {
        match durability {
            Durability::Memory => {}
            Durability::Pending(p) => self.pending.push(p),
            Durability::Resync => self.resync.push(Arc::clone(slot)),
            Durability::Moved => self.moved = true,
        }
    }

    /// Nothing to wait for.
    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.resync.is_empty() && !self.moved
    }

    /// Waits for every write. An append the store fenced is a failure: the subscriber's
    /// session moved to another node meanwhile, which took it over without this message
    /// (acknowledging it lost it there; the fault suite caught that). The publisher is
    /// refused and sends again, and the new owner routes the copy. A session the store no
    /// longer has takes nothing and is no failure.
    pub(crate) async fn wait(self) -> Result<(), StoreError> {
        if self.moved {
            return Err(StoreError::Fenced);
        }
        for p in self.pending {
            if let Err(raftmq_cluster::session_ops::OpError::Fenced { command, session }) = p.wait().await? {
                tracing::debug!(command, session, "append fenced");
                return Err(StoreError::Fenced);
            }
        }
        for slot in self.resync {
            slot.resync().await?;
        }
        Ok(())
    }
}
