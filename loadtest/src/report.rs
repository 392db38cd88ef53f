//! The end-of-run figures, as a human summary and as one JSON line. Pure formatting.

use hdrhistogram::Histogram;

use crate::account::Tally;

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
}

impl Latency {
    /// Percentiles of `h`; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Everything printed at the end of a run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Scenario name.
    pub scenario: &'static str,
    /// QoS used.
    pub qos: u8,
    /// Payload bytes.
    pub payload: usize,
    /// The scenario's main count.
    pub connections: u32,
    /// Subscribing connections in the plan.
    pub subscribers: u32,
    /// Measured seconds.
    pub duration_s: f64,
    /// Messages published during the measured window.
    pub sent: u64,
    /// Delivery accounting over every stream.
    pub tally: Tally,
    /// Distinct deliveries per measured second.
    pub recv_rate: f64,
    /// End-to-end latency (storm: CONNECT-to-CONNACK time).
    pub latency: Latency,
    /// Connections that could not be established (or subscribed).
    pub connect_failures: u64,
    /// Connections established.
    pub connects: u64,
    /// Connections established per second of the connect phase.
    pub connect_rate: f64,
    /// Deliveries that did not carry a stamp this run could account for.
    pub foreign: u64,
}

impl Summary {
    /// The one JSON line; keys in the documented order, then the extra ones.
    pub fn json(&self) -> String {
        let t = &self.tally;
        let l = &self.latency;
        format!(
            "{{\"scenario\":\"{}\",\"qos\":{},\"payload\":{},\"connections\":{},\"subscribers\":{},\
             \"duration_s\":{:.3},\"sent\":{},\"received\":{},\"expected\":{},\"lost\":{},\
             \"duplicated\":{},\"out_of_order\":{},\"recv_rate\":{:.1},\"lat_p50_us\":{},\
             \"lat_p90_us\":{},\"lat_p99_us\":{},\"lat_p999_us\":{},\"lat_max_us\":{},\
             \"connect_failures\":{},\"connects\":{},\"connect_rate\":{:.1},\"foreign\":{}}}",
            self.scenario,
            self.qos,
            self.payload,
            self.connections,
            self.subscribers,
            finite(self.duration_s),
            self.sent,
            t.received,
            t.expected,
            t.lost,
            t.duplicated,
            t.out_of_order,
            finite(self.recv_rate),
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.connect_failures,
            self.connects,
            finite(self.connect_rate),
            self.foreign,
        )
    }

    /// The human summary, several lines, no trailing newline.
    pub fn human(&self) -> String {
        let t = &self.tally;
        let l = &self.latency;
        let mut s = format!(
            "scenario {} (qos {}, payload {} B, connections {}, subscribers {}, {:.1} s measured)\n",
            self.scenario, self.qos, self.payload, self.connections, self.subscribers, self.duration_s
        );
        if self.scenario == "storm" {
            s += &format!(
                "connects        {} ok, {} failed, {:.0} connects/s\n\
                 connect latency p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
                self.connects, self.connect_failures, self.connect_rate, l.p50, l.p90, l.p99, l.p999, l.max
            );
            return s;
        }
        s += &format!(
            "sent            {}\n\
             delivered       {} of {} expected ({:.0} msgs/s)\n\
             lost            {}\n\
             duplicated      {}\n\
             out of order    {}\n\
             latency         p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs\n\
             connections     {} ok, {} failed",
            self.sent,
            t.received,
            t.expected,
            self.recv_rate,
            t.lost,
            t.duplicated,
            t.out_of_order,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            self.connects,
            self.connect_failures,
        );
        if self.foreign > 0 {
            s += &format!("\nforeign         {} messages without a stamp of this run", self.foreign);
        }
        s
    }
}

/// JSON has no NaN or infinity.
fn finite(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_shape() {
        let s = Summary {
            scenario: "pairs",
            qos: 1,
            payload: 64,
            connections: 4,
            subscribers: 4,
            duration_s: 3.0,
            sent: 100,
            tally: Tally { expected: 100, received: 98, lost: 2, duplicated: 1, out_of_order: 0 },
            recv_rate: 32.666,
            latency: Latency { p50: 10, p90: 20, p99: 30, p999: 40, max: 50 },
            connect_failures: 0,
            connects: 8,
            connect_rate: f64::NAN,
            foreign: 0,
        };
        let j = s.json();
        assert!(j.starts_with("{\"scenario\":\"pairs\",\"qos\":1,\"payload\":64,"));
        assert!(j.contains("\"sent\":100,\"received\":98,\"expected\":100,\"lost\":2,\"duplicated\":1,"));
        assert!(j.contains("\"recv_rate\":32.7,"));
        assert!(j.contains("\"lat_p999_us\":40,\"lat_max_us\":50,\"connect_failures\":0"));
        assert!(j.contains("\"connect_rate\":0.0"));
        assert!(j.ends_with('}'));
        assert!(!j.contains('\n'));
    }

    #[test]
    fn latency_of_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
        assert_eq!(Latency::of(&h), Latency::default());
        for v in 1..=1000 {
            h.record(v).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.p50, 500);
        assert_eq!(l.max, 1000);
        assert!(l.p99 >= 990 && l.p99 <= 1000);
    }
}
