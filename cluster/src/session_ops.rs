//! Session writes as operations: every change to a persistent session is a small command,
//! tagged with its client id and the epoch of the node that issued it, and applied by one
//! pure, deterministic function ([`apply`]). The in-memory store applies commands with it
//! today; the Raft state machine (issue 13) will apply the very same commands from its log,
//! so a replica holds exactly what the owner holds, inflight state included.
//!
//! Determinism: [`apply`] reads nothing but the state and the command (no clock, no random,
//! no I/O); times travel inside commands, stamped by the proposer.

use crate::registry::Epoch;
use crate::session::{
    push_bounded, InflightMessage, InflightStage, QueueLimits, QueuedMessage, SessionState, SubscriptionOptions, WillMessage,
};

/// One change to a persistent session.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionOp {
    /// A node claims the session for a connection (takeover, resume or new session); the
    /// session's epoch becomes the command's. `clean` discards what was there first; a will
    /// waiting for its delay is cancelled.
    Claim {
        /// Clean Start: begin with an empty session.
        clean: bool,
        /// User name of the owning identity.
        owner: Option<String>,
        /// Session Expiry Interval, seconds.
        expiry_secs: u32,
    },
    /// Adds or replaces a subscription.
    Subscribe {
        /// Topic filter (with any `$share/{group}/` prefix).
        filter: String,
        /// Options.
        options: SubscriptionOptions,
    },
    /// Removes a subscription.
    Unsubscribe {
        /// Topic filter.
        filter: String,
    },
    /// Queues a QoS >= 1 delivery (online or offline: the owner's queue and the store's agree).
    Append {
        /// The delivery.
        item: QueuedMessage,
        /// Queue bounds.
        limits: QueueLimits,
    },
    /// Queued delivery `seq` was sent with `packet_id` (QoS >= 1): it moves to inflight.
    Sent {
        /// The delivery's number ([`QueuedMessage::seq`]).
        seq: u64,
        /// Packet identifier it went out with.
        packet_id: u16,
    },
    /// Queued delivery `seq` left the queue without needing an acknowledgement: sent at
    /// QoS 0, expired, evicted by the queue bounds or handed to another shared-group member.
    Discard {
        /// The delivery's number.
        seq: u64,
    },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the delivery is done.
    Acked {
        /// Packet identifier.
        packet_id: u16,
    },
    /// PUBREC: a QoS 2 delivery moves to the PUBREL stage.
    Received {
        /// Packet identifier.
        packet_id: u16,
    },
    /// An inbound QoS 2 PUBLISH was accepted: its id awaits PUBREL (exactly once).
    InboundReceived {
        /// Packet identifier.
        packet_id: u16,
    },
    /// PUBREL for an inbound QoS 2 id.
    InboundReleased {
        /// Packet identifier.
        packet_id: u16,
    },
    /// Sets or clears the will held for a delayed publication.
    SetWill(Option<WillMessage>),
    /// Changes the Session Expiry Interval (MQTT 5 DISCONNECT).
    SetExpiry(u32),
    /// The client disconnected at this time (ms since the Unix epoch, the proposer's clock).
    Disconnected {
        /// When.
        at_ms: u64,
    },
    /// Replaces the whole session with the owner's view, after operations were lost on the
    /// way (a full write queue): the store catches up in one step. Only for an existing
    /// session, and fenced like every other operation.
    Reset(Box<SessionState>),
    /// Ends the session.
    Remove,
}

/// A session operation with what fences it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionCommand {
    /// Client identifier.
    pub client_id: String,
    /// Epoch of the node that issued it: older than the session's, it is refused.
    pub epoch: Epoch,
    /// The change.
    pub op: SessionOp,
}

/// Why a command was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// Issued under an older epoch than the session's: another node owns it now.
    #[error("fenced: command epoch {command} is older than the session's {session}")]
    Fenced {
        /// The command's epoch.
        command: Epoch,
        /// The session's epoch.
        session: Epoch,
    },
    /// The session does not exist (only a claim creates one).
    #[error("no such session")]
    NoSession,
}

/// The outcome of an applied command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Messages the queue bounds dropped.
    pub dropped: u64,
    /// The session was removed.
    pub removed: bool,
}

/// Applies `cmd` to a session (`None`: no such session). Pure and deterministic: the same
/// state and command give the same result on every node.
pub fn apply(state: &mut Option<SessionState>, queue_bytes: &mut usize, cmd: &SessionCommand) -> Result<Applied, OpError> {
    if let SessionOp::Claim { clean, owner, expiry_secs } = &cmd.op {
        if let Some(s) = state.as_ref().filter(|s| s.epoch > cmd.epoch) {
            return Err(OpError::Fenced { command: cmd.epoch, session: s.epoch });
        }
        let session = match state.take() {
            Some(s) if !clean => s,
            _ => {
                *queue_bytes = 0;
                SessionState { client_id: cmd.client_id.clone(), ..SessionState::default() }
            }
        };
        // A claim is a connection: it cancels a will still waiting for its delay
        // [MQTT-3.1.3-9].
        *state = Some(SessionState {
            epoch: cmd.epoch,
            owner: owner.clone(),
            expiry_secs: *expiry_secs,
            disconnected_at_ms: 0,
            will: None,
            ..session
        });
        return Ok(Applied::default());
    }
    let Some(s) = state.as_mut() else { return Err(OpError::NoSession) };
    if cmd.epoch < s.epoch {
        return Err(OpError::Fenced { command: cmd.epoch, session: s.epoch });
    }
    let mut applied = Applied::default();
    match &cmd.op {
        SessionOp::Claim { .. } => {}
        SessionOp::Subscribe { filter, options } => {
            s.subscriptions.insert(filter.clone(), *options);
        }
        SessionOp::Unsubscribe { filter } => {
            s.subscriptions.remove(filter);
        }
        SessionOp::Append { item, limits } => {
            applied.dropped = push_bounded(&mut s.queue, queue_bytes, item.clone(), *limits);
        }
        SessionOp::Sent { seq, packet_id } => {
            if let Some(item) = take_queued(s, queue_bytes, *seq) {
                s.inflight.insert(*packet_id, InflightMessage { queued: item, stage: InflightStage::Published });
            }
        }
        SessionOp::Discard { seq } => {
            take_queued(s, queue_bytes, *seq);
        }
        SessionOp::Acked { packet_id } => {
            s.inflight.remove(packet_id);
        }
        SessionOp::Received { packet_id } => {
            if let Some(m) = s.inflight.get_mut(packet_id) {
                m.stage = InflightStage::Released;
            }
        }
        SessionOp::InboundReceived { packet_id } => {
            if !s.awaiting_rel.contains(packet_id) {
                s.awaiting_rel.push(*packet_id);
                s.awaiting_rel.sort_unstable();
            }
        }
        SessionOp::InboundReleased { packet_id } => {
            s.awaiting_rel.retain(|id| id != packet_id);
        }
        SessionOp::SetWill(will) => s.will.clone_from(will),
        SessionOp::SetExpiry(secs) => s.expiry_secs = *secs,
        SessionOp::Disconnected { at_ms } => s.disconnected_at_ms = *at_ms,
        SessionOp::Reset(whole) => {
            // The epoch stays the session's: a reset never claims.
            let epoch = s.epoch;
            *s = SessionState { epoch, ..(**whole).clone() };
            *queue_bytes = crate::session::queue_bytes(s);
        }
        SessionOp::Remove => {
            *state = None;
            *queue_bytes = 0;
            applied.removed = true;
        }
    }
    Ok(applied)
}

/// Takes delivery `seq` out of the queue. Deliveries leave the queue almost always from its
/// front, so the search is short.
fn take_queued(s: &mut SessionState, queue_bytes: &mut usize, seq: u64) -> Option<QueuedMessage> {
    let at = s.queue.iter().position(|q| q.seq == seq)?;
    let item = s.queue.remove(at)?;
    *queue_bytes = queue_bytes.saturating_sub(item.message.weight());
    Some(item)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::{Message, QoS};
    use crate::session::DropPolicy;

    fn item(n: u8, qos: QoS) -> QueuedMessage {
        let message = Message { received_at_us: 0, ..Message::new(format!("t/{n}"), vec![n].into(), qos, false, "p".into()) };
        QueuedMessage {
            message: Arc::new(message),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
            seq: u64::from(n),
            origin: None,
        }
    }

    fn cmd(epoch: Epoch, op: SessionOp) -> SessionCommand {
        SessionCommand { client_id: "c".into(), epoch, op }
    }

    const LIMITS: QueueLimits = QueueLimits { max_len: 10, max_bytes: 1 << 20, policy: DropPolicy::DropOldest };

    /// Operations applied one by one give the state a whole-state write of the same
    /// session would have stored (issue 11, item 3).
    #[test]
    fn operations_give_the_state_of_a_whole_state_write() {
        let mut state = None;
        let mut bytes = 0;
        let opts = SubscriptionOptions { qos: QoS::ExactlyOnce, ..SubscriptionOptions::default() };
        let ops = vec![
            SessionOp::Claim { clean: true, owner: Some("alice".into()), expiry_secs: 60 },
            SessionOp::Subscribe { filter: "a/#".into(), options: opts },
            SessionOp::Subscribe { filter: "b".into(), options: SubscriptionOptions::default() },
            SessionOp::Unsubscribe { filter: "b".into() },
            SessionOp::Append { item: item(1, QoS::AtLeastOnce), limits: LIMITS },
            SessionOp::Append { item: item(2, QoS::ExactlyOnce), limits: LIMITS },
            SessionOp::Append { item: item(3, QoS::AtLeastOnce), limits: LIMITS },
            SessionOp::Sent { seq: 1, packet_id: 1 },
            SessionOp::Sent { seq: 2, packet_id: 2 },
            SessionOp::Append { item: item(4, QoS::AtMostOnce), limits: LIMITS },
            SessionOp::Discard { seq: 4 },
            SessionOp::Acked { packet_id: 1 },
            SessionOp::Received { packet_id: 2 },
            SessionOp::InboundReceived { packet_id: 9 },
            SessionOp::InboundReceived { packet_id: 7 },
            SessionOp::InboundReleased { packet_id: 9 },
            SessionOp::SetExpiry(120),
            SessionOp::Disconnected { at_ms: 1_000 },
        ];
        for op in ops {
            assert_eq!(apply(&mut state, &mut bytes, &cmd(1, op)), Ok(Applied::default()));
        }
        let mut expected = SessionState {
            client_id: "c".into(),
            expiry_secs: 120,
            disconnected_at_ms: 1_000,
            owner: Some("alice".into()),
            epoch: 1,
            awaiting_rel: vec![7],
            ..SessionState::default()
        };
        expected.subscriptions.insert("a/#".into(), opts);
        expected.queue.push_back(item(3, QoS::AtLeastOnce));
        expected.inflight.insert(2, InflightMessage { queued: item(2, QoS::ExactlyOnce), stage: InflightStage::Released });
        assert_eq!(state, Some(expected));
        assert_eq!(bytes, item(3, QoS::AtLeastOnce).message.weight());
    }

    /// An old owner's commands are refused once another node claimed the session; its
    /// removal cannot take the session away (issue 11, item 6).
    #[test]
    fn commands_of_an_older_epoch_are_fenced() {
        let mut state = None;
        let mut bytes = 0;
        let claim = |clean| SessionOp::Claim { clean, owner: None, expiry_secs: 60 };
        assert!(apply(&mut state, &mut bytes, &cmd(1, claim(true))).is_ok());
        assert!(apply(&mut state, &mut bytes, &cmd(2, claim(false))).is_ok());
        assert_eq!(apply(&mut state, &mut bytes, &cmd(1, SessionOp::Remove)), Err(OpError::Fenced { command: 1, session: 2 }));
        assert_eq!(apply(&mut state, &mut bytes, &cmd(1, claim(true))), Err(OpError::Fenced { command: 1, session: 2 }));
        assert!(state.is_some());
        assert_eq!(apply(&mut state, &mut bytes, &cmd(2, SessionOp::Remove)), Ok(Applied { dropped: 0, removed: true }));
        assert_eq!(apply(&mut state, &mut bytes, &cmd(2, SessionOp::SetExpiry(1))), Err(OpError::NoSession));
    }

    /// Deliveries are named by their number: one sent out of queue order (a retained
    /// message ahead of older queued ones) moves the right one; an unknown number changes
    /// nothing; a reset replaces the session but never its epoch.
    #[test]
    fn sent_names_its_delivery_and_reset_keeps_the_epoch() {
        let mut state = None;
        let mut bytes = 0;
        let claim = SessionOp::Claim { clean: true, owner: None, expiry_secs: 60 };
        let _ = apply(&mut state, &mut bytes, &cmd(5, claim));
        for n in 1..=3 {
            let _ = apply(&mut state, &mut bytes, &cmd(5, SessionOp::Append { item: item(n, QoS::AtLeastOnce), limits: LIMITS }));
        }
        let _ = apply(&mut state, &mut bytes, &cmd(5, SessionOp::Sent { seq: 3, packet_id: 10 }));
        let _ = apply(&mut state, &mut bytes, &cmd(5, SessionOp::Sent { seq: 99, packet_id: 11 }));
        let s = state.clone().unwrap_or_default();
        assert_eq!(s.queue.iter().map(|q| q.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.inflight.iter().map(|(id, m)| (*id, m.queued.seq)).collect::<Vec<_>>(), [(10, 3)]);
        let owner_view = SessionState { client_id: "c".into(), expiry_secs: 7, epoch: 1, ..SessionState::default() };
        assert!(apply(&mut state, &mut bytes, &cmd(5, SessionOp::Reset(Box::new(owner_view)))).is_ok());
        let s = state.unwrap_or_default();
        assert_eq!((s.epoch, s.expiry_secs, s.queue.len(), bytes), (5, 7, 0, 0));
    }

    /// The same commands give the same state wherever they are applied.
    #[test]
    fn apply_is_deterministic() {
        let run = || {
            let mut state = None;
            let mut bytes = 0;
            let mut dropped = 0;
            let _ = apply(&mut state, &mut bytes, &cmd(3, SessionOp::Claim { clean: true, owner: None, expiry_secs: 5 }));
            for n in 0..30 {
                let op = SessionOp::Append { item: item(n, if n % 3 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce }), limits: LIMITS };
                dropped += apply(&mut state, &mut bytes, &cmd(3, op)).map(|a| a.dropped).unwrap_or(0);
            }
            (state, bytes, dropped)
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!(a.2, 20, "a queue of 10 kept the last 10 of 30");
    }
}
