//! Topic names, topic filters and the two tries built on them (MQTT 3.1.1 §4.7).
//!
//! This module is pure: no I/O, no dependency on other coremq modules. It provides
//! - validation of topic names and filters ([`valid_topic_name`], [`valid_topic_filter`]),
//! - the reference matcher [`matches`] (simple and obviously correct; the tries are tested against it),
//! - [`SubscriptionIndex`]: filter -> subscribers, looked up by a topic name on every PUBLISH,
//! - [`RetainedTree`]: topic name -> retained message, looked up by a filter on every SUBSCRIBE.
//!
//! Both tries keep their nodes in a flat slab arena rather than as nested boxes: nothing recurses over the
//! depth of a topic (a client may send a filter or topic with tens of thousands of levels), so neither a
//! lookup, an insert, a remove nor dropping the whole trie can overflow a core's stack.

mod children;
mod index;
mod retained;
mod validate;

#[cfg(test)]
mod tests;

pub use index::{Inserted, MatchCache, Removed, SubscriptionIndex};
pub use retained::RetainedTree;
pub use validate::{
    is_shared, level_count, matches, parse_shared, valid_topic_filter, valid_topic_name, Filter,
    MAX_TOPIC_LEN,
};

/// Splits off the first level of `s`: returns it and the rest after the '/', or `None` as the rest when `s`
/// was the last level. Shared by both tries so they agree on what a level is.
#[inline]
fn split_level(s: &str) -> (&str, Option<&str>) {
    // A plain byte loop: levels are short, and this runs for every level of every PUBLISH, where
    // `split_once`'s general char searcher showed up in profiles. '/' is ASCII, so both halves
    // start and end on char boundaries.
    match s.bytes().position(|b| b == b'/') {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    }
}
