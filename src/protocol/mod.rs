//! The MQTT wire format: packet types, decoder and encoder. Pure code: no I/O, no clock.
//!
//! Architecture invariant: nothing here knows about sockets, sessions or cores.

mod decode;
mod encode;
/// MQTT 5.0 properties (section 2.2.2): the property blocks of v5 packets.
pub mod properties;
/// MQTT 5.0 property identifiers (table 2-4).
pub mod property_id;
mod reader;
/// MQTT 5.0 reason codes and their 3.1.1 equivalents.
pub mod reason;
mod types;

#[cfg(test)]
mod tests;

pub use decode::{decode, frame_len};
pub use encode::{
    encode, encode_publish, encode_publish_head, encode_publish_head_v5, encode_publish_v5, publish_head_len,
    publish_head_len_v5,
};
pub use types::*;
