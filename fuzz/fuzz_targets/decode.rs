//! Fuzz target `decode`: arbitrary bytes through the MQTT codec.
//!
//! Input layout: byte 0 picks the `max_packet_size` (low nibble) and how the rest is fed to the
//! decoder (high nibble: all at once, or in slices of a few bytes, as TCP may deliver it); the rest
//! is the byte stream. Every protocol version (3.1.1, 3.1 and 5.0) decodes the same stream: the
//! layouts differ enough that one stream exercises different parsers under each, and an existing
//! corpus keeps its meaning.
//!
//! Checked for every call, besides "no panic":
//! - `decode` and `frame_len` agree: a decoded packet took exactly `frame_len` bytes, an error from
//!   `frame_len` is the error `decode` returns, and `Ok(None)` consumed nothing.
//! - round trip: every decoded packet re-encodes to bytes that decode to an equal packet, no longer
//!   than the original (so under the same `max_packet_size`), and re-encoding that copy gives the
//!   same bytes (the encoding is canonical). The one lossy mapping is allowed for: before v5 a
//!   CONNACK return code 4 (v5 0x86) is written back as 5 (0x87), as `reason::connack_v3` does.
//! - AUTH (type 15) exists only in v5: `frame_len`, which has no version, frames it, and `decode`
//!   refuses it before v5 from its first byte on.
//!
//! Allocations sized by an untrusted length field are caught by running with
//! `-malloc_limit_mb=64` (scripts/fuzz.sh does): a 5-byte header may announce 256 MiB.

#![no_main]

use bytes::BytesMut;
use coremq::protocol::properties::properties_body_len;
use coremq::protocol::{
    decode, encode, frame_len, publish_head_len, publish_head_len_v5, reason, ConnAck, DecodeError, Packet,
    ProtocolVersion,
};
use libfuzzer_sys::fuzz_target;

/// `max_packet_size` values: tiny ones so that PacketTooLarge fires at every header length, the
/// boundaries of the 1-, 2- and 3-byte remaining length encodings, and the largest MQTT packet.
const MAX_PACKET_SIZES: [usize; 16] =
    [0, 1, 2, 3, 4, 5, 16, 129, 130, 131, 16_386, 16_387, 65_536, 2_097_155, 1 << 20, 268_435_460];

/// Slice sizes in which the stream is fed; 0 means all at once.
const FEED_STEPS: [usize; 4] = [0, 1, 3, 7];

/// Room for any re-encoded packet: the round trip must not depend on the caller's limit.
const NO_LIMIT: usize = usize::MAX;

/// `COREMQ_FUZZ_TRACE=1` prints every decode result: for reading a crash artifact
/// (`fuzz/target/x86_64-unknown-linux-gnu/release/decode ARTIFACT`), not for fuzzing.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("COREMQ_FUZZ_TRACE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else { return };
    let max = MAX_PACKET_SIZES[usize::from(sel & 0x0f)];
    let step = FEED_STEPS[usize::from(sel >> 4) % FEED_STEPS.len()];
    for version in [ProtocolVersion::V3_1_1, ProtocolVersion::V3_1, ProtocolVersion::V5] {
        run(stream, version, max, step);
    }
});

/// Feeds `stream` in slices of `step` bytes (all at once for 0) and decodes after each slice until
/// the decoder needs more bytes or fails.
fn run(stream: &[u8], version: ProtocolVersion, max: usize, step: usize) {
    let mut buf = BytesMut::new();
    let chunk = if step == 0 { stream.len().max(1) } else { step };
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decode_one(&mut buf, version, max) {
                Step::Packet => continue,
                Step::NeedMore => break,
                // The connection would be closed: nothing after an error means anything.
                Step::Failed => return,
            }
        }
    }
}

enum Step {
    Packet,
    NeedMore,
    Failed,
}

/// One `decode` call on `buf`, checked against `frame_len` and round-tripped.
fn decode_one(buf: &mut BytesMut, version: ProtocolVersion, max: usize) -> Step {
    let before = buf.clone();
    let framed = frame_len(&before, max);
    let result = decode(buf, version, max);
    if tracing() {
        eprintln!("{version:?}, max {max}, {} bytes buffered: {result:?}", before.len());
    }
    if let Some(&first) = before.first() {
        if version != ProtocolVersion::V5 && first >> 4 == 15 {
            // Whatever frame_len says: decode refuses type 15 before v5 as soon as it sees it.
            assert_eq!(result, Err(DecodeError::InvalidHeader { byte: first }), "AUTH before v5");
            return Step::Failed;
        }
    }
    match (result, framed) {
        (Ok(Some(packet)), Ok(Some(len))) => {
            let consumed = before.len() - buf.len();
            assert_eq!(consumed, len, "decode took {consumed} bytes, frame_len says {len}: {packet:?}");
            assert_eq!(&before[consumed..], &buf[..], "decode changed the bytes after the packet");
            round_trip(&packet, version, consumed, max);
            Step::Packet
        }
        (Ok(Some(packet)), framed) => {
            panic!("decode returned {packet:?} but frame_len says {framed:?}")
        }
        (Ok(None), framed) => {
            assert_eq!(&before[..], &buf[..], "decode returned Ok(None) but changed the buffer");
            match framed {
                Ok(None) => {}
                // The header is complete; then the body must be what is missing.
                Ok(Some(len)) => {
                    assert!(len > before.len(), "Ok(None) with a whole {len}-byte frame buffered")
                }
                Err(e) => panic!("decode returned Ok(None) but frame_len failed with {e:?}"),
            }
            Step::NeedMore
        }
        (Err(e), Err(fe)) => {
            assert_eq!(e, fe, "decode and frame_len disagree on the header error");
            Step::Failed
        }
        (Err(e), Ok(None)) => panic!("decode failed with {e:?} on an incomplete header"),
        (Err(e), Ok(Some(len))) => {
            // A body error needs the whole body, except for packets whose length the spec fixes:
            // those are refused as soon as the header announces another length.
            let fixed_len_refusal =
                matches!(e, DecodeError::Malformed(why) if why.contains("remaining length"));
            assert!(
                len <= before.len() || fixed_len_refusal,
                "decode failed with {e:?} before the {len}-byte frame was complete ({} bytes)",
                before.len()
            );
            Step::Failed
        }
    }
}

/// Re-encodes `packet` and checks that it decodes to the same packet; `original_len` is how many
/// bytes it took on the wire.
fn round_trip(packet: &Packet, version: ProtocolVersion, original_len: usize, max: usize) {
    let mut enc = BytesMut::new();
    encode(packet, version, &mut enc);
    let encoded = enc.clone().freeze();
    if let Packet::Publish(p) = packet {
        // The broker sizes its shared frames and per-subscriber heads with publish_head_len(_v5).
        let head = match version {
            ProtocolVersion::V5 => {
                let props = p.properties.as_deref().map_or(0, properties_body_len);
                publish_head_len_v5(p.topic.len(), p.qos, props, p.payload.len())
            }
            _ => publish_head_len(p.topic.len(), p.qos, p.payload.len()),
        };
        assert_eq!(head + p.payload.len(), encoded.len(), "publish head length is wrong for {p:?}");
    }
    assert!(
        encoded.len() <= original_len,
        "re-encoding grew the packet from {original_len} to {} bytes: {packet:?}",
        encoded.len()
    );
    assert_eq!(frame_len(&encoded, NO_LIMIT), Ok(Some(encoded.len())), "frame_len of re-encoded {packet:?}");

    let again = match decode(&mut enc, version, max) {
        Ok(Some(p)) => p,
        other => panic!("re-encoded {packet:?} as {encoded:02x?}, which decodes as {other:?}"),
    };
    assert!(enc.is_empty(), "{} bytes left after decoding re-encoded {packet:?}", enc.len());
    assert_eq!(again, expected_back(packet, version), "round trip changed the packet (bytes {encoded:02x?})");

    let mut twice = BytesMut::new();
    encode(&again, version, &mut twice);
    assert_eq!(&twice[..], &encoded[..], "the encoding of {packet:?} is not canonical");
}

/// What `packet` decodes to after a round trip: itself, except that before v5 a CONNACK "bad user
/// name or password" (3.1.1 code 4, v5 0x86) is written as 5 and so comes back as "not authorized".
fn expected_back(packet: &Packet, version: ProtocolVersion) -> Packet {
    match packet {
        Packet::ConnAck(a)
            if version != ProtocolVersion::V5 && a.code == reason::BAD_USERNAME_OR_PASSWORD =>
        {
            Packet::ConnAck(ConnAck { code: reason::NOT_AUTHORIZED, ..a.clone() })
        }
        p => p.clone(),
    }
}
