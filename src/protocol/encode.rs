//! MQTT 3.1, 3.1.1 and 5.0 encoder.
//!
//! Each function computes the packet's exact size first and reserves it once, then writes with
//! unchecked-growth-free `put_*` calls. PUBLISH has a split form ([`encode_publish_head`],
//! [`encode_publish_head_v5`]) so the broker can send one shared payload [`bytes::Bytes`] to many
//! subscribers, writing only the small per-subscriber head (topic, packet id, flags, properties)
//! for each.
//!
//! The encoder cannot fail. Its inputs come from the broker, not the wire; lengths that the wire
//! format cannot carry are programming errors, caught by `debug_assert!` in tests and degraded
//! into a frame the peer rejects (never a desynchronised stream or a panic) in release builds.
//! Likewise it writes v5 reason codes and properties as given: choosing ones the packet allows is
//! the broker's job.

use bytes::{BufMut, BytesMut};

use super::decode::{
    AUTH, CF_CLEAN_SESSION, CF_PASSWORD, CF_USERNAME, CF_WILL, CF_WILL_QOS_SHIFT, CF_WILL_RETAIN, CONNACK,
    CONNECT, DISCONNECT, MAX_REMAINING_LENGTH, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC, PUBREL,
    SO_NO_LOCAL, SO_RETAIN_AS_PUBLISHED, SO_RETAIN_HANDLING_SHIFT, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
};
use super::properties::{
    encode_properties, encode_properties_body, properties_body_len, properties_len, put_vbi, vbi_len,
    Properties,
};
use super::property_id;
use super::types::{Ack, Connect, Disconnect, Packet, ProtocolVersion, Publish, QoS, SubscribeFilter};

/// Appends the encoding of `packet` to `out`.
///
/// Client-to-server and server-to-client packets alike, so that every packet round-trips through
/// [`decode`](super::decode). `version` is the connection's version: on 3.1 the CONNACK session
/// present flag does not exist and is written as 0; before v5 CONNACK and SUBACK codes are
/// downgraded to their 3.1.1 values, v5-only fields (reason codes of acks, properties, subscription
/// options) are not written and AUTH writes nothing. A CONNECT is written with its own `protocol`.
///
/// In v5 the short forms are used where the spec allows them: an acknowledgement with reason 0 is
/// the 2-byte body of 3.1.1, a DISCONNECT or AUTH with reason 0 and no properties is empty, and a
/// property block that is `Some` but empty is written as if it were `None`.
pub fn encode(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    let v5 = version == ProtocolVersion::V5;
    match packet {
        Packet::Connect(c) => encode_connect(c, out),
        Packet::ConnAck(a) if v5 => {
            let props = non_empty(&a.properties);
            let remaining = 2 + props.map_or(1, properties_len);
            put_fixed_header(CONNACK << 4, remaining, out);
            out.put_slice(&[u8::from(a.session_present), a.code]);
            put_opt_properties(props, out);
        }
        Packet::ConnAck(a) => {
            let flags = match version {
                ProtocolVersion::V3_1 => 0,
                _ => u8::from(a.session_present),
            };
            out.reserve(4);
            out.put_slice(&[CONNACK << 4, 2, flags, super::reason::connack_v3(a.code)]);
        }
        Packet::Publish(p) if v5 => encode_publish_v5(p, out),
        Packet::Publish(p) => encode_publish(p, out),
        Packet::PubAck(a) => encode_ack(PUBACK << 4, a, v5, out),
        Packet::PubRec(a) => encode_ack(PUBREC << 4, a, v5, out),
        // PUBREL, SUBSCRIBE and UNSUBSCRIBE carry the fixed flags 0b0010 (MQTT-2.2.2).
        Packet::PubRel(a) => encode_ack(PUBREL << 4 | 0x02, a, v5, out),
        Packet::PubComp(a) => encode_ack(PUBCOMP << 4, a, v5, out),
        Packet::UnsubAck(a) if v5 => {
            put_fixed_header(UNSUBACK << 4, 2 + 1 + a.codes.len(), out);
            out.put_u16(a.pkid);
            out.put_u8(0); // empty property block
            out.put_slice(&a.codes);
        }
        Packet::UnsubAck(a) => encode_ack(UNSUBACK << 4, &Ack::ok(a.pkid), false, out),
        Packet::Subscribe(s) => {
            let filters = s.filters.iter().map(|f| string_len(f.filter.as_bytes()) + 1).sum::<usize>();
            // MQTT 5.0 3.8.2.1: subscription identifier 0x0B, a variable byte integer of at most
            // 268,435,455; a larger value (a broker bug) is clamped so the framing stays valid.
            let sub_id = s.subscription_id.filter(|_| v5).map(|id| (id as usize).min(MAX_REMAINING_LENGTH));
            let props = sub_id.map_or(0, |id| 1 + vbi_len(id));
            let props_block = if v5 { vbi_len(props) + props } else { 0 };
            put_fixed_header(SUBSCRIBE << 4 | 0x02, 2 + props_block + filters, out);
            out.put_u16(s.pkid);
            if v5 {
                put_vbi(out, props);
                if let Some(id) = sub_id {
                    out.put_u8(property_id::SUBSCRIPTION_IDENTIFIER);
                    put_vbi(out, id);
                }
            }
            for f in &s.filters {
                put_string(f.filter.as_bytes(), out);
                out.put_u8(if v5 { subscription_options(f) } else { f.qos as u8 });
            }
        }
        Packet::SubAck(s) if v5 => {
            let props = s
                .reason_string
                .as_ref()
                .map(|r| Properties { reason_string: Some(r.clone()), ..Properties::default() });
            put_fixed_header(SUBACK << 4, 2 + props.as_ref().map_or(1, properties_len) + s.codes.len(), out);
            out.put_u16(s.pkid);
            put_opt_properties(props.as_ref(), out);
            out.put_slice(&s.codes);
        }
        Packet::SubAck(s) => {
            put_fixed_header(SUBACK << 4, 2 + s.codes.len(), out);
            out.put_u16(s.pkid);
            for c in &s.codes {
                out.put_u8(super::reason::suback_v3(*c));
            }
        }
        Packet::Unsubscribe(u) => {
            let props_block = usize::from(v5);
            let remaining =
                2 + props_block + u.filters.iter().map(|f| string_len(f.as_bytes())).sum::<usize>();
            put_fixed_header(UNSUBSCRIBE << 4 | 0x02, remaining, out);
            out.put_u16(u.pkid);
            if v5 {
                out.put_u8(0); // empty property block
            }
            for f in &u.filters {
                put_string(f.as_bytes(), out);
            }
        }
        Packet::PingReq => out.put_slice(&[PINGREQ << 4, 0]),
        Packet::PingResp => out.put_slice(&[PINGRESP << 4, 0]),
        Packet::Disconnect(d) if v5 => encode_disconnect_v5(DISCONNECT << 4, d, false, out),
        Packet::Disconnect(_) => out.put_slice(&[DISCONNECT << 4, 0]),
        Packet::Auth(d) if v5 => encode_disconnect_v5(AUTH << 4, d, true, out),
        // AUTH does not exist before v5.
        Packet::Auth(_) => {}
    }
}

/// Appends a PUBLISH fixed header, topic and packet id (only if `qos` > 0) for a payload of
/// `payload_len` bytes, but not the payload itself: the broker sends that as a separate shared
/// buffer. `pkid` is ignored for QoS 0, and so is `dup` (MQTT-3.3.1-2: DUP must be 0 on QoS 0).
/// Exactly [`publish_head_len`] bytes are written. 3.1/3.1.1 layout (no properties).
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
    put_publish_head(topic.as_bytes(), qos, pkid, dup, retain, None, payload_len, out);
}

/// Length in bytes of what [`encode_publish_head`] writes for these arguments.
pub fn publish_head_len(topic_len: usize, qos: QoS, payload_len: usize) -> usize {
    let variable_header = 2 + topic_len + pkid_len(qos);
    1 + remaining_length_len(variable_header + payload_len) + variable_header
}

/// v5 PUBLISH head: fixed header, topic, packet id (QoS > 0), then a property block whose body is
/// the concatenation of `props` (each an already-encoded run of properties, no length prefix); the
/// payload of `payload_len` bytes is sent separately by the caller. `pkid` is ignored for QoS 0,
/// and so is `dup`. Writes exactly [`publish_head_len_v5`]`(topic.len(), qos, total of props,
/// payload_len)` bytes.
///
/// The runs are written as given: they must be valid PUBLISH properties (MQTT 5.0 3.3.2.3), e.g.
/// from [`encode_properties_body`](super::properties::encode_properties_body).
// The fields of a PUBLISH head, each a plain value the broker has at hand: a struct would only be
// built to be taken apart again on the per-subscriber hot path.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish_head_v5(
    topic: &str,
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
    props: &[&[u8]],
    payload_len: usize,
    out: &mut BytesMut,
) {
    let props_len = props.iter().map(|p| p.len()).sum::<usize>();
    out.reserve(publish_head_len_v5(topic.len(), qos, props_len, payload_len));
    put_publish_head(topic.as_bytes(), qos, pkid, dup, retain, Some(props_len), payload_len, out);
    for p in props {
        out.put_slice(p);
    }
}

/// Length in bytes of what [`encode_publish_head_v5`] writes: `props_len` is the total length of
/// the property runs (without the block's length prefix, which this counts).
pub fn publish_head_len_v5(topic_len: usize, qos: QoS, props_len: usize, payload_len: usize) -> usize {
    let variable_header = 2 + topic_len + pkid_len(qos) + vbi_len(props_len) + props_len;
    1 + remaining_length_len(variable_header + payload_len) + variable_header
}

/// Appends a whole PUBLISH, head and payload (one copy of the payload: used once per message for
/// the frame shared by all QoS 0 subscribers, and for round-trip tests). 3.1/3.1.1 layout.
pub fn encode_publish(p: &Publish, out: &mut BytesMut) {
    let topic = p.topic.as_bytes();
    out.reserve(publish_head_len(topic.len(), p.qos, p.payload.len()) + p.payload.len());
    put_publish_head(topic, p.qos, p.pkid, p.dup, p.retain, None, p.payload.len(), out);
    out.put_slice(&p.payload);
}

/// [`encode_publish`] in the v5 layout: the property block is written from `p.properties`
/// (`None` as the empty block, a single 0 byte).
pub fn encode_publish_v5(p: &Publish, out: &mut BytesMut) {
    let topic = p.topic.as_bytes();
    let props = p.properties.as_deref();
    let props_len = props.map_or(0, properties_body_len);
    out.reserve(publish_head_len_v5(topic.len(), p.qos, props_len, p.payload.len()) + p.payload.len());
    put_publish_head(topic, p.qos, p.pkid, p.dup, p.retain, Some(props_len), p.payload.len(), out);
    if let Some(props) = props {
        encode_properties_body(props, out);
    }
    out.put_slice(&p.payload);
}

fn pkid_len(qos: QoS) -> usize {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => 2,
    }
}

/// Writes the PUBLISH head; the caller has reserved the space. With `props_len` (v5) the head
/// ends with the property block's length, and the caller writes those `props_len` bytes next.
#[allow(clippy::too_many_arguments)] // the fields of a PUBLISH head, each a plain value
fn put_publish_head(
    topic: &[u8],
    qos: QoS,
    pkid: u16,
    dup: bool,
    retain: bool,
    props_len: Option<usize>,
    payload_len: usize,
    out: &mut BytesMut,
) {
    let dup = dup && qos != QoS::AtMostOnce;
    let first = PUBLISH << 4 | u8::from(dup) << 3 | (qos as u8) << 1 | u8::from(retain);
    let props_block = props_len.map_or(0, |n| vbi_len(n) + n);
    let remaining = string_len(topic) + pkid_len(qos) + props_block + payload_len;
    put_remaining_header(first, remaining, out);
    put_string(topic, out);
    if qos != QoS::AtMostOnce {
        debug_assert_ne!(pkid, 0, "QoS > 0 PUBLISH needs a non-zero packet id");
        out.put_u16(pkid);
    }
    if let Some(n) = props_len {
        put_vbi(out, n);
    }
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP (and a 3.1.1 UNSUBACK). In v5 a non-zero reason adds its byte
/// (MQTT 5.0 3.4.2.1: with reason 0 and no properties the 2-byte form is used).
fn encode_ack(first: u8, a: &Ack, v5: bool, out: &mut BytesMut) {
    debug_assert_ne!(a.pkid, 0, "acknowledgements need a non-zero packet id");
    let [hi, lo] = a.pkid.to_be_bytes();
    if v5 && a.reason != 0 {
        out.put_slice(&[first, 3, hi, lo, a.reason]);
    } else {
        out.put_slice(&[first, 2, hi, lo]);
    }
}

/// v5 DISCONNECT or AUTH (MQTT 5.0 3.14.2, 3.15.2): empty for reason 0 without properties;
/// otherwise the reason code, then the property block, which DISCONNECT (but not AUTH, see
/// 3.15.2.1) may leave out when it is empty.
fn encode_disconnect_v5(first: u8, d: &Disconnect, auth: bool, out: &mut BytesMut) {
    let props = non_empty(&d.properties);
    match props {
        None if d.reason == 0 => out.put_slice(&[first, 0]),
        None if !auth => out.put_slice(&[first, 1, d.reason]),
        _ => {
            put_fixed_header(first, 1 + props.map_or(1, properties_len), out);
            out.put_u8(d.reason);
            put_opt_properties(props, out);
        }
    }
}

/// The v5 subscription options byte of `f` (MQTT 5.0 section 3.8.3.1).
fn subscription_options(f: &SubscribeFilter) -> u8 {
    debug_assert!(f.retain_handling < 3, "retain handling {}", f.retain_handling);
    let mut o = f.qos as u8 | (f.retain_handling & 0x03) << SO_RETAIN_HANDLING_SHIFT;
    if f.no_local {
        o |= SO_NO_LOCAL;
    }
    if f.retain_as_published {
        o |= SO_RETAIN_AS_PUBLISHED;
    }
    o
}

/// The properties to write: `None` for absent or empty ones, which are written as the byte 0.
fn non_empty(p: &Option<Box<Properties>>) -> Option<&Properties> {
    p.as_deref().filter(|p| !p.is_empty())
}

/// Writes a property block, or the empty block (a single 0) for `None`.
fn put_opt_properties(p: Option<&Properties>, out: &mut BytesMut) {
    match p {
        Some(p) => encode_properties(p, out),
        None => out.put_u8(0),
    }
}

fn encode_connect(c: &Connect, out: &mut BytesMut) {
    let (name, level): (&[u8], u8) = match c.protocol {
        ProtocolVersion::V3_1 => (b"MQIsdp", 3),
        ProtocolVersion::V3_1_1 => (b"MQTT", 4),
        ProtocolVersion::V5 => (b"MQTT", 5),
    };
    let v5 = c.protocol == ProtocolVersion::V5;
    let mut flags = 0u8;
    if c.clean_session {
        flags |= CF_CLEAN_SESSION;
    }
    // protocol name, level, flags, keep alive, client id
    let mut remaining = string_len(name) + 1 + 1 + 2 + string_len(c.client_id.as_bytes());
    if v5 {
        remaining += properties_len(&c.properties);
    }
    if let Some(w) = &c.will {
        flags |= CF_WILL | (w.qos as u8) << CF_WILL_QOS_SHIFT;
        if w.retain {
            flags |= CF_WILL_RETAIN;
        }
        remaining += string_len(w.topic.as_bytes()) + string_len(&w.payload);
        if v5 {
            remaining += properties_len(&w.properties);
        }
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
    if v5 {
        encode_properties(&c.properties, out);
    }
    put_string(c.client_id.as_bytes(), out);
    if let Some(w) = &c.will {
        if v5 {
            encode_properties(&w.properties, out);
        }
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
    use crate::protocol::properties::Properties;
    use crate::protocol::{
        decode, reason, Ack, ConnAck, Disconnect, SubAck, Subscribe, SubscribeFilter, UnsubAck, Unsubscribe,
        Utf8Bytes, Will,
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
                properties: Properties::default(),
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::default(),
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
            will: Some(Will {
                topic: s("t"),
                payload: Bytes::new(),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: Properties::default(),
            }),
            username: None,
            password: None,
            properties: Properties::default(),
        };
        assert_eq!(
            enc(&Packet::Connect(Box::new(c31))),
            [0x10, 20, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x34, 0, 0, 0, 1, b'a', 0, 1, b't', 0, 0]
        );
    }

    #[test]
    fn connack() {
        let a = Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: None });
        assert_eq!(enc(&a), [0x20, 2, 1, 0]);
        // 3.1 has no session present flag.
        assert_eq!(enc_v(&a, ProtocolVersion::V3_1), [0x20, 2, 0, 0]);
        let refused = Packet::ConnAck(ConnAck {
            session_present: false,
            code: reason::UNSUPPORTED_PROTOCOL_VERSION,
            properties: None,
        });
        assert_eq!(enc(&refused), [0x20, 2, 0, 1]);
        // v5 codes without a 3.1.1 twin are downgraded.
        let busy =
            Packet::ConnAck(ConnAck { session_present: false, code: reason::SERVER_BUSY, properties: None });
        assert_eq!(enc(&busy), [0x20, 2, 0, 3]);
    }

    #[test]
    fn acks_and_empty_packets() {
        assert_eq!(enc(&Packet::PubAck(Ack::ok(0x1234))), [0x40, 2, 0x12, 0x34]);
        // A v5 reason code has no place in a 3.1.1 ack.
        assert_eq!(enc(&Packet::PubRec(Ack { pkid: 1, reason: 0x10 })), [0x50, 2, 0, 1]);
        assert_eq!(enc(&Packet::PubRel(Ack::ok(2))), [0x62, 2, 0, 2]);
        assert_eq!(enc(&Packet::PubComp(Ack::ok(3))), [0x70, 2, 0, 3]);
        let unsuback = Packet::UnsubAck(UnsubAck { pkid: 4, codes: SmallVec::from_slice(&[0x11]) });
        assert_eq!(enc(&unsuback), [0xb0, 2, 0, 4]);
        assert_eq!(enc(&Packet::PingReq), [0xc0, 0]);
        assert_eq!(enc(&Packet::PingResp), [0xd0, 0]);
        assert_eq!(enc(&Packet::Disconnect(Disconnect::with_reason(0x8e, Some("taken over")))), [0xe0, 0]);
        // AUTH does not exist before v5: nothing is written.
        assert_eq!(enc(&Packet::Auth(Disconnect::with_reason(0x18, None))), []);
    }

    #[test]
    fn subscribe_family() {
        let sub = Packet::Subscribe(Subscribe {
            pkid: 10,
            filters: SmallVec::from_vec(vec![
                SubscribeFilter::new(s("a/b"), QoS::AtLeastOnce),
                // v5 options are not written before v5.
                SubscribeFilter { no_local: true, ..SubscribeFilter::new(s("c/d"), QoS::ExactlyOnce) },
            ]),
            subscription_id: Some(3),
        });
        assert_eq!(enc(&sub), [0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'd', 2]);
        let suback = Packet::SubAck(SubAck {
            pkid: 10,
            codes: SmallVec::from_vec(vec![0x00, reason::NOT_AUTHORIZED, 0x02]),
            reason_string: Some(s("no")),
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
            properties: None,
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

    // ---- MQTT 5.0 ----

    fn enc5(p: &Packet) -> Vec<u8> {
        enc_v(p, ProtocolVersion::V5)
    }

    /// Encodes `p` as v5 and checks that it decodes back to `p`.
    fn round_trip5(p: &Packet) -> Vec<u8> {
        let wire = enc5(p);
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(decode(&mut buf, ProtocolVersion::V5, usize::MAX), Ok(Some(p.clone())), "{wire:02x?}");
        assert!(buf.is_empty());
        wire
    }

    #[test]
    fn v5_connect() {
        let c = Connect {
            protocol: ProtocolVersion::V5,
            clean_session: true,
            keep_alive: 10,
            client_id: s("cid"),
            will: Some(Will {
                topic: s("w/t"),
                payload: Bytes::from_static(&[0xde, 0xad]),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Properties { will_delay_interval: Some(5), ..Properties::default() },
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties { session_expiry_interval: Some(10), ..Properties::default() },
        };
        let mut expected = vec![0x10, 46, 0, 4, b'M', b'Q', b'T', b'T', 5, 0xce, 0, 10];
        expected.extend_from_slice(&[5, 0x11, 0, 0, 0, 10, 0, 3, b'c', b'i', b'd']);
        expected.extend_from_slice(&[5, 0x18, 0, 0, 0, 5, 0, 3, b'w', b'/', b't', 0, 2, 0xde, 0xad]);
        expected.extend_from_slice(&[0, 4, b'u', b's', b'e', b'r', 0, 2, b'p', b'w']);
        // The connection version does not matter: CONNECT is written with its own.
        let p = Packet::Connect(Box::new(c));
        assert_eq!(enc(&p), expected);
        assert_eq!(round_trip5(&p), expected);

        // Password without username, no will: empty property block.
        let c = Connect {
            protocol: ProtocolVersion::V5,
            clean_session: false,
            keep_alive: 0,
            client_id: s(""),
            will: None,
            username: None,
            password: Some(Bytes::from_static(b"p")),
            properties: Properties::default(),
        };
        assert_eq!(
            round_trip5(&Packet::Connect(Box::new(c))),
            [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x40, 0, 0, 0, 0, 0, 0, 1, b'p']
        );
    }

    #[test]
    fn v5_connack() {
        let a = ConnAck { session_present: true, code: 0, properties: None };
        assert_eq!(round_trip5(&Packet::ConnAck(a.clone())), [0x20, 3, 1, 0, 0]);
        // An empty block given as Some is written like None.
        let empty = ConnAck { properties: Some(Box::default()), ..a };
        assert_eq!(enc5(&Packet::ConnAck(empty)), [0x20, 3, 1, 0, 0]);
        // Codes are written as they are: no 3.1.1 downgrade.
        let props = Properties { assigned_client_identifier: Some(s("c")), ..Properties::default() };
        let a =
            ConnAck { session_present: false, code: reason::SERVER_BUSY, properties: Some(Box::new(props)) };
        assert_eq!(round_trip5(&Packet::ConnAck(a)), [0x20, 7, 0, 0x89, 4, 0x12, 0, 1, b'c']);
    }

    #[test]
    fn v5_publish_and_split_head() {
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: s("a/b"),
            pkid: 10,
            payload: Bytes::from_static(b"hi"),
            properties: None,
        };
        let expected = [0x32, 10, 0, 3, b'a', b'/', b'b', 0, 10, 0, b'h', b'i'];
        assert_eq!(round_trip5(&Packet::Publish(p.clone())), expected);
        let mut whole = BytesMut::new();
        encode_publish_v5(&p, &mut whole);
        assert_eq!(&whole[..], &expected);

        let mut head = BytesMut::new();
        encode_publish_head_v5("a/b", QoS::AtLeastOnce, 10, false, false, &[], 2, &mut head);
        assert_eq!(head.len(), publish_head_len_v5(3, QoS::AtLeastOnce, 0, 2));
        assert_eq!(&head[..], &expected[..10]);

        // Properties in two runs (say, the message's own and a per-subscriber subscription id).
        let props = Properties {
            topic_alias: Some(2),
            subscription_identifiers: SmallVec::from_slice(&[300]),
            ..Properties::default()
        };
        let p = Publish {
            qos: QoS::AtMostOnce,
            pkid: 0,
            dup: false,
            retain: true,
            properties: Some(Box::new(props)),
            ..p
        };
        let wire = round_trip5(&Packet::Publish(p));
        // Identifier order: subscription identifier 0x0B (300 = 0xAC 0x02), then topic alias 0x23.
        assert_eq!(wire, [0x31, 14, 0, 3, b'a', b'/', b'b', 6, 0x0B, 0xac, 0x02, 0x23, 0, 2, b'h', b'i']);
        let mut head = BytesMut::new();
        let runs: [&[u8]; 2] = [&[0x0B, 0xac, 0x02], &[0x23, 0, 2]];
        // DUP is never set on QoS 0 and the packet id is not written.
        encode_publish_head_v5("a/b", QoS::AtMostOnce, 77, true, true, &runs, 2, &mut head);
        assert_eq!(head.len(), publish_head_len_v5(3, QoS::AtMostOnce, 6, 2));
        assert_eq!(&head[..], &wire[..wire.len() - 2]);
    }

    #[test]
    fn publish_head_len_v5_crosses_length_boundaries() {
        // Property block of 127 bytes: one length byte; 128: two.
        assert_eq!(publish_head_len_v5(1, QoS::AtMostOnce, 127, 0), 1 + 2 + 3 + 1 + 127);
        assert_eq!(publish_head_len_v5(1, QoS::AtMostOnce, 128, 0), 1 + 2 + 3 + 2 + 128);
        // Remaining length 127 -> 1 byte, 128 -> 2.
        assert_eq!(publish_head_len_v5(1, QoS::AtMostOnce, 0, 123), 1 + 1 + 3 + 1);
        assert_eq!(publish_head_len_v5(1, QoS::AtMostOnce, 0, 124), 1 + 2 + 3 + 1);
        let run = vec![0x26; 1]; // content of the run does not matter for sizing
        let mut head = BytesMut::new();
        encode_publish_head_v5("x", QoS::ExactlyOnce, 5, false, false, &[&run, &run], 100_000, &mut head);
        assert_eq!(head.len(), publish_head_len_v5(1, QoS::ExactlyOnce, 2, 100_000));
    }

    #[test]
    fn v5_acks() {
        for (first, wrap) in [
            (0x40u8, Packet::PubAck as fn(Ack) -> Packet),
            (0x50, Packet::PubRec),
            (0x62, Packet::PubRel),
            (0x70, Packet::PubComp),
        ] {
            // Reason 0: the 2-byte short form (3.4.2.1).
            assert_eq!(round_trip5(&wrap(Ack::ok(0x1234))), [first, 2, 0x12, 0x34]);
            let reason = if first == 0x62 || first == 0x70 { 0x92 } else { 0x10 };
            assert_eq!(round_trip5(&wrap(Ack { pkid: 1, reason })), [first, 3, 0, 1, reason]);
        }
    }

    #[test]
    fn v5_subscribe_family() {
        let sub = Packet::Subscribe(Subscribe {
            pkid: 10,
            filters: SmallVec::from_vec(vec![
                SubscribeFilter {
                    filter: s("a/b"),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                SubscribeFilter::new(s("c"), QoS::AtMostOnce),
            ]),
            subscription_id: Some(7),
        });
        assert_eq!(
            round_trip5(&sub),
            [0x82, 15, 0, 10, 2, 0x0B, 7, 0, 3, b'a', b'/', b'b', 0x2d, 0, 1, b'c', 0]
        );
        let sub = Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: SmallVec::from_vec(vec![SubscribeFilter::new(s("c"), QoS::ExactlyOnce)]),
            subscription_id: Some(268_435_455),
        });
        assert_eq!(round_trip5(&sub), [0x82, 12, 0, 1, 5, 0x0B, 0xff, 0xff, 0xff, 0x7f, 0, 1, b'c', 2]);

        // SUBACK codes are written as they are; the reason string is a property.
        let suback = Packet::SubAck(SubAck {
            pkid: 10,
            codes: SmallVec::from_vec(vec![0x00, reason::NOT_AUTHORIZED, 0xA2]),
            reason_string: Some(s("no")),
        });
        assert_eq!(round_trip5(&suback), [0x90, 11, 0, 10, 5, 0x1F, 0, 2, b'n', b'o', 0x00, 0x87, 0xA2]);
        let suback =
            Packet::SubAck(SubAck { pkid: 1, codes: SmallVec::from_slice(&[1]), reason_string: None });
        assert_eq!(round_trip5(&suback), [0x90, 4, 0, 1, 0, 1]);

        let unsub = Packet::Unsubscribe(Unsubscribe { pkid: 1, filters: SmallVec::from_vec(vec![s("a")]) });
        assert_eq!(round_trip5(&unsub), [0xa2, 6, 0, 1, 0, 0, 1, b'a']);
        let unsuback = Packet::UnsubAck(UnsubAck { pkid: 1, codes: SmallVec::from_slice(&[0x00, 0x11]) });
        assert_eq!(round_trip5(&unsuback), [0xb0, 5, 0, 1, 0, 0x00, 0x11]);
    }

    #[test]
    fn v5_disconnect_and_auth() {
        assert_eq!(round_trip5(&Packet::Disconnect(Disconnect::default())), [0xe0, 0]);
        let empty = Disconnect { reason: 0, properties: Some(Box::default()) };
        assert_eq!(enc5(&Packet::Disconnect(empty)), [0xe0, 0]);
        assert_eq!(round_trip5(&Packet::Disconnect(Disconnect::with_reason(0x04, None))), [0xe0, 1, 0x04]);
        assert_eq!(
            round_trip5(&Packet::Disconnect(Disconnect::with_reason(0x8e, Some("x")))),
            [0xe0, 6, 0x8e, 4, 0x1F, 0, 1, b'x']
        );
        assert_eq!(round_trip5(&Packet::Auth(Disconnect::default())), [0xf0, 0]);
        // AUTH never omits the property length alone (3.15.2.1).
        assert_eq!(round_trip5(&Packet::Auth(Disconnect::with_reason(0x18, None))), [0xf0, 2, 0x18, 0]);
        let props = Properties { authentication_method: Some(s("m")), ..Properties::default() };
        let auth = Disconnect { reason: 0x19, properties: Some(Box::new(props)) };
        assert_eq!(round_trip5(&Packet::Auth(auth)), [0xf0, 6, 0x19, 4, 0x15, 0, 1, b'm']);
        assert_eq!(enc5(&Packet::PingReq), [0xc0, 0]);
    }
}
