//! The replicated store across a cluster (issue 13): three real `raftmq` processes share
//! one Raft group; persistent sessions and retained messages survive the death of the node
//! that held them, of the leader, and of every node at once.

use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Protocol, PubKind, PubResponse};
use raftmq_tests::*;

use super::{connect_accepted, DEADLINE};
use raftmq_tests::processes::{start_three, start_three_with, wait_ready, Node};

/// The Raft part of `GET /api/v1/cluster` as `node` sees it.
async fn raft_of(node: &Node) -> anyhow::Result<serde_json::Value> {
    let (_, body) = node.get("/api/v1/cluster").await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["raft"].clone())
}

/// The index (in `nodes`) of the leader every live node in `live` agrees on.
async fn agreed_leader(nodes: &[Node], live: &[usize]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut leaders = Vec::new();
        for &i in live {
            leaders.push(raft_of(&nodes[i]).await.ok().and_then(|r| r["leader"].as_str().map(str::to_owned)));
        }
        if let Some(Some(name)) = leaders.first().cloned() {
            if leaders.iter().all(|l| l.as_deref() == Some(name.as_str())) {
                if let Some(i) = nodes.iter().position(|n| n.name == name).filter(|i| live.contains(i)) {
                    return Ok(i);
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "no agreed leader among {live:?}: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `observer` holds no route of the dead node `dead` any more (it owns no
/// session: adopted, or resumed elsewhere).
async fn routes_dropped(observer: &Node, dead: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, body) = observer.get("/api/v1/cluster").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let held = v["nodes"].as_array().into_iter().flatten().find(|n| n["name"] == dead).map_or(0, |n| n["routes"].as_u64().unwrap_or(0));
        if held == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{} still holds {held} routes of {dead}", observer.name);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A persistent MQTT 5 session (expiry 300 s).
async fn persistent(node: &Node, client_id: &str) -> anyhow::Result<(Raw, bool)> {
    let mut c = connect_packet(Protocol::V5, client_id, false);
    c.properties.session_expiry_interval = Some(300);
    let (raw, ack) = connect_accepted(node.mqtt, c).await?;
    anyhow::ensure!(ack.code == 0, "CONNACK {}", ack.code);
    Ok((raw, ack.session_present))
}

/// Receives `n` PUBLISHes, acknowledging QoS 1 ones; returns their payloads.
async fn receive(client: &mut Raw, n: usize) -> anyhow::Result<Vec<String>> {
    let mut got = Vec::new();
    while got.len() < n {
        let p = client.recv_publish().await?;
        if p.qos == QoS::AtLeastOnce {
            client.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
        }
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    Ok(got)
}

/// Issue 13, item 6: three nodes started with the same seeds form one Raft group of three
/// voters, and every node names the same leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_raft_group() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    agreed_leader(&nodes, &[0, 1, 2]).await?;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let raft = raft_of(&nodes[0]).await?;
        let voters = raft["voters"].as_array().map_or(0, Vec::len);
        if voters == 3 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "voters never 3: {raft}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = nodes[1].get("/metrics").await?;
    assert!(metrics.contains("raftmq_raft_voters 3"), "{metrics}");
    // Every node's place in the group, as one node shows it: the peers' as they report it.
    loop {
        let (_, body) = nodes[0].get("/api/v1/cluster").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let nodes_seen = v["nodes"].as_array().cloned().unwrap_or_default();
        let complete = nodes_seen.len() == 3
            && nodes_seen.iter().all(|n| n["raft_member"] == "voter" && n["raft_term"].as_u64().is_some_and(|t| t >= 1))
            && nodes_seen.iter().filter(|n| n["raft_role"] == "leader").count() == 1;
        if complete {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "incomplete raft view: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Issue 13, items 5 and 9: the offline queue of a persistent session is kept across a
/// SIGKILL of the node that held it. Messages published after the node died are queued too
/// (a survivor adopted the session); the client reconnecting to another node gets Session
/// Present and every message in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_queue_survives_the_death_of_its_node() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let (mut keeper, _) = persistent(&nodes[1], "keeper").await?;
    keeper.subscribe(1, "orders/#", QoS::AtLeastOnce).await?;
    keeper.send(&Packet::Disconnect(raftmq_node::codec::Disconnect::new(0))).await?;
    keeper.expect_closed(DEADLINE).await?;
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "shop", true).await?;
    for n in 1..=5u16 {
        assert_eq!(publ.publish("orders/new", format!("o{n}").as_bytes(), QoS::AtLeastOnce, false, n).await?, 0);
    }
    nodes[1].kill();
    // A survivor adopts the session once the node is seen gone; from then on the session's
    // routes are back and new messages are queued for it again.
    let killed = Instant::now();
    loop {
        let mut adopted = 0;
        for node in [&nodes[0], &nodes[2]] {
            let (_, metrics) = node.get("/metrics").await?;
            adopted += metrics.lines().filter(|l| l.starts_with("raftmq_sessions_adopted_total 1")).count();
        }
        if adopted == 1 {
            break;
        }
        anyhow::ensure!(killed.elapsed() < DEADLINE, "the session was never adopted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The dead node's routes are dropped once it owns no session (till then a message
    // matching them is refused, not acknowledged for nobody).
    routes_dropped(&nodes[0], &nodes[1].name).await?;
    for n in 6..=7u16 {
        assert_eq!(publ.publish("orders/new", format!("o{n}").as_bytes(), QoS::AtLeastOnce, false, n).await?, 0);
    }
    let (mut back, present) = persistent(&nodes[2], "keeper").await?;
    assert!(present, "Session Present after the node that held it died");
    let got = receive(&mut back, 7).await?;
    assert_eq!(got, ["o1", "o2", "o3", "o4", "o5", "o6", "o7"]);
    Ok(())
}

/// Issue 13, items 4 and 9: a retained message acknowledged to its publisher is seen by a
/// later SUBSCRIBE on another node, also after the leader was killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_survives_the_leader() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let leader = agreed_leader(&nodes, &[0, 1, 2]).await?;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (mut publ, _) = Raw::connect(nodes[others[0]].mqtt, Protocol::V5, "thermo", true).await?;
    // Acknowledged (0x10: nobody subscribed yet, the message is retained all the same).
    assert_eq!(publ.publish("rooms/1/temp", b"21.5", QoS::AtLeastOnce, true, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    // Seen at once on the other follower.
    let (mut sub, _) = Raw::connect(nodes[others[1]].mqtt, Protocol::V5, "reader", true).await?;
    sub.subscribe(1, "rooms/+/temp", QoS::AtLeastOnce).await?;
    let p = sub.recv_publish().await?;
    assert!(p.retain && &p.payload[..] == b"21.5");
    nodes[leader].kill();
    agreed_leader(&nodes, &others).await?;
    let (mut late, _) = Raw::connect(nodes[others[1]].mqtt, Protocol::V5, "late", true).await?;
    late.subscribe(1, "rooms/#", QoS::AtLeastOnce).await?;
    let p = late.recv_publish().await?;
    assert!(p.retain && &p.payload[..] == b"21.5", "retained after the leader died");
    Ok(())
}

/// Issue 13, items 7 and 9: all three nodes killed and started again on their data keep
/// every retained message and persistent session (with its queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cluster_restart_keeps_sessions_and_retained_messages() -> anyhow::Result<()> {
    let mut nodes = start_three().await?;
    let (mut keeper, _) = persistent(&nodes[2], "keeper").await?;
    keeper.subscribe(1, "cmd/#", QoS::AtLeastOnce).await?;
    keeper.send(&Packet::Disconnect(raftmq_node::codec::Disconnect::new(0))).await?;
    keeper.expect_closed(DEADLINE).await?;
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "ops", true).await?;
    assert_eq!(publ.publish("cmd/reboot", b"now", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(publ.publish("state/fw", b"1.2.3", QoS::AtLeastOnce, true, 2).await?, reason::NO_MATCHING_SUBSCRIBERS);
    drop(publ);
    for node in &nodes {
        node.kill();
    }
    for node in &mut nodes {
        node.restart()?;
    }
    wait_ready(&nodes.iter().collect::<Vec<_>>(), 3).await?;
    let (mut back, present) = persistent(&nodes[1], "keeper").await?;
    assert!(present, "the session survived the restart");
    assert_eq!(receive(&mut back, 1).await?, ["now"]);
    let (mut sub, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "reader", true).await?;
    sub.subscribe(1, "state/#", QoS::AtLeastOnce).await?;
    let p = sub.recv_publish().await?;
    assert!(p.retain && &p.payload[..] == b"1.2.3");
    Ok(())
}

/// Issue 13, item 9: the leader is killed while a publisher sends QoS 1 messages to a
/// persistent subscriber on another node. The history is checked: every message the
/// publisher got a PUBACK for is received, first receipts are in publishing order, and
/// nothing is received that was never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_qos1_load_loses_no_acknowledged_message() -> anyhow::Result<()> {
    const MESSAGES: u32 = 400;
    const KILL_AFTER: usize = 100;
    let nodes = start_three().await?;
    let leader = agreed_leader(&nodes, &[0, 1, 2]).await?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (sub_node, pub_node) = (followers[0], followers[1]);
    let (mut sink, _) = persistent(&nodes[sub_node], "sink").await?;
    sink.subscribe(1, "load/#", QoS::AtLeastOnce).await?;
    let (tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let pub_addr = nodes[pub_node].mqtt;
    let mut publisher = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut client = None;
        let started = Instant::now();
        for seq in 1..=MESSAGES {
            if started.elapsed() > Duration::from_secs(30) {
                break;
            }
            if client.is_none() {
                client = Raw::connect(pub_addr, Protocol::V5, "loader", true).await.ok().map(|(c, _)| c);
            }
            let Some(c) = client.as_mut() else { continue };
            sent.push(seq);
            let packet_id = (seq % 60_000 + 1) as u16;
            match tokio::time::timeout(DEADLINE, c.publish("load/x", format!("m{seq}").as_bytes(), QoS::AtLeastOnce, false, packet_id))
                .await
            {
                Ok(Ok(code)) if code < 0x80 => {
                    let _ = tx.send(seq);
                }
                Ok(Ok(_)) => {}
                _ => client = None,
            }
        }
        sent
    });
    let mut acked = Vec::new();
    while acked.len() < KILL_AFTER {
        match tokio::time::timeout(DEADLINE, acked_rx.recv()).await? {
            Some(seq) => acked.push(seq),
            None => anyhow::bail!("the publisher stopped after {} acknowledgements", acked.len()),
        }
    }
    nodes[leader].kill();
    let mut received: Vec<u32> = Vec::new();
    let sent = loop {
        tokio::select! {
            p = sink.recv_within(Duration::from_millis(200)) => {
                if let Ok(Some(Packet::Publish(p))) = p {
                    sink.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
                    received.push(String::from_utf8_lossy(&p.payload).trim_start_matches('m').parse()?);
                }
            }
            sent = &mut publisher => break sent?,
        }
    };
    while let Ok(Some(seq)) = acked_rx.try_recv().map(Some) {
        acked.push(seq);
    }
    // Everything acknowledged arrives (the rest of the stream, bounded).
    let deadline = Instant::now() + DEADLINE;
    while acked.iter().any(|s| !received.contains(s)) && Instant::now() < deadline {
        if let Ok(Some(Packet::Publish(p))) = sink.recv_within(Duration::from_millis(200)).await {
            sink.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
            received.push(String::from_utf8_lossy(&p.payload).trim_start_matches('m').parse()?);
        }
    }
    println!("history: {} sent, {} acknowledged, {} received ({} distinct)", sent.len(), acked.len(), received.len(), {
        let mut d = received.clone();
        d.sort_unstable();
        d.dedup();
        d.len()
    });
    let lost: Vec<&u32> = acked.iter().filter(|s| !received.contains(s)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    let invented: Vec<&u32> = received.iter().filter(|s| !sent.contains(s)).collect();
    assert!(invented.is_empty(), "received, never sent: {invented:?}");
    let mut first_receipts = received.clone();
    let mut seen = std::collections::HashSet::new();
    first_receipts.retain(|s| seen.insert(*s));
    assert!(first_receipts.windows(2).all(|w| w[0] < w[1]), "out of order: {first_receipts:?}");
    assert!(acked.len() > KILL_AFTER, "the cluster kept acknowledging after the leader died ({} acks)", acked.len());
    Ok(())
}

/// Issue 13, items 5 and 9: QoS 2 is exactly once across the death of a node, on both
/// sides of the broker. A publisher whose node dies after PUBREC resumes on another node
/// and releases the message there (PUBCOMP, not "unknown packet identifier"); a subscriber
/// whose node dies after PUBREL resumes on another node and gets the PUBREL again, never
/// the PUBLISH. The subscriber receives the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_is_exactly_once_across_the_death_of_a_node() -> anyhow::Result<()> {
    let mut nodes = start_three().await?;
    let (mut sub, _) = persistent(&nodes[1], "q2-sub").await?;
    sub.subscribe(1, "pay/#", QoS::ExactlyOnce).await?;
    let (mut publ, _) = persistent(&nodes[0], "q2-pub").await?;
    publ.send(&Packet::Publish(publish("pay/1", b"EUR 10", QoS::ExactlyOnce, false, 7))).await?;
    match publ.recv().await? {
        Packet::PubResponse(r) if r.kind == PubKind::PubRec && r.packet_id == 7 && r.reason < 0x80 => {}
        other => anyhow::bail!("expected PUBREC, got {other:?}"),
    }
    // The subscriber takes it and answers PUBREC; the broker answers PUBREL.
    let p = sub.recv_publish().await?;
    assert_eq!((&p.payload[..], p.qos), (&b"EUR 10"[..], QoS::ExactlyOnce));
    let sub_id = p.packet_id;
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, sub_id, 0))).await?;
    match sub.recv().await? {
        Packet::PubResponse(r) if r.kind == PubKind::PubRel && r.packet_id == sub_id => {}
        other => anyhow::bail!("expected PUBREL, got {other:?}"),
    }
    // Both nodes die before the exchanges complete.
    nodes[0].kill();
    nodes[1].kill();
    drop((publ, sub));
    // With two of three nodes gone there is no majority: bring one back first.
    nodes[0].restart()?;
    wait_ready(&[&nodes[0], &nodes[2]], 2).await?;
    let (mut publ, present) = persistent(&nodes[2], "q2-pub").await?;
    assert!(present);
    publ.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, 7, 0))).await?;
    match publ.recv().await? {
        Packet::PubResponse(r) if r.kind == PubKind::PubComp && r.packet_id == 7 => {
            assert_eq!(r.reason, 0, "the packet id was known on the new node")
        }
        other => anyhow::bail!("expected PUBCOMP, got {other:?}"),
    }
    let (mut sub, present) = persistent(&nodes[2], "q2-sub").await?;
    assert!(present);
    match sub.recv().await? {
        Packet::PubResponse(r) if r.kind == PubKind::PubRel && r.packet_id == sub_id => {}
        other => anyhow::bail!("expected the PUBREL again, got {other:?}"),
    }
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubComp, sub_id, 0))).await?;
    // Nothing else arrives: the next message is the next one.
    routes_dropped(&nodes[2], &nodes[1].name).await?;
    assert_eq!(publ.publish("pay/2", b"EUR 20", QoS::ExactlyOnce, false, 8).await?, 0);
    let p = sub.recv_publish().await?;
    assert_eq!(&p.payload[..], b"EUR 20", "the first message was not delivered twice");
    Ok(())
}

/// Issue 13, items 5 and 9: a node paused (SIGSTOP) while its client moves to another node
/// lets go when it continues: it disconnects the client's old connection (0x8E Session
/// taken over) without delivering anything on it, and the session lives on the new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_owner_lets_go_when_it_continues() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let (mut old, _) = persistent(&nodes[1], "flaky").await?;
    old.subscribe(1, "tele/#", QoS::AtLeastOnce).await?;
    nodes[1].signal("STOP")?;
    let resumed = async {
        let (mut new, present) = persistent(&nodes[2], "flaky").await?;
        anyhow::ensure!(present, "Session Present on the new node");
        // A publish that matches the paused node's routes is refused until the node is
        // seen down (its copy cannot be confirmed); then its routes are gone.
        let paused = Instant::now();
        nodes[0].wait_until_seen_down("n2").await?;
        // If the paused node led the Raft group, writes fail until another is elected (the
        // publisher is refused, not acknowledged): it publishes again, as a client does.
        let (mut publ, _) = connect_accepted(nodes[0].mqtt, connect_packet(Protocol::V5, "sensor", true)).await?;
        let mut packet_id = 1;
        while publ.publish("tele/1", b"t1", QoS::AtLeastOnce, false, packet_id).await? >= 0x80 {
            anyhow::ensure!(paused.elapsed() < DEADLINE, "no publish accepted while n2 is paused");
            packet_id += 1;
        }
        assert_eq!(receive(&mut new, 1).await?, ["t1"]);
        Ok((new, publ))
    }
    .await;
    nodes[1].signal("CONT")?;
    let (mut new, mut publ) = resumed?;
    let last = old.expect_closed(DEADLINE).await?;
    assert!(
        matches!(&last, Some(Packet::Disconnect(d)) if d.reason == reason::SESSION_TAKEN_OVER),
        "the old connection is told its session was taken over, and gets nothing else: {last:?}"
    );
    assert!(publ.publish("tele/2", b"t2", QoS::AtLeastOnce, false, 100).await? < 0x80);
    // A refused attempt at t1 may have been delivered as well (QoS 1 allows it).
    let mut later = receive(&mut new, 1).await?;
    while later.last().is_some_and(|m| m == "t1") {
        later = receive(&mut new, 1).await?;
    }
    assert_eq!(later, ["t2"]);
    Ok(())
}

/// Issue 13, item 5: the will of a persistent session whose node dies (the client was
/// connected to it) is published by the node that adopts the session, after its delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_will_of_a_session_whose_node_died_is_published_by_a_survivor() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let (mut watcher, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "watcher", true).await?;
    watcher.subscribe(1, "status/#", QoS::AtLeastOnce).await?;
    let mut c = connect_packet(Protocol::V5, "pump-7", false);
    c.properties.session_expiry_interval = Some(300);
    c.will = Some(raftmq_node::codec::LastWill {
        topic: "status/pump-7".into(),
        payload: bytes::Bytes::from_static(b"offline"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: raftmq_node::codec::Properties { will_delay_interval: Some(1), ..Default::default() },
    });
    let (_device, ack) = Raw::connect_with(nodes[1].mqtt, c).await?;
    assert_eq!(ack.code, 0);
    let killed = Instant::now();
    nodes[1].kill();
    let p = tokio::time::timeout(Duration::from_secs(15), watcher.recv_publish()).await??;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("status/pump-7", &b"offline"[..]));
    assert!(killed.elapsed() >= Duration::from_secs(1), "the will delay was respected");
    watcher.expect_silence(Duration::from_millis(500)).await?;
    Ok(())
}

/// Issue 13, items 3 and 5: writes handed to a leader that is paused (SIGSTOP) are not
/// lost to it: once a leader of a later term has committed its first entry, a write the
/// paused one never answered is known either applied or gone, and is proposed again. A
/// client connecting to a follower meanwhile (its client id claimed through the group) is
/// accepted at the first attempt, after the election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_paused_leader_go_through_its_successor() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let leader = agreed_leader(&nodes, &[0, 1, 2]).await?;
    let follower = (leader + 1) % 3;
    nodes[leader].signal("STOP")?;
    let paused = Instant::now();
    let result = async {
        let (mut c, ack) = persistent_once(&nodes[follower], "during-election").await?;
        anyhow::ensure!(ack == 0, "CONNACK {ack:#04x} at the first attempt");
        assert_eq!(c.subscribe(1, "elected/#", QoS::AtLeastOnce).await?, vec![1]);
        Ok(paused.elapsed())
    }
    .await;
    nodes[leader].signal("CONT")?;
    let took = result?;
    println!("accepted {took:?} after the leader was paused");
    Ok(())
}

/// Issue 13, item 6: a leader stopped with SIGTERM hands its leadership over before it
/// exits, so when its process is gone a survivor already leads (without the hand-over the
/// survivors would still follow it for the lease, then wait an election timeout); its
/// client resumes on a survivor at the first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_by_sigterm_hands_over_before_it_exits() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let leader = agreed_leader(&nodes, &[0, 1, 2]).await?;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (mut c, _) = persistent(&nodes[leader], "handed-over").await?;
    assert_eq!(c.subscribe(1, "handed/#", QoS::AtLeastOnce).await?, vec![1]);
    let term = raft_of(&nodes[leader]).await?["term"].as_u64().unwrap_or(0);
    let signalled = Instant::now();
    nodes[leader].terminate().await?;
    println!("the leader exited {:?} after SIGTERM", signalled.elapsed());
    let mut named = Vec::new();
    for &i in &survivors {
        let raft = raft_of(&nodes[i]).await?;
        named.push((nodes[i].name.clone(), raft["leader"].as_str().map(str::to_owned), raft["term"].as_u64()));
    }
    assert!(
        named.iter().any(|(me, leader, _)| leader.as_deref() == Some(me.as_str())),
        "no survivor leads when the old leader has exited: {named:?} (old term {term})"
    );
    let successor = agreed_leader(&nodes, &survivors).await?;
    assert!(raft_of(&nodes[successor]).await?["term"].as_u64() > Some(term));
    let (_, ack) = persistent_once(&nodes[survivors[0]], "handed-over").await?;
    assert_eq!(ack, 0, "CONNACK at the first attempt after the hand-over");
    Ok(())
}

/// Issue 14, item 5 (scaling down leaves cleanly) and issue 13, item 6: with
/// `cluster.autoclean_secs`, the leader removes a member gone that long (a node scaled
/// away), so the group counts only the nodes that remain; when the node comes back with its
/// data, it asks to be added again and is promoted back to voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gone_for_the_autoclean_time_is_removed_and_rejoins_when_back() -> anyhow::Result<()> {
    let mut nodes = start_three_with(&[("RAFTMQ_CLUSTER__AUTOCLEAN_SECS", "2")]).await?;
    let leader = agreed_leader(&nodes, &[0, 1, 2]).await?;
    let gone = (leader + 1) % 3;
    let voters = |raft: &serde_json::Value| raft["voters"].as_array().map_or(0, Vec::len);
    nodes[gone].kill();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let raft = raft_of(&nodes[leader]).await?;
        if voters(&raft) == 2 && raft["learners"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the gone node was never removed: {raft}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What the two remaining nodes write still commits (a majority of two).
    let (mut c, _) = persistent(&nodes[leader], "after-autoclean").await?;
    assert_eq!(c.subscribe(1, "autoclean/#", QoS::AtLeastOnce).await?, vec![1]);

    nodes[gone].restart()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let raft = raft_of(&nodes[leader]).await.unwrap_or_default();
        let back = raft_of(&nodes[gone]).await.unwrap_or_default();
        if voters(&raft) == 3 && back["leader"] == raft["leader"] {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the node never came back as a voter: leader {raft}, node {back}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A persistent MQTT 5 session, one attempt: the CONNACK code.
async fn persistent_once(node: &Node, client_id: &str) -> anyhow::Result<(Raw, u8)> {
    let mut c = connect_packet(Protocol::V5, client_id, false);
    c.properties.session_expiry_interval = Some(300);
    let (raw, ack) = Raw::connect_with(node.mqtt, c).await?;
    Ok((raw, ack.code))
}
