//! Shared subscriptions as the core routes them: announcing this core's members of each group, and delivering to one member (the groups themselves are in `shared.rs`).

use super::keys::SessionKey;
use std::sync::Arc;

use smallvec::SmallVec;

use super::deliver::{Fanout, Grant};
use super::shared::{Members, RANK_BEST};
use super::Core;
use crate::session::Message;
use crate::topic::is_shared;
use crate::topic::parse_shared;
use crate::xcore::{Control, CoreId, Data};

impl Core {
    /// Tells every core (this one included) how many members of each shared group of session `skey` this
    /// core has, after the session joined, left, came online or went offline.
    pub(super) fn announce_session_groups(&mut self, skey: SessionKey) {
        let Some(sess) = self.sessions.get(skey) else { return };
        let names: SmallVec<[Box<str>; 2]> =
            sess.session.subscriptions.keys().filter(|f| is_shared(f)).cloned().collect();
        for name in names {
            self.announce_group(&name);
        }
    }

    pub(super) fn announce_group(&mut self, name: &str) {
        let (group, filter, m) = match self.shared_local.get(name) {
            Some(g) => {
                let mut m = Members { ready: 0, online: 0, total: g.members.len() as u32 };
                for sess in g.members.iter().filter_map(|(k, _)| self.sessions.get(*k)) {
                    if sess.conn.is_some() {
                        m.online += 1;
                        m.ready += u32::from(sess.congested.is_none());
                    }
                }
                (g.name.clone(), g.filter.clone(), m)
            }
            None => match parse_shared(name) {
                Some(Ok((_, filter))) => (Arc::from(name), Box::from(filter), Members::default()),
                _ => return,
            },
        };
        let cores = self.cores();
        if self.shared_views.update(cores, self.id, &group, &filter, m) {
            self.retry_held = true;
        }
        for dst in CoreId::all(cores) {
            if dst != self.id {
                let msg = Control::Shared {
                    core: self.id,
                    group: group.clone(),
                    filter: filter.clone(),
                    ready: m.ready,
                    online: m.online,
                    total: m.total,
                };
                self.mesh.stage(dst, msg.into());
            }
        }
    }

    /// Delivers `msg` to one member of the shared group `name` on this core: a ready one (online, not
    /// congested) if there is one, round robin; else an online one (its queue has room beyond its limit
    /// for what was already on its way when it congested); else any (its persistent session queues the
    /// message). If the core has no member left (the last one left while the message was on its way),
    /// another core with members gets it: it was acknowledged and must not be lost.
    pub(super) fn deliver_shared(&mut self, name: &Arc<str>, msg: &Message, hops: u8) {
        let sessions = &self.sessions;
        let rank = |skey: SessionKey| match sessions.get(skey) {
            Some(sess) if sess.conn.is_some() && sess.congested.is_none() => RANK_BEST,
            Some(sess) if sess.conn.is_some() => 1,
            _ => 0,
        };
        let may_pass = usize::from(hops) < self.cores();
        let Some((skey, o, rank)) = self.shared_local.pick(name, rank) else {
            if may_pass {
                self.send_to_group(name, msg.clone(), Some(self.id), hops + 1);
            } else {
                self.stats.dropped += 1;
            }
            return;
        };
        // None of this core's members is ready (its view was older than the publisher's): a core that
        // has a ready one gets it rather than a congested or offline queue.
        if rank < RANK_BEST && may_pass {
            if let Some(core) = self.shared_views.pick_ready_elsewhere(name, self.id) {
                self.stage_shared(core, name, msg.clone(), hops + 1);
                return;
            }
        }
        self.deliver_to(skey, msg, Grant::of(msg, &o), &mut Fanout::default());
    }

    /// Sends `msg` to one member of the shared group `name`, on whichever core the views pick (never
    /// `except`). A message for a group nobody subscribes to any more is counted as dropped: it has no
    /// subscriber to lose it.
    pub(super) fn send_to_group(&mut self, name: &Arc<str>, msg: Message, except: Option<CoreId>, hops: u8) {
        match self.shared_views.pick_group(name, except) {
            Some(core) if core == self.id => self.deliver_shared(name, &msg, hops),
            Some(core) => self.stage_shared(core, name, msg, hops),
            None => self.stats.dropped += 1,
        }
    }

    /// Sends `msg` to `core` for one member of the shared group `name` there.
    pub(super) fn stage_shared(&mut self, core: CoreId, name: &Arc<str>, msg: Message, hops: u8) {
        self.mesh.stage(core, Data::SharedPublish { msg, group: name.clone(), hops }.into());
        if let Some(p) = &mut self.persist {
            p.sent_to(core);
        }
    }
}
