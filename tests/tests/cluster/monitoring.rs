//! Monitoring (issue 14, items 3 and 4): the alert rules pass `promtool` and each fires in
//! its unit test; every query of the Grafana dashboard parses and, against a real
//! Prometheus scraping three live `raftmq` processes, returns data. Needs Debian's
//! `prometheus` package (`.ci/run` installs it and sets `REQUIRE_PROMTOOL`); elsewhere the
//! tests skip and say so. Grafana itself cannot be had offline here: the dashboard's JSON is
//! what is checked, its queries against Prometheus alone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::Protocol;
use raftmq_tests::*;

use super::connect_accepted;
use raftmq_tests::processes::{free_port, start_three};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy")
}

fn has(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Whether Prometheus' tools are here; their absence fails the test when CI installed them.
fn prometheus_tools() -> anyhow::Result<bool> {
    if has("promtool") && has("prometheus") {
        return Ok(true);
    }
    anyhow::ensure!(std::env::var_os("REQUIRE_PROMTOOL").is_none(), "REQUIRE_PROMTOOL is set but promtool or prometheus is missing");
    println!("SKIP: promtool / prometheus not installed (Debian package prometheus)");
    Ok(false)
}

/// Issue 14, item 4: the rules are valid, and `alerts.test.yml` makes each alert fire on a
/// made-up history (and stay quiet before its `for` has passed).
#[test]
fn the_alert_rules_pass_promtool_and_each_fires_in_its_test() -> anyhow::Result<()> {
    if !prometheus_tools()? {
        return Ok(());
    }
    for args in [&["check", "rules", "alerts.yml"][..], &["test", "rules", "alerts.test.yml"][..]] {
        let out = Command::new("timeout").arg("60").arg("promtool").args(args).current_dir(deploy().join("prometheus")).output()?;
        anyhow::ensure!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Prometheus server this test started, killed by pid when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `targets` every second and loads raftmq's alert rules.
    fn start(targets: &[&str]) -> anyhow::Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let list = targets.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: raftmq\n    static_configs:\n      - targets: [{list}]\n",
            deploy().join("prometheus").join("alerts.yml").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config)?;
        let port = free_port()?;
        let child = Command::new("timeout")
            .args(["120", "prometheus"])
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir })
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.url);
        let query: Vec<(String, String)> = query.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(5))).build().into();
            let mut request = agent.get(&url);
            for (k, v) in &query {
                request = request.query(k, v);
            }
            let body = request.call()?.body_mut().read_to_string()?;
            Ok(serde_json::from_str(&body)?)
        })
        .await?
    }
}

/// Every query of the dashboard, with Grafana's variables as a query would see them.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(deploy().join("grafana").join("dashboards").join("raftmq.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default().replace("$instance", ".*").replace("$__rate_interval", "1m");
            queries.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr));
        }
    }
    anyhow::ensure!(queries.len() >= 20, "the dashboard has only {} queries", queries.len());
    Ok(queries)
}

/// Issue 14, item 3: against a Prometheus scraping a live three-node cluster that carried
/// traffic (a message across nodes, a retained message, a persistent session), every
/// panel's query is accepted and returns data; the alert rules load and evaluate cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_a_live_cluster() -> anyhow::Result<()> {
    if !prometheus_tools()? {
        return Ok(());
    }
    let queries = dashboard_queries()?;
    let nodes = start_three().await?;
    let targets: Vec<&str> = nodes.iter().map(|n| n.admin_addr()).collect();
    let prometheus = Prometheus::start(&targets)?;

    let (mut sub, _) = connect_accepted(nodes[1].mqtt, connect_packet(Protocol::V5, "dash-sub", false)).await?;
    assert_eq!(sub.subscribe(1, "dash/#", QoS::AtLeastOnce).await?, vec![1]);
    let (mut publisher, _) = connect_accepted(nodes[0].mqtt, connect_packet(Protocol::V5, "dash-pub", true)).await?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut pending: Vec<(String, String)> = queries;
    let mut round = 0u16;
    while !pending.is_empty() {
        // Traffic keeps flowing so rates have two samples to compare.
        round = round.wrapping_add(1);
        assert_eq!(publisher.publish("dash/x", b"hello", QoS::AtLeastOnce, round % 4 == 0, round.max(1)).await?, 0);
        sub.recv_publish().await?;
        publisher.publish("nobody/listens", b"dropped", QoS::AtMostOnce, false, 0).await?;
        let mut still = Vec::new();
        for (title, expr) in pending {
            let answer = prometheus.get("/api/v1/query", &[("query", &expr)]).await.unwrap_or_default();
            anyhow::ensure!(answer["status"] != "error", "panel {title}: query {expr} refused: {}", answer["error"]);
            if answer["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                still.push((title, expr));
            }
        }
        pending = still;
        anyhow::ensure!(Instant::now() < deadline || pending.is_empty(), "panels without data: {pending:?}");
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let rules = prometheus.get("/api/v1/rules", &[]).await?;
    let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
    let unhealthy: Vec<_> =
        groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).filter(|r| r["health"] != "ok").collect();
    assert!(!groups.is_empty() && unhealthy.is_empty(), "alert rules not loaded or failing: {unhealthy:?}");
    Ok(())
}
