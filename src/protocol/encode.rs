//! MQTT 3.1/3.1.1 encoder.
//!
//! Each function computes the packet's exact size first and reserves it once, then writes with
//! unchecked-growth-free `put_*` calls. PUBLISH has a split form ([`encode_publish_head`]) so the
//! broker can send one shared payload [`bytes::Bytes`] to many subscribers, writing only the small
//! per-subscriber head (topic, packet id, flags) for each.
//!
//! The encoder cannot fail. Its inputs come from the broker, not the wire; lengths that the wire
//! format cannot carry are programming errors, caught by `debug_assert!` in tests and degraded
//! into a frame the peer rejects (never a desynchronised stream or a panic) in release builds.

use bytes::{BufMut, BytesMut};

use super::decode::{
    CF_CLEAN_SESSION, CF_PASSWORD, CF_USERNAME, CF_WILL, CF_WILL_QOS_SHIFT, CF_WILL_RETAIN, CONNACK, CONNECT,
    DISCONNECT, MAX_REMAINING_LENGTH, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL, SUBACK,
    SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
};
use super::types::{Connect, Packet, ProtocolVersion, Publish, QoS};

/// Appends the encoding of `packet` to `out`.
///
/// Client-to-server and server-to-client packets alike, so that every packet round-trips through
/// [`decode`](super::decode). `version` is the connection's version: on 3.1 the CONNACK session
/// present flag does not exist and is written as 0. A CONNECT is written with its own
/// `protocol`. [`ProtocolVersion::V5`] is written in the 3.1.1 layout until the v5 codec lands.
pub fn encode(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) => {
            let flags = match version {
                ProtocolVersion::V3_1 => 0,
                _ => u8::from(a.session_present),
            };
            out.reserve(4);
            out.put_slice(&[CONNACK << 4, 2, flags, a.code as u8]);
        }
        Packet::Publish(p) => encode_publish(p, out),
        Packet::PubAck(pkid) => encode_ack(PUBACK << 4, *pkid, out),
        Packet::PubRec(pkid) => encode_ack(PUBREC << 4, *pkid, out),
        // PUBREL, SUBSCRIBE and UNSUBSCRIBE carry the fixed flags 0b0010 (MQTT-2.2.2).
        Packet::PubRel(pkid) => encode_ack(PUBREL << 4 | 0x02, *pkid, out),
        Packet::PubComp(pkid) => encode_ack(PUBCOMP << 4, *pkid, out),
        Packet::UnsubAck(pkid) => encode_ack(UNSUBACK << 4, *pkid, out),
        Packet::Subscribe(s) => {
            let remaining = 2 + s.filters.iter().map(|f| string_len(f.filter.as_bytes()) + 1).sum::<usize>();
            put_fixed_header(SUBSCRIBE << 4 | 0x02, remaining, out);
            out.put_u16(s.pkid);
            for f in &s.filters {
                put_string(f.filter.as_bytes(), out);
                out.put_u8(f.qos as u8);
            }
        }
        Packet::SubAck(s) => {
            put_fixed_header(SUBACK << 4, 2 + s.codes.len(), out);
            out.put_u16(s.pkid);
            for c in &s.codes {
                out.put_u8(c.to_u8());
            }
        }
        Packet::Unsubscribe(u) => {
            let remaining = 2 + u.filters.iter().map(|f| string_len(f.as_bytes())).sum::<usize>();
            put_fixed_header(UNSUBSCRIBE << 4 | 0x02, remaining, out);
            out.put_u16(u.pkid);
            for f in &u.filters {
                put_string(f.as_bytes(), out);
            }
        }
        Packet::PingReq => out.put_slice(&[PINGREQ << 4, 0]),
        Packet::PingResp => out.put_slice(&[PINGRESP << 4, 0]),
        Packet::Disconnect => out.put_slice(&[DISCONNECT << 4, 0]),
    }
}

/// Appends a PUBLISH fixed header, topic and packet id (only if `qos` > 0) for a payload of
/// `payload_len` bytes, but not the payload itself: the broker sends that as a separate shared
/// buffer. `pkid` is ignored for QoS 0, and so is `dup` (MQTT-3.3.1-2: DUP must be 0 on QoS 0).
/// Exactly [`publish_head_len`] bytes are written.
pub fn encode_publish_head(
    topic: &str,
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
    payload_len: usize,
    out: &mut BytesMut,
) {
    out.reserve(publish_head_len(topic.len(), qos, payload_len));
    put_publish_head(topic.as_bytes(), qos, pkid, dup, retain, payload_len, out);
}

/// Length in bytes of what [`encode_publish_head`] writes for these arguments.
pub fn publish_head_len(topic_len: usize, qos: QoS, payload_len: usize) -> usize {
    let variable_header = 2 + topic_len + pkid_len(qos);
    1 + remaining_length_len(variable_header + payload_len) + variable_header
}

/// Appends a whole PUBLISH, head and payload (one copy of the payload: used once per message for
/// the frame shared by all QoS 0 subscribers, and for round-trip tests).
pub fn encode_publish(p: &Publish, out: &mut BytesMut) {
    let topic = p.topic.as_bytes();
    out.reserve(publish_head_len(topic.len(), p.qos, p.payload.len()) + p.payload.len());
    put_publish_head(topic, p.qos, p.pkid, p.dup, p.retain, p.payload.len(), out);
    out.put_slice(&p.payload);
}

fn pkid_len(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => 2,
    }
}

/// Writes the PUBLISH head; the caller has reserved the space.
fn put_publish_head(
    topic: &[u8],
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
    payload_len: usize,
    out: &mut BytesMut,
) {
    let dup = dup && qos != QoS::AtMostOnce;
    let first = PUBLISH << 4 | u8::from(dup) << 3 | (qos as u8) << 1 | u8::from(retain);
    let remaining = string_len(topic) + pkid_len(qos) + payload_len;
    put_remaining_header(first, remaining, out);
    put_string(topic, out);
    if qos != QoS::AtMostOnce {
        debug_assert_ne!(pkid, 0, "QoS > 0 PUBLISH needs a non-zero packet id");
        out.put_u16(pkid);
    }
}

fn encode_ack(first: u8, pkid: u16, out: &mut BytesMut) {
    debug_assert_ne!(pkid, 0, "acknowledgements need a non-zero packet id");
    let [hi, lo] = pkid.to_be_bytes();
    out.put_slice(&[first, 2, hi, lo]);
}

fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let (name, level): (&[u8], u8) = match c.protocol {
        ProtocolVersion::V3_1 => (b"MQIsdp", 3),
        ProtocolVersion::V3_1_1 => (b"MQTT", 4),
        ProtocolVersion::V5 => (b"MQTT", 5),
    };
    let mut flags = 0u8;
    if c.clean_session {
        flags |= CF_CLEAN_SESSION;
    }
    // protocol name, level, flags, keep alive, client id
    let mut remaining = string_len(name) + 1 + 1 + 2 + string_len(c.client_id.as_bytes());
    if let Some(w) = &c.will {
        flags |= CF_WILL | (w.qos as u8) << CF_WILL_QOS_SHIFT;
        if w.retain {
            flags |= CF_WILL_RETAIN;
        }
        remaining += string_len(w.topic.as_bytes()) + string_len(&w.payload);
    }
    if let Some(u) = &c.username {
        flags |= CF_USERNAME;
        remaining += string_len(u.as_bytes());
    }
    if let Some(p) = &c.password {
        flags |= CF_PASSWORD;
        remaining += string_len(p);
    }

    put_fixed_header(CONNECT << 4, remaining, out);
    put_string(name, out);
    out.put_u8(level);
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_string(c.client_id.as_bytes(), out);
    if let Some(w) = &c.will {
        put_string(w.topic.as_bytes(), out);
        put_string(&w.payload, out);
    }
    if let Some(u) = &c.username {
        put_string(u.as_bytes(), out);
    }
    if let Some(p) = &c.password {
        put_string(p, out);
    }
}

/// Reserves room for the whole packet, then writes its fixed header.
fn put_fixed_header(first: u8, remaining: usize, out: &mut BytesMut) {
    out.reserve(1 + remaining_length_len(remaining) + remaining);
    put_remaining_header(first, remaining, out);
}

/// Writes the first byte and the remaining length; no reservation.
fn put_remaining_header(first: u8, remaining: usize, out: &mut BytesMut) {
    debug_assert!(remaining <= MAX_REMAINING_LENGTH, "packet of {remaining} bytes cannot be encoded");
    // Up to 10 bytes for a 64-bit usize: a length the format cannot carry comes out as more than
    // four length bytes, which any decoder rejects, instead of a silently wrong length.
    let mut tmp = [0u8; 11];
    tmp[0] = first;
    let mut n = 1;
    let mut value = remaining;
    loop {
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        tmp[n] = byte;
        n += 1;
        if value == 0 {
            break;
        }
    }
    out.put_slice(&tmp[..n]);
}

/// Bytes the remaining length field takes for `value` (1..=4 for anything encodable).
fn remaining_length_len(mut value: usize) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

/// Bytes a two-byte-length-prefixed field takes on the wire (see [`put_string`]).
fn string_len(b: &[u8]) -> usize {
    2 + b.len().min(usize::from(u16::MAX))
}

/// Writes a UTF-8 string or binary field: two-byte big-endian length, then the bytes.
/// Longer input is a broker bug (decoded strings are at most 65,535 bytes); it is cut to 65,535
/// bytes so the stream stays in sync.
fn put_string(b: &[u8], out: &mut BytesMut) {
    debug_assert!(b.len() <= usize::from(u16::MAX), "field of {} bytes", b.len());
    let len = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.put_u16(len);
    out.put_slice(b.get(..usize::from(len)).unwrap_or(b));
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::protocol::{
        ConnAck, ConnectReturnCode, SubAck, SubAckCode, Subscribe, SubscribeFilter, Unsubscribe, Utf8Bytes,
        Will,
    };
    use bytes::Bytes;
    use smallvec::SmallVec;

    fn enc(p: &Packet) -> Vec<u8> {
        enc_v(p, ProtocolVersion::V3_1_1)
    }

    fn enc_v(p: &Packet, v: ProtocolVersion) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode(p, v, &mut out);
        out.to_vec()
    }

    fn s(v: &str) -> Utf8Bytes {
        Utf8Bytes::copy_from_str(v)
    }

    #[test]
    fn connect() {
        let c = Connect {
            protocol: ProtocolVersion::V3_1_1,
            clean_session: true,
            keep_alive: 10,
            client_id: s("cid"),
            will: Some(Will {
                topic: s("w/t"),
                payload: Bytes::from_static(&[0xde, 0xad]),
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"pw")),
        };
        let mut expected = vec![0x10, 34];
        // The spec's CONNECT variable header example: flags 0xCE, keep alive 10.
        expected.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xce, 0, 10]);
        expected.extend_from_slice(&[0, 3, b'c', b'i', b'd', 0, 3, b'w', b'/', b't', 0, 2]);
        expected.extend_from_slice(&[0xde, 0xad, 0, 4, b'u', b's', b'e', b'r', 0, 2, b'p', b'w']);
        assert_eq!(enc(&Packet::Connect(Box::new(c))), expected);

        let c31 = Connect {
            protocol: ProtocolVersion::V3_1,
            clean_session: false,
            keep_alive: 0,
            client_id: s("a"),
            will: Some(Will { topic: s("t"), payload: Bytes::new(), qos: QoS::ExactlyOnce, retain: true }),
            username: None,
            password: None,
        };
        assert_eq!(
            enc(&Packet::Connect(Box::new(c31))),
            [0x10, 20, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x34, 0, 0, 0, 1, b'a', 0, 1, b't', 0, 0]
        );
    }

    #[test]
    fn connack() {
        let a = Packet::ConnAck(ConnAck { session_present: true, code: ConnectReturnCode::Accepted });
        assert_eq!(enc(&a), [0x20, 2, 1, 0]);
        // 3.1 has no session present flag.
        assert_eq!(enc_v(&a, ProtocolVersion::V3_1), [0x20, 2, 0, 0]);
        let refused = Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::UnacceptableProtocolVersion,
        });
        assert_eq!(enc(&refused), [0x20, 2, 0, 1]);
    }

    #[test]
    fn acks_and_empty_packets() {
        assert_eq!(enc(&Packet::PubAck(0x1234)), [0x40, 2, 0x12, 0x34]);
        assert_eq!(enc(&Packet::PubRec(1)), [0x50, 2, 0, 1]);
        assert_eq!(enc(&Packet::PubRel(2)), [0x62, 2, 0, 2]);
        assert_eq!(enc(&Packet::PubComp(3)), [0x70, 2, 0, 3]);
        assert_eq!(enc(&Packet::UnsubAck(4)), [0xb0, 2, 0, 4]);
        assert_eq!(enc(&Packet::PingReq), [0xc0, 0]);
        assert_eq!(enc(&Packet::PingResp), [0xd0, 0]);
        assert_eq!(enc(&Packet::Disconnect), [0xe0, 0]);
    }

    #[test]
    fn subscribe_family() {
        let sub = Packet::Subscribe(Subscribe {
            pkid: 10,
            filters: SmallVec::from_vec(vec![
                SubscribeFilter { filter: s("a/b"), qos: QoS::AtLeastOnce },
                SubscribeFilter { filter: s("c/d"), qos: QoS::ExactlyOnce },
            ]),
        });
        assert_eq!(enc(&sub), [0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'd', 2]);
        let suback = Packet::SubAck(SubAck {
            pkid: 10,
            codes: SmallVec::from_vec(vec![
                SubAckCode::Granted(QoS::AtMostOnce),
                SubAckCode::Failure,
                SubAckCode::Granted(QoS::ExactlyOnce),
            ]),
        });
        assert_eq!(enc(&suback), [0x90, 5, 0, 10, 0x00, 0x80, 0x02]);
        let unsub = Packet::Unsubscribe(Unsubscribe {
            pkid: 10,
            filters: SmallVec::from_vec(vec![s("a/b"), s("c/d")]),
        });
        assert_eq!(enc(&unsub), [0xa2, 12, 0, 10, 0, 3, b'a', b'/', b'b', 0, 3, b'c', b'/', b'd']);
    }

    #[test]
    fn publish() {
        let p = Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: s("a/b"),
            pkid: 10,
            payload: Bytes::from_static(b"hi"),
        };
        let expected = [0x3b, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
        assert_eq!(enc(&Packet::Publish(p.clone())), expected);

        let mut head = BytesMut::new();
        encode_publish_head("a/b", QoS::AtLeastOnce, 10, true, true, 2, &mut head);
        assert_eq!(head.len(), publish_head_len(3, QoS::AtLeastOnce, 2));
        assert_eq!(&head[..], &expected[..9]);

        // QoS 0: no packet id, and DUP is never set.
        let mut head = BytesMut::new();
        encode_publish_head("t", QoS::AtMostOnce, 99, true, false, 0, &mut head);
        assert_eq!(&head[..], &[0x30, 3, 0, 1, b't']);
    }

    #[test]
    fn remaining_length_boundaries() {
        for (value, bytes) in [
            (0usize, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xff, 0xff, 0x7f]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut out = BytesMut::new();
            put_remaining_header(0x30, value, &mut out);
            assert_eq!(&out[1..], bytes, "{value}");
            assert_eq!(remaining_length_len(value), bytes.len());
        }
    }

    #[test]
    fn publish_head_len_crosses_length_boundaries() {
        // Remaining length 127 -> 1 length byte; 128 -> 2.
        assert_eq!(publish_head_len(1, QoS::AtMostOnce, 124), 1 + 1 + 3);
        assert_eq!(publish_head_len(1, QoS::AtMostOnce, 125), 1 + 2 + 3);
        assert_eq!(publish_head_len(1, QoS::ExactlyOnce, 123), 1 + 2 + 5);
        let payload = vec![7u8; 200_000];
        let mut head = BytesMut::new();
        encode_publish_head("x/y", QoS::ExactlyOnce, 5, false, false, payload.len(), &mut head);
        assert_eq!(head.len(), publish_head_len(3, QoS::ExactlyOnce, payload.len()));
        assert_eq!(head.len(), 1 + 3 + 2 + 3 + 2);
    }
}
