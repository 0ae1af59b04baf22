//! The admin HTTP API and `/metrics`: numbers move with scripted traffic, every endpoint
//! works, authentication is enforced, and the exposition passes `promtool check metrics`
//! (Debian's `prometheus` package; `.ci/run` installs it and sets `REQUIRE_PROMTOOL=1`).

use std::net::SocketAddr;

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Protocol};
use raftmq_tests::*;
use serde_json::{json, Value};

const KEY: &str = "test-api-key";

struct Http {
    base: String,
    auth: Option<String>,
}

impl Http {
    fn new(addr: SocketAddr, auth: Option<String>) -> Http {
        Http { base: format!("http://{addr}"), auth }
    }

    /// Sends a request on a blocking thread; returns status and body.
    async fn call(&self, method: &'static str, path: &str, body: Option<Value>) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let auth = self.auth.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            let header = auth.unwrap_or_default();
            let mut response = match (method, body) {
                ("GET", _) => agent.get(&url).header("Authorization", &header).call()?,
                ("DELETE", _) => agent.delete(&url).header("Authorization", &header).call()?,
                ("POST", Some(b)) => agent.post(&url).header("Authorization", &header).send_json(&b)?,
                ("PUT", Some(b)) => agent.put(&url).header("Authorization", &header).send_json(&b)?,
                _ => anyhow::bail!("bad request"),
            };
            let status = response.status().as_u16();
            Ok((status, response.body_mut().read_to_string().unwrap_or_default()))
        })
        .await?
    }

    async fn json(&self, method: &'static str, path: &str, body: Option<Value>, want: u16) -> anyhow::Result<Value> {
        let (status, text) = self.call(method, path, body).await?;
        anyhow::ensure!(status == want, "{method} {path}: {status} {text}");
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? })
    }
}

async fn admin_broker(tweak: impl FnOnce(&mut raftmq_node::config::Config)) -> anyhow::Result<(TestBroker, SocketAddr)> {
    let b = start_broker(|c| {
        c.admin.enabled = true;
        c.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.admin.api_key = Some(KEY.into());
        // `$SYS` retained messages would show up in the counts below.
        c.sys.interval_secs = 0;
        tweak(c);
    })
    .await?;
    let addr = b.server.admin_addr.ok_or_else(|| anyhow::anyhow!("no admin listener"))?;
    Ok((b, addr))
}

/// The value of one sample line `name{labels} value` in a Prometheus exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_move_with_traffic() -> anyhow::Result<()> {
    let (b, admin) = admin_broker(|_| {}).await?;
    let http = Http::new(admin, None);
    let (mut sub, _) = Raw::connect(b.addr, Protocol::V5, "m-sub", true).await?;
    sub.subscribe(1, "m/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(b.addr, Protocol::V311, "m-pub", true).await?;
    publ.publish("m/a", b"x", QoS::AtLeastOnce, false, 1).await?;
    publ.publish("m/b", b"y", QoS::AtMostOnce, false, 0).await?;
    publ.publish("nobody", b"z", QoS::AtMostOnce, false, 0).await?;
    let p = sub.recv_publish().await?;
    sub.send(&Packet::PubResponse(raftmq_node::codec::PubResponse::new(raftmq_node::codec::PubKind::PubAck, p.packet_id, 0))).await?;
    sub.recv_publish().await?;
    let (status, text) = http.call("GET", "/metrics", None).await?;
    assert_eq!(status, 200, "metrics are open by default");
    assert_eq!(sample(&text, "raftmq_connections"), Some(2.0));
    assert_eq!(sample(&text, "raftmq_messages_received_total{qos=\"1\"}"), Some(1.0));
    assert_eq!(sample(&text, "raftmq_messages_received_total{qos=\"0\"}"), Some(2.0));
    assert_eq!(sample(&text, "raftmq_messages_sent_total{qos=\"1\"}"), Some(1.0));
    assert_eq!(sample(&text, "raftmq_messages_dropped_total{reason=\"no_subscribers\"}"), Some(1.0));
    assert_eq!(sample(&text, "raftmq_packets_received_total{type=\"subscribe\"}"), Some(1.0));
    assert_eq!(sample(&text, "raftmq_connects_total{result=\"success\"}"), Some(2.0));
    assert_eq!(sample(&text, "raftmq_delivery_latency_seconds_count"), Some(2.0));
    assert_eq!(sample(&text, "raftmq_subscriptions"), Some(1.0));
    assert!(text.contains("# HELP raftmq_messages_dropped_total"));
    assert!(!text.contains("m-sub") && !text.contains("m/a"), "no client ids or topics in labels");
    promtool_check(&text).await
}

#[tokio::test]
async fn api_requires_credentials_and_accepts_bearer_and_basic() -> anyhow::Result<()> {
    let (_b, admin) = admin_broker(|c| {
        c.admin.username = Some("ops".into());
        c.admin.password = Some("pw".into());
    })
    .await?;
    assert_eq!(Http::new(admin, None).call("GET", "/api/v1/status", None).await?.0, 401);
    assert_eq!(Http::new(admin, Some("Bearer wrong".into())).call("GET", "/api/v1/status", None).await?.0, 401);
    assert_eq!(Http::new(admin, Some(format!("Bearer {KEY}"))).call("GET", "/api/v1/status", None).await?.0, 200);
    use base64::Engine;
    let basic = |u: &str, p: &str| Some(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
    assert_eq!(Http::new(admin, basic("ops", "pw")).call("GET", "/api/v1/status", None).await?.0, 200);
    assert_eq!(Http::new(admin, basic("ops", "nope")).call("GET", "/api/v1/status", None).await?.0, 401);
    // Health is open by default.
    assert_eq!(Http::new(admin, None).call("GET", "/healthz", None).await?, (200, "ok".into()));
    assert_eq!(Http::new(admin, None).call("GET", "/readyz", None).await?.0, 200);
    // Closing them is a setting.
    let (_b2, closed) = admin_broker(|c| {
        c.admin.open_health = false;
        c.admin.open_metrics = false;
    })
    .await?;
    assert_eq!(Http::new(closed, None).call("GET", "/healthz", None).await?.0, 401);
    assert_eq!(Http::new(closed, None).call("GET", "/metrics", None).await?.0, 401);
    assert_eq!(Http::new(closed, Some(format!("Bearer {KEY}"))).call("GET", "/metrics", None).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn without_credentials_the_api_answers_loopback() -> anyhow::Result<()> {
    let (_b, admin) = admin_broker(|c| c.admin.api_key = None).await?;
    assert_eq!(Http::new(admin, None).call("GET", "/api/v1/status", None).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn every_endpoint_against_a_running_broker() -> anyhow::Result<()> {
    let (b, admin) = admin_broker(|_| {}).await?;
    let api = Http::new(admin, Some(format!("Bearer {KEY}")));
    let mut c = connect_packet(Protocol::V5, "dev-1", false);
    c.username = Some("alice".into());
    c.properties.session_expiry_interval = Some(600);
    let (mut dev, _) = Raw::connect_with(b.addr, c).await?;
    dev.subscribe(1, "cmd/dev-1/#", QoS::AtLeastOnce).await?;
    let (mut other, _) = Raw::connect(b.addr, Protocol::V311, "other", true).await?;
    other.publish("state/x", b"retained", QoS::AtLeastOnce, true, 1).await?;

    let status = api.json("GET", "/api/v1/status", None, 200).await?;
    assert_eq!(status["connections"], 2);
    assert_eq!(status["retained"], 1);

    let clients = api.json("GET", "/api/v1/clients?username=alice", None, 200).await?;
    assert_eq!(clients["total"], 1);
    assert_eq!(clients["data"][0]["client_id"], "dev-1");
    assert_eq!(clients["data"][0]["proto_ver"], 5);
    let page = api.json("GET", "/api/v1/clients?limit=1&page=2", None, 200).await?;
    assert_eq!((page["total"].as_u64(), page["data"].as_array().map(Vec::len)), (Some(2), Some(1)));
    let one = api.json("GET", "/api/v1/clients/dev-1", None, 200).await?;
    assert_eq!(one["subscriptions"], 1);
    api.json("GET", "/api/v1/clients/nobody", None, 404).await?;

    let subs = api.json("GET", "/api/v1/subscriptions?client_id=dev-1", None, 200).await?;
    assert_eq!(subs["data"][0]["topic"], "cmd/dev-1/#");
    let by_topic = api.json("GET", "/api/v1/subscriptions?topic=cmd/dev-1/reboot", None, 200).await?;
    assert_eq!(by_topic["total"], 1);

    let retained = api.json("GET", "/api/v1/retained", None, 200).await?;
    assert_eq!(retained["data"][0]["topic"], "state/x");
    assert_eq!(api.json("GET", "/api/v1/retained/state/x", None, 200).await?["payload"], "retained");
    api.json("DELETE", "/api/v1/retained/state/x", None, 204).await?;
    api.json("GET", "/api/v1/retained/state/x", None, 404).await?;

    // Publish reaches the subscriber.
    let published =
        api.json("POST", "/api/v1/publish", Some(json!({ "topic": "cmd/dev-1/reboot", "payload": "now", "qos": 1 })), 200).await?;
    assert_eq!(published["matched"], 1);
    let p = dev.recv_publish().await?;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("cmd/dev-1/reboot", &b"now"[..]));
    api.json("POST", "/api/v1/publish", Some(json!({ "topic": "a/+", "payload": "x" })), 400).await?;

    // Kick: MQTT 5 clients hear 0x98; the persistent session stays.
    api.json("DELETE", "/api/v1/clients/dev-1", None, 204).await?;
    assert_eq!(disconnect_reason(dev.expect_closed(DEADLINE).await?), Some(reason::ADMINISTRATIVE_ACTION));
    let session = api.json("GET", "/api/v1/sessions/dev-1", None, 200).await?;
    assert_eq!((session["connected"].as_bool(), session["persistent"].as_bool()), (Some(false), Some(true)));
    let sessions = api.json("GET", "/api/v1/sessions", None, 200).await?;
    assert_eq!(sessions["total"], 2);
    api.json("DELETE", "/api/v1/sessions/dev-1", None, 204).await?;
    api.json("GET", "/api/v1/sessions/dev-1", None, 404).await?;

    // Bans.
    api.json("POST", "/api/v1/bans", Some(json!({ "who": "client:other" })), 201).await?;
    assert_eq!(disconnect_reason(other.expect_closed(DEADLINE).await?), None);
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "other", true).await?;
    assert_eq!(ack.code, reason::BANNED);
    let bans = api.json("GET", "/api/v1/bans", None, 200).await?;
    assert_eq!(bans[0]["who"], "client:other");
    api.json("POST", "/api/v1/bans", Some(json!({ "who": "nonsense" })), 400).await?;
    api.json("DELETE", "/api/v1/bans/client:other", None, 204).await?;
    let (_, ack) = Raw::connect(b.addr, Protocol::V5, "other", true).await?;
    assert_eq!(ack.code, 0);

    // Log level needs the binary's control; the OpenAPI description is served.
    api.json("PUT", "/api/v1/log_level", Some(json!({ "filter": "debug" })), 501).await?;
    let spec = api.json("GET", "/api/v1/openapi.json", None, 200).await?;
    assert!(spec["paths"]["/api/v1/clients"].is_object());
    Ok(())
}
