//! Deployment (issue 14): the container image built offline, the docker-compose cluster
//! and the Helm chart. Needs a Docker engine, the compose tool, and Python with
//! helm-python-sdk and kubernetes-validate: `.ci/run` provides them and sets
//! `REQUIRE_DOCKER` / `REQUIRE_HELM`; elsewhere a missing tool skips the test and says so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use raftmq_cluster::message::QoS;
use raftmq_node::codec::Protocol;
use raftmq_tests::*;

use super::{connect_accepted, DEADLINE};
use raftmq_tests::processes::{binary, free_port};

/// A command-line step never outlives this.
const STEP_DEADLINE: Duration = Duration::from_secs(180);
/// The admin API key the compose file's nodes are given here.
const API_KEY: &str = "compose-test-key";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `program args` under `timeout` (a deadline on every process started), in `dir`.
fn run(dir: &Path, program: &str, args: &[&str], env: &[(String, String)]) -> anyhow::Result<Output> {
    let output = Command::new("timeout")
        .arg(STEP_DEADLINE.as_secs().to_string())
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(dir)
        .output()?;
    Ok(output)
}

fn ok(output: Output, what: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether a tool the test needs is there; a missing one fails the test when `require`
/// is set (CI installed it), and otherwise skips it with the reason printed.
fn available(require: &str, present: bool, reason: &str) -> anyhow::Result<bool> {
    if present {
        return Ok(true);
    }
    anyhow::ensure!(std::env::var_os(require).is_none(), "{require} is set but {reason}");
    println!("SKIP: {reason}");
    Ok(false)
}

/// The compose command: `docker compose` (v2) where it exists, else `docker-compose` (v1).
fn compose_command() -> Option<Vec<&'static str>> {
    let works = |program: &str, args: &[&str]| Command::new(program).args(args).output().is_ok_and(|o| o.status.success());
    if works("docker", &["compose", "version"]) {
        Some(vec!["docker", "compose"])
    } else if works("docker-compose", &["version"]) {
        Some(vec!["docker-compose"])
    } else {
        None
    }
}

fn docker_engine() -> bool {
    Command::new("docker").args(["info"]).output().is_ok_and(|o| o.status.success())
}

/// Issue 14, item 6: the compose file validates.
#[test]
fn the_compose_file_validates() -> anyhow::Result<()> {
    let compose = compose_command();
    if !available("REQUIRE_DOCKER", compose.is_some(), "no docker compose tool")? {
        return Ok(());
    }
    let compose = compose.unwrap_or_default();
    let mut args: Vec<&str> = compose[1..].to_vec();
    args.extend(["-f", "docker-compose.yml", "config", "-q"]);
    ok(run(&workspace().join("deploy"), compose[0], &args, &[])?, "compose config")?;
    Ok(())
}

/// A compose project started by a test and torn down (volumes included) when it ends.
struct Project {
    compose: Vec<&'static str>,
    name: String,
    env: Vec<(String, String)>,
}

impl Project {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full: Vec<&str> = self.compose[1..].to_vec();
        full.extend(["-p", &self.name, "-f", "docker-compose.yml"]);
        full.extend(args);
        ok(run(&workspace().join("deploy"), self.compose[0], &full, &self.env)?, &format!("compose {}", args.join(" ")))
    }

    /// The container of a service.
    fn container(&self, service: &str) -> anyhow::Result<String> {
        Ok(self.run(&["ps", "-q", service])?.trim().to_owned())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

/// The cluster as node `admin` (a host port) sees it: its JSON.
async fn cluster_view(admin: u16) -> anyhow::Result<serde_json::Value> {
    let url = format!("http://127.0.0.1:{admin}/api/v1/cluster");
    tokio::task::spawn_blocking(move || -> anyhow::Result<serde_json::Value> {
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build().into();
        let body = agent.get(&url).header("Authorization", &format!("Bearer {API_KEY}")).call()?.body_mut().read_to_string()?;
        Ok(serde_json::from_str(&body)?)
    })
    .await?
}

/// Waits until node `admin` sees `up` nodes up and names a Raft leader; returns its name.
async fn wait_formed(admin: u16, up: usize, within: Duration) -> anyhow::Result<String> {
    let since = Instant::now();
    loop {
        if let Ok(view) = cluster_view(admin).await {
            let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
            let seen_up = nodes.iter().filter(|n| n["status"] == "up" || n["status"] == "self").count();
            if let (true, Some(leader)) = (seen_up >= up, view["raft"]["leader"].as_str()) {
                return Ok(leader.to_owned());
            }
        }
        anyhow::ensure!(since.elapsed() < within, "node on admin port {admin} did not see {up} nodes and a leader");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A QoS 1 publish through a node that may be in an election: connects until accepted,
/// then publishes until acknowledged (bounded by [`DEADLINE`]).
async fn publish_acknowledged(port: u16, client_id: &str, topic: &str, payload: &[u8], retain: bool) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let since = Instant::now();
    loop {
        let (mut c, ack) = connect_accepted(addr, connect_packet(Protocol::V5, client_id, true)).await?;
        if ack.code == 0 && c.publish(topic, payload, QoS::AtLeastOnce, retain, 1).await? == 0 {
            return Ok(());
        }
        anyhow::ensure!(since.elapsed() < DEADLINE, "publish to {topic} on port {port} never acknowledged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Issue 14, items 1, 2 and 6: the image builds offline; `docker compose up` starts three
/// nodes that form one cluster by their service names; a message crosses two nodes; the
/// cluster survives `docker kill` of its leader and `docker compose restart` with its
/// retained messages; then everything is torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_forms_survives_a_kill_and_a_restart() -> anyhow::Result<()> {
    let compose = compose_command();
    if !available("REQUIRE_DOCKER", compose.is_some() && docker_engine(), "no Docker engine or compose tool")? {
        return Ok(());
    }
    let tag = format!("raftmq:compose-test-{}", std::process::id());
    let binary = binary()?;
    let built = run(&workspace(), "deploy/build-offline.sh", &["--binary", &binary.to_string_lossy(), "--tag", &tag], &[])?;
    ok(built, "deploy/build-offline.sh")?;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let mut env = vec![
        ("RAFTMQ_IMAGE".to_owned(), tag.clone()),
        ("RAFTMQ_API_KEY".to_owned(), API_KEY.to_owned()),
        ("RAFTMQ_CLUSTER_SECRET".to_owned(), "compose-test-secret".to_owned()),
    ];
    for (i, (mqtt, admin)) in ports.iter().enumerate() {
        env.push((format!("RAFTMQ{}_MQTT_PORT", i + 1), mqtt.to_string()));
        env.push((format!("RAFTMQ{}_ADMIN_PORT", i + 1), admin.to_string()));
        env.push((format!("RAFTMQ{}_WS_PORT", i + 1), free_port()?.to_string()));
    }
    let project = Project { compose: compose.unwrap_or_default(), name: format!("raftmqtest{}", std::process::id()), env };
    project.run(&["up", "-d", "--no-build", "raftmq1", "raftmq2", "raftmq3"])?;
    let formed_within = Duration::from_secs(60);
    let leader = wait_formed(ports[0].1, 3, formed_within).await?;
    for (_, admin) in &ports[1..] {
        wait_formed(*admin, 3, formed_within).await?;
    }

    // A message published on node 1 reaches a subscriber on node 2.
    let mqtt = |i: usize| std::net::SocketAddr::from(([127, 0, 0, 1], ports[i].0));
    let (mut sub, _) = connect_accepted(mqtt(1), connect_packet(Protocol::V5, "compose-sub", true)).await?;
    assert_eq!(sub.subscribe(1, "compose/#", QoS::AtLeastOnce).await?, vec![1]);
    publish_acknowledged(ports[0].0, "compose-pub", "compose/before", b"before", true).await?;
    assert_eq!(sub.recv_publish().await?.payload.as_ref(), b"before");

    // docker kill of the leader: the two others elect one and still carry messages.
    let killed = ["raftmq1", "raftmq2", "raftmq3"].iter().position(|s| *s == leader).unwrap_or(0);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != killed).collect();
    ok(run(&workspace(), "docker", &["kill", &project.container(&format!("raftmq{}", killed + 1))?], &[])?, "docker kill")?;
    let (mut sub, _) = connect_accepted(mqtt(survivors[0]), connect_packet(Protocol::V5, "compose-sub-2", true)).await?;
    assert_eq!(sub.subscribe(1, "compose/after", QoS::AtLeastOnce).await?, vec![1]);
    publish_acknowledged(ports[survivors[1]].0, "compose-pub-2", "compose/after", b"after", true).await?;
    assert_eq!(sub.recv_publish().await?.payload.as_ref(), b"after");

    // docker compose restart (the killed node comes back too): the retained messages stay.
    project.run(&["restart", "-t", "15"])?;
    for (_, admin) in &ports {
        wait_formed(*admin, 3, formed_within).await?;
    }
    for i in 0..3 {
        let (mut c, _) = connect_accepted(mqtt(i), connect_packet(Protocol::V5, &format!("compose-check-{i}"), true)).await?;
        assert_eq!(c.subscribe(1, "compose/#", QoS::AtLeastOnce).await?, vec![1]);
        let mut got = vec![c.recv_publish().await?.payload.to_vec(), c.recv_publish().await?.payload.to_vec()];
        got.sort();
        assert_eq!(got, vec![b"after".to_vec(), b"before".to_vec()], "retained messages on node {}", i + 1);
    }
    drop(project);
    let _ = run(&workspace(), "docker", &["rmi", &tag], &[]);
    Ok(())
}

/// Issue 14, items 5 and 6: the Helm chart lints, renders with default and non-default
/// values, and every manifest validates against the Kubernetes schemas
/// (tests/deploy/chart.py, with helm-python-sdk: no helm binary).
#[test]
fn the_helm_chart_renders_valid_manifests() -> anyhow::Result<()> {
    let python = Command::new("python3").args(["-c", "import helm_python, kubernetes_validate, yaml"]).output();
    if !available("REQUIRE_HELM", python.is_ok_and(|o| o.status.success()), "python3 with helm-python-sdk and kubernetes-validate missing")?
    {
        return Ok(());
    }
    let out = ok(run(&workspace(), "python3", &["tests/deploy/chart.py"], &[])?, "tests/deploy/chart.py")?;
    println!("{}", out.trim());
    Ok(())
}
