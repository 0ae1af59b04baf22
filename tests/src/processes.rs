//! Real `raftmq` processes on loopback (or each in its own network namespace, see
//! [`crate::netns`]), each with its own ports and data directory, started with a deadline
//! and killed by pid: the cluster and fault suites' nodes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Raw;

/// How long any single expectation about a process cluster may take.
pub const CLUSTER_DEADLINE: Duration = Duration::from_secs(10);

/// Connects with `connect`, again while the broker refuses as busy or unavailable (MQTT 5:
/// 0x88, 0x89; MQTT 3: 3): a CONNECT whose client id cannot be claimed during a Raft
/// election is refused, never half accepted, and a client tries again, as this does
/// (bounded by [`CLUSTER_DEADLINE`]).
pub async fn connect_accepted(
    addr: SocketAddr,
    connect: raftmq_node::codec::Connect,
) -> anyhow::Result<(Raw, raftmq_node::codec::ConnAck)> {
    let started = Instant::now();
    loop {
        let (raw, ack) = Raw::connect_with(addr, connect.clone()).await?;
        if !matches!(ack.code, 0x88 | 0x89 | 3) || started.elapsed() > CLUSTER_DEADLINE {
            return Ok((raw, ack));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process never outlives this, whatever happens to the test.
const PROCESS_DEADLINE: Duration = Duration::from_secs(120);
/// Failure detection the nodes are started with.
pub const FAILURE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a SUBACK waits for the peers, as the nodes are started.
pub const ROUTE_ACK_TIMEOUT: Duration = Duration::from_millis(500);

/// The `raftmq` binary next to this test's. `cargo test --workspace` builds it (the node
/// package has tests of its own); when it is missing or older than a source file (this
/// crate's tests run alone) it is built first.
pub fn binary() -> anyhow::Result<PathBuf> {
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

/// A loopback port free right now, below Linux's ephemeral range (32768 and up): a port
/// the system handed out for `bind(0)` can be taken by any outgoing connection before the
/// process that is to listen on it binds it (CI once lost a node that way). Each test
/// process walks its own stretch of 20000-32767, starting from its pid.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_768;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, (std::process::id().wrapping_mul(7_919)) % SPAN, Ordering::AcqRel, Ordering::Acquire);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where a node runs: an address of this machine, or its own network namespace with its
/// address there.
#[derive(Debug, Clone)]
pub struct Host {
    /// The address its listeners bind.
    pub ip: IpAddr,
    /// The namespace it runs in (`ip netns exec`), if not this one.
    pub netns: Option<String>,
}

impl Host {
    /// Loopback, in the test's own namespace.
    pub fn loopback() -> Host {
        Host { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), netns: None }
    }
}

/// The command that starts a node (not started yet).
pub fn command(
    name: &str,
    host: &Host,
    ports: (u16, u16, u16),
    seeds: &str,
    dir: &std::path::Path,
    extra: &[(String, String)],
) -> anyhow::Result<Command> {
    let (mqtt, admin, cluster) = ports;
    let logging = std::env::var_os("RAFTMQ_TEST_LOG").is_some();
    let ip = host.ip;
    // `ip netns exec` enters the namespace and execs the binary: the pid stays the node's.
    let mut command = match &host.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary()?);
            c
        }
        None => Command::new(binary()?),
    };
    command
        .args(["--node-name", name])
        .args(["--mqtt-listen", &SocketAddr::new(ip, mqtt).to_string()])
        .args(["--admin-listen", &SocketAddr::new(ip, admin).to_string()])
        .args(["--cluster-listen", &SocketAddr::new(ip, cluster).to_string()])
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
        .stderr(if logging { Stdio::piped() } else { Stdio::null() });
    Ok(command)
}

/// Starts one process with a deadline: a watchdog kills it by pid if the test did not.
pub fn spawn(
    name: &str,
    host: &Host,
    ports: (u16, u16, u16),
    seeds: &str,
    dir: &std::path::Path,
    extra: &[(String, String)],
) -> anyhow::Result<Arc<Mutex<Child>>> {
    let mut child = command(name, host, ports, seeds, dir, extra)?.spawn()?;
    if let Some(stderr) = child.stderr.take() {
        // Each line of the node's log, prefixed with its name (three nodes share the output).
        let name = name.to_owned();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
            }
        });
    }
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

/// A node's data directory: a temporary directory, or a size-limited tmpfs mounted on one
/// (for full-disk and read-only faults; root only). Unmounted and removed when dropped.
pub struct DataDir {
    dir: tempfile::TempDir,
    tmpfs: bool,
}

impl DataDir {
    /// A temporary directory.
    pub fn temporary() -> anyhow::Result<DataDir> {
        Ok(DataDir { dir: tempfile::tempdir()?, tmpfs: false })
    }

    /// A tmpfs of `mib` MiB.
    pub fn tmpfs(mib: u64) -> anyhow::Result<DataDir> {
        let dir = tempfile::tempdir()?;
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"]).arg(dir.path()).status()?;
        anyhow::ensure!(status.success(), "mounting a tmpfs failed");
        Ok(DataDir { dir, tmpfs: true })
    }

    /// Where it is.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the filesystem to its last byte; returns the filler file (remove it to free
    /// the space).
    pub fn fill(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler)?;
        let mut chunk = vec![0u8; 1 << 20];
        while !chunk.is_empty() {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(_) => chunk.truncate(chunk.len() / 2),
            }
        }
        let _ = f.sync_all();
        Ok(filler)
    }

    /// Remounts the tmpfs read-only (`true`) or read-write.
    pub fn set_read_only(&self, read_only: bool) -> anyhow::Result<()> {
        anyhow::ensure!(self.tmpfs, "only a tmpfs can be remounted");
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        let status = Command::new("mount").args(["-o", mode]).arg(self.path()).status()?;
        anyhow::ensure!(status.success(), "mount -o {mode} failed");
        Ok(())
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        }
    }
}

/// One `raftmq` process.
pub struct Node {
    child: Arc<Mutex<Child>>,
    /// Its node name.
    pub name: String,
    /// Its MQTT listener.
    pub mqtt: SocketAddr,
    /// `http://host:port` of its admin listener.
    pub admin: String,
    host: Host,
    ports: (u16, u16, u16),
    seeds: String,
    dir: DataDir,
    /// Variables this node is started with besides the common ones.
    extra: Vec<(String, String)>,
}

impl Node {
    fn start(
        name: &str,
        host: &Host,
        dir: DataDir,
        ports: (u16, u16, u16),
        seeds: &str,
        extra: &[(String, String)],
    ) -> anyhow::Result<Node> {
        let child = spawn(name, host, ports, seeds, dir.path(), extra)?;
        let (mqtt, admin, _) = ports;
        Ok(Node {
            child,
            name: name.to_owned(),
            mqtt: SocketAddr::new(host.ip, mqtt),
            admin: format!("http://{}", SocketAddr::new(host.ip, admin)),
            host: host.clone(),
            ports,
            seeds: seeds.to_owned(),
            dir,
            extra: extra.to_vec(),
        })
    }

    /// Starts the process again (same name, ports and data directory) after it was killed.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.name, &self.host, self.ports, &self.seeds, self.dir.path(), &self.extra)?;
        Ok(())
    }

    /// Whether the process has exited (on its own: a node whose store failed stops).
    pub fn exited(&self) -> bool {
        self.child.lock().ok().is_some_and(|mut c| c.try_wait().is_ok_and(|s| s.is_some()))
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &DataDir {
        &self.dir
    }

    /// Starts the process again in the foreground, for a start that must fail: waits
    /// (bounded by `within`) until it exits; returns its status and what it printed.
    pub fn start_expecting_exit(&mut self, within: Duration) -> anyhow::Result<(std::process::ExitStatus, String)> {
        use std::io::Read;
        self.kill();
        let mut command = command(&self.name, &self.host, self.ports, &self.seeds, self.dir.path(), &self.extra)?;
        let mut child = command.env("RUST_LOG", "error").stderr(Stdio::piped()).spawn()?;
        let mut stderr = child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?;
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stderr.read_to_string(&mut out);
            out
        });
        let since = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if since.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{} was still running after {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((status, reader.join().unwrap_or_default()))
    }

    /// Sends a signal by pid (`STOP`, `CONT`).
    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.id();
        let status = Command::new("kill").args([&format!("-{name}"), &pid.to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
        Ok(())
    }

    /// `host:port` of the admin listener (health, metrics, API).
    pub fn admin_addr(&self) -> &str {
        self.admin.trim_start_matches("http://")
    }

    /// SIGTERM, then waits (bounded by [`CLUSTER_DEADLINE`]) for the process to exit.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        self.signal("TERM")?;
        let since = Instant::now();
        loop {
            if self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.try_wait()?.is_some() {
                return Ok(());
            }
            anyhow::ensure!(since.elapsed() < CLUSTER_DEADLINE, "{} did not exit after SIGTERM", self.name);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET path` on its admin API (with the test API key): status and body.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.admin);
        tokio::task::spawn_blocking(move || -> anyhow::Result<(u16, String)> {
            let agent: ureq::Agent =
                ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(2))).build().into();
            let mut response = agent.get(&url).header("Authorization", "Bearer k3y").call()?;
            Ok((response.status().as_u16(), response.body_mut().read_to_string().unwrap_or_default()))
        })
        .await?
    }

    /// Waits (bounded by [`CLUSTER_DEADLINE`]) until this node shows `name` down; the admin
    /// API is the only window onto another process, so it is polled.
    pub async fn wait_until_seen_down(&self, name: &str) -> anyhow::Result<()> {
        let since = Instant::now();
        loop {
            let view = self.cluster().await?;
            if view.iter().any(|(n, status)| n == name && status == "down") {
                return Ok(());
            }
            anyhow::ensure!(since.elapsed() < CLUSTER_DEADLINE, "{name} never seen down: {view:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The status of every node as this one sees it.
    pub async fn cluster(&self) -> anyhow::Result<Vec<(String, String)>> {
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
pub async fn start_three() -> anyhow::Result<Vec<Node>> {
    start_three_with(&[]).await
}

/// [`start_three`] with more variables for every node.
pub async fn start_three_with(extra: &[(&str, &str)]) -> anyhow::Result<Vec<Node>> {
    start_three_on(&[Host::loopback(), Host::loopback(), Host::loopback()], extra).await
}

/// [`start_three_with`], node `i` on `hosts[i]` (three namespaces of a
/// [`crate::netns::Testnet`], say).
pub async fn start_three_on(hosts: &[Host; 3], extra: &[(&str, &str)]) -> anyhow::Result<Vec<Node>> {
    start_three_in(hosts, [DataDir::temporary()?, DataDir::temporary()?, DataDir::temporary()?], extra).await
}

/// [`start_three_on`], node `i` with data directory `dirs[i]`.
pub async fn start_three_in(hosts: &[Host; 3], dirs: [DataDir; 3], extra: &[(&str, &str)]) -> anyhow::Result<Vec<Node>> {
    let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let seeds = ports.iter().zip(hosts).map(|(p, h)| SocketAddr::new(h.ip, p.2).to_string()).collect::<Vec<_>>().join(",");
    let nodes: Vec<Node> = ports
        .iter()
        .zip(hosts)
        .zip(dirs)
        .enumerate()
        .map(|(i, ((p, h), dir))| Node::start(&format!("n{}", i + 1), h, dir, *p, &seeds, &extra))
        .collect::<anyhow::Result<_>>()?;
    wait_ready(&nodes.iter().collect::<Vec<_>>(), 3).await?;
    Ok(nodes)
}

/// Waits until each of `nodes` is ready (its routes and a Raft leader) and sees `up` nodes
/// up, itself included.
pub async fn wait_ready(nodes: &[&Node], up: usize) -> anyhow::Result<()> {
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
