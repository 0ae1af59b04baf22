//! Sessions: clean session / clean start, session present, offline queue, resend with DUP,
//! takeover, expiry.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Disconnect, Packet, Protocol, PubKind, PubResponse};
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_3_2_2_persistent_session_queues_qos1_while_offline() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V311, "durable", false).await?;
    assert!(!ack.session_present);
    sub.subscribe(1, "cmd/#", QoS::AtLeastOnce).await?;
    sub.send(&Packet::Disconnect(Disconnect::new(0))).await?;
    sub.expect_closed(DEADLINE).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "commander", true).await?;
    for i in 0..3u8 {
        publ.publish("cmd/x", &[i], QoS::AtLeastOnce, false, u16::from(i) + 1).await?;
    }
    publ.publish("cmd/x", b"q0", QoS::AtMostOnce, false, 0).await?;
    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V311, "durable", false).await?;
    assert!(ack.session_present);
    for i in 0..3u8 {
        let p = sub.recv_publish().await?;
        assert_eq!(p.payload[0], i, "offline queue in order");
        sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
    }
    // QoS 0 is not queued for offline sessions by default.
    publ.publish("cmd/x", b"live", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"live");
    Ok(())
}

#[tokio::test]
async fn mqtt_4_4_0_1_unacknowledged_publish_resent_with_dup_on_resume() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "forgetful", false).await?;
    sub.subscribe(1, "t", QoS::ExactlyOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "p", true).await?;
    publ.publish("t", b"one", QoS::AtLeastOnce, false, 1).await?;
    publ.publish("t", b"two", QoS::ExactlyOnce, false, 2).await?;
    let first = sub.recv_publish().await?;
    let second = sub.recv_publish().await?;
    assert!(!first.dup);
    // Acknowledge step one of QoS 2 only, then vanish.
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, second.packet_id, 0))).await?;
    assert_eq!(sub.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubRel, second.packet_id, 0)));
    drop(sub);
    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V5, "forgetful", false).await?;
    assert!(ack.session_present);
    let again = sub.recv_publish().await?;
    assert!(again.dup);
    assert_eq!((again.packet_id, &again.payload[..]), (first.packet_id, &b"one"[..]));
    assert_eq!(sub.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubRel, second.packet_id, 0)));
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_2_4_clean_start_discards_session() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "cleaner", false).await?;
    sub.subscribe(1, "c", QoS::AtLeastOnce).await?;
    drop(sub);
    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V311, "cleaner", true).await?;
    assert!(!ack.session_present);
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "cp", true).await?;
    assert_eq!(publ.publish("c", b"x", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    sub.ping().await
}

#[tokio::test]
async fn takeover_closes_old_connection_with_0x8e_and_keeps_session() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut old, _) = Raw::connect(b.addr, Protocol::V5, "dev-1", false).await?;
    old.subscribe(1, "dev/1/#", QoS::AtLeastOnce).await?;
    let (mut new, ack) = Raw::connect(b.addr, Protocol::V5, "dev-1", false).await?;
    assert!(ack.session_present);
    assert_eq!(disconnect_reason(old.expect_closed(DEADLINE).await?), Some(reason::SESSION_TAKEN_OVER));
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "ctl", true).await?;
    publ.publish("dev/1/cmd", b"on", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&new.recv_publish().await?.payload[..], b"on");
    assert_eq!(b.server.broker.stats.takeovers.load(std::sync::atomic::Ordering::Relaxed), 1);
    Ok(())
}

#[tokio::test]
async fn v311_takeover_closes_old_connection() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut old, _) = Raw::connect(b.addr, Protocol::V311, "dup-id", true).await?;
    let (mut new, _) = Raw::connect(b.addr, Protocol::V311, "dup-id", true).await?;
    assert_eq!(old.expect_closed(DEADLINE).await?, None);
    new.ping().await
}

#[tokio::test]
async fn session_expires_after_interval() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "brief", false);
    c.properties.session_expiry_interval = Some(1);
    let (mut raw, _) = Raw::connect_with(b.addr, c.clone()).await?;
    raw.subscribe(1, "b", QoS::AtLeastOnce).await?;
    drop(raw);
    let deadline = std::time::Instant::now() + DEADLINE;
    while b.server.broker.session_count() > 0 {
        assert!(std::time::Instant::now() < deadline, "session never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_raw, ack) = Raw::connect_with(b.addr, c).await?;
    assert!(!ack.session_present);
    Ok(())
}

#[tokio::test]
async fn f17_offline_queue_bounded_drop_oldest() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_queue_len = 3).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "full", false).await?;
    sub.subscribe(1, "f", QoS::AtLeastOnce).await?;
    drop(sub);
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "flood", true).await?;
    // Wait until the session is offline: its connection count drops to the publisher's.
    let deadline = std::time::Instant::now() + DEADLINE;
    while b.server.broker.stats.connections.load(std::sync::atomic::Ordering::Relaxed) > 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..5u8 {
        publ.publish("f", &[i], QoS::AtLeastOnce, false, u16::from(i) + 1).await?;
    }
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "full", false).await?;
    let got: Vec<u8> =
        [sub.recv_publish().await?, sub.recv_publish().await?, sub.recv_publish().await?].iter().map(|p| p.payload[0]).collect();
    assert_eq!(got, vec![2, 3, 4]);
    assert!(b.server.broker.stats.messages_dropped() >= 2);
    Ok(())
}

/// Sends QoS 1 messages `1..=count` on `topic` without waiting for acknowledgements.
async fn publish_burst(publ: &mut Raw, topic: &str, count: u16) -> anyhow::Result<()> {
    let mut bytes = bytes::BytesMut::new();
    for id in 1..=count {
        let packet = Packet::Publish(publish(topic, &id.to_be_bytes(), QoS::AtLeastOnce, false, id));
        raftmq_node::codec::encode(&packet, Protocol::V311, &mut bytes);
    }
    publ.send_bytes(&bytes).await
}

/// Receives PUBACKs for ids `1..=count`, in order.
async fn expect_pubacks(publ: &mut Raw, ids: std::ops::RangeInclusive<u16>) -> anyhow::Result<()> {
    for id in ids {
        assert_eq!(publ.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0)));
    }
    Ok(())
}

/// A subscriber that takes one QoS 1 message and acknowledges nothing (queue of 8), and a
/// publisher that has just sent it twelve QoS 1 messages in one burst.
async fn slow_subscriber_after_a_burst(backpressure_ms: u64) -> anyhow::Result<(TestBroker, Raw, Raw)> {
    let b = start_broker(|c| {
        c.mqtt.max_inflight = 1;
        c.mqtt.max_queue_len = 8;
        c.mqtt.publish_backpressure_ms = backpressure_ms;
    })
    .await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "slow-sub", true).await?;
    sub.subscribe(1, "bp/t", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "fast-pub", true).await?;
    publish_burst(&mut publ, "bp/t", 12).await?;
    Ok((b, sub, publ))
}

#[tokio::test]
async fn slow_subscriber_holds_the_publisher_back_instead_of_dropping() -> anyhow::Result<()> {
    let (b, mut sub, mut publ) = slow_subscriber_after_a_burst(60_000).await?;
    // The subscriber holds one message unacknowledged; once its queue is over half full
    // (more than 4), the publisher's connection stops reading: no more PUBACKs.
    let mut acked = 0;
    while let Some(Packet::PubResponse(r)) = tokio::time::timeout(Duration::from_millis(300), publ.recv()).await.ok().transpose()? {
        acked += 1;
        assert_eq!(r.packet_id, acked);
    }
    assert!((5..=6).contains(&acked), "publisher acknowledged {acked} messages before being held back");
    // The subscriber catches up: the publisher goes on, and nothing was dropped.
    let consumer = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 12 {
            let p = sub.recv_publish().await?;
            sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
            got.push(u16::from_be_bytes([p.payload[0], p.payload[1]]));
        }
        anyhow::Ok(got)
    });
    expect_pubacks(&mut publ, acked + 1..=12).await?;
    assert_eq!(consumer.await??, (1..=12).collect::<Vec<u16>>());
    assert_eq!(b.server.broker.stats.messages_dropped(), 0);
    Ok(())
}

#[tokio::test]
async fn without_backpressure_a_full_queue_drops_and_the_publisher_goes_on() -> anyhow::Result<()> {
    let (b, _sub, mut publ) = slow_subscriber_after_a_burst(0).await?;
    expect_pubacks(&mut publ, 1..=12).await?;
    // Eight queued (and one in flight if the subscriber took it before the burst filled
    // the queue): the other three or four were dropped.
    let dropped = b.server.broker.stats.messages_dropped();
    assert!((3..=4).contains(&dropped), "{dropped} dropped");
    Ok(())
}

/// Issue 11, item 8: the server runs over injected stores (the cluster's replicated ones,
/// or a test's). A session found in the injected session store is resumed with its
/// subscriptions.
#[tokio::test]
async fn server_runs_over_injected_stores() -> anyhow::Result<()> {
    use raftmq_cluster::session::{MemorySessionStore, SessionState, SubscriptionOptions};
    let config = test_config(|_| {});
    let mut stores = raftmq_node::broker::Stores::memory(&config);
    let sessions = std::sync::Arc::new(MemorySessionStore::new());
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..SubscriptionOptions::default() };
    let state = SessionState {
        client_id: "from-elsewhere".into(),
        subscriptions: [("moved/#".to_string(), opts)].into_iter().collect(),
        expiry_secs: 300,
        ..SessionState::default()
    };
    store_session(sessions.as_ref(), state).await?;
    stores.sessions = sessions;
    let server = start_broker_over(config, stores).await?.server;
    let (mut resumed, ack) = Raw::connect(server.mqtt_addr, Protocol::V5, "from-elsewhere", false).await?;
    assert!(ack.session_present && ack.code == 0);
    let (mut publ, _) = Raw::connect(server.mqtt_addr, Protocol::V5, "p", true).await?;
    publ.publish("moved/x", b"here", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&resumed.recv_publish().await?.payload[..], b"here");
    Ok(())
}

/// A session store whose writes fail as a replicated store's do without a leader: every
/// write when `refuse_all` is set, else only batches that queue messages.
struct LeaderlessStore {
    inner: raftmq_cluster::session::MemorySessionStore,
    refuse_all: bool,
}

#[async_trait::async_trait]
impl raftmq_cluster::session::SessionStore for LeaderlessStore {
    async fn load(&self, id: &str) -> Result<Option<raftmq_cluster::session::SessionState>, raftmq_cluster::StoreError> {
        self.inner.load(id).await
    }
    async fn apply(
        &self,
        batch: Vec<raftmq_cluster::session_ops::SessionCommand>,
    ) -> Result<Vec<Result<raftmq_cluster::session_ops::Applied, raftmq_cluster::session_ops::OpError>>, raftmq_cluster::StoreError> {
        let appends = batch.iter().any(|c| matches!(c.op, raftmq_cluster::session_ops::SessionOp::Append { .. }));
        if self.refuse_all || appends {
            return Err(raftmq_cluster::StoreError::NotLeader);
        }
        self.inner.apply(batch).await
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

async fn over_leaderless_store(refuse_all: bool) -> anyhow::Result<raftmq_node::server::Server> {
    let config = test_config(|_| {});
    let mut stores = raftmq_node::broker::Stores::memory(&config);
    stores.sessions = std::sync::Arc::new(LeaderlessStore { inner: Default::default(), refuse_all });
    Ok(start_broker_over(config, stores).await?.server)
}

/// Issue 11, item 7: a store error is something a client sees, not a closed connection: a
/// persistent CONNECT gets 0x89 (MQTT 3: 0x03), and a QoS 1 PUBLISH that could not be
/// stored for an offline persistent subscriber gets PUBACK 0x80 on MQTT 5 (the connection
/// goes on) and a close on MQTT 3; every error is counted.
#[tokio::test]
async fn store_errors_are_refusals_the_client_sees() -> anyhow::Result<()> {
    use raftmq_node::codec::connack_v3;
    let server = over_leaderless_store(true).await?;
    let (_, ack) = Raw::connect(server.mqtt_addr, Protocol::V5, "durable", false).await?;
    assert_eq!(ack.code, reason::SERVER_BUSY);
    let (_, ack) = Raw::connect(server.mqtt_addr, Protocol::V311, "durable-3", false).await?;
    assert_eq!(ack.code, connack_v3::SERVER_UNAVAILABLE);
    let (_, ack) = Raw::connect(server.mqtt_addr, Protocol::V5, "clean", true).await?;
    assert_eq!(ack.code, 0, "a clean session needs no store");

    let server = over_leaderless_store(false).await?;
    let addr = server.mqtt_addr;
    let (mut sub, _) = Raw::connect(addr, Protocol::V5, "away", false).await?;
    sub.subscribe(1, "cmd/#", QoS::AtLeastOnce).await?;
    sub.send(&Packet::Disconnect(Disconnect::new(0))).await?;
    sub.expect_closed(DEADLINE).await?;
    let (mut v5, _) = Raw::connect(addr, Protocol::V5, "p5", true).await?;
    assert_eq!(v5.publish("cmd/x", b"x", QoS::AtLeastOnce, false, 1).await?, reason::UNSPECIFIED_ERROR);
    v5.ping().await?;
    let (mut v3, _) = Raw::connect(addr, Protocol::V311, "p3", true).await?;
    v3.send(&Packet::Publish(publish("cmd/x", b"x", QoS::AtLeastOnce, false, 1))).await?;
    assert_eq!(v3.expect_closed(DEADLINE).await?, None);
    let text = server.broker.render_metrics();
    assert!(text.contains("raftmq_store_errors_total{reason=\"not_leader\"} 2"), "{text}");
    Ok(())
}

/// Two brokers ("node-a", "node-b") over one session store and one client registry, as the
/// nodes of a cluster share them; and that store.
async fn two_brokers_sharing_stores(
) -> anyhow::Result<(raftmq_node::server::Server, raftmq_node::server::Server, std::sync::Arc<dyn raftmq_cluster::session::SessionStore>)> {
    let base = |name: &str| test_config(|c| c.node_name = name.into());
    let (config_a, config_b) = (base("node-a"), base("node-b"));
    let stores = raftmq_node::broker::Stores::memory(&config_a);
    let sessions = std::sync::Arc::clone(&stores.sessions);
    let a = start_broker_over(config_a, stores.clone()).await?.server;
    let b = start_broker_over(config_b, stores).await?.server;
    Ok((a, b, sessions))
}

/// Issue 11, item 6: an old owner's session-expiry timer cannot remove a session claimed
/// since under a newer epoch. Two brokers share one session store and one client registry
/// (as nodes of a cluster will): the client leaves node A with a one-second expiry and
/// resumes on node B; when A's timer fires, A drops only its own copy.
#[tokio::test]
async fn an_old_owners_expiry_timer_cannot_remove_a_session_claimed_elsewhere() -> anyhow::Result<()> {
    let (a, b, sessions) = two_brokers_sharing_stores().await?;

    let mut c = connect_packet(Protocol::V5, "roamer", false);
    c.properties.session_expiry_interval = Some(1);
    let (mut on_a, _) = Raw::connect_with(a.mqtt_addr, c.clone()).await?;
    on_a.subscribe(1, "roam/#", QoS::AtLeastOnce).await?;
    on_a.send(&Packet::Disconnect(Disconnect::new(0))).await?;
    on_a.expect_closed(DEADLINE).await?;
    c.properties.session_expiry_interval = Some(300);
    let (_on_b, ack) = Raw::connect_with(b.mqtt_addr, c).await?;
    assert!(ack.session_present, "B resumed the session from the shared store");
    // A's expiry timer fires after a second: A forgets its local copy ...
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while a.broker.slot("roamer").is_some() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "A never expired its copy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... and the session B owns is still stored, with its subscription.
    let stored = sessions.load("roamer").await?;
    assert!(stored.is_some_and(|s| s.subscriptions.contains_key("roam/#")), "A removed B's session");
    assert!(b.broker.slot("roamer").is_some());
    Ok(())
}

/// Issue 11, item 6: a clean start over a session stored by another node is one claim that
/// empties it: the old subscriptions are gone for good, not loaded and then removed.
#[tokio::test]
async fn clean_start_over_a_stored_session_is_one_claim() -> anyhow::Result<()> {
    use raftmq_cluster::session::{MemorySessionStore, SessionState, SessionStore, SubscriptionOptions};
    let config = test_config(|_| {});
    let mut stores = raftmq_node::broker::Stores::memory(&config);
    let sessions = std::sync::Arc::new(MemorySessionStore::new());
    let state = SessionState {
        client_id: "fresh-start".into(),
        subscriptions: [("old/#".to_string(), SubscriptionOptions::default())].into_iter().collect(),
        expiry_secs: 300,
        ..SessionState::default()
    };
    store_session(sessions.as_ref(), state).await?;
    stores.sessions = std::sync::Arc::clone(&sessions) as std::sync::Arc<dyn SessionStore>;
    let server = start_broker_over(config, stores).await?.server;
    let mut c = connect_packet(Protocol::V5, "fresh-start", true);
    c.properties.session_expiry_interval = Some(300);
    let (_client, ack) = Raw::connect_with(server.mqtt_addr, c).await?;
    assert!(!ack.session_present);
    let stored = sessions.load("fresh-start").await?;
    assert!(stored.as_ref().is_some_and(|s| s.subscriptions.is_empty() && s.epoch > 0), "{stored:?}");
    Ok(())
}

/// Issue 11, item 3: what a connection records while it handles packets reaches the store
/// as operations, without the connection waiting for it: an inbound QoS 2 id while it
/// awaits PUBREL (so exactly-once survives a move to another node), and its release.
#[tokio::test]
async fn inbound_qos2_ids_reach_the_store_as_operations() -> anyhow::Result<()> {
    use raftmq_cluster::session::{MemorySessionStore, SessionStore};
    let mut stores = raftmq_node::broker::Stores::memory(&test_config(|_| {}));
    let sessions = std::sync::Arc::new(MemorySessionStore::new());
    stores.sessions = std::sync::Arc::clone(&sessions) as std::sync::Arc<dyn SessionStore>;
    let b = start_broker_over(test_config(|_| {}), stores).await?;
    let (mut client, _) = Raw::connect(b.addr, Protocol::V5, "exactly-once", false).await?;
    client.send(&Packet::Publish(publish("q2/x", b"x", QoS::ExactlyOnce, false, 42))).await?;
    assert!(matches!(client.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubRec));
    let awaiting = |want: Vec<u16>| {
        let sessions = std::sync::Arc::clone(&sessions);
        async move {
            let deadline = std::time::Instant::now() + DEADLINE;
            loop {
                let now = sessions.load("exactly-once").await?.map(|s| s.awaiting_rel).unwrap_or_default();
                if now == want {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(std::time::Instant::now() < deadline, "store holds {now:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    awaiting(vec![42]).await?;
    client.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, 42, 0))).await?;
    assert!(matches!(client.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubComp));
    awaiting(vec![]).await?;
    Ok(())
}

/// Issue 11, item 3: every QoS 1 delivery to a persistent session reaches the store as
/// operations while its client is online (queued, sent, acknowledged), so another node that
/// resumes the session from the store (its owner's node gone) resends exactly what was not
/// acknowledged, with DUP, then the rest of the queue, in order [MQTT-4.4.0-1].
#[tokio::test]
async fn online_deliveries_reach_the_store_so_another_node_resumes_them() -> anyhow::Result<()> {
    let (a, b, sessions) = two_brokers_sharing_stores().await?;

    let mut c = connect_packet(Protocol::V5, "worker", false);
    c.properties.session_expiry_interval = Some(300);
    c.properties.receive_maximum = Some(2);
    let (mut on_a, _) = Raw::connect_with(a.mqtt_addr, c.clone()).await?;
    on_a.subscribe(1, "work/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(a.mqtt_addr, Protocol::V5, "boss", true).await?;
    for n in 1..=5u16 {
        publ.publish("work/x", format!("m{n}").as_bytes(), QoS::AtLeastOnce, false, n).await?;
    }
    // The window of two holds m1 and m2; the client acknowledges m1 only.
    let first = on_a.recv_publish().await?;
    let second = on_a.recv_publish().await?;
    assert_eq!((&first.payload[..], &second.payload[..]), (&b"m1"[..], &b"m2"[..]));
    on_a.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, first.packet_id, 0))).await?;
    // The store follows: m1 gone, m2 and m3 (sent as the window moved on) in flight, m4
    // and m5 queued.
    let payload = |q: &raftmq_cluster::session::QueuedMessage| String::from_utf8_lossy(&q.message.payload).into_owned();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let stored = sessions.load("worker").await?.unwrap_or_default();
        let inflight: Vec<String> = stored.inflight.values().map(|m| payload(&m.queued)).collect();
        let queued: Vec<String> = stored.queue.iter().map(payload).collect();
        if inflight == ["m2", "m3"] && queued == ["m4", "m5"] {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "store holds inflight {inflight:?}, queue {queued:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Node A is gone as far as the client knows; it resumes on node B from the store.
    let (mut on_b, ack) = Raw::connect_with(b.mqtt_addr, c).await?;
    assert!(ack.session_present);
    let mut got = Vec::new();
    while got.len() < 4 {
        let p = on_b.recv_publish().await?;
        got.push((String::from_utf8_lossy(&p.payload).into_owned(), p.dup));
        on_b.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
    }
    let want: Vec<(String, bool)> =
        [("m2", true), ("m3", true), ("m4", false), ("m5", false)].iter().map(|(m, d)| (m.to_string(), *d)).collect();
    assert_eq!(got, want);
    on_b.expect_silence(Duration::from_millis(100)).await?;
    Ok(())
}
