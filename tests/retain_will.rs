//! Retained messages and wills.

mod common;

use common::raw::{self, Connect, Raw};
use common::tools::{mosquitto_pub, mosquitto_sub};
use common::{client, client_with, ids, qos, Backend, Broker, ClientOpts};

backend_tests!(
    retained_delivered_on_subscribe_at_min_qos,
    retained_replaced_by_newer,
    retained_cleared_by_empty_payload,
    live_delivery_has_retain_flag_clear,
    retained_visible_from_every_core,
    retained_with_mosquitto_tools,
    will_published_on_abnormal_close,
    no_will_after_disconnect,
);

async fn retained_delivered_on_subscribe_at_min_qos(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "ret-pub").await;
    // QoS 0 first: the acknowledged publishes after it prove it has been processed.
    p.publish("ret/c", qos(0), true, "C").await;
    p.publish("ret/a", qos(2), true, "A").await;
    p.publish("ret/b", qos(1), true, "B").await;

    // Exact filters at every granted QoS.
    for g in 0..3u8 {
        let mut s = client(broker.port, &format!("ret-exact-{g}")).await;
        s.subscribe("ret/a", qos(g)).await;
        let m = s.recv().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("ret/a", &b"A"[..]));
        assert!(m.retain, "retained delivery must carry retain=1");
        assert_eq!(m.qos, qos(g.min(2)), "min(retained qos 2, granted {g})");
        s.expect_nothing().await;
    }
    // Wildcard filter: all three, each at min(retained qos, granted).
    for g in 0..3u8 {
        let mut s = client(broker.port, &format!("ret-wild-{g}")).await;
        s.subscribe("ret/+", qos(g)).await;
        let mut got: Vec<_> = s
            .recv_n(3)
            .await
            .into_iter()
            .map(|m| {
                assert!(m.retain, "{m:?}");
                (m.topic, m.qos)
            })
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        let want = vec![
            ("ret/a".to_string(), qos(g.min(2))),
            ("ret/b".to_string(), qos(g.min(1))),
            ("ret/c".to_string(), qos(0)),
        ];
        assert_eq!(got, want, "granted {g}");
        s.expect_nothing().await;
    }
}

async fn retained_replaced_by_newer(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "repl-pub").await;
    p.publish("repl/t", qos(1), true, "one").await;
    p.publish("repl/t", qos(1), true, "two").await;
    for id in ids("repl-sub", 3) {
        let mut s = client(broker.port, &id).await;
        s.subscribe("repl/#", qos(1)).await;
        let m = s.recv().await;
        assert_eq!(&m.payload[..], b"two");
        assert!(m.retain);
        s.expect_nothing().await;
    }
}

async fn retained_cleared_by_empty_payload(b: Backend) {
    let broker = Broker::start(b);
    let mut p = client(broker.port, "clr-pub").await;
    p.publish("clr/t", qos(1), true, "x").await;
    p.publish("clr/keep", qos(1), true, "k").await;
    p.publish("clr/t", qos(1), true, "").await;
    for id in ids("clr-sub", 3) {
        let mut s = client(broker.port, &id).await;
        s.subscribe("clr/#", qos(1)).await;
        let m = s.recv().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), ("clr/keep", &b"k"[..]));
        s.expect_nothing().await;
    }
}

async fn live_delivery_has_retain_flag_clear(b: Backend) {
    let broker = Broker::start(b);
    let (mut s, _) = Raw::connect(broker.port, "live-sub", true).await;
    assert_eq!(s.subscribe(1, &[("live/t", 1)]).await, vec![1]);
    let mut p = client(broker.port, "live-pub").await;
    p.publish("live/t", qos(1), true, "r").await;
    let m = s.recv_publish().await;
    assert_eq!(&m.payload[..], b"r");
    assert!(!m.retain, "live delivery to an existing subscription must have retain=0");
    s.send(&raw::puback(m.pkid)).await;
    // ...but the message was stored: a new subscription gets it with retain=1.
    assert_eq!(s.subscribe(2, &[("live/#", 1)]).await, vec![1]);
    let m = s.recv_publish().await;
    assert!(m.retain && m.payload == b"r", "{m:?}");
    s.send(&raw::puback(m.pkid)).await;
}

async fn retained_visible_from_every_core(b: Backend) {
    let broker = Broker::start(b);
    for (i, pub_id) in ids("xret-pub", 3).iter().enumerate() {
        let topic = format!("xret/{i}");
        let mut p = client(broker.port, pub_id).await;
        p.publish(&topic, qos(1), true, pub_id.as_str()).await;
        for sub_id in ids(&format!("xret-sub{i}"), 6) {
            let mut s = client(broker.port, &sub_id).await;
            s.subscribe(&topic, qos(1)).await;
            let m = s.recv().await;
            assert_eq!(&m.payload[..], pub_id.as_bytes(), "{sub_id} on {topic}");
            assert!(m.retain);
            s.disconnect().await;
        }
    }
}

async fn retained_with_mosquitto_tools(b: Backend) {
    let broker = Broker::start(b);
    let out = mosquitto_pub(broker.port, &["-t", "tool/ret", "-m", "kept", "-r", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let mut sub = mosquitto_sub(broker.port, &["-t", "tool/#", "-q", "1", "-C", "1"]).await;
    assert_eq!(sub.recv().await, "tool/ret kept");
    assert_eq!(sub.wait().await, Some(0));
}

async fn will_published_on_abnormal_close(b: Backend) {
    let broker = Broker::start(b);
    for (i, reset) in [(0, true), (1, false), (2, true)] {
        let topic = format!("will/{i}");
        let mut watch = client(broker.port, &format!("will-watch-{i}")).await;
        watch.subscribe(&topic, qos(2)).await;
        let mut c = Connect::new(&format!("will-client-{i}"), true);
        c.will = Some((topic.clone(), b"dead".to_vec(), 1, true));
        let (r, _) = Raw::connect_with(broker.port, &c).await;
        if reset {
            r.reset();
        } else {
            r.close();
        }
        let m = watch.recv().await;
        assert_eq!((m.topic.as_str(), &m.payload[..]), (topic.as_str(), &b"dead"[..]));
        assert_eq!(m.qos, qos(1), "will QoS 1 (subscription granted 2)");
        assert!(!m.retain, "live delivery of a retained will has retain=0");
        watch.expect_nothing().await;
        // The will was retained: a later subscriber gets it with retain=1 at its QoS.
        let mut late = client(broker.port, &format!("will-late-{i}")).await;
        late.subscribe(&topic, qos(2)).await;
        let m = late.recv().await;
        assert!(m.retain && &m.payload[..] == b"dead" && m.qos == qos(1), "{m:?}");
    }
}

async fn no_will_after_disconnect(b: Backend) {
    let broker = Broker::start(b);
    let mut watch = client(broker.port, "nowill-watch").await;
    watch.subscribe("nowill/#", qos(1)).await;
    for id in ids("nowill", 3) {
        let mut c = Connect::new(&id, true);
        c.will = Some(("nowill/t".into(), b"should-not".to_vec(), 1, false));
        let (r, _) = Raw::connect_with(broker.port, &c).await;
        r.disconnect().await;
    }
    // Also a library client with a will that disconnects cleanly.
    let o =
        ClientOpts { will: Some(("nowill/t".into(), b"lib".to_vec(), qos(1), false)), ..Default::default() };
    client_with(broker.port, "nowill-lib", o).await.disconnect().await;
    watch.expect_nothing().await;
    // Positive control: the watcher still receives normal traffic.
    let mut p = client(broker.port, "nowill-pub").await;
    p.publish("nowill/ok", qos(1), false, "ok").await;
    assert_eq!(&watch.recv().await.payload[..], b"ok");
}
