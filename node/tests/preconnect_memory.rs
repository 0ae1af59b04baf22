//! Issue 10, item 8, measured on the real binary: before CONNECT a WebSocket client could
//! send a message of the full packet size (1 MiB), all of it buffered before
//! authentication (300 connections: +325 MB). The transport now reads no more than
//! `max_connect_packet_size` (plus the upgrade request) before CONNECT. The broker runs as
//! its own process so its memory is measured alone (`/proc/PID/status`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d08_websocket_messages_before_connect_are_capped() {
    let (mqtt, ws) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftmq"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RAFTMQ_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
        .env("RAFTMQ_LISTENERS", format!("[{{ kind = \"ws\", bind = \"127.0.0.1:{ws}\" }}]"))
        .env("RAFTMQ_ADMIN__ENABLED", "false")
        .env("RAFTMQ_SYS__INTERVAL_SECS", "0")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let broker = Broker(child);
    let pid = broker.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", ws)).is_err() {
        assert!(Instant::now() < deadline, "broker never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = rss_bytes(pid);
    // From each of 150 clients: a 1 MiB binary frame (masked with a zero key), all but its
    // last byte, so a broker that buffers it holds it for as long as the client likes.
    let len: u64 = 1 << 20;
    let mut frame = vec![0x82, 0xff];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&[0x10, 0xfc, 0xff, 0x3f]);
    frame.resize(frame.len() + (len as usize) - 5, 0);
    let frame = bytes::Bytes::from(frame);
    let mut clients = Vec::new();
    for _ in 0..150 {
        let request = format!("ws://127.0.0.1:{ws}/mqtt").into_client_request().unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ws)).await.unwrap();
        let (socket, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
        let frame = frame.clone();
        clients.push(tokio::spawn(async move {
            let mut tcp = socket.into_inner();
            // Blocks once the broker stops reading.
            let _ = tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&frame)).await;
            tcp
        }));
    }
    // The broker has read what it will once its memory stops growing: two samples 300 ms
    // apart within 1 MB of each other (deadline 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = rss_bytes(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rss_bytes(pid);
        if now.abs_diff(last) < 1 << 20 || Instant::now() > deadline {
            last = now;
            break;
        }
        last = now;
    }
    let growth = last.saturating_sub(before);
    println!("150 WebSocket clients sending 1 MiB before CONNECT: broker RSS +{} MB", growth >> 20);
    // About 85 KiB a connection may be read and buffered (before the fix: over 1 MiB).
    assert!(growth < 60 << 20, "broker RSS grew by {} MB", growth >> 20);
    for c in clients {
        c.abort();
    }
}
