//! Accept loops: bounded by a connection semaphore and a per-address count, one task per
//! connection, never awaiting per-client work (TLS or WebSocket handshakes included) in the
//! loop itself.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::broker::Broker;
use crate::config::ListenerConfig;
use crate::connection;
use crate::net::rate::RateLimiter;
use crate::net::transport;

/// What runs between TCP and MQTT on a listener.
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// TLS.
    Tls(TlsAcceptor, ListenerConfig),
    /// WebSocket.
    Ws(ListenerConfig),
    /// WebSocket over TLS.
    Wss(TlsAcceptor, ListenerConfig),
}

/// Limits shared by every listener of a node.
#[derive(Debug)]
pub struct Limits {
    permits: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
}

impl Limits {
    /// Limits from the broker's configuration.
    pub fn new(broker: &Broker) -> Arc<Limits> {
        Arc::new(Limits { permits: Arc::new(Semaphore::new(broker.config.mqtt.max_connections)), per_ip: Arc::new(PerIp::default()) })
    }
}

/// Connections per peer address, for `max_connections_per_ip`.
#[derive(Debug, Default)]
struct PerIp {
    counts: DashMap<IpAddr, usize>,
}

/// Holds one connection's place in its address's count; gives it back on drop.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut count = self.counts.entry(ip).or_insert(0);
        if max > 0 && *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot { table: Arc::clone(self), ip })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.table.counts.remove_if_mut(&self.ip, |_, count| {
            *count -= 1;
            *count == 0
        });
    }
}

/// Accepts connections on `listener` until shutdown.
pub async fn run(broker: Arc<Broker>, listener: TcpListener, transport: Arc<Transport>, limits: Arc<Limits>) {
    let max_per_ip = broker.config.mqtt.max_connections_per_ip;
    let rate = broker.config.mqtt.max_connection_rate;
    let mut accept_rate = (rate > 0).then(|| RateLimiter::new(rate));
    loop {
        if let Some(wait) = accept_rate.as_mut().and_then(RateLimiter::take) {
            // Over the connection rate: stop accepting for a moment; the kernel's backlog
            // holds the clients that keep coming.
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = broker.shutdown.cancelled() => return,
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = broker.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let overload = &broker.log_limits.overload;
        if broker.bans.is_ip_banned(peer.ip()) {
            if let Some(suppressed) = overload.allow() {
                tracing::info!(%peer, suppressed, "connection refused: address banned");
            }
            continue;
        }
        let Ok(permit) = Arc::clone(&limits.permits).try_acquire_owned() else {
            if let Some(suppressed) = overload.allow() {
                tracing::warn!(%peer, suppressed, "connection refused: max_connections reached");
            }
            continue;
        };
        let Some(ip_slot) = limits.per_ip.acquire(peer.ip(), max_per_ip) else {
            if let Some(suppressed) = overload.allow() {
                tracing::warn!(%peer, suppressed, "connection refused: max_connections_per_ip reached");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The task holds the boxed connection and the two guards, nothing else: it is part
        // of every connection's memory.
        let serve = handshake_and_serve(Arc::clone(&broker), stream, peer, &transport);
        broker.tasks.spawn(async move {
            serve.await;
            drop(ip_slot);
            drop(permit);
        });
    }
}

/// Runs the transport's handshake, then the MQTT connection. Each transport's path is
/// boxed on its own so that a plain TCP connection does not carry the (much larger) state
/// of a TLS or WebSocket handshake.
fn handshake_and_serve(
    broker: Arc<Broker>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
    transport: &Arc<Transport>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    if let Transport::Tcp = **transport {
        return Box::pin(connection::serve(broker, stream, peer, None));
    }
    let transport = Arc::clone(transport);
    Box::pin(async move {
        match &*transport {
            Transport::Tcp => {}
            Transport::Tls(acceptor, config) => serve_tls(broker, stream, peer, acceptor, config).await,
            Transport::Ws(config) => serve_ws(broker, stream, peer, config).await,
            Transport::Wss(acceptor, config) => serve_wss(broker, stream, peer, acceptor, config).await,
        }
    })
}

/// The largest WebSocket message, and the MQTT bytes allowed before CONNECT.
fn ws_limits(broker: &Broker) -> (usize, usize) {
    let m = &broker.config.mqtt;
    (m.max_packet_size + 16, m.max_connect_packet_size.min(m.max_packet_size))
}

fn handshake_timeout(broker: &Broker) -> Duration {
    Duration::from_secs(broker.config.mqtt.connect_timeout_secs)
}

async fn serve_tls(broker: Arc<Broker>, stream: TcpStream, peer: std::net::SocketAddr, acceptor: &TlsAcceptor, config: &ListenerConfig) {
    let tls = match tokio::time::timeout(handshake_timeout(&broker), acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    let user =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| transport::cert_username(c, config.peer_cert_as_username));
    connection::serve(broker, tls, peer, user).await;
}

async fn serve_ws(broker: Arc<Broker>, stream: TcpStream, peer: std::net::SocketAddr, config: &ListenerConfig) {
    let (max_message, max_connect) = ws_limits(&broker);
    match tokio::time::timeout(handshake_timeout(&broker), transport::accept_websocket(stream, config, max_message, max_connect)).await {
        Ok(Ok(ws)) => connection::serve(broker, ws, peer, None).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "WebSocket handshake failed"),
        Err(_) => tracing::debug!(%peer, "WebSocket handshake timed out"),
    }
}

async fn serve_wss(broker: Arc<Broker>, stream: TcpStream, peer: std::net::SocketAddr, acceptor: &TlsAcceptor, config: &ListenerConfig) {
    let (max_message, max_connect) = ws_limits(&broker);
    let handshake = async {
        let tls = acceptor.accept(stream).await?;
        let user = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| transport::cert_username(c, config.peer_cert_as_username));
        let ws = transport::accept_websocket(tls, config, max_message, max_connect).await?;
        Ok::<_, std::io::Error>((ws, user))
    };
    match tokio::time::timeout(handshake_timeout(&broker), handshake).await {
        Ok(Ok((ws, user))) => connection::serve(broker, ws, peer, user).await,
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "secure WebSocket handshake failed"),
        Err(_) => tracing::debug!(%peer, "secure WebSocket handshake timed out"),
    }
}
