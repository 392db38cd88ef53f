//! Tests of the session journal: replaying [`super::Change`]s rebuilds the same session.
//!
//! A property test runs random operation sequences on a journaled session, drains the journal after every
//! operation and replays it onto fresh sessions, which must then behave exactly like the original: the
//! same counts, the same frames on a resume, and the same frames for every later operation. The same is
//! checked for a session rebuilt from [`Session::snapshot`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::{Change, Delivered, Limits, Message, MsgProps, OutFrame, Outbox, Session, SubIds};
use crate::protocol::{Packet, QoS, Utf8Bytes};

/// An outbox frame reduced to what a client sees of it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum F {
    Pub {
        topic: String,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
        sub_ids: Vec<u32>,
        len: usize,
    },
    Rel(u16),
    Rec(u16, u8),
    Comp(u16, u8),
    /// Not a frame: what `deliver` returned.
    Delivered(Delivered),
    /// Not a frame: whether an inbound QoS 2 PUBLISH was to be routed.
    Routed(bool),
    Other(String),
}

fn drain(out: &mut Outbox) -> Vec<F> {
    out.drain(..)
        .map(|f| match f {
            OutFrame::Publish { msg, qos, pkid, dup, retain, sub_ids } => F::Pub {
                topic: msg.topic.as_str().to_owned(),
                qos,
                pkid,
                dup,
                retain,
                sub_ids: sub_ids.to_vec(),
                len: msg.payload.len(),
            },
            OutFrame::Control(Packet::PubRel(a)) => F::Rel(a.pkid),
            OutFrame::Control(Packet::PubRec(a)) => F::Rec(a.pkid, a.reason),
            OutFrame::Control(Packet::PubComp(a)) => F::Comp(a.pkid, a.reason),
            other => F::Other(format!("{other:?}")),
        })
        .collect()
}

/// One thing that can happen to a session. Acknowledgements pick a packet id with `pick`: most picks are
/// ids the session has used (valid or not for that ack, depending on its state), the rest are strays.
#[derive(Clone, Debug)]
enum Op {
    Deliver {
        qos: QoS,
        len: usize,
        retain: bool,
        expiry_s: Option<u64>,
        ids: u8,
    },
    PubAck(u8),
    PubRec(u8),
    PubRecRefused(u8),
    PubComp(u8),
    /// Time moves on by this many seconds, then queued messages expire.
    Expire(u64),
    Inbound(u16),
    InboundRefused(u16),
    PubRel(u16),
    Disconnect,
    /// The client comes back: `resume`.
    Reconnect,
    /// Rebuild a session from the journal so far, and one from a snapshot; from then on they must do
    /// what the original does.
    Restart,
}

fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (arb_qos(), 0usize..12, any::<bool>(), proptest::option::of(1u64..5), 0u8..3)
            .prop_map(|(qos, len, retain, expiry_s, ids)| Op::Deliver { qos, len, retain, expiry_s, ids }),
        3 => any::<u8>().prop_map(Op::PubAck),
        3 => any::<u8>().prop_map(Op::PubRec),
        1 => any::<u8>().prop_map(Op::PubRecRefused),
        3 => any::<u8>().prop_map(Op::PubComp),
        1 => (0u64..4).prop_map(Op::Expire),
        1 => (1u16..5).prop_map(Op::Inbound),
        1 => (1u16..5).prop_map(Op::InboundRefused),
        1 => (1u16..5).prop_map(Op::PubRel),
        1 => Just(Op::Disconnect),
        1 => Just(Op::Reconnect),
        1 => Just(Op::Restart),
    ]
}

fn arb_limits() -> impl Strategy<Value = Limits> {
    (1u16..4, 0usize..6, 0usize..60, 0usize..3, 0usize..20).prop_map(|(i, m, b, om, ob)| Limits {
        max_inflight: i,
        max_queued_messages: m,
        max_queued_bytes: b,
        overflow_messages: om,
        overflow_bytes: ob,
    })
}

/// A fresh session with the changes replayed onto it, journaling like a recovered session would.
fn replayed(limits: Limits, changes: &[Change]) -> Session {
    let mut s = Session::new(Utf8Bytes::from_static("client"), false, limits);
    for c in changes {
        s.apply(c.clone());
    }
    s.enable_journal();
    s
}

fn counts(s: &Session) -> (usize, usize, usize, usize) {
    (s.inflight_len(), s.queued_len(), s.queued_bytes(), s.inbound_qos2_len())
}

/// The original session, the sessions rebuilt from it, and what the test knows of the client's view.
struct Harness {
    limits: Limits,
    now: Instant,
    online: bool,
    next_msg: u32,
    /// Packet ids seen in the original's frames, for acknowledgements to pick from.
    pkids: Vec<u16>,
    original: Session,
    /// Every change drained from the original, in order.
    journal: Vec<Change>,
    /// Rebuilt from the drained changes only, one operation behind nothing: it is never operated on.
    mirror: Session,
    /// Rebuilt at a `Restart` (from the journal, or from a snapshot) and operated on in lockstep.
    twins: Vec<Twin>,
}

/// A rebuilt session run in lockstep with the original.
struct Twin {
    name: &'static str,
    session: Session,
    /// `None`: packet ids must be the original's. `Some` for a session rebuilt from a snapshot, which does
    /// not carry the original's next packet id (replaying `Sent` sets it from the *last flow in the
    /// window*, not from the last id allocated): its new flows may get other (equally valid) ids, so those
    /// are renamed before comparing.
    rename: Option<Rename>,
}

impl Twin {
    fn new(name: &'static str, session: Session, renamed: bool) -> Twin {
        Twin { name, session, rename: renamed.then(Rename::default) }
    }

    /// The packet id the twin knows the original's `pkid` by.
    fn pkid(&self, pkid: u16) -> u16 {
        self.rename.as_ref().map_or(pkid, |r| r.to_twin(pkid))
    }

    /// Checks the twin's frames against the original's, learning renamed ids from fresh PUBLISHes.
    fn check(&mut self, mut got: Vec<F>, want: &[F], what: &dyn std::fmt::Debug) {
        if let Some(r) = &mut self.rename {
            for (g, w) in got.iter_mut().zip(want) {
                match (g, w) {
                    (F::Pub { pkid: t, dup: false, .. }, F::Pub { pkid: o, dup: false, .. }) if *t != 0 => {
                        r.pair(*o, *t);
                        *t = *o;
                    }
                    (F::Pub { pkid: t, .. } | F::Rel(t), _) => *t = r.to_orig(*t),
                    _ => {}
                }
            }
        }
        assert_eq!(got, want, "{} twin diverged on {what:?}", self.name);
    }
}

/// A bijection between the original's packet ids and a twin's, for flows begun after the twin was built.
#[derive(Default)]
struct Rename {
    to_twin: HashMap<u16, u16>,
    to_orig: HashMap<u16, u16>,
}

impl Rename {
    fn pair(&mut self, orig: u16, twin: u16) {
        if let Some(t) = self.to_twin.remove(&orig) {
            self.to_orig.remove(&t);
        }
        if let Some(o) = self.to_orig.remove(&twin) {
            self.to_twin.remove(&o);
        }
        self.to_twin.insert(orig, twin);
        self.to_orig.insert(twin, orig);
    }

    fn to_twin(&self, orig: u16) -> u16 {
        match self.to_twin.get(&orig) {
            Some(&t) => t,
            // The twin uses this id for another of the original's flows: an id no flow has stands in.
            None if self.to_orig.contains_key(&orig) => 0,
            None => orig,
        }
    }

    fn to_orig(&self, twin: u16) -> u16 {
        self.to_orig.get(&twin).copied().unwrap_or(twin)
    }
}

impl Harness {
    fn new(limits: Limits) -> Harness {
        let mut original = Session::new(Utf8Bytes::from_static("client"), false, limits);
        original.enable_journal();
        Harness {
            limits,
            now: Instant::now(),
            online: true,
            next_msg: 0,
            pkids: Vec::new(),
            original,
            journal: Vec::new(),
            mirror: replayed(limits, &[]),
            twins: Vec::new(),
        }
    }

    fn pick(&self, sel: u8) -> u16 {
        match self.pkids.len() {
            n if n > 0 && sel < 200 => self.pkids[usize::from(sel) % n],
            _ => 1000 + u16::from(sel),
        }
    }

    fn msg(&mut self, qos: QoS, len: usize, expiry_s: Option<u64>) -> Message {
        self.next_msg += 1;
        let expires = expiry_s.map(|s| self.now + Duration::from_secs(s));
        Message {
            topic: Utf8Bytes::copy_from_str(&format!("m/{}", self.next_msg)),
            payload: Bytes::from(vec![0x5A; len]),
            qos,
            retain: false,
            received: self.now,
            props: expires.map(|e| Arc::new(MsgProps { forward: Bytes::new(), expires: Some(e) })),
        }
    }

    /// Runs `op` on one session; returns its frames.
    fn run(s: &mut Session, op: &Op, pkid: u16, msg: Option<&Message>, online: bool, now: Instant) -> Vec<F> {
        let mut out = Outbox::new();
        match *op {
            Op::Deliver { qos, retain, ids, .. } => {
                let sub_ids: SubIds = (1..=u32::from(ids)).collect();
                let msg = msg.expect("a message to deliver").clone();
                let got = s.deliver_with(msg, qos, retain, sub_ids, online.then_some(&mut out));
                // What became of it is part of the behaviour too.
                let mut f = drain(&mut out);
                f.push(F::Delivered(got));
                return f;
            }
            Op::PubAck(_) => s.on_puback(pkid, &mut out),
            Op::PubRec(_) => s.on_pubrec(pkid, &mut out),
            Op::PubRecRefused(_) => s.on_pubrec_refused(pkid, &mut out),
            Op::PubComp(_) => s.on_pubcomp(pkid, &mut out),
            Op::Expire(_) => s.expire(now),
            Op::Inbound(id) => {
                let routed = s.on_inbound_qos2(id, &mut out);
                let mut f = drain(&mut out);
                f.push(F::Routed(routed));
                return f;
            }
            Op::InboundRefused(id) => {
                s.on_inbound_qos2_reason(id, 0x87, &mut out);
            }
            Op::PubRel(id) => s.on_pubrel(id, &mut out),
            Op::Reconnect => s.resume(&mut out),
            Op::Disconnect | Op::Restart => {}
        }
        drain(&mut out)
    }

    fn step(&mut self, op: &Op) {
        if let Op::Expire(secs) = op {
            self.now += Duration::from_secs(*secs);
        }
        let msg = match *op {
            Op::Deliver { qos, len, expiry_s, .. } => Some(self.msg(qos, len, expiry_s)),
            _ => None,
        };
        let pkid = match *op {
            Op::PubAck(sel) | Op::PubRec(sel) | Op::PubRecRefused(sel) | Op::PubComp(sel) => self.pick(sel),
            _ => 0,
        };
        let online = match op {
            Op::Disconnect => false,
            Op::Reconnect => true,
            _ => self.online,
        };
        let frames = Self::run(&mut self.original, op, pkid, msg.as_ref(), online, self.now);
        for f in &frames {
            if let F::Pub { pkid, .. } | F::Rel(pkid) = f {
                if *pkid != 0 && !self.pkids.contains(pkid) {
                    self.pkids.push(*pkid);
                }
            }
        }
        for twin in &mut self.twins {
            let id = twin.pkid(pkid);
            let got = Self::run(&mut twin.session, op, id, msg.as_ref(), online, self.now);
            twin.check(got, &frames, op);
            assert_eq!(
                counts(&twin.session),
                counts(&self.original),
                "{} twin counts after {op:?}",
                twin.name
            );
            // Recovered sessions journal too; what they record is not compared (message numbers may
            // differ), only drained so that it does not grow.
            twin.session.drain_journal(&mut Vec::new());
        }
        self.online = online;
        let mut changes = Vec::new();
        self.original.drain_journal(&mut changes);
        for c in &changes {
            self.mirror.apply(c.clone());
        }
        self.journal.extend(changes);
        assert_eq!(counts(&self.mirror), counts(&self.original), "mirror counts after {op:?}");
        if let Op::Restart = op {
            self.twins.push(Twin::new("journal", replayed(self.limits, &self.journal), false));
            let mut snap = Vec::new();
            self.original.snapshot(self.now, &mut snap);
            self.twins.push(Twin::new("snapshot", replayed(self.limits, &snap), true));
            for twin in &self.twins {
                assert_eq!(
                    counts(&twin.session),
                    counts(&self.original),
                    "{} twin counts at restart",
                    twin.name
                );
            }
        }
    }

    /// Final check: sessions rebuilt now from the whole journal and from a snapshot resume exactly like the
    /// original (and like every twin).
    fn finish(mut self) {
        let mut snap = Vec::new();
        self.original.snapshot(self.now, &mut snap);
        self.twins.push(Twin::new("final journal", replayed(self.limits, &self.journal), false));
        self.twins.push(Twin::new("final snapshot", replayed(self.limits, &snap), true));
        let mirror = std::mem::replace(&mut self.mirror, replayed(self.limits, &[]));
        self.twins.push(Twin::new("mirror", mirror, false));
        for twin in &self.twins {
            assert_eq!(counts(&twin.session), counts(&self.original), "{} counts before resume", twin.name);
        }
        let op = Op::Reconnect;
        let frames = Self::run(&mut self.original, &op, 0, None, true, self.now);
        assert!(frames.iter().all(|f| matches!(f, F::Pub { .. } | F::Rel(_))));
        for twin in &mut self.twins {
            let got = Self::run(&mut twin.session, &op, 0, None, true, self.now);
            twin.check(got, &frames, &"the final resume");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn replaying_the_journal_rebuilds_the_session(
        limits in arb_limits(),
        ops in proptest::collection::vec(arb_op(), 1..60),
    ) {
        let mut h = Harness::new(limits);
        for op in &ops {
            h.step(op);
        }
        h.finish();
    }
}
