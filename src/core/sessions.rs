//! Sessions over time: ending one (its subscriptions, its shared-group messages handed on) and wills.

use super::broken;
use super::keys::{ConnKey, SessionKey};
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use super::{message_props, Core};
use crate::persist::Record;
use crate::protocol::{Utf8Bytes, Will};
use crate::session::{Message, Session};
use crate::topic::is_shared;
use crate::topic::{matches as topic_matches, parse_shared};

pub(super) struct SessionEntry {
    pub(super) session: Session,
    /// The connection attached to the session, if the client is online.
    pub(super) conn: Option<ConnKey>,
    /// The filters announced as congested (pause policy), withdrawn exactly when it drains.
    pub(super) congested: Option<Box<[Box<str>]>>,
    /// While congested: when the client last acknowledged something (first seen by a sweep).
    pub(super) stalled_since: Option<Instant>,
    /// The username of the client's current (or last) connection, for the ACL.
    pub(super) username: Option<Utf8Bytes>,
    /// The ACL has deny rules for this client: deliveries are checked one by one (otherwise a
    /// subscription the ACL allowed covers only readable topics).
    pub(super) check_reads: bool,
    /// Seconds the session outlives its connection: 0 = ends with it, `u32::MAX` = never expires.
    pub(super) expiry: u32,
    /// When the client went offline (for expiry).
    pub(super) offline_since: Option<Instant>,
    /// A v5 will waiting for its Will Delay Interval, and when it is due.
    /// (One box for both: most sessions never have one.)
    pub(super) pending_will: Option<Box<(Will, Instant)>>,
    /// The session's number in this core's persistence log, while it is persisted (persistence on and
    /// expiry above 0).
    pub(super) sid: Option<u32>,
}

impl Core {
    /// Ends a session: its subscriptions leave the index, its queue is dropped, a will still waiting for
    /// its delay is published now (MQTT-3.1.3-9: the session ended first).
    pub(super) fn end_session(&mut self, skey: SessionKey) {
        if !self.sessions.contains(skey) {
            return;
        }
        self.fire_will(skey);
        self.withdraw_congestion(skey);
        if let Some(sid) = self.sessions.get(skey).and_then(|sess| sess.sid) {
            self.log(Record::SessionEnd { sid });
        }
        let Some(mut sess) = self.sessions.remove(skey) else {
            broken!("a session checked a moment ago is gone");
            return;
        };
        let mut groups: SmallVec<[Arc<str>; 2]> = SmallVec::new();
        for filter in sess.session.subscriptions.keys() {
            groups.extend(self.leave_routing(skey, filter));
        }
        if self.by_client.get(&sess.session.client_id) == Some(&skey) {
            self.by_client.remove(&sess.session.client_id);
        }
        if !groups.is_empty() {
            self.redispatch(&mut sess.session, &groups);
        }
    }

    /// A member of shared groups ended its session with messages it had not acknowledged or not yet been
    /// sent: each goes to another member of its group (MQTT 5.0 §4.8.2: the server SHOULD send it to
    /// another client of the shared subscription), so that a member leaving under load loses nothing
    /// that was acknowledged to its publisher. A message is given to the first of the session's groups
    /// whose filter matches its topic, unless one of the session's plain subscriptions matches it too
    /// (then the copy may have been the plain subscription's, and it ends with the session).
    pub(super) fn redispatch(&mut self, session: &mut Session, groups: &[Arc<str>]) {
        let plain: SmallVec<[Box<str>; 4]> =
            session.subscriptions.keys().filter(|f| !is_shared(f)).cloned().collect();
        let filters: SmallVec<[(&Arc<str>, &str); 2]> = groups
            .iter()
            .filter_map(|g| match parse_shared(g) {
                Some(Ok((_, inner))) => Some((g, inner)),
                _ => None,
            })
            .collect();
        let mut moved: SmallVec<[(Arc<str>, Message); 8]> = SmallVec::new();
        for msg in session.take_undelivered() {
            let topic = msg.topic.as_str();
            if plain.iter().any(|f| topic_matches(f, topic)) {
                continue;
            }
            if let Some((g, _)) = filters.iter().find(|(_, f)| topic_matches(f, topic)) {
                moved.push(((*g).clone(), msg));
            }
        }
        for (g, msg) in moved {
            self.send_to_group(&g, msg, None, 0);
        }
    }

    /// Publishes the session's delayed will, if it has one.
    pub(super) fn fire_will(&mut self, skey: SessionKey) {
        let Some(pending) = self.sessions.get_mut(skey).and_then(|sess| sess.pending_will.take()) else {
            return;
        };
        self.publish_will(skey, pending.0);
    }

    /// Publishes a will of the client of session `skey`, if the ACL lets that client publish to its topic.
    pub(super) fn publish_will(&mut self, skey: SessionKey, w: Will) {
        self.stats.msgs_in += 1;
        if !self.may_publish(skey, w.topic.as_str()) {
            self.stats.denied += 1;
            return;
        }
        let now = self.now;
        let props = message_props((!w.properties.is_empty()).then_some(&w.properties), now);
        self.publish(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            received: now,
            props,
        });
    }
}
