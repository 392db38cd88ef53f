//! What comes due with time (keep-alive, connect timeout, session expiry, delayed wills, stuck subscribers, lingering closes) and giving memory back after a wave of closes.

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use super::Core;
use crate::persist::Clock;
use crate::protocol::reason;

/// After this many closed (or parked) connections, or [`TRIM_AFTER_QUIET`] once that has stopped for a
/// sweep, the sweeper shrinks the core's tables and has the allocator give free pages back, so that RSS
/// returns near its baseline after a wave of disconnects, or of connections going idle.
pub(super) const TRIM_AFTER_CLOSES: usize = 1000;

pub(super) const TRIM_AFTER_QUIET: usize = 64;

/// Parks between two purges of the allocator's free pages (tables are left alone: they still grow).
pub(super) const PURGE_AFTER_PARKS: usize = 1000;

impl Core {
    /// Closes connections whose keep-alive (or connect timeout) expired. Called every 250 ms
    /// (`server::SWEEP_INTERVAL`).
    /// `wall` is the present on both clocks: the core's Unix times follow the wall clock from here on.
    pub fn sweep(&mut self, wall: Clock) {
        let now = wall.instant;
        self.at(now);
        self.wall = wall;
        let expired: SmallVec<[usize; 8]> = self
            .conns
            .iter()
            .filter(|(_, c)| c.timeout.is_some_and(|t| now.saturating_duration_since(c.last_seen) > t))
            .map(|(k, _)| k)
            .collect();
        for c in self.conns.iter_mut().map(|(_, c)| c) {
            // A reader paused on a full hold is not reading, by the broker's choice: not a dead peer.
            if c.held.as_ref().is_some_and(|h| h.is_full()) {
                c.last_seen = now;
            }
            // An outbox keeps the capacity of its busiest moment (a CONNACK alone leaves room for four
            // 128-byte frames); give it back, so that an idle connection holds no outbox memory. A busy
            // one pays one allocation per sweep for this.
            if let Ok(mut ob) = c.ctl.outbox.try_borrow_mut() {
                if ob.is_empty() && ob.capacity() > 0 {
                    ob.shrink_to_fit();
                }
            }
            c.ctl.sweep_writer();
        }
        self.freed_since_trim += self.writers.take_retired();
        let quiet = self.freed_since_trim == self.freed_at_last_sweep;
        self.freed_at_last_sweep = self.freed_since_trim;
        if self.freed_since_trim >= TRIM_AFTER_CLOSES || (quiet && self.freed_since_trim >= TRIM_AFTER_QUIET)
        {
            self.freed_since_trim = 0;
            self.freed_at_last_sweep = 0;
            self.trim_due = true;
            // Tables sized for the wave give back what its end freed (vacant slots at the tail only:
            // keys of live entries never move).
            self.conns.shrink_to_fit();
            self.sessions.shrink_to_fit();
            self.by_client.shrink_to_fit();
            self.holding.shrink_to_fit();
            self.dirty.shrink_to_fit();
        }
        if let Some(limit) = self.settings.slow_subscriber_timeout {
            self.disconnect_stuck_subscribers(now, limit);
        }
        for key in expired {
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
        self.expire_sessions(now);
        self.fire_due_wills(now);
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

    /// Ends offline sessions whose expiry interval has passed.
    pub(super) fn expire_sessions(&mut self, now: Instant) {
        while let Some(&Reverse((at, skey))) = self.expiring.peek() {
            if at > now {
                break;
            }
            self.expiring.pop();
            // Stale entries: the client came back, or the session's expiry changed since.
            let due = self.sessions.get(skey).is_some_and(|se| {
                se.conn.is_none()
                    && se.offline_since.and_then(|t| t.checked_add(Duration::from_secs(u64::from(se.expiry))))
                        == Some(at)
            });
            if due {
                self.end_session(skey);
            }
        }
    }

    /// Publishes delayed wills whose delay has passed.
    pub(super) fn fire_due_wills(&mut self, now: Instant) {
        if self.pending_wills.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.pending_wills);
        waiting.retain(|&skey| {
            match self.sessions.get(skey).and_then(|se| se.pending_will.as_ref()).map(|p| p.1) {
                Some(due) if due <= now => {
                    self.fire_will(skey);
                    false
                }
                Some(_) => true,
                None => false,
            }
        });
        self.pending_wills.append(&mut waiting);
    }

    /// Pause policy: a connected subscriber whose full queue has not moved for `limit` is disconnected,
    /// so that publishers are released (its persistent session keeps what is queued).
    pub(super) fn disconnect_stuck_subscribers(&mut self, now: Instant, limit: Duration) {
        let mut stuck: SmallVec<[usize; 4]> = SmallVec::new();
        for (_, se) in self.sessions.iter_mut().filter(|(_, se)| se.congested.is_some()) {
            let since = *se.stalled_since.get_or_insert(now);
            if let (Some(conn), true) = (se.conn, now.saturating_duration_since(since) > limit) {
                stuck.push(conn);
            }
        }
        for key in stuck {
            self.stats.count_closed("slow subscriber timeout");
            self.close_conn(key, false, Some((reason::QUOTA_EXCEEDED, "slow subscriber timeout")));
        }
    }

    /// Returns (and clears) whether many connections closed since the last trim: the runtime then asks
    /// the allocator to give free memory back (`crate::alloc`).
    /// A quiet connection parked (its reading task and buffer were freed): counted, and toward a trim.
    /// Returns whether the allocator should give free pages back now: every [`PURGE_AFTER_PARKS`] parks,
    /// so that a storm of connections going idle does not pile up freed blocks between sweeps.
    pub fn note_parked(&mut self) -> bool {
        self.stats.parks += 1;
        self.freed_since_trim += 1;
        self.parks_since_purge += 1;
        if self.parks_since_purge >= PURGE_AFTER_PARKS {
            self.parks_since_purge = 0;
            return true;
        }
        false
    }

    pub fn take_trim_due(&mut self) -> bool {
        std::mem::take(&mut self.trim_due)
    }
}
