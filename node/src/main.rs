//! The `raftmq` binary: parse flags, load configuration, run a node until SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use raftmq_node::config::Config;
use raftmq_node::server::Server;

/// raftmq: a clustered MQTT broker.
#[derive(Debug, Parser)]
#[command(name = "raftmq", version)]
struct Cli {
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
    /// Node name (default raftmq@127.0.0.1).
    #[arg(long)]
    node_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    config.validate().context("configuration")?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log))
        .context("log filter")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(async {
        let server = Server::start(config).await?;
        wait_for_signal().await?;
        tracing::info!("shutting down");
        server.shutdown(Duration::from_secs(10)).await;
        Ok(())
    })
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
