//! SUBSCRIBE and UNSUBSCRIBE: one path for plain and shared filters, the interest other cores are told of, and retained messages for a new subscription.

use super::keys::{ConnKey, SessionKey};
use smallvec::SmallVec;

use super::{Core, Flow, SharedFrames};
use crate::persist::Record;
use crate::protocol::{reason, Packet, SubAck, Subscribe, UnsubAck, Unsubscribe, Utf8Bytes};
use crate::session::{Message, SubIds, SubOpts};
use crate::topic::{level_count, parse_shared, valid_topic_filter};
use crate::xcore::XMsg;

impl Core {
    pub(super) fn on_subscribe(&mut self, key: ConnKey, skey: SessionKey, sub: Subscribe) -> Flow {
        let mut codes: SmallVec<[u8; 2]> = SmallVec::new();
        let mut granted_filters: SmallVec<[(Utf8Bytes, SubOpts); 2]> = SmallVec::new();
        let id = sub.subscription_id.unwrap_or(0);
        let v5 = self.conns.get(key).is_some_and(|c| c.v5.is_some());
        for f in sub.filters {
            let filter = f.filter.as_str();
            let shared = match parse_shared(filter) {
                None => None,
                Some(Ok((_, inner))) => Some(inner),
                Some(Err(())) => {
                    codes.push(reason::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            let inner = shared.unwrap_or(filter);
            if !valid_topic_filter(inner) || level_count(inner) > self.settings.max_topic_levels {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if shared.is_some() && f.no_local && v5 {
                // MQTT-3.8.3-4.
                return Flow::Close(reason::PROTOCOL_ERROR, "No Local on a shared subscription");
            }
            let denied = match (&self.settings.acl, self.sessions.get(skey)) {
                (Some(acl), Some(se)) => {
                    let user = se.username.as_ref().map(|u| u.as_str());
                    !acl.can_subscribe(user, se.session.client_id.as_str(), filter)
                }
                _ => false,
            };
            if denied {
                self.stats.denied += 1;
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            let existed =
                self.sessions.get(skey).is_some_and(|se| se.session.subscriptions.contains_key(filter));
            let at_limit = self.sessions.get(skey).is_some_and(|se| {
                se.session.subscriptions.len() >= self.settings.max_subscriptions_per_client && !existed
            });
            if at_limit {
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let opts =
                SubOpts { qos: f.qos, no_local: f.no_local, retain_as_published: f.retain_as_published, id };
            let mut sid = None;
            if let Some(se) = self.sessions.get_mut(skey) {
                se.session.subscriptions.insert(filter.into(), opts);
                sid = se.sid;
            }
            if let Some(sid) = sid {
                self.log(Record::Subscribe { sid, filter: f.filter.clone(), opts });
            }
            codes.push(f.qos as u8);
            if let Some(inner) = shared {
                // Retained messages are not sent to a shared subscription (mosquitto, EMQX).
                self.shared_local.join(filter, inner, skey, opts);
                self.announce_group(filter);
                continue;
            }
            let ins = self.index.insert(filter, skey, opts);
            if ins.first_for_filter {
                self.broadcast_interest(filter, true);
            }
            // Retain Handling (v5): 0 sends retained messages, 1 only for a new subscription, 2 never.
            if f.retain_handling == 0 || (f.retain_handling == 1 && !existed) {
                granted_filters.push((f.filter, opts));
            }
        }
        // A congested session's new filters must pause their publishers too: announce afresh.
        if self.sessions.get(skey).is_some_and(|se| se.congested.is_some()) {
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
            self.deliver_to(skey, &m, qos, true, ids, &mut SharedFrames::default(), &mut None);
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
        let existed =
            self.sessions.get_mut(skey).is_some_and(|se| se.session.subscriptions.remove(filter).is_some());
        if let (true, Some(sid)) = (existed, self.sessions.get(skey).and_then(|se| se.sid)) {
            self.log(Record::Unsubscribe { sid, filter: Utf8Bytes::copy_from_str(filter) });
        }
        if filter.starts_with("$share/") {
            if self.shared_local.leave(filter, skey).is_some() {
                self.announce_group(filter);
            }
            return existed;
        }
        if self.index.remove(filter, skey).last_for_filter {
            self.broadcast_interest(filter, false);
        }
        existed
    }

    pub(super) fn broadcast_interest(&mut self, filter: &str, add: bool) {
        for dst in 0..self.cores() {
            if dst != self.id {
                self.mesh.stage(dst, XMsg::Interest { core: self.id, filter: filter.into(), add });
            }
        }
    }
}
