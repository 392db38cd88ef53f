//! What an established connection's reader does with the bytes it read: decode every complete packet
//! and hand it to the core, until the core or a packet that does not decode ends the connection.
//!
//! A plain function, no I/O and no clock, so that the reader task (`server::conn::reading`) and the
//! `connection` fuzz target decode the same way and close for the same reasons.

use bytes::BytesMut;

use crate::core::{ConnCtl, Flow};
use crate::protocol::{self, DecodeError, Packet, ProtocolVersion};

/// Decodes the packets at the front of `buf` (consuming them) and passes each to `handle` (the core's
/// `handle` for this connection) while the answer is [`Flow::Continue`] and the connection is not
/// closing. Returns the last answer, or [`Flow::Close`] with the reason code and counting string for a
/// packet that does not decode; [`Flow::Continue`] when `buf` holds no whole packet any more.
pub fn decode_batch(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet: usize,
    ctl: &ConnCtl,
    mut handle: impl FnMut(Packet) -> Flow,
) -> Flow {
    let mut flow = Flow::Continue;
    while flow == Flow::Continue && !ctl.is_closing() {
        match protocol::decode(buf, version, max_packet) {
            Ok(Some(p)) => flow = handle(p),
            Ok(None) => break,
            Err(e) => flow = Flow::Close(e.reason_code(), close_reason(&e)),
        }
    }
    flow
}

/// What a connection closed for a packet that does not decode is counted under.
fn close_reason(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::PacketTooLarge { .. } => "packet too large",
        DecodeError::Protocol(_) => "protocol error",
        _ => "malformed packet",
    }
}
