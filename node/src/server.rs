//! Starting and stopping a node: binds the listeners, spawns their loops, and shuts
//! everything down in order (stop accepting, disconnect clients, wait for tasks).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::AuthMethods;
use crate::broker::Broker;
use crate::config::Config;
use crate::listener;

/// A failure to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running node.
#[derive(Debug)]
pub struct Server {
    /// The broker state (for tests and the admin API).
    pub broker: Arc<Broker>,
    /// Bound MQTT TCP address (the real port when 0 was asked for).
    pub mqtt_addr: SocketAddr,
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with_auth(config, AuthMethods::default()).await
    }

    /// Like [`Server::start`], with enhanced authentication methods registered.
    pub async fn start_with_auth(config: Config, auth: AuthMethods) -> Result<Server, StartError> {
        let addr = config.mqtt.listen;
        let tcp = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
        let mqtt_addr = tcp.local_addr().map_err(|source| StartError::Bind { addr, source })?;
        let broker = Broker::new(config, auth);
        tokio::spawn(listener::run_tcp(Arc::clone(&broker), tcp));
        crate::sys::spawn(Arc::clone(&broker));
        tracing::info!(node = %broker.config.node_name, %mqtt_addr, "raftmq listening");
        Ok(Server { broker, mqtt_addr })
    }

    /// Graceful shutdown: MQTT 5 clients get DISCONNECT 0x8B; waits up to `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.broker.shutdown(grace).await;
    }
}
