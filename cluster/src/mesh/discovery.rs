//! Finding peers: the seeds (or the addresses a DNS name resolves to), checked every
//! second (DNS: every `interval`), and every node a peer names in its `Hello`. Each new
//! address is dialled until it answers; a node met for the first time gets a link.

use std::sync::Arc;
use std::time::Duration;

use raftmq_proto::v1 as pb;

use super::config::Discovery;
use super::peer::Peer;
use super::Shared;

/// How often the seed list is looked at again.
const SEED_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the discovery loop.
pub(crate) fn start(shared: Arc<Shared>) {
    tokio::spawn(async move {
        let interval = match &shared.config.discovery {
            Discovery::Static(_) => SEED_INTERVAL,
            Discovery::Dns { interval, .. } => *interval,
        };
        loop {
            for address in addresses(&shared.config.discovery).await {
                dial(&shared, address);
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shared.shutdown.cancelled() => return,
            }
        }
    });
}

async fn addresses(discovery: &Discovery) -> Vec<String> {
    match discovery {
        Discovery::Static(seeds) => seeds.clone(),
        Discovery::Dns { name, port, .. } => match tokio::net::lookup_host((name.as_str(), *port)).await {
            Ok(found) => found.map(|a| a.to_string()).collect(),
            Err(e) => {
                tracing::debug!(name = %name, error = %e, "cluster DNS discovery found nothing yet");
                Vec::new()
            }
        },
    }
}

/// Nodes a peer told us about.
pub(crate) fn learn(shared: &Arc<Shared>, known: impl Iterator<Item = (String, String)>) {
    for (name, address) in known {
        let id = crate::stable_hash(name.as_bytes());
        if id != shared.id && !shared.peers.contains_key(&id) {
            dial(shared, address);
        }
    }
}

/// Dials `address` (once at a time) until a node answers there; links to it unless it is
/// this node or already linked.
pub(crate) fn dial(shared: &Arc<Shared>, address: String) {
    if address.is_empty() || address == shared.config.advertise || shared.dialled.insert(address.clone(), ()).is_some() {
        return;
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if let Ok(Some(node)) = hello(&shared, &address).await {
                shared.met.insert(address.clone(), ());
                let id = crate::stable_hash(node.name.as_bytes());
                if id != shared.id {
                    link(&shared, id, node.name, address.clone());
                }
                // Linked, or one of our own addresses (never dialled again).
                return;
            }
            shared.failed_dials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shared.shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

/// Starts the link to a node met for the first time.
pub(crate) fn link(shared: &Arc<Shared>, id: crate::NodeId, name: String, address: String) {
    let peer = match shared.peers.entry(id) {
        dashmap::mapref::entry::Entry::Occupied(_) => return,
        dashmap::mapref::entry::Entry::Vacant(slot) => {
            let peer = Arc::new(Peer::new(id, name, address, shared.config.forward_queue));
            slot.insert(Arc::clone(&peer));
            peer
        }
    };
    tokio::spawn(peer.run(Arc::clone(shared)));
}

/// Forgets that `address` was dialled (its node left), so the seeds can find it again.
pub(crate) fn forget(shared: &Shared, address: &str) {
    shared.dialled.remove(address);
}

async fn hello(shared: &Shared, address: &str) -> Result<Option<pb::NodeInfo>, tonic::Status> {
    let mut client = super::service::client(shared, address).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let reply = tokio::time::timeout(shared.config.failure_timeout, client.hello(super::peer::hello_request(shared)))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("hello"))??
        .into_inner();
    Ok(reply.node)
}
