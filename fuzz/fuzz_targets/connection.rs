//! Fuzz target `connection`: whole client connections, without sockets, against one or two cores.
//!
//! The harness plays the part of `server::conn` (`serve_new`, `serve_handoff`, the reader and the
//! writer) for two or three simulated clients, calling the same plain functions they call: a new
//! connection's bytes go through `server::admit` (`read_connect`, then `admit`), later ones through
//! `server::inbox::decode_batch` to `Core::handle`, and every frame the core queues for a client is
//! encoded by `server::outbox::encode_outbox` (with the connection's topic aliases) and decoded back as
//! the client would read it. Only the sockets, the tasks and the hand-off's transport are simulated.
//! So arbitrary client input, including two clients taking over each other's session, subscriptions,
//! retained messages, wills and keep-alive expiry, must never panic the core and must never make it
//! send something a client cannot decode.
//!
//! Input layout (all of it is optional: a short input just ends early):
//! - byte 0, the setup: bit 0: 2 or 3 clients; bit 1: 1 or 2 cores; bits 2–3: `max_packet_size`;
//!   bit 4: `queue_qos0_messages`; bits 5–6: the session limits (variant 2 also has an ACL); bit 7: the `slow_subscriber` policy (pause or drop).
//! - then chunks, each `[op, len, len bytes…]` (the last one may be short): `len` bytes that client
//!   `op & 3` sends in one read. `op` bit 2: that client's TCP connection drops first (no DISCONNECT,
//!   so its will fires); bits 3–4: the clock jumps forward (0, 1 s, 20 s, 20 min) and the keep-alive
//!   sweep runs; bit 5: with two cores, a new connection of this client is accepted by core 1 (and
//!   handed to its home core after CONNECT, as the server does). Bytes for a client whose connection
//!   is closed open a new connection. Bits 6–7 of `op` are unused.

#![no_main]

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use coremq::auth::acl::Acl;
use coremq::core::{home_core, ConnCtl, ConnKey, Core, Flow, Settings, SlowSubscriber};
use coremq::protocol::{decode, encode, frame_len, Packet, ProtocolVersion, QoS, Utf8Bytes};
use coremq::server::admit::{admit, read_connect, FirstPacket, Hello, Login, Refusal};
use coremq::server::inbox::decode_batch;
use coremq::server::outbox::{self, encode_outbox, record_sent, OutState};
use coremq::session::{Limits, Message, OutFrame, SubIds};
use coremq::topic::valid_topic_name;
use coremq::xcore::build_mesh;
use libfuzzer_sys::fuzz_target;

/// Slots per ring between the two cores: small, so that a burst fills a ring and exercises staging.
const RING_CAPACITY: usize = 64;
const MAX_PACKET_SIZES: [usize; 4] = [128, 512, 4096, 1 << 20];
const CLOCK_STEPS: [Duration; 4] =
    [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(20), Duration::from_secs(1200)];
/// Bound on the rounds of cross-core draining after one chunk. Each round moves up to DRAIN_BATCH
/// messages per ring, far more than one chunk of at most 255 bytes can cause.
const MAX_PUMP_ROUNDS: usize = 32;
/// Outbound frames are decoded the way a client would: without a size limit of its own.
const CLIENT_MAX_PACKET: usize = usize::MAX;

/// `COREMQ_FUZZ_TRACE=1` prints what each client sends and receives: for reading a crash artifact
/// (`fuzz/target/x86_64-unknown-linux-gnu/release/connection ARTIFACT`), not for fuzzing.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("COREMQ_FUZZ_TRACE").is_some())
}

macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing() {
            eprintln!($($arg)*);
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&setup, mut rest)) = data.split_first() else { return };
    let mut h = Harness::new(setup);
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (bytes, after) = tail.split_at(n);
        h.chunk(*op, bytes);
        rest = after;
    }
    h.finish();
});

/// Where one simulated client's connection stands.
enum Phase {
    /// No connection: bytes for this client open one.
    Closed,
    /// Connected to core `core`, which registered it as `key`; CONNECT not yet read.
    Handshake { core: usize, key: ConnKey, ctl: Rc<ConnCtl> },
    /// CONNECT accepted by the home core `core`.
    Established { core: usize, key: ConnKey, ctl: Rc<ConnCtl>, version: ProtocolVersion },
}

struct Client {
    phase: Phase,
    /// The connection's read buffer: bytes received and not yet decoded.
    buf: BytesMut,
    /// Both ends of the connection's outgoing side.
    writer: Writer,
}

impl Client {
    fn closed() -> Client {
        Client { phase: Phase::Closed, buf: BytesMut::new(), writer: Writer::new(ProtocolVersion::V3_1_1, 0) }
    }
}

/// The broker's writer state of one connection and what its client knows of it.
struct Writer {
    /// The writer's state: its layout and the topic aliases it assigned.
    out: OutState,
    version: ProtocolVersion,
    /// The Topic Alias Maximum the client announced.
    alias_max: u16,
    /// The client's side of the topic aliases: alias -> topic, as the PUBLISHes it read set them.
    aliases: HashMap<u16, Utf8Bytes>,
}

impl Writer {
    fn new(version: ProtocolVersion, alias_max: u16) -> Writer {
        Writer { out: OutState::new(version, alias_max), version, alias_max, aliases: HashMap::new() }
    }
}

/// What the client must read for one outbox frame, noted before the writer encodes it.
enum Expect {
    /// A shared QoS 0 PUBLISH frame of this many bytes.
    Shared(usize),
    Publish {
        msg: Message,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
        sub_ids: SubIds,
    },
    Control,
}

impl Expect {
    fn of(frame: &OutFrame) -> Expect {
        match frame {
            OutFrame::Shared { frame, .. } => Expect::Shared(frame.len()),
            OutFrame::Publish { msg, qos, pkid, dup, retain, sub_ids } => Expect::Publish {
                msg: msg.clone(),
                qos: *qos,
                pkid: *pkid,
                dup: *dup,
                retain: *retain,
                sub_ids: sub_ids.clone(),
            },
            OutFrame::Control(_) => Expect::Control,
        }
    }
}

struct Harness {
    cores: Vec<Core>,
    clients: Vec<Client>,
    max_packet: usize,
    /// The simulated clock: real time at the start plus the jumps the input asked for, so that keep-alive
    /// expiry is reachable without sleeping.
    now: Instant,
}

impl Harness {
    fn new(setup: u8) -> Harness {
        let clients = 2 + usize::from(setup & 1);
        let n_cores = 1 + usize::from((setup >> 1) & 1);
        let max_packet = MAX_PACKET_SIZES[usize::from((setup >> 2) & 3)];
        // Bit 7: the pause policy (publishers held while a subscriber's queue is full) or drop.
        let pause = setup & 0x80 != 0;
        let (max_inflight, max_queued_messages, max_queued_bytes) = match (setup >> 5) & 3 {
            // Tiny: one message in flight, one queued, a few bytes; every bound is hit at once.
            0 => (1, 1, 8),
            1 => (2, 0, 0),
            2 => (3, 4, 64),
            _ => (u16::MAX, 8, 1 << 20),
        };
        let limits = Limits {
            max_inflight,
            max_queued_messages,
            max_queued_bytes,
            overflow_messages: if pause { max_queued_messages + RING_CAPACITY } else { 0 },
            overflow_bytes: if pause { max_queued_bytes } else { 0 },
        };
        let settings = Settings {
            limits,
            max_packet_size: max_packet,
            connect_timeout: Duration::from_secs(10),
            queue_qos0_messages: setup & 0x10 != 0,
            max_outbox_messages: 8,
            // Small, so that the limits are reached, not only checked.
            max_subscriptions_per_client: 4,
            max_topic_levels: 6,
            max_client_id_len: 32,
            max_keepalive: if setup & 0x20 != 0 { 30 } else { u16::MAX },
            max_session_expiry: 3600,
            topic_alias_maximum: 4,
            receive_maximum: 8,
            response_information: Some(coremq::protocol::Utf8Bytes::from_static("replies/")),
            slow_subscriber: if pause { SlowSubscriber::Pause } else { SlowSubscriber::Drop },
            // Reachable through the clock jumps of the input (20 s and 20 min).
            slow_subscriber_timeout: Some(Duration::from_secs(15)),
            // Credentials are checked before a connection reaches the core (not modelled here).
            passwords: None,
            // With the limits of variant 2, an ACL: anonymous clients may do anything but touch a/b,
            // clients with a username only their own c/<client id>/ tree, so that subscribe, publish,
            // delivery and will checks all run, allowed and denied.
            acl: ((setup >> 5) & 3 == 2).then(|| {
                Acl::parse("topic readwrite #\ntopic deny a/b\npattern readwrite c/%c/#\n")
                    .expect("valid ACL")
            }),
        };
        let start = Instant::now();
        let cores = build_mesh(n_cores, RING_CAPACITY)
            .into_iter()
            .enumerate()
            .map(|(id, mesh)| Core::new(id, settings.clone(), mesh, wall(start)))
            .collect();
        Harness { cores, clients: (0..clients).map(|_| Client::closed()).collect(), max_packet, now: start }
    }

    /// One `op` and the bytes one client's read returned.
    fn chunk(&mut self, op: u8, bytes: &[u8]) {
        let slot = usize::from(op & 3) % self.clients.len();
        trace!("client {slot}: op {op:#04x}, {} bytes", bytes.len());
        if op & 0x04 != 0 {
            self.hang_up(slot);
        }
        let step = CLOCK_STEPS[usize::from((op >> 3) & 3)];
        if !step.is_zero() {
            self.now += step;
            for core in &mut self.cores {
                core.sweep(wall(self.now));
                core.end_batch(self.now);
            }
            self.settle();
        }
        if bytes.is_empty() {
            return;
        }
        if matches!(self.clients[slot].phase, Phase::Closed) {
            let core = usize::from((op >> 5) & 1) % self.cores.len();
            let ctl = self.cores[core].new_ctl(None);
            let key = self.cores[core].register(ctl.clone(), self.now);
            self.clients[slot] = Client { phase: Phase::Handshake { core, key, ctl }, ..Client::closed() };
        }
        self.clients[slot].buf.extend_from_slice(bytes);
        self.read(slot);
        self.settle();
    }

    /// The client's connection dropped without DISCONNECT: the reader's `conn_closed(.., false)`.
    fn hang_up(&mut self, slot: usize) {
        if !matches!(self.clients[slot].phase, Phase::Closed) {
            trace!("client {slot}: connection drops");
        }
        match std::mem::replace(&mut self.clients[slot].phase, Phase::Closed) {
            Phase::Closed => {}
            Phase::Handshake { core, key, ctl } => self.cores[core].unregister(key, &ctl),
            Phase::Established { core, key, ctl, .. } => {
                self.cores[core].conn_closed(key, &ctl, false, self.now);
                self.cores[core].end_batch(self.now);
            }
        }
        self.settle();
    }

    /// What the reader task does with newly read bytes.
    fn read(&mut self, slot: usize) {
        if let Phase::Handshake { .. } = self.clients[slot].phase {
            self.handshake(slot);
        }
        let Phase::Established { core, key, ref ctl, version } = self.clients[slot].phase else { return };
        let ctl = ctl.clone();
        let c = &mut self.cores[core];
        c.touch(key, self.now);
        c.drain_inbound(self.now);
        let now = self.now;
        let flow = decode_batch(&mut self.clients[slot].buf, version, self.max_packet, &ctl, |p| {
            trace!("client {slot} -> {p:?}");
            c.handle(key, p, now)
        });
        if let Flow::Close(code, why) = flow {
            c.send_disconnect(key, code, why);
        }
        c.end_batch(self.now);
        let graceful = match flow {
            Flow::Continue if !ctl.is_closing() => return,
            Flow::Disconnect { will } => !will,
            Flow::Continue => false,
            Flow::Close(_, reason) => {
                c.stats.count_closed(reason);
                false
            }
        };
        trace!("client {slot}: reader ends after {flow:?}");
        c.conn_closed(key, &ctl, graceful, self.now);
        c.end_batch(self.now);
        self.clients[slot] = Client::closed();
    }

    /// `serve_new` up to the CONNECT: read it, admit it, hand it to its home core, attach it.
    fn handshake(&mut self, slot: usize) {
        let Phase::Handshake { core, key, ref ctl } = self.clients[slot].phase else { return };
        let ctl = ctl.clone();
        if ctl.is_closing() {
            // The sweeper closed it (connect_timeout) and counted it.
            return self.refuse(slot, None);
        }
        let connect = match read_connect(&mut self.clients[slot].buf, self.max_packet) {
            FirstPacket::More => return,
            FirstPacket::Connect(c) => c,
            FirstPacket::Refuse(r) => return self.refuse(slot, Some(r)),
        };
        // No password file: any client is admitted (the ACL still tells anonymous ones from others).
        let login = Login::Password { allow_anonymous: true };
        let Hello { mut connect, assigned } =
            match admit(&mut self.cores[core], connect, login, true, self.now) {
                Ok(hello) => hello,
                Err(r) => return self.refuse(slot, Some(r)),
            };
        let home = home_core(connect.client_id.as_str(), self.cores.len()).index();
        let (key, ctl) = if home == core {
            (key, ctl)
        } else {
            // The hand-off: a fresh control block on the home core, counted once.
            self.cores[core].unregister(key, &ctl);
            let ctl = self.cores[home].new_ctl(None);
            (self.cores[home].register_handoff(ctl.clone(), self.now), ctl)
        };
        connect.detach();
        let version = connect.protocol;
        let writer = Writer::new(version, outbox::alias_max(&connect));
        trace!("client {slot} -> {connect:?} (core {core}, home {home})");
        self.cores[home].connect(key, *connect, assigned, self.now);
        self.cores[home].end_batch(self.now);
        self.clients[slot].phase = Phase::Established { core: home, key, ctl, version };
        self.clients[slot].writer = writer;
    }

    /// `refuse`: forget the connection and count it; the CONNACK, if any, is written straight to the
    /// socket. `None`: already counted.
    fn refuse(&mut self, slot: usize, r: Option<Refusal>) {
        trace!("client {slot}: refused: {r:?}");
        if let Phase::Handshake { core, key, ctl } =
            std::mem::replace(&mut self.clients[slot].phase, Phase::Closed)
        {
            let c = &mut self.cores[core];
            c.unregister(key, &ctl);
            if let Some(r) = r {
                c.stats.count_refused(r.reason());
            }
        }
        self.clients[slot].buf = BytesMut::new();
        if let Some((version, connack)) = r.and_then(|r| r.connack()) {
            let mut out = BytesMut::new();
            encode(&connack, version, &mut out);
            check_control(out, version);
        }
    }

    /// Lets the cores exchange what they staged until the rings are quiet, then plays every client's
    /// writer: encodes and checks all queued frames, and notices connections the core closed (takeover,
    /// keep-alive), whose readers would now end.
    fn settle(&mut self) {
        for _ in 0..MAX_PUMP_ROUNDS {
            let mut moved = 0;
            for core in &mut self.cores {
                moved += core.drain_inbound(self.now);
                core.end_batch(self.now);
            }
            if moved == 0 && self.cores.iter().all(|c| !c.is_blocked()) {
                break;
            }
        }
        for slot in 0..self.clients.len() {
            let (core, key, ctl) = match &self.clients[slot].phase {
                Phase::Closed => continue,
                Phase::Handshake { core, key, ctl } => (*core, *key, ctl.clone()),
                Phase::Established { core, key, ctl, .. } => (*core, *key, ctl.clone()),
            };
            let expected: Vec<Expect> = ctl.outbox.borrow().iter().map(Expect::of).collect();
            let writer = &mut self.clients[slot].writer;
            let (mut iov, mut stamps) = (Vec::new(), Vec::new());
            encode_outbox(&mut ctl.outbox.borrow_mut(), &mut writer.out, &mut iov, &mut stamps, self.now);
            let mut wire = BytesMut::new();
            for b in &iov {
                wire.extend_from_slice(b);
            }
            for e in expected {
                let frame = next_frame(&mut wire);
                trace!("client {slot} <- {frame:02x?}");
                check_frame(frame, e, writer);
            }
            assert!(wire.is_empty(), "the writer wrote {} bytes beyond the frames queued", wire.len());
            // What the writer does once the write completed: count the deliveries and their latency.
            record_sent(&mut self.cores[core].stats, &mut stamps, self.now);
            if ctl.is_closing() {
                trace!("client {slot}: closed by the broker");
                // The reader sees its socket shut down and reports the end, which must be harmless for a
                // connection the core already forgot.
                self.cores[core].conn_closed(key, &ctl, false, self.now);
                self.cores[core].end_batch(self.now);
                self.clients[slot] = Client::closed();
            }
        }
    }

    /// End of input: every connection drops (wills fire), then time runs out for everything.
    fn finish(&mut self) {
        for slot in 0..self.clients.len() {
            self.hang_up(slot);
        }
        self.now += Duration::from_secs(1 << 20);
        for core in &mut self.cores {
            core.sweep(wall(self.now));
            core.end_batch(self.now);
        }
        self.settle();
    }
}

/// Takes the next whole packet off what the writer wrote.
fn next_frame(wire: &mut BytesMut) -> BytesMut {
    match frame_len(wire, CLIENT_MAX_PACKET) {
        Ok(Some(n)) => wire.split_to(n),
        other => panic!("the writer wrote {:02x?}, which does not frame a packet: {other:?}", &wire[..]),
    }
}

/// Decodes one packet the writer wrote for an outbox frame as the client would, and checks it is what
/// the frame queued.
fn check_frame(frame: BytesMut, expect: Expect, w: &mut Writer) {
    match expect {
        Expect::Shared(len) => {
            assert_eq!(frame.len(), len, "a shared frame was not written as it was");
            let p = decode_whole(frame, w.version);
            let Packet::Publish(p) = p else { panic!("shared frame is not a PUBLISH: {p:?}") };
            assert_eq!(p.qos, QoS::AtMostOnce, "shared frames are QoS 0");
            assert!(!p.retain, "a shared (live) frame has retain set");
            check_topic(p.topic.as_str());
        }
        Expect::Publish { msg, qos, pkid, dup, retain, sub_ids } => {
            check_topic(msg.topic.as_str());
            let Packet::Publish(p) = decode_whole(frame, w.version) else {
                panic!("PUBLISH frame decodes as another packet")
            };
            let props = p.properties.as_deref().cloned().unwrap_or_default();
            // The client's side of topic aliases (MQTT-3.3.2-12): a topic name sets the alias, an empty
            // one uses it.
            let topic = match props.topic_alias {
                None => p.topic.clone(),
                Some(a) => {
                    assert!(
                        a != 0 && a <= w.alias_max,
                        "topic alias {a} beyond the client's {}",
                        w.alias_max
                    );
                    if p.topic.is_empty() {
                        w.aliases.get(&a).cloned().unwrap_or_else(|| panic!("topic alias {a} was never set"))
                    } else {
                        w.aliases.insert(a, p.topic.clone());
                        p.topic.clone()
                    }
                }
            };
            assert_eq!(topic, msg.topic);
            assert_eq!(p.payload, msg.payload);
            assert_eq!(p.qos, qos);
            assert_eq!(p.retain, retain);
            assert_eq!(p.dup, dup && qos != QoS::AtMostOnce);
            if qos != QoS::AtMostOnce {
                assert_eq!(p.pkid, pkid);
            }
            if w.version == ProtocolVersion::V5 {
                assert_eq!(&props.subscription_identifiers[..], &sub_ids[..]);
                let expires = msg.props.as_ref().and_then(|p| p.expires).is_some();
                assert_eq!(props.message_expiry_interval.is_some(), expires, "message expiry interval");
            }
        }
        Expect::Control => check_control(frame, w.version),
    }
}

/// Checks that the client decodes an encoded control packet as the packet the broker queued.
fn check_control(out: BytesMut, version: ProtocolVersion) {
    let decoded = decode_whole(out.clone(), version);
    // Compared as bytes: before v5 reason codes are downgraded (or not written at all), so the packet a
    // client decodes differs from the one queued, but must encode to the same bytes.
    let mut again = BytesMut::new();
    encode(&decoded, version, &mut again);
    assert_eq!(again, out, "the client decodes another packet than the broker queued: {decoded:?}");
}

/// Decodes exactly one packet that fills `buf`.
fn decode_whole(mut buf: BytesMut, version: ProtocolVersion) -> Packet {
    let bytes = buf.clone();
    match decode(&mut buf, version, CLIENT_MAX_PACKET) {
        Ok(Some(p)) if buf.is_empty() => p,
        other => {
            panic!("the broker sent {bytes:02x?}, which a client decodes as {other:?} ({} left)", buf.len())
        }
    }
}

/// A topic the broker sends must be a valid topic name (no wildcards, not empty).
fn check_topic(topic: &str) {
    assert!(valid_topic_name(topic), "the broker sent a PUBLISH on the invalid topic {topic:?}");
}

/// The simulated present on both clocks (the Unix side is fixed: only its difference matters here).
fn wall(now: Instant) -> coremq::persist::Clock {
    coremq::persist::Clock { instant: now, unix_ms: 1_700_000_000_000 }
}
