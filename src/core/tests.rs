//! Unit tests of [`Core`] in-process: no sockets, no runtime, no sleeping. Each test plays the part of
//! the runtime (`server::conn`'s reader and writer, the sweeper, the cross-core loop) for a few simulated
//! clients, against one or two cores, with a fake clock: a base `Instant` captured once plus an offset
//! the test advances. What the broker would write to a client is read from its connection's outbox.
//!
//! Every call into the core goes through the helpers at the top of this file (the [`World`] and its
//! methods, [`settings`], the packet builders), so that a change of the core's API (key newtypes, a
//! shifted signature) is a fix of a few lines here, not in every test.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use smallvec::smallvec;

use super::{check_connect, home_core, ConnCtl, Core, Flow, Settings, SlowSubscriber};
use crate::persist::Clock;
use crate::protocol::properties::Properties;
use crate::protocol::{
    self, reason, Ack, ConnAck, Connect, Disconnect, Packet, ProtocolVersion, Publish, QoS, SubAck,
    Subscribe, SubscribeFilter, Utf8Bytes, Will,
};
use crate::session::{Limits, OutFrame};
use crate::xcore::build_mesh;

// ---------------------------------------------------------------------------------------------------
// The API boundary: everything the tests call on a `Core` is here.
// ---------------------------------------------------------------------------------------------------

/// The connection key [`Core::register`] returns: the one place its type is written.
use crate::core::ConnKey;

/// Slots per ring between cores (small, as in the fuzz harness).
const RING_CAPACITY: usize = 64;
/// The Unix time (ms) of the fake clock's start.
const START_UNIX_MS: u64 = 1_700_000_000_000;
/// Rounds of cross-core draining before [`World::pump`] gives up: far more than any test needs.
const MAX_PUMP_ROUNDS: usize = 64;

/// Settings of the tests: generous limits, the drop policy, no ACL, nothing capped.
fn settings() -> Settings {
    Settings {
        limits: Limits {
            max_inflight: 20,
            max_queued_messages: 100,
            max_queued_bytes: 1 << 20,
            overflow_messages: 0,
            overflow_bytes: 0,
        },
        max_packet_size: 1 << 20,
        connect_timeout: Duration::from_secs(10),
        queue_qos0_messages: false,
        max_outbox_messages: 1000,
        max_subscriptions_per_client: 100,
        max_topic_levels: 16,
        max_client_id_len: 64,
        slow_subscriber: SlowSubscriber::Drop,
        slow_subscriber_timeout: None,
        passwords: None,
        acl: None,
        max_keepalive: u16::MAX,
        max_session_expiry: u32::MAX,
        topic_alias_maximum: 10,
        receive_maximum: 100,
        response_information: None,
    }
}

/// The pause policy with a one-message window and a queue of `queued` messages (overflow room as
/// `main.rs` computes it).
fn pause_settings(queued: usize) -> Settings {
    let mut s = settings();
    s.slow_subscriber = SlowSubscriber::Pause;
    s.limits.max_inflight = 1;
    s.limits.max_queued_messages = queued;
    s.limits.overflow_messages = queued + RING_CAPACITY * 2;
    s.limits.overflow_bytes = s.limits.max_queued_bytes;
    s
}

/// One simulated client connection.
struct Conn {
    /// Index of its core in [`World::cores`].
    core: usize,
    key: ConnKey,
    ctl: Rc<ConnCtl>,
    version: ProtocolVersion,
}

/// A broker of `n` cores driven by hand, and the fake clock.
struct World {
    cores: Vec<Core>,
    start: Instant,
    elapsed: Duration,
}

impl World {
    fn new(n: usize) -> World {
        World::with(n, settings())
    }

    fn with(n: usize, s: Settings) -> World {
        let start = Instant::now();
        let wall = Clock { instant: start, unix_ms: START_UNIX_MS };
        let cores = build_mesh(n, RING_CAPACITY)
            .into_iter()
            .enumerate()
            .map(|(id, mesh)| Core::new(id, s.clone(), mesh, wall))
            .collect();
        World { cores, start, elapsed: Duration::ZERO }
    }

    /// The fake present.
    fn now(&self) -> Instant {
        self.start + self.elapsed
    }

    /// The fake present on both clocks, as the runtime's `wall_clock()` reads it.
    fn wall(&self) -> Clock {
        Clock { instant: self.now(), unix_ms: START_UNIX_MS + self.elapsed.as_millis() as u64 }
    }

    /// Moves the fake clock forward (nothing runs: see [`World::sweep`]).
    fn advance(&mut self, d: Duration) {
        self.elapsed += d;
    }

    /// Sets the fake clock to `t` after the start.
    fn at(&mut self, t: Duration) {
        assert!(t >= self.elapsed, "the clock never goes back");
        self.elapsed = t;
    }

    /// The runtime's sweeper tick on every core (keep-alive, connect timeout, session expiry, delayed
    /// wills, slow subscribers), then the cross-core loop.
    fn sweep(&mut self) {
        let wall = self.wall();
        for core in &mut self.cores {
            core.sweep(wall);
            core.end_batch(wall.instant);
        }
        self.pump();
    }

    /// The cross-core loop: every core takes what the others sent and pushes what it staged, until the
    /// rings are quiet.
    fn pump(&mut self) {
        let now = self.now();
        for _ in 0..MAX_PUMP_ROUNDS {
            let mut moved = 0;
            for core in &mut self.cores {
                moved += core.drain_inbound(now);
                core.end_batch(now);
            }
            if moved == 0 && self.cores.iter().all(|c| !c.is_blocked()) {
                return;
            }
        }
        panic!("the cores did not go quiet in {MAX_PUMP_ROUNDS} rounds");
    }

    /// The index of the core that owns `client_id`'s session.
    fn home(&self, client_id: &str) -> usize {
        home_core(client_id, self.cores.len()).index()
    }

    /// A client id starting with `prefix` whose session lives on core `core`.
    fn id_on(&self, prefix: &str, core: usize) -> String {
        (0..1000)
            .map(|i| format!("{prefix}-{i}"))
            .find(|id| self.home(id) == core)
            .unwrap_or_else(|| panic!("no id {prefix}-N on core {core}"))
    }

    /// A new connection accepted by core `core`, CONNECT not yet read.
    fn open(&mut self, core: usize) -> Conn {
        let now = self.now();
        let c = &mut self.cores[core];
        let ctl = c.new_ctl(None);
        let key = c.register(ctl.clone(), now);
        Conn { core, key, ctl, version: ProtocolVersion::V3_1_1 }
    }

    /// A client connects (on its home core, as after the server's hand-off). Returns the connection and
    /// its CONNACK, which must be the first frame and a success; later frames (a resumed session's
    /// messages) stay in the outbox.
    fn connect(&mut self, c: Connect) -> (Conn, ConnAck) {
        let home = self.home(c.client_id.as_str());
        assert_eq!(check_connect(&c, self.cores[home].settings()), Ok(true), "CONNECT refused: {c:?}");
        let mut conn = self.open(home);
        conn.version = c.protocol;
        let now = self.now();
        self.cores[home].connect(conn.key, c, false, now);
        self.cores[home].end_batch(now);
        self.pump();
        let first = conn.ctl.outbox.borrow_mut().pop_front();
        let Some(OutFrame::Control(Packet::ConnAck(ack))) = first else {
            panic!("expected CONNACK first, got {first:?}")
        };
        assert_eq!(ack.code, reason::SUCCESS, "CONNACK code: {ack:?}");
        (conn, ack)
    }

    /// The client sends `p`: what the connection's reader does with one decoded packet (touch, handle,
    /// close when the flow says so), then the cross-core loop.
    fn send(&mut self, c: &Conn, p: Packet) -> Flow {
        let now = self.now();
        let core = &mut self.cores[c.core];
        core.touch(c.key, now);
        core.drain_inbound(now);
        let flow = core.handle(c.key, p, now);
        let ended = match &flow {
            Flow::Continue if !c.ctl.is_closing() => None,
            Flow::Continue => Some(false),
            Flow::Disconnect { will } => Some(!will),
            Flow::Close(code, why) => {
                core.send_disconnect(c.key, *code, why);
                core.stats.count_closed(why);
                Some(false)
            }
        };
        core.end_batch(now);
        if let Some(graceful) = ended {
            core.conn_closed(c.key, &c.ctl, graceful, now);
            core.end_batch(now);
        }
        self.pump();
        flow
    }

    /// Bytes arrived on the connection (not necessarily a whole packet): keep-alive restarts.
    fn touch(&mut self, c: &Conn) {
        let now = self.now();
        self.cores[c.core].touch(c.key, now);
    }

    /// The connection drops without DISCONNECT (or the reader ends after the broker closed it).
    fn drop_conn(&mut self, c: &Conn) {
        let now = self.now();
        let core = &mut self.cores[c.core];
        core.conn_closed(c.key, &c.ctl, false, now);
        core.end_batch(now);
        self.pump();
    }

    /// Takes what the broker queued for the client, as the client would read it.
    fn frames(&self, c: &Conn) -> Vec<Out> {
        let frames: Vec<OutFrame> = c.ctl.outbox.borrow_mut().drain(..).collect();
        frames.into_iter().map(|f| Out::from_frame(f, c.version)).collect()
    }

    /// Acknowledges every QoS 1/2 message in `msgs` as a client does (QoS 2: PUBREC, then PUBCOMP after
    /// the PUBREL), and checks the broker answers nothing else.
    fn ack_all(&mut self, c: &Conn, msgs: &[Msg]) {
        for m in msgs {
            match m.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.send(c, Packet::PubAck(Ack::ok(m.pkid)));
                }
                QoS::ExactlyOnce => {
                    self.send(c, Packet::PubRec(Ack::ok(m.pkid)));
                    assert_eq!(self.frames(c), vec![Out::Ctl(Packet::PubRel(Ack::ok(m.pkid)))]);
                    self.send(c, Packet::PubComp(Ack::ok(m.pkid)));
                }
            }
        }
    }

    /// How many connections core `core` closed for `why` (the shutdown report's counter).
    fn closed(&self, core: usize, why: &str) -> u64 {
        self.cores[core].stats.closed.get(why).copied().unwrap_or(0)
    }
}

/// A delivered PUBLISH, as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Msg {
    topic: String,
    payload: String,
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
}

/// One frame the broker queued for a client.
#[derive(Debug, PartialEq, Eq)]
enum Out {
    Pub(Msg),
    Ctl(Packet),
}

impl Out {
    fn from_frame(f: OutFrame, version: ProtocolVersion) -> Out {
        match f {
            OutFrame::Publish { msg, qos, pkid, dup, retain, .. } => Out::Pub(Msg {
                topic: msg.topic.as_str().to_string(),
                payload: String::from_utf8_lossy(&msg.payload).into_owned(),
                qos,
                pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
                dup,
                retain,
            }),
            OutFrame::Shared { frame, .. } => {
                let mut buf = BytesMut::from(&frame[..]);
                match protocol::decode(&mut buf, version, usize::MAX) {
                    Ok(Some(Packet::Publish(p))) if buf.is_empty() => Out::Pub(Msg {
                        topic: p.topic.as_str().to_string(),
                        payload: String::from_utf8_lossy(&p.payload).into_owned(),
                        qos: p.qos,
                        pkid: p.pkid,
                        dup: p.dup,
                        retain: p.retain,
                    }),
                    other => panic!("a shared frame that is not one PUBLISH: {other:?}"),
                }
            }
            OutFrame::Control(p) => Out::Ctl(p),
        }
    }
}

/// The PUBLISHes among `frames`.
fn msgs(frames: &[Out]) -> Vec<Msg> {
    frames
        .iter()
        .filter_map(|o| match o {
            Out::Pub(m) => Some(m.clone()),
            Out::Ctl(_) => None,
        })
        .collect()
}

/// The payloads of the PUBLISHes among `frames`.
fn payloads(frames: &[Out]) -> Vec<String> {
    msgs(frames).into_iter().map(|m| m.payload).collect()
}

/// The control packets among `frames`.
fn controls(frames: &[Out]) -> Vec<Packet> {
    frames
        .iter()
        .filter_map(|o| match o {
            Out::Ctl(p) => Some(p.clone()),
            Out::Pub(_) => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------
// Packet builders.
// ---------------------------------------------------------------------------------------------------

fn utf8(s: &str) -> Utf8Bytes {
    Utf8Bytes::copy_from_str(s)
}

/// A 3.1.1 CONNECT.
fn v3(client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_session: clean,
        keep_alive,
        client_id: utf8(client_id),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// A v5 CONNECT with a Session Expiry Interval of `expiry` seconds (keep-alive 0).
fn v5(client_id: &str, clean: bool, expiry: u32) -> Connect {
    Connect {
        protocol: ProtocolVersion::V5,
        properties: Properties { session_expiry_interval: Some(expiry), ..Properties::default() },
        ..v3(client_id, clean, 0)
    }
}

/// `c` with a QoS 1 will "gone" on `topic`, and a Will Delay Interval (v5) if given.
fn with_will(mut c: Connect, topic: &str, delay: Option<u32>) -> Connect {
    c.will = Some(Will {
        topic: utf8(topic),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties { will_delay_interval: delay, ..Properties::default() },
    });
    c
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: utf8(topic),
        pkid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        properties: None,
    })
}

fn retained(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    let Packet::Publish(p) = publish(topic, qos, pkid, payload) else { unreachable!() };
    Packet::Publish(Publish { retain: true, ..p })
}

/// A v5 PUBLISH with a Message Expiry Interval.
fn publish_expiring(topic: &str, pkid: u16, payload: &str, expiry: u32) -> Packet {
    let Packet::Publish(p) = publish(topic, QoS::AtLeastOnce, pkid, payload) else { unreachable!() };
    let props = Properties { message_expiry_interval: Some(expiry), ..Properties::default() };
    Packet::Publish(Publish { properties: Some(Box::new(props)), ..p })
}

fn subscribe(pkid: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: smallvec![SubscribeFilter::new(utf8(filter), qos)],
        subscription_id: None,
    })
}

fn disconnect() -> Packet {
    Packet::Disconnect(Disconnect::default())
}

/// `World::connect` then a SUBSCRIBE, whose SUBACK must grant `qos`.
fn subscriber(w: &mut World, c: Connect, filter: &str, qos: QoS) -> Conn {
    let (conn, _) = w.connect(c);
    assert_eq!(w.send(&conn, subscribe(1, filter, qos)), Flow::Continue);
    let frames = w.frames(&conn);
    assert_eq!(
        frames.first(),
        Some(&Out::Ctl(Packet::SubAck(SubAck { pkid: 1, codes: smallvec![qos as u8], reason_string: None }))),
        "SUBACK for {filter}"
    );
    conn
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

// ---------------------------------------------------------------------------------------------------
// CONNECT, CONNACK, takeover
// ---------------------------------------------------------------------------------------------------

#[test]
fn connack_session_present_only_for_a_kept_session() {
    let mut w = World::new(1);
    let (c, ack) = w.connect(v3("sp", false, 0));
    assert!(!ack.session_present, "a new session");
    assert_eq!(ack.properties, None, "no properties for 3.1.1");
    assert_eq!(w.send(&c, disconnect()), Flow::Disconnect { will: false });
    assert!(c.ctl.is_closing(), "DISCONNECT closes the connection");

    // Clean session = false: resumed.
    let (c, ack) = w.connect(v3("sp", false, 0));
    assert!(ack.session_present, "the persistent session was kept");
    w.send(&c, disconnect());

    // Clean session = true: discarded, and not kept after it either.
    let (c, ack) = w.connect(v3("sp", true, 0));
    assert!(!ack.session_present, "clean session discards the stored session");
    w.send(&c, disconnect());
    let (c, ack) = w.connect(v3("sp", false, 0));
    assert!(!ack.session_present, "a clean session ends with its connection");
    w.send(&c, disconnect());
    assert_eq!(w.cores[0].stats.connections, 4);
}

#[test]
fn v5_connack_tells_capped_values() {
    let mut s = settings();
    s.max_keepalive = 10;
    s.max_session_expiry = 100;
    let mut w = World::with(1, s);
    let mut c = v5("caps", true, 3600);
    c.keep_alive = 60;
    let (_, ack) = w.connect(c);
    let p = ack.properties.expect("v5 CONNACK properties");
    assert_eq!(p.server_keep_alive, Some(10), "Server Keep Alive (MQTT-3.2.2-21)");
    assert_eq!(p.session_expiry_interval, Some(100), "the expiry the broker uses (MQTT-3.2.2.3.2)");
    assert_eq!(p.receive_maximum, Some(100));
    assert_eq!(p.assigned_client_identifier, None, "the client named itself");
}

#[test]
fn takeover_closes_the_old_connection_and_keeps_the_session() {
    let mut w = World::new(1);
    let old = subscriber(&mut w, v3("tk", false, 0), "tk/t", QoS::AtLeastOnce);
    let (new, ack) = w.connect(v3("tk", false, 0));
    assert!(ack.session_present, "takeover keeps the session");
    assert!(old.ctl.is_closing(), "the old connection is closed (MQTT-3.1.4-2)");
    assert!(w.frames(&old).is_empty(), "3.1.1 has no DISCONNECT from the broker");
    assert!(!new.ctl.is_closing());
    assert_eq!(w.closed(0, "session taken over"), 1);
    // The old reader then sees its socket closed: harmless.
    w.drop_conn(&old);
    assert!(!new.ctl.is_closing());

    let (p, _) = w.connect(v3("tk-pub", true, 0));
    w.send(&p, publish("tk/t", QoS::AtLeastOnce, 1, "after"));
    let got = msgs(&w.frames(&new));
    assert_eq!(got.len(), 1, "the subscription survived the takeover: {got:?}");
    assert_eq!((got[0].payload.as_str(), got[0].qos), ("after", QoS::AtLeastOnce));
    assert!(w.frames(&old).is_empty(), "nothing reaches the old connection");
}

#[test]
fn v5_takeover_sends_disconnect_0x8e_and_publishes_the_will() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("tk5-watch", true, 0), "tk5/will", QoS::AtLeastOnce);
    let (old, _) = w.connect(with_will(v5("tk5", false, 60), "tk5/will", None));
    let (_new, ack) = w.connect(v5("tk5", false, 60));
    assert!(ack.session_present);
    assert!(old.ctl.is_closing());
    match controls(&w.frames(&old)).as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason, reason::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    // MQTT-3.1.4-3: the existing client's will is published as for any other close (no delay here).
    assert_eq!(payloads(&w.frames(&watch)), vec!["gone"]);
}

// ---------------------------------------------------------------------------------------------------
// QoS 1 and 2
// ---------------------------------------------------------------------------------------------------

#[test]
fn qos1_publish_acked_delivered_and_redelivered_until_acked() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v3("q1-sub", false, 0), "q1/t", QoS::AtLeastOnce);
    let (p, _) = w.connect(v3("q1-pub", true, 0));

    w.send(&p, publish("q1/t", QoS::AtLeastOnce, 7, "one"));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubAck(Ack::ok(7)))]);
    let got = msgs(&w.frames(&sub));
    assert_eq!(got.len(), 1);
    let one = &got[0];
    assert_eq!((one.topic.as_str(), one.payload.as_str()), ("q1/t", "one"));
    assert_eq!((one.qos, one.dup, one.retain), (QoS::AtLeastOnce, false, false));
    assert_ne!(one.pkid, 0);
    w.send(&sub, Packet::PubAck(Ack::ok(one.pkid)));
    assert!(w.frames(&sub).is_empty(), "PUBACK is not answered");

    // A second message the subscriber does not acknowledge before its connection drops.
    w.send(&p, publish("q1/t", QoS::AtLeastOnce, 8, "two"));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubAck(Ack::ok(8)))]);
    let two = msgs(&w.frames(&sub)).remove(0);
    assert_eq!(two.payload, "two");
    w.drop_conn(&sub);

    // On reconnect only the unacknowledged one is resent, with DUP and its packet id (MQTT-4.4.0-1).
    let (sub, ack) = w.connect(v3("q1-sub", false, 0));
    assert!(ack.session_present);
    let again = msgs(&w.frames(&sub));
    assert_eq!(again, vec![Msg { dup: true, ..two.clone() }]);
    w.send(&sub, Packet::PubAck(Ack::ok(two.pkid)));
    w.drop_conn(&sub);
    let (sub, _) = w.connect(v3("q1-sub", false, 0));
    assert!(w.frames(&sub).is_empty(), "an acknowledged message is not sent again");
}

#[test]
fn qos2_inbound_routed_once_until_pubrel() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v3("q2i-sub", true, 0), "q2i/t", QoS::AtMostOnce);
    let (p, _) = w.connect(v3("q2i-pub", true, 0));

    w.send(&p, publish("q2i/t", QoS::ExactlyOnce, 5, "a"));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubRec(Ack::ok(5)))]);
    assert_eq!(payloads(&w.frames(&sub)), vec!["a"]);

    // The same packet id again before PUBREL (a resend after a lost PUBREC): PUBREC, not routed.
    let Packet::Publish(dup) = publish("q2i/t", QoS::ExactlyOnce, 5, "a") else { unreachable!() };
    w.send(&p, Packet::Publish(Publish { dup: true, ..dup }));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubRec(Ack::ok(5)))]);
    assert!(w.frames(&sub).is_empty(), "a resent QoS 2 PUBLISH must not be delivered twice");

    w.send(&p, Packet::PubRel(Ack::ok(5)));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubComp(Ack::ok(5)))]);
    // A PUBREL resent after PUBCOMP got lost is still answered (v5: 0x92, not written on 3.1.1).
    w.send(&p, Packet::PubRel(Ack::ok(5)));
    assert_eq!(
        w.frames(&p),
        vec![Out::Ctl(Packet::PubComp(Ack { pkid: 5, reason: reason::PACKET_IDENTIFIER_NOT_FOUND }))]
    );

    // After PUBCOMP the packet id is free: the next PUBLISH with it is a new message.
    w.send(&p, publish("q2i/t", QoS::ExactlyOnce, 5, "b"));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubRec(Ack::ok(5)))]);
    assert_eq!(payloads(&w.frames(&sub)), vec!["b"]);
}

#[test]
fn qos2_outbound_pubrec_pubrel_pubcomp_and_the_window() {
    let mut s = settings();
    s.limits.max_inflight = 1;
    let mut w = World::with(1, s);
    let sub = subscriber(&mut w, v3("q2o-sub", true, 0), "q2o/t", QoS::ExactlyOnce);
    let (p, _) = w.connect(v3("q2o-pub", true, 0));
    for (pkid, payload) in [(1, "a"), (2, "b")] {
        w.send(&p, publish("q2o/t", QoS::ExactlyOnce, pkid, payload));
        w.send(&p, Packet::PubRel(Ack::ok(pkid)));
    }
    assert_eq!(
        controls(&w.frames(&p)),
        vec![
            Packet::PubRec(Ack::ok(1)),
            Packet::PubComp(Ack::ok(1)),
            Packet::PubRec(Ack::ok(2)),
            Packet::PubComp(Ack::ok(2)),
        ]
    );
    // Window of one: only "a" is sent.
    let a = msgs(&w.frames(&sub));
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!((a[0].payload.as_str(), a[0].qos), ("a", QoS::ExactlyOnce));
    let pkid = a[0].pkid;

    w.send(&sub, Packet::PubRec(Ack::ok(pkid)));
    assert_eq!(w.frames(&sub), vec![Out::Ctl(Packet::PubRel(Ack::ok(pkid)))], "PUBREL, and b still waits");
    // A PUBREC resent (our PUBREL lost): PUBREL again.
    w.send(&sub, Packet::PubRec(Ack::ok(pkid)));
    assert_eq!(w.frames(&sub), vec![Out::Ctl(Packet::PubRel(Ack::ok(pkid)))]);
    // PUBCOMP completes the flow and frees the window for "b".
    w.send(&sub, Packet::PubComp(Ack::ok(pkid)));
    let b = msgs(&w.frames(&sub));
    assert_eq!(
        b.iter().map(|m| (m.payload.as_str(), m.qos)).collect::<Vec<_>>(),
        vec![("b", QoS::ExactlyOnce)]
    );
    w.ack_all(&sub, &b);
    assert!(w.frames(&sub).is_empty());
}

#[test]
fn qos_is_the_minimum_of_publish_and_subscription() {
    let mut w = World::new(1);
    let s1 = subscriber(&mut w, v3("min-1", true, 0), "min/t", QoS::AtLeastOnce);
    let s2 = subscriber(&mut w, v3("min-2", true, 0), "min/t", QoS::ExactlyOnce);
    let (p, _) = w.connect(v3("min-pub", true, 0));
    w.send(&p, publish("min/t", QoS::ExactlyOnce, 1, "x"));
    assert_eq!(msgs(&w.frames(&s1))[0].qos, QoS::AtLeastOnce);
    assert_eq!(msgs(&w.frames(&s2))[0].qos, QoS::ExactlyOnce);
    w.send(&p, publish("min/t", QoS::AtMostOnce, 0, "y"));
    assert_eq!(msgs(&w.frames(&s1))[0].qos, QoS::AtMostOnce);
    assert_eq!(msgs(&w.frames(&s2))[0].qos, QoS::AtMostOnce);
}

#[test]
fn offline_persistent_session_queues_qos1_and_delivers_on_reconnect() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v3("off", false, 0), "off/t", QoS::AtLeastOnce);
    w.send(&sub, disconnect());
    let (p, _) = w.connect(v3("off-pub", true, 0));
    for (pkid, payload) in [(1, "m1"), (2, "m2"), (3, "m3")] {
        w.send(&p, publish("off/t", QoS::AtLeastOnce, pkid, payload));
    }
    w.send(&p, publish("off/t", QoS::AtMostOnce, 0, "qos0"));
    assert_eq!(
        controls(&w.frames(&p)),
        (1..=3).map(|i| Packet::PubAck(Ack::ok(i))).collect::<Vec<_>>(),
        "acknowledged although the subscriber is offline"
    );

    let (sub, ack) = w.connect(v3("off", false, 0));
    assert!(ack.session_present);
    let got = msgs(&w.frames(&sub));
    assert_eq!(
        got.iter().map(|m| (m.payload.as_str(), m.qos, m.dup)).collect::<Vec<_>>(),
        vec![
            ("m1", QoS::AtLeastOnce, false),
            ("m2", QoS::AtLeastOnce, false),
            ("m3", QoS::AtLeastOnce, false)
        ],
        "queued QoS 1 in order; QoS 0 is not queued (queue_qos0_messages = false)"
    );
    w.ack_all(&sub, &got);
    assert!(w.frames(&sub).is_empty());
}

// ---------------------------------------------------------------------------------------------------
// Wills
// ---------------------------------------------------------------------------------------------------

#[test]
fn will_published_on_unclean_close_not_on_disconnect() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("will-watch", true, 0), "will/#", QoS::AtLeastOnce);

    let (a, _) = w.connect(with_will(v3("will-a", true, 0), "will/a", None));
    w.drop_conn(&a);
    let got = msgs(&w.frames(&watch));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_str(), got[0].qos),
        ("will/a", "gone", QoS::AtLeastOnce)
    );
    w.ack_all(&watch, &got);

    let (b, _) = w.connect(with_will(v3("will-b", true, 0), "will/b", None));
    assert_eq!(w.send(&b, disconnect()), Flow::Disconnect { will: false });
    // The reader's end after DISCONNECT is graceful; a later report of the socket closing is harmless.
    w.drop_conn(&b);
    assert!(w.frames(&watch).is_empty(), "DISCONNECT discards the will (MQTT-3.1.2-10)");

    // v5 DISCONNECT with reason 0x04 asks for the will.
    let (c, _) = w.connect(with_will(v5("will-c", true, 0), "will/c", None));
    let flow = w.send(&c, Packet::Disconnect(Disconnect::with_reason(reason::DISCONNECT_WITH_WILL, None)));
    assert_eq!(flow, Flow::Disconnect { will: true });
    assert_eq!(payloads(&w.frames(&watch)), vec!["gone"]);
}

#[test]
fn v5_will_delay_fires_after_the_delay() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("wd-watch", true, 0), "wd/#", QoS::AtLeastOnce);
    let (c, _) = w.connect(with_will(v5("wd", false, 10), "wd/c", Some(2)));
    w.drop_conn(&c);
    w.sweep();
    assert!(w.frames(&watch).is_empty(), "not at once");
    w.at(ms(1999));
    w.sweep();
    assert!(w.frames(&watch).is_empty(), "not before the delay (MQTT-3.1.3-9)");
    w.at(secs(2));
    w.sweep();
    let got = msgs(&w.frames(&watch));
    assert_eq!(
        got.iter().map(|m| (m.topic.as_str(), m.payload.as_str())).collect::<Vec<_>>(),
        vec![("wd/c", "gone")]
    );
    w.ack_all(&watch, &got);
    // Once: not again when the session expires.
    w.at(secs(11));
    w.sweep();
    assert!(w.frames(&watch).is_empty());
    let (_, ack) = w.connect(v5("wd", false, 0));
    assert!(!ack.session_present, "the session expired after its 10 s");
}

#[test]
fn v5_will_cancelled_by_reconnect_within_the_delay() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("wc-watch", true, 0), "wc/#", QoS::AtLeastOnce);
    let (c, _) = w.connect(with_will(v5("wc", false, 10), "wc/c", Some(2)));
    w.drop_conn(&c);
    w.at(secs(1));
    w.sweep();
    let (_c, ack) = w.connect(v5("wc", false, 10));
    assert!(ack.session_present);
    w.at(secs(5));
    w.sweep();
    assert!(w.frames(&watch).is_empty(), "a reconnect within the delay cancels the will (MQTT-3.1.3-9)");

    // A reconnect with Clean Start ends the session instead: its pending will goes out at once.
    let (c, _) = w.connect(with_will(v5("wc2", false, 10), "wc/c2", Some(2)));
    w.drop_conn(&c);
    w.at(secs(6));
    w.sweep();
    assert!(w.frames(&watch).is_empty());
    let (_c, ack) = w.connect(v5("wc2", true, 10));
    assert!(!ack.session_present);
    assert_eq!(payloads(&w.frames(&watch)), vec!["gone"], "the session ended: its will is due");
}

#[test]
fn v5_will_sent_when_the_session_expires_before_the_delay() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("we-watch", true, 0), "we/#", QoS::AtLeastOnce);
    let (c, _) = w.connect(with_will(v5("we", false, 1), "we/c", Some(30)));
    w.drop_conn(&c);
    w.at(ms(999));
    w.sweep();
    assert!(w.frames(&watch).is_empty());
    w.at(secs(1));
    w.sweep();
    assert_eq!(payloads(&w.frames(&watch)), vec!["gone"], "the session ended first (MQTT-3.1.2-8)");
    let (_, ack) = w.connect(v5("we", false, 0));
    assert!(!ack.session_present);
}

// ---------------------------------------------------------------------------------------------------
// Session and message expiry
// ---------------------------------------------------------------------------------------------------

#[test]
fn v5_session_expires_after_its_interval() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v5("sx", false, 2), "sx/t", QoS::AtLeastOnce);
    w.send(&sub, disconnect());
    let (p, _) = w.connect(v5("sx-pub", true, 0));
    w.at(ms(1999));
    w.sweep();
    // The v5 PUBACK says whether anyone subscribes: the offline session still does.
    w.send(&p, publish("sx/t", QoS::AtLeastOnce, 1, "kept"));
    assert_eq!(controls(&w.frames(&p)), vec![Packet::PubAck(Ack { pkid: 1, reason: reason::SUCCESS })]);
    w.at(secs(2));
    w.sweep();
    w.send(&p, publish("sx/t", QoS::AtLeastOnce, 2, "late"));
    assert_eq!(
        controls(&w.frames(&p)),
        vec![Packet::PubAck(Ack { pkid: 2, reason: reason::NO_MATCHING_SUBSCRIBERS })],
        "the session and its subscription are gone after 2 s"
    );
    let (sub, ack) = w.connect(v5("sx", false, 0));
    assert!(!ack.session_present, "session expired");
    assert!(w.frames(&sub).is_empty(), "its queue went with it");
}

#[test]
fn v5_session_expiry_restarts_at_each_disconnect() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v5("sr", false, 2), "sr/t", QoS::AtLeastOnce);
    w.send(&sub, disconnect());
    let (p, _) = w.connect(v5("sr-pub", true, 0));
    w.send(&p, publish("sr/t", QoS::AtLeastOnce, 1, "queued"));
    w.at(ms(1500));
    w.sweep();
    let (sub, ack) = w.connect(v5("sr", false, 2));
    assert!(ack.session_present, "within the interval");
    let got = msgs(&w.frames(&sub));
    assert_eq!(got.iter().map(|m| m.payload.as_str()).collect::<Vec<_>>(), vec!["queued"]);
    w.ack_all(&sub, &got);
    w.send(&sub, disconnect());
    // 3 s after the first DISCONNECT (its deadline has passed), 1.5 s after the second: still there.
    w.at(secs(3));
    w.sweep();
    let (sub, ack) = w.connect(v5("sr", false, 2));
    assert!(ack.session_present, "the interval counts from the latest disconnect");
    w.send(&sub, disconnect());
    w.at(secs(5));
    w.sweep();
    let (_, ack) = w.connect(v5("sr", false, 2));
    assert!(!ack.session_present, "expired 2 s after the last disconnect");
}

#[test]
fn v5_session_expiry_capped_by_the_broker_maximum() {
    let mut s = settings();
    s.max_session_expiry = 1;
    let mut w = World::with(1, s);
    let (c, ack) = w.connect(v5("cap", false, 3600));
    assert_eq!(ack.properties.and_then(|p| p.session_expiry_interval), Some(1));
    w.send(&c, disconnect());
    w.at(ms(999));
    w.sweep();
    let (c, ack) = w.connect(v5("cap", false, 3600));
    assert!(ack.session_present);
    w.send(&c, disconnect());
    w.at(ms(1999));
    w.sweep();
    let (_, ack) = w.connect(v5("cap", false, 0));
    assert!(!ack.session_present, "the session lived only the capped 1 s");
}

#[test]
fn v5_expired_message_not_delivered_from_the_queue() {
    let mut w = World::new(1);
    let sub = subscriber(&mut w, v5("mx", false, 60), "mx/t", QoS::AtLeastOnce);
    w.send(&sub, disconnect());
    let (p, _) = w.connect(v5("mx-pub", true, 0));
    w.send(&p, publish_expiring("mx/t", 1, "short", 1));
    w.send(&p, publish_expiring("mx/t", 2, "long", 100));
    w.send(&p, publish("mx/t", QoS::AtLeastOnce, 3, "forever"));
    w.at(secs(2));
    w.sweep();
    let (sub, ack) = w.connect(v5("mx", false, 60));
    assert!(ack.session_present);
    assert_eq!(payloads(&w.frames(&sub)), vec!["long", "forever"], "the 1 s message expired (MQTT-3.3.2-5)");
}

// ---------------------------------------------------------------------------------------------------
// Keep-alive and connect timeout
// ---------------------------------------------------------------------------------------------------

#[test]
fn keep_alive_closes_after_one_and_a_half_times_silence_and_publishes_the_will() {
    let mut w = World::new(1);
    let watch = subscriber(&mut w, v3("ka-watch", true, 0), "ka/#", QoS::AtLeastOnce);
    let (c, _) = w.connect(with_will(v3("ka", true, 2), "ka/will", None));
    w.at(secs(3));
    w.sweep();
    assert!(!c.ctl.is_closing(), "not at 1.5 x keep-alive exactly");
    w.at(ms(3001));
    w.sweep();
    assert!(c.ctl.is_closing(), "closed after 1.5 x keep-alive of silence (MQTT-3.1.2-24)");
    assert!(w.frames(&c).is_empty(), "3.1.1: closed without a packet");
    assert_eq!(w.closed(0, "keep-alive timeout"), 1);
    let got = msgs(&w.frames(&watch));
    assert_eq!(
        got.iter().map(|m| (m.topic.as_str(), m.qos)).collect::<Vec<_>>(),
        vec![("ka/will", QoS::AtLeastOnce)]
    );
    // The reader then reports the closed socket: no second will.
    w.drop_conn(&c);
    assert!(w.frames(&watch).is_empty());
    // The watcher (keep-alive 0) is never closed for silence.
    w.at(secs(86_400));
    w.sweep();
    assert!(!watch.ctl.is_closing());
}

#[test]
fn keep_alive_restarts_on_every_packet_and_every_read() {
    let mut w = World::new(1);
    let (c, _) = w.connect(v3("kr", true, 2));
    w.at(ms(2500));
    w.send(&c, Packet::PingReq);
    assert_eq!(w.frames(&c), vec![Out::Ctl(Packet::PingResp)]);
    w.at(secs(4));
    w.sweep();
    assert!(!c.ctl.is_closing(), "4 s after CONNECT but 1.5 s after the PINGREQ");
    w.at(ms(5500));
    w.sweep();
    assert!(!c.ctl.is_closing(), "3 s after the PINGREQ: not yet");
    // Part of a packet arriving counts too (the reader touches on every read).
    w.touch(&c);
    w.at(ms(8500));
    w.sweep();
    assert!(!c.ctl.is_closing());
    w.at(ms(8501));
    w.sweep();
    assert!(c.ctl.is_closing(), "closed 1.5 x keep-alive after the last read");
}

#[test]
fn v5_keep_alive_timeout_sends_disconnect_0x8d_with_the_server_keep_alive() {
    let mut s = settings();
    s.max_keepalive = 10;
    let mut w = World::with(1, s);
    let mut c = v5("ka5", true, 0);
    c.keep_alive = 60;
    let (c, ack) = w.connect(c);
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(10));
    w.at(secs(15));
    w.sweep();
    assert!(!c.ctl.is_closing());
    w.at(ms(15_001));
    w.sweep();
    assert!(c.ctl.is_closing(), "the Server Keep Alive of 10 s applies, not the client's 60");
    match controls(&w.frames(&c)).as_slice() {
        [Packet::Disconnect(d)] => assert_eq!(d.reason, reason::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
}

#[test]
fn connect_timeout_closes_a_connection_that_sends_no_connect() {
    let mut w = World::new(1);
    let silent = w.open(0);
    w.advance(secs(5));
    let late = w.open(0);
    w.advance(secs(5));
    w.sweep();
    assert!(!silent.ctl.is_closing(), "not at connect_timeout exactly");
    w.at(ms(10_001));
    w.sweep();
    assert!(silent.ctl.is_closing(), "no CONNECT within connect_timeout");
    assert!(!late.ctl.is_closing(), "the timeout counts from each connection's accept");
    assert_eq!(w.cores[0].stats.refused.get("no CONNECT within connect_timeout"), Some(&1));
    w.at(ms(15_001));
    w.sweep();
    assert!(late.ctl.is_closing());
    assert_eq!(w.cores[0].stats.refused.get("no CONNECT within connect_timeout"), Some(&2));
    assert!(w.cores[0].stats.closed.is_empty(), "refusals, not closes of established connections");
}

// ---------------------------------------------------------------------------------------------------
// Congestion (pause policy)
// ---------------------------------------------------------------------------------------------------

/// A subscriber with a window of one and a queue of two: three unacknowledged QoS 1 messages congest it,
/// the publisher's fourth is held without PUBACK (and everything after it, to keep acknowledgements in
/// order), and released when the subscriber has drained to half. With two cores the publisher is on the
/// other core, which learns of the congestion through the mesh.
fn pause_holds_and_releases(cores: usize) {
    let mut w = World::with(cores, pause_settings(2));
    let sub_id = w.id_on("slow", 0);
    let pub_id = w.id_on("fast", cores - 1);
    let sub = subscriber(&mut w, v3(&sub_id, false, 0), "cg/t", QoS::AtLeastOnce);
    let (p, _) = w.connect(v3(&pub_id, true, 0));
    for (pkid, payload) in [(1, "m1"), (2, "m2"), (3, "m3")] {
        w.send(&p, publish("cg/t", QoS::AtLeastOnce, pkid, payload));
        assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubAck(Ack::ok(pkid)))], "{payload}: room left");
    }
    let first = msgs(&w.frames(&sub));
    assert_eq!(first.iter().map(|m| m.payload.as_str()).collect::<Vec<_>>(), vec!["m1"], "window of one");

    w.send(&p, publish("cg/t", QoS::AtLeastOnce, 4, "m4"));
    assert!(w.frames(&p).is_empty(), "m4 is held: no PUBACK while the subscriber is congested");
    w.send(&p, publish("free/t", QoS::AtLeastOnce, 5, "other"));
    assert!(w.frames(&p).is_empty(), "held behind m4: acknowledgements stay in order (MQTT-4.6.0-2)");
    let p_core = p.core;
    assert_eq!(w.cores[p_core].stats.held, 2);
    assert!(w.frames(&sub).is_empty(), "nothing held reaches the subscriber");

    // The subscriber acknowledges m1: m2 goes out, the queue (m3) is at half, the publisher goes on.
    w.ack_all(&sub, &first);
    assert_eq!(
        controls(&w.frames(&p)),
        vec![Packet::PubAck(Ack::ok(4)), Packet::PubAck(Ack::ok(5))],
        "released in order once the subscriber drained"
    );
    let mut got = vec!["m1".to_string()];
    for _ in 0..3 {
        let next = msgs(&w.frames(&sub));
        assert_eq!(next.len(), 1, "one at a time through the window: {next:?}");
        got.push(next[0].payload.clone());
        w.ack_all(&sub, &next);
    }
    assert_eq!(got, vec!["m1", "m2", "m3", "m4"], "nothing lost, in order");
    assert!(w.frames(&sub).is_empty());
    assert_eq!(w.cores.iter().map(|c| c.stats.dropped).sum::<u64>(), 0);
}

#[test]
fn pause_policy_holds_a_qos1_publisher_until_the_subscriber_drains() {
    pause_holds_and_releases(1);
}

#[test]
fn pause_policy_holds_a_publisher_on_another_core() {
    pause_holds_and_releases(2);
}

#[test]
fn slow_subscriber_timeout_disconnects_a_stuck_subscriber_and_releases_publishers() {
    let mut s = pause_settings(2);
    s.slow_subscriber_timeout = Some(secs(15));
    let mut w = World::with(1, s);
    let sub = subscriber(&mut w, v5("stuck", false, 60), "st/t", QoS::AtLeastOnce);
    let (p, _) = w.connect(v3("st-pub", true, 0));
    for (pkid, payload) in [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4")] {
        w.send(&p, publish("st/t", QoS::AtLeastOnce, pkid, payload));
    }
    assert_eq!(controls(&w.frames(&p)).len(), 3, "m4 held");
    w.sweep(); // The first sweep that sees the congestion starts its clock.
    w.at(secs(15));
    w.sweep();
    assert!(!sub.ctl.is_closing(), "not before the timeout");
    w.at(ms(15_001));
    w.sweep();
    assert!(sub.ctl.is_closing(), "no progress for slow_subscriber_timeout");
    assert_eq!(w.closed(0, "slow subscriber timeout"), 1);
    let f = w.frames(&sub);
    assert!(
        controls(&f).iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason == reason::QUOTA_EXCEEDED)),
        "v5: DISCONNECT 0x97 first: {f:?}"
    );
    assert_eq!(controls(&w.frames(&p)), vec![Packet::PubAck(Ack::ok(4))], "the publisher goes on");
    // The session kept what was queued; m4 met an offline session with a full queue (newest dropped).
    assert_eq!(w.cores[0].stats.dropped, 1);
    let (sub, ack) = w.connect(v5("stuck", false, 60));
    assert!(ack.session_present);
    let mut got = Vec::new();
    for _ in 0..3 {
        let next = msgs(&w.frames(&sub));
        got.extend(next.iter().map(|m| (m.payload.clone(), m.dup)));
        w.ack_all(&sub, &next);
    }
    assert_eq!(
        got,
        vec![("m1".to_string(), true), ("m2".to_string(), false), ("m3".to_string(), false)],
        "m1 resent with DUP, then the queue"
    );
}

// ---------------------------------------------------------------------------------------------------
// Shared subscriptions and retained messages, across two cores
// ---------------------------------------------------------------------------------------------------

#[test]
fn shared_group_across_two_cores_spreads_messages_each_once() {
    let mut w = World::new(2);
    let members: Vec<Conn> = (0..2)
        .map(|core| {
            let id = w.id_on("sg-member", core);
            subscriber(&mut w, v5(&id, true, 0), "$share/g/sg/t", QoS::AtLeastOnce)
        })
        .collect();
    let plain_id = w.id_on("sg-plain", 1);
    let plain = subscriber(&mut w, v3(&plain_id, true, 0), "sg/+", QoS::AtLeastOnce);
    let publishers: Vec<Conn> = (0..2)
        .map(|core| {
            let id = w.id_on("sg-pub", core);
            w.connect(v3(&id, true, 0)).0
        })
        .collect();
    assert_ne!(members[0].core, members[1].core);

    let n = 20;
    let mut got: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    let mut plain_got = Vec::new();
    for i in 0..n {
        let p = &publishers[i % 2];
        w.send(p, publish("sg/t", QoS::AtLeastOnce, i as u16 + 1, &format!("m{i}")));
        assert_eq!(controls(&w.frames(p)), vec![Packet::PubAck(Ack::ok(i as u16 + 1))]);
        for (k, m) in members.iter().enumerate() {
            let batch = msgs(&w.frames(m));
            got[k].extend(batch.iter().map(|m| m.payload.clone()));
            w.ack_all(m, &batch);
        }
        let pm = msgs(&w.frames(&plain));
        plain_got.extend(pm.iter().map(|m| m.payload.clone()));
        w.ack_all(&plain, &pm);
    }
    let mut all: Vec<String> = got.iter().flatten().cloned().collect();
    all.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(all, want, "every message to exactly one member of the group");
    for (k, g) in got.iter().enumerate() {
        assert!(g.len() >= n / 4, "member {k} (core {}) got {} of {n}: not spread", members[k].core, g.len());
    }
    plain_got.sort();
    assert_eq!(plain_got, want, "a plain subscription gets every message besides the group");

    // A member leaves (its session ends): the other gets everything, at once.
    w.send(&members[0], disconnect());
    for i in 0..6 {
        w.send(&publishers[i % 2], publish("sg/t", QoS::AtLeastOnce, 100 + i as u16, &format!("after{i}")));
    }
    let rest = msgs(&w.frames(&members[1]));
    assert_eq!(
        rest.iter().map(|m| m.payload.as_str()).collect::<Vec<_>>(),
        (0..6).map(|i| format!("after{i}")).collect::<Vec<_>>(),
    );
}

#[test]
fn retained_message_delivered_on_subscribe_on_another_core() {
    let mut w = World::new(2);
    let pub_id = w.id_on("rt-pub", 0);
    let (p, _) = w.connect(v3(&pub_id, true, 0));
    w.send(&p, retained("rt/a", QoS::AtLeastOnce, 1, "keep"));
    assert_eq!(w.frames(&p), vec![Out::Ctl(Packet::PubAck(Ack::ok(1)))]);

    for (core, qos) in [(1, QoS::AtLeastOnce), (0, QoS::AtMostOnce)] {
        let id = w.id_on(&format!("rt-sub-q{}", qos as u8), core);
        let (s, _) = w.connect(v3(&id, true, 0));
        w.send(&s, subscribe(3, "rt/#", qos));
        let f = w.frames(&s);
        assert_eq!(
            f.first(),
            Some(&Out::Ctl(Packet::SubAck(SubAck {
                pkid: 3,
                codes: smallvec![qos as u8],
                reason_string: None
            }))),
            "SUBACK first"
        );
        let got = msgs(&f);
        assert_eq!(got.len(), 1, "core {core}: {f:?}");
        assert_eq!(
            (got[0].topic.as_str(), got[0].payload.as_str(), got[0].qos, got[0].retain),
            ("rt/a", "keep", qos, true),
            "core {core}: the retained message, with RETAIN set (MQTT-3.3.1-6)"
        );
        w.ack_all(&s, &got);
        // A live retained publish to an existing subscription has RETAIN clear (MQTT-3.3.1-9).
        w.send(&p, retained("rt/a", QoS::AtLeastOnce, 2, "live"));
        w.frames(&p);
        let live = msgs(&w.frames(&s));
        assert_eq!(
            live.iter().map(|m| (m.payload.as_str(), m.retain)).collect::<Vec<_>>(),
            vec![("live", false)]
        );
        w.ack_all(&s, &live);
        w.send(&p, retained("rt/a", QoS::AtLeastOnce, 3, "keep"));
        w.frames(&p);
        w.ack_all(&s, &msgs(&w.frames(&s)));
    }

    // An empty retained payload clears it everywhere (MQTT-3.3.1-10).
    w.send(&p, retained("rt/a", QoS::AtLeastOnce, 4, ""));
    for core in 0..2 {
        let id = w.id_on("rt-late", core);
        let (s, _) = w.connect(v3(&id, true, 0));
        w.send(&s, subscribe(1, "rt/#", QoS::AtLeastOnce));
        let f = w.frames(&s);
        assert!(msgs(&f).is_empty(), "core {core}: nothing retained after the clear: {f:?}");
    }
}
