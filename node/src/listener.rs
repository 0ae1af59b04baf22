//! The TCP accept loop: bounded by a connection semaphore, one task per connection, never
//! awaiting per-client work in the loop itself.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::connection;

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

/// Accepts MQTT connections on `listener` until shutdown.
pub async fn run_tcp(broker: Arc<Broker>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(broker.config.mqtt.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let max_per_ip = broker.config.mqtt.max_connections_per_ip;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = broker.shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, "connection refused: max_connections reached");
            drop(stream);
            continue;
        };
        let Some(ip_slot) = per_ip.acquire(peer.ip(), max_per_ip) else {
            tracing::warn!(%peer, "connection refused: max_connections_per_ip reached");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let broker = Arc::clone(&broker);
        let tasks = broker.tasks.clone();
        tasks.spawn(async move {
            connection::serve(broker, stream, peer).await;
            drop(ip_slot);
            drop(permit);
        });
    }
}
