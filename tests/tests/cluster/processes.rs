//! Three real `raftmq` processes on loopback (the harness is `raftmq_tests::processes`).

use std::process::Command;
use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Protocol, PubKind, PubResponse, Publish};
use raftmq_tests::processes::{binary, connect_accepted, start_three, FAILURE_TIMEOUT, ROUTE_ACK_TIMEOUT};
use raftmq_tests::*;

use super::DEADLINE;

/// Issue 12, item 8: a peer that stops reading (SIGSTOP) blocks nobody: a SUBACK waits at
/// most the route acknowledgement bound, messages between the other nodes flow, the paused
/// node is seen down; when it continues it is up again and routes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_blocks_nobody_and_comes_back() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    nodes[2].signal("STOP")?;
    // If the paused node led the Raft group, a CONNECT is refused (busy) until another is
    // elected: the clients connect again, as clients do.
    let (mut sub, _) = connect_accepted(nodes[0].mqtt, connect_packet(Protocol::V5, "near", true)).await?;
    let started = Instant::now();
    sub.subscribe(1, "live/#", QoS::AtLeastOnce).await?;
    assert!(started.elapsed() < ROUTE_ACK_TIMEOUT + Duration::from_secs(1), "SUBACK took {:?}", started.elapsed());
    let (mut publ, _) = connect_accepted(nodes[1].mqtt, connect_packet(Protocol::V5, "other", true)).await?;
    assert_eq!(publ.publish("live/x", b"flows", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"flows");
    nodes[0].wait_until_seen_down("n3").await?;
    nodes[2].signal("CONT")?;
    let resumed = Instant::now();
    loop {
        let view = nodes[0].cluster().await?;
        if view.iter().all(|(_, status)| status == "up") {
            break;
        }
        anyhow::ensure!(resumed.elapsed() < DEADLINE, "n3 never came back: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // n3 has n1's routes again (a snapshot): its publisher reaches n1's subscriber.
    let (mut back, _) = Raw::connect(nodes[2].mqtt, Protocol::V5, "back", true).await?;
    let deadline = Instant::now() + DEADLINE;
    let mut n = 1;
    while back.publish("live/y", b"again", QoS::AtLeastOnce, false, n).await? != 0 {
        anyhow::ensure!(Instant::now() < deadline, "n3 never routed to n1 again");
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&sub.recv_publish().await?.payload[..], b"again");
    Ok(())
}

/// Issue 12, items 1, 2 and 8: three processes started with the same `--seeds` form one
/// cluster with no other flag; `/readyz` turns ready once every peer's routes arrived; a
/// message crosses nodes; a node killed with SIGKILL is seen down, and its routes gone,
/// within the failure detection time plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_form_one_cluster_and_notice_a_killed_node() -> anyhow::Result<()> {
    let nodes = start_three().await?;

    // `raftmq ctl cluster` prints the same view.
    let out = Command::new(binary()?).args(["ctl", "--url", &nodes[0].admin, "--api-key", "k3y", "cluster"]).output()?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    for name in ["n1", "n2", "n3"] {
        assert!(printed.lines().any(|l| l.starts_with(name) && l.contains(" up ")), "{name} not up in:\n{printed}");
    }

    let (mut sub, _) = Raw::connect(nodes[2].mqtt, Protocol::V5, "far-away", true).await?;
    sub.subscribe(1, "proc/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "publisher", true).await?;
    assert_eq!(publ.publish("proc/x", b"across", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"across");

    // The cluster's metrics pass promtool.
    let (_, metrics) = nodes[0].get("/metrics").await?;
    assert!(metrics.contains("raftmq_cluster_peer_up{peer=\"n3\"} 1"), "{metrics}");
    promtool_check(&metrics).await?;

    nodes[2].kill();
    let killed = Instant::now();
    nodes[0].wait_until_seen_down("n3").await?;
    let noticed = killed.elapsed();
    assert!(noticed <= FAILURE_TIMEOUT + Duration::from_secs(1), "noticed after {noticed:?}");
    // A dead peer does not make the others unready: they keep serving.
    assert_eq!(nodes[0].get("/readyz").await?.0, 200);
    // Its routes are gone: nobody else subscribed.
    let mut code = 0;
    while killed.elapsed() < FAILURE_TIMEOUT + Duration::from_secs(1) {
        code = publ.publish("proc/x", b"after", QoS::AtLeastOnce, false, 2).await?;
        if code == reason::NO_MATCHING_SUBSCRIBERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, reason::NO_MATCHING_SUBSCRIBERS, "n3's routes still there");
    Ok(())
}

/// Issue 12, items 5 and 8: shared QoS 1 deliveries a member on a node that is killed
/// (SIGKILL) had not acknowledged go to another member, on another node, within the
/// failure detection time plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_unacknowledged_shared_messages_go_to_another_member() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let (mut m, _) = Raw::connect(node.mqtt, Protocol::V5, &format!("member{i}"), true).await?;
        m.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce).await?;
        members.push(m);
    }
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "dispatcher", true).await?;
    for n in 1..=10u16 {
        assert_eq!(publ.publish("jobs/x", format!("job{n}").as_bytes(), QoS::AtLeastOnce, false, n).await?, 0);
    }
    // The member on n2 takes its jobs and never acknowledges them; the one on n3 does.
    let mut doomed = members.remove(0);
    let mut survivor = members.remove(0);
    let mut held = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = doomed.recv_within(Duration::from_millis(300)).await {
        held.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let mut done = Vec::new();
    let drain = |done: &mut Vec<String>, p: Publish| {
        done.push(String::from_utf8_lossy(&p.payload).into_owned());
        p.packet_id
    };
    while let Ok(Some(Packet::Publish(p))) = survivor.recv_within(Duration::from_millis(300)).await {
        let id = drain(&mut done, p);
        survivor.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0))).await?;
    }
    assert!(!held.is_empty() && !done.is_empty(), "both members got jobs: {held:?} {done:?}");
    nodes[1].kill();
    let killed = Instant::now();
    while held.iter().any(|job| !done.contains(job)) {
        anyhow::ensure!(killed.elapsed() < DEADLINE, "jobs {held:?} never reached the survivor (got {done:?})");
        if let Ok(Some(Packet::Publish(p))) = survivor.recv_within(Duration::from_millis(100)).await {
            let id = drain(&mut done, p);
            survivor.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0))).await?;
        }
    }
    let took = killed.elapsed();
    assert!(took <= FAILURE_TIMEOUT + Duration::from_secs(1), "redelivered after {took:?}");
    let mut all = done.clone();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every job reached a live member: {done:?}");
    // The counter moves after each hand-over completes, which can be just after the survivor
    // has the message: wait for it rather than read it once.
    let expected = format!("raftmq_cluster_redelivered_total {}", held.len());
    loop {
        let (_, metrics) = nodes[0].get("/metrics").await?;
        if metrics.contains(&expected) {
            break;
        }
        anyhow::ensure!(killed.elapsed() < DEADLINE, "{expected} never reported:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
