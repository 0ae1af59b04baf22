//! MQTT 5 features: topic aliases, message expiry, request/response and problem
//! information, enhanced authentication.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Auth, Packet, Properties, Protocol};
use raftmq_node::config::Config;
use raftmq_node::security::enhanced::{AuthMethods, AuthStep, EnhancedAuth};
use raftmq_node::server::Server;
use raftmq_tests::*;

#[tokio::test]
async fn mqtt_3_3_2_topic_alias_inbound_defines_and_reuses() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "alias-sub", true).await?;
    sub.subscribe(1, "long/topic/name", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "alias-pub", true).await?;
    let mut p = publish("long/topic/name", b"1", QoS::AtMostOnce, false, 0);
    p.properties.topic_alias = Some(3);
    publ.send(&Packet::Publish(p)).await?;
    let mut p = publish("", b"2", QoS::AtMostOnce, false, 0);
    p.properties.topic_alias = Some(3);
    publ.send(&Packet::Publish(p)).await?;
    for want in [b"1", b"2"] {
        let got = sub.recv_publish().await?;
        assert_eq!((got.topic.as_str(), &got.payload[..]), ("long/topic/name", &want[..]));
    }
    Ok(())
}

#[tokio::test]
async fn topic_alias_outbound_within_client_maximum() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "alias-out", true);
    c.properties.topic_alias_maximum = Some(1);
    let (mut sub, _) = Raw::connect_with(b.addr, c).await?;
    sub.subscribe(1, "a/#", QoS::AtMostOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "alias-src", true).await?;
    for t in ["a/one", "a/one", "a/two"] {
        publ.publish(t, b"x", QoS::AtMostOnce, false, 0).await?;
    }
    let first = sub.recv_publish().await?;
    assert_eq!((first.topic.as_str(), first.properties.topic_alias), ("a/one", Some(1)));
    let second = sub.recv_publish().await?;
    assert_eq!((second.topic.as_str(), second.properties.topic_alias), ("", Some(1)));
    // The client allows one alias only: other topics go in full.
    let third = sub.recv_publish().await?;
    assert_eq!((third.topic.as_str(), third.properties.topic_alias), ("a/two", None));
    Ok(())
}

#[tokio::test]
async fn mqtt_3_3_2_5_expired_messages_not_delivered_and_remaining_interval_sent() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "exp-sub", false).await?;
    sub.subscribe(1, "exp/#", QoS::AtLeastOnce).await?;
    drop(sub);
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "exp-pub", true).await?;
    let deadline = std::time::Instant::now() + DEADLINE;
    while b.server.broker.stats.connections.load(std::sync::atomic::Ordering::Relaxed) > 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut short = publish("exp/short", b"gone", QoS::AtLeastOnce, false, 1);
    short.properties.message_expiry_interval = Some(1);
    publ.send(&Packet::Publish(short)).await?;
    publ.recv().await?;
    let mut long = publish("exp/long", b"kept", QoS::AtLeastOnce, true, 2);
    long.properties.message_expiry_interval = Some(100);
    publ.send(&Packet::Publish(long)).await?;
    publ.recv().await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (mut sub, ack) = Raw::connect(b.addr, Protocol::V5, "exp-sub", false).await?;
    assert!(ack.session_present);
    let p = sub.recv_publish().await?;
    assert_eq!(&p.payload[..], b"kept");
    let remaining = p.properties.message_expiry_interval.unwrap_or(0);
    assert!((90..100).contains(&remaining), "remaining interval {remaining}");
    Ok(())
}

#[tokio::test]
async fn retained_messages_expire_too() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "rexp", true).await?;
    let mut p = publish("rexp/t", b"brief", QoS::AtLeastOnce, true, 1);
    p.properties.message_expiry_interval = Some(1);
    publ.send(&Packet::Publish(p)).await?;
    publ.recv().await?;
    publ.publish("rexp/marker", b"m", QoS::AtLeastOnce, true, 2).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "rexp-sub", true).await?;
    sub.subscribe(1, "rexp/#", QoS::AtMostOnce).await?;
    assert_eq!(sub.recv_publish().await?.topic, "rexp/marker");
    sub.expect_silence(Duration::from_millis(100)).await
}

#[tokio::test]
async fn request_problem_information_0_suppresses_reason_strings() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let mut c = connect_packet(Protocol::V5, "quiet", true);
    c.properties.request_problem_information = Some(0);
    let (mut raw, _) = Raw::connect_with(b.addr, c).await?;
    let suback = raw.suback_for(1, vec![("a/#/b".into(), Default::default())]).await?;
    assert_eq!(suback.codes, vec![reason::TOPIC_FILTER_INVALID]);
    assert_eq!(suback.properties.reason_string, None);
    let (mut loud, _) = Raw::connect(b.addr, Protocol::V5, "loud", true).await?;
    assert!(loud.suback_for(1, vec![("a/#/b".into(), Default::default())]).await?.properties.reason_string.is_some());
    Ok(())
}

#[tokio::test]
async fn request_response_information_returns_configured_value() -> anyhow::Result<()> {
    let b = start_broker(|c| c.mqtt.response_information = Some("responses/".into())).await?;
    let mut c = connect_packet(Protocol::V5, "asker", true);
    c.properties.request_response_information = Some(1);
    let (_raw, ack) = Raw::connect_with(b.addr, c).await?;
    assert_eq!(ack.properties.response_information.as_deref(), Some("responses/"));
    let (_raw, ack) = Raw::connect(b.addr, Protocol::V5, "not-asking", true).await?;
    assert_eq!(ack.properties.response_information, None);
    Ok(())
}

/// A challenge-response method for tests: the server sends "nonce", the client must answer
/// "nonce:secret".
struct Challenge;

#[async_trait]
impl EnhancedAuth for Challenge {
    fn method(&self) -> &str {
        "TEST-CHALLENGE"
    }

    async fn step(&self, _client_id: &str, round: u32, data: Option<Bytes>, _state: &mut Vec<u8>) -> AuthStep {
        match round {
            0 => AuthStep::Continue(Bytes::from_static(b"nonce")),
            _ if data.as_deref() == Some(b"nonce:secret") => AuthStep::Success(Some(Bytes::from_static(b"welcome"))),
            _ => AuthStep::Failure(reason::NOT_AUTHORIZED),
        }
    }
}

async fn auth_broker() -> anyhow::Result<TestBroker> {
    let mut config = Config { data_dir: raftmq_tests::fresh_data_dir(), ..Config::default() };
    config.mqtt.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.listeners.clear();
    config.admin.enabled = false;
    let mut methods = AuthMethods::default();
    methods.register(Arc::new(Challenge));
    let server = Server::start_with_auth(config, methods).await?;
    let addr = server.mqtt_addr;
    Ok(TestBroker { server, addr })
}

fn auth_packet(reason_code: u8, data: &'static [u8]) -> Packet {
    let mut a = Auth { reason: reason_code, properties: Properties::default() };
    a.properties.authentication_method = Some("TEST-CHALLENGE".into());
    a.properties.authentication_data = Some(Bytes::from_static(data));
    Packet::Auth(a)
}

#[tokio::test]
async fn mqtt_4_12_enhanced_authentication_exchange_and_reauthentication() -> anyhow::Result<()> {
    let b = auth_broker().await?;
    let mut c = connect_packet(Protocol::V5, "authed", true);
    c.properties.authentication_method = Some("TEST-CHALLENGE".into());
    let mut raw = Raw::open(b.addr, Protocol::V5).await?;
    raw.send(&Packet::Connect(Box::new(c.clone()))).await?;
    match raw.recv().await? {
        Packet::Auth(a) => {
            assert_eq!(a.reason, reason::CONTINUE_AUTHENTICATION);
            assert_eq!(a.properties.authentication_data.as_deref(), Some(&b"nonce"[..]));
        }
        other => panic!("expected AUTH, got {other:?}"),
    }
    raw.send(&auth_packet(reason::CONTINUE_AUTHENTICATION, b"nonce:secret")).await?;
    match raw.recv().await? {
        Packet::ConnAck(ack) => {
            assert_eq!(ack.code, 0);
            assert_eq!(ack.properties.authentication_method.as_deref(), Some("TEST-CHALLENGE"));
            assert_eq!(ack.properties.authentication_data.as_deref(), Some(&b"welcome"[..]));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // Re-authentication.
    raw.send(&auth_packet(reason::RE_AUTHENTICATE, b"")).await?;
    assert!(matches!(raw.recv().await?, Packet::Auth(a) if a.reason == reason::CONTINUE_AUTHENTICATION));
    raw.send(&auth_packet(reason::CONTINUE_AUTHENTICATION, b"nonce:secret")).await?;
    assert!(matches!(raw.recv().await?, Packet::Auth(a) if a.reason == reason::SUCCESS));
    raw.ping().await?;

    // A wrong answer is refused.
    let mut bad = Raw::open(b.addr, Protocol::V5).await?;
    bad.send(&Packet::Connect(Box::new(c))).await?;
    assert!(matches!(bad.recv().await?, Packet::Auth(_)));
    bad.send(&auth_packet(reason::CONTINUE_AUTHENTICATION, b"nonce:guess")).await?;
    match bad.expect_closed(DEADLINE).await? {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, reason::NOT_AUTHORIZED),
        other => panic!("expected CONNACK 0x87, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn b26_unknown_authentication_method_and_reauth_with_another_method() -> anyhow::Result<()> {
    let b = auth_broker().await?;
    let mut c = connect_packet(Protocol::V5, "other", true);
    c.properties.authentication_method = Some("KERBEROS".into());
    let (mut raw, ack) = Raw::connect_with(b.addr, c).await?;
    assert_eq!(ack.code, reason::BAD_AUTHENTICATION_METHOD);
    raw.expect_closed(DEADLINE).await?;
    // A client connected without a method cannot start an exchange.
    let (mut plain, _) = Raw::connect(b.addr, Protocol::V5, "plain", true).await?;
    plain.send(&auth_packet(reason::RE_AUTHENTICATE, b"")).await?;
    assert_eq!(disconnect_reason(plain.expect_closed(DEADLINE).await?), Some(reason::PROTOCOL_ERROR));
    Ok(())
}

#[tokio::test]
async fn mqtt_3_8_3_retain_handling_and_retain_as_published() -> anyhow::Result<()> {
    use raftmq_cluster::session::SubscriptionOptions;
    let b = start_broker(|_| {}).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "rh-pub", true).await?;
    publ.publish("rh/t", b"stored", QoS::AtMostOnce, true, 0).await?;
    // A round trip on the same connection: the QoS 0 PUBLISH has been handled.
    publ.ping().await?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "rh-sub", true).await?;
    let with = |rh: u8, rap: bool| {
        vec![("rh/t".to_string(), SubscriptionOptions { retain_handling: rh, retain_as_published: rap, ..Default::default() })]
    };
    // Retain Handling 2: never send retained messages [MQTT-3.3.1-11].
    sub.subscribe_with(1, with(2, false), Properties::default()).await?;
    sub.expect_silence(Duration::from_millis(100)).await?;
    // Retain Handling 1: only for a subscription that did not exist [MQTT-3.3.1-10]; it does now.
    sub.subscribe_with(2, with(1, false), Properties::default()).await?;
    sub.expect_silence(Duration::from_millis(100)).await?;
    let (mut fresh, _) = Raw::connect(b.addr, Protocol::V5, "rh-fresh", true).await?;
    fresh.subscribe_with(1, with(1, false), Properties::default()).await?;
    assert!(fresh.recv_publish().await?.retain);
    // Retain As Published keeps RETAIN=1 on live messages [MQTT-3.3.1-13]; without it, 0.
    sub.subscribe_with(3, with(2, true), Properties::default()).await?;
    publ.publish("rh/t", b"live", QoS::AtMostOnce, true, 0).await?;
    assert!(sub.recv_publish().await?.retain);
    assert!(!fresh.recv_publish().await?.retain);
    Ok(())
}
