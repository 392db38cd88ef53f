//! coremq process behaviour: CLI flags, config files, errors, signals and statistics.
//! Everything here is coremq-specific and skipped (with a note) under mosquitto.

mod common;

use common::raw::{self, Raw};
use common::{
    all_stats, client, free_port, ids, parse_stats, qos, run_coremq_to_exit, skip_unless_coremq, temp_dir,
    Backend, Broker, Settings, Stopped,
};

backend_tests!(
    threads_with_cpu_list_work,
    unavailable_cpu_fails_with_one_line,
    bad_config_key_exits_2_naming_key_and_file,
    bad_config_value_exits_2_naming_key_and_file,
    bad_flag_exits_2_with_one_line,
    config_file_sets_listener_and_limits,
    sigterm_prints_consistent_stats_and_exits_0,
    sigint_is_graceful_too,
    startup_line_counts_threads,
);

/// The only non-empty stderr line of a failed run (asserts there is exactly one).
fn one_error_line(st: &Stopped) -> String {
    let lines: Vec<&str> = st.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line, got {:?}", st.stderr);
    lines[0].to_string()
}

fn listen_args(b: Backend, port: u16) -> Vec<String> {
    ["--listen", &format!("127.0.0.1:{port}"), "--threads", "2", "--backend", b.as_str()]
        .map(String::from)
        .to_vec()
}

/// A quick end-to-end check that a broker on `port` routes messages between cores.
async fn smoke(port: u16, tag: &str) {
    let mut subs = Vec::new();
    for id in ids(&format!("{tag}-sub"), 4) {
        let mut s = client(port, &id).await;
        s.subscribe("smoke/t", qos(1)).await;
        subs.push(s);
    }
    let mut p = client(port, &format!("{tag}-pub")).await;
    p.publish("smoke/t", qos(1), false, "hello").await;
    for s in subs.iter_mut() {
        assert_eq!(&s.recv().await.payload[..], b"hello", "{}", s.id);
    }
}

async fn threads_with_cpu_list_work(b: Backend) {
    if skip_unless_coremq("--cpus") {
        return;
    }
    let s = Settings { extra_args: vec!["--cpus".into(), "0-1".into()], ..Default::default() };
    let broker = Broker::start_with(b, &s);
    smoke(broker.port, "cpus").await;
    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
}

async fn unavailable_cpu_fails_with_one_line(b: Backend) {
    if skip_unless_coremq("--cpus") {
        return;
    }
    let mut args = listen_args(b, free_port());
    args.extend(["--cpus".into(), "99".into()]);
    let st = run_coremq_to_exit(&args);
    assert!(!st.status.success(), "--cpus 99 must fail: {st:?}");
    let line = one_error_line(&st);
    assert!(line.contains("99"), "error should name the cpu: {line:?}");
}

/// A config file in its own temporary directory, removed on drop.
struct Conf(std::path::PathBuf);

impl Conf {
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn write_config(body: &str) -> Conf {
    let path = temp_dir("conf").join("coremq.toml");
    std::fs::write(&path, body).expect("write config");
    Conf(path)
}

async fn bad_config_key_exits_2_naming_key_and_file(b: Backend) {
    if skip_unless_coremq("config files") {
        return;
    }
    let conf = write_config("threads = 2\nbogus_key = 1\n");
    let mut args = listen_args(b, free_port());
    args.extend(["--config".into(), conf.path()]);
    let st = run_coremq_to_exit(&args);
    assert_eq!(st.status.code(), Some(2), "{st:?}");
    let line = one_error_line(&st);
    assert!(line.contains("bogus_key"), "must name the key: {line:?}");
    assert!(line.contains(&conf.path()), "must name the file: {line:?}");
}

async fn bad_config_value_exits_2_naming_key_and_file(b: Backend) {
    if skip_unless_coremq("config files") {
        return;
    }
    for (body, key) in [
        ("threads = \"two\"\n", "threads"),
        ("max_inflight = -3\n", "max_inflight"),
        ("[[listener]]\nbind = 5\n", "bind"),
    ] {
        let conf = write_config(body);
        let mut args = listen_args(b, free_port());
        args.extend(["--config".into(), conf.path()]);
        let st = run_coremq_to_exit(&args);
        assert_eq!(st.status.code(), Some(2), "{body:?}: {st:?}");
        let line = one_error_line(&st);
        assert!(line.contains(key), "{body:?}: must name `{key}`: {line:?}");
        assert!(line.contains(&conf.path()), "must name the file: {line:?}");
    }
}

async fn bad_flag_exits_2_with_one_line(b: Backend) {
    if skip_unless_coremq("command-line flags") {
        return;
    }
    let port = free_port();
    for (flag, value) in
        [("--max-inflight", "lots"), ("--threads", "-1"), ("--backend", "bogus"), ("--no-such-flag", "1")]
    {
        let mut args = listen_args(b, port);
        args.extend([flag.into(), value.into()]);
        let st = run_coremq_to_exit(&args);
        assert_eq!(st.status.code(), Some(2), "{flag} {value}: {st:?}");
        one_error_line(&st);
    }
}

async fn config_file_sets_listener_and_limits(b: Backend) {
    if skip_unless_coremq("config files") {
        return;
    }
    let port = free_port();
    let conf = write_config(&format!(
        "threads = 2\nbackend = \"{}\"\nconnect_timeout = 5\nmax_inflight = 2\n\
         max_queued_messages = 100\nmax_queued_bytes = 1048576\nmax_packet_size = 65536\n\
         queue_qos0_messages = false\n\n[[listener]]\nbind = \"127.0.0.1:{port}\"\n",
        b.as_str()
    ));
    let broker = Broker::start_coremq_args(&["--config".into(), conf.path()], port);
    smoke(port, "conf").await;
    // max_inflight = 2 from the file is in force.
    let (mut c, _) = Raw::connect(port, "conf-win", true).await;
    assert_eq!(c.subscribe(1, &[("conf/t", 1)]).await, vec![1]);
    let mut p = client(port, "conf-pub").await;
    for i in 0..4u8 {
        p.publish("conf/t", qos(1), false, vec![i]).await;
    }
    let a = c.recv_publish().await;
    let _b = c.recv_publish().await;
    c.expect_silence().await;
    c.send(&raw::puback(a.pkid)).await;
    assert_eq!(c.recv_publish().await.payload, vec![2]);
    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
}

async fn stats_scenario(b: Backend) -> Stopped {
    let broker = Broker::start(b);
    let mut subs = Vec::new();
    for id in ids("stats-sub", 2) {
        let mut s = client(broker.port, &id).await;
        s.subscribe("stats/#", qos(1)).await;
        subs.push(s);
    }
    let mut p = client(broker.port, "stats-pub").await;
    for i in 0..10u8 {
        p.publish(&format!("stats/{i}"), qos(1), false, vec![i]).await;
    }
    for s in subs.iter_mut() {
        s.recv_n(10).await;
    }
    // rumqttc acks immediately on receipt; wait for the silence window so the last PUBACKs
    // are processed before shutdown, then disconnect cleanly.
    common::expect_nothing_all(&mut subs).await;
    for s in subs {
        s.disconnect().await;
    }
    p.disconnect().await;
    broker.stop()
}

fn check_stats(st: &Stopped) {
    assert_eq!(st.status.code(), Some(0), "graceful shutdown exits 0: {st:?}");
    let all = all_stats(&st.stdout);
    assert!(all.connections >= 3, "3 MQTT clients connected: {all:?}\n{}", st.stdout);
    assert_eq!(all.messages_in, 10, "PUBLISHes received\n{}", st.stdout);
    assert_eq!(all.messages_out, 20, "deliveries written\n{}", st.stdout);
    assert_eq!(all.dropped, 0, "{}", st.stdout);
    // Per-core lines add up to the merged one.
    let per_core: Vec<_> = parse_stats(&st.stdout).into_iter().filter(|(l, _)| l != "all").collect();
    assert_eq!(per_core.len(), 2, "one line per core (--threads 2):\n{}", st.stdout);
    let sum = |f: fn(&common::StatLine) -> u64| per_core.iter().map(|(_, s)| f(s)).sum::<u64>();
    assert_eq!(sum(|s| s.connections), all.connections, "{}", st.stdout);
    assert_eq!(sum(|s| s.messages_in), all.messages_in, "{}", st.stdout);
    assert_eq!(sum(|s| s.messages_out), all.messages_out, "{}", st.stdout);
    assert_eq!(sum(|s| s.dropped), all.dropped, "{}", st.stdout);
    // The merged latency line follows the `all:` line.
    let lines: Vec<&str> = st.stdout.lines().collect();
    let at = lines.iter().position(|l| l.trim_start().starts_with("all:")).expect("all: line");
    let lat = lines
        .iter()
        .skip(at + 1)
        .find(|l| l.contains("latency"))
        .unwrap_or_else(|| panic!("no latency line after all:\n{}", st.stdout));
    let v =
        |k: &str| common::stat_value(lat, &format!("{k} ")).unwrap_or_else(|| panic!("no `{k}` in {lat:?}"));
    assert_eq!(v("count"), all.messages_out, "one latency sample per delivery: {lat:?}");
    let p = [v("p50"), v("p90"), v("p99"), v("p99.9"), v("max")];
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "percentiles must not decrease: {lat:?}");
}

async fn sigterm_prints_consistent_stats_and_exits_0(b: Backend) {
    if skip_unless_coremq("shutdown statistics") {
        return;
    }
    check_stats(&stats_scenario(b).await);
}

async fn sigint_is_graceful_too(b: Backend) {
    if skip_unless_coremq("shutdown statistics") {
        return;
    }
    let broker = Broker::start(b);
    smoke(broker.port, "sigint").await;
    let st = broker.stop_with_signal(libc::SIGINT);
    assert_eq!(st.status.code(), Some(0), "{st:?}");
    let all = all_stats(&st.stdout);
    assert_eq!((all.messages_in, all.messages_out), (1, 4), "{}", st.stdout);
}

#[test]
fn auto_backend_works() {
    common::run(Backend::Epoll, |_| async {
        if skip_unless_coremq("--backend auto") {
            return;
        }
        let port = free_port();
        let args: Vec<String> =
            ["--listen", &format!("127.0.0.1:{port}"), "--threads", "2", "--backend", "auto"]
                .map(String::from)
                .to_vec();
        let broker = Broker::start_coremq_args(&args, port);
        smoke(port, "auto").await;
        assert!(broker.stop().status.success());
    });
}

#[test]
fn uring_unavailable_fails_with_one_line() {
    common::run(Backend::Epoll, |_| async {
        if skip_unless_coremq("--backend uring") {
            return;
        }
        if common::uring_available() {
            eprintln!("SKIP: io_uring works on this host; the unavailable path cannot be hit");
            return;
        }
        let st = run_coremq_to_exit(&listen_args(Backend::Uring, free_port()));
        assert!(!st.status.success(), "{st:?}");
        one_error_line(&st);
    });
}

#[test]
fn default_run_listens_on_1883() {
    common::run(Backend::Epoll, |_| async {
        if skip_unless_coremq("default listener") {
            return;
        }
        if std::net::TcpListener::bind("127.0.0.1:1883").is_err() {
            eprintln!("SKIP: 127.0.0.1:1883 is busy");
            return;
        }
        let broker = Broker::start_coremq_args(&[], 1883);
        smoke(1883, "default").await;
        let st = broker.stop();
        assert!(st.status.success(), "{st:?}");
    });
}

async fn startup_line_counts_threads(b: Backend) {
    if skip_unless_coremq("the startup line") {
        return;
    }
    let backend = match b {
        Backend::Uring => "io_uring",
        Backend::Epoll => "epoll",
    };
    for (threads, counted) in [(1, "1 thread"), (2, "2 threads")] {
        let broker = Broker::start_with(b, &Settings { threads, ..Default::default() });
        let port = broker.port;
        let st = broker.stop();
        let line = format!(
            "coremq: listening on 127.0.0.1:{port} (anonymous clients allowed); {counted}, {backend} backend\n"
        );
        assert!(st.stderr.contains(&line), "expected {line:?} in:\n{}", st.stderr);
    }
}
