//! When to give memory back: after a wave of closed (or parked) connections, the core shrinks its tables
//! and the runtime has the allocator return free pages, so that RSS comes back near its baseline.

/// After this many closed (or parked) connections, or [`TRIM_AFTER_QUIET`] once that has stopped for a
/// sweep, the sweeper shrinks the core's tables and has the allocator give free pages back, so that RSS
/// returns near its baseline after a wave of disconnects, or of connections going idle.
const TRIM_AFTER_CLOSES: usize = 1000;
const TRIM_AFTER_QUIET: usize = 64;

/// Parks between two purges of the allocator's free pages (tables are left alone: they still grow).
const PURGE_AFTER_PARKS: usize = 1000;

/// Counts what was freed since memory was last given back.
#[derive(Default)]
pub(super) struct Trim {
    /// Connections closed, parked or whose writer retired since memory was last given back: each freed
    /// blocks the allocator purges only lazily.
    freed: usize,
    /// `freed` at the previous sweep: unchanged means the wave is over.
    freed_at_last_sweep: usize,
    due: bool,
    /// Parks since the allocator last gave pages back.
    parks_since_purge: usize,
}

impl Trim {
    /// A connection closed (or left this core).
    pub(super) fn freed(&mut self) {
        self.freed += 1;
    }

    /// A connection parked. Returns whether the allocator should give free pages back now: every
    /// [`PURGE_AFTER_PARKS`] parks, so that a storm of connections going idle does not pile up freed
    /// blocks between sweeps.
    pub(super) fn parked(&mut self) -> bool {
        self.freed += 1;
        self.parks_since_purge += 1;
        if self.parks_since_purge >= PURGE_AFTER_PARKS {
            self.parks_since_purge = 0;
            return true;
        }
        false
    }

    /// A sweep, after `retired` writers ended since the last one. Returns whether the core should shrink
    /// its tables now (the runtime is then told to trim, [`Trim::take_due`]).
    pub(super) fn swept(&mut self, retired: usize) -> bool {
        self.freed += retired;
        let quiet = self.freed == self.freed_at_last_sweep;
        self.freed_at_last_sweep = self.freed;
        if self.freed >= TRIM_AFTER_CLOSES || (quiet && self.freed >= TRIM_AFTER_QUIET) {
            *self = Trim { due: true, parks_since_purge: self.parks_since_purge, ..Trim::default() };
            return true;
        }
        false
    }

    pub(super) fn take_due(&mut self) -> bool {
        std::mem::take(&mut self.due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wave_of_closes_trims_once_it_is_over_or_large() {
        let mut t = Trim::default();
        for _ in 0..TRIM_AFTER_QUIET {
            t.freed();
        }
        assert!(!t.swept(0), "still closing: wait for the wave to end");
        assert!(t.swept(0), "a quiet sweep after the wave trims");
        assert!(t.take_due());
        assert!(!t.take_due());
        for _ in 0..TRIM_AFTER_CLOSES {
            t.freed();
        }
        assert!(t.swept(0), "a large wave trims at once");
    }

    #[test]
    fn parks_purge_every_so_often() {
        let mut t = Trim::default();
        let purges = (0..3 * PURGE_AFTER_PARKS).filter(|_| t.parked()).count();
        assert_eq!(purges, 3);
    }
}
