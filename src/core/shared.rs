//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5.0 §4.8.2, also offered to 3.1.1 clients as
//! mosquitto and EMQX do): each message goes to one member of each group, wherever the members live.
//!
//! The choice is made in two steps, so that no core needs another core's sessions:
//! 1. the **publishing core** picks a core for each matching group, weighted by how many online members
//!    each core announced ([`GroupViews`], kept current by `XMsg::Shared`);
//! 2. that **core** picks one of its own members, round robin, online ones first ([`LocalGroups`]).
//!
//! Members receive in proportion to their number: a core with two online members is picked twice as often
//! as one with one. Pure data structures: the core glues them to sessions and the mesh.

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
}

impl GroupViews {
    /// Records what `core` announced for the group `name` (`$share/{group}/{filter}`, with `filter` its
    /// filter). A group whose members are all gone is forgotten.
    pub fn update(
        &mut self,
        cores: usize,
        core: usize,
        name: &Arc<str>,
        filter: &str,
        online: u32,
        total: u32,
    ) {
        let slot = match self.by_name.get(name) {
            Some(&slot) => slot,
            None if total == 0 => return,
            None => {
                let slot = self.groups.insert(GroupView {
                    name: name.clone(),
                    filter: filter.into(),
                    online: vec![0; cores],
                    total: vec![0; cores],
                    next: 0,
                });
                self.by_name.insert(name.clone(), slot);
                self.index.insert(filter, slot, ());
                slot
            }
        };
        let Some(g) = self.groups.get_mut(slot) else { return };
        if let (Some(o), Some(t)) = (g.online.get_mut(core), g.total.get_mut(core)) {
            *o = online;
            *t = total;
        }
        if g.total.iter().all(|&t| t == 0) {
            let g = self.groups.remove(slot);
            self.by_name.remove(&g.name);
            self.index.remove(&g.filter, slot);
        }
    }

    /// Calls `f(group name, core)` once for every group with a filter matching `topic`, with the core that
    /// should deliver to it: one with online members, in proportion to their number; if none is online,
    /// one with members at all (their persistent sessions queue the message).
    pub fn pick(&mut self, topic: &str, mut f: impl FnMut(&Arc<str>, usize)) {
        if self.groups.is_empty() {
            return;
        }
        let mut slots: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        self.index.for_each_match(topic, |slot, _| slots.push(slot));
        for slot in slots {
            let Some(g) = self.groups.get_mut(slot) else { continue };
            let counts = if g.online.iter().any(|&n| n > 0) { &g.online } else { &g.total };
            let sum: u64 = counts.iter().map(|&n| u64::from(n)).sum();
            if sum == 0 {
                continue;
            }
            let mut at = g.next % sum;
            g.next = g.next.wrapping_add(1);
            for (core, &n) in counts.iter().enumerate() {
                if at < u64::from(n) {
                    f(&g.name, core);
                    break;
                }
                at -= u64::from(n);
            }
        }
    }

    /// Whether some group's filter matches `topic`.
    pub fn any_match(&self, topic: &str) -> bool {
        !self.groups.is_empty() && self.index.any_match(topic)
    }
}

/// One group's members on this core.
pub struct LocalGroup {
    pub name: Arc<str>,
    pub filter: Box<str>,
    /// Session key and subscription options of each member, in subscription order.
    pub members: Vec<(usize, SubOpts)>,
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
    pub fn join(&mut self, name: &str, filter: &str, skey: usize, opts: SubOpts) -> Arc<str> {
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
    pub fn leave(&mut self, name: &str, skey: usize) -> Option<Arc<str>> {
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

    /// The member to deliver the next message of group `name` to: round robin over those `eligible`
    /// accepts (online and not congested), else over every member; `None` without members.
    pub fn pick(&mut self, name: &str, eligible: impl Fn(usize) -> bool) -> Option<(usize, SubOpts)> {
        let &slot = self.by_name.get(name)?;
        let g = self.groups.get_mut(slot)?;
        let n = g.members.len();
        if n == 0 {
            return None;
        }
        let start = g.next;
        for i in 0..n {
            let m = g.members[(start + i) % n];
            if eligible(m.0) {
                g.next = (start + i + 1) % n;
                return Some(m);
            }
        }
        g.next = (start + 1) % n;
        g.members.get(start % n).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::QoS;

    fn opts() -> SubOpts {
        SubOpts::qos(QoS::AtLeastOnce)
    }

    #[test]
    fn views_pick_cores_in_proportion_to_online_members() {
        let mut v = GroupViews::default();
        let name: Arc<str> = "$share/g/a/+".into();
        v.update(2, 0, &name, "a/+", 1, 1);
        v.update(2, 1, &name, "a/+", 2, 3);
        let mut per_core = [0; 2];
        for _ in 0..300 {
            let mut n = 0;
            v.pick("a/x", |g, core| {
                assert_eq!(&**g, "$share/g/a/+");
                per_core[core] += 1;
                n += 1;
            });
            assert_eq!(n, 1, "exactly one core per group and message");
        }
        assert_eq!(per_core, [100, 200]);
        let mut hit = false;
        v.pick("b/x", |_, _| hit = true);
        assert!(!hit);
        // Nobody online: the core with (offline) members still gets it.
        v.update(2, 0, &name, "a/+", 0, 0);
        v.update(2, 1, &name, "a/+", 0, 3);
        let mut cores = Vec::new();
        v.pick("a/x", |_, c| cores.push(c));
        assert_eq!(cores, [1]);
        // All gone: forgotten.
        v.update(2, 1, &name, "a/+", 0, 0);
        assert!(!v.any_match("a/x"));
    }

    #[test]
    fn local_groups_round_robin_over_eligible_members() {
        let mut l = LocalGroups::default();
        l.join("$share/g/a", "a", 1, opts());
        l.join("$share/g/a", "a", 2, opts());
        l.join("$share/g/a", "a", 3, opts());
        let picks: Vec<usize> = (0..6).map(|_| l.pick("$share/g/a", |_| true).unwrap().0).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
        // Member 2 offline: skipped.
        let picks: Vec<usize> = (0..4).map(|_| l.pick("$share/g/a", |k| k != 2).unwrap().0).collect();
        assert!(!picks.contains(&2) && picks.contains(&1) && picks.contains(&3));
        // Nobody eligible: still one of them (a persistent session queues it).
        assert!(l.pick("$share/g/a", |_| false).is_some());
        assert!(l.leave("$share/g/a", 2).is_some());
        assert!(l.leave("$share/g/a", 2).is_none());
        l.leave("$share/g/a", 1);
        l.leave("$share/g/a", 3);
        assert!(l.get("$share/g/a").is_none());
        assert!(l.pick("$share/g/a", |_| true).is_none());
    }
}
