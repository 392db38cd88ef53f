//! The 16-byte stamp at the front of every payload the swarm publishes.
//!
//! Layout (little endian): run tag `u16`, publisher id `u16`, sequence number `u32`, send time
//! `u64` in nanoseconds since the run's common [`std::time::Instant`] base. Both ends of a message
//! live in this process, so the send time needs no clock synchronisation; 16 bytes is the minimum
//! payload so that even tiny payloads carry everything the accounting needs.
//!
//! The run tag exists because a broker can still be delivering an earlier run's backlog (an
//! overloaded broker can be seconds behind) when the next run starts: without it those stale
//! messages would be counted as this run's, with nonsense sequence numbers and times.

/// Size of the stamp; also the smallest `--payload` accepted.
pub const STAMP_LEN: usize = 16;

/// What a publisher writes at the front of each payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Identifies the run (process); messages with another tag are foreign.
    pub tag: u16,
    /// Index of the publisher in the run (0-based).
    pub publisher: u16,
    /// Per-publisher sequence number, 0-based and contiguous.
    pub seq: u32,
    /// Send time in nanoseconds since the run's base instant.
    pub sent_ns: u64,
}

impl Stamp {
    /// The 16-byte wire form.
    pub fn to_bytes(self) -> [u8; STAMP_LEN] {
        let mut out = [0u8; STAMP_LEN];
        out[0..2].copy_from_slice(&self.tag.to_le_bytes());
        out[2..4].copy_from_slice(&self.publisher.to_le_bytes());
        out[4..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.sent_ns.to_le_bytes());
        out
    }

    /// Reads a stamp from the front of `payload`; `None` if it is shorter than [`STAMP_LEN`]
    /// (a message this swarm did not send).
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        let tag = u16::from_le_bytes(payload.get(0..2)?.try_into().ok()?);
        let publisher = u16::from_le_bytes(payload.get(2..4)?.try_into().ok()?);
        let seq = u32::from_le_bytes(payload.get(4..8)?.try_into().ok()?);
        let sent_ns = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
        Some(Stamp { tag, publisher, seq, sent_ns })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp { tag: 0xabcd, publisher: 7, seq: 0xdead_beef, sent_ns: 0x0102_0304_0506_0708 };
        let b = s.to_bytes();
        assert_eq!(b.len(), STAMP_LEN);
        assert_eq!(&b[0..4], &[0xcd, 0xab, 7, 0]);
        assert_eq!(&b[4..8], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(Stamp::parse(&b), Some(s));
    }

    #[test]
    fn parse_ignores_filler_after_stamp() {
        let s = Stamp { tag: 1, publisher: u16::MAX, seq: 0, sent_ns: u64::MAX };
        let mut payload = s.to_bytes().to_vec();
        payload.extend_from_slice(&[0xaa; 48]);
        assert_eq!(Stamp::parse(&payload), Some(s));
    }

    #[test]
    fn short_payload_is_not_a_stamp() {
        assert_eq!(Stamp::parse(&[]), None);
        assert_eq!(Stamp::parse(&[0u8; STAMP_LEN - 1]), None);
    }
}
