//! One client's session state and its QoS 1/2 state machines. Pure code: no I/O, no clock reads.
//!
//! The session decides *what* to send (which packet id, whether DUP is set, what waits in the queue);
//! the core decides *where* (the connection's outbox) and the writer task encodes and writes it.
//!
//! Architecture invariant: a `Session` is owned by exactly one core (the home core of its client id) and
//! is never shared or sent across threads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use crate::protocol::{Ack, Packet, QoS, Utf8Bytes};

/// The subscription identifiers (v5) a delivery carries: one per matching subscription that has one.
pub type SubIds = SmallVec<[u32; 1]>;

/// What a session keeps per subscription (and the core's index per filter and session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubOpts {
    /// The granted (maximum) QoS.
    pub qos: QoS,
    /// v5 No Local: the client's own messages are not delivered through this subscription.
    pub no_local: bool,
    /// v5 Retain As Published: live deliveries keep the publisher's retain flag.
    pub retain_as_published: bool,
    /// v5 Subscription Identifier; 0 = none.
    pub id: u32,
}

impl SubOpts {
    /// A 3.1.1 subscription at `qos`.
    pub fn qos(qos: QoS) -> SubOpts {
        SubOpts { qos, no_local: false, retain_as_published: false, id: 0 }
    }
}

/// The v5 properties of a message that travel with it: shared by every copy of the message (one
/// allocation per message, never per subscriber).
#[derive(Debug)]
pub struct MsgProps {
    /// Properties forwarded unchanged (payload format indicator, content type, response topic, correlation
    /// data, user properties in their order), encoded once as a property block body (no length prefix).
    pub forward: Bytes,
    /// When the message expires (v5 Message Expiry Interval counted from its arrival): it is not delivered
    /// after that, and each delivery carries the interval that remains.
    pub expires: Option<Instant>,
}

/// An application message as it travels through the broker. Cloning bumps reference counts: the payload
/// is never copied per subscriber.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: Utf8Bytes,
    pub payload: Bytes,
    /// The QoS the publisher used; each delivery uses min(this, granted).
    pub qos: QoS,
    /// The publisher's retain flag (what is stored as retained); live deliveries always send retain=0.
    pub retain: bool,
    /// When the PUBLISH was read from the publisher's socket: the start of in-broker latency.
    pub received: Instant,
    /// v5 properties; `None` for a message without any (every 3.1.1 message).
    pub props: Option<Arc<MsgProps>>,
}

impl Message {
    /// The same message with its topic and payload in allocations of their own. A message read from the
    /// network shares its read buffer (up to 64 KiB) with every packet of that read; one that will wait
    /// in a queue or in the retained store is compacted once so that it does not pin that buffer.
    pub fn compacted(&self) -> Message {
        Message {
            topic: Utf8Bytes::copy_from_str(self.topic.as_str()),
            payload: Bytes::copy_from_slice(&self.payload),
            ..self.clone()
        }
    }

    /// Whether the message's expiry interval has passed at `now` (never, without one).
    pub fn expired(&self, now: Instant) -> bool {
        self.props.as_ref().and_then(|p| p.expires).is_some_and(|e| now >= e)
    }

    fn expires(&self) -> bool {
        self.props.as_ref().is_some_and(|p| p.expires.is_some())
    }
}

/// One item of a connection's outbox, encoded by the writer task at flush time.
#[derive(Debug)]
pub enum OutFrame {
    /// A complete QoS 0 PUBLISH encoded once per message and shared by every QoS 0 subscriber of it.
    Shared { frame: Bytes, received: Instant },
    /// A PUBLISH whose head (packet id, flags) is per subscriber; the payload `Bytes` is still shared.
    Publish { msg: Message, qos: QoS, pkid: u16, dup: bool, retain: bool, sub_ids: SubIds },
    /// Any other packet the broker sends (acks, CONNACK, SUBACK, PINGRESP …).
    Control(Packet),
}

/// The queue of frames waiting for the connection's writer.
pub type Outbox = VecDeque<OutFrame>;

/// Per-session limits, from config.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Outbound QoS 1/2 messages sent but not yet completed (mosquitto's `max_inflight_messages`).
    pub max_inflight: u16,
    /// Messages waiting beyond the in-flight window or while offline.
    pub max_queued_messages: usize,
    /// Payload bytes waiting beyond the in-flight window or while offline.
    pub max_queued_bytes: usize,
    /// Room beyond `max_queued_messages` / `max_queued_bytes` for an *online* session whose publishers
    /// are paused once it is full ([`Session::congested`]): messages already past that check (in the
    /// cross-core rings) still arrive and must not be lost. 0 under the drop policy. Past this room an
    /// online session still takes what arrives ([`Session::overfull`]): its core then stops taking
    /// messages from other cores until it drains, which pauses their publishers through the rings.
    pub overflow_messages: usize,
    pub overflow_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // the names follow the packet each stage waits for
enum Stage {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP. The payload is no longer needed.
    AwaitPubComp,
}

#[derive(Debug)]
struct Inflight {
    /// The message's number in this session (see [`Change`]).
    seq: u64,
    pkid: u16,
    stage: Stage,
    qos: QoS,
    retain: bool,
    /// `None` once PUBREC arrived: from then on only the packet id matters.
    msg: Option<Message>,
    sub_ids: SubIds,
}

#[derive(Debug)]
struct Queued {
    seq: u64,
    msg: Message,
    qos: QoS,
    retain: bool,
    /// A retained message sent because of a new subscription, queued past the limits (see
    /// [`Session::deliver_backlog`]).
    backlog: bool,
    sub_ids: SubIds,
}

/// One change of a session's message state, for persistence: a journal of these, replayed in order onto an
/// empty session with [`Session::apply`], rebuilds its queue, in-flight window (packet ids, QoS 2 stages,
/// resend order) and inbound QoS 2 ids exactly. Messages are numbered per session (`seq`) so that later
/// changes can name them. QoS 0 messages sent at once are never journaled.
#[derive(Clone, Debug)]
pub enum Change {
    /// A message joined the back of the queue.
    Enqueued { seq: u64, msg: Message, qos: QoS, retain: bool, sub_ids: SubIds },
    /// Queued message `seq` was sent with `pkid` and now waits for its acknowledgement (0: QoS 0, gone).
    Sent { seq: u64, pkid: u16 },
    /// PUBREC for `pkid`: only the packet id is kept, awaiting PUBCOMP.
    Released { pkid: u16 },
    /// The flow of `pkid` is complete (PUBACK, PUBCOMP, or a refusing PUBREC).
    Completed { pkid: u16 },
    /// Queued message `seq` expired before it was sent.
    Dropped { seq: u64 },
    /// An inbound QoS 2 packet id now awaits PUBREL.
    InboundAdd { pkid: u16 },
    /// PUBREL for an inbound QoS 2 packet id.
    InboundDone { pkid: u16 },
}

/// What became of a message handed to [`Session::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Put in the outbox now.
    Sent,
    /// Waiting in the session queue (window full, or the client is offline).
    Queued,
    /// The queue was full: dropped (newest-dropped policy, like mosquitto) and counted.
    Dropped,
}

/// Inbound QoS 2 packet ids awaiting PUBREL. Boxed and created on first use: most sessions never have
/// one, and every session (one per idle connection too) would otherwise carry an empty set's 48 bytes.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // 8 bytes in every session instead of an empty set's 48
struct InboundIds(Option<Box<HashSet<u16>>>);

impl InboundIds {
    fn insert(&mut self, pkid: u16) -> bool {
        self.0.get_or_insert_with(Box::default).insert(pkid)
    }

    fn remove(&mut self, pkid: &u16) -> bool {
        self.0.as_mut().is_some_and(|s| s.remove(pkid))
    }

    fn contains(&self, pkid: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(pkid))
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(|s| s.iter().copied())
    }
}

/// A client's session: subscriptions, outbound QoS 1/2 flows, the queue behind them, and inbound QoS 2
/// packet ids awaiting PUBREL.
#[derive(Debug)]
pub struct Session {
    pub client_id: Utf8Bytes,
    /// Clean session (3.1.1): the session ends with the connection.
    pub clean: bool,
    /// Filter -> options; mirrored in the core's subscription index.
    pub subscriptions: HashMap<Box<str>, SubOpts>,
    limits: Limits,
    /// Flows awaiting PUBACK/PUBREC in send order; a flow moves to the back when its first PUBREC
    /// arrives, so flows awaiting PUBCOMP are in PUBREC order (the resend orders of MQTT-4.6.0-1 and
    /// -4). The window is small (20 by default) and acks usually come in order, so a linear search
    /// finds the packet id quickly.
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids whose PUBLISH was routed and whose PUBREL has not arrived: a resent
    /// PUBLISH with one of these ids is acknowledged but not routed again (exactly once). At most 65,535.
    inbound_qos2: InboundIds,
    /// Messages dropped because the queue was full, over the session's life.
    pub dropped: u64,
    /// Queued messages that have an expiry: [`Session::expire`] has nothing to do while it is 0.
    expiring: u32,
    /// Queued messages (and their payload bytes) that came with a new subscription's retained messages
    /// ([`Session::deliver_backlog`]): the limits for the messages that follow them do not count them.
    backlog: u32,
    backlog_bytes: usize,
    /// The number of the next message handed to the session.
    next_seq: u64,
    /// Changes since the journal was last drained; `None` unless persistence asked for it.
    /// Boxed: 8 bytes in every session instead of 24, and only persisted sessions have one.
    #[allow(clippy::box_collection)]
    journal: Option<Box<Vec<Change>>>,
}

impl Session {
    pub fn new(client_id: Utf8Bytes, clean: bool, limits: Limits) -> Session {
        Session {
            client_id,
            clean,
            subscriptions: HashMap::new(),
            limits,
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_pkid: 1,
            inbound_qos2: InboundIds::default(),
            dropped: 0,
            expiring: 0,
            backlog: 0,
            backlog_bytes: 0,
            next_seq: 0,
            journal: None,
        }
    }

    /// Starts recording [`Change`]s (persistence is on and the session outlives its connection).
    pub fn enable_journal(&mut self) {
        self.journal.get_or_insert_with(Box::default);
    }

    /// Moves the changes recorded since the last call to `out`.
    pub fn drain_journal(&mut self, out: &mut Vec<Change>) {
        if let Some(j) = &mut self.journal {
            out.append(j);
        }
    }

    fn record(&mut self, c: impl FnOnce() -> Change) {
        if let Some(j) = &mut self.journal {
            j.push(c());
        }
    }

    /// Replays one journaled change (recovery). Changes that name nothing that exists are ignored: a
    /// journal cut short by a crash stays usable.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Enqueued { seq, msg, qos, retain, sub_ids } => {
                self.next_seq = self.next_seq.max(seq + 1);
                self.queued_bytes += msg.payload.len();
                if msg.expires() {
                    self.expiring += 1;
                }
                self.queue.push_back(Queued { seq, msg, qos, retain, backlog: false, sub_ids });
            }
            Change::Sent { seq, pkid } => {
                let Some(i) = self.queue.iter().position(|q| q.seq == seq) else { return };
                let Some(q) = self.queue.remove(i) else { return };
                self.left_queue(&q);
                if pkid != 0 {
                    let stage =
                        if q.qos == QoS::AtLeastOnce { Stage::AwaitPubAck } else { Stage::AwaitPubRec };
                    self.next_pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                    self.inflight.push_back(Inflight {
                        seq,
                        pkid,
                        stage,
                        qos: q.qos,
                        retain: q.retain,
                        msg: Some(q.msg),
                        sub_ids: q.sub_ids,
                    });
                }
            }
            Change::Released { pkid } => {
                if let Some(i) = self.position(pkid, Stage::AwaitPubRec) {
                    if let Some(mut f) = self.inflight.remove(i) {
                        f.stage = Stage::AwaitPubComp;
                        f.msg = None;
                        self.inflight.push_back(f);
                    }
                }
            }
            Change::Completed { pkid } => {
                if let Some(i) = self.inflight.iter().position(|f| f.pkid == pkid) {
                    self.inflight.remove(i);
                }
            }
            Change::Dropped { seq } => {
                if let Some(i) = self.queue.iter().position(|q| q.seq == seq) {
                    if let Some(q) = self.queue.remove(i) {
                        self.left_queue(&q);
                    }
                }
            }
            Change::InboundAdd { pkid } => {
                self.inbound_qos2.insert(pkid);
            }
            Change::InboundDone { pkid } => {
                self.inbound_qos2.remove(&pkid);
            }
        }
    }

    /// The changes that rebuild this session's current message state from an empty one (compaction).
    /// A flow awaiting PUBCOMP no longer has its message: it is rebuilt around an empty placeholder
    /// (stamped `now`).
    pub fn snapshot(&self, now: Instant, out: &mut Vec<Change>) {
        for f in &self.inflight {
            let msg = match &f.msg {
                Some(m) => m.clone(),
                None => Message {
                    topic: Utf8Bytes::default(),
                    payload: Bytes::new(),
                    qos: f.qos,
                    retain: false,
                    received: now,
                    props: None,
                },
            };
            out.push(Change::Enqueued {
                seq: f.seq,
                msg,
                qos: f.qos,
                retain: f.retain,
                sub_ids: f.sub_ids.clone(),
            });
            out.push(Change::Sent { seq: f.seq, pkid: f.pkid });
            if f.stage == Stage::AwaitPubComp {
                out.push(Change::Released { pkid: f.pkid });
            }
        }
        for q in &self.queue {
            out.push(Change::Enqueued {
                seq: q.seq,
                msg: q.msg.clone(),
                qos: q.qos,
                retain: q.retain,
                sub_ids: q.sub_ids.clone(),
            });
        }
        for pkid in self.inbound_qos2.iter() {
            out.push(Change::InboundAdd { pkid });
        }
    }

    /// Hands a message to the session at `qos` (already min(publish, granted)). `out` is the connection's
    /// outbox when the client is connected, `None` while it is offline.
    pub fn deliver(&mut self, msg: Message, qos: QoS, retain: bool, out: Option<&mut Outbox>) -> Delivered {
        self.deliver_with(msg, qos, retain, SubIds::new(), out)
    }

    /// [`Session::deliver`] with the subscription identifiers (v5) the delivery carries.
    pub fn deliver_with(
        &mut self,
        msg: Message,
        qos: QoS,
        retain: bool,
        sub_ids: SubIds,
        out: Option<&mut Outbox>,
    ) -> Delivered {
        self.hand(Queued { seq: 0, msg, qos, retain, backlog: false, sub_ids }, out)
    }

    /// A retained message for a subscription just made, to the online client: queued even past the
    /// limits, which the messages after it are then measured without. A subscription to `#` may match
    /// more retained messages than any queue limit; dropping them, or letting them take the room the
    /// live messages already on their way need, would lose acknowledged messages. They cost no payload
    /// memory (the retained store's payloads are shared), and the full queue pauses publishers as usual.
    pub fn deliver_backlog(
        &mut self,
        msg: Message,
        qos: QoS,
        sub_ids: SubIds,
        out: &mut Outbox,
    ) -> Delivered {
        self.hand(Queued { seq: 0, msg, qos, retain: true, backlog: true, sub_ids }, Some(out))
    }

    fn hand(&mut self, mut q: Queued, out: Option<&mut Outbox>) -> Delivered {
        q.seq = self.next_seq;
        self.next_seq += 1;
        match out {
            Some(out) if self.queue.is_empty() && self.window_open(q.qos) => {
                let Queued { seq, msg, qos, retain, sub_ids, .. } = q;
                if qos != QoS::AtMostOnce {
                    self.record(|| Change::Enqueued {
                        seq,
                        msg: msg.clone(),
                        qos,
                        retain,
                        sub_ids: sub_ids.clone(),
                    });
                }
                self.send(seq, msg, qos, retain, sub_ids, out);
                Delivered::Sent
            }
            out => self.enqueue(q, out.is_some()),
        }
    }

    /// Sets the outbound window: the client's v5 Receive Maximum caps the configured one (MQTT-3.3.4-9).
    /// Flows already in flight stay; new ones wait until the window has room.
    pub fn set_max_inflight(&mut self, n: u16) {
        self.limits.max_inflight = n.max(1);
    }

    /// Drops queued messages whose expiry interval has passed (v5: an expired message is never sent).
    /// Cheap when no queued message has an expiry.
    pub fn expire(&mut self, now: Instant) {
        if self.expiring == 0 {
            return;
        }
        // One pass, with the bookkeeping of `left_queue` summed: this runs on every acknowledgement while
        // some queued message has an expiry.
        let (mut gone, mut bytes, mut backlog, mut backlog_bytes) = (0, 0, 0, 0);
        let journal = &mut self.journal;
        self.queue.retain(|q| {
            if !q.msg.expired(now) {
                return true;
            }
            gone += 1;
            bytes += q.msg.payload.len();
            if q.backlog {
                backlog += 1;
                backlog_bytes += q.msg.payload.len();
            }
            if let Some(j) = journal {
                j.push(Change::Dropped { seq: q.seq });
            }
            false
        });
        self.queued_bytes -= bytes;
        self.expiring -= gone;
        self.backlog -= backlog;
        self.backlog_bytes -= backlog_bytes;
    }

    /// Bookkeeping for a message that left the queue.
    fn left_queue(&mut self, q: &Queued) {
        self.queued_bytes -= q.msg.payload.len();
        if q.msg.expires() {
            self.expiring -= 1;
        }
        if q.backlog {
            self.backlog -= 1;
            self.backlog_bytes -= q.msg.payload.len();
        }
    }

    /// The queue is full: under the pause policy, publishers of messages for this session must wait
    /// before they are acknowledged.
    pub fn congested(&self) -> bool {
        self.queue.len() >= self.limits.max_queued_messages
            || self.queued_bytes >= self.limits.max_queued_bytes
    }

    /// Pause policy: the queue holds more than its limits plus the overflow room (messages that were in
    /// transit longer than the room allows): the core must stop taking messages from other cores until
    /// it is back within them.
    pub fn overfull(&self) -> bool {
        self.limits.overflow_messages > 0
            && (self.queue.len() - self.backlog as usize
                > self.limits.max_queued_messages.saturating_add(self.limits.overflow_messages)
                || self.queued_bytes - self.backlog_bytes
                    > self.limits.max_queued_bytes.saturating_add(self.limits.overflow_bytes))
    }

    /// The queue has drained to half its limits: paused publishers may go on. The gap between this and
    /// [`Session::congested`] keeps a session near its limit from pausing and releasing at every message.
    pub fn relieved(&self) -> bool {
        self.queue.len() <= self.limits.max_queued_messages / 2
            && self.queued_bytes <= self.limits.max_queued_bytes / 2
    }

    /// Whether [`Session::deliver`] would queue a message of `qos` rather than send it now.
    pub fn would_queue(&self, qos: QoS, online: bool) -> bool {
        !online || !self.queue.is_empty() || !self.window_open(qos)
    }

    fn window_open(&self, qos: QoS) -> bool {
        qos == QoS::AtMostOnce || self.inflight.len() < usize::from(self.limits.max_inflight)
    }

    fn enqueue(&mut self, q: Queued, online: bool) -> Delivered {
        let len = q.msg.payload.len();
        let (extra_msgs, extra_bytes) =
            if online { (self.limits.overflow_messages, self.limits.overflow_bytes) } else { (0, 0) };
        let queued = self.queue.len() - self.backlog as usize;
        let bytes = self.queued_bytes - self.backlog_bytes;
        // Under the pause policy (overflow room > 0) an online session drops nothing: what arrives
        // was acknowledged to its publisher already.
        let pause = online && extra_msgs > 0;
        if !q.backlog
            && !pause
            && (queued >= self.limits.max_queued_messages.saturating_add(extra_msgs)
                || bytes.saturating_add(len) > self.limits.max_queued_bytes.saturating_add(extra_bytes))
        {
            self.dropped += 1;
            return Delivered::Dropped;
        }
        self.queued_bytes += len;
        if q.msg.expires() {
            self.expiring += 1;
        }
        if q.backlog {
            self.backlog += 1;
            self.backlog_bytes += len;
        }
        self.record(|| Change::Enqueued {
            seq: q.seq,
            msg: q.msg.clone(),
            qos: q.qos,
            retain: q.retain,
            sub_ids: q.sub_ids.clone(),
        });
        self.queue.push_back(q);
        Delivered::Queued
    }

    fn send(&mut self, seq: u64, msg: Message, qos: QoS, retain: bool, sub_ids: SubIds, out: &mut Outbox) {
        if qos == QoS::AtMostOnce {
            out.push_back(OutFrame::Publish { msg, qos, pkid: 0, dup: false, retain, sub_ids });
            return;
        }
        let pkid = self.alloc_pkid();
        self.record(|| Change::Sent { seq, pkid });
        let stage = if qos == QoS::AtLeastOnce { Stage::AwaitPubAck } else { Stage::AwaitPubRec };
        out.push_back(OutFrame::Publish {
            msg: msg.clone(),
            qos,
            pkid,
            dup: false,
            retain,
            sub_ids: sub_ids.clone(),
        });
        self.inflight.push_back(Inflight { seq, pkid, stage, qos, retain, msg: Some(msg), sub_ids });
    }

    /// The next packet id not in flight. The window is capped at 65,535 (config validates
    /// `max_inflight` ≤ 65,535), so there is always one free when the window is open.
    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    /// Moves queued messages into the window while it has room.
    fn pump(&mut self, out: &mut Outbox) {
        while let Some(front) = self.queue.front() {
            if !self.window_open(front.qos) {
                break;
            }
            let Some(q) = self.queue.pop_front() else { break };
            self.left_queue(&q);
            if q.qos == QoS::AtMostOnce {
                self.record(|| Change::Sent { seq: q.seq, pkid: 0 });
            }
            self.send(q.seq, q.msg, q.qos, q.retain, q.sub_ids, out);
        }
    }

    fn position(&self, pkid: u16, stage: Stage) -> Option<usize> {
        self.inflight.iter().position(|f| f.pkid == pkid && f.stage == stage)
    }

    /// PUBACK from the client. An unknown packet id is ignored (3.1.1 names no answer; mosquitto ignores it).
    pub fn on_puback(&mut self, pkid: u16, out: &mut Outbox) {
        if let Some(i) = self.position(pkid, Stage::AwaitPubAck) {
            self.inflight.remove(i);
            self.record(|| Change::Completed { pkid });
            self.pump(out);
        }
    }

    /// PUBREC from the client: answer PUBREL and keep only the packet id.
    pub fn on_pubrec(&mut self, pkid: u16, out: &mut Outbox) {
        if let Some(i) = self.position(pkid, Stage::AwaitPubRec) {
            // To the back: a resume must resend PUBRELs in the order the PUBRECs came (MQTT-4.6.0-4),
            // which can differ from send order. The other flows keep their relative order.
            if let Some(mut f) = self.inflight.remove(i) {
                f.stage = Stage::AwaitPubComp;
                f.msg = None;
                self.inflight.push_back(f);
            }
            self.record(|| Change::Released { pkid });
            out.push_back(OutFrame::Control(Packet::PubRel(Ack::ok(pkid))));
        } else if self.position(pkid, Stage::AwaitPubComp).is_some() {
            // A PUBREC resent after our PUBREL got lost in a reconnect: PUBREL again.
            out.push_back(OutFrame::Control(Packet::PubRel(Ack::ok(pkid))));
        }
    }

    /// v5 PUBREC with a failure reason code (>= 0x80): the client refused the message and the QoS 2 flow
    /// ends there, without PUBREL (MQTT-4.3.3); the window moves on.
    pub fn on_pubrec_refused(&mut self, pkid: u16, out: &mut Outbox) {
        if let Some(i) = self.position(pkid, Stage::AwaitPubRec) {
            self.inflight.remove(i);
            self.record(|| Change::Completed { pkid });
            self.pump(out);
        }
    }

    /// PUBCOMP from the client: the QoS 2 flow is complete.
    pub fn on_pubcomp(&mut self, pkid: u16, out: &mut Outbox) {
        if let Some(i) = self.position(pkid, Stage::AwaitPubComp) {
            self.inflight.remove(i);
            self.record(|| Change::Completed { pkid });
            self.pump(out);
        }
    }

    /// An inbound QoS 2 PUBLISH: answers PUBREC and returns whether it must be routed (false for a
    /// resend of a packet id still awaiting PUBREL: exactly once).
    pub fn on_inbound_qos2(&mut self, pkid: u16, out: &mut Outbox) -> bool {
        self.on_inbound_qos2_reason(pkid, 0, out)
    }

    /// [`Session::on_inbound_qos2`] answering PUBREC with a v5 reason code: a success code (< 0x80, e.g.
    /// 0x10 no matching subscribers) remembers the packet id as usual; a refusal (0x87 not authorized)
    /// ends the flow at once, so the id is not kept and nothing is routed.
    pub fn on_inbound_qos2_reason(&mut self, pkid: u16, reason: u8, out: &mut Outbox) -> bool {
        out.push_back(OutFrame::Control(Packet::PubRec(Ack { pkid, reason })));
        let new = reason < 0x80 && self.inbound_qos2.insert(pkid);
        if new {
            self.record(|| Change::InboundAdd { pkid });
        }
        new
    }

    /// Whether an inbound QoS 2 packet id is awaiting PUBREL (a resend of it is not a new message).
    pub fn has_inbound_qos2(&self, pkid: u16) -> bool {
        self.inbound_qos2.contains(&pkid)
    }

    /// Inbound QoS 2 flows not yet completed: they count against the broker's v5 Receive Maximum.
    pub fn inbound_qos2_len(&self) -> usize {
        self.inbound_qos2.len()
    }

    /// PUBREL from the client: forget the packet id and answer PUBCOMP (also for an unknown id, so that a
    /// client retrying after a reconnect can finish its flow).
    pub fn on_pubrel(&mut self, pkid: u16, out: &mut Outbox) {
        // v5 names the unknown id in the answer (0x92); 3.1.1 has no reason code and it is not written.
        let known = self.inbound_qos2.remove(&pkid);
        if known {
            self.record(|| Change::InboundDone { pkid });
        }
        let reason = if known { 0 } else { crate::protocol::reason::PACKET_IDENTIFIER_NOT_FOUND };
        out.push_back(OutFrame::Control(Packet::PubComp(Ack { pkid, reason })));
    }

    /// The client reconnected to this session: resend what is in flight (PUBLISH with DUP, or PUBREL where
    /// PUBREC already came), PUBLISHes in send order and PUBRELs in PUBREC order, then fill the window
    /// from the queue.
    pub fn resume(&mut self, out: &mut Outbox) {
        for f in &self.inflight {
            match (&f.msg, f.stage) {
                (_, Stage::AwaitPubComp) | (None, _) => {
                    out.push_back(OutFrame::Control(Packet::PubRel(Ack::ok(f.pkid))))
                }
                (Some(m), _) => out.push_back(OutFrame::Publish {
                    msg: m.clone(),
                    qos: f.qos,
                    pkid: f.pkid,
                    dup: true,
                    retain: f.retain,
                    sub_ids: f.sub_ids.clone(),
                }),
            }
        }
        self.pump(out);
    }

    /// Ends the session's outbound flows and hands back every message it has not delivered for sure:
    /// those in flight whose receipt the client has not acknowledged (no PUBACK, no PUBREC), in send
    /// order, then the queue. A shared subscription's messages go on to another member this way when a
    /// member's session ends (MQTT 5.0 §4.8.2).
    pub fn take_undelivered(&mut self) -> impl Iterator<Item = Message> + '_ {
        self.queued_bytes = 0;
        self.expiring = 0;
        self.backlog = 0;
        self.backlog_bytes = 0;
        let inflight = self.inflight.drain(..).filter_map(|f| f.msg);
        inflight.chain(self.queue.drain(..).map(|q| q.msg))
    }

    /// Outbound QoS 1/2 messages sent and not yet completed.
    pub fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod journal_tests;
