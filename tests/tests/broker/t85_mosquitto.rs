//! Interoperability with the Eclipse Mosquitto command-line clients (Debian's
//! `mosquitto-clients`). `.ci/run` installs them and sets `REQUIRE_MOSQUITTO_CLIENTS=1`, so
//! in CI their absence is a failure, not a skip.

use std::process::Stdio;

use raftmq_tests::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn available() -> anyhow::Result<bool> {
    let found = std::process::Command::new("mosquitto_pub").arg("--help").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if !found && std::env::var_os("REQUIRE_MOSQUITTO_CLIENTS").is_some() {
        anyhow::bail!("mosquitto_pub not found but REQUIRE_MOSQUITTO_CLIENTS is set");
    }
    if !found {
        eprintln!("skipping mosquitto interop: mosquitto-clients not installed");
    }
    Ok(found)
}

async fn mosquitto_pub(port: u16, version: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = tokio::time::timeout(
        DEADLINE,
        Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version]).args(args).status(),
    )
    .await??;
    anyhow::ensure!(status.success(), "mosquitto_pub failed: {status}");
    Ok(())
}

#[tokio::test]
async fn mosquitto_clients_retained_and_live_messages_v311_and_v5() -> anyhow::Result<()> {
    if !available()? {
        return Ok(());
    }
    let b = start_broker(|_| {}).await?;
    let port = b.addr.port();
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("interop/{version}");
        mosquitto_pub(port, version, &["-t", &topic, "-m", "retained-hello", "-r", "-q", "1"]).await?;
        let mut sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version, "-t", "interop/#", "-q", "2", "-C", "2", "-v"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = sub.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(DEADLINE, lines.next_line()).await??;
        assert_eq!(first.as_deref(), Some(format!("{topic} retained-hello").as_str()));
        // The retained message proved the subscription is in place.
        mosquitto_pub(port, version, &["-t", &topic, "-m", "live", "-q", "2"]).await?;
        let second = tokio::time::timeout(DEADLINE, lines.next_line()).await??;
        assert_eq!(second.as_deref(), Some(format!("{topic} live").as_str()));
        let status = tokio::time::timeout(DEADLINE, sub.wait()).await??;
        assert!(status.success());
        // Clear the retained message so the next round starts empty.
        mosquitto_pub(port, version, &["-t", &topic, "-n", "-r"]).await?;
    }
    Ok(())
}

#[tokio::test]
async fn mosquitto_clients_over_tls_with_cafile_and_password() -> anyhow::Result<()> {
    if !available()? {
        return Ok(());
    }
    use raftmq_node::config::{ListenerConfig, ListenerKind};
    let pki = raftmq_tests::pki::TestPki::generate("c")?;
    let files = security_files(&[("alice", "wonderland")], "")?;
    let b = start_broker(|c| {
        c.auth.password_file = Some(files.passwd.clone());
        c.listeners = vec![ListenerConfig {
            kind: ListenerKind::Tls,
            bind: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            certfile: Some(pki.server_cert.clone()),
            keyfile: Some(pki.server_key.clone()),
            ..ListenerConfig::default()
        }];
    })
    .await?;
    let port = b.server.listener_addr(ListenerKind::Tls).map(|a| a.port()).unwrap_or(0).to_string();
    let ca = pki.ca.display().to_string();
    let common = ["-h", "localhost", "-p", port.as_str(), "--cafile", ca.as_str(), "-u", "alice", "-P", "wonderland"];
    let status = tokio::time::timeout(
        DEADLINE,
        Command::new("mosquitto_pub").args(common).args(["-t", "tls/t", "-m", "hello", "-r", "-q", "1"]).status(),
    )
    .await??;
    assert!(status.success(), "mosquitto_pub over TLS failed");
    let out = tokio::time::timeout(DEADLINE, Command::new("mosquitto_sub").args(common).args(["-t", "tls/#", "-C", "1", "-v"]).output())
        .await??;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tls/t hello");
    // A wrong password is refused: mosquitto_pub exits with an error.
    let bad = ["-h", "localhost", "-p", port.as_str(), "--cafile", ca.as_str(), "-u", "alice", "-P", "nope", "-t", "x", "-m", "x"];
    let status = tokio::time::timeout(DEADLINE, Command::new("mosquitto_pub").args(bad).status()).await??;
    assert!(!status.success());
    Ok(())
}
