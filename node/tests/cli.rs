//! The `raftmq` binary as a user runs it: flags, a bad configuration, SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raftmq");

/// The binary with no inherited `RAFTMQ_*` variables, so the caller's environment cannot
/// change what is tested, and a data directory of its own (in `CARGO_TARGET_TMPDIR`, so
/// nodes started at once do not contend for one store).
fn raftmq() -> Command {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RAFTMQ_") {
            cmd.env_remove(key);
        }
    }
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-data-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    cmd.env("RAFTMQ_DATA_DIR", dir);
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn bad_config_file_stops_the_start_with_a_clear_message() {
    let dir = tempfile_dir("badcfg");
    let file = dir.join("raftmq.toml");
    std::fs::write(&file, "[mqtt]\nmax_inflight = \"lots\"\n").unwrap();
    let out = raftmq().arg("--config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_inflight"), "stderr: {stderr}");

    let out = raftmq().env("RAFTMQ_MQTT__MAX_PACKET_SIZE", "1").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_packet_size"));
}

#[test]
fn starts_serves_mqtt_and_stops_on_sigterm() {
    let port = free_port();
    let dir = tempfile_dir("run");
    let mut child = raftmq()
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}"), "--node-name", "cli-test"])
        .arg("--data-dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .env("RAFTMQ_LISTENERS", "[]")
        .env("RAFTMQ_ADMIN__ENABLED", "false")
        // What Kubernetes injects for a Service named `raftmq` (issue 10, item 15): no key,
        // so ignored.
        .env("RAFTMQ_PORT", "tcp://10.0.0.1:1883")
        .env("RAFTMQ_PORT_1883_TCP_ADDR", "10.0.0.1")
        .env("RAFTMQ_SERVICE_HOST", "10.0.0.1")
        .env("RAFTMQ_BIN", "/usr/local/bin/raftmq")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("broker never listened: {e}"),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // MQTT 3.1.1 CONNECT, clean session, keep alive 60, client id "c".
    stream.write_all(&[0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c']).unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "broker did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
    // The connection was closed by the shutdown.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

fn tempfile_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("raftmq-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn passwd_adds_updates_and_deletes_users_in_a_0600_file() {
    let dir = tempfile_dir("passwd");
    let file = dir.join("passwd");
    let _ = std::fs::remove_file(&file);
    let run = |args: &[&str], stdin: Option<&str>| {
        let mut cmd = raftmq();
        cmd.arg("passwd").arg(&file).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        } else {
            drop(child.stdin.take());
        }
        child.wait_with_output().unwrap()
    };
    assert!(run(&["alice", "--password", "one"], None).status.success());
    assert!(run(&["bob"], Some("from-stdin\n")).status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.lines().any(|l| l.starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("bob:$argon2id$")));
    assert!(!text.contains("one") && !text.contains("from-stdin"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let before = text.clone();
    assert!(run(&["alice", "--password", "two"], None).status.success());
    assert_ne!(std::fs::read_to_string(&file).unwrap(), before, "password updated");
    assert!(run(&["alice", "--delete"], None).status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("alice:") && text.contains("bob:"));
    assert!(!run(&["alice", "--delete"], None).status.success(), "deleting a missing user fails");
    assert!(!run(&["", "--password", "x"], None).status.success());
}

/// A running `raftmq` with the admin API on a free port and an API key.
struct Node {
    child: std::process::Child,
    mqtt: u16,
    admin: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(stderr: Stdio) -> Node {
    start_node_logging(stderr, "info")
}

fn start_node_logging(stderr: Stdio, log: &str) -> Node {
    let (mqtt, admin) = (free_port(), free_port());
    let child = raftmq()
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("RAFTMQ_LISTENERS", "[]")
        .env("RAFTMQ_ADMIN__API_KEY", "k3y")
        .env("RAFTMQ_SYS__INTERVAL_SECS", "0")
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", admin)).is_err() || TcpStream::connect(("127.0.0.1", mqtt)).is_err() {
        assert!(Instant::now() < deadline, "node never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Node { child, mqtt, admin: format!("http://127.0.0.1:{admin}") }
}

fn ctl(node: &Node, args: &[&str]) -> (bool, String, String) {
    let out = raftmq().arg("ctl").args(["--url", &node.admin, "--api-key", "k3y"]).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An MQTT 3.1.1 client that connects with `id` (clean session 0) and subscribes to `filter`.
fn mqtt_client(port: u16, id: &str, filter: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0, 0, 60, 0, id.len() as u8];
    connect.extend_from_slice(id.as_bytes());
    let mut pkt = vec![0x10, connect.len() as u8];
    pkt.extend(connect);
    s.write_all(&pkt).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[3], 0);
    let mut sub = vec![0, 1, 0, filter.len() as u8];
    sub.extend_from_slice(filter.as_bytes());
    sub.push(1);
    let mut pkt = vec![0x82, sub.len() as u8];
    pkt.extend(sub);
    s.write_all(&pkt).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90);
    s
}

#[test]
fn ctl_drives_every_admin_command() {
    let node = start_node(Stdio::null());
    let mut client = mqtt_client(node.mqtt, "dev-9", "cmd/#");

    let (ok, out, _) = ctl(&node, &["status"]);
    assert!(ok);
    assert!(out.lines().any(|l| l.starts_with("connections") && l.ends_with(" 1")), "{out}");
    let (ok, out, _) = ctl(&node, &["clients", "list"]);
    assert!(ok && out.starts_with("CLIENT_ID") && out.contains("dev-9"), "{out}");
    let (ok, out, _) = ctl(&node, &["clients", "show", "dev-9"]);
    assert!(ok && out.contains("proto_ver"), "{out}");
    let (ok, out, _) = ctl(&node, &["subscriptions", "list", "--client-id", "dev-9"]);
    assert!(ok && out.contains("cmd/#"), "{out}");

    let (ok, out, _) = ctl(&node, &["publish", "cmd/reboot", "now", "--qos", "1", "--retain"]);
    assert!(ok && out.contains("1 matching"), "{out}");
    let mut head = [0u8; 2];
    client.read_exact(&mut head).unwrap();
    assert_eq!(head[0] & 0xf0, 0x30, "the subscriber got a PUBLISH");

    let (ok, out, _) = ctl(&node, &["retained", "list"]);
    assert!(ok && out.contains("cmd/reboot") && out.contains("now"), "{out}");
    let (ok, out, _) = ctl(&node, &["--json", "retained", "show", "cmd/reboot"]);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && shown["payload"] == "now", "{out}");
    assert!(ctl(&node, &["retained", "delete", "cmd/reboot"]).0);
    assert!(!ctl(&node, &["retained", "show", "cmd/reboot"]).0);

    assert!(ctl(&node, &["bans", "add", "user:mallory", "--for", "600"]).0);
    let (ok, out, _) = ctl(&node, &["bans", "list"]);
    assert!(ok && out.contains("user:mallory"), "{out}");
    assert!(ctl(&node, &["bans", "delete", "user:mallory"]).0);
    let (_, out, _) = ctl(&node, &["--json", "bans", "list"]);
    assert_eq!(out.trim(), "[]");

    assert!(ctl(&node, &["clients", "kick", "dev-9"]).0);
    let (ok, out, _) = ctl(&node, &["sessions", "list"]);
    assert!(ok && out.contains("dev-9") && out.contains("false"), "persistent session stays, offline: {out}");
    assert!(ctl(&node, &["sessions", "show", "dev-9"]).0);
    assert!(ctl(&node, &["sessions", "discard", "dev-9"]).0);
    let (ok, _, err) = ctl(&node, &["sessions", "show", "dev-9"]);
    assert!(!ok && err.contains("404"), "{err}");

    let (ok, out, _) = ctl(&node, &["log-level", "debug"]);
    assert!(ok && out.contains("debug"), "{out}");

    // Wrong credentials fail with the API's answer.
    let out = raftmq().args(["ctl", "--url", &node.admin, "--api-key", "wrong", "status"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// Issue 10, item 12: a client id with a newline cannot write a line of its own into the
/// log; control characters come out escaped.
#[test]
fn client_strings_cannot_forge_log_lines() {
    let mut node = start_node_logging(Stdio::piped(), "debug");
    let forged = "x\n2026-01-01T00:00:00.000000Z  INFO raftmq_node::connection: connected client_id=admin";
    let client = mqtt_client(node.mqtt, forged, "a/b");
    drop(client);
    let _ = node.child.kill();
    let mut log = String::new();
    node.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("x\\n2026-01-01"), "the id is logged, escaped: {log}");
    assert!(!log.lines().any(|l| l.starts_with("2026-01-01T00:00:00")), "a forged line: {log}");
}

/// Runs a command that should exit by itself; kills it after `secs`.
fn output_within(cmd: &mut Command, secs: u64) -> std::process::Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Issue 10, item 11: empty admin credentials (which accepted `Basic Og==` from anywhere)
/// stop the start.
#[test]
fn empty_admin_credentials_stop_the_start() {
    for (key, value) in [("RAFTMQ_ADMIN__USERNAME", ""), ("RAFTMQ_ADMIN__PASSWORD", ""), ("RAFTMQ_ADMIN__API_KEY", " ")] {
        let out = output_within(
            raftmq()
                .args(["--mqtt-listen", &format!("127.0.0.1:{}", free_port()), "--admin-listen", &format!("127.0.0.1:{}", free_port())])
                .env("RAFTMQ_LISTENERS", "[]")
                .env("RAFTMQ_ADMIN__USERNAME", "admin")
                .env("RAFTMQ_ADMIN__PASSWORD", "secret")
                .env(key, value),
            10,
        );
        assert!(!out.status.success(), "{key}={value:?} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("must not be empty"), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Issue 10, item 10: `raftmq passwd` neither follows a symlink planted at `FILE.tmp` nor
/// inherits a world-readable mode from a file there.
#[cfg(unix)]
#[test]
fn passwd_ignores_a_planted_temporary_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile_dir("passwd-planted");
    let file = dir.join("passwd");
    let victim = dir.join("victim");
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(dir.join("passwd.tmp"));
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("passwd.tmp")).unwrap();
    let out = raftmq().arg("passwd").arg(&file).args(["alice", "--password", "x"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::remove_file(dir.join("passwd.tmp")).unwrap();
    std::fs::write(dir.join("passwd.tmp"), "").unwrap();
    std::fs::set_permissions(dir.join("passwd.tmp"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = raftmq().arg("passwd").arg(&file).args(["bob", "--password", "y"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(std::fs::read_to_string(&file).unwrap().contains("bob:"));
}
