//! Retained messages: latest wins, empty payload deletes, RETAIN flags on delivery.

use raftmq_cluster::message::QoS;
use raftmq_node::codec::Protocol;
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_3_3_1_6_new_subscription_gets_retained_with_retain_flag_including_wildcards() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "rp", true).await?;
    publ.publish("home/kitchen/temp", b"20", QoS::AtLeastOnce, true, 1).await?;
    publ.publish("home/kitchen/temp", b"21", QoS::AtLeastOnce, true, 2).await?;
    publ.publish("home/hall/temp", b"19", QoS::AtMostOnce, true, 0).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "rs", true).await?;
    sub.subscribe(1, "home/+/temp", QoS::AtLeastOnce).await?;
    let mut got = [sub.recv_publish().await?, sub.recv_publish().await?];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!((got[0].topic.as_str(), &got[0].payload[..], got[0].retain), ("home/hall/temp", &b"19"[..], true));
    assert_eq!((got[1].topic.as_str(), &got[1].payload[..], got[1].retain), ("home/kitchen/temp", &b"21"[..], true));
    assert_eq!(got[1].qos, QoS::AtLeastOnce);
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    Ok(())
}

#[tokio::test]
async fn mqtt_3_3_1_12_live_copies_to_existing_subscribers_have_retain_0() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "live", true).await?;
    sub.subscribe(1, "r/#", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "lp", true).await?;
    publ.publish("r/1", b"x", QoS::AtMostOnce, true, 0).await?;
    let p = sub.recv_publish().await?;
    assert!(!p.retain);
    // A repeated SUBSCRIBE counts as new and gets the retained message again.
    sub.subscribe(2, "r/#", QoS::AtMostOnce).await?;
    let p = sub.recv_publish().await?;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"x");
    Ok(())
}

#[tokio::test]
async fn mqtt_3_3_1_10_empty_payload_deletes_retained() -> anyhow::Result<()> {
    // No `$SYS` publisher: its retained messages would race with the counts below.
    let b = start_broker(|c| c.sys.interval_secs = 0).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "dp", true).await?;
    publ.publish("gone", b"x", QoS::AtLeastOnce, true, 1).await?;
    assert_eq!(b.server.broker.retained_count(), 1);
    publ.publish("gone", b"", QoS::AtLeastOnce, true, 2).await?;
    assert_eq!(b.server.broker.retained_count(), 0);
    publ.publish("marker", b"m", QoS::AtLeastOnce, true, 3).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "ds", true).await?;
    sub.subscribe(1, "#", QoS::AtMostOnce).await?;
    assert_eq!(sub.recv_publish().await?.topic, "marker");
    Ok(())
}

#[tokio::test]
async fn retained_count_cap_refuses_new_topics_but_still_delivers() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        c.retained.max_messages = 1;
        c.sys.interval_secs = 0;
    })
    .await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "cs", true).await?;
    sub.subscribe(1, "cap/+", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "cp", true).await?;
    publ.publish("cap/a", b"1", QoS::AtLeastOnce, true, 1).await?;
    publ.publish("cap/b", b"2", QoS::AtLeastOnce, true, 2).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"1");
    assert_eq!(&sub.recv_publish().await?.payload[..], b"2");
    assert_eq!(b.server.broker.retained_count(), 1);
    Ok(())
}
