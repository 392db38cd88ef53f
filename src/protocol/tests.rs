//! Property tests of the codec: every packet round-trips through encode and decode, the split
//! PUBLISH encoding matches the whole one, and no input makes the decoder panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use smallvec::SmallVec;

use super::{
    decode, encode, encode_publish, encode_publish_head, frame_len, publish_head_len, ConnAck, Connect,
    ConnectReturnCode, DecodeError, Packet, ProtocolVersion, Publish, QoS, SubAck, SubAckCode, Subscribe,
    SubscribeFilter, Unsubscribe, Utf8Bytes, Will,
};

fn utf8() -> impl Strategy<Value = Utf8Bytes> {
    // Any Unicode scalar except U+0000, which MQTT forbids.
    "[^\\x00]{0,12}".prop_map(|s| Utf8Bytes::copy_from_str(&s))
}

fn binary(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V3_1), Just(ProtocolVersion::V3_1_1)]
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let will = (utf8(), binary(40), qos(), any::<bool>()).prop_map(|(topic, payload, qos, retain)| Will {
        topic,
        payload,
        qos,
        retain,
    });
    (
        any::<bool>(),
        any::<u16>(),
        utf8(),
        prop::option::of(will),
        prop::option::of(utf8()),
        prop::option::of(binary(40)),
    )
        .prop_map(move |(clean_session, keep_alive, client_id, will, mut username, password)| {
            // MQTT-3.1.2-22: on 3.1.1 a password needs a username (3.1 tolerates it).
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
            }))
        })
}

fn publish() -> impl Strategy<Value = Publish> {
    (qos(), any::<bool>(), any::<bool>(), utf8(), pkid(), binary(300)).prop_map(
        |(qos, dup, retain, topic, pkid, payload)| {
            let qos0 = qos == QoS::AtMostOnce;
            Publish {
                // DUP on QoS 0 is a protocol violation; the packet id is absent on QoS 0.
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                pkid: if qos0 { 0 } else { pkid },
                payload,
            }
        },
    )
}

fn packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let code = prop_oneof![
        Just(ConnectReturnCode::Accepted),
        Just(ConnectReturnCode::UnacceptableProtocolVersion),
        Just(ConnectReturnCode::IdentifierRejected),
        Just(ConnectReturnCode::ServerUnavailable),
        Just(ConnectReturnCode::BadUserNameOrPassword),
        Just(ConnectReturnCode::NotAuthorized),
    ];
    let connack = (any::<bool>(), code).prop_map(move |(sp, code)| {
        Packet::ConnAck(ConnAck {
            // 3.1 has no session present flag.
            session_present: sp && version != ProtocolVersion::V3_1,
            code,
        })
    });
    let filter = (utf8(), qos()).prop_map(|(filter, qos)| SubscribeFilter { filter, qos });
    let subscribe = (pkid(), prop::collection::vec(filter, 1..5))
        .prop_map(|(pkid, f)| Packet::Subscribe(Subscribe { pkid, filters: SmallVec::from_vec(f) }));
    let suback_code = prop_oneof![qos().prop_map(SubAckCode::Granted), Just(SubAckCode::Failure)];
    let suback = (pkid(), prop::collection::vec(suback_code, 1..5))
        .prop_map(|(pkid, c)| Packet::SubAck(SubAck { pkid, codes: SmallVec::from_vec(c) }));
    let unsubscribe = (pkid(), prop::collection::vec(utf8(), 1..5))
        .prop_map(|(pkid, f)| Packet::Unsubscribe(Unsubscribe { pkid, filters: SmallVec::from_vec(f) }));
    prop_oneof![
        connect(version),
        connack,
        publish().prop_map(Packet::Publish),
        pkid().prop_map(Packet::PubAck),
        pkid().prop_map(Packet::PubRec),
        pkid().prop_map(Packet::PubRel),
        pkid().prop_map(Packet::PubComp),
        subscribe,
        suback,
        unsubscribe,
        pkid().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn versioned_packets(n: usize) -> impl Strategy<Value = (ProtocolVersion, Vec<Packet>)> {
    version().prop_flat_map(move |v| (Just(v), prop::collection::vec(packet(v), 1..n)))
}

/// Decodes everything in `buf` until it needs more bytes or fails; must never panic, and must
/// agree with `frame_len` about where each packet ends.
fn drain(mut buf: BytesMut, version: ProtocolVersion, max: usize) {
    loop {
        let framed = frame_len(&buf, max);
        let before = buf.len();
        match decode(&mut buf, version, max) {
            Ok(Some(_)) => {
                let consumed = before - buf.len();
                assert_eq!(framed, Ok(Some(consumed)));
                assert!(consumed >= 2);
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                return;
            }
            Err(e) => {
                // decode may fail later than frame_len (body checks), never earlier on the
                // header: a header error from decode is also a header error from frame_len.
                if matches!(
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
        for p in &packets {
            prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(Some(p.clone())));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decode(&mut buf, version, usize::MAX), Ok(None));
    }

    #[test]
    fn split_delivery(p in publish(), cut in any::<prop::sample::Index>()) {
        // The bytes arrive in two reads: nothing is decoded or consumed before the second one.
        let mut whole = BytesMut::new();
        encode_publish(&p, &mut whole);
        let cut = cut.index(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        prop_assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, usize::MAX), Ok(None));
        prop_assert_eq!(buf.len(), cut);
        buf.extend_from_slice(&whole[cut..]);
        prop_assert_eq!(
            decode(&mut buf, ProtocolVersion::V3_1_1, usize::MAX),
            Ok(Some(Packet::Publish(p)))
        );
    }

    #[test]
    fn publish_head_plus_payload_is_publish(p in publish()) {
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
