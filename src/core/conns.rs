//! This core's connections: registration, keep-alive bookkeeping, and closing one (its will, its session going offline or ending).

use super::broken;
use super::keys::{ConnKey, SessionKey};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{ConnCtl, Core, Due, Held};
use crate::persist::Record;
use crate::protocol::{reason, Utf8Bytes, Will};

pub(super) struct ConnEntry {
    pub(super) ctl: Rc<ConnCtl>,
    pub(super) last_seen: Instant,
    /// Close the connection when nothing arrives for this long: `connect_timeout` before CONNECT,
    /// 1.5 × keep-alive after it, `None` for keep-alive 0.
    pub(super) timeout: Option<Duration>,
    pub(super) session: Option<SessionKey>,
    pub(super) will: Option<Box<Will>>,
    /// PUBLISHes held back by the pause policy (boxed: most connections never have any).
    pub(super) held: Option<Box<Held>>,
    /// v5 state of the connection; `None` for 3.1/3.1.1 (and before CONNECT).
    pub(super) v5: Option<Box<V5Conn>>,
    /// When the connection's silence timer is armed for (see [`Core::arm_silence`]).
    pub(super) silence_at: Option<Instant>,
}

/// What a v5 connection needs beyond a 3.1.1 one.
pub(super) struct V5Conn {
    /// Topic aliases the client set (alias n at index n - 1), at most `topic_alias_maximum`.
    pub(super) aliases: Vec<Option<Utf8Bytes>>,
    /// The client's Maximum Packet Size: a larger PUBLISH is not sent to it (MQTT-3.1.2-24).
    pub(super) max_packet: usize,
    /// The client takes topic aliases from the broker (its Topic Alias Maximum is above 0): its QoS 0
    /// deliveries cannot share a frame, since the writer picks the alias per connection.
    pub(super) aliases_out: bool,
    /// The Session Expiry Interval was 0 at CONNECT: a DISCONNECT may not raise it (MQTT-3.14.2-2).
    pub(super) expiry_was_zero: bool,
}

/// How long a connection closed by the broker with a v5 DISCONNECT may take to flush it.
pub(super) const LINGER: Duration = Duration::from_secs(2);

impl Core {
    /// Starts tracking a new connection; it must send CONNECT within `connect_timeout`.
    pub fn register(&mut self, ctl: Rc<ConnCtl>, now: Instant) -> ConnKey {
        self.at(now);
        self.stats.connections += 1;
        let key = self.conns.insert(ConnEntry {
            ctl,
            last_seen: now,
            timeout: Some(self.settings.connect_timeout),
            session: None,
            will: None,
            held: None,
            v5: None,
            silence_at: None,
        });
        self.arm_silence(key);
        key
    }

    /// Whether `key` still names the connection of `ctl` (a swept connection's key may be reused).
    pub(super) fn is_current(&self, key: ConnKey, ctl: &Rc<ConnCtl>) -> bool {
        self.conns.get(key).is_some_and(|c| Rc::ptr_eq(&c.ctl, ctl))
    }

    /// Forgets a connection that leaves this core before CONNECT completed here (hand-off or refusal).
    pub fn unregister(&mut self, key: ConnKey, ctl: &Rc<ConnCtl>) {
        if self.is_current(key, ctl) {
            self.conns.remove(key);
            self.trim.freed();
        }
    }

    /// Counts a handed-off connection once: it was counted where it was accepted.
    pub fn register_handoff(&mut self, ctl: Rc<ConnCtl>, now: Instant) -> ConnKey {
        let key = self.register(ctl, now);
        self.stats.connections -= 1;
        key
    }

    /// Something arrived on the connection at `now`: keep-alive restarts. Returns how long the connection
    /// had been silent before (the reader parks a connection that is usually quiet).
    pub fn touch(&mut self, key: ConnKey, now: Instant) -> Duration {
        self.at(now);
        match self.conns.get_mut(key) {
            Some(c) => now.saturating_duration_since(std::mem::replace(&mut c.last_seen, now)),
            None => Duration::ZERO,
        }
    }

    /// The connection's reader ended. `graceful`: DISCONNECT was received (no will). What is queued for
    /// the client (a CONNACK before a protocol error, say) is still written before the socket closes.
    pub fn conn_closed(&mut self, key: ConnKey, ctl: &Rc<ConnCtl>, graceful: bool, now: Instant) {
        self.at(now);
        if self.is_current(key, ctl) {
            self.close_conn(key, graceful, None);
        }
    }

    /// Detaches and closes a connection: publishes its will unless `graceful` (at once, or after its v5
    /// Will Delay Interval), ends a session that expires with it. `kick`: the broker closes the connection
    /// while its reader is still blocked on the socket; a v5 client is first sent a DISCONNECT with that
    /// reason code and string, which its writer gets [`LINGER`] to flush; others are shut down at once.
    /// Without `kick` the writer flushes the outbox first.
    pub(super) fn close_conn(&mut self, key: ConnKey, graceful: bool, kick: Option<(u8, &str)>) {
        if !self.conns.contains(key) {
            return;
        }
        if let Some((code, why)) = kick {
            if self.send_disconnect(key, code, why) {
                if let Some(c) = self.conns.get(key) {
                    self.lingering.push((c.ctl.clone(), self.now + LINGER));
                }
            } else if let Some(c) = self.conns.get(key) {
                c.ctl.kick();
            }
        }
        let Some(entry) = self.conns.remove(key) else {
            broken!("a connection checked a moment ago is gone");
            return;
        };
        self.trim.freed();
        if entry.held.is_some() {
            // Never acknowledged: the client sends them again when it reconnects.
            self.holding.retain(|&k| k != key);
            self.released = true;
        }
        entry.ctl.close();
        let now = self.now;
        let mut will = if graceful { None } else { entry.will };
        let delay = will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0);
        if let Some(skey) = entry.session {
            let attached = self.sessions.get(skey).is_some_and(|s| s.conn == Some(key));
            if !attached && delay > 0 {
                // Taken over: a new connection to the session came within the delay (MQTT-3.1.3-9).
                will = None;
            }
            if let (true, Some(sess)) = (attached, self.sessions.get_mut(skey)) {
                sess.conn = None;
                sess.offline_since = Some(now);
                // A will with a delay waits, unless the session ends sooner (then it goes with it).
                if delay > 0 && sess.expiry > 0 {
                    if let (Some(w), Some(due)) =
                        (will.take(), now.checked_add(Duration::from_secs(u64::from(delay.min(sess.expiry)))))
                    {
                        sess.pending_will = Some(Box::new((*w, due)));
                        self.timers.add(due, Due::Will(skey));
                    }
                }
                if sess.expiry == 0 {
                    if let Some(w) = will.take() {
                        // Published before the session (and the username the ACL checks) is gone.
                        self.publish_will(skey, *w);
                    }
                    self.end_session(skey);
                } else {
                    if let Some(sid) = sess.sid {
                        let unix_ms = self.clock().unix_ms;
                        self.log(Record::Offline { sid, unix_ms });
                    }
                    let Some(sess) = self.sessions.get_mut(skey) else { return };
                    if sess.expiry != u32::MAX {
                        if let Some(at) = now.checked_add(Duration::from_secs(u64::from(sess.expiry))) {
                            self.timers.add(at, Due::Expiry(skey));
                        }
                    }
                    // Offline, its queue drops the newest when full: publishers need not wait.
                    self.update_congestion(skey);
                    // Its shared groups stop choosing it at once.
                    self.announce_session_groups(skey);
                }
            }
            if let Some(w) = will.take() {
                self.publish_will(skey, *w);
            }
        }
    }

    /// Graceful shutdown: close every connection (no wills: the broker, not the client, is going away).
    /// v5 clients are sent DISCONNECT 0x8B first; the returned connections are those whose writer should
    /// get a moment to flush it before the runtime stops (then [`ConnCtl::kick`] them).
    pub fn close_all(&mut self, now: Instant) -> Vec<Rc<ConnCtl>> {
        self.at(now);
        let keys: Vec<ConnKey> = self.conns.iter().map(|(k, _)| k).collect();
        let mut flushing = Vec::new();
        for key in keys {
            if self.send_disconnect(key, reason::SERVER_SHUTTING_DOWN, "server shutting down") {
                if let Some(c) = self.conns.get(key) {
                    c.ctl.close();
                    flushing.push(c.ctl.clone());
                }
            } else if let Some(c) = self.conns.get(key) {
                c.ctl.kick();
            }
        }
        self.end_batch(now);
        self.conns.clear();
        flushing
    }
}
