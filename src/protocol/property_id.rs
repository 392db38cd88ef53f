//! MQTT 5.0 property identifiers (section 2.2.2.2, table 2-4).
//!
//! The identifier is a variable byte integer on the wire, but every defined one is a single byte
//! below 0x80. [`properties`](super::properties) decodes and encodes them; code outside the codec that
//! writes a property itself should name it by one of these constants.

/// Byte, 0 (unspecified bytes) or 1 (UTF-8 payload). PUBLISH, will.
pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
/// Four-byte integer, seconds. PUBLISH, will.
pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
/// UTF-8 string. PUBLISH, will.
pub const CONTENT_TYPE: u8 = 0x03;
/// UTF-8 string, a topic name. PUBLISH, will.
pub const RESPONSE_TOPIC: u8 = 0x08;
/// Binary data. PUBLISH, will.
pub const CORRELATION_DATA: u8 = 0x09;
/// Variable byte integer, 1..=268,435,455. PUBLISH (repeatable), SUBSCRIBE.
pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
/// Four-byte integer, seconds. CONNECT, CONNACK, DISCONNECT.
pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
/// UTF-8 string. CONNACK.
pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
/// Two-byte integer, seconds. CONNACK.
pub const SERVER_KEEP_ALIVE: u8 = 0x13;
/// UTF-8 string. CONNECT, CONNACK, AUTH.
pub const AUTHENTICATION_METHOD: u8 = 0x15;
/// Binary data. CONNECT, CONNACK, AUTH.
pub const AUTHENTICATION_DATA: u8 = 0x16;
/// Byte, 0 or 1. CONNECT.
pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
/// Four-byte integer, seconds. Will.
pub const WILL_DELAY_INTERVAL: u8 = 0x18;
/// Byte, 0 or 1. CONNECT.
pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
/// UTF-8 string. CONNACK.
pub const RESPONSE_INFORMATION: u8 = 0x1A;
/// UTF-8 string. CONNACK, DISCONNECT.
pub const SERVER_REFERENCE: u8 = 0x1C;
/// UTF-8 string. CONNACK, the acknowledgements, SUBACK, UNSUBACK, DISCONNECT, AUTH.
pub const REASON_STRING: u8 = 0x1F;
/// Two-byte integer, never 0. CONNECT, CONNACK.
pub const RECEIVE_MAXIMUM: u8 = 0x21;
/// Two-byte integer. CONNECT, CONNACK.
pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
/// Two-byte integer, never 0. PUBLISH.
pub const TOPIC_ALIAS: u8 = 0x23;
/// Byte, 0 or 1. CONNACK.
pub const MAXIMUM_QOS: u8 = 0x24;
/// Byte, 0 or 1. CONNACK.
pub const RETAIN_AVAILABLE: u8 = 0x25;
/// UTF-8 string pair. Every packet that has properties; repeatable.
pub const USER_PROPERTY: u8 = 0x26;
/// Four-byte integer, never 0. CONNECT, CONNACK.
pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
/// Byte, 0 or 1. CONNACK.
pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
/// Byte, 0 or 1. CONNACK.
pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
/// Byte, 0 or 1. CONNACK.
pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
