//! The `raftmq` binary: run a node until SIGINT/SIGTERM (SIGHUP reloads the security
//! files), manage a password file with `raftmq passwd`, or drive a running node's admin API
//! with `raftmq ctl`.

mod ctl;

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use raftmq_node::config::Config;
use raftmq_node::security::passwd::{hash_password, PasswordFile};
use raftmq_node::server::Server;

/// raftmq: a clustered MQTT broker.
#[derive(Debug, Parser)]
#[command(name = "raftmq", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, env = "RAFTMQ_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT TCP listener address (default 0.0.0.0:1883).
    #[arg(long)]
    mqtt_listen: Option<std::net::SocketAddr>,
    /// Admin HTTP listener address (default 0.0.0.0:18083).
    #[arg(long)]
    admin_listen: Option<std::net::SocketAddr>,
    /// Data directory (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node name (default raftmq@127.0.0.1); unique in a cluster.
    #[arg(long)]
    node_name: Option<String>,
    /// Cluster gRPC listener address (default 0.0.0.0:5370; used once the node has seeds).
    #[arg(long)]
    cluster_listen: Option<std::net::SocketAddr>,
    /// The host:port other nodes dial to reach this one (default: the cluster listen
    /// address, or this host's name with its port).
    #[arg(long)]
    cluster_advertise: Option<String>,
    /// Nodes to join, host:port,host:port,... (may include this node).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<String>>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Talk to a running node's admin API.
    Ctl(ctl::CtlArgs),
    /// Add, update or delete a user in a password file (argon2id hashes, file mode 0600).
    Passwd {
        /// Password file (created if missing).
        file: PathBuf,
        /// User name.
        user: String,
        /// Password; read from standard input when omitted.
        #[arg(long, conflicts_with = "delete")]
        password: Option<String>,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Passwd { file, user, password, delete }) => return passwd(&file, &user, password, delete),
        Some(Command::Ctl(args)) => return ctl::run(args),
        None => {}
    }
    let mut config = Config::load(cli.config.as_deref(), std::env::vars()).context("configuration")?;
    if let Some(a) = cli.mqtt_listen {
        config.mqtt.listen = a;
    }
    if let Some(a) = cli.admin_listen {
        config.admin.listen = a;
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(n) = cli.node_name {
        config.node_name = n;
    }
    if let Some(a) = cli.cluster_listen {
        config.cluster.listen = a;
    }
    if let Some(a) = cli.cluster_advertise {
        config.cluster.advertise = Some(a);
    }
    if let Some(seeds) = cli.seeds {
        config.cluster.seeds = seeds;
    }
    config.validate().context("configuration")?;
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| config.log.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(quiet_openraft(&spec)).context("log filter")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
            .init();
    }
    if !config.ignored_env.is_empty() {
        tracing::warn!(variables = ?config.ignored_env, "RAFTMQ_* environment variables that name no configuration key were ignored");
    }
    let log_control: raftmq_node::admin::LogControl = Arc::new(move |spec: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(quiet_openraft(spec)).map_err(|e| e.to_string())?;
        reload.reload(filter).map_err(|e| e.to_string())
    });

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async {
        let server = Server::start(config).await?;
        let _ = server.log_control.set(log_control);
        spawn_reload_on_sighup(&server)?;
        tokio::select! {
            signalled = wait_for_signal() => signalled?,
            reason = server.failed() => {
                // Fail-stop: a node that cannot store must not look alive to its peers
                // and clients. A supervisor (systemd, Docker, Kubernetes) restarts it;
                // it starts again once its data directory is writable.
                tracing::error!(error = %reason, "the replicated store stopped; this node stops (restart it once its data directory is writable)");
                server.shutdown_failed().await;
                bail!("the replicated store stopped: {reason}");
            }
        }
        tracing::info!("shutting down");
        server.shutdown(Duration::from_secs(10)).await;
        Ok(())
    })
}

fn passwd(file: &std::path::Path, user: &str, password: Option<String>, delete: bool) -> anyhow::Result<()> {
    if user.is_empty() || user.contains(char::is_whitespace) || user.contains(':') {
        bail!("a user name must be non-empty, without spaces or ':'");
    }
    let mut users = if file.exists() { PasswordFile::load(file)? } else { PasswordFile::default() };
    if delete {
        if !users.remove(user) {
            bail!("{user} is not in {}", file.display());
        }
    } else {
        let password = match password {
            Some(p) => p,
            None => {
                eprint!("Password for {user}: ");
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line).context("reading the password")?;
                line.trim_end_matches(['\r', '\n']).to_owned()
            }
        };
        if password.is_empty() {
            bail!("empty password");
        }
        users.set(user, hash_password(password.as_bytes())?);
    }
    users.save(file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// SIGHUP re-reads the password, JWT key and ACL files; a failed reload keeps the previous
/// settings and says why.
fn spawn_reload_on_sighup(server: &Server) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        let broker = Arc::clone(&server.broker);
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match broker.reload_security().await {
                    Ok(()) => tracing::info!("security files reloaded"),
                    Err(e) => tracing::error!(error = %e, "reload failed; previous settings kept"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (server, Arc::<()>::default);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("SIGINT handler")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("SIGINT handler")?;
    Ok(())
}

/// openraft reports every election and membership step at `info`; unless the filter names
/// it, only its warnings reach the log.
fn quiet_openraft(spec: &str) -> String {
    if spec.contains("openraft") {
        spec.to_owned()
    } else {
        format!("{spec},openraft=warn")
    }
}
