//! Will messages: published on abnormal ends only, with QoS, retain and delay.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Connect, Disconnect, LastWill, Packet, Properties, Protocol};
use raftmq_tests::*;

fn with_will(protocol: Protocol, id: &str, delay: Option<u32>, expiry: Option<u32>) -> Connect {
    let mut c = connect_packet(protocol, id, expiry.is_none());
    c.properties.session_expiry_interval = expiry;
    c.will = Some(LastWill {
        topic: format!("will/{id}"),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties { will_delay_interval: delay, ..Properties::default() },
    });
    c
}

async fn watcher(addr: std::net::SocketAddr) -> anyhow::Result<Raw> {
    let (mut w, _) = Raw::connect(addr, Protocol::V5, "watcher", true).await?;
    w.subscribe(1, "will/#", QoS::AtLeastOnce).await?;
    Ok(w)
}

#[tokio::test]
async fn mqtt_3_1_2_8_will_published_when_connection_drops() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let (raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V311, "dropper", None, None)).await?;
    drop(raw);
    let p = w.recv_publish().await?;
    assert_eq!((p.topic.as_str(), &p.payload[..], p.qos), ("will/dropper", &b"gone"[..], QoS::AtLeastOnce));
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_2_10_will_not_published_after_normal_disconnect() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let (mut raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "polite", None, None)).await?;
    raw.send(&Packet::Disconnect(Disconnect::new(0))).await?;
    raw.expect_closed(DEADLINE).await?;
    // Proof of silence: a later will from another client arrives first.
    let (raw2, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "rude", None, None)).await?;
    drop(raw2);
    assert_eq!(w.recv_publish().await?.topic, "will/rude");
    Ok(())
}

#[tokio::test]
async fn disconnect_with_will_message_0x04_publishes_will() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let (mut raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "x04", None, None)).await?;
    raw.send(&Packet::Disconnect(Disconnect::new(reason::DISCONNECT_WITH_WILL))).await?;
    assert_eq!(w.recv_publish().await?.topic, "will/x04");
    Ok(())
}

#[tokio::test]
async fn will_published_on_protocol_error() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let (mut raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V311, "broken", None, None)).await?;
    raw.send_bytes(&[0x00, 0x00]).await?;
    assert_eq!(w.recv_publish().await?.topic, "will/broken");
    Ok(())
}

#[tokio::test]
async fn will_retain_flag_stores_retained_will() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = with_will(Protocol::V311, "keeper", None, None);
    if let Some(w) = c.will.as_mut() {
        w.retain = true;
    }
    let (raw, _) = Raw::connect_with(b.addr, c).await?;
    let mut live = watcher(b.addr).await?;
    drop(raw);
    // A retained message is stored before it is routed: once a live subscriber has the
    // will, a new subscriber must get it as retained.
    assert_eq!(live.recv_publish().await?.topic, "will/keeper");
    drop(live);
    let mut w = watcher(b.addr).await?;
    let p = w.recv_publish().await?;
    assert_eq!(p.topic, "will/keeper");
    assert!(p.retain);
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_3_9_will_delay_cancelled_by_reconnect() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let (raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "comeback", Some(2), Some(60))).await?;
    drop(raw);
    let mut again = with_will(Protocol::V5, "comeback", Some(2), Some(60));
    again.will = None;
    let (_raw, ack) = Raw::connect_with(b.addr, again).await?;
    assert!(ack.session_present);
    // A second client's immediate will arrives; the delayed one never does.
    let (other, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "other", None, None)).await?;
    drop(other);
    assert_eq!(w.recv_publish().await?.topic, "will/other");
    w.expect_silence(Duration::from_millis(2500)).await?;
    Ok(())
}

#[tokio::test]
async fn will_delay_elapses_then_will_published() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut w = watcher(b.addr).await?;
    let started = std::time::Instant::now();
    let (raw, _) = Raw::connect_with(b.addr, with_will(Protocol::V5, "late", Some(1), Some(60))).await?;
    drop(raw);
    assert_eq!(w.recv_publish().await?.topic, "will/late");
    assert!(started.elapsed() >= Duration::from_millis(900));
    Ok(())
}

#[tokio::test]
async fn b31_will_to_sys_topic_refused() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = with_will(Protocol::V5, "sys", None, None);
    if let Some(w) = c.will.as_mut() {
        w.topic = "$SYS/broker/fake".into();
    }
    let (mut raw, ack) = Raw::connect_with(b.addr, c).await?;
    assert_eq!(ack.code, reason::NOT_AUTHORIZED);
    raw.expect_closed(DEADLINE).await?;
    Ok(())
}
