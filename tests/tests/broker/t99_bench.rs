//! The load generator works against a live broker. Functional only: performance is
//! measured by tests/bench/compare.sh, never asserted here.

use raftmq_tests::*;

async fn bench(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out =
        tokio::time::timeout(DEADLINE + DEADLINE, tokio::process::Command::new(env!("CARGO_BIN_EXE_raftmq-bench")).args(args).output())
            .await??;
    anyhow::ensure!(out.status.success(), "raftmq-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())?)
}

#[tokio::test]
async fn raftmq_bench_scenarios_deliver_and_report() -> anyhow::Result<()> {
    let b = start_broker(|_| {}).await?;
    let addr = b.addr.to_string();
    let p2p = bench(&["--broker", &addr, "--json", "--duration", "1", "--qos", "1", "p2p", "-c", "2"]).await?;
    assert!(p2p["received"].as_u64().unwrap_or(0) > 0, "{p2p}");
    assert!(p2p["latency_us"]["p99"].as_u64().is_some());
    let fanin = bench(&["--broker", &addr, "--json", "--duration", "1", "--rate", "100", "fanin", "-c", "2", "--members", "2"]).await?;
    assert!(fanin["received"].as_u64().unwrap_or(0) > 0, "{fanin}");
    // The busy-polling latency client gets every paced message (QoS 2 exercises the whole
    // handshake on both sides).
    let lat = bench(&["--broker", &addr, "--json", "--duration", "1", "--rate", "200", "--qos", "2", "latency", "--busy-poll"]).await?;
    assert!(lat["received"].as_u64().unwrap_or(0) >= 150, "{lat}");
    assert_eq!(lat["received"], lat["sent"], "{lat}");
    let conn = bench(&["--broker", &addr, "--json", "conn", "-c", "50", "--subscribe"]).await?;
    assert_eq!(conn["received"], 50);
    // Bounds are enforced.
    let out =
        tokio::process::Command::new(env!("CARGO_BIN_EXE_raftmq-bench")).args(["--broker", &addr, "conn", "-c", "100001"]).output().await?;
    assert!(!out.status.success());
    Ok(())
}
