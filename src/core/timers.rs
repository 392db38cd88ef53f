//! What comes due with time: keep-alive and connect timeouts, session expiry, delayed wills, stuck
//! subscribers, and lingering closes. A sweep costs what is due, not what is held: connections and
//! sessions wait in one deadline heap ([`Timers`]), and only congested sessions and lingering closes,
//! both few and short-lived, are walked.

use super::keys::{ConnKey, SessionKey};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::Core;
use crate::persist::Clock;
use crate::protocol::reason;

/// Something that may be due at a deadline. An entry is checked against the state when it comes due
/// and dropped if it no longer applies (the connection or session it names is gone or changed), so
/// nothing ever has to be taken out of the heap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Due {
    /// The keep-alive (or, before CONNECT, the connect timeout) of connection `key`. The entry counts only
    /// if the connection with that key is armed for exactly its deadline: a later connection that got the
    /// key after a close is armed for its own deadline, and were the two equal, the entry would be right
    /// for it too. (So no serial number: every connection and every entry stays smaller.)
    Silence(ConnKey),
    /// The expiry of the offline session `skey`.
    Expiry(SessionKey),
    /// The delayed will of session `skey`.
    Will(SessionKey),
}

/// The deadlines of this core, earliest first.
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, Due)>>,
}

impl Timers {
    pub(super) fn add(&mut self, at: Instant, due: Due) {
        self.heap.push(Reverse((at, due)));
    }

    /// Gives back what a wave of connections left: the heap keeps its largest size otherwise.
    pub(super) fn shrink_to_fit(&mut self) {
        self.heap.shrink_to_fit();
    }

    /// The earliest entry due at `now`, if any.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, Due)> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }
}

/// A keep-alive deadline is armed this long after the moment the connection would be too quiet, so that
/// a connection found exactly at its limit is re-armed for later rather than for now.
const SLACK: Duration = Duration::from_millis(1);

impl Core {
    /// Runs what came due. Called every 250 ms (`server::SWEEP_INTERVAL`), so timers are accurate to about
    /// a quarter of a second. `wall` is the present on both clocks: the core's Unix times follow the wall
    /// clock from here on.
    pub fn sweep(&mut self, wall: Clock) {
        let now = wall.instant;
        self.at(now);
        self.wall = wall;
        self.writers.next_sweep();
        self.sweep_writers();
        if self.trim.swept(self.writers.take_retired()) {
            // Tables sized for the wave give back what its end freed (vacant slots at the tail only:
            // keys of live entries never move).
            self.conns.shrink_to_fit();
            self.sessions.shrink_to_fit();
            self.by_client.shrink_to_fit();
            self.holding.shrink_to_fit();
            self.dirty.shrink_to_fit();
            self.active.shrink_to_fit();
            self.parked_writers.shrink_to_fit();
            self.timers.shrink_to_fit();
        }
        self.disconnect_stuck_subscribers(now, self.settings.slow_subscriber_timeout);
        let mut silent: SmallVec<[ConnKey; 8]> = SmallVec::new();
        while let Some((at, due)) = self.timers.pop_due(now) {
            match due {
                Due::Silence(key) => {
                    if self.silence_due(key, at, now) {
                        silent.push(key);
                    }
                }
                Due::Expiry(skey) => self.expire_session(skey, at),
                Due::Will(skey) => {
                    let due =
                        self.sessions.get(skey).and_then(|sess| sess.pending_will.as_ref()).map(|p| p.1);
                    if due == Some(at) {
                        self.fire_will(skey);
                    }
                }
            }
        }
        for key in silent {
            // The reader sees the shutdown and calls conn_closed; closing here already publishes the
            // will and detaches the session, so the reader's later call finds nothing.
            let connected = self.conns.get(key).is_some_and(|c| c.session.is_some());
            if connected {
                self.stats.count_closed("keep-alive timeout");
            } else {
                self.stats.count_refused("no CONNECT within connect_timeout");
            }
            self.close_conn(key, false, Some((reason::KEEP_ALIVE_TIMEOUT, "keep-alive timeout")));
        }
        // Connections closed with a v5 DISCONNECT whose writer could not flush it in time.
        self.lingering.retain(|(ctl, deadline)| {
            if ctl.writer_finished() {
                return false;
            }
            if now >= *deadline {
                ctl.kick();
                return false;
            }
            true
        });
    }

    /// Arms the silence timer of connection `key` for its current `last_seen` and `timeout`, unless an
    /// earlier one is armed already (that one re-arms itself when it finds the connection alive).
    pub(super) fn arm_silence(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(key) else { return };
        let Some(at) = c.timeout.and_then(|t| c.last_seen.checked_add(t + SLACK)) else { return };
        if c.silence_at.is_some_and(|armed| armed <= at) {
            return;
        }
        c.silence_at = Some(at);
        self.timers.add(at, Due::Silence(key));
    }

    /// A connection's silence timer came due: whether it has been quiet too long (otherwise it is
    /// re-armed for the deadline its last packet set).
    fn silence_due(&mut self, key: ConnKey, at: Instant, now: Instant) -> bool {
        let Some(c) = self.conns.get_mut(key) else { return false };
        if c.silence_at != Some(at) {
            return false; // A later entry replaced this one.
        }
        c.silence_at = None;
        let Some(timeout) = c.timeout else { return false };
        // A reader paused on a full hold is not reading, by the broker's choice: not a dead peer.
        if c.held.as_ref().is_some_and(|h| h.is_full()) {
            c.last_seen = now;
        }
        if now.saturating_duration_since(c.last_seen) > timeout {
            return true;
        }
        self.arm_silence(key);
        false
    }

    /// Ends the offline session `skey` if `at` is still its expiry (the client may have come back, or
    /// the session's expiry changed, since the entry was made).
    fn expire_session(&mut self, skey: SessionKey, at: Instant) {
        let due = self.sessions.get(skey).is_some_and(|sess| {
            sess.conn.is_none()
                && sess.offline_since.and_then(|t| t.checked_add(Duration::from_secs(u64::from(sess.expiry))))
                    == Some(at)
        });
        if due {
            self.end_session(skey);
        }
    }

    /// Pause policy: a connected subscriber whose full queue has not moved for `limit` is disconnected,
    /// so that publishers are released (its persistent session keeps what is queued). Only congested
    /// sessions are looked at; those that drained leave the list (also without a limit, so that it stays
    /// as short as the congestion).
    fn disconnect_stuck_subscribers(&mut self, now: Instant, limit: Option<Duration>) {
        let mut stuck: SmallVec<[ConnKey; 4]> = SmallVec::new();
        let sessions = &mut self.sessions;
        self.stalled.retain(|&skey| {
            let Some(sess) = sessions.get_mut(skey).filter(|sess| sess.congested.is_some()) else {
                return false;
            };
            let since = *sess.stalled_since.get_or_insert(now);
            let stuck_long = limit.is_some_and(|limit| now.saturating_duration_since(since) > limit);
            if let (Some(conn), true) = (sess.conn, stuck_long) {
                stuck.push(conn);
            }
            true
        });
        for key in stuck {
            self.stats.count_closed("slow subscriber timeout");
            self.close_conn(key, false, Some((reason::QUOTA_EXCEEDED, "slow subscriber timeout")));
        }
    }

    /// The writers of parked connections that may retire, and the outboxes that were used since the last
    /// sweep: only those, not every connection.
    fn sweep_writers(&mut self) {
        self.parked_writers.retain(|ctl| ctl.sweep_writer());
        // An outbox keeps the capacity of its busiest moment (a CONNACK alone leaves room for four 128-byte
        // frames); give it back, so that an idle connection holds no outbox memory. A busy one pays one
        // allocation per sweep for this.
        self.active.retain(|ctl| ctl.shrink_idle_outbox());
    }

    /// A quiet connection parked (its reading task and buffer were freed): counted, and toward a trim;
    /// its writer may retire from the next sweep on. Returns whether the allocator should give free pages
    /// back now (see [`super::trim::Trim::parked`]).
    pub fn note_parked(&mut self, ctl: &std::rc::Rc<super::ConnCtl>) -> bool {
        self.stats.parks += 1;
        self.parked_writers.push(ctl.clone());
        self.trim.parked()
    }

    /// Returns (and clears) whether many connections closed since the last trim: the runtime then asks
    /// the allocator to give free memory back (`crate::alloc`).
    pub fn take_trim_due(&mut self) -> bool {
        self.trim.take_due()
    }
}
