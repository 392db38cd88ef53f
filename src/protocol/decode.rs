//! MQTT 3.1/3.1.1 decoder.
//!
//! Decoding is two-step so that the connection reader never buffers more than it must:
//! [`frame_len`] looks only at the fixed header (at most 5 bytes) and rejects bad first bytes,
//! broken remaining lengths and oversized packets before any body byte has arrived; [`decode`]
//! then splits the complete packet off the read buffer as one shared [`Bytes`] and slices every
//! string and payload out of it, so a decoded packet owns no copy of its data.
//!
//! Every read is bounds-checked by [`Reader`]; nothing is allocated from a length taken off the
//! wire before the bytes it describes are actually in the buffer.

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

use super::types::{
    ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, ProtocolVersion, Publish, QoS, SubAck,
    SubAckCode, Subscribe, SubscribeFilter, Unsubscribe, Utf8Bytes, Will,
};

// Control packet types (MQTT-2.2.1). Shared with the encoder.
pub(super) const CONNECT: u8 = 1;
pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const PUBREC: u8 = 5;
pub(super) const PUBREL: u8 = 6;
pub(super) const PUBCOMP: u8 = 7;
pub(super) const SUBSCRIBE: u8 = 8;
pub(super) const SUBACK: u8 = 9;
pub(super) const UNSUBSCRIBE: u8 = 10;
pub(super) const UNSUBACK: u8 = 11;
pub(super) const PINGREQ: u8 = 12;
pub(super) const PINGRESP: u8 = 13;
pub(super) const DISCONNECT: u8 = 14;

/// Largest value a four-byte remaining length can carry (MQTT-2.2.3).
pub(super) const MAX_REMAINING_LENGTH: usize = 268_435_455;

// CONNECT flag bits (MQTT-3.1.2.3).
pub(super) const CF_RESERVED: u8 = 0x01;
pub(super) const CF_CLEAN_SESSION: u8 = 0x02;
pub(super) const CF_WILL: u8 = 0x04;
pub(super) const CF_WILL_QOS_SHIFT: u8 = 3;
pub(super) const CF_WILL_RETAIN: u8 = 0x20;
pub(super) const CF_PASSWORD: u8 = 0x40;
pub(super) const CF_USERNAME: u8 = 0x80;

/// A parsed fixed header.
#[derive(Clone, Copy, Debug)]
struct FixedHeader {
    /// The first byte: packet type in the high nibble, flags in the low one.
    first: u8,
    /// Bytes taken by the first byte plus the remaining length field (2..=5).
    header_len: usize,
    /// The remaining length: bytes of variable header + payload.
    remaining: usize,
}

impl FixedHeader {
    fn packet_type(&self) -> u8 {
        self.first >> 4
    }

    /// Length of the whole packet. Cannot overflow: at most 5 + 268,435,455.
    fn total_len(&self) -> usize {
        self.header_len + self.remaining
    }
}

/// Where the packet at the front of `buf` ends.
///
/// Returns `Ok(Some(total_len_including_fixed_header))` once the fixed header is complete, whether
/// or not the body has arrived, and `Ok(None)` if the fixed header itself is incomplete. Errors,
/// all detected before the body arrives: [`DecodeError::InvalidHeader`] for packet type 0 or 15
/// or wrong reserved flag bits, [`DecodeError::Malformed`] for a PUBLISH with QoS 3 or with DUP
/// set on QoS 0 (MQTT-3.3.1-2/4), [`DecodeError::MalformedLength`] for a remaining length that
/// does not end within four bytes, and [`DecodeError::PacketTooLarge`] when the whole packet
/// would be larger than `max_packet_size`.
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, DecodeError> {
    Ok(parse_fixed_header(buf, max_packet_size)?.map(|h| h.total_len()))
}

/// Decodes one packet from the front of `buf` if it is complete.
///
/// On `Ok(Some(_))` exactly that packet's bytes have been removed from `buf`; the packet's strings
/// and payload are slices of them (no copy). On `Ok(None)` nothing was consumed and nothing was
/// reserved: the caller reads more and calls again. `version` is the connection's negotiated
/// version (pass [`ProtocolVersion::V3_1_1`] before CONNECT: a CONNECT states its own version).
/// [`ProtocolVersion::V5`] is decoded with the 3.1.1 rules until the v5 codec lands.
///
/// A packet whose length is fixed by the spec (acks, CONNACK, PINGREQ, PINGRESP, DISCONNECT) is
/// rejected as soon as its fixed header announces another length, without waiting for its body.
/// On `Err` the connection must be closed; how much of `buf` was consumed is unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(h) = parse_fixed_header(buf, max_packet_size)? else {
        return Ok(None);
    };
    let total = h.total_len();

    // Packets without strings or payload: check the announced length now (a PUBACK claiming
    // 200 MB is malformed, there is no point buffering it), then read them in place without
    // splitting the buffer.
    if let Some(expected) = fixed_body_len(h.packet_type()) {
        if h.remaining != expected {
            return Err(DecodeError::Malformed(fixed_len_error(h.packet_type())));
        }
        let Some(body) = buf.get(h.header_len..total) else {
            return Ok(None);
        };
        let packet = decode_fixed(h.packet_type(), body, version)?;
        buf.advance(total);
        return Ok(Some(packet));
    }

    if buf.len() < total {
        return Ok(None);
    }
    let frame = buf.split_to(total).freeze();
    let mut r = Reader { buf: frame, pos: h.header_len };
    let packet = match h.packet_type() {
        CONNECT => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        PUBLISH => Packet::Publish(decode_publish(h.first, &mut r)?),
        SUBSCRIBE => Packet::Subscribe(decode_subscribe(&mut r)?),
        SUBACK => Packet::SubAck(decode_suback(&mut r)?),
        UNSUBSCRIBE => Packet::Unsubscribe(decode_unsubscribe(&mut r)?),
        // parse_fixed_header let only types 1..=14 through and fixed_body_len took the others.
        _ => return Err(DecodeError::InvalidHeader { byte: h.first }),
    };
    Ok(Some(packet))
}

/// Parses the fixed header at the front of `buf`; `Ok(None)` if it is not complete yet.
fn parse_fixed_header(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first)?;

    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        // At most 4 * 7 = 28 bits: fits any usize of 32 bits or more.
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // Non-minimal encodings (e.g. 0x80 0x00 for 0) are accepted, as the spec allows.
            let h = FixedHeader { first, header_len: 2 + i, remaining };
            let size = h.total_len();
            if size > max_packet_size {
                return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
            }
            return Ok(Some(h));
        }
    }
    // The fourth byte still had its continuation bit set.
    Err(DecodeError::MalformedLength)
}

/// Checks the packet type and the flag nibble of the first byte (MQTT-2.2.2).
fn check_first_byte(first: u8) -> Result<(), DecodeError> {
    let flags = first & 0x0f;
    match first >> 4 {
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::Malformed("PUBLISH with QoS 3"));
            }
            if flags & 0x08 != 0 && qos == 0 {
                return Err(DecodeError::Malformed("PUBLISH with DUP set on QoS 0"));
            }
            Ok(())
        }
        PUBREL | SUBSCRIBE | UNSUBSCRIBE if flags == 0x02 => Ok(()),
        CONNECT | CONNACK | PUBACK | PUBREC | PUBCOMP | SUBACK | UNSUBACK | PINGREQ | PINGRESP
        | DISCONNECT
            if flags == 0 =>
        {
            Ok(())
        }
        // Type 0 (reserved), 15 (AUTH, v5 only) or a known type with the wrong flags.
        _ => Err(DecodeError::InvalidHeader { byte: first }),
    }
}

/// The remaining length the spec fixes for `packet_type`, or `None` if it is variable.
fn fixed_body_len(packet_type: u8) -> Option<usize> {
    match packet_type {
        CONNACK | PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK => Some(2),
        PINGREQ | PINGRESP | DISCONNECT => Some(0),
        _ => None,
    }
}

fn fixed_len_error(packet_type: u8) -> &'static str {
    match packet_type {
        CONNACK => "CONNACK remaining length is not 2",
        PINGREQ => "PINGREQ remaining length is not 0",
        PINGRESP => "PINGRESP remaining length is not 0",
        DISCONNECT => "DISCONNECT remaining length is not 0",
        _ => "acknowledgement remaining length is not 2",
    }
}

/// Decodes a packet whose body length [`fixed_body_len`] has already checked.
fn decode_fixed(packet_type: u8, body: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let two = |body: &[u8]| match *body {
        [a, b] => Ok([a, b]),
        _ => Err(DecodeError::Malformed("truncated packet")),
    };
    Ok(match packet_type {
        CONNACK => {
            let [flags, code] = two(body)?;
            // 3.1 has no session present flag: the byte is reserved and ignored.
            let session_present = match version {
                ProtocolVersion::V3_1 => false,
                _ if flags & 0xfe != 0 => return Err(DecodeError::Malformed("reserved CONNACK flags set")),
                _ => flags & 0x01 != 0,
            };
            let code = match code {
                0 => ConnectReturnCode::Accepted,
                1 => ConnectReturnCode::UnacceptableProtocolVersion,
                2 => ConnectReturnCode::IdentifierRejected,
                3 => ConnectReturnCode::ServerUnavailable,
                4 => ConnectReturnCode::BadUserNameOrPassword,
                5 => ConnectReturnCode::NotAuthorized,
                _ => return Err(DecodeError::Malformed("unknown CONNACK return code")),
            };
            Packet::ConnAck(ConnAck { session_present, code })
        }
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect,
        _ => {
            let pkid = nonzero_pkid(u16::from_be_bytes(two(body)?))?;
            match packet_type {
                PUBACK => Packet::PubAck(pkid),
                PUBREC => Packet::PubRec(pkid),
                PUBREL => Packet::PubRel(pkid),
                PUBCOMP => Packet::PubComp(pkid),
                UNSUBACK => Packet::UnsubAck(pkid),
                _ => return Err(DecodeError::Malformed("unexpected packet type")),
            }
        }
    })
}

fn nonzero_pkid(pkid: u16) -> Result<u16, DecodeError> {
    if pkid == 0 {
        Err(DecodeError::Malformed("packet id 0"))
    } else {
        Ok(pkid)
    }
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    // The name is compared as raw bytes: anything that is not exactly one of the two names,
    // including invalid UTF-8, is an invalid protocol name (MQTT-3.1.2-1).
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        // Level 5 included: refused with CONNACK 0x01 until the v5 codec exists.
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedProtocolLevel { level }),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    // 3.1 did not state these rules; like mosquitto, it gets the benefit of the doubt on them.
    let strict = protocol != ProtocolVersion::V3_1;

    let flags = r.u8()?;
    if strict && flags & CF_RESERVED != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    let client_id = r.string()?;

    let will = if flags & CF_WILL != 0 {
        let qos =
            QoS::from_u8((flags >> CF_WILL_QOS_SHIFT) & 0x03).ok_or(DecodeError::Malformed("will QoS 3"))?;
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will { topic, payload, qos, retain: flags & CF_WILL_RETAIN != 0 })
    } else {
        // MQTT-3.1.2-11/13/15: without a will, will QoS and will retain must be 0.
        if strict && flags & (CF_WILL_RETAIN | (0x03 << CF_WILL_QOS_SHIFT)) != 0 {
            return Err(DecodeError::Malformed("will QoS or retain set without will flag"));
        }
        None
    };

    let username_flag = flags & CF_USERNAME != 0;
    let password_flag = flags & CF_PASSWORD != 0;
    if strict && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password flag without username flag"));
    }
    // Some 3.1 clients set a flag and then leave the field out; mosquitto ignores the flag then.
    let username = if username_flag && (strict || !r.is_empty()) { Some(r.string()?) } else { None };
    let password = if password_flag && (strict || !r.is_empty()) { Some(r.binary()?) } else { None };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes after CONNECT payload"));
    }

    Ok(Connect {
        protocol,
        clean_session: flags & CF_CLEAN_SESSION != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_publish(first: u8, r: &mut Reader) -> Result<Publish, DecodeError> {
    // check_first_byte already refused QoS 3; this cannot fail but must not panic either.
    let qos = QoS::from_u8((first >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    let topic = r.string()?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { nonzero_pkid(r.u16()?)? };
    Ok(Publish { dup: first & 0x08 != 0, qos, retain: first & 0x01 != 0, topic, pkid, payload: r.rest() })
}

fn decode_subscribe(r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    let mut filters = SmallVec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        if options & 0xfc != 0 {
            return Err(DecodeError::Malformed("reserved bits set in SUBSCRIBE QoS byte"));
        }
        let qos = QoS::from_u8(options).ok_or(DecodeError::Malformed("SUBSCRIBE with QoS 3"))?;
        filters.push(SubscribeFilter { filter, qos });
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("empty SUBSCRIBE"));
    }
    Ok(Subscribe { pkid, filters })
}

fn decode_suback(r: &mut Reader) -> Result<SubAck, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    let codes = r
        .rest()
        .iter()
        .map(|&c| match c {
            0x80 => Ok(SubAckCode::Failure),
            c => QoS::from_u8(c)
                .map(SubAckCode::Granted)
                .ok_or(DecodeError::Malformed("invalid SUBACK return code")),
        })
        .collect::<Result<SmallVec<_>, _>>()?;
    if codes.is_empty() {
        return Err(DecodeError::Malformed("empty SUBACK"));
    }
    Ok(SubAck { pkid, codes })
}

fn decode_unsubscribe(r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    let mut filters = SmallVec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Malformed("empty UNSUBSCRIBE"));
    }
    Ok(Unsubscribe { pkid, filters })
}

/// A bounds-checked cursor over one complete packet. Invariant: `pos <= buf.len()`.
struct Reader {
    buf: Bytes,
    pos: usize,
}

const TRUNCATED: DecodeError = DecodeError::Malformed("field runs past the end of the packet");

impl Reader {
    fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        match self.buf.get(self.pos..self.pos + 2) {
            Some(&[hi, lo]) => {
                self.pos += 2;
                Ok(u16::from_be_bytes([hi, lo]))
            }
            _ => Err(TRUNCATED),
        }
    }

    /// The next `n` bytes as a slice of the packet (a reference-count increment, no copy).
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let end = self.pos + n; // n <= 65,535 and pos <= packet length: no overflow.
        if end > self.buf.len() {
            return Err(TRUNCATED);
        }
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(b)
    }

    /// Binary data: two-byte length, then that many bytes (MQTT-1.5.3 framing).
    fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A UTF-8 encoded string, checked once here (MQTT-1.5.3-1/2).
    fn string(&mut self) -> Result<Utf8Bytes, DecodeError> {
        let b = self.binary()?;
        Utf8Bytes::try_from_bytes(b).map_err(|_| DecodeError::Malformed("invalid UTF-8 string"))
    }

    /// Everything left in the packet.
    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos.min(self.buf.len())..);
        self.pos = self.buf.len();
        b
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    const MAX: usize = 1 << 20;

    fn dec(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        dec_v(bytes, ProtocolVersion::V3_1_1)
    }

    fn dec_v(bytes: &[u8], version: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let r = decode(&mut buf, version, MAX);
        if let Ok(Some(_)) = r {
            assert!(buf.is_empty(), "decode left {} bytes behind", buf.len());
        }
        r
    }

    fn malformed(bytes: &[u8]) -> &'static str {
        match dec(bytes) {
            Err(DecodeError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn s(v: &str) -> Utf8Bytes {
        Utf8Bytes::copy_from_str(v)
    }

    /// The spec's CONNECT example (MQTT-3.1.2.10, protocol name "MQTT", level 4, flags 0xCE,
    /// keep alive 10) with a payload for every flag it sets.
    fn spec_connect() -> Vec<u8> {
        let mut v = vec![0x10, 0];
        v.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0xce, 0, 10]);
        v.extend_from_slice(&[0, 3, b'c', b'i', b'd']);
        v.extend_from_slice(&[0, 3, b'w', b'/', b't']);
        v.extend_from_slice(&[0, 2, 0xde, 0xad]);
        v.extend_from_slice(&[0, 4, b'u', b's', b'e', b'r']);
        v.extend_from_slice(&[0, 2, b'p', b'w']);
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn connect_spec_example() {
        let p = dec(&spec_connect()).unwrap().unwrap();
        let expected = Connect {
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
        assert_eq!(p, Packet::Connect(Box::new(expected)));
    }

    #[test]
    fn connect_minimal_and_v31() {
        // MQTT 3.1.1, empty client id, clean session, no will / credentials.
        let v = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0];
        let Packet::Connect(c) = dec(&v).unwrap().unwrap() else { panic!("not a CONNECT") };
        assert_eq!(c.protocol, ProtocolVersion::V3_1_1);
        assert!(c.clean_session);
        assert_eq!(c.keep_alive, 60);
        assert!(c.client_id.is_empty());
        assert!(c.will.is_none() && c.username.is_none() && c.password.is_none());

        // MQTT 3.1: "MQIsdp", level 3.
        let v = [0x10, 16, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x00, 0, 5, 0, 2, b'i', b'd'];
        let Packet::Connect(c) = dec(&v).unwrap().unwrap() else { panic!("not a CONNECT") };
        assert_eq!(c.protocol, ProtocolVersion::V3_1);
        assert!(!c.clean_session);
        assert_eq!(c.client_id.as_str(), "id");
    }

    fn connect_with(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0x10, 0, 0, name.len() as u8];
        v.extend_from_slice(name);
        v.extend_from_slice(&[level, flags, 0, 10]);
        v.extend_from_slice(payload);
        v[1] = (v.len() - 2) as u8;
        v
    }

    #[test]
    fn connect_protocol_errors() {
        let cid = [0, 1, b'a'];
        assert_eq!(
            dec(&connect_with(b"MQTT", 5, 0x02, &cid)),
            Err(DecodeError::UnsupportedProtocolLevel { level: 5 })
        );
        assert_eq!(
            dec(&connect_with(b"MQTT", 3, 0x02, &cid)),
            Err(DecodeError::UnsupportedProtocolLevel { level: 3 })
        );
        assert_eq!(
            dec(&connect_with(b"MQIsdp", 4, 0x02, &cid)),
            Err(DecodeError::UnsupportedProtocolLevel { level: 4 })
        );
        assert_eq!(dec(&connect_with(b"MQTX", 4, 0x02, &cid)), Err(DecodeError::InvalidProtocolName));
        assert_eq!(dec(&connect_with(&[0xff, 0xfe], 4, 0x02, &cid)), Err(DecodeError::InvalidProtocolName));
    }

    #[test]
    fn connect_flag_errors() {
        let cid = [0, 1, b'a'];
        let m =
            |name: &[u8], level, flags, payload: &[u8]| match dec(&connect_with(name, level, flags, payload))
            {
                Err(DecodeError::Malformed(w)) => w,
                other => panic!("expected Malformed, got {other:?}"),
            };
        assert_eq!(m(b"MQTT", 4, 0x03, &cid), "reserved CONNECT flag set");
        assert_eq!(m(b"MQTT", 4, 0x08, &cid), "will QoS or retain set without will flag");
        assert_eq!(m(b"MQTT", 4, 0x20, &cid), "will QoS or retain set without will flag");
        assert_eq!(m(b"MQTT", 4, 0x1c, &[0, 1, b'a', 0, 1, b't', 0, 0]), "will QoS 3");
        assert_eq!(m(b"MQTT", 4, 0x40, &[0, 1, b'a', 0, 1, b'p']), "password flag without username flag");
        // Username flag but no username field (3.1.1 is strict).
        assert_eq!(m(b"MQTT", 4, 0x80, &cid), "field runs past the end of the packet");
        // Trailing byte after the last field.
        assert_eq!(m(b"MQTT", 4, 0x02, &[0, 1, b'a', 0]), "trailing bytes after CONNECT payload");
        // Client id NUL and invalid UTF-8.
        assert_eq!(m(b"MQTT", 4, 0x02, &[0, 1, 0]), "invalid UTF-8 string");
        assert_eq!(m(b"MQTT", 4, 0x02, &[0, 2, 0xc3, 0x28]), "invalid UTF-8 string");
        // Truncated before the flags.
        assert_eq!(
            malformed(&[0x10, 7, 0, 4, b'M', b'Q', b'T', b'T', 4]),
            "field runs past the end of the packet"
        );
    }

    #[test]
    fn connect_v31_leniency() {
        let cid = [0, 1, b'a'];
        // Reserved bit and will QoS without will flag are tolerated on 3.1, like mosquitto.
        let Packet::Connect(c) = dec(&connect_with(b"MQIsdp", 3, 0x19, &cid)).unwrap().unwrap() else {
            panic!("not a CONNECT")
        };
        assert!(c.will.is_none());
        // Username and password flags with the fields left out: treated as absent.
        let Packet::Connect(c) = dec(&connect_with(b"MQIsdp", 3, 0xc0, &cid)).unwrap().unwrap() else {
            panic!("not a CONNECT")
        };
        assert!(c.username.is_none() && c.password.is_none());
        // Password without username: read it.
        let Packet::Connect(c) =
            dec(&connect_with(b"MQIsdp", 3, 0x40, &[0, 1, b'a', 0, 1, b'p'])).unwrap().unwrap()
        else {
            panic!("not a CONNECT")
        };
        assert_eq!(c.password.as_deref(), Some(&b"p"[..]));
        assert!(c.username.is_none());
    }

    #[test]
    fn publish_spec_example() {
        // Topic "a/b", packet id 10 (MQTT-3.3.2.3 example), QoS 1, payload "hi".
        let v = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
        assert_eq!(
            dec(&v).unwrap().unwrap(),
            Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: s("a/b"),
                pkid: 10,
                payload: Bytes::from_static(b"hi"),
            })
        );
        // QoS 2, dup, retain.
        let v = [0x3d, 7, 0, 3, b'a', b'/', b'b', 0, 1];
        let Packet::Publish(p) = dec(&v).unwrap().unwrap() else { panic!("not a PUBLISH") };
        assert!(p.dup && p.retain);
        assert_eq!((p.qos, p.pkid), (QoS::ExactlyOnce, 1));
        assert!(p.payload.is_empty());
        // QoS 0: no packet id, the rest is payload; empty topic is the topic module's business.
        let v = [0x30, 4, 0, 0, 0, 10];
        let Packet::Publish(p) = dec(&v).unwrap().unwrap() else { panic!("not a PUBLISH") };
        assert_eq!(p.pkid, 0);
        assert!(p.topic.is_empty());
        assert_eq!(&p.payload[..], &[0, 10]);
    }

    #[test]
    fn publish_errors() {
        assert_eq!(malformed(&[0x36, 0]), "PUBLISH with QoS 3");
        assert_eq!(malformed(&[0x38, 0]), "PUBLISH with DUP set on QoS 0");
        assert_eq!(malformed(&[0x32, 5, 0, 1, b'a', 0, 0]), "packet id 0");
        assert_eq!(malformed(&[0x32, 4, 0, 1, b'a', 0]), "field runs past the end of the packet");
        assert_eq!(malformed(&[0x30, 3, 0, 2, b'a']), "field runs past the end of the packet");
        assert_eq!(malformed(&[0x30, 3, 0, 1, 0xff]), "invalid UTF-8 string");
        assert_eq!(malformed(&[0x30, 3, 0, 1, 0]), "invalid UTF-8 string");
    }

    #[test]
    fn publish_is_zero_copy() {
        let mut buf = BytesMut::from(&[0x30, 6, 0, 1, b't', b'a', b'b', b'c'][..]);
        let base = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = decode(&mut buf, ProtocolVersion::V3_1_1, MAX).unwrap() else {
            panic!("not a PUBLISH")
        };
        assert_eq!(p.topic.as_bytes().as_ptr() as usize, base + 4);
        assert_eq!(p.payload.as_ptr() as usize, base + 5);
    }

    #[test]
    fn acks() {
        assert_eq!(dec(&[0x40, 2, 0x12, 0x34]), Ok(Some(Packet::PubAck(0x1234))));
        assert_eq!(dec(&[0x50, 2, 0, 1]), Ok(Some(Packet::PubRec(1))));
        assert_eq!(dec(&[0x62, 2, 0, 2]), Ok(Some(Packet::PubRel(2))));
        assert_eq!(dec(&[0x70, 2, 0xff, 0xff]), Ok(Some(Packet::PubComp(0xffff))));
        assert_eq!(dec(&[0xb0, 2, 0, 7]), Ok(Some(Packet::UnsubAck(7))));
        for first in [0x40, 0x50, 0x62, 0x70, 0xb0] {
            assert_eq!(malformed(&[first, 2, 0, 0]), "packet id 0");
            assert_eq!(malformed(&[first, 3, 0, 1, 0]), "acknowledgement remaining length is not 2");
            assert_eq!(malformed(&[first, 1, 1]), "acknowledgement remaining length is not 2");
        }
    }

    #[test]
    fn connack() {
        assert_eq!(
            dec(&[0x20, 2, 1, 0]),
            Ok(Some(Packet::ConnAck(ConnAck { session_present: true, code: ConnectReturnCode::Accepted })))
        );
        assert_eq!(
            dec(&[0x20, 2, 0, 5]),
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::NotAuthorized
            })))
        );
        assert_eq!(malformed(&[0x20, 2, 2, 0]), "reserved CONNACK flags set");
        assert_eq!(malformed(&[0x20, 2, 0, 6]), "unknown CONNACK return code");
        assert_eq!(malformed(&[0x20, 3, 0, 0, 0]), "CONNACK remaining length is not 2");
        // 3.1: the first byte is reserved and ignored.
        assert_eq!(
            dec_v(&[0x20, 2, 0xff, 2], ProtocolVersion::V3_1),
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present: false,
                code: ConnectReturnCode::IdentifierRejected
            })))
        );
    }

    #[test]
    fn subscribe_spec_example() {
        // MQTT-3.8.3 example: "a/b" QoS 1, "c/d" QoS 2, packet id 10.
        let v = [0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'd', 2];
        let Packet::Subscribe(sub) = dec(&v).unwrap().unwrap() else { panic!("not a SUBSCRIBE") };
        assert_eq!(sub.pkid, 10);
        assert_eq!(
            &sub.filters[..],
            &[
                SubscribeFilter { filter: s("a/b"), qos: QoS::AtLeastOnce },
                SubscribeFilter { filter: s("c/d"), qos: QoS::ExactlyOnce }
            ]
        );
        assert!(!sub.filters.spilled(), "two filters must not allocate");
    }

    #[test]
    fn subscribe_errors() {
        assert_eq!(malformed(&[0x82, 2, 0, 1]), "empty SUBSCRIBE");
        assert_eq!(malformed(&[0x82, 6, 0, 0, 0, 1, b'a', 0]), "packet id 0");
        assert_eq!(malformed(&[0x82, 6, 0, 1, 0, 1, b'a', 3]), "SUBSCRIBE with QoS 3");
        assert_eq!(malformed(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04]), "reserved bits set in SUBSCRIBE QoS byte");
        assert_eq!(malformed(&[0x82, 5, 0, 1, 0, 1, b'a']), "field runs past the end of the packet");
        assert_eq!(malformed(&[0x82, 6, 0, 1, 0, 1, 0xfe, 0]), "invalid UTF-8 string");
    }

    #[test]
    fn suback() {
        // MQTT-3.9.3 example: success QoS 0, failure, success QoS 2.
        let v = [0x90, 5, 0, 10, 0x00, 0x80, 0x02];
        assert_eq!(
            dec(&v),
            Ok(Some(Packet::SubAck(SubAck {
                pkid: 10,
                codes: SmallVec::from_slice(&[
                    SubAckCode::Granted(QoS::AtMostOnce),
                    SubAckCode::Failure,
                    SubAckCode::Granted(QoS::ExactlyOnce)
                ])
            })))
        );
        assert_eq!(malformed(&[0x90, 3, 0, 1, 3]), "invalid SUBACK return code");
        assert_eq!(malformed(&[0x90, 2, 0, 1]), "empty SUBACK");
    }

    #[test]
    fn unsubscribe_spec_example() {
        // MQTT-3.10.3 example: "a/b", "c/d", packet id 10.
        let v = [0xa2, 12, 0, 10, 0, 3, b'a', b'/', b'b', 0, 3, b'c', b'/', b'd'];
        assert_eq!(
            dec(&v),
            Ok(Some(Packet::Unsubscribe(Unsubscribe {
                pkid: 10,
                filters: SmallVec::from_vec(vec![s("a/b"), s("c/d")]),
            })))
        );
        assert_eq!(malformed(&[0xa2, 2, 0, 1]), "empty UNSUBSCRIBE");
        assert_eq!(malformed(&[0xa2, 5, 0, 0, 0, 1, b'a']), "packet id 0");
        assert_eq!(malformed(&[0xa2, 4, 0, 1, 0, 1]), "field runs past the end of the packet");
    }

    #[test]
    fn empty_body_packets() {
        assert_eq!(dec(&[0xc0, 0]), Ok(Some(Packet::PingReq)));
        assert_eq!(dec(&[0xd0, 0]), Ok(Some(Packet::PingResp)));
        assert_eq!(dec(&[0xe0, 0]), Ok(Some(Packet::Disconnect)));
        // Non-minimal remaining length encoding of 0 is accepted.
        assert_eq!(dec(&[0xc0, 0x80, 0x00]), Ok(Some(Packet::PingReq)));
        assert_eq!(malformed(&[0xc0, 1, 0]), "PINGREQ remaining length is not 0");
        assert_eq!(malformed(&[0xd0, 1, 0]), "PINGRESP remaining length is not 0");
        assert_eq!(malformed(&[0xe0, 1, 0]), "DISCONNECT remaining length is not 0");
        // Detected from the header alone, before the (huge) body arrives.
        assert_eq!(malformed(&[0xe0, 0xff, 0x7f]), "DISCONNECT remaining length is not 0");
    }

    #[test]
    fn invalid_headers() {
        for first in
            [0x00, 0x0f, 0xf0, 0xff, 0x11, 0x21, 0x41, 0x60, 0x61, 0x63, 0x80, 0xa0, 0xa3, 0xc2, 0xe8]
        {
            assert_eq!(
                frame_len(&[first], MAX),
                Err(DecodeError::InvalidHeader { byte: first }),
                "first byte {first:#04x}"
            );
            assert_eq!(dec(&[first, 0]), Err(DecodeError::InvalidHeader { byte: first }));
        }
    }

    #[test]
    fn remaining_length_spec_table() {
        // MQTT-2.2.3 table boundaries, checked through frame_len.
        let cases: [(&[u8], usize); 8] = [
            (&[0x00], 0),
            (&[0x7f], 127),
            (&[0x80, 0x01], 128),
            (&[0xff, 0x7f], 16_383),
            (&[0x80, 0x80, 0x01], 16_384),
            (&[0xff, 0xff, 0x7f], 2_097_151),
            (&[0x80, 0x80, 0x80, 0x01], 2_097_152),
            (&[0xff, 0xff, 0xff, 0x7f], 268_435_455),
        ];
        for (len, value) in cases {
            let mut v = vec![0x30];
            v.extend_from_slice(len);
            assert_eq!(frame_len(&v, usize::MAX), Ok(Some(1 + len.len() + value)), "{len:?}");
            // Every prefix of the header is incomplete, not an error.
            for n in 0..v.len() {
                assert_eq!(frame_len(&v[..n], usize::MAX), Ok(None));
            }
        }
        assert_eq!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff], usize::MAX), Err(DecodeError::MalformedLength));
        // Known as soon as the fourth byte says "more follows".
        assert_eq!(frame_len(&[0x30, 0x80, 0x80, 0x80, 0x80], usize::MAX), Err(DecodeError::MalformedLength));
        assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]), Err(DecodeError::MalformedLength));
    }

    #[test]
    fn huge_remaining_length_reserves_nothing() {
        let header = [0x30, 0xff, 0xff, 0xff, 0x7f];
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&header);
        let cap = buf.capacity();
        assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, usize::MAX), Ok(None));
        assert_eq!(buf.capacity(), cap);
        assert_eq!(&buf[..], &header);
        assert_eq!(frame_len(&buf, usize::MAX), Ok(Some(5 + 268_435_455)));
        assert_eq!(
            decode(&mut buf, ProtocolVersion::V3_1_1, MAX),
            Err(DecodeError::PacketTooLarge { size: 5 + 268_435_455, max: MAX })
        );
    }

    #[test]
    fn packet_too_large_boundary() {
        let v = [0x30, 3, 0, 1, b'a'];
        assert_eq!(frame_len(&v, 5), Ok(Some(5)));
        assert!(matches!(
            decode(&mut BytesMut::from(&v[..]), ProtocolVersion::V3_1_1, 5),
            Ok(Some(Packet::Publish(_)))
        ));
        assert_eq!(frame_len(&v, 4), Err(DecodeError::PacketTooLarge { size: 5, max: 4 }));
        // Rejected from the header alone.
        assert_eq!(frame_len(&v[..2], 4), Err(DecodeError::PacketTooLarge { size: 5, max: 4 }));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let packets: Vec<Vec<u8>> = vec![
            spec_connect(),
            vec![0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'],
            vec![0x40, 2, 0, 1],
            vec![0x20, 2, 0, 0],
            vec![0x82, 6, 0, 1, 0, 1, b'a', 1],
            vec![0x90, 3, 0, 1, 1],
            vec![0xa2, 5, 0, 1, 0, 1, b'a'],
            vec![0xc0, 0],
            vec![0xe0, 0x80, 0x00],
        ];
        for p in packets {
            assert!(dec(&p).unwrap().is_some());
            for n in 0..p.len() {
                let mut buf = BytesMut::from(&p[..n]);
                assert_eq!(decode(&mut buf, ProtocolVersion::V3_1_1, MAX), Ok(None), "prefix {n} of {p:?}");
                assert_eq!(&buf[..], &p[..n], "prefix {n} was consumed");
            }
        }
    }

    #[test]
    fn back_to_back() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x30, 5, 0, 1, b't', b'h', b'i']);
        buf.extend_from_slice(&[0x40, 2, 0, 9]);
        buf.extend_from_slice(&[0xc0]); // start of a third packet
        let v = ProtocolVersion::V3_1_1;
        let Some(Packet::Publish(p)) = decode(&mut buf, v, MAX).unwrap() else { panic!("not a PUBLISH") };
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("t", &b"hi"[..]));
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::PubAck(9))));
        assert_eq!(decode(&mut buf, v, MAX), Ok(None));
        assert_eq!(&buf[..], &[0xc0]);
        buf.extend_from_slice(&[0]);
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::PingReq)));
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, v, MAX), Ok(None));
    }
}
