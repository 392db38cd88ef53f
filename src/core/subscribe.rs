//! SUBSCRIBE and UNSUBSCRIBE: one path for plain and shared filters, the interest other cores are told of, and retained messages for a new subscription.

use super::keys::{ConnKey, SessionKey};
use crate::xcore::CoreId;
use smallvec::SmallVec;

use super::{Core, Flow};
use crate::persist::Record;
use crate::protocol::{reason, Packet, SubAck, Subscribe, UnsubAck, Unsubscribe, Utf8Bytes};
use crate::session::{Message, SubIds, SubOpts};
use std::sync::Arc;

use super::deliver::{Fanout, Grant};

use crate::topic::{is_shared, level_count, Filter};
use crate::xcore::Control;

impl Core {
    pub(super) fn on_subscribe(&mut self, key: ConnKey, skey: SessionKey, sub: Subscribe) -> Flow {
        let mut codes: SmallVec<[u8; 2]> = SmallVec::new();
        let mut granted_filters: SmallVec<[(Utf8Bytes, SubOpts); 2]> = SmallVec::new();
        let id = sub.subscription_id.unwrap_or(0);
        let v5 = self.conns.get(key).is_some_and(|c| c.v5.is_some());
        for f in sub.filters {
            let filter = f.filter.as_str();
            let Some(parsed) =
                Filter::parse(filter).filter(|p| level_count(p.matching()) <= self.settings.max_topic_levels)
            else {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            };
            if parsed.is_shared() && f.no_local && v5 {
                // MQTT-3.8.3-4.
                return Flow::Close(reason::PROTOCOL_ERROR, "No Local on a shared subscription");
            }
            let denied = match (&self.settings.acl, self.sessions.get(skey)) {
                (Some(acl), Some(sess)) => {
                    let user = sess.username.as_ref().map(|u| u.as_str());
                    !acl.can_subscribe(user, sess.session.client_id.as_str(), filter)
                }
                _ => false,
            };
            if denied {
                self.stats.denied += 1;
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            let existed =
                self.sessions.get(skey).is_some_and(|sess| sess.session.subscriptions.contains_key(filter));
            let at_limit = self.sessions.get(skey).is_some_and(|sess| {
                sess.session.subscriptions.len() >= self.settings.max_subscriptions_per_client && !existed
            });
            if at_limit {
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let opts =
                SubOpts { qos: f.qos, no_local: f.no_local, retain_as_published: f.retain_as_published, id };
            if let Some(sid) = self.sessions.get(skey).and_then(|sess| sess.sid) {
                self.log(Record::Subscribe { sid, filter: f.filter.clone(), opts });
            }
            self.add_subscription(skey, parsed, opts);
            codes.push(f.qos as u8);
            // Retain Handling (v5): 0 sends retained messages, 1 only for a new subscription, 2 never.
            // Retained messages are not sent to a shared subscription (mosquitto, EMQX).
            let wants_retained = f.retain_handling == 0 || (f.retain_handling == 1 && !existed);
            if wants_retained && !parsed.is_shared() {
                granted_filters.push((f.filter, opts));
            }
        }
        // A congested session's new filters must pause their publishers too: announce afresh.
        if self.sessions.get(skey).is_some_and(|sess| sess.congested.is_some()) {
            self.withdraw_congestion(skey);
            self.update_congestion(skey);
        }
        // SUBACK first, then the retained messages (mosquitto's order; the spec allows either).
        self.reply(key, Packet::SubAck(SubAck { pkid: sub.pkid, codes, reason_string: None }));
        let mut found: SmallVec<[(Message, SubOpts); 8]> = SmallVec::new();
        for (filter, opts) in &granted_filters {
            self.retained.for_each_match(filter.as_str(), |_, m| found.push((m.clone(), *opts)));
        }
        // In-broker latency of a retained message starts when the subscription asks for it, not when
        // it was published: restamp it so the histogram stays meaningful.
        let now = self.now;
        self.subscribing = true;
        for (mut m, opts) in found {
            let qos = m.qos.min(opts.qos);
            m.received = now;
            let ids: SubIds = if opts.id != 0 { smallvec::smallvec![opts.id] } else { SubIds::new() };
            self.deliver_to(skey, &m, Grant { qos, retain: true, ids }, &mut Fanout::default());
        }
        self.subscribing = false;
        Flow::Continue
    }

    pub(super) fn on_unsubscribe(&mut self, key: ConnKey, skey: SessionKey, u: Unsubscribe) -> Flow {
        let mut codes = SmallVec::new();
        for f in &u.filters {
            let existed = self.unsubscribe_one(skey, f.as_str());
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        self.reply(key, Packet::UnsubAck(UnsubAck { pkid: u.pkid, codes }))
    }

    /// Removes one subscription; returns whether it existed.
    pub(super) fn unsubscribe_one(&mut self, skey: SessionKey, filter: &str) -> bool {
        let existed = self
            .sessions
            .get_mut(skey)
            .is_some_and(|sess| sess.session.subscriptions.remove(filter).is_some());
        if !existed {
            return false;
        }
        if let Some(sid) = self.sessions.get(skey).and_then(|sess| sess.sid) {
            self.log(Record::Unsubscribe { sid, filter: Utf8Bytes::copy_from_str(filter) });
        }
        self.leave_routing(skey, filter);
        true
    }

    /// Adds (or replaces) a subscription of session `skey`: the one path for SUBSCRIBE and for recovery.
    /// A plain filter goes into the index (other cores learn of a filter new to this core); a shared one
    /// joins its group, whose new member count every core is told.
    pub(super) fn add_subscription(&mut self, skey: SessionKey, filter: Filter<'_>, opts: SubOpts) {
        let Some(sess) = self.sessions.get_mut(skey) else {
            debug_assert!(false, "subscription for a session that does not exist");
            return;
        };
        match filter {
            Filter::Plain(f) => {
                sess.session.subscriptions.insert(f.into(), opts);
                if self.index.insert(f, skey, opts).first_for_filter {
                    self.broadcast_interest(f, true);
                }
            }
            Filter::Shared { name, filter } => {
                sess.session.subscriptions.insert(name.into(), opts);
                self.shared_local.join(name, filter, skey, opts);
                self.announce_group(name);
            }
        }
    }

    /// Takes a subscription that was removed from session `skey` out of the routing: the index (other
    /// cores learn when this core has no subscriber of the filter left) or its shared group. Returns the
    /// group's name when the session was a member of one.
    pub(super) fn leave_routing(&mut self, skey: SessionKey, filter: &str) -> Option<Arc<str>> {
        if is_shared(filter) {
            let left = self.shared_local.leave(filter, skey);
            if left.is_some() {
                self.announce_group(filter);
            }
            return left;
        }
        if self.index.remove(filter, skey).last_for_filter {
            self.broadcast_interest(filter, false);
        }
        None
    }

    pub(super) fn broadcast_interest(&mut self, filter: &str, add: bool) {
        for dst in CoreId::all(self.cores()) {
            if dst != self.id {
                self.mesh.stage(dst, Control::Interest { core: self.id, filter: filter.into(), add }.into());
            }
        }
    }
}
