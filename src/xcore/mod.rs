//! Everything that crosses cores: the message type, the mesh of SPSC rings (one per ordered pair of
//! cores) and the wake protocol.
//!
//! Architecture invariant: cores share no mutable state except these rings and the atomics in
//! [`Signal`]. A message is a value (a routed publish, an interest update, a connection hand-off), never
//! a closure or a pointer into another core's state.
//!
//! Wake protocol (measured on a 2-vCPU VM: waking on every batch instead cost ten times the wakes and
//! 40 % of the throughput; this way a saturated ring wakes once per 600–5,000 messages): the consumer
//! sets `parked`, fences, re-checks its rings and only then sleeps; a producer pushes a whole batch, fences, and wakes the
//! consumer only if it swaps `parked` from true — at most once per destination per loop tick. A full
//! ring is never a reason to drop: the producer keeps the rest staged, sets `blocked`, and stops reading
//! its sockets until the consumer, having drained, signals `room`.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use rtrb::{Consumer, Producer, RingBuffer};
use tokio::sync::Notify;

use crate::protocol::Connect;
use crate::session::Message;

/// The most cores a broker runs on: core sets are `u64` bitmasks.
pub const MAX_CORES: usize = 64;

/// A message from one core to another.
#[derive(Debug)]
pub enum XMsg {
    /// A message to deliver: what the rings are for.
    Data(Data),
    /// What the cores tell each other so that they route and pause correctly: few, and never per message.
    Control(Control),
}

/// Messages to deliver.
#[derive(Debug)]
pub enum Data {
    /// Deliver to the destination core's matching subscriptions. If `retain` is set, the destination
    /// also updates its copy of the retained store (retained publishes go to every core).
    Publish(Message),
    /// The publishing core picked the destination core to deliver `msg` to one member of `group`.
    /// `hops`: how many cores found no member of their own and passed it on (bounded by the core count).
    SharedPublish { msg: Message, group: Arc<str>, hops: u8 },
}

/// What one core tells another about its state: interest, congestion, shared-group membership,
/// durability, and connections moving to their home core.
#[derive(Debug)]
pub enum Control {
    /// The sending core gained its first (`add`) or lost its last subscription to `filter`.
    Interest { core: CoreId, filter: Box<str>, add: bool },
    /// A session of the sending core became congested (`on`) or drained (pause policy): QoS 1/2
    /// PUBLISHes matching `filter` are held before acknowledgement while any `key` has it on.
    Congestion { key: u64, filter: Box<str>, on: bool },
    /// A connection whose CONNECT arrived on the sending core but whose session lives on the destination
    /// core (the home core of its client id).
    Handoff(Handoff),
    /// The sending core's members of the shared group `group` (`$share/{g}/{filter}`): how many are
    /// ready (online and not congested), how many online, how many in all.
    Shared { core: CoreId, group: Arc<str>, filter: Box<str>, ready: u32, online: u32, total: u32 },
    /// Persistence with `fsync = "always"`: the sending core's log is durable past everything the first
    /// `upto` publishes (`Data` messages) from the destination core changed.
    Durable { core: CoreId, upto: u64 },
}

impl From<Data> for XMsg {
    fn from(d: Data) -> XMsg {
        XMsg::Data(d)
    }
}

impl From<Control> for XMsg {
    fn from(c: Control) -> XMsg {
        XMsg::Control(c)
    }
}

/// A connection moving to its home core, with everything read from it so far.
#[derive(Debug)]
pub struct Handoff {
    pub stream: std::net::TcpStream,
    pub connect: Box<Connect>,
    /// The accepting core assigned the client id (v5 clients are told it in CONNACK).
    pub assigned: bool,
    /// Plaintext read after the CONNECT.
    pub buffered: BytesMut,
    pub permit: ConnPermit,
    /// The TLS session of an `mqtts` connection (keys, sequence numbers, decrypted bytes not read yet).
    pub tls: Option<Box<rustls::ServerConnection>>,
}

/// Connection counts against `max_connections`, global and per listener, shared by every core: a core
/// cannot know how many connections the others serve without them. Touched once per connect and
/// disconnect, never per message.
#[derive(Debug)]
pub struct ConnLimits {
    total: AtomicUsize,
    max_total: usize,
    /// Per listener: (current, max); max 0 = no limit of its own.
    listeners: Vec<(AtomicUsize, usize)>,
}

impl ConnLimits {
    /// `max_total` and each of `per_listener`: 0 means no limit.
    pub fn new(max_total: usize, per_listener: &[usize]) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            total: AtomicUsize::new(0),
            max_total,
            listeners: per_listener.iter().map(|&m| (AtomicUsize::new(0), m)).collect(),
        })
    }

    /// Counts a new connection on `listener`. The permit says whether it fits the limits; either way it
    /// is counted until the permit is dropped (a refused connection holds it while it is answered).
    pub fn acquire(self: &Arc<ConnLimits>, listener: usize) -> ConnPermit {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut granted = self.max_total == 0 || total <= self.max_total;
        if let Some((n, max)) = self.listeners.get(listener) {
            let here = n.fetch_add(1, Ordering::Relaxed) + 1;
            granted &= *max == 0 || here <= *max;
        }
        ConnPermit { limits: self.clone(), listener, granted }
    }

    /// Connections counted now, all listeners together.
    pub fn current(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// One connection's place in [`ConnLimits`]; travels with a handed-off connection and is released
/// when the connection ends, on whichever core that is.
#[derive(Debug)]
pub struct ConnPermit {
    limits: Arc<ConnLimits>,
    listener: usize,
    granted: bool,
}

impl ConnPermit {
    /// Whether the connection fits `max_connections`; if not it gets CONNACK 0x03.
    pub fn granted(&self) -> bool {
        self.granted
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
        if let Some((n, _)) = self.limits.listeners.get(self.listener) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Per-core flags and wake-ups that other threads may touch. Aligned to 128 bytes (two cache lines,
/// for adjacent-line prefetch) so that one core's flags never share a line with another's.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Signal {
    /// The core is about to sleep or sleeping: a producer must wake it.
    pub parked: AtomicBool,
    pub wake: Notify,
    /// The core has messages staged that did not fit a ring: consumers signal `room` after draining.
    pub blocked: AtomicBool,
    pub room: Notify,
}

/// A core of this broker: its place in the mesh (0 to `threads` - 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CoreId(usize);

impl CoreId {
    pub fn new(index: usize) -> CoreId {
        CoreId(index)
    }

    /// Its index in per-core tables.
    pub fn index(self) -> usize {
        self.0
    }

    /// Every core of a broker of `cores` cores.
    pub fn all(cores: usize) -> impl Iterator<Item = CoreId> {
        (0..cores).map(CoreId)
    }
}

impl std::fmt::Display for CoreId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One core's ends of the mesh.
pub struct Mesh {
    pub id: CoreId,
    producers: Vec<Option<Producer<XMsg>>>,
    consumers: Vec<Option<Consumer<XMsg>>>,
    /// Per destination: messages waiting for ring space, in order.
    staged: Vec<VecDeque<XMsg>>,
    /// Destinations that received something this tick and may need a wake.
    wake_mask: u64,
    signals: Arc<[Signal]>,
}

/// Builds the N×N mesh once at start-up; element i goes to core i. `capacity` slots per ring (config
/// `ring_capacity`, 4,096 by default: a busy loop tick fits without blocking, and the ring stays small
/// enough for the cache).
pub fn build_mesh(n: usize, capacity: usize) -> Vec<Mesh> {
    let signals: Arc<[Signal]> = (0..n).map(|_| Signal::default()).collect();
    let mut meshes: Vec<Mesh> = (0..n)
        .map(|id| Mesh {
            id: CoreId(id),
            producers: (0..n).map(|_| None).collect(),
            consumers: (0..n).map(|_| None).collect(),
            staged: (0..n).map(|_| VecDeque::new()).collect(),
            wake_mask: 0,
            signals: signals.clone(),
        })
        .collect();
    for src in 0..n {
        for dst in 0..n {
            if src != dst {
                let (p, c) = RingBuffer::new(capacity);
                meshes[src].producers[dst] = Some(p);
                meshes[dst].consumers[src] = Some(c);
            }
        }
    }
    meshes
}

impl Mesh {
    pub fn cores(&self) -> usize {
        self.producers.len()
    }

    pub fn signals(&self) -> &Arc<[Signal]> {
        &self.signals
    }

    pub fn my_signal(&self) -> &Signal {
        &self.signals[self.id.0]
    }

    /// Queues `msg` for core `dst`; it reaches the ring at the next [`Mesh::flush`].
    pub fn stage(&mut self, dst: CoreId, msg: XMsg) {
        if let Some(q) = self.staged.get_mut(dst.0) {
            q.push_back(msg);
        }
    }

    /// Whether some messages could not be pushed: the caller must stop reading sockets.
    pub fn is_blocked(&self) -> bool {
        self.staged.iter().any(|q| !q.is_empty())
    }

    /// Whether some destination has more staged than its ring has free slots: the next flush cannot
    /// empty the staging, so the core must not acknowledge more QoS 1/2 PUBLISHes until the consumer
    /// drains. This bounds what a core has acknowledged but not yet handed to another core to about one
    /// ring plus one ring of staging per destination (staging itself has no limit of its own).
    pub fn saturated(&self) -> bool {
        self.staged
            .iter()
            .zip(&self.producers)
            .any(|(q, p)| !q.is_empty() && p.as_ref().is_some_and(|p| q.len() > p.slots()))
    }

    /// Pushes staged messages into the rings, one chunk per destination. Returns true when everything
    /// fit. Wakes are not sent here but in [`Mesh::wake_peers`], once per tick.
    pub fn flush(&mut self) -> bool {
        if self.push_staged() {
            return true;
        }
        // Ask consumers to tell us when they have made room, then retry once in case they drained
        // between our push and the flag (the fence orders the flag before the re-check).
        self.signals[self.id.0].blocked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.push_staged()
    }

    fn push_staged(&mut self) -> bool {
        let mut all = true;
        for dst in 0..self.staged.len() {
            if self.staged[dst].is_empty() {
                continue;
            }
            let Some(p) = self.producers[dst].as_mut() else {
                self.staged[dst].clear();
                continue;
            };
            let n = p.slots().min(self.staged[dst].len());
            if n > 0 {
                if let Ok(chunk) = p.write_chunk_uninit(n) {
                    chunk.fill_from_iter(self.staged[dst].drain(..n));
                }
                self.wake_mask |= 1 << dst;
            }
            if !self.staged[dst].is_empty() {
                all = false;
            }
        }
        all
    }

    /// Whether a wake is owed to some peer (the runtime schedules one tick task to send them).
    pub fn wake_pending(&self) -> bool {
        self.wake_mask != 0
    }

    /// Wakes every destination that got messages since the last call and is parked. One call per tick.
    pub fn wake_peers(&mut self) {
        let mut mask = std::mem::take(&mut self.wake_mask);
        if mask == 0 {
            return;
        }
        fence(Ordering::SeqCst);
        while mask != 0 {
            let dst = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let s = &self.signals[dst];
            // Load before swapping: a busy consumer is not parked, and a plain load keeps its cache
            // line shared instead of pulling it over on every tick.
            if s.parked.load(Ordering::SeqCst) && s.parked.swap(false, Ordering::SeqCst) {
                s.wake.notify_one();
            }
        }
    }

    /// Takes up to `max` messages from each inbound ring into `out`, in per-source order. Then signals
    /// `room` to producers that were blocked.
    pub fn drain(&mut self, max: usize, out: &mut Vec<XMsg>) -> usize {
        let before = out.len();
        for src in 0..self.consumers.len() {
            let Some(c) = self.consumers[src].as_mut() else { continue };
            let n = c.slots().min(max);
            if n == 0 {
                continue;
            }
            if let Ok(chunk) = c.read_chunk(n) {
                out.extend(chunk);
            }
            let s = &self.signals[src];
            if s.blocked.load(Ordering::SeqCst) && s.blocked.swap(false, Ordering::SeqCst) {
                s.room.notify_one();
            }
        }
        out.len() - before
    }

    /// [`Mesh::drain`] that also says where each message came from: `runs` gets one `(source core, count)`
    /// per source that had messages, in the order they were appended to `out`.
    pub fn drain_with_sources(
        &mut self,
        max: usize,
        out: &mut Vec<XMsg>,
        runs: &mut Vec<(CoreId, usize)>,
    ) -> usize {
        let before = out.len();
        for src in 0..self.consumers.len() {
            let Some(c) = self.consumers[src].as_mut() else { continue };
            let n = c.slots().min(max);
            if n == 0 {
                continue;
            }
            if let Ok(chunk) = c.read_chunk(n) {
                out.extend(chunk);
                runs.push((CoreId(src), n));
            }
            let s = &self.signals[src];
            if s.blocked.load(Ordering::SeqCst) && s.blocked.swap(false, Ordering::SeqCst) {
                s.room.notify_one();
            }
        }
        out.len() - before
    }

    /// Whether any inbound ring holds messages.
    pub fn has_inbound(&self) -> bool {
        self.consumers.iter().flatten().any(|c| !c.is_empty())
    }

    /// Prepares to sleep: sets `parked`, fences, and reports whether it is safe to sleep (nothing
    /// arrived meanwhile). On false the caller drains again instead of sleeping.
    pub fn park(&self) -> bool {
        let s = &self.signals[self.id.0];
        s.parked.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.has_inbound() {
            s.parked.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 4096;

    fn interest(core: usize, f: &str) -> XMsg {
        XMsg::Control(Control::Interest { core: CoreId(core), filter: f.into(), add: true })
    }

    #[test]
    fn mesh_delivers_in_order_per_pair() {
        let mut m = build_mesh(3, CAP);
        let (a, rest) = m.split_at_mut(1);
        let a = &mut a[0];
        for i in 0..10 {
            a.stage(CoreId(1), interest(i, "x"));
            a.stage(CoreId(2), interest(100 + i, "y"));
        }
        assert!(a.flush());
        let mut out = Vec::new();
        assert_eq!(rest[0].drain(1000, &mut out), 10);
        let cores: Vec<usize> = out
            .iter()
            .map(|m| match m {
                XMsg::Control(Control::Interest { core, .. }) => core.index(),
                _ => usize::MAX,
            })
            .collect();
        assert_eq!(cores, (0..10).collect::<Vec<_>>());
        out.clear();
        assert_eq!(rest[1].drain(1000, &mut out), 10);
        assert!(!rest[1].has_inbound());
    }

    #[test]
    fn full_ring_keeps_messages_staged_and_blocks() {
        let mut m = build_mesh(2, CAP);
        let (a, b) = m.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut b[0]);
        for i in 0..CAP + 5 {
            a.stage(CoreId(1), interest(i, "f"));
        }
        assert!(!a.flush());
        assert!(a.is_blocked());
        assert!(a.my_signal().blocked.load(Ordering::SeqCst));
        let mut out = Vec::new();
        assert_eq!(b.drain(usize::MAX, &mut out), CAP);
        // the consumer cleared the producer's blocked flag when it made room
        assert!(!a.my_signal().blocked.load(Ordering::SeqCst));
        assert!(a.flush());
        assert!(!a.is_blocked());
        out.clear();
        assert_eq!(b.drain(usize::MAX, &mut out), 5);
        match &out[4] {
            XMsg::Control(Control::Interest { core, .. }) => assert_eq!(core.index(), CAP + 4),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn conn_limits_count_and_release() {
        let l = ConnLimits::new(3, &[0, 1]);
        let a = l.acquire(0);
        let b = l.acquire(1);
        let c = l.acquire(1);
        assert!(a.granted() && b.granted());
        assert!(!c.granted(), "listener 1 allows one connection");
        let d = l.acquire(0);
        assert!(!d.granted(), "four connections exceed the global three");
        assert_eq!(l.current(), 4);
        drop((b, c, d));
        assert_eq!(l.current(), 1);
        assert!(l.acquire(1).granted(), "released places are reusable");
        drop(a);
        assert_eq!(l.current(), 0);
    }

    #[test]
    fn wake_only_when_parked() {
        let mut m = build_mesh(2, CAP);
        let (a, b) = m.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut b[0]);
        assert!(b.park());
        a.stage(CoreId(1), interest(0, "x"));
        a.flush();
        a.wake_peers();
        assert!(!b.my_signal().parked.load(Ordering::SeqCst), "producer swapped parked off");
        // nothing staged: no wake attempted, parked stays as the consumer left it
        assert!(!b.park(), "a message is waiting, so parking must be refused");
    }
}
