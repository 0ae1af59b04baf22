//! Topic names and filters: wildcards, `$` topics, level limits.

use raftmq_cluster::message::QoS;
use raftmq_cluster::session::SubscriptionOptions;
use raftmq_node::codec::{reason, Packet, Properties, Protocol};
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_4_7_2_1_dollar_topics_not_matched_by_leading_wildcards() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut all, _) = Raw::connect(b.addr, Protocol::V311, "all", true).await?;
    all.subscribe(1, "#", QoS::AtMostOnce).await?;
    all.subscribe(2, "+/status", QoS::AtMostOnce).await?;
    let (mut dollar, _) = Raw::connect(b.addr, Protocol::V311, "dollar", true).await?;
    dollar.subscribe(1, "$internal/#", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "p", true).await?;
    publ.publish("$internal/status", b"hidden", QoS::AtMostOnce, false, 0).await?;
    publ.publish("visible/status", b"seen", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&dollar.recv_publish().await?.payload[..], b"hidden");
    // One copy per client even though "#" and "+/status" both match [MQTT-3.3.5-1].
    assert_eq!(&all.recv_publish().await?.payload[..], b"seen");
    publ.publish("visible/other", b"next", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&all.recv_publish().await?.payload[..], b"next");
    Ok(())
}

#[tokio::test]
async fn b16_invalid_filters_get_per_filter_failure_codes() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let filters = ["a/#/b", "a+", "#x", "ok/+", ""];
    let opts = SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() };
    let (mut v5, _) = Raw::connect(b.addr, Protocol::V5, "f5", true).await?;
    let codes = v5.subscribe_with(1, filters.iter().map(|f| (f.to_string(), opts)).collect(), Properties::default()).await?;
    let bad = reason::TOPIC_FILTER_INVALID;
    assert_eq!(codes, vec![bad, bad, bad, 1, bad]);
    let (mut v3, _) = Raw::connect(b.addr, Protocol::V311, "f3", true).await?;
    let codes = v3.subscribe_with(1, filters.iter().map(|f| (f.to_string(), opts)).collect(), Properties::default()).await?;
    assert_eq!(codes, vec![0x80, 0x80, 0x80, 1, 0x80]);
    Ok(())
}

#[tokio::test]
async fn b15_too_many_levels_rejected() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_topic_levels = 8).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "deep", true).await?;
    let deep = "a/".repeat(10_000) + "b";
    assert_eq!(raw.subscribe(1, &deep, QoS::AtMostOnce).await?, vec![reason::TOPIC_FILTER_INVALID]);
    raw.send(&Packet::Publish(publish(&deep, b"x", QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::TOPIC_NAME_INVALID));
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b13_wildcard_or_empty_topic_in_publish() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "wild", true).await?;
    raw.send(&Packet::Publish(publish("a/+", b"x", QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::TOPIC_NAME_INVALID));
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "empty", true).await?;
    raw.send(&Packet::Publish(publish("", b"x", QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V311, "wild3", true).await?;
    raw.send(&Packet::Publish(publish("a/#", b"x", QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b14_client_publish_to_sys_is_dropped_and_refused_on_v5() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "sys-sub", true).await?;
    sub.subscribe(1, "$SYS/broker/#", QoS::AtMostOnce).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "faker", true).await?;
    assert_eq!(raw.publish("$SYS/broker/uptime", b"0", QoS::AtLeastOnce, false, 1).await?, reason::NOT_AUTHORIZED);
    // Other $-topics are ordinary topics.
    sub.subscribe(2, "$app/x", QoS::AtMostOnce).await?;
    raw.publish("$app/x", b"ok", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"ok");
    Ok(())
}

#[tokio::test]
async fn subscription_limit_gets_quota_exceeded() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_subscriptions = 2).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "many", true).await?;
    raw.subscribe(1, "a", QoS::AtMostOnce).await?;
    raw.subscribe(2, "b", QoS::AtMostOnce).await?;
    assert_eq!(raw.subscribe(3, "c", QoS::AtMostOnce).await?, vec![reason::QUOTA_EXCEEDED]);
    // Replacing an existing subscription is not a new one.
    assert_eq!(raw.subscribe(4, "a", QoS::AtLeastOnce).await?, vec![1]);
    Ok(())
}

#[tokio::test]
async fn mqtt_3_10_4_unsubscribe_stops_delivery_and_reports_missing() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "unsub", true).await?;
    raw.subscribe(1, "u/+", QoS::AtMostOnce).await?;
    raw.send(&Packet::Unsubscribe(raftmq_node::codec::Unsubscribe {
        packet_id: 2,
        properties: Properties::default(),
        filters: vec!["u/+".into(), "never".into()],
    }))
    .await?;
    match raw.recv().await? {
        Packet::UnsubAck(u) => assert_eq!(u.codes, vec![0, reason::NO_SUBSCRIPTION_EXISTED]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    raw.publish("u/1", b"x", QoS::AtMostOnce, false, 0).await?;
    raw.ping().await?;
    Ok(())
}

#[tokio::test]
async fn mqtt_3_8_3_3_no_local_and_subscription_identifiers() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "self", true).await?;
    let nl = SubscriptionOptions { qos: QoS::AtMostOnce, no_local: true, ..Default::default() };
    raw.subscribe_with(1, vec![("echo".into(), nl)], Properties::default()).await?;
    let props = Properties { subscription_identifiers: vec![7], ..Properties::default() };
    raw.subscribe_with(2, vec![("ids/#".into(), SubscriptionOptions::default())], props).await?;
    let props = Properties { subscription_identifiers: vec![9], ..Properties::default() };
    raw.subscribe_with(3, vec![("ids/+".into(), SubscriptionOptions::default())], props).await?;
    raw.publish("echo", b"mine", QoS::AtMostOnce, false, 0).await?;
    raw.publish("ids/a", b"both", QoS::AtMostOnce, false, 0).await?;
    let p = raw.recv_publish().await?;
    assert_eq!(&p.payload[..], b"both");
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 9]);
    Ok(())
}
