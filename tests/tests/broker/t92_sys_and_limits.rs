//! `$SYS` topics, client events, and the per-IP and publish-rate limits.

use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Protocol};
use raftmq_node::config::RateAction;
use raftmq_tests::*;

/// The next PUBLISH on `topic`; the `$SYS` ticks of the topics subscribed before keep
/// arriving meanwhile and are skipped.
async fn recv_on(sub: &mut Raw, topic: &str) -> anyhow::Result<raftmq_node::codec::Publish> {
    loop {
        let p = sub.recv_publish().await?;
        if p.topic == topic {
            return Ok(p);
        }
    }
}

#[tokio::test]
async fn sys_topics_publish_broker_information_and_statistics() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        c.sys.interval_secs = 1;
        c.node_name = "node-a".into();
    })
    .await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "sys-watch", true).await?;
    sub.subscribe(1, "$SYS/brokers/node-a/uptime", QoS::AtMostOnce).await?;
    let p = recv_on(&mut sub, "$SYS/brokers/node-a/uptime").await?;
    assert!(p.payload.iter().all(u8::is_ascii_digit), "uptime {:?}", p.payload);
    sub.subscribe(2, "$SYS/brokers", QoS::AtMostOnce).await?;
    assert_eq!(&recv_on(&mut sub, "$SYS/brokers").await?.payload[..], b"node-a");
    let count_topic = "$SYS/brokers/node-a/stats/connections/count";
    sub.subscribe(3, count_topic, QoS::AtMostOnce).await?;
    // A tick takes its statistics at once and then stores them one after another, so the
    // first value may predate this client; the next tick (1 s) counts it.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let p = recv_on(&mut sub, count_topic).await?;
        let count: usize = std::str::from_utf8(&p.payload)?.parse()?;
        if count >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no statistic counted the connected client");
    }
    sub.subscribe(4, "$SYS/brokers/node-a/version", QoS::AtMostOnce).await?;
    assert_eq!(&recv_on(&mut sub, "$SYS/brokers/node-a/version").await?.payload[..], env!("CARGO_PKG_VERSION").as_bytes());
    // `#` never matches $SYS [MQTT-4.7.2-1].
    let (mut all, _) = Raw::connect(b.addr, Protocol::V311, "everything", true).await?;
    all.subscribe(1, "#", QoS::AtMostOnce).await?;
    all.expect_silence(Duration::from_millis(1500)).await
}

#[tokio::test]
async fn sys_client_connected_and_disconnected_events() -> anyhow::Result<()> {
    let b = start_broker(|c| c.node_name = "ev".into()).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "ev-watch", true).await?;
    sub.subscribe(1, "$SYS/brokers/ev/clients/+/+", QoS::AtMostOnce).await?;
    let mut c = connect_packet(Protocol::V5, "dev/1", true);
    c.username = Some("alice".into());
    let (raw, _) = Raw::connect_with(b.addr, c).await?;
    let p = sub.recv_publish().await?;
    assert_eq!(p.topic, "$SYS/brokers/ev/clients/dev%2F1/connected");
    let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(v["clientid"], "dev/1");
    assert_eq!(v["username"], "alice");
    assert_eq!(v["proto_ver"], 5);
    assert_eq!(v["keepalive"], 60);
    assert_eq!(v["ipaddress"], "127.0.0.1");
    drop(raw);
    let p = sub.recv_publish().await?;
    assert_eq!(p.topic, "$SYS/brokers/ev/clients/dev%2F1/disconnected");
    let v: serde_json::Value = serde_json::from_slice(&p.payload)?;
    assert_eq!(v["clientid"], "dev/1");
    Ok(())
}

#[tokio::test]
async fn max_connections_per_ip_closes_extra_connections() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_connections_per_ip = 2).await?;
    let (mut a, _) = Raw::connect(b.addr, Protocol::V311, "ip1", true).await?;
    let (mut c, _) = Raw::connect(b.addr, Protocol::V311, "ip2", true).await?;
    let mut third = Raw::open(b.addr, Protocol::V311).await?;
    assert_eq!(third.expect_closed(DEADLINE).await?, None);
    a.ping().await?;
    c.ping().await?;
    // A place frees up when a connection ends.
    drop(a);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Raw::connect(b.addr, Protocol::V311, "ip3", true).await {
            Ok((mut r, ack)) if ack.code == 0 => return r.ping().await,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => anyhow::bail!("no place freed: {:?}", other.err()),
        }
    }
}

#[tokio::test]
async fn publish_rate_disconnect_gets_0x96() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        c.mqtt.max_publish_rate = 5;
        c.mqtt.publish_rate_action = RateAction::Disconnect;
    })
    .await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "chatty", true).await?;
    for _ in 0..20 {
        if raw.send(&Packet::Publish(publish("r", b"x", QoS::AtMostOnce, false, 0))).await.is_err() {
            break;
        }
    }
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::MESSAGE_RATE_TOO_HIGH));
    assert_serving(b.addr).await
}

#[tokio::test]
async fn publish_rate_throttle_slows_reading_without_losing_messages() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_publish_rate = 20).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "slow-sub", true).await?;
    sub.subscribe(1, "th", QoS::AtMostOnce).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V311, "throttled", true).await?;
    let started = Instant::now();
    // 20 tokens saved up, then 20 a second: 40 messages take at least ~1 s.
    for i in 0..40u8 {
        raw.send(&Packet::Publish(publish("th", &[i], QoS::AtMostOnce, false, 0))).await?;
    }
    for i in 0..40u8 {
        assert_eq!(sub.recv_publish().await?.payload[0], i);
    }
    assert!(started.elapsed() >= Duration::from_millis(900), "not throttled: {:?}", started.elapsed());
    raw.ping().await
}

#[tokio::test]
async fn max_connections_per_node_closes_extra_connections() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_connections = 2).await?;
    let (mut a, _) = Raw::connect(b.addr, Protocol::V311, "n1", true).await?;
    let (mut c, _) = Raw::connect(b.addr, Protocol::V5, "n2", true).await?;
    let mut third = Raw::open(b.addr, Protocol::V311).await?;
    assert_eq!(third.expect_closed(DEADLINE).await?, None);
    a.ping().await?;
    c.ping().await
}

#[tokio::test]
async fn connect_larger_than_pre_connect_cap_is_refused() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_connect_packet_size = 128).await?;
    let mut c = connect_packet(Protocol::V311, "big-hello", true);
    c.username = Some("u".repeat(200));
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send(&Packet::Connect(Box::new(c))).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    // After CONNECT the ordinary limit applies.
    let (mut ok, _) = Raw::connect(b.addr, Protocol::V311, "small-hello", true).await?;
    ok.publish("t", &[0u8; 1024], QoS::AtLeastOnce, false, 1).await?;
    Ok(())
}
