//! Bad input from faults-and-inputs.md: each gets the spec's reaction, and the broker keeps
//! serving everyone else.

use raftmq_node::codec::{reason, Packet, Properties, Protocol};
use raftmq_tests::*;

async fn expect_v5_disconnect(bytes: &[u8], code: u8) -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "bad", true).await?;
    raw.send_bytes(bytes).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(code), "input {bytes:02x?}");
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b1_five_byte_remaining_length_is_malformed() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b2_huge_first_packet_closed_before_buffering_for_every_type() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    for kind in 0u8..16 {
        let mut raw = Raw::open(b.addr, Protocol::V311).await?;
        raw.send_bytes(&[kind << 4, 0xff, 0xff, 0xff, 0x7f]).await?;
        assert_eq!(raw.expect_closed(DEADLINE).await?, None, "type {kind}");
    }
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b3_truncated_packet_waits_then_closes_on_eof() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V311, "trunc", true).await?;
    raw.send_bytes(&[0x30, 0x20, 0x00, 0x01, b't']).await?;
    // Still waiting for the rest: the connection is alive but the packet is incomplete.
    raw.expect_silence(std::time::Duration::from_millis(200)).await?;
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b12_publish_qos3_is_malformed() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x36, 0x05, 0, 1, b't', 0, 1], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b10_unknown_property_is_malformed() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x30, 0x06, 0, 1, b't', 2, 0x7f, 0], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b10_duplicate_property_is_protocol_error() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x30, 0x08, 0, 1, b't', 4, 0x01, 0, 0x01, 1], reason::PROTOCOL_ERROR).await
}

#[tokio::test]
async fn b9_invalid_utf8_topic_is_malformed() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x30, 0x05, 0, 2, 0xc3, 0x28, 0], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b17_subscribe_with_bad_flags_is_malformed() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x80, 0x07, 0, 1, 0, 0, 1, b't', 0], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b19_client_publish_with_subscription_identifier_is_protocol_error() -> anyhow::Result<()> {
    // Topic "t", properties: Subscription Identifier 1.
    expect_v5_disconnect(&[0x30, 0x06, 0, 1, b't', 2, 0x0b, 1], reason::PROTOCOL_ERROR).await
}

#[tokio::test]
async fn b20_topic_alias_zero_or_beyond_maximum_is_invalid() -> anyhow::Result<()> {
    // Topic Alias 17 (maximum 16), then Topic Alias 0.
    expect_v5_disconnect(&[0x30, 0x07, 0, 1, b't', 3, 0x23, 0, 17], reason::TOPIC_ALIAS_INVALID).await?;
    expect_v5_disconnect(&[0x30, 0x07, 0, 1, b't', 3, 0x23, 0, 0], reason::TOPIC_ALIAS_INVALID).await
}

#[tokio::test]
async fn b20_empty_topic_with_unknown_alias_is_protocol_error() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x30, 0x06, 0, 0, 3, 0x23, 0, 5], reason::PROTOCOL_ERROR).await
}

#[tokio::test]
async fn b22_packet_over_maximum_size_gets_0x95() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_packet_size = 1024).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "big", true).await?;
    raw.send(&Packet::Publish(publish("t", &[0u8; 2048], raftmq_cluster::message::QoS::AtMostOnce, false, 0))).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PACKET_TOO_LARGE));
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b25_server_only_packets_and_reserved_types_from_client() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0x20, 0x03, 0, 0, 0], reason::PROTOCOL_ERROR).await?;
    expect_v5_disconnect(&[0xd0, 0x00], reason::PROTOCOL_ERROR).await?;
    expect_v5_disconnect(&[0x90, 0x04, 0, 1, 0, 0], reason::PROTOCOL_ERROR).await?;
    expect_v5_disconnect(&[0x00, 0x00], reason::MALFORMED_PACKET).await
}

#[tokio::test]
async fn b25_v311_reserved_type_closes() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V311, "r15", true).await?;
    raw.send_bytes(&[0xf0, 0x00]).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b6_connect_reserved_flag_closes_without_connack() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send_bytes(&[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 1, b'c']).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn auth_packet_without_method_is_protocol_error() -> anyhow::Result<()> {
    expect_v5_disconnect(&[0xf0, 0x00], reason::PROTOCOL_ERROR).await
}

#[tokio::test]
async fn response_topic_with_wildcard_is_protocol_error_mqtt_3_3_2_14() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "rt", true).await?;
    let mut p = publish("t", b"x", raftmq_cluster::message::QoS::AtMostOnce, false, 0);
    p.properties = Properties { response_topic: Some("reply/#".into()), ..Properties::default() };
    raw.send(&Packet::Publish(p)).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    Ok(())
}

#[tokio::test]
async fn garbage_storm_from_many_connections_leaves_broker_serving() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let addr = b.addr;
        tasks.push(tokio::spawn(async move {
            let mut raw = Raw::open(addr, Protocol::V311).await?;
            let garbage: Vec<u8> = (0..64u8).map(|j| j.wrapping_mul(31).wrapping_add(i)).collect();
            let _ = raw.send_bytes(&garbage).await;
            raw.expect_closed(DEADLINE).await.map(|_| ())
        }));
    }
    for t in tasks {
        t.await??;
    }
    assert_serving(b.addr).await?;
    // Every connection task ends: none is left stuck.
    let deadline = std::time::Instant::now() + DEADLINE;
    while b.server.broker.stats.connections.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(std::time::Instant::now() < deadline, "connections left open");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test]
async fn b11_thousands_of_user_properties_are_bounded_by_packet_size_and_forwarded() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "props-sub", true).await?;
    sub.subscribe(1, "up", raftmq_cluster::message::QoS::AtMostOnce).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "props", true).await?;
    let many: Vec<(String, String)> = (0..5000).map(|i| (format!("k{i}"), "v".to_string())).collect();
    let mut p = publish("up", b"x", raftmq_cluster::message::QoS::AtMostOnce, false, 0);
    p.properties = Properties { user_properties: many.clone(), ..Properties::default() };
    raw.send(&Packet::Publish(p)).await?;
    assert_eq!(sub.recv_publish().await?.properties.user_properties, many);
    // Past the packet size limit the same packet is refused.
    let too_many: Vec<(String, String)> = (0..200_000).map(|i| (format!("k{i}"), "v".to_string())).collect();
    let mut p = publish("up", b"x", raftmq_cluster::message::QoS::AtMostOnce, false, 0);
    p.properties = Properties { user_properties: too_many, ..Properties::default() };
    // The broker may close before the whole packet is written; only its answer matters.
    let _ = raw.send(&Packet::Publish(p)).await;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PACKET_TOO_LARGE));
    assert_serving(b.addr).await
}
