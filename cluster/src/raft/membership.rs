//! Who belongs to the Raft group. A node alone initializes a group of one. In a cluster, a
//! node that belongs to no group yet asks the nodes it meets to add it (`Join`); when none
//! of them belongs to one and `bootstrap_expect` nodes have met, the one with the lowest id
//! initializes the group with all of them as voters. The leader adds a node that asks as a
//! learner and promotes caught-up learners to voters while the group has fewer than
//! `max_voters`, and removes members gone for longer than `autoclean` (a node scaled away).
//! A member that was removed and comes back asks the leader to add it again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers, Raft, ServerState};

use super::leader::LeaderLink;
use super::{NodeId, TypeConfig};
use crate::mesh::{PeerStatus, Shared};

/// How a clustered node forms or joins its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Formation {
    /// Nodes that must have met (this one included) before the first group is initialized;
    /// 0: a node must have met every static seed (with DNS discovery: three nodes).
    pub bootstrap_expect: usize,
    /// Voters the leader promotes learners up to (the rest stay learners).
    pub max_voters: usize,
    /// A member the leader has not seen up for this long is removed from the group (like
    /// EMQX's `cluster.autoclean`); `None`: members stay until removed by hand.
    pub autoclean: Option<Duration>,
}

/// How often the membership task looks at the mesh.
const ROUND: Duration = Duration::from_millis(250);
/// Nodes that must have met before a DNS-discovered cluster forms, unless configured.
const DNS_EXPECT: usize = 3;
/// A learner this close to the leader's last log index is caught up (promotable).
const CAUGHT_UP: u64 = 100;

/// How long a node in a group knows no leader, while a peer says it leads, before it asks
/// that leader to add it (it was removed while it was away).
const REJOIN_AFTER: Duration = Duration::from_secs(3);

/// Runs until the mesh stops.
pub(crate) async fn run(raft: Raft<TypeConfig>, shared: Arc<Shared>, link: Arc<LeaderLink>, formation: Formation, address: String) {
    // The leader's view of members it has not seen up, since when (kept while it leads).
    let mut down_since: HashMap<NodeId, Instant> = HashMap::new();
    let mut leaderless_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ROUND) => {}
            _ = shared.shutdown.cancelled() => return,
        }
        let live: BTreeMap<NodeId, String> =
            shared.peers.iter().filter(|p| p.status() == PeerStatus::Up).map(|p| (p.id, p.address.clone())).collect();
        let initialized = match raft.is_initialized().await {
            Ok(i) => i,
            Err(_) => return,
        };
        if !initialized {
            join_or_bootstrap(&raft, &shared, &link, &address, &live, formation).await;
            continue;
        }
        let (leading, has_leader) = {
            let m = raft.metrics().borrow().clone();
            (m.state == ServerState::Leader, m.current_leader.is_some())
        };
        if leading {
            repair_addresses(&raft, shared.id, &address, &live).await;
            grow(&raft, &live, formation).await;
            if let Some(after) = formation.autoclean {
                autoclean(&raft, shared.id, &live, after, &mut down_since).await;
            }
        } else {
            down_since.clear();
        }
        leaderless_since = if has_leader { None } else { leaderless_since.or(Some(Instant::now())) };
        if leaderless_since.is_some_and(|since| since.elapsed() >= REJOIN_AFTER) && rejoin(&shared, &link, &address, &live).await {
            leaderless_since = None;
        }
    }
}

/// The leader: members not seen up for `after` are removed (voters first stop voting).
/// Counting starts when this node leads, so a new leader waits the whole time again.
async fn autoclean(
    raft: &Raft<TypeConfig>,
    me: NodeId,
    live: &BTreeMap<NodeId, String>,
    after: Duration,
    down_since: &mut HashMap<NodeId, Instant>,
) {
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let members: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).filter(|id| *id != me).collect();
    down_since.retain(|id, _| members.contains(id) && !live.contains_key(id));
    let now = Instant::now();
    for id in members.iter().filter(|id| !live.contains_key(id)) {
        down_since.entry(*id).or_insert(now);
    }
    let gone: Vec<NodeId> = down_since.iter().filter(|(_, since)| now.duration_since(**since) >= after).map(|(id, _)| *id).collect();
    for id in gone {
        tracing::warn!(node = id, after = ?after, "removing a member gone for longer than cluster.autoclean_secs");
        match super::leader::serve_remove(raft, id).await {
            Ok(reply) if reply.removed => {
                down_since.remove(&id);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "autoclean"),
        }
    }
}

/// A node in a group that has known no leader for a while, while a peer says it leads:
/// it was removed from the group while away (autoclean, `ctl cluster leave`) or missed its
/// promotion. It asks that leader to add it (a member already known is left as it is).
async fn rejoin(shared: &Shared, link: &LeaderLink, address: &str, live: &BTreeMap<NodeId, String>) -> bool {
    let leader = shared.raft_positions.iter().find(|p| p.role == "leader" && live.contains_key(p.key())).map(|p| *p.key());
    let Some(leader_address) = leader.and_then(|id| live.get(&id)) else { return false };
    match link.join(leader_address, shared.id, address).await {
        Ok(reply) if reply.joined => {
            tracing::info!(via = %leader_address, "asked the leader to add this node to the raft group again");
            true
        }
        _ => false,
    }
}

/// An uninitialized node: joins the group of any node it meets, or starts the group when
/// enough nodes have met and none has one.
async fn join_or_bootstrap(
    raft: &Raft<TypeConfig>,
    shared: &Shared,
    link: &LeaderLink,
    address: &str,
    live: &BTreeMap<NodeId, String>,
    formation: Formation,
) {
    let me = shared.id;
    let mut someone_has_a_group = false;
    for peer_address in live.values() {
        let Ok(reply) = link.join(peer_address, me, address).await else { continue };
        if reply.joined {
            tracing::info!(via = %peer_address, "joining the cluster's raft group");
            return;
        }
        someone_has_a_group |= reply.initialized;
        if let Some(leader_address) = live.iter().find(|(id, _)| **id == reply.leader).map(|(_, a)| a) {
            if matches!(link.join(leader_address, me, address).await, Ok(r) if r.joined) {
                tracing::info!(via = %leader_address, "joining the cluster's raft group");
                return;
            }
        }
    }
    let lowest = live.keys().all(|id| me < *id);
    let enough = match formation.bootstrap_expect {
        0 if matches!(shared.config.discovery, crate::mesh::Discovery::Dns { .. }) => live.len() + 1 >= DNS_EXPECT,
        // Every seed answered, and every node met is linked (its introduction alone does not
        // put it in `live`: initializing then would leave it out, a group of its own).
        0 => shared.seeds_met() && shared.peers.iter().all(|p| p.status() == PeerStatus::Up),
        n => live.len() + 1 >= n,
    };
    if someone_has_a_group || !enough || !lowest {
        return;
    }
    let members: BTreeMap<NodeId, BasicNode> = live
        .iter()
        .map(|(id, a)| (*id, BasicNode { addr: a.clone() }))
        .chain(std::iter::once((me, BasicNode { addr: address.to_owned() })))
        .collect();
    tracing::info!(voters = members.len(), "initializing the cluster's raft group");
    if let Err(e) = raft.initialize(members).await {
        tracing::warn!(error = %e, "initializing the raft group");
    }
}

/// The leader: members recorded under another address than the one they are reached at
/// now (a node that first ran alone recorded its listen address; a node that moved) get
/// their current one, so followers and the Raft RPCs find them.
async fn repair_addresses(raft: &Raft<TypeConfig>, me: NodeId, address: &str, live: &BTreeMap<NodeId, String>) {
    let membership = raft.metrics().borrow().membership_config.membership().clone();
    let current = live.iter().map(|(id, a)| (*id, a.as_str())).chain(std::iter::once((me, address)));
    let moved: BTreeMap<NodeId, BasicNode> = current
        .filter(|(id, addr)| membership.get_node(id).is_some_and(|n| n.addr != *addr))
        .map(|(id, addr)| (id, BasicNode { addr: addr.to_owned() }))
        .collect();
    if moved.is_empty() {
        return;
    }
    tracing::info!(nodes = ?moved, "updating members' addresses in the raft group");
    if let Err(e) = raft.change_membership(ChangeMembers::SetNodes(moved), false).await {
        tracing::debug!(error = %e, "updating members' addresses");
    }
}

/// The leader: caught-up learners become voters while there is room. (Nodes become
/// learners by asking, [`super::leader::serve_join`]: a node with a group of its own never
/// asks, and is never pulled in to disturb this one with its terms.)
async fn grow(raft: &Raft<TypeConfig>, live: &BTreeMap<NodeId, String>, formation: Formation) {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters = membership.voter_ids().count();
    if voters >= formation.max_voters.max(1) {
        return;
    }
    let last = metrics.last_log_index.unwrap_or(0);
    let matched = metrics.replication.unwrap_or_default();
    let ready: BTreeSet<NodeId> = membership
        .learner_ids()
        .filter(|id| live.contains_key(id))
        .filter(|id| matched.get(id).copied().flatten().is_some_and(|l| l.index + CAUGHT_UP >= last))
        .take(formation.max_voters - voters)
        .collect();
    if ready.is_empty() {
        return;
    }
    tracing::info!(nodes = ?ready, "promoting learners to voters");
    if let Err(e) = raft.change_membership(ChangeMembers::AddVoterIds(ready), false).await {
        tracing::debug!(error = %e, "promoting learners");
    }
}
