//! Fan-out across cores: one publisher, many subscribers with different client ids.

mod common;

use common::{client, ids, qos, Backend, Broker};

backend_tests!(fan_out_qos0, fan_out_qos1, fan_out_many_publishers_keep_per_publisher_order);

const SUBSCRIBERS: usize = 20;
const MESSAGES: u32 = 200;

async fn fan_out(b: Backend, q: u8) {
    let broker = Broker::start(b);
    let mut subs = Vec::new();
    for id in ids(&format!("fan{q}"), SUBSCRIBERS) {
        let mut s = client(broker.port, &id).await;
        s.subscribe("a/b", qos(q)).await;
        subs.push(s);
    }
    let p = client(broker.port, &format!("fan{q}-pub")).await;
    for i in 0..MESSAGES {
        p.publish_nowait("a/b", qos(q), false, i.to_be_bytes().to_vec()).await;
    }
    for s in subs.iter_mut() {
        let got: Vec<u32> = s
            .recv_n(MESSAGES as usize)
            .await
            .into_iter()
            .map(|m| {
                assert_eq!(m.qos, qos(q));
                u32::from_be_bytes(m.payload[..].try_into().expect("4-byte payload"))
            })
            .collect();
        let want: Vec<u32> = (0..MESSAGES).collect();
        assert_eq!(got, want, "{}: every message, in publish order", s.id);
    }
    common::expect_nothing_all(&mut subs).await;
}

async fn fan_out_qos0(b: Backend) {
    fan_out(b, 0).await;
}

async fn fan_out_qos1(b: Backend) {
    fan_out(b, 1).await;
}

async fn fan_out_many_publishers_keep_per_publisher_order(b: Backend) {
    let broker = Broker::start(b);
    let mut subs = Vec::new();
    for id in ids("mfan-sub", 6) {
        let mut s = client(broker.port, &id).await;
        s.subscribe("m/+", qos(1)).await;
        subs.push(s);
    }
    let mut pubs = Vec::new();
    for (i, id) in ids("mfan-pub", 4).iter().enumerate() {
        pubs.push((i as u8, client(broker.port, id).await));
    }
    // Publishers run concurrently; ordering is only guaranteed per publisher.
    let mut tasks = Vec::new();
    for (i, p) in pubs {
        tasks.push(tokio::spawn(async move {
            for n in 0..50u8 {
                p.publish_nowait(&format!("m/{i}"), qos(1), false, vec![i, n]).await;
            }
            p
        }));
    }
    let mut keep = Vec::new();
    for t in tasks {
        keep.push(t.await.expect("publisher task"));
    }
    for s in subs.iter_mut() {
        let mut next = [0u8; 4];
        for m in s.recv_n(200).await {
            let (i, n) = (m.payload[0] as usize, m.payload[1]);
            assert_eq!(n, next[i], "{}: publisher {i} out of order", s.id);
            next[i] += 1;
        }
        assert_eq!(next, [50; 4]);
    }
    common::expect_nothing_all(&mut subs).await;
}
