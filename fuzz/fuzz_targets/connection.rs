//! Fuzz target `connection`: whole client connections, without sockets, against one or two cores.
//!
//! The harness plays the part of `server::conn` (`serve_new`, `serve_handoff`, `established` and the
//! writer's `encode_outbox`) for two or three simulated clients: their bytes are decoded the way the
//! server decodes them, the first packet must be a CONNECT, later ones go to `Core::handle`, and every
//! frame the core queues for a client is encoded and decoded back as the client would read it. So
//! arbitrary client input, including two clients taking over each other's session, subscriptions,
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

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use coremq::auth::acl::Acl;
use coremq::core::{check_connect, home_core, ConnCtl, ConnKey, Core, Flow, Settings, SlowSubscriber};
use coremq::protocol::{
    decode, encode, encode_publish_head, encode_publish_head_v5, reason, ConnAck, DecodeError, Packet, ProtocolVersion,
    QoS,
};
use coremq::session::{Limits, OutFrame};
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
/// The server's cap on what it buffers before CONNECT (`server::conn::MAX_CONNECT_SIZE`): the largest
/// CONNECT 3.1.1 allows.
const MAX_CONNECT_SIZE: usize = 5 + 12 + 5 * (2 + 65_535);
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
        Harness {
            cores,
            clients: (0..clients).map(|_| Client { phase: Phase::Closed, buf: BytesMut::new() }).collect(),
            max_packet,
            now: start,
        }
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
            self.clients[slot] = Client { phase: Phase::Handshake { core, key, ctl }, buf: BytesMut::new() };
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
        let mut flow = Flow::Continue;
        while flow == Flow::Continue && !ctl.is_closing() {
            match decode(&mut self.clients[slot].buf, version, self.max_packet) {
                Ok(Some(p)) => {
                    trace!("client {slot} -> {p:?}");
                    flow = c.handle(key, p, self.now);
                }
                Ok(None) => break,
                Err(e) => flow = Flow::Close(e.reason_code(), "malformed packet"),
            }
        }
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
        self.clients[slot] = Client { phase: Phase::Closed, buf: BytesMut::new() };
    }

    /// `serve_new` up to the CONNECT: decode it, check it, hand it to its home core, attach it.
    fn handshake(&mut self, slot: usize) {
        let Phase::Handshake { core, key, ref ctl } = self.clients[slot].phase else { return };
        let ctl = ctl.clone();
        // MQTT-3.1.0-1: anything but CONNECT first is refused on its first byte.
        if self.clients[slot].buf.first().is_some_and(|&b| b != 0x10) {
            return self.refuse(slot, None);
        }
        let max_connect = self.max_packet.min(MAX_CONNECT_SIZE);
        let decoded = decode(&mut self.clients[slot].buf, ProtocolVersion::V3_1_1, max_connect);
        let mut connect = match decoded {
            Ok(None) if !ctl.is_closing() => return,
            Ok(Some(Packet::Connect(c))) if !ctl.is_closing() => c,
            Err(DecodeError::UnsupportedProtocolLevel { .. }) => {
                return self.refuse(slot, Some((ProtocolVersion::V3_1_1, reason::UNSUPPORTED_PROTOCOL_VERSION)));
            }
            // MQTT-3.1.0-1: the first packet must be CONNECT; anything else, or garbage, closes.
            _ => return self.refuse(slot, None),
        };
        match check_connect(&connect, self.cores[core].settings()) {
            Err((code, _)) => return self.refuse(slot, Some((connect.protocol, code))),
            Ok(false) => return self.refuse(slot, None),
            Ok(true) => {}
        }
        let assigned = connect.client_id.is_empty();
        if assigned {
            connect.client_id = self.cores[core].assign_client_id(self.now);
        }
        let home = home_core(connect.client_id.as_str(), self.cores.len());
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
        trace!("client {slot} -> {connect:?} (core {core}, home {home})");
        self.cores[home].connect(key, *connect, assigned, self.now);
        self.cores[home].end_batch(self.now);
        self.clients[slot].phase = Phase::Established { core: home, key, ctl, version };
    }

    /// `refuse`: forget the connection; the CONNACK, if any, is written straight to the socket.
    fn refuse(&mut self, slot: usize, code: Option<(ProtocolVersion, u8)>) {
        trace!("client {slot}: refused, CONNACK {code:?}");
        if let Phase::Handshake { core, key, ctl } =
            std::mem::replace(&mut self.clients[slot].phase, Phase::Closed)
        {
            self.cores[core].unregister(key, &ctl);
        }
        self.clients[slot].buf = BytesMut::new();
        if let Some((version, code)) = code {
            let connack = Packet::ConnAck(ConnAck { session_present: false, code, properties: None });
            check_control(&connack, version);
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
            let (core, key, ctl, version) = match &self.clients[slot].phase {
                Phase::Closed => continue,
                Phase::Handshake { core, key, ctl } => (*core, *key, ctl.clone(), ProtocolVersion::V3_1_1),
                Phase::Established { core, key, ctl, version } => (*core, *key, ctl.clone(), *version),
            };
            let frames: Vec<OutFrame> = ctl.outbox.borrow_mut().drain(..).collect();
            for frame in frames {
                trace!("client {slot} <- {frame:?}");
                // What the writer does once the write completed: count the delivery and its latency.
                if let Some(received) = check_frame(frame, version) {
                    let c = &mut self.cores[core];
                    c.stats.msgs_out += 1;
                    c.stats.record_latency(self.now.saturating_duration_since(received));
                }
            }
            if ctl.is_closing() {
                trace!("client {slot}: closed by the broker");
                // The reader sees its socket shut down and reports the end, which must be harmless for a
                // connection the core already forgot.
                self.cores[core].conn_closed(key, &ctl, false, self.now);
                self.cores[core].end_batch(self.now);
                self.clients[slot] = Client { phase: Phase::Closed, buf: BytesMut::new() };
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

/// Encodes one outbox frame as the writer does and decodes it as the client would. Returns when the
/// message was received for a PUBLISH (the start of its latency), `None` for other packets.
fn check_frame(frame: OutFrame, version: ProtocolVersion) -> Option<Instant> {
    match frame {
        OutFrame::Shared { frame, received } => {
            let p = decode_whole(BytesMut::from(&frame[..]), version);
            let Packet::Publish(p) = p else { panic!("shared frame is not a PUBLISH: {p:?}") };
            assert_eq!(p.qos, QoS::AtMostOnce, "shared frames are QoS 0");
            assert!(!p.retain, "a shared (live) frame has retain set");
            check_topic(p.topic.as_str());
            Some(received)
        }
        OutFrame::Publish { msg, qos, pkid, dup, retain, .. } => {
            check_topic(msg.topic.as_str());
            let mut out = BytesMut::new();
            if version == ProtocolVersion::V5 {
                let forward = msg.props.as_ref().map_or(&[][..], |p| &p.forward[..]);
                let len = msg.payload.len();
                encode_publish_head_v5(msg.topic.as_str(), qos, pkid, dup, retain, &[forward], len, &mut out);
            } else {
                encode_publish_head(msg.topic.as_str(), qos, pkid, dup, retain, msg.payload.len(), &mut out);
            }
            out.extend_from_slice(&msg.payload);
            let Packet::Publish(p) = decode_whole(out, version) else {
                panic!("PUBLISH frame decodes as another packet")
            };
            assert_eq!(p.topic, msg.topic);
            assert_eq!(p.payload, msg.payload);
            assert_eq!(p.qos, qos);
            assert_eq!(p.retain, retain);
            assert_eq!(p.dup, dup && qos != QoS::AtMostOnce);
            if qos != QoS::AtMostOnce {
                assert_eq!(p.pkid, pkid);
            }
            Some(msg.received)
        }
        OutFrame::Control(p) => {
            check_control(&p, version);
            None
        }
    }
}

/// Encodes a control packet and checks that the client decodes the same packet.
fn check_control(p: &Packet, version: ProtocolVersion) {
    let mut out = BytesMut::new();
    encode(p, version, &mut out);
    let decoded = decode_whole(out.clone(), version);
    // Compared as bytes: before v5 reason codes are downgraded (or not written at all), so the packet a
    // client decodes differs from the one queued, but must encode to the same bytes.
    let mut again = BytesMut::new();
    encode(&decoded, version, &mut again);
    assert_eq!(again, out, "the client decodes another packet than the broker queued: {p:?} / {decoded:?}");
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
