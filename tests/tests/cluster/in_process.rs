//! Three nodes in one process, clients spread over them.

use std::collections::HashMap;
use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{reason, Packet, Properties, Protocol, PubKind, PubResponse};
use raftmq_tests::*;

use super::DEADLINE;

/// Issue 12, item 3: a SUBACK is sent only once every live peer has the route, so a
/// PUBLISH to any node right after the SUBACK reaches the subscriber; a publisher on
/// another node sees its QoS 1 message as matched (no 0x10).
#[tokio::test]
async fn a_publish_right_after_suback_reaches_a_subscriber_on_another_node() -> anyhow::Result<()> {
    let nodes = start_cluster(3, |_| {}).await?;
    let (mut sub, _) = Raw::connect(nodes[1].addr, Protocol::V5, "sub", true).await?;
    let (mut p1, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p1", true).await?;
    let (mut p3, _) = Raw::connect(nodes[2].addr, Protocol::V5, "p3", true).await?;
    for round in 0..20u16 {
        let filter = format!("fresh/{round}/#");
        sub.subscribe(round + 1, &filter, QoS::AtLeastOnce).await?;
        let topic = format!("fresh/{round}/x");
        assert_eq!(p1.publish(&topic, b"from node1", QoS::AtLeastOnce, false, round + 1).await?, 0, "round {round}");
        assert_eq!(p3.publish(&topic, b"from node3", QoS::AtLeastOnce, false, round + 1).await?, 0, "round {round}");
        let mut got = Vec::new();
        for _ in 0..2 {
            let p = sub.recv_publish().await?;
            sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
        got.sort();
        assert_eq!(got, ["from node1", "from node3"]);
    }
    Ok(())
}

/// Issue 12, item 4: a forwarded message keeps every MQTT 5 property, and the receiving
/// node applies the subscriber's options (subscription identifier, Retain As Published)
/// as it would for a local publisher; a node with many subscribers gets one copy.
#[tokio::test]
async fn forwarded_messages_keep_their_properties_and_the_subscription_options() -> anyhow::Result<()> {
    let nodes = start_cluster(2, |_| {}).await?;
    let mut subs = Vec::new();
    for n in 0..3 {
        let (mut sub, _) = Raw::connect(nodes[1].addr, Protocol::V5, &format!("s{n}"), true).await?;
        let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, retain_as_published: n == 0, ..Default::default() };
        let props = Properties { subscription_identifiers: vec![7 + n], ..Properties::default() };
        sub.subscribe_with(1, vec![("props/#".to_string(), opts)], props).await?;
        subs.push(sub);
    }
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p", true).await?;
    let mut p = publish("props/x", b"{\"v\":1}", QoS::AtLeastOnce, true, 1);
    p.properties = Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(300),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x01\x02")),
        user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
        ..Properties::default()
    };
    publ.send(&Packet::Publish(p)).await?;
    assert!(matches!(publ.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubAck && r.reason == 0));
    for (n, sub) in subs.iter_mut().enumerate() {
        let got = sub.recv_publish().await?;
        let pr = &got.properties;
        assert_eq!(pr.payload_format_indicator, Some(1));
        assert!(pr.message_expiry_interval.is_some_and(|e| (299..=300).contains(&e)));
        assert_eq!(pr.content_type.as_deref(), Some("application/json"));
        assert_eq!(pr.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(pr.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(pr.user_properties, vec![("k".to_string(), "v".to_string()), ("k".to_string(), "w".to_string())]);
        assert_eq!(pr.subscription_identifiers, vec![7 + n as u32]);
        assert_eq!(got.retain, n == 0, "Retain As Published only for s0");
    }
    let forwarded: u64 = nodes[0].server.broker.cluster_nodes().iter().map(|v| v.forwarded).sum();
    assert_eq!(forwarded, 1, "one copy per node, however many subscribers it has");
    // Issue 12, item 7: the same, as metrics.
    let text = nodes[0].server.broker.render_metrics();
    for line in [
        "raftmq_cluster_forwarded_messages_total{peer=\"node2\"} 1",
        "raftmq_cluster_peer_up{peer=\"node2\"} 1",
        "raftmq_cluster_nodes{status=\"up\"} 2",
        "raftmq_cluster_peer_routes{peer=\"node2\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    let settles = nodes[1].server.broker.render_metrics();
    assert!(settles.contains("raftmq_cluster_route_settle_seconds_count 1"), "{settles}");
    Ok(())
}

/// Issue 12, item 5: a `$share` group with a member on each of three nodes gets each message
/// exactly once cluster-wide, balanced across the members (round robin: within 5 %).
#[tokio::test]
async fn a_shared_group_balances_across_three_nodes() -> anyhow::Result<()> {
    let nodes = start_cluster(3, |_| {}).await?;
    let mut members = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let (mut m, _) = Raw::connect(node.addr, Protocol::V5, &format!("m{n}"), true).await?;
        m.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce).await?;
        members.push(m);
    }
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "boss", true).await?;
    const N: u16 = 300;
    for i in 1..=N {
        assert_eq!(publ.publish("jobs/a", format!("{i}").as_bytes(), QoS::AtLeastOnce, false, i).await?, 0);
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_member = vec![0usize; members.len()];
    let deadline = std::time::Instant::now() + DEADLINE;
    while per_member.iter().sum::<usize>() < usize::from(N) && std::time::Instant::now() < deadline {
        for (i, m) in members.iter_mut().enumerate() {
            // Whatever this member has now (a short wait is no failure: it may have none).
            while let Ok(Some(packet)) = m.recv_within(Duration::from_millis(20)).await {
                let Packet::Publish(p) = packet else { anyhow::bail!("expected PUBLISH, got {packet:?}") };
                m.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
                *seen.entry(String::from_utf8_lossy(&p.payload).into_owned()).or_default() += 1;
                per_member[i] += 1;
            }
        }
    }
    assert_eq!(seen.len(), usize::from(N), "every message delivered: {per_member:?}");
    assert!(seen.values().all(|c| *c == 1), "no message twice");
    for count in &per_member {
        assert!((95..=105).contains(count), "balanced within 5 %: {per_member:?}");
    }
    Ok(())
}

/// Issue 12, item 5 (found by the fault suite): a group member on a node that also has a
/// plain subscriber to the topic gets each message once. The copy forwarded there for the
/// plain subscriber was given to that node's group members as well, beside the member the
/// publishing node picked: with QoS 2, two members had the same message.
#[tokio::test]
async fn mqtt_4_8_2_a_shared_message_reaches_one_member_even_where_plain_subscribers_are() -> anyhow::Result<()> {
    let nodes = start_cluster(3, |_| {}).await?;
    let mut members = Vec::new();
    for (n, node) in nodes.iter().enumerate().skip(1) {
        let (mut m, _) = Raw::connect(node.addr, Protocol::V5, &format!("member{n}"), true).await?;
        m.subscribe(1, "$share/g/mixed/#", QoS::AtMostOnce).await?;
        members.push(m);
    }
    // A plain subscriber beside each member: every message is forwarded to both nodes.
    let mut plain = Vec::new();
    for (n, node) in nodes.iter().enumerate().skip(1) {
        let (mut p, _) = Raw::connect(node.addr, Protocol::V5, &format!("plain{n}"), true).await?;
        p.subscribe(1, "mixed/#", QoS::AtMostOnce).await?;
        plain.push(p);
    }
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "mixer", true).await?;
    const N: u16 = 40;
    for i in 1..=N {
        assert!(publ.publish("mixed/a", format!("{i}").as_bytes(), QoS::AtLeastOnce, false, i).await? < 0x80);
    }
    // Every plain subscriber has all of them: whatever the members were to get is there too.
    for p in &mut plain {
        for _ in 0..N {
            p.recv_publish().await?;
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for m in &mut members {
        // Whatever this member has (a short wait is no failure: it may have none).
        while let Ok(Some(packet)) = m.recv_within(Duration::from_millis(200)).await {
            let Packet::Publish(p) = packet else { anyhow::bail!("expected PUBLISH, got {packet:?}") };
            *seen.entry(String::from_utf8_lossy(&p.payload).into_owned()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), usize::from(N), "every message reached the group");
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "messages two members got: {twice:?}");
    Ok(())
}

/// Issue 12, item 2: a node that leaves (graceful shutdown) tells its peers, which drop
/// its routes at once: a PUBLISH for its former subscribers matches nothing.
#[tokio::test]
async fn a_leaving_node_takes_its_routes_with_it() -> anyhow::Result<()> {
    let mut nodes = start_cluster(3, |_| {}).await?;
    let (mut sub, _) = Raw::connect(nodes[2].addr, Protocol::V5, "leaver", true).await?;
    sub.subscribe(1, "gone/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p", true).await?;
    assert_eq!(publ.publish("gone/x", b"1", QoS::AtLeastOnce, false, 1).await?, 0);
    // Node events on $SYS (retained: the "up" of each peer is there already).
    let (mut sys, _) = Raw::connect(nodes[0].addr, Protocol::V5, "watcher", true).await?;
    sys.subscribe(1, "$SYS/brokers/node1/cluster/nodes/#", QoS::AtMostOnce).await?;
    let leaving = nodes.remove(2);
    leaving.server.shutdown(Duration::from_secs(2)).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let views = nodes[0].server.broker.cluster_nodes();
        let node3 = views.iter().find(|v| v.name == "node3");
        if node3.is_none_or(|v| v.routes == 0 && v.status.label() == "down") {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "node3 still known: {views:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(publ.publish("gone/x", b"2", QoS::AtLeastOnce, false, 2).await?, reason::NO_MATCHING_SUBSCRIBERS);
    loop {
        let event = sys.recv_publish().await?;
        let body: serde_json::Value = serde_json::from_slice(&event.payload)?;
        if event.topic.ends_with("/node3") && body["status"] == "down" {
            break;
        }
    }
    Ok(())
}

/// Waits until `node` has failed to introduce itself `n` times.
async fn wait_for_failed_dials(node: &TestBroker, n: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + DEADLINE;
    while node.server.broker.mesh().map_or(0, |m| m.failed_dials()) < n {
        anyhow::ensure!(std::time::Instant::now() < deadline, "fewer than {n} failed introductions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Issue 12, item 1: a node without the cluster's secret is refused (and never joins);
/// garbage on the cluster port is closed; the cluster carries on.
#[tokio::test]
async fn a_node_without_the_secret_and_garbage_on_the_port_are_refused() -> anyhow::Result<()> {
    let nodes = start_cluster(2, |_| {}).await?;
    let cluster_addr = nodes[0].server.cluster_addr().ok_or_else(|| anyhow::anyhow!("no cluster port"))?;
    let intruder = start_broker(|c| {
        c.node_name = "intruder".into();
        c.cluster.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.cluster.seeds = vec![cluster_addr.to_string()];
        c.cluster.secret = Some("wrong".into());
    })
    .await?;
    // Garbage on the gRPC port: the connection is closed, nothing else changes.
    let mut raw = tokio::net::TcpStream::connect(cluster_addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET / HTTP/1.0\r\n\r\n\x00\xff\x00\xff garbage").await?;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut sink)).await;
    assert!(closed.is_ok(), "the cluster port closes a connection that speaks no HTTP/2");
    // Once the intruder was refused twice, it knows nobody, and nobody knows it.
    wait_for_failed_dials(&intruder, 2).await?;
    assert!(intruder.server.broker.cluster_nodes().iter().all(|v| v.name == "intruder" || v.status.label() == "down"));
    assert!(nodes[0].server.broker.cluster_nodes().iter().all(|v| v.name != "intruder"));
    wait_for_cluster(&nodes, 2).await?;
    let (mut sub, _) = Raw::connect(nodes[1].addr, Protocol::V5, "s", true).await?;
    sub.subscribe(1, "still/#", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p", true).await?;
    publ.publish("still/here", b"ok", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"ok");
    Ok(())
}

/// Issue 12, item 6: a client id is connected once cluster-wide. A client that connects to
/// another node while still connected to the first is taken over there (MQTT 5: 0x8E); when
/// it resumes its session, the session moves: subscriptions, and the unacknowledged message
/// is sent again with DUP; later messages published anywhere reach it on its new node.
#[tokio::test]
async fn a_client_moving_to_another_node_takes_its_session_with_it() -> anyhow::Result<()> {
    let nodes = start_cluster(3, |_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "mover", false);
    c.properties.session_expiry_interval = Some(300);
    let (mut on1, _) = Raw::connect_with(nodes[0].addr, c.clone()).await?;
    on1.subscribe(1, "mv/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[2].addr, Protocol::V5, "pub", true).await?;
    assert_eq!(publ.publish("mv/1", b"m1", QoS::AtLeastOnce, false, 1).await?, 0);
    let first = on1.recv_publish().await?;
    assert_eq!(&first.payload[..], b"m1");
    // Not acknowledged; the client shows up on node 2.
    let (mut on2, ack) = Raw::connect_with(nodes[1].addr, c).await?;
    assert!(ack.session_present, "the session moved from node 1");
    assert_eq!(disconnect_reason(on1.expect_closed(DEADLINE).await?), Some(reason::SESSION_TAKEN_OVER));
    let again = on2.recv_publish().await?;
    assert_eq!((&again.payload[..], again.dup), (&b"m1"[..], true));
    on2.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, again.packet_id, 0))).await?;
    // Routes followed the session: published on node 3 and node 1, received on node 2 only.
    assert_eq!(publ.publish("mv/2", b"m2", QoS::AtLeastOnce, false, 2).await?, 0);
    let (mut p1, _) = Raw::connect(nodes[0].addr, Protocol::V5, "pub1", true).await?;
    assert_eq!(p1.publish("mv/3", b"m3", QoS::AtLeastOnce, false, 1).await?, 0);
    for want in [&b"m2"[..], &b"m3"[..]] {
        let p = on2.recv_publish().await?;
        assert_eq!(&p.payload[..], want);
        on2.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
    }
    assert!(nodes[0].server.broker.slot("mover").is_none(), "node 1 forgot the session");
    Ok(())
}

/// Issue 12, item 6: a clean start on another node ends the session where it was; a client
/// id held by another identity elsewhere is refused (0x87) and the holder keeps it.
#[tokio::test]
async fn clean_starts_and_other_identities_across_nodes() -> anyhow::Result<()> {
    let nodes = start_cluster(2, |_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "owned", false);
    c.properties.session_expiry_interval = Some(300);
    c.username = Some("alice".into());
    let (mut alice, _) = Raw::connect_with(nodes[0].addr, c.clone()).await?;
    alice.subscribe(1, "own/#", QoS::AtLeastOnce).await?;
    let mut intruder = c.clone();
    intruder.username = Some("mallory".into());
    let (_, ack) = Raw::connect_with(nodes[1].addr, intruder).await?;
    assert_eq!(ack.code, reason::NOT_AUTHORIZED);
    alice.ping().await?;
    // Alice herself, clean start, on node 2: the old session ends; nothing moves.
    c.clean_start = true;
    let (_alice2, ack) = Raw::connect_with(nodes[1].addr, c).await?;
    assert!(!ack.session_present);
    assert_eq!(disconnect_reason(alice.expect_closed(DEADLINE).await?), Some(reason::SESSION_TAKEN_OVER));
    assert!(nodes[0].server.broker.slot("owned").is_none());
    Ok(())
}

/// Issue 12, item 5: a shared delivery its member did not acknowledge before leaving goes
/// to another member of the group, on another node when there is none left on its own.
#[tokio::test]
async fn a_leaving_members_unacknowledged_shared_message_goes_to_a_member_on_another_node() -> anyhow::Result<()> {
    let nodes = start_cluster(2, |_| {}).await?;
    let (mut m1, _) = Raw::connect(nodes[0].addr, Protocol::V5, "m1", true).await?;
    m1.subscribe(1, "$share/g/orders/#", QoS::AtLeastOnce).await?;
    let (mut m2, _) = Raw::connect(nodes[1].addr, Protocol::V5, "m2", true).await?;
    m2.subscribe(1, "$share/g/orders/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p", true).await?;
    // Round robin over the two members: one message each.
    assert_eq!(publ.publish("orders/1", b"a", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(publ.publish("orders/2", b"b", QoS::AtLeastOnce, false, 2).await?, 0);
    let held = m1.recv_publish().await?;
    let mut got = vec![m2.recv_publish().await?];
    // m1 leaves without acknowledging.
    drop(m1);
    got.push(m2.recv_publish().await?);
    let mut payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, [&b"a"[..], &b"b"[..]]);
    assert!(got.iter().any(|p| p.payload == held.payload));
    Ok(())
}

/// Issue 12, item 1: mutual TLS between nodes. Nodes with certificates from the cluster's
/// CA form a cluster and forward over it; a node that speaks plain gRPC never joins.
#[tokio::test]
async fn nodes_link_over_mutual_tls_and_a_plain_node_cannot_join() -> anyhow::Result<()> {
    let pki = raftmq_tests::pki::TestPki::generate("unused")?;
    let tls = raftmq_node::config::ClusterTlsConfig {
        certfile: pki.server_cert.clone(),
        keyfile: pki.server_key.clone(),
        cacertfile: pki.ca.clone(),
        server_name: "localhost".into(),
    };
    let nodes = start_cluster(2, |c| c.cluster.tls = Some(tls.clone())).await?;
    let (mut sub, _) = Raw::connect(nodes[1].addr, Protocol::V5, "s", true).await?;
    sub.subscribe(1, "tls/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].addr, Protocol::V5, "p", true).await?;
    assert_eq!(publ.publish("tls/x", b"sealed", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"sealed");
    let seed = nodes[0].server.cluster_addr().map(|a| a.to_string()).unwrap_or_default();
    let plain = start_broker(|c| {
        c.node_name = "plain".into();
        c.cluster.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.cluster.seeds = vec![seed];
        c.cluster.secret = Some("test-secret".into());
    })
    .await?;
    wait_for_failed_dials(&plain, 2).await?;
    assert!(plain.server.broker.cluster_nodes().iter().all(|v| v.name == "plain" || v.status.label() == "down"));
    assert!(nodes[0].server.broker.cluster_nodes().iter().all(|v| v.name != "plain"));
    Ok(())
}

/// Issue 12, item 1: DNS discovery (a Kubernetes headless service): a node given a name and
/// a port finds the node behind it and joins.
#[tokio::test]
async fn a_node_finds_its_peers_through_dns() -> anyhow::Result<()> {
    let first = start_cluster(1, |_| {}).await?;
    let port = first[0].server.cluster_addr().map(|a| a.port()).unwrap_or_default();
    let second = start_broker(|c| {
        c.node_name = "by-dns".into();
        c.cluster.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.cluster.discovery = raftmq_node::config::DiscoveryKind::Dns;
        c.cluster.dns_name = Some("localhost".into());
        c.cluster.dns_port = port;
        c.cluster.dns_interval_secs = 1;
        c.cluster.secret = Some("test-secret".into());
    })
    .await?;
    let all = [first.into_iter().next().ok_or_else(|| anyhow::anyhow!("no node"))?, second];
    wait_for_cluster(&all, 2).await
}

/// Issue 12, item 6: two CONNECTs with one client id racing on two nodes end with exactly
/// one connection, at once (not after a claim timeout): the node with the higher id wins
/// the tie, the other's connection is taken over (0x8E).
#[tokio::test]
async fn a_client_id_connecting_on_two_nodes_at_once_ends_connected_once() -> anyhow::Result<()> {
    let nodes = start_cluster(2, |_| {}).await?;
    for round in 0..10 {
        let id = format!("twin-{round}");
        let started = std::time::Instant::now();
        let (one, two) =
            tokio::join!(Raw::connect(nodes[0].addr, Protocol::V5, &id, true), Raw::connect(nodes[1].addr, Protocol::V5, &id, true));
        let ((mut one, a1), (mut two, a2)) = (one?, two?);
        assert!(a1.code == 0 && a2.code == 0);
        assert!(started.elapsed() < Duration::from_millis(1000), "a claim waited for its timeout: {:?}", started.elapsed());
        // Exactly one of the two is closed with 0x8E; the other stays.
        let (closed1, closed2) = tokio::join!(one.recv_within(Duration::from_millis(300)), two.recv_within(Duration::from_millis(300)));
        let kicked =
            |r: &anyhow::Result<Option<Packet>>| matches!(r, Ok(Some(Packet::Disconnect(d))) if d.reason == reason::SESSION_TAKEN_OVER);
        assert!(kicked(&closed1) != kicked(&closed2), "round {round}: {closed1:?} / {closed2:?}");
        let survivor = if kicked(&closed1) { &mut two } else { &mut one };
        survivor.ping().await?;
    }
    Ok(())
}

/// The voters of the Raft group as `node` sees them, once they are `n` (bounded wait).
async fn wait_for_voters(node: &TestBroker, n: usize) -> anyhow::Result<Vec<u64>> {
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let view = node.server.broker.raft().map(|r| r.view()).ok_or_else(|| anyhow::anyhow!("no raft store"))?;
        if view.voters.len() == n {
            return Ok(view.voters);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "voters never {n}: {view:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 13, item 6: nodes started one after another join the first node's group as
/// learners and are promoted to voters; a stopped node removed with `cluster leave` no
/// longer counts, and the two left keep committing writes.
#[tokio::test]
async fn nodes_join_the_group_as_voters_and_a_removed_node_no_longer_counts() -> anyhow::Result<()> {
    let nodes = start_cluster(3, |_| {}).await?;
    let voters = wait_for_voters(&nodes[0], 3).await?;
    let third = raftmq_cluster::stable_hash(b"node3");
    assert!(voters.contains(&third), "{voters:?}");
    nodes[2].server.shutdown(Duration::from_secs(2)).await;
    let store = nodes[0].server.broker.raft().ok_or_else(|| anyhow::anyhow!("no raft store"))?;
    assert!(store.remove_node(third).await?);
    let voters = wait_for_voters(&nodes[1], 2).await?;
    assert!(!voters.contains(&third));
    // Writes commit with the two voters left: a persistent session and its subscription.
    let (mut c, _) = Raw::connect(nodes[1].addr, Protocol::V5, "after-leave", false).await?;
    assert_eq!(c.subscribe(1, "left/#", QoS::AtLeastOnce).await?, vec![1]);
    Ok(())
}

/// Issue 13, item 6: a node that ran alone becomes the first node of a cluster with its
/// data: its group takes the next node in (the address it recorded when alone is
/// repaired), a retained message it stored alone is seen on the new node, and the new
/// node's writes commit through it.
#[tokio::test]
async fn a_node_that_ran_alone_becomes_the_first_node_of_a_cluster() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let alone = start_broker(|c| {
        c.node_name = "node1".into();
        c.data_dir = dir.path().to_path_buf();
    })
    .await?;
    let (mut p, _) = Raw::connect(alone.addr, Protocol::V5, "p", true).await?;
    assert!(p.publish("kept/x", b"from alone", QoS::AtLeastOnce, true, 1).await? < 0x80);
    alone.server.shutdown(Duration::from_secs(2)).await;
    drop(alone);
    let clustered = |name: &str, seeds: Vec<String>, c: &mut raftmq_node::config::Config| {
        c.node_name = name.into();
        c.cluster.enabled = true;
        c.cluster.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        c.cluster.seeds = seeds;
        c.cluster.secret = Some("test-secret".into());
        c.cluster.heartbeat_ms = 200;
        c.cluster.failure_timeout_ms = 1500;
    };
    let first = start_broker(|c| {
        clustered("node1", Vec::new(), c);
        c.data_dir = dir.path().to_path_buf();
    })
    .await?;
    let seed = first.server.cluster_addr().map(|a| a.to_string()).unwrap_or_default();
    let second = start_broker(|c| clustered("node2", vec![seed], c)).await?;
    let nodes = vec![first, second];
    wait_for_cluster(&nodes, 2).await?;
    let (mut s, _) = Raw::connect(nodes[1].addr, Protocol::V5, "s", true).await?;
    s.subscribe(1, "kept/#", QoS::AtLeastOnce).await?;
    let got = s.recv_publish().await?;
    assert!(got.retain && &got.payload[..] == b"from alone");
    let (_c, ack) = Raw::connect(nodes[1].addr, Protocol::V5, "persistent-on-2", false).await?;
    assert_eq!(ack.code, 0, "a write on the new node commits");
    Ok(())
}
