//! One core's world: its connections, the slab of sessions whose client ids hash to it, its partition of
//! the subscription index, its copy of the retained store, and what it knows of other cores' interests.
//!
//! Everything here runs on the core's own thread, inside one `RefCell` borrow per batch of packets: no
//! locks, no awaits. The runtime (`crate::server`) reads sockets, calls [`Core::handle`] for each decoded
//! packet, and wakes the writer of every connection whose outbox changed.
//!
//! Architecture invariant: a session lives on `home_core(client_id)` and nowhere else, so takeover and
//! session resumption never need another core's state. Cross-core effects go through `Mesh::stage`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::SmallVec;

use crate::auth::password::VerifyCache;
use crate::protocol::{reason, Packet, Utf8Bytes};
use crate::session::{Message, OutFrame, Outbox, Session, SubOpts};
use crate::stats::Stats;
use crate::topic::{MatchCache, RetainedTree, SubscriptionIndex};
pub use crate::xcore::CoreId;
use crate::xcore::{Handoff, Mesh, XMsg};

mod congestion;
mod connect;
mod conns;
mod ctl;
mod deliver;
mod durable;
mod groups;
mod inbound;
mod keys;
mod publish;
mod sessions;
mod settings;
mod shared;
mod subscribe;
mod timers;
mod trim;
pub use congestion::{HOLD_BYTES, HOLD_MESSAGES};
pub use connect::check_connect;
#[cfg(test)]
mod tests;
pub use ctl::{ConnCtl, Shutdown, Writers};
use keys::Table;
pub use keys::{ConnKey, SessionKey};
pub use publish::message_props;

use congestion::Held;
use conns::{ConnEntry, V5Conn};
pub use durable::Persister;
use sessions::SessionEntry;
pub use settings::{Settings, SlowSubscriber};
use shared::{GroupViews, LocalGroups};
use timers::{Due, Timers};
use trim::Trim;

use crate::persist::Clock;

/// An invariant the code relies on did not hold: a programmer error, never bad network input (which is
/// validated and answered). Debug builds, which the unit tests and the fuzz targets use, stop here; a
/// release broker goes on with the safe fallback written after it rather than lose its other clients.
macro_rules! broken {
    ($($why:tt)*) => {
        if cfg!(debug_assertions) {
            panic!("invariant broken: {}", format_args!($($why)*));
        }
    };
}
pub(crate) use broken;

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

pub struct Core {
    pub id: CoreId,
    settings: Settings,
    conns: Table<ConnKey, ConnEntry>,
    sessions: Table<SessionKey, SessionEntry>,
    by_client: HashMap<Utf8Bytes, SessionKey>,
    /// Subscriptions of this core's sessions: filter -> (session key, options).
    index: SubscriptionIndex<SessionKey, SubOpts>,
    /// Filters other cores have subscribers for: filter -> core id.
    interest: SubscriptionIndex<CoreId, ()>,
    /// The last topic's matches in `index` and in `interest` (a publisher's messages come in runs).
    index_cache: MatchCache<SessionKey, SubOpts>,
    interest_cache: MatchCache<CoreId, ()>,
    /// Filters of congested sessions on every core (this one included): filter -> [`congestion_key`].
    /// A QoS 1/2 PUBLISH matching one is held before it is acknowledged.
    congested: SubscriptionIndex<u64, ()>,
    /// Connections with held PUBLISHes, retried when a congestion is withdrawn.
    holding: Vec<ConnKey>,
    retry_held: bool,
    /// Some held PUBLISHes were released or dropped: readers paused on a full hold may go on.
    released: bool,
    /// This core's copy of every retained message (payloads are shared `Bytes`, not copies).
    retained: RetainedTree<Message>,
    pub mesh: Mesh,
    dirty: Vec<Rc<ConnCtl>>,
    /// The retired writers of this core's connections.
    writers: Rc<Writers>,
    pub stats: Stats,
    /// Connections handed to this core, waiting for the runtime to spawn their tasks.
    pub handoffs: Vec<Handoff>,
    inbound: Vec<XMsg>,
    assigned_ids: u64,
    /// Scratch for the shared QoS 0 frame of one message; split off, never copied again.
    frame_buf: BytesMut,
    /// When to give memory back.
    trim: Trim,
    /// Credentials that verified recently: a reconnect costs one hash, not a PBKDF2 derivation.
    verified: VerifyCache,
    /// Keep-alives, connect timeouts, session expiries and delayed wills, by deadline.
    timers: Timers,
    /// Congested sessions (pause policy), which the sweep checks for the slow-subscriber timeout.
    stalled: Vec<SessionKey>,
    /// Parked connections whose writer may retire (see [`ConnCtl::sweep_writer`]).
    parked_writers: Vec<Rc<ConnCtl>>,
    /// Connections whose outbox was used since the last sweep (see [`ConnCtl::shrink_idle_outbox`]).
    active: Vec<Rc<ConnCtl>>,
    /// Every shared group of the broker and how many members each core has: where to send a message.
    shared_views: GroupViews,
    /// The shared groups this core's sessions belong to.
    shared_local: LocalGroups,
    /// Online sessions past their limits and overflow room (`Session::overfull`): while there are any,
    /// the core takes nothing from other cores, so that their publishers pause through the full rings
    /// instead of this core dropping what they acknowledged.
    overfull: SmallVec<[SessionKey; 2]>,
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
    /// The time the current entry point was called with (every entry point takes it: the core reads no
    /// clock), never going backwards.
    now: Instant,
    /// The wall clock at some recent `now` (given at creation and by every sweep): what Unix times the
    /// core writes (session records, assigned client ids) are derived from.
    wall: Clock,
}

/// Usernames whose verified password the cache keeps per core.
const VERIFY_CACHE: usize = 100_000;

/// The core that owns the session of `client_id`.
pub fn home_core(client_id: &str, cores: usize) -> CoreId {
    // DefaultHasher::new() uses fixed keys: every thread computes the same home for an id.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client_id.hash(&mut h);
    CoreId::new((h.finish() % cores.max(1) as u64) as usize)
}

impl Core {
    pub fn new(id: usize, settings: Settings, mesh: Mesh, wall: Clock) -> Core {
        Core {
            now: wall.instant,
            wall,
            id: CoreId::new(id),
            settings,
            conns: Table::default(),
            sessions: Table::default(),
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
            writers: Rc::default(),
            stats: Stats::new(),
            handoffs: Vec::new(),
            inbound: Vec::new(),
            assigned_ids: 0,
            frame_buf: BytesMut::new(),
            trim: Trim::default(),
            verified: VerifyCache::new(VERIFY_CACHE),
            timers: Timers::default(),
            stalled: Vec::new(),
            parked_writers: Vec::new(),
            active: Vec::new(),
            lingering: Vec::new(),
            shared_views: GroupViews::default(),
            shared_local: LocalGroups::default(),
            overfull: SmallVec::new(),
            retry_on_room: false,
            subscribing: false,
            persist: None,
        }
    }

    /// A control block for a new connection of this core; `socket` shuts its socket down on a kick.
    pub fn new_ctl(&self, socket: Option<Rc<dyn Shutdown>>) -> Rc<ConnCtl> {
        Rc::new(ConnCtl::new(socket, self.writers.clone()))
    }

    /// The pool the task that restarts retired writers waits on.
    pub fn writers(&self) -> Rc<Writers> {
        self.writers.clone()
    }

    /// Every entry point starts here: the time it was given becomes the core's present.
    fn at(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// The present on both clocks, for records that must survive a restart.
    fn clock(&self) -> Clock {
        Clock { instant: self.now, unix_ms: self.wall.to_unix_ms(self.now) }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn cores(&self) -> usize {
        self.mesh.cores()
    }

    /// Handles one packet from an established connection.
    pub fn handle(&mut self, key: ConnKey, packet: Packet, now: Instant) -> Flow {
        self.at(now);
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

    fn reply(&mut self, key: ConnKey, p: Packet) -> Flow {
        if let Some(c) = self.conns.get(key) {
            let ctl = c.ctl.clone();
            ctl.outbox.borrow_mut().push_back(OutFrame::Control(p));
            self.mark_dirty(&ctl);
        }
        Flow::Continue
    }

    fn with_session(
        &mut self,
        key: ConnKey,
        skey: SessionKey,
        f: impl FnOnce(&mut Session, &mut Outbox),
    ) -> Flow {
        let (Some(c), Some(sess)) = (self.conns.get(key), self.sessions.get_mut(skey)) else {
            return Flow::Continue;
        };
        let ctl = c.ctl.clone();
        f(&mut sess.session, &mut ctl.outbox.borrow_mut());
        self.mark_dirty(&ctl);
        self.log_journal(skey);
        Flow::Continue
    }

    fn mark_dirty(&mut self, ctl: &Rc<ConnCtl>) {
        if !ctl.dirty.replace(true) {
            self.dirty.push(ctl.clone());
            if !ctl.active.replace(true) {
                self.active.push(ctl.clone());
            }
        }
    }

    /// End of a batch: wake the writers whose outboxes changed and push staged cross-core messages.
    pub fn end_batch(&mut self, now: Instant) {
        self.at(now);
        debug_assert_eq!(
            self.sessions.len(),
            self.by_client.len(),
            "every session is found by its client id"
        );
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
}
