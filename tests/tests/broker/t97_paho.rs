//! A real WebSocket MQTT client: Eclipse Paho for Python (`paho-mqtt` from PyPI) over ws and
//! wss. `.ci/run` installs it and sets `REQUIRE_PAHO=1`, so in CI its absence is a failure.

use std::process::Stdio;

use raftmq_node::config::{ListenerConfig, ListenerKind};
use raftmq_tests::*;
use tokio::process::Command;

const SCRIPT: &str = r#"
import sys, ssl, paho.mqtt.client as mqtt
port, tls, ca = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
got = []
def on_connect(c, u, flags, rc, props=None):
    c.subscribe("paho/#", qos=1)
def on_subscribe(c, u, mid, granted, props=None):
    c.publish("paho/t", b"via websocket", qos=1)
def on_message(c, u, msg):
    got.append(msg.payload.decode()); c.disconnect()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-ws", transport="websockets", protocol=mqtt.MQTTv311)
c.ws_set_options(path="/mqtt")
if tls:
    c.tls_set(ca_certs=ca)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect("localhost", port, keepalive=10)
c.loop_start()
import time
deadline = time.time() + 5
while not got and time.time() < deadline:
    time.sleep(0.05)
c.loop_stop()
print(got[0] if got else "NOTHING")
"#;

fn available() -> anyhow::Result<bool> {
    let found = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found && std::env::var_os("REQUIRE_PAHO").is_some() {
        anyhow::bail!("paho-mqtt not importable but REQUIRE_PAHO is set");
    }
    if !found {
        eprintln!("skipping paho interop: python3 with paho-mqtt not installed");
    }
    Ok(found)
}

#[tokio::test]
async fn paho_python_client_over_ws_and_wss() -> anyhow::Result<()> {
    if !available()? {
        return Ok(());
    }
    let pki = raftmq_tests::pki::TestPki::generate("c")?;
    let local = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let b = start_broker(|c| {
        c.listeners = vec![
            ListenerConfig { kind: ListenerKind::Ws, bind: local, ..ListenerConfig::default() },
            ListenerConfig {
                kind: ListenerKind::Wss,
                bind: local,
                certfile: Some(pki.server_cert.clone()),
                keyfile: Some(pki.server_key.clone()),
                ..ListenerConfig::default()
            },
        ];
    })
    .await?;
    for (kind, tls) in [(ListenerKind::Ws, "0"), (ListenerKind::Wss, "1")] {
        let port = b.server.listener_addr(kind).map(|a| a.port()).unwrap_or(0).to_string();
        let out = tokio::time::timeout(
            DEADLINE + DEADLINE,
            Command::new("python3").args(["-c", SCRIPT, &port, tls, &pki.ca.display().to_string()]).output(),
        )
        .await??;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via websocket", "{kind:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
