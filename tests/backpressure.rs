//! Cross-core backpressure: with rings of two slots, a flood of QoS 1 publishes from one core to a
//! subscriber on the other must arrive whole and in order — a full ring pauses the publishers' reads,
//! it never drops.

mod common;

use common::{all_stats, client, qos, skip_unless_coremq, Backend, Broker, Settings};
use coremq::core::home_core;

backend_tests!(full_ring_pauses_publishers_and_loses_nothing);

const PUBLISHERS: usize = 4;
const MESSAGES: u32 = 1500;

/// The first client id with the prefix whose session lives on `core` (of 2).
fn id_on_core(prefix: &str, core: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| home_core(id, 2).index() == core)
        .expect("some id hashes to each core")
}

async fn full_ring_pauses_publishers_and_loses_nothing(b: Backend) {
    if skip_unless_coremq("--ring-capacity") {
        return;
    }
    let settings = Settings {
        // The subscriber's own queue must not be what limits the test: only the rings are small.
        max_queued_messages: Some(1_000_000),
        extra_args: vec!["--ring-capacity".into(), "2".into()],
        ..Settings::default()
    };
    let broker = Broker::start_with(b, &settings);
    let mut sub = client(broker.port, &id_on_core("bp-sub", 1)).await;
    sub.subscribe("bp/+", qos(1)).await;
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        pubs.push(client(broker.port, &id_on_core(&format!("bp-pub{p}"), 0)).await);
    }
    for i in 0..MESSAGES {
        for (p, c) in pubs.iter().enumerate() {
            c.publish_nowait(&format!("bp/{p}"), qos(1), false, i.to_be_bytes().to_vec()).await;
        }
    }
    let mut next = [0u32; PUBLISHERS];
    for m in sub.recv_n(PUBLISHERS * MESSAGES as usize).await {
        let p: usize = m.topic["bp/".len()..].parse().expect("publisher index in topic");
        let seq = u32::from_be_bytes(m.payload[..].try_into().expect("4-byte payload"));
        assert_eq!(seq, next[p], "publisher {p}: messages arrive whole and in order");
        next[p] += 1;
    }
    assert_eq!(next, [MESSAGES; PUBLISHERS]);
    sub.expect_nothing().await;
    let st = broker.stop();
    let all = all_stats(&st.stdout);
    assert_eq!(all.dropped, 0, "nothing dropped: {}", st.stdout);
    assert_eq!(all.messages_in, (PUBLISHERS * MESSAGES as usize) as u64, "{}", st.stdout);
    let all_line = st.stdout.lines().find(|l| l.starts_with("all:")).expect("an all: line");
    let stalls = common::stat_value(all_line, "ring stalls").expect("ring stalls counted");
    assert!(stalls > 0, "two-slot rings must have filled, so the test exercised backpressure: {all_line}");
}
