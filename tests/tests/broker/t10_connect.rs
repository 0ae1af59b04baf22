//! Connection lifecycle: CONNECT rules, client ids, keep alive, DISCONNECT, shutdown.

use std::time::Duration;

use raftmq_node::codec::{reason, Connect, Disconnect, Packet, Properties, Protocol};
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_3_1_0_1_first_packet_must_be_connect() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send(&Packet::PingReq).await?;
    assert_eq!(raw.expect_closed(DEADLINE).await?, None);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn mqtt_3_1_0_2_second_connect_is_protocol_error() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "twice", true).await?;
    raw.send(&Packet::Connect(Box::new(connect_packet(Protocol::V5, "twice", true)))).await?;
    let last = raw.expect_closed(DEADLINE).await?;
    assert_eq!(disconnect_reason(last), Some(reason::PROTOCOL_ERROR));
    Ok(())
}

#[tokio::test]
async fn b5_unsupported_level_gets_0x84_on_v5_and_0x01_on_v311() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut raw = Raw::open(b.addr, Protocol::V5).await?;
    // "MQTT" level 6: name, level, flags, keep alive, client id "c".
    raw.send_bytes(&[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 60, 0, 1, b'c']).await?;
    match raw.expect_closed(DEADLINE).await? {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, reason::UNSUPPORTED_PROTOCOL_VERSION),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    // "MQTX" level 4.
    raw.send_bytes(&[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'X', 4, 2, 0, 60, 0, 1, b'c']).await?;
    match raw.expect_closed(DEADLINE).await? {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0x01),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b7_mqtt_3_1_3_8_empty_client_id_with_persistent_session_rejected_and_closed() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send(&Packet::Connect(Box::new(connect_packet(Protocol::V311, "", false)))).await?;
    match raw.expect_closed(DEADLINE).await? {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0x02),
        other => panic!("expected CONNACK 0x02, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_3_6_empty_client_id_gets_generated_id_and_v5_assigned_identifier() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut v3, ack) = Raw::connect(b.addr, Protocol::V311, "", true).await?;
    assert_eq!(ack.code, 0);
    v3.ping().await?;
    let (_v5, ack) = Raw::connect(b.addr, Protocol::V5, "", true).await?;
    assert_eq!(ack.code, 0);
    let id = ack.properties.assigned_client_identifier.expect("assigned client identifier");
    assert!(!id.is_empty());
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_protocol_mqisdp_level_3_is_accepted() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, ack) = Raw::connect(b.addr, Protocol::V31, "old-client", true).await?;
    assert_eq!(ack.code, 0);
    raw.ping().await
}

#[tokio::test]
async fn client_id_longer_than_limit_rejected() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_client_id_len = 23).await?;
    let (mut raw, ack) = Raw::connect(b.addr, Protocol::V5, &"x".repeat(24), true).await?;
    assert_eq!(ack.code, reason::CLIENT_IDENTIFIER_NOT_VALID);
    raw.expect_closed(DEADLINE).await?;
    Ok(())
}

#[tokio::test]
async fn mqtt_3_1_2_24_keep_alive_expiry_closes_after_one_and_a_half_periods() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "sleepy", true);
    c.keep_alive = 1;
    let started = std::time::Instant::now();
    let (mut raw, _) = Raw::connect_with(b.addr, c).await?;
    let last = raw.expect_closed(DEADLINE).await?;
    assert_eq!(last, Some(Packet::Disconnect(Disconnect::new(reason::KEEP_ALIVE_TIMEOUT))));
    assert!(started.elapsed() >= Duration::from_millis(1400), "closed too early: {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn keep_alive_is_kept_by_pings() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V311, "pinger", true);
    c.keep_alive = 1;
    let (mut raw, _) = Raw::connect_with(b.addr, c).await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        raw.ping().await?;
    }
    Ok(())
}

#[tokio::test]
async fn b27_server_keep_alive_overrides_v5_and_refuses_v311_above_maximum() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.max_keepalive = 30).await?;
    let (_v5, ack) = Raw::connect(b.addr, Protocol::V5, "ka5", true).await?;
    assert_eq!(ack.properties.server_keep_alive, Some(30));
    let mut raw = Raw::open(b.addr, Protocol::V311).await?;
    raw.send(&Packet::Connect(Box::new(connect_packet(Protocol::V311, "ka3", true)))).await?;
    match raw.expect_closed(DEADLINE).await? {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, 0x02),
        other => panic!("expected CONNACK 0x02, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn b28_connection_without_connect_closed_after_connect_timeout() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.connect_timeout_secs = 1).await?;
    let mut silent = Raw::open(b.addr, Protocol::V311).await?;
    let mut dribble = Raw::open(b.addr, Protocol::V311).await?;
    dribble.send_bytes(&[0x10, 0x10, 0x00]).await?;
    assert_eq!(silent.expect_closed(Duration::from_secs(3)).await?, None);
    assert_eq!(dribble.expect_closed(Duration::from_secs(3)).await?, None);
    assert_serving(b.addr).await
}

#[tokio::test]
async fn mqtt_4_12_0_1_unknown_authentication_method_gets_0x8c() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "auth", true);
    c.properties.authentication_method = Some("SCRAM-SHA-1".into());
    let (mut raw, ack) = Raw::connect_with(b.addr, c).await?;
    assert_eq!(ack.code, reason::BAD_AUTHENTICATION_METHOD);
    raw.expect_closed(DEADLINE).await?;
    Ok(())
}

#[tokio::test]
async fn connack_v5_advertises_limits() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        c.mqtt.receive_maximum = 10;
        c.mqtt.max_packet_size = 4096;
    })
    .await?;
    let (_raw, ack) = Raw::connect(b.addr, Protocol::V5, "limits", true).await?;
    assert_eq!(ack.properties.receive_maximum, Some(10));
    assert_eq!(ack.properties.maximum_packet_size, Some(4096));
    assert_eq!(ack.properties.shared_subscription_available, Some(1));
    assert_eq!(ack.properties.topic_alias_maximum, Some(16));
    assert_eq!(ack.properties.retain_available, Some(1));
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_sends_v5_disconnect_0x8b() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "bye", true).await?;
    let (mut v3, _) = Raw::connect(b.addr, Protocol::V311, "bye3", true).await?;
    raw.ping().await?;
    b.server.shutdown(DEADLINE).await;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::SERVER_SHUTTING_DOWN));
    assert_eq!(v3.expect_closed(DEADLINE).await?, None);
    assert!(tokio::net::TcpStream::connect(b.addr).await.is_err() || Raw::connect(b.addr, Protocol::V311, "late", true).await.is_err());
    Ok(())
}

#[tokio::test]
async fn mqtt_3_14_2_2_session_expiry_on_disconnect_after_zero_is_protocol_error() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut raw, _) = Raw::connect(b.addr, Protocol::V5, "exp0", true).await?;
    let mut d = Disconnect::new(0);
    d.properties = Properties { session_expiry_interval: Some(10), ..Properties::default() };
    raw.send(&Packet::Disconnect(d)).await?;
    assert_eq!(disconnect_reason(raw.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    Ok(())
}

/// Unused-field guard: a CONNECT built by hand keeps the harness honest about defaults.
#[test]
fn connect_packet_defaults() {
    let c: Connect = connect_packet(Protocol::V5, "x", true);
    assert_eq!(c.keep_alive, 60);
}
