//! Issue 10, item 3: a flood of bad logins keeps the broker's memory bounded. A test
//! binary of its own, so that no other test's broker shares the process whose memory it
//! measures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::{Duration, Instant};

use raftmq_node::codec::{reason, Protocol};
use raftmq_tests::*;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Item 3: two dozen clients repeating bad logins for three seconds. Checks run on a fixed
/// pool (two threads here) with a bounded queue; beyond it clients get 0x89 at once. Memory
/// stays bounded: measured +39 MB (before the fix: +2.6 GB for 8 clients).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d03_a_password_flood_keeps_memory_bounded() -> anyhow::Result<()> {
    let files = security_files(&[("alice", "wonderland")], "")?;
    let b = start_broker(|c| {
        c.auth.password_file = Some(files.passwd.clone());
        c.auth.verify_workers = Some(2);
        c.auth.verify_queue = 4;
        c.auth.max_failures_per_address = 0;
        c.auth.max_failures_per_user = 0;
    })
    .await?;
    let before = rss_bytes();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut flooders = Vec::new();
    for n in 0..24 {
        let addr = b.addr;
        flooders.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while Instant::now() < deadline {
                let c = login(&format!("flood-{n}"), "guess");
                if let Ok((_, ack)) = Raw::connect_with(addr, c).await {
                    codes.push(ack.code);
                }
            }
            codes
        }));
    }
    let mut peak = before;
    while Instant::now() < deadline {
        peak = peak.max(rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut codes = Vec::new();
    for f in flooders {
        codes.extend(f.await?);
    }
    let growth = peak.saturating_sub(before);
    println!("flood: {} attempts, peak RSS growth {} MB", codes.len(), growth / (1 << 20));
    assert!(codes.contains(&reason::BAD_USER_NAME_OR_PASSWORD), "checks ran");
    assert!(codes.contains(&reason::SERVER_BUSY), "the bounded queue refused some");
    assert!(codes.iter().all(|c| *c == reason::BAD_USER_NAME_OR_PASSWORD || *c == reason::SERVER_BUSY));
    // Two workers with 19 MiB of argon2 memory each, and a margin.
    assert!(growth < 100 << 20, "RSS grew by {} MB", growth / (1 << 20));
    // Once the flood stops, a correct login is accepted.
    let (_, ack) = Raw::connect_with(b.addr, login("alice-1", "wonderland")).await?;
    assert_eq!(ack.code, 0);
    Ok(())
}

fn login(id: &str, password: &str) -> raftmq_node::codec::Connect {
    let mut c = connect_packet(Protocol::V5, id, true);
    c.username = Some("alice".into());
    c.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
    c
}
