//! Floods under congestion: every QoS 1/2 message the broker acknowledged to a publisher (PUBACK, or
//! PUBCOMP at QoS 2) reaches a subscriber entitled to it — at least once at QoS 1, exactly once at
//! QoS 2 — while subscribers are slow enough that their queues fill and the pause policy
//! (`slow_subscriber = "pause"`, the default) holds publishers.
//!
//! Paths flooded: the plain cross-core path with many publishers, a shared group whose members are
//! all congested (3.1.1 and v5, QoS 1 and 2), members leaving a group mid-flood, a session takeover
//! mid-flood, retained messages plus a live flood on subscribe, and connections handed off to their
//! home core while the cross-core ring is full.
//!
//! Every test runs `--threads 2` with a small `--max-queued-messages`, places the interesting
//! sessions on a chosen core with `home_core`, and checks the shutdown report (nothing dropped, and
//! something held or stalled, so that the congestion the test is about really happened).
//!
//! Publishers and subscribers are rumqttc clients (v4 and v5) driven by tasks of this file rather
//! than `common::Client`: a subscriber must be slow on purpose (its task naps and stalls between
//! polls, so its acknowledgements lag and the broker's queue for it fills), and a publisher must
//! know exactly which messages were acknowledged (it maps packet ids back to messages from its
//! event loop's own events). Under mosquitto the tests are skipped: it drops what does not fit
//! `max_queued_messages`, which is the very loss these tests look for.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{all_stats, skip_unless_coremq, stat_value, Backend, Broker, Settings, SILENCE, WAIT};
use coremq::core::home_core;
use rumqttc::v5::mqttbytes::v5::{
    Packet as Packet5, PubAckReason, PubCompReason, PubRecReason, SubscribeReasonCode as Code5,
};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, timeout_at, Instant};

backend_tests!(
    cross_core_fan_in_flood,
    shared_group_flood_v4_qos1,
    shared_group_flood_v4_qos2,
    shared_group_flood_v5_qos1,
    shared_group_flood_v5_qos2,
    shared_member_unsubscribes_mid_flood,
    shared_members_unsubscribe_and_clean_disconnect_mid_flood,
    takeover_mid_flood_v4,
    takeover_mid_flood_v5,
    retained_plus_live_flood,
    handoff_while_ring_full,
    handoff_while_ring_full_large_queue,
);

/// Broker cores in every test: enough to have a cross-core path, and what the machine has.
const THREADS: usize = 2;
/// The subscriber queue limit: small, so that slow subscribers congest within a few hundred messages.
const QUEUE: u32 = 100;
/// Packet ids a publisher may have unacknowledged: beyond the broker's 1,024 held PUBLISHes per
/// connection (so a held publisher is also one the broker stops reading), yet few enough bytes that a
/// publisher's socket never fills and rumqttc's 5 s flush timeout cannot fire.
const PUB_INFLIGHT: u16 = 2000;
/// Keep-alive long enough that no PINGREQ falls into a test (a held publisher may not be read for a
/// while; rumqttc fails a connection whose PINGRESP is late).
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// Bound on a flood's publishing: every publisher acknowledged. The floods take one to three
/// seconds; this is the budget of a badly loaded machine, not an expectation.
const FLOOD_BOUND: Duration = Duration::from_secs(20);
/// Bound on the receipts still to come once every publisher is acknowledged: what is left is at most
/// the subscribers' queues and what was in transit, which slow subscribers take in well under a second.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Client ids, messages, protocol versions
// ---------------------------------------------------------------------------------------

/// The `nth` client id with `prefix` whose session lives on `core` (of [`THREADS`]).
fn id_on_core(prefix: &str, core: usize, nth: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| home_core(id, THREADS).index() == core)
        .nth(nth)
        .expect("ids hash to every core")
}

/// A message's identity: the publisher's index in the high half, its sequence number in the low one.
/// It is the whole payload, so a receipt names exactly one published message.
fn key(publisher: u32, seq: u32) -> u64 {
    (u64::from(publisher) << 32) | u64::from(seq)
}

fn key_of(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload.try_into().expect("an 8-byte flood payload"))
}

/// "publisher/seq" for failure messages.
fn show(k: u64) -> String {
    format!("{}/{}", k >> 32, k & 0xffff_ffff)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    V4,
    V5,
}

fn qos4(n: u8) -> rumqttc::QoS {
    common::qos(n)
}

fn qos5(n: u8) -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::qos(n).expect("QoS 0..=2")
}

// ---------------------------------------------------------------------------------------
// Receipts
// ---------------------------------------------------------------------------------------

/// Every message every subscriber connection of a test received, counted per connection ("slot").
#[derive(Default)]
struct Receipts {
    slots: Mutex<Vec<(String, HashMap<u64, u32>)>>,
    /// Signalled on every receipt; `notify_one` keeps a permit, so a waiter misses nothing.
    changed: Notify,
}

impl Receipts {
    fn slot(&self, name: &str) -> usize {
        let mut s = self.slots.lock().expect("receipts lock");
        s.push((name.to_string(), HashMap::new()));
        s.len() - 1
    }

    fn record(&self, slot: usize, k: u64) {
        *self.slots.lock().expect("receipts lock")[slot].1.entry(k).or_insert(0) += 1;
        self.changed.notify_one();
    }

    /// How often each message arrived at the connections `slots`, together.
    fn union(&self, slots: &[usize]) -> HashMap<u64, u32> {
        let s = self.slots.lock().expect("receipts lock");
        let mut u = HashMap::new();
        for &i in slots {
            for (&k, &n) in &s[i].1 {
                *u.entry(k).or_insert(0) += n;
            }
        }
        u
    }

    fn missing(&self, slots: &[usize], want: &[u64]) -> Vec<u64> {
        let u = self.union(slots);
        want.iter().copied().filter(|k| !u.contains_key(k)).collect()
    }

    /// "name: count" of each of `slots`, for failure messages.
    fn summary(&self, slots: &[usize]) -> String {
        let s = self.slots.lock().expect("receipts lock");
        let parts: Vec<String> =
            slots.iter().map(|&i| format!("{}: {}", s[i].0, s[i].1.values().sum::<u32>())).collect();
        parts.join(", ")
    }

    /// Waits (until `deadline` at most) for the connections `slots` together to receive every
    /// message of `want`; returns what is still missing then.
    async fn await_all(&self, slots: &[usize], want: &[u64], deadline: Instant) -> Vec<u64> {
        loop {
            let missing = self.missing(slots, want);
            if missing.is_empty() || timeout_at(deadline, self.changed.notified()).await.is_err() {
                return missing;
            }
        }
    }

    /// Waits (until `deadline` at most) for `slots` together to receive every message of `want`;
    /// describes what is missing if they did not.
    async fn check_all(
        &self,
        what: &str,
        slots: &[usize],
        want: &[u64],
        deadline: Instant,
    ) -> Result<(), String> {
        let missing = self.await_all(slots, want, deadline).await;
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{what}: {} of {} acknowledged messages never arrived (first: {:?}); received: {}",
            missing.len(),
            want.len(),
            missing.iter().take(8).map(|&k| show(k)).collect::<Vec<_>>(),
            self.summary(slots)
        ))
    }

    /// Asserts that `slots` together receive every message of `want` within `DRAIN_BOUND`.
    async fn assert_all(&self, what: &str, slots: &[usize], want: &[u64]) {
        if let Err(e) = self.check_all(what, slots, want, Instant::now() + DRAIN_BOUND).await {
            panic!("{e}");
        }
    }

    /// Asserts that no message arrived twice at `slots` together (QoS 2), after giving a late duplicate
    /// `SILENCE` to show up.
    async fn assert_no_duplicates(&self, what: &str, slots: &[usize]) {
        sleep(SILENCE).await;
        let dups: Vec<(String, u32)> =
            self.union(slots).into_iter().filter(|&(_, n)| n > 1).map(|(k, n)| (show(k), n)).collect();
        assert!(
            dups.is_empty(),
            "{what}: {} QoS 2 messages delivered more than once (first: {:?})",
            dups.len(),
            &dups[..dups.len().min(8)]
        );
    }
}

// ---------------------------------------------------------------------------------------
// Slow subscribers
// ---------------------------------------------------------------------------------------

/// How a subscriber is slow: its task naps `nap` after every `every` messages, and stops polling for
/// `stall` once, after `stall_at` messages. Between polls rumqttc neither reads nor acknowledges, so
/// the broker's in-flight window to it stays full and its queue fills.
#[derive(Debug, Clone, Copy)]
struct Pace {
    every: u32,
    nap: Duration,
    stall_at: u32,
    stall: Duration,
}

impl Pace {
    /// Slow throughout, with one longer stall after `stall_at` messages.
    fn slow(stall_at: u32) -> Pace {
        Pace { every: 20, nap: Duration::from_millis(2), stall_at, stall: Duration::from_millis(300) }
    }

    async fn after(&self, n: u32) {
        if n == self.stall_at {
            sleep(self.stall).await;
        } else if n % self.every == 0 {
            sleep(self.nap).await;
        }
    }
}

/// What a subscriber's event loop reports besides PUBLISHes (those go to [`Receipts`]).
#[derive(Debug)]
enum SubEvent {
    ConnAck {
        session_present: bool,
    },
    /// The granted QoS per filter (None: refused).
    SubAck(Vec<Option<u8>>),
    UnsubAck,
    /// The connection ended (closed by the broker, or after our DISCONNECT).
    Closed(String),
}

enum SubCtl {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

enum SubLoop {
    // Boxed: the event loops are large and of very different sizes.
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// One event of either protocol's event loop, as far as a subscriber cares.
enum Ev {
    Publish(u64),
    Other(Option<SubEvent>),
}

impl SubLoop {
    async fn next(&mut self) -> Result<Ev, String> {
        use rumqttc::{Event, Packet};
        match self {
            SubLoop::V4(el) => match el.poll().await.map_err(|e| e.to_string())? {
                Event::Incoming(Packet::Publish(p)) => Ok(Ev::Publish(key_of(&p.payload))),
                Event::Incoming(Packet::ConnAck(c)) => {
                    Ok(Ev::Other(Some(SubEvent::ConnAck { session_present: c.session_present })))
                }
                Event::Incoming(Packet::SubAck(s)) => Ok(Ev::Other(Some(SubEvent::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| match c {
                            rumqttc::SubscribeReasonCode::Success(q) => Some(*q as u8),
                            rumqttc::SubscribeReasonCode::Failure => None,
                        })
                        .collect(),
                )))),
                Event::Incoming(Packet::UnsubAck(_)) => Ok(Ev::Other(Some(SubEvent::UnsubAck))),
                _ => Ok(Ev::Other(None)),
            },
            SubLoop::V5(el) => match el.poll().await.map_err(|e| e.to_string())? {
                rumqttc::v5::Event::Incoming(Packet5::Publish(p)) => Ok(Ev::Publish(key_of(&p.payload))),
                rumqttc::v5::Event::Incoming(Packet5::ConnAck(c)) => {
                    Ok(Ev::Other(Some(SubEvent::ConnAck { session_present: c.session_present })))
                }
                rumqttc::v5::Event::Incoming(Packet5::SubAck(s)) => Ok(Ev::Other(Some(SubEvent::SubAck(
                    s.return_codes
                        .iter()
                        .map(|c| match c {
                            Code5::Success(q) => Some(*q as u8),
                            _ => None,
                        })
                        .collect(),
                )))),
                rumqttc::v5::Event::Incoming(Packet5::UnsubAck(_)) => Ok(Ev::Other(Some(SubEvent::UnsubAck))),
                _ => Ok(Ev::Other(None)),
            },
        }
    }

    /// PUBLISHes rumqttc decoded in the read that ended with the error, not handed out yet: they did
    /// reach the client (and it may have acknowledged them), so they count as received.
    fn take_buffered(&mut self) -> Vec<u64> {
        match self {
            SubLoop::V4(el) => el
                .state
                .events
                .drain(..)
                .filter_map(|e| match e {
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => Some(key_of(&p.payload)),
                    _ => None,
                })
                .collect(),
            SubLoop::V5(el) => el
                .state
                .events
                .drain(..)
                .filter_map(|e| match e {
                    rumqttc::v5::Event::Incoming(Packet5::Publish(p)) => Some(key_of(&p.payload)),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// A subscriber connection whose event loop runs, at its [`Pace`], in a task of its own.
struct Sub {
    name: String,
    slot: usize,
    ctl: SubCtl,
    events: mpsc::UnboundedReceiver<SubEvent>,
    task: JoinHandle<()>,
    session_present: bool,
}

/// Session kind of a subscriber: a clean one, or a persistent one (3.1.1 clean session 0; v5 clean
/// start 0 with a session expiry interval, since v5 ends a session with expiry 0 at disconnect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    Clean,
    Persistent,
}

impl Sub {
    /// Connects `id` and waits for a successful CONNACK; receipts go to a new slot named `id` + `tag`.
    async fn connect(
        port: u16,
        proto: Proto,
        id: &str,
        tag: &str,
        session: Session,
        pace: Pace,
        receipts: &Arc<Receipts>,
    ) -> Sub {
        let clean = session == Session::Clean;
        let (ctl, el) = match proto {
            Proto::V4 => {
                let mut mo = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
                mo.set_clean_session(clean).set_keep_alive(KEEP_ALIVE);
                let (c, el) = rumqttc::AsyncClient::new(mo, 16);
                (SubCtl::V4(c), SubLoop::V4(Box::new(el)))
            }
            Proto::V5 => {
                let mut mo = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
                mo.set_clean_start(clean).set_keep_alive(KEEP_ALIVE);
                if !clean {
                    mo.set_session_expiry_interval(Some(300));
                }
                let (c, el) = rumqttc::v5::AsyncClient::new(mo, 16);
                (SubCtl::V5(c), SubLoop::V5(Box::new(el)))
            }
        };
        let name = format!("{id}{tag}");
        let slot = receipts.slot(&name);
        let (tx, mut events) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_sub(el, slot, receipts.clone(), pace, tx));
        let session_present = match timeout(WAIT, events.recv()).await {
            Ok(Some(SubEvent::ConnAck { session_present })) => session_present,
            other => panic!("{name}: expected CONNACK within {WAIT:?}, got {other:?}"),
        };
        Sub { name, slot, ctl, events, task, session_present }
    }

    async fn next_event(&mut self) -> SubEvent {
        match timeout(WAIT, self.events.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("{}: event loop task ended", self.name),
            Err(_) => panic!("{}: no event within {WAIT:?}", self.name),
        }
    }

    /// Subscribes and waits for a SUBACK granting `qos`.
    async fn subscribe(&mut self, filter: &str, qos: u8) {
        match &self.ctl {
            SubCtl::V4(c) => c.subscribe(filter, qos4(qos)).await.expect("queue SUBSCRIBE"),
            SubCtl::V5(c) => c.subscribe(filter, qos5(qos)).await.expect("queue SUBSCRIBE"),
        }
        match self.next_event().await {
            SubEvent::SubAck(codes) => {
                assert_eq!(codes, vec![Some(qos)], "{}: SUBACK for {filter}", self.name)
            }
            other => panic!("{}: expected SUBACK, got {other:?}", self.name),
        }
    }

    /// Unsubscribes and waits for the UNSUBACK; the connection stays up and keeps reading.
    async fn unsubscribe(&mut self, filter: &str) {
        match &self.ctl {
            SubCtl::V4(c) => c.unsubscribe(filter).await.expect("queue UNSUBSCRIBE"),
            SubCtl::V5(c) => c.unsubscribe(filter).await.expect("queue UNSUBSCRIBE"),
        }
        match self.next_event().await {
            SubEvent::UnsubAck => {}
            other => panic!("{}: expected UNSUBACK, got {other:?}", self.name),
        }
    }

    /// Waits (bounded) until the connection has ended, by the broker's doing or after `disconnect`;
    /// returns how it ended, as rumqttc saw it.
    async fn closed(&mut self) -> String {
        let why = loop {
            match self.next_event().await {
                SubEvent::Closed(why) => break why,
                SubEvent::ConnAck { .. } | SubEvent::SubAck(_) | SubEvent::UnsubAck => {}
            }
        };
        timeout(WAIT, &mut self.task).await.expect("subscriber task ends after its connection").ok();
        why
    }

    /// Sends DISCONNECT (normal, so a clean session ends and no will is sent) and waits for the end.
    async fn disconnect(mut self) {
        match &self.ctl {
            SubCtl::V4(c) => c.disconnect().await.expect("queue DISCONNECT"),
            SubCtl::V5(c) => c.disconnect().await.expect("queue DISCONNECT"),
        }
        self.closed().await;
    }
}

async fn run_sub(
    mut el: SubLoop,
    slot: usize,
    receipts: Arc<Receipts>,
    pace: Pace,
    tx: mpsc::UnboundedSender<SubEvent>,
) {
    let mut n = 0u32;
    loop {
        match el.next().await {
            Ok(Ev::Publish(k)) => {
                receipts.record(slot, k);
                n += 1;
                pace.after(n).await;
            }
            Ok(Ev::Other(Some(e))) => {
                let _ = tx.send(e);
            }
            Ok(Ev::Other(None)) => {}
            // Stop at the first error: polling again would reconnect with the same client id, which
            // would take the session back from a connection that took it over.
            Err(e) => {
                for k in el.take_buffered() {
                    receipts.record(slot, k);
                }
                let _ = tx.send(SubEvent::Closed(e));
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Publishers that know what was acknowledged
// ---------------------------------------------------------------------------------------

/// A publisher's plan: `count` messages from publisher index `idx`, all on `topic` or, with
/// `per_message`, each on `topic/<seq>` (retained messages need topics of their own).
#[derive(Debug, Clone)]
struct PubSpec {
    proto: Proto,
    idx: u32,
    id: String,
    topic: String,
    per_message: bool,
    qos: u8,
    retain: bool,
    count: u32,
}

impl PubSpec {
    fn new(proto: Proto, idx: u32, id: String, topic: &str, qos: u8, count: u32) -> PubSpec {
        PubSpec { proto, idx, id, topic: topic.to_string(), per_message: false, qos, retain: false, count }
    }

    fn topic(&self, seq: u32) -> String {
        if self.per_message {
            format!("{}/{seq}", self.topic)
        } else {
            self.topic.clone()
        }
    }

    /// The keys of this publisher's messages with sequence numbers in `from..`.
    fn keys_from(&self, from: u32) -> Vec<u64> {
        (from..self.count).map(|s| key(self.idx, s)).collect()
    }
}

/// A publisher running in a task. `started` counts messages handed to rumqttc (raised *before* each
/// hand-over, so that a message with `seq >= started` read at some moment was written to the socket
/// after that moment); `acked` counts acknowledgements as they come.
struct Pub {
    spec: PubSpec,
    started: Arc<AtomicU32>,
    acked: watch::Receiver<u32>,
    task: JoinHandle<Result<Vec<u32>, String>>,
}

impl Pub {
    fn start(port: u16, spec: PubSpec) -> Pub {
        let started = Arc::new(AtomicU32::new(0));
        let (tx, acked) = watch::channel(0);
        let task = tokio::spawn(run_pub(port, spec.clone(), started.clone(), tx));
        Pub { spec, started, acked, task }
    }

    /// Waits (bounded) until at least `n` of this publisher's messages are acknowledged.
    async fn acked_at_least(&mut self, n: u32) {
        let id = self.spec.id.clone();
        match timeout(FLOOD_BOUND, self.acked.wait_for(|&a| a >= n)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                let end =
                    (&mut self.task).await.unwrap_or_else(|e| Err(format!("publisher task failed: {e}")));
                panic!("{id}: publisher ended before {n} acknowledgements: {end:?}")
            }
            Err(_) => panic!("{id}: fewer than {n} acknowledgements within {FLOOD_BOUND:?}"),
        }
    }

    async fn finish_now(self) -> Result<Vec<u32>, String> {
        self.task.await.unwrap_or_else(|e| Err(format!("publisher task failed: {e}")))
    }

    /// Waits for the publisher to end and asserts that every one of its messages was acknowledged;
    /// returns their keys.
    async fn finish(self) -> Vec<u64> {
        let spec = self.spec.clone();
        let acked = self.finish_now().await.unwrap_or_else(|e| panic!("{}: {e}", spec.id));
        // The pause policy holds publishers, it never refuses them: every message ends acknowledged.
        assert_eq!(acked.len(), spec.count as usize, "{}: every message acknowledged", spec.id);
        acked.into_iter().map(|s| key(spec.idx, s)).collect()
    }
}

/// What a publisher's event loop reported, in either protocol's terms.
enum PubEv {
    /// A PUBLISH went out with this packet id.
    Sent(u16),
    /// The next request's packet id is still in flight: rumqttc keeps that request back.
    Collided,
    /// The flow of this packet id completed: PUBACK, or PUBCOMP at QoS 2.
    Acked(u16),
    /// A v5 acknowledgement with an error reason code.
    Refused(String),
    Other,
}

/// A publishing connection of either protocol: the client handle and its event loop, both driven by
/// the publisher's task.
enum PubConn {
    // Boxed: the event loops are large and of very different sizes.
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

impl PubConn {
    fn new(port: u16, proto: Proto, id: &str) -> PubConn {
        match proto {
            Proto::V4 => {
                let mut mo = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
                mo.set_keep_alive(KEEP_ALIVE).set_inflight(PUB_INFLIGHT);
                let (c, el) = rumqttc::AsyncClient::new(mo, 64);
                PubConn::V4(c, Box::new(el))
            }
            Proto::V5 => {
                let mut mo = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
                mo.set_keep_alive(KEEP_ALIVE).set_outgoing_inflight_upper_limit(PUB_INFLIGHT);
                let (c, el) = rumqttc::v5::AsyncClient::new(mo, 64);
                PubConn::V5(c, Box::new(el))
            }
        }
    }

    /// Hands a PUBLISH to rumqttc if its request channel has room.
    fn try_publish(&self, topic: String, qos: u8, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            PubConn::V4(c, _) => c.try_publish(topic, qos4(qos), retain, payload).is_ok(),
            PubConn::V5(c, _) => c.try_publish(topic, qos5(qos), retain, payload).is_ok(),
        }
    }

    /// The next event of a publisher at `qos`, or the connection's error.
    async fn next(&mut self, qos: u8) -> Result<PubEv, String> {
        match self {
            PubConn::V4(_, el) => {
                use rumqttc::{Event, Packet};
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Outgoing(Outgoing::Publish(p)) => PubEv::Sent(p),
                    Event::Outgoing(Outgoing::AwaitAck(_)) => PubEv::Collided,
                    Event::Incoming(Packet::PubAck(a)) if qos == 1 => PubEv::Acked(a.pkid),
                    Event::Incoming(Packet::PubComp(c)) if qos == 2 => PubEv::Acked(c.pkid),
                    _ => PubEv::Other,
                })
            }
            PubConn::V5(_, el) => {
                use rumqttc::v5::Event;
                Ok(match el.poll().await.map_err(|e| e.to_string())? {
                    Event::Outgoing(Outgoing::Publish(p)) => PubEv::Sent(p),
                    Event::Outgoing(Outgoing::AwaitAck(_)) => PubEv::Collided,
                    Event::Incoming(Packet5::PubAck(a)) if qos == 1 => match a.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => PubEv::Acked(a.pkid),
                        r => PubEv::Refused(format!("PUBACK {r:?}")),
                    },
                    Event::Incoming(Packet5::PubRec(r)) => match r.reason {
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers => PubEv::Other,
                        r => PubEv::Refused(format!("PUBREC {r:?}")),
                    },
                    Event::Incoming(Packet5::PubComp(c)) if qos == 2 => match c.reason {
                        PubCompReason::Success => PubEv::Acked(c.pkid),
                        r => PubEv::Refused(format!("PUBCOMP {r:?}")),
                    },
                    _ => PubEv::Other,
                })
            }
        }
    }
}

/// Publishes `spec.count` messages as fast as rumqttc's in-flight window allows, and returns the
/// sequence numbers acknowledged (PUBACK; PUBCOMP at QoS 2), or an error once the connection fails or
/// `FLOOD_BOUND` has passed.
///
/// rumqttc assigns packet ids itself; its event loop reports `Outgoing::Publish(pkid)` for requests in
/// the order they were queued, and `Outgoing::AwaitAck(pkid)` when the next id is still in flight
/// (that request is then sent, with its `Outgoing::Publish`, once the id is acknowledged, and no
/// other request is taken meanwhile). Mapping ids back to sequence numbers through those events, a
/// queue per id, keeps the count exact even if the broker acknowledged out of order.
async fn run_pub(
    port: u16,
    s: PubSpec,
    started: Arc<AtomicU32>,
    acked_tx: watch::Sender<u32>,
) -> Result<Vec<u32>, String> {
    let deadline = Instant::now() + FLOOD_BOUND;
    let mut conn = PubConn::new(port, s.proto, &s.id);
    let mut next = 0u32;
    let mut queued: VecDeque<u32> = VecDeque::new();
    let mut collided: Option<u32> = None;
    let mut by_pkid: HashMap<u16, VecDeque<u32>> = HashMap::new();
    let mut acked = Vec::with_capacity(s.count as usize);
    while acked.len() < s.count as usize {
        // Hand rumqttc as many messages as its request channel takes.
        while next < s.count {
            started.store(next + 1, Ordering::SeqCst);
            if !conn.try_publish(s.topic(next), s.qos, s.retain, key(s.idx, next).to_be_bytes().to_vec()) {
                break;
            }
            queued.push_back(next);
            next += 1;
        }
        let ev = match timeout_at(deadline, conn.next(s.qos)).await {
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) => return Err(format!("{} of {} acknowledged, then: {e}", acked.len(), s.count)),
            Err(_) => {
                return Err(format!("{} of {} acknowledged within {FLOOD_BOUND:?}", acked.len(), s.count))
            }
        };
        match ev {
            PubEv::Sent(pkid) => {
                let seq = collided.take().or_else(|| queued.pop_front()).expect("a sent PUBLISH was queued");
                by_pkid.entry(pkid).or_default().push_back(seq);
            }
            PubEv::Collided => {
                assert!(collided.is_none(), "{}: rumqttc holds one collided PUBLISH at a time", s.id);
                collided = queued.pop_front();
            }
            PubEv::Acked(pkid) => {
                let seq = by_pkid.get_mut(&pkid).and_then(VecDeque::pop_front);
                let seq = seq.ok_or_else(|| format!("acknowledgement for packet id {pkid} never sent"))?;
                acked.push(seq);
                acked_tx.send_replace(acked.len() as u32);
            }
            PubEv::Refused(what) => return Err(format!("broker refused a message: {what}")),
            PubEv::Other => {}
        }
    }
    // The connection is dropped without DISCONNECT: nothing is left to send, and the event loop that
    // would send one is not polled again.
    acked.sort_unstable();
    Ok(acked)
}

/// The number of messages each of `pubs` had handed to rumqttc: messages at or beyond these were sent
/// after this call. Taken right after a SUBACK, it says which messages the subscription must get.
fn started_now(pubs: &[Pub]) -> Vec<u32> {
    pubs.iter().map(|p| p.started.load(Ordering::SeqCst)).collect()
}

// ---------------------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------------------

fn start_broker(b: Backend, queue: u32, extra: &[&str]) -> Broker {
    Broker::start_with(
        b,
        &Settings {
            threads: THREADS,
            max_queued_messages: Some(queue),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..Settings::default()
        },
    )
}

/// Stops the broker and checks its shutdown report: nothing dropped, and the counter `busy` (the
/// congestion the test is about: `held` PUBLISHes, `ring stalls`) above zero.
fn stop_and_check(broker: Broker, what: &str, busy: &str) {
    let st = broker.stop();
    let all = all_stats(&st.stdout);
    assert_eq!(all.dropped, 0, "{what}: the broker dropped messages:\n{}", st.stdout);
    let line = st.stdout.lines().find(|l| l.starts_with("all:")).expect("an all: line");
    let n = stat_value(line, busy).unwrap_or_else(|| panic!("no `{busy}` in {line:?}"));
    assert!(n > 0, "{what}: `{busy}` is 0, so the flood never congested the broker: {line}");
}

// ---------------------------------------------------------------------------------------
// 0. The plain path: many publishers on one core, one slow subscriber on the other
// ---------------------------------------------------------------------------------------

/// Twelve publishers on core 0 flood one slow subscriber (`fi/#`, QoS 1) on core 1: the baseline the
/// other scenarios build on, with more publishers than they have, since what core 0 acknowledged and
/// still sends on (held PUBLISHes released at once, what is staged for the ring) grows with their
/// number while the subscriber's overflow room (the queue limit again plus one ring per core) does not.
async fn cross_core_fan_in_flood(b: Backend) {
    if skip_unless_coremq("the pause policy") {
        return;
    }
    let broker = start_broker(b, QUEUE, &[]);
    let receipts = Arc::new(Receipts::default());
    let id = id_on_core("fi-sub", 1, 0);
    let mut sub =
        Sub::connect(broker.port, Proto::V4, &id, "", Session::Clean, Pace::slow(2000), &receipts).await;
    sub.subscribe("fi/#", 1).await;
    let pubs: Vec<Pub> = (0..12u32)
        .map(|p| {
            let id = id_on_core("fi-pub", 0, p as usize);
            Pub::start(broker.port, PubSpec::new(Proto::V4, p, id, &format!("fi/{p}"), 1, 2000))
        })
        .collect();
    let mut want = Vec::new();
    for p in pubs {
        want.extend(p.finish().await);
    }
    receipts.assert_all(&format!("{id}: the whole flood"), &[sub.slot], &want).await;
    sub.disconnect().await;
    stop_and_check(broker, "cross-core fan-in", "held");
}

// ---------------------------------------------------------------------------------------
// 1. A shared group flooded while all its members are slow
// ---------------------------------------------------------------------------------------

const SHARED: &str = "$share/g/flood/#";

/// Three slow members of `$share/g/flood/#` (two on core 0, one on core 1, each stalling once at a
/// different point) and four publishers (two per core) flooding `flood/<p>`: the members' receipts
/// together hold every acknowledged message; at QoS 2 none twice.
async fn shared_group_flood(b: Backend, proto: Proto, qos: u8) {
    if skip_unless_coremq("the pause policy") {
        return;
    }
    let broker = start_broker(b, QUEUE, &[]);
    let receipts = Arc::new(Receipts::default());
    let tag = format!("sg{}{qos}", if proto == Proto::V4 { 4 } else { 5 });
    let mut members = Vec::new();
    for (i, core) in [0, 1, 0].into_iter().enumerate() {
        let id = id_on_core(&format!("{tag}-m"), core, i);
        let pace = Pace::slow(300 * (i as u32 + 1));
        let mut m = Sub::connect(broker.port, proto, &id, "", Session::Clean, pace, &receipts).await;
        m.subscribe(SHARED, qos).await;
        members.push(m);
    }
    let pubs: Vec<Pub> = (0..4u32)
        .map(|p| {
            let id = id_on_core(&format!("{tag}-p"), p as usize % 2, p as usize);
            Pub::start(broker.port, PubSpec::new(proto, p, id, &format!("flood/{p}"), qos, 2500))
        })
        .collect();
    let mut want = Vec::new();
    for p in pubs {
        want.extend(p.finish().await);
    }
    let slots: Vec<usize> = members.iter().map(|m| m.slot).collect();
    receipts.assert_all(&format!("{tag}: the group"), &slots, &want).await;
    if qos == 2 {
        receipts.assert_no_duplicates(&format!("{tag}: the group"), &slots).await;
    }
    for m in members {
        m.disconnect().await;
    }
    stop_and_check(broker, &tag, "held");
}

async fn shared_group_flood_v4_qos1(b: Backend) {
    shared_group_flood(b, Proto::V4, 1).await;
}

async fn shared_group_flood_v4_qos2(b: Backend) {
    shared_group_flood(b, Proto::V4, 2).await;
}

async fn shared_group_flood_v5_qos1(b: Backend) {
    shared_group_flood(b, Proto::V5, 1).await;
}

async fn shared_group_flood_v5_qos2(b: Backend) {
    shared_group_flood(b, Proto::V5, 2).await;
}

// ---------------------------------------------------------------------------------------
// 2. Members leaving a group under load
// ---------------------------------------------------------------------------------------

/// Three slow members (cores 0, 1, 0) of a group flooded at QoS 1 by four publishers. Once a third of
/// the flood has arrived, member 0 unsubscribes (it stays connected and keeps reading: what was
/// queued for it may still come to it) and, with `disconnect`, member 1 disconnects, ending its clean
/// session. Everything any member received, the leavers' share included, must hold every
/// acknowledged message.
async fn members_leave_mid_flood(b: Backend, tag: &str, disconnect: bool) {
    if skip_unless_coremq("the pause policy") {
        return;
    }
    let broker = start_broker(b, QUEUE, &[]);
    let receipts = Arc::new(Receipts::default());
    let mut members = Vec::new();
    for (i, core) in [0, 1, 0].into_iter().enumerate() {
        let id = id_on_core(&format!("{tag}-m"), core, i);
        let mut m =
            Sub::connect(broker.port, Proto::V4, &id, "", Session::Clean, Pace::slow(400), &receipts).await;
        m.subscribe(SHARED, 1).await;
        members.push(m);
    }
    let slots: Vec<usize> = members.iter().map(|m| m.slot).collect();
    let pubs: Vec<Pub> = (0..4u32)
        .map(|p| {
            let id = id_on_core(&format!("{tag}-p"), p as usize % 2, p as usize);
            Pub::start(broker.port, PubSpec::new(Proto::V4, p, id, &format!("flood/{p}"), 1, 2500))
        })
        .collect();
    // "Mid-flood": a third of the 10,000 messages has reached the members.
    let third: Vec<u64> = (0..4).flat_map(|p| (0..2500).map(move |s| key(p, s))).collect();
    let deadline = Instant::now() + FLOOD_BOUND;
    while receipts.union(&slots).len() < third.len() / 3 {
        timeout_at(deadline, receipts.changed.notified()).await.expect("a third of the flood arrives");
    }
    members[0].unsubscribe(SHARED).await;
    if disconnect {
        members.remove(1).disconnect().await;
    }
    let mut want = Vec::new();
    for p in pubs {
        want.extend(p.finish().await);
    }
    receipts.assert_all(&format!("{tag}: all members, leavers included"), &slots, &want).await;
    for m in members {
        m.disconnect().await;
    }
    stop_and_check(broker, tag, "held");
}

async fn shared_member_unsubscribes_mid_flood(b: Backend) {
    members_leave_mid_flood(b, "unsub", false).await;
}

/// One member unsubscribes and another ends its clean session mid-flood. What was queued or in flight
/// for the departed session must go to a remaining member (MQTT 5 §4.8.2: the server SHOULD send it to
/// another client of the group); a broker without that redelivery fails here.
async fn shared_members_unsubscribe_and_clean_disconnect_mid_flood(b: Backend) {
    members_leave_mid_flood(b, "leave", true).await;
}

// ---------------------------------------------------------------------------------------
// 3. Takeover in the middle of a flood
// ---------------------------------------------------------------------------------------

/// A persistent QoS 1 subscriber on core 1, slow, flooded by three publishers (both cores). Once a
/// third of the flood has arrived, a second connection with the same client id and a persistent
/// session takes over (the broker closes the first and resumes the session, resending what was in
/// flight). What the two connections received together holds every acknowledged message.
async fn takeover_mid_flood(b: Backend, proto: Proto) {
    if skip_unless_coremq("the pause policy") {
        return;
    }
    let tag = if proto == Proto::V4 { "tk4" } else { "tk5" };
    let broker = start_broker(b, QUEUE, &[]);
    let receipts = Arc::new(Receipts::default());
    let id = id_on_core(&format!("{tag}-sub"), 1, 0);
    let mut old =
        Sub::connect(broker.port, proto, &id, "#old", Session::Persistent, Pace::slow(500), &receipts).await;
    old.subscribe("tk/#", 1).await;
    let pubs: Vec<Pub> = (0..3u32)
        .map(|p| {
            let pid = id_on_core(&format!("{tag}-p"), p as usize % 2, p as usize);
            Pub::start(broker.port, PubSpec::new(proto, p, pid, &format!("tk/{p}"), 1, 3000))
        })
        .collect();
    let deadline = Instant::now() + FLOOD_BOUND;
    while receipts.union(&[old.slot]).len() < 3000 {
        timeout_at(deadline, receipts.changed.notified()).await.expect("a third of the flood arrives");
    }
    let new =
        Sub::connect(broker.port, proto, &id, "#new", Session::Persistent, Pace::slow(1000), &receipts).await;
    assert!(new.session_present, "{id}: the takeover resumes the session");
    // The broker closes the old connection as part of the takeover.
    let why = old.closed().await;
    eprintln!("{id}: the old connection ended: {why}");
    let mut want = Vec::new();
    for p in pubs {
        want.extend(p.finish().await);
    }
    receipts.assert_all(&format!("{id}: old and new connection"), &[old.slot, new.slot], &want).await;
    new.disconnect().await;
    stop_and_check(broker, tag, "held");
}

async fn takeover_mid_flood_v4(b: Backend) {
    takeover_mid_flood(b, Proto::V4).await;
}

async fn takeover_mid_flood_v5(b: Backend) {
    takeover_mid_flood(b, Proto::V5).await;
}

// ---------------------------------------------------------------------------------------
// 4. Retained messages plus a live flood
// ---------------------------------------------------------------------------------------

/// 3,000 retained QoS 1 messages on `rl/r/<i>` (acknowledged before anyone subscribes), then two
/// publishers (one per core) flood `rl/live`; mid-flood one slow subscriber per core subscribes to
/// `rl/#`. Each must receive every retained message, and every live message sent after its SUBACK —
/// though its queue holds 100 and the retained burst alone is thirty times that.
async fn retained_plus_live_flood(b: Backend) {
    if skip_unless_coremq("the pause policy") {
        return;
    }
    let broker = start_broker(b, QUEUE, &[]);
    let receipts = Arc::new(Receipts::default());
    let retained = PubSpec {
        per_message: true,
        retain: true,
        ..PubSpec::new(Proto::V4, 100, id_on_core("rl-ret", 0, 0), "rl/r", 1, 3000)
    };
    let retained_keys = Pub::start(broker.port, retained).finish().await;
    let mut live: Vec<Pub> = (0..2u32)
        .map(|p| {
            let id = id_on_core("rl-live", p as usize, 0);
            Pub::start(broker.port, PubSpec::new(Proto::V4, p, id, "rl/live", 1, 5000))
        })
        .collect();
    // Mid-flood: both live publishers are well under way.
    for p in &mut live {
        p.acked_at_least(500).await;
    }
    let mut subs = Vec::new();
    for core in 0..THREADS {
        let id = id_on_core("rl-sub", core, 0);
        let mut s =
            Sub::connect(broker.port, Proto::V4, &id, "", Session::Clean, Pace::slow(1500), &receipts).await;
        s.subscribe("rl/#", 1).await;
        subs.push((started_now(&live), s));
    }
    let specs: Vec<PubSpec> = live.iter().map(|p| p.spec.clone()).collect();
    for p in live {
        p.finish().await;
    }
    for (from, s) in &subs {
        let mut want = retained_keys.clone();
        for (spec, &f) in specs.iter().zip(from) {
            want.extend(spec.keys_from(f));
        }
        receipts.assert_all(&format!("{}: retained and live after SUBACK", s.name), &[s.slot], &want).await;
    }
    for (_, s) in subs {
        s.disconnect().await;
    }
    stop_and_check(broker, "retained plus live", "held");
}

// ---------------------------------------------------------------------------------------
// 5. Hand-offs while the ring is full
// ---------------------------------------------------------------------------------------

/// Rings of two slots; four publishers on core 0 flood a slow subscriber on core 1, so the 0→1 ring
/// is full most of the time. Meanwhile eight more subscribers whose sessions live on core 1 connect
/// one after another: the kernel hands each connection to either core, and those accepted by core 0
/// travel to core 1 through that full ring (a hand-off is an `XMsg` like a publish). Each one must get
/// every message sent after its SUBACK; the first one everything.
///
/// Which core accepts is the kernel's choice (an `SO_REUSEPORT` hash with a random secret), so that
/// at least one of the eight goes through core 0 is likely (255 in 256), not certain.
///
/// With `queue` small, the subscribers congest too, and what the pause policy lets in after the
/// congestion (its overflow room: the limit again plus one ring per core) is small as well.
async fn handoff_with_ring_full(b: Backend, queue: u32) {
    if skip_unless_coremq("--ring-capacity") {
        return;
    }
    let broker = start_broker(b, queue, &["--ring-capacity", "2"]);
    let receipts = Arc::new(Receipts::default());
    let mut first = Sub::connect(
        broker.port,
        Proto::V4,
        &id_on_core("ho-sub", 1, 0),
        "",
        Session::Clean,
        Pace::slow(2000),
        &receipts,
    )
    .await;
    first.subscribe("ho/#", 1).await;
    let mut pubs: Vec<Pub> = (0..4u32)
        .map(|p| {
            let id = id_on_core("ho-pub", 0, p as usize);
            Pub::start(broker.port, PubSpec::new(Proto::V4, p, id, &format!("ho/{p}"), 1, 2500))
        })
        .collect();
    let mut late = Vec::new();
    for i in 0..8u32 {
        // Spread the arrivals over the flood: each after another 250 messages of publisher 0.
        pubs[0].acked_at_least(250 * (i + 1)).await;
        let pace = Pace::slow(1000);
        let id = id_on_core("ho-late", 1, i as usize);
        let mut s = Sub::connect(broker.port, Proto::V4, &id, "", Session::Clean, pace, &receipts).await;
        s.subscribe("ho/#", 1).await;
        late.push((started_now(&pubs), s));
    }
    let specs: Vec<PubSpec> = pubs.iter().map(|p| p.spec.clone()).collect();
    let mut want = Vec::new();
    for p in pubs {
        want.extend(p.finish().await);
    }
    // Every subscriber is checked, against one deadline, before failing, so that a failure says
    // which of them lost.
    let deadline = Instant::now() + DRAIN_BOUND;
    let mut failures = Vec::new();
    let what = format!("{}: the whole flood", first.name);
    failures.extend(receipts.check_all(&what, &[first.slot], &want, deadline).await.err());
    for (from, s) in &late {
        let want: Vec<u64> = specs.iter().zip(from).flat_map(|(spec, &f)| spec.keys_from(f)).collect();
        let what = format!("{}: everything after its SUBACK", s.name);
        failures.extend(receipts.check_all(&what, &[s.slot], &want, deadline).await.err());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    first.disconnect().await;
    for (_, s) in late {
        s.disconnect().await;
    }
    stop_and_check(broker, "hand-off while the ring is full", "ring stalls");
}

async fn handoff_while_ring_full(b: Backend) {
    handoff_with_ring_full(b, 200).await;
}

/// The same with a queue that never fills (as in `tests/backpressure.rs`): only the rings hold
/// publishers back, so a loss here is the hand-off's or the ring's, not the queue limit's.
async fn handoff_while_ring_full_large_queue(b: Backend) {
    handoff_with_ring_full(b, 1_000_000).await;
}
