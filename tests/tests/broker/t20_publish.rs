//! QoS 0/1/2 in both directions, inflight window, inbound QoS 2 exactly once.

use std::time::Duration;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Properties, Protocol, PubKind, PubResponse};
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_3_8_4_6_delivered_qos_is_min_of_published_and_granted() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    for protocol in [Protocol::V311, Protocol::V5] {
        let (mut sub, _) = Raw::connect(b.addr, protocol, "sub", true).await?;
        assert_eq!(sub.subscribe(1, "q/+", QoS::AtLeastOnce).await?, vec![1]);
        let (mut publ, _) = Raw::connect(b.addr, protocol, "pub", true).await?;
        for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
            publ.publish("q/x", &[i as u8], qos, false, 10 + i as u16).await?;
            let p = sub.recv_publish().await?;
            assert_eq!(p.qos, qos.min(QoS::AtLeastOnce));
            assert_eq!(&p.payload[..], &[i as u8]);
            assert!(!p.retain);
            if p.qos == QoS::AtLeastOnce {
                sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, p.packet_id, 0))).await?;
            }
        }
        drop(sub);
        drop(publ);
    }
    Ok(())
}

#[tokio::test]
async fn mqtt_4_3_3_outbound_qos2_handshake() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "sub2", true).await?;
    sub.subscribe(1, "q2", QoS::ExactlyOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "pub2", true).await?;
    assert_eq!(publ.publish("q2", b"once", QoS::ExactlyOnce, false, 7).await?, 0);
    let p = sub.recv_publish().await?;
    assert_eq!(p.qos, QoS::ExactlyOnce);
    assert_ne!(p.packet_id, 0);
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRec, p.packet_id, 0))).await?;
    assert_eq!(sub.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubRel, p.packet_id, 0)));
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubComp, p.packet_id, 0))).await?;
    sub.ping().await
}

#[tokio::test]
async fn mqtt_4_3_3_10_inbound_qos2_resent_before_pubrel_is_delivered_once() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "s", true).await?;
    sub.subscribe(1, "x", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "p", true).await?;
    let mut first = publish("x", b"dup?", QoS::ExactlyOnce, false, 5);
    publ.send(&Packet::Publish(first.clone())).await?;
    assert_eq!(publ.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubRec, 5, 0)));
    first.dup = true;
    publ.send(&Packet::Publish(first)).await?;
    assert_eq!(publ.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubRec, 5, 0)));
    publ.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, 5, 0))).await?;
    assert_eq!(publ.recv().await?, Packet::PubResponse(PubResponse::new(PubKind::PubComp, 5, 0)));
    assert_eq!(&sub.recv_publish().await?.payload[..], b"dup?");
    // A marker published afterwards arrives next: the duplicate was never delivered.
    publ.publish("x", b"marker", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"marker");
    Ok(())
}

#[tokio::test]
async fn b24_pubrel_for_unknown_id_gets_pubcomp_0x92() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "rel", true).await?;
    raw.send(&Packet::PubResponse(PubResponse::new(PubKind::PubRel, 99, 0))).await?;
    match raw.recv().await? {
        Packet::PubResponse(r) => {
            assert_eq!((r.kind, r.packet_id, r.reason), (PubKind::PubComp, 99, reason::PACKET_IDENTIFIER_NOT_FOUND));
            assert!(r.properties.reason_string.is_some(), "problem information is on by default");
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // PUBACK for an unknown id is ignored.
    raw.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, 42, 0))).await?;
    raw.ping().await
}

#[tokio::test]
async fn v5_puback_reports_no_matching_subscribers() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "lonely", true).await?;
    assert_eq!(raw.publish("nobody/listens", b"x", QoS::AtLeastOnce, false, 1).await?, reason::NO_MATCHING_SUBSCRIBERS);
    Ok(())
}

#[tokio::test]
async fn outbound_inflight_window_respects_receive_maximum() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_inflight = 32).await?;
    let mut c = connect_packet(Protocol::V5, "slow", true);
    c.properties.receive_maximum = Some(2);
    let (mut sub, _) = Raw::connect_with(b.addr, c).await?;
    sub.subscribe(1, "w", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "fast", true).await?;
    for i in 0..5u16 {
        publ.publish("w", &[i as u8], QoS::AtLeastOnce, false, i + 1).await?;
    }
    let a = sub.recv_publish().await?;
    let b2 = sub.recv_publish().await?;
    assert_eq!((a.payload[0], b2.payload[0]), (0, 1));
    sub.expect_silence(Duration::from_millis(300)).await?;
    sub.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, a.packet_id, 0))).await?;
    assert_eq!(sub.recv_publish().await?.payload[0], 2);
    Ok(())
}

#[tokio::test]
async fn b21_more_qos2_in_flight_than_receive_maximum_gets_0x93() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.receive_maximum = 2).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "greedy", true).await?;
    for id in 1..=3u16 {
        raw.send(&Packet::Publish(publish("t", b"x", QoS::ExactlyOnce, false, id))).await?;
    }
    assert!(matches!(raw.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubRec));
    assert!(matches!(raw.recv().await?, Packet::PubResponse(r) if r.kind == PubKind::PubRec));
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::RECEIVE_MAXIMUM_EXCEEDED));
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b23_v311_awaiting_pubrel_is_bounded() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_awaiting_rel = 2).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V311, "hoarder", true).await?;
    for id in 1..=3u16 {
        raw.send(&Packet::Publish(publish("t", b"x", QoS::ExactlyOnce, false, id))).await?;
    }
    raw.recv().await?;
    raw.recv().await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_2_25_never_send_more_than_client_maximum_packet_size() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "small", true);
    c.properties.maximum_packet_size = Some(64);
    let (mut sub, _) = Raw::connect_with(b.addr, c).await?;
    sub.subscribe(1, "big", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "big-pub", true).await?;
    publ.publish("big", &[0u8; 200], QoS::AtMostOnce, false, 0).await?;
    publ.publish("big", b"small", QoS::AtMostOnce, false, 0).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"small");
    Ok(())
}

#[tokio::test]
async fn mqtt_3_3_2_properties_forwarded_unchanged() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "psub", true).await?;
    sub.subscribe(1, "props", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "ppub", true).await?;
    let mut p = publish("props", b"{}", QoS::AtMostOnce, false, 0);
    p.properties = Properties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"id-1")),
        user_properties: vec![("b".into(), "2".into()), ("a".into(), "1".into()), ("b".into(), "3".into())],
        ..Properties::default()
    };
    publ.send(&Packet::Publish(p.clone())).await?;
    let got = sub.recv_publish().await?;
    assert_eq!(got.properties, p.properties);
    Ok(())
}
