//! MQTT 5.0 reason codes (section 2.4, table 2-6) used by the broker, and how CONNACK and SUBACK codes
//! are written on 3.1/3.1.1 connections, which only know a few of them.
//!
//! The broker decides every answer as a v5 reason code; the encoder downgrades it for older clients, so
//! no code above the codec needs to know which version it is talking to for that.

pub const SUCCESS: u8 = 0x00;
pub const GRANTED_QOS_1: u8 = 0x01;
pub const GRANTED_QOS_2: u8 = 0x02;
/// DISCONNECT: close and publish the will.
pub const DISCONNECT_WITH_WILL: u8 = 0x04;
pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
pub const UNSPECIFIED_ERROR: u8 = 0x80;
pub const MALFORMED_PACKET: u8 = 0x81;
pub const PROTOCOL_ERROR: u8 = 0x82;
pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
pub const BAD_USERNAME_OR_PASSWORD: u8 = 0x86;
pub const NOT_AUTHORIZED: u8 = 0x87;
pub const SERVER_UNAVAILABLE: u8 = 0x88;
pub const SERVER_BUSY: u8 = 0x89;
pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
pub const SESSION_TAKEN_OVER: u8 = 0x8E;
pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
pub const TOPIC_NAME_INVALID: u8 = 0x90;
pub const PACKET_IDENTIFIER_IN_USE: u8 = 0x91;
pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
pub const PACKET_TOO_LARGE: u8 = 0x95;
pub const QUOTA_EXCEEDED: u8 = 0x97;
pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;

/// The 3.1/3.1.1 CONNACK return code (MQTT-3.2.2.3) for a v5 CONNACK reason code. Refusals that 3.1.1
/// cannot name more precisely become "not authorized" (credentials and permissions) or "server
/// unavailable" (everything else), as mosquitto answers them.
pub fn connack_v3(code: u8) -> u8 {
    match code {
        SUCCESS => 0,
        UNSUPPORTED_PROTOCOL_VERSION => 1,
        CLIENT_IDENTIFIER_NOT_VALID => 2,
        BAD_USERNAME_OR_PASSWORD | NOT_AUTHORIZED | BAD_AUTHENTICATION_METHOD | 0x8A => 5,
        _ => 3,
    }
}

/// The v5 reason code for a 3.1/3.1.1 CONNACK return code (the inverse of [`connack_v3`] on its
/// range); `None` for a code 3.1.1 does not define.
pub fn connack_from_v3(code: u8) -> Option<u8> {
    Some(match code {
        0 => SUCCESS,
        1 => UNSUPPORTED_PROTOCOL_VERSION,
        2 => CLIENT_IDENTIFIER_NOT_VALID,
        3 => SERVER_UNAVAILABLE,
        4 => BAD_USERNAME_OR_PASSWORD,
        5 => NOT_AUTHORIZED,
        _ => return None,
    })
}

/// The 3.1.1 SUBACK return code for a v5 one: the granted QoS, or 0x80 for any refusal.
pub fn suback_v3(code: u8) -> u8 {
    if code <= GRANTED_QOS_2 {
        code
    } else {
        0x80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_codes_round_trip() {
        // 4 ("malformed user name or password") has no v5 twin: 0x86 is written as 5, as mosquitto does.
        for c in [0u8, 1, 2, 3, 5] {
            let v5 = connack_from_v3(c).unwrap();
            assert_eq!(connack_v3(v5), c);
        }
        assert_eq!(connack_from_v3(6), None);
        // The mapping: a bad password is 0x86 on v5 and 5 on 3.1.1.
        assert_eq!(connack_v3(BAD_USERNAME_OR_PASSWORD), 5);
        assert_eq!(connack_v3(QUOTA_EXCEEDED), 3);
        assert_eq!(suback_v3(NOT_AUTHORIZED), 0x80);
        assert_eq!(suback_v3(GRANTED_QOS_1), 1);
    }
}
