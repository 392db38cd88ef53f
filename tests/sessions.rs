//! Sessions: clean vs persistent, offline queues and their limits, in-flight window,
//! redelivery with DUP, QoS 2 resumption and session takeover.

mod common;

use common::raw::{self, Pkt, Raw};
use common::{all_stats, client, ids, qos, Backend, Broker, Settings, WAIT};

backend_tests!(
    clean_session_discards_subscriptions,
    persistent_session_queues_qos1_qos2_in_order,
    qos0_queued_offline_only_when_configured,
    offline_queue_bounded_drops_newest,
    inflight_window_limits_outstanding,
    unacked_publish_redelivered_with_dup,
    qos2_subscriber_resumes_with_pubrel,
    qos2_publisher_resumes_with_pubrel,
    takeover_closes_first_connection,
    takeover_keeps_persistent_subscriptions,
);

async fn clean_session_discards_subscriptions(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "clean-pub").await;
    for id in ids("clean", 3) {
        // A clean session's subscription dies with the connection.
        let (mut c, sp) = Raw::connect(broker.port, &id, true).await;
        assert!(!sp);
        assert_eq!(c.subscribe(1, &[("clean/t", 1)]).await, vec![1]);
        c.disconnect().await;
        let (mut c, sp) = Raw::connect(broker.port, &id, true).await;
        assert!(!sp, "clean session must not report a present session");
        p.publish("clean/t", qos(1), false, "x").await;
        c.expect_silence().await;
        c.disconnect().await;

        // A persistent session is discarded by a later clean-session connect.
        let (mut c, _) = Raw::connect(broker.port, &id, false).await;
        assert_eq!(c.subscribe(1, &[("clean/p", 1)]).await, vec![1]);
        c.disconnect().await;
        let (c, sp) = Raw::connect(broker.port, &id, true).await;
        assert!(!sp);
        c.disconnect().await;
        p.publish("clean/p", qos(1), false, "y").await;
        let (mut c, sp) = Raw::connect(broker.port, &id, false).await;
        assert!(!sp, "persistent session should have been discarded by the clean connect");
        c.expect_silence().await;
        c.disconnect().await;
    }
}

async fn persistent_session_queues_qos1_qos2_in_order(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "pers-pub").await;
    for id in ids("pers", 3) {
        let (mut c, sp) = Raw::connect(broker.port, &id, false).await;
        assert!(!sp);
        assert_eq!(c.subscribe(1, &[("pers/t", 2)]).await, vec![2]);
        c.disconnect().await;
        // While offline: QoS 1 and 2 interleaved (queued), QoS 0 (not queued by default).
        for i in 0..10u8 {
            let q = if i % 3 == 2 { 0 } else { 1 + i % 2 };
            p.publish("pers/t", qos(q), false, vec![i, q]).await;
        }
        let (mut c, sp) = Raw::connect(broker.port, &id, false).await;
        assert!(sp, "{id}: session present must be 1");
        let want: Vec<(Vec<u8>, u8)> =
            (0..10u8).filter(|i| i % 3 != 2).map(|i| (vec![i, 1 + i % 2], 1 + i % 2)).collect();
        let got: Vec<(Vec<u8>, u8)> =
            c.recv_acking(want.len()).await.into_iter().map(|m| (m.payload, m.qos)).collect();
        assert_eq!(got, want, "{id}: queued QoS 1/2 in order, QoS 0 not queued");
        c.expect_silence().await;
        // The subscription itself survived too.
        p.publish("pers/t", qos(1), false, "live").await;
        let m = c.recv_publish().await;
        assert_eq!(m.payload, b"live");
        c.send(&raw::puback(m.pkid)).await;
        c.disconnect().await;
    }
}

async fn qos0_queued_offline_only_when_configured(b: Backend) {
    for queue_qos0 in [false, true] {
        let broker = Broker::start_with(b, &Settings { queue_qos0, ..Default::default() });
        let mut p = client(broker.port, "q0-pub").await;
        let (mut c, _) = Raw::connect(broker.port, "q0-sub", false).await;
        assert_eq!(c.subscribe(1, &[("q0/t", 1)]).await, vec![1]);
        c.disconnect().await;
        p.publish("q0/t", qos(0), false, "zero").await;
        p.publish("q0/t", qos(1), false, "one").await;
        let (mut c, sp) = Raw::connect(broker.port, "q0-sub", false).await;
        assert!(sp);
        if queue_qos0 {
            let m = c.recv_publish().await;
            assert_eq!((&m.payload[..], m.qos), (&b"zero"[..], 0), "queue_qos0_messages");
        }
        let m = c.recv_publish().await;
        assert_eq!((&m.payload[..], m.qos), (&b"one"[..], 1), "queue_qos0 = {queue_qos0}");
        c.send(&raw::puback(m.pkid)).await;
        c.expect_silence().await;
    }
}

async fn offline_queue_bounded_drops_newest(b: Backend) {
    let s = Settings { max_queued_messages: Some(5), ..Default::default() };
    let broker = Broker::start_with(b, &s);
    let mut p = client(broker.port, "bound-pub").await;
    let (mut c, _) = Raw::connect(broker.port, "bound-sub", false).await;
    assert_eq!(c.subscribe(1, &[("bound/t", 1)]).await, vec![1]);
    c.disconnect().await;
    for i in 0..10u8 {
        p.publish("bound/t", qos(1), false, vec![i]).await;
    }
    let (mut c, sp) = Raw::connect(broker.port, "bound-sub", false).await;
    assert!(sp);
    for i in 0..5u8 {
        let m = c.recv_publish().await;
        assert_eq!(m.payload, vec![i], "the oldest 5 are kept (drop-newest)");
        c.send(&raw::puback(m.pkid)).await;
    }
    c.expect_silence().await;
    c.disconnect().await;
    p.disconnect().await;
    if !common::use_mosquitto() {
        let st = broker.stop();
        assert!(st.status.success(), "{st:?}");
        let all = all_stats(&st.stdout);
        assert_eq!(all.dropped, 5, "dropped count in {:?}", st.stdout);
        assert_eq!((all.messages_in, all.messages_out), (10, 5), "{:?}", st.stdout);
    }
}

async fn inflight_window_limits_outstanding(b: Backend) {
    let s = Settings { max_inflight: Some(2), ..Default::default() };
    let broker = Broker::start_with(b, &s);
    let mut p = client(broker.port, "win-pub").await;
    for id in ids("win-sub", 2) {
        let (mut c, _) = Raw::connect(broker.port, &id, true).await;
        assert_eq!(c.subscribe(1, &[("win/t", 1)]).await, vec![1]);
        for i in 0..6u8 {
            p.publish("win/t", qos(1), false, vec![i]).await;
        }
        // Without acks only two are outstanding.
        let first = c.recv_publish().await;
        let second = c.recv_publish().await;
        assert_eq!((first.payload.clone(), second.payload.clone()), (vec![0], vec![1]));
        c.expect_silence().await;
        // Each ack opens the window for exactly one more, in order.
        let mut outstanding = std::collections::VecDeque::from([first, second]);
        for next in 2..6u8 {
            let oldest = outstanding.pop_front().unwrap();
            c.send(&raw::puback(oldest.pkid)).await;
            let m = c.recv_publish().await;
            assert_eq!(m.payload, vec![next]);
            outstanding.push_back(m);
            // mosquitto 2.0.11 refills its window one message early after the first ack
            // (3 outstanding with max_inflight_messages 2), so only order is checked there.
            if !common::use_mosquitto() {
                c.expect_silence().await;
            }
        }
        for m in outstanding {
            c.send(&raw::puback(m.pkid)).await;
        }
        c.expect_silence().await;
        c.disconnect().await;
    }
}

async fn unacked_publish_redelivered_with_dup(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "dup-pub").await;
    for (i, id) in ids("dup-sub", 3).iter().enumerate() {
        let (mut c, _) = Raw::connect(broker.port, id, false).await;
        assert_eq!(c.subscribe(1, &[("dup/t", 2)]).await, vec![2]);
        p.publish("dup/t", qos(1), false, "one").await;
        p.publish("dup/t", qos(2), false, "two").await;
        let m1 = c.recv_publish().await;
        let m2 = c.recv_publish().await;
        assert!(!m1.dup && !m2.dup);
        assert_eq!((&m1.payload[..], &m2.payload[..]), (&b"one"[..], &b"two"[..]));
        // Disconnect without acknowledging either (abruptly for one id, cleanly otherwise).
        if i == 1 {
            c.reset();
        } else {
            c.disconnect().await;
        }
        let (mut c, sp) = Raw::connect(broker.port, id, false).await;
        assert!(sp);
        let r1 = c.recv_publish().await;
        let r2 = c.recv_publish().await;
        assert!(r1.dup && r2.dup, "redeliveries must have DUP=1: {r1:?} {r2:?}");
        assert_eq!((r1.qos, &r1.payload[..]), (1, &b"one"[..]));
        assert_eq!((r2.qos, &r2.payload[..]), (2, &b"two"[..]));
        c.send(&raw::puback(r1.pkid)).await;
        c.send(&raw::pubrec(r2.pkid)).await;
        assert_eq!(c.recv().await, Pkt::PubRel(r2.pkid));
        c.send(&raw::pubcomp(r2.pkid)).await;
        c.expect_silence().await;
        c.disconnect().await;
        // Fully acknowledged: nothing comes back on the next reconnect.
        let (mut c, _) = Raw::connect(broker.port, id, false).await;
        c.expect_silence().await;
        c.disconnect().await;
    }
}

async fn qos2_subscriber_resumes_with_pubrel(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "q2s-pub").await;
    for id in ids("q2s-sub", 3) {
        let (mut c, _) = Raw::connect(broker.port, &id, false).await;
        assert_eq!(c.subscribe(1, &[("q2s/t", 2)]).await, vec![2]);
        p.publish("q2s/t", qos(2), false, "m").await;
        let m = c.recv_publish().await;
        assert_eq!(m.qos, 2);
        c.send(&raw::pubrec(m.pkid)).await;
        assert_eq!(c.recv().await, Pkt::PubRel(m.pkid));
        // Gone before PUBCOMP.
        c.disconnect().await;
        let (mut c, sp) = Raw::connect(broker.port, &id, false).await;
        assert!(sp);
        // The broker resumes with PUBREL, never re-sending the PUBLISH.
        assert_eq!(c.recv().await, Pkt::PubRel(m.pkid));
        c.send(&raw::pubcomp(m.pkid)).await;
        c.expect_silence().await;
        c.disconnect().await;
    }
}

async fn qos2_publisher_resumes_with_pubrel(b: Backend) {
    let broker = Broker::start(b);
    let mut sub = client(broker.port, "q2p-sub").await;
    sub.subscribe("q2p/#", qos(2)).await;
    for (i, id) in ids("q2p-pub", 3).iter().enumerate() {
        let topic = format!("q2p/{i}");
        let (mut p, _) = Raw::connect(broker.port, id, false).await;
        p.send(&raw::publish(&topic, 2, false, false, 9, b"exactly-once")).await;
        assert_eq!(p.recv().await, Pkt::PubRec(9));
        p.disconnect().await;
        let (mut p, sp) = Raw::connect(broker.port, id, false).await;
        assert!(sp);
        p.send(&raw::pubrel(9)).await;
        assert_eq!(p.recv().await, Pkt::PubComp(9));
        let m = sub.recv().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), (topic.as_str(), &b"exactly-once"[..]));
        sub.expect_nothing().await;
        p.disconnect().await;
    }
}

async fn takeover_closes_first_connection(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "tk-pub").await;
    // Several ids and several connections each, so that both the session's core and the
    // accepting core vary.
    for id in ids("tk", 4) {
        let (mut first, _) = Raw::connect(broker.port, &id, true).await;
        assert_eq!(first.subscribe(1, &[("tk/t", 1)]).await, vec![1]);
        let (mut second, sp) = Raw::connect(broker.port, &id, true).await;
        assert!(!sp);
        let seen = first.expect_closed(WAIT).await;
        assert!(seen.is_empty(), "{id}: old connection got {seen:?}");
        assert_eq!(second.subscribe(1, &[("tk/t", 1)]).await, vec![1]);
        p.publish("tk/t", qos(1), false, id.as_str()).await;
        let m = second.recv_publish().await;
        assert_eq!(m.payload, id.as_bytes());
        second.send(&raw::puback(m.pkid)).await;
        second.expect_silence().await;
        second.disconnect().await;
    }
}

async fn takeover_keeps_persistent_subscriptions(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "tkp-pub").await;
    for id in ids("tkp", 4) {
        let (mut first, _) = Raw::connect(broker.port, &id, false).await;
        assert_eq!(first.subscribe(1, &[("tkp/t", 1)]).await, vec![1]);
        let (mut second, sp) = Raw::connect(broker.port, &id, false).await;
        assert!(sp, "{id}: taken-over persistent session must be present");
        first.expect_closed(WAIT).await;
        p.publish("tkp/t", qos(1), false, id.as_str()).await;
        let m = second.recv_publish().await;
        assert_eq!(m.payload, id.as_bytes());
        second.send(&raw::puback(m.pkid)).await;
        second.expect_silence().await;
        // Clean up so the next id starts from nothing.
        second.disconnect().await;
        let (c, _) = Raw::connect(broker.port, &id, true).await;
        c.disconnect().await;
    }
}
