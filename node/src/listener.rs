//! The TCP accept loop: bounded by a connection semaphore, one task per connection, never
//! awaiting per-client work in the loop itself.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::connection;

/// Accepts MQTT connections on `listener` until shutdown.
pub async fn run_tcp(broker: Arc<Broker>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(broker.config.mqtt.max_connections));
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
        let _ = stream.set_nodelay(true);
        let broker = Arc::clone(&broker);
        let tasks = broker.tasks.clone();
        tasks.spawn(async move {
            connection::serve(broker, stream, peer).await;
            drop(permit);
        });
    }
}
