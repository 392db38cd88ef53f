//! Admission of a new connection: reading its CONNECT from the bytes buffered so far and deciding
//! whether the broker takes it, and with which CONNACK it refuses it otherwise.
//!
//! Plain functions, no I/O and no clock (the time is passed in), so that the connection task
//! (`server::conn::serve_new`) and the `connection` fuzz target make the same decisions in the same
//! order: [`read_connect`] on every read until it gives a CONNECT or a refusal, then [`admit`].

use std::time::Instant;

use bytes::BytesMut;

use crate::core::{check_connect, Core};
use crate::protocol::properties::Properties;
use crate::protocol::{self, reason, ConnAck, Connect, DecodeError, Packet, ProtocolVersion, Utf8Bytes};

/// The largest CONNECT 3.1.1 allows (fixed header, variable header, five 16-bit-length fields), plus
/// room for v5 CONNECT and will properties: a connection that has not sent CONNECT yet cannot make the
/// broker buffer more than this.
pub const MAX_CONNECT_SIZE: usize = 5 + 12 + 5 * (2 + 65_535) + 2 * 65_536;

/// The largest first packet a connection may send under the core's `max_packet_size`.
pub fn connect_limit(max_packet_size: usize) -> usize {
    max_packet_size.min(MAX_CONNECT_SIZE)
}

/// How a connection that never got a session is turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Close without CONNACK, counted under this reason.
    Close(&'static str),
    /// CONNACK with this v5 reason code, in the layout of that version (downgraded before v5), counted
    /// under the string (also the v5 reason string).
    Connack(ProtocolVersion, u8, &'static str),
}

impl Refusal {
    /// What the refusal is counted under (`Stats::count_refused`).
    pub fn reason(&self) -> &'static str {
        match *self {
            Refusal::Close(why) | Refusal::Connack(_, _, why) => why,
        }
    }

    /// The CONNACK to send before closing, and the protocol layout to encode it in; `None`: just close.
    pub fn connack(&self) -> Option<(ProtocolVersion, Packet)> {
        let Refusal::Connack(version, code, why) = *self else { return None };
        let properties = (version == ProtocolVersion::V5).then(|| {
            Box::new(Properties { reason_string: Some(Utf8Bytes::from_static(why)), ..Properties::default() })
        });
        Some((version, Packet::ConnAck(ConnAck { session_present: false, code, properties })))
    }
}

/// What the bytes a new connection sent so far amount to.
#[derive(Debug)]
pub enum FirstPacket {
    /// Not a whole packet yet: read more.
    More,
    /// A CONNECT, decoded (its bytes are consumed from the buffer; what follows stays).
    Connect(Box<Connect>),
    /// Not a CONNECT, too large, or malformed.
    Refuse(Refusal),
}

/// Looks at what a new connection has sent so far (`buf`, the connection's read buffer) under the
/// core's `max_packet_size`, bounded by [`MAX_CONNECT_SIZE`].
pub fn read_connect(buf: &mut BytesMut, max_packet_size: usize) -> FirstPacket {
    // MQTT-3.1.0-1: anything but CONNECT first is refused as soon as its first byte is seen, not after
    // buffering a whole (possibly huge) packet.
    if buf.first().is_some_and(|&b| b != 0x10) {
        return FirstPacket::Refuse(Refusal::Close("first packet not CONNECT"));
    }
    let v5_connect = connect_level(buf) == Some(5);
    match protocol::decode(buf, ProtocolVersion::V3_1_1, connect_limit(max_packet_size)) {
        Ok(Some(Packet::Connect(c))) => FirstPacket::Connect(c),
        // MQTT-3.1.0-1: the first packet must be CONNECT.
        Ok(Some(_)) => FirstPacket::Refuse(Refusal::Close("first packet not CONNECT")),
        Ok(None) => FirstPacket::More,
        // MQTT-3.1.2-2: an unsupported level gets CONNACK 0x01 (3.1.1 layout), then the connection
        // closes.
        Err(DecodeError::UnsupportedProtocolLevel { .. }) => FirstPacket::Refuse(Refusal::Connack(
            ProtocolVersion::V3_1_1,
            reason::UNSUPPORTED_PROTOCOL_VERSION,
            "unacceptable protocol version",
        )),
        // A v5 CONNECT that does not decode is answered with a v5 CONNACK naming the error
        // (MQTT-4.13.1-1); before v5 the connection just closes (MQTT-3.1.4-1).
        Err(e) if v5_connect => {
            FirstPacket::Refuse(Refusal::Connack(ProtocolVersion::V5, e.reason_code(), "malformed CONNECT"))
        }
        Err(_) => FirstPacket::Refuse(Refusal::Close("malformed CONNECT")),
    }
}

/// The protocol level byte of a CONNECT at the front of `buf`, once it has arrived.
fn connect_level(buf: &[u8]) -> Option<u8> {
    // Fixed header: type byte and 1..4 length bytes; then the protocol name's two-byte length.
    let len_bytes = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    let name_at = 1 + len_bytes;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(name_at)?, *buf.get(name_at + 1)?]));
    buf.get(name_at + 2 + name_len).copied()
}

/// Who the client is, as the listener establishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// The CONNECT's username and password, checked against the password file; a client without a
    /// username needs the listener's `allow_anonymous`.
    Password { allow_anonymous: bool },
    /// Mutual TLS already authenticated the client: its certificate's common name (`None`: the
    /// certificate has none) is its username, and the password file is not consulted (mosquitto's
    /// `use_identity_as_username`).
    Certificate(Option<String>),
}

/// The CONNECT a connection was accepted with.
#[derive(Debug)]
pub struct Hello {
    pub connect: Box<Connect>,
    /// The broker assigned the client id (the client sent an empty one).
    pub assigned: bool,
}

/// Decides on a decoded CONNECT, on the core that accepted the connection and before any session
/// work, so that a refused client costs its home core nothing: authentication (`login`), then
/// `max_connections` (`permit_granted`), then the CONNECT's own checks (`core::check_connect`); an
/// empty client id is then replaced by one the core assigns.
pub fn admit(
    core: &mut Core,
    mut connect: Box<Connect>,
    login: Login,
    permit_granted: bool,
    now: Instant,
) -> Result<Hello, Refusal> {
    let version = connect.protocol;
    match login {
        Login::Certificate(Some(name)) => {
            connect.username = Some(Utf8Bytes::copy_from_str(&name));
            connect.password = None;
        }
        Login::Certificate(None) => {
            return Err(Refusal::Connack(
                version,
                reason::NOT_AUTHORIZED,
                "no identity in the client certificate",
            ))
        }
        Login::Password { allow_anonymous } => {
            if !core.authenticate(&connect, allow_anonymous) {
                // 3.1.1 gets 0x05 for both (mosquitto's answer); v5 can say which.
                return Err(match connect.username {
                    Some(_) => Refusal::Connack(
                        version,
                        reason::BAD_USERNAME_OR_PASSWORD,
                        "bad username or password",
                    ),
                    None => Refusal::Connack(version, reason::NOT_AUTHORIZED, "anonymous not allowed"),
                });
            }
        }
    }
    if !permit_granted {
        // 3.1.1: 0x03 server unavailable.
        return Err(Refusal::Connack(version, reason::QUOTA_EXCEEDED, "max_connections reached"));
    }
    match check_connect(&connect, core.settings()) {
        Err((code, why)) => return Err(Refusal::Connack(version, code, why)),
        Ok(false) => return Err(Refusal::Close("invalid will topic")),
        Ok(true) => {}
    }
    let assigned = connect.client_id.is_empty();
    if assigned {
        connect.client_id = core.assign_client_id(now);
    }
    Ok(Hello { connect, assigned })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CONNECT of protocol `level` from client "c", with `props` (the property block, v5) after the
    /// keep-alive.
    fn connect(level: u8, props: &[u8]) -> BytesMut {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
        body.extend_from_slice(props);
        body.extend_from_slice(&[0, 1, b'c']);
        let mut out = BytesMut::from(&[0x10, body.len() as u8][..]);
        out.extend_from_slice(&body);
        out
    }

    fn refusal(first: FirstPacket) -> Refusal {
        match first {
            FirstPacket::Refuse(r) => r,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn anything_but_connect_is_refused_on_its_first_byte() {
        let mut buf = BytesMut::from(&[0x30][..]);
        assert_eq!(refusal(read_connect(&mut buf, 1 << 20)), Refusal::Close("first packet not CONNECT"));
        assert!(matches!(read_connect(&mut BytesMut::from(&[0x10][..]), 1 << 20), FirstPacket::More));
    }

    #[test]
    fn a_connect_is_read_and_what_follows_stays() {
        let mut buf = connect(4, &[]);
        buf.extend_from_slice(&[0xC0, 0]);
        let FirstPacket::Connect(c) = read_connect(&mut buf, 1 << 20) else { panic!("no CONNECT") };
        assert_eq!((c.protocol, c.client_id.as_str()), (ProtocolVersion::V3_1_1, "c"));
        assert_eq!(&buf[..], [0xC0, 0]);
    }

    #[test]
    fn refusals_answer_in_the_layout_the_client_can_read() {
        let r = refusal(read_connect(&mut connect(6, &[]), 1 << 20));
        assert_eq!(r.connack().map(|(v, _)| v), Some(ProtocolVersion::V3_1_1));
        assert_eq!(r.reason(), "unacceptable protocol version");
        // A v5 CONNECT whose property block is cut short: a v5 CONNACK naming the error.
        let r = refusal(read_connect(&mut connect(5, &[9, 0x11]), 1 << 20));
        assert!(matches!(
            r,
            Refusal::Connack(ProtocolVersion::V5, reason::MALFORMED_PACKET, "malformed CONNECT")
        ));
        // Too large under max_packet_size: closed before v5, answered with 0x95 in v5.
        let r = refusal(read_connect(&mut connect(4, &[]), 10));
        assert_eq!(r, Refusal::Close("malformed CONNECT"));
        assert_eq!(r.connack(), None);
        let r = refusal(read_connect(&mut connect(5, &[0]), 10));
        assert!(matches!(r, Refusal::Connack(ProtocolVersion::V5, reason::PACKET_TOO_LARGE, _)));
        let Some((_, Packet::ConnAck(ack))) = r.connack() else { panic!("no CONNACK") };
        let why = ack.properties.and_then(|p| p.reason_string);
        assert_eq!(why.as_ref().map(Utf8Bytes::as_str), Some("malformed CONNECT"));
        assert_eq!(connect_limit(usize::MAX), MAX_CONNECT_SIZE);
    }
}
