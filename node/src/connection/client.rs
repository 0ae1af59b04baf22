//! What a connected client negotiated, and the checks made on its behalf.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use raftmq_cluster::session::WillMessage;

use crate::broker::Broker;
use crate::codec::{Packet, Properties, Protocol, PubKind, PubResponse};
use crate::net::rate::RateLimiter;
use crate::security::acl::{Access, Subject};
use crate::security::Owner;
use crate::session::SessionSlot;
use crate::telemetry::printable::Printable;

/// What a connected client negotiated.
pub(super) struct Client {
    pub(super) client_id: Arc<str>,
    pub(super) protocol: Protocol,
    pub(super) conn_id: u64,
    /// Client's Receive Maximum: our outbound window is at most this.
    pub(super) receive_maximum: u16,
    pub(super) will: Option<Box<WillMessage>>,
    /// Session expiry from CONNECT (a DISCONNECT may change it unless it was 0).
    pub(super) connect_expiry: u32,
    /// Request Problem Information: send Reason Strings on acknowledgements.
    pub(super) problem_info: bool,
    /// Authentication method of CONNECT, for re-authentication.
    pub(super) auth_method: Option<Box<str>>,
    /// Topic aliases both ways, made on first use: most clients never use them.
    pub(super) aliases: Option<Box<TopicAliases>>,
    /// The client's Topic Alias Maximum.
    pub(super) client_alias_max: u16,
    /// Inbound PUBLISH rate limit.
    pub(super) rate: Option<Box<RateLimiter>>,
    /// A subscriber whose queue this client's messages are filling: the connection waits
    /// for it to drain before reading more.
    pub(super) congested: Option<Arc<SessionSlot>>,
    /// The next PUBLISH that matches nothing may yield once (see
    /// `let_earlier_packets_land`); set at each read.
    pub(super) may_yield: bool,
    /// Who the client authenticated as and its address, for ACL checks; shared with the
    /// session slot, which records it as the session's owner.
    pub(super) owner: Arc<Owner>,
    /// Acknowledgements of this read's PUBLISHes waiting for other nodes, in order.
    pub(super) deferred: Vec<super::inbound::PendingAck>,
    /// PUBRELs waiting until their QoS 2 stage is in the store (persistent sessions).
    pub(super) pending_rel: Vec<(u16, crate::session::Durability)>,
}

/// Topic aliases of one connection.
#[derive(Default)]
pub(super) struct TopicAliases {
    /// Aliases the client defined, bounded by `max_topic_alias`.
    pub(super) inbound: HashMap<u16, String>,
    /// Aliases we defined, bounded by the client's Topic Alias Maximum.
    pub(super) outbound: HashMap<String, u16>,
}

impl Client {
    /// A Reason String for an acknowledgement, if the client asked for them.
    pub(super) fn problem(&self, why: &str) -> Properties {
        let mut p = Properties::default();
        if self.problem_info && self.protocol.is_v5() {
            p.reason_string = Some(why.to_owned());
        }
        p
    }

    /// Whether the ACL in force allows `access` to `topic`.
    pub(super) fn allowed(&self, broker: &Broker, access: Access, topic: &str) -> bool {
        let security = broker.security();
        let subject = Subject { client_id: &self.client_id, identity: &self.owner.identity, peer: self.owner.peer.ip() };
        let ok = security.allows(&subject, access, topic);
        if ok {
            broker.stats.acl_allowed.fetch_add(1, Ordering::Relaxed);
        } else {
            broker.stats.acl_denied.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = broker.log_limits.acl_denied.allow() {
                tracing::info!(client_id = %Printable(&self.client_id), ?access, topic = %Printable(topic), suppressed, "denied by ACL");
            }
        }
        ok
    }

    /// An acknowledgement with `code`, carrying `why` when it is a failure.
    pub(super) fn ack(&self, kind: PubKind, packet_id: u16, code: u8, why: &str) -> Packet {
        let mut r = PubResponse::new(kind, packet_id, code);
        if code >= 0x80 {
            r.properties = self.problem(why);
        }
        Packet::PubResponse(r)
    }
}
