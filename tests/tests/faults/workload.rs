//! The workload: persistent MQTT 5 publishers (QoS 1 and QoS 2, one message in flight each,
//! every tenth retained) and persistent subscribers, spread over the nodes. A client whose
//! connection fails (or that hears nothing for a while) reconnects to the next node with
//! Clean Start 0 and carries on as MQTT says: a publisher sends its unacknowledged message
//! again with DUP set (or its PUBREL), a subscriber keeps its QoS 2 packet ids awaiting
//! PUBREL. Everything is recorded in the [`History`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{Packet, Protocol, PubKind, PubResponse};
use raftmq_tests::*;

use super::history::{parse, payload, Event, History};

/// How long a client waits for an answer before it takes the connection for dead.
const ANSWER: Duration = Duration::from_secs(4);
/// The filter every subscriber holds.
pub const FILTER: &str = "faults/#";

/// The same messages for a shared group: each goes to one member ([`GROUP_PREFIX`]).
pub const SHARED_FILTER: &str = "$share/g/faults/#";

/// Subscribers whose name starts with this are the members of the one shared group; the
/// checker counts the group as one subscriber.
pub const GROUP_PREFIX: &str = "grp-";

/// A client's connection, moved from node to node.
struct Client {
    id: String,
    nodes: Vec<SocketAddr>,
    next: usize,
    conn: Option<Raw>,
    history: Arc<History>,
    /// Whether the broker holds a session for it (after its first connection).
    started: bool,
    /// Set when a reconnection found no session (the client forgets its session state).
    session_lost: bool,
    deadline: Instant,
}

impl Client {
    fn new(id: &str, nodes: &[SocketAddr], first: usize, history: &Arc<History>, deadline: Instant) -> Client {
        Client {
            id: id.to_owned(),
            nodes: nodes.to_vec(),
            next: first,
            conn: None,
            history: Arc::clone(history),
            started: false,
            session_lost: false,
            deadline,
        }
    }

    /// The connection, reconnecting (node after node) when there is none.
    async fn conn(&mut self) -> anyhow::Result<&mut Raw> {
        while self.conn.is_none() {
            anyhow::ensure!(Instant::now() < self.deadline, "{} could not reconnect before the deadline", self.id);
            let node = self.next % self.nodes.len();
            let mut connect = connect_packet(Protocol::V5, &self.id, !self.started);
            connect.properties.session_expiry_interval = Some(300);
            match tokio::time::timeout(ANSWER, Raw::connect_with(self.nodes[node], connect)).await {
                Ok(Ok((raw, ack))) if ack.code == 0 => {
                    self.history.record(Event::Connected { client: self.id.clone(), node, resumed: ack.session_present });
                    if self.started && !ack.session_present {
                        self.history.record(Event::SessionLost { client: self.id.clone() });
                        self.session_lost = true;
                    }
                    self.started = true;
                    self.conn = Some(raw);
                }
                _ => {
                    self.next += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.conn.as_mut().ok_or_else(|| anyhow::anyhow!("no connection"))
    }

    /// The connection failed: the next attempt goes to the next node.
    fn lost(&mut self) {
        self.conn = None;
        self.next += 1;
    }
}

/// Publishes `count` messages to `faults/<id>` at `qos`; returns when all are acknowledged
/// or refused, or at the deadline.
pub async fn publisher(
    id: String,
    qos: QoS,
    count: u64,
    nodes: Vec<SocketAddr>,
    first: usize,
    history: Arc<History>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut client = Client::new(&id, &nodes, first, &history, deadline);
    let topic = format!("faults/{id}");
    // Refusals in a row from the node connected to: a node cut off from the others refuses
    // every write, and a client there backs off and, after a few, tries another node.
    let mut refusals = 0;
    for n in 1..=count {
        let retain = n % 10 == 0;
        let packet_id = (n % 65_535 + 1) as u16;
        history.record(Event::Sent { publisher: id.clone(), id: n, qos: qos as u8, retain });
        let mut dup = false;
        let mut released = false;
        loop {
            anyhow::ensure!(Instant::now() < deadline, "{id} did not finish before the deadline");
            let conn = client.conn().await?;
            let step = if !released {
                let mut p = publish(&topic, &payload(&id, n), qos, retain, packet_id);
                p.dup = dup;
                dup = true;
                conn.send(&Packet::Publish(p)).await
            } else {
                conn.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, packet_id, 0))).await
            };
            let answer = match step {
                Ok(()) => wait_for(conn, packet_id).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(r) if r.kind == PubKind::PubAck || (r.kind == PubKind::PubRec && !released) => {
                    if r.reason >= 0x80 {
                        history.record(Event::Refused { publisher: id.clone(), id: n, code: r.reason });
                        refusals += 1;
                        if refusals % 3 == 0 {
                            client.lost();
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    refusals = 0;
                    history.record(Event::Acked { publisher: id.clone(), id: n });
                    if r.kind == PubKind::PubAck {
                        break;
                    }
                    released = true;
                }
                Ok(r) if r.kind == PubKind::PubComp => break,
                Ok(_) => {}
                Err(_) => client.lost(),
            }
        }
    }
    Ok(())
}

/// The next acknowledgement for `packet_id` (others are ignored).
async fn wait_for(conn: &mut Raw, packet_id: u16) -> anyhow::Result<PubResponse> {
    loop {
        match conn.recv_within(ANSWER).await? {
            Some(Packet::PubResponse(r)) if r.packet_id == packet_id => return Ok(r),
            Some(_) => {}
            None => anyhow::bail!("connection closed"),
        }
    }
}

/// A persistent subscriber to [`FILTER`] (or, for a name starting with [`GROUP_PREFIX`], a
/// member of the group on [`SHARED_FILTER`]): records what it receives until `stop`.
pub async fn subscriber(
    id: String,
    nodes: Vec<SocketAddr>,
    first: usize,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut client = Client::new(&id, &nodes, first, &history, deadline);
    loop {
        let conn = client.conn().await?;
        let filter = if id.starts_with(GROUP_PREFIX) { SHARED_FILTER } else { FILTER };
        if conn.subscribe(1, filter, QoS::ExactlyOnce).await.is_ok_and(|codes| codes == vec![2]) {
            history.record(Event::Subscribed { subscriber: id.clone() });
            break;
        }
        client.lost();
    }
    // QoS 2 packet ids received and awaiting PUBREL: a PUBLISH with one of them is a resend.
    let mut awaiting: HashSet<u16> = HashSet::new();
    while !stop.load(Ordering::Acquire) {
        client.conn().await?;
        if std::mem::take(&mut client.session_lost) {
            awaiting.clear();
        }
        let conn = client.conn().await?;
        // Quiet for a while (nobody publishes): look at `stop` again. Reading is
        // cancellation-safe (what arrived stays buffered).
        let Ok(read) = tokio::time::timeout(Duration::from_millis(500), conn.recv_within(ANSWER)).await else { continue };
        let packet = match read {
            Ok(Some(p)) => p,
            _ => {
                client.lost();
                continue;
            }
        };
        let reply = match packet {
            Packet::Publish(p) => {
                let Some((publisher, n)) = parse(&p.payload) else { continue };
                match p.qos {
                    QoS::AtLeastOnce => {
                        history.record(Event::Received {
                            subscriber: id.clone(),
                            publisher,
                            id: n,
                            qos: 1,
                            packet_id: p.packet_id,
                            dup: p.dup,
                        });
                        Some(PubResponse::new(PubKind::PubAck, p.packet_id, 0))
                    }
                    QoS::ExactlyOnce => {
                        if awaiting.insert(p.packet_id) {
                            history.record(Event::Received {
                                subscriber: id.clone(),
                                publisher,
                                id: n,
                                qos: 2,
                                packet_id: p.packet_id,
                                dup: p.dup,
                            });
                        }
                        Some(PubResponse::new(PubKind::PubRec, p.packet_id, 0))
                    }
                    QoS::AtMostOnce => None,
                }
            }
            Packet::PubResponse(r) if r.kind == PubKind::PubRel => {
                awaiting.remove(&r.packet_id);
                Some(PubResponse::new(PubKind::PubComp, r.packet_id, 0))
            }
            _ => None,
        };
        if let Some(reply) = reply {
            if conn.send(&Packet::PubResponse(reply)).await.is_err() {
                client.lost();
            }
        }
    }
    Ok(())
}

/// The retained message each publisher's topic holds on node `node`, as a new clean client
/// there sees it (waits up to `within` for `expected` of them).
pub async fn retained_on(node: usize, addr: SocketAddr, expected: usize, history: &History, within: Duration) -> anyhow::Result<()> {
    let (mut c, ack) =
        raftmq_tests::processes::connect_accepted(addr, connect_packet(Protocol::V5, &format!("retained-check-{node}"), true)).await?;
    anyhow::ensure!(ack.code == 0, "CONNACK {:#x} on node {node}", ack.code);
    c.subscribe(1, FILTER, QoS::AtMostOnce).await?;
    let until = Instant::now() + within;
    let mut seen = 0;
    while seen < expected && Instant::now() < until {
        let Ok(Some(Packet::Publish(p))) = c.recv_within(until.saturating_duration_since(Instant::now())).await else { break };
        if let (true, Some((publisher, id))) = (p.retain, parse(&p.payload)) {
            history.record(Event::RetainedSeen { node, publisher, id });
            seen += 1;
        }
    }
    Ok(())
}
