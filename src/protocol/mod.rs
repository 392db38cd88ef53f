//! The MQTT wire format: packet types, decoder and encoder. Pure code: no I/O, no clock.
//!
//! Architecture invariant: nothing here knows about sockets, sessions or cores.

mod decode;
mod encode;
mod types;

#[cfg(test)]
mod tests;

pub use decode::{decode, frame_len};
pub use encode::{encode, encode_publish, encode_publish_head, publish_head_len};
pub use types::*;
