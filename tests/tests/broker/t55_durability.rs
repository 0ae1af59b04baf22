//! Durability of a node alone: retained messages and persistent sessions live in the Raft
//! store on the data directory, so a restart keeps them (a group of one).

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{Disconnect, Packet, Protocol, PubKind, PubResponse};
use raftmq_node::server::Server;
use raftmq_tests::*;

/// Starts a broker on `dir` (kept across restarts: not one of the harness's directories).
async fn start_on(dir: &std::path::Path, name: &str) -> anyhow::Result<TestBroker> {
    let config = test_config(|c| {
        c.data_dir = dir.to_path_buf();
        c.node_name = name.into();
    });
    config.validate()?;
    let server = Server::start(config).await?;
    let addr = server.mqtt_addr;
    Ok(TestBroker { server, addr })
}

#[tokio::test]
async fn retained_messages_and_persistent_sessions_survive_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = start_on(dir.path(), "n1").await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "durable", false).await?;
    sub.subscribe(1, "cmd/#", QoS::AtLeastOnce).await?;
    sub.send(&Packet::Disconnect(Disconnect::new(0))).await?;
    sub.expect_closed(DEADLINE).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "commander", true).await?;
    publ.publish("state/lamp", b"on", QoS::AtLeastOnce, true, 1).await?;
    for i in 0..3u8 {
        // Each PUBACK means the append to the offline session is committed.
        publ.publish("cmd/x", &[i], QoS::AtLeastOnce, false, u16::from(i) + 2).await?;
    }
    b.server.shutdown(Duration::from_secs(1)).await;
    drop(b);

    let b = start_on(dir.path(), "n1").await?;
    let (mut fresh, _) = Raw::connect(b.addr, Protocol::V311, "late", true).await?;
    fresh.subscribe(1, "state/#", QoS::AtMostOnce).await?;
    let retained = fresh.recv_publish().await?;
    assert_eq!((retained.topic.as_str(), &retained.payload[..], retained.retain), ("state/lamp", &b"on"[..], true));

    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V5, "durable", false).await?;
    assert!(ack.session_present, "the session came back with the node");
    for i in 0..3u8 {
        let p = sub.recv_publish().await?;
        assert_eq!(p.payload[0], i, "the offline queue, in order");
        sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
    }
    // The recovered subscription routes live messages too.
    publ = Raw::connect(b.addr, Protocol::V311, "commander", true).await?.0;
    publ.publish("cmd/y", b"live", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"live");
    b.server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}

#[tokio::test]
async fn a_data_directory_of_another_node_stops_the_start_with_what_to_do() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = start_on(dir.path(), "owner").await?;
    b.server.shutdown(Duration::from_secs(1)).await;
    drop(b);
    let err = match start_on(dir.path(), "intruder").await {
        Ok(_) => anyhow::bail!("a foreign data directory was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("belongs to node \"owner\"") && err.contains("--data-dir"), "{err}");
    Ok(())
}
