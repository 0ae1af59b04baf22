//! The `raftmq` binary as a user runs it: flags, a bad configuration, SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raftmq");

/// The binary with no inherited `RAFTMQ_*` variables, so the caller's environment cannot
/// change what is tested.
fn raftmq() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RAFTMQ_") {
            cmd.env_remove(key);
        }
    }
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
