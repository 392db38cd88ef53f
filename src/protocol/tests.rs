//! Property tests of the codec, for MQTT 3.1, 3.1.1 and 5.0: every packet round-trips through encode
//! and decode (whole, back to back and byte by byte), the split PUBLISH encodings match the whole
//! one, and no input makes the decoder panic or disagree with `frame_len`.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use smallvec::SmallVec;

use super::decode::{
    is_auth_reason, is_connack_reason, is_disconnect_reason, is_puback_reason, is_suback_reason,
    is_unsuback_reason,
};
use super::encode::{encode_publish_head_v5, encode_publish_v5, publish_head_len_v5};
use super::properties::{encode_properties_body, properties_body_len, PacketKind, Properties};
use super::{
    decode, encode, encode_publish, encode_publish_head, frame_len, publish_head_len, reason, Ack, ConnAck,
    Connect, DecodeError, Disconnect, Packet, ProtocolVersion, Publish, QoS, SubAck, Subscribe,
    SubscribeFilter, UnsubAck, Unsubscribe, Utf8Bytes, Will,
};

/// Largest variable byte integer (MQTT-1.5.5): the subscription identifier's range.
const MAX_VBI: u32 = 268_435_455;

fn utf8() -> impl Strategy<Value = Utf8Bytes> {
    // Any Unicode scalar except U+0000, which MQTT forbids.
    "[^\\x00]{0,12}".prop_map(|s| Utf8Bytes::copy_from_str(&s))
}

/// A topic name: no wildcards (a response topic must not have any, MQTT-3.3.2-14).
fn topic() -> impl Strategy<Value = Utf8Bytes> {
    "[^\\x00+#]{0,12}".prop_map(|s| Utf8Bytes::copy_from_str(&s))
}

fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V3_1), Just(ProtocolVersion::V3_1_1), Just(ProtocolVersion::V5)]
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// One of the reason codes `allowed` accepts.
fn code(allowed: fn(u8) -> bool) -> impl Strategy<Value = u8> {
    prop::sample::select((0..=u8::MAX).filter(|&c| allowed(c)).collect::<Vec<u8>>())
}

fn codes(allowed: fn(u8) -> bool) -> impl Strategy<Value = SmallVec<[u8; 2]>> {
    prop::collection::vec(code(allowed), 1..5).prop_map(SmallVec::from_vec)
}

fn opt<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    prop::option::weighted(0.3, s)
}

/// Properties that a `kind` packet may carry (table 2-4), with values in the ranges the decoder
/// accepts.
fn props(kind: PacketKind) -> impl Strategy<Value = Properties> {
    let a = (
        opt(0u8..=1),
        opt(any::<u32>()),
        opt(utf8()),
        opt(topic()),
        opt(binary(8)),
        prop::collection::vec(1..=MAX_VBI, 0..3),
        opt(any::<u32>()),
        opt(utf8()),
        opt(any::<u16>()),
    );
    let b = (
        opt(utf8()),
        opt(binary(8)),
        opt(0u8..=1),
        opt(any::<u32>()),
        opt(0u8..=1),
        opt(utf8()),
        opt(utf8()),
        opt(utf8()),
        opt(1..=u16::MAX),
    );
    let c = (
        opt(any::<u16>()),
        opt(1..=u16::MAX),
        opt(0u8..=1),
        opt(0u8..=1),
        prop::collection::vec((utf8(), utf8()), 0..3),
        opt(1..=u32::MAX),
        opt(0u8..=1),
        opt(0u8..=1),
        opt(0u8..=1),
    );
    (a, b, c).prop_map(move |(a, b, c)| {
        let all = Properties {
            payload_format_indicator: a.0,
            message_expiry_interval: a.1,
            content_type: a.2,
            response_topic: a.3,
            correlation_data: a.4,
            subscription_identifiers: SmallVec::from_vec(a.5),
            session_expiry_interval: a.6,
            assigned_client_identifier: a.7,
            server_keep_alive: a.8,
            authentication_method: b.0,
            authentication_data: b.1,
            request_problem_information: b.2,
            will_delay_interval: b.3,
            request_response_information: b.4,
            response_information: b.5,
            server_reference: b.6,
            reason_string: b.7,
            receive_maximum: b.8,
            topic_alias_maximum: c.0,
            topic_alias: c.1,
            maximum_qos: c.2,
            retain_available: c.3,
            user_properties: c.4,
            maximum_packet_size: c.5,
            wildcard_subscription_available: c.6,
            subscription_identifier_available: c.7,
            shared_subscription_available: c.8,
        };
        restrict(all, kind)
    })
}

/// Keeps only the properties of `p` that `kind` allows, transcribed from the packets' property
/// sections (3.1.2.11, 3.1.3.2, 3.2.2.3, 3.3.2.3, 3.14.2.2, 3.15.2.2 …).
fn restrict(p: Properties, kind: PacketKind) -> Properties {
    use PacketKind as K;
    let mut r = Properties { user_properties: p.user_properties, ..Properties::default() };
    match kind {
        K::Connect => {
            r.session_expiry_interval = p.session_expiry_interval;
            r.receive_maximum = p.receive_maximum;
            r.maximum_packet_size = p.maximum_packet_size;
            r.topic_alias_maximum = p.topic_alias_maximum;
            r.request_response_information = p.request_response_information;
            r.request_problem_information = p.request_problem_information;
            // Authentication data needs a method (3.1.2.11.10).
            if p.authentication_method.is_some() {
                r.authentication_data = p.authentication_data;
            }
            r.authentication_method = p.authentication_method;
        }
        K::Will => {
            r.will_delay_interval = p.will_delay_interval;
            r.payload_format_indicator = p.payload_format_indicator;
            r.message_expiry_interval = p.message_expiry_interval;
            r.content_type = p.content_type;
            r.response_topic = p.response_topic;
            r.correlation_data = p.correlation_data;
        }
        K::ConnAck => {
            r.session_expiry_interval = p.session_expiry_interval;
            r.receive_maximum = p.receive_maximum;
            r.maximum_qos = p.maximum_qos;
            r.retain_available = p.retain_available;
            r.maximum_packet_size = p.maximum_packet_size;
            r.assigned_client_identifier = p.assigned_client_identifier;
            r.topic_alias_maximum = p.topic_alias_maximum;
            r.reason_string = p.reason_string;
            r.wildcard_subscription_available = p.wildcard_subscription_available;
            r.subscription_identifier_available = p.subscription_identifier_available;
            r.shared_subscription_available = p.shared_subscription_available;
            r.server_keep_alive = p.server_keep_alive;
            r.response_information = p.response_information;
            r.server_reference = p.server_reference;
            r.authentication_method = p.authentication_method;
            r.authentication_data = p.authentication_data;
        }
        K::Publish => {
            r.payload_format_indicator = p.payload_format_indicator;
            r.message_expiry_interval = p.message_expiry_interval;
            r.topic_alias = p.topic_alias;
            r.response_topic = p.response_topic;
            r.correlation_data = p.correlation_data;
            r.subscription_identifiers = p.subscription_identifiers;
            r.content_type = p.content_type;
        }
        K::Disconnect => {
            r.session_expiry_interval = p.session_expiry_interval;
            r.reason_string = p.reason_string;
            r.server_reference = p.server_reference;
        }
        K::Auth => {
            r.authentication_method = p.authentication_method;
            r.authentication_data = p.authentication_data;
            r.reason_string = p.reason_string;
        }
        // Only a reason string (and user properties), which these packet types do not keep.
        _ => r.user_properties.clear(),
    }
    r
}

/// What the decoder makes of a property block: `None` when empty.
fn boxed(p: Properties) -> Option<Box<Properties>> {
    if p.is_empty() {
        None
    } else {
        Some(Box::new(p))
    }
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version == ProtocolVersion::V5;
    let will = (utf8(), binary(40), qos(), any::<bool>(), props(PacketKind::Will)).prop_map(
        move |(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties: if v5 { properties } else { Properties::default() },
        },
    );
    (
        any::<bool>(),
        any::<u16>(),
        utf8(),
        prop::option::of(will),
        prop::option::of(utf8()),
        prop::option::of(binary(40)),
        props(PacketKind::Connect),
    )
        .prop_map(
            move |(clean_session, keep_alive, client_id, will, mut username, password, properties)| {
                // MQTT-3.1.2-22: on 3.1.1 a password needs a username (3.1 tolerates it, 5.0 allows it).
                if version == ProtocolVersion::V3_1_1 && password.is_some() && username.is_none() {
                    username = Some(Utf8Bytes::default());
                }
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_session,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties: if v5 { properties } else { Properties::default() },
                }))
            },
        )
}

fn publish(version: ProtocolVersion) -> impl Strategy<Value = Publish> {
    let v5 = version == ProtocolVersion::V5;
    (qos(), any::<bool>(), any::<bool>(), utf8(), pkid(), binary(300), props(PacketKind::Publish)).prop_map(
        move |(qos, dup, retain, topic, pkid, payload, properties)| {
            let qos0 = qos == QoS::AtMostOnce;
            Publish {
                // DUP on QoS 0 is a protocol violation; the packet id is absent on QoS 0.
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                pkid: if qos0 { 0 } else { pkid },
                payload,
                properties: if v5 { boxed(properties) } else { None },
            }
        },
    )
}

fn ack(version: ProtocolVersion, allowed: fn(u8) -> bool) -> impl Strategy<Value = Ack> {
    let v5 = version == ProtocolVersion::V5;
    (pkid(), code(allowed)).prop_map(move |(pkid, reason)| Ack { pkid, reason: if v5 { reason } else { 0 } })
}

fn is_pubrel_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x92)
}

fn packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version == ProtocolVersion::V5;
    // Before v5 only the codes that survive the 3.1.1 round trip (0x86 is written as 5 = 0x87).
    let connack_code = if v5 {
        code(is_connack_reason).boxed()
    } else {
        prop::sample::select(vec![0x00, 0x84, 0x85, 0x87, 0x88]).boxed()
    };
    let connack = (any::<bool>(), connack_code, props(PacketKind::ConnAck)).prop_map(move |(sp, code, p)| {
        Packet::ConnAck(ConnAck {
            // 3.1 has no session present flag.
            session_present: sp && version != ProtocolVersion::V3_1,
            code,
            properties: if v5 { boxed(p) } else { None },
        })
    });
    let filter =
        (utf8(), qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(filter, qos, nl, rap, rh)| {
            if v5 {
                SubscribeFilter { filter, qos, no_local: nl, retain_as_published: rap, retain_handling: rh }
            } else {
                SubscribeFilter::new(filter, qos)
            }
        });
    let subscribe =
        (pkid(), prop::collection::vec(filter, 1..5), opt(1..=MAX_VBI)).prop_map(move |(pkid, f, id)| {
            Packet::Subscribe(Subscribe {
                pkid,
                filters: SmallVec::from_vec(f),
                subscription_id: id.filter(|_| v5),
            })
        });
    let suback_codes = if v5 { codes(is_suback_reason) } else { codes(|c| matches!(c, 0..=2 | 0x80)) };
    let suback = (pkid(), suback_codes, opt(utf8())).prop_map(move |(pkid, codes, rs)| {
        Packet::SubAck(SubAck { pkid, codes, reason_string: rs.filter(|_| v5) })
    });
    let unsubscribe = (pkid(), prop::collection::vec(utf8(), 1..5))
        .prop_map(|(pkid, f)| Packet::Unsubscribe(Unsubscribe { pkid, filters: SmallVec::from_vec(f) }));
    let unsuback = (pkid(), codes(is_unsuback_reason)).prop_map(move |(pkid, codes)| {
        Packet::UnsubAck(UnsubAck { pkid, codes: if v5 { codes } else { SmallVec::new() } })
    });
    let disconnect =
        (code(is_disconnect_reason), props(PacketKind::Disconnect)).prop_map(move |(reason, p)| {
            Packet::Disconnect(if v5 {
                Disconnect { reason, properties: boxed(p) }
            } else {
                Disconnect::default()
            })
        });
    // AUTH does not exist before v5: a PINGREQ takes its place there.
    let auth = (code(is_auth_reason), props(PacketKind::Auth)).prop_map(move |(reason, p)| {
        if v5 {
            Packet::Auth(Disconnect { reason, properties: boxed(p) })
        } else {
            Packet::PingReq
        }
    });
    prop_oneof![
        connect(version),
        connack,
        publish(version).prop_map(Packet::Publish),
        ack(version, is_puback_reason).prop_map(Packet::PubAck),
        ack(version, is_puback_reason).prop_map(Packet::PubRec),
        ack(version, is_pubrel_reason).prop_map(Packet::PubRel),
        ack(version, is_pubrel_reason).prop_map(Packet::PubComp),
        subscribe,
        suback,
        unsubscribe,
        unsuback,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect,
        auth,
    ]
}

fn versioned_packets(n: usize) -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    version().prop_flat_map(move |v| (Just(v), prop::collection::vec(packet(v), 1..n)))
}

fn versioned_publish() -> impl Strategy<Value = (ProtocolVersion, Publish)> {
    version().prop_flat_map(|v| (Just(v), publish(v)))
}

/// Decodes everything in `buf` until it needs more bytes or fails; must never panic, must agree
/// with `frame_len` about where each packet ends, and what decodes must re-encode to bytes that
/// decode to the same packet.
fn drain(mut buf: BytesMut, version: ProtocolVersion, max: usize) {
    loop {
        let framed = frame_len(&buf, max);
        let before = buf.len();
        // frame_len has no version: it frames AUTH (type 15), which decode refuses before v5.
        let first = buf.first().copied();
        let auth_before_v5 = version != ProtocolVersion::V5 && first.is_some_and(|b| b >> 4 == 15);
        match decode(&mut buf, version, max) {
            Ok(Some(p)) => {
                let consumed = before - buf.len();
                assert_eq!(framed, Ok(Some(consumed)));
                assert!(consumed >= 2);
                let mut again = BytesMut::new();
                encode(&p, version, &mut again);
                assert!(again.len() <= consumed, "re-encoding {p:?} grew it");
                let back = decode(&mut again, version, usize::MAX);
                assert_eq!(back, Ok(Some(normalized(p, version))));
                assert!(again.is_empty());
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                return;
            }
            Err(e) => {
                // decode may fail later than frame_len (body checks), never earlier on the
                // header: a header error from decode is also a header error from frame_len.
                if auth_before_v5 {
                    assert_eq!(Some(e), first.map(|byte| DecodeError::InvalidHeader { byte }));
                } else if matches!(
                    e,
                    DecodeError::InvalidHeader { .. }
                        | DecodeError::MalformedLength
                        | DecodeError::PacketTooLarge { .. }
                ) {
                    assert_eq!(framed, Err(e));
                }
                return;
            }
        }
    }
}

/// `p` as it comes back from a round trip: the one lossy mapping is the 3.1.1 CONNACK return code 4
/// (bad user name or password, v5 0x86), which is written back as 5 (not authorized, 0x87), as
/// mosquitto does (see `reason::connack_v3`).
fn normalized(p: Packet, version: ProtocolVersion) -> Packet {
    match p {
        Packet::ConnAck(a)
            if version != ProtocolVersion::V5 && a.code == reason::BAD_USERNAME_OR_PASSWORD =>
        {
            Packet::ConnAck(ConnAck { code: reason::NOT_AUTHORIZED, ..a })
        }
        p => p,
    }
}

proptest! {
    #[test]
    fn round_trip((version, packets) in versioned_packets(6)) {
        let mut buf = BytesMut::new();
        let mut ends = Vec::new();
        for p in &packets {
            encode(p, version, &mut buf);
            ends.push(buf.len());
        }
        // Each packet alone, with frame_len agreeing on its size.
        let mut start = 0;
        for (p, &end) in packets.iter().zip(&ends) {
            let mut one = BytesMut::from(&buf[start..end]);
            prop_assert_eq!(frame_len(&one, usize::MAX), Ok(Some(end - start)));
            prop_assert_eq!(decode(&mut one, version, usize::MAX), Ok(Some(p.clone())));
            prop_assert!(one.is_empty());
            start = end;
        }
        // All of them back to back in one buffer.
        let whole = buf.clone();
        for p in &packets {
            prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(Some(p.clone())));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(None));

        // Byte by byte, as a slow connection delivers them: the same packets, nothing decoded early.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in &whole[..] {
            buf.extend_from_slice(&[byte]);
            while let Some(p) = decode(&mut buf, version, usize::MAX).expect("valid stream") {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn split_delivery((version, p) in versioned_publish(), cut in any::<prop::sample::Index>()) {
        // The bytes arrive in two reads: nothing is decoded or consumed before the second one.
        let mut whole = BytesMut::new();
        encode(&Packet::Publish(p.clone()), version, &mut whole);
        let cut = cut.index(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(None));
        prop_assert_eq!(buf.len(), cut);
        buf.extend_from_slice(&whole[cut..]);
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(Some(Packet::Publish(p))));
    }

    #[test]
    fn publish_head_plus_payload_is_publish(p in publish(ProtocolVersion::V3_1_1)) {
        let mut whole = BytesMut::new();
        encode_publish(&p, &mut whole);
        let mut head = BytesMut::new();
        encode_publish_head(
            p.topic.as_str(), p.qos, p.pkid, p.dup, p.retain, p.payload.len(), &mut head,
        );
        prop_assert_eq!(head.len(), publish_head_len(p.topic.len(), p.qos, p.payload.len()));
        head.extend_from_slice(&p.payload);
        prop_assert_eq!(&head[..], &whole[..]);
        let mut via_encode = BytesMut::new();
        encode(&Packet::Publish(p), ProtocolVersion::V3_1_1, &mut via_encode);
        prop_assert_eq!(&via_encode[..], &whole[..]);
    }

    #[test]
    fn v5_publish_head_plus_payload_is_publish(
        p in publish(ProtocolVersion::V5),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut whole = BytesMut::new();
        encode(&Packet::Publish(p.clone()), ProtocolVersion::V5, &mut whole);
        let mut direct = BytesMut::new();
        encode_publish_v5(&p, &mut direct);
        prop_assert_eq!(&direct[..], &whole[..]);

        // The properties as the broker would hold them: pre-encoded, here cut into two runs.
        let mut body = BytesMut::new();
        if let Some(props) = &p.properties {
            encode_properties_body(props, &mut body);
            prop_assert_eq!(body.len(), properties_body_len(props));
        }
        let cut = cut.index(body.len() + 1);
        let (a, b) = body.split_at(cut);
        let mut head = BytesMut::new();
        encode_publish_head_v5(p.topic.as_str(), p.qos, p.pkid, p.dup, p.retain, &[a, b], p.payload.len(), &mut head);
        prop_assert_eq!(head.len(), publish_head_len_v5(p.topic.len(), p.qos, body.len(), p.payload.len()));
        head.extend_from_slice(&p.payload);
        prop_assert_eq!(&head[..], &whole[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        version in version(),
        max in prop_oneof![Just(usize::MAX), 0usize..64],
    ) {
        drain(BytesMut::from(&bytes[..]), version, max);
    }

    #[test]
    fn plausible_headers_never_panic(
        first in any::<u8>(),
        body in prop::collection::vec(any::<u8>(), 0..64),
        version in version(),
    ) {
        // Arbitrary bodies behind a remaining length that matches them, so the body parsers
        // (not just the header checks) see garbage.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[first, body.len() as u8]);
        buf.extend_from_slice(&body);
        drain(buf, version, usize::MAX);
    }

    #[test]
    fn mutated_packets_never_panic(
        (version, packets) in versioned_packets(3),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut buf = BytesMut::new();
        for p in &packets {
            encode(p, version, &mut buf);
        }
        for (at, byte) in edits {
            let i = at.index(buf.len());
            buf[i] = byte;
        }
        let keep = cut.index(buf.len() + 1);
        buf.truncate(keep);
        drain(buf, version, usize::MAX);
    }
}
