//! MQTT 5.0 properties (section 2.2.2): decoding, encoding and sizing of a property block.
//!
//! Pure code, independent of the packet codec: the v5 packet decoder calls [`decode_properties`]
//! where a packet's variable header (or the will section of CONNECT's payload) carries a property
//! block, and the encoder uses [`properties_len`] to size a packet before [`encode_properties`]
//! writes it.
//!
//! Decoding is zero-copy like the rest of the codec: strings and binary data are slices of the
//! input [`Bytes`]. Every read is bounds-checked against the property block, whose length is
//! itself checked against the input before anything is read, so a length taken off the wire never
//! makes us allocate or reserve memory for bytes that are not there.
//!
//! Error classes follow the spec: what cannot be parsed (truncation, a broken variable byte
//! integer, bad UTF-8, an unknown property identifier whose size is therefore unknown) is a
//! Malformed Packet (0x81); a well-formed property that the spec forbids (wrong packet, repeated,
//! or a value the spec calls "a Protocol Error") is a Protocol Error (0x82).

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;

use super::property_id::*;
use super::reader::{ReadError, Reader};
use super::types::Utf8Bytes;

/// Which property block is being decoded: it decides which properties are allowed (table 2-4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketKind {
    /// CONNECT's variable header (MQTT-3.1.2.11).
    Connect,
    /// CONNACK (MQTT-3.2.2.3).
    ConnAck,
    /// PUBLISH (MQTT-3.3.2.3).
    Publish,
    /// PUBACK (MQTT-3.4.2.2).
    PubAck,
    /// PUBREC (MQTT-3.5.2.2).
    PubRec,
    /// PUBREL (MQTT-3.6.2.2).
    PubRel,
    /// PUBCOMP (MQTT-3.7.2.2).
    PubComp,
    /// SUBSCRIBE (MQTT-3.8.2.1).
    Subscribe,
    /// SUBACK (MQTT-3.9.2.1).
    SubAck,
    /// UNSUBSCRIBE (MQTT-3.10.2.1).
    Unsubscribe,
    /// UNSUBACK (MQTT-3.11.2.1).
    UnsubAck,
    /// DISCONNECT (MQTT-3.14.2.2).
    Disconnect,
    /// AUTH (MQTT-3.15.2.2).
    Auth,
    /// The will properties in CONNECT's payload (MQTT-3.1.3.2).
    Will,
}

/// Every property of table 2-4, typed. `None` / empty means absent.
///
/// The decoder only produces values the spec allows (ranges are documented per field); the
/// encoder writes whatever it is given, so the broker must respect the same ranges when it builds
/// one itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// 0x01, 0 (unspecified bytes) or 1 (UTF-8 payload).
    pub payload_format_indicator: Option<u8>,
    /// 0x02, seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03.
    pub content_type: Option<Utf8Bytes>,
    /// 0x08; never contains a wildcard (MQTT-3.3.2-14).
    pub response_topic: Option<Utf8Bytes>,
    /// 0x09.
    pub correlation_data: Option<Bytes>,
    /// 0x0B, each in 1..=268,435,455. PUBLISH may carry several; SUBSCRIBE at most one.
    pub subscription_identifiers: SmallVec<[u32; 1]>,
    /// 0x11, seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12.
    pub assigned_client_identifier: Option<Utf8Bytes>,
    /// 0x13, seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15.
    pub authentication_method: Option<Utf8Bytes>,
    /// 0x16.
    pub authentication_data: Option<Bytes>,
    /// 0x17, 0 or 1.
    pub request_problem_information: Option<u8>,
    /// 0x18, seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19, 0 or 1.
    pub request_response_information: Option<u8>,
    /// 0x1A.
    pub response_information: Option<Utf8Bytes>,
    /// 0x1C.
    pub server_reference: Option<Utf8Bytes>,
    /// 0x1F.
    pub reason_string: Option<Utf8Bytes>,
    /// 0x21, never 0.
    pub receive_maximum: Option<u16>,
    /// 0x22.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23; 0 is invalid (MQTT-3.3.2-8) but decoded, so that the broker can answer it with 0x94.
    pub topic_alias: Option<u16>,
    /// 0x24, 0 or 1.
    pub maximum_qos: Option<u8>,
    /// 0x25, 0 or 1.
    pub retain_available: Option<u8>,
    /// 0x26, name/value pairs in wire order; a name may repeat (MQTT-3.3.2-17/18).
    pub user_properties: Vec<(Utf8Bytes, Utf8Bytes)>,
    /// 0x27, never 0.
    pub maximum_packet_size: Option<u32>,
    /// 0x28, 0 or 1.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29, 0 or 1.
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A, 0 or 1.
    pub shared_subscription_available: Option<u8>,
}

impl Properties {
    /// True if no property is set: the block then encodes as the single byte 0.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Gives every string and binary value an allocation of its own: decoded values are slices of the
    /// read buffer, which properties kept for long (a will, a session's CONNECT) must not pin.
    pub fn detach(&mut self) {
        fn s(v: &mut Option<Utf8Bytes>) {
            if let Some(x) = v {
                *x = Utf8Bytes::copy_from_str(x.as_str());
            }
        }
        fn b(v: &mut Option<Bytes>) {
            if let Some(x) = v {
                *x = Bytes::copy_from_slice(x);
            }
        }
        s(&mut self.content_type);
        s(&mut self.response_topic);
        b(&mut self.correlation_data);
        s(&mut self.assigned_client_identifier);
        s(&mut self.authentication_method);
        b(&mut self.authentication_data);
        s(&mut self.response_information);
        s(&mut self.server_reference);
        s(&mut self.reason_string);
        for (k, v) in &mut self.user_properties {
            *k = Utf8Bytes::copy_from_str(k.as_str());
            *v = Utf8Bytes::copy_from_str(v.as_str());
        }
    }
}

/// Why a property block was refused. Both end the connection (or fail the CONNECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropError {
    /// Malformed Packet (reason code 0x81). The string says what was wrong.
    Malformed(&'static str),
    /// Protocol Error (reason code 0x82). The string says what was wrong.
    Protocol(&'static str),
}

impl PropError {
    /// The MQTT 5.0 reason code to send in CONNACK or DISCONNECT.
    pub fn reason_code(self) -> u8 {
        match self {
            PropError::Malformed(_) => super::reason::MALFORMED_PACKET,
            PropError::Protocol(_) => super::reason::PROTOCOL_ERROR,
        }
    }
}

impl std::fmt::Display for PropError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropError::Malformed(why) => write!(f, "malformed properties: {why}"),
            PropError::Protocol(why) => write!(f, "properties protocol error: {why}"),
        }
    }
}

impl std::error::Error for PropError {}

/// Largest value a variable byte integer can carry (MQTT-1.5.5).
const MAX_VBI: u32 = 268_435_455;

/// Largest string or binary data length (two-byte length prefix, MQTT-1.5.4 / 1.5.6).
const MAX_FIELD: usize = u16::MAX as usize;

/// Whether property `id` may appear in `kind`: table 2-4, one row per arm.
fn allowed(id: u8, kind: PacketKind) -> bool {
    use PacketKind::*;
    match id {
        PAYLOAD_FORMAT_INDICATOR
        | MESSAGE_EXPIRY_INTERVAL
        | CONTENT_TYPE
        | RESPONSE_TOPIC
        | CORRELATION_DATA => matches!(kind, Publish | Will),
        SUBSCRIPTION_IDENTIFIER => matches!(kind, Publish | Subscribe),
        SESSION_EXPIRY_INTERVAL => matches!(kind, Connect | ConnAck | Disconnect),
        ASSIGNED_CLIENT_IDENTIFIER
        | SERVER_KEEP_ALIVE
        | RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => kind == ConnAck,
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => matches!(kind, Connect | ConnAck | Auth),
        REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => kind == Connect,
        WILL_DELAY_INTERVAL => kind == Will,
        SERVER_REFERENCE => matches!(kind, ConnAck | Disconnect),
        REASON_STRING => !matches!(kind, Connect | Publish | Will | Subscribe | Unsubscribe),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => {
            matches!(kind, Connect | ConnAck)
        }
        TOPIC_ALIAS => kind == Publish,
        USER_PROPERTY => true,
        _ => false,
    }
}

/// Decodes a property block (its variable byte integer length, then the properties) from the
/// front of `buf`, checking each property against table 2-4 for `kind`.
///
/// On success `buf` has been advanced past the block and the strings and binary data of the
/// result are slices of it. On error `buf` is left untouched. Unknown property identifiers are
/// Malformed (their size cannot be known); properties not allowed in `kind`, repeated properties
/// other than User Property and (in PUBLISH) Subscription Identifier, and values the spec calls a
/// Protocol Error (0 where 0 is forbidden, 0/1 flags with another value, a Response Topic with a
/// wildcard, Authentication Data without Authentication Method in CONNECT) are Protocol errors.
/// A Payload Format Indicator other than 0/1, for which the spec
/// names no error class, is Malformed.
pub fn decode_properties(buf: &mut Bytes, kind: PacketKind) -> Result<Properties, PropError> {
    let mut r = Reader::new(buf.clone());
    let p = read_properties(&mut r, kind)?;
    // Only now that the whole block is valid: a failed decode leaves the caller's buffer as it was.
    *buf = r.rest();
    Ok(p)
}

/// [`decode_properties`] on the codec's reader: reads a property block at its position, which it
/// leaves past the block. On error the reader's position is unspecified.
pub(super) fn read_properties(r: &mut Reader, kind: PacketKind) -> Result<Properties, PropError> {
    let len = r.vbi()?;
    // A u32 of at most 268,435,455 always fits a usize on the targets we support (>= 32 bits).
    let len = usize::try_from(len).map_err(|_| TRUNCATED)?;
    let mut r = Reader::new(r.take(len)?);

    let mut p = Properties::default();
    // Bit `id` is set once property `id` has been seen; every known id is below 64.
    let mut seen: u64 = 0;
    while !r.is_empty() {
        // The identifier is a variable byte integer in the spec, but every defined one fits in a
        // single byte below 0x80; a first byte with the continuation bit is therefore unknown.
        let id = r.u8()?;
        if !is_known(id) {
            return Err(PropError::Malformed("unknown property identifier"));
        }
        if !allowed(id, kind) {
            return Err(PropError::Protocol("property not allowed in this packet"));
        }
        let bit = 1u64 << id; // is_known guarantees id <= 0x2A.
        let repeatable =
            id == USER_PROPERTY || (id == SUBSCRIPTION_IDENTIFIER && kind == PacketKind::Publish);
        if seen & bit != 0 && !repeatable {
            return Err(PropError::Protocol("property included more than once"));
        }
        seen |= bit;
        read_one(&mut r, id, &mut p)?;
    }
    // MQTT-3.1.2.11.10: data for an authentication method that was not named.
    if kind == PacketKind::Connect && p.authentication_data.is_some() && p.authentication_method.is_none() {
        return Err(PropError::Protocol("authentication data without authentication method"));
    }
    Ok(p)
}

/// Whether `id` is a property identifier of table 2-4.
fn is_known(id: u8) -> bool {
    matches!(
        id,
        PAYLOAD_FORMAT_INDICATOR
            | MESSAGE_EXPIRY_INTERVAL
            | CONTENT_TYPE
            | RESPONSE_TOPIC
            | CORRELATION_DATA
            | SUBSCRIPTION_IDENTIFIER
            | SESSION_EXPIRY_INTERVAL
            | ASSIGNED_CLIENT_IDENTIFIER
            | SERVER_KEEP_ALIVE
            | AUTHENTICATION_METHOD
            | AUTHENTICATION_DATA
            | REQUEST_PROBLEM_INFORMATION
            | WILL_DELAY_INTERVAL
            | REQUEST_RESPONSE_INFORMATION
            | RESPONSE_INFORMATION
            | SERVER_REFERENCE
            | REASON_STRING
            | RECEIVE_MAXIMUM
            | TOPIC_ALIAS_MAXIMUM
            | TOPIC_ALIAS
            | MAXIMUM_QOS
            | RETAIN_AVAILABLE
            | USER_PROPERTY
            | MAXIMUM_PACKET_SIZE
            | WILDCARD_SUBSCRIPTION_AVAILABLE
            | SUBSCRIPTION_IDENTIFIER_AVAILABLE
            | SHARED_SUBSCRIPTION_AVAILABLE
    )
}

/// Reads the value of property `id` (already checked to be known and allowed) into `p`.
fn read_one(r: &mut Reader, id: u8, p: &mut Properties) -> Result<(), PropError> {
    match id {
        PAYLOAD_FORMAT_INDICATOR => {
            let v = r.u8()?;
            if v > 1 {
                return Err(PropError::Malformed("payload format indicator other than 0 or 1"));
            }
            p.payload_format_indicator = Some(v);
        }
        MESSAGE_EXPIRY_INTERVAL => p.message_expiry_interval = Some(r.u32()?),
        CONTENT_TYPE => p.content_type = Some(r.string()?),
        RESPONSE_TOPIC => {
            let t = r.string()?;
            // MQTT-3.3.2-14: it is a topic name, to which the responder publishes.
            if t.as_str().contains(['+', '#']) {
                return Err(PropError::Protocol("response topic contains a wildcard"));
            }
            p.response_topic = Some(t);
        }
        CORRELATION_DATA => p.correlation_data = Some(r.binary()?),
        SUBSCRIPTION_IDENTIFIER => {
            let v = r.vbi()?;
            if v == 0 {
                return Err(PropError::Protocol("subscription identifier 0"));
            }
            p.subscription_identifiers.push(v);
        }
        SESSION_EXPIRY_INTERVAL => p.session_expiry_interval = Some(r.u32()?),
        ASSIGNED_CLIENT_IDENTIFIER => p.assigned_client_identifier = Some(r.string()?),
        SERVER_KEEP_ALIVE => p.server_keep_alive = Some(r.u16()?),
        AUTHENTICATION_METHOD => p.authentication_method = Some(r.string()?),
        AUTHENTICATION_DATA => p.authentication_data = Some(r.binary()?),
        REQUEST_PROBLEM_INFORMATION => p.request_problem_information = Some(flag(r.u8()?)?),
        WILL_DELAY_INTERVAL => p.will_delay_interval = Some(r.u32()?),
        REQUEST_RESPONSE_INFORMATION => p.request_response_information = Some(flag(r.u8()?)?),
        RESPONSE_INFORMATION => p.response_information = Some(r.string()?),
        SERVER_REFERENCE => p.server_reference = Some(r.string()?),
        REASON_STRING => p.reason_string = Some(r.string()?),
        RECEIVE_MAXIMUM => p.receive_maximum = Some(nonzero_u16(r.u16()?, "receive maximum 0")?),
        TOPIC_ALIAS_MAXIMUM => p.topic_alias_maximum = Some(r.u16()?),
        // 0 is not a valid alias (MQTT-3.3.2-8), but the receiver answers it as an invalid alias (0x94),
        // like one above its maximum: it decodes, and the broker refuses it.
        TOPIC_ALIAS => p.topic_alias = Some(r.u16()?),
        MAXIMUM_QOS => p.maximum_qos = Some(flag(r.u8()?)?),
        RETAIN_AVAILABLE => p.retain_available = Some(flag(r.u8()?)?),
        USER_PROPERTY => {
            let name = r.string()?;
            let value = r.string()?;
            // Each pair took at least 5 bytes of the block, so the vector's growth is bounded by
            // the input size.
            p.user_properties.push((name, value));
        }
        MAXIMUM_PACKET_SIZE => {
            let v = r.u32()?;
            if v == 0 {
                return Err(PropError::Protocol("maximum packet size 0"));
            }
            p.maximum_packet_size = Some(v);
        }
        WILDCARD_SUBSCRIPTION_AVAILABLE => p.wildcard_subscription_available = Some(flag(r.u8()?)?),
        SUBSCRIPTION_IDENTIFIER_AVAILABLE => p.subscription_identifier_available = Some(flag(r.u8()?)?),
        SHARED_SUBSCRIPTION_AVAILABLE => p.shared_subscription_available = Some(flag(r.u8()?)?),
        // decode_properties only passes known identifiers.
        _ => return Err(PropError::Malformed("unknown property identifier")),
    }
    Ok(())
}

const TRUNCATED: PropError = PropError::Malformed("property runs past the end of the block");

impl From<ReadError> for PropError {
    fn from(e: ReadError) -> PropError {
        match e {
            ReadError::Truncated => TRUNCATED,
            ReadError::InvalidUtf8 => PropError::Malformed("invalid UTF-8 string"),
            ReadError::VbiTooLong => PropError::Malformed("variable byte integer longer than four bytes"),
        }
    }
}

/// A byte that the spec restricts to 0 or 1, any other value being a Protocol Error
/// (MQTT-3.1.2.11.6/7, 3.2.2.3.4/5/11/12/13).
fn flag(v: u8) -> Result<u8, PropError> {
    if v > 1 {
        return Err(PropError::Protocol("property value other than 0 or 1"));
    }
    Ok(v)
}

/// A two-byte integer for which the spec calls 0 a Protocol Error.
fn nonzero_u16(v: u16, why: &'static str) -> Result<u16, PropError> {
    match v {
        0 => Err(PropError::Protocol(why)),
        v => Ok(v),
    }
}

/// Bytes [`encode_properties`] writes for `p`, length prefix included.
pub fn properties_len(p: &Properties) -> usize {
    let body = properties_body_len(p);
    vbi_len(body) + body
}

/// Writes `p` as a property block: its length as a variable byte integer, then every property
/// that is set (user properties and subscription identifiers in their order).
///
/// Writes exactly [`properties_len`] bytes. It does not check `p` against a packet kind: the
/// caller sets only what the packet allows. Binary data longer than 65,535 bytes, and strings
/// built with `Utf8Bytes::copy_from_str` from longer text, are cut to the longest prefix that fits
/// the two-byte length (at a character boundary for strings), so the framing stays valid; the
/// broker should not build such values. Subscription identifiers above 268,435,455 are written as
/// 268,435,455 for the same reason.
pub fn encode_properties(p: &Properties, out: &mut BytesMut) {
    let body = properties_body_len(p);
    out.reserve(vbi_len(body) + body);
    put_vbi(out, body);
    put_body(p, out);
}

/// Writes the properties of `p` like [`encode_properties`] but without the length prefix: exactly
/// [`properties_body_len`] bytes. For callers that assemble a block from several pre-encoded runs
/// (the broker's per-subscriber PUBLISH head) and write the total length themselves.
pub fn encode_properties_body(p: &Properties, out: &mut BytesMut) {
    out.reserve(properties_body_len(p));
    put_body(p, out);
}

/// Writes every property that is set; the caller has reserved the space.
fn put_body(p: &Properties, out: &mut BytesMut) {
    if let Some(v) = p.payload_format_indicator {
        out.put_u8(PAYLOAD_FORMAT_INDICATOR);
        out.put_u8(v);
    }
    if let Some(v) = p.message_expiry_interval {
        out.put_u8(MESSAGE_EXPIRY_INTERVAL);
        out.put_u32(v);
    }
    put_opt_string(out, CONTENT_TYPE, &p.content_type);
    put_opt_string(out, RESPONSE_TOPIC, &p.response_topic);
    if let Some(v) = &p.correlation_data {
        out.put_u8(CORRELATION_DATA);
        put_binary(out, v);
    }
    for &v in &p.subscription_identifiers {
        out.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_vbi(out, sub_id(v));
    }
    if let Some(v) = p.session_expiry_interval {
        out.put_u8(SESSION_EXPIRY_INTERVAL);
        out.put_u32(v);
    }
    put_opt_string(out, ASSIGNED_CLIENT_IDENTIFIER, &p.assigned_client_identifier);
    if let Some(v) = p.server_keep_alive {
        out.put_u8(SERVER_KEEP_ALIVE);
        out.put_u16(v);
    }
    put_opt_string(out, AUTHENTICATION_METHOD, &p.authentication_method);
    if let Some(v) = &p.authentication_data {
        out.put_u8(AUTHENTICATION_DATA);
        put_binary(out, v);
    }
    put_opt_u8(out, REQUEST_PROBLEM_INFORMATION, p.request_problem_information);
    if let Some(v) = p.will_delay_interval {
        out.put_u8(WILL_DELAY_INTERVAL);
        out.put_u32(v);
    }
    put_opt_u8(out, REQUEST_RESPONSE_INFORMATION, p.request_response_information);
    put_opt_string(out, RESPONSE_INFORMATION, &p.response_information);
    put_opt_string(out, SERVER_REFERENCE, &p.server_reference);
    put_opt_string(out, REASON_STRING, &p.reason_string);
    put_opt_u16(out, RECEIVE_MAXIMUM, p.receive_maximum);
    put_opt_u16(out, TOPIC_ALIAS_MAXIMUM, p.topic_alias_maximum);
    put_opt_u16(out, TOPIC_ALIAS, p.topic_alias);
    put_opt_u8(out, MAXIMUM_QOS, p.maximum_qos);
    put_opt_u8(out, RETAIN_AVAILABLE, p.retain_available);
    for (name, value) in &p.user_properties {
        out.put_u8(USER_PROPERTY);
        put_string(out, name);
        put_string(out, value);
    }
    if let Some(v) = p.maximum_packet_size {
        out.put_u8(MAXIMUM_PACKET_SIZE);
        out.put_u32(v);
    }
    put_opt_u8(out, WILDCARD_SUBSCRIPTION_AVAILABLE, p.wildcard_subscription_available);
    put_opt_u8(out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, p.subscription_identifier_available);
    put_opt_u8(out, SHARED_SUBSCRIPTION_AVAILABLE, p.shared_subscription_available);
}

/// Bytes of the properties themselves, without the length prefix: what
/// [`encode_properties_body`] writes. Must mirror it exactly.
pub fn properties_body_len(p: &Properties) -> usize {
    // Identifier byte + value, per property kind.
    let byte = |v: Option<u8>| if v.is_some() { 2 } else { 0 };
    let two = |v: Option<u16>| if v.is_some() { 3 } else { 0 };
    let four = |v: Option<u32>| if v.is_some() { 5 } else { 0 };
    let string = |s: &Option<Utf8Bytes>| s.as_ref().map_or(0, |s| 1 + string_len(s));
    let binary = |b: &Option<Bytes>| b.as_ref().map_or(0, |b| 1 + binary_len(b));

    // Sums of lengths of in-memory data: cannot overflow a usize.
    byte(p.payload_format_indicator)
        + four(p.message_expiry_interval)
        + string(&p.content_type)
        + string(&p.response_topic)
        + binary(&p.correlation_data)
        + p.subscription_identifiers.iter().map(|&v| 1 + vbi_len(sub_id(v))).sum::<usize>()
        + four(p.session_expiry_interval)
        + string(&p.assigned_client_identifier)
        + two(p.server_keep_alive)
        + string(&p.authentication_method)
        + binary(&p.authentication_data)
        + byte(p.request_problem_information)
        + four(p.will_delay_interval)
        + byte(p.request_response_information)
        + string(&p.response_information)
        + string(&p.server_reference)
        + string(&p.reason_string)
        + two(p.receive_maximum)
        + two(p.topic_alias_maximum)
        + two(p.topic_alias)
        + byte(p.maximum_qos)
        + byte(p.retain_available)
        + p.user_properties.iter().map(|(n, v)| 1 + string_len(n) + string_len(v)).sum::<usize>()
        + four(p.maximum_packet_size)
        + byte(p.wildcard_subscription_available)
        + byte(p.subscription_identifier_available)
        + byte(p.shared_subscription_available)
}

/// Bytes [`encode_delivery_props`] writes: one Subscription Identifier per entry of
/// `subscription_identifiers`, plus a Message Expiry Interval if `message_expiry`, plus a Topic
/// Alias if `topic_alias`. The values of the last two do not change the size.
pub fn delivery_props_len(
    subscription_identifiers: &[u32],
    message_expiry: bool,
    topic_alias: bool,
) -> usize {
    subscription_identifiers.iter().map(|&v| 1 + vbi_len(sub_id(v))).sum::<usize>()
        + if message_expiry { 5 } else { 0 }
        + if topic_alias { 3 } else { 0 }
}

/// Writes the properties a server sets on each delivery of a v5 PUBLISH, without the length
/// prefix: a Subscription Identifier for each of `subscription_identifiers` in the order given
/// (MQTT-3.3.4-3/4/5), then the Message Expiry Interval (the seconds that remain, MQTT-3.3.2-6) and
/// the Topic Alias, each if given. Writes exactly [`delivery_props_len`] bytes, a run to pass to
/// [`encode_publish_head_v5`](super::encode_publish_head_v5) next to the forwarded properties
/// (from [`encode_properties_body`]), which must not repeat these.
///
/// Like [`encode_properties`], it writes what it is given: identifiers must be in
/// 1..=268,435,455 (larger ones are written as 268,435,455) and the alias in 1..=the client's
/// Topic Alias Maximum.
pub fn encode_delivery_props(
    subscription_identifiers: &[u32],
    message_expiry_interval: Option<u32>,
    topic_alias: Option<u16>,
    out: &mut BytesMut,
) {
    out.reserve(delivery_props_len(
        subscription_identifiers,
        message_expiry_interval.is_some(),
        topic_alias.is_some(),
    ));
    for &v in subscription_identifiers {
        out.put_u8(SUBSCRIPTION_IDENTIFIER);
        put_vbi(out, sub_id(v));
    }
    if let Some(v) = message_expiry_interval {
        out.put_u8(MESSAGE_EXPIRY_INTERVAL);
        out.put_u32(v);
    }
    put_opt_u16(out, TOPIC_ALIAS, topic_alias);
}

/// A subscription identifier as it will be written: clamped so its encoding stays four bytes.
fn sub_id(v: u32) -> usize {
    // u32 -> usize is lossless on the (>= 32-bit) targets we support.
    v.min(MAX_VBI) as usize
}

/// Bytes of the variable byte integer encoding of `v`. A value beyond the four-byte maximum (a
/// property block over 256 MB, which no packet can hold) still gets a terminating encoding; the
/// packet encoder's size checks reject such a packet.
pub fn vbi_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// Writes `v` as a variable byte integer (MQTT-1.5.5), least significant seven bits first:
/// exactly [`vbi_len`] bytes. Values above 268,435,455 do not fit four bytes and come out longer,
/// which every decoder refuses: the caller must not write them.
pub fn put_vbi(out: &mut BytesMut, mut v: usize) {
    loop {
        // Truncation to the low 7 bits is the encoding itself.
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v != 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            return;
        }
    }
}

/// The bytes of `s` that fit a two-byte length, cut at a character boundary.
fn wire_str(s: &Utf8Bytes) -> &[u8] {
    let s = s.as_str();
    if s.len() <= MAX_FIELD {
        return s.as_bytes();
    }
    // A UTF-8 character is at most 4 bytes, so a boundary exists within the last 4 positions.
    let end = (MAX_FIELD - 3..=MAX_FIELD).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
    s.as_bytes().get(..end).unwrap_or_default()
}

/// The bytes of `b` that fit a two-byte length.
fn wire_bin(b: &Bytes) -> &[u8] {
    b.get(..b.len().min(MAX_FIELD)).unwrap_or_default()
}

fn string_len(s: &Utf8Bytes) -> usize {
    2 + wire_str(s).len()
}

fn binary_len(b: &Bytes) -> usize {
    2 + wire_bin(b).len()
}

fn put_field(out: &mut BytesMut, data: &[u8]) {
    // wire_str / wire_bin cap data at 65,535 bytes, so the length fits a u16.
    out.put_u16(u16::try_from(data.len()).unwrap_or(u16::MAX));
    out.put_slice(data);
}

fn put_string(out: &mut BytesMut, s: &Utf8Bytes) {
    put_field(out, wire_str(s));
}

fn put_binary(out: &mut BytesMut, b: &Bytes) {
    put_field(out, wire_bin(b));
}

fn put_opt_string(out: &mut BytesMut, id: u8, s: &Option<Utf8Bytes>) {
    if let Some(s) = s {
        out.put_u8(id);
        put_string(out, s);
    }
}

fn put_opt_u8(out: &mut BytesMut, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u8(v);
    }
}

fn put_opt_u16(out: &mut BytesMut, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        out.put_u8(id);
        out.put_u16(v);
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use proptest::prelude::*;
    use PacketKind::*;

    const ALL_KINDS: [PacketKind; 14] = [
        Connect,
        ConnAck,
        Publish,
        PubAck,
        PubRec,
        PubRel,
        PubComp,
        Subscribe,
        SubAck,
        Unsubscribe,
        UnsubAck,
        Disconnect,
        Auth,
        Will,
    ];

    /// The properties each packet allows, transcribed independently of `allowed` from the
    /// per-packet property sections (3.1.2.11, 3.1.3.2, 3.2.2.3, 3.3.2.3, 3.4.2.2, …, 3.15.2.2).
    fn spec_ids(kind: PacketKind) -> &'static [u8] {
        match kind {
            Connect => &[0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16],
            Will => &[0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26],
            ConnAck => &[
                0x11, 0x21, 0x24, 0x25, 0x27, 0x12, 0x22, 0x1F, 0x26, 0x28, 0x29, 0x2A, 0x13, 0x1A, 0x1C,
                0x15, 0x16,
            ],
            Publish => &[0x01, 0x02, 0x23, 0x08, 0x09, 0x26, 0x0B, 0x03],
            PubAck | PubRec | PubRel | PubComp | SubAck | UnsubAck => &[0x1F, 0x26],
            Subscribe => &[0x0B, 0x26],
            Unsubscribe => &[0x26],
            Disconnect => &[0x11, 0x1F, 0x26, 0x1C],
            Auth => &[0x15, 0x16, 0x1F, 0x26],
        }
    }

    /// One valid encoding of property `id` (identifier included).
    fn sample(id: u8) -> Vec<u8> {
        let mut v = vec![id];
        match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => v.push(1),
            0x02 | 0x11 | 0x18 | 0x27 => v.extend_from_slice(&[0, 0, 1, 0]),
            0x13 | 0x21 | 0x22 | 0x23 => v.extend_from_slice(&[0, 7]),
            0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | 0x1F => v.extend_from_slice(b"\0\x02ab"),
            0x09 | 0x16 => v.extend_from_slice(&[0, 3, 0xff, 0, 1]),
            0x0B => v.extend_from_slice(&[0x80, 0x01]),
            0x26 => v.extend_from_slice(b"\0\x01k\0\x01v"),
            _ => panic!("no sample for {id:#x}"),
        }
        v
    }

    /// A block with the length prefix prepended.
    fn block(body: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        put_vbi(&mut out, body.len());
        out.extend_from_slice(body);
        out.freeze()
    }

    fn dec(body: &[u8], kind: PacketKind) -> Result<Properties, PropError> {
        let mut b = block(body);
        let r = decode_properties(&mut b, kind);
        if r.is_ok() {
            assert!(b.is_empty(), "decode left {} bytes", b.len());
        }
        r
    }

    fn s(v: &str) -> Utf8Bytes {
        Utf8Bytes::copy_from_str(v)
    }

    fn known_ids() -> Vec<u8> {
        (0u8..=0xff).filter(|&id| is_known(id)).collect()
    }

    /// Every allowed property of `kind`, each set to a value that differs from the samples.
    fn full(kind: PacketKind) -> Properties {
        let mut p = Properties::default();
        for &id in spec_ids(kind) {
            match id {
                0x01 => p.payload_format_indicator = Some(1),
                0x02 => p.message_expiry_interval = Some(u32::MAX),
                0x03 => p.content_type = Some(s("text/plain; ü")),
                0x08 => p.response_topic = Some(s("reply/here")),
                0x09 => p.correlation_data = Some(Bytes::from_static(&[0, 1, 2, 0xff])),
                0x0B => {
                    p.subscription_identifiers.push(MAX_VBI);
                    if kind == Publish {
                        p.subscription_identifiers.extend([1, 128, 16_384, 2_097_152]);
                    }
                }
                0x11 => p.session_expiry_interval = Some(3600),
                0x12 => p.assigned_client_identifier = Some(s("auto-1234")),
                0x13 => p.server_keep_alive = Some(60),
                0x15 => p.authentication_method = Some(s("SCRAM-SHA-1")),
                0x16 => p.authentication_data = Some(Bytes::from_static(b"\x00secret")),
                0x17 => p.request_problem_information = Some(0),
                0x18 => p.will_delay_interval = Some(30),
                0x19 => p.request_response_information = Some(1),
                0x1A => p.response_information = Some(s("resp/")),
                0x1C => p.server_reference = Some(s("other.example:1883")),
                0x1F => p.reason_string = Some(s("because")),
                0x21 => p.receive_maximum = Some(u16::MAX),
                0x22 => p.topic_alias_maximum = Some(0),
                0x23 => p.topic_alias = Some(1),
                0x24 => p.maximum_qos = Some(0),
                0x25 => p.retain_available = Some(1),
                0x26 => p.user_properties = vec![(s("a"), s("1")), (s("b"), s("")), (s("a"), s("2"))],
                0x27 => p.maximum_packet_size = Some(1),
                0x28 => p.wildcard_subscription_available = Some(0),
                0x29 => p.subscription_identifier_available = Some(1),
                0x2A => p.shared_subscription_available = Some(0),
                _ => panic!("unexpected id {id:#x}"),
            }
        }
        p
    }

    fn encode(p: &Properties) -> Bytes {
        let mut out = BytesMut::new();
        encode_properties(p, &mut out);
        assert_eq!(out.len(), properties_len(p), "properties_len disagrees with encode");
        out.freeze()
    }

    #[test]
    fn table_matches_per_packet_sections() {
        for kind in ALL_KINDS {
            for id in 0u8..=0xff {
                let expected = spec_ids(kind).contains(&id);
                assert_eq!(allowed(id, kind), expected, "id {id:#x} in {kind:?}");
            }
        }
        assert_eq!(known_ids().len(), 27);
    }

    #[test]
    fn round_trip_every_kind_with_every_allowed_property() {
        for kind in ALL_KINDS {
            let p = full(kind);
            let mut wire = encode(&p);
            let extra = Bytes::from_static(b"\xde\xad");
            let mut with_tail = BytesMut::from(&wire[..]);
            with_tail.extend_from_slice(&extra);
            let mut with_tail = with_tail.freeze();
            let got = decode_properties(&mut with_tail, kind).unwrap();
            assert_eq!(got, p, "{kind:?}");
            // Advanced exactly past the block, leaving what follows.
            assert_eq!(with_tail, extra, "{kind:?}");
            assert_eq!(decode_properties(&mut wire, kind).unwrap(), p);
            assert!(wire.is_empty());
        }
    }

    #[test]
    fn empty_block() {
        let p = Properties::default();
        assert!(p.is_empty());
        assert_eq!(&encode(&p)[..], &[0]);
        assert_eq!(properties_len(&p), 1);
        for kind in ALL_KINDS {
            assert_eq!(dec(&[], kind).unwrap(), p);
        }
    }

    #[test]
    fn spec_encoding_is_exact() {
        let p = Properties {
            topic_alias: Some(0x0102),
            subscription_identifiers: SmallVec::from_slice(&[200]),
            user_properties: vec![(s("k"), s("v"))],
            ..Properties::default()
        };
        // Written in identifier order; the body is 3 + 3 + 7 = 13 bytes.
        let wire = encode(&p);
        assert_eq!(&wire[..], &[13, 0x0B, 0xC8, 0x01, 0x23, 0x01, 0x02, 0x26, 0, 1, b'k', 0, 1, b'v']);
    }

    #[test]
    fn every_disallowed_property_is_a_protocol_error() {
        for kind in ALL_KINDS {
            for id in known_ids() {
                let r = dec(&sample(id), kind);
                if kind == Connect && id == AUTHENTICATION_DATA {
                    // Allowed, but only after an authentication method (tested below).
                    assert!(matches!(r, Err(PropError::Protocol(_))), "{r:?}");
                } else if spec_ids(kind).contains(&id) {
                    assert!(r.is_ok(), "{id:#x} in {kind:?}: {r:?}");
                } else {
                    assert!(matches!(r, Err(PropError::Protocol(_))), "{id:#x} in {kind:?}: {r:?}");
                }
            }
        }
    }

    #[test]
    fn unknown_identifiers_are_malformed() {
        for id in (0u8..=0xff).filter(|&id| !is_known(id)) {
            for kind in ALL_KINDS {
                let r = dec(&[id, 0, 0, 0, 0], kind);
                assert!(matches!(r, Err(PropError::Malformed(_))), "{id:#x}: {r:?}");
            }
        }
    }

    #[test]
    fn duplicates_are_protocol_errors() {
        for kind in ALL_KINDS {
            for &id in spec_ids(kind) {
                let mut body = sample(id);
                body.extend(sample(id));
                let r = dec(&body, kind);
                let repeatable = id == USER_PROPERTY || (id == SUBSCRIPTION_IDENTIFIER && kind == Publish);
                if repeatable {
                    assert!(r.is_ok(), "{id:#x} twice in {kind:?}: {r:?}");
                } else {
                    assert_eq!(
                        r,
                        Err(PropError::Protocol("property included more than once")),
                        "{id:#x} twice in {kind:?}"
                    );
                }
            }
        }
        // Not adjacent either.
        let mut body = sample(0x02);
        body.extend(sample(0x26));
        body.extend(sample(0x02));
        assert!(matches!(dec(&body, Publish), Err(PropError::Protocol(_))));
    }

    #[test]
    fn connect_authentication_data_needs_a_method() {
        let data = sample(AUTHENTICATION_DATA);
        assert_eq!(
            dec(&data, Connect),
            Err(PropError::Protocol("authentication data without authentication method"))
        );
        // Order does not matter; the method alone is fine.
        let mut both = data.clone();
        both.extend(sample(AUTHENTICATION_METHOD));
        assert!(dec(&both, Connect).is_ok());
        assert!(dec(&sample(AUTHENTICATION_METHOD), Connect).is_ok());
        // Only CONNECT has that rule (an AUTH continuing an exchange is checked by the broker).
        assert!(dec(&data, Auth).is_ok());
    }

    #[test]
    fn publish_keeps_several_subscription_identifiers_in_order() {
        let body = [0x0B, 5, 0x0B, 0xff, 0xff, 0xff, 0x7f, 0x0B, 5];
        let p = dec(&body, Publish).unwrap();
        assert_eq!(&p.subscription_identifiers[..], &[5, MAX_VBI, 5]);
        assert!(matches!(dec(&body, Subscribe), Err(PropError::Protocol(_))));
        assert_eq!(&dec(&[0x0B, 9], Subscribe).unwrap().subscription_identifiers[..], &[9]);
    }

    #[test]
    fn repeated_user_properties_are_kept_in_order() {
        let mut body = Vec::new();
        for (k, v) in [("x", "1"), ("y", "2"), ("x", "3"), ("x", "1")] {
            body.push(0x26);
            body.extend([0, k.len() as u8]);
            body.extend(k.as_bytes());
            body.extend([0, v.len() as u8]);
            body.extend(v.as_bytes());
        }
        for kind in ALL_KINDS {
            let p = dec(&body, kind).unwrap();
            let got: Vec<(&str, &str)> =
                p.user_properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(got, [("x", "1"), ("y", "2"), ("x", "3"), ("x", "1")]);
            // And they survive re-encoding in the same order.
            let mut wire = encode(&p);
            assert_eq!(decode_properties(&mut wire, kind).unwrap(), p);
        }
    }

    #[test]
    fn every_truncation_is_malformed_and_leaves_buf_untouched() {
        for kind in ALL_KINDS {
            let wire = encode(&full(kind));
            for cut in 0..wire.len() {
                let mut b = wire.slice(..cut);
                let before = b.clone();
                let r = decode_properties(&mut b, kind);
                assert!(matches!(r, Err(PropError::Malformed(_))), "{kind:?} cut at {cut}: {r:?}");
                assert_eq!(b, before);
            }
        }
    }

    #[test]
    fn property_straddling_the_block_end_is_malformed() {
        // The block says 3 bytes but the u32 needs 5, though the buffer has them.
        let mut b = Bytes::from_static(&[3, 0x02, 0, 0, 0, 1]);
        assert_eq!(decode_properties(&mut b, Publish), Err(TRUNCATED));
        // A string whose length runs past the block.
        let mut b = Bytes::from_static(&[4, 0x1F, 0, 5, b'a', b'b', b'c', b'd', b'e']);
        assert_eq!(decode_properties(&mut b, PubAck), Err(TRUNCATED));
    }

    #[test]
    fn bad_variable_byte_integers() {
        // Length with five bytes.
        let mut b = Bytes::from_static(&[0x80, 0x80, 0x80, 0x80, 0x01]);
        assert!(matches!(decode_properties(&mut b, Publish), Err(PropError::Malformed(_))));
        // Length beyond the buffer: refused without reserving anything.
        let mut b = Bytes::from_static(&[0xff, 0xff, 0xff, 0x7f, 0x26]);
        assert_eq!(decode_properties(&mut b, Publish), Err(TRUNCATED));
        // Subscription identifier with five bytes.
        let r = dec(&[0x0B, 0x80, 0x80, 0x80, 0x80, 0x01], Publish);
        assert!(matches!(r, Err(PropError::Malformed(_))), "{r:?}");
        // Non-minimal but four bytes: accepted, like the fixed header decoder.
        assert_eq!(&dec(&[0x0B, 0x81, 0x80, 0x00], Publish).unwrap().subscription_identifiers[..], &[1]);
        let mut b = Bytes::from_static(&[0x80, 0x00]);
        assert_eq!(decode_properties(&mut b, Publish).unwrap(), Properties::default());
    }

    #[test]
    fn invalid_strings_are_malformed() {
        for bad in [&[0xc3, 0x28][..], &[b'a', 0, b'b'][..], &[0xed, 0xa0, 0x80][..]] {
            let mut body = vec![0x1F, 0, bad.len() as u8];
            body.extend_from_slice(bad);
            assert_eq!(dec(&body, PubAck), Err(PropError::Malformed("invalid UTF-8 string")));
            // Either half of a user property.
            let mut body = vec![0x26, 0, bad.len() as u8];
            body.extend_from_slice(bad);
            body.extend([0, 1, b'v']);
            assert_eq!(dec(&body, Publish), Err(PropError::Malformed("invalid UTF-8 string")));
        }
        // Binary data may hold anything.
        assert!(dec(&[0x09, 0, 2, 0, 0xff], Publish).is_ok());
    }

    #[test]
    fn out_of_range_values() {
        let protocol = |body: &[u8], kind| {
            let r = dec(body, kind);
            assert!(matches!(r, Err(PropError::Protocol(_))), "{body:x?}: {r:?}");
        };
        for (id, kind) in [
            (0x17, Connect),
            (0x19, Connect),
            (0x24, ConnAck),
            (0x25, ConnAck),
            (0x28, ConnAck),
            (0x29, ConnAck),
            (0x2A, ConnAck),
        ] {
            protocol(&[id, 2], kind);
            protocol(&[id, 0xff], kind);
            assert!(dec(&[id, 0], kind).is_ok());
        }
        protocol(&[0x21, 0, 0], Connect);
        protocol(&[0x21, 0, 0], ConnAck);
        // Topic alias 0 decodes: the receiver refuses it as an invalid alias (0x94).
        assert_eq!(dec(&[0x23, 0, 0], Publish).unwrap().topic_alias, Some(0));
        protocol(&[0x27, 0, 0, 0, 0], Connect);
        protocol(&[0x0B, 0], Publish);
        protocol(&[0x0B, 0x80, 0x00], Subscribe);
        protocol(&[0x08, 0, 3, b'a', b'/', b'+'], Publish);
        protocol(&[0x08, 0, 1, b'#'], Will);
        assert_eq!(
            dec(&[0x01, 2], Publish),
            Err(PropError::Malformed("payload format indicator other than 0 or 1"))
        );
        assert_eq!(dec(&[0x01, 0], Will).unwrap().payload_format_indicator, Some(0));
        // Allowed extremes.
        let p = dec(&[0x21, 0, 1, 0x22, 0, 0, 0x27, 0xff, 0xff, 0xff, 0xff], Connect).unwrap();
        assert_eq!(
            (p.receive_maximum, p.topic_alias_maximum, p.maximum_packet_size),
            (Some(1), Some(0), Some(u32::MAX))
        );
    }

    #[test]
    fn error_reason_codes() {
        assert_eq!(PropError::Malformed("x").reason_code(), 0x81);
        assert_eq!(PropError::Protocol("x").reason_code(), 0x82);
        assert_eq!(PropError::Protocol("x").to_string(), "properties protocol error: x");
    }

    #[test]
    fn decoded_values_are_slices_of_the_input() {
        let wire = encode(&full(Publish));
        let range = wire.as_ptr_range();
        let mut b = wire.clone();
        let p = decode_properties(&mut b, Publish).unwrap();
        let ct = p.content_type.unwrap();
        assert!(range.contains(&ct.as_bytes().as_ptr()));
        assert!(range.contains(&p.correlation_data.unwrap().as_ptr()));
    }

    #[test]
    fn multi_byte_length_prefix() {
        // A 200-byte reason string makes the block longer than 127 bytes: two-byte length.
        let text = "r".repeat(200);
        let p = Properties { reason_string: Some(s(&text)), ..Properties::default() };
        let wire = encode(&p);
        assert_eq!(properties_len(&p), 2 + 1 + 2 + 200);
        assert_eq!(&wire[..2], &[(203 & 0x7f) | 0x80, 1]);
        let mut b = wire.clone();
        assert_eq!(decode_properties(&mut b, PubAck).unwrap(), p);
    }

    #[test]
    fn oversized_values_are_cut_to_fit_the_framing() {
        // Values the broker built itself (not from the wire) that exceed the two-byte length:
        // 'é' is two bytes, so 65,536 bytes of them are cut to 65,534 to end on a boundary.
        let long = Utf8Bytes::copy_from_str(&"é".repeat(32_768));
        let p = Properties { reason_string: Some(long), ..Properties::default() };
        let got = decode_properties(&mut encode(&p), PubAck).unwrap();
        assert_eq!(got.reason_string.unwrap().as_str(), "é".repeat(32_767));

        let p = Properties {
            correlation_data: Some(Bytes::from(vec![7u8; 70_000])),
            subscription_identifiers: SmallVec::from_slice(&[u32::MAX]),
            ..Properties::default()
        };
        let got = decode_properties(&mut encode(&p), Publish).unwrap();
        assert_eq!(got.correlation_data.unwrap(), vec![7u8; 65_535]);
        assert_eq!(&got.subscription_identifiers[..], &[MAX_VBI]);
    }

    fn arb_str() -> impl Strategy<Value = Utf8Bytes> {
        "[^\u{0}]{0,12}".prop_map(|v| Utf8Bytes::copy_from_str(&v))
    }

    fn arb_topic() -> impl Strategy<Value = Utf8Bytes> {
        "[^\u{0}+#]{0,12}".prop_map(|v| Utf8Bytes::copy_from_str(&v))
    }

    fn arb_bin() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Bytes::from)
    }

    prop_compose! {
        fn arb_publish_props()(
            pfi in proptest::option::of(0u8..=1),
            mei in proptest::option::of(any::<u32>()),
            ct in proptest::option::of(arb_str()),
            rt in proptest::option::of(arb_topic()),
            cd in proptest::option::of(arb_bin()),
            sids in proptest::collection::vec(1u32..=MAX_VBI, 0..4),
            ta in proptest::option::of(1u16..),
            ups in proptest::collection::vec((arb_str(), arb_str()), 0..4),
        ) -> Properties {
            Properties {
                payload_format_indicator: pfi,
                message_expiry_interval: mei,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                subscription_identifiers: SmallVec::from_vec(sids),
                topic_alias: ta,
                user_properties: ups,
                ..Properties::default()
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64), k in 0usize..14) {
            let kind = ALL_KINDS[k];
            let mut b = Bytes::from(data.clone());
            match decode_properties(&mut b, kind) {
                Ok(p) => {
                    // What was accepted re-encodes to a block that decodes to the same value.
                    let mut again = encode(&p);
                    prop_assert_eq!(decode_properties(&mut again, kind).unwrap(), p);
                    prop_assert!(b.len() < data.len());
                }
                Err(_) => prop_assert_eq!(&b[..], &data[..]),
            }
        }

        #[test]
        fn decode_never_panics_on_valid_prefix(body in proptest::collection::vec(any::<u8>(), 0..64), k in 0usize..14) {
            // Correct length prefix, so the fuzzing reaches the property parser.
            let _ = decode_properties(&mut block(&body), ALL_KINDS[k]);
        }

        #[test]
        fn decode_never_panics_on_mutated_blocks(k in 0usize..14, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            // Corrupting one byte of a full, valid block reaches deep into the parser.
            let kind = ALL_KINDS[k];
            let mut wire = BytesMut::from(&encode(&full(kind))[..]);
            let i = at.index(wire.len());
            wire[i] = byte;
            let mut b = wire.freeze();
            if let Ok(p) = decode_properties(&mut b, kind) {
                prop_assert_eq!(decode_properties(&mut encode(&p), kind).unwrap(), p);
            }
        }

        #[test]
        fn publish_round_trip(p in arb_publish_props()) {
            let mut wire = encode(&p);
            prop_assert_eq!(decode_properties(&mut wire, Publish).unwrap(), p);
            prop_assert!(wire.is_empty());
        }
    }

    fn delivery(sids: &[u32], expiry: Option<u32>, alias: Option<u16>) -> BytesMut {
        let mut out = BytesMut::new();
        encode_delivery_props(sids, expiry, alias, &mut out);
        assert_eq!(out.len(), delivery_props_len(sids, expiry.is_some(), alias.is_some()));
        out
    }

    #[test]
    fn delivery_props_bytes() {
        assert!(delivery(&[], None, None).is_empty());
        assert_eq!(
            &delivery(&[1, 1234], Some(60), Some(7))[..],
            &[0x0B, 1, 0x0B, 0xd2, 0x09, 0x02, 0, 0, 0, 60, 0x23, 0, 7]
        );
        assert_eq!(&delivery(&[], Some(0x0102_0304), None)[..], &[0x02, 1, 2, 3, 4]);
        assert_eq!(&delivery(&[], None, Some(0x0102))[..], &[0x23, 1, 2]);
        // Clamped like encode_properties, so the run stays decodable.
        assert_eq!(&delivery(&[u32::MAX], None, None)[..], &[0x0B, 0xff, 0xff, 0xff, 0x7f]);
    }

    proptest! {
        #[test]
        fn delivery_props_decode_with_the_forwarded_ones(
            sids in proptest::collection::vec(1u32..=MAX_VBI, 0..4),
            expiry in proptest::option::of(any::<u32>()),
            alias in proptest::option::of(1u16..),
            forward in arb_publish_props(),
        ) {
            // The forwarded run as the broker keeps it: without what a delivery sets itself.
            let forward = Properties {
                subscription_identifiers: SmallVec::new(),
                message_expiry_interval: None,
                topic_alias: None,
                ..forward
            };
            let own = delivery(&sids, expiry, alias);
            let mut fwd = BytesMut::new();
            encode_properties_body(&forward, &mut fwd);
            let mut body = own.to_vec();
            body.extend_from_slice(&fwd);
            let want = Properties {
                subscription_identifiers: sids.iter().copied().collect(),
                message_expiry_interval: expiry,
                topic_alias: alias,
                ..forward
            };
            prop_assert_eq!(decode_properties(&mut block(&body), Publish).unwrap(), want);
        }
    }
}
