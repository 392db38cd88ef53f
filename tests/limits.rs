//! Configured limits answer with the code the spec names and close (or refuse) only the offending
//! connection; the shutdown report counts refusals and closes by reason.

mod common;

use common::raw::{self, Connect, Pkt, Raw};
use common::{all_stats, client, qos, skip_unless_coremq, Backend, Broker, Settings, WAIT};

backend_tests!(
    max_connections_refuses_with_0x03_and_frees_places,
    long_client_id_rejected_with_0x02,
    subscription_limit_and_topic_levels_get_0x80,
    publish_with_too_many_levels_closes_only_that_connection,
);

fn coremq_with(args: &[&str]) -> Settings {
    Settings { extra_args: args.iter().map(|s| s.to_string()).collect(), ..Settings::default() }
}

/// Connects, retrying for up to a second while the broker answers 0x03 (a place not yet released).
async fn connect_when_room(port: u16, id: &str) -> Raw {
    for _ in 0..50 {
        let mut r = Raw::tcp(port).await;
        r.send(&Connect::new(id, true).encode()).await;
        match r.recv().await {
            Pkt::ConnAck { code: 0, .. } => return r,
            Pkt::ConnAck { code: 0x03, .. } => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
    panic!("{id}: no place freed within a second");
}

async fn max_connections_refuses_with_0x03_and_frees_places(b: Backend) {
    if skip_unless_coremq("--max-connections") {
        return;
    }
    let broker = Broker::start_with(b, &coremq_with(&["--max-connections", "3"]));
    // The harness's readiness probe may hold a place for a moment after it closed: retry on 0x03.
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(connect_when_room(broker.port, &format!("mc-{i}")).await);
    }
    let mut extra = Raw::tcp(broker.port).await;
    extra.send(&Connect::new("mc-extra", true).encode()).await;
    assert_eq!(extra.recv().await, Pkt::ConnAck { session_present: false, code: 0x03 });
    extra.expect_closed(WAIT).await;
    // The held connections still work.
    held[0].send(&raw::pingreq()).await;
    assert_eq!(held[0].recv().await, Pkt::PingResp);
    // A closed connection frees its place (whichever core served it).
    held.pop().expect("three held").disconnect().await;
    let _again = connect_when_room(broker.port, "mc-again").await;
    drop(held);
    let st = broker.stop();
    assert!(
        st.stdout.contains("refused: ") && st.stdout.contains("max_connections reached"),
        "{}",
        st.stdout
    );
}

async fn long_client_id_rejected_with_0x02(b: Backend) {
    if skip_unless_coremq("--config max_client_id_len") {
        return;
    }
    let dir = common::temp_dir("cidlen");
    let conf = dir.join("c.toml");
    std::fs::write(&conf, "max_client_id_len = 30\n").expect("write config");
    let broker = Broker::start_with(b, &coremq_with(&["--config", conf.to_str().expect("utf-8 path")]));
    let mut r = Raw::tcp(broker.port).await;
    r.send(&Connect::new(&"x".repeat(31), true).encode()).await;
    assert_eq!(r.recv().await, Pkt::ConnAck { session_present: false, code: 0x02 });
    r.expect_closed(WAIT).await;
    let (_ok, _) = Raw::connect(broker.port, &"y".repeat(30), true).await;
    let st = broker.stop();
    assert!(st.stdout.contains("identifier rejected 1"), "{}", st.stdout);
    let _ = std::fs::remove_dir_all(dir);
}

async fn subscription_limit_and_topic_levels_get_0x80(b: Backend) {
    if skip_unless_coremq("--config max_subscriptions_per_client") {
        return;
    }
    let dir = common::temp_dir("sublim");
    let conf = dir.join("c.toml");
    std::fs::write(&conf, "max_subscriptions_per_client = 2\nmax_topic_levels = 3\n").expect("write config");
    let broker = Broker::start_with(b, &coremq_with(&["--config", conf.to_str().expect("utf-8 path")]));
    let (mut r, _) = Raw::connect(broker.port, "sublim", true).await;
    assert_eq!(r.subscribe(1, &[("a", 1), ("b", 1), ("c", 1)]).await, vec![1, 1, 0x80]);
    // Re-subscribing to a filter it already has is not a new subscription.
    assert_eq!(r.subscribe(2, &[("a", 2)]).await, vec![2]);
    let (mut r2, _) = Raw::connect(broker.port, "levels", true).await;
    assert_eq!(r2.subscribe(3, &[("x/y/z", 0), ("x/y/z/w", 0), ("x/+/#", 0)]).await, vec![0, 0x80, 0]);
    // Still connected and served.
    r2.send(&raw::pingreq()).await;
    assert_eq!(r2.recv().await, Pkt::PingResp);
    let _ = std::fs::remove_dir_all(dir);
}

async fn publish_with_too_many_levels_closes_only_that_connection(b: Backend) {
    if skip_unless_coremq("--config max_topic_levels") {
        return;
    }
    let dir = common::temp_dir("levels");
    let conf = dir.join("c.toml");
    std::fs::write(&conf, "max_topic_levels = 3\n").expect("write config");
    let broker = Broker::start_with(b, &coremq_with(&["--config", conf.to_str().expect("utf-8 path")]));
    let mut sub = client(broker.port, "lv-sub").await;
    sub.subscribe("#", qos(0)).await;
    let (mut bad, _) = Raw::connect(broker.port, "lv-bad", true).await;
    bad.send(&raw::publish("a/b/c/d", 0, false, false, 0, b"deep")).await;
    bad.expect_closed(WAIT).await;
    let mut good = client(broker.port, "lv-good").await;
    good.publish("a/b/c", qos(1), false, "ok").await;
    assert_eq!(&sub.recv().await.payload[..], b"ok");
    sub.expect_nothing().await;
    let st = broker.stop();
    let all = all_stats(&st.stdout);
    assert_eq!(all.messages_in, 1, "the deep PUBLISH was not routed: {}", st.stdout);
    assert!(st.stdout.contains("too many topic levels in PUBLISH 1"), "{}", st.stdout);
    let _ = std::fs::remove_dir_all(dir);
}
