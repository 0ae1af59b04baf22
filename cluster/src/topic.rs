//! Topic names and filters as data: validation rules of MQTT §4.7 and a subscription trie.
//!
//! Architecture invariant: matching is iterative (an explicit stack), so a filter or topic
//! with many levels cannot overflow the stack; the level count is capped at validation.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// Why a topic name or filter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long [MQTT-4.7.3-1].
    #[error("empty topic")]
    Empty,
    /// Topic names must not contain `+` or `#` [MQTT-3.3.2-2].
    #[error("wildcard in topic name")]
    WildcardInName,
    /// `+` and `#` must occupy a whole level, `#` only the last [MQTT-4.7.1-1], [MQTT-4.7.1-2].
    #[error("misplaced wildcard in topic filter")]
    BadWildcard,
    /// More levels than the configured maximum.
    #[error("too many topic levels ({0})")]
    TooManyLevels(usize),
    /// Strings on the wire are at most 65,535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
}

fn check_common(s: &str, max_levels: usize) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    let levels = s.bytes().filter(|b| *b == b'/').count() + 1;
    if levels > max_levels {
        return Err(TopicError::TooManyLevels(levels));
    }
    Ok(())
}

/// Checks a topic name a client publishes to (no wildcards, bounded levels).
pub fn validate_topic_name(name: &str, max_levels: usize) -> Result<(), TopicError> {
    check_common(name, max_levels)?;
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter a client subscribes to.
pub fn validate_topic_filter(filter: &str, max_levels: usize) -> Result<(), TopicError> {
    check_common(filter, max_levels)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let has_wild = level.contains(['+', '#']);
        if !has_wild {
            continue;
        }
        match level {
            "+" => {}
            "#" if levels.peek().is_none() => {}
            _ => return Err(TopicError::BadWildcard),
        }
    }
    Ok(())
}

/// True if `filter` has a wildcard level.
pub fn is_wildcard(filter: &str) -> bool {
    filter.split('/').any(|l| l == "+" || l == "#")
}

/// Whether `topic` matches `filter`, including the rule that a filter starting with a
/// wildcard does not match a topic starting with `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// One level of the trie. Kept small because a subscription costs about one node: children
/// in a B-tree (no allocation while empty, no hasher state, compact when large), and the
/// values of the filters ending here in [`Values`].
#[derive(Debug)]
struct Node<K, V> {
    children: BTreeMap<Box<str>, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Values of a filter ending in `#` at this node.
    hash: Values<K, V>,
    /// Values of a filter ending exactly at this node.
    values: Values<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node { children: BTreeMap::new(), plus: None, hash: Values::default(), values: Values::default() }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.values.is_empty()
    }
}

/// Most values kept in an exactly sized slice before switching to a hash map.
const SMALL_VALUES: usize = 16;

/// The values of one filter: most filters have one subscriber, so a boxed slice of exactly
/// that many entries (16 bytes and one small allocation), and a hash map once a filter has
/// many (a topic thousands of clients subscribe to).
#[derive(Debug)]
enum Values<K, V> {
    Small(Box<[(K, V)]>),
    /// Boxed so a node carries 16 bytes for it, not a map's 48: nearly every node's values
    /// are small or empty.
    #[allow(clippy::box_collection)]
    Large(Box<HashMap<K, V>>),
}

impl<K, V> Default for Values<K, V> {
    fn default() -> Self {
        Values::Small(Box::default())
    }
}

impl<K, V> Values<K, V> {
    fn is_empty(&self) -> bool {
        match self {
            Values::Small(entries) => entries.is_empty(),
            Values::Large(map) => map.is_empty(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Values<K, V> {
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self {
            Values::Large(map) => map.insert(key, value),
            Values::Small(entries) => {
                if let Some((_, v)) = entries.iter_mut().find(|(k, _)| *k == key) {
                    return Some(std::mem::replace(v, value));
                }
                if entries.len() < SMALL_VALUES {
                    let mut grown = Vec::with_capacity(entries.len() + 1);
                    grown.extend(entries.iter().cloned());
                    grown.push((key, value));
                    *entries = grown.into_boxed_slice();
                } else {
                    let mut map: HashMap<K, V> = entries.iter().cloned().collect();
                    map.insert(key, value);
                    *self = Values::Large(Box::new(map));
                }
                None
            }
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        match self {
            Values::Large(map) => {
                let removed = map.remove(key);
                if map.len() < SMALL_VALUES / 2 {
                    *self = Values::Small(map.drain().collect());
                }
                removed
            }
            Values::Small(entries) => {
                let i = entries.iter().position(|(k, _)| k == key)?;
                let mut rest: Vec<(K, V)> = entries.to_vec();
                let (_, removed) = rest.swap_remove(i);
                *entries = rest.into_boxed_slice();
                Some(removed)
            }
        }
    }

    fn for_each(&self, mut visit: impl FnMut(&K, &V)) {
        self.any(|k, v| {
            visit(k, v);
            false
        });
    }

    /// Whether `pred` holds for some value; stops at the first that does.
    fn any(&self, mut pred: impl FnMut(&K, &V) -> bool) -> bool {
        match self {
            Values::Small(entries) => entries.iter().any(|(k, v)| pred(k, v)),
            Values::Large(map) => map.iter().any(|(k, v)| pred(k, v)),
        }
    }
}

/// A map from topic filters to keyed values (for example client id -> subscription options),
/// answering "which values match this topic" without scanning every filter.
#[derive(Debug)]
pub struct TopicTrie<K, V> {
    root: Node<K, V>,
    filters: usize,
}

impl<K, V> Default for TopicTrie<K, V> {
    fn default() -> Self {
        TopicTrie { root: Node::default(), filters: 0 }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> TopicTrie<K, V> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of distinct filters with at least one value.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Inserts or replaces `key`'s value under `filter`. Returns the previous value and
    /// whether the filter had no values before (a new route).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> (Option<V>, bool) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        let mut in_hash = false;
        while let Some(level) = levels.next() {
            match level {
                "#" if levels.peek().is_none() => {
                    in_hash = true;
                    break;
                }
                "+" => node = node.plus.get_or_insert_with(Box::default),
                _ => node = node.children.entry(Box::from(level)).or_default(),
            }
        }
        let slot = if in_hash { &mut node.hash } else { &mut node.values };
        let was_empty = slot.is_empty();
        let previous = slot.insert(key, value);
        if was_empty {
            self.filters += 1;
        }
        (previous, was_empty)
    }

    /// Removes `key` from `filter`. Returns the removed value and whether the filter has no
    /// values left (a route to withdraw).
    pub fn remove(&mut self, filter: &str, key: &K) -> (Option<V>, bool) {
        let levels: Vec<&str> = filter.split('/').collect();
        let (removed, now_empty) = Self::remove_at(&mut self.root, &levels, key);
        let route_gone = removed.is_some() && now_empty;
        if route_gone {
            self.filters = self.filters.saturating_sub(1);
        }
        (removed, route_gone)
    }

    /// Iterative walk to the filter's node; pruning is a separate step ([`Self::prune`]).
    fn remove_at(root: &mut Node<K, V>, levels: &[&str], key: &K) -> (Option<V>, bool) {
        let mut node = root;
        let last = levels.len().saturating_sub(1);
        for (i, level) in levels.iter().enumerate() {
            if *level == "#" && i == last {
                let removed = node.hash.remove(key);
                let empty = node.hash.is_empty();
                return (removed, empty);
            }
            let next = if *level == "+" { node.plus.as_deref_mut() } else { node.children.get_mut(*level) };
            match next {
                Some(n) => node = n,
                None => return (None, false),
            }
        }
        let removed = node.values.remove(key);
        let empty = node.values.is_empty();
        (removed, empty)
    }

    /// Drops trie nodes that hold nothing, so unsubscribed filters do not leak memory.
    pub fn prune(&mut self, filter: &str) {
        let levels: Vec<&str> = filter.split('/').collect();
        // Prune from the deepest prefix up; each pass is a short iterative walk.
        for depth in (1..=levels.len()).rev() {
            let (parent_levels, leaf) = levels[..depth].split_at(depth - 1);
            let Some(parent) = Self::walk_mut(&mut self.root, parent_levels) else { continue };
            let Some(leaf) = leaf.first() else { continue };
            match *leaf {
                "+" => {
                    if parent.plus.as_deref().is_some_and(Node::is_empty) {
                        parent.plus = None;
                    }
                }
                "#" => {}
                l => {
                    if parent.children.get(l).is_some_and(Node::is_empty) {
                        parent.children.remove(l);
                    }
                }
            }
        }
    }

    fn walk_mut<'a>(mut node: &'a mut Node<K, V>, levels: &[&str]) -> Option<&'a mut Node<K, V>> {
        for level in levels {
            node = if *level == "+" { node.plus.as_deref_mut()? } else { node.children.get_mut(*level)? };
        }
        Some(node)
    }

    /// Calls `visit` for every (key, value) in the trie.
    pub fn for_each_value(&self, mut visit: impl FnMut(&K, &V)) {
        let mut stack = vec![&self.root];
        while let Some(node) = stack.pop() {
            node.values.for_each(&mut visit);
            node.hash.for_each(&mut visit);
            stack.extend(node.children.values());
            stack.extend(node.plus.as_deref());
        }
    }

    /// Calls `visit` for every (key, value) stored under exactly `filter`.
    pub fn for_each_filter_value(&self, filter: &str, mut visit: impl FnMut(&K, &V)) {
        let mut node = &self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                node.hash.for_each(&mut visit);
                return;
            }
            let next = if level == "+" { node.plus.as_deref() } else { node.children.get(level) };
            match next {
                Some(n) => node = n,
                None => return,
            }
        }
        node.values.for_each(&mut visit);
    }

    /// Calls `visit` for every (key, value) whose filter matches `topic`. A key subscribed
    /// through several filters is visited once per filter.
    pub fn for_each_match(&self, topic: &str, mut visit: impl FnMut(&K, &V)) {
        self.any_match(topic, |k, v| {
            visit(k, v);
            false
        });
    }

    /// Whether `pred` holds for some (key, value) whose filter matches `topic`; the walk
    /// stops at the first that does.
    pub fn any_match(&self, topic: &str, mut pred: impl FnMut(&K, &V) -> bool) -> bool {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut stack: Vec<(&Node<K, V>, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            let at_root = depth == 0;
            // `#` matches the parent level too ("a/#" matches "a").
            if !(at_root && dollar) && node.hash.any(&mut pred) {
                return true;
            }
            let Some(level) = levels.get(depth) else {
                if node.values.any(&mut pred) {
                    return true;
                }
                continue;
            };
            if let Some(child) = node.children.get(*level) {
                stack.push((child, depth + 1));
            }
            if !(at_root && dollar) {
                if let Some(plus) = node.plus.as_deref() {
                    stack.push((plus, depth + 1));
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filter_rules_mqtt_4_7_1() {
        for ok in ["a", "a/b", "+", "#", "a/+/b", "a/#", "+/+", "/", "a//b", "$SYS/#"] {
            assert_eq!(validate_topic_filter(ok, 128), Ok(()), "{ok}");
        }
        for bad in ["a/#/b", "a+", "#x", "a/b#", "++", "", "a/+b"] {
            assert!(validate_topic_filter(bad, 128).is_err(), "{bad}");
        }
        assert_eq!(validate_topic_name("a/+", 128), Err(TopicError::WildcardInName));
        assert_eq!(validate_topic_name(&"a/".repeat(200), 128), Err(TopicError::TooManyLevels(201)));
    }

    /// A filter's values move from the small slice to a map past [`SMALL_VALUES`] and back
    /// when most leave; matching sees every value either way.
    #[test]
    fn many_values_on_one_filter_switch_representation_and_keep_every_value() {
        let mut trie: TopicTrie<u32, u32> = TopicTrie::new();
        for k in 0..40 {
            let (previous, first) = trie.insert("a/+", k, k * 10);
            assert_eq!((previous, first), (None, k == 0));
        }
        assert_eq!(trie.insert("a/+", 7, 1), (Some(70), false));
        let mut seen = Vec::new();
        trie.for_each_match("a/b", |k, _| seen.push(*k));
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<u32>>());
        let mut visited = 0;
        assert!(trie.any_match("a/b", |k, _| {
            visited += 1;
            *k < 40
        }));
        assert_eq!(visited, 1, "the walk stops at the first match");
        assert!(!trie.any_match("b/a", |_, _| true));
        for k in 0..39 {
            assert!(!trie.remove("a/+", &k).1);
        }
        let mut left = Vec::new();
        trie.for_each_match("a/b", |k, v| left.push((*k, *v)));
        assert_eq!(left, [(39, 390)]);
        assert_eq!(trie.remove("a/+", &39), (Some(390), true));
        trie.prune("a/+");
        assert_eq!(trie.filter_count(), 0);
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards_mqtt_4_7_2_1() {
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("a/#", "a"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/+", "sport/tennis/player1"));
        assert!(matches("+/+", "/finance"));
        assert!(!matches("+", "/finance"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just(String::new()), Just("$s".to_string())]
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![level(), Just("+".to_string())]
    }

    fn filter() -> impl Strategy<Value = String> {
        (proptest::collection::vec(filter_level(), 1..5), any::<bool>()).prop_map(|(mut l, hash)| {
            if hash {
                l.push("#".into());
            }
            l.join("/")
        })
    }

    proptest! {
        /// The trie agrees with the naive matcher on random filters and topics.
        #[test]
        fn trie_matches_like_naive_matcher(filters in proptest::collection::vec(filter(), 0..20),
                                           topic in proptest::collection::vec(level(), 1..6)) {
            let topic = topic.join("/");
            let mut trie = TopicTrie::new();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i, ());
            }
            let mut got = Vec::new();
            trie.for_each_match(&topic, |k, _| got.push(*k));
            got.sort_unstable();
            let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| matches(f, &topic)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want);
            for (i, f) in filters.iter().enumerate() {
                trie.remove(f, &i);
                trie.prune(f);
            }
            prop_assert_eq!(trie.filter_count(), 0);
            prop_assert!(trie.root.is_empty());
        }
    }
}
