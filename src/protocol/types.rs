//! Packet types shared by the decoder, the encoder and the broker.
//!
//! Strings taken from the wire are kept as [`Utf8Bytes`]: a slice of the read buffer that has been
//! checked once to be valid MQTT UTF-8, so a topic or client id costs no allocation and no copy.

use bytes::Bytes;
use smallvec::SmallVec;

use super::properties::Properties;

/// Quality of service of a PUBLISH or a subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// `None` for 3, which every version forbids.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The protocol level of the CONNECT packet: it decides the layout of every later packet of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1 = 3,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1 = 4,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5 = 5,
}

/// A string from the wire: valid UTF-8, no U+0000 (MQTT-1.5.3-1/2), at most 65,535 bytes.
/// Cloning is a reference-count increment.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Checks `b` the way the decoder does.
    pub fn try_from_bytes(b: Bytes) -> Result<Utf8Bytes, InvalidString> {
        let s = std::str::from_utf8(&b).map_err(|_| InvalidString)?;
        if s.len() > u16::MAX as usize || s.contains('\0') {
            return Err(InvalidString);
        }
        Ok(Utf8Bytes(b))
    }

    pub fn from_static(s: &'static str) -> Utf8Bytes {
        Utf8Bytes(Bytes::from_static(s.as_bytes()))
    }

    /// Copies `s`; for strings the broker makes itself (assigned client ids, config).
    pub fn copy_from_str(s: &str) -> Utf8Bytes {
        Utf8Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either checked the bytes with `str::from_utf8`
        // (`try_from_bytes`) or copied them from a `&str` (`from_static`, `copy_from_str`), and
        // `Bytes` is immutable, so the bytes are valid UTF-8. Re-checking here showed up in profiles:
        // topics are read several times per PUBLISH.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string on the wire was not valid MQTT UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidString;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: Utf8Bytes,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 will properties (will delay interval, message expiry, content type …); empty before v5.
    pub properties: Properties,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// Clean session (3.1/3.1.1) or Clean Start (5.0): discard any stored session.
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: Utf8Bytes,
    pub will: Option<Will>,
    pub username: Option<Utf8Bytes>,
    pub password: Option<Bytes>,
    /// v5 CONNECT properties; empty before v5.
    pub properties: Properties,
}

impl Connect {
    /// Gives the fields kept after CONNECT (client id, username, will) allocations of their own and
    /// drops the password. Decoded strings are slices of the read buffer; a session keeps its client id
    /// (and the username, for the ACL) for its whole life and must not pin that buffer.
    pub fn detach(&mut self) {
        self.client_id = Utf8Bytes::copy_from_str(self.client_id.as_str());
        self.username = self.username.as_ref().map(|u| Utf8Bytes::copy_from_str(u.as_str()));
        self.password = None;
        if let Some(w) = &mut self.will {
            w.topic = Utf8Bytes::copy_from_str(w.topic.as_str());
            w.payload = Bytes::copy_from_slice(&w.payload);
            w.properties.detach();
        }
        self.properties.detach();
    }
}

/// CONNACK. `code` is always an MQTT 5.0 reason code (see [`reason`](super::reason)); on 3.1/3.1.1
/// connections the encoder writes the matching 3.1.1 return code
/// ([`reason::connack_v3`](super::reason::connack_v3)) and the decoder maps the other way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
    /// v5 only; `None` encodes as an empty property block.
    pub properties: Option<Box<Properties>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: Utf8Bytes,
    /// 0 for QoS 0 (no packet id on the wire); never 0 for QoS 1/2 (the decoder refuses it).
    pub pkid: u16,
    pub payload: Bytes,
    /// v5 PUBLISH properties; `None` when the block is empty (always before v5), so that a plain
    /// PUBLISH costs no allocation.
    pub properties: Option<Box<Properties>>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP. `reason` is the v5 reason code (0 = success; always 0 before v5,
/// where the packet has no such field). Properties of acknowledgements (a reason string, user
/// properties) are validated by the decoder and not kept: the broker never acts on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub reason: u8,
}

impl Ack {
    /// A successful acknowledgement of `pkid`.
    pub fn ok(pkid: u16) -> Ack {
        Ack { pkid, reason: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: Utf8Bytes,
    /// The maximum QoS the client asks for.
    pub qos: QoS,
    /// v5 No Local: never deliver this client's own messages through this subscription.
    pub no_local: bool,
    /// v5 Retain As Published: keep the publisher's retain flag on live deliveries.
    pub retain_as_published: bool,
    /// v5 Retain Handling: 0 send retained messages, 1 only if the subscription is new, 2 never.
    pub retain_handling: u8,
}

impl SubscribeFilter {
    /// A 3.1.1-style subscription: no v5 options.
    pub fn new(filter: Utf8Bytes, qos: QoS) -> SubscribeFilter {
        SubscribeFilter { filter, qos, no_local: false, retain_as_published: false, retain_handling: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// Never empty (MQTT-3.8.3-3): the decoder refuses an empty SUBSCRIBE.
    pub filters: SmallVec<[SubscribeFilter; 2]>,
    /// v5 Subscription Identifier (1..=268,435,455); user properties are not kept.
    pub subscription_id: Option<u32>,
}

/// SUBACK. Each code is a v5 reason code: 0, 1, 2 for the granted QoS, 0x80 and above for a refusal
/// (on 3.1/3.1.1 every refusal is written as 0x80).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub codes: SmallVec<[u8; 2]>,
    /// v5 reason string; never written before v5.
    pub reason_string: Option<Utf8Bytes>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    /// Never empty (MQTT-3.10.3-2).
    pub filters: SmallVec<[Utf8Bytes; 2]>,
}

/// UNSUBACK. `codes` holds one v5 reason code per filter (0x00 success, 0x11 no subscription existed,
/// …); 3.1/3.1.1 UNSUBACK has none, so there it is ignored by the encoder and empty when decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub pkid: u16,
    pub codes: SmallVec<[u8; 2]>,
}

/// DISCONNECT (and, with the same shape, AUTH). Before v5 the packet is empty: reason 0, no properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: u8,
    pub properties: Option<Box<Properties>>,
}

impl Disconnect {
    /// A DISCONNECT with `reason` and, when given, a reason string for a person to read.
    pub fn with_reason(reason: u8, why: Option<&str>) -> Disconnect {
        let properties = why.map(|w| {
            Box::new(Properties { reason_string: Some(Utf8Bytes::copy_from_str(w)), ..Properties::default() })
        });
        Disconnect { reason, properties }
    }
}

/// Every MQTT 3.1, 3.1.1 and 5.0 control packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    /// v5 only.
    Auth(Disconnect),
}

/// Why a packet could not be decoded. Every variant ends the connection; the broker maps them to
/// the answer the spec names (a CONNACK code, or just closing the connection on 3.1.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The remaining length field is longer than four bytes or otherwise broken.
    MalformedLength,
    /// The packet is larger than the configured `max_packet_size`.
    PacketTooLarge { size: usize, max: usize },
    /// Packet type 0 or 15, or reserved flag bits that are not what the spec requires.
    InvalidHeader { byte: u8 },
    /// The protocol name is neither `MQTT` nor `MQIsdp`: close without CONNACK (MQTT-3.1.2-1).
    InvalidProtocolName,
    /// Name recognised but level unsupported: answer CONNACK 0x01 (MQTT-3.1.2-2).
    UnsupportedProtocolLevel { level: u8 },
    /// The packet's body does not match its type (truncated field, bad UTF-8, QoS 3, packet id 0,
    /// empty SUBSCRIBE, reserved CONNECT flag set, trailing bytes …). The string says which.
    Malformed(&'static str),
    /// v5: well-formed, but the spec calls it a Protocol Error (a property not allowed in the packet
    /// or repeated, a value out of range …). The string says which.
    Protocol(&'static str),
}

impl DecodeError {
    /// The v5 reason code for a CONNACK or DISCONNECT answering this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::PacketTooLarge { .. } => super::reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolLevel { .. } => super::reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::Protocol(_) => super::reason::PROTOCOL_ERROR,
            DecodeError::MalformedLength
            | DecodeError::InvalidHeader { .. }
            | DecodeError::InvalidProtocolName
            | DecodeError::Malformed(_) => super::reason::MALFORMED_PACKET,
        }
    }
}

impl From<super::properties::PropError> for DecodeError {
    fn from(e: super::properties::PropError) -> DecodeError {
        match e {
            super::properties::PropError::Malformed(why) => DecodeError::Malformed(why),
            super::properties::PropError::Protocol(why) => DecodeError::Protocol(why),
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::MalformedLength => f.write_str("malformed remaining length"),
            DecodeError::PacketTooLarge { size, max } => {
                write!(f, "packet of {size} bytes exceeds max_packet_size {max}")
            }
            DecodeError::InvalidHeader { byte } => write!(f, "invalid fixed header byte 0x{byte:02x}"),
            DecodeError::InvalidProtocolName => f.write_str("invalid protocol name"),
            DecodeError::UnsupportedProtocolLevel { level } => {
                write!(f, "unsupported protocol level {level}")
            }
            DecodeError::Malformed(why) => write!(f, "malformed packet: {why}"),
            DecodeError::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}
