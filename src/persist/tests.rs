//! Tests of the log format (round trips, torn and corrupt tails) and of recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::protocol::{Packet, QoS, Utf8Bytes};
use crate::session::{Limits, MsgProps, OutFrame, Outbox, Session, SubIds};

const UNIX: u64 = 1_700_000_000_000;

fn clock() -> Clock {
    Clock { instant: Instant::now(), unix_ms: UNIX }
}

fn limits() -> Limits {
    Limits {
        max_inflight: 3,
        max_queued_messages: 100,
        max_queued_bytes: 1 << 20,
        overflow_messages: 0,
        overflow_bytes: 0,
    }
}

fn s(v: &str) -> Utf8Bytes {
    Utf8Bytes::copy_from_str(v)
}

/// A message as a decoded one looks: received at the clock's instant, an expiry a whole number of
/// milliseconds from it, `props` only when there is something in them.
fn msg(
    c: &Clock,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    retain: bool,
    forward: &[u8],
    expiry_ms: Option<u64>,
) -> Message {
    let expires = expiry_ms.map(|ms| c.instant + Duration::from_millis(ms));
    let props = (!forward.is_empty() || expires.is_some())
        .then(|| Arc::new(MsgProps { forward: Bytes::copy_from_slice(forward), expires }));
    Message {
        topic: s(topic),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain,
        received: c.instant,
        props,
    }
}

/// Records have no `PartialEq` (messages hold `Instant`s and `Arc`s); their `Debug` form shows every field.
fn norm(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| format!("{r:?}")).collect()
}

/// The log file of `records`, and where each frame ends.
fn file(records: &[Record], c: &Clock) -> (Bytes, Vec<usize>) {
    let mut out = BytesMut::new();
    out.put_slice(LOG_MAGIC);
    let mut ends = Vec::new();
    for r in records {
        encode_record(r, c, &mut out);
        ends.push(out.len());
    }
    (out.freeze(), ends)
}

fn every_kind(c: &Clock) -> Vec<Record> {
    let mut ids = SubIds::new();
    ids.extend([1, 268_435_455, 7]);
    vec![
        Record::Session { sid: 1, client_id: s("client-1"), expiry: 3600 },
        Record::Session { sid: u32::MAX, client_id: s(""), expiry: u32::MAX },
        Record::Offline { sid: 1, unix_ms: UNIX + 5 },
        Record::SessionEnd { sid: 9 },
        Record::Subscribe { sid: 1, filter: s("a/+/#"), opts: SubOpts::qos(QoS::ExactlyOnce) },
        Record::Subscribe {
            sid: 1,
            filter: s("$share/g/x"),
            opts: SubOpts { qos: QoS::AtMostOnce, no_local: true, retain_as_published: true, id: 42 },
        },
        Record::Subscribe {
            sid: 1,
            filter: s("y"),
            opts: SubOpts { qos: QoS::AtLeastOnce, no_local: false, retain_as_published: true, id: 0 },
        },
        Record::Unsubscribe { sid: 1, filter: s("a/+/#") },
        Record::Change {
            sid: 1,
            change: Change::Enqueued {
                seq: 0,
                msg: msg(c, "t/ü", b"hello", QoS::ExactlyOnce, true, b"\x01\x01", Some(30_000)),
                qos: QoS::AtLeastOnce,
                retain: true,
                sub_ids: ids,
            },
        },
        Record::Change {
            sid: 1,
            change: Change::Enqueued {
                seq: u64::MAX,
                msg: msg(c, "plain", b"", QoS::AtMostOnce, false, b"", None),
                qos: QoS::AtMostOnce,
                retain: false,
                sub_ids: SubIds::new(),
            },
        },
        Record::Change { sid: 1, change: Change::Sent { seq: 3, pkid: 65_535 } },
        Record::Change { sid: 1, change: Change::Sent { seq: 4, pkid: 0 } },
        Record::Change { sid: 1, change: Change::Released { pkid: 1 } },
        Record::Change { sid: 1, change: Change::Completed { pkid: 2 } },
        Record::Change { sid: 1, change: Change::Dropped { seq: 5 } },
        Record::Change { sid: 1, change: Change::InboundAdd { pkid: 6 } },
        Record::Change { sid: 1, change: Change::InboundDone { pkid: 7 } },
        Record::Retained { msg: msg(c, "r/1", b"on", QoS::AtLeastOnce, true, b"", Some(1)) },
        Record::Retained { msg: msg(c, "r/2", b"", QoS::AtMostOnce, true, b"\x03\x00\x01x", None) },
    ]
}

#[test]
fn every_record_kind_round_trips() {
    let c = clock();
    let records = every_kind(&c);
    let (bytes, _) = file(&records, &c);
    let log = read_log(&bytes, &c).expect("a log");
    assert_eq!(log.tail, Tail::Clean);
    assert_eq!(log.valid_len, bytes.len());
    assert_eq!(norm(&log.records), norm(&records));
}

#[test]
fn a_log_written_before_a_restart_reads_back_on_the_new_clocks() {
    // Written by one process, read by the next: the monotonic clock restarted, the wall clock went on.
    let before = clock();
    let m = msg(&before, "t", b"x", QoS::AtLeastOnce, false, b"", Some(60_000));
    let (bytes, _) = file(&[Record::Retained { msg: m }], &before);
    let later = Clock { instant: Instant::now() + Duration::from_secs(1000), unix_ms: UNIX + 20_000 };
    let log = read_log(&bytes, &later).expect("a log");
    let [Record::Retained { msg }] = &log.records[..] else { panic!("{:?}", log.records) };
    let expires = msg.props.as_ref().and_then(|p| p.expires).expect("an expiry");
    assert_eq!(expires, later.instant + Duration::from_secs(40), "40 s of its 60 s remain");
    assert_eq!(msg.received, later.instant);
}

#[test]
fn decoded_strings_and_payloads_do_not_share_the_file_buffer() {
    let c = clock();
    let m = msg(&c, "t", b"payload", QoS::AtLeastOnce, false, b"\x01\x00", None);
    let (bytes, _) = file(&[Record::Retained { msg: m }], &c);
    let log = read_log(&bytes, &c).expect("a log");
    let [Record::Retained { msg }] = &log.records[..] else { panic!() };
    let range = bytes.as_ptr_range();
    for part in
        [msg.topic.as_bytes().as_ref(), msg.payload.as_ref(), msg.props.as_ref().unwrap().forward.as_ref()]
    {
        assert!(!range.contains(&part.as_ptr()), "a decoded field points into the file buffer");
    }
}

#[test]
fn a_cut_at_every_offset_keeps_exactly_the_complete_frames() {
    let c = clock();
    let records = every_kind(&c);
    let (bytes, ends) = file(&records, &c);
    for cut in 0..=bytes.len() {
        let log = read_log(&bytes.slice(..cut), &c).expect("a prefix of a log is a log");
        if cut < LOG_MAGIC.len() {
            assert!(log.records.is_empty());
            assert_eq!(log.valid_len, 0);
            let want = if cut == 0 { Tail::Clean } else { Tail::Torn { offset: 0, why: "incomplete magic" } };
            assert_eq!(log.tail, want, "cut at {cut}");
            continue;
        }
        let complete = ends.iter().filter(|&&e| e <= cut).count();
        let valid = ends[..complete].last().copied().unwrap_or(LOG_MAGIC.len());
        assert_eq!(norm(&log.records), norm(&records[..complete]), "cut at {cut}");
        assert_eq!(log.valid_len, valid, "cut at {cut}");
        if cut == valid {
            assert_eq!(log.tail, Tail::Clean, "cut at {cut}, a frame boundary");
        } else {
            let Tail::Torn { offset, why } = log.tail else { panic!("cut at {cut}: not torn") };
            assert_eq!(offset, valid);
            let head = cut - valid < 8;
            assert_eq!(
                why,
                if head { "incomplete frame header" } else { "incomplete frame" },
                "cut at {cut}"
            );
        }
    }
}

#[test]
fn a_flipped_byte_anywhere_in_a_frame_is_caught() {
    let c = clock();
    let records = every_kind(&c);
    let (bytes, ends) = file(&records, &c);
    let mut start = LOG_MAGIC.len();
    for (i, &end) in ends.iter().enumerate() {
        for at in start..end {
            for flip in [0x01u8, 0x80, 0xFF] {
                let mut bad = bytes.to_vec();
                bad[at] ^= flip;
                let log = read_log(&Bytes::from(bad), &c).expect("a log");
                assert_eq!(norm(&log.records), norm(&records[..i]), "frame {i}, byte {at} ^ {flip:#x}");
                assert_eq!(log.valid_len, start);
                let Tail::Torn { offset, why } = log.tail else { panic!("frame {i}, byte {at}: not torn") };
                assert_eq!(offset, start);
                if at >= start + 8 {
                    // In the body: only the checksum can notice.
                    assert_eq!(why, "checksum mismatch", "frame {i}, byte {at}");
                }
            }
        }
        start = end;
    }
}

/// A frame around `body` with a correct checksum: what a bug (or a future version) would write.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = LOG_MAGIC.to_vec();
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    f.extend_from_slice(body);
    f
}

#[test]
fn well_framed_bodies_that_do_not_decode_end_the_log() {
    let c = clock();
    let cases: &[(&[u8], &str)] = &[
        (&[], "empty record"),
        (&[0x7F, 0, 0, 0, 0], "unknown record kind"),
        (&[3, 1, 0, 0], "truncated field"),
        (&[3, 1, 0, 0, 0, 0xAA], "trailing bytes in record"),
        // Subscribe with QoS 3.
        (&[4, 1, 0, 0, 0, 1, 0, b'a', 3, 0, 0, 0, 0, 0], "invalid QoS"),
        (&[4, 1, 0, 0, 0, 1, 0, b'a', 1, 4, 0, 0, 0, 0], "unknown subscription flags"),
        // Session with a client id that is not UTF-8, or holds U+0000.
        (&[1, 1, 0, 0, 0, 1, 0, 0xFF, 0, 0, 0, 0], "invalid UTF-8 string"),
        (&[1, 1, 0, 0, 0, 1, 0, 0x00, 0, 0, 0, 0], "invalid UTF-8 string"),
        // Enqueued claiming 2^32 - 1 subscription ids: refused before allocating for them.
        (&[0x10, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF], "truncated field"),
        // Retained with message flags that are not QoS + retain.
        (&[6, 1, 0, b't', 0x08], "unknown message flags"),
        // Retained whose payload claims 4 GiB.
        (&[6, 1, 0, b't', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF], "truncated field"),
    ];
    for (body, want) in cases {
        let mut bytes = frame(body);
        // Valid records after it are not read either: nothing after a bad frame can be trusted.
        let mut after = BytesMut::new();
        encode_record(&Record::SessionEnd { sid: 1 }, &c, &mut after);
        bytes.extend_from_slice(&after);
        let log = read_log(&Bytes::from(bytes), &c).expect("a log");
        assert!(log.records.is_empty(), "{body:?}");
        assert_eq!(log.valid_len, LOG_MAGIC.len());
        assert_eq!(log.tail, Tail::Torn { offset: LOG_MAGIC.len(), why: want }, "{body:?}");
    }
}

#[test]
fn a_zero_filled_tail_is_torn() {
    // After a crash, a file system may show the file's new length before its data: zeros. A zero length
    // has a valid checksum (the CRC of nothing is 0), so it is the empty body that gives it away.
    let c = clock();
    let (bytes, _) = file(&[Record::SessionEnd { sid: 1 }], &c);
    let mut z = bytes.to_vec();
    z.extend_from_slice(&[0; 4096]);
    let log = read_log(&Bytes::from(z), &c).expect("a log");
    assert_eq!(log.records.len(), 1);
    assert_eq!(log.valid_len, bytes.len());
    assert_eq!(log.tail, Tail::Torn { offset: bytes.len(), why: "empty record" });
}

#[test]
fn an_absurd_frame_length_is_torn_without_allocating() {
    let c = clock();
    let mut bytes = LOG_MAGIC.to_vec();
    bytes.extend_from_slice(&u32::MAX.to_le_bytes());
    bytes.extend_from_slice(&[0; 64]);
    let log = read_log(&Bytes::from(bytes), &c).expect("a log");
    assert_eq!(log.tail, Tail::Torn { offset: 8, why: "frame length beyond the maximum" });
    let mut bytes = LOG_MAGIC.to_vec();
    bytes.extend_from_slice(&(MAX_BODY as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; 64]);
    let log = read_log(&Bytes::from(bytes), &c).expect("a log");
    assert_eq!(log.tail, Tail::Torn { offset: 8, why: "incomplete frame" });
}

#[test]
fn files_that_are_not_logs() {
    let c = clock();
    let empty = read_log(&Bytes::new(), &c).expect("an empty file is an empty log");
    assert!(empty.records.is_empty());
    assert_eq!((empty.valid_len, empty.tail), (0, Tail::Clean));
    assert!(read_log(&Bytes::from_static(b"COREMQL2"), &c).is_err(), "another version");
    assert!(read_log(&Bytes::from_static(b"{\"json\": true}"), &c).is_err());
    assert!(read_log(&Bytes::from_static(b"X"), &c).is_err(), "short, and not a prefix of the magic");
    let magic_only = read_log(&Bytes::from_static(LOG_MAGIC), &c).expect("a log");
    assert_eq!((magic_only.valid_len, magic_only.tail), (8, Tail::Clean));
}

#[test]
fn the_clock_converts_both_ways_and_saturates() {
    let c = clock();
    for ms in [0u64, 1, 999, 86_400_000, 10 * 365 * 86_400_000] {
        let later = c.instant + Duration::from_millis(ms);
        assert_eq!(c.to_unix_ms(later), UNIX + ms);
        assert_eq!(c.to_instant(UNIX + ms), later);
        if let Some(earlier) = c.instant.checked_sub(Duration::from_millis(ms)) {
            assert_eq!(c.to_unix_ms(earlier), UNIX - ms);
            assert_eq!(c.to_instant(UNIX - ms), earlier);
        }
    }
    // Sub-millisecond parts are dropped towards the clock's reading.
    assert_eq!(c.to_unix_ms(c.instant + Duration::from_micros(1999)), UNIX + 1);
    // Extremes do not panic, and stay ordered.
    let far_past = c.to_instant(0);
    let far_future = c.to_instant(u64::MAX);
    assert!(far_past <= c.instant && c.instant <= far_future);
    assert_eq!(c.to_unix_ms(far_future), c.to_unix_ms(far_future).max(UNIX));
    let early = Clock { instant: c.instant, unix_ms: 3 };
    assert_eq!(early.to_unix_ms(c.instant.checked_sub(Duration::from_millis(10)).unwrap_or(c.instant)), 0);
    let late = Clock { instant: c.instant, unix_ms: u64::MAX - 1 };
    assert_eq!(late.to_unix_ms(c.instant + Duration::from_secs(1)), u64::MAX);
}

// ---- recovery ----

/// An outbox frame reduced to what the tests compare.
#[derive(Debug, PartialEq, Eq)]
enum F {
    Pub { topic: String, qos: QoS, pkid: u16, dup: bool, retain: bool, sub_ids: Vec<u32> },
    Rel(u16),
    Other(String),
}

fn frames(out: &mut Outbox) -> Vec<F> {
    out.drain(..)
        .map(|f| match f {
            OutFrame::Publish { msg, qos, pkid, dup, retain, sub_ids } => F::Pub {
                topic: msg.topic.as_str().to_owned(),
                qos,
                pkid,
                dup,
                retain,
                sub_ids: sub_ids.to_vec(),
            },
            OutFrame::Control(Packet::PubRel(a)) => F::Rel(a.pkid),
            other => F::Other(format!("{other:?}")),
        })
        .collect()
}

/// Writes `records` to a file and reads them back (recovery only ever sees decoded records).
fn through_file(records: &[Record], c: &Clock) -> Vec<Record> {
    let (bytes, _) = file(records, c);
    let log = read_log(&bytes, c).expect("a log");
    assert_eq!(log.tail, Tail::Clean);
    log.records
}

/// A session with every kind of message state: in flight at QoS 1 and 2, awaiting PUBCOMP, queued (one
/// with an expiry), inbound QoS 2 ids. Returns it with its journal, and the messages' records.
fn busy_session(c: &Clock, sid: u32) -> (Session, Vec<Record>) {
    let mut se = Session::new(s("busy"), false, limits());
    se.enable_journal();
    let mut out = Outbox::new();
    let mut ids = SubIds::new();
    ids.push(5);
    se.deliver_with(
        msg(c, "m/1", b"one", QoS::AtLeastOnce, false, b"", None),
        QoS::AtLeastOnce,
        false,
        ids,
        Some(&mut out),
    );
    se.deliver(
        msg(c, "m/2", b"two", QoS::ExactlyOnce, false, b"", None),
        QoS::ExactlyOnce,
        true,
        Some(&mut out),
    );
    se.deliver(
        msg(c, "m/3", b"three", QoS::ExactlyOnce, false, b"", None),
        QoS::ExactlyOnce,
        false,
        Some(&mut out),
    );
    se.on_pubrec(2, &mut out); // pkid 2 now awaits PUBCOMP
    se.deliver(
        msg(c, "m/4", b"four", QoS::AtLeastOnce, false, b"\x01\x01", Some(90_000)),
        QoS::AtLeastOnce,
        false,
        None,
    );
    se.deliver(msg(c, "m/5", b"five", QoS::AtMostOnce, false, b"", None), QoS::AtMostOnce, false, None);
    se.on_inbound_qos2(77, &mut out);
    se.on_inbound_qos2(78, &mut out);
    se.on_pubrel(77, &mut out);
    let mut changes = Vec::new();
    se.drain_journal(&mut changes);
    (se, changes.into_iter().map(|change| Record::Change { sid, change }).collect())
}

/// Resumes both sessions and checks they send the same frames and then behave the same.
fn same_behaviour(a: &mut Session, b: &mut Session) {
    assert_eq!(a.inflight_len(), b.inflight_len());
    assert_eq!(a.queued_len(), b.queued_len());
    assert_eq!(a.queued_bytes(), b.queued_bytes());
    assert_eq!(a.inbound_qos2_len(), b.inbound_qos2_len());
    let (mut oa, mut ob) = (Outbox::new(), Outbox::new());
    a.resume(&mut oa);
    b.resume(&mut ob);
    let fa = frames(&mut oa);
    assert!(!fa.is_empty());
    assert_eq!(fa, frames(&mut ob));
    for pkid in 1..=4 {
        a.on_puback(pkid, &mut oa);
        b.on_puback(pkid, &mut ob);
        a.on_pubcomp(pkid, &mut oa);
        b.on_pubcomp(pkid, &mut ob);
        assert_eq!(frames(&mut oa), frames(&mut ob));
    }
    for pkid in 76..=79 {
        assert_eq!(a.has_inbound_qos2(pkid), b.has_inbound_qos2(pkid), "inbound {pkid}");
    }
}

#[test]
fn recover_rebuilds_a_session_with_subscriptions_and_message_state() {
    let c = clock();
    let (mut original, changes) = busy_session(&c, 4);
    let mut log = vec![
        Record::Session { sid: 4, client_id: s("busy"), expiry: 600 },
        Record::Subscribe { sid: 4, filter: s("m/#"), opts: SubOpts::qos(QoS::ExactlyOnce) },
        Record::Subscribe { sid: 4, filter: s("gone"), opts: SubOpts::qos(QoS::AtMostOnce) },
        Record::Unsubscribe { sid: 4, filter: s("gone") },
    ];
    log.extend(changes);
    log.push(Record::Subscribe {
        sid: 4,
        filter: s("m/#"),
        opts: SubOpts { qos: QoS::AtLeastOnce, no_local: true, retain_as_published: false, id: 5 },
    });
    log.push(Record::Offline { sid: 4, unix_ms: UNIX - 1500 });
    let n = log.len();
    let rec = recover(vec![through_file(&log, &c)], limits(), &c);
    assert_eq!(rec.records, n);
    assert!(rec.retained.is_empty());
    let [rs] = &mut rec.sessions.into_iter().collect::<Vec<_>>()[..] else { panic!("one session") };
    assert_eq!(rs.client_id, s("busy"));
    assert_eq!(rs.expiry, 600);
    assert!(!rs.session.clean);
    assert_eq!(rs.offline_since, Some(c.instant - Duration::from_millis(1500)));
    let opts = SubOpts { qos: QoS::AtLeastOnce, no_local: true, retain_as_published: false, id: 5 };
    assert_eq!(rs.subscriptions, vec![("m/#".into(), opts)]);
    assert!(rs.session.subscriptions.is_empty(), "the runtime installs subscriptions itself");
    assert_eq!((rs.session.inflight_len(), rs.session.queued_len()), (3, 2));
    same_behaviour(&mut original, &mut rs.session);
}

#[test]
fn recover_applies_session_end_expiry_changes_and_sid_reuse() {
    let c = clock();
    let log = vec![
        Record::Session { sid: 1, client_id: s("a"), expiry: 10 },
        Record::Subscribe { sid: 1, filter: s("x"), opts: SubOpts::qos(QoS::AtLeastOnce) },
        Record::Offline { sid: 1, unix_ms: UNIX },
        Record::Session { sid: 2, client_id: s("b"), expiry: 20 },
        Record::SessionEnd { sid: 1 },
        // The writer reuses sid 1 for another client once the first is forgotten.
        Record::Session { sid: 1, client_id: s("c"), expiry: 30 },
        Record::Offline { sid: 1, unix_ms: UNIX },
        // b resumes (online again) and changes its expiry to 0 before disconnecting.
        Record::Offline { sid: 2, unix_ms: UNIX },
        Record::Session { sid: 2, client_id: s("b"), expiry: 0 },
        // Changes for sids nobody has: skipped.
        Record::Change { sid: 99, change: Change::InboundAdd { pkid: 1 } },
        Record::Subscribe { sid: 99, filter: s("y"), opts: SubOpts::qos(QoS::AtMostOnce) },
        Record::Unsubscribe { sid: 99, filter: s("y") },
        Record::Offline { sid: 99, unix_ms: 0 },
        Record::SessionEnd { sid: 99 },
        Record::Change { sid: 1, change: Change::Sent { seq: 1000, pkid: 3 } },
        Record::Change { sid: 1, change: Change::Completed { pkid: 3 } },
        Record::Change { sid: 1, change: Change::Released { pkid: 3 } },
        Record::Change { sid: 1, change: Change::Dropped { seq: 1 } },
        Record::Change { sid: 1, change: Change::InboundDone { pkid: 3 } },
    ];
    let rec = recover(vec![through_file(&log, &c)], limits(), &c);
    let got: Vec<_> =
        rec.sessions.iter().map(|r| (r.client_id.to_string(), r.expiry, r.offline_since.is_some())).collect();
    assert_eq!(got, vec![("b".into(), 0, false), ("c".into(), 30, true)]);
    let b = &rec.sessions[0];
    assert!(b.session.clean, "expiry 0 now");
    let c_ = &rec.sessions[1];
    assert!(c_.subscriptions.is_empty(), "a's subscription is not c's");
    assert_eq!(
        (c_.session.inflight_len(), c_.session.queued_len(), c_.session.inbound_qos2_len()),
        (0, 0, 0)
    );
}

#[test]
fn a_new_sid_for_a_known_client_starts_its_session_afresh() {
    let c = clock();
    let log = vec![
        Record::Session { sid: 1, client_id: s("a"), expiry: 10 },
        Record::Subscribe { sid: 1, filter: s("old"), opts: SubOpts::qos(QoS::AtLeastOnce) },
        Record::Change { sid: 1, change: Change::InboundAdd { pkid: 9 } },
        Record::Session { sid: 2, client_id: s("a"), expiry: 20 },
        Record::Subscribe { sid: 2, filter: s("new"), opts: SubOpts::qos(QoS::AtLeastOnce) },
        // Sid 1 no longer names anything.
        Record::Subscribe { sid: 1, filter: s("stale"), opts: SubOpts::qos(QoS::AtLeastOnce) },
        Record::SessionEnd { sid: 1 },
    ];
    let rec = recover(vec![log], limits(), &c);
    let [a] = &rec.sessions[..] else { panic!("one session: {:?}", rec.sessions) };
    assert_eq!(a.expiry, 20);
    assert_eq!(a.subscriptions, vec![("new".into(), SubOpts::qos(QoS::AtLeastOnce))]);
    assert!(!a.session.has_inbound_qos2(9));
}

#[test]
fn a_client_in_two_logs_keeps_the_last_logs_session() {
    let c = clock();
    let first = vec![
        Record::Session { sid: 1, client_id: s("moved"), expiry: 100 },
        Record::Subscribe { sid: 1, filter: s("old/#"), opts: SubOpts::qos(QoS::ExactlyOnce) },
        Record::Change { sid: 1, change: Change::InboundAdd { pkid: 5 } },
        Record::Offline { sid: 1, unix_ms: UNIX - 10 },
        Record::Session { sid: 2, client_id: s("stays"), expiry: 1 },
    ];
    // Sid 1 of the second log is another session entirely: sids are per log.
    let second = vec![
        Record::Session { sid: 7, client_id: s("moved"), expiry: 200 },
        Record::Subscribe { sid: 7, filter: s("new/#"), opts: SubOpts::qos(QoS::AtMostOnce) },
        Record::Subscribe { sid: 1, filter: s("nobody"), opts: SubOpts::qos(QoS::AtMostOnce) },
        Record::SessionEnd { sid: 2 },
    ];
    let rec = recover(vec![first, second], limits(), &c);
    assert_eq!(rec.records, 9);
    let names: Vec<_> = rec.sessions.iter().map(|r| r.client_id.to_string()).collect();
    assert_eq!(names, ["moved", "stays"], "sid 2 of the second log names nothing");
    let moved = &rec.sessions[0];
    assert_eq!(moved.expiry, 200);
    assert_eq!(moved.offline_since, None);
    assert_eq!(moved.subscriptions, vec![("new/#".into(), SubOpts::qos(QoS::AtMostOnce))]);
    assert!(!moved.session.has_inbound_qos2(5));
}

#[test]
fn retained_messages_are_set_cleared_and_overwritten() {
    let c = clock();
    let r = |topic: &str, payload: &[u8]| Record::Retained {
        msg: msg(&c, topic, payload, QoS::AtLeastOnce, true, b"", None),
    };
    let first = vec![r("a", b"1"), r("b", b"1"), r("c", b"1"), r("a", b"2"), r("b", b""), r("d", b"")];
    let second = vec![r("c", b""), r("e", b"1"), r("a", b"3"), r("c", b"again")];
    let rec = recover(vec![through_file(&first, &c), through_file(&second, &c)], limits(), &c);
    let got: Vec<_> =
        rec.retained.iter().map(|m| (m.topic.to_string(), m.payload.clone(), m.retain, m.qos)).collect();
    let want = [("a", "3"), ("c", "again"), ("e", "1")]
        .map(|(t, p)| (t.to_string(), Bytes::copy_from_slice(p.as_bytes()), true, QoS::AtLeastOnce));
    assert_eq!(got, want);
    assert!(rec.sessions.is_empty());
}

#[test]
fn a_snapshot_recreates_the_session() {
    let c = clock();
    let (mut original, _) = busy_session(&c, 1);
    original.subscriptions.insert("b".into(), SubOpts::qos(QoS::AtLeastOnce));
    original.subscriptions.insert("a".into(), SubOpts { id: 3, ..SubOpts::qos(QoS::ExactlyOnce) });
    let offline = c.instant - Duration::from_secs(5);
    let mut records = Vec::new();
    snapshot_session(12, &s("busy"), 60, Some(offline), &original, &c, &mut records);
    assert!(matches!(&records[0], Record::Session { sid: 12, expiry: 60, .. }));
    assert!(matches!(&records[1], Record::Offline { sid: 12, unix_ms } if *unix_ms == UNIX - 5000));
    let rec = recover(vec![through_file(&records, &c)], limits(), &c);
    let [rs] = &mut rec.sessions.into_iter().collect::<Vec<_>>()[..] else { panic!("one session") };
    assert_eq!(rs.offline_since, Some(offline));
    let want: Vec<(Box<str>, SubOpts)> = vec![
        ("a".into(), SubOpts { id: 3, ..SubOpts::qos(QoS::ExactlyOnce) }),
        ("b".into(), SubOpts::qos(QoS::AtLeastOnce)),
    ];
    assert_eq!(rs.subscriptions, want);
    same_behaviour(&mut original, &mut rs.session);
}

// ---- properties ----

fn arb_qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn arb_str() -> impl Strategy<Value = Utf8Bytes> {
    // Any Unicode except U+0000, including multi-byte characters.
    "[^\u{0}]{0,12}".prop_map(|v: String| Utf8Bytes::copy_from_str(&v))
}

fn arb_msg(c: Clock) -> impl Strategy<Value = Message> {
    (
        arb_str(),
        proptest::collection::vec(any::<u8>(), 0..40),
        arb_qos(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..20),
        proptest::option::of(1u64..10_000_000),
    )
        .prop_map(move |(topic, payload, qos, retain, forward, expiry)| {
            let expires = expiry.map(|ms| c.instant + Duration::from_millis(ms));
            let props = (!forward.is_empty() || expires.is_some())
                .then(|| Arc::new(MsgProps { forward: Bytes::from(forward), expires }));
            Message { topic, payload: Bytes::from(payload), qos, retain, received: c.instant, props }
        })
}

fn arb_change(c: Clock) -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<u64>(), arb_msg(c), arb_qos(), any::<bool>(), proptest::collection::vec(any::<u32>(), 0..4))
            .prop_map(|(seq, msg, qos, retain, ids)| Change::Enqueued {
                seq,
                msg,
                qos,
                retain,
                sub_ids: ids.into_iter().collect()
            }),
        (any::<u64>(), any::<u16>()).prop_map(|(seq, pkid)| Change::Sent { seq, pkid }),
        any::<u16>().prop_map(|pkid| Change::Released { pkid }),
        any::<u16>().prop_map(|pkid| Change::Completed { pkid }),
        any::<u64>().prop_map(|seq| Change::Dropped { seq }),
        any::<u16>().prop_map(|pkid| Change::InboundAdd { pkid }),
        any::<u16>().prop_map(|pkid| Change::InboundDone { pkid }),
    ]
}

fn arb_record(c: Clock) -> impl Strategy<Value = Record> {
    let opts = (arb_qos(), any::<bool>(), any::<bool>(), any::<u32>()).prop_map(
        |(qos, no_local, retain_as_published, id)| SubOpts { qos, no_local, retain_as_published, id },
    );
    prop_oneof![
        (any::<u32>(), arb_str(), any::<u32>()).prop_map(|(sid, client_id, expiry)| Record::Session {
            sid,
            client_id,
            expiry
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(sid, unix_ms)| Record::Offline { sid, unix_ms }),
        any::<u32>().prop_map(|sid| Record::SessionEnd { sid }),
        (any::<u32>(), arb_str(), opts).prop_map(|(sid, filter, opts)| Record::Subscribe {
            sid,
            filter,
            opts
        }),
        (any::<u32>(), arb_str()).prop_map(|(sid, filter)| Record::Unsubscribe { sid, filter }),
        (any::<u32>(), arb_change(c)).prop_map(|(sid, change)| Record::Change { sid, change }),
        arb_msg(c).prop_map(|msg| Record::Retained { msg }),
    ]
}

/// One clock for every generated case: strategies are built once, outside the cases.
fn fixed_clock() -> Clock {
    use std::sync::OnceLock;
    static C: OnceLock<Instant> = OnceLock::new();
    Clock { instant: *C.get_or_init(Instant::now), unix_ms: UNIX }
}

proptest! {
    #[test]
    fn arbitrary_records_round_trip(records in proptest::collection::vec(arb_record(fixed_clock()), 0..12)) {
        let c = fixed_clock();
        let (bytes, ends) = file(&records, &c);
        let log = read_log(&bytes, &c).expect("a log");
        prop_assert_eq!(log.tail, Tail::Clean);
        prop_assert_eq!(log.valid_len, bytes.len());
        prop_assert_eq!(norm(&log.records), norm(&records));
        // Any cut keeps the complete frames before it.
        if let Some(&last) = ends.last() {
            let cut = last - 1;
            let log = read_log(&bytes.slice(..cut), &c).expect("a log");
            prop_assert_eq!(log.records.len(), records.len() - 1);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..300), framed in any::<bool>()) {
        let c = fixed_clock();
        // Either raw garbage after the magic, or garbage inside a frame with a valid checksum (which
        // reaches the body decoder).
        let bytes = if framed { frame(&tail) } else { [&LOG_MAGIC[..], &tail].concat() };
        let log = read_log(&Bytes::from(bytes.clone()), &c).expect("the magic is there");
        prop_assert!(log.valid_len <= bytes.len());
        prop_assert_eq!(log.tail == Tail::Clean, log.valid_len == bytes.len());
        // Whatever decoded re-encodes to exactly the valid prefix.
        let (again, _) = file(&log.records, &c);
        prop_assert_eq!(&again[..], &bytes[..log.valid_len]);
        let _ = recover(vec![log.records], limits(), &c);
    }
}
