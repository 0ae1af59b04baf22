//! F10: a corrupt last log record. The checksum every record carries catches it when the
//! node starts: it refuses to start and says what to do; moved away, the node starts empty
//! and catches up from its peers.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{Packet, Protocol};
use raftmq_tests::connect_packet;
use raftmq_tests::processes::{connect_accepted, start_three, wait_ready, Node, CLUSTER_DEADLINE};

/// Flips the last byte of the last entry of the Raft log in a stopped node's store.
fn corrupt_last_log_record(node: &Node) -> anyhow::Result<u64> {
    let db = sled::open(node.data_dir().path().join("raft"))?;
    let log = db.open_tree("log")?;
    let (key, value) = log.last()?.ok_or_else(|| anyhow::anyhow!("an empty log"))?;
    let mut bad = value.to_vec();
    if let Some(last) = bad.last_mut() {
        *last ^= 0xFF;
    }
    log.insert(&key, bad)?;
    db.flush()?;
    let index = u64::from_be_bytes(key.as_ref().try_into()?);
    Ok(index)
}

/// The retained message on `topic` as a new client on `node` sees it.
async fn retained(node: &Node, topic: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let (mut c, ack) = connect_accepted(node.mqtt, connect_packet(Protocol::V5, "f10-reader", true)).await?;
    anyhow::ensure!(ack.code == 0, "CONNACK {:#x}", ack.code);
    c.subscribe(1, topic, QoS::AtMostOnce).await?;
    Ok(match c.recv_within(Duration::from_secs(2)).await? {
        Some(Packet::Publish(p)) if p.retain => Some(p.payload.to_vec()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f10_a_corrupt_last_log_record_stops_the_node_and_it_recovers_from_its_peers() -> anyhow::Result<()> {
    let mut nodes = start_three().await?;
    let (mut publisher, ack) = connect_accepted(nodes[0].mqtt, connect_packet(Protocol::V5, "f10-writer", true)).await?;
    anyhow::ensure!(ack.code == 0, "CONNACK {:#x}", ack.code);
    anyhow::ensure!(publisher.publish("f10/kept", b"before", QoS::AtLeastOnce, true, 1).await? < 0x80, "retained publish refused");
    // The last node, whatever it is, is stopped and its last record spoilt.
    let victim = 2;
    nodes[victim].kill();
    let index = corrupt_last_log_record(&nodes[victim])?;
    let (status, stderr) = nodes[victim].start_expecting_exit(CLUSTER_DEADLINE)?;
    anyhow::ensure!(!status.success(), "a node started on a corrupt log (entry {index})");
    anyhow::ensure!(stderr.contains("corrupt") && stderr.contains("move it away"), "the refusal does not say what to do: {stderr}");
    // Meanwhile the other two go on.
    anyhow::ensure!(publisher.publish("f10/kept", b"during", QoS::AtLeastOnce, true, 2).await? < 0x80, "the majority stopped writing");
    // What the message says: moved away, the node starts empty and catches up.
    let store = nodes[victim].data_dir().path().join("raft");
    std::fs::rename(&store, store.with_extension("corrupt"))?;
    nodes[victim].restart()?;
    wait_ready(&nodes.iter().collect::<Vec<_>>(), 3).await?;
    let seen = retained(&nodes[victim], "f10/kept").await?;
    anyhow::ensure!(seen.as_deref() == Some(b"during".as_slice()), "after catching up the node serves {seen:?}");
    Ok(())
}
