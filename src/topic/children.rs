//! The literal children of a trie node: level text -> arena index of the child node.

use std::collections::HashMap;

/// Above this many children a node switches from a linear scan to a hash map.
///
/// Most nodes have a handful of children, and comparing a few short strings is cheaper than hashing one
/// level with SipHash. The hash map keeps `RandomState` (SipHash) on purpose: levels come from the network,
/// and a fixed-key fast hash would let a client degrade a wide node to linear time with colliding levels.
const PROMOTE_ABOVE: usize = 8;
/// A hashed node returns to a vector when it shrinks to this many children, so memory follows live
/// subscriptions; the gap with [`PROMOTE_ABOVE`] avoids flapping between the two forms.
const DEMOTE_AT: usize = 4;

/// Literal children of a node, keyed by the level's text.
#[derive(Debug)]
pub(super) enum Children {
    /// Few children: linear scan.
    Small(Vec<(Box<str>, usize)>),
    /// Many children: boxed so that the common small form keeps nodes compact (the map's own header is
    /// 48 bytes against 24 for the vector, and every node pays for the larger variant).
    #[allow(clippy::box_collection)]
    Map(Box<HashMap<Box<str>, usize>>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Small(Vec::new())
    }
}

impl Children {
    /// The child reached through `level`, if any.
    #[inline]
    pub(super) fn get(&self, level: &str) -> Option<usize> {
        match self {
            Children::Small(v) => v.iter().find(|(l, _)| &**l == level).map(|&(_, i)| i),
            Children::Map(m) => m.get(level).copied(),
        }
    }

    /// Records `child` as reached through `level`. The caller has checked that `level` is absent.
    pub(super) fn insert(&mut self, level: &str, child: usize) {
        match self {
            Children::Small(v) if v.len() < PROMOTE_ABOVE => v.push((level.into(), child)),
            Children::Small(v) => {
                let mut m: HashMap<Box<str>, usize> = v.drain(..).collect();
                m.insert(level.into(), child);
                *self = Children::Map(Box::new(m));
            }
            Children::Map(m) => {
                m.insert(level.into(), child);
            }
        }
    }

    /// Forgets the child reached through `level`, returning its index.
    pub(super) fn remove(&mut self, level: &str) -> Option<usize> {
        match self {
            Children::Small(v) => {
                let pos = v.iter().position(|(l, _)| &**l == level)?;
                let (_, child) = v.swap_remove(pos);
                if v.is_empty() {
                    // Release the buffer: a leaf-to-be should cost nothing beyond its node.
                    *v = Vec::new();
                }
                Some(child)
            }
            Children::Map(m) => {
                let child = m.remove(level)?;
                if m.len() <= DEMOTE_AT {
                    let v: Vec<(Box<str>, usize)> = m.drain().collect();
                    *self = Children::Small(v);
                }
                Some(child)
            }
        }
    }

    /// Whether the node has no literal child.
    #[inline]
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Children::Small(v) => v.is_empty(),
            Children::Map(m) => m.is_empty(),
        }
    }

    /// Calls `f(level, child)` for every literal child, in no particular order.
    pub(super) fn for_each<'s>(&'s self, mut f: impl FnMut(&'s str, usize)) {
        match self {
            Children::Small(v) => v.iter().for_each(|(l, i)| f(l, *i)),
            Children::Map(m) => m.iter().for_each(|(l, i)| f(l, *i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_and_demote_keep_contents() {
        let mut c = Children::default();
        let names: Vec<String> = (0..20).map(|i| format!("l{i}")).collect();
        for (i, n) in names.iter().enumerate() {
            assert_eq!(c.get(n), None);
            c.insert(n, i);
        }
        assert!(matches!(c, Children::Map(_)));
        for (i, n) in names.iter().enumerate() {
            assert_eq!(c.get(n), Some(i));
        }
        for (i, n) in names.iter().enumerate().take(17) {
            assert_eq!(c.remove(n), Some(i));
            assert_eq!(c.remove(n), None);
        }
        assert!(matches!(c, Children::Small(_)));
        let mut seen = Vec::new();
        c.for_each(|l, i| seen.push((l.to_owned(), i)));
        seen.sort();
        assert_eq!(seen, vec![("l17".into(), 17), ("l18".into(), 18), ("l19".into(), 19)]);
        for n in &names[17..] {
            assert!(c.remove(n).is_some());
        }
        assert!(c.is_empty());
    }
}
