//! Validation of topic names and filters, and the reference matcher.

/// Longest topic name or filter in bytes: its length is a 16-bit prefix on the wire (MQTT 3.1.1 §1.5.3).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Whether `s` is a valid topic name for a PUBLISH (MQTT 3.1.1 §4.7): non-empty (MQTT-4.7.3-1), no '+' or
/// '#' (MQTT-3.3.2-2), no U+0000 (MQTT-1.5.3-2; the codec already rejects it, checked again here so this
/// function is complete on its own), at most 65,535 bytes.
pub fn valid_topic_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOPIC_LEN && !s.bytes().any(|b| matches!(b, b'+' | b'#' | b'\0'))
}

/// Whether `s` is a valid topic filter for a SUBSCRIBE or UNSUBSCRIBE (MQTT 3.1.1 §4.7.1): non-empty, at most
/// 65,535 bytes, no U+0000, '#' only as the whole last level (MQTT-4.7.1-2) and '+' only as a whole level
/// (MQTT-4.7.1-3).
///
/// A shared subscription `$share/{group}/{filter}` is checked as a whole by [`parse_shared`] instead.
pub fn valid_topic_filter(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_TOPIC_LEN || s.contains('\0') {
        return false;
    }
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') {
            if level != "#" || levels.peek().is_some() {
                return false;
            }
        } else if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Splits a shared subscription `$share/{group}/{filter}` (MQTT 5.0 §4.8.2) into its group and filter.
/// `None` if `s` is not one; `Some(Err(()))` if it is one but malformed: an empty group, a group with a
/// wildcard (MQTT-4.8.2-2), or an invalid or missing filter (MQTT-4.8.2-1).
#[allow(clippy::result_unit_err)]
pub fn parse_shared(s: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = s.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, filter))
            if !group.is_empty() && !group.contains(['+', '#']) && valid_topic_filter(filter) =>
        {
            Ok((group, filter))
        }
        _ => Err(()),
    })
}

/// A subscription's filter as the broker reads it: plain, or the filter of a shared group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter<'a> {
    Plain(&'a str),
    /// `$share/{group}/{filter}`: `name` is the whole text (how the broker names the group: two groups of
    /// the same name with different filters are different groups), `filter` what matches topics.
    Shared {
        name: &'a str,
        filter: &'a str,
    },
}

impl<'a> Filter<'a> {
    /// Reads a subscription's filter; `None` if it is not a valid one (the SUBACK code is 0x8F).
    pub fn parse(s: &'a str) -> Option<Filter<'a>> {
        match parse_shared(s) {
            None => valid_topic_filter(s).then_some(Filter::Plain(s)),
            Some(Ok((_, filter))) => Some(Filter::Shared { name: s, filter }),
            Some(Err(())) => None,
        }
    }

    /// The part that is matched against topic names.
    pub fn matching(&self) -> &'a str {
        match *self {
            Filter::Plain(f) | Filter::Shared { filter: f, .. } => f,
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Filter::Shared { .. })
    }
}

/// Whether the subscription `s` (already accepted) is a shared one: the cheap test for filters the broker
/// keeps, which [`Filter::parse`] checked when they were subscribed.
pub fn is_shared(s: &str) -> bool {
    s.starts_with("$share/")
}

/// Whether `filter` matches `topic`, MQTT 3.1.1 §4.7.
///
/// `+` matches exactly one level, which may be empty; `#` matches its parent level and any number of child
/// levels ("sport/#" matches "sport"); a filter whose first character is a wildcard does not match a topic
/// whose first character is '$' (MQTT-4.7.2-1).
///
/// This is the reference implementation, written for clarity: the tries are property-tested against it.
/// Both arguments are expected to be valid (see [`valid_topic_filter`] and [`valid_topic_name`]); on invalid
/// input it still returns an answer without panicking.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match filter_levels.next() {
            None => return topic_levels.next().is_none(),
            // '#' matches whatever is left, including nothing (the parent level itself).
            Some("#") => return true,
            Some("+") => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            Some(level) => {
                if topic_levels.next() != Some(level) {
                    return false;
                }
            }
        }
    }
}

/// Number of levels of a topic name or filter: one more than the number of '/' ("a" has 1, "/a" and "a/"
/// have 2, "" has 1).
pub fn level_count(s: &str) -> usize {
    s.bytes().filter(|&b| b == b'/').count().saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        for ok in ["a", "/", "a/b", "/finance", "sport/tennis/", "$SYS/x", " ", "é/ü", "//"] {
            assert!(valid_topic_name(ok), "{ok:?} should be valid");
        }
        for bad in ["", "a/+", "+", "#", "a/#", "a+b", "a#", "a\0b"] {
            assert!(!valid_topic_name(bad), "{bad:?} should be invalid");
        }
        assert!(valid_topic_name(&"a".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        // §4.7.1.2 / §4.7.1.3 examples and some more.
        for ok in [
            "#",
            "sport/tennis/#",
            "sport/#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "a//b",
            "/",
            "$SYS/#",
            "$share/group/a/+",
            "+/#",
            "a/b",
        ] {
            assert!(valid_topic_filter(ok), "{ok:?} should be valid");
        }
        for bad in [
            "",
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "a/+b",
            "#/a",
            "##",
            "a/#/",
            "++",
            "a\0",
        ] {
            assert!(!valid_topic_filter(bad), "{bad:?} should be invalid");
        }
        assert!(valid_topic_filter(&"+/".repeat(30_000)[..59_999]));
        assert!(!valid_topic_filter(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn spec_examples_multi_level() {
        // §4.7.1.2
        for t in
            ["sport/tennis/player1", "sport/tennis/player1/ranking", "sport/tennis/player1/score/wimbledon"]
        {
            assert!(matches("sport/tennis/player1/#", t));
        }
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/player1/#", "sport/tennis/player2"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/"));
        assert!(!matches("sport/#", "sports"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("#", "/"));
    }

    #[test]
    fn spec_examples_single_level() {
        // §4.7.1.3
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+", ""));
        assert!(matches("+/tennis/#", "sport/tennis"));
        assert!(matches("+/tennis/#", "sport/tennis/x/y"));
        assert!(!matches("+/tennis/#", "sport/golf"));
    }

    #[test]
    fn dollar_topics() {
        // §4.7.2
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(!matches("+", "$"));
        // Only the first level is special.
        assert!(matches("a/+", "a/$x"));
        assert!(matches("a/#", "a/$x"));
    }

    #[test]
    fn exact_and_empty_levels() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/"));
        assert!(!matches("a/b/", "a/b"));
        assert!(matches("a//b", "a//b"));
        assert!(matches("a/+/b", "a//b"));
        assert!(!matches("a/b", "a"));
        assert!(!matches("a", "a/b"));
        assert!(matches("/", "/"));
        assert!(matches("+/+", "/"));
    }

    #[test]
    fn level_counts() {
        assert_eq!(level_count(""), 1);
        assert_eq!(level_count("a"), 1);
        assert_eq!(level_count("/"), 2);
        assert_eq!(level_count("a/b/c"), 3);
        assert_eq!(level_count("sport/tennis/#"), 3);
        assert_eq!(level_count("a//"), 3);
    }

    #[test]
    fn shared_subscriptions_are_parsed() {
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$share/g/a/+"), Some(Ok(("g", "a/+"))));
        assert_eq!(parse_shared("$share/g/#"), Some(Ok(("g", "#"))));
        assert_eq!(parse_shared("$share/g/"), Some(Err(())));
        assert_eq!(parse_shared("$share//a"), Some(Err(())));
        assert_eq!(parse_shared("$share/g+/a"), Some(Err(())));
        assert_eq!(parse_shared("$share/g"), Some(Err(())));
        assert_eq!(parse_shared("$share/g/a/#/b"), Some(Err(())));
        assert_eq!(parse_shared("$sharex/g/a"), None);
        assert_eq!(Filter::parse("a/+"), Some(Filter::Plain("a/+")));
        assert_eq!(Filter::parse("a/#/b"), None);
        assert_eq!(
            Filter::parse("$share/g/a/#"),
            Some(Filter::Shared { name: "$share/g/a/#", filter: "a/#" })
        );
        assert_eq!(Filter::parse("$share/g+/a"), None);
        assert!(is_shared("$share/g/a") && !is_shared("$sharex/g/a") && !is_shared("a"));
    }
}
