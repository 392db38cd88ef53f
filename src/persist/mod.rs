//! Persistence: the log record format, reading a log back (with torn-tail detection), and folding the
//! records of every log into the state to recover. Pure code: the runtime does the file I/O.
//!
//! A log file is [`LOG_MAGIC`] followed by frames `[u32 LE body length][u32 LE CRC-32 of body][body]`
//! (see [`encode_record`]). The file is only ever appended to, so after a crash (or `kill -9`, or power
//! loss with a lazy fsync) only its tail can be damaged: [`read_log`] keeps every frame before the first
//! bad one and says where the valid prefix ends so that the runtime can truncate the file there.
//!
//! Times: an [`Instant`] means nothing after a restart, so every time written to a log is Unix
//! milliseconds, converted with a [`Clock`] taken once per batch (writing) or once per recovery (reading).

use std::time::{Duration, Instant};

use crate::protocol::Utf8Bytes;
use crate::session::{Change, Message, SubOpts};

mod codec;
mod recover;

#[cfg(test)]
mod tests;

pub use codec::{encode_record, read_log, LogContents, Tail, LOG_MAGIC, MAX_BODY};
pub use recover::{recover, snapshot_session, Recovered, RecoveredSession};

/// A point in time on both clocks: converts an `Instant` (which does not survive a restart) to Unix
/// milliseconds and back. The runtime builds one per batch/recovery from `Instant::now()` and
/// `SystemTime::now()`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// The monotonic reading.
    pub instant: Instant,
    /// The wall-clock reading taken at (nearly) the same moment, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Clock {
    /// The Unix time (ms) of `t`, saturating at 0 and `u64::MAX`. Sub-millisecond parts are truncated
    /// towards this clock's reading, so a round trip through [`Clock::to_instant`] with the same clock is
    /// exact for instants a whole number of milliseconds away from it.
    pub fn to_unix_ms(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.instant) {
            Some(ahead) => self.unix_ms.saturating_add(millis(ahead)),
            // `t` is before this clock's reading (an `Instant` may even be before the process started).
            None => self.unix_ms.saturating_sub(millis(self.instant.saturating_duration_since(t))),
        }
    }

    /// The `Instant` of Unix time `unix_ms`. A time the platform's `Instant` cannot represent (far before
    /// boot, or absurdly far ahead) saturates to the nearest one it can, never panicking.
    pub fn to_instant(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_ms {
            let d = Duration::from_millis(unix_ms - self.unix_ms);
            saturate(self.instant, d, |d| self.instant.checked_add(d))
        } else {
            let d = Duration::from_millis(self.unix_ms - unix_ms);
            saturate(self.instant, d, |d| self.instant.checked_sub(d))
        }
    }
}

/// A duration in whole milliseconds, saturating (a `u128` of milliseconds cannot overflow `u64` for any
/// span an `Instant` can express, but the conversion must not truncate silently either).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `step(d)`, or else the representable instant nearest to it: `step(d')` for the largest `d' < d` that
/// works (to the millisecond), found by bisection (at most ~64 tries, and none at all in the usual case).
/// `base` is `step(ZERO)`, which always exists.
fn saturate(base: Instant, d: Duration, step: impl Fn(Duration) -> Option<Instant>) -> Instant {
    if let Some(t) = step(d) {
        return t;
    }
    let (mut lo, mut hi, mut best) = (Duration::ZERO, d, base);
    while hi.saturating_sub(lo) > Duration::from_millis(1) {
        let mid = lo + (hi - lo) / 2;
        match step(mid) {
            Some(t) => {
                best = t;
                lo = mid;
            }
            None => hi = mid,
        }
    }
    best
}

/// One log record. `sid` numbers a session within one log file (the writer assigns them; a snapshot
/// renumbers).
#[derive(Clone, Debug)]
pub enum Record {
    /// A persistent session exists with this expiry (created, resumed, or its expiry changed). It is
    /// online from here until an [`Record::Offline`].
    Session { sid: u32, client_id: Utf8Bytes, expiry: u32 },
    /// The session's client went offline at this time (Unix ms): its expiry counts from there.
    Offline { sid: u32, unix_ms: u64 },
    /// The session ended (clean start, expiry, or expiry 0 at disconnect): forget it and its sid.
    SessionEnd { sid: u32 },
    /// The session subscribed to `filter` (or changed the options of that subscription).
    Subscribe { sid: u32, filter: Utf8Bytes, opts: SubOpts },
    /// The session unsubscribed from `filter`.
    Unsubscribe { sid: u32, filter: Utf8Bytes },
    /// A change of the session's message state (see [`Change`]).
    Change { sid: u32, change: Change },
    /// The retained message of `msg.topic` (an empty payload clears it).
    Retained { msg: Message },
}
