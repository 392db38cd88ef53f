//! Packet types shared by the decoder, the encoder and the broker.
//!
//! Strings taken from the wire are kept as [`Utf8Bytes`]: a slice of the read buffer that has been
//! checked once to be valid MQTT UTF-8, so a topic or client id costs no allocation and no copy.

use bytes::Bytes;
use smallvec::SmallVec;

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

/// The protocol level of the CONNECT packet. 5.0 is recognised so that the decoder can refuse it
/// cleanly until the v5 codec lands.
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_session: bool,
    pub keep_alive: u16,
    pub client_id: Utf8Bytes,
    pub will: Option<Will>,
    pub username: Option<Utf8Bytes>,
    pub password: Option<Bytes>,
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
        }
    }
}

/// CONNACK return codes of MQTT 3.1/3.1.1 (MQTT-3.2.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectReturnCode {
    Accepted = 0,
    UnacceptableProtocolVersion = 1,
    IdentifierRejected = 2,
    ServerUnavailable = 3,
    BadUserNameOrPassword = 4,
    NotAuthorized = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: ConnectReturnCode,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: Utf8Bytes,
    /// The maximum QoS the client asks for.
    pub qos: QoS,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub pkid: u16,
    /// Never empty (MQTT-3.8.3-3): the decoder refuses an empty SUBSCRIBE.
    pub filters: SmallVec<[SubscribeFilter; 2]>,
}

/// One SUBACK return code: the granted QoS, or failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubAckCode {
    Granted(QoS),
    Failure,
}

impl SubAckCode {
    pub fn to_u8(self) -> u8 {
        match self {
            SubAckCode::Granted(q) => q as u8,
            SubAckCode::Failure => 0x80,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub pkid: u16,
    pub codes: SmallVec<[SubAckCode; 2]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub pkid: u16,
    /// Never empty (MQTT-3.10.3-2).
    pub filters: SmallVec<[Utf8Bytes; 2]>,
}

/// Every MQTT 3.1/3.1.1 control packet. v5 adds properties and AUTH in a later change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect,
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
        }
    }
}
