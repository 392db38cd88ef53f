//! Retained messages: topic name -> value, looked up by topic filter when a client subscribes.

use slab::Slab;
use smallvec::SmallVec;

use super::children::Children;
use super::split_level;

/// Arena index of the root node; it is never removed.
const ROOT: usize = 0;

#[derive(Debug)]
struct Node<V> {
    children: Children,
    /// The retained value of the topic spelled by the path to this node. Always `None` for the root: even
    /// the empty topic "" has one (empty) level, so it lives in the root's child "".
    value: Option<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node { children: Children::default(), value: None }
    }
}

/// How a pending node of a filter lookup is to be matched.
#[derive(Debug, Clone, Copy)]
enum Mode<'f> {
    /// The node matched the filter so far; `Some(rest)` is what remains of the filter below it.
    Filter(Option<&'f str>),
    /// The node is under a '#': it and its whole subtree match.
    All,
}

/// A pending node of a filter lookup.
struct Pending<'a> {
    node: usize,
    /// The node's level text.
    level: &'a str,
    /// Length of the parent's topic in the path buffer, `None` for a child of the root.
    parent_len: Option<usize>,
    mode: Mode<'a>,
}

/// The retained messages of the whole broker as one core sees them: topic name -> `V`, a trie on levels,
/// looked up by a filter (with wildcards) when a client subscribes (MQTT 3.1.1 §3.3.1.3).
///
/// Like [`super::SubscriptionIndex`], nodes live in a slab arena so that no operation recurses over the
/// depth of a topic and drop is flat; nodes with no value and no child are pruned on remove.
///
/// Topics are expected to be valid topic names; wildcard characters in them are stored as literal text.
#[derive(Debug)]
pub struct RetainedTree<V> {
    nodes: Slab<Node<V>>,
    len: usize,
}

impl<V> Default for RetainedTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainedTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        let mut nodes = Slab::new();
        // The first key of a fresh slab is 0 = ROOT.
        nodes.insert(Node::default());
        RetainedTree { nodes, len: 0 }
    }

    /// Sets the retained value of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = ROOT;
        let mut rest = Some(topic);
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = self.child_or_insert(node, level);
            rest = next;
        }
        let slot = &mut self.nodes.get_mut(node)?.value;
        let previous = slot.replace(value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    fn child_or_insert(&mut self, parent: usize, level: &str) -> usize {
        if let Some(child) = self.nodes.get(parent).and_then(|p| p.children.get(level)) {
            return child;
        }
        let child = self.nodes.insert(Node::default());
        if let Some(p) = self.nodes.get_mut(parent) {
            p.children.insert(level, child);
        }
        child
    }

    /// The node of `topic`, if present.
    fn find(&self, topic: &str) -> Option<usize> {
        let mut node = ROOT;
        let mut rest = Some(topic);
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            node = self.nodes.get(node)?.children.get(level)?;
            rest = next;
        }
        Some(node)
    }

    /// Removes the retained value of `topic` (a retained PUBLISH with an empty payload, MQTT-3.3.1-10),
    /// pruning the nodes left empty.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        // The (parent, level) steps down to the topic, to prune bottom-up without parent pointers.
        let mut path: SmallVec<[(usize, &str); 16]> = SmallVec::new();
        let mut node = ROOT;
        let mut rest = Some(topic);
        while let Some(r) = rest {
            let (level, next) = split_level(r);
            let child = self.nodes.get(node)?.children.get(level)?;
            path.push((node, level));
            node = child;
            rest = next;
        }
        let value = self.nodes.get_mut(node)?.value.take()?;
        self.len = self.len.saturating_sub(1);
        for &(parent, level) in path.iter().rev() {
            let unused = self.nodes.get(node).is_some_and(|n| n.value.is_none() && n.children.is_empty());
            if !unused {
                break;
            }
            self.nodes.try_remove(node);
            if let Some(p) = self.nodes.get_mut(parent) {
                p.children.remove(level);
            }
            node = parent;
        }
        if self.len == 0 && self.nodes.len() == 1 {
            // Only the root is left: start a fresh arena so the slab's peak size is released.
            self.nodes = Self::new().nodes;
        }
        Some(value)
    }

    /// The retained value of exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        self.nodes.get(self.find(topic)?)?.value.as_ref()
    }

    /// Calls `f(topic, value)` for each retained topic matching `filter`, in no particular order, with the
    /// '$' rule of MQTT-4.7.2-1: "#" and "+/x" do not return "$SYS/x".
    ///
    /// Allocates a buffer for the topic text and a work list; this runs once per SUBSCRIBE, not per PUBLISH.
    /// A '#' level that is not last (an invalid filter) is taken as literal text.
    pub fn for_each_match(&self, filter: &str, mut f: impl FnMut(&str, &V)) {
        let Some(root) = self.nodes.get(ROOT) else {
            return;
        };
        let mut topic = String::new();
        let mut stack: Vec<Pending<'_>> = Vec::new();
        let (first, rest) = split_level(filter);
        match (first, rest) {
            ("#", None) | ("+", _) => {
                let mode = if first == "#" { Mode::All } else { Mode::Filter(rest) };
                root.children.for_each(|level, node| {
                    // MQTT-4.7.2-1: a wildcard first level does not match a '$' first level.
                    if !level.starts_with('$') {
                        stack.push(Pending { node, level, parent_len: None, mode });
                    }
                });
            }
            _ => {
                if let Some(node) = root.children.get(first) {
                    // The key stored in the trie is the same text as `first`; borrow it from the filter.
                    stack.push(Pending { node, level: first, parent_len: None, mode: Mode::Filter(rest) });
                }
            }
        }
        while let Some(p) = stack.pop() {
            let Some(node) = self.nodes.get(p.node) else {
                continue;
            };
            match p.parent_len {
                None => topic.clear(),
                Some(len) => {
                    topic.truncate(len);
                    topic.push('/');
                }
            }
            topic.push_str(p.level);
            let len = Some(topic.len());
            let report = |f: &mut dyn FnMut(&str, &V)| {
                if let Some(v) = &node.value {
                    f(&topic, v);
                }
            };
            match p.mode {
                Mode::All => {
                    report(&mut f);
                    push_children(&mut stack, node, len, Mode::All);
                }
                Mode::Filter(None) => report(&mut f),
                Mode::Filter(Some(rest)) => match split_level(rest) {
                    // "x/#" matches "x" itself and everything below it.
                    ("#", None) => {
                        report(&mut f);
                        push_children(&mut stack, node, len, Mode::All);
                    }
                    ("+", next) => push_children(&mut stack, node, len, Mode::Filter(next)),
                    (level, next) => {
                        if let Some(child) = node.children.get(level) {
                            stack.push(Pending {
                                node: child,
                                level,
                                parent_len: len,
                                mode: Mode::Filter(next),
                            });
                        }
                    }
                },
            }
        }
    }

    /// Number of retained topics.
    /// Calls `f` for every stored value, `$` topics included, in no particular order (snapshots).
    pub fn for_each(&self, mut f: impl FnMut(&V)) {
        for (_, node) in self.nodes.iter() {
            if let Some(v) = &node.value {
                f(v);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no topic is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of live trie nodes, root included (1 when empty): for memory accounting and tests.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

/// Queues every child of `node` for a lookup in `mode`.
fn push_children<'a, V>(
    stack: &mut Vec<Pending<'a>>,
    node: &'a Node<V>,
    parent_len: Option<usize>,
    mode: Mode<'a>,
) {
    node.children.for_each(|level, child| {
        stack.push(Pending { node: child, level, parent_len, mode });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(tree: &RetainedTree<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        tree.for_each_match(filter, |t, v| out.push((t.to_owned(), *v)));
        out.sort();
        out
    }

    fn owned(v: &[(&str, u32)]) -> Vec<(String, u32)> {
        v.iter().map(|(t, v)| (t.to_string(), *v)).collect()
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut t = RetainedTree::new();
        assert!(t.is_empty());
        assert_eq!(t.insert("a/b", 1u32), None);
        assert_eq!(t.insert("a/b", 2), Some(1));
        assert_eq!(t.insert("a", 3), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a/b"), Some(&2));
        assert_eq!(t.get("a"), Some(&3));
        assert_eq!(t.get("a/b/c"), None);
        assert_eq!(t.get("a/"), None);
        assert_eq!(t.remove("a/b/c"), None);
        assert_eq!(t.remove("a"), Some(3));
        assert_eq!(t.remove("a"), None);
        assert_eq!(t.get("a/b"), Some(&2));
        assert_eq!(t.remove("a/b"), Some(2));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 1);
    }

    #[test]
    fn lookups_by_filter() {
        let mut t = RetainedTree::new();
        for (i, topic) in
            ["sport", "sport/tennis", "sport/tennis/p1", "/finance", "$SYS/x", "$SYS", "", "a//b"]
                .iter()
                .enumerate()
        {
            t.insert(topic, i as u32);
        }
        assert_eq!(
            matched(&t, "#"),
            owned(&[
                ("", 6),
                ("/finance", 3),
                ("a//b", 7),
                ("sport", 0),
                ("sport/tennis", 1),
                ("sport/tennis/p1", 2)
            ])
        );
        assert_eq!(
            matched(&t, "sport/#"),
            owned(&[("sport", 0), ("sport/tennis", 1), ("sport/tennis/p1", 2)])
        );
        assert_eq!(matched(&t, "sport/+"), owned(&[("sport/tennis", 1)]));
        assert_eq!(matched(&t, "+/+"), owned(&[("/finance", 3), ("sport/tennis", 1)]));
        assert_eq!(matched(&t, "+"), owned(&[("", 6), ("sport", 0)]));
        assert_eq!(matched(&t, "$SYS/#"), owned(&[("$SYS", 5), ("$SYS/x", 4)]));
        assert_eq!(matched(&t, "+/x"), owned(&[]));
        assert_eq!(matched(&t, "a/+/b"), owned(&[("a//b", 7)]));
        assert_eq!(matched(&t, "sport/tennis/p1"), owned(&[("sport/tennis/p1", 2)]));
        assert_eq!(matched(&t, "sport/tennis/p2"), owned(&[]));
    }

    #[test]
    fn deep_topics_do_not_overflow_the_stack() {
        let depth = 30_000;
        let topic = vec!["a"; depth].join("/");
        let mut t = RetainedTree::new();
        t.insert(&topic, 1u32);
        t.insert("a", 2);
        assert_eq!(matched(&t, "#").len(), 2);
        assert_eq!(matched(&t, &vec!["+"; depth].join("/")), vec![(topic.clone(), 1)]);
        assert_eq!(t.remove(&topic), Some(1));
        assert_eq!(t.node_count(), 2);
        t.insert(&topic, 1u32);
        drop(t);
    }
}
