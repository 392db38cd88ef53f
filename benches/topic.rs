//! Subscription index: PUBLISH-path lookups against 10, 10k and 1M subscriptions, and SUBSCRIBE /
//! UNSUBSCRIBE churn.
//!
//! The filters model a fleet: `site/{s}/dev/{d}/{metric}` with 100 devices per site and 10 metrics per
//! device, so 1M subscriptions span 1,000 sites. Subscription `i` belongs to session `i`. About 85% are
//! exact; 10% have one `+` (3% on the site level, 4% on the device level, 3% on the metric) and 5% end in
//! `#` (3% `site/{s}/dev/{d}/#`, 2% `site/{s}/#`). Wildcard subscriptions to the same filter share one
//! trie node with a long subscriber list, as many clients watching the same thing do.

use std::cell::OnceCell;
use std::hint::black_box;

use coremq::protocol::QoS;
use coremq::topic::SubscriptionIndex;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

// The broker runs on mimalloc (src/main.rs): the churn bench allocates and frees trie nodes.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const METRICS: [&str; 10] = ["temp", "hum", "pres", "co2", "volt", "amp", "rssi", "batt", "lux", "state"];
const DEVICES_PER_SITE: usize = 100;
const PER_SITE: usize = DEVICES_PER_SITE * METRICS.len();
const SIZES: [(usize, &str); 3] = [(10, "10"), (10_000, "10k"), (1_000_000, "1M")];
/// Distinct topics cycled through by a lookup bench, so a large index is not measured with one hot path.
const TOPICS: usize = 1024;

/// splitmix64: a deterministic generator, so every run builds the same index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Site, device and metric of subscription `i`.
fn coords(i: usize) -> (usize, usize, &'static str) {
    (i / PER_SITE, (i / METRICS.len()) % DEVICES_PER_SITE, METRICS[i % METRICS.len()])
}

fn filter(i: usize, rng: &mut Rng) -> String {
    let (s, d, m) = coords(i);
    match rng.below(100) {
        0..=84 => format!("site/{s}/dev/{d}/{m}"),
        85..=87 => format!("site/+/dev/{d}/{m}"),
        88..=91 => format!("site/{s}/dev/+/{m}"),
        92..=94 => format!("site/{s}/dev/{d}/+"),
        95..=97 => format!("site/{s}/dev/{d}/#"),
        _ => format!("site/{s}/#"),
    }
}

fn build(n: usize) -> SubscriptionIndex<usize, QoS> {
    let mut rng = Rng(n as u64);
    let mut index = SubscriptionIndex::new();
    for i in 0..n {
        index.insert(&filter(i, &mut rng), i, QoS::AtLeastOnce);
    }
    index
}

/// Topics that some device of the index publishes on: they match its exact filter (when that one was not
/// drawn as a wildcard) and the wildcard filters covering it.
fn hit_topics(n: usize) -> Vec<String> {
    let mut rng = Rng(!(n as u64));
    (0..TOPICS)
        .map(|_| {
            let (s, d, m) = coords(rng.below(n));
            format!("site/{s}/dev/{d}/{m}")
        })
        .collect()
}

/// Topics that match nothing but still walk the `site/+/...` branch: a site and a device past the ones
/// subscribed to, and a metric nobody uses.
fn miss_topics(n: usize) -> Vec<String> {
    let sites = n.div_ceil(PER_SITE);
    (0..TOPICS).map(|k| format!("site/{}/dev/{}/unknown", sites + k, DEVICES_PER_SITE + k % 7)).collect()
}

fn count_matches(index: &SubscriptionIndex<usize, QoS>, topic: &str) -> usize {
    let mut n = 0;
    index.for_each_match(topic, |key, qos| {
        black_box((key, qos));
        n += 1;
    });
    n
}

/// Builds the index of `n` subscriptions, checks the topic sets against it and prints its shape.
fn build_checked(n: usize, label: &str, hits: &[String], misses: &[String]) -> SubscriptionIndex<usize, QoS> {
    let index = build(n);
    let total: usize = hits.iter().map(|t| count_matches(&index, t)).sum();
    assert!(total > 0, "hit topics must match something");
    assert!(misses.iter().all(|t| count_matches(&index, t) == 0), "miss topics must match nothing");
    eprintln!(
        "index {label}: {} subscriptions on {} filters, {} nodes; a hit topic matches {:.1} subscriptions \
         on average",
        index.subscription_count(),
        index.filter_count(),
        index.node_count(),
        total as f64 / hits.len() as f64
    );
    index
}

fn bench_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic/for_each_match");
    group.throughput(Throughput::Elements(1));
    for (n, label) in SIZES {
        let hits = hit_topics(n);
        let misses = miss_topics(n);
        // Built on first use, so that running only some benches (a filter on the command line) does not
        // pay for the 1M build.
        let index = OnceCell::new();
        for (kind, topics) in [("hit", &hits), ("miss", &misses)] {
            group.bench_function(BenchmarkId::new(kind, label), |b| {
                let index = index.get_or_init(|| build_checked(n, label, &hits, &misses));
                let mut next = topics.iter().cycle();
                b.iter(|| {
                    let topic = next.next().map_or("", String::as_str);
                    count_matches(index, black_box(topic))
                });
            });
        }
    }
    group.finish();
}

fn bench_churn(c: &mut Criterion) {
    let n = 10_000;
    let mut index = build(n);
    let (filters, subscriptions) = (index.filter_count(), index.subscription_count());
    let mut rng = Rng(7);
    // A new session subscribing to a filter that already has subscribers: only a subscriber list changes.
    let existing: Vec<String> = (0..TOPICS)
        .map(|_| {
            let (s, d, m) = coords(rng.below(n));
            format!("site/{s}/dev/{d}/{m}")
        })
        .collect();
    // A session subscribing to a filter nobody has: creates a leaf, and the remove prunes it again.
    let fresh: Vec<String> = (0..TOPICS)
        .map(|k| {
            let (s, d, _) = coords(rng.below(n));
            format!("site/{s}/dev/{d}/extra{k}")
        })
        .collect();

    let mut group = c.benchmark_group("topic/churn_10k");
    group.throughput(Throughput::Elements(1));
    for (kind, list) in [("existing_filter", &existing), ("new_filter", &fresh)] {
        group.bench_function(kind, |b| {
            let mut next = list.iter().cycle();
            b.iter(|| {
                let f = next.next().map_or("", String::as_str);
                let inserted = index.insert(black_box(f), n, QoS::AtMostOnce);
                let removed = index.remove(black_box(f), n);
                black_box((inserted, removed))
            });
        });
    }
    group.finish();
    assert_eq!((index.filter_count(), index.subscription_count()), (filters, subscriptions));
}

criterion_group!(benches, bench_match, bench_churn);
criterion_main!(benches);
