//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 §4.8.2, also offered to 3.1.1 clients as
//! mosquitto and EMQX do): each message goes to one member of each group, wherever the members live.
//!
//! The choice is made in two steps, so that no core needs another core's sessions:
//! 1. the **publishing core** picks a core for each matching group, weighted by how many online members
//!    each core announced ([`GroupViews`], kept current by `Control::Shared`);
//! 2. that **core** picks one of its own members, round robin, online ones first ([`LocalGroups`]).
//!
//! Members receive in proportion to their number: a core with two ready members is picked twice as often
//! as one with one. A member is *ready* when it is online and its queue is not congested (pause policy).
//! A group with online members none of which is ready is **blocked**: its QoS 1/2 publishers are held
//! before their acknowledgement, exactly as for a congested plain subscriber, instead of overfilling a
//! member's queue until it drops acknowledged messages. Pure data structures: the core glues them to
//! sessions and the mesh.

use super::keys::SessionKey;
use crate::xcore::CoreId;
use std::collections::HashMap;
use std::sync::Arc;

use slab::Slab;

use crate::session::SubOpts;
use crate::topic::SubscriptionIndex;

/// One group as every core sees it: how many members each core has.
struct GroupView {
    name: Arc<str>,
    filter: Box<str>,
    /// Online members per core.
    online: Vec<u32>,
    /// Online members that can take a QoS 1/2 message now (not congested), per core.
    ready: Vec<u32>,
    /// All members (online or not) per core.
    total: Vec<u32>,
    /// Round-robin position over the online members of all cores.
    next: u64,
}

/// Every shared group of the broker, by the filter it matches: which core should get a message.
#[derive(Default)]
pub struct GroupViews {
    groups: Slab<GroupView>,
    by_name: HashMap<Arc<str>, usize>,
    index: SubscriptionIndex<usize, ()>,
    /// How many groups are blocked: while 0, [`GroupViews::blocked`] costs nothing.
    blocked: usize,
}

/// What one core announces of its members of one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Ready to take a QoS 1/2 message: online and not congested.
    pub ready: u32,
    pub online: u32,
    /// Online or not.
    pub total: u32,
}

impl GroupViews {
    /// Records what `core` announced for the group `name` (`$share/{group}/{filter}`, with `filter` its
    /// filter). A group whose members are all gone is forgotten. Returns whether the group was blocked
    /// before and is not now: held publishers may go on.
    pub fn update(&mut self, cores: usize, core: CoreId, name: &Arc<str>, filter: &str, m: Members) -> bool {
        let slot = match self.by_name.get(name) {
            Some(&slot) => slot,
            None if m.total == 0 => return false,
            None => {
                let slot = self.groups.insert(GroupView {
                    name: name.clone(),
                    filter: filter.into(),
                    online: vec![0; cores],
                    ready: vec![0; cores],
                    total: vec![0; cores],
                    next: 0,
                });
                self.by_name.insert(name.clone(), slot);
                self.index.insert(filter, slot, ());
                slot
            }
        };
        let Some(g) = self.groups.get_mut(slot) else { return false };
        let was = g.is_blocked();
        if let (Some(r), Some(o), Some(t)) =
            (g.ready.get_mut(core.index()), g.online.get_mut(core.index()), g.total.get_mut(core.index()))
        {
            *r = m.ready.min(m.online);
            *o = m.online;
            *t = m.total;
        }
        let gone = g.total.iter().all(|&t| t == 0);
        let now = !gone && g.is_blocked();
        if gone {
            let g = self.groups.remove(slot);
            self.by_name.remove(&g.name);
            self.index.remove(&g.filter, slot);
        }
        match (was, now) {
            (false, true) => self.blocked += 1,
            (true, false) => self.blocked -= 1,
            _ => {}
        }
        was && !now
    }

    /// Whether a QoS 1/2 message to `topic` must wait: some matching group has online members and none
    /// of them can take it (all congested).
    pub fn blocked(&self, topic: &str) -> bool {
        if self.blocked == 0 {
            return false;
        }
        let mut blocked = false;
        self.index.for_each_match(topic, |slot, _| {
            blocked |= self.groups.get(slot).is_some_and(|g| g.is_blocked());
        });
        blocked
    }

    /// Calls `f(group name, core)` once for every group with a filter matching `topic`, with the core that
    /// should deliver to it: one with ready members, in proportion to their number; if none is ready, one
    /// with online members (a QoS 0 message, or a QoS 1/2 one already past the hold); if none is online,
    /// one with members at all (their persistent sessions queue the message).
    pub fn pick(&mut self, topic: &str, mut f: impl FnMut(&Arc<str>, CoreId)) {
        if self.groups.is_empty() {
            return;
        }
        let mut slots: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        self.index.for_each_match(topic, |slot, _| slots.push(slot));
        for slot in slots {
            let Some(g) = self.groups.get_mut(slot) else { continue };
            if let Some(core) = g.pick(None, Kinds::Any) {
                f(&g.name, core);
            }
        }
    }

    /// [`GroupViews::pick`] for the one group `name`, never choosing core `except` (one that found no
    /// member of its own when the message arrived). Returns the core, if any has members.
    pub fn pick_group(&mut self, name: &str, except: Option<CoreId>) -> Option<CoreId> {
        self.group_mut(name)?.pick(except, Kinds::Any)
    }

    /// A core other than `except` with ready members of group `name`, in proportion to their number.
    pub fn pick_ready_elsewhere(&mut self, name: &str, except: CoreId) -> Option<CoreId> {
        self.group_mut(name)?.pick(Some(except), Kinds::Ready)
    }

    fn group_mut(&mut self, name: &str) -> Option<&mut GroupView> {
        let &slot = self.by_name.get(name)?;
        self.groups.get_mut(slot)
    }

    /// Whether some group's filter matches `topic`.
    pub fn any_match(&self, topic: &str) -> bool {
        !self.groups.is_empty() && self.index.any_match(topic)
    }
}

impl GroupView {
    fn is_blocked(&self) -> bool {
        self.online.iter().any(|&n| n > 0) && self.ready.iter().all(|&n| n == 0)
    }

    /// One core, in proportion to its members of the best kind present (ready, else online, else any;
    /// only ready ones with [`Kinds::Ready`]), round robin; never `except`.
    fn pick(&mut self, except: Option<CoreId>, kinds: Kinds) -> Option<CoreId> {
        let except = except.map(CoreId::index);
        let count = |v: &[u32], core: usize| if Some(core) == except { 0 } else { u64::from(v[core]) };
        let sum = |v: &[u32]| (0..v.len()).map(|c| count(v, c)).sum::<u64>();
        let all = [&self.ready, &self.online, &self.total];
        let n = if kinds == Kinds::Ready { 1 } else { all.len() };
        let counts = all.into_iter().take(n).find(|v| sum(v) > 0)?;
        let mut at = self.next % sum(counts);
        self.next = self.next.wrapping_add(1);
        for core in 0..counts.len() {
            let n = count(counts, core);
            if at < n {
                return Some(CoreId::new(core));
            }
            at -= n;
        }
        None
    }
}

/// Which members [`GroupView::pick`] may choose a core for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kinds {
    Ready,
    Any,
}

/// The highest rank [`LocalGroups::pick`] knows: the first member found with it is taken.
pub const RANK_BEST: u8 = 2;

/// One group's members on this core.
pub struct LocalGroup {
    pub name: Arc<str>,
    pub filter: Box<str>,
    /// Session key and subscription options of each member, in subscription order.
    pub members: Vec<(SessionKey, SubOpts)>,
    next: usize,
}

/// The shared groups this core's sessions are members of.
#[derive(Default)]
pub struct LocalGroups {
    groups: Slab<LocalGroup>,
    by_name: HashMap<Arc<str>, usize>,
}

impl LocalGroups {
    /// Adds (or updates the options of) a member. Returns the group's name, shared with the views.
    pub fn join(&mut self, name: &str, filter: &str, skey: SessionKey, opts: SubOpts) -> Arc<str> {
        let slot = match self.by_name.get(name) {
            Some(&slot) => slot,
            None => {
                let name: Arc<str> = name.into();
                let slot = self.groups.insert(LocalGroup {
                    name: name.clone(),
                    filter: filter.into(),
                    members: Vec::new(),
                    next: 0,
                });
                self.by_name.insert(name, slot);
                slot
            }
        };
        let g = &mut self.groups[slot];
        match g.members.iter_mut().find(|m| m.0 == skey) {
            Some(m) => m.1 = opts,
            None => g.members.push((skey, opts)),
        }
        g.name.clone()
    }

    /// Removes a member; returns the group's name if it was one.
    pub fn leave(&mut self, name: &str, skey: SessionKey) -> Option<Arc<str>> {
        let &slot = self.by_name.get(name)?;
        let g = self.groups.get_mut(slot)?;
        let before = g.members.len();
        g.members.retain(|m| m.0 != skey);
        if g.members.len() == before {
            return None;
        }
        let name = g.name.clone();
        if g.members.is_empty() {
            self.groups.remove(slot);
            self.by_name.remove(&name);
        }
        Some(name)
    }

    pub fn get(&self, name: &str) -> Option<&LocalGroup> {
        self.by_name.get(name).and_then(|&slot| self.groups.get(slot))
    }

    /// The member to deliver the next message of group `name` to: round robin over the members of the
    /// highest `rank` present, [`RANK_BEST`] being the highest (the core ranks ready members over online
    /// congested ones over offline ones); `None` without members.
    pub fn pick(&mut self, name: &str, rank: impl Fn(SessionKey) -> u8) -> Option<(SessionKey, SubOpts, u8)> {
        let &slot = self.by_name.get(name)?;
        let g = self.groups.get_mut(slot)?;
        let n = g.members.len();
        let start = g.next;
        let mut best: Option<(u8, usize)> = None;
        for i in 0..n {
            let r = rank(g.members[(start + i) % n].0);
            if !matches!(best, Some((b, _)) if b >= r) {
                best = Some((r, i));
            }
            if r >= RANK_BEST {
                break;
            }
        }
        let (r, i) = best?;
        g.next = (start + i + 1) % n;
        g.members.get((start + i) % n).map(|&(k, o)| (k, o, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keys::Key;

    fn c(i: usize) -> CoreId {
        CoreId::new(i)
    }

    fn sk(i: usize) -> SessionKey {
        SessionKey::from_index(i)
    }
    use crate::protocol::QoS;

    fn opts() -> SubOpts {
        SubOpts::qos(QoS::AtLeastOnce)
    }

    fn m(ready: u32, online: u32, total: u32) -> Members {
        Members { ready, online, total }
    }

    #[test]
    fn views_pick_cores_in_proportion_to_online_members() {
        let mut v = GroupViews::default();
        let name: Arc<str> = "$share/g/a/+".into();
        v.update(2, c(0), &name, "a/+", m(1, 1, 1));
        v.update(2, c(1), &name, "a/+", m(2, 2, 3));
        let mut per_core = [0; 2];
        for _ in 0..300 {
            let mut n = 0;
            v.pick("a/x", |g, core| {
                assert_eq!(&**g, "$share/g/a/+");
                per_core[core.index()] += 1;
                n += 1;
            });
            assert_eq!(n, 1, "exactly one core per group and message");
        }
        assert_eq!(per_core, [100, 200]);
        let mut hit = false;
        v.pick("b/x", |_, _| hit = true);
        assert!(!hit);
        // Nobody online: the core with (offline) members still gets it.
        v.update(2, c(0), &name, "a/+", m(0, 0, 0));
        v.update(2, c(1), &name, "a/+", m(0, 0, 3));
        let mut cores = Vec::new();
        v.pick("a/x", |_, c| cores.push(c));
        assert_eq!(cores, [c(1)]);
        // All gone: forgotten.
        v.update(2, c(1), &name, "a/+", m(0, 0, 0));
        assert!(!v.any_match("a/x"));
    }

    #[test]
    fn a_group_whose_online_members_are_all_congested_is_blocked() {
        let mut v = GroupViews::default();
        let name: Arc<str> = "$share/g/a/#".into();
        v.update(2, c(0), &name, "a/#", m(1, 1, 1));
        v.update(2, c(1), &name, "a/#", m(0, 2, 2));
        assert!(!v.blocked("a/x"));
        // Only core 0's member is ready: every pick goes there.
        let mut cores = Vec::new();
        for _ in 0..4 {
            v.pick("a/x", |_, c| cores.push(c));
        }
        assert_eq!(cores, [c(0); 4]);
        // Core 0's member congests too: blocked; a pick still names an online core (QoS 0).
        assert!(!v.update(2, c(0), &name, "a/#", m(0, 1, 1)));
        assert!(v.blocked("a/x") && v.blocked("a/b/c") && !v.blocked("b"));
        // One drains: unblocked, and update says so.
        assert!(v.update(2, c(1), &name, "a/#", m(1, 2, 2)));
        assert!(!v.blocked("a/x"));
        // Every member offline: not blocked (offline sessions queue, or drop the newest, by policy).
        v.update(2, c(0), &name, "a/#", m(0, 0, 1));
        v.update(2, c(1), &name, "a/#", m(0, 0, 2));
        assert!(!v.blocked("a/x"));
        // A core that found no member of its own asks for another.
        assert_eq!(v.pick_group("$share/g/a/#", Some(c(1))), Some(c(0)));
        // Only ready members count for a core whose own members are not ready: none here.
        assert_eq!(v.pick_ready_elsewhere("$share/g/a/#", c(1)), None);
        v.update(2, c(0), &name, "a/#", m(1, 1, 1));
        assert_eq!(v.pick_ready_elsewhere("$share/g/a/#", c(1)), Some(c(0)));
        assert_eq!(v.pick_ready_elsewhere("$share/g/a/#", c(0)), None);
        v.update(2, c(0), &name, "a/#", m(0, 0, 1));
        v.update(2, c(0), &name, "a/#", m(0, 0, 0));
        assert_eq!(v.pick_group("$share/g/a/#", Some(c(1))), None);
        // Blocked and then forgotten: the count of blocked groups goes back to 0.
        v.update(2, c(1), &name, "a/#", m(0, 1, 1));
        assert!(v.blocked("a/x"));
        v.update(2, c(1), &name, "a/#", m(0, 0, 0));
        assert!(!v.blocked("a/x") && v.blocked == 0);
    }

    #[test]
    fn local_groups_round_robin_over_eligible_members() {
        let mut l = LocalGroups::default();
        l.join("$share/g/a", "a", sk(1), opts());
        l.join("$share/g/a", "a", sk(2), opts());
        l.join("$share/g/a", "a", sk(3), opts());
        let picks: Vec<usize> =
            (0..6).map(|_| l.pick("$share/g/a", |_| RANK_BEST).unwrap().0.index()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        // Member 2 not ready: skipped while others are.
        let rank = |k: SessionKey| if k == sk(2) { 1 } else { RANK_BEST };
        let picks: Vec<usize> = (0..4).map(|_| l.pick("$share/g/a", rank).unwrap().0.index()).collect();
        assert!(!picks.contains(&2) && picks.contains(&1) && picks.contains(&3));
        // Only member 2 online (congested), the others offline: member 2 of the three.
        let rank = |k: SessionKey| if k == sk(2) { 1 } else { 0 };
        assert!((0..4).all(|_| matches!(l.pick("$share/g/a", rank), Some((k, _, 1)) if k == sk(2))));
        // Nobody online: still one of them (a persistent session queues it).
        assert!(l.pick("$share/g/a", |_| 0).is_some());
        assert!(l.leave("$share/g/a", sk(2)).is_some());
        assert!(l.leave("$share/g/a", sk(2)).is_none());
        l.leave("$share/g/a", sk(1));
        l.leave("$share/g/a", sk(3));
        assert!(l.get("$share/g/a").is_none());
        assert!(l.pick("$share/g/a", |_| RANK_BEST).is_none());
    }
}
