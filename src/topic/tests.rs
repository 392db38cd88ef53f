//! Property tests: both tries agree exactly with the reference matcher [`matches`].

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

/// Levels a topic name is made of: a small alphabet so that random filters and topics often meet, with the
/// empty level and a '$' level.
fn topic_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "a", "b", "$x"])
}

/// Levels a filter is made of (besides a final '#').
fn filter_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "a", "b", "$x", "+"])
}

fn topic() -> impl Strategy<Value = String> {
    // A single empty level would be "", which is not a valid topic name.
    prop::collection::vec(topic_level(), 1..5)
        .prop_map(|l| l.join("/"))
        .prop_filter("non-empty", |t| !t.is_empty())
}

fn filter() -> impl Strategy<Value = String> {
    (prop::collection::vec(filter_level(), 0..4), any::<bool>()).prop_map(|(mut levels, hash)| {
        // `[]` and `[""]` would make "", which is not a valid filter.
        if hash || levels.join("/").is_empty() {
            levels.push("#");
        }
        levels.join("/")
    })
}

#[derive(Debug, Clone)]
enum Op {
    Insert(usize, u8, u8),
    Remove(usize, u8),
}

fn ops(pool: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0..pool, 0..4u8, any::<u8>()).prop_map(|(f, k, v)| Op::Insert(f, k, v)),
        2 => (0..pool, 0..4u8).prop_map(|(f, k)| Op::Remove(f, k)),
    ];
    prop::collection::vec(op, 0..60)
}

/// What `for_each_match` must report for `topic` according to the oracle, sorted.
fn expected(model: &BTreeMap<(String, u8), u8>, topic: &str) -> Vec<(u8, u8)> {
    let mut out: Vec<(u8, u8)> =
        model.iter().filter(|((f, _), _)| matches(f, topic)).map(|((_, k), v)| (*k, *v)).collect();
    out.sort_unstable();
    out
}

fn actual(index: &SubscriptionIndex<u8, u8>, topic: &str) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    index.for_each_match(topic, |k, v| out.push((k, *v)));
    out.sort_unstable();
    out
}

/// The same, looked up through `cache`.
fn cached(index: &SubscriptionIndex<u8, u8>, cache: &mut MatchCache<u8, u8>, topic: &str) -> Vec<(u8, u8)> {
    let mut out = index.matches_cached(topic, cache).to_vec();
    out.sort_unstable();
    out
}

proptest! {
    #[test]
    fn generated_names_and_filters_are_valid(t in topic(), f in filter()) {
        prop_assert!(valid_topic_name(&t));
        prop_assert!(valid_topic_filter(&f));
        prop_assert!(valid_topic_filter(&t));
        // A topic name used as a filter matches itself.
        prop_assert!(matches(&t, &t));
        prop_assert_eq!(level_count(&t), t.split('/').count());
    }

    #[test]
    fn index_agrees_with_oracle(
        pool in prop::collection::vec(filter(), 1..8),
        ops in ops(8),
        topics in prop::collection::vec(topic(), 1..12),
    ) {
        let mut index = SubscriptionIndex::new();
        let mut model: BTreeMap<(String, u8), u8> = BTreeMap::new();
        // One cache for the whole run: each check below looks a topic up through it twice, so it is
        // filled, hit, and must notice every change of the index in between.
        let mut cache = MatchCache::default();
        for op in ops {
            match op {
                Op::Insert(f, k, v) => {
                    let f = &pool[f % pool.len()];
                    let first = !model.keys().any(|(mf, _)| mf == f);
                    let previous = model.insert((f.clone(), k), v);
                    let r = index.insert(f, k, v);
                    prop_assert_eq!(r, Inserted { previous, first_for_filter: first });
                    prop_assert_eq!(index.get(f, k), Some(&v));
                }
                Op::Remove(f, k) => {
                    let f = &pool[f % pool.len()];
                    let value = model.remove(&(f.clone(), k));
                    let last = value.is_some() && !model.keys().any(|(mf, _)| mf == f);
                    let r = index.remove(f, k);
                    prop_assert_eq!(r, Removed { value, last_for_filter: last });
                    prop_assert_eq!(index.get(f, k), None);
                }
            }
            let filters: BTreeSet<&String> = model.keys().map(|(f, _)| f).collect();
            prop_assert_eq!(index.filter_count(), filters.len());
            prop_assert_eq!(index.subscription_count(), model.len());
            for t in &topics {
                let want = expected(&model, t);
                prop_assert_eq!(index.any_match(t), !want.is_empty());
                prop_assert_eq!(&actual(&index, t), &want, "topic {:?}", t);
                prop_assert_eq!(&cached(&index, &mut cache, t), &want, "topic {:?}, cached", t);
                prop_assert_eq!(&cached(&index, &mut cache, t), &want, "topic {:?}, cached again", t);
            }
        }
        // Removing everything leaves an empty trie.
        let keys: Vec<(String, u8)> = model.keys().cloned().collect();
        for (f, k) in keys {
            prop_assert!(index.remove(&f, k).value.is_some());
        }
        prop_assert_eq!(index.filter_count(), 0);
        prop_assert_eq!(index.subscription_count(), 0);
        prop_assert_eq!(index.node_count(), 1);
        for t in &topics {
            prop_assert!(!index.any_match(t));
            // The trie was reset to a fresh arena on the way: a cached entry must not survive that.
            prop_assert!(index.matches_cached(t, &mut cache).is_empty(), "topic {:?}, cached", t);
        }
    }

    #[test]
    fn retained_agrees_with_oracle(
        pool in prop::collection::vec(topic(), 1..10),
        ops in ops(10),
        filters in prop::collection::vec(filter(), 1..12),
    ) {
        let mut tree = RetainedTree::new();
        let mut model: BTreeMap<String, u8> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Insert(t, _, v) => {
                    let t = &pool[t % pool.len()];
                    prop_assert_eq!(tree.insert(t, v), model.insert(t.clone(), v));
                }
                Op::Remove(t, _) => {
                    let t = &pool[t % pool.len()];
                    prop_assert_eq!(tree.remove(t), model.remove(t));
                }
            }
            prop_assert_eq!(tree.len(), model.len());
            for t in &pool {
                prop_assert_eq!(tree.get(t), model.get(t));
            }
            for f in &filters {
                let mut got = Vec::new();
                tree.for_each_match(f, |t, v| got.push((t.to_owned(), *v)));
                got.sort();
                let want: Vec<(String, u8)> = model
                    .iter()
                    .filter(|(t, _)| matches(f, t))
                    .map(|(t, v)| (t.clone(), *v))
                    .collect();
                prop_assert_eq!(got, want, "filter {:?}", f);
            }
        }
        let topics: Vec<String> = model.keys().cloned().collect();
        for t in topics {
            prop_assert!(tree.remove(&t).is_some());
        }
        prop_assert!(tree.is_empty());
        prop_assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn validation_rejects_misplaced_wildcards(
        levels in prop::collection::vec(filter_level(), 0..4),
        junk in prop::sample::select(vec!["a+", "+a", "a#", "#a", "##", "++", "+#"]),
        at in 0usize..5,
    ) {
        let mut bad: Vec<&str> = levels.clone();
        bad.insert(at.min(bad.len()), junk);
        let bad = bad.join("/");
        prop_assert!(!valid_topic_filter(&bad), "{:?}", bad);
        prop_assert!(!valid_topic_name(&bad));
        // '#' followed by another level is invalid.
        let mut hash_then_more = levels;
        hash_then_more.insert(at.min(hash_then_more.len()), "#");
        hash_then_more.push("a");
        prop_assert!(!valid_topic_filter(&hash_then_more.join("/")));
    }
}
