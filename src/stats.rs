//! Per-core counters and the in-broker latency histogram, merged and printed at shutdown.
//!
//! Latency is measured from the moment a PUBLISH was read from the publisher's socket to the moment the
//! write carrying its delivery to a subscriber completed, in microseconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency the histogram tracks exactly (60 s); larger values are clamped, never lost.
const MAX_TRACKED_US: u64 = 60_000_000;

#[derive(Clone, Debug)]
pub struct Stats {
    /// Client connections accepted.
    pub connections: u64,
    /// PUBLISH packets received from clients (and wills published).
    pub msgs_in: u64,
    /// PUBLISH packets written to subscribers.
    pub msgs_out: u64,
    /// Messages dropped because a queue was full (session queue or a slow subscriber's outbox).
    pub dropped: u64,
    /// Batches whose cross-core messages did not all fit a ring: each one paused this core's readers.
    pub ring_stalls: u64,
    /// QoS 1/2 PUBLISHes held unacknowledged because a matching subscriber's queue was full.
    pub held: u64,
    /// PUBLISHes, subscriptions and wills the ACL refused.
    pub denied: u64,
    /// Times a quiet connection stopped reading and waited for its socket in the idle set.
    pub parks: u64,
    /// Connections refused before a session, by reason (the CONNACK code's meaning, or why none was sent).
    pub refused: BTreeMap<&'static str, u64>,
    /// Established connections the broker closed, by reason (protocol errors, keep-alive, takeover).
    pub closed: BTreeMap<&'static str, u64>,
    pub latency_us: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            connections: 0,
            msgs_in: 0,
            msgs_out: 0,
            dropped: 0,
            ring_stalls: 0,
            held: 0,
            denied: 0,
            parks: 0,
            refused: BTreeMap::new(),
            closed: BTreeMap::new(),
            // 3 significant figures over 1 µs .. 60 s: ~100 KB per core, allocated once.
            latency_us: Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("constant bounds are valid"),
        }
    }

    /// Counts a connection refused before it got a session. Error paths only: may allocate.
    pub fn count_refused(&mut self, reason: &'static str) {
        *self.refused.entry(reason).or_default() += 1;
    }

    /// Counts an established connection the broker closed.
    pub fn count_closed(&mut self, reason: &'static str) {
        *self.closed.entry(reason).or_default() += 1;
    }

    /// Records one delivery's in-broker latency.
    pub fn record_latency(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_TRACKED_US);
        // Within bounds by the clamp above, so this cannot fail.
        let _ = self.latency_us.record(us);
    }

    pub fn merge(&mut self, other: &Stats) {
        self.connections += other.connections;
        self.msgs_in += other.msgs_in;
        self.msgs_out += other.msgs_out;
        self.dropped += other.dropped;
        self.ring_stalls += other.ring_stalls;
        self.held += other.held;
        self.denied += other.denied;
        self.parks += other.parks;
        for (k, v) in &other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        for (k, v) in &other.closed {
            *self.closed.entry(k).or_default() += v;
        }
        let _ = self.latency_us.add(&other.latency_us);
    }

    /// Two lines: counters, then latency percentiles.
    pub fn render(&self, label: &str) -> String {
        let h = &self.latency_us;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{label}: connections {}, messages in {}, messages out {}, dropped {}, ring stalls {}, held {}, denied {}, idle parks {}",
            self.connections,
            self.msgs_in,
            self.msgs_out,
            self.dropped,
            self.ring_stalls,
            self.held,
            self.denied,
            self.parks
        );
        let _ = writeln!(
            s,
            "  latency (us): count {} p50 {} p90 {} p99 {} p99.9 {} max {}",
            h.len(),
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.90),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
        for (title, map) in [("refused", &self.refused), ("closed", &self.closed)] {
            if !map.is_empty() {
                let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(s, "  {title}: {}", parts.join(", "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_and_render() {
        let mut a = Stats::new();
        a.connections = 2;
        a.msgs_in = 3;
        a.record_latency(Duration::from_micros(10));
        let mut b = Stats::new();
        b.msgs_out = 5;
        b.dropped = 1;
        b.parks = 4;
        b.record_latency(Duration::from_micros(1000));
        a.merge(&b);
        let r = a.render("all");
        assert!(
            r.starts_with(
                "all: connections 2, messages in 3, messages out 5, dropped 1, ring stalls 0, held 0, denied 0, idle parks 4\n"
            ),
            "{r}"
        );
        assert!(r.contains("count 2 "), "{r}");
        assert_eq!(a.latency_us.max(), a.latency_us.highest_equivalent(1000));
    }

    #[test]
    fn huge_latency_is_clamped_not_lost() {
        let mut a = Stats::new();
        a.record_latency(Duration::from_secs(3600));
        assert_eq!(a.latency_us.len(), 1);
    }
}
