//! The routes of the other nodes, as their route streams delivered them.
//!
//! Each origin's routes arrive on one stream at a time; a stream that (re)starts takes a
//! new generation, so a stale stream still draining cannot change or drop what the newer
//! one set up. An origin whose stream ends (failure, leave) has its routes dropped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::routes::{RemoteGroup, RemoteMatch, Route};
use crate::topic::TopicTrie;
use crate::NodeId;

#[derive(Debug, Default)]
struct Origin {
    generation: u64,
    routes: HashSet<Route>,
}

#[derive(Debug, Default)]
struct Inner {
    plain: TopicTrie<NodeId, ()>,
    shared: TopicTrie<(NodeId, Route), u32>,
    origins: HashMap<NodeId, Origin>,
    next_generation: u64,
}

impl Inner {
    fn remove_route(&mut self, node: NodeId, route: &Route) {
        match &route.group {
            None => {
                self.plain.remove(&route.filter, &node);
            }
            Some(_) => {
                self.shared.remove(&route.filter, &(node, route.clone()));
            }
        }
    }

    fn set_route(&mut self, node: NodeId, route: Route, members: u32) {
        let Some(origin) = self.origins.get_mut(&node) else { return };
        if members == 0 {
            if origin.routes.remove(&route) {
                self.remove_route(node, &route);
            }
            return;
        }
        origin.routes.insert(route.clone());
        match &route.group {
            None => {
                self.plain.insert(&route.filter, node, ());
            }
            Some(_) => {
                let filter = Arc::clone(&route.filter);
                self.shared.insert(&filter, (node, route), members);
            }
        }
    }

    fn clear(&mut self, node: NodeId) {
        let routes: Vec<Route> = self.origins.get_mut(&node).map(|o| o.routes.drain().collect()).unwrap_or_default();
        for route in routes {
            self.remove_route(node, &route);
        }
    }
}

/// Routes of every other node.
#[derive(Debug, Default)]
pub(crate) struct RemoteRoutes {
    inner: RwLock<Inner>,
}

impl RemoteRoutes {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream from `node` starts: returns its generation.
    pub(crate) fn begin(&self, node: NodeId) -> u64 {
        let mut inner = self.write();
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner.origins.entry(node).or_default().generation = generation;
        generation
    }

    fn current(inner: &Inner, node: NodeId, generation: u64) -> bool {
        inner.origins.get(&node).is_some_and(|o| o.generation == generation)
    }

    /// Replaces every route of `node` (a snapshot).
    pub(crate) fn replace(&self, node: NodeId, generation: u64, routes: Vec<(Route, u32)>) {
        let mut inner = self.write();
        if !Self::current(&inner, node, generation) {
            return;
        }
        inner.clear(node);
        for (route, members) in routes {
            inner.set_route(node, route, members);
        }
    }

    /// Applies one change of `node`'s routes.
    pub(crate) fn apply(&self, node: NodeId, generation: u64, route: Route, members: u32) {
        let mut inner = self.write();
        if Self::current(&inner, node, generation) {
            inner.set_route(node, route, members);
        }
    }

    /// Drops every route of `node` if its stream `generation` (or, with `None`, any) is
    /// still the current one.
    pub(crate) fn drop_origin(&self, node: NodeId, generation: Option<u64>) {
        let mut inner = self.write();
        if generation.is_some_and(|g| !Self::current(&inner, node, g)) {
            return;
        }
        inner.clear(node);
        inner.origins.remove(&node);
    }

    /// The generation of `node`'s current route stream, if any.
    pub(crate) fn generation_of(&self, node: NodeId) -> Option<u64> {
        self.read().origins.get(&node).map(|o| o.generation)
    }

    /// Whether `generation` is still `node`'s current route stream.
    pub(crate) fn is_current(&self, node: NodeId, generation: u64) -> bool {
        Self::current(&self.read(), node, generation)
    }

    /// Whether `node` has a route stream open here.
    pub(crate) fn has_origin(&self, node: NodeId) -> bool {
        self.read().origins.contains_key(&node)
    }

    /// What the other nodes want of `topic`.
    pub(crate) fn matches(&self, topic: &str) -> RemoteMatch {
        let inner = self.read();
        let mut found = RemoteMatch::default();
        inner.plain.for_each_match(topic, |node, _| {
            if !found.nodes.contains(node) {
                found.nodes.push(*node);
            }
        });
        inner.shared.for_each_match(topic, |(node, route), members| match found.groups.iter_mut().find(|g| g.route == *route) {
            Some(group) => group.members.push((*node, *members)),
            None => found.groups.push(RemoteGroup { route: route.clone(), members: vec![(*node, *members)] }),
        });
        found
    }

    /// Routes held for `node`.
    pub(crate) fn count_of(&self, node: NodeId) -> usize {
        self.read().origins.get(&node).map_or(0, |o| o.routes.len())
    }

    /// Routes held for every other node.
    pub(crate) fn count(&self) -> usize {
        self.read().origins.values().map(|o| o.routes.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(group: Option<&str>, filter: &str) -> Route {
        Route { group: group.map(Arc::from), filter: Arc::from(filter) }
    }

    #[test]
    fn matches_name_each_node_once_and_groups_with_their_members() {
        let r = RemoteRoutes::default();
        let (a, b) = (1, 2);
        let ga = r.begin(a);
        let gb = r.begin(b);
        r.replace(a, ga, vec![(route(None, "s/+"), 1), (route(None, "s/#"), 1), (route(Some("g"), "s/#"), 2)]);
        r.apply(b, gb, route(Some("g"), "s/#"), 3);
        let m = r.matches("s/x");
        assert_eq!(m.nodes, vec![a]);
        let mut members = m.group(&route(Some("g"), "s/#")).map(|g| g.members.clone()).unwrap_or_default();
        members.sort_unstable();
        assert_eq!(members, vec![(a, 2), (b, 3)]);
        // A stale stream of `a` cannot drop what the current one holds.
        let newer = r.begin(a);
        r.drop_origin(a, Some(ga));
        assert_eq!(r.count_of(a), 3);
        r.drop_origin(a, Some(newer));
        assert_eq!((r.count_of(a), r.count()), (0, 1));
        assert!(r.matches("s/x").nodes.is_empty());
        r.apply(b, gb, route(Some("g"), "s/#"), 0);
        assert!(r.matches("s/x").is_empty());
    }
}
