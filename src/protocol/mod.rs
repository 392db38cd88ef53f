//! The MQTT wire format: packet types, decoder and encoder. Pure code: no I/O, no clock.
//!
//! Architecture invariant: nothing here knows about sockets, sessions or cores.

mod decode;
mod encode;
/// MQTT 5.0 properties (section 2.2.2): decoded and encoded on their own, ahead of the v5 packet codec
/// that will use them (CONNECT with protocol level 5 is still refused with CONNACK 0x01).
pub mod properties;
mod types;

#[cfg(test)]
mod tests;

pub use decode::{decode, frame_len};
pub use encode::{encode, encode_publish, encode_publish_head, publish_head_len};
pub use types::*;
