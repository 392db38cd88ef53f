//! CONNECT: admission checks, client ids, credentials, attaching a connection to its session (takeover, resumption), and DISCONNECT from either side.

use super::broken;
use super::keys::{ConnKey, SessionKey};
use std::time::{Duration, Instant};

use super::{Core, Flow, SessionEntry, Settings, V5Conn};
use crate::auth::AuthFiles;
use crate::protocol::properties::Properties;
use crate::protocol::{reason, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, Utf8Bytes};
use crate::session::{OutFrame, Session};
use crate::topic::{level_count, valid_topic_name};

/// Checks a CONNECT before any session work (on the core that read it). `Err` is the CONNACK reason code
/// (v5; downgraded for older clients) and a reason string; `Ok(false)` means close without an answer
/// (malformed will topic on 3.1.1).
pub fn check_connect(c: &Connect, settings: &Settings) -> Result<bool, (u8, &'static str)> {
    let v5 = c.protocol == ProtocolVersion::V5;
    if c.client_id.is_empty() && !c.clean_session && !v5 {
        // MQTT-3.1.3-8: a zero-byte client id needs clean session (v5 assigns one either way).
        return Err((reason::CLIENT_IDENTIFIER_NOT_VALID, "identifier rejected"));
    }
    if c.client_id.len() > settings.max_client_id_len {
        // MQTT-3.1.3-5 lets a server refuse long ids; 0x02 is the code for it.
        return Err((reason::CLIENT_IDENTIFIER_NOT_VALID, "identifier rejected"));
    }
    if !v5 && c.keep_alive > settings.max_keepalive {
        // 3.1.1 cannot be told another keep-alive: refused as mosquitto does.
        return Err((reason::CLIENT_IDENTIFIER_NOT_VALID, "keep alive above max_keepalive"));
    }
    if c.properties.authentication_method.is_some() {
        // No enhanced authentication is configured (MQTT-4.12.0-1).
        return Err((reason::BAD_AUTHENTICATION_METHOD, "bad authentication method"));
    }
    if let Some(w) = &c.will {
        if !valid_topic_name(w.topic.as_str()) || level_count(w.topic.as_str()) > settings.max_topic_levels {
            return if v5 { Err((reason::TOPIC_NAME_INVALID, "invalid will topic")) } else { Ok(false) };
        }
    }
    Ok(true)
}

impl Core {
    /// A fresh client id for a client that sent an empty one (MQTT-3.1.3-6), unique across cores.
    pub fn assign_client_id(&mut self, now: Instant) -> Utf8Bytes {
        self.at(now);
        self.assigned_ids += 1;
        // Unique across cores (the core id) and across restarts (the time).
        let unix_ms = self.clock().unix_ms;
        Utf8Bytes::copy_from_str(&format!("auto-{}-{:x}-{}", self.id, unix_ms, self.assigned_ids))
    }

    /// Whether the CONNECT's credentials admit it on a listener with `allow_anonymous`: a client without
    /// a username needs `allow_anonymous`; one with a username is checked against the password file
    /// when there is one (and, as in mosquitto, needs `allow_anonymous` when there is none).
    pub fn authenticate(&mut self, c: &Connect, allow_anonymous: bool) -> bool {
        match (&c.username, &self.settings.passwords) {
            (Some(user), Some(file)) => {
                let password = c.password.as_deref().unwrap_or_default();
                self.verified.verify(file, user.as_str(), password)
            }
            _ => allow_anonymous,
        }
    }

    /// Applies reloaded password and ACL files (SIGHUP). Connections stay up. Subscriptions were granted
    /// under the old ACL, so from now on every delivery to an existing session is checked against the
    /// new one (`check_reads`), not only those of clients with deny rules.
    pub fn reload_auth(&mut self, files: AuthFiles) {
        self.settings.passwords = files.passwords;
        self.settings.acl = files.acl;
        self.verified.clear();
        let acl = self.settings.acl.is_some();
        for (_, sess) in self.sessions.iter_mut() {
            sess.check_reads = acl;
        }
    }

    /// Attaches an accepted CONNECT (already checked, client id non-empty, and this is its home core) to
    /// its session: takes over a connected one, resumes or discards a stored one, sends CONNACK.
    /// `assigned`: the broker chose the client id (a v5 client is told it in CONNACK).
    pub fn connect(&mut self, key: ConnKey, c: Connect, assigned: bool, now: Instant) {
        self.at(now);
        let Connect { protocol, clean_session, keep_alive, client_id, will, username, properties, .. } = c;
        let v5 = protocol == ProtocolVersion::V5;
        // Clean session = false is a session that never expires on 3.1.1 (unless config caps it).
        let requested = match (v5, clean_session) {
            (true, _) => properties.session_expiry_interval.unwrap_or(0),
            (false, true) => 0,
            (false, false) => u32::MAX,
        };
        let expiry = requested.min(self.settings.max_session_expiry);
        let mut session_present = false;
        if let Some(&skey) = self.by_client.get(&client_id) {
            // Takeover (MQTT-3.1.4-2): the old connection is closed before the new one is attached, and
            // both happen inside this one borrow, so no delivery can reach both.
            if let Some(old) = self.sessions.get_mut(skey).and_then(|s| s.conn.take()) {
                self.stats.count_closed("session taken over");
                self.close_conn(old, false, Some((reason::SESSION_TAKEN_OVER, "session taken over")));
            }
            if clean_session || self.sessions.get(skey).is_some_and(|s| s.expiry == 0) {
                self.end_session(skey);
            } else {
                session_present = true;
            }
        }
        let skey = match self.by_client.get(&client_id) {
            Some(&skey) => skey,
            None => {
                let s = Session::new(client_id.clone(), expiry == 0, self.settings.limits);
                let skey = self.sessions.insert(SessionEntry {
                    session: s,
                    conn: None,
                    congested: None,
                    stalled_since: None,
                    username: None,
                    check_reads: false,
                    expiry,
                    offline_since: None,
                    pending_will: None,
                    sid: None,
                });
                self.by_client.insert(client_id.clone(), skey);
                skey
            }
        };
        // v5 keep-alive: the broker's maximum wins, and the client is told (MQTT-3.2.2-21).
        let max_ka = self.settings.max_keepalive;
        let server_keep_alive =
            (v5 && (keep_alive > max_ka || (keep_alive == 0 && max_ka < u16::MAX))).then_some(max_ka);
        let keep_alive = server_keep_alive.unwrap_or(keep_alive);
        let Some(entry) = self.conns.get_mut(key) else {
            broken!("connect for a connection that is not registered");
            return;
        };
        entry.session = Some(skey);
        entry.will = will.map(Box::new);
        entry.timeout = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        if v5 {
            entry.v5 = Some(Box::new(V5Conn {
                aliases: Vec::new(),
                max_packet: properties.maximum_packet_size.map_or(usize::MAX, |m| m as usize),
                aliases_out: properties.topic_alias_maximum.unwrap_or(0) > 0,
                expiry_was_zero: expiry == 0,
            }));
        }
        let ctl = entry.ctl.clone();
        // Keep-alive replaces the connect timeout.
        self.arm_silence(key);
        let Some(sess) = self.sessions.get_mut(skey) else {
            broken!("the session of a CONNECT vanished while it was attached");
            return;
        };
        sess.conn = Some(key);
        sess.offline_since = None;
        sess.expiry = expiry;
        sess.session.clean = expiry == 0;
        // A will waiting for its delay is not sent once the session has a connection again (MQTT-3.1.3-9).
        sess.pending_will = None;
        // The client's Receive Maximum caps the configured window (MQTT-3.3.4-9).
        let window = properties.receive_maximum.unwrap_or(u16::MAX).min(self.settings.limits.max_inflight);
        sess.session.set_max_inflight(window);
        if let Some(acl) = &self.settings.acl {
            // Sticky: a resumed session may hold subscriptions granted under an ACL since reloaded.
            sess.check_reads = sess.check_reads
                || acl.has_deny_for(username.as_ref().map(|u| u.as_str()), sess.session.client_id.as_str());
        }
        sess.username = username;
        let connack_props = v5.then(|| {
            let s = &self.settings;
            Box::new(Properties {
                assigned_client_identifier: assigned.then(|| client_id.clone()),
                server_keep_alive,
                session_expiry_interval: (expiry != requested).then_some(expiry),
                receive_maximum: Some(s.receive_maximum),
                maximum_packet_size: Some(u32::try_from(s.max_packet_size).unwrap_or(u32::MAX)),
                topic_alias_maximum: (s.topic_alias_maximum > 0).then_some(s.topic_alias_maximum),
                wildcard_subscription_available: Some(1),
                subscription_identifier_available: Some(1),
                shared_subscription_available: Some(1),
                response_information: match properties.request_response_information {
                    Some(1) => s.response_information.clone(),
                    _ => None,
                },
                ..Properties::default()
            })
        });
        {
            let mut out = ctl.outbox.borrow_mut();
            out.push_back(OutFrame::Control(Packet::ConnAck(ConnAck {
                session_present,
                code: reason::SUCCESS,
                properties: connack_props,
            })));
            sess.session.expire(now);
            sess.session.resume(&mut out);
        }
        self.mark_dirty(&ctl);
        self.persist_session(skey);
        self.log_journal(skey);
        self.update_congestion(skey);
        self.announce_session_groups(skey);
    }

    /// DISCONNECT from the client. v5: it may change the session expiry (but not from 0, MQTT-3.14.2-2),
    /// and reason 0x04 asks for the will to be published.
    pub(super) fn on_disconnect(&mut self, key: ConnKey, skey: SessionKey, d: Disconnect) -> Flow {
        if let Some(x) = d.properties.as_ref().and_then(|p| p.session_expiry_interval) {
            let was_zero = self.conns.get(key).and_then(|c| c.v5.as_ref()).is_some_and(|v| v.expiry_was_zero);
            if was_zero && x != 0 {
                return Flow::Close(
                    reason::PROTOCOL_ERROR,
                    "session expiry set at DISCONNECT after 0 at CONNECT",
                );
            }
            let cap = self.settings.max_session_expiry;
            if let Some(sess) = self.sessions.get_mut(skey) {
                sess.expiry = x.min(cap);
                sess.session.clean = sess.expiry == 0;
            }
            self.persist_session(skey);
        }
        Flow::Disconnect { will: d.reason == reason::DISCONNECT_WITH_WILL }
    }

    /// Queues a v5 DISCONNECT with `code` (and `why` as its reason string) for the connection, if it is a
    /// v5 one; 3.1.1 has no such packet. Returns whether one was queued.
    pub fn send_disconnect(&mut self, key: ConnKey, code: u8, why: &str) -> bool {
        let Some(c) = self.conns.get(key) else { return false };
        if c.v5.is_none() {
            return false;
        }
        let ctl = c.ctl.clone();
        ctl.outbox
            .borrow_mut()
            .push_back(OutFrame::Control(Packet::Disconnect(Disconnect::with_reason(code, Some(why)))));
        self.mark_dirty(&ctl);
        true
    }
}
