//! Delivery to this core's sessions: one copy per session at the highest granted QoS, QoS 0 frames encoded once per protocol layout and shared.

use super::broken;
use super::keys::SessionKey;
use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use super::Core;
use crate::protocol::properties::{self};
use crate::protocol::{self, QoS};
use crate::session::{Delivered, Message, OutFrame, SubIds, SubOpts};

/// Size of the blocks shared QoS 0 frames are encoded into.
pub(super) const FRAME_BLOCK: usize = 64 * 1024;

/// The QoS 0 frames of one message, encoded at most once per protocol layout and shared by every QoS 0
/// subscriber of that layout on this core.
#[derive(Default)]
struct SharedFrames {
    pub(super) v3: Option<Bytes>,
    pub(super) v5: Option<Bytes>,
}

impl SharedFrames {
    /// The frame for `v5` or 3.1/3.1.1 subscribers, encoded on first use. Frames are carved from 64 KiB
    /// blocks so that encoding costs an allocation per block, not per message.
    pub(super) fn get(&mut self, v5: bool, msg: &Message, buf: &mut BytesMut) -> Bytes {
        let slot = if v5 { &mut self.v5 } else { &mut self.v3 };
        slot.get_or_insert_with(|| {
            let forward = msg.props.as_ref().map_or(&[][..], |p| &p.forward[..]);
            let need = if v5 {
                protocol::publish_head_len_v5(
                    msg.topic.len(),
                    QoS::AtMostOnce,
                    forward.len(),
                    msg.payload.len(),
                )
            } else {
                protocol::publish_head_len(msg.topic.len(), QoS::AtMostOnce, msg.payload.len())
            } + msg.payload.len();
            if buf.capacity() < need {
                buf.reserve(need.max(FRAME_BLOCK));
            }
            if v5 {
                protocol::encode_publish_head_v5(
                    msg.topic.as_str(),
                    QoS::AtMostOnce,
                    0,
                    false,
                    false,
                    &[forward],
                    msg.payload.len(),
                    buf,
                );
            } else {
                protocol::encode_publish_head(
                    msg.topic.as_str(),
                    QoS::AtMostOnce,
                    0,
                    false,
                    false,
                    msg.payload.len(),
                    buf,
                );
            }
            buf.extend_from_slice(&msg.payload);
            buf.split().freeze()
        })
        .clone()
    }
}

/// The size of the v5 PUBLISH the writer sends for this delivery, without a topic alias (an alias only
/// makes it smaller): checked against the client's Maximum Packet Size.
pub(super) fn outbound_size(msg: &Message, qos: QoS, sub_ids: &SubIds) -> usize {
    let forward = msg.props.as_ref().map_or(0, |p| p.forward.len());
    let expires = msg.props.as_ref().is_some_and(|p| p.expires.is_some());
    // What the writer adds (`server::outbox`), without an alias: an alias only makes it smaller.
    let props = forward + properties::delivery_props_len(sub_ids, expires, false);
    protocol::publish_head_len_v5(msg.topic.len(), qos, props, msg.payload.len()) + msg.payload.len()
}

/// What one session was granted for one message: the QoS (the lower of the message's and the highest
/// matching subscription's), whether the retain flag stays set, and the matching subscriptions' v5
/// identifiers.
pub(super) struct Grant {
    pub(super) qos: QoS,
    pub(super) retain: bool,
    pub(super) ids: SubIds,
}

impl Grant {
    /// The grant of one subscription with options `o` for `msg`.
    pub(super) fn of(msg: &Message, o: &SubOpts) -> Grant {
        let ids: SubIds = if o.id != 0 { smallvec::smallvec![o.id] } else { SubIds::new() };
        Grant { qos: msg.qos.min(o.qos), retain: msg.retain && o.retain_as_published, ids }
    }
}

/// What the deliveries of one message on this core share: its QoS 0 frames (one per protocol layout) and
/// its compacted copy for the sessions that queue it (one copy per message, not per subscriber).
#[derive(Default)]
pub(super) struct Fanout {
    frames: SharedFrames,
    compact: Option<Message>,
}

impl Core {
    /// Delivers to this core's matching sessions: once per session at the highest granted QoS, carrying
    /// the identifiers of every matching subscription (MQTT-3.3.4-3/5). `origin` is the publisher's session
    /// when it is on this core: its No Local subscriptions do not match.
    pub(super) fn deliver_local(&mut self, msg: &Message, origin: Option<SessionKey>) {
        let mut matches: SmallVec<[(SessionKey, SubOpts); 16]> = SmallVec::new();
        for &(skey, o) in self.index.matches_cached(msg.topic.as_str(), &mut self.index_cache) {
            if !(o.no_local && origin == Some(skey)) {
                matches.push((skey, o));
            }
        }
        if matches.is_empty() {
            return;
        }
        let mut fanout = Fanout::default();
        if matches.len() == 1 {
            let (skey, o) = matches[0];
            self.deliver_to(skey, msg, Grant::of(msg, &o), &mut fanout);
            return;
        }
        // Overlapping subscriptions of one client: deliver once at the highest QoS (MQTT-3.3.5-1).
        matches.sort_unstable_by_key(|m| m.0);
        let mut i = 0;
        while i < matches.len() {
            let skey = matches[i].0;
            let mut qos = QoS::AtMostOnce;
            let mut retain = false;
            let mut ids = SubIds::new();
            while let Some(&(k, o)) = matches.get(i) {
                if k != skey {
                    break;
                }
                qos = qos.max(o.qos);
                retain |= msg.retain && o.retain_as_published;
                if o.id != 0 && !ids.contains(&o.id) {
                    ids.push(o.id);
                }
                i += 1;
            }
            self.deliver_to(skey, msg, Grant { qos: msg.qos.min(qos), retain, ids }, &mut fanout);
        }
    }

    /// One delivery of `msg` to session `skey`, as granted.
    pub(super) fn deliver_to(&mut self, skey: SessionKey, msg: &Message, grant: Grant, fanout: &mut Fanout) {
        let Grant { qos, retain, ids: sub_ids } = grant;
        let Some(sess) = self.sessions.get_mut(skey) else {
            broken!("the index names a session that does not exist");
            return;
        };
        if sess.check_reads {
            if let Some(acl) = &self.settings.acl {
                let user = sess.username.as_ref().map(|u| u.as_str());
                if !acl.can_read(user, sess.session.client_id.as_str(), msg.topic.as_str()) {
                    return;
                }
            }
        }
        if msg.props.as_ref().is_some_and(|p| p.expires.is_some()) && msg.expired(self.now) {
            // MQTT-3.3.2-5: an expired message is not delivered.
            return;
        }
        let conn = sess.conn.and_then(|k| self.conns.get(k));
        let ctl = conn.map(|c| c.ctl.clone());
        let v5 = conn.and_then(|c| c.v5.as_deref());
        if let Some(v5) = v5 {
            if outbound_size(msg, qos, &sub_ids) > v5.max_packet {
                // MQTT-3.1.2-25: a packet over the client's Maximum Packet Size is dropped for that client.
                self.stats.dropped += 1;
                return;
            }
        }
        match (&ctl, qos) {
            (Some(ctl), QoS::AtMostOnce) => {
                let mut out = ctl.outbox.borrow_mut();
                if out.len() >= self.settings.max_outbox_messages {
                    // A subscriber that does not read: QoS 0 beyond its bound is dropped and counted.
                    self.stats.dropped += 1;
                    return;
                }
                // A frame shared by every QoS 0 subscriber of this layout; per-subscriber heads where the
                // subscriber needs its own (retained, retain as published, subscription ids, aliases,
                // expiry that counts down).
                let own = retain
                    || !sub_ids.is_empty()
                    || v5.is_some_and(|v| v.aliases_out)
                    || (v5.is_some() && msg.props.as_ref().is_some_and(|p| p.expires.is_some()));
                if own {
                    sess.session.deliver_with(msg.clone(), qos, retain, sub_ids, Some(&mut out));
                } else {
                    let frame = fanout.frames.get(v5.is_some(), msg, &mut self.frame_buf);
                    out.push_back(OutFrame::Shared { frame, received: msg.received });
                }
            }
            (None, QoS::AtMostOnce) if !self.settings.queue_qos0_messages => return,
            _ => {
                let m = if sess.session.would_queue(qos, ctl.is_some()) {
                    fanout.compact.get_or_insert_with(|| msg.compacted()).clone()
                } else {
                    msg.clone()
                };
                let mut guard = ctl.as_ref().map(|c| c.outbox.borrow_mut());
                let delivered = match guard.as_deref_mut() {
                    Some(out) if self.subscribing => sess.session.deliver_backlog(m, qos, sub_ids, out),
                    out => sess.session.deliver_with(m, qos, retain, sub_ids, out),
                };
                if delivered == Delivered::Dropped {
                    self.stats.dropped += 1;
                }
                if guard.is_some() && sess.session.overfull() && !self.overfull.contains(&skey) {
                    self.overfull.push(skey);
                }
                let newly_full = sess.congested.is_none() && guard.is_some() && sess.session.congested();
                drop(guard);
                self.log_journal(skey);
                if newly_full {
                    self.update_congestion(skey);
                }
            }
        }
        if let Some(ctl) = ctl {
            self.mark_dirty(&ctl);
        }
    }
}
