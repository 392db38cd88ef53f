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
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use slab::Slab;
use smallvec::SmallVec;

use crate::auth::password::VerifyCache;
use crate::auth::AuthFiles;
use crate::io::Conn;
use crate::protocol::properties::{self, Properties};
use crate::protocol::{
    self, reason, Ack, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, Publish, QoS, SubAck,
    Subscribe, UnsubAck, Unsubscribe, Utf8Bytes, Will,
};
use crate::session::{Delivered, Message, MsgProps, OutFrame, Outbox, Session, SubIds, SubOpts};
use crate::stats::Stats;
use crate::topic::{
    level_count, matches as topic_matches, parse_shared, valid_topic_filter, valid_topic_name, MatchCache,
    RetainedTree, SubscriptionIndex,
};
use crate::xcore::{Handoff, Mesh, XMsg};

mod durable;
mod settings;
mod shared;
pub use durable::Persister;
pub use settings::{Settings, SlowSubscriber};
use shared::{GroupViews, LocalGroups, Members, RANK_BEST};

use crate::persist::Record;

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
///
/// The wake-ups are a flag and a waker slot each rather than `tokio::sync::Notify`: one waiter at a time
/// is all they ever have, and a waiting `Notify` future (64 bytes) would sit in every idle connection's
/// writer task for the connection's whole life.
pub struct ConnCtl {
    /// The socket, to shut it down on kick; `None` for a connection driven without one (fuzzing).
    socket: Option<Rc<Conn>>,
    pub outbox: RefCell<Outbox>,
    /// Something was queued, or the connection is closing, since the writer last looked.
    woken: Cell<bool>,
    /// The writer task, while it waits in [`ConnCtl::writer_wait`].
    writer_waker: Cell<Option<Waker>>,
    closing: Cell<bool>,
    /// Already in the core's dirty list for this tick.
    dirty: Cell<bool>,
    /// The writer has flushed what it could and stopped.
    writer_finished: Cell<bool>,
    /// Whoever waits in [`ConnCtl::writer_done`].
    done_waker: Cell<Option<Waker>>,
    /// While the reader is parked (a quiet connection waiting for its socket without a pending read):
    /// the token it is parked under; 0 otherwise.
    parked: Cell<u64>,
    /// The writer task ended because the reader is parked and nothing was queued
    /// ([`ConnCtl::retire_writer`]); a wake-up asks for a new one ([`writers_wanted`]).
    writer_gone: Cell<bool>,
    /// The writer wrote something since the last sweep: it is not idle, so it does not retire.
    wrote: Cell<bool>,
}

thread_local! {
    /// Writers retired on this core since the last sweep (their memory counts toward a trim).
    static RETIRED_WRITERS: Cell<usize> = const { Cell::new(0) };
    /// Park tokens of connections whose retired writer must start again (someone woke it), and the task
    /// that starts writers, waiting in [`writers_wanted`].
    static WRITERS_WANTED: RefCell<(Vec<u64>, Option<Waker>)> = const { RefCell::new((Vec::new(), None)) };
}

/// Completes once some retired writers were woken, and moves their connections' park tokens to `out`.
/// A token may be stale (the connection was unparked since): the caller checks it.
pub fn writers_wanted(out: &mut Vec<u64>) -> impl Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| {
        WRITERS_WANTED.with_borrow_mut(|(tokens, waker)| {
            if tokens.is_empty() {
                *waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            out.append(tokens);
            Poll::Ready(())
        })
    })
}

impl ConnCtl {
    pub fn new(socket: Option<Rc<Conn>>) -> ConnCtl {
        ConnCtl {
            socket,
            outbox: RefCell::new(Outbox::new()),
            woken: Cell::new(false),
            writer_waker: Cell::new(None),
            closing: Cell::new(false),
            dirty: Cell::new(false),
            writer_finished: Cell::new(false),
            done_waker: Cell::new(None),
            parked: Cell::new(0),
            writer_gone: Cell::new(false),
            wrote: Cell::new(false),
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Wakes the writer task: something was queued, or the connection is closing. Not lost when the
    /// writer is busy: its next [`ConnCtl::writer_wait`] returns at once.
    ///
    /// A retired writer (see [`ConnCtl::retire_writer`]) is asked for again on the first wake-up since
    /// it retired: later ones find `woken` already set.
    pub fn wake_writer(&self) {
        let was_woken = self.woken.replace(true);
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        } else if self.writer_gone.get() && !was_woken {
            let token = self.parked.get();
            WRITERS_WANTED.with_borrow_mut(|(tokens, waker)| {
                tokens.push(token);
                if let Some(w) = waker.take() {
                    w.wake();
                }
            });
        }
    }

    /// The reader parked under `token` (0: it is reading again). Parking wakes a writer that has been
    /// idle since the last sweep, so that it retires at once.
    pub fn set_parked(&self, token: u64) {
        self.parked.set(token);
        if token != 0 && !self.wrote.get() {
            self.wake_writer();
        }
    }

    /// Called by the writer after each write.
    pub fn set_wrote(&self) {
        self.wrote.set(true);
    }

    /// Called by every sweep: a parked connection's writer that wrote nothing since the previous sweep
    /// is woken to retire. A writer that keeps writing (a subscriber that never talks still gets its
    /// messages) never retires, so a busy connection never pays a task start per batch.
    pub fn sweep_writer(&self) {
        let wrote = self.wrote.replace(false);
        if !wrote && self.parked.get() != 0 && !self.writer_gone.get() {
            self.wake_writer();
        }
    }

    /// The writer has nothing to write: if the reader is parked, the writer wrote nothing since the last
    /// sweep and the connection is not closing, the writer may end its task (true) instead of waiting;
    /// the next wake-up asks for a new one. Called by the writer just before it would wait.
    pub fn retire_writer(&self) -> bool {
        let mut ob = self.outbox.borrow_mut();
        if self.parked.get() == 0 || self.wrote.get() || self.closing.get() || !ob.is_empty() {
            return false;
        }
        // A connection without a writer keeps no outbox allocation either.
        ob.shrink_to_fit();
        self.writer_gone.set(true);
        RETIRED_WRITERS.set(RETIRED_WRITERS.get() + 1);
        // Whatever woke it was handled: the next wake-up must ask for a writer.
        self.woken.set(false);
        true
    }

    /// Whether the writer had retired; a caller that gets `true` must start a new writer task.
    pub fn take_writer_gone(&self) -> bool {
        self.writer_gone.replace(false)
    }

    /// The writer waits here for [`ConnCtl::wake_writer`] (one waiter: the connection's writer).
    pub fn writer_wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.woken.replace(false) {
                return Poll::Ready(());
            }
            self.writer_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Asks the writer to flush what is queued and then close the socket.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_writer();
    }

    /// Called by the writer when it stops.
    pub fn set_writer_finished(&self) {
        self.writer_finished.set(true);
        if let Some(w) = self.done_waker.take() {
            w.wake();
        }
    }

    /// Completes once the writer has stopped (one waiter: the connection's reader).
    pub fn writer_done(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.writer_finished.get() {
                return Poll::Ready(());
            }
            self.done_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
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
    will: Option<Box<Will>>,
    /// PUBLISHes held back by the pause policy (boxed: most connections never have any).
    held: Option<Box<Held>>,
    /// v5 state of the connection; `None` for 3.1/3.1.1 (and before CONNECT).
    v5: Option<Box<V5Conn>>,
}

/// What a v5 connection needs beyond a 3.1.1 one.
struct V5Conn {
    /// Topic aliases the client set (alias n at index n - 1), at most `topic_alias_maximum`.
    aliases: Vec<Option<Utf8Bytes>>,
    /// The client's Maximum Packet Size: a larger PUBLISH is not sent to it (MQTT-3.1.2-24).
    max_packet: usize,
    /// The client takes topic aliases from the broker (its Topic Alias Maximum is above 0): its QoS 0
    /// deliveries cannot share a frame, since the writer picks the alias per connection.
    aliases_out: bool,
    /// The Session Expiry Interval was 0 at CONNECT: a DISCONNECT may not raise it (MQTT-3.14.2-2).
    expiry_was_zero: bool,
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
    /// Seconds the session outlives its connection: 0 = ends with it, `u32::MAX` = never expires.
    expiry: u32,
    /// When the client went offline (for expiry).
    offline_since: Option<Instant>,
    /// A v5 will waiting for its Will Delay Interval, and when it is due.
    /// (One box for both: most sessions never have one.)
    pending_will: Option<Box<(Will, Instant)>>,
    /// The session's number in this core's persistence log, while it is persisted (persistence on and
    /// expiry above 0).
    sid: Option<u32>,
}

/// What the reader does after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The client sent DISCONNECT: close; `will` (v5 reason 0x04) publishes the will anyway.
    Disconnect {
        will: bool,
    },
    /// A protocol violation: close at once (after a v5 DISCONNECT with this reason code); the will is
    /// published. The string is what the shutdown report counts.
    Close(u8, &'static str),
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
    /// Subscriptions of this core's sessions: filter -> (session key, options).
    index: SubscriptionIndex<usize, SubOpts>,
    /// Filters other cores have subscribers for: filter -> core id.
    interest: SubscriptionIndex<usize, ()>,
    /// The last topic's matches in `index` and in `interest` (a publisher's messages come in runs).
    index_cache: MatchCache<usize, SubOpts>,
    interest_cache: MatchCache<usize, ()>,
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
    /// Connections closed, parked or whose writer retired since memory was last given back (see
    /// [`Core::take_trim_due`]): each freed blocks the allocator purges only lazily.
    freed_since_trim: usize,
    /// `freed_since_trim` at the previous sweep: unchanged means the wave is over.
    freed_at_last_sweep: usize,
    trim_due: bool,
    /// Parks since the allocator last gave pages back (see [`Core::note_parked`]).
    parks_since_purge: usize,
    /// Credentials that verified recently: a reconnect costs one hash, not a PBKDF2 derivation.
    verified: VerifyCache,
    /// Offline sessions that expire, by deadline (entries are checked when popped: a session that came
    /// back or changed its expiry leaves a stale one behind).
    expiring: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Sessions with a delayed will.
    pending_wills: Vec<usize>,
    /// Every shared group of the broker and how many members each core has: where to send a message.
    shared_views: GroupViews,
    /// The shared groups this core's sessions belong to.
    shared_local: LocalGroups,
    /// Online sessions past their limits and overflow room (`Session::overfull`): while there are any,
    /// the core takes nothing from other cores, so that their publishers pause through the full rings
    /// instead of this core dropping what they acknowledged.
    overfull: SmallVec<[usize; 2]>,
    /// A PUBLISH was held because a ring's staging was full (`Mesh::saturated`): retry once it drains.
    retry_on_room: bool,
    /// Deliveries now are a new subscription's retained messages: QoS 1/2 ones are queued past the
    /// session's limits (`Session::deliver_backlog`) rather than dropped.
    subscribing: bool,
    /// Persistence (`[persistence] enabled`): this core's log.
    pub persist: Option<Persister>,
    /// Connections the broker closed after queueing a v5 DISCONNECT: their writer flushes it, and they are
    /// shut down hard at the deadline if it could not.
    lingering: Vec<(Rc<ConnCtl>, Instant)>,
}

/// How long a connection closed by the broker with a v5 DISCONNECT may take to flush it.
const LINGER: Duration = Duration::from_secs(2);

/// Usernames whose verified password the cache keeps per core.
const VERIFY_CACHE: usize = 100_000;

/// After this many closed (or parked) connections, or [`TRIM_AFTER_QUIET`] once that has stopped for a
/// sweep, the sweeper shrinks the core's tables and has the allocator give free pages back, so that RSS
/// returns near its baseline after a wave of disconnects, or of connections going idle.
const TRIM_AFTER_CLOSES: usize = 1000;
const TRIM_AFTER_QUIET: usize = 64;
/// Parks between two purges of the allocator's free pages (tables are left alone: they still grow).
const PURGE_AFTER_PARKS: usize = 1000;

/// The core that owns the session of `client_id`.
pub fn home_core(client_id: &str, cores: usize) -> usize {
    // DefaultHasher::new() uses fixed keys: every thread computes the same home for an id.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client_id.hash(&mut h);
    (h.finish() % cores.max(1) as u64) as usize
}

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
            index_cache: MatchCache::default(),
            interest_cache: MatchCache::default(),
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
            freed_since_trim: 0,
            freed_at_last_sweep: 0,
            trim_due: false,
            parks_since_purge: 0,
            verified: VerifyCache::new(VERIFY_CACHE),
            expiring: BinaryHeap::new(),
            pending_wills: Vec::new(),
            lingering: Vec::new(),
            shared_views: GroupViews::default(),
            shared_local: LocalGroups::default(),
            overfull: SmallVec::new(),
            retry_on_room: false,
            subscribing: false,
            persist: None,
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
            v5: None,
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
            self.freed_since_trim += 1;
        }
    }

    /// Counts a handed-off connection once: it was counted where it was accepted.
    pub fn register_handoff(&mut self, ctl: Rc<ConnCtl>) -> usize {
        let key = self.register(ctl);
        self.stats.connections -= 1;
        key
    }

    /// Something arrived on the connection at `now`: keep-alive restarts. Returns how long the connection
    /// had been silent before (the reader parks a connection that is usually quiet).
    pub fn touch(&mut self, key: usize, now: Instant) -> Duration {
        match self.conns.get_mut(key) {
            Some(c) => now.saturating_duration_since(std::mem::replace(&mut c.last_seen, now)),
            None => Duration::ZERO,
        }
    }

    /// Attaches an accepted CONNECT (already checked, client id non-empty, and this is its home core) to
    /// its session: takes over a connected one, resumes or discards a stored one, sends CONNACK.
    /// `assigned`: the broker chose the client id (a v5 client is told it in CONNACK).
    pub fn connect(&mut self, key: usize, c: Connect, assigned: bool) {
        let now = Instant::now();
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
        let Some(entry) = self.conns.get_mut(key) else { return };
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
        let Some(se) = self.sessions.get_mut(skey) else { return };
        se.conn = Some(key);
        se.offline_since = None;
        se.expiry = expiry;
        se.session.clean = expiry == 0;
        // A will waiting for its delay is not sent once the session has a connection again (MQTT-3.1.3-9).
        se.pending_will = None;
        // The client's Receive Maximum caps the configured window (MQTT-3.3.4-9).
        let window = properties.receive_maximum.unwrap_or(u16::MAX).min(self.settings.limits.max_inflight);
        se.session.set_max_inflight(window);
        if let Some(acl) = &self.settings.acl {
            // Sticky: a resumed session may hold subscriptions granted under an ACL since reloaded.
            se.check_reads = se.check_reads
                || acl.has_deny_for(username.as_ref().map(|u| u.as_str()), se.session.client_id.as_str());
        }
        se.username = username;
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
            se.session.expire(now);
            se.session.resume(&mut out);
        }
        self.mark_dirty(&ctl);
        self.persist_session(skey);
        self.log_journal(skey);
        self.update_congestion(skey);
        self.announce_session_groups(skey);
    }

    /// Tells every core (this one included) how many members of each shared group of session `skey` this
    /// core has, after the session joined, left, came online or went offline.
    fn announce_session_groups(&mut self, skey: usize) {
        let Some(se) = self.sessions.get(skey) else { return };
        let names: SmallVec<[Box<str>; 2]> =
            se.session.subscriptions.keys().filter(|f| f.starts_with("$share/")).cloned().collect();
        for name in names {
            self.announce_group(&name);
        }
    }

    fn announce_group(&mut self, name: &str) {
        let (group, filter, m) = match self.shared_local.get(name) {
            Some(g) => {
                let mut m = Members { ready: 0, online: 0, total: g.members.len() as u32 };
                for se in g.members.iter().filter_map(|(k, _)| self.sessions.get(*k)) {
                    if se.conn.is_some() {
                        m.online += 1;
                        m.ready += u32::from(se.congested.is_none());
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
        for dst in 0..cores {
            if dst != self.id {
                let msg = XMsg::Shared {
                    core: self.id,
                    group: group.clone(),
                    filter: filter.clone(),
                    ready: m.ready,
                    online: m.online,
                    total: m.total,
                };
                self.mesh.stage(dst, msg);
            }
        }
    }

    /// Delivers `msg` to one member of the shared group `name` on this core: a ready one (online, not
    /// congested) if there is one, round robin; else an online one (its queue has room beyond its limit
    /// for what was already on its way when it congested); else any (its persistent session queues the
    /// message). If the core has no member left (the last one left while the message was on its way),
    /// another core with members gets it: it was acknowledged and must not be lost.
    fn deliver_shared(&mut self, name: &Arc<str>, msg: &Message, hops: u8) {
        let sessions = &self.sessions;
        let rank = |skey: usize| match sessions.get(skey) {
            Some(se) if se.conn.is_some() && se.congested.is_none() => RANK_BEST,
            Some(se) if se.conn.is_some() => 1,
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
        let ids: SubIds = if o.id != 0 { smallvec::smallvec![o.id] } else { SubIds::new() };
        let retain = msg.retain && o.retain_as_published;
        self.deliver_to(skey, msg, msg.qos.min(o.qos), retain, ids, &mut SharedFrames::default(), &mut None);
    }

    /// Sends `msg` to one member of the shared group `name`, on whichever core the views pick (never
    /// `except`). A message for a group nobody subscribes to any more is counted as dropped: it has no
    /// subscriber to lose it.
    fn send_to_group(&mut self, name: &Arc<str>, msg: Message, except: Option<usize>, hops: u8) {
        match self.shared_views.pick_group(name, except) {
            Some(core) if core == self.id => self.deliver_shared(name, &msg, hops),
            Some(core) => self.stage_shared(core, name, msg, hops),
            None => self.stats.dropped += 1,
        }
    }

    /// Sends `msg` to `core` for one member of the shared group `name` there.
    fn stage_shared(&mut self, core: usize, name: &Arc<str>, msg: Message, hops: u8) {
        self.mesh.stage(core, XMsg::SharedPublish { msg, group: name.clone(), hops });
        if let Some(p) = &mut self.persist {
            p.sent_to(core);
        }
    }

    /// Handles one packet from an established connection.
    pub fn handle(&mut self, key: usize, packet: Packet, now: Instant) -> Flow {
        let Some(skey) = self.conns.get(key).and_then(|c| c.session) else {
            return Flow::Close(reason::PROTOCOL_ERROR, "packet before CONNECT");
        };
        match packet {
            Packet::Publish(p) => self.on_publish(key, skey, p, now),
            Packet::PubAck(a) => {
                self.with_session(key, skey, |s, out| {
                    s.expire(now);
                    s.on_puback(a.pkid, out)
                });
                self.progressed(skey, now);
                Flow::Continue
            }
            Packet::PubRec(a) if a.reason >= 0x80 => {
                // v5: the subscriber refused the message; its QoS 2 flow ends here (no PUBREL).
                self.with_session(key, skey, |s, out| {
                    s.expire(now);
                    s.on_pubrec_refused(a.pkid, out)
                });
                self.progressed(skey, now);
                Flow::Continue
            }
            Packet::PubRec(a) => self.with_session(key, skey, |s, out| s.on_pubrec(a.pkid, out)),
            Packet::PubRel(a) => self.with_session(key, skey, |s, out| s.on_pubrel(a.pkid, out)),
            Packet::PubComp(a) => {
                self.with_session(key, skey, |s, out| {
                    s.expire(now);
                    s.on_pubcomp(a.pkid, out)
                });
                self.progressed(skey, now);
                Flow::Continue
            }
            Packet::Subscribe(s) => self.on_subscribe(key, skey, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(key, skey, u),
            Packet::PingReq => self.reply(key, Packet::PingResp),
            Packet::Disconnect(d) => self.on_disconnect(key, skey, d),
            Packet::Auth(_) => {
                // No enhanced authentication: the CONNECT had no Authentication Method (MQTT-4.12.0-1).
                Flow::Close(reason::PROTOCOL_ERROR, "AUTH without authentication method")
            }
            Packet::Connect(_) => Flow::Close(reason::PROTOCOL_ERROR, "second CONNECT"),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Flow::Close(reason::PROTOCOL_ERROR, "server-to-client packet from a client")
            }
        }
    }

    /// DISCONNECT from the client. v5: it may change the session expiry (but not from 0, MQTT-3.14.2-2),
    /// and reason 0x04 asks for the will to be published.
    fn on_disconnect(&mut self, key: usize, skey: usize, d: Disconnect) -> Flow {
        if let Some(x) = d.properties.as_ref().and_then(|p| p.session_expiry_interval) {
            let was_zero = self.conns.get(key).and_then(|c| c.v5.as_ref()).is_some_and(|v| v.expiry_was_zero);
            if was_zero && x != 0 {
                return Flow::Close(
                    reason::PROTOCOL_ERROR,
                    "session expiry set at DISCONNECT after 0 at CONNECT",
                );
            }
            let cap = self.settings.max_session_expiry;
            if let Some(se) = self.sessions.get_mut(skey) {
                se.expiry = x.min(cap);
                se.session.clean = se.expiry == 0;
            }
            self.persist_session(skey);
        }
        Flow::Disconnect { will: d.reason == reason::DISCONNECT_WITH_WILL }
    }

    /// Queues a v5 DISCONNECT with `code` (and `why` as its reason string) for the connection, if it is a
    /// v5 one; 3.1.1 has no such packet. Returns whether one was queued.
    pub fn send_disconnect(&mut self, key: usize, code: u8, why: &str) -> bool {
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
        self.log_journal(skey);
        Flow::Continue
    }

    fn on_publish(&mut self, key: usize, skey: usize, mut p: Publish, now: Instant) -> Flow {
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
            let (qos2, resend) = self.sessions.get(skey).map_or((0, false), |se| {
                (se.session.inbound_qos2_len(), se.session.has_inbound_qos2(p.pkid))
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
    fn accept_publish(&mut self, key: usize, skey: usize, p: Publish, now: Instant) {
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
                if let Some(se) = self.sessions.get_mut(skey) {
                    first = se.session.on_inbound_qos2_reason(p.pkid, code, &mut answer);
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
            let Some(ctl) = self.conns.get(key).map(|c| c.ctl.clone()) else { return };
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
    fn has_subscribers(&self, topic: &str) -> bool {
        self.index.any_match(topic) || self.interest.any_match(topic) || self.shared_views.any_match(topic)
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

    /// Whether a QoS 1/2 PUBLISH to `topic` must be held before it is acknowledged: a matching congested
    /// subscriber, a matching shared group whose online members are all congested, or more staged for
    /// another core than its ring can take (a congested subscriber there has room for what is in transit
    /// when it tells the publishers to wait, about a ring per core, not for an unbounded staging queue:
    /// several publishers reading 64 KiB each in one loop turn, or a release of held PUBLISHes, would
    /// overrun it). The last one is set right by the consumer draining (`end_batch` retries).
    fn must_hold(&mut self, topic: &str) -> bool {
        if self.mesh.saturated() {
            self.retry_on_room = true;
            return true;
        }
        (!self.congested.is_empty() && self.congested.any_match(topic)) || self.shared_views.blocked(topic)
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
    /// A quiet connection parked (its reading task and buffer were freed): counted, and toward a trim.
    /// Returns whether the allocator should give free pages back now: every [`PURGE_AFTER_PARKS`] parks,
    /// so that a storm of connections going idle does not pile up freed blocks between sweeps.
    pub fn note_parked(&mut self) -> bool {
        self.stats.parks += 1;
        self.freed_since_trim += 1;
        self.parks_since_purge += 1;
        if self.parks_since_purge >= PURGE_AFTER_PARKS {
            self.parks_since_purge = 0;
            return true;
        }
        false
    }

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
            // A shared group pauses its publishers only when all its online members are congested: its
            // readiness is announced below instead.
            .filter(|(f, o)| o.qos != QoS::AtMostOnce && !f.starts_with("$share/"))
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
        self.announce_session_groups(skey);
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
        self.announce_session_groups(skey);
    }

    /// Routes a message published by a client of this core (or a will): retained store, local
    /// subscribers, and every other core with interest (all of them for a retained message, so that
    /// each core's retained copy stays whole).
    pub fn publish(&mut self, msg: Message) {
        self.publish_from(msg, None);
    }

    /// [`Core::publish`] for a message from the client of session `origin` (v5 No Local).
    fn publish_from(&mut self, mut msg: Message, origin: Option<usize>) {
        let mut mask: u64 = 0;
        if msg.retain {
            // Kept by every core's retained store: compact once here, not on each core.
            msg = msg.compacted();
            self.store_retained(&msg);
            mask = all_cores_mask(self.cores()) & !(1u64 << self.id);
        } else {
            let me = self.id;
            for &(core, ()) in self.interest.matches_cached(msg.topic.as_str(), &mut self.interest_cache) {
                if core != me {
                    mask |= 1u64 << core;
                }
            }
        }
        while mask != 0 {
            let dst = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            self.mesh.stage(dst, XMsg::Publish(msg.clone()));
            if let Some(p) = &mut self.persist {
                p.sent_to(dst);
            }
        }
        self.deliver_local(&msg, origin);
        // One member of each matching shared group, chosen here for the whole broker.
        let mut picks: SmallVec<[(Arc<str>, usize); 2]> = SmallVec::new();
        self.shared_views.pick(msg.topic.as_str(), |g, core| picks.push((g.clone(), core)));
        for (group, core) in picks {
            if core == self.id {
                self.deliver_shared(&group, &msg, 0);
            } else {
                self.stage_shared(core, &group, msg.clone(), 0);
            }
        }
    }

    fn store_retained(&mut self, msg: &Message) {
        if self.owns_retained(msg.topic.as_str()) {
            self.log(Record::Retained { msg: msg.clone() });
        }
        if msg.payload.is_empty() {
            self.retained.remove(msg.topic.as_str());
        } else {
            self.retained.insert(msg.topic.as_str(), msg.clone());
        }
    }

    /// Delivers to this core's matching sessions: once per session at the highest granted QoS, carrying
    /// the identifiers of every matching subscription (MQTT-3.3.4-3/5). `origin` is the publisher's session
    /// when it is on this core: its No Local subscriptions do not match.
    fn deliver_local(&mut self, msg: &Message, origin: Option<usize>) {
        let mut matches: SmallVec<[(usize, SubOpts); 16]> = SmallVec::new();
        for &(skey, o) in self.index.matches_cached(msg.topic.as_str(), &mut self.index_cache) {
            if !(o.no_local && origin == Some(skey)) {
                matches.push((skey, o));
            }
        }
        if matches.is_empty() {
            return;
        }
        let mut shared = SharedFrames::default();
        let mut compact: Option<Message> = None;
        if matches.len() == 1 {
            let (skey, o) = matches[0];
            let ids: SubIds = if o.id != 0 { smallvec::smallvec![o.id] } else { SubIds::new() };
            let retain = msg.retain && o.retain_as_published;
            self.deliver_to(skey, msg, msg.qos.min(o.qos), retain, ids, &mut shared, &mut compact);
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
            self.deliver_to(skey, msg, msg.qos.min(qos), retain, ids, &mut shared, &mut compact);
        }
    }

    /// One delivery to one session. `shared` caches the QoS 0 frames of this message on this core (one per
    /// protocol layout), and `compact` its compacted copy for sessions that will queue it (one copy per
    /// message, not per subscriber).
    #[allow(clippy::too_many_arguments)]
    fn deliver_to(
        &mut self,
        skey: usize,
        msg: &Message,
        qos: QoS,
        retain: bool,
        sub_ids: SubIds,
        shared: &mut SharedFrames,
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
        if msg.props.as_ref().is_some_and(|p| p.expires.is_some()) && msg.expired(Instant::now()) {
            // MQTT-3.3.2-5: an expired message is not delivered.
            return;
        }
        let conn = se.conn.and_then(|k| self.conns.get(k));
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
                    se.session.deliver_with(msg.clone(), qos, retain, sub_ids, Some(&mut out));
                } else {
                    let frame = shared.get(v5.is_some(), msg, &mut self.frame_buf);
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
                let delivered = match guard.as_deref_mut() {
                    Some(out) if self.subscribing => se.session.deliver_backlog(m, qos, sub_ids, out),
                    out => se.session.deliver_with(m, qos, retain, sub_ids, out),
                };
                if delivered == Delivered::Dropped {
                    self.stats.dropped += 1;
                }
                if guard.is_some() && se.session.overfull() && !self.overfull.contains(&skey) {
                    self.overfull.push(skey);
                }
                let newly_full = se.congested.is_none() && guard.is_some() && se.session.congested();
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

    fn on_subscribe(&mut self, key: usize, skey: usize, sub: Subscribe) -> Flow {
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
        let now = Instant::now();
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

    fn on_unsubscribe(&mut self, key: usize, skey: usize, u: Unsubscribe) -> Flow {
        let mut codes = SmallVec::new();
        for f in &u.filters {
            let existed = self.unsubscribe_one(skey, f.as_str());
            codes.push(if existed { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
        }
        self.reply(key, Packet::UnsubAck(UnsubAck { pkid: u.pkid, codes }))
    }

    /// Removes one subscription; returns whether it existed.
    fn unsubscribe_one(&mut self, skey: usize, filter: &str) -> bool {
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

    fn broadcast_interest(&mut self, filter: &str, add: bool) {
        for dst in 0..self.cores() {
            if dst != self.id {
                self.mesh.stage(dst, XMsg::Interest { core: self.id, filter: filter.into(), add });
            }
        }
    }

    /// Ends a session: its subscriptions leave the index, its queue is dropped, a will still waiting for
    /// its delay is published now (MQTT-3.1.3-9: the session ended first).
    fn end_session(&mut self, skey: usize) {
        if !self.sessions.contains(skey) {
            return;
        }
        self.fire_will(skey);
        self.withdraw_congestion(skey);
        if let Some(sid) = self.sessions.get(skey).and_then(|se| se.sid) {
            self.log(Record::SessionEnd { sid });
        }
        let mut se = self.sessions.remove(skey);
        let mut groups: SmallVec<[Arc<str>; 2]> = SmallVec::new();
        for filter in se.session.subscriptions.keys() {
            if filter.starts_with("$share/") {
                if let Some(name) = self.shared_local.leave(filter, skey) {
                    self.announce_group(filter);
                    groups.push(name);
                }
                continue;
            }
            if self.index.remove(filter, skey).last_for_filter {
                self.broadcast_interest(filter, false);
            }
        }
        if self.by_client.get(&se.session.client_id) == Some(&skey) {
            self.by_client.remove(&se.session.client_id);
        }
        if !groups.is_empty() {
            self.redispatch(&mut se.session, &groups);
        }
    }

    /// A member of shared groups ended its session with messages it had not acknowledged or not yet been
    /// sent: each goes to another member of its group (MQTT 5.0 §4.8.2: the server SHOULD send it to
    /// another client of the shared subscription), so that a member leaving under load loses nothing
    /// that was acknowledged to its publisher. A message is given to the first of the session's groups
    /// whose filter matches its topic, unless one of the session's plain subscriptions matches it too
    /// (then the copy may have been the plain subscription's, and it ends with the session).
    fn redispatch(&mut self, session: &mut Session, groups: &[Arc<str>]) {
        let plain: SmallVec<[Box<str>; 4]> =
            session.subscriptions.keys().filter(|f| !f.starts_with("$share/")).cloned().collect();
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
    fn fire_will(&mut self, skey: usize) {
        let Some(pending) = self.sessions.get_mut(skey).and_then(|se| se.pending_will.take()) else {
            return;
        };
        self.publish_will(skey, pending.0);
    }

    /// Publishes a will of the client of session `skey`, if the ACL lets that client publish to its topic.
    fn publish_will(&mut self, skey: usize, w: Will) {
        self.stats.msgs_in += 1;
        if !self.may_publish(skey, w.topic.as_str()) {
            self.stats.denied += 1;
            return;
        }
        let now = Instant::now();
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

    /// The connection's reader ended. `graceful`: DISCONNECT was received (no will). What is queued for
    /// the client (a CONNACK before a protocol error, say) is still written before the socket closes.
    pub fn conn_closed(&mut self, key: usize, ctl: &Rc<ConnCtl>, graceful: bool) {
        if self.is_current(key, ctl) {
            self.close_conn(key, graceful, None);
        }
    }

    /// Detaches and closes a connection: publishes its will unless `graceful` (at once, or after its v5
    /// Will Delay Interval), ends a session that expires with it. `kick`: the broker closes the connection
    /// while its reader is still blocked on the socket; a v5 client is first sent a DISCONNECT with that
    /// reason code and string, which its writer gets [`LINGER`] to flush; others are shut down at once.
    /// Without `kick` the writer flushes the outbox first.
    fn close_conn(&mut self, key: usize, graceful: bool, kick: Option<(u8, &str)>) {
        if !self.conns.contains(key) {
            return;
        }
        if let Some((code, why)) = kick {
            if self.send_disconnect(key, code, why) {
                if let Some(c) = self.conns.get(key) {
                    self.lingering.push((c.ctl.clone(), Instant::now() + LINGER));
                }
            } else if let Some(c) = self.conns.get(key) {
                c.ctl.kick();
            }
        }
        let entry = self.conns.remove(key);
        self.freed_since_trim += 1;
        if entry.held.is_some() {
            // Never acknowledged: the client sends them again when it reconnects.
            self.holding.retain(|&k| k != key);
            self.released = true;
        }
        entry.ctl.close();
        let now = Instant::now();
        let mut will = if graceful { None } else { entry.will };
        let delay = will.as_ref().and_then(|w| w.properties.will_delay_interval).unwrap_or(0);
        if let Some(skey) = entry.session {
            let attached = self.sessions.get(skey).is_some_and(|s| s.conn == Some(key));
            if !attached && delay > 0 {
                // Taken over: a new connection to the session came within the delay (MQTT-3.1.3-9).
                will = None;
            }
            if let (true, Some(se)) = (attached, self.sessions.get_mut(skey)) {
                se.conn = None;
                se.offline_since = Some(now);
                // A will with a delay waits, unless the session ends sooner (then it goes with it).
                if delay > 0 && se.expiry > 0 {
                    if let (Some(w), Some(due)) =
                        (will.take(), now.checked_add(Duration::from_secs(u64::from(delay.min(se.expiry)))))
                    {
                        se.pending_will = Some(Box::new((*w, due)));
                        self.pending_wills.push(skey);
                    }
                }
                if se.expiry == 0 {
                    if let Some(w) = will.take() {
                        // Published before the session (and the username the ACL checks) is gone.
                        self.publish_will(skey, *w);
                    }
                    self.end_session(skey);
                } else {
                    if let Some(sid) = se.sid {
                        let unix_ms = durable::Persister::clock().unix_ms;
                        self.log(Record::Offline { sid, unix_ms });
                    }
                    let Some(se) = self.sessions.get_mut(skey) else { return };
                    if se.expiry != u32::MAX {
                        if let Some(at) = now.checked_add(Duration::from_secs(u64::from(se.expiry))) {
                            self.expiring.push(Reverse((at, skey)));
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

    /// Closes connections whose keep-alive (or connect timeout) expired. Called every 250 ms
    /// (`server::SWEEP_INTERVAL`).
    pub fn sweep(&mut self, now: Instant) {
        let expired: SmallVec<[usize; 8]> = self
            .conns
            .iter()
            .filter(|(_, c)| c.timeout.is_some_and(|t| now.saturating_duration_since(c.last_seen) > t))
            .map(|(k, _)| k)
            .collect();
        for c in self.conns.iter_mut().map(|(_, c)| c) {
            // A reader paused on a full hold is not reading, by the broker's choice: not a dead peer.
            if c.held.as_ref().is_some_and(|h| h.is_full()) {
                c.last_seen = now;
            }
            // An outbox keeps the capacity of its busiest moment (a CONNACK alone leaves room for four
            // 128-byte frames); give it back, so that an idle connection holds no outbox memory. A busy
            // one pays one allocation per sweep for this.
            if let Ok(mut ob) = c.ctl.outbox.try_borrow_mut() {
                if ob.is_empty() && ob.capacity() > 0 {
                    ob.shrink_to_fit();
                }
            }
            c.ctl.sweep_writer();
        }
        self.freed_since_trim += RETIRED_WRITERS.take();
        let quiet = self.freed_since_trim == self.freed_at_last_sweep;
        self.freed_at_last_sweep = self.freed_since_trim;
        if self.freed_since_trim >= TRIM_AFTER_CLOSES || (quiet && self.freed_since_trim >= TRIM_AFTER_QUIET)
        {
            self.freed_since_trim = 0;
            self.freed_at_last_sweep = 0;
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
            self.close_conn(key, false, Some((reason::KEEP_ALIVE_TIMEOUT, "keep-alive timeout")));
        }
        self.expire_sessions(now);
        self.fire_due_wills(now);
        // Connections closed with a v5 DISCONNECT whose writer could not flush it in time.
        self.lingering.retain(|(ctl, deadline)| {
            if ctl.writer_finished() {
                return false;
            }
            if now >= *deadline {
                ctl.kick();
                return false;
            }
            true
        });
    }

    /// Ends offline sessions whose expiry interval has passed.
    fn expire_sessions(&mut self, now: Instant) {
        while let Some(&Reverse((at, skey))) = self.expiring.peek() {
            if at > now {
                break;
            }
            self.expiring.pop();
            // Stale entries: the client came back, or the session's expiry changed since.
            let due = self.sessions.get(skey).is_some_and(|se| {
                se.conn.is_none()
                    && se.offline_since.and_then(|t| t.checked_add(Duration::from_secs(u64::from(se.expiry))))
                        == Some(at)
            });
            if due {
                self.end_session(skey);
            }
        }
    }

    /// Publishes delayed wills whose delay has passed.
    fn fire_due_wills(&mut self, now: Instant) {
        if self.pending_wills.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.pending_wills);
        waiting.retain(|&skey| {
            match self.sessions.get(skey).and_then(|se| se.pending_will.as_ref()).map(|p| p.1) {
                Some(due) if due <= now => {
                    self.fire_will(skey);
                    false
                }
                Some(_) => true,
                None => false,
            }
        });
        self.pending_wills.append(&mut waiting);
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
            self.close_conn(key, false, Some((reason::QUOTA_EXCEEDED, "slow subscriber timeout")));
        }
    }

    /// Whether the core takes nothing from other cores for now (an overfull session); the runtime then
    /// waits for the core's own wake-up, which [`Core::end_batch`] sends once it has drained.
    pub fn inbound_paused(&mut self) -> bool {
        let sessions = &self.sessions;
        self.overfull
            .retain(|&mut k| sessions.get(k).is_some_and(|se| se.conn.is_some() && se.session.overfull()));
        !self.overfull.is_empty()
    }

    /// Processes what other cores sent. Returns how many messages were taken.
    pub fn drain_inbound(&mut self) -> usize {
        if self.inbound_paused() {
            return 0;
        }
        let mut batch = std::mem::take(&mut self.inbound);
        let always = self.persist.as_ref().is_some_and(|p| p.always);
        let mut runs: SmallVec<[(usize, usize); 4]> = SmallVec::new();
        let n = if always {
            let mut r = Vec::new();
            let n = self.mesh.drain_with_sources(DRAIN_BATCH, &mut batch, &mut r);
            runs.extend(r);
            n
        } else {
            self.mesh.drain(DRAIN_BATCH, &mut batch)
        };
        // fsync = "always": how many publishes came from each source, to confirm them once durable.
        let mut publishes: SmallVec<[(usize, u64); 4]> = SmallVec::new();
        if always {
            let mut at = 0;
            for &(src, count) in &runs {
                let k = batch.get(at..at + count).map_or(0, |ms| {
                    ms.iter().filter(|m| matches!(m, XMsg::Publish(_) | XMsg::SharedPublish { .. })).count()
                });
                at += count;
                if k > 0 {
                    publishes.push((src, k as u64));
                }
            }
        }
        for m in batch.drain(..) {
            match m {
                XMsg::Publish(msg) => {
                    if msg.retain {
                        self.store_retained(&msg);
                    }
                    self.deliver_local(&msg, None);
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
                XMsg::Shared { core, group, filter, ready, online, total } => {
                    let cores = self.cores();
                    let m = Members { ready, online, total };
                    if self.shared_views.update(cores, core, &group, &filter, m) {
                        self.retry_held = true;
                    }
                }
                XMsg::SharedPublish { msg, group, hops } => self.deliver_shared(&group, &msg, hops),
                XMsg::Durable { core, upto } => {
                    if let Some(p) = &mut self.persist {
                        p.confirmed_by(core, upto);
                    }
                }
            }
        }
        self.inbound = batch;
        if let Some(p) = &mut self.persist {
            for (src, k) in publishes {
                p.received_from(src, k);
            }
        }
        n
    }

    fn mark_dirty(&mut self, ctl: &Rc<ConnCtl>) {
        if !ctl.dirty.replace(true) {
            self.dirty.push(ctl.clone());
        }
    }

    /// End of a batch: wake the writers whose outboxes changed and push staged cross-core messages.
    pub fn end_batch(&mut self) {
        // PUBLISHes held for ring room: what this batch staged goes first, and they follow if it all fit
        // (if not, the consumer signals room and the room task calls this again).
        if self.retry_on_room && self.mesh.flush() {
            self.retry_on_room = false;
            self.retry_held = true;
        }
        self.release_held();
        self.settle_durable();
        if !self.overfull.is_empty() && !self.inbound_paused() {
            // The cross-core loop waits for this (`Core::inbound_paused`).
            self.mesh.my_signal().wake.notify_one();
        }
        for ctl in self.dirty.drain(..) {
            ctl.dirty.set(false);
            ctl.wake_writer();
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
    /// v5 clients are sent DISCONNECT 0x8B first; the returned connections are those whose writer should
    /// get a moment to flush it before the runtime stops (then [`ConnCtl::kick`] them).
    pub fn close_all(&mut self) -> Vec<Rc<ConnCtl>> {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
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
        self.end_batch();
        self.conns.clear();
        flushing
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

/// The QoS 0 frames of one message, encoded at most once per protocol layout and shared by every QoS 0
/// subscriber of that layout on this core.
#[derive(Default)]
struct SharedFrames {
    v3: Option<Bytes>,
    v5: Option<Bytes>,
}

impl SharedFrames {
    /// The frame for `v5` or 3.1/3.1.1 subscribers, encoded on first use. Frames are carved from 64 KiB
    /// blocks so that encoding costs an allocation per block, not per message.
    fn get(&mut self, v5: bool, msg: &Message, buf: &mut BytesMut) -> Bytes {
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
fn outbound_size(msg: &Message, qos: QoS, sub_ids: &SubIds) -> usize {
    let mut props =
        msg.props.as_ref().map_or(0, |p| p.forward.len() + if p.expires.is_some() { 5 } else { 0 });
    for &id in sub_ids {
        props += 1 + properties::vbi_len(id as usize);
    }
    protocol::publish_head_len_v5(msg.topic.len(), qos, props, msg.payload.len()) + msg.payload.len()
}
