//! The subscription index: topic filter -> subscribers, looked up by topic name on every PUBLISH.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::ControlFlow;

use slab::Slab;
use smallvec::SmallVec;

use super::children::Children;
use super::split_level;

/// Arena index of the root node; it is never removed.
const ROOT: usize = 0;

/// Result of [`SubscriptionIndex::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted<V> {
    /// The options the same key had on the same filter, replaced by the new ones (MQTT-3.8.4-3).
    pub previous: Option<V>,
    /// The filter had no subscriber before this insert: the caller may need to announce new interest.
    pub first_for_filter: bool,
}

/// Result of [`SubscriptionIndex::remove`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed<V> {
    /// The removed subscription's options; `None` when the key was not subscribed to the filter.
    pub value: Option<V>,
    /// The filter has no subscriber left: the caller may need to withdraw interest.
    pub last_for_filter: bool,
}

/// A subscriber list of one filter switches to an additional `key -> position` map above this many keys, so
/// that one filter with 10k subscribers costs O(1) per insert/remove instead of a linear scan.
const INDEX_ABOVE: usize = 16;
/// ... and drops that map again when it shrinks to this size (hysteresis against flapping).
const UNINDEX_AT: usize = 8;

/// The subscribers of one filter.
///
/// Kept as a plain vector of `(key, options)` because the publish path only iterates it. Finding a key to
/// replace or remove is a linear scan while the list is short; past [`INDEX_ABOVE`] keys a side map gives
/// each key's position, and removal is a `swap_remove` that patches the moved entry's position.
#[derive(Debug)]
struct Subscribers<K, V> {
    list: Vec<(K, V)>,
    /// `key -> position in list`, present only for long lists. Boxed because every node carries two of
    /// these fields and almost none use them: 8 bytes instead of a 48-byte map header.
    #[allow(clippy::box_collection)]
    positions: Option<Box<HashMap<K, usize>>>,
}

impl<K, V> Default for Subscribers<K, V> {
    fn default() -> Self {
        Subscribers { list: Vec::new(), positions: None }
    }
}

impl<K: Copy + Eq + Hash, V> Subscribers<K, V> {
    #[inline]
    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    fn position(&self, key: K) -> Option<usize> {
        match &self.positions {
            Some(map) => map.get(&key).copied(),
            None => self.list.iter().position(|(k, _)| *k == key),
        }
    }

    fn get(&self, key: K) -> Option<&V> {
        let pos = self.position(key)?;
        self.list.get(pos).map(|(_, v)| v)
    }

    /// Adds or replaces `key`'s options; returns the replaced ones.
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(slot) = self.position(key).and_then(|p| self.list.get_mut(p)) {
            return Some(std::mem::replace(&mut slot.1, value));
        }
        let pos = self.list.len();
        self.list.push((key, value));
        match &mut self.positions {
            Some(map) => {
                map.insert(key, pos);
            }
            None if self.list.len() > INDEX_ABOVE => {
                let map = self.list.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();
                self.positions = Some(Box::new(map));
            }
            None => {}
        }
        None
    }

    /// Removes `key`; returns its options if it was there.
    fn remove(&mut self, key: K) -> Option<V> {
        let pos = self.position(key)?;
        if pos >= self.list.len() {
            return None;
        }
        let (_, value) = self.list.swap_remove(pos);
        if let Some(map) = &mut self.positions {
            map.remove(&key);
            if let Some((moved, _)) = self.list.get(pos) {
                map.insert(*moved, pos);
            }
            if self.list.len() <= UNINDEX_AT {
                self.positions = None;
            }
        }
        // Give memory back after a mass unsubscribe; halving only when a quarter is used keeps this
        // amortised O(1).
        if self.list.is_empty() {
            self.list = Vec::new();
        } else if self.list.capacity() > 16 && self.list.len() * 4 < self.list.capacity() {
            self.list.shrink_to(self.list.len() * 2);
        }
        Some(value)
    }
}

/// One trie node: the filter spelled by the path from the root to it.
#[derive(Debug)]
struct Node<K, V> {
    /// Children through a literal level.
    children: Children,
    /// Child through a '+' level.
    plus: Option<usize>,
    /// Subscribers of the filter ending at this node.
    exact: Subscribers<K, V>,
    /// Subscribers of this node's filter followed by "/#" (or of "#" itself for the root). Stored here rather
    /// than in a child because '#' is always last and also matches this node's own level.
    multi: Subscribers<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: Children::default(),
            plus: None,
            exact: Subscribers::default(),
            multi: Subscribers::default(),
        }
    }
}

impl<K, V> Node<K, V> {
    /// The child reached through filter level `level`.
    #[inline]
    fn child(&self, level: &str) -> Option<usize> {
        if level == "+" {
            self.plus
        } else {
            self.children.get(level)
        }
    }

    /// Whether the node holds nothing and can be pruned.
    fn is_unused(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.list.is_empty()
            && self.multi.list.is_empty()
    }

    fn slot(&self, slot: Slot) -> &Subscribers<K, V> {
        match slot {
            Slot::Exact => &self.exact,
            Slot::Multi => &self.multi,
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Subscribers<K, V> {
        match slot {
            Slot::Exact => &mut self.exact,
            Slot::Multi => &mut self.multi,
        }
    }
}

/// Which subscriber list of a node a filter ends in.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Exact,
    Multi,
}

/// The subscription index of one core: topic filter -> subscribers, a trie on topic levels.
///
/// `K` identifies a subscriber (a session's slab key, or a core id for interest summaries); `V` holds the
/// subscription's options (a QoS today, more with v5).
///
/// Each node has literal children, a separate '+' child, and its "/#" subscribers stored in the node itself.
/// Nodes live in a slab arena addressed by index, so no operation recurses over the depth of a filter and
/// dropping the index is flat; freed slots are reused by later inserts, and the arena is reset once the index
/// is empty. Nodes left with no subscriber and no child are pruned on remove.
///
/// Filters are expected to be valid ([`super::valid_topic_filter`]). An invalid one is stored as if every
/// level but a final "#" and whole "+" levels were literal text; nothing panics.
#[derive(Debug)]
pub struct SubscriptionIndex<K, V> {
    nodes: Slab<Node<K, V>>,
    filters: usize,
    subscriptions: usize,
    /// Bumped by every insert and remove, never reset: what a [`MatchCache`] checks its entry against.
    generation: u64,
}

/// The matches of the last topic looked up through [`SubscriptionIndex::matches_cached`], valid while the
/// index has not changed since. A publisher sends to the same topic many times in a row (one read brings
/// dozens of its messages), and the trie walk is the largest user-space cost of routing one: measured at
/// about a sixth of the broker's user time under QoS 0 fan-in. One cache serves one index.
#[derive(Debug)]
pub struct MatchCache<K, V> {
    topic: String,
    /// The index's generation when the entry was filled; 0: no entry (index generations start at 1).
    generation: u64,
    matches: Vec<(K, V)>,
}

/// Match lists longer than this are not kept: the walk is then a small part of the work of delivering
/// them, and the cache would hold their memory.
const CACHE_MAX_MATCHES: usize = 64;
/// Topic capacity kept by the cache between lookups.
const CACHE_TOPIC_CAPACITY: usize = 256;

impl<K, V> Default for MatchCache<K, V> {
    fn default() -> Self {
        MatchCache { topic: String::new(), generation: 0, matches: Vec::new() }
    }
}

impl<K: Copy + Eq + Hash, V> Default for SubscriptionIndex<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Copy + Eq + Hash, V> SubscriptionIndex<K, V> {
    /// An empty index.
    pub fn new() -> Self {
        let mut nodes = Slab::new();
        // The first key of a fresh slab is 0 = ROOT.
        nodes.insert(Node::default());
        SubscriptionIndex { nodes, filters: 0, subscriptions: 0, generation: 1 }
    }

    /// Adds `key`'s subscription to `filter`, or replaces its options if it already had one (MQTT-3.8.4-3).
    /// Returns the previous options, and whether `filter` had no subscriber before.
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Inserted<V> {
        self.generation += 1;
        let mut node = ROOT;
        let mut rest = Some(filter);
        let slot = loop {
            let Some(r) = rest else { break Slot::Exact };
            let (level, next) = split_level(r);
            if level == "#" && next.is_none() {
                break Slot::Multi;
            }
            node = self.child_or_insert(node, level);
            rest = next;
        };
        let Some(subs) = self.nodes.get_mut(node).map(|n| n.slot_mut(slot)) else {
            // Unreachable: `node` was just found or created.
            return Inserted { previous: None, first_for_filter: false };
        };
        let first_for_filter = subs.is_empty();
        let previous = subs.insert(key, value);
        if previous.is_none() {
            self.subscriptions += 1;
            if first_for_filter {
                self.filters += 1;
            }
        }
        Inserted { previous, first_for_filter }
    }

    /// The child of `parent` through `level`, created if missing.
    fn child_or_insert(&mut self, parent: usize, level: &str) -> usize {
        if let Some(child) = self.nodes.get(parent).and_then(|p| p.child(level)) {
            return child;
        }
        let child = self.nodes.insert(Node::default());
        if let Some(p) = self.nodes.get_mut(parent) {
            if level == "+" {
                p.plus = Some(child);
            } else {
                p.children.insert(level, child);
            }
        }
        child
    }

    /// Finds the node and slot of `filter` without creating anything, recording in `path` each step as
    /// (parent, level) so that [`Self::remove`] can prune bottom-up without parent pointers.
    fn locate<'f>(
        &self,
        filter: &'f str,
        mut path: Option<&mut SmallVec<[(usize, &'f str); 16]>>,
    ) -> Option<(usize, Slot)> {
        let mut node = ROOT;
        let mut rest = Some(filter);
        loop {
            let Some(r) = rest else {
                return Some((node, Slot::Exact));
            };
            let (level, next) = split_level(r);
            if level == "#" && next.is_none() {
                return Some((node, Slot::Multi));
            }
            let child = self.nodes.get(node)?.child(level)?;
            if let Some(path) = path.as_deref_mut() {
                path.push((node, level));
            }
            node = child;
            rest = next;
        }
    }

    /// Removes `key`'s subscription to `filter`. `last_for_filter` is true when this removed the filter's
    /// last subscriber.
    pub fn remove(&mut self, filter: &str, key: K) -> Removed<V> {
        self.generation += 1;
        let not_found = Removed { value: None, last_for_filter: false };
        let mut path = SmallVec::new();
        let Some((node, slot)) = self.locate(filter, Some(&mut path)) else {
            return not_found;
        };
        let Some(subs) = self.nodes.get_mut(node).map(|n| n.slot_mut(slot)) else {
            return not_found;
        };
        let Some(value) = subs.remove(key) else {
            return not_found;
        };
        let last_for_filter = subs.is_empty();
        self.subscriptions = self.subscriptions.saturating_sub(1);
        if last_for_filter {
            self.filters = self.filters.saturating_sub(1);
            self.prune(node, &path);
        }
        Removed { value: Some(value), last_for_filter }
    }

    /// Removes `node` and its ancestors along `path` while they hold nothing.
    fn prune(&mut self, mut node: usize, path: &[(usize, &str)]) {
        for &(parent, level) in path.iter().rev() {
            if !self.nodes.get(node).is_some_and(Node::is_unused) {
                return;
            }
            self.nodes.try_remove(node);
            if let Some(p) = self.nodes.get_mut(parent) {
                if level == "+" {
                    p.plus = None;
                } else {
                    p.children.remove(level);
                }
            }
            node = parent;
        }
        if self.filters == 0 && self.nodes.len() == 1 {
            // Only the (empty) root is left: start a fresh arena so the slab's peak size is released. The
            // generation goes on: a cache filled before must not match again.
            let generation = self.generation;
            *self = Self::new();
            self.generation = generation;
        }
    }

    /// The options of `key`'s subscription to exactly `filter` (no wildcard matching), if any.
    pub fn get(&self, filter: &str, key: K) -> Option<&V> {
        let (node, slot) = self.locate(filter, None)?;
        self.nodes.get(node)?.slot(slot).get(key)
    }

    /// Calls `f(key, options)` for every subscription whose filter matches `topic`. A key subscribed through
    /// several matching filters is reported once per filter; the caller dedups (MQTT-3.3.5-1 leaves it the
    /// choice, and it knows which QoS rule to apply).
    ///
    /// Does not allocate unless the walk has to keep more than 32 pending branches, which takes a topic
    /// deeper than ~32 levels meeting both '+' and literal subscriptions all along the way.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(K, &V)) {
        let _ = self.walk(topic, |subs| {
            for (k, v) in &subs.list {
                f(*k, v);
            }
            ControlFlow::Continue(())
        });
    }

    /// The subscriptions whose filter matches `topic`, as [`Self::for_each_match`] reports them, through
    /// `cache`: the walk is skipped when `cache` holds `topic` from an unchanged index.
    pub fn matches_cached<'c>(&self, topic: &str, cache: &'c mut MatchCache<K, V>) -> &'c [(K, V)]
    where
        V: Clone,
    {
        if cache.generation != self.generation || cache.topic != topic {
            cache.matches.clear();
            cache.matches.shrink_to(CACHE_MAX_MATCHES);
            self.for_each_match(topic, |k, v| cache.matches.push((k, v.clone())));
            cache.topic.clear();
            cache.topic.shrink_to(CACHE_TOPIC_CAPACITY);
            cache.topic.push_str(topic);
            // Too many to keep: used for this lookup only.
            cache.generation = if cache.matches.len() <= CACHE_MAX_MATCHES { self.generation } else { 0 };
        }
        &cache.matches
    }

    /// Whether any subscribed filter matches `topic`; stops at the first one found.
    pub fn any_match(&self, topic: &str) -> bool {
        self.walk(
            topic,
            |subs| {
                if subs.is_empty() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
        .is_break()
    }

    /// Visits every subscriber list whose filter matches `topic`, depth-first with an explicit stack of
    /// (node, rest of the topic after that node's level) so a deep topic cannot overflow the call stack.
    fn walk<'t>(
        &self,
        topic: &'t str,
        mut visit: impl FnMut(&Subscribers<K, V>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let Some(root) = self.nodes.get(ROOT) else {
            return ControlFlow::Continue(());
        };
        let mut stack: SmallVec<[(usize, Option<&'t str>); 32]> = SmallVec::new();
        let (first, rest) = split_level(topic);
        // MQTT-4.7.2-1: filters starting with a wildcard do not match topics starting with '$'. Only the
        // root's '#' and '+' are such filters.
        if !topic.starts_with('$') {
            visit(&root.multi)?;
            if let Some(plus) = root.plus {
                stack.push((plus, rest));
            }
        }
        if let Some(child) = root.children.get(first) {
            stack.push((child, rest));
        }
        while let Some((index, rest)) = stack.pop() {
            let Some(node) = self.nodes.get(index) else {
                continue;
            };
            // "x/#" matches "x" itself as well as anything below it.
            visit(&node.multi)?;
            match rest {
                None => visit(&node.exact)?,
                Some(rest) => {
                    let (level, next) = split_level(rest);
                    if let Some(plus) = node.plus {
                        stack.push((plus, next));
                    }
                    if let Some(child) = node.children.get(level) {
                        stack.push((child, next));
                    }
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Number of distinct filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Number of (filter, key) subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions
    }

    /// Whether the index holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.subscriptions == 0
    }

    /// Number of live trie nodes, root included (1 when empty): for memory accounting and tests.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(index: &SubscriptionIndex<u32, u8>, topic: &str) -> Vec<(u32, u8)> {
        let mut out = Vec::new();
        index.for_each_match(topic, |k, v| out.push((k, *v)));
        out.sort_unstable();
        out
    }

    #[test]
    fn match_cache_keeps_short_lists_only_and_gives_back_long_ones() {
        let mut ix = SubscriptionIndex::new();
        let mut cache = MatchCache::default();
        ix.insert("a/+", 1u32, 0u8);
        assert_eq!(ix.matches_cached("a/b", &mut cache), &[(1, 0)]);
        assert_eq!(cache.generation, ix.generation, "a short list is kept");
        assert_eq!(ix.matches_cached("a/b", &mut cache), &[(1, 0)]);
        assert!(ix.matches_cached("b", &mut cache).is_empty());
        // More subscribers than the cache keeps: still all reported, but not kept.
        let many = CACHE_MAX_MATCHES as u32 + 1;
        for k in 2..=many {
            ix.insert("a/b", k, 1);
        }
        assert_eq!(ix.matches_cached("a/b", &mut cache).len(), many as usize);
        assert_eq!(cache.generation, 0, "a long list is used once, not kept");
        assert_eq!(ix.matches_cached("a/b", &mut cache).len(), many as usize);
        // The next short lookup gives the long list's memory back.
        assert_eq!(ix.matches_cached("a/c", &mut cache), &[(1, 0)]);
        assert!(cache.matches.capacity() <= CACHE_MAX_MATCHES);
    }

    #[test]
    fn match_cache_survives_no_reset_of_the_trie() {
        let mut ix = SubscriptionIndex::new();
        let mut cache = MatchCache::default();
        ix.insert("a", 1u32, 0u8);
        assert_eq!(ix.matches_cached("a", &mut cache), &[(1, 0)]);
        // The last remove resets the trie to a fresh arena; as many changes later, the index must still
        // not look like the one the entry was filled from.
        ix.remove("a", 1);
        ix.insert("a", 2, 0);
        assert_eq!(ix.matches_cached("a", &mut cache), &[(2, 0)]);
    }

    #[test]
    fn insert_replace_remove() {
        let mut ix = SubscriptionIndex::new();
        let r = ix.insert("a/b", 1u32, 0u8);
        assert_eq!(r, Inserted { previous: None, first_for_filter: true });
        let r = ix.insert("a/b", 2, 1);
        assert_eq!(r, Inserted { previous: None, first_for_filter: false });
        let r = ix.insert("a/b", 1, 2);
        assert_eq!(r, Inserted { previous: Some(0), first_for_filter: false });
        assert_eq!(ix.filter_count(), 1);
        assert_eq!(ix.subscription_count(), 2);
        assert_eq!(ix.get("a/b", 1), Some(&2));
        assert_eq!(ix.get("a/+", 1), None);
        assert_eq!(matched(&ix, "a/b"), vec![(1, 2), (2, 1)]);

        assert_eq!(ix.remove("a/b", 3), Removed { value: None, last_for_filter: false });
        assert_eq!(ix.remove("a/c", 1), Removed { value: None, last_for_filter: false });
        assert_eq!(ix.remove("a/b", 1), Removed { value: Some(2), last_for_filter: false });
        assert_eq!(ix.remove("a/b", 2), Removed { value: Some(1), last_for_filter: true });
        assert_eq!(ix.remove("a/b", 2), Removed { value: None, last_for_filter: false });
        assert_eq!(ix.filter_count(), 0);
        assert_eq!(ix.subscription_count(), 0);
        assert_eq!(ix.node_count(), 1);
        assert!(!ix.any_match("a/b"));
    }

    #[test]
    fn wildcards_and_dollar() {
        let mut ix = SubscriptionIndex::new();
        ix.insert("#", 1u32, 0u8);
        ix.insert("+/monitor/Clients", 2, 0);
        ix.insert("$SYS/#", 3, 0);
        ix.insert("sport/#", 4, 0);
        ix.insert("+/+", 5, 0);
        ix.insert("sport/tennis/+", 6, 0);
        ix.insert("sport/tennis/+", 7, 1);
        assert_eq!(matched(&ix, "$SYS/monitor/Clients"), vec![(3, 0)]);
        assert_eq!(matched(&ix, "$SYS"), vec![(3, 0)]);
        assert_eq!(matched(&ix, "x/monitor/Clients"), vec![(1, 0), (2, 0)]);
        assert_eq!(matched(&ix, "sport"), vec![(1, 0), (4, 0)]);
        assert_eq!(matched(&ix, "/finance"), vec![(1, 0), (5, 0)]);
        assert_eq!(matched(&ix, "sport/tennis"), vec![(1, 0), (4, 0), (5, 0)]);
        assert_eq!(matched(&ix, "sport/tennis/player1"), vec![(1, 0), (4, 0), (6, 0), (7, 1)]);
        assert!(ix.any_match("$SYS/x"));
        assert!(!ix.any_match("$other"));
        ix.remove("#", 1);
        assert!(!ix.any_match("a"));
        assert!(ix.any_match("a/"));
    }

    #[test]
    fn same_key_through_several_filters_is_reported_per_filter() {
        let mut ix = SubscriptionIndex::new();
        ix.insert("a/+", 1u32, 0u8);
        ix.insert("a/#", 1, 1);
        ix.insert("a/b", 1, 2);
        assert_eq!(matched(&ix, "a/b"), vec![(1, 0), (1, 1), (1, 2)]);
        assert_eq!(ix.filter_count(), 3);
        assert_eq!(ix.subscription_count(), 3);
    }

    #[test]
    fn many_subscribers_on_one_filter() {
        // 20k keys on one filter: with the position map this is linear overall; a quadratic scan would
        // still finish but this keeps the index path exercised (swap_remove + position patching).
        let mut ix = SubscriptionIndex::new();
        let n = 20_000u32;
        for k in 0..n {
            let r = ix.insert("big/+", k, (k % 3) as u8);
            assert_eq!(r.first_for_filter, k == 0);
        }
        for k in (0..n).step_by(2) {
            assert_eq!(ix.insert("big/+", k, 9).previous, Some((k % 3) as u8));
        }
        assert_eq!(ix.subscription_count(), n as usize);
        let mut count = 0;
        ix.for_each_match("big/x", |k, v| {
            assert_eq!(*v, if k % 2 == 0 { 9 } else { (k % 3) as u8 });
            count += 1;
        });
        assert_eq!(count, n);
        // Remove in an order that moves entries around: odd keys from the end, then even keys from the start.
        for k in (0..n).rev().filter(|k| k & 1 == 1).chain((0..n).step_by(2)) {
            let r = ix.remove("big/+", k);
            assert!(r.value.is_some(), "key {k}");
            assert_eq!(r.last_for_filter, ix.subscription_count() == 0);
            assert_eq!(ix.get("big/+", k), None);
        }
        assert_eq!(ix.filter_count(), 0);
        assert_eq!(ix.node_count(), 1);
    }

    #[test]
    fn deep_topics_do_not_overflow_the_stack() {
        let depth = 30_000;
        let plus_filter = vec!["+"; depth].join("/");
        let literal_filter = vec!["a"; depth].join("/");
        let mixed_filter = format!("{}/#", vec!["a"; depth / 2].join("/"));
        let topic = literal_filter.clone();
        let mut ix = SubscriptionIndex::new();
        ix.insert(&plus_filter, 1u32, 0u8);
        ix.insert(&literal_filter, 2, 0);
        ix.insert(&mixed_filter, 3, 0);
        assert_eq!(matched(&ix, &topic), vec![(1, 0), (2, 0), (3, 0)]);
        assert!(ix.any_match(&topic));
        assert!(ix.remove(&literal_filter, 2).last_for_filter);
        assert_eq!(matched(&ix, &topic), vec![(1, 0), (3, 0)]);
        // Dropping a deep trie is flat as well.
        drop(ix);

        let mut ix = SubscriptionIndex::new();
        ix.insert(&plus_filter, 1u32, 0u8);
        ix.insert(&literal_filter, 2, 0);
        assert!(ix.remove(&plus_filter, 1).last_for_filter);
        assert!(ix.remove(&literal_filter, 2).last_for_filter);
        assert_eq!(ix.node_count(), 1);
    }

    #[test]
    fn invalid_filters_do_not_panic() {
        let mut ix = SubscriptionIndex::new();
        for f in ["", "#/a", "a/#/b", "a+", "##", "/"] {
            ix.insert(f, 1u32, 0u8);
            assert_eq!(ix.get(f, 1), Some(&0));
        }
        ix.for_each_match("a/#/b", |_, _| {});
        for f in ["", "#/a", "a/#/b", "a+", "##", "/"] {
            assert_eq!(ix.remove(f, 1).value, Some(0));
        }
        assert_eq!(ix.node_count(), 1);
    }
}
