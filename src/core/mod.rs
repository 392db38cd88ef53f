//! One core's world: its connections, the slab of sessions whose client ids hash to it, its partition of
//! the subscription index, its copy of the retained store, and what it knows of other cores' interests.
//!
//! Everything here runs on the core's own thread, inside one `RefCell` borrow per batch of packets: no
//! locks, no awaits. The runtime (`crate::server`) reads sockets, calls [`Core::handle`] for each decoded
//! packet, and wakes the writer of every connection whose outbox changed.
//!
//! Architecture invariant: a session lives on `home_core(client_id)` and nowhere else, so takeover and
//! session resumption never need another core's state. Cross-core effects go through `Mesh::stage`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use slab::Slab;
use smallvec::SmallVec;
use tokio::sync::Notify;

use crate::auth::acl::Acl;
use crate::auth::password::{PasswordFile, VerifyCache};
use crate::auth::AuthFiles;
use crate::io::Conn;
use crate::protocol::{
    self, ConnAck, Connect, ConnectReturnCode, Packet, Publish, QoS, SubAck, SubAckCode, Subscribe,
    Unsubscribe, Utf8Bytes, Will,
};
use crate::session::{Delivered, Limits, Message, OutFrame, Outbox, Session};
use crate::stats::Stats;
use crate::topic::{level_count, valid_topic_filter, valid_topic_name, RetainedTree, SubscriptionIndex};
use crate::xcore::{Handoff, Mesh, XMsg};

/// Broker-wide settings every core reads (a copy per core).
#[derive(Clone, Debug)]
pub struct Settings {
    pub limits: Limits,
    pub max_packet_size: usize,
    pub connect_timeout: Duration,
    /// Queue QoS 0 messages for offline persistent sessions (mosquitto's `queue_qos0_messages`).
    pub queue_qos0_messages: bool,
    /// Frames an online client's outbox may hold before QoS 0 deliveries to it are dropped.
    pub max_outbox_messages: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions_per_client: usize,
    /// Levels a topic name or filter may have.
    pub max_topic_levels: usize,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// What a full queue of an online session does to QoS 1/2 publishers of matching messages.
    pub slow_subscriber: SlowSubscriber,
    /// Pause policy: how long a congested session may go without progress before its client is
    /// disconnected; `None` = never.
    pub slow_subscriber_timeout: Option<Duration>,
    /// Users and password hashes (`[auth] password_file`); `None`: usernames are not checked.
    pub passwords: Option<PasswordFile>,
    /// Access rules (`[auth] acl_file`); `None`: every client may publish and subscribe to anything.
    pub acl: Option<Acl>,
}

/// The policy for an online session whose queue is full (`slow_subscriber` in config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowSubscriber {
    /// Publishers of QoS 1/2 messages that would reach the session wait, unacknowledged, until its
    /// queue drains to half: no acknowledged message is dropped for it.
    Pause,
    /// The newest messages are dropped and counted (mosquitto's behaviour); publishers never wait.
    Drop,
}

/// A connection holds at most this many QoS 1/2 PUBLISHes (or [`HOLD_BYTES`] of them) waiting for a
/// congested subscriber before the broker stops reading it. Below that it keeps reading, so the
/// acknowledgements a client sends for its own subscriptions still arrive (a client subscribed to what
/// it publishes cannot deadlock), and a well-behaved client's in-flight window (20 in mosquitto_pub
/// and paho, 100 in rumqttc) fits.
pub const HOLD_MESSAGES: usize = 1024;
pub const HOLD_BYTES: usize = 1 << 20;

/// PUBLISHes of one connection waiting, in arrival order, for congested subscribers to drain.
#[derive(Default)]
struct Held {
    packets: VecDeque<(Publish, Instant)>,
    bytes: usize,
}

impl Held {
    /// The reader must stop reading the connection until some are released.
    fn is_full(&self) -> bool {
        self.packets.len() >= HOLD_MESSAGES || self.bytes >= HOLD_BYTES
    }
}

/// The control block of one connection, shared by the core (which fills the outbox) and the
/// connection's reader and writer tasks.
pub struct ConnCtl {
    /// The socket, to shut it down on kick; `None` for a connection driven without one (fuzzing).
    socket: Option<Rc<Conn>>,
    pub outbox: RefCell<Outbox>,
    /// Wakes the writer task: something was queued, or the connection is closing.
    pub wake: Notify,
    closing: Cell<bool>,
    /// Already in the core's dirty list for this tick.
    dirty: Cell<bool>,
    /// The writer has flushed what it could and stopped; `writer_done` wakes whoever waits for that.
    writer_finished: Cell<bool>,
    pub writer_done: Notify,
}

impl ConnCtl {
    pub fn new(socket: Option<Rc<Conn>>) -> ConnCtl {
        ConnCtl {
            socket,
            outbox: RefCell::new(Outbox::new()),
            wake: Notify::new(),
            closing: Cell::new(false),
            dirty: Cell::new(false),
            writer_finished: Cell::new(false),
            writer_done: Notify::new(),
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Asks the writer to flush what is queued and then close the socket.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake.notify_one();
    }

    /// Called by the writer when it stops.
    pub fn set_writer_finished(&self) {
        self.writer_finished.set(true);
        self.writer_done.notify_one();
    }

    pub fn writer_finished(&self) -> bool {
        self.writer_finished.get()
    }

    /// Closes at once (takeover, keep-alive expiry, shutdown): the socket is shut down so that the
    /// reader's pending read and any stuck write complete now.
    pub fn kick(&self) {
        self.close();
        if let Some(s) = &self.socket {
            s.shutdown();
        }
    }
}

struct ConnEntry {
    ctl: Rc<ConnCtl>,
    last_seen: Instant,
    /// Close the connection when nothing arrives for this long: `connect_timeout` before CONNECT,
    /// 1.5 × keep-alive after it, `None` for keep-alive 0.
    timeout: Option<Duration>,
    session: Option<usize>,
    will: Option<Will>,
    /// PUBLISHes held back by the pause policy (boxed: most connections never have any).
    held: Option<Box<Held>>,
}

struct SessionEntry {
    session: Session,
    /// The connection attached to the session, if the client is online.
    conn: Option<usize>,
    /// The filters announced as congested (pause policy), withdrawn exactly when it drains.
    congested: Option<Box<[Box<str>]>>,
    /// While congested: when the client last acknowledged something (first seen by a sweep).
    stalled_since: Option<Instant>,
    /// The username of the client's current (or last) connection, for the ACL.
    username: Option<Utf8Bytes>,
    /// The ACL has deny rules for this client: deliveries are checked one by one (otherwise a
    /// subscription the ACL allowed covers only readable topics).
    check_reads: bool,
}

/// What the reader does after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client sent DISCONNECT: close without the will.
    Disconnect,
    /// A protocol violation: close at once; the will is published.
    Close(&'static str),
}

/// How many messages one drain of the inbound rings takes per source before the core goes back to its
/// sockets, so a flood from one core cannot starve local clients.
pub const DRAIN_BATCH: usize = 1024;

/// Size of the blocks shared QoS 0 frames are encoded into.
const FRAME_BLOCK: usize = 64 * 1024;

pub struct Core {
    pub id: usize,
    settings: Settings,
    conns: Slab<ConnEntry>,
    sessions: Slab<SessionEntry>,
    by_client: HashMap<Utf8Bytes, usize>,
    /// Subscriptions of this core's sessions: filter -> (session key, granted QoS).
    index: SubscriptionIndex<usize, QoS>,
    /// Filters other cores have subscribers for: filter -> core id.
    interest: SubscriptionIndex<usize, ()>,
    /// Filters of congested sessions on every core (this one included): filter -> [`congestion_key`].
    /// A QoS 1/2 PUBLISH matching one is held before it is acknowledged.
    congested: SubscriptionIndex<u64, ()>,
    /// Connections with held PUBLISHes, retried when a congestion is withdrawn.
    holding: Vec<usize>,
    retry_held: bool,
    /// Some held PUBLISHes were released or dropped: readers paused on a full hold may go on.
    released: bool,
    /// This core's copy of every retained message (payloads are shared `Bytes`, not copies).
    retained: RetainedTree<Message>,
    pub mesh: Mesh,
    dirty: Vec<Rc<ConnCtl>>,
    pub stats: Stats,
    /// Connections handed to this core, waiting for the runtime to spawn their tasks.
    pub handoffs: Vec<Handoff>,
    inbound: Vec<XMsg>,
    assigned_ids: u64,
    /// Scratch for the shared QoS 0 frame of one message; split off, never copied again.
    frame_buf: BytesMut,
    /// Connections closed since memory was last given back (see [`Core::take_trim_due`]).
    closed_since_trim: usize,
    /// `closed_since_trim` at the previous sweep: unchanged means the wave is over.
    closed_at_last_sweep: usize,
    trim_due: bool,
    /// Credentials that verified recently: a reconnect costs one hash, not a PBKDF2 derivation.
    verified: VerifyCache,
}

/// Usernames whose verified password the cache keeps per core.
const VERIFY_CACHE: usize = 100_000;

/// After this many closed connections (or [`TRIM_AFTER_QUIET`] once closing has stopped for a sweep) the
/// sweeper shrinks the core's tables and has the allocator give free pages back, so that RSS returns
/// near its baseline after a wave of disconnects.
const TRIM_AFTER_CLOSES: usize = 1000;
const TRIM_AFTER_QUIET: usize = 64;

/// The core that owns the session of `client_id`.
pub fn home_core(client_id: &str, cores: usize) -> usize {
    // DefaultHasher::new() uses fixed keys: every thread computes the same home for an id.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client_id.hash(&mut h);
    (h.finish() % cores.max(1) as u64) as usize
}

/// Checks a CONNECT before any session work (on the core that read it). `Err` is the CONNACK code to
/// send before closing; `Ok(false)` means close without an answer (malformed will topic).
pub fn check_connect(c: &Connect, settings: &Settings) -> Result<bool, ConnectReturnCode> {
    if c.client_id.is_empty() && !c.clean_session {
        // MQTT-3.1.3-8: a zero-byte client id needs clean session.
        return Err(ConnectReturnCode::IdentifierRejected);
    }
    if c.client_id.len() > settings.max_client_id_len {
        // MQTT-3.1.3-5 lets a server refuse long ids; 0x02 is the code for it.
        return Err(ConnectReturnCode::IdentifierRejected);
    }
    if let Some(w) = &c.will {
        if !valid_topic_name(w.topic.as_str()) || level_count(w.topic.as_str()) > settings.max_topic_levels {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Core {
    pub fn new(id: usize, settings: Settings, mesh: Mesh) -> Core {
        Core {
            id,
            settings,
            conns: Slab::new(),
            sessions: Slab::new(),
            by_client: HashMap::new(),
            index: SubscriptionIndex::new(),
            interest: SubscriptionIndex::new(),
            congested: SubscriptionIndex::new(),
            holding: Vec::new(),
            retry_held: false,
            released: false,
            retained: RetainedTree::new(),
            mesh,
            dirty: Vec::new(),
            stats: Stats::new(),
            handoffs: Vec::new(),
            inbound: Vec::new(),
            assigned_ids: 0,
            frame_buf: BytesMut::new(),
            closed_since_trim: 0,
            closed_at_last_sweep: 0,
            trim_due: false,
            verified: VerifyCache::new(VERIFY_CACHE),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn cores(&self) -> usize {
        self.mesh.cores()
    }

    /// A fresh client id for a client that sent an empty one (MQTT-3.1.3-6), unique across cores.
    pub fn assign_client_id(&mut self) -> Utf8Bytes {
        self.assigned_ids += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Utf8Bytes::copy_from_str(&format!("auto-{}-{:x}-{}", self.id, nanos, self.assigned_ids))
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
        for (_, se) in self.sessions.iter_mut() {
            se.check_reads = acl;
        }
    }

    /// Starts tracking a new connection; it must send CONNECT within `connect_timeout`.
    pub fn register(&mut self, ctl: Rc<ConnCtl>) -> usize {
        self.stats.connections += 1;
        self.conns.insert(ConnEntry {
            ctl,
            last_seen: Instant::now(),
            timeout: Some(self.settings.connect_timeout),
            session: None,
            will: None,
            held: None,
        })
    }

    /// Whether `key` still names the connection of `ctl` (a swept connection's key may be reused).
    fn is_current(&self, key: usize, ctl: &Rc<ConnCtl>) -> bool {
        self.conns.get(key).is_some_and(|c| Rc::ptr_eq(&c.ctl, ctl))
    }

    /// Forgets a connection that leaves this core before CONNECT completed here (hand-off or refusal).
    pub fn unregister(&mut self, key: usize, ctl: &Rc<ConnCtl>) {
        if self.is_current(key, ctl) {
            self.conns.remove(key);
            self.closed_since_trim += 1;
        }
    }

    /// Counts a handed-off connection once: it was counted where it was accepted.
    pub fn register_handoff(&mut self, ctl: Rc<ConnCtl>) -> usize {
        let key = self.register(ctl);
        self.stats.connections -= 1;
        key
    }

    /// Something arrived on the connection: keep-alive restarts.
    pub fn touch(&mut self, key: usize, now: Instant) {
        if let Some(c) = self.conns.get_mut(key) {
            c.last_seen = now;
        }
    }

    /// Attaches an accepted CONNECT (already checked, client id non-empty, and this is its home core) to
    /// its session: takes over a connected one, resumes or discards a stored one, sends CONNACK.
    pub fn connect(&mut self, key: usize, c: Connect) {
        let Connect { clean_session, keep_alive, client_id, will, username, .. } = c;
        let mut session_present = false;
        if let Some(&skey) = self.by_client.get(&client_id) {
            // Takeover (MQTT-3.1.4-2): the old connection is closed before the new one is attached, and
            // both happen inside this one borrow, so no delivery can reach both.
            if let Some(old) = self.sessions.get_mut(skey).and_then(|s| s.conn.take()) {
                self.stats.count_closed("session taken over");
                self.close_conn(old, false, true);
            }
            if clean_session || self.sessions.get(skey).is_some_and(|s| s.session.clean) {
                self.end_session(skey);
            } else {
                session_present = true;
            }
        }
        let skey = match self.by_client.get(&client_id) {
            Some(&skey) => skey,
            None => {
                let s = Session::new(client_id.clone(), clean_session, self.settings.limits);
                let skey = self.sessions.insert(SessionEntry {
                    session: s,
                    conn: None,
                    congested: None,
                    stalled_since: None,
                    username: None,
                    check_reads: false,
                });
                self.by_client.insert(client_id, skey);
                skey
            }
        };
        let Some(entry) = self.conns.get_mut(key) else { return };
        entry.session = Some(skey);
        entry.will = will;
        entry.timeout = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let ctl = entry.ctl.clone();
        let Some(se) = self.sessions.get_mut(skey) else { return };
        se.conn = Some(key);
        if let Some(acl) = &self.settings.acl {
            // Sticky: a resumed session may hold subscriptions granted under an ACL since reloaded.
            se.check_reads = se.check_reads
                || acl.has_deny_for(username.as_ref().map(|u| u.as_str()), se.session.client_id.as_str());
        }
        se.username = username;
        {
            let mut out = ctl.outbox.borrow_mut();
            out.push_back(OutFrame::Control(Packet::ConnAck(ConnAck {
                session_present,
                code: ConnectReturnCode::Accepted,
            })));
            se.session.resume(&mut out);
        }
        self.mark_dirty(&ctl);
        self.update_congestion(skey);
    }

    /// Handles one packet from an established connection.
    pub fn handle(&mut self, key: usize, packet: Packet, now: Instant) -> Flow {
        let Some(skey) = self.conns.get(key).and_then(|c| c.session) else {
            return Flow::Close("packet before CONNECT");
        };
        match packet {
            Packet::Publish(p) => self.on_publish(key, skey, p, now),
            Packet::PubAck(id) => {
                self.with_session(key, skey, |s, out| s.on_puback(id, out));
                self.progressed(skey, now);
                Flow::Continue
            }
            Packet::PubRec(id) => self.with_session(key, skey, |s, out| s.on_pubrec(id, out)),
            Packet::PubRel(id) => self.with_session(key, skey, |s, out| s.on_pubrel(id, out)),
            Packet::PubComp(id) => {
                self.with_session(key, skey, |s, out| s.on_pubcomp(id, out));
                self.progressed(skey, now);
                Flow::Continue
            }
            Packet::Subscribe(s) => self.on_subscribe(key, skey, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(key, skey, u),
            Packet::PingReq => self.reply(key, Packet::PingResp),
            Packet::Disconnect => Flow::Disconnect,
            Packet::Connect(_) => Flow::Close("second CONNECT"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Flow::Close("server-to-client packet from a client")
            }
        }
    }

    fn reply(&mut self, key: usize, p: Packet) -> Flow {
        if let Some(c) = self.conns.get(key) {
            let ctl = c.ctl.clone();
            ctl.outbox.borrow_mut().push_back(OutFrame::Control(p));
            self.mark_dirty(&ctl);
        }
        Flow::Continue
    }

    fn with_session(&mut self, key: usize, skey: usize, f: impl FnOnce(&mut Session, &mut Outbox)) -> Flow {
        let (Some(c), Some(se)) = (self.conns.get(key), self.sessions.get_mut(skey)) else {
            return Flow::Continue;
        };
        let ctl = c.ctl.clone();
        f(&mut se.session, &mut ctl.outbox.borrow_mut());
        self.mark_dirty(&ctl);
        Flow::Continue
    }

    fn on_publish(&mut self, key: usize, skey: usize, p: Publish, now: Instant) -> Flow {
        if !valid_topic_name(p.topic.as_str()) {
            return Flow::Close("invalid topic name in PUBLISH");
        }
        if level_count(p.topic.as_str()) > self.settings.max_topic_levels {
            return Flow::Close("too many topic levels in PUBLISH");
        }
        // QoS 0 is never held: it is not acknowledged, and a congested subscriber's outbox bounds it.
        if p.qos != QoS::AtMostOnce {
            let holding = self.conns.get(key).is_some_and(|c| c.held.is_some());
            // Behind an earlier held PUBLISH, to keep acknowledgements in order (MQTT-4.6.0-2).
            if holding || self.is_congested(p.topic.as_str()) {
                self.hold(key, p, now);
                return Flow::Continue;
            }
        }
        self.accept_publish(key, skey, p, now);
        Flow::Continue
    }

    /// Acknowledges a valid PUBLISH and routes it if the ACL lets this client publish to its topic. A
    /// denied one is still acknowledged (3.1.1 has no way to refuse it; mosquitto does the same).
    fn accept_publish(&mut self, key: usize, skey: usize, p: Publish, now: Instant) {
        self.stats.msgs_in += 1;
        let allowed = self.may_publish(skey, p.topic.as_str());
        if !allowed {
            self.stats.denied += 1;
        }
        let route = match p.qos {
            QoS::AtMostOnce => true,
            QoS::AtLeastOnce => {
                self.reply(key, Packet::PubAck(p.pkid));
                true
            }
            QoS::ExactlyOnce => {
                let mut first = false;
                self.with_session(key, skey, |s, out| first = s.on_inbound_qos2(p.pkid, out));
                first
            }
        };
        if route && allowed {
            let msg =
                Message { topic: p.topic, payload: p.payload, qos: p.qos, retain: p.retain, received: now };
            self.publish(msg);
        }
    }

    /// The ACL's write check for the client of session `skey`.
    fn may_publish(&self, skey: usize, topic: &str) -> bool {
        match (&self.settings.acl, self.sessions.get(skey)) {
            (None, _) => true,
            (Some(acl), Some(se)) => acl.can_publish(
                se.username.as_ref().map(|u| u.as_str()),
                se.session.client_id.as_str(),
                topic,
            ),
            (Some(_), None) => false,
        }
    }

    fn is_congested(&self, topic: &str) -> bool {
        !self.congested.is_empty() && self.congested.any_match(topic)
    }

    fn hold(&mut self, key: usize, p: Publish, now: Instant) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let held = c.held.get_or_insert_with(|| {
            self.holding.push(key);
            Box::default()
        });
        held.bytes += p.payload.len() + p.topic.len();
        held.packets.push_back((p, now));
        self.stats.held += 1;
    }

    /// Whether the reader of `key` must stop reading until held PUBLISHes are released.
    pub fn hold_full(&self, key: usize, ctl: &Rc<ConnCtl>) -> bool {
        self.is_current(key, ctl) && self.conns[key].held.as_ref().is_some_and(|h| h.is_full())
    }

    /// Returns (and clears) whether many connections closed since the last trim: the runtime then asks
    /// the allocator to give free memory back (`crate::alloc`).
    pub fn take_trim_due(&mut self) -> bool {
        std::mem::take(&mut self.trim_due)
    }

    /// Returns (and clears) whether held PUBLISHes were released since the last call.
    pub fn take_released(&mut self) -> bool {
        std::mem::take(&mut self.released)
    }

    /// Retries held PUBLISHes after a congestion was withdrawn: each connection's, in order, until one
    /// still meets a congested subscriber.
    fn release_held(&mut self) {
        if !std::mem::take(&mut self.retry_held) {
            return;
        }
        for key in std::mem::take(&mut self.holding) {
            while let Some(c) = self.conns.get_mut(key) {
                let (Some(skey), Some(held)) = (c.session, c.held.as_mut()) else { break };
                let Some((p, _)) = held.packets.front() else {
                    c.held = None;
                    self.released = true;
                    break;
                };
                if !self.congested.is_empty() && self.congested.any_match(p.topic.as_str()) {
                    self.holding.push(key);
                    break;
                }
                let Some((p, received)) = held.packets.pop_front() else { break };
                held.bytes -= p.payload.len() + p.topic.len();
                self.released = true;
                self.accept_publish(key, skey, p, received);
            }
        }
    }

    /// The client acknowledged a delivery: its queue may have drained, and it is not stuck.
    fn progressed(&mut self, skey: usize, now: Instant) {
        self.update_congestion(skey);
        if let Some(se) = self.sessions.get_mut(skey) {
            se.stalled_since = se.congested.as_ref().map(|_| now);
        }
    }

    /// Announces or withdraws the session's congestion after its queue or connection changed.
    fn update_congestion(&mut self, skey: usize) {
        let Some(se) = self.sessions.get(skey) else { return };
        let full = se.conn.is_some()
            && self.settings.slow_subscriber == SlowSubscriber::Pause
            && se.session.congested();
        match &se.congested {
            None if full => self.announce_congestion(skey),
            Some(_) if se.conn.is_none() || se.session.relieved() => self.withdraw_congestion(skey),
            _ => {}
        }
    }

    fn announce_congestion(&mut self, skey: usize) {
        let Some(se) = self.sessions.get_mut(skey) else { return };
        // Only QoS 1/2 subscriptions queue what QoS 1/2 publishers send.
        let filters: Box<[Box<str>]> = se
            .session
            .subscriptions
            .iter()
            .filter(|(_, &q)| q != QoS::AtMostOnce)
            .map(|(f, _)| f.clone())
            .collect();
        se.congested = Some(filters.clone());
        let ck = congestion_key(self.id, skey);
        for f in filters.iter() {
            self.congested.insert(f, ck, ());
            for dst in 0..self.cores() {
                if dst != self.id {
                    self.mesh.stage(dst, XMsg::Congestion { key: ck, filter: f.clone(), on: true });
                }
            }
        }
    }

    fn withdraw_congestion(&mut self, skey: usize) {
        let Some(se) = self.sessions.get_mut(skey) else { return };
        se.stalled_since = None;
        let Some(filters) = se.congested.take() else { return };
        let ck = congestion_key(self.id, skey);
        for f in filters.into_vec() {
            self.congested.remove(&f, ck);
            for dst in 0..self.cores() {
                if dst != self.id {
                    self.mesh.stage(dst, XMsg::Congestion { key: ck, filter: f.clone(), on: false });
                }
            }
        }
        self.retry_held = true;
    }

    /// Routes a message published by a client of this core (or a will): retained store, local
    /// subscribers, and every other core with interest (all of them for a retained message, so that
    /// each core's retained copy stays whole).
    pub fn publish(&mut self, mut msg: Message) {
        let mut mask: u64 = 0;
        if msg.retain {
            // Kept by every core's retained store: compact once here, not on each core.
            msg = msg.compacted();
            self.store_retained(&msg);
            mask = all_cores_mask(self.cores()) & !(1u64 << self.id);
        } else {
            let me = self.id;
            self.interest.for_each_match(msg.topic.as_str(), |core, _| {
                if core != me {
                    mask |= 1u64 << core;
                }
            });
        }
        while mask != 0 {
            let dst = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            self.mesh.stage(dst, XMsg::Publish(msg.clone()));
        }
        self.deliver_local(&msg);
    }

    fn store_retained(&mut self, msg: &Message) {
        if msg.payload.is_empty() {
            self.retained.remove(msg.topic.as_str());
        } else {
            self.retained.insert(msg.topic.as_str(), msg.clone());
        }
    }

    /// Delivers to this core's matching sessions: once per session at the highest granted QoS.
    fn deliver_local(&mut self, msg: &Message) {
        let mut matches: SmallVec<[(usize, QoS); 16]> = SmallVec::new();
        self.index.for_each_match(msg.topic.as_str(), |skey, &qos| matches.push((skey, qos)));
        if matches.is_empty() {
            return;
        }
        if matches.len() > 1 {
            // Overlapping subscriptions of one client: deliver once at the highest QoS (MQTT-3.3.5-1).
            matches.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            matches.dedup_by_key(|m| m.0);
        }
        let mut shared: Option<bytes::Bytes> = None;
        let mut compact: Option<Message> = None;
        for (skey, granted) in matches {
            let qos = msg.qos.min(granted);
            self.deliver_to(skey, msg, qos, false, &mut shared, &mut compact);
        }
    }

    /// One delivery to one session. `shared` caches the QoS 0 frame of this message on this core, and
    /// `compact` its compacted copy for sessions that will queue it (one copy per message, not per
    /// subscriber).
    fn deliver_to(
        &mut self,
        skey: usize,
        msg: &Message,
        qos: QoS,
        retain: bool,
        shared: &mut Option<bytes::Bytes>,
        compact: &mut Option<Message>,
    ) {
        let Some(se) = self.sessions.get_mut(skey) else { return };
        if se.check_reads {
            if let Some(acl) = &self.settings.acl {
                let user = se.username.as_ref().map(|u| u.as_str());
                if !acl.can_read(user, se.session.client_id.as_str(), msg.topic.as_str()) {
                    return;
                }
            }
        }
        let ctl = se.conn.and_then(|k| self.conns.get(k)).map(|c| c.ctl.clone());
        match (&ctl, qos) {
            (Some(ctl), QoS::AtMostOnce) => {
                let mut out = ctl.outbox.borrow_mut();
                if out.len() >= self.settings.max_outbox_messages {
                    // A subscriber that does not read: QoS 0 beyond its bound is dropped and counted.
                    self.stats.dropped += 1;
                    return;
                }
                if retain {
                    se.session.deliver(msg.clone(), qos, true, Some(&mut out));
                } else {
                    let frame = shared
                        .get_or_insert_with(|| {
                            // Frames are carved from 64 KiB blocks so that encoding costs an allocation
                            // per block, not per message.
                            let need = protocol::publish_head_len(
                                msg.topic.len(),
                                QoS::AtMostOnce,
                                msg.payload.len(),
                            ) + msg.payload.len();
                            if self.frame_buf.capacity() < need {
                                self.frame_buf.reserve(need.max(FRAME_BLOCK));
                            }
                            protocol::encode_publish(
                                &Publish {
                                    dup: false,
                                    qos: QoS::AtMostOnce,
                                    retain: false,
                                    topic: msg.topic.clone(),
                                    pkid: 0,
                                    payload: msg.payload.clone(),
                                },
                                &mut self.frame_buf,
                            );
                            self.frame_buf.split().freeze()
                        })
                        .clone();
                    out.push_back(OutFrame::Shared { frame, received: msg.received });
                }
            }
            (None, QoS::AtMostOnce) if !self.settings.queue_qos0_messages => return,
            _ => {
                let m = if se.session.would_queue(qos, ctl.is_some()) {
                    compact.get_or_insert_with(|| msg.compacted()).clone()
                } else {
                    msg.clone()
                };
                let mut guard = ctl.as_ref().map(|c| c.outbox.borrow_mut());
                if se.session.deliver(m, qos, retain, guard.as_deref_mut()) == Delivered::Dropped {
                    self.stats.dropped += 1;
                }
                let newly_full = se.congested.is_none() && guard.is_some() && se.session.congested();
                drop(guard);
                if newly_full {
                    self.update_congestion(skey);
                }
            }
        }
        if let Some(ctl) = ctl {
            self.mark_dirty(&ctl);
        }
    }

    fn on_subscribe(&mut self, key: usize, skey: usize, sub: Subscribe) -> Flow {
        let mut codes: SmallVec<[SubAckCode; 2]> = SmallVec::new();
        let mut granted_filters: SmallVec<[(Utf8Bytes, QoS); 2]> = SmallVec::new();
        for f in sub.filters {
            let filter = f.filter.as_str();
            if !valid_topic_filter(filter) || level_count(filter) > self.settings.max_topic_levels {
                codes.push(SubAckCode::Failure);
                continue;
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
                codes.push(SubAckCode::Failure);
                continue;
            }
            let at_limit = self.sessions.get(skey).is_some_and(|se| {
                let subs = &se.session.subscriptions;
                subs.len() >= self.settings.max_subscriptions_per_client && !subs.contains_key(filter)
            });
            if at_limit {
                codes.push(SubAckCode::Failure);
                continue;
            }
            let qos = f.qos;
            let ins = self.index.insert(filter, skey, qos);
            if ins.first_for_filter {
                self.broadcast_interest(filter, true);
            }
            if let Some(se) = self.sessions.get_mut(skey) {
                se.session.subscriptions.insert(filter.into(), qos);
            }
            codes.push(SubAckCode::Granted(qos));
            granted_filters.push((f.filter, qos));
        }
        // A congested session's new filters must pause their publishers too: announce afresh.
        if self.sessions.get(skey).is_some_and(|se| se.congested.is_some()) {
            self.withdraw_congestion(skey);
            self.update_congestion(skey);
        }
        // SUBACK first, then the retained messages (mosquitto's order; the spec allows either).
        self.reply(key, Packet::SubAck(SubAck { pkid: sub.pkid, codes }));
        let mut found: SmallVec<[(Message, QoS); 8]> = SmallVec::new();
        for (filter, granted) in &granted_filters {
            self.retained.for_each_match(filter.as_str(), |_, m| found.push((m.clone(), *granted)));
        }
        // In-broker latency of a retained message starts when the subscription asks for it, not when
        // it was published: restamp it so the histogram stays meaningful.
        let now = Instant::now();
        for (mut m, granted) in found {
            let qos = m.qos.min(granted);
            m.received = now;
            self.deliver_to(skey, &m, qos, true, &mut None, &mut None);
        }
        Flow::Continue
    }

    fn on_unsubscribe(&mut self, key: usize, skey: usize, u: Unsubscribe) -> Flow {
        for f in &u.filters {
            self.unsubscribe_one(skey, f.as_str());
        }
        self.reply(key, Packet::UnsubAck(u.pkid))
    }

    fn unsubscribe_one(&mut self, skey: usize, filter: &str) {
        if let Some(se) = self.sessions.get_mut(skey) {
            se.session.subscriptions.remove(filter);
        }
        if self.index.remove(filter, skey).last_for_filter {
            self.broadcast_interest(filter, false);
        }
    }

    fn broadcast_interest(&mut self, filter: &str, add: bool) {
        for dst in 0..self.cores() {
            if dst != self.id {
                self.mesh.stage(dst, XMsg::Interest { core: self.id, filter: filter.into(), add });
            }
        }
    }

    /// Ends a session: its subscriptions leave the index, its queue is dropped.
    fn end_session(&mut self, skey: usize) {
        if !self.sessions.contains(skey) {
            return;
        }
        self.withdraw_congestion(skey);
        let se = self.sessions.remove(skey);
        for filter in se.session.subscriptions.keys() {
            if self.index.remove(filter, skey).last_for_filter {
                self.broadcast_interest(filter, false);
            }
        }
        if self.by_client.get(&se.session.client_id) == Some(&skey) {
            self.by_client.remove(&se.session.client_id);
        }
    }

    /// The connection's reader ended. `graceful`: DISCONNECT was received (no will). What is queued for
    /// the client (a CONNACK before a protocol error, say) is still written before the socket closes.
    pub fn conn_closed(&mut self, key: usize, ctl: &Rc<ConnCtl>, graceful: bool) {
        if self.is_current(key, ctl) {
            self.close_conn(key, graceful, false);
        }
    }

    /// Detaches and closes a connection: publishes its will unless `graceful`, ends a clean session.
    /// `kick` shuts the socket down at once (its reader is still blocked on it); otherwise the writer
    /// flushes the outbox first.
    fn close_conn(&mut self, key: usize, graceful: bool, kick: bool) {
        if !self.conns.contains(key) {
            return;
        }
        let entry = self.conns.remove(key);
        self.closed_since_trim += 1;
        if entry.held.is_some() {
            // Never acknowledged: the client sends them again when it reconnects.
            self.holding.retain(|&k| k != key);
            self.released = true;
        }
        if kick {
            entry.ctl.kick();
        } else {
            entry.ctl.close();
        }
        // Checked now: a clean session (and its username) is gone once the connection is detached.
        let will_allowed = match (&entry.will, entry.session) {
            (Some(w), Some(skey)) if !graceful => self.may_publish(skey, w.topic.as_str()),
            _ => true,
        };
        if let Some(skey) = entry.session {
            let attached = self.sessions.get(skey).is_some_and(|s| s.conn == Some(key));
            if attached {
                if let Some(se) = self.sessions.get_mut(skey) {
                    se.conn = None;
                    if se.session.clean {
                        self.end_session(skey);
                    } else {
                        // Offline, its queue drops the newest when full: publishers need not wait.
                        self.update_congestion(skey);
                    }
                }
            }
        }
        if let (false, Some(w)) = (graceful, entry.will) {
            self.stats.msgs_in += 1;
            if !will_allowed {
                self.stats.denied += 1;
                return;
            }
            self.publish(Message {
                topic: w.topic,
                payload: w.payload,
                qos: w.qos,
                retain: w.retain,
                received: Instant::now(),
            });
        }
    }

    /// Closes connections whose keep-alive (or connect timeout) expired. Called about twice a second.
    pub fn sweep(&mut self, now: Instant) {
        let expired: SmallVec<[usize; 8]> = self
            .conns
            .iter()
            .filter(|(_, c)| c.timeout.is_some_and(|t| now.saturating_duration_since(c.last_seen) > t))
            .map(|(k, _)| k)
            .collect();
        // A reader paused on a full hold is not reading, by the broker's choice: not a dead peer.
        for c in self.conns.iter_mut().map(|(_, c)| c) {
            if c.held.as_ref().is_some_and(|h| h.is_full()) {
                c.last_seen = now;
            }
        }
        let quiet = self.closed_since_trim == self.closed_at_last_sweep;
        self.closed_at_last_sweep = self.closed_since_trim;
        if self.closed_since_trim >= TRIM_AFTER_CLOSES
            || (quiet && self.closed_since_trim >= TRIM_AFTER_QUIET)
        {
            self.closed_since_trim = 0;
            self.closed_at_last_sweep = 0;
            self.trim_due = true;
            // Tables sized for the wave give back what its end freed (vacant slots at the tail only:
            // keys of live entries never move).
            self.conns.shrink_to_fit();
            self.sessions.shrink_to_fit();
            self.by_client.shrink_to_fit();
            self.holding.shrink_to_fit();
            self.dirty.shrink_to_fit();
        }
        if let Some(limit) = self.settings.slow_subscriber_timeout {
            self.disconnect_stuck_subscribers(now, limit);
        }
        for key in expired {
            // The reader sees the shutdown and calls conn_closed; closing here already publishes the
            // will and detaches the session, so the reader's later call finds nothing.
            let connected = self.conns.get(key).is_some_and(|c| c.session.is_some());
            if connected {
                self.stats.count_closed("keep-alive timeout");
            } else {
                self.stats.count_refused("no CONNECT within connect_timeout");
            }
            self.close_conn(key, false, true);
        }
    }

    /// Pause policy: a connected subscriber whose full queue has not moved for `limit` is disconnected,
    /// so that publishers are released (its persistent session keeps what is queued).
    fn disconnect_stuck_subscribers(&mut self, now: Instant, limit: Duration) {
        let mut stuck: SmallVec<[usize; 4]> = SmallVec::new();
        for (_, se) in self.sessions.iter_mut().filter(|(_, se)| se.congested.is_some()) {
            let since = *se.stalled_since.get_or_insert(now);
            if let (Some(conn), true) = (se.conn, now.saturating_duration_since(since) > limit) {
                stuck.push(conn);
            }
        }
        for key in stuck {
            self.stats.count_closed("slow subscriber timeout");
            self.close_conn(key, false, true);
        }
    }

    /// Processes what other cores sent. Returns how many messages were taken.
    pub fn drain_inbound(&mut self) -> usize {
        let mut batch = std::mem::take(&mut self.inbound);
        let n = self.mesh.drain(DRAIN_BATCH, &mut batch);
        for m in batch.drain(..) {
            match m {
                XMsg::Publish(msg) => {
                    if msg.retain {
                        self.store_retained(&msg);
                    }
                    self.deliver_local(&msg);
                }
                XMsg::Interest { core, filter, add } => {
                    if add {
                        self.interest.insert(&filter, core, ());
                    } else {
                        self.interest.remove(&filter, core);
                    }
                }
                XMsg::Congestion { key, filter, on } => {
                    if on {
                        self.congested.insert(&filter, key, ());
                    } else {
                        self.congested.remove(&filter, key);
                        self.retry_held = true;
                    }
                }
                XMsg::Handoff(h) => self.handoffs.push(h),
            }
        }
        self.inbound = batch;
        n
    }

    fn mark_dirty(&mut self, ctl: &Rc<ConnCtl>) {
        if !ctl.dirty.replace(true) {
            self.dirty.push(ctl.clone());
        }
    }

    /// End of a batch: wake the writers whose outboxes changed and push staged cross-core messages.
    pub fn end_batch(&mut self) {
        self.release_held();
        for ctl in self.dirty.drain(..) {
            ctl.dirty.set(false);
            ctl.wake.notify_one();
        }
        if !self.mesh.flush() {
            self.stats.ring_stalls += 1;
        }
    }

    /// Whether staged cross-core messages wait for ring space: readers must pause.
    pub fn is_blocked(&self) -> bool {
        self.mesh.is_blocked()
    }

    /// Graceful shutdown: close every connection (no wills: the broker, not the client, is going away).
    pub fn close_all(&mut self) {
        for (_, c) in self.conns.iter() {
            c.ctl.kick();
        }
        self.conns.clear();
    }
}

/// Names a session in the congestion index of every core.
fn congestion_key(core: usize, skey: usize) -> u64 {
    ((core as u64) << 48) | skey as u64
}

fn all_cores_mask(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}
