//! Tests of the session's QoS 1/2 state machines against MQTT 3.1.1 (section 4.3 for the flows,
//! 4.4 for redelivery on reconnect, 4.6 for ordering), plus a property test that runs random
//! operation sequences against a small model of what the client sees.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;

use super::{Delivered, Limits, Message, OutFrame, Outbox, Session};
use crate::protocol::{Packet, QoS, Utf8Bytes};

/// An outbox frame reduced to what the tests compare. Messages are identified by a number carried in
/// their topic (`m/<n>`), so a frame can be traced back to the `deliver` call that produced it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum F {
    Pub {
        id: u32,
        qos: QoS,
        pkid: u16,
        dup: bool,
        retain: bool,
    },
    Rel(u16),
    Rec(u16),
    Comp(u16),
    /// Anything the session should never emit (shared QoS 0 frames, other control packets).
    Other(String),
}

fn limits(max_inflight: u16, max_queued_messages: usize, max_queued_bytes: usize) -> Limits {
    Limits { max_inflight, max_queued_messages, max_queued_bytes, overflow_messages: 0, overflow_bytes: 0 }
}

fn session(l: Limits) -> Session {
    Session::new(Utf8Bytes::from_static("client"), false, l)
}

/// Message number `id` with a payload of `len` bytes.
fn msg(id: u32, len: usize, qos: QoS) -> Message {
    Message {
        topic: Utf8Bytes::copy_from_str(&format!("m/{id}")),
        payload: Bytes::from(vec![0xA5; len]),
        qos,
        retain: false,
        received: Instant::now(),
        props: None,
    }
}

fn id_of(m: &Message) -> u32 {
    m.topic.as_str().strip_prefix("m/").and_then(|n| n.parse().ok()).expect("test topic")
}

/// Takes every frame out of the outbox.
fn drain(out: &mut Outbox) -> Vec<F> {
    out.drain(..)
        .map(|f| match f {
            OutFrame::Publish { msg, qos, pkid, dup, retain, .. } => {
                assert_eq!(msg.qos, qos, "tests always deliver at the message's own QoS");
                F::Pub { id: id_of(&msg), qos, pkid, dup, retain }
            }
            OutFrame::Control(Packet::PubRel(p)) => F::Rel(p.pkid),
            OutFrame::Control(Packet::PubRec(p)) => F::Rec(p.pkid),
            OutFrame::Control(Packet::PubComp(p)) => F::Comp(p.pkid),
            other => F::Other(format!("{other:?}")),
        })
        .collect()
}

/// Delivers message `id` (payload `len` bytes) at `qos`, connected when `out` is `Some`.
fn give(s: &mut Session, id: u32, len: usize, qos: QoS, out: Option<&mut Outbox>) -> Delivered {
    s.deliver(msg(id, len, qos), qos, false, out)
}

/// The single frame in `out`, which must be a fresh (non-dup) PUBLISH of message `id`: returns its pkid.
fn sent_one(out: &mut Outbox, id: u32, qos: QoS) -> u16 {
    let frames = drain(out);
    let [F::Pub { id: got, qos: q, pkid, dup: false, retain: false }] = frames[..] else {
        panic!("expected one fresh PUBLISH of message {id}, got {frames:?}");
    };
    assert_eq!((got, q), (id, qos));
    pkid
}

fn pubs(id: u32, qos: QoS, pkid: u16, dup: bool) -> F {
    F::Pub { id, qos, pkid, dup, retain: false }
}

// ---------------------------------------------------------------------------------------------------
// QoS 0

#[test]
fn qos0_is_sent_at_once_with_no_packet_id_and_not_tracked() {
    let mut s = session(limits(1, 10, 1000));
    let mut out = Outbox::new();
    assert_eq!(s.deliver(msg(1, 3, QoS::AtMostOnce), QoS::AtMostOnce, true, Some(&mut out)), Delivered::Sent);
    assert_eq!(
        drain(&mut out),
        vec![F::Pub { id: 1, qos: QoS::AtMostOnce, pkid: 0, dup: false, retain: true }]
    );
    assert_eq!(s.inflight_len(), 0);
    // A full window holds back QoS 1/2 only: QoS 0 has no flow to wait for.
    assert_eq!(give(&mut s, 2, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Sent);
    sent_one(&mut out, 2, QoS::AtLeastOnce);
    assert_eq!(give(&mut s, 3, 3, QoS::AtMostOnce, Some(&mut out)), Delivered::Sent);
    assert_eq!(sent_one(&mut out, 3, QoS::AtMostOnce), 0);
}

// ---------------------------------------------------------------------------------------------------
// QoS 1 (MQTT 4.3.2)

#[test]
fn qos1_publish_then_puback_frees_the_slot() {
    let mut s = session(limits(1, 10, 1000));
    let mut out = Outbox::new();
    assert_eq!(
        s.deliver(msg(1, 5, QoS::AtLeastOnce), QoS::AtLeastOnce, true, Some(&mut out)),
        Delivered::Sent
    );
    let frames = drain(&mut out);
    let [F::Pub { id: 1, qos: QoS::AtLeastOnce, pkid, dup: false, retain: true }] = frames[..] else {
        panic!("expected a fresh QoS 1 PUBLISH, got {frames:?}");
    };
    assert_ne!(pkid, 0, "MQTT-2.3.1-1: QoS 1 PUBLISH carries a non-zero packet id");
    assert_eq!(s.inflight_len(), 1);

    // The window (1) is full: the next one waits.
    assert_eq!(give(&mut s, 2, 5, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert!(out.is_empty());

    s.on_puback(pkid, &mut out);
    let pkid2 = sent_one(&mut out, 2, QoS::AtLeastOnce);
    assert_ne!(pkid2, pkid);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (1, 0, 0));

    s.on_puback(pkid2, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 0);
}

#[test]
fn unknown_or_repeated_puback_is_ignored() {
    let mut s = session(limits(2, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::AtLeastOnce, Some(&mut out));
    let pkid = sent_one(&mut out, 1, QoS::AtLeastOnce);

    for stray in [0, pkid.wrapping_add(1), 777, u16::MAX] {
        s.on_puback(stray, &mut out);
        assert!(out.is_empty(), "no answer to a PUBACK for {stray}");
        assert_eq!(s.inflight_len(), 1, "a PUBACK for {stray} must not free {pkid}");
    }
    // PUBREC / PUBCOMP are not QoS 1 answers.
    s.on_pubrec(pkid, &mut out);
    s.on_pubcomp(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);

    s.on_puback(pkid, &mut out);
    assert_eq!(s.inflight_len(), 0);
    s.on_puback(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 0);
}

// ---------------------------------------------------------------------------------------------------
// QoS 2 (MQTT 4.3.3)

#[test]
fn qos2_publish_pubrec_pubrel_pubcomp() {
    let mut s = session(limits(1, 10, 1000));
    let mut out = Outbox::new();
    assert_eq!(give(&mut s, 1, 4, QoS::ExactlyOnce, Some(&mut out)), Delivered::Sent);
    let pkid = sent_one(&mut out, 1, QoS::ExactlyOnce);
    assert_ne!(pkid, 0);
    assert_eq!(give(&mut s, 2, 4, QoS::ExactlyOnce, Some(&mut out)), Delivered::Queued);

    // PUBCOMP before PUBREC is for the wrong stage: ignored, the flow stays open.
    s.on_pubcomp(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);
    // So is PUBACK for a QoS 2 flow.
    s.on_puback(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);

    s.on_pubrec(pkid, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(pkid)], "MQTT-4.3.3-1: PUBREL answers PUBREC");
    assert_eq!(s.inflight_len(), 1, "the slot is held until PUBCOMP");

    // A duplicate PUBREC (our PUBREL may have been lost) is answered with PUBREL again.
    s.on_pubrec(pkid, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(pkid)]);
    assert_eq!(s.inflight_len(), 1);
    // PUBACK is still no answer for it.
    s.on_puback(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);

    s.on_pubcomp(pkid, &mut out);
    let pkid2 = sent_one(&mut out, 2, QoS::ExactlyOnce);
    assert_ne!(pkid2, pkid);
    assert_eq!((s.inflight_len(), s.queued_len()), (1, 0));

    // The completed flow is gone: a late PUBREC / PUBCOMP for it is ignored.
    s.on_pubrec(pkid, &mut out);
    s.on_pubcomp(pkid, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);

    s.on_pubrec(pkid2, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(pkid2)]);
    s.on_pubcomp(pkid2, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 0);
    s.on_pubcomp(pkid2, &mut out);
    s.on_pubrec(pkid2, &mut out);
    assert!(out.is_empty());
}

#[test]
fn qos2_unknown_pubrec_and_pubcomp_are_ignored() {
    let mut s = session(limits(4, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::ExactlyOnce, Some(&mut out));
    let pkid = sent_one(&mut out, 1, QoS::ExactlyOnce);
    for stray in [0, pkid.wrapping_add(1), u16::MAX] {
        s.on_pubrec(stray, &mut out);
        s.on_pubcomp(stray, &mut out);
    }
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);
}

// ---------------------------------------------------------------------------------------------------
// In-flight window and queue

#[test]
fn window_of_two_queues_the_third_and_acks_release_in_order() {
    let mut s = session(limits(2, 10, 1000));
    let mut out = Outbox::new();
    assert_eq!(give(&mut s, 1, 1, QoS::AtLeastOnce, Some(&mut out)), Delivered::Sent);
    assert_eq!(give(&mut s, 2, 1, QoS::ExactlyOnce, Some(&mut out)), Delivered::Sent);
    let frames = drain(&mut out);
    let [F::Pub { id: 1, pkid: p1, .. }, F::Pub { id: 2, pkid: p2, .. }] = frames[..] else {
        panic!("{frames:?}");
    };
    assert!(p1 != 0 && p2 != 0 && p1 != p2);
    for id in 3..=6 {
        let qos = if id % 2 == 0 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        assert_eq!(give(&mut s, id, 2, qos, Some(&mut out)), Delivered::Queued);
    }
    // A QoS 0 message behind the queue waits too, so it does not overtake (MQTT 4.6 ordering).
    assert_eq!(give(&mut s, 7, 2, QoS::AtMostOnce, Some(&mut out)), Delivered::Queued);
    assert!(out.is_empty());
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 5, 10));

    // Each completed flow lets exactly the next queued message in.
    s.on_puback(p1, &mut out);
    let p3 = sent_one(&mut out, 3, QoS::AtLeastOnce);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 4, 8));
    s.on_puback(p3, &mut out);
    let p4 = sent_one(&mut out, 4, QoS::ExactlyOnce);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 3, 6));

    // Finish message 4 before message 2 (the oldest flow): each completion frees one slot.
    s.on_pubrec(p4, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p4)]);
    s.on_pubcomp(p4, &mut out);
    let p5 = sent_one(&mut out, 5, QoS::AtLeastOnce);
    s.on_pubrec(p2, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p2)]);
    s.on_pubcomp(p2, &mut out);
    // Message 6 takes the freed slot; message 7 (QoS 0) then reaches the head and goes out at once in
    // the same pump, without needing a slot of its own.
    let frames = drain(&mut out);
    let [F::Pub { id: 6, qos: QoS::ExactlyOnce, pkid: p6, dup: false, .. }, F::Pub { id: 7, qos: QoS::AtMostOnce, pkid: 0, dup: false, .. }] =
        frames[..]
    else {
        panic!("{frames:?}");
    };
    assert!(p6 != 0 && p6 != p5);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 0, 0));

    s.on_puback(p5, &mut out);
    assert!(out.is_empty());
    assert_eq!(s.inflight_len(), 1);
    s.on_pubrec(p6, &mut out);
    s.on_pubcomp(p6, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p6)]);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (0, 0, 0));
}

#[test]
fn queue_count_limit_drops_the_newest() {
    let mut s = session(limits(1, 2, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 3, QoS::AtLeastOnce, Some(&mut out));
    let p1 = sent_one(&mut out, 1, QoS::AtLeastOnce);
    assert_eq!(give(&mut s, 2, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!(give(&mut s, 3, 3, QoS::AtMostOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!(give(&mut s, 4, 3, QoS::ExactlyOnce, Some(&mut out)), Delivered::Dropped);
    assert_eq!(give(&mut s, 5, 0, QoS::AtMostOnce, Some(&mut out)), Delivered::Dropped);
    assert!(out.is_empty());
    assert_eq!(s.dropped, 2);
    assert_eq!((s.queued_len(), s.queued_bytes()), (2, 6));

    // The survivors are the oldest two, sent in order; the dropped ones never appear.
    s.on_puback(p1, &mut out);
    let frames = drain(&mut out);
    assert!(
        matches!(frames[..], [F::Pub { id: 2, dup: false, .. }, F::Pub { id: 3, pkid: 0, .. }]),
        "{frames:?}"
    );
    assert_eq!((s.queued_len(), s.queued_bytes()), (0, 0));
    // Room again.
    assert_eq!(give(&mut s, 6, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!((s.queued_len(), s.queued_bytes(), s.dropped), (1, 3, 2));
}

#[test]
fn queue_byte_limit_drops_the_newest_and_counts_exactly() {
    let mut s = session(limits(1, 100, 10));
    let mut out = Outbox::new();
    give(&mut s, 1, 50, QoS::AtLeastOnce, Some(&mut out)); // in flight: not counted against the queue
    let p1 = sent_one(&mut out, 1, QoS::AtLeastOnce);
    assert_eq!(give(&mut s, 2, 4, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!(give(&mut s, 3, 4, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!(give(&mut s, 4, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Dropped, "4+4+3 > 10");
    assert_eq!(give(&mut s, 5, 2, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued, "4+4+2 = 10 fits");
    assert_eq!(give(&mut s, 6, 0, QoS::AtMostOnce, Some(&mut out)), Delivered::Queued, "empty payload fits");
    assert_eq!(give(&mut s, 7, 1, QoS::AtMostOnce, Some(&mut out)), Delivered::Dropped);
    assert_eq!((s.queued_len(), s.queued_bytes(), s.dropped), (4, 10, 2));
    assert!(out.is_empty());

    s.on_puback(p1, &mut out);
    let p2 = sent_one(&mut out, 2, QoS::AtLeastOnce);
    assert_eq!((s.queued_len(), s.queued_bytes()), (3, 6));
    s.on_puback(p2, &mut out);
    let p3 = sent_one(&mut out, 3, QoS::AtLeastOnce);
    assert_eq!((s.queued_len(), s.queued_bytes()), (2, 2));
    s.on_puback(p3, &mut out);
    // Message 5 fills the window and the QoS 0 message 6 behind it goes along.
    let frames = drain(&mut out);
    let [F::Pub { id: 5, pkid: p5, .. }, F::Pub { id: 6, pkid: 0, .. }] = frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!((s.queued_len(), s.queued_bytes()), (0, 0));
    s.on_puback(p5, &mut out);
    assert!(out.is_empty());
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes(), s.dropped), (0, 0, 0, 2));
}

#[test]
fn an_online_session_uses_its_overflow_room_and_reports_congestion() {
    let mut s = session(Limits { overflow_messages: 2, overflow_bytes: 100, ..limits(1, 4, 1000) });
    let mut out = Outbox::new();
    give(&mut s, 1, 3, QoS::AtLeastOnce, Some(&mut out));
    let p1 = sent_one(&mut out, 1, QoS::AtLeastOnce);
    for id in 2..=4 {
        assert_eq!(give(&mut s, id, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
        assert!(!s.congested());
    }
    assert_eq!(give(&mut s, 5, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert!(s.congested(), "4 queued = max_queued_messages");
    // What was already on its way when publishers were paused still fits, up to the overflow room.
    assert_eq!(give(&mut s, 6, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert_eq!(give(&mut s, 7, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert!(!s.overfull());
    // Past the room an online session still takes it (it was acknowledged) and says it is overfull:
    // its core stops taking messages from other cores until it drains.
    assert_eq!(give(&mut s, 8, 3, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert!(s.overfull());
    // Offline there is no overflow room: the offline queue keeps mosquitto's drop-newest policy.
    assert_eq!(give(&mut s, 9, 3, QoS::AtLeastOnce, None), Delivered::Dropped);
    assert_eq!((s.queued_len(), s.dropped), (7, 1));
    // Relieved only at half the limit: 7 queued -> 2 after five acknowledgements.
    let mut pkid = p1;
    for id in 2..=6 {
        if id == 3 {
            assert!(!s.overfull(), "6 queued is within the limit plus the room");
        }
        assert!(!s.relieved());
        s.on_puback(pkid, &mut out);
        pkid = sent_one(&mut out, id, QoS::AtLeastOnce);
    }
    assert_eq!(s.queued_len(), 2);
    assert!(s.relieved() && !s.congested());
}

#[test]
fn a_payload_larger_than_the_byte_limit_is_dropped_even_into_an_empty_queue() {
    let mut s = session(limits(1, 100, 10));
    assert_eq!(give(&mut s, 1, 11, QoS::AtLeastOnce, None), Delivered::Dropped);
    assert_eq!(give(&mut s, 2, 10, QoS::AtLeastOnce, None), Delivered::Queued);
    assert_eq!((s.queued_len(), s.queued_bytes(), s.dropped), (1, 10, 1));
}

// ---------------------------------------------------------------------------------------------------
// Offline and resume (MQTT 4.4)

#[test]
fn offline_messages_are_queued_then_sent_in_order_on_resume() {
    let mut s = session(limits(2, 10, 1000));
    assert_eq!(give(&mut s, 1, 1, QoS::AtLeastOnce, None), Delivered::Queued);
    assert_eq!(give(&mut s, 2, 1, QoS::AtMostOnce, None), Delivered::Queued);
    assert_eq!(give(&mut s, 3, 1, QoS::ExactlyOnce, None), Delivered::Queued);
    assert_eq!(give(&mut s, 4, 1, QoS::AtLeastOnce, None), Delivered::Queued);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (0, 4, 4));

    let mut out = Outbox::new();
    s.resume(&mut out);
    let frames = drain(&mut out);
    // Window 2: messages 1 and 3 take the slots, message 2 (QoS 0) rides between them, 4 waits.
    let [F::Pub { id: 1, qos: QoS::AtLeastOnce, pkid: p1, dup: false, .. }, F::Pub { id: 2, qos: QoS::AtMostOnce, pkid: 0, dup: false, .. }, F::Pub { id: 3, qos: QoS::ExactlyOnce, pkid: p3, dup: false, .. }] =
        frames[..]
    else {
        panic!("{frames:?}");
    };
    assert!(p1 != 0 && p3 != 0 && p1 != p3);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 1, 1));
    s.on_puback(p1, &mut out);
    sent_one(&mut out, 4, QoS::AtLeastOnce);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (2, 0, 0));
}

#[test]
fn resume_resends_in_flight_with_dup_and_the_same_ids_then_pumps() {
    let mut s = session(limits(4, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::AtLeastOnce, Some(&mut out));
    give(&mut s, 2, 1, QoS::ExactlyOnce, Some(&mut out));
    give(&mut s, 3, 1, QoS::ExactlyOnce, Some(&mut out));
    give(&mut s, 4, 1, QoS::AtLeastOnce, Some(&mut out));
    let ids: Vec<u16> = drain(&mut out)
        .into_iter()
        .map(|f| match f {
            F::Pub { pkid, dup: false, .. } => pkid,
            f => panic!("{f:?}"),
        })
        .collect();
    let [p1, p2, p3, p4] = ids[..] else { panic!("{ids:?}") };
    // Message 2 reaches PUBREL; message 4 completes, so the resend must skip it.
    s.on_pubrec(p2, &mut out);
    s.on_puback(p4, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p2)]);

    // Connection lost. Two more arrive while offline (the window has room, but there is no connection).
    assert_eq!(give(&mut s, 5, 1, QoS::ExactlyOnce, None), Delivered::Queued);
    assert_eq!(give(&mut s, 6, 1, QoS::AtMostOnce, None), Delivered::Queued);
    assert_eq!((s.inflight_len(), s.queued_len()), (3, 2));

    let mut out = Outbox::new();
    s.resume(&mut out);
    let frames = drain(&mut out);
    // MQTT-4.4.0-1: unacknowledged PUBLISH and PUBREL again with their original ids, PUBLISHes in
    // their original order (MQTT-4.6.0-1) with DUP set (MQTT-3.3.1-1). Then the queue, fresh.
    assert_eq!(frames.len(), 5, "{frames:?}");
    let mut resent = frames[..3].to_vec();
    let rel = resent.iter().position(|f| *f == F::Rel(p2)).expect("PUBREL resent");
    resent.remove(rel);
    assert_eq!(resent, [pubs(1, QoS::AtLeastOnce, p1, true), pubs(3, QoS::ExactlyOnce, p3, true)]);
    let F::Pub { id: 5, qos: QoS::ExactlyOnce, dup: false, pkid: p5, .. } = frames[3] else {
        panic!("{frames:?}")
    };
    assert!(p5 != 0 && ![p1, p2, p3].contains(&p5), "fresh id {p5} must not collide");
    assert_eq!(frames[4], pubs(6, QoS::AtMostOnce, 0, false));
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (4, 0, 0));

    // The flows carry on across the reconnect with the same ids.
    s.on_puback(p1, &mut out);
    s.on_pubcomp(p2, &mut out);
    s.on_pubrec(p3, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p3)]);
    s.on_pubcomp(p3, &mut out);
    assert_eq!(s.inflight_len(), 1);
}

#[test]
fn resume_resends_pubrel_and_a_repeated_pubrec_gets_pubrel_again() {
    let mut s = session(limits(2, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::ExactlyOnce, Some(&mut out));
    let p = sent_one(&mut out, 1, QoS::ExactlyOnce);
    s.on_pubrec(p, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p)]);
    // Twice offline and back: each resume resends the PUBREL, never the PUBLISH (its payload is gone).
    for _ in 0..2 {
        s.resume(&mut out);
        assert_eq!(drain(&mut out), vec![F::Rel(p)]);
    }
    s.on_pubrec(p, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p)]);
    s.on_pubcomp(p, &mut out);
    assert_eq!(s.inflight_len(), 0);
    s.resume(&mut out);
    assert!(out.is_empty(), "nothing left to resend");
}

#[test]
fn resume_resends_pubrel_in_pubrec_order_and_publish_in_send_order() {
    // MQTT-4.6.0-1 and -4, binding on the server for ordered topics (MQTT-4.6.0-6): resent PUBLISHes
    // follow the original send order, PUBRELs the order in which the PUBRECs arrived. The two
    // sequences are independent, so only each one's order is checked, not how they interleave.
    let mut s = session(limits(4, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::ExactlyOnce, Some(&mut out));
    give(&mut s, 2, 1, QoS::ExactlyOnce, Some(&mut out));
    give(&mut s, 3, 1, QoS::AtLeastOnce, Some(&mut out));
    give(&mut s, 4, 1, QoS::ExactlyOnce, Some(&mut out));
    let ids: Vec<u16> = drain(&mut out)
        .into_iter()
        .map(|f| match f {
            F::Pub { pkid, dup: false, .. } => pkid,
            f => panic!("{f:?}"),
        })
        .collect();
    let [p1, p2, p3, p4] = ids[..] else { panic!("{ids:?}") };
    s.on_pubrec(p4, &mut out);
    s.on_pubrec(p1, &mut out);
    // A repeated PUBREC is answered but does not change the order of the original ones.
    s.on_pubrec(p4, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p4), F::Rel(p1), F::Rel(p4)]);

    s.resume(&mut out);
    let frames = drain(&mut out);
    assert_eq!(frames.len(), 4, "{frames:?}");
    let rels: Vec<&F> = frames.iter().filter(|f| matches!(f, F::Rel(_))).collect();
    let pubs_again: Vec<&F> = frames.iter().filter(|f| matches!(f, F::Pub { .. })).collect();
    assert_eq!(rels, [&F::Rel(p4), &F::Rel(p1)]);
    assert_eq!(pubs_again, [&pubs(2, QoS::ExactlyOnce, p2, true), &pubs(3, QoS::AtLeastOnce, p3, true)]);

    // The flows still complete normally afterwards.
    s.on_pubcomp(p1, &mut out);
    s.on_pubcomp(p4, &mut out);
    s.on_puback(p3, &mut out);
    s.on_pubrec(p2, &mut out);
    s.on_pubcomp(p2, &mut out);
    assert_eq!(drain(&mut out), vec![F::Rel(p2)]);
    assert_eq!(s.inflight_len(), 0);
}

#[test]
fn resume_resends_publish_each_time_until_acknowledged() {
    let mut s = session(limits(1, 10, 1000));
    let mut out = Outbox::new();
    give(&mut s, 1, 1, QoS::AtLeastOnce, Some(&mut out));
    let p = sent_one(&mut out, 1, QoS::AtLeastOnce);
    give(&mut s, 2, 1, QoS::AtLeastOnce, None);
    for _ in 0..3 {
        s.resume(&mut out);
        // The window stays full, so the queued message keeps waiting.
        assert_eq!(drain(&mut out), vec![pubs(1, QoS::AtLeastOnce, p, true)]);
        assert_eq!((s.inflight_len(), s.queued_len()), (1, 1));
    }
    s.on_puback(p, &mut out);
    sent_one(&mut out, 2, QoS::AtLeastOnce);
}

// ---------------------------------------------------------------------------------------------------
// Inbound QoS 2 (MQTT 4.3.3, receiver side, method B: route at PUBLISH, remember the id until PUBREL)

#[test]
fn inbound_qos2_is_routed_once_until_pubrel() {
    let mut s = session(limits(1, 1, 1));
    let mut out = Outbox::new();
    assert!(s.on_inbound_qos2(7, &mut out), "first PUBLISH with id 7 is routed");
    assert_eq!(drain(&mut out), vec![F::Rec(7)]);
    for _ in 0..3 {
        assert!(!s.on_inbound_qos2(7, &mut out), "a resend of 7 before PUBREL is not routed again");
        assert_eq!(drain(&mut out), vec![F::Rec(7)], "but it is acknowledged again");
    }
    // Another id is independent.
    assert!(s.on_inbound_qos2(8, &mut out));
    assert_eq!(drain(&mut out), vec![F::Rec(8)]);

    s.on_pubrel(7, &mut out);
    assert_eq!(drain(&mut out), vec![F::Comp(7)]);
    // A repeated PUBREL (our PUBCOMP lost) still gets PUBCOMP.
    s.on_pubrel(7, &mut out);
    assert_eq!(drain(&mut out), vec![F::Comp(7)]);
    assert!(!s.on_inbound_qos2(8, &mut out), "8 still awaits its PUBREL");
    assert_eq!(drain(&mut out), vec![F::Rec(8)]);

    // After PUBREL the id is free: a new PUBLISH with it is a new message.
    assert!(s.on_inbound_qos2(7, &mut out));
    assert_eq!(drain(&mut out), vec![F::Rec(7)]);

    // Unknown id: answered all the same.
    s.on_pubrel(9, &mut out);
    assert_eq!(drain(&mut out), vec![F::Comp(9)]);
    // Inbound and outbound ids are separate namespaces: nothing outbound was touched.
    assert_eq!(s.inflight_len(), 0);
}

// ---------------------------------------------------------------------------------------------------
// Packet identifiers (MQTT 2.3.1)

#[test]
fn packet_ids_run_through_all_of_1_to_65535_and_wrap_to_1() {
    let mut s = session(limits(1, 0, 0));
    let mut out = Outbox::new();
    let mut expected: u16 = 1;
    // Two full laps: every id once per lap, never 0.
    for n in 0..2 * u32::from(u16::MAX) + 3 {
        let qos = if n % 2 == 0 { QoS::AtLeastOnce } else { QoS::ExactlyOnce };
        assert_eq!(give(&mut s, n, 0, qos, Some(&mut out)), Delivered::Sent);
        let p = sent_one(&mut out, n, qos);
        assert_eq!(p, expected);
        if qos == QoS::AtLeastOnce {
            s.on_puback(p, &mut out);
        } else {
            s.on_pubrec(p, &mut out);
            s.on_pubcomp(p, &mut out);
            assert_eq!(drain(&mut out), vec![F::Rel(p)]);
        }
        assert!(out.is_empty());
        expected = if expected == u16::MAX { 1 } else { expected + 1 };
    }
}

#[test]
fn packet_ids_skip_ids_still_in_flight_across_the_wrap() {
    let mut s = session(limits(3, 0, 0));
    let mut out = Outbox::new();
    // Ids 1 and 2 stay in flight for the whole test.
    give(&mut s, 0, 0, QoS::AtLeastOnce, Some(&mut out));
    give(&mut s, 1, 0, QoS::ExactlyOnce, Some(&mut out));
    let frames = drain(&mut out);
    assert!(matches!(frames[..], [F::Pub { pkid: 1, .. }, F::Pub { pkid: 2, .. }]), "{frames:?}");
    s.on_pubrec(2, &mut out);
    drain(&mut out);

    let mut seen = vec![0u32; 65536];
    let mut prev = 2;
    for n in 2..70_000 {
        give(&mut s, n, 0, QoS::AtLeastOnce, Some(&mut out));
        let p = sent_one(&mut out, n, QoS::AtLeastOnce);
        assert!(p != 0 && p != 1 && p != 2, "id {p} collides with an id in flight (or is 0)");
        let want = match prev {
            u16::MAX => 3,
            x => x + 1,
        };
        assert_eq!(p, want);
        seen[usize::from(p)] += 1;
        prev = p;
        s.on_puback(p, &mut out);
        assert!(out.is_empty());
    }
    assert!(seen[3..].iter().all(|&c| c >= 1), "every free id was used");
    assert_eq!(s.inflight_len(), 2);
}

#[test]
fn packet_ids_are_unique_in_a_full_window_after_the_wrap() {
    let mut s = session(limits(100, 0, 0));
    s.next_pkid = u16::MAX - 10;
    let mut out = Outbox::new();
    for n in 0..100 {
        assert_eq!(give(&mut s, n, 0, QoS::ExactlyOnce, Some(&mut out)), Delivered::Sent);
    }
    let mut ids: Vec<u16> = drain(&mut out)
        .into_iter()
        .map(|f| match f {
            F::Pub { pkid, .. } => pkid,
            f => panic!("{f:?}"),
        })
        .collect();
    assert_eq!(ids[..12], [65525, 65526, 65527, 65528, 65529, 65530, 65531, 65532, 65533, 65534, 65535, 1]);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100);
    assert!(!ids.contains(&0));
}

// ---------------------------------------------------------------------------------------------------
// Property test: random operation sequences against a model of what the client sees.

/// Which packet id an acknowledgement names.
#[derive(Clone, Debug)]
enum Target {
    /// The n-th (mod length) flow the model knows to be open: a plausible ack.
    Open(usize),
    /// Any id at all, 0 included: stale, duplicated or bogus acks.
    Raw(u16),
}

#[derive(Clone, Debug)]
enum Op {
    /// Connected or offline per the current connection state.
    Deliver {
        qos: QoS,
        len: usize,
        retain: bool,
    },
    PubAck(Target),
    PubRec(Target),
    PubComp(Target),
    /// The connection drops; the session lives on (clean session 0).
    Disconnect,
    /// The client comes back: `Session::resume`.
    Resume,
}

fn qos_strategy() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![3 => any::<usize>().prop_map(Target::Open), 1 => any::<u16>().prop_map(Target::Raw)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (qos_strategy(), 0..12usize, any::<bool>()).prop_map(|(qos, len, retain)| Op::Deliver { qos, len, retain }),
        2 => target().prop_map(Op::PubAck),
        2 => target().prop_map(Op::PubRec),
        2 => target().prop_map(Op::PubComp),
        1 => Just(Op::Disconnect),
        1 => Just(Op::Resume),
    ]
}

/// An outbound flow as the client sees it: opened by a fresh PUBLISH, closed by PUBACK / PUBCOMP.
#[derive(Clone, Debug)]
struct Flow {
    pkid: u16,
    id: u32,
    qos: QoS,
    retain: bool,
    /// PUBREL seen (QoS 2 only).
    released: bool,
    /// When the first PUBREC for it was handled, for the PUBREL resend order (MQTT-4.6.0-4).
    rec_seq: u64,
}

#[derive(Clone, Debug)]
struct Pending {
    id: u32,
    qos: QoS,
    retain: bool,
    len: usize,
}

/// What the session should look like from outside, rebuilt only from the frames the session emits and
/// its documented policies. The test touches two internals, neither feeding the model: `next_pkid` (to
/// start runs near the wrap) and the in-flight packet ids (to check that no two are equal).
struct Model {
    limits: Limits,
    online: bool,
    /// Open flows in the order they were first sent (the resend order of MQTT-4.6.0-1).
    flows: VecDeque<Flow>,
    /// Counter for `Flow::rec_seq`.
    recs: u64,
    /// Accepted and not yet sent, in delivery order.
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    dropped: u64,
    /// Per message id: `Some(fresh sends so far)` if accepted, `None` if dropped.
    fate: Vec<Option<u32>>,
    /// Highest id first-sent so far, over all QoS and over QoS 1/2 only.
    last_sent: Option<u32>,
    last_sent_qos12: Option<u32>,
}

impl Model {
    fn window_open(&self, qos: QoS) -> bool {
        qos == QoS::AtMostOnce || self.flows.len() < usize::from(self.limits.max_inflight)
    }

    fn flow(&self, pkid: u16) -> Option<usize> {
        self.flows.iter().position(|f| f.pkid == pkid)
    }

    /// Checks that `frames` are exactly the fresh PUBLISHes of the queue's head while the window has
    /// room, and that the session stopped only when it had to.
    fn expect_pump(&mut self, frames: &[F]) -> Result<(), TestCaseError> {
        for f in frames {
            let Some(next) = self.queue.pop_front() else {
                return Err(TestCaseError::fail(format!("sent {f:?} with nothing queued")));
            };
            prop_assert!(self.window_open(next.qos), "{f:?} sent with the window full");
            let F::Pub { id, qos, pkid, dup, retain } = *f else {
                return Err(TestCaseError::fail(format!("expected PUBLISH of {}, got {f:?}", next.id)));
            };
            prop_assert!(!dup, "DUP outside of resume: {f:?}");
            prop_assert_eq!((id, qos, retain), (next.id, next.qos, next.retain), "queue order");
            if qos == QoS::AtMostOnce {
                prop_assert_eq!(pkid, 0);
            } else {
                prop_assert!(pkid != 0, "QoS {qos:?} with packet id 0");
                prop_assert!(self.flow(pkid).is_none(), "packet id {pkid} reused while in flight");
                self.flows.push_back(Flow { pkid, id, qos, retain, released: false, rec_seq: 0 });
                if let Some(last) = self.last_sent_qos12 {
                    prop_assert!(id > last, "QoS 1/2 message {id} sent after {last}");
                }
                self.last_sent_qos12 = Some(id);
            }
            if let Some(last) = self.last_sent {
                prop_assert!(id > last, "message {id} sent after {last}");
            }
            self.last_sent = Some(id);
            self.queued_bytes -= next.len;
            let count = self.fate[id as usize].as_mut().expect("a sent message was accepted");
            *count += 1;
            prop_assert_eq!(*count, 1, "message {} sent fresh twice", id);
        }
        if let Some(head) = self.queue.front() {
            prop_assert!(!self.window_open(head.qos), "pump stopped with room in the window");
        }
        Ok(())
    }

    fn resolve(&self, t: &Target) -> u16 {
        match *t {
            Target::Open(i) if !self.flows.is_empty() => self.flows[i % self.flows.len()].pkid,
            Target::Open(i) => i as u16,
            Target::Raw(p) => p,
        }
    }
}

/// Applies one operation to both the session and the model and compares the results.
fn step(s: &mut Session, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let mut out = Outbox::new();
    match *op {
        Op::Deliver { qos, len, retain } => {
            let id = m.fate.len() as u32;
            let mut message = msg(id, len, qos);
            message.retain = retain;
            let got = s.deliver(message, qos, retain, if m.online { Some(&mut out) } else { None });
            let frames = drain(&mut out);
            // An online session has the overflow room of the pause policy on top of its limits.
            let (extra_msgs, extra_bytes) =
                if m.online { (m.limits.overflow_messages, m.limits.overflow_bytes) } else { (0, 0) };
            // Under the pause policy (room > 0) an online session drops nothing: past the room it only
            // reports itself overfull.
            let fits = (m.online && extra_msgs > 0)
                || (m.queue.len() < m.limits.max_queued_messages + extra_msgs
                    && m.queued_bytes + len <= m.limits.max_queued_bytes + extra_bytes);
            let want = if m.online && m.queue.is_empty() && m.window_open(qos) {
                Delivered::Sent
            } else if fits {
                Delivered::Queued
            } else {
                Delivered::Dropped
            };
            prop_assert_eq!(got, want);
            if got == Delivered::Dropped {
                m.fate.push(None);
                m.dropped += 1;
                prop_assert!(frames.is_empty());
            } else {
                m.fate.push(Some(0));
                m.queue.push_back(Pending { id, qos, retain, len });
                m.queued_bytes += len;
                if m.online {
                    m.expect_pump(&frames)?;
                    prop_assert_eq!(frames.len(), usize::from(got == Delivered::Sent));
                } else {
                    prop_assert!(frames.is_empty());
                }
            }
        }
        // A client cannot acknowledge anything without a connection.
        Op::PubAck(_) | Op::PubRec(_) | Op::PubComp(_) if !m.online => {}
        Op::PubAck(ref t) => {
            let pkid = m.resolve(t);
            s.on_puback(pkid, &mut out);
            let frames = drain(&mut out);
            match m.flow(pkid) {
                Some(i) if m.flows[i].qos == QoS::AtLeastOnce => {
                    m.flows.remove(i);
                    m.expect_pump(&frames)?;
                }
                _ => prop_assert!(frames.is_empty(), "PUBACK {pkid} ignored, yet {frames:?}"),
            }
        }
        Op::PubRec(ref t) => {
            let pkid = m.resolve(t);
            s.on_pubrec(pkid, &mut out);
            let frames = drain(&mut out);
            match m.flow(pkid) {
                Some(i) if m.flows[i].qos == QoS::ExactlyOnce => {
                    if !m.flows[i].released {
                        m.flows[i].released = true;
                        m.flows[i].rec_seq = m.recs;
                        m.recs += 1;
                    }
                    prop_assert_eq!(frames, vec![F::Rel(pkid)]);
                }
                _ => prop_assert!(frames.is_empty(), "PUBREC {pkid} ignored, yet {frames:?}"),
            }
        }
        Op::PubComp(ref t) => {
            let pkid = m.resolve(t);
            s.on_pubcomp(pkid, &mut out);
            let frames = drain(&mut out);
            match m.flow(pkid) {
                Some(i) if m.flows[i].released => {
                    m.flows.remove(i);
                    m.expect_pump(&frames)?;
                }
                _ => prop_assert!(frames.is_empty(), "PUBCOMP {pkid} ignored, yet {frames:?}"),
            }
        }
        Op::Disconnect => m.online = false,
        Op::Resume if m.online => {}
        Op::Resume => {
            m.online = true;
            s.resume(&mut out);
            let frames = drain(&mut out);
            let n = m.flows.len();
            prop_assert!(frames.len() >= n, "resume sent {frames:?} for {n} open flows");
            // Every open flow again with its own packet id: the PUBLISHes (DUP set) in first-send order,
            // the PUBRELs in PUBREC order. How the two sequences interleave is free.
            let (resent, fresh) = frames.split_at(n);
            let want_pubs: Vec<F> = m
                .flows
                .iter()
                .filter(|f| !f.released)
                .map(|f| F::Pub { id: f.id, qos: f.qos, pkid: f.pkid, dup: true, retain: f.retain })
                .collect();
            let mut released: Vec<&Flow> = m.flows.iter().filter(|f| f.released).collect();
            released.sort_by_key(|f| f.rec_seq);
            let want_rels: Vec<F> = released.iter().map(|f| F::Rel(f.pkid)).collect();
            let got_pubs: Vec<F> = resent.iter().filter(|f| matches!(f, F::Pub { .. })).cloned().collect();
            let got_rels: Vec<F> = resent.iter().filter(|f| matches!(f, F::Rel(_))).cloned().collect();
            prop_assert_eq!(got_pubs.len() + got_rels.len(), n, "resume resent {:?}", resent);
            prop_assert_eq!(got_pubs, want_pubs);
            prop_assert_eq!(got_rels, want_rels);
            m.expect_pump(fresh)?;
        }
    }

    // Invariants after every operation.
    prop_assert!(s.inflight_len() <= usize::from(m.limits.max_inflight));
    prop_assert_eq!(s.inflight_len(), m.flows.len());
    let mut ids: Vec<u16> = s.inflight.iter().map(|f| f.pkid).collect();
    prop_assert!(!ids.contains(&0));
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    prop_assert_eq!(ids.len(), before, "two flows share a packet id");
    prop_assert_eq!(s.queued_len(), m.queue.len());
    prop_assert_eq!(s.queued_bytes(), m.queued_bytes);
    prop_assert_eq!(s.dropped, m.dropped);
    Ok(())
}

fn ops_and_limits() -> impl Strategy<Value = (Limits, u16, Vec<Op>)> {
    (
        (1..=4u16, 0..=6usize, 0..=40usize, 0..=3usize, 0..=20usize).prop_map(|(i, q, b, om, ob)| Limits {
            overflow_messages: om,
            overflow_bytes: ob,
            ..limits(i, q, b)
        }),
        // Start some runs just short of the wrap so that 65535 -> 1 is crossed with flows open.
        prop_oneof![Just(1u16), (u16::MAX - 6)..=u16::MAX],
        prop::collection::vec(op(), 0..200),
    )
}

proptest! {
    #[test]
    fn random_operations_match_the_model((l, first_pkid, ops) in ops_and_limits()) {
        let mut s = session(l);
        s.next_pkid = first_pkid;
        let mut m = Model {
            limits: l,
            online: true,
            flows: VecDeque::new(),
            recs: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            dropped: 0,
            fate: Vec::new(),
            last_sent: None,
            last_sent_qos12: None,
        };
        for op in &ops {
            step(&mut s, &mut m, op)?;
        }

        // Drain: reconnect, then let the client finish every flow, oldest first.
        step(&mut s, &mut m, &Op::Resume)?;
        let mut guard = 0;
        while let Some(f) = m.flows.front().cloned() {
            guard += 1;
            prop_assert!(guard <= 4 * ops.len() + 4, "drain does not terminate");
            let ack = match (f.qos, f.released) {
                (QoS::AtLeastOnce, _) => Op::PubAck(Target::Raw(f.pkid)),
                (_, false) => Op::PubRec(Target::Raw(f.pkid)),
                (_, true) => Op::PubComp(Target::Raw(f.pkid)),
            };
            step(&mut s, &mut m, &ack)?;
        }
        prop_assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (0, 0, 0));

        // Every message was either dropped (and counted) or sent fresh exactly once.
        let mut dropped = 0;
        for (id, fate) in m.fate.iter().enumerate() {
            match fate {
                None => dropped += 1,
                Some(n) => prop_assert_eq!(*n, 1, "message {} sent {} times", id, n),
            }
        }
        prop_assert_eq!(s.dropped, dropped);
    }
}

/// A session that ends hands back what it has not delivered for sure (for a shared subscription's other
/// members): unacknowledged flows in send order, then the queue; not what the client acknowledged the
/// receipt of (PUBACK, or PUBREC for QoS 2).
#[test]
fn take_undelivered_returns_unacknowledged_then_queued() {
    let mut s = session(limits(3, 100, 1 << 20));
    let mut out = Outbox::new();
    for id in 1..=6 {
        let qos = if id % 2 == 0 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
        give(&mut s, id, 8, qos, Some(&mut out));
    }
    let frames = drain(&mut out);
    let pkid = |want: u32| {
        frames.iter().find_map(|f| match f {
            F::Pub { id, pkid, .. } if *id == want => Some(*pkid),
            _ => None,
        })
    };
    // 1 acknowledged (PUBACK), 2 received (PUBREC): both delivered; 3 is still unacknowledged.
    s.on_puback(pkid(1).expect("1 sent"), &mut out);
    s.on_pubrec(pkid(2).expect("2 sent"), &mut out);
    let left: Vec<u32> = s.take_undelivered().map(|m| id_of(&m)).collect();
    assert_eq!(left, [3, 4, 5, 6]);
    assert_eq!((s.inflight_len(), s.queued_len(), s.queued_bytes()), (0, 0, 0));
}

/// A new subscription's retained messages are queued past the limits, and the live messages after
/// them are measured against the limits without them: neither kind is dropped for the backlog.
#[test]
fn retained_backlog_is_queued_past_the_limits_and_not_counted_against_live_messages() {
    let mut s = session(Limits { overflow_messages: 2, ..limits(1, 4, 1 << 20) });
    let mut out = Outbox::new();
    for id in 0..20 {
        let d =
            s.deliver_backlog(msg(id, 8, QoS::AtLeastOnce), QoS::AtLeastOnce, Default::default(), &mut out);
        assert_ne!(d, Delivered::Dropped, "retained message {id}");
    }
    assert_eq!(s.queued_len(), 19, "one in flight, the rest queued past the limit of 4");
    assert!(s.congested(), "a queue this long pauses publishers");
    // Live messages: the limit (4) plus the overflow (2) fit beside the backlog before it is overfull.
    for id in 100..106 {
        assert_eq!(give(&mut s, id, 8, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued, "live {id}");
    }
    assert!(!s.overfull(), "the backlog does not count");
    assert_eq!(give(&mut s, 106, 8, QoS::AtLeastOnce, Some(&mut out)), Delivered::Queued);
    assert!(s.overfull());
    // Everything queued goes out in order as the client acknowledges: the backlog first.
    let mut sent = Vec::new();
    loop {
        let frames = drain(&mut out);
        let Some(F::Pub { id, pkid, .. }) = frames.first().cloned() else { break };
        sent.push(id);
        s.on_puback(pkid, &mut out);
    }
    let want: Vec<u32> = (0..20).chain(100..107).collect();
    assert_eq!(sent, want);
    assert_eq!((s.queued_len(), s.queued_bytes()), (0, 0));
}
