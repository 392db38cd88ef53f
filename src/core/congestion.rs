//! Congestion (pause policy): sessions whose queue is full pause the QoS 1/2 publishers of matching messages on every core; their PUBLISHes wait unacknowledged in the connection's `Held` list until the congestion is withdrawn.

use super::broken;
use super::keys::{ConnKey, Key, SessionKey};
use crate::xcore::CoreId;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use super::{ConnCtl, Core, SlowSubscriber};
use crate::protocol::{Publish, QoS};
use crate::topic::is_shared;
use crate::xcore::Control;

/// A connection holds at most this many QoS 1/2 PUBLISHes (or [`HOLD_BYTES`] of them) waiting for a
/// congested subscriber before the broker stops reading it. Below that it keeps reading, so the
/// acknowledgements a client sends for its own subscriptions still arrive (a client subscribed to what
/// it publishes cannot deadlock), and a well-behaved client's in-flight window (20 in mosquitto_pub
/// and paho, 100 in rumqttc) fits.
pub const HOLD_MESSAGES: usize = 1024;

pub const HOLD_BYTES: usize = 1 << 20;

/// PUBLISHes of one connection waiting, in arrival order, for congested subscribers to drain.
#[derive(Default)]
pub(super) struct Held {
    pub(super) packets: VecDeque<(Publish, Instant)>,
    pub(super) bytes: usize,
}

impl Held {
    /// The reader must stop reading the connection until some are released.
    pub(super) fn is_full(&self) -> bool {
        self.packets.len() >= HOLD_MESSAGES || self.bytes >= HOLD_BYTES
    }
}

/// Names a session in the congestion index of every core.
pub(super) fn congestion_key(core: CoreId, skey: SessionKey) -> u64 {
    ((core.index() as u64) << 48) | skey.index() as u64
}

impl Core {
    /// Whether a QoS 1/2 PUBLISH to `topic` must be held before it is acknowledged: a matching congested
    /// subscriber, a matching shared group whose online members are all congested, or more staged for
    /// another core than its ring can take (a congested subscriber there has room for what is in transit
    /// when it tells the publishers to wait, about a ring per core, not for an unbounded staging queue:
    /// several publishers reading 64 KiB each in one loop turn, or a release of held PUBLISHes, would
    /// overrun it). The last one is set right by the consumer draining (`end_batch` retries).
    pub(super) fn must_hold(&mut self, topic: &str) -> bool {
        if self.mesh.saturated() {
            self.retry_on_room = true;
            return true;
        }
        (!self.congested.is_empty() && self.congested.any_match(topic)) || self.shared_views.blocked(topic)
    }

    pub(super) fn hold(&mut self, key: ConnKey, p: Publish, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else {
            broken!("a PUBLISH held for a connection that does not exist");
            return;
        };
        let held = c.held.get_or_insert_with(|| {
            self.holding.push(key);
            Box::default()
        });
        held.bytes += p.payload.len() + p.topic.len();
        held.packets.push_back((p, now));
        self.stats.held += 1;
    }

    /// Whether the reader of `key` must stop reading until held PUBLISHes are released.
    pub fn hold_full(&self, key: ConnKey, ctl: &Rc<ConnCtl>) -> bool {
        self.is_current(key, ctl)
            && self.conns.get(key).is_some_and(|c| c.held.as_ref().is_some_and(|h| h.is_full()))
    }

    /// Returns (and clears) whether held PUBLISHes were released since the last call.
    pub fn take_released(&mut self) -> bool {
        std::mem::take(&mut self.released)
    }

    /// Retries held PUBLISHes after a congestion was withdrawn: each connection's, in order, until one
    /// still meets a congested subscriber.
    pub(super) fn release_held(&mut self) {
        if !std::mem::take(&mut self.retry_held) {
            return;
        }
        for key in std::mem::take(&mut self.holding) {
            loop {
                let front = self.conns.get(key).and_then(|c| Some((c.session?, c.held.as_ref()?)));
                let Some((skey, held)) = front else { break };
                let Some(topic) = held.packets.front().map(|(p, _)| p.topic.clone()) else {
                    if let Some(c) = self.conns.get_mut(key) {
                        c.held = None;
                    }
                    self.released = true;
                    break;
                };
                if self.must_hold(topic.as_str()) {
                    self.holding.push(key);
                    break;
                }
                let Some(held) = self.conns.get_mut(key).and_then(|c| c.held.as_mut()) else { break };
                let Some((p, received)) = held.packets.pop_front() else { break };
                held.bytes -= p.payload.len() + p.topic.len();
                self.released = true;
                self.accept_publish(key, skey, p, received);
            }
        }
    }

    /// The client acknowledged a delivery: its queue may have drained, and it is not stuck.
    pub(super) fn progressed(&mut self, skey: SessionKey, now: Instant) {
        self.update_congestion(skey);
        if let Some(sess) = self.sessions.get_mut(skey) {
            sess.stalled_since = sess.congested.as_ref().map(|_| now);
        }
    }

    /// Announces or withdraws the session's congestion after its queue or connection changed.
    pub(super) fn update_congestion(&mut self, skey: SessionKey) {
        let Some(sess) = self.sessions.get(skey) else { return };
        let full = sess.conn.is_some()
            && self.settings.slow_subscriber == SlowSubscriber::Pause
            && sess.session.congested();
        match &sess.congested {
            None if full => self.announce_congestion(skey),
            Some(_) if sess.conn.is_none() || sess.session.relieved() => self.withdraw_congestion(skey),
            _ => {}
        }
    }

    pub(super) fn announce_congestion(&mut self, skey: SessionKey) {
        let Some(sess) = self.sessions.get_mut(skey) else { return };
        // Only QoS 1/2 subscriptions queue what QoS 1/2 publishers send.
        let filters: Box<[Box<str>]> = sess
            .session
            .subscriptions
            .iter()
            // A shared group pauses its publishers only when all its online members are congested: its
            // readiness is announced below instead.
            .filter(|(f, o)| o.qos != QoS::AtMostOnce && !is_shared(f))
            .map(|(f, _)| f.clone())
            .collect();
        sess.congested = Some(filters.clone());
        if !self.stalled.contains(&skey) {
            self.stalled.push(skey);
        }
        let ckey = congestion_key(self.id, skey);
        for f in filters.iter() {
            self.congested.insert(f, ckey, ());
            for dst in CoreId::all(self.cores()) {
                if dst != self.id {
                    self.mesh
                        .stage(dst, Control::Congestion { key: ckey, filter: f.clone(), on: true }.into());
                }
            }
        }
        self.announce_session_groups(skey);
    }

    pub(super) fn withdraw_congestion(&mut self, skey: SessionKey) {
        let Some(sess) = self.sessions.get_mut(skey) else { return };
        sess.stalled_since = None;
        let Some(filters) = sess.congested.take() else { return };
        let ckey = congestion_key(self.id, skey);
        for f in filters.into_vec() {
            self.congested.remove(&f, ckey);
            for dst in CoreId::all(self.cores()) {
                if dst != self.id {
                    self.mesh
                        .stage(dst, Control::Congestion { key: ckey, filter: f.clone(), on: false }.into());
                }
            }
        }
        self.retry_held = true;
        self.announce_session_groups(skey);
    }

    /// Whether the core takes nothing from other cores for now (an overfull session); the runtime then
    /// waits for the core's own wake-up, which [`Core::end_batch`] sends once it has drained.
    pub fn inbound_paused(&mut self) -> bool {
        let sessions = &self.sessions;
        self.overfull.retain(|&mut k| {
            sessions.get(k).is_some_and(|sess| sess.conn.is_some() && sess.session.overfull())
        });
        !self.overfull.is_empty()
    }
}
