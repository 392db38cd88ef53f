//! Persistence (issue 7): retained messages, persistent sessions with their subscriptions, queued and
//! in-flight QoS 1/2 messages and inbound QoS 2 packet ids survive a restart of the broker on the same
//! `data_dir`; with `fsync = "always"` every acknowledged message survives a `kill -9`; a torn or corrupt
//! log tail is reported and cut off instead of stopping the broker; recovery works with another
//! `--threads` than the one the state was written with.
//!
//! Every test starts a real coremq from a config file holding the `[persistence]` table (`data_dir` is
//! relative to the config file) and restarts it on the same port, with raw 3.1.1 / v5 clients (exact
//! packet ids, DUP flags and session-present bits), rumqttc and `mosquitto_sub` as the independent
//! clients. All of it is coremq-specific (mosquitto's persistence is a periodic snapshot), so every test is
//! skipped under `COREMQ_TEST_BROKER=mosquitto`.

mod common;
// Shared with tests/v5.rs, which uses all of it; this file only part.
#[allow(dead_code)]
#[path = "common/raw5.rs"]
mod raw5;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw::{self, Connect, Msg, Pkt, Raw, Recv};
use common::{client, free_port, load, qos, run_coremq_to_exit, skip_unless_coremq, temp_dir, tools};
use common::{Backend, Broker, Stopped, SILENCE, WAIT};
use raw5::{prop, sub_opts, Connect5, Msg5, Pkt5, Props, Raw5, Val};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::timeout;

backend_tests!(
    clean_restart_keeps_sessions_and_retained,
    clean_restart_fsync_interval,
    clean_restart_fsync_never,
    kill9_loses_no_acknowledged_qos1_message,
    qos2_outbound_state_survives_restart,
    qos2_inbound_packet_id_survives_restart,
    truncated_log_tail_is_cut_and_reported,
    corrupted_log_tail_is_cut_and_reported,
    restart_with_another_thread_count,
    second_broker_on_the_same_data_dir_is_refused,
);

/// A config-file problem in `[persistence]` is a startup error naming the key (no backend variants: the
/// broker never gets as far as starting a core).
#[test]
fn bad_fsync_policy_is_a_config_error() {
    if skip_unless_coremq("persistence config") {
        return;
    }
    let dir = temp_dir("persist-conf");
    let conf = dir.join("coremq.toml");
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            "[[listener]]\nbind = \"127.0.0.1:{port}\"\n\n[persistence]\nenabled = true\n\
             data_dir = \"data\"\nfsync = \"sometimes\"\n"
        ),
    )
    .expect("write config");
    let st = run_coremq_to_exit(&["--config".to_string(), conf.display().to_string()]);
    assert!(!st.status.success(), "fsync = \"sometimes\" must be refused: {st:?}");
    assert!(st.stderr.contains("fsync"), "the error names the key: {:?}", st.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second broker given a data directory another one is using (here on another port) exits with one
/// line naming the directory, before it recovers or writes anything; the first keeps serving.
async fn second_broker_on_the_same_data_dir_is_refused(b: Backend) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, "persist-lock", "interval");
    let first = node.start(1);
    let before = files_under(&node.data_dir());
    let other = free_port();
    let st = run_coremq_to_exit(&[
        "--config".into(),
        node.conf.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{other}"),
        "--backend".into(),
        b.as_str().into(),
    ]);
    assert_eq!(st.status.code(), Some(2), "second broker on the same data_dir: {st:?}");
    assert!(
        st.stderr.contains("in use by another coremq process") && st.stderr.contains("data"),
        "the error names the directory: {:?}",
        st.stderr
    );
    assert_eq!(st.stderr.lines().count(), 1, "one line: {:?}", st.stderr);
    assert_eq!(files_under(&node.data_dir()), before, "the refused broker wrote nothing");
    let mut c = client(node.port, "lock-check").await;
    c.subscribe("lock/t", qos(1)).await;
    c.publish("lock/t", qos(1), false, "still here").await;
    assert_eq!(c.recv().await.payload.as_ref(), b"still here");
    drop(c);
    stop_clean(first);
    // Once the first has exited, the directory is free again.
    let again = node.start(1);
    stop_clean(again);
}

// ---------------------------------------------------------------------------------------------
// Harness: one broker "installation" (config file, data directory, port) started many times
// ---------------------------------------------------------------------------------------------

/// A config file with a `[persistence]` table in a private directory, and the port every start of it
/// listens on, so that clients reconnect to "the same broker" after a restart.
struct Node {
    backend: Backend,
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
    extra: Vec<String>,
}

impl Node {
    /// A node whose data lives in `<dir>/data` (given relative to the config file, as `[auth]` paths
    /// are) with the `fsync` policy given.
    fn new(backend: Backend, tag: &str, fsync: &str) -> Node {
        let dir = temp_dir(tag);
        let conf = dir.join("coremq.toml");
        let mut text = format!("[persistence]\nenabled = true\ndata_dir = \"data\"\nfsync = \"{fsync}\"\n");
        if fsync == "interval" {
            // Short enough that the interval is exercised within a test, long enough to batch.
            text.push_str("fsync_interval_ms = 200\n");
        }
        std::fs::write(&conf, text).expect("write config");
        Node { backend, dir, conf, port: free_port(), extra: Vec::new() }
    }

    /// Extra command-line arguments for every start.
    fn args(mut self, extra: &[&str]) -> Node {
        self.extra.extend(extra.iter().map(|s| s.to_string()));
        self
    }

    /// Where the broker keeps its files.
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the broker with `threads` cores on this node's port and data; returns once it accepts.
    fn start(&self, threads: usize) -> Broker {
        wait_port_released(self.port);
        let mut args: Vec<String> = vec![
            "--config".into(),
            self.conf.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.port),
            "--threads".into(),
            threads.to_string(),
            "--backend".into(),
            self.backend.as_str().into(),
        ];
        args.extend(self.extra.iter().cloned());
        Broker::start_coremq_args(&args, self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- data kept for inspection: {} ---", self.dir.display());
            for (p, len) in files_under(&self.data_dir()) {
                eprintln!("{len:>12} {}", p.display());
            }
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits (at most 5 s) until no socket listens on `port` any more (`/proc/net/tcp`).
///
/// A uring broker's listener can outlive its process by a few milliseconds (the kernel tears the ring
/// down, and with it the accept it still holds, after the exit). A broker started meanwhile waits for it
/// only so long (`io::claim_address`) before it refuses the address as in use. A restart proper begins
/// once the old listener is gone.
fn wait_port_released(port: u16) {
    let local = format!(":{port:04X}");
    let t0 = Instant::now();
    let mut polls = 0u32;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        // Columns: sl local_address rem_address st ...; state 0A is LISTEN.
        let listening = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "0A"
        });
        if !listening {
            if polls > 0 {
                eprintln!("note: port {port} was still listening {:?} after the broker exited", t0.elapsed());
            }
            return;
        }
        polls += 1;
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "port {port} still listening 5 s after the broker exited"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops `broker` with SIGTERM and asserts a clean exit.
fn stop_clean(broker: Broker) -> Stopped {
    let st = broker.stop();
    assert!(st.status.success(), "graceful stop with persistence: {st:?}");
    st
}

/// Every regular file under `dir` (recursively) with its length, largest first.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                out.push((e.path(), md.len()));
            }
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// The first client id with `prefix` whose session lives on `core` of `cores`.
fn id_on_core(prefix: &str, core: usize, cores: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| coremq::core::home_core(id, cores).index() == core)
        .expect("some id hashes to each core")
}

/// Two ids per core of two, so that both cores own sessions.
fn ids_on_both_cores(prefix: &str) -> Vec<String> {
    let mut v = Vec::new();
    for core in 0..2 {
        for k in 0..2 {
            v.push(id_on_core(&format!("{prefix}-c{core}k{k}"), core, 2));
        }
    }
    v
}

/// Sends PINGREQ and reads up to its PINGRESP, acknowledging (QoS 1) and returning any PUBLISH that
/// comes first: once the PINGRESP is here the broker has processed everything sent before it.
async fn ping_barrier(c: &mut Raw) -> Vec<Msg> {
    c.send(&raw::pingreq()).await;
    let mut got = Vec::new();
    loop {
        match c.recv().await {
            Pkt::PingResp => return got,
            Pkt::Publish(m) => {
                if m.qos == 1 {
                    c.send(&raw::puback(m.pkid)).await;
                }
                got.push(m);
            }
            other => panic!("expected PINGRESP or PUBLISH, got {other:?}"),
        }
    }
}

/// Receives `n` PUBLISHes on a v5 connection, acknowledging each (QoS 1).
async fn recv_acking5(c: &mut Raw5, n: usize) -> Vec<Msg5> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match c.recv().await {
            Pkt5::Publish(m) => {
                assert_eq!(m.qos, 1, "only QoS 1 is used here: {m:?}");
                c.send(&raw5::puback(m.pkid, 0)).await;
                got.push(m);
            }
            other => panic!("expected PUBLISH, got {other:?} after {} of {n}", got.len()),
        }
    }
    got
}

/// Collects retained messages delivered for `filter` to a fresh clean client: (topic → payload).
async fn retained(port: u16, id: &str, filter: &str) -> BTreeMap<String, Vec<u8>> {
    let (mut c, _) = Raw::connect(port, id, true).await;
    assert_eq!(c.subscribe(1, &[(filter, 1)]).await, vec![1]);
    let mut got = BTreeMap::new();
    loop {
        match c.try_recv(SILENCE * 2).await {
            Recv::Packet(Pkt::Publish(m)) => {
                assert!(m.retain, "{id}: a message sent at SUBSCRIBE is a retained one: {m:?}");
                if m.qos == 1 {
                    c.send(&raw::puback(m.pkid)).await;
                }
                assert!(got.insert(m.topic.clone(), m.payload).is_none(), "{id}: {} twice", m.topic);
            }
            Recv::Timeout => break,
            other => panic!("{id}: expected retained PUBLISHes, got {other:?}"),
        }
    }
    c.disconnect().await;
    got
}

// ---------------------------------------------------------------------------------------------
// 1 + 6. Clean restart, with each fsync policy
// ---------------------------------------------------------------------------------------------

/// Messages queued for each offline subscriber before the restart.
const QUEUED: usize = 20;

async fn clean_restart_keeps_sessions_and_retained(b: Backend) {
    clean_restart(b, "always").await;
}

async fn clean_restart_fsync_interval(b: Backend) {
    clean_restart(b, "interval").await;
}

async fn clean_restart_fsync_never(b: Backend) {
    clean_restart(b, "never").await;
}

async fn clean_restart(b: Backend, fsync: &str) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, &format!("persist-restart-{fsync}"), fsync);
    let broker = node.start(2);
    let port = node.port;
    let subs = ids_on_both_cores("rs-sub");

    // Persistent 3.1.1 subscribers, offline before anything is published.
    for id in &subs {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(!sp, "{id}: fresh data_dir, no session yet");
        assert_eq!(c.subscribe(1, &[("rs/t", 1)]).await, vec![1]);
        c.disconnect().await;
    }
    // A v5 session with an expiry, a subscription identifier and No Local: its options must come back.
    let v5id = "rs-v5";
    {
        let (mut c, ack) = Raw5::connect(port, &Connect5::new(v5id).expiry(3600)).await;
        assert!(!ack.session_present);
        let props = Props::new().with(prop::SUBSCRIPTION_ID, Val::VarInt(5));
        assert_eq!(c.subscribe(1, &props, &[("rs/t", sub_opts(1, true, false, 0))]).await, vec![1]);
        c.disconnect().await;
    }
    // A persistent session replaced by a clean one: the discard must be durable too.
    {
        let (mut c, _) = Raw::connect(port, "rs-discarded", false).await;
        assert_eq!(c.subscribe(1, &[("rs/t", 1)]).await, vec![1]);
        c.disconnect().await;
        let (c, sp) = Raw::connect(port, "rs-discarded", true).await;
        assert!(!sp, "a clean connect never finds a session");
        c.disconnect().await;
    }
    // A clean session subscribed and still connected when the broker stops.
    let (mut clean, _) = Raw::connect(port, "rs-clean", true).await;
    assert_eq!(clean.subscribe(1, &[("rs/t", 1)]).await, vec![1]);

    let mut p = client(port, "rs-pub").await;
    for i in 0..QUEUED {
        p.publish("rs/t", qos(1), false, format!("queued-{i:02}")).await;
    }
    p.publish("rs/keep", qos(1), true, "kept").await;
    p.publish("rs/keep0", qos(0), true, "kept-qos0").await;
    p.publish("rs/gone", qos(1), true, "soon-cleared").await;
    p.publish("rs/gone", qos(1), true, "").await;
    // The QoS 0 publish above has no acknowledgement: a QoS 1 round trip after it orders it before the stop.
    p.publish("rs/t", qos(1), false, "sync").await;
    p.disconnect().await;
    let _ = clean.recv_acking(QUEUED + 1).await;
    drop(clean);

    stop_clean(broker);
    assert!(
        files_under(&node.data_dir()).iter().any(|(_, len)| *len > 0),
        "data_dir = \"data\" (relative to the config file) holds the state: {:?}",
        files_under(&node.dir)
    );

    let broker = node.start(2);
    for id in &subs {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(sp, "{id}: session present after the restart (fsync = {fsync})");
        let got: Vec<Vec<u8>> = c.recv_acking(QUEUED + 1).await.into_iter().map(|m| m.payload).collect();
        let want: Vec<Vec<u8>> =
            (0..QUEUED).map(|i| format!("queued-{i:02}").into_bytes()).chain([b"sync".to_vec()]).collect();
        assert_eq!(got, want, "{id}: every queued QoS 1 message, in order, once");
        c.expect_silence().await;
        c.disconnect().await;
    }
    let (mut v5, ack) = Raw5::connect(port, &Connect5::new(v5id).clean(false).expiry(3600)).await;
    assert!(ack.session_present, "v5 session with expiry 3600 survives the restart");
    let got = recv_acking5(&mut v5, QUEUED + 1).await;
    for (i, m) in got.iter().enumerate() {
        let want = if i < QUEUED { format!("queued-{i:02}") } else { "sync".into() };
        assert_eq!(m.payload, want.as_bytes(), "v5 queue in order");
        assert_eq!(m.props.sub_ids(), vec![5], "the subscription identifier survived: {m:?}");
    }

    // The clean session and the discarded one are gone.
    for id in ["rs-clean", "rs-discarded"] {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(!sp, "{id}: no session must survive the restart");
        c.expect_silence().await;
        c.disconnect().await;
    }

    // Live traffic flows through the recovered subscriptions; the v5 one still has No Local.
    let mut live: Vec<Raw> = Vec::new();
    for id in &subs {
        live.push(Raw::connect(port, id, false).await.0);
    }
    v5.send(&raw5::publish("rs/t", 1, false, 1, &Props::new(), b"live")).await;
    assert_eq!(v5.recv_puback().await.pkid, 1);
    for (id, c) in subs.iter().zip(live.iter_mut()) {
        let m = c.recv_publish().await;
        assert_eq!(m.payload, b"live", "{id}: recovered subscription delivers new messages");
        c.send(&raw::puback(m.pkid)).await;
    }
    v5.expect_silence().await;
    v5.disconnect().await;
    for c in live {
        c.disconnect().await;
    }

    // Retained: kept (both QoS), and the cleared one stays cleared. mosquitto_sub as the reader.
    let mut s =
        tools::mosquitto_sub(port, &["-t", "rs/keep", "-t", "rs/keep0", "-t", "rs/gone", "-q", "1"]).await;
    let mut got = BTreeSet::new();
    got.insert(s.recv().await);
    got.insert(s.recv().await);
    assert_eq!(
        got,
        BTreeSet::from(["rs/keep kept".to_string(), "rs/keep0 kept-qos0".to_string()]),
        "retained messages after the restart"
    );
    assert_eq!(s.try_recv(SILENCE).await, None, "the cleared retained message stays cleared");
    drop(s);
    stop_clean(broker);
}

// ---------------------------------------------------------------------------------------------
// 2. kill -9 under QoS 1 load with fsync = "always"
// ---------------------------------------------------------------------------------------------

/// Messages the publisher tries to send before the broker is killed.
const KILL_N: usize = 5000;
/// Outstanding unacknowledged PUBLISHes the publisher allows itself (a pipelining client).
const KILL_WINDOW: usize = 64;

fn kill_payload(i: usize) -> Vec<u8> {
    format!("k9-{i:05}").into_bytes()
}

/// Publishes `KILL_N` QoS 1 messages with packet ids 1..=KILL_N (never reused, so a PUBACK's id names
/// its message) on a raw connection, `KILL_WINDOW` at a time, recording every PUBACK in `acked`
/// until the connection breaks. Returns how many PUBLISHes were written.
async fn flood(port: u16, acked: Arc<Mutex<BTreeSet<u16>>>, count: Arc<AtomicUsize>) -> usize {
    let (s, sp) = load::mqtt_connect(port, Connect::new("k9-pub", true)).await.expect("publisher CONNECT");
    assert!(!sp);
    let (mut rd, mut wr) = s.into_split();
    let window = Arc::new(Semaphore::new(KILL_WINDOW));
    let reader = {
        let window = window.clone();
        tokio::spawn(async move {
            loop {
                let pkt = async {
                    let first = rd.read_u8().await?;
                    let mut len = 0usize;
                    for i in 0..4 {
                        let b = rd.read_u8().await?;
                        len |= usize::from(b & 0x7f) << (7 * i);
                        if b & 0x80 == 0 {
                            break;
                        }
                    }
                    let mut body = vec![0; len];
                    rd.read_exact(&mut body).await?;
                    Ok::<_, std::io::Error>((first, body))
                };
                match timeout(Duration::from_secs(30), pkt).await {
                    Ok(Ok((0x40, body))) if body.len() >= 2 => {
                        let id = u16::from_be_bytes([body[0], body[1]]);
                        assert!(acked.lock().expect("acked").insert(id), "PUBACK {id} twice");
                        count.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    }
                    Ok(Ok(other)) => panic!("publisher: unexpected packet {other:?}"),
                    // The broker was killed (reset or EOF), or fell silent.
                    _ => break,
                }
            }
            // Wakes the writer if it waits for a window slot that will never free up.
            window.close();
        })
    };
    let mut sent = 0;
    for i in 1..=KILL_N {
        let Ok(permit) = window.acquire().await else { break };
        permit.forget();
        let id = u16::try_from(i).expect("KILL_N fits packet ids");
        let pkt = raw::publish("k9/t", 1, false, false, id, &kill_payload(i));
        match timeout(WAIT, wr.write_all(&pkt)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    match timeout(Duration::from_secs(35), reader).await {
        Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        _ => sent,
    }
}

async fn kill9_loses_no_acknowledged_qos1_message(b: Backend) {
    if skip_unless_coremq("persistence") {
        return;
    }
    // Both variants fsync thousands of times; one at a time keeps the timing honest on a small machine.
    let _heavy = load::heavy().await;
    // Every message must be queued, not dropped by the offline queue's limit (default 1000).
    let node = Node::new(b, "persist-kill9", "always").args(&["--max-queued-messages", "100000"]);
    let broker = node.start(2);
    let port = node.port;
    // One offline persistent subscriber on each core: every message is durable for both before its PUBACK.
    let subs = [id_on_core("k9-sub", 0, 2), id_on_core("k9-sub", 1, 2)];
    for id in &subs {
        let (mut c, _) = Raw::connect(port, id, false).await;
        assert_eq!(c.subscribe(1, &[("k9/t", 1)]).await, vec![1]);
        c.disconnect().await;
    }

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(flood(port, acked.clone(), count.clone()));
    // Kill once a third is acknowledged (mid-stream), or after 15 s if fsync is that slow.
    let t0 = Instant::now();
    while count.load(Ordering::Relaxed) < KILL_N / 3 && t0.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed = broker.stop_with_signal(libc::SIGKILL);
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{killed:?}");
    let sent = timeout(Duration::from_secs(40), publisher).await.expect("publisher ends").expect("publisher");
    let acked: BTreeSet<u16> = acked.lock().expect("acked").clone();
    eprintln!(
        "kill9/{}: {sent} sent, {} acknowledged in {:?} before SIGKILL",
        b.as_str(),
        acked.len(),
        t0.elapsed()
    );
    assert!(!acked.is_empty(), "no PUBACK at all in 15 s with fsync = always");

    let broker = node.start(2);
    for id in &subs {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(sp, "{id}: session present after kill -9");
        let mut missing = acked.clone();
        let mut first_seen: Vec<u16> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut total = 0usize;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Until every acknowledged message arrived (more may follow: duplicates and unacknowledged
        // messages that happened to be durable are allowed), or 2 s of silence.
        while !missing.is_empty() && Instant::now() < deadline {
            match c.try_recv(Duration::from_secs(2)).await {
                Recv::Packet(Pkt::Publish(m)) => {
                    assert_eq!((m.qos, m.topic.as_str()), (1, "k9/t"), "{id}: {m:?}");
                    c.send(&raw::puback(m.pkid)).await;
                    let text = String::from_utf8(m.payload.clone()).expect("utf-8 payload");
                    let n: u16 = text
                        .strip_prefix("k9-")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or_else(|| panic!("{id}: foreign payload {text:?}"));
                    total += 1;
                    missing.remove(&n);
                    if seen.insert(n) {
                        first_seen.push(n);
                    }
                }
                Recv::Packet(other) => panic!("{id}: expected PUBLISH, got {other:?}"),
                Recv::Timeout => break,
                Recv::Closed => panic!("{id}: closed during redelivery"),
            }
        }
        let first: Vec<u16> = missing.iter().take(10).copied().collect();
        assert!(
            missing.is_empty(),
            "{id}: {} of {} acknowledged messages lost after kill -9 (first: {first:?}); received {total}",
            missing.len(),
            acked.len()
        );
        // MQTT 4.6: messages of one publisher on one topic reach a subscriber in the order sent.
        assert!(first_seen.windows(2).all(|w| w[0] < w[1]), "{id}: order kept after recovery");
        eprintln!("kill9/{}: {id} received {total} ({} distinct)", b.as_str(), seen.len());
        c.disconnect().await;
    }
    stop_clean(broker);
}

// ---------------------------------------------------------------------------------------------
// 3. QoS 2 state
// ---------------------------------------------------------------------------------------------

async fn qos2_outbound_state_survives_restart(b: Backend) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, "persist-q2out", "always");
    let broker = node.start(2);
    let port = node.port;
    let subs = [id_on_core("q2o-sub", 0, 2), id_on_core("q2o-sub", 1, 2)];
    let mut conns = Vec::new();
    let mut p = client(port, "q2o-pub").await;
    // Per subscriber: one QoS 2 flow waiting for PUBCOMP, one waiting for PUBREC, one QoS 1 waiting
    // for PUBACK, all left open while the broker stops.
    let mut flows = Vec::new();
    for id in &subs {
        let topic = format!("q2o/{id}");
        let (mut c, _) = Raw::connect(port, id, false).await;
        assert_eq!(c.subscribe(1, &[(&topic, 2)]).await, vec![2]);
        p.publish(&topic, qos(2), false, "released").await;
        let rel = c.recv_publish().await;
        assert_eq!((rel.qos, &rel.payload[..]), (2, &b"released"[..]));
        c.send(&raw::pubrec(rel.pkid)).await;
        assert_eq!(c.recv().await, Pkt::PubRel(rel.pkid));
        p.publish(&topic, qos(2), false, "unreceived").await;
        let unrec = c.recv_publish().await;
        assert_eq!((unrec.qos, &unrec.payload[..]), (2, &b"unreceived"[..]));
        p.publish(&topic, qos(1), false, "unacked").await;
        let unacked = c.recv_publish().await;
        assert_eq!((unacked.qos, &unacked.payload[..]), (1, &b"unacked"[..]));
        flows.push((rel.pkid, unrec.pkid, unacked.pkid));
        conns.push(c);
    }
    p.disconnect().await;
    stop_clean(broker);
    drop(conns);

    let broker = node.start(2);
    for (id, &(rel, unrec, unacked)) in subs.iter().zip(&flows) {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(sp, "{id}: session present");
        // MQTT-4.4.0-1: unacknowledged PUBLISHes and PUBRELs are re-sent with their original ids.
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(c.recv().await);
        }
        assert!(got.contains(&Pkt::PubRel(rel)), "{id}: PUBREL {rel} resent, never its PUBLISH: {got:?}");
        let publishes: Vec<&Msg> = got
            .iter()
            .filter_map(|p| match p {
                Pkt::Publish(m) => Some(m),
                _ => None,
            })
            .collect();
        let summary: Vec<(u16, u8, bool, &[u8])> =
            publishes.iter().map(|m| (m.pkid, m.qos, m.dup, &m.payload[..])).collect();
        assert_eq!(
            summary,
            vec![(unrec, 2, true, &b"unreceived"[..]), (unacked, 1, true, &b"unacked"[..])],
            "{id}: in-flight PUBLISHes resent in order, same ids, DUP set: {got:?}"
        );
        c.send(&raw::pubcomp(rel)).await;
        c.send(&raw::pubrec(unrec)).await;
        assert_eq!(c.recv().await, Pkt::PubRel(unrec), "{id}");
        c.send(&raw::pubcomp(unrec)).await;
        c.send(&raw::puback(unacked)).await;
        assert!(ping_barrier(&mut c).await.is_empty(), "{id}: nothing else in flight");
        c.disconnect().await;
    }
    stop_clean(broker);

    // Completed flows stay completed across another restart.
    let broker = node.start(2);
    for id in &subs {
        let (mut c, sp) = Raw::connect(port, id, false).await;
        assert!(sp, "{id}: session present (second restart)");
        c.expect_silence().await;
        c.disconnect().await;
    }
    stop_clean(broker);
}

async fn qos2_inbound_packet_id_survives_restart(b: Backend) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, "persist-q2in", "always");
    let broker = node.start(2);
    let port = node.port;
    let (mut sub, _) = Raw::connect(port, "q2i-sub", false).await;
    assert_eq!(sub.subscribe(1, &[("q2i/t", 1)]).await, vec![1]);
    // Publishers on both cores.
    let pubs = [id_on_core("q2i-pub", 0, 2), id_on_core("q2i-pub", 1, 2)];
    let mut conns = Vec::new();
    for (k, id) in pubs.iter().enumerate() {
        let (mut p, _) = Raw::connect(port, id, false).await;
        p.send(&raw::publish("q2i/t", 2, false, false, 7, format!("once-{k}").as_bytes())).await;
        assert_eq!(p.recv().await, Pkt::PubRec(7), "{id}");
        conns.push(p);
    }
    // Whether the broker forwards at PUBLISH (mosquitto) or at PUBREL, count every delivery; the
    // barrier makes sure any PUBACK of ours was processed before the stop.
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    tokio::time::sleep(SILENCE).await;
    delivered.extend(ping_barrier(&mut sub).await.into_iter().map(|m| m.payload));
    stop_clean(broker);
    drop(conns);
    drop(sub);

    let broker = node.start(2);
    let (mut sub, sp) = Raw::connect(port, "q2i-sub", false).await;
    assert!(sp, "subscriber session present");
    for (k, id) in pubs.iter().enumerate() {
        let (mut p, sp) = Raw::connect(port, id, false).await;
        assert!(sp, "{id}: publisher session present");
        // The client did not see PUBREC... as far as the broker knows: it resends with DUP.
        p.send(&raw::publish("q2i/t", 2, false, true, 7, format!("once-{k}").as_bytes())).await;
        assert_eq!(p.recv().await, Pkt::PubRec(7), "{id}: PUBREC for the duplicate");
        p.send(&raw::pubrel(7)).await;
        assert_eq!(p.recv().await, Pkt::PubComp(7), "{id}: PUBREL 7 completes the flow");
        p.disconnect().await;
    }
    // Every delivery until nothing more comes.
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match sub.try_recv(SILENCE * 3).await {
            Recv::Packet(Pkt::Publish(m)) => {
                sub.send(&raw::puback(m.pkid)).await;
                // A redelivery of a message the broker had sent but saw no PUBACK for is fine; a
                // second, new delivery is not.
                if !m.dup || !delivered.contains(&m.payload) {
                    delivered.push(m.payload);
                }
            }
            Recv::Timeout if delivered.len() >= pubs.len() => break,
            Recv::Timeout => {}
            other => panic!("subscriber: {other:?}"),
        }
    }
    delivered.sort();
    assert_eq!(
        delivered,
        vec![b"once-0".to_vec(), b"once-1".to_vec()],
        "each QoS 2 message delivered exactly once across the restart"
    );
    sub.disconnect().await;
    stop_clean(broker);
}

// ---------------------------------------------------------------------------------------------
// 4. Damaged log tail
// ---------------------------------------------------------------------------------------------

/// Retained messages written before the damage.
const DAMAGE_K: usize = 20;

/// How the largest log file is damaged after a crash.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Its last few bytes are cut off (a torn write).
    Truncate,
    /// One byte near its end is flipped (a corrupt sector).
    Flip,
}

async fn truncated_log_tail_is_cut_and_reported(b: Backend) {
    damaged_tail(b, Damage::Truncate).await;
}

async fn corrupted_log_tail_is_cut_and_reported(b: Backend) {
    damaged_tail(b, Damage::Flip).await;
}

async fn damaged_tail(b: Backend, damage: Damage) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, "persist-damage", "always");
    let broker = node.start(2);
    let port = node.port;
    let mut p = client(port, "dmg-pub").await;
    // One at a time with fsync = always: each is its own durable record, in this order.
    for i in 0..DAMAGE_K {
        p.publish(&format!("dmg/{i:02}"), qos(1), true, format!("v{i}")).await;
    }
    p.disconnect().await;
    // A crash, so that the logs end exactly where the last write left them.
    broker.stop_with_signal(libc::SIGKILL);

    let files = files_under(&node.data_dir());
    let (victim, len) = files.first().cloned().expect("some file under data_dir");
    assert!(len > 8, "largest file {} has only {len} bytes", victim.display());
    match damage {
        Damage::Truncate => {
            let f = std::fs::OpenOptions::new().write(true).open(&victim).expect("open log");
            f.set_len(len - 3).expect("truncate log");
        }
        Damage::Flip => {
            let mut bytes = std::fs::read(&victim).expect("read log");
            let at = bytes.len() - 3;
            bytes[at] ^= 0xff;
            std::fs::write(&victim, bytes).expect("write log");
        }
    }
    let name = victim.file_name().expect("file name").to_string_lossy().into_owned();

    let broker = node.start(2);
    let got = retained(port, "dmg-check", "dmg/#").await;
    // Whatever survived is intact.
    for (t, v) in &got {
        let i: usize = t.strip_prefix("dmg/").and_then(|s| s.parse().ok()).expect("dmg/NN");
        assert_eq!(v, format!("v{i}").as_bytes(), "{damage:?}: {t} intact");
    }
    // Every record before the damaged one is there. Which log a retained message goes to is the broker's
    // business, so which message was the damaged log's last record is not known here: at most one.
    let missing: Vec<usize> = (0..DAMAGE_K).filter(|i| !got.contains_key(&format!("dmg/{i:02}"))).collect();
    assert!(
        missing.len() <= 1,
        "{damage:?}: only the damaged record may be lost, but dmg/{missing:?} are missing; got {got:?}"
    );
    // Still writing after the cut: a new record lands after the valid prefix.
    let mut p = client(port, "dmg-pub2").await;
    p.publish("dmg/after", qos(1), true, "after").await;
    p.disconnect().await;
    let damaged = stop_clean(broker);

    let broker = node.start(2);
    let again = retained(port, "dmg-check2", "dmg/#").await;
    assert_eq!(again.get("dmg/after").map(|v| &v[..]), Some(&b"after"[..]), "written after the cut");
    assert_eq!(again.len(), got.len() + 1, "{damage:?}: nothing else changed: {again:?}");
    let clean = stop_clean(broker);
    // The broker may name its files in other lines too (e.g. when it opens them); the damaged start
    // has exactly one line about the file more than the next, clean, start of the cut log.
    let naming = |s: &str| s.lines().filter(|l| l.contains(&name)).count();
    assert_eq!(
        naming(&damaged.stderr),
        naming(&clean.stderr) + 1,
        "{damage:?}: one line on stderr names {name} when its tail is cut, none once it is clean.\n\
         --- damaged start ---\n{}\n--- next start ---\n{}",
        damaged.stderr,
        clean.stderr
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Another thread count
// ---------------------------------------------------------------------------------------------

async fn restart_with_another_thread_count(b: Backend) {
    if skip_unless_coremq("persistence") {
        return;
    }
    let node = Node::new(b, "persist-threads", "always");
    let port = node.port;
    let subs = ids_on_both_cores("tc-sub");

    // Phase 1, two cores: sessions on both, messages queued while they are offline, retained messages.
    let broker = node.start(2);
    for id in &subs {
        let (mut c, _) = Raw::connect(port, id, false).await;
        assert_eq!(c.subscribe(1, &[("tc/all", 1), (&format!("tc/one/{id}"), 1)]).await, vec![1, 1]);
        c.disconnect().await;
    }
    let mut p = client(port, "tc-pub").await;
    for i in 0..3 {
        p.publish("tc/all", qos(1), false, format!("p1-{i}")).await;
    }
    for id in &subs {
        p.publish(&format!("tc/one/{id}"), qos(1), false, format!("p1-{id}")).await;
    }
    for i in 0..4 {
        p.publish(&format!("tc/r/{i}"), qos(1), true, format!("r{i}")).await;
    }
    p.disconnect().await;
    stop_clean(broker);

    let want_retained: BTreeMap<String, Vec<u8>> =
        (0..4).map(|i| (format!("tc/r/{i}"), format!("r{i}").into_bytes())).collect();
    // Phase 2 on one core, then phase 3 on two again: every session and its queue is found each time.
    for (phase, threads) in [(2, 1), (3, 2)] {
        let broker = node.start(threads);
        let prev = phase - 1;
        for id in &subs {
            let (mut c, sp) = Raw::connect(port, id, false).await;
            assert!(sp, "{id}: session present after restart with --threads {threads}");
            let got: Vec<Vec<u8>> = c.recv_acking(4).await.into_iter().map(|m| m.payload).collect();
            let want: Vec<Vec<u8>> = (0..3)
                .map(|i| format!("p{prev}-{i}").into_bytes())
                .chain([format!("p{prev}-{id}").into_bytes()])
                .collect();
            assert_eq!(got, want, "{id}: queue after restart with --threads {threads}");
            c.expect_silence().await;
            c.disconnect().await;
        }
        assert_eq!(
            retained(port, "tc-check", "tc/r/#").await,
            want_retained,
            "retained after --threads {threads}"
        );
        // Queue the next phase's messages, through the subscriptions recovered on this thread count.
        let mut p = client(port, "tc-pub").await;
        for i in 0..3 {
            p.publish("tc/all", qos(1), false, format!("p{phase}-{i}")).await;
        }
        for id in &subs {
            p.publish(&format!("tc/one/{id}"), qos(1), false, format!("p{phase}-{id}")).await;
        }
        p.disconnect().await;
        stop_clean(broker);
    }
}
