//! Three real `raftmq` processes on loopback, each with its own ports and data directory,
//! started with a deadline and killed by pid.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::{reason, Packet, Protocol, PubKind, PubResponse, Publish};
use raftmq_tests::*;

use super::{connect_accepted, DEADLINE};

/// A process never outlives this, whatever happens to the test.
const PROCESS_DEADLINE: Duration = Duration::from_secs(120);
/// Failure detection the nodes are started with.
const FAILURE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a SUBACK waits for the peers, as the nodes are started.
const ROUTE_ACK_TIMEOUT: Duration = Duration::from_millis(500);

/// The `raftmq` binary next to this test's. `cargo test --workspace` builds it (the node
/// package has tests of its own); when it is missing or older than a source file (this
/// crate's tests run alone) it is built first.
pub(super) fn binary() -> anyhow::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe.parent().and_then(|deps| deps.parent()).ok_or("no target directory")?;
        let binary = profile_dir.join("raftmq");
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let built_at = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
        let sources = ["node/src", "cluster/src", "proto", "Cargo.lock"].iter().filter_map(|p| newest(&workspace.join(p))).max();
        if built_at.is_some() && built_at >= sources {
            return Ok(binary);
        }
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "-q", "-p", "raftmq-node", "--bin", "raftmq"]).current_dir(workspace);
        if profile_dir.ends_with("release") {
            cargo.arg("--release");
        }
        match cargo.status() {
            Ok(status) if status.success() => Ok(binary),
            _ => Err("building raftmq failed".into()),
        }
    });
    built.clone().map_err(|e| anyhow::anyhow!(e))
}

/// The newest modification time under `path`.
fn newest(path: &std::path::Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| e.ok()).filter_map(|e| newest(&e.path())).max()
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts one process with a deadline: a watchdog kills it by pid if the test did not.
fn spawn(
    name: &str,
    ports: (u16, u16, u16),
    seeds: &str,
    dir: &std::path::Path,
    extra: &[(String, String)],
) -> anyhow::Result<Arc<Mutex<Child>>> {
    let (mqtt, admin, cluster) = ports;
    let child = Command::new(binary()?)
        .args(["--node-name", name])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--cluster-listen", &format!("127.0.0.1:{cluster}")])
        .args(["--seeds", seeds])
        .arg("--data-dir")
        .arg(dir)
        .env("RAFTMQ_LISTENERS", "[]")
        .env("RAFTMQ_ADMIN__API_KEY", "k3y")
        .env("RAFTMQ_CLUSTER__SECRET", "s3cret")
        .env("RAFTMQ_CLUSTER__HEARTBEAT_MS", "200")
        .env("RAFTMQ_CLUSTER__FAILURE_TIMEOUT_MS", FAILURE_TIMEOUT.as_millis().to_string())
        .env("RAFTMQ_CLUSTER__ROUTE_ACK_TIMEOUT_MS", ROUTE_ACK_TIMEOUT.as_millis().to_string())
        .env("RAFTMQ_RAFT__HEARTBEAT_MS", "100")
        .env("RAFTMQ_RAFT__ELECTION_TIMEOUT_MS", "500")
        .env("RUST_LOG", std::env::var("RAFTMQ_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("RAFTMQ_TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()?;
    let child = Arc::new(Mutex::new(child));
    let watched = Arc::downgrade(&child);
    std::thread::spawn(move || {
        std::thread::sleep(PROCESS_DEADLINE);
        if let Some(child) = watched.upgrade() {
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
            }
        }
    });
    Ok(child)
}

/// One `raftmq` process.
pub(super) struct Node {
    child: Arc<Mutex<Child>>,
    pub(super) name: String,
    pub(super) mqtt: SocketAddr,
    admin: String,
    ports: (u16, u16, u16),
    seeds: String,
    dir: tempfile::TempDir,
    /// Variables this node is started with besides the common ones.
    extra: Vec<(String, String)>,
}

impl Node {
    fn start(name: &str, ports: (u16, u16, u16), seeds: &str, extra: &[(String, String)]) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let child = spawn(name, ports, seeds, dir.path(), extra)?;
        let (mqtt, admin, _) = ports;
        Ok(Node {
            child,
            name: name.to_owned(),
            mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt)),
            admin: format!("http://127.0.0.1:{admin}"),
            ports,
            seeds: seeds.to_owned(),
            dir,
            extra: extra.to_vec(),
        })
    }

    /// Starts the process again (same name, ports and data directory) after it was killed.
    pub(super) fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.name, self.ports, &self.seeds, self.dir.path(), &self.extra)?;
        Ok(())
    }

    /// Sends a signal by pid (`STOP`, `CONT`).
    pub(super) fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.id();
        let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }

    /// `host:port` of the admin listener (health, metrics, API).
    pub(super) fn admin_addr(&self) -> &str {
        self.admin.trim_start_matches("http://")
    }

    /// SIGTERM, then waits (bounded by [`DEADLINE`]) for the process to exit.
    pub(super) async fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")?;
        let since = Instant::now();
        loop {
            if self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.try_wait()?.is_some() {
                return Ok(());
            }
            anyhow::ensure!(since.elapsed() < DEADLINE, "{} did not exit after SIGTERM", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL.
    pub(super) fn kill(&self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(super) async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.admin);
        tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(2))).build().into();
            let mut response = agent.get(&url).header("Authorization", "Bearer k3y").call()?;
            Ok((response.status().as_u16(), response.body_mut().read_to_string().unwrap_or_default()))
        })
        .await?
    }

    /// Waits (bounded by [`DEADLINE`]) until this node shows `name` down; the admin API is
    /// the only window onto another process, so it is polled.
    pub(super) async fn wait_until_seen_down(&self, name: &str) -> anyhow::Result<()> {
        let since = Instant::now();
        loop {
            let view = self.cluster().await?;
            if view.iter().any(|(n, status)| n == name && status == "down") {
                return Ok(());
            }
            anyhow::ensure!(since.elapsed() < DEADLINE, "{name} never seen down: {view:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The status of every node as this one sees it.
    pub(super) async fn cluster(&self) -> anyhow::Result<Vec<(String, String)>> {
        let (_, body) = self.get("/api/v1/cluster").await?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        Ok(nodes
            .iter()
            .map(|n| (n["name"].as_str().unwrap_or_default().to_owned(), n["status"].as_str().unwrap_or_default().to_owned()))
            .collect())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts three nodes with the same seeds and waits until each sees the whole cluster and
/// is ready.
pub(super) async fn start_three() -> anyhow::Result<Vec<Node>> {
    start_three_with(&[]).await
}

/// [`start_three`] with more variables for every node.
pub(super) async fn start_three_with(extra: &[(&str, &str)]) -> anyhow::Result<Vec<Node>> {
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let seeds = ports.iter().map(|p| format!("127.0.0.1:{}", p.2)).collect::<Vec<_>>().join(",");
    let nodes: Vec<Node> =
        ports.iter().enumerate().map(|(i, p)| Node::start(&format!("n{}", i + 1), *p, &seeds, &extra)).collect::<anyhow::Result<_>>()?;
    wait_ready(&nodes.iter().collect::<Vec<_>>(), 3).await?;
    Ok(nodes)
}

/// Waits until each of `nodes` is ready (its routes and a Raft leader) and sees `up` nodes
/// up, itself included.
pub(super) async fn wait_ready(nodes: &[&Node], up: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in nodes {
        loop {
            let ready = matches!(node.get("/readyz").await, Ok((200, _)));
            let all_up = node.cluster().await.is_ok_and(|c| c.iter().filter(|(_, s)| s == "up" || s == "self").count() == up);
            if ready && all_up {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{} never saw the whole cluster: {:?}", node.admin, node.cluster().await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Issue 12, item 8: a peer that stops reading (SIGSTOP) blocks nobody: a SUBACK waits at
/// most the route acknowledgement bound, messages between the other nodes flow, the paused
/// node is seen down; when it continues it is up again and routes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_blocks_nobody_and_comes_back() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    nodes[2].signal("STOP")?;
    // If the paused node led the Raft group, a CONNECT is refused (busy) until another is
    // elected: the clients connect again, as clients do.
    let (mut sub, _) = connect_accepted(nodes[0].mqtt, connect_packet(Protocol::V5, "near", true)).await?;
    let started = Instant::now();
    sub.subscribe(1, "live/#", QoS::AtLeastOnce).await?;
    assert!(started.elapsed() < ROUTE_ACK_TIMEOUT + Duration::from_secs(1), "SUBACK took {:?}", started.elapsed());
    let (mut publ, _) = connect_accepted(nodes[1].mqtt, connect_packet(Protocol::V5, "other", true)).await?;
    assert_eq!(publ.publish("live/x", b"flows", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"flows");
    nodes[0].wait_until_seen_down("n3").await?;
    nodes[2].signal("CONT")?;
    let resumed = Instant::now();
    loop {
        let view = nodes[0].cluster().await?;
        if view.iter().all(|(_, status)| status == "up") {
            break;
        }
        anyhow::ensure!(resumed.elapsed() < DEADLINE, "n3 never came back: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // n3 has n1's routes again (a snapshot): its publisher reaches n1's subscriber.
    let (mut back, _) = Raw::connect(nodes[2].mqtt, Protocol::V5, "back", true).await?;
    let deadline = Instant::now() + DEADLINE;
    let mut n = 1;
    while back.publish("live/y", b"again", QoS::AtLeastOnce, false, n).await? != 0 {
        anyhow::ensure!(Instant::now() < deadline, "n3 never routed to n1 again");
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&sub.recv_publish().await?.payload[..], b"again");
    Ok(())
}

/// Issue 12, items 1, 2 and 8: three processes started with the same `--seeds` form one
/// cluster with no other flag; `/readyz` turns ready once every peer's routes arrived; a
/// message crosses nodes; a node killed with SIGKILL is seen down, and its routes gone,
/// within the failure detection time plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_form_one_cluster_and_notice_a_killed_node() -> anyhow::Result<()> {
    let nodes = start_three().await?;

    // `raftmq ctl cluster` prints the same view.
    let out = Command::new(binary()?).args(["ctl", "--url", &nodes[0].admin, "--api-key", "k3y", "cluster"]).output()?;
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    for name in ["n1", "n2", "n3"] {
        assert!(printed.lines().any(|l| l.starts_with(name) && l.contains(" up ")), "{name} not up in:\n{printed}");
    }

    let (mut sub, _) = Raw::connect(nodes[2].mqtt, Protocol::V5, "far-away", true).await?;
    sub.subscribe(1, "proc/#", QoS::AtLeastOnce).await?;
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "publisher", true).await?;
    assert_eq!(publ.publish("proc/x", b"across", QoS::AtLeastOnce, false, 1).await?, 0);
    assert_eq!(&sub.recv_publish().await?.payload[..], b"across");

    // The cluster's metrics pass promtool.
    let (_, metrics) = nodes[0].get("/metrics").await?;
    assert!(metrics.contains("raftmq_cluster_peer_up{peer=\"n3\"} 1"), "{metrics}");
    promtool_check(&metrics).await?;

    nodes[2].kill();
    let killed = Instant::now();
    nodes[0].wait_until_seen_down("n3").await?;
    let noticed = killed.elapsed();
    assert!(noticed <= FAILURE_TIMEOUT + Duration::from_secs(1), "noticed after {noticed:?}");
    // A dead peer does not make the others unready: they keep serving.
    assert_eq!(nodes[0].get("/readyz").await?.0, 200);
    // Its routes are gone: nobody else subscribed.
    let mut code = 0;
    while killed.elapsed() < FAILURE_TIMEOUT + Duration::from_secs(1) {
        code = publ.publish("proc/x", b"after", QoS::AtLeastOnce, false, 2).await?;
        if code == reason::NO_MATCHING_SUBSCRIBERS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, reason::NO_MATCHING_SUBSCRIBERS, "n3's routes still there");
    Ok(())
}

/// Issue 12, items 5 and 8: shared QoS 1 deliveries a member on a node that is killed
/// (SIGKILL) had not acknowledged go to another member, on another node, within the
/// failure detection time plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_unacknowledged_shared_messages_go_to_another_member() -> anyhow::Result<()> {
    let nodes = start_three().await?;
    let mut members = Vec::new();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let (mut m, _) = Raw::connect(node.mqtt, Protocol::V5, &format!("member{i}"), true).await?;
        m.subscribe(1, "$share/workers/jobs/#", QoS::AtLeastOnce).await?;
        members.push(m);
    }
    let (mut publ, _) = Raw::connect(nodes[0].mqtt, Protocol::V5, "dispatcher", true).await?;
    for n in 1..=10u16 {
        assert_eq!(publ.publish("jobs/x", format!("job{n}").as_bytes(), QoS::AtLeastOnce, false, n).await?, 0);
    }
    // The member on n2 takes its jobs and never acknowledges them; the one on n3 does.
    let mut doomed = members.remove(0);
    let mut survivor = members.remove(0);
    let mut held = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = doomed.recv_within(Duration::from_millis(300)).await {
        held.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    let mut done = Vec::new();
    let drain = |done: &mut Vec<String>, p: Publish| {
        done.push(String::from_utf8_lossy(&p.payload).into_owned());
        p.packet_id
    };
    while let Ok(Some(Packet::Publish(p))) = survivor.recv_within(Duration::from_millis(300)).await {
        let id = drain(&mut done, p);
        survivor.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0))).await?;
    }
    assert!(!held.is_empty() && !done.is_empty(), "both members got jobs: {held:?} {done:?}");
    nodes[1].kill();
    let killed = Instant::now();
    while held.iter().any(|job| !done.contains(job)) {
        anyhow::ensure!(killed.elapsed() < DEADLINE, "jobs {held:?} never reached the survivor (got {done:?})");
        if let Ok(Some(Packet::Publish(p))) = survivor.recv_within(Duration::from_millis(100)).await {
            let id = drain(&mut done, p);
            survivor.send(&Packet::PubResponse(PubResponse::new(PubKind::PubAck, id, 0))).await?;
        }
    }
    let took = killed.elapsed();
    assert!(took <= FAILURE_TIMEOUT + Duration::from_secs(1), "redelivered after {took:?}");
    let mut all = done.clone();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "every job reached a live member: {done:?}");
    // The counter moves after each hand-over completes, which can be just after the survivor
    // has the message: wait for it rather than read it once.
    let expected = format!("raftmq_cluster_redelivered_total {}", held.len());
    loop {
        let (_, metrics) = nodes[0].get("/metrics").await?;
        if metrics.contains(&expected) {
            break;
        }
        anyhow::ensure!(killed.elapsed() < DEADLINE, "{expected} never reported:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
