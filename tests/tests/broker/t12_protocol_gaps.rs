//! Conformance gaps of issue 10 (items 9, 13, 16-19): each reproduces the defect through a
//! real socket.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{connack_v3, reason, LastWill, Packet, Properties, Protocol, PubKind, PubResponse, Unsubscribe};
use raftmq_tests::*;

/// A v5 subscriber with one message in flight at `qos`; returns it and the packet id.
async fn one_in_flight(b: &TestBroker, qos: QoS) -> anyhow::Result<(Raw, u16)> {
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "acker", true).await?;
    sub.subscribe(1, "t", qos).await?;
    let (mut publisher, _) = Raw::connect(b.addr, Protocol::V5, "pub", true).await?;
    publisher.publish("t", b"x", qos, false, 1).await?;
    let p = sub.recv_publish().await?;
    Ok((sub, p.packet_id))
}

/// [MQTT-3.14.2-1] (issue 10, item 13): a DISCONNECT reason a client may not send is a
/// malformed packet, and the will is published (not a normal disconnect).
#[tokio::test]
async fn mqtt_3_14_2_1_invalid_disconnect_reason_is_malformed_and_publishes_the_will() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut watcher, _) = Raw::connect(b.addr, Protocol::V5, "watcher", true).await?;
    watcher.subscribe(1, "wills/#", QoS::AtLeastOnce).await?;
    let mut c = connect_packet(Protocol::V5, "dying", true);
    c.will = Some(LastWill {
        topic: "wills/dying".into(),
        payload: "gone".into(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let (mut dying, _) = Raw::connect_with(b.addr, c).await?;
    dying.send_bytes(&[0xe0, 0x01, 0x03]).await?;
    assert_eq!(disconnect_reason(dying.expect_closed(DEADLINE).await?), Some(reason::MALFORMED_PACKET));
    assert_eq!(watcher.recv_publish().await?.topic, "wills/dying");
    // Counted by reason code.
    let text = b.server.broker.render_metrics();
    assert!(text.contains("raftmq_protocol_errors_total{reason=\"0x81\"} 1"), "{text}");
    Ok(())
}

/// [MQTT-3.1.2-25], [MQTT-3.2.2-19] (item 16): a CONNACK over the client's Maximum Packet
/// Size loses its Reason String; one that cannot fit is not sent at all.
#[tokio::test]
async fn mqtt_3_2_2_19_connack_respects_the_client_maximum_packet_size() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    // A refusal with a Reason String ("authentication method not supported").
    let mut c = connect_packet(Protocol::V5, "small", true);
    c.properties.maximum_packet_size = Some(30);
    c.properties.authentication_method = Some("nope".into());
    let (_, ack) = Raw::connect_with(b.addr, c.clone()).await?;
    assert_eq!(ack.code, reason::BAD_AUTHENTICATION_METHOD);
    assert_eq!(ack.properties.reason_string, None, "the Reason String does not fit in 30 bytes");
    c.properties.maximum_packet_size = Some(100);
    let (_, ack) = Raw::connect_with(b.addr, c).await?;
    assert!(ack.properties.reason_string.is_some(), "it fits in 100");
    // Two bytes: no CONNACK fits; the connection is closed without one.
    let mut c = connect_packet(Protocol::V5, "tiny", true);
    c.properties.maximum_packet_size = Some(2);
    let mut raw = Raw::open(b.addr, Protocol::V5).await?;
    raw.send(&Packet::Connect(Box::new(c))).await?;
    assert_eq!(raw.recv_within(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

/// [MQTT-3.1.2-25] (item 16): every packet the broker sends is checked, not only PUBLISH: a
/// SUBACK with a Reason String that does not fit goes out without it.
#[tokio::test]
async fn mqtt_3_1_2_25_suback_drops_its_reason_string_to_fit() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "small-sub", true);
    c.properties.maximum_packet_size = Some(40);
    let (mut raw, _) = Raw::connect_with(b.addr, c).await?;
    let suback = raw.suback_for(1, vec![("a/#/b".into(), Default::default())]).await?;
    assert_eq!(suback.codes, vec![reason::TOPIC_FILTER_INVALID]);
    assert_eq!(suback.properties.reason_string, None);
    Ok(())
}

/// [MQTT-4.7.3-1] (item 17): an empty filter in UNSUBSCRIBE is refused: MQTT 5 answers
/// 0x8F for it, MQTT 3.1.1 closes the connection.
#[tokio::test]
async fn mqtt_4_7_3_1_unsubscribe_with_an_empty_filter_is_refused() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut v5, _) = Raw::connect(b.addr, Protocol::V5, "u5", true).await?;
    v5.subscribe(1, "a", QoS::AtMostOnce).await?;
    v5.send(&Packet::Unsubscribe(Unsubscribe { packet_id: 2, properties: Properties::default(), filters: vec!["".into(), "a".into()] }))
        .await?;
    match v5.recv().await? {
        Packet::UnsubAck(u) => assert_eq!(u.codes, vec![reason::TOPIC_FILTER_INVALID, reason::SUCCESS]),
        other => anyhow::bail!("expected UNSUBACK, got {other:?}"),
    }
    let (mut v3, _) = Raw::connect(b.addr, Protocol::V311, "u3", true).await?;
    v3.send_bytes(&[0xa2, 0x04, 0x00, 0x02, 0x00, 0x00]).await?;
    assert_eq!(v3.expect_closed(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

/// [MQTT-4.3.2-1], [MQTT-4.3.3-1] (item 18): PUBREC for a QoS 1 message and PUBACK for a
/// QoS 2 message are protocol errors.
#[tokio::test]
async fn mqtt_4_3_acknowledgement_of_the_wrong_kind_is_a_protocol_error() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, id) = one_in_flight(&b, QoS::AtLeastOnce).await?;
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, id, 0))).await?;
    assert_eq!(disconnect_reason(sub.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    drop(sub);
    let b = start_broker(|_| {}).await?;
    let (mut sub, id) = one_in_flight(&b, QoS::ExactlyOnce).await?;
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0))).await?;
    assert_eq!(disconnect_reason(sub.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    Ok(())
}

/// §3.4.2.1, §3.7.2.1 (item 18): an acknowledgement with a reason code its packet does not
/// define, or too short to hold a packet id, is malformed.
#[tokio::test]
async fn mqtt_3_4_2_1_unknown_ack_reason_codes_and_short_acks_are_malformed() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, id) = one_in_flight(&b, QoS::AtLeastOnce).await?;
    let [hi, lo] = id.to_be_bytes();
    sub.send_bytes(&[0x40, 0x03, hi, lo, 0x05]).await?;
    assert_eq!(disconnect_reason(sub.expect_closed(DEADLINE).await?), Some(reason::MALFORMED_PACKET));
    let b = start_broker(|_| {}).await?;
    let (mut sub, id) = one_in_flight(&b, QoS::ExactlyOnce).await?;
    let [hi, lo] = id.to_be_bytes();
    sub.send_bytes(&[0x50, 0x02, hi, lo]).await?;
    assert!(matches!(sub.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubRel));
    sub.send_bytes(&[0x70, 0x03, hi, lo, 0x10]).await?;
    assert_eq!(disconnect_reason(sub.expect_closed(DEADLINE).await?), Some(reason::MALFORMED_PACKET));
    let (mut short, _) = Raw::connect(b.addr, Protocol::V5, "short", true).await?;
    short.send_bytes(&[0x70, 0x01, 0x01]).await?;
    assert_eq!(disconnect_reason(short.expect_closed(DEADLINE).await?), Some(reason::MALFORMED_PACKET));
    Ok(())
}

/// MQTT 3.1 (item 19): its CONNACK has no Session Present flag, and an empty client id is
/// refused with 0x02.
#[tokio::test]
async fn mqtt_3_1_connack_has_no_session_present_and_needs_a_client_id() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut first, ack) = Raw::connect(b.addr, Protocol::V31, "old-device", false).await?;
    assert_eq!(ack.code, 0);
    first.subscribe(1, "x", QoS::AtLeastOnce).await?;
    first.send(&Packet::Disconnect(raftmq_node::codec::Disconnect::new(0))).await?;
    assert_eq!(first.expect_closed(DEADLINE).await?, None);
    // Decoded as 3.1.1 to see the raw flags byte: 3.1 must send 0 there.
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    let mut bytes = bytes::BytesMut::new();
    raftmq_node::codec::encode(&Packet::Connect(Box::new(connect_packet(Protocol::V31, "old-device", false))), Protocol::V31, &mut bytes);
    raw.send_bytes(&bytes).await?;
    match raw.recv().await? {
        Packet::ConnAck(ack) => assert!(!ack.session_present && ack.code == 0, "{ack:?}"),
        other => anyhow::bail!("expected CONNACK, got {other:?}"),
    }
    let (_, ack) = Raw::connect(b.addr, Protocol::V31, "", true).await?;
    assert_eq!(ack.code, connack_v3::IDENTIFIER_REJECTED);
    Ok(())
}

/// [MQTT-4.7.3-1] (item 19): an empty will topic on MQTT 3.1.1 is a protocol violation: the
/// connection is closed, no CONNACK 0x05.
#[tokio::test]
async fn mqtt_4_7_3_1_empty_will_topic_on_3_1_1_closes_the_connection() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V311, "will-less", true);
    c.will = Some(LastWill {
        topic: String::new(),
        payload: "x".into(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send(&Packet::Connect(Box::new(c))).await?;
    assert_eq!(raw.recv_within(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

/// B3 with keep alive 0 (item 9): a packet that starts and never finishes is closed after
/// `mqtt.packet_timeout_secs`, even though keep alive 0 turns the keep-alive check off.
#[tokio::test]
async fn b3_partial_packet_is_closed_after_the_packet_timeout_even_with_keep_alive_0() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.packet_timeout_secs = 1).await?;
    let mut c = connect_packet(Protocol::V5, "half", true);
    c.keep_alive = 0;
    let (mut raw, _) = Raw::connect_with(b.addr, c).await?;
    // The start of a 512 KiB PUBLISH, then nothing.
    raw.send_bytes(&[0x30, 0x80, 0x80, 0x20, 0x00, 0x01, b't']).await?;
    raw.send_bytes(&[0u8; 4096]).await?;
    let started = std::time::Instant::now();
    let last = raw.expect_closed(Duration::from_secs(5)).await?;
    assert_eq!(disconnect_reason(last), Some(reason::KEEP_ALIVE_TIMEOUT));
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout");
    // A client that finishes its packets is not affected.
    let mut c = connect_packet(Protocol::V5, "whole", true);
    c.keep_alive = 0;
    let (mut whole, _) = Raw::connect_with(b.addr, c).await?;
    for _ in 0..3 {
        whole.ping().await?;
        whole.expect_silence(Duration::from_millis(700)).await?;
    }
    whole.ping().await
}
