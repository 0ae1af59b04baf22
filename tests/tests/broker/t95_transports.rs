//! TLS, mutual TLS, WebSocket and secure WebSocket listeners (certificates generated at test
//! time), and bad WebSocket input (B33).

use std::net::SocketAddr;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::Protocol;
use raftmq_node::config::{ListenerConfig, ListenerKind, PeerCertUsername};
use raftmq_tests::pki::{websocket, TestPki};
use raftmq_tests::*;
use tokio::net::TcpStream;

fn listener(kind: ListenerKind, pki: Option<&TestPki>) -> ListenerConfig {
    ListenerConfig {
        kind,
        bind: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        certfile: pki.map(|p| p.server_cert.clone()),
        keyfile: pki.map(|p| p.server_key.clone()),
        ..ListenerConfig::default()
    }
}

#[tokio::test]
async fn tls_listener_serves_mqtt_and_routes_to_plain_tcp() -> anyhow::Result<()> {
    let pki = TestPki::generate("device-1")?;
    let b = start_broker(|c| c.listeners = vec![listener(ListenerKind::Tls, Some(&pki))]).await?;
    let tls_addr = b.server.listener_addr(ListenerKind::Tls).ok_or_else(|| anyhow::anyhow!("no tls listener"))?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "plain-sub", true).await?;
    sub.subscribe(1, "secure/#", QoS::AtLeastOnce).await?;
    let stream = pki.tls(tls_addr, false).await?;
    let (mut tls, ack) = Raw::over(stream, Protocol::V5).handshake(connect_packet(Protocol::V5, "tls-pub", true)).await?;
    assert_eq!(ack.code, 0);
    tls.publish("secure/t", b"encrypted", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&sub.recv_publish().await?.payload[..], b"encrypted");
    // A plaintext client on the TLS port never gets an MQTT answer.
    let mut wrong = Raw::open(tls_addr, Protocol::V311).await?;
    wrong.send(&raftmq_node::codec::Packet::Connect(Box::new(connect_packet(Protocol::V311, "confused", true)))).await?;
    assert!(wrong.recv_within(DEADLINE).await.map(|p| !matches!(p, Some(raftmq_node::codec::Packet::ConnAck(_)))).unwrap_or(true));
    Ok(())
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_and_maps_cn_to_user_name() -> anyhow::Result<()> {
    let pki = TestPki::generate("sensor-7")?;
    let acl = tempfile::NamedTempFile::new()?;
    std::fs::write(acl.path(), "allow user:sensor-7 publish sensors/%u/#\nallow all subscribe #\n")?;
    let acl_path = acl.path().to_owned();
    let b = start_broker(|c| {
        let mut l = listener(ListenerKind::Tls, Some(&pki));
        l.cacertfile = Some(pki.ca.clone());
        l.verify_peer = true;
        l.peer_cert_as_username = PeerCertUsername::Cn;
        c.listeners = vec![l];
        c.acl.file = Some(acl_path);
    })
    .await?;
    let addr = b.server.listener_addr(ListenerKind::Tls).ok_or_else(|| anyhow::anyhow!("no tls listener"))?;
    // Without a certificate the handshake fails.
    let refused = match pki.tls(addr, false).await {
        Err(_) => true,
        Ok(stream) => Raw::over(stream, Protocol::V311).handshake(connect_packet(Protocol::V311, "anon", true)).await.is_err(),
    };
    assert!(refused, "a client without certificate got in");
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V311, "watch", true).await?;
    sub.subscribe(1, "sensors/#", QoS::AtMostOnce).await?;
    let stream = pki.tls(addr, true).await?;
    let (mut dev, ack) = Raw::over(stream, Protocol::V5).handshake(connect_packet(Protocol::V5, "dev", true)).await?;
    assert_eq!(ack.code, 0);
    // The ACL sees the certificate's CN as the user name.
    assert_eq!(dev.publish("sensors/sensor-7/t", b"ok", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(dev.publish("sensors/other/t", b"no", QoS::AtLeastOnce, false, 2).await?, raftmq_node::codec::reason::NOT_AUTHORIZED);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"ok");
    Ok(())
}

#[tokio::test]
async fn websocket_listener_negotiates_mqtt_and_serves_clients() -> anyhow::Result<()> {
    let b = start_broker(|c| c.listeners = vec![listener(ListenerKind::Ws, None)]).await?;
    let addr = b.server.listener_addr(ListenerKind::Ws).ok_or_else(|| anyhow::anyhow!("no ws listener"))?;
    let (ws, proto) = websocket(TcpStream::connect(addr).await?, &format!("ws://{addr}/mqtt"), None).await?;
    assert_eq!(proto.as_deref(), Some("mqtt"));
    let (mut client, ack) = Raw::over(ws, Protocol::V311).handshake(connect_packet(Protocol::V311, "ws-1", true)).await?;
    assert_eq!(ack.code, 0);
    client.subscribe(1, "ws/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V5, "tcp-pub", true).await?;
    publ.publish("ws/x", b"over websocket", QoS::AtLeastOnce, false, 1).await?;
    assert_eq!(&client.recv_publish().await?.payload[..], b"over websocket");
    Ok(())
}

#[tokio::test]
async fn secure_websocket_listener() -> anyhow::Result<()> {
    let pki = TestPki::generate("c")?;
    let b = start_broker(|c| c.listeners = vec![listener(ListenerKind::Wss, Some(&pki))]).await?;
    let addr = b.server.listener_addr(ListenerKind::Wss).ok_or_else(|| anyhow::anyhow!("no wss listener"))?;
    let tls = pki.tls(addr, false).await?;
    let (ws, _) = websocket(tls, &format!("wss://localhost:{}/mqtt", addr.port()), None).await?;
    let (mut client, ack) = Raw::over(ws, Protocol::V5).handshake(connect_packet(Protocol::V5, "wss-1", true)).await?;
    assert_eq!(ack.code, 0);
    client.ping().await
}

#[tokio::test]
async fn b33_wrong_path_bad_origin_and_text_frames_are_refused() -> anyhow::Result<()> {
    let b = start_broker(|c| {
        let mut l = listener(ListenerKind::Ws, None);
        l.allowed_origins = vec!["https://app.example".into()];
        c.listeners = vec![l];
    })
    .await?;
    let addr = b.server.listener_addr(ListenerKind::Ws).ok_or_else(|| anyhow::anyhow!("no ws listener"))?;
    let url = format!("ws://{addr}/mqtt");
    assert!(websocket(TcpStream::connect(addr).await?, &format!("ws://{addr}/other"), Some("https://app.example")).await.is_err());
    assert!(websocket(TcpStream::connect(addr).await?, &url, Some("https://evil.example")).await.is_err());
    assert!(websocket(TcpStream::connect(addr).await?, &url, None).await.is_err());
    // A text frame is not MQTT: the connection ends.
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str())?;
    request.headers_mut().insert("origin", "https://app.example".parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(request, TcpStream::connect(addr).await?).await?;
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::Text("CONNECT".into())).await?;
    let next = tokio::time::timeout(DEADLINE, ws.next()).await?;
    assert!(!matches!(next, Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_)))), "{next:?}");
    // The allowed origin works.
    let (ws, _) = websocket(TcpStream::connect(addr).await?, &url, Some("https://app.example")).await?;
    let (mut ok, ack) = Raw::over(ws, Protocol::V311).handshake(connect_packet(Protocol::V311, "origin-ok", true)).await?;
    assert_eq!(ack.code, 0);
    ok.ping().await?;
    assert_serving(b.addr).await
}

#[tokio::test]
async fn b35_unusable_certificate_stops_the_start() -> anyhow::Result<()> {
    let pki = TestPki::generate("c")?;
    let broken = tempfile::NamedTempFile::new()?;
    std::fs::write(broken.path(), "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")?;
    let mut bad_cert = listener(ListenerKind::Tls, Some(&pki));
    bad_cert.certfile = Some(broken.path().to_owned());
    assert!(start_broker(|c| c.listeners = vec![bad_cert]).await.is_err());
    let mut wrong_key = listener(ListenerKind::Tls, Some(&pki));
    wrong_key.keyfile = Some(pki.client_key.clone());
    assert!(start_broker(|c| c.listeners = vec![wrong_key]).await.is_err());
    let mut missing_ca = listener(ListenerKind::Tls, Some(&pki));
    missing_ca.verify_peer = true;
    assert!(start_broker(|c| c.listeners = vec![missing_ca]).await.is_err());
    Ok(())
}

/// Issue 10, item 8: the pre-CONNECT cap of the WebSocket transport pauses reading rather
/// than failing, so a client that sends a large PUBLISH right behind its CONNECT (allowed
/// before CONNACK) loses nothing.
#[tokio::test]
async fn websocket_client_may_send_a_large_publish_right_behind_connect() -> anyhow::Result<()> {
    use raftmq_node::codec::Packet;
    let b = start_broker(|c| c.listeners = vec![listener(ListenerKind::Ws, None)]).await?;
    let addr = b.server.listener_addr(ListenerKind::Ws).ok_or_else(|| anyhow::anyhow!("no ws listener"))?;
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "big-sub", true).await?;
    sub.subscribe(1, "big/#", QoS::AtMostOnce).await?;
    let (ws, _) = websocket(TcpStream::connect(addr).await?, &format!("ws://{addr}/mqtt"), None).await?;
    let mut client = Raw::over(ws, Protocol::V5);
    let payload = vec![7u8; 200 * 1024];
    // Two WebSocket messages, the second sent without waiting for CONNACK. (One message
    // holding both would be a message over the pre-CONNECT cap, which is refused.)
    client.send(&Packet::Connect(Box::new(connect_packet(Protocol::V5, "pipelined", true)))).await?;
    client.send(&Packet::Publish(publish("big/x", &payload, QoS::AtMostOnce, false, 0))).await?;
    assert!(matches!(client.recv().await?, Packet::ConnAck(a) if a.code == 0));
    assert_eq!(sub.recv_publish().await?.payload.len(), payload.len());
    Ok(())
}
