//! The access control list, in mosquitto's `acl_file` format (see `man mosquitto.conf`), with mosquitto 2.0's
//! default-security semantics: once an ACL is configured, whatever no rule allows is denied, and `deny`
//! rules win over any allow rule.
//!
//! Rules are compiled into level vectors at parse time so that the per-PUBLISH and per-delivery checks walk
//! the topic once per rule without allocating; `%c`/`%u` in `pattern` rules are compared piece by piece
//! against the topic level instead of building the substituted filter.

use std::collections::HashMap;

/// MQTT caps topic names and filters at 65535 bytes (they are length-prefixed with a u16).
const MAX_FILTER_LEN: usize = 65_535;

/// What a rule grants, or for `Deny` refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

/// One piece of a `pattern` level that contains `%c` or `%u`.
#[derive(Clone, Debug)]
enum Piece {
    /// Text taken as is.
    Lit(Box<str>),
    /// `%c`: the client id.
    ClientId,
    /// `%u`: the username.
    Username,
}

/// One level of a compiled topic filter.
#[derive(Clone, Debug)]
enum Level {
    /// A level matched byte for byte.
    Lit(Box<str>),
    /// `+`: any single level.
    Plus,
    /// `#`: the rest of the topic, including the parent level.
    Hash,
    /// A `pattern` level mixing literal text with `%c`/`%u`; matched against the substituted text.
    Subst(Box<[Piece]>),
}

/// A compiled rule filter.
#[derive(Clone, Debug)]
struct Rule {
    levels: Box<[Level]>,
    /// The filter uses `%c`, so it only applies to clients whose id is safe to substitute.
    uses_client_id: bool,
    /// The filter uses `%u`, so it only applies to clients with a username that is safe to substitute.
    uses_username: bool,
}

/// The rules of one section, split by what they grant so that each check scans only the relevant ones.
/// `readwrite` rules are stored in both `read` and `write`.
#[derive(Clone, Debug, Default)]
struct RuleSet {
    read: Vec<Rule>,
    write: Vec<Rule>,
    deny: Vec<Rule>,
}

impl RuleSet {
    fn push(&mut self, access: Access, rule: Rule) {
        match access {
            Access::Read => self.read.push(rule),
            Access::Write => self.write.push(rule),
            Access::ReadWrite => {
                self.read.push(rule.clone());
                self.write.push(rule);
            }
            Access::Deny => self.deny.push(rule),
        }
    }
}

/// Which rule list a check consults for its allow rules.
#[derive(Clone, Copy)]
enum Want {
    Read,
    Write,
}

impl Want {
    fn of(self, set: &RuleSet) -> &[Rule] {
        match self {
            Want::Read => &set.read,
            Want::Write => &set.write,
        }
    }
}

/// The client a check is made for, with the values `pattern` rules may substitute.
///
/// A value is `None` when it must not be substituted: no username, or a client id / username containing
/// `+`, `#` or `/`, which would otherwise inject wildcards or extra levels into the pattern (a client called
/// `#` would turn `devices/%c` into `devices/#`). Rules using such a value do not apply to that client.
struct Who<'a> {
    client_id: Option<&'a str>,
    username: Option<&'a str>,
}

impl<'a> Who<'a> {
    fn new(username: Option<&'a str>, client_id: &'a str) -> Self {
        Who { client_id: Some(client_id).filter(|c| safe(c)), username: username.filter(|u| safe(u)) }
    }

    /// Whether a rule applies at all to this client.
    fn applies(&self, rule: &Rule) -> bool {
        (!rule.uses_client_id || self.client_id.is_some()) && (!rule.uses_username || self.username.is_some())
    }
}

/// Whether `value` can be substituted into a pattern without changing its level structure.
fn safe(value: &str) -> bool {
    !value.bytes().any(|b| matches!(b, b'+' | b'#' | b'/'))
}

/// The broker's access control list, parsed from a mosquitto `acl_file`.
///
/// The default (empty) ACL denies everything, like an empty `acl_file` does in mosquitto: the broker should
/// not consult an `Acl` at all when none is configured.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// `topic` rules before the first `user` line: they apply to clients without a username only.
    anonymous: RuleSet,
    /// `topic` rules by username.
    users: HashMap<String, RuleSet>,
    /// `pattern` rules: they apply to every client, after substitution.
    patterns: RuleSet,
}

impl Acl {
    /// Parses the text of a mosquitto `acl_file`.
    ///
    /// Errors name the 1-based line: `line N: ...`.
    pub fn parse(text: &str) -> Result<Acl, String> {
        let mut acl = Acl::default();
        // `None` until the first `user` line: the anonymous section.
        let mut section: Option<String> = None;
        // Files saved by some Windows editors start with a byte order mark, which `trim` keeps.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (idx, raw) in text.lines().enumerate() {
            let n = idx.saturating_add(1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(format!("line {n}: `user` needs a username"));
                    }
                    // A repeated `user` line continues that user's section, as in mosquitto.
                    acl.users.entry(rest.to_owned()).or_default();
                    section = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let is_pattern = word == "pattern";
                    let (access, filter) = split_access(rest);
                    if filter.is_empty() {
                        return Err(format!("line {n}: `{word}` needs a topic filter"));
                    }
                    let rule = compile(filter, is_pattern)
                        .map_err(|why| format!("line {n}: invalid topic filter {filter:?}: {why}"))?;
                    let set = if is_pattern {
                        &mut acl.patterns
                    } else {
                        match &section {
                            None => &mut acl.anonymous,
                            Some(user) => acl.users.entry(user.clone()).or_default(),
                        }
                    };
                    set.push(access, rule);
                }
                other => {
                    return Err(format!(
                        "line {n}: unknown directive {other:?} (expected `user`, `topic` or `pattern`)"
                    ));
                }
            }
        }
        Ok(acl)
    }

    /// Whether the client may publish to `topic` (a valid topic name, without wildcards).
    pub fn can_publish(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, Want::Write, |rule, who| matches(rule, topic, who))
    }

    /// Whether a message on `topic` may be delivered to the client (a subscription match or a retained
    /// message sent on subscribe).
    pub fn can_read(&self, username: Option<&str>, client_id: &str, topic: &str) -> bool {
        self.check(username, client_id, Want::Read, |rule, who| matches(rule, topic, who))
    }

    /// Whether the client may subscribe to `filter`: some read rule must cover every topic the filter
    /// matches, and no deny rule may cover the whole filter. Deny rules that only overlap the filter are left
    /// to [`Acl::can_read`] at delivery. For a shared subscription `$share/GROUP/REST`, `REST` is checked;
    /// a malformed one is refused.
    pub fn can_subscribe(&self, username: Option<&str>, client_id: &str, filter: &str) -> bool {
        let Some(filter) = unshare(filter) else {
            return false;
        };
        self.check(username, client_id, Want::Read, |rule, who| covers(rule, filter, who))
    }

    /// Whether any deny rule could apply to this client (the broker skips per-delivery read checks for
    /// subscriptions already covered by read rules when this is false).
    pub fn has_deny_for(&self, username: Option<&str>, client_id: &str) -> bool {
        let who = Who::new(username, client_id);
        self.own_rules(username).is_some_and(|set| !set.deny.is_empty())
            || self.patterns.deny.iter().any(|rule| who.applies(rule))
    }

    /// The `topic` rules of the client's section: the anonymous one, or its user's (none for a username the
    /// file does not mention: such clients get the `pattern` rules only).
    fn own_rules(&self, username: Option<&str>) -> Option<&RuleSet> {
        match username {
            None => Some(&self.anonymous),
            Some(user) => self.users.get(user),
        }
    }

    /// Allowed iff some applicable allow rule of kind `want` hits and no applicable deny rule hits.
    fn check(
        &self,
        username: Option<&str>,
        client_id: &str,
        want: Want,
        hit: impl Fn(&Rule, &Who) -> bool,
    ) -> bool {
        let who = Who::new(username, client_id);
        let any = |rules: &[Rule]| rules.iter().any(|rule| who.applies(rule) && hit(rule, &who));
        let own = self.own_rules(username);
        let allowed = own.is_some_and(|set| any(want.of(set))) || any(want.of(&self.patterns));
        allowed && !(own.is_some_and(|set| any(&set.deny)) || any(&self.patterns.deny))
    }
}

/// Splits `[read|write|readwrite|deny] TOPIC`; without an access word the rule is readwrite and the whole
/// text is the topic, as mosquitto does.
fn split_access(rest: &str) -> (Access, &str) {
    let (word, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let access = match word {
        "read" => Access::Read,
        "write" => Access::Write,
        "readwrite" => Access::ReadWrite,
        "deny" => Access::Deny,
        _ => return (Access::ReadWrite, rest),
    };
    (access, tail.trim_start())
}

/// Validates `filter` with the MQTT topic filter rules and compiles it; `substitute` turns `%c`/`%u` into
/// substitution pieces (only `pattern` rules substitute; in `topic` rules they are literal text).
fn compile(filter: &str, substitute: bool) -> Result<Rule, &'static str> {
    if filter.is_empty() {
        return Err("empty");
    }
    if filter.len() > MAX_FILTER_LEN {
        return Err("longer than 65535 bytes");
    }
    if filter.contains('\0') {
        return Err("contains U+0000");
    }
    let mut levels = Vec::new();
    let mut uses_client_id = false;
    let mut uses_username = false;
    let mut split = filter.split('/').peekable();
    while let Some(level) = split.next() {
        let compiled = match level {
            "+" => Level::Plus,
            "#" if split.peek().is_none() => Level::Hash,
            "#" => return Err("`#` is only allowed as the last level"),
            _ if level.contains('#') => return Err("`#` must be a whole level"),
            _ if level.contains('+') => return Err("`+` must be a whole level"),
            _ if substitute && (level.contains("%c") || level.contains("%u")) => {
                let pieces = substitution_pieces(level);
                uses_client_id |= pieces.iter().any(|p| matches!(p, Piece::ClientId));
                uses_username |= pieces.iter().any(|p| matches!(p, Piece::Username));
                Level::Subst(pieces.into_boxed_slice())
            }
            _ => Level::Lit(level.into()),
        };
        levels.push(compiled);
    }
    Ok(Rule { levels: levels.into_boxed_slice(), uses_client_id, uses_username })
}

/// Cuts a pattern level at each `%c`/`%u`, left to right (`%%c` is `%` then `%c`, as in mosquitto).
fn substitution_pieces(level: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut rest = level;
    loop {
        let (token, piece) = match (rest.find("%c"), rest.find("%u")) {
            (Some(c), Some(u)) if u < c => ("%u", Piece::Username),
            (Some(_), _) => ("%c", Piece::ClientId),
            (None, Some(_)) => ("%u", Piece::Username),
            (None, None) => break,
        };
        let Some((head, tail)) = rest.split_once(token) else { break };
        if !head.is_empty() {
            pieces.push(Piece::Lit(head.into()));
        }
        pieces.push(piece);
        rest = tail;
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.into()));
    }
    pieces
}

/// Whether a substituted pattern level equals `segment`, without building the substituted text.
fn subst_eq(pieces: &[Piece], segment: &str, who: &Who) -> bool {
    let mut rest = segment;
    for piece in pieces {
        let want = match piece {
            Piece::Lit(text) => &**text,
            // `None` values never reach here (`Who::applies`), but refusing is the safe answer anyway.
            Piece::ClientId => match who.client_id {
                Some(id) => id,
                None => return false,
            },
            Piece::Username => match who.username {
                Some(user) => user,
                None => return false,
            },
        };
        match rest.strip_prefix(want) {
            Some(tail) => rest = tail,
            None => return false,
        }
    }
    rest.is_empty()
}

/// Whether a filter starting with a wildcard is kept away from `text` because `text` starts with `$`
/// (MQTT-4.7.2-1: `#` and `+/...` do not match `$SYS/...`).
fn dollar_blocked(rule: &Rule, text: &str) -> bool {
    text.starts_with('$') && matches!(rule.levels.first(), Some(Level::Plus | Level::Hash))
}

/// MQTT matching of the rule's filter against a topic name.
fn matches(rule: &Rule, topic: &str, who: &Who) -> bool {
    if dollar_blocked(rule, topic) {
        return false;
    }
    let mut segments = topic.split('/');
    for level in rule.levels.iter() {
        if let Level::Hash = level {
            // `#` also matches the parent level, so running out of segments here is a match.
            return true;
        }
        let Some(segment) = segments.next() else {
            return false;
        };
        let same = match level {
            Level::Lit(text) => **text == *segment,
            Level::Plus => true,
            Level::Subst(pieces) => subst_eq(pieces, segment, who),
            Level::Hash => true,
        };
        if !same {
            return false;
        }
    }
    segments.next().is_none()
}

/// Whether the rule's filter matches every topic that `filter` matches, comparing level by level. It may
/// answer `false` for a few exotic covered cases (`+/#` covers `#`), never `true` for an uncovered one:
/// a wrong `true` would let a subscription read what no rule allows.
fn covers(rule: &Rule, filter: &str, who: &Who) -> bool {
    // A rule starting with a wildcard matches no `$` topic, while a filter starting with `$` matches only
    // those (a filter starting with a wildcard is itself kept away from them, so a rule `#` covers `#`).
    if dollar_blocked(rule, filter) {
        return false;
    }
    let mut segments = filter.split('/');
    for level in rule.levels.iter() {
        if let Level::Hash = level {
            return true;
        }
        let Some(segment) = segments.next() else {
            // The filter stops where the rule still needs levels (only a trailing `#` would accept that,
            // and it returned above).
            return false;
        };
        let covered = match level {
            // A literal rule level covers only the same literal; rule literals never contain `+` or `#`,
            // so a filter wildcard level is never covered by one.
            Level::Lit(text) => **text == *segment,
            Level::Plus => segment != "#",
            // Substituted values never contain `+`, `#` or `/` (`Who`), so this also is literal equality.
            Level::Subst(pieces) => subst_eq(pieces, segment, who),
            Level::Hash => true,
        };
        if !covered {
            return false;
        }
    }
    segments.next().is_none()
}

/// The filter to check for a subscription: `REST` for `$share/GROUP/REST`, `None` when such a shared
/// subscription is malformed (empty or wildcard group, empty `REST`).
fn unshare(filter: &str) -> Option<&str> {
    let Some(shared) = filter.strip_prefix("$share/") else {
        return Some(filter);
    };
    let (group, rest) = shared.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || rest.is_empty() {
        return None;
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn acl(text: &str) -> Acl {
        Acl::parse(text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        Acl::parse(text).unwrap_err()
    }

    #[test]
    fn anonymous_section_applies_to_clients_without_username_only() {
        let a = acl("topic anon/#\nuser alice\ntopic alice/#\n");
        assert!(a.can_publish(None, "c", "anon/x"));
        assert!(a.can_read(None, "c", "anon"));
        assert!(!a.can_publish(None, "c", "alice/x"));
        assert!(a.can_publish(Some("alice"), "c", "alice/x"));
        assert!(!a.can_publish(Some("alice"), "c", "anon/x"));
        // A username the file does not mention gets neither section.
        assert!(!a.can_publish(Some("bob"), "c", "anon/x"));
        assert!(!a.can_publish(Some("bob"), "c", "alice/x"));
    }

    #[test]
    fn users_sections_are_separate_and_repeated_sections_merge() {
        let a = acl("user alice\ntopic a/1\nuser bob\ntopic b/1\nuser alice\ntopic a/2\n");
        assert!(a.can_publish(Some("alice"), "c", "a/1"));
        assert!(a.can_publish(Some("alice"), "c", "a/2"));
        assert!(!a.can_publish(Some("alice"), "c", "b/1"));
        assert!(a.can_publish(Some("bob"), "c", "b/1"));
        assert!(!a.can_publish(Some("bob"), "c", "a/2"));
    }

    #[test]
    fn username_may_contain_spaces() {
        let a = acl("user  John Smith  \ntopic x\n");
        assert!(a.can_publish(Some("John Smith"), "c", "x"));
        assert!(!a.can_publish(Some("John"), "c", "x"));
    }

    #[test]
    fn missing_access_word_means_readwrite() {
        let a = acl("topic foo/#");
        assert!(a.can_publish(None, "c", "foo/bar"));
        assert!(a.can_read(None, "c", "foo/bar"));
        assert!(a.can_subscribe(None, "c", "foo/+"));
        assert!(!a.can_publish(None, "c", "bar"));
    }

    #[test]
    fn read_write_and_readwrite() {
        let a = acl("topic read r\ntopic write w\ntopic readwrite rw\n");
        assert!(a.can_read(None, "c", "r"));
        assert!(!a.can_publish(None, "c", "r"));
        assert!(a.can_subscribe(None, "c", "r"));
        assert!(!a.can_read(None, "c", "w"));
        assert!(a.can_publish(None, "c", "w"));
        assert!(!a.can_subscribe(None, "c", "w"));
        assert!(a.can_read(None, "c", "rw"));
        assert!(a.can_publish(None, "c", "rw"));
        assert!(a.can_subscribe(None, "c", "rw"));
    }

    #[test]
    fn empty_acl_denies_everything() {
        for a in [Acl::default(), acl(""), acl("# only a comment\n\n")] {
            assert!(!a.can_publish(None, "c", "a"));
            assert!(!a.can_read(Some("u"), "c", "a"));
            assert!(!a.can_subscribe(None, "c", "#"));
            assert!(!a.has_deny_for(None, "c"));
        }
    }

    #[test]
    fn deny_overrides_allow_for_publish_and_read() {
        let a = acl("topic home/#\ntopic deny home/secret/#\n");
        assert!(a.can_publish(None, "c", "home/kitchen"));
        assert!(a.can_read(None, "c", "home/kitchen"));
        assert!(!a.can_publish(None, "c", "home/secret"));
        assert!(!a.can_publish(None, "c", "home/secret/key"));
        assert!(!a.can_read(None, "c", "home/secret/key"));
        assert!(a.has_deny_for(None, "c"));
    }

    #[test]
    fn deny_covering_a_subscription_refuses_it_and_overlap_is_left_to_read() {
        let a = acl("topic home/#\ntopic deny home/secret/#\n");
        assert!(!a.can_subscribe(None, "c", "home/secret/#"));
        assert!(!a.can_subscribe(None, "c", "home/secret/+"));
        assert!(!a.can_subscribe(None, "c", "home/secret"));
        // Only overlaps the deny rule: allowed, and delivery checks refuse the denied topics.
        assert!(a.can_subscribe(None, "c", "home/#"));
        assert!(a.can_subscribe(None, "c", "home/+/key"));
        assert!(!a.can_read(None, "c", "home/secret/key"));
        assert!(a.has_deny_for(None, "c"));
    }

    #[test]
    fn pattern_deny_applies_to_everyone() {
        let a = acl("pattern deny private/#\nuser alice\ntopic #\n");
        assert!(a.can_publish(Some("alice"), "c", "public"));
        assert!(!a.can_publish(Some("alice"), "c", "private/x"));
        assert!(a.has_deny_for(Some("alice"), "c"));
        assert!(a.has_deny_for(None, "c"));
        assert!(a.has_deny_for(Some("stranger"), "c"));
    }

    #[test]
    fn has_deny_for_follows_sections_and_pattern_applicability() {
        let a = acl("topic deny x\nuser alice\ntopic y\nuser bob\ntopic deny z\npattern deny u/%u\n");
        assert!(a.has_deny_for(None, "c"));
        assert!(!a.has_deny_for(Some("alice/evil"), "c"));
        assert!(a.has_deny_for(Some("alice"), "c"));
        assert!(a.has_deny_for(Some("bob"), "c"));
        let b = acl("user alice\ntopic y\nuser bob\ntopic deny z\npattern deny u/%u\n");
        // Anonymous clients: no section deny, and the `%u` pattern cannot apply.
        assert!(!b.has_deny_for(None, "c"));
        let c = acl("pattern deny c/%c\ntopic #\n");
        assert!(c.has_deny_for(None, "ok"));
        assert!(!c.has_deny_for(None, "bad+id"));
    }

    #[test]
    fn pattern_client_id_and_username() {
        let a = acl("pattern devices/%c/#\npattern read users/%u/inbox\npattern write dev-%c-%u/out\n");
        assert!(a.can_publish(None, "d1", "devices/d1/status"));
        assert!(a.can_publish(Some("bob"), "d1", "devices/d1"));
        assert!(!a.can_publish(None, "d1", "devices/d2/status"));
        assert!(a.can_read(Some("bob"), "c", "users/bob/inbox"));
        assert!(!a.can_publish(Some("bob"), "c", "users/bob/inbox"));
        assert!(!a.can_read(Some("bob"), "c", "users/alice/inbox"));
        assert!(a.can_publish(Some("bob"), "d1", "dev-d1-bob/out"));
        assert!(!a.can_publish(Some("bob"), "d1", "dev-d1-bo/out"));
        assert!(!a.can_publish(Some("bob"), "d1", "dev-d1-bobb/out"));
        assert!(a.can_subscribe(Some("bob"), "c", "users/bob/inbox"));
        assert!(a.can_subscribe(None, "d1", "devices/d1/+"));
        assert!(!a.can_subscribe(None, "d1", "devices/+/status"));
    }

    #[test]
    fn username_pattern_never_matches_anonymous_clients() {
        let a = acl("pattern users/%u/#\n");
        assert!(!a.can_publish(None, "c", "users/"));
        assert!(!a.can_publish(None, "c", "users//x"));
        assert!(!a.can_read(None, "c", "users/%u/x"));
        assert!(a.can_publish(Some(""), "c", "users//x"));
    }

    #[test]
    fn wildcard_injection_in_substituted_values_is_refused() {
        let a = acl("pattern devices/%c/#\npattern users/%u/#\n");
        for bad in ["+", "#", "a/b", "x+"] {
            assert!(!a.can_publish(None, bad, &format!("devices/{bad}/x")), "{bad}");
            assert!(!a.can_subscribe(None, bad, &format!("devices/{bad}/#")), "{bad}");
            assert!(!a.can_publish(Some(bad), "c", &format!("users/{bad}/x")), "{bad}");
        }
        assert!(!a.can_subscribe(None, "#", "devices/#"));
        assert!(!a.can_subscribe(None, "+", "devices/+/x"));
        // The client id is only checked by the patterns that use it.
        assert!(a.can_publish(Some("u"), "a/b", "users/u/x"));
    }

    #[test]
    fn percent_tokens_are_literal_in_topic_rules() {
        let a = acl("topic t/%c\n");
        assert!(a.can_publish(None, "x", "t/%c"));
        assert!(!a.can_publish(None, "x", "t/x"));
        let p = acl("pattern p/%%c/%x\n");
        assert!(p.can_publish(None, "x", "p/%x/%x"));
    }

    #[test]
    fn subscribe_coverage() {
        let a = acl("topic read sensors/#\ntopic read a/+\n");
        let sub = |f: &str| a.can_subscribe(None, "c", f);
        assert!(sub("sensors/#"));
        assert!(sub("sensors/+/temp"));
        assert!(sub("sensors"));
        assert!(sub("sensors/x/y/z"));
        assert!(!sub("#"));
        assert!(!sub("+/temp"));
        assert!(!sub("+"));
        assert!(sub("a/b"));
        assert!(sub("a/+"));
        assert!(!sub("a/#"));
        assert!(!sub("a"));
        assert!(!sub("a/b/c"));
        assert!(!sub("b/x"));
    }

    #[test]
    fn hash_rule_covers_everything_but_dollar_topics() {
        let a = acl("topic #\n");
        assert!(a.can_subscribe(None, "c", "#"));
        assert!(a.can_subscribe(None, "c", "+/x"));
        assert!(a.can_read(None, "c", "anything/at/all"));
        assert!(!a.can_read(None, "c", "$SYS/x"));
        assert!(!a.can_publish(None, "c", "$SYS/x"));
        assert!(!a.can_subscribe(None, "c", "$SYS/#"));
        let plus = acl("topic +/x\n");
        assert!(!plus.can_read(None, "c", "$SYS/x"));
        assert!(!plus.can_subscribe(None, "c", "$SYS/x"));
        let sys = acl("topic read $SYS/#\n");
        assert!(sys.can_read(None, "c", "$SYS/broker/uptime"));
        assert!(sys.can_subscribe(None, "c", "$SYS/#"));
        assert!(sys.can_subscribe(None, "c", "$SYS/+/uptime"));
        assert!(!sys.can_subscribe(None, "c", "#"));
    }

    #[test]
    fn shared_subscriptions_check_the_inner_filter() {
        let a = acl("topic read sensors/#\n");
        assert!(a.can_subscribe(None, "c", "$share/g/sensors/#"));
        assert!(a.can_subscribe(None, "c", "$share/g/sensors/+/temp"));
        assert!(!a.can_subscribe(None, "c", "$share/g/#"));
        assert!(!a.can_subscribe(None, "c", "$share/g"));
        assert!(!a.can_subscribe(None, "c", "$share//sensors/#"));
        assert!(!a.can_subscribe(None, "c", "$share/g+/sensors/#"));
        assert!(!a.can_subscribe(None, "c", "$share/g/"));
        let d = acl("topic #\ntopic deny sensors/#\n");
        assert!(!d.can_subscribe(None, "c", "$share/g/sensors/+"));
        assert!(d.can_subscribe(None, "c", "$share/g/other"));
    }

    #[test]
    fn topic_with_spaces_and_whitespace_handling() {
        let a = acl("  topic   read   living room/lamp one  \r\n\ttopic my topic\r\n");
        assert!(a.can_read(None, "c", "living room/lamp one"));
        assert!(!a.can_publish(None, "c", "living room/lamp one"));
        assert!(a.can_publish(None, "c", "my topic"));
        assert!(a.can_read(None, "c", "my topic"));
    }

    #[test]
    fn comments_and_blank_lines_are_ignored() {
        let a = acl("\u{feff}# header\n\n   # indented comment\n\t\ntopic x\n");
        assert!(a.can_publish(None, "c", "x"));
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert!(parse_err("topic a\nfoo bar\n").starts_with("line 2: unknown directive \"foo\""));
        assert!(parse_err("# c\n\nUser alice\n").starts_with("line 3: unknown directive"));
        assert!(parse_err("topic a\nuser\n").starts_with("line 2: `user` needs a username"));
        assert!(parse_err("user   \t\n").starts_with("line 1: `user` needs a username"));
        assert!(parse_err("\n\ntopic\n").starts_with("line 3: `topic` needs a topic filter"));
        assert!(parse_err("topic read\n").starts_with("line 1: `topic` needs a topic filter"));
        assert!(parse_err("topic x\npattern deny   \n").starts_with("line 2: `pattern` needs a topic filter"));
        assert!(parse_err("pattern\n").starts_with("line 1: `pattern` needs a topic filter"));
        let bad = [
            ("topic a/#/b", "`#` is only allowed"),
            ("topic a#", "`#` must be a whole level"),
            ("topic read a/b#", "`#` must be a whole level"),
            ("topic a+/b", "`+` must be a whole level"),
            ("pattern write %c+", "`+` must be a whole level"),
            ("topic a\0b", "U+0000"),
            ("topic ##", "`#` must be a whole level"),
        ];
        for (i, (line, why)) in bad.iter().enumerate() {
            let text = format!("{}{line}\n", "# pad\n".repeat(i));
            let err = parse_err(&text);
            let n = i + 1;
            assert!(err.starts_with(&format!("line {n}: invalid topic filter")), "{err}");
            assert!(err.contains(why), "{err}");
        }
        let long = format!("topic {}", "a".repeat(MAX_FILTER_LEN + 1));
        assert!(parse_err(&long).starts_with("line 1: invalid topic filter"));
    }

    #[test]
    fn matcher_follows_mqtt_rules() {
        let who = Who::new(None, "c");
        let m = |f: &str, t: &str| matches(&compile(f, false).unwrap(), t, &who);
        assert!(m("a/#", "a"));
        assert!(m("a/#", "a/b/c"));
        assert!(m("#", "a"));
        assert!(m("+", ""));
        assert!(m("+/+", "/"));
        assert!(!m("+", "a/b"));
        assert!(m("a/+/c", "a//c"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(m("$SYS/#", "$SYS"));
        assert!(!m("+/#", "$x/y"));
    }

    /// Reference MQTT matcher, written independently of the one under test.
    fn reference_match(filter: &[&str], topic: &[&str]) -> bool {
        match (filter.split_first(), topic.split_first()) {
            (Some((&"#", _)), _) => true,
            (None, None) => true,
            (Some((&"+", f)), Some((_, t))) => reference_match(f, t),
            (Some((l, f)), Some((s, t))) => l == s && reference_match(f, t),
            _ => false,
        }
    }

    fn reference(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        reference_match(&f, &t)
    }

    fn level() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "", "$s", "c1", "u1", "dev-c1"]).prop_map(str::to_owned)
    }

    fn filter_level() -> impl Strategy<Value = String> {
        prop_oneof![3 => level(), 1 => Just("+".to_owned())]
    }

    /// A valid filter: levels from a small alphabet so that rules and filters often meet.
    fn filter() -> impl Strategy<Value = String> {
        (prop::collection::vec(filter_level(), 1..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            // A single empty level would be the empty filter, which is invalid: use two empty levels.
            let f = levels.join("/");
            if f.is_empty() {
                "/".to_owned()
            } else {
                f
            }
        })
    }

    fn rule_filter() -> impl Strategy<Value = String> {
        (filter(), prop::sample::select(vec!["", "%c", "%u", "dev-%c"])).prop_map(|(f, extra)| {
            if extra.is_empty() {
                f
            } else {
                format!("{extra}/{f}")
            }
        })
    }

    /// A topic matched by `filter` (usually): `+` and `#` replaced by random levels.
    fn sample_topic(filter: &str, fill: &[String], extra: usize) -> String {
        let mut fill = fill.iter().cycle();
        let mut out: Vec<String> = Vec::new();
        for l in filter.split('/') {
            match l {
                "+" => out.push(fill.next().cloned().unwrap_or_default()),
                "#" => {
                    for _ in 0..extra {
                        out.push(fill.next().cloned().unwrap_or_default());
                    }
                }
                _ => out.push(l.to_owned()),
            }
        }
        if out.is_empty() {
            // `#` with no extra level stands for its parent, which does not exist at the top: use one level.
            out.push(fill.next().cloned().unwrap_or_default());
        }
        out.join("/")
    }

    /// A filter matching a subset of what rule filter `f` matches for this client: `%c`/`%u` substituted,
    /// some `+` replaced by a level, `#` by a few levels and maybe `#` again.
    fn narrow(f: &str, client: &str, user: Option<&str>, fill: &[String], extra: usize) -> String {
        let f = f.replace("%c", client).replace("%u", user.unwrap_or("%u"));
        let mut fill = fill.iter().cycle();
        let mut out: Vec<String> = Vec::new();
        for (i, l) in f.split('/').enumerate() {
            match l {
                "+" if i % 2 == 1 => out.push(fill.next().cloned().unwrap_or_default()),
                "#" => {
                    for _ in 0..extra {
                        out.push(fill.next().cloned().unwrap_or_default());
                    }
                    if extra != 1 {
                        out.push("#".to_owned());
                    }
                }
                _ => out.push(l.to_owned()),
            }
        }
        let f = out.join("/");
        if f.is_empty() {
            "/".to_owned()
        } else {
            f
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            if let Ok(a) = Acl::parse(&text) {
                let _ = a.can_publish(Some("u"), "c", "a/b");
                let _ = a.can_read(None, "c", "a/b");
                let _ = a.can_subscribe(None, "c", "a/#");
                let _ = a.has_deny_for(None, "c");
            }
        }

        #[test]
        fn parse_never_panics_on_acl_like_text(
            lines in prop::collection::vec(
                "(user|topic|pattern|read|write|readwrite|deny|#|\\+|/|%c|%u|%| |\t|a|\\$|\0|\r)*",
                0..8,
            ),
            filter in ".{0,20}",
            topic in ".{0,20}",
            user in prop::option::of(".{0,5}"),
        ) {
            if let Ok(a) = Acl::parse(&lines.join("\n")) {
                let _ = a.can_publish(user.as_deref(), &topic, &topic);
                let _ = a.can_read(user.as_deref(), &filter, &topic);
                let _ = a.can_subscribe(user.as_deref(), &topic, &filter);
                let _ = a.has_deny_for(user.as_deref(), &filter);
            }
        }
    }

    proptest! {
        // The checks are cheap; more cases make covered subscriptions frequent enough in the first property.
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn subscribe_implies_read_of_matched_topics_without_deny(
            rules in prop::collection::vec(
                (prop::sample::select(vec!["topic", "pattern"]),
                 prop::sample::select(vec!["", "read ", "write ", "readwrite "]),
                 rule_filter()),
                0..5,
            ),
            user in prop::option::of(prop::sample::select(vec!["u1", "u+", "u/x"])),
            client in prop::sample::select(vec!["c1", "c#", "c/x", ""]),
            sub in filter(),
            narrow_rule in prop::option::of(any::<prop::sample::Index>()),
            fill in prop::collection::vec(level(), 1..4),
            extra in 0usize..3,
        ) {
            let mut text = String::new();
            if let Some(u) = user {
                text.push_str(&format!("user {u}\n"));
            }
            for (kind, access, f) in &rules {
                text.push_str(&format!("{kind} {access}{f}\n"));
            }
            // Random filters are rarely covered by random rules: half the time subscribe to a narrowing of
            // one of the rules instead, so that the property is exercised on covered filters too.
            let sub = match narrow_rule {
                Some(i) if !rules.is_empty() => {
                    let (_, _, f) = &rules[i.index(rules.len())];
                    narrow(f, client, user, &fill, extra)
                }
                _ => sub,
            };
            let a = Acl::parse(&text).unwrap();
            prop_assert!(!a.has_deny_for(user, client));
            if a.can_subscribe(user, client, &sub) {
                let topic = sample_topic(&sub, &fill, extra);
                if reference(&sub, &topic) {
                    prop_assert!(a.can_read(user, client, &topic), "{text}\nsub {sub} topic {topic}");
                }
                let shared = format!("$share/g/{sub}");
                prop_assert!(a.can_subscribe(user, client, &shared));
            }
        }

        #[test]
        fn matcher_agrees_with_reference(f in filter(), fill in prop::collection::vec(level(), 1..4),
                                         extra in 0usize..3, other in filter()) {
            let who = Who::new(None, "c");
            let rule = compile(&f, false).unwrap();
            for topic in [sample_topic(&f, &fill, extra), sample_topic(&other, &fill, extra)] {
                prop_assert_eq!(matches(&rule, &topic, &who), reference(&f, &topic), "{} {}", f, topic);
            }
        }
    }
}
