//! A PUBLISH from a client: checks in a fixed order (aliases, topic, receive maximum, hold), the acknowledgement, and routing to the retained store, local subscribers, other cores and shared groups.

use super::broken;
use super::keys::{ConnKey, SessionKey};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use smallvec::SmallVec;

use super::{Core, Flow};
use crate::persist::Record;
use crate::protocol::properties::{self, Properties};
use crate::protocol::{reason, Ack, Packet, Publish, QoS, Utf8Bytes};
use crate::session::{Message, MsgProps, OutFrame, Outbox};
use crate::topic::{level_count, valid_topic_name};
use crate::xcore::{CoreId, Data};

/// The v5 properties a message carries on: those forwarded unchanged, encoded once, and its expiry.
/// `None` when there are none, so that a plain message allocates nothing.
pub fn message_props(p: Option<&Properties>, now: Instant) -> Option<Arc<MsgProps>> {
    let p = p?;
    let forward = Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    };
    let expires = p.message_expiry_interval.and_then(|s| now.checked_add(Duration::from_secs(u64::from(s))));
    if forward.is_empty() && expires.is_none() {
        return None;
    }
    let mut buf = BytesMut::new();
    properties::encode_properties_body(&forward, &mut buf);
    Some(Arc::new(MsgProps { forward: buf.freeze(), expires }))
}

pub(super) fn all_cores_mask(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl Core {
    pub(super) fn on_publish(
        &mut self,
        key: ConnKey,
        skey: SessionKey,
        mut p: Publish,
        now: Instant,
    ) -> Flow {
        if let Some(props) = &p.properties {
            // v5 only: the decoder gives properties to nothing else.
            if !props.subscription_identifiers.is_empty() {
                // MQTT-3.3.4-6: subscription identifiers go from the server to clients only.
                return Flow::Close(reason::PROTOCOL_ERROR, "subscription identifier in PUBLISH");
            }
            if let Some(alias) = props.topic_alias {
                let max = self.settings.topic_alias_maximum;
                let Some(v5) = self.conns.get_mut(key).and_then(|c| c.v5.as_mut()) else {
                    return Flow::Close(reason::PROTOCOL_ERROR, "topic alias before v5");
                };
                if alias == 0 || alias > max {
                    return Flow::Close(reason::TOPIC_ALIAS_INVALID, "topic alias out of range");
                }
                let i = usize::from(alias - 1);
                if p.topic.is_empty() {
                    match v5.aliases.get(i).cloned().flatten() {
                        Some(t) => p.topic = t,
                        None => return Flow::Close(reason::TOPIC_ALIAS_INVALID, "unknown topic alias"),
                    }
                } else {
                    if v5.aliases.len() <= i {
                        v5.aliases.resize(i + 1, None);
                    }
                    // Its own allocation: the alias outlives the read buffer the topic is a slice of.
                    v5.aliases[i] = Some(Utf8Bytes::copy_from_str(p.topic.as_str()));
                }
            }
        }
        let v5 = self.conns.get(key).is_some_and(|c| c.v5.is_some());
        if !valid_topic_name(p.topic.as_str()) {
            return Flow::Close(reason::TOPIC_NAME_INVALID, "invalid topic name in PUBLISH");
        }
        if level_count(p.topic.as_str()) > self.settings.max_topic_levels {
            return Flow::Close(reason::TOPIC_NAME_INVALID, "too many topic levels in PUBLISH");
        }
        if v5 && p.qos != QoS::AtMostOnce {
            // The broker's Receive Maximum (MQTT-3.3.4-7): QoS 1/2 PUBLISHes not yet acknowledged are those
            // held back and the QoS 2 flows awaiting PUBREL. A resent QoS 2 id is not a new one.
            let held = self.conns.get(key).and_then(|c| c.held.as_ref()).map_or(0, |h| h.packets.len());
            let (qos2, resend) = self.sessions.get(skey).map_or((0, false), |sess| {
                (sess.session.inbound_qos2_len(), sess.session.has_inbound_qos2(p.pkid))
            });
            if !resend && held + qos2 >= usize::from(self.settings.receive_maximum) {
                return Flow::Close(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded");
            }
        }
        // QoS 0 is never held: it is not acknowledged, and a congested subscriber's outbox bounds it.
        if p.qos != QoS::AtMostOnce {
            let holding = self.conns.get(key).is_some_and(|c| c.held.is_some());
            // Behind an earlier held PUBLISH, to keep acknowledgements in order (MQTT-4.6.0-2).
            if holding || self.must_hold(p.topic.as_str()) {
                self.hold(key, p, now);
                return Flow::Continue;
            }
        }
        self.accept_publish(key, skey, p, now);
        Flow::Continue
    }

    /// Acknowledges a valid PUBLISH and routes it if the ACL lets this client publish to its topic. A
    /// denied one is acknowledged too: with reason 0x87 on v5, as success on 3.1.1 (which has no way to
    /// refuse it; mosquitto does the same).
    pub(super) fn accept_publish(&mut self, key: ConnKey, skey: SessionKey, p: Publish, now: Instant) {
        self.stats.msgs_in += 1;
        let allowed = self.may_publish(skey, p.topic.as_str());
        if !allowed {
            self.stats.denied += 1;
        }
        let v5 = self.conns.get(key).is_some_and(|c| c.v5.is_some());
        // v5 acknowledgements say when nobody was listening (0x10, as mosquitto does) or the ACL refused.
        let code = match (v5, allowed) {
            (false, _) => reason::SUCCESS,
            (true, false) => reason::NOT_AUTHORIZED,
            (true, true) if p.qos != QoS::AtMostOnce && !self.has_subscribers(p.topic.as_str()) => {
                reason::NO_MATCHING_SUBSCRIBERS
            }
            (true, true) => reason::SUCCESS,
        };
        // fsync = "always": the acknowledgement waits until the message is durable wherever it went.
        let always = p.qos != QoS::AtMostOnce && self.persist.as_ref().is_some_and(|p| p.always);
        let sent_before: SmallVec<[u64; 8]> = if always {
            self.persist.as_ref().map(|p| p.sent_counts().into()).unwrap_or_default()
        } else {
            SmallVec::new()
        };
        let mut ack = None;
        let route = match p.qos {
            QoS::AtMostOnce => true,
            QoS::AtLeastOnce => {
                ack = Some(Packet::PubAck(Ack { pkid: p.pkid, reason: code }));
                true
            }
            QoS::ExactlyOnce => {
                let mut first = false;
                let mut answer = Outbox::new();
                if let Some(sess) = self.sessions.get_mut(skey) {
                    first = sess.session.on_inbound_qos2_reason(p.pkid, code, &mut answer);
                }
                self.log_journal(skey);
                if let Some(OutFrame::Control(pk)) = answer.pop_front() {
                    ack = Some(pk);
                }
                first
            }
        };
        if route && allowed {
            let props = message_props(p.properties.as_deref(), now);
            let msg = Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                received: now,
                props,
            };
            self.publish_from(msg, Some(skey));
        }
        let Some(ack) = ack else { return };
        if always {
            let Some(ctl) = self.conns.get(key).map(|c| c.ctl.clone()) else {
                broken!("a PUBLISH acknowledged for a connection that does not exist");
                return;
            };
            let Some(pst) = &mut self.persist else { return };
            let remote: SmallVec<[(usize, u64); 2]> = pst
                .sent_counts()
                .iter()
                .zip(sent_before.iter())
                .enumerate()
                .filter(|(_, (now, before))| now > before)
                .map(|(core, (&now, _))| (core, now))
                .collect();
            let local = pst.appended;
            if let Some((ctl, ack)) = pst.hold_ack(ctl, ack, local, remote) {
                ctl.outbox.borrow_mut().push_back(OutFrame::Control(ack));
                self.mark_dirty(&ctl);
            }
            return;
        }
        self.reply(key, ack);
    }

    /// Whether any subscription on any core may match `topic` (this core's index, and the interest other
    /// cores announced).
    pub(super) fn has_subscribers(&self, topic: &str) -> bool {
        self.index.any_match(topic) || self.interest.any_match(topic) || self.shared_views.any_match(topic)
    }

    /// The ACL's write check for the client of session `skey`.
    pub(super) fn may_publish(&self, skey: SessionKey, topic: &str) -> bool {
        match (&self.settings.acl, self.sessions.get(skey)) {
            (None, _) => true,
            (Some(acl), Some(sess)) => acl.can_publish(
                sess.username.as_ref().map(|u| u.as_str()),
                sess.session.client_id.as_str(),
                topic,
            ),
            (Some(_), None) => false,
        }
    }

    /// Routes a message published by a client of this core (or a will): retained store, local
    /// subscribers, and every other core with interest (all of them for a retained message, so that
    /// each core's retained copy stays whole).
    pub fn publish(&mut self, msg: Message) {
        self.publish_from(msg, None);
    }

    /// [`Core::publish`] for a message from the client of session `origin` (v5 No Local).
    pub(super) fn publish_from(&mut self, mut msg: Message, origin: Option<SessionKey>) {
        let mut mask: u64 = 0;
        if msg.retain {
            // Kept by every core's retained store: compact once here, not on each core.
            msg = msg.compacted();
            self.store_retained(&msg);
            mask = all_cores_mask(self.cores()) & !(1u64 << self.id.index());
        } else {
            let me = self.id;
            for &(core, ()) in self.interest.matches_cached(msg.topic.as_str(), &mut self.interest_cache) {
                if core != me {
                    mask |= 1u64 << core.index();
                }
            }
        }
        while mask != 0 {
            let dst = CoreId::new(mask.trailing_zeros() as usize);
            mask &= mask - 1;
            self.mesh.stage(dst, Data::Publish(msg.clone()).into());
            if let Some(p) = &mut self.persist {
                p.sent_to(dst);
            }
        }
        self.deliver_local(&msg, origin);
        // One member of each matching shared group, chosen here for the whole broker.
        let mut picks: SmallVec<[(Arc<str>, CoreId); 2]> = SmallVec::new();
        self.shared_views.pick(msg.topic.as_str(), |g, core| picks.push((g.clone(), core)));
        for (group, core) in picks {
            if core == self.id {
                self.deliver_shared(&group, &msg, 0);
            } else {
                self.stage_shared(core, &group, msg.clone(), 0);
            }
        }
    }

    pub(super) fn store_retained(&mut self, msg: &Message) {
        if self.owns_retained(msg.topic.as_str()) {
            self.log(Record::Retained { msg: msg.clone() });
        }
        if msg.payload.is_empty() {
            self.retained.remove(msg.topic.as_str());
        } else {
            self.retained.insert(msg.topic.as_str(), msg.clone());
        }
    }
}
