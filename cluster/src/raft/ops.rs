//! The operations the replicated store applies, their outcomes, and their wire form
//! (`StoreBatch` in `cluster.proto`: a log entry holds one encoded batch).

use std::sync::Arc;

use prost::Message as _;
use raftmq_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::convert::{subscription_from_wire, subscription_to_wire, ConvertError};
use crate::message::Message;
use crate::registry::Epoch;
use crate::retained::{RetainOutcome, RetainedLimits};
use crate::session::{DropPolicy, QueueLimits, QueuedMessage, SessionState, WillMessage};
use crate::session_ops::{Applied, OpError, SessionCommand, SessionOp};
use crate::NodeId;

/// One change of the replicated state.
// Built and consumed within one batch; boxing the common (session) variant would cost an
// allocation per operation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum StoreOp {
    /// A persistent session's operation (fenced by its epoch).
    Session(SessionCommand),
    /// A retained message set or (empty payload) deleted, within the proposer's caps.
    Retain {
        /// The message.
        message: Arc<Message>,
        /// Caps of the proposing node's configuration.
        limits: RetainedLimits,
    },
    /// A client id claimed for a node above `above`.
    Claim {
        /// Client id.
        client_id: String,
        /// Claiming node.
        node: NodeId,
        /// The new epoch must exceed this (another node's epoch for the id).
        above: Epoch,
    },
    /// A client id forgotten if `epoch` is still current.
    Release {
        /// Client id.
        client_id: String,
        /// The releasing claim's epoch.
        epoch: Epoch,
    },
}

/// The outcome of one [`StoreOp`], as the state machine returns it to openraft (and a
/// leader to a follower that forwarded the write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// A session operation applied.
    Applied {
        /// Queued messages the bounds dropped.
        dropped: u64,
        /// The session was removed.
        removed: bool,
    },
    /// A session operation of an older epoch than the session's.
    Fenced {
        /// The operation's epoch.
        command: Epoch,
        /// The session's.
        session: Epoch,
    },
    /// A session operation for a session that does not exist.
    NoSession,
    /// A retained write: 0 stored, 1 deleted, 2 refused by a cap.
    Retained(u8),
    /// A claim: the new epoch.
    Claimed(Epoch),
    /// A release: whether it forgot the id.
    Released(bool),
    /// The operation could not be decoded (a node of another version wrote it).
    Invalid,
}

impl From<Result<Applied, OpError>> for Reply {
    fn from(r: Result<Applied, OpError>) -> Self {
        match r {
            Ok(a) => Reply::Applied { dropped: a.dropped, removed: a.removed },
            Err(OpError::Fenced { command, session }) => Reply::Fenced { command, session },
            Err(OpError::NoSession) => Reply::NoSession,
        }
    }
}

impl Reply {
    /// The session outcome this reply stands for (anything else reads as no session).
    pub fn session(self) -> Result<Applied, OpError> {
        match self {
            Reply::Applied { dropped, removed } => Ok(Applied { dropped, removed }),
            Reply::Fenced { command, session } => Err(OpError::Fenced { command, session }),
            _ => Err(OpError::NoSession),
        }
    }

    /// A retained write's reply.
    pub fn retained(outcome: RetainOutcome) -> Self {
        Reply::Retained(match outcome {
            RetainOutcome::Stored => 0,
            RetainOutcome::Deleted => 1,
            RetainOutcome::Refused => 2,
        })
    }

    /// The retained outcome this reply stands for.
    pub fn retain_outcome(self) -> RetainOutcome {
        match self {
            Reply::Retained(0) => RetainOutcome::Stored,
            Reply::Retained(1) => RetainOutcome::Deleted,
            _ => RetainOutcome::Refused,
        }
    }
}

/// Encodes a batch of operations as a log entry carries it.
pub fn encode_batch<'a>(ops: impl IntoIterator<Item = &'a StoreOp>) -> bytes::Bytes {
    encode_tagged_batch(ops, Tag::default())
}

/// Who proposed a batch, and its number there ([`Tag::default`]: untagged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tag {
    /// The proposing node.
    pub proposer: u64,
    /// The batch's number on that node (from 1).
    pub seq: u64,
}

/// [`encode_batch`] with the proposer's tag.
pub fn encode_tagged_batch<'a>(ops: impl IntoIterator<Item = &'a StoreOp>, tag: Tag) -> bytes::Bytes {
    pb::StoreBatch { ops: ops.into_iter().map(pb::StoreOp::from).collect(), proposer: tag.proposer, seq: tag.seq }.encode_to_vec().into()
}

/// Decodes a log entry's batch: each operation, or why it could not be read (its reply is
/// then [`Reply::Invalid`], deterministically on every node).
pub fn decode_batch(bytes: &[u8]) -> Vec<Result<StoreOp, ConvertError>> {
    decode_tagged_batch(bytes).1
}

/// [`decode_batch`] with the proposer's tag.
pub fn decode_tagged_batch(bytes: &[u8]) -> (Tag, Vec<Result<StoreOp, ConvertError>>) {
    match pb::StoreBatch::decode(bytes) {
        Ok(batch) => (Tag { proposer: batch.proposer, seq: batch.seq }, batch.ops.into_iter().map(StoreOp::try_from).collect()),
        Err(_) => (Tag::default(), vec![Err(ConvertError::Missing("a decodable batch"))]),
    }
}

fn limits_policy(p: DropPolicy) -> u32 {
    match p {
        DropPolicy::DropOldest => 0,
        DropPolicy::DropNew => 1,
    }
}

impl From<&SessionCommand> for pb::SessionCommand {
    fn from(c: &SessionCommand) -> Self {
        use pb::session_command::Op;
        let op = match &c.op {
            SessionOp::Claim { clean, owner, expiry_secs } => {
                Op::Claim(pb::SessionClaim { clean: *clean, owner: owner.clone(), expiry_secs: *expiry_secs })
            }
            SessionOp::Subscribe { filter, options } => Op::Subscribe(subscription_to_wire(filter, options)),
            SessionOp::Unsubscribe { filter } => Op::Unsubscribe(filter.clone()),
            SessionOp::Append { item, limits } => Op::Append(pb::SessionAppend {
                item: Some(pb::Queued::from(item)),
                max_len: limits.max_len as u64,
                max_bytes: limits.max_bytes as u64,
                policy: limits_policy(limits.policy),
            }),
            SessionOp::Sent { seq, packet_id } => Op::Sent(pb::SessionSent { seq: *seq, packet_id: u32::from(*packet_id) }),
            SessionOp::Discard { seq } => Op::Discard(*seq),
            SessionOp::Acked { packet_id } => Op::Acked(u32::from(*packet_id)),
            SessionOp::Received { packet_id } => Op::Received(u32::from(*packet_id)),
            SessionOp::InboundReceived { packet_id } => Op::InboundReceived(u32::from(*packet_id)),
            SessionOp::InboundReleased { packet_id } => Op::InboundReleased(u32::from(*packet_id)),
            SessionOp::SetWill(will) => Op::SetWill(pb::WillChange { will: will.as_ref().map(pb::Will::from) }),
            SessionOp::SetExpiry(secs) => Op::SetExpiry(*secs),
            SessionOp::Disconnected { at_ms } => Op::DisconnectedAtMs(*at_ms),
            SessionOp::Reset(state) => Op::Reset(pb::Session::from(state.as_ref())),
            SessionOp::Remove => Op::Remove(pb::Ack {}),
        };
        pb::SessionCommand { client_id: c.client_id.clone(), epoch: c.epoch, op: Some(op) }
    }
}

impl TryFrom<pb::SessionCommand> for SessionCommand {
    type Error = ConvertError;

    fn try_from(c: pb::SessionCommand) -> Result<Self, Self::Error> {
        use pb::session_command::Op;
        let packet_id = |v: u32| u16::try_from(v).ok().filter(|id| *id != 0).ok_or(ConvertError::OutOfRange("packet id"));
        let op = match c.op.ok_or(ConvertError::Missing("session operation"))? {
            Op::Claim(claim) => SessionOp::Claim { clean: claim.clean, owner: claim.owner, expiry_secs: claim.expiry_secs },
            Op::Subscribe(sub) => {
                let (filter, options) = subscription_from_wire(sub)?;
                SessionOp::Subscribe { filter, options }
            }
            Op::Unsubscribe(filter) => SessionOp::Unsubscribe { filter },
            Op::Append(a) => SessionOp::Append {
                item: QueuedMessage::try_from(a.item.ok_or(ConvertError::Missing("queued message"))?)?,
                limits: QueueLimits {
                    max_len: usize::try_from(a.max_len).unwrap_or(usize::MAX),
                    max_bytes: usize::try_from(a.max_bytes).unwrap_or(usize::MAX),
                    policy: if a.policy == 1 { DropPolicy::DropNew } else { DropPolicy::DropOldest },
                },
            },
            Op::Sent(s) => SessionOp::Sent { seq: s.seq, packet_id: packet_id(s.packet_id)? },
            Op::Discard(seq) => SessionOp::Discard { seq },
            Op::Acked(id) => SessionOp::Acked { packet_id: packet_id(id)? },
            Op::Received(id) => SessionOp::Received { packet_id: packet_id(id)? },
            Op::InboundReceived(id) => SessionOp::InboundReceived { packet_id: packet_id(id)? },
            Op::InboundReleased(id) => SessionOp::InboundReleased { packet_id: packet_id(id)? },
            Op::SetWill(change) => SessionOp::SetWill(change.will.map(WillMessage::try_from).transpose()?),
            Op::SetExpiry(secs) => SessionOp::SetExpiry(secs),
            Op::DisconnectedAtMs(at_ms) => SessionOp::Disconnected { at_ms },
            Op::Reset(state) => SessionOp::Reset(Box::new(SessionState::try_from(state)?)),
            Op::Remove(_) => SessionOp::Remove,
        };
        Ok(SessionCommand { client_id: c.client_id, epoch: c.epoch, op })
    }
}

impl From<&StoreOp> for pb::StoreOp {
    fn from(op: &StoreOp) -> Self {
        use pb::store_op::Op;
        let op = match op {
            StoreOp::Session(c) => Op::Session(pb::SessionCommand::from(c)),
            StoreOp::Retain { message, limits } => Op::Retain(pb::RetainOp {
                message: Some(pb::Message::from(message.as_ref())),
                max_messages: limits.max_messages as u64,
                max_bytes: limits.max_bytes as u64,
                max_payload: limits.max_payload as u64,
            }),
            StoreOp::Claim { client_id, node, above } => {
                Op::Claim(pb::ClaimOp { client_id: client_id.clone(), node: *node, above: *above })
            }
            StoreOp::Release { client_id, epoch } => Op::Release(pb::ReleaseOp { client_id: client_id.clone(), epoch: *epoch }),
        };
        pb::StoreOp { op: Some(op) }
    }
}

impl TryFrom<pb::StoreOp> for StoreOp {
    type Error = ConvertError;

    fn try_from(op: pb::StoreOp) -> Result<Self, Self::Error> {
        use pb::store_op::Op;
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(match op.op.ok_or(ConvertError::Missing("store operation"))? {
            Op::Session(c) => StoreOp::Session(SessionCommand::try_from(c)?),
            Op::Retain(r) => StoreOp::Retain {
                message: Arc::new(Message::try_from(r.message.ok_or(ConvertError::Missing("retained message"))?)?),
                limits: RetainedLimits {
                    max_messages: size(r.max_messages),
                    max_bytes: size(r.max_bytes),
                    max_payload: size(r.max_payload),
                },
            },
            Op::Claim(c) => StoreOp::Claim { client_id: c.client_id, node: c.node, above: c.above },
            Op::Release(r) => StoreOp::Release { client_id: r.client_id, epoch: r.epoch },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::QoS;
    use crate::session::SubscriptionOptions;

    fn message(topic: &str) -> Message {
        let mut m = Message::new(topic.into(), bytes::Bytes::from_static(b"payload"), QoS::AtLeastOnce, true, "pub".into());
        // The wire carries milliseconds.
        m.received_at_us = 1_700_000_000_000_000;
        m
    }

    #[test]
    fn every_operation_survives_the_wire() -> Result<(), ConvertError> {
        let cmd = |op| StoreOp::Session(SessionCommand { client_id: "c".into(), epoch: 7, op });
        let item = QueuedMessage {
            message: Arc::new(message("a/b")),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: vec![3],
            shared: None,
            seq: 12,
            origin: None,
        };
        let ops = vec![
            cmd(SessionOp::Claim { clean: true, owner: Some("u".into()), expiry_secs: 60 }),
            cmd(SessionOp::Subscribe {
                filter: "a/#".into(),
                options: SubscriptionOptions { qos: QoS::ExactlyOnce, ..Default::default() },
            }),
            cmd(SessionOp::Unsubscribe { filter: "a/#".into() }),
            cmd(SessionOp::Append { item, limits: QueueLimits { max_len: 10, max_bytes: 1000, policy: DropPolicy::DropNew } }),
            cmd(SessionOp::Sent { seq: 4, packet_id: 9 }),
            cmd(SessionOp::Discard { seq: 5 }),
            cmd(SessionOp::Acked { packet_id: 9 }),
            cmd(SessionOp::Received { packet_id: 10 }),
            cmd(SessionOp::InboundReceived { packet_id: 11 }),
            cmd(SessionOp::InboundReleased { packet_id: 11 }),
            cmd(SessionOp::SetWill(Some(WillMessage { message: message("will"), delay_secs: 5 }))),
            cmd(SessionOp::SetWill(None)),
            cmd(SessionOp::SetExpiry(30)),
            cmd(SessionOp::Disconnected { at_ms: 99 }),
            cmd(SessionOp::Reset(Box::new(SessionState { client_id: "c".into(), epoch: 7, ..Default::default() }))),
            cmd(SessionOp::Remove),
            StoreOp::Retain { message: Arc::new(message("r")), limits: RetainedLimits { max_messages: 1, max_bytes: 2, max_payload: 3 } },
            StoreOp::Claim { client_id: "c".into(), node: 4, above: 5 },
            StoreOp::Release { client_id: "c".into(), epoch: 6 },
        ];
        let decoded: Vec<StoreOp> = decode_batch(&encode_batch(&ops)).into_iter().collect::<Result<_, _>>()?;
        assert_eq!(format!("{ops:?}"), format!("{decoded:?}"));
        Ok(())
    }

    #[test]
    fn garbage_decodes_to_an_error_not_a_panic() {
        assert!(decode_batch(b"\xff\xff\xff").iter().all(|r| r.is_err()));
    }
}
