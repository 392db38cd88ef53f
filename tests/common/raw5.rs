//! A raw MQTT 5.0 client writing hand-made bytes, independent of coremq's own codec: used where a
//! test must control or observe exact v5 packets (properties, reason codes, topic aliases, flow
//! control, broker-initiated DISCONNECTs).
//!
//! Properties are kept as an ordered list of (identifier, value) so that tests can check order
//! and repetition (user properties, subscription identifiers) exactly as they were on the wire.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::common::{SILENCE, WAIT};

/// Property identifiers (MQTT 5.0 table 2-4).
pub mod prop {
    /// Payload Format Indicator (byte).
    pub const PAYLOAD_FORMAT: u8 = 0x01;
    /// Message Expiry Interval (four-byte integer).
    pub const MESSAGE_EXPIRY: u8 = 0x02;
    /// Content Type (string).
    pub const CONTENT_TYPE: u8 = 0x03;
    /// Response Topic (string).
    pub const RESPONSE_TOPIC: u8 = 0x08;
    /// Correlation Data (binary).
    pub const CORRELATION_DATA: u8 = 0x09;
    /// Subscription Identifier (variable byte integer).
    pub const SUBSCRIPTION_ID: u8 = 0x0B;
    /// Session Expiry Interval (four-byte integer).
    pub const SESSION_EXPIRY: u8 = 0x11;
    /// Assigned Client Identifier (string).
    pub const ASSIGNED_CLIENT_ID: u8 = 0x12;
    /// Server Keep Alive (two-byte integer).
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    /// Authentication Method (string).
    pub const AUTH_METHOD: u8 = 0x15;
    /// Authentication Data (binary).
    pub const AUTH_DATA: u8 = 0x16;
    /// Request Problem Information (byte).
    pub const REQUEST_PROBLEM_INFO: u8 = 0x17;
    /// Will Delay Interval (four-byte integer).
    pub const WILL_DELAY: u8 = 0x18;
    /// Request Response Information (byte).
    pub const REQUEST_RESPONSE_INFO: u8 = 0x19;
    /// Response Information (string).
    pub const RESPONSE_INFO: u8 = 0x1A;
    /// Server Reference (string).
    pub const SERVER_REFERENCE: u8 = 0x1C;
    /// Reason String (string).
    pub const REASON_STRING: u8 = 0x1F;
    /// Receive Maximum (two-byte integer).
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    /// Topic Alias Maximum (two-byte integer).
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic Alias (two-byte integer).
    pub const TOPIC_ALIAS: u8 = 0x23;
    /// Maximum QoS (byte).
    pub const MAXIMUM_QOS: u8 = 0x24;
    /// Retain Available (byte).
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    /// User Property (string pair).
    pub const USER_PROPERTY: u8 = 0x26;
    /// Maximum Packet Size (four-byte integer).
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    /// Wildcard Subscription Available (byte).
    pub const WILDCARD_SUB_AVAILABLE: u8 = 0x28;
    /// Subscription Identifier Available (byte).
    pub const SUB_ID_AVAILABLE: u8 = 0x29;
    /// Shared Subscription Available (byte).
    pub const SHARED_SUB_AVAILABLE: u8 = 0x2A;
}

/// One property value; the variant follows the identifier's data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// Byte.
    Byte(u8),
    /// Two-byte integer.
    U16(u16),
    /// Four-byte integer.
    U32(u32),
    /// Variable byte integer.
    VarInt(u32),
    /// UTF-8 string.
    Str(String),
    /// Binary data.
    Bin(Vec<u8>),
    /// UTF-8 string pair (user property).
    Pair(String, String),
}

/// The data type of a property identifier, or `None` for an unknown identifier.
fn kind(id: u8) -> Option<u8> {
    use prop::*;
    // 0 byte, 1 u16, 2 u32, 3 varint, 4 string, 5 binary, 6 pair.
    Some(match id {
        PAYLOAD_FORMAT
        | REQUEST_PROBLEM_INFO
        | REQUEST_RESPONSE_INFO
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUB_AVAILABLE
        | SUB_ID_AVAILABLE
        | SHARED_SUB_AVAILABLE => 0,
        SERVER_KEEP_ALIVE | RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | TOPIC_ALIAS => 1,
        MESSAGE_EXPIRY | SESSION_EXPIRY | WILL_DELAY | MAXIMUM_PACKET_SIZE => 2,
        SUBSCRIPTION_ID => 3,
        CONTENT_TYPE | RESPONSE_TOPIC | ASSIGNED_CLIENT_ID | AUTH_METHOD | RESPONSE_INFO
        | SERVER_REFERENCE | REASON_STRING => 4,
        CORRELATION_DATA | AUTH_DATA => 5,
        USER_PROPERTY => 6,
        _ => return None,
    })
}

/// An ordered property list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props(pub Vec<(u8, Val)>);

impl Props {
    /// An empty list.
    pub fn new() -> Props {
        Props(Vec::new())
    }

    /// Appends a property (builder style).
    pub fn with(mut self, id: u8, v: Val) -> Props {
        self.0.push((id, v));
        self
    }

    /// Appends a user property (builder style).
    pub fn user(self, k: &str, v: &str) -> Props {
        self.with(prop::USER_PROPERTY, Val::Pair(k.into(), v.into()))
    }

    /// The first value with identifier `id`.
    pub fn get(&self, id: u8) -> Option<&Val> {
        self.0.iter().find(|(i, _)| *i == id).map(|(_, v)| v)
    }

    /// Every value with identifier `id`, in wire order.
    pub fn all(&self, id: u8) -> Vec<&Val> {
        self.0.iter().filter(|(i, _)| *i == id).map(|(_, v)| v).collect()
    }

    /// True when a property with identifier `id` is present.
    pub fn has(&self, id: u8) -> bool {
        self.get(id).is_some()
    }

    /// A byte, two-byte, four-byte or variable integer property widened to u32.
    pub fn int(&self, id: u8) -> Option<u32> {
        match self.get(id)? {
            Val::Byte(b) => Some(u32::from(*b)),
            Val::U16(n) => Some(u32::from(*n)),
            Val::U32(n) | Val::VarInt(n) => Some(*n),
            other => panic!("property {id:#04x} is not an integer: {other:?}"),
        }
    }

    /// A string property.
    pub fn str(&self, id: u8) -> Option<&str> {
        match self.get(id)? {
            Val::Str(s) => Some(s),
            other => panic!("property {id:#04x} is not a string: {other:?}"),
        }
    }

    /// A binary property.
    pub fn bin(&self, id: u8) -> Option<&[u8]> {
        match self.get(id)? {
            Val::Bin(b) => Some(b),
            other => panic!("property {id:#04x} is not binary: {other:?}"),
        }
    }

    /// Every user property, in wire order.
    pub fn users(&self) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter_map(|(_, v)| match v {
                Val::Pair(k, v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every subscription identifier, in wire order.
    pub fn sub_ids(&self) -> Vec<u32> {
        self.all(prop::SUBSCRIPTION_ID)
            .into_iter()
            .map(|v| match v {
                Val::VarInt(n) => *n,
                other => panic!("subscription identifier {other:?}"),
            })
            .collect()
    }

    /// Encodes the list with its variable-byte-integer length prefix.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut b = Vec::new();
        for (id, v) in &self.0 {
            b.push(*id);
            match v {
                Val::Byte(x) => b.push(*x),
                Val::U16(x) => b.extend_from_slice(&x.to_be_bytes()),
                Val::U32(x) => b.extend_from_slice(&x.to_be_bytes()),
                Val::VarInt(x) => varint(*x as usize, &mut b),
                Val::Str(s) => string(s.as_bytes(), &mut b),
                Val::Bin(d) => string(d, &mut b),
                Val::Pair(k, v) => {
                    string(k.as_bytes(), &mut b);
                    string(v.as_bytes(), &mut b);
                }
            }
        }
        varint(b.len(), out);
        out.extend_from_slice(&b);
    }

    /// Decodes a length-prefixed property list at the start of `b`; returns it and the bytes used.
    pub fn decode(b: &[u8]) -> (Props, usize) {
        let (len, hdr) = decode_varint(b).expect("property length");
        let end = hdr + len;
        assert!(b.len() >= end, "property length {len} beyond packet ({} bytes)", b.len());
        let mut r = Reader { b: &b[hdr..end], at: 0 };
        let mut props = Vec::new();
        while r.at < r.b.len() {
            let id = r.byte();
            let v = match kind(id).unwrap_or_else(|| panic!("unknown property id {id:#04x} from broker")) {
                0 => Val::Byte(r.byte()),
                1 => Val::U16(r.u16()),
                2 => Val::U32(r.u32()),
                3 => Val::VarInt(r.varint()),
                4 => Val::Str(r.string()),
                5 => Val::Bin(r.binary()),
                _ => {
                    let k = r.string();
                    Val::Pair(k, r.string())
                }
            };
            props.push((id, v));
        }
        (Props(props), end)
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        assert!(self.at + n <= self.b.len(), "truncated field in {:?}", self.b);
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn byte(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn u16(&mut self) -> u16 {
        let s = self.take(2);
        u16::from_be_bytes([s[0], s[1]])
    }
    fn u32(&mut self) -> u32 {
        let s = self.take(4);
        u32::from_be_bytes([s[0], s[1], s[2], s[3]])
    }
    fn varint(&mut self) -> u32 {
        let (v, n) = decode_varint(&self.b[self.at..]).expect("variable byte integer");
        self.at += n;
        v as u32
    }
    fn binary(&mut self) -> Vec<u8> {
        let n = self.u16() as usize;
        self.take(n).to_vec()
    }
    fn string(&mut self) -> String {
        String::from_utf8(self.binary()).expect("UTF-8 string from broker")
    }
}

/// A decoded packet received from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt5 {
    /// CONNACK.
    ConnAck(ConnAck5),
    /// PUBLISH.
    Publish(Msg5),
    /// PUBACK.
    PubAck(Ack5),
    /// PUBREC.
    PubRec(Ack5),
    /// PUBREL.
    PubRel(Ack5),
    /// PUBCOMP.
    PubComp(Ack5),
    /// SUBACK with packet id, reason codes and properties.
    SubAck(u16, Vec<u8>, Props),
    /// UNSUBACK with packet id, reason codes and properties.
    UnsubAck(u16, Vec<u8>, Props),
    /// PINGRESP.
    PingResp,
    /// DISCONNECT with reason code and properties.
    Disconnect(u8, Props),
    /// AUTH with reason code and properties.
    Auth(u8, Props),
    /// Anything else: first header byte and body.
    Other(u8, Vec<u8>),
}

/// A CONNACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck5 {
    /// Session Present flag.
    pub session_present: bool,
    /// Reason code.
    pub code: u8,
    /// Properties.
    pub props: Props,
}

/// PUBACK / PUBREC / PUBREL / PUBCOMP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack5 {
    /// Packet identifier.
    pub pkid: u16,
    /// Reason code (0 when the broker omitted it, MQTT-3.4.2.1).
    pub code: u8,
    /// Properties.
    pub props: Props,
}

/// A received PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg5 {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name (empty when a topic alias stands for it).
    pub topic: String,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Properties in wire order.
    pub props: Props,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Outcome of a bounded read.
#[derive(Debug)]
pub enum Recv5 {
    /// A complete packet.
    Packet(Pkt5),
    /// The broker closed the connection (EOF or reset).
    Closed,
    /// Nothing within the window.
    Timeout,
}

fn decode_varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    assert!(b.len() < 4, "malformed variable byte integer from broker");
    None
}

fn ack(body: &[u8]) -> Ack5 {
    assert!(body.len() >= 2, "short ack body {body:?}");
    let pkid = u16::from_be_bytes([body[0], body[1]]);
    // MQTT-3.4.2.1: reason code and property length may be omitted.
    let code = body.get(2).copied().unwrap_or(0);
    let props = if body.len() > 3 { Props::decode(&body[3..]).0 } else { Props::new() };
    Ack5 { pkid, code, props }
}

fn decode(first: u8, body: Vec<u8>) -> Pkt5 {
    match first >> 4 {
        2 => {
            assert!(body.len() >= 2, "CONNACK too short: {body:?}");
            let props = if body.len() > 2 { Props::decode(&body[2..]).0 } else { Props::new() };
            Pkt5::ConnAck(ConnAck5 { session_present: body[0] & 1 == 1, code: body[1], props })
        }
        3 => {
            let qos = (first >> 1) & 3;
            let mut r = Reader { b: &body, at: 0 };
            let topic = r.string();
            let pkid = if qos > 0 { r.u16() } else { 0 };
            let (props, used) = Props::decode(&body[r.at..]);
            Pkt5::Publish(Msg5 {
                dup: first & 8 != 0,
                qos,
                retain: first & 1 != 0,
                topic,
                pkid,
                props,
                payload: body[r.at + used..].to_vec(),
            })
        }
        4 => Pkt5::PubAck(ack(&body)),
        5 => Pkt5::PubRec(ack(&body)),
        6 => {
            assert_eq!(first & 0x0f, 2, "PUBREL fixed-header flags");
            Pkt5::PubRel(ack(&body))
        }
        7 => Pkt5::PubComp(ack(&body)),
        9 | 11 => {
            assert!(body.len() >= 2, "short SUBACK/UNSUBACK {body:?}");
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            let (props, used) = Props::decode(&body[2..]);
            let codes = body[2 + used..].to_vec();
            if first >> 4 == 9 {
                Pkt5::SubAck(pkid, codes, props)
            } else {
                Pkt5::UnsubAck(pkid, codes, props)
            }
        }
        13 => Pkt5::PingResp,
        14 | 15 => {
            // MQTT-3.14.2.1: a DISCONNECT with remaining length 0 means reason 0x00.
            let code = body.first().copied().unwrap_or(0);
            let props = if body.len() > 1 { Props::decode(&body[1..]).0 } else { Props::new() };
            if first >> 4 == 14 {
                Pkt5::Disconnect(code, props)
            } else {
                Pkt5::Auth(code, props)
            }
        }
        _ => Pkt5::Other(first, body),
    }
}

// ---------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------

fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    varint(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A will message for [`Connect5`].
#[derive(Debug, Clone)]
pub struct Will5 {
    /// Will topic.
    pub topic: String,
    /// Will payload.
    pub payload: Vec<u8>,
    /// Will QoS.
    pub qos: u8,
    /// Will retain flag.
    pub retain: bool,
    /// Will properties (delay interval, content type, user properties, ...).
    pub props: Props,
}

/// A v5 CONNECT under construction.
#[derive(Debug, Clone)]
pub struct Connect5 {
    /// Client identifier (may be empty).
    pub client_id: String,
    /// Clean Start flag.
    pub clean_start: bool,
    /// Keep alive seconds.
    pub keep_alive: u16,
    /// CONNECT properties.
    pub props: Props,
    /// Will message.
    pub will: Option<Will5>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Vec<u8>>,
}

impl Connect5 {
    /// A clean-start v5 CONNECT with keep alive 60 and no properties.
    pub fn new(id: &str) -> Connect5 {
        Connect5 {
            client_id: id.into(),
            clean_start: true,
            keep_alive: 60,
            props: Props::new(),
            will: None,
            username: None,
            password: None,
        }
    }

    /// Sets Clean Start (builder style).
    pub fn clean(mut self, clean: bool) -> Connect5 {
        self.clean_start = clean;
        self
    }

    /// Appends a CONNECT property (builder style).
    pub fn prop(mut self, id: u8, v: Val) -> Connect5 {
        self.props.0.push((id, v));
        self
    }

    /// Sets the Session Expiry Interval property (builder style).
    pub fn expiry(self, secs: u32) -> Connect5 {
        self.prop(prop::SESSION_EXPIRY, Val::U32(secs))
    }

    /// Encodes the packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        string(b"MQTT", &mut b);
        b.push(5);
        let mut flags = 0u8;
        if self.clean_start {
            flags |= 0x02;
        }
        if let Some(w) = &self.will {
            flags |= 0x04 | (w.qos << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        self.props.encode(&mut b);
        string(self.client_id.as_bytes(), &mut b);
        if let Some(w) = &self.will {
            w.props.encode(&mut b);
            string(w.topic.as_bytes(), &mut b);
            string(&w.payload, &mut b);
        }
        if let Some(u) = &self.username {
            string(u.as_bytes(), &mut b);
        }
        if let Some(p) = &self.password {
            string(p, &mut b);
        }
        packet(0x10, &b)
    }
}

/// v5 PUBLISH.
pub fn publish(topic: &str, qos: u8, retain: bool, pkid: u16, props: &Props, payload: &[u8]) -> Vec<u8> {
    let mut first = 0x30 | (qos << 1);
    if retain {
        first |= 1;
    }
    let mut b = Vec::new();
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    props.encode(&mut b);
    b.extend_from_slice(payload);
    packet(first, &b)
}

fn ack_packet(first: u8, pkid: u16, code: u8) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if code != 0 {
        b.push(code);
    }
    packet(first, &b)
}

/// PUBACK with a reason code (omitted when 0x00, as MQTT-3.4.2.1 allows).
pub fn puback(pkid: u16, code: u8) -> Vec<u8> {
    ack_packet(0x40, pkid, code)
}

/// PUBREC with a reason code.
pub fn pubrec(pkid: u16, code: u8) -> Vec<u8> {
    ack_packet(0x50, pkid, code)
}

/// PUBREL (fixed-header flags 0b0010).
pub fn pubrel(pkid: u16) -> Vec<u8> {
    ack_packet(0x62, pkid, 0)
}

/// PUBCOMP.
pub fn pubcomp(pkid: u16) -> Vec<u8> {
    ack_packet(0x70, pkid, 0)
}

/// Subscription Options byte: QoS, No Local, Retain As Published, Retain Handling (MQTT 3.8.3.1).
pub fn sub_opts(qos: u8, no_local: bool, rap: bool, retain_handling: u8) -> u8 {
    qos | (u8::from(no_local) << 2) | (u8::from(rap) << 3) | (retain_handling << 4)
}

/// v5 SUBSCRIBE with (filter, options byte) pairs.
pub fn subscribe(pkid: u16, props: &Props, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    props.encode(&mut b);
    for (f, o) in filters {
        string(f.as_bytes(), &mut b);
        b.push(*o);
    }
    packet(0x82, &b)
}

/// v5 UNSUBSCRIBE.
pub fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    Props::new().encode(&mut b);
    for f in filters {
        string(f.as_bytes(), &mut b);
    }
    packet(0xa2, &b)
}

/// PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0x00]
}

/// v5 DISCONNECT with a reason code and properties.
pub fn disconnect(code: u8, props: &Props) -> Vec<u8> {
    let mut b = vec![code];
    props.encode(&mut b);
    packet(0xe0, &b)
}

/// AUTH with a reason code and properties.
pub fn auth(code: u8, props: &Props) -> Vec<u8> {
    let mut b = vec![code];
    props.encode(&mut b);
    packet(0xf0, &b)
}

// ---------------------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------------------

/// A raw TCP connection speaking hand-encoded MQTT 5.0.
pub struct Raw5 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw5 {
    /// Opens a TCP connection to the broker without sending anything.
    pub async fn tcp(port: u16) -> Raw5 {
        let stream = timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw5 { stream, buf: Vec::new() }
    }

    /// Sends `c` and returns whatever CONNACK comes back (any reason code).
    pub async fn connect_any(port: u16, c: &Connect5) -> (Raw5, ConnAck5) {
        let mut r = Raw5::tcp(port).await;
        r.send(&c.encode()).await;
        match r.recv().await {
            Pkt5::ConnAck(a) => (r, a),
            other => panic!("{}: expected CONNACK, got {other:?}", c.client_id),
        }
    }

    /// Sends `c` and asserts CONNACK reason 0x00.
    pub async fn connect(port: u16, c: &Connect5) -> (Raw5, ConnAck5) {
        let (r, a) = Raw5::connect_any(port, c).await;
        assert_eq!(a.code, 0, "{}: CONNACK {a:?}", c.client_id);
        (r, a)
    }

    /// Connects a clean-start client with no properties (session ends at disconnect).
    pub async fn connect_simple(port: u16, id: &str) -> Raw5 {
        Raw5::connect(port, &Connect5::new(id)).await.0
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.stream.write_all(bytes)).await.expect("write timed out").expect("write");
    }

    /// Writes raw bytes, tolerating a connection the broker already closed.
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = timeout(WAIT, self.stream.write_all(bytes)).await;
    }

    /// Reads the next packet within `within`.
    pub async fn try_recv(&mut self, within: Duration) -> Recv5 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.parse() {
                return Recv5::Packet(p);
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Recv5::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv5::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads the next packet; panics on close or after `WAIT`.
    pub async fn recv(&mut self) -> Pkt5 {
        match self.try_recv(WAIT).await {
            Recv5::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Reads the next packet and asserts it is a PUBLISH.
    pub async fn recv_publish(&mut self) -> Msg5 {
        match self.recv().await {
            Pkt5::Publish(m) => m,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Reads the next packet and asserts it is a PUBACK; returns it.
    pub async fn recv_puback(&mut self) -> Ack5 {
        match self.recv().await {
            Pkt5::PubAck(a) => a,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives (and the connection stays open) for `SILENCE`.
    pub async fn expect_silence(&mut self) {
        self.expect_silence_for(SILENCE).await;
    }

    /// Asserts that nothing arrives (and the connection stays open) for `window`.
    pub async fn expect_silence_for(&mut self, window: Duration) {
        match self.try_recv(window).await {
            Recv5::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection; returns the packets received before.
    pub async fn expect_closed(&mut self, within: Duration) -> Vec<Pkt5> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Recv5::Packet(p) => seen.push(p),
                Recv5::Closed => return seen,
                Recv5::Timeout => panic!("connection not closed within {within:?}; got {seen:?}"),
            }
        }
    }

    /// Waits for the broker to close the connection and returns the reason code of the DISCONNECT
    /// it sent just before (panics if it sent none). Packets before the DISCONNECT are ignored.
    pub async fn expect_disconnect(&mut self, within: Duration) -> (u8, Props) {
        let seen = self.expect_closed(within).await;
        match seen.iter().rev().find_map(|p| match p {
            Pkt5::Disconnect(c, props) => Some((*c, props.clone())),
            _ => None,
        }) {
            Some(d) => d,
            None => panic!("connection closed without a DISCONNECT; got {seen:?}"),
        }
    }

    /// Closes the socket normally (FIN) without sending DISCONNECT.
    pub fn close(self) {
        drop(self.stream);
    }

    /// Sends DISCONNECT 0x00 and waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.send(&disconnect(0, &Props::new())).await;
        self.expect_closed(WAIT).await;
    }

    /// Subscribes in one SUBSCRIBE and returns the SUBACK reason codes.
    pub async fn subscribe(&mut self, pkid: u16, props: &Props, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe(pkid, props, filters)).await;
        match self.recv().await {
            Pkt5::SubAck(id, codes, _) => {
                assert_eq!(id, pkid, "SUBACK packet id");
                codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Unsubscribes and returns the UNSUBACK reason codes.
    pub async fn unsubscribe(&mut self, pkid: u16, filters: &[&str]) -> Vec<u8> {
        self.send(&unsubscribe(pkid, filters)).await;
        match self.recv().await {
            Pkt5::UnsubAck(id, codes, _) => {
                assert_eq!(id, pkid, "UNSUBACK packet id");
                codes
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK.
    pub async fn publish1(&mut self, topic: &str, pkid: u16, props: &Props, payload: &[u8]) -> Ack5 {
        self.send(&publish(topic, 1, false, pkid, props, payload)).await;
        let a = self.recv_puback().await;
        assert_eq!(a.pkid, pkid, "PUBACK packet id");
        a
    }

    fn parse(&mut self) -> Option<Pkt5> {
        let (len, hdr) = decode_varint(self.buf.get(1..)?)?;
        let total = 1 + hdr + len;
        if self.buf.len() < total {
            return None;
        }
        let first = self.buf[0];
        let body: Vec<u8> = self.buf[1 + hdr..total].to_vec();
        self.buf.drain(..total);
        Some(decode(first, body))
    }
}
