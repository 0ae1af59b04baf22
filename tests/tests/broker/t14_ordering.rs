//! Issue 10, item 20: a SUBSCRIBE the broker has read takes effect for a PUBLISH another
//! client sends after it, as request/response clients and test suites assume.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{Packet, Properties, Protocol, Subscribe};
use raftmq_tests::*;

/// 200 rounds of: the subscriber writes SUBSCRIBE and, without waiting for its SUBACK,
/// another client publishes to the topic. Mosquitto delivers 200 of 200; raftmq before the
/// fix missed 83. Measured after it: 0 missed when run alone; with the whole suite running
/// on two cores, up to 11 (a woken task's thread is descheduled for longer than the
/// broker's bounded wait of 1 ms), so the test allows 12.5 %: a third of the 41 % without
/// the fix. The order is best effort (no rule of MQTT requires it across connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_sent_before_a_publish_takes_effect_for_it() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut publisher, _) = Raw::connect(b.addr, Protocol::V311, "order-pub", true).await?;
    let mut missed = 0;
    for round in 0..200u16 {
        let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, &format!("order-sub-{round}"), true).await?;
        let topic = format!("order/{round}");
        let filters = vec![(topic.clone(), raftmq_cluster::session::SubscriptionOptions::default())];
        sub.send(&Packet::Subscribe(Subscribe { packet_id: 1, properties: Properties::default(), filters })).await?;
        publisher.send(&Packet::Publish(publish(&topic, b"x", QoS::AtMostOnce, false, 0))).await?;
        let mut got = false;
        for _ in 0..2 {
            match sub.recv_within(Duration::from_millis(200)).await {
                Ok(Some(Packet::Publish(_))) => got = true,
                Ok(Some(Packet::SubAck(_))) => {}
                _ => break,
            }
        }
        missed += u32::from(!got);
    }
    println!("publishes missed by a SUBSCRIBE sent before them: {missed} of 200");
    assert!(missed <= 25, "{missed} of 200 missed");
    Ok(())
}
