//! A new subscription over more retained QoS 1 messages than its queue limit (plus the overflow room for
//! messages in transit) gets every one of them, and the live messages after them too: the retained
//! backlog is queued past the limits instead of being dropped (before: 8,412 of 20,000 arrived with
//! `--max-queued-messages 100`).

mod common;

use std::collections::HashSet;

use common::{all_stats, client, qos, skip_unless_coremq, Backend, Broker, Settings};

backend_tests!(retained_backlog_past_the_queue_limit_arrives_whole);

const RETAINED: usize = 2_000;
const LIVE: usize = 300;

async fn retained_backlog_past_the_queue_limit_arrives_whole(b: Backend) {
    if skip_unless_coremq("--ring-capacity") {
        return;
    }
    // Limit + overflow room (limit again + one ring per core) = 50 + 50 + 2 × 16: far below RETAINED.
    let settings = Settings {
        max_queued_messages: Some(50),
        extra_args: vec!["--ring-capacity".into(), "16".into()],
        ..Settings::default()
    };
    let broker = Broker::start_with(b, &settings);
    let mut publisher = client(broker.port, "rb-pub").await;
    for i in 0..RETAINED {
        publisher.publish(&format!("rb/r/{i}"), qos(1), true, vec![b'r'; 64]).await;
    }
    let mut sub = client(broker.port, "rb-sub").await;
    sub.subscribe("rb/#", qos(1)).await;
    // Live messages right behind the backlog: each acknowledged before the next is sent.
    for i in 0..LIVE {
        publisher.publish(&format!("rb/live/{i}"), qos(1), false, vec![b'l'; 64]).await;
    }
    let got = sub.recv_n(RETAINED + LIVE).await;
    let topics: HashSet<String> = got.iter().map(|p| p.topic.clone()).collect();
    for i in 0..RETAINED {
        assert!(topics.contains(&format!("rb/r/{i}")), "retained rb/r/{i} never arrived");
    }
    for i in 0..LIVE {
        assert!(topics.contains(&format!("rb/live/{i}")), "live rb/live/{i} never arrived");
    }
    assert!(got.iter().filter(|p| p.topic.starts_with("rb/r/")).all(|p| p.retain), "backlog has RETAIN set");
    // Live messages of one publisher arrive in the order it sent them (MQTT-4.6.0-2 ordered topics).
    let live: Vec<usize> =
        got.iter().filter_map(|p| p.topic.strip_prefix("rb/live/").and_then(|n| n.parse().ok())).collect();
    assert!(live.windows(2).all(|w| w[0] < w[1]), "live messages out of order");
    drop(sub);
    drop(publisher);
    let stopped = broker.stop();
    assert_eq!(all_stats(&stopped.stdout).dropped, 0, "broker report:\n{}", stopped.stdout);
}
