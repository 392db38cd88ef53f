//! MQTT 3.1, 3.1.1 and 5.0 decoder.
//!
//! Decoding is two-step so that the connection reader never buffers more than it must:
//! [`frame_len`] looks only at the fixed header (at most 5 bytes) and rejects bad first bytes,
//! broken remaining lengths and oversized packets before any body byte has arrived; [`decode`]
//! then splits the complete packet off the read buffer as one shared [`Bytes`] and slices every
//! string and payload out of it, so a decoded packet owns no copy of its data.
//!
//! Every read is bounds-checked by [`Reader`]; nothing is allocated from a length taken off the
//! wire before the bytes it describes are actually in the buffer.
//!
//! MQTT 5.0 errors come in two classes (section 4.13): what cannot be parsed is
//! [`DecodeError::Malformed`] (reason code 0x81), what parses but breaks a rule the spec calls a
//! "Protocol Error" is [`DecodeError::Protocol`] (0x82); [`DecodeError::reason_code`] maps them.

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

use super::properties::{read_properties, PacketKind, Properties};
use super::reader::{vbi_prefix, ReadError, Reader};
use super::types::{
    Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, ProtocolVersion, Publish, QoS, SubAck, Subscribe,
    SubscribeFilter, UnsubAck, Unsubscribe, Utf8Bytes, Will,
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
/// v5 only (MQTT 5.0 section 3.15).
pub(super) const AUTH: u8 = 15;

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

// v5 subscription options (MQTT 5.0 section 3.8.3.1). Shared with the encoder.
pub(super) const SO_QOS: u8 = 0x03;
pub(super) const SO_NO_LOCAL: u8 = 0x04;
pub(super) const SO_RETAIN_AS_PUBLISHED: u8 = 0x08;
pub(super) const SO_RETAIN_HANDLING_SHIFT: u8 = 4;
pub(super) const SO_RESERVED: u8 = 0xc0;

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
/// all detected before the body arrives: [`DecodeError::InvalidHeader`] for packet type 0 or
/// wrong reserved flag bits, [`DecodeError::Malformed`] for a PUBLISH with QoS 3 or with DUP
/// set on QoS 0 (MQTT-3.3.1-2/4), [`DecodeError::MalformedLength`] for a remaining length that
/// does not end within four bytes, and [`DecodeError::PacketTooLarge`] when the whole packet
/// would be larger than `max_packet_size`.
///
/// `frame_len` does not know the connection's version, so it frames an AUTH packet (type 15,
/// flags 0) like any other: [`decode`] refuses it as [`DecodeError::InvalidHeader`] before v5, as
/// soon as it sees its first byte.
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, DecodeError> {
    Ok(parse_fixed_header(buf, max_packet_size)?.map(|h| h.total_len()))
}

/// Decodes one packet from the front of `buf` if it is complete.
///
/// On `Ok(Some(_))` exactly that packet's bytes have been removed from `buf`; the packet's strings
/// and payload are slices of them (no copy). On `Ok(None)` nothing was consumed and nothing was
/// reserved: the caller reads more and calls again. `version` is the connection's negotiated
/// version (pass [`ProtocolVersion::V3_1_1`] before CONNECT: a CONNECT states its own version,
/// and a CONNECT naming level 5 is decoded in the v5 layout whatever `version` says).
///
/// Before v5, a packet whose length is fixed by the spec (acks, CONNACK, PINGREQ, PINGRESP,
/// DISCONNECT) is rejected as soon as its fixed header announces another length, without
/// waiting for its body. In v5 only PINGREQ and PINGRESP keep a fixed length: every other packet
/// may carry a property block of any size, bounded by `max_packet_size` alone. An AUTH packet
/// (type 15) before v5 is [`DecodeError::InvalidHeader`] from its first byte on.
/// On `Err` the connection must be closed; how much of `buf` was consumed is unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let v5 = version == ProtocolVersion::V5;
    if let Some(&first) = buf.first() {
        // frame_len accepts type 15 for v5 connections; before v5 the type does not exist.
        if !v5 && first >> 4 == AUTH {
            return Err(DecodeError::InvalidHeader { byte: first });
        }
    }
    let Some(h) = parse_fixed_header(buf, max_packet_size)? else {
        return Ok(None);
    };
    let total = h.total_len();

    // Packets without strings or payload: check the announced length now (a PUBACK claiming
    // 200 MB is malformed, there is no point buffering it), then read them in place without
    // splitting the buffer.
    if let Some(expected) = fixed_body_len(h.packet_type(), v5) {
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

    // v5 acknowledgements and DISCONNECT / AUTH without a property block: the common case, read in
    // place like the fixed-length packets (no split, no reference count).
    if v5 {
        if let Some(body) = buf.get(h.header_len..total) {
            if let Some(packet) = decode_short_v5(h.packet_type(), body)? {
                buf.advance(total);
                return Ok(Some(packet));
            }
        }
    }

    let frame: Bytes = buf.split_to(total).freeze();
    let mut r = Reader::at(frame, h.header_len);
    let packet = match (h.packet_type(), v5) {
        (CONNECT, _) => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        (PUBLISH, _) => Packet::Publish(decode_publish(h.first, &mut r, v5)?),
        (SUBSCRIBE, _) => Packet::Subscribe(decode_subscribe(&mut r, v5)?),
        (SUBACK, _) => Packet::SubAck(decode_suback(&mut r, v5)?),
        (UNSUBSCRIBE, _) => Packet::Unsubscribe(decode_unsubscribe(&mut r, v5)?),
        (CONNACK, true) => Packet::ConnAck(decode_connack_v5(&mut r)?),
        (UNSUBACK, true) => Packet::UnsubAck(decode_unsuback_v5(&mut r)?),
        (PUBACK | PUBREC | PUBREL | PUBCOMP, true) => decode_ack_v5(h.packet_type(), &mut r)?,
        (DISCONNECT, true) => Packet::Disconnect(decode_disconnect_v5(&mut r, PacketKind::Disconnect)?),
        (AUTH, true) => Packet::Auth(decode_disconnect_v5(&mut r, PacketKind::Auth)?),
        // parse_fixed_header let only types 1..=15 through, fixed_body_len took the fixed-length
        // ones and AUTH was refused above before v5.
        _ => return Err(DecodeError::InvalidHeader { byte: h.first }),
    };
    if !r.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes after the packet"));
    }
    Ok(Some(packet))
}

/// Parses the fixed header at the front of `buf`; `Ok(None)` if it is not complete yet.
fn parse_fixed_header(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first)?;

    // Non-minimal encodings (e.g. 0x80 0x00 for 0) are accepted, as the spec allows; a fourth byte
    // that still has its continuation bit set is the only error.
    let Some((remaining, len_bytes)) =
        vbi_prefix(buf.get(1..).unwrap_or_default()).map_err(|_| DecodeError::MalformedLength)?
    else {
        return Ok(None);
    };
    // At most 268,435,455: fits any usize of 32 bits or more.
    let remaining = usize::try_from(remaining).map_err(|_| DecodeError::MalformedLength)?;
    let h = FixedHeader { first, header_len: 1 + len_bytes, remaining };
    let size = h.total_len();
    if size > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size, max: max_packet_size });
    }
    Ok(Some(h))
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
        | DISCONNECT | AUTH
            if flags == 0 =>
        {
            Ok(())
        }
        // Type 0 (reserved) or a known type with the wrong flags.
        _ => Err(DecodeError::InvalidHeader { byte: first }),
    }
}

/// The remaining length the spec fixes for `packet_type`, or `None` if it is variable. In v5
/// acknowledgements, CONNACK, UNSUBACK and DISCONNECT may carry properties.
fn fixed_body_len(packet_type: u8, v5: bool) -> Option<usize> {
    match packet_type {
        PINGREQ | PINGRESP => Some(0),
        _ if v5 => None,
        CONNACK | PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK => Some(2),
        DISCONNECT => Some(0),
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
            let code = super::reason::connack_from_v3(code)
                .ok_or(DecodeError::Malformed("unknown CONNACK return code"))?;
            Packet::ConnAck(ConnAck { session_present, code, properties: None })
        }
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect(Disconnect::default()),
        _ => {
            let pkid = nonzero_pkid(u16::from_be_bytes(two(body)?))?;
            match packet_type {
                PUBACK => Packet::PubAck(Ack::ok(pkid)),
                PUBREC => Packet::PubRec(Ack::ok(pkid)),
                PUBREL => Packet::PubRel(Ack::ok(pkid)),
                PUBCOMP => Packet::PubComp(Ack::ok(pkid)),
                UNSUBACK => Packet::UnsubAck(UnsubAck { pkid, codes: SmallVec::new() }),
                _ => return Err(DecodeError::Malformed("unexpected packet type")),
            }
        }
    })
}

/// v5 PUBACK/PUBREC/PUBREL/PUBCOMP of at most 3 body bytes and DISCONNECT/AUTH of at most 1: no
/// property block, so nothing to slice. `Ok(None)` for any other packet or a longer body.
fn decode_short_v5(packet_type: u8, body: &[u8]) -> Result<Option<Packet>, DecodeError> {
    Ok(Some(match (packet_type, body) {
        // MQTT-3.4.2.1 (and 3.5/3.6/3.7.2.1): with a remaining length of 2 the reason code is
        // 0x00 (success) and there are no properties; with 3 there are no properties.
        (PUBACK | PUBREC | PUBREL | PUBCOMP, &[hi, lo]) => {
            ack_v5(packet_type, u16::from_be_bytes([hi, lo]), 0)?
        }
        (PUBACK | PUBREC | PUBREL | PUBCOMP, &[hi, lo, reason]) => {
            ack_v5(packet_type, u16::from_be_bytes([hi, lo]), reason)?
        }
        (PUBACK | PUBREC | PUBREL | PUBCOMP, &[] | &[_]) => return Err(TRUNCATED),
        // MQTT 5.0 3.14.2.1: remaining length 0 means reason 0x00 (normal disconnection); 3.14.2.2.1:
        // with less than 2 there is no property block.
        (DISCONNECT, &[]) => Packet::Disconnect(Disconnect::default()),
        (DISCONNECT, &[reason]) => {
            Packet::Disconnect(Disconnect { reason: disconnect_reason(reason)?, properties: None })
        }
        // MQTT 5.0 3.15.2.1: reason code and property length may be omitted only together, so
        // AUTH has 0 or at least 2 body bytes (mosquitto refuses a 1-byte AUTH body too).
        (AUTH, &[]) => Packet::Auth(Disconnect::default()),
        (AUTH, &[_]) => return Err(DecodeError::Malformed("AUTH reason code without property length")),
        _ => return Ok(None),
    }))
}

/// A v5 acknowledgement after checking its packet id and reason code.
fn ack_v5(packet_type: u8, pkid: u16, reason: u8) -> Result<Packet, DecodeError> {
    let pkid = nonzero_pkid(pkid)?;
    let a = Ack { pkid, reason };
    Ok(match packet_type {
        // MQTT-3.4.2-1 / 3.5.2-1: PUBACK and PUBREC share their reason code table.
        PUBACK | PUBREC if !is_puback_reason(reason) => {
            return Err(DecodeError::Malformed("reason code not allowed in PUBACK/PUBREC"));
        }
        // MQTT-3.6.2-1 / 3.7.2-1: PUBREL and PUBCOMP only know success and "packet id not found".
        PUBREL | PUBCOMP if !matches!(reason, 0x00 | 0x92) => {
            return Err(DecodeError::Malformed("reason code not allowed in PUBREL/PUBCOMP"));
        }
        PUBACK => Packet::PubAck(a),
        PUBREC => Packet::PubRec(a),
        PUBREL => Packet::PubRel(a),
        PUBCOMP => Packet::PubComp(a),
        _ => return Err(DecodeError::Malformed("unexpected packet type")),
    })
}

/// The PUBACK / PUBREC reason codes (MQTT 5.0 sections 3.4.2.1, 3.5.2.1).
pub(super) fn is_puback_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99)
}

/// The CONNACK reason codes (MQTT 5.0 section 3.2.2.2).
pub(super) fn is_connack_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x80..=0x8A | 0x8C | 0x90 | 0x95 | 0x97 | 0x99 | 0x9A | 0x9B | 0x9C | 0x9D | 0x9F)
}

/// The SUBACK reason codes (MQTT 5.0 section 3.9.3).
pub(super) fn is_suback_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x01 | 0x02 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91 | 0x97 | 0x9E | 0xA1 | 0xA2)
}

/// The UNSUBACK reason codes (MQTT 5.0 section 3.11.3).
pub(super) fn is_unsuback_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x11 | 0x80 | 0x83 | 0x87 | 0x8F | 0x91)
}

/// The DISCONNECT reason codes (MQTT 5.0 section 3.14.2.1).
pub(super) fn is_disconnect_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x04 | 0x80..=0x83 | 0x87 | 0x89 | 0x8B | 0x8D..=0x90 | 0x93..=0xA2)
}

/// The AUTH reason codes (MQTT 5.0 section 3.15.2.1).
pub(super) fn is_auth_reason(c: u8) -> bool {
    matches!(c, 0x00 | 0x18 | 0x19)
}

fn disconnect_reason(c: u8) -> Result<u8, DecodeError> {
    // MQTT-3.14.2-1: the sender must use one of the DISCONNECT reason codes; like every other
    // reason code outside its packet's table, anything else is treated as Malformed.
    if is_disconnect_reason(c) {
        Ok(c)
    } else {
        Err(DecodeError::Malformed("reason code not allowed in DISCONNECT"))
    }
}

fn nonzero_pkid(pkid: u16) -> Result<u16, DecodeError> {
    if pkid == 0 {
        Err(DecodeError::Malformed("packet id 0"))
    } else {
        Ok(pkid)
    }
}

/// `Some(Box)` for a non-empty property block, `None` (no allocation) for an empty one.
fn boxed(p: Properties) -> Option<Box<Properties>> {
    if p.is_empty() {
        None
    } else {
        Some(Box::new(p))
    }
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    // The name is compared as raw bytes: anything that is not exactly one of the two names,
    // including invalid UTF-8, is an invalid protocol name (MQTT-3.1.2-1).
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedProtocolLevel { level }),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let v5 = protocol == ProtocolVersion::V5;
    // 3.1 did not state these rules; like mosquitto, it gets the benefit of the doubt on them.
    let strict = protocol != ProtocolVersion::V3_1;

    let flags = r.u8()?;
    // MQTT-3.1.2-3 (both 3.1.1 and 5.0): the reserved flag must be 0, else Malformed.
    if strict && flags & CF_RESERVED != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let keep_alive = r.u16()?;
    // MQTT 5.0 3.1.2.11: the CONNECT properties follow the keep alive.
    let properties = if v5 { read_properties(r, PacketKind::Connect)? } else { Properties::default() };
    let client_id = r.string()?;

    let will = if flags & CF_WILL != 0 {
        let qos =
            QoS::from_u8((flags >> CF_WILL_QOS_SHIFT) & 0x03).ok_or(DecodeError::Malformed("will QoS 3"))?;
        // MQTT 5.0 3.1.3.2: the will properties come before the will topic.
        let properties = if v5 { read_properties(r, PacketKind::Will)? } else { Properties::default() };
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(Will { topic, payload, qos, retain: flags & CF_WILL_RETAIN != 0, properties })
    } else {
        // MQTT-3.1.2-11/13/15 (5.0: MQTT-3.1.2-11/13): without a will, will QoS and will retain
        // must be 0.
        if strict && flags & (CF_WILL_RETAIN | (0x03 << CF_WILL_QOS_SHIFT)) != 0 {
            return Err(DecodeError::Malformed("will QoS or retain set without will flag"));
        }
        None
    };

    let username_flag = flags & CF_USERNAME != 0;
    let password_flag = flags & CF_PASSWORD != 0;
    // MQTT-3.1.2-22 in 3.1.1; MQTT 5.0 (3.1.2.9) dropped the rule: a password alone is allowed.
    if strict && !v5 && password_flag && !username_flag {
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
        properties,
    })
}

fn decode_publish(first: u8, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
    // check_first_byte already refused QoS 3; this cannot fail but must not panic either.
    let qos = QoS::from_u8((first >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    // An empty topic is legal here in v5 when a Topic Alias comes with it (3.3.2.3.4); whether one
    // does, and whether the alias is known, is the broker's business.
    let topic = r.string()?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { nonzero_pkid(r.u16()?)? };
    // MQTT 5.0 3.3.2.3: properties after the packet id; a topic alias of 0 is refused by
    // decode_properties as a Protocol Error (MQTT-3.3.2-8).
    let properties = if v5 { boxed(read_properties(r, PacketKind::Publish)?) } else { None };
    Ok(Publish {
        dup: first & 0x08 != 0,
        qos,
        retain: first & 0x01 != 0,
        topic,
        pkid,
        payload: r.rest(),
        properties,
    })
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    // MQTT 5.0 3.8.2.1: subscription identifier (decode_properties refuses 0 and a repeat as
    // Protocol Errors) and user properties, which the broker does not keep.
    let subscription_id = if v5 {
        read_properties(r, PacketKind::Subscribe)?.subscription_identifiers.first().copied()
    } else {
        None
    };
    let mut filters = SmallVec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = r.u8()?;
        let f = if v5 {
            subscription_options(filter, options)?
        } else {
            if options & 0xfc != 0 {
                return Err(DecodeError::Malformed("reserved bits set in SUBSCRIBE QoS byte"));
            }
            let qos = QoS::from_u8(options).ok_or(DecodeError::Malformed("SUBSCRIBE with QoS 3"))?;
            SubscribeFilter::new(filter, qos)
        };
        filters.push(f);
    }
    if filters.is_empty() {
        // MQTT-3.8.3-3 (5.0: a SUBSCRIBE with no payload is a Protocol Error).
        return Err(if v5 {
            DecodeError::Protocol("empty SUBSCRIBE")
        } else {
            DecodeError::Malformed("empty SUBSCRIBE")
        });
    }
    Ok(Subscribe { pkid, filters, subscription_id })
}

/// A v5 subscription options byte (MQTT 5.0 section 3.8.3.1).
fn subscription_options(filter: Utf8Bytes, options: u8) -> Result<SubscribeFilter, DecodeError> {
    // MQTT-3.8.3-5: reserved bits set make the packet malformed.
    if options & SO_RESERVED != 0 {
        return Err(DecodeError::Malformed("reserved bits set in subscription options"));
    }
    // 3.8.3.1: "It is a Protocol Error if the Maximum QoS field has the value 3".
    let qos = QoS::from_u8(options & SO_QOS).ok_or(DecodeError::Protocol("SUBSCRIBE with QoS 3"))?;
    // 3.8.3.1: "It is a Protocol Error to send a Retain Handling value of 3".
    let retain_handling = (options >> SO_RETAIN_HANDLING_SHIFT) & 0x03;
    if retain_handling == 3 {
        return Err(DecodeError::Protocol("retain handling 3"));
    }
    Ok(SubscribeFilter {
        filter,
        qos,
        no_local: options & SO_NO_LOCAL != 0,
        retain_as_published: options & SO_RETAIN_AS_PUBLISHED != 0,
        retain_handling,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    let reason_string = if v5 { read_properties(r, PacketKind::SubAck)?.reason_string } else { None };
    let codes = r
        .rest()
        .iter()
        .map(|&c| match c {
            _ if v5 && is_suback_reason(c) => Ok(c),
            0x80 | 0..=2 if !v5 => Ok(c),
            _ => Err(DecodeError::Malformed("invalid SUBACK return code")),
        })
        .collect::<Result<SmallVec<_>, _>>()?;
    if codes.is_empty() {
        return Err(DecodeError::Malformed("empty SUBACK"));
    }
    Ok(SubAck { pkid, codes, reason_string })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    if v5 {
        // MQTT 5.0 3.10.2.1: only user properties, not kept.
        read_properties(r, PacketKind::Unsubscribe)?;
    }
    let mut filters = SmallVec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        // MQTT-3.10.3-2 (5.0: an UNSUBSCRIBE with no payload is a Protocol Error).
        return Err(if v5 {
            DecodeError::Protocol("empty UNSUBSCRIBE")
        } else {
            DecodeError::Malformed("empty UNSUBSCRIBE")
        });
    }
    Ok(Unsubscribe { pkid, filters })
}

/// v5 CONNACK (MQTT 5.0 section 3.2): flags, reason code, properties (never omitted).
fn decode_connack_v5(r: &mut Reader) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    // MQTT-3.2.2-1: bits 7-1 are reserved and must be 0.
    if flags & 0xfe != 0 {
        return Err(DecodeError::Malformed("reserved CONNACK flags set"));
    }
    let code = r.u8()?;
    if !is_connack_reason(code) {
        return Err(DecodeError::Malformed("reason code not allowed in CONNACK"));
    }
    let properties = boxed(read_properties(r, PacketKind::ConnAck)?);
    Ok(ConnAck { session_present: flags & 0x01 != 0, code, properties })
}

/// v5 UNSUBACK (MQTT 5.0 section 3.11): packet id, properties (not kept), one code per filter.
fn decode_unsuback_v5(r: &mut Reader) -> Result<UnsubAck, DecodeError> {
    let pkid = nonzero_pkid(r.u16()?)?;
    read_properties(r, PacketKind::UnsubAck)?;
    let codes = r
        .rest()
        .iter()
        .map(|&c| {
            if is_unsuback_reason(c) {
                Ok(c)
            } else {
                Err(DecodeError::Malformed("invalid UNSUBACK reason code"))
            }
        })
        .collect::<Result<SmallVec<_>, _>>()?;
    // One code per filter of the UNSUBSCRIBE, which has at least one (MQTT-3.11.3-1).
    if codes.is_empty() {
        return Err(DecodeError::Malformed("empty UNSUBACK"));
    }
    Ok(UnsubAck { pkid, codes })
}

/// A v5 acknowledgement with a property block (remaining length 4 or more; shorter ones took
/// [`decode_short_v5`]). The properties are checked against the packet's table and dropped.
fn decode_ack_v5(packet_type: u8, r: &mut Reader) -> Result<Packet, DecodeError> {
    let pkid = r.u16()?;
    let reason = r.u8()?;
    let kind = match packet_type {
        PUBACK => PacketKind::PubAck,
        PUBREC => PacketKind::PubRec,
        PUBREL => PacketKind::PubRel,
        _ => PacketKind::PubComp,
    };
    // Packet id and reason first: they are the cheaper, more basic checks.
    let packet = ack_v5(packet_type, pkid, reason)?;
    read_properties(r, kind)?;
    Ok(packet)
}

/// v5 DISCONNECT or AUTH with a reason code and a property block (the shorter forms took
/// [`decode_short_v5`]).
fn decode_disconnect_v5(r: &mut Reader, kind: PacketKind) -> Result<Disconnect, DecodeError> {
    let reason = r.u8()?;
    let reason = if kind == PacketKind::Auth {
        if !is_auth_reason(reason) {
            return Err(DecodeError::Malformed("reason code not allowed in AUTH"));
        }
        reason
    } else {
        disconnect_reason(reason)?
    };
    let properties = boxed(read_properties(r, kind)?);
    Ok(Disconnect { reason, properties })
}

const TRUNCATED: DecodeError = DecodeError::Malformed("field runs past the end of the packet");

impl From<ReadError> for DecodeError {
    fn from(e: ReadError) -> DecodeError {
        match e {
            ReadError::Truncated => TRUNCATED,
            ReadError::InvalidUtf8 => DecodeError::Malformed("invalid UTF-8 string"),
            // The packet decoder reads no variable byte integer of its own past the fixed header
            // (property blocks are read by read_properties, with its own wording).
            ReadError::VbiTooLong => DecodeError::Malformed("variable byte integer longer than four bytes"),
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::protocol::reason;

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
                properties: Properties::default(),
            }),
            username: Some(s("user")),
            password: Some(Bytes::from_static(b"pw")),
            properties: Properties::default(),
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
            dec(&connect_with(b"MQTT", 6, 0x02, &cid)),
            Err(DecodeError::UnsupportedProtocolLevel { level: 6 })
        );
        assert_eq!(
            dec(&connect_with(b"MQIsdp", 5, 0x02, &cid)),
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
                properties: None,
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
        assert_eq!(dec(&[0x40, 2, 0x12, 0x34]), Ok(Some(Packet::PubAck(Ack::ok(0x1234)))));
        assert_eq!(dec(&[0x50, 2, 0, 1]), Ok(Some(Packet::PubRec(Ack::ok(1)))));
        assert_eq!(dec(&[0x62, 2, 0, 2]), Ok(Some(Packet::PubRel(Ack::ok(2)))));
        assert_eq!(dec(&[0x70, 2, 0xff, 0xff]), Ok(Some(Packet::PubComp(Ack::ok(0xffff)))));
        assert_eq!(
            dec(&[0xb0, 2, 0, 7]),
            Ok(Some(Packet::UnsubAck(UnsubAck { pkid: 7, codes: SmallVec::new() })))
        );
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
            Ok(Some(Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: None })))
        );
        assert_eq!(
            dec(&[0x20, 2, 0, 5]),
            Ok(Some(Packet::ConnAck(ConnAck {
                session_present: false,
                code: reason::NOT_AUTHORIZED,
                properties: None
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
                code: reason::CLIENT_IDENTIFIER_NOT_VALID,
                properties: None
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
                SubscribeFilter::new(s("a/b"), QoS::AtLeastOnce),
                SubscribeFilter::new(s("c/d"), QoS::ExactlyOnce)
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
                codes: SmallVec::from_slice(&[0x00, 0x80, 0x02]),
                reason_string: None,
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
        assert_eq!(dec(&[0xe0, 0]), Ok(Some(Packet::Disconnect(Disconnect::default()))));
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
            [0x00, 0x0f, 0xff, 0xf2, 0x11, 0x21, 0x41, 0x60, 0x61, 0x63, 0x80, 0xa0, 0xa3, 0xc2, 0xe8]
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
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::PubAck(Ack::ok(9)))));
        assert_eq!(decode(&mut buf, v, MAX), Ok(None));
        assert_eq!(&buf[..], &[0xc0]);
        buf.extend_from_slice(&[0]);
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::PingReq)));
        assert!(buf.is_empty());
        assert_eq!(decode(&mut buf, v, MAX), Ok(None));
    }

    // ---- MQTT 5.0 ----

    fn dec5(bytes: &[u8]) -> Result<Option<Packet>, DecodeError> {
        dec_v(bytes, ProtocolVersion::V5)
    }

    /// The error decoding `bytes` as v5 gives; its reason code must match its class.
    fn err5(bytes: &[u8]) -> DecodeError {
        match dec5(bytes) {
            Err(e) => {
                let expected = match e {
                    DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
                    DecodeError::PacketTooLarge { .. } => reason::PACKET_TOO_LARGE,
                    DecodeError::UnsupportedProtocolLevel { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
                    _ => reason::MALFORMED_PACKET,
                };
                assert_eq!(e.reason_code(), expected, "{e:?}");
                e
            }
            other => panic!("expected an error for {bytes:02x?}, got {other:?}"),
        }
    }

    fn malformed5(bytes: &[u8]) -> &'static str {
        match err5(bytes) {
            DecodeError::Malformed(why) => why,
            other => panic!("expected Malformed for {bytes:02x?}, got {other:?}"),
        }
    }

    fn protocol5(bytes: &[u8]) -> &'static str {
        match err5(bytes) {
            DecodeError::Protocol(why) => why,
            other => panic!("expected Protocol for {bytes:02x?}, got {other:?}"),
        }
    }

    /// Fixed header with a one-byte remaining length in front of `body`.
    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut v = vec![first, body.len() as u8];
        v.extend_from_slice(body);
        v
    }

    /// The v5 CONNECT of the spec's example flags (0xCE: username, password, will QoS 1, clean
    /// start) with a session expiry interval of 10 and a will delay interval of 5.
    fn v5_connect() -> Vec<u8> {
        let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xce, 0, 10];
        b.extend_from_slice(&[5, 0x11, 0, 0, 0, 10]); // properties
        b.extend_from_slice(&[0, 3, b'c', b'i', b'd']);
        b.extend_from_slice(&[5, 0x18, 0, 0, 0, 5]); // will properties
        b.extend_from_slice(&[0, 3, b'w', b'/', b't', 0, 2, 0xde, 0xad]);
        b.extend_from_slice(&[0, 4, b'u', b's', b'e', b'r', 0, 2, b'p', b'w']);
        packet(0x10, &b)
    }

    #[test]
    fn v5_connect_decodes_whatever_the_connection_version() {
        let expected = Packet::Connect(Box::new(Connect {
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
        }));
        // Before CONNECT the broker decodes with V3_1_1: the CONNECT states its own version.
        assert_eq!(dec(&v5_connect()), Ok(Some(expected.clone())));
        assert_eq!(dec5(&v5_connect()), Ok(Some(expected)));
    }

    #[test]
    fn v5_connect_rules() {
        let connect5 = |flags: u8, props: &[u8], payload: &[u8]| {
            let mut b = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags, 0, 60];
            b.extend_from_slice(props);
            b.extend_from_slice(payload);
            packet(0x10, &b)
        };
        // Password without username is allowed in v5 (3.1.2.9 has no MQTT-3.1.2-22).
        let Packet::Connect(c) = dec(&connect5(0x42, &[0], &[0, 1, b'a', 0, 1, b'p'])).unwrap().unwrap()
        else {
            panic!("not a CONNECT")
        };
        assert_eq!((c.username.as_ref(), c.password.as_deref()), (None, Some(&b"p"[..])));
        assert!(c.properties.is_empty());
        // Reserved flag: Malformed (MQTT-3.1.2-3).
        assert_eq!(malformed5(&connect5(0x03, &[0], &[0, 1, b'a'])), "reserved CONNECT flag set");
        // Will QoS 3.
        assert_eq!(malformed5(&connect5(0x1c, &[0], &[0, 1, b'a', 0, 0, 1, b't', 0, 0])), "will QoS 3");
        // A PUBLISH property in CONNECT, a will property in CONNECT, a CONNECT one in the will.
        protocol5(&connect5(0x02, &[2, 0x01, 1], &[0, 1, b'a']));
        protocol5(&connect5(0x02, &[5, 0x18, 0, 0, 0, 1], &[0, 1, b'a']));
        protocol5(&connect5(0x06, &[0], &[0, 1, b'a', 5, 0x11, 0, 0, 0, 1, 0, 1, b't', 0, 0]));
        // Missing property block; a block longer than the packet; a missing will property block.
        malformed5(&connect5(0x02, &[], &[]));
        assert_eq!(
            malformed5(&connect5(0x02, &[9, 0x11], &[0, 1, b'a'])),
            "property runs past the end of the block"
        );
        malformed5(&connect5(0x06, &[0], &[0, 1, b'a']));
        // Username flag without the field: v5 is strict like 3.1.1.
        malformed5(&connect5(0x82, &[0], &[0, 1, b'a']));
        // Receive maximum 0 is a Protocol Error (3.1.2.11.3).
        protocol5(&connect5(0x02, &[3, 0x21, 0, 0], &[0, 1, b'a']));
    }

    #[test]
    fn v5_publish() {
        // Topic "a/b", packet id 10, empty property block, payload "hi": no allocation for properties.
        let v = [0x32, 10, 0, 3, b'a', b'/', b'b', 0, 10, 0, b'h', b'i'];
        let expected = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: s("a/b"),
            pkid: 10,
            payload: Bytes::from_static(b"hi"),
            properties: None,
        };
        assert_eq!(dec5(&v), Ok(Some(Packet::Publish(expected))));
        // The 3.1.1 bytes of the same PUBLISH lack the property block: the payload "hi" is read as a
        // block of length 0x68 running past the packet.
        malformed5(&[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i']);

        // QoS 0, empty topic with a topic alias (legal at codec level), a content type, a user property.
        let mut b = vec![0, 0];
        let props = [0x23, 0, 5, 0x03, 0, 1, b'j', 0x26, 0, 1, b'k', 0, 1, b'v'];
        b.push(props.len() as u8);
        b.extend_from_slice(&props);
        b.extend_from_slice(b"xyz");
        let Packet::Publish(p) = dec5(&packet(0x31, &b)).unwrap().unwrap() else { panic!("not a PUBLISH") };
        assert!(p.topic.is_empty() && p.retain);
        assert_eq!(p.pkid, 0);
        assert_eq!(&p.payload[..], b"xyz");
        let props = p.properties.expect("non-empty properties");
        assert_eq!(props.topic_alias, Some(5));
        assert_eq!(props.content_type, Some(s("j")));
        assert_eq!(props.user_properties, vec![(s("k"), s("v"))]);

        // Topic alias 0 (MQTT-3.3.2-8) decodes: the broker answers it with 0x94 like any invalid alias.
        let Ok(Some(Packet::Publish(p))) = dec_v(&[0x30, 6, 0, 0, 3, 0x23, 0, 0], ProtocolVersion::V5) else {
            panic!("alias 0 should decode")
        };
        assert_eq!(p.properties.and_then(|p| p.topic_alias), Some(0));
        // A CONNECT property in PUBLISH: Protocol Error.
        protocol5(&[0x30, 9, 0, 1, b't', 5, 0x11, 0, 0, 0, 1]);
        // Packet id 0 stays Malformed; so does a truncated block.
        assert_eq!(malformed5(&[0x32, 6, 0, 1, b't', 0, 0, 0]), "packet id 0");
        malformed5(&[0x30, 5, 0, 1, b't', 2, 0x23]);
    }

    #[test]
    fn v5_publish_properties_are_slices_of_the_read_buffer() {
        let v = [0x30, 9, 0, 1, b't', 4, 0x03, 0, 1, b'c', b'p'];
        let mut buf = BytesMut::from(&v[..]);
        let base = buf.as_ptr() as usize;
        let Some(Packet::Publish(p)) = decode(&mut buf, ProtocolVersion::V5, MAX).unwrap() else {
            panic!("not a PUBLISH")
        };
        let ct = p.properties.unwrap().content_type.unwrap();
        assert_eq!(ct.as_bytes().as_ptr() as usize, base + 9);
        assert_eq!(p.payload.as_ptr() as usize, base + 10);
    }

    #[test]
    fn v5_acks() {
        let ack = |pkid, reason| Ack { pkid, reason };
        for (first, wrap, good, bad) in [
            (0x40u8, Packet::PubAck as fn(Ack) -> Packet, 0x10u8, 0x92u8),
            (0x50, Packet::PubRec, 0x97, 0x92),
            (0x62, Packet::PubRel, 0x92, 0x10),
            (0x70, Packet::PubComp, 0x92, 0x80),
        ] {
            // Remaining length 2: reason 0, no properties; 3: reason, no properties.
            assert_eq!(dec5(&[first, 2, 0, 7]), Ok(Some(wrap(ack(7, 0)))));
            assert_eq!(dec5(&[first, 3, 0, 7, good]), Ok(Some(wrap(ack(7, good)))));
            // 4 and more: a property block, validated and dropped.
            assert_eq!(dec5(&[first, 4, 0, 7, 0, 0]), Ok(Some(wrap(ack(7, 0)))));
            assert_eq!(
                dec5(&[first, 9, 0, 7, good, 5, 0x1F, 0, 2, b'n', b'o']),
                Ok(Some(wrap(ack(7, good))))
            );
            // A reason code outside the packet's table (MQTT-3.4.2-1 …): Malformed.
            malformed5(&[first, 3, 0, 7, bad]);
            malformed5(&[first, 4, 0, 7, bad, 0]);
            assert_eq!(malformed5(&[first, 2, 0, 0]), "packet id 0");
            assert_eq!(malformed5(&[first, 4, 0, 0, 0, 0]), "packet id 0");
            malformed5(&[first, 1, 1]);
            malformed5(&[first, 0]);
            // A topic alias is not an ack property: Protocol Error.
            protocol5(&[first, 7, 0, 7, 0, 3, 0x23, 0, 1]);
            // Block running past the packet; a byte after the block.
            malformed5(&[first, 5, 0, 7, 0, 3, 0x1F]);
            assert_eq!(malformed5(&[first, 5, 0, 7, 0, 0, 9]), "trailing bytes after the packet");
            // No early length refusal in v5: a long ack is buffered like any packet (properties
            // may be long), bounded by max_packet_size.
            assert_eq!(dec5(&[first, 0xff, 0x7f, 0, 1]), Ok(None));
            assert_eq!(
                err5(&[first, 0xff, 0xff, 0x7f]),
                DecodeError::PacketTooLarge { size: 2_097_155, max: MAX }
            );
        }
    }

    #[test]
    fn v5_connack() {
        assert_eq!(
            dec5(&[0x20, 3, 1, 0, 0]),
            Ok(Some(Packet::ConnAck(ConnAck { session_present: true, code: 0, properties: None })))
        );
        let v = [0x20, 11, 0, 0x87, 8, 0x12, 0, 1, b'c', 0x21, 0, 9, 0x24];
        malformed5(&v); // the maximum QoS value is missing
        let v = [0x20, 12, 0, 0x87, 9, 0x12, 0, 1, b'c', 0x21, 0, 9, 0x24, 1];
        let Packet::ConnAck(a) = dec5(&v).unwrap().unwrap() else { panic!("not a CONNACK") };
        assert_eq!(a.code, reason::NOT_AUTHORIZED);
        let p = a.properties.unwrap();
        assert_eq!(
            (p.assigned_client_identifier, p.receive_maximum, p.maximum_qos),
            (Some(s("c")), Some(9), Some(1))
        );
        // The property block is not optional in CONNACK.
        malformed5(&[0x20, 2, 0, 0]);
        assert_eq!(malformed5(&[0x20, 3, 2, 0, 0]), "reserved CONNACK flags set");
        // 0x01 is a 3.1.1 return code, not a v5 CONNACK reason code; 0x10 is a PUBACK one.
        assert_eq!(malformed5(&[0x20, 3, 0, 0x01, 0]), "reason code not allowed in CONNACK");
        malformed5(&[0x20, 3, 0, 0x10, 0]);
        // A PUBLISH property in CONNACK.
        protocol5(&[0x20, 5, 0, 0, 2, 0x01, 0]);
    }

    #[test]
    fn v5_subscribe() {
        // Subscription identifier 7; "a/b" QoS 1 + No Local + Retain As Published + Retain Handling 2;
        // "c" with all options 0.
        let v = [0x82, 15, 0, 10, 2, 0x0B, 7, 0, 3, b'a', b'/', b'b', 0x2d, 0, 1, b'c', 0x00];
        let Packet::Subscribe(sub) = dec5(&v).unwrap().unwrap() else { panic!("not a SUBSCRIBE") };
        assert_eq!((sub.pkid, sub.subscription_id), (10, Some(7)));
        assert_eq!(
            &sub.filters[..],
            &[
                SubscribeFilter {
                    filter: s("a/b"),
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2
                },
                SubscribeFilter::new(s("c"), QoS::AtMostOnce),
            ]
        );
        // User properties are dropped; no identifier.
        let Packet::Subscribe(sub) =
            dec5(&[0x82, 14, 0, 1, 7, 0x26, 0, 1, b'k', 0, 1, b'v', 0, 1, b'c', 1]).unwrap().unwrap()
        else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(sub.subscription_id, None);
        assert_eq!(sub.filters.len(), 1);

        let with_options = |o: u8| [0x82, 7, 0, 1, 0, 0, 1, b'c', o];
        assert_eq!(malformed5(&with_options(0x40)), "reserved bits set in subscription options");
        malformed5(&with_options(0x80));
        // Spec 3.8.3.1 names both of these a Protocol Error.
        assert_eq!(protocol5(&with_options(0x03)), "SUBSCRIBE with QoS 3");
        assert_eq!(protocol5(&with_options(0x30)), "retain handling 3");
        for o in [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x2e] {
            assert!(dec5(&with_options(o)).unwrap().is_some(), "options {o:#04x}");
        }
        // Subscription identifier 0, or twice; a property SUBSCRIBE does not allow.
        assert_eq!(protocol5(&[0x82, 8, 0, 1, 2, 0x0B, 0, 0, 1, b'c', 0]), "subscription identifier 0");
        protocol5(&[0x82, 10, 0, 1, 4, 0x0B, 1, 0x0B, 2, 0, 1, b'c', 0]);
        protocol5(&[0x82, 9, 0, 1, 3, 0x23, 0, 1, 0, 1, b'c', 0]);
        // No filter at all: a Protocol Error in v5 (3.8.3).
        assert_eq!(protocol5(&[0x82, 3, 0, 1, 0]), "empty SUBSCRIBE");
        // Missing property block.
        malformed5(&[0x82, 2, 0, 1]);
        assert_eq!(malformed5(&[0x82, 6, 0, 0, 0, 0, 1, b'c']), "packet id 0");
    }

    #[test]
    fn v5_suback_unsubscribe_unsuback() {
        let v = [0x90, 11, 0, 10, 5, 0x1F, 0, 2, b'n', b'o', 0x00, 0x87, 0xA2];
        assert_eq!(
            dec5(&v),
            Ok(Some(Packet::SubAck(SubAck {
                pkid: 10,
                codes: SmallVec::from_slice(&[0x00, 0x87, 0xA2]),
                reason_string: Some(s("no")),
            })))
        );
        assert_eq!(malformed5(&[0x90, 4, 0, 1, 0, 0x03]), "invalid SUBACK return code");
        malformed5(&[0x90, 4, 0, 1, 0, 0x11]); // an UNSUBACK code
        assert_eq!(malformed5(&[0x90, 3, 0, 1, 0]), "empty SUBACK");
        protocol5(&[0x90, 7, 0, 1, 3, 0x23, 0, 1, 0]);

        let v = [0xa2, 15, 0, 10, 6, 0x26, 0, 1, b'k', 0, 0, 0, 1, b'a', 0, 1, b'b'];
        assert_eq!(
            dec5(&v),
            Ok(Some(Packet::Unsubscribe(Unsubscribe {
                pkid: 10,
                filters: SmallVec::from_vec(vec![s("a"), s("b")]),
            })))
        );
        assert_eq!(protocol5(&[0xa2, 3, 0, 1, 0]), "empty UNSUBSCRIBE");
        protocol5(&[0xa2, 9, 0, 1, 3, 0x1F, 0, 0, 0, 1, b'a']); // reason string not allowed
        malformed5(&[0xa2, 2, 0, 1]);

        let v = [0xb0, 9, 0, 10, 4, 0x1F, 0, 1, b'x', 0x00, 0x11];
        assert_eq!(
            dec5(&v),
            Ok(Some(Packet::UnsubAck(UnsubAck { pkid: 10, codes: SmallVec::from_slice(&[0x00, 0x11]) })))
        );
        assert_eq!(malformed5(&[0xb0, 4, 0, 1, 0, 0x01]), "invalid UNSUBACK reason code");
        assert_eq!(malformed5(&[0xb0, 3, 0, 1, 0]), "empty UNSUBACK");
        // The 3.1.1 form lacks the property block and the codes.
        malformed5(&[0xb0, 2, 0, 1]);
        assert_eq!(malformed5(&[0xb0, 4, 0, 0, 0, 0]), "packet id 0");
    }

    #[test]
    fn v5_disconnect_and_auth() {
        let d = |reason, properties| Disconnect { reason, properties };
        assert_eq!(dec5(&[0xe0, 0]), Ok(Some(Packet::Disconnect(d(0, None)))));
        assert_eq!(dec5(&[0xe0, 1, 0x04]), Ok(Some(Packet::Disconnect(d(4, None)))));
        assert_eq!(dec5(&[0xe0, 2, 0x8e, 0]), Ok(Some(Packet::Disconnect(d(0x8e, None)))));
        let props = Properties { session_expiry_interval: Some(0), ..Properties::default() };
        assert_eq!(
            dec5(&[0xe0, 7, 0, 5, 0x11, 0, 0, 0, 0]),
            Ok(Some(Packet::Disconnect(d(0, Some(Box::new(props))))))
        );
        assert_eq!(malformed5(&[0xe0, 1, 0x01]), "reason code not allowed in DISCONNECT");
        malformed5(&[0xe0, 2, 0x18, 0]); // an AUTH code
        protocol5(&[0xe0, 6, 0, 4, 0x15, 0, 1, b'm']); // authentication method
        malformed5(&[0xe0, 3, 0, 0, 0]);
        // 3.1.1 keeps the fixed length, refused from the header alone.
        assert_eq!(malformed(&[0xe0, 1, 0]), "DISCONNECT remaining length is not 0");

        assert_eq!(dec5(&[0xf0, 0]), Ok(Some(Packet::Auth(d(0, None)))));
        let props = Properties { authentication_method: Some(s("m")), ..Properties::default() };
        assert_eq!(
            dec5(&[0xf0, 6, 0x18, 4, 0x15, 0, 1, b'm']),
            Ok(Some(Packet::Auth(d(0x18, Some(Box::new(props))))))
        );
        assert_eq!(dec5(&[0xf0, 2, 0x19, 0]), Ok(Some(Packet::Auth(d(0x19, None)))));
        // 3.15.2.1: the reason code may only be omitted together with the property length.
        assert_eq!(malformed5(&[0xf0, 1, 0x18]), "AUTH reason code without property length");
        assert_eq!(malformed5(&[0xf0, 2, 0x04, 0]), "reason code not allowed in AUTH");
        protocol5(&[0xf0, 7, 0x18, 5, 0x11, 0, 0, 0, 1]); // session expiry
        assert_eq!(err5(&[0xf1, 0]), DecodeError::InvalidHeader { byte: 0xf1 });
    }

    #[test]
    fn auth_exists_only_in_v5() {
        // frame_len has no version: it frames an AUTH header like any other.
        assert_eq!(frame_len(&[0xf0], MAX), Ok(None));
        assert_eq!(frame_len(&[0xf0, 2, 0x18, 0], MAX), Ok(Some(4)));
        assert_eq!(frame_len(&[0xf2], MAX), Err(DecodeError::InvalidHeader { byte: 0xf2 }));
        // Before v5, decode refuses it from the first byte on, as it did when frame_len did.
        for v in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1] {
            for bytes in [&[0xf0][..], &[0xf0, 0], &[0xf0, 2, 0x18, 0]] {
                assert_eq!(dec_v(bytes, v), Err(DecodeError::InvalidHeader { byte: 0xf0 }), "{v:?}");
            }
        }
        assert_eq!(DecodeError::InvalidHeader { byte: 0xf0 }.reason_code(), reason::MALFORMED_PACKET);
    }

    #[test]
    fn v5_ping_keeps_its_fixed_length() {
        assert_eq!(dec5(&[0xc0, 0]), Ok(Some(Packet::PingReq)));
        assert_eq!(dec5(&[0xd0, 0]), Ok(Some(Packet::PingResp)));
        assert_eq!(malformed5(&[0xc0, 0xff, 0x7f]), "PINGREQ remaining length is not 0");
    }

    #[test]
    fn v5_every_prefix_is_incomplete() {
        let packets: Vec<Vec<u8>> = vec![
            v5_connect(),
            vec![0x32, 10, 0, 3, b'a', b'/', b'b', 0, 10, 0, b'h', b'i'],
            vec![0x40, 2, 0, 1],
            vec![0x40, 3, 0, 1, 0x10],
            vec![0x50, 9, 0, 7, 0x97, 5, 0x1F, 0, 2, b'n', b'o'],
            vec![0x20, 3, 0, 0, 0],
            vec![0x82, 7, 0, 1, 0, 0, 1, b'a', 1],
            vec![0x90, 4, 0, 1, 0, 1],
            vec![0xa2, 6, 0, 1, 0, 0, 1, b'a'],
            vec![0xb0, 4, 0, 1, 0, 0x11],
            vec![0xe0, 1, 0x04],
            vec![0xe0, 0x80, 0x00],
            vec![0xf0, 2, 0x18, 0],
        ];
        for p in packets {
            assert!(dec5(&p).unwrap().is_some(), "{p:02x?}");
            for n in 0..p.len() {
                let mut buf = BytesMut::from(&p[..n]);
                assert_eq!(decode(&mut buf, ProtocolVersion::V5, MAX), Ok(None), "prefix {n} of {p:?}");
                assert_eq!(&buf[..], &p[..n], "prefix {n} was consumed");
            }
        }
    }

    #[test]
    fn v5_back_to_back() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0x40, 3, 0, 9, 0x10]);
        buf.extend_from_slice(&[0x30, 5, 0, 1, b't', 0, b'x']);
        buf.extend_from_slice(&[0xe0, 1, 0x04]);
        let v = ProtocolVersion::V5;
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::PubAck(Ack { pkid: 9, reason: 0x10 }))));
        let Some(Packet::Publish(p)) = decode(&mut buf, v, MAX).unwrap() else { panic!("not a PUBLISH") };
        assert_eq!((p.topic.as_str(), &p.payload[..], p.properties), ("t", &b"x"[..], None));
        assert_eq!(decode(&mut buf, v, MAX), Ok(Some(Packet::Disconnect(Disconnect::with_reason(4, None)))));
        assert!(buf.is_empty());
    }
}
