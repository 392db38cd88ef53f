//! Loss, duplicate and ordering accounting for one stream of messages: one publisher as seen by
//! one subscriber (or by one shared-subscription group, after merging its members). Pure code.

/// Sequence numbers at or above this are not tracked (counted as foreign): a broker returning
/// garbage must not make the swarm allocate a 512 MiB bitmap. 2^28 messages per publisher is far
/// beyond any bounded run (over four minutes at a million messages per second per publisher).
pub const MAX_TRACKED_SEQ: u32 = 1 << 28;

/// What [`StreamTracker::record`] made of one delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First delivery of this sequence number; `out_of_order` if a higher one arrived before it.
    New {
        /// A higher sequence number of the same stream was delivered earlier.
        out_of_order: bool,
    },
    /// This sequence number was delivered before.
    Duplicate,
    /// The sequence number is beyond [`MAX_TRACKED_SEQ`]: not ours, ignored.
    Untrackable,
}

/// Which sequence numbers of one publisher arrived, plus duplicate and ordering counters.
///
/// A bitmap (one bit per sequence number) rather than "next expected" arithmetic, because QoS 0
/// loses messages: a gap followed by a late arrival must count as out-of-order, not as a loss
/// plus an extra message, and a repeat must be told apart from a late first arrival.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamTracker {
    bits: Vec<u64>,
    distinct: u64,
    duplicated: u64,
    out_of_order: u64,
    highest: Option<u32>,
}

impl StreamTracker {
    /// An empty tracker.
    pub fn new() -> StreamTracker {
        StreamTracker::default()
    }

    /// Records the delivery of `seq`.
    pub fn record(&mut self, seq: u32) -> Outcome {
        if seq >= MAX_TRACKED_SEQ {
            return Outcome::Untrackable;
        }
        let word = (seq / 64) as usize;
        let mask = 1u64 << (seq % 64);
        if word >= self.bits.len() {
            // Grow geometrically so a steady stream costs amortised O(1).
            let want = (word + 1).max(self.bits.len() * 2);
            self.bits.resize(want, 0);
        }
        let Some(w) = self.bits.get_mut(word) else {
            return Outcome::Untrackable;
        };
        if *w & mask != 0 {
            self.duplicated += 1;
            return Outcome::Duplicate;
        }
        *w |= mask;
        self.distinct += 1;
        let out_of_order = matches!(self.highest, Some(h) if seq < h);
        if out_of_order {
            self.out_of_order += 1;
        } else {
            self.highest = Some(seq);
        }
        Outcome::New { out_of_order }
    }

    /// Folds `other` (another member of the same shared-subscription group, same publisher) into
    /// `self`: a sequence number both received is a duplicate of the group. Out-of-order counts
    /// add up: ordering is only meaningful per connection.
    pub fn merge(&mut self, other: &StreamTracker) {
        if other.bits.len() > self.bits.len() {
            self.bits.resize(other.bits.len(), 0);
        }
        let mut overlap = 0u64;
        for (a, b) in self.bits.iter_mut().zip(other.bits.iter()) {
            overlap += u64::from((*a & *b).count_ones());
            *a |= *b;
        }
        self.distinct = self.distinct + other.distinct - overlap;
        self.duplicated += other.duplicated + overlap;
        self.out_of_order += other.out_of_order;
        self.highest = self.highest.max(other.highest);
    }

    /// Distinct sequence numbers delivered.
    pub fn distinct(&self) -> u64 {
        self.distinct
    }

    /// Deliveries of a sequence number that had already been delivered.
    pub fn duplicated(&self) -> u64 {
        self.duplicated
    }

    /// First deliveries that came after a higher sequence number.
    pub fn out_of_order(&self) -> u64 {
        self.out_of_order
    }
}

/// The run's delivery figures, summed over every stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Messages that should have arrived: each stream's publisher's measured sent count.
    pub expected: u64,
    /// Distinct messages that arrived (duplicates not included).
    pub received: u64,
    /// `expected - received` per stream, never negative.
    pub lost: u64,
    /// Repeated deliveries.
    pub duplicated: u64,
    /// Late first deliveries.
    pub out_of_order: u64,
}

impl Tally {
    /// Adds one stream whose publisher sent `expected` measured messages.
    pub fn add(&mut self, expected: u64, stream: &StreamTracker) {
        self.expected += expected;
        self.received += stream.distinct();
        self.lost += expected.saturating_sub(stream.distinct());
        self.duplicated += stream.duplicated();
        self.out_of_order += stream.out_of_order();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_has_no_anomalies() {
        let mut t = StreamTracker::new();
        for s in 0..1000 {
            assert_eq!(t.record(s), Outcome::New { out_of_order: false });
        }
        let mut tally = Tally::default();
        tally.add(1000, &t);
        assert_eq!(tally, Tally { expected: 1000, received: 1000, lost: 0, duplicated: 0, out_of_order: 0 });
    }

    #[test]
    fn gaps_are_losses_not_disorder() {
        let mut t = StreamTracker::new();
        for s in [0, 1, 5, 9] {
            t.record(s);
        }
        let mut tally = Tally::default();
        tally.add(10, &t);
        assert_eq!(tally.received, 4);
        assert_eq!(tally.lost, 6);
        assert_eq!(tally.out_of_order, 0);
        assert_eq!(tally.duplicated, 0);
    }

    #[test]
    fn late_arrival_is_out_of_order_and_repeat_is_duplicate() {
        let mut t = StreamTracker::new();
        assert_eq!(t.record(0), Outcome::New { out_of_order: false });
        assert_eq!(t.record(2), Outcome::New { out_of_order: false });
        assert_eq!(t.record(1), Outcome::New { out_of_order: true });
        assert_eq!(t.record(2), Outcome::Duplicate);
        assert_eq!(t.record(1), Outcome::Duplicate);
        // After a late arrival the high-water mark is still 2: 3 is in order.
        assert_eq!(t.record(3), Outcome::New { out_of_order: false });
        assert_eq!((t.distinct(), t.duplicated(), t.out_of_order()), (4, 2, 1));
    }

    #[test]
    fn sequence_numbers_across_word_boundaries() {
        let mut t = StreamTracker::new();
        for s in [63, 64, 127, 128, 10_000] {
            assert!(matches!(t.record(s), Outcome::New { .. }));
        }
        assert_eq!(t.record(64), Outcome::Duplicate);
        assert_eq!(t.record(10_000), Outcome::Duplicate);
        assert_eq!(t.distinct(), 5);
    }

    #[test]
    fn huge_sequence_number_is_untracked_not_allocated() {
        let mut t = StreamTracker::new();
        assert_eq!(t.record(u32::MAX), Outcome::Untrackable);
        assert_eq!(t.record(MAX_TRACKED_SEQ), Outcome::Untrackable);
        assert_eq!(t.distinct(), 0);
        assert!(t.bits.is_empty());
    }

    #[test]
    fn merge_counts_overlap_as_duplicates() {
        // Two members of a shared group: each message should go to exactly one of them.
        let mut a = StreamTracker::new();
        let mut b = StreamTracker::new();
        for s in [0, 2, 4, 6] {
            a.record(s);
        }
        for s in [1, 3, 4, 200] {
            b.record(s);
        }
        b.record(3); // a duplicate within b
        a.merge(&b);
        assert_eq!(a.distinct(), 7); // 0 1 2 3 4 6 200
        assert_eq!(a.duplicated(), 2); // 4 reached both members, 3 twice to b
        let mut tally = Tally::default();
        tally.add(201, &a);
        assert_eq!(tally.lost, 194);
    }

    #[test]
    fn merge_into_empty_is_identity() {
        let mut a = StreamTracker::new();
        let mut b = StreamTracker::new();
        for s in [5, 3, 9] {
            b.record(s);
        }
        a.merge(&b);
        assert_eq!((a.distinct(), a.duplicated(), a.out_of_order()), (3, 0, 1));
    }

    #[test]
    fn more_received_than_expected_is_not_negative_loss() {
        let mut t = StreamTracker::new();
        t.record(0);
        t.record(1);
        let mut tally = Tally::default();
        tally.add(1, &t);
        assert_eq!(tally.lost, 0);
        assert_eq!(tally.received, 2);
    }
}
