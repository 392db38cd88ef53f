use std::collections::BTreeSet;

use super::*;
use crate::core::SlowSubscriber;
use clap::Parser;

const PATH: &str = "x.toml";

/// Parses `text` as x.toml with `flags`, on a machine whose usable cpus are 0-1.
fn build(text: &str, flags: &[&str]) -> Result<Config, ConfigError> {
    build_on(text, flags, Ok(vec![0, 1]))
}

fn build_on(text: &str, flags: &[&str], allowed: io::Result<Vec<usize>>) -> Result<Config, ConfigError> {
    let cli = Cli::try_parse_from(std::iter::once("coremq").chain(flags.iter().copied())).unwrap();
    resolve(parse_file(text, Path::new(PATH))?, &cli, allowed)
}

fn err(text: &str, flags: &[&str]) -> String {
    build(text, flags).unwrap_err().to_string()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn every_key_has_its_default() {
    let c = build("", &[]).unwrap();
    assert_eq!(c.threads, 2, "one thread per allowed cpu");
    assert_eq!(c.keys.cpus, None);
    assert_eq!(c.keys.backend, BackendChoice::Auto);
    assert_eq!(
        c.listeners,
        vec![ListenerConfig {
            bind: addr("127.0.0.1:1883"),
            allow_anonymous: true,
            max_connections: 0,
            tls: None
        }]
    );
    assert!(c.default_listener);
    assert_eq!(c.keys.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.keys.max_inflight, 20);
    assert_eq!(c.keys.max_queued_messages, 1000);
    assert_eq!(c.keys.max_queued_bytes, 64 * 1024 * 1024);
    assert_eq!(c.keys.max_packet_size, 1_048_576);
    assert!(!c.keys.queue_qos0_messages);
    assert_eq!(c.keys.slow_subscriber, SlowSubscriber::Pause);
    assert_eq!(c.keys.max_keepalive, 65535);
    assert_eq!(c.source, Some(PathBuf::from(PATH)));
}

#[test]
fn default_threads_follow_the_machine_and_are_capped() {
    assert_eq!(build_on("", &[], Ok(vec![3])).unwrap().threads, 1);
    assert_eq!(build_on("", &[], Ok((0..200).collect())).unwrap().threads, MAX_THREADS);
    // If the affinity cannot be read, fall back to std's count rather than failing.
    let c = build_on("", &[], Err(io::Error::from_raw_os_error(libc::EPERM))).unwrap();
    assert!((1..=MAX_THREADS).contains(&c.threads));
}

#[test]
fn load_without_a_file_uses_defaults_and_the_real_machine() {
    let c = load(&Cli::default()).unwrap();
    let n = cpus::allowed_cpus().unwrap().len().min(MAX_THREADS);
    assert_eq!(c.threads, n);
    assert_eq!(c.source, None);
    assert!(c.default_listener);
}

#[test]
fn every_key_is_read() {
    let c = build(
        r#"
threads = 2
cpus = "0-1"
backend = "epoll"
connect_timeout = 2.5
max_inflight = 65535
max_queued_messages = 7
max_queued_bytes = 1
max_packet_size = 268435460
queue_qos0_messages = true
slow_subscriber = "drop"
max_keepalive = 0

[[listener]]
bind = "0.0.0.0:1883"

[[listener]]
bind = "[::1]:8883"
allow_anonymous = false

[[listener]]
bind = "localhost:1884"
"#,
        &[],
    )
    .unwrap();
    assert_eq!(c.threads, 2);
    assert_eq!(c.keys.cpus, Some(vec![0, 1]));
    assert_eq!(c.keys.backend, BackendChoice::Epoll);
    assert_eq!(c.keys.connect_timeout, Duration::from_millis(2500));
    assert_eq!(c.keys.max_inflight, 65535);
    assert_eq!(c.keys.max_queued_messages, 7);
    assert_eq!(c.keys.max_queued_bytes, 1);
    assert_eq!(c.keys.max_packet_size, MAX_PACKET_SIZE_LIMIT);
    assert!(c.keys.queue_qos0_messages);
    assert_eq!(c.keys.slow_subscriber, SlowSubscriber::Drop);
    assert_eq!(c.keys.max_keepalive, 0);
    assert!(!c.default_listener);
    assert_eq!(
        c.listeners,
        vec![
            ListenerConfig {
                bind: addr("0.0.0.0:1883"),
                allow_anonymous: true,
                max_connections: 0,
                tls: None
            },
            ListenerConfig {
                bind: addr("[::1]:8883"),
                allow_anonymous: false,
                max_connections: 0,
                tls: None
            },
            ListenerConfig {
                bind: addr("127.0.0.1:1884"),
                allow_anonymous: true,
                max_connections: 0,
                tls: None
            },
        ]
    );
}

#[test]
fn inline_listener_array_is_accepted() {
    let c = build(r#"listener = [{ bind = "127.0.0.1:1" }, { bind = "127.0.0.1:2" }]"#, &[]).unwrap();
    assert_eq!(c.listeners.len(), 2);
    assert_eq!(c.listeners[1].bind, addr("127.0.0.1:2"));
}

#[test]
fn cpus_alone_sets_threads() {
    let c = build("cpus = \"1\"", &[]).unwrap();
    assert_eq!((c.threads, c.keys.cpus), (1, Some(vec![1])));
    let c = build("", &["--cpus", "0-1"]).unwrap();
    assert_eq!((c.threads, c.keys.cpus), (2, Some(vec![0, 1])));
}

#[test]
fn connect_timeout_accepts_integers_and_floats() {
    assert_eq!(build("connect_timeout = 3", &[]).unwrap().keys.connect_timeout, Duration::from_secs(3));
    assert_eq!(
        build("connect_timeout = 0.25", &[]).unwrap().keys.connect_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(
        build("connect_timeout = 86400", &[]).unwrap().keys.connect_timeout,
        Duration::from_secs(86400)
    );
}

#[test]
fn flags_override_file_values() {
    let text = r#"
threads = 1
backend = "uring"
connect_timeout = 30
max_inflight = 5
max_queued_messages = 5
max_queued_bytes = 5
max_packet_size = 5
[[listener]]
bind = "0.0.0.0:1883"
"#;
    let c = build(
        text,
        &[
            "--threads",
            "2",
            "--cpus",
            "0,1",
            "--backend",
            "epoll",
            "--connect-timeout",
            "1.5",
            "--max-inflight",
            "100",
            "--max-queued-messages",
            "200",
            "--max-queued-bytes",
            "300",
            "--max-packet-size",
            "400",
            "--listen",
            "127.0.0.1:2000",
            "--listen",
            "[::]:2001",
        ],
    )
    .unwrap();
    assert_eq!(c.threads, 2);
    assert_eq!(c.keys.cpus, Some(vec![0, 1]));
    assert_eq!(c.keys.backend, BackendChoice::Epoll);
    assert_eq!(c.keys.connect_timeout, Duration::from_millis(1500));
    assert_eq!(c.keys.max_inflight, 100);
    assert_eq!(c.keys.max_queued_messages, 200);
    assert_eq!(c.keys.max_queued_bytes, 300);
    assert_eq!(c.keys.max_packet_size, 400);
    assert_eq!(
        c.listeners.iter().map(|l| l.bind).collect::<Vec<_>>(),
        vec![addr("127.0.0.1:2000"), addr("[::]:2001")]
    );
    assert!(!c.default_listener);
    // Values the flags do not touch stay as the file set them.
    let c = build(text, &["--threads", "2"]).unwrap();
    assert_eq!((c.threads, c.keys.max_inflight, c.keys.backend), (2, 5, BackendChoice::Uring));
    assert_eq!(c.listeners[0].bind, addr("0.0.0.0:1883"));
}

#[test]
fn listen_flag_without_file_is_not_the_default_listener() {
    let c = build("", &["--listen", "127.0.0.1:1883"]).unwrap();
    assert!(!c.default_listener);
    assert_eq!(c.listeners, vec![ListenerConfig::new(addr("127.0.0.1:1883"))]);
}

#[test]
fn unknown_keys() {
    assert_eq!(
        err("threads = 1\n\nmax_inflite = 3\n", &[]),
        "config error in x.toml: unknown key \"max_inflite\" (line 3)"
    );
    assert_eq!(
        err("[[listener]]\nbind = \"127.0.0.1:1883\"\nport = 1\n", &[]),
        "config error in x.toml: unknown key \"port\" in [[listener]] (line 3)"
    );
    assert_eq!(
        err("[server]\nthreads = 1\n", &[]),
        "config error in x.toml: unknown key \"server\" (line 1)"
    );
}

#[test]
fn bad_types_name_the_key() {
    let cases = [
        ("max_inflight = \"20\"", "key \"max_inflight\": expected an integer, got string \"20\" (line 1)"),
        ("\nthreads = 1.5", "key \"threads\": expected an integer, got float 1.5 (line 2)"),
        ("cpus = 3", "key \"cpus\": expected a string, got integer 3 (line 1)"),
        ("backend = true", "key \"backend\": expected a string, got boolean true (line 1)"),
        (
            "connect_timeout = \"10s\"",
            "key \"connect_timeout\": expected a number of seconds, got string \"10s\" (line 1)",
        ),
        (
            "queue_qos0_messages = 1",
            "key \"queue_qos0_messages\": expected true or false, got integer 1 (line 1)",
        ),
        ("max_keepalive = [1]", "key \"max_keepalive\": expected an integer, got an array (line 1)"),
        (
            "max_queued_bytes = { a = 1 }",
            "key \"max_queued_bytes\": expected an integer, got a table (line 1)",
        ),
        (
            "[[listener]]\nbind = 1883",
            "key \"listener[1].bind\": expected a string, got integer 1883 (line 2)",
        ),
        (
            "[[listener]]\nbind = \"127.0.0.1:1\"\nallow_anonymous = \"no\"",
            "key \"listener[1].allow_anonymous\": expected true or false, got string \"no\" (line 3)",
        ),
        ("listener = 5", "key \"listener\": invalid type: integer `5`, expected a sequence (line 1)"),
        (
            "[listener]\nbind = \"127.0.0.1:1\"",
            "key \"listener\": invalid type: map, expected a sequence (line 1)",
        ),
        (
            "listener = [1]",
            "key \"listener\": invalid type: integer `1`, expected a [[listener]] table (line 1)",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(text, &[]), format!("config error in x.toml: {want}"), "text {text:?}");
    }
}

#[test]
fn toml_syntax_errors_are_one_line() {
    let e = err("threads = 1\nthreads = 2\n", &[]);
    assert_eq!(e, "config error in x.toml: duplicate key `threads` in document root (line 2)");
    let e = err("threads = \n", &[]);
    assert!(e.starts_with("config error in x.toml: ") && e.ends_with("(line 1)"), "{e}");
    assert!(!e.contains('\n'), "{e}");
    let e = err("[[listener]\n", &[]);
    assert!(e.starts_with("config error in x.toml: ") && !e.contains('\n'), "{e}");
}

#[test]
fn persistence_table() {
    assert_eq!(build("", &[]).unwrap().persistence, None);
    assert_eq!(build("[persistence]\nenabled = false\n", &[]).unwrap().persistence, None);
    let c = build("[persistence]\nenabled = true\ndata_dir = \"d\"\n", &[]).unwrap();
    let p = c.persistence.unwrap();
    assert_eq!(
        (p.data_dir, p.fsync, p.fsync_interval),
        (PathBuf::from("d"), FsyncPolicy::Always, Duration::from_secs(1))
    );
    let c = build(
        "[persistence]\nenabled = true\ndata_dir = \"d\"\nfsync = \"interval\"\nfsync_interval_ms = 50\n",
        &[],
    );
    let p = c.unwrap().persistence.unwrap();
    assert_eq!((p.fsync, p.fsync_interval), (FsyncPolicy::Interval, Duration::from_millis(50)));
    let e = err("[persistence]\nenabled = true\n", &[]);
    assert!(e.contains("\"persistence\"") && e.contains("data_dir"), "{e}");
    let e = err("[persistence]\nenabled = true\ndata_dir = \"d\"\nfsync = \"sometimes\"\n", &[]);
    assert!(e.contains("persistence.fsync") && e.contains("(line 4)"), "{e}");
    let e = err("[persistence]\nenabled = true\ndata_dir = \"d\"\nfsync_interval_ms = 0\n", &[]);
    assert!(e.contains("persistence.fsync_interval_ms"), "{e}");
    let e = err("[persistence]\nenable = true\n", &[]);
    assert!(e.contains("enable") && !e.contains('\n'), "{e}");
}

#[test]
fn range_errors() {
    let cases = [
        (
            "threads = 0",
            "key \"threads\": must be between 1 and 64 (core ids are kept in a 64-bit mask), got 0",
        ),
        (
            "threads = 65",
            "key \"threads\": must be between 1 and 64 (core ids are kept in a 64-bit mask), got 65",
        ),
        ("max_inflight = 0", "key \"max_inflight\": must be between 1 and 65535, got 0"),
        ("max_inflight = 65536", "key \"max_inflight\": must be between 1 and 65535, got 65536"),
        ("max_queued_messages = 0", "key \"max_queued_messages\": must be at least 1, got 0"),
        ("max_queued_bytes = -5", "key \"max_queued_bytes\": must be at least 1, got -5"),
        ("max_packet_size = 1", "key \"max_packet_size\": must be between 2 and 268435460, got 1"),
        (
            "max_packet_size = 268435461",
            "key \"max_packet_size\": must be between 2 and 268435460, got 268435461",
        ),
        ("max_keepalive = -1", "key \"max_keepalive\": must be between 0 and 65535, got -1"),
        ("max_keepalive = 65536", "key \"max_keepalive\": must be between 0 and 65535, got 65536"),
        (
            "connect_timeout = 0",
            "key \"connect_timeout\": must be more than 0 and at most 86400 seconds, got 0",
        ),
        (
            "connect_timeout = -1.5",
            "key \"connect_timeout\": must be more than 0 and at most 86400 seconds, got -1.5",
        ),
        (
            "connect_timeout = 86401",
            "key \"connect_timeout\": must be more than 0 and at most 86400 seconds, got 86401",
        ),
        (
            "connect_timeout = nan",
            "key \"connect_timeout\": must be more than 0 and at most 86400 seconds, got NaN",
        ),
        (
            "backend = \"io_uring\"",
            "key \"backend\": \"io_uring\" is not one of \"auto\", \"uring\", \"epoll\"",
        ),
        (
            "slow_subscriber = \"block\"",
            "key \"slow_subscriber\": \"block\" is not one of \"pause\", \"drop\"",
        ),
        ("cpus = \"3-1\"", "key \"cpus\": bad cpu list \"3-1\": range end before start"),
    ];
    for (text, want) in cases {
        assert_eq!(err(text, &[]), format!("config error in x.toml: {want} (line 1)"), "text {text:?}");
    }
}

#[test]
fn cpu_and_thread_cross_checks() {
    assert_eq!(
        err("cpus = \"0,7\"", &[]),
        "config error in x.toml: key \"cpus\": cpu 7 is not available to this process (allowed: 0-1) (line 1)"
    );
    assert_eq!(
        err("", &["--cpus", "0-1,7"]),
        "--cpus: cpu 7 is not available to this process (allowed: 0-1)"
    );
    assert_eq!(
        err("threads = 1\ncpus = \"0-1\"", &[]),
        "config error in x.toml: key \"threads\": 1 thread but key \"cpus\" lists 2 cpus (0-1); thread i is \
         pinned to the i-th cpu, so give as many threads as cpus or leave threads unset (line 1)"
    );
    assert_eq!(
        err("cpus = \"0-1\"", &["--threads", "3"]),
        "--threads: 3 threads but key \"cpus\" of x.toml lists 2 cpus (0-1); thread i is pinned to the i-th \
         cpu, so give as many threads as cpus or leave threads unset"
    );
    assert_eq!(
        err("threads = 4", &["--cpus", "1"]),
        "config error in x.toml: key \"threads\": 4 threads but --cpus lists 1 cpu (1); thread i is pinned \
         to the i-th cpu, so give as many threads as cpus or leave threads unset (line 1)"
    );
    // A flag for both replaces the file's pair.
    let c = build("threads = 4\ncpus = \"0-3\"", &["--threads", "1", "--cpus", "1"]);
    assert_eq!(build_on("threads = 4\ncpus = \"0-3\"", &[], Ok(vec![0, 1, 2, 3])).unwrap().threads, 4);
    assert_eq!(c.unwrap().keys.cpus, Some(vec![1]));
    // More than 64 listed cpus cannot become threads.
    assert_eq!(
        build_on("", &["--cpus", "0-99"], Ok((0..100).collect())).unwrap_err().to_string(),
        "--cpus: lists 100 cpus, one thread each, but at most 64 threads are supported (core ids are kept \
         in a 64-bit mask)"
    );
    assert_eq!(
        build_on("", &["--cpus", "0"], Err(io::Error::from_raw_os_error(libc::EPERM)))
            .unwrap_err()
            .to_string(),
        "--cpus: cannot read this process's cpu affinity: Operation not permitted"
    );
}

#[test]
fn flag_errors_name_the_flag() {
    let cases: [(&[&str], &str); 12] = [
        (
            &["--threads", "0"],
            "--threads: must be between 1 and 64 (core ids are kept in a 64-bit mask), got 0",
        ),
        (
            &["--threads", "100"],
            "--threads: must be between 1 and 64 (core ids are kept in a 64-bit mask), got 100",
        ),
        (&["--cpus", "x"], "--cpus: bad cpu list \"x\": \"x\" is not a cpu number"),
        (&["--backend", "kqueue"], "--backend: \"kqueue\" is not one of \"auto\", \"uring\", \"epoll\""),
        (&["--slow-subscriber", "x"], "--slow-subscriber: \"x\" is not one of \"pause\", \"drop\""),
        (
            &["--connect-timeout", "0"],
            "--connect-timeout: must be more than 0 and at most 86400 seconds, got 0",
        ),
        (&["--max-inflight", "0"], "--max-inflight: must be between 1 and 65535, got 0"),
        (&["--max-inflight", "70000"], "--max-inflight: must be between 1 and 65535, got 70000"),
        (&["--max-queued-messages", "0"], "--max-queued-messages: must be at least 1, got 0"),
        (&["--max-queued-bytes", "0"], "--max-queued-bytes: must be at least 1, got 0"),
        (&["--max-packet-size", "1"], "--max-packet-size: must be between 2 and 268435460, got 1"),
        (&["--listen", "localhost"], "--listen: \"localhost\" is not HOST:PORT"),
    ];
    for (flags, want) in cases {
        assert_eq!(err("", flags), want, "flags {flags:?}");
    }
    assert_eq!(
        err("", &["--listen", "127.0.0.1:1883", "--listen", "127.0.0.1:1883"]),
        "--listen: 127.0.0.1:1883 is given twice"
    );
}

#[test]
fn listener_errors() {
    let cases = [
        ("bind = \"localhost\"", "key \"listener[1].bind\": \"localhost\" is not HOST:PORT (line 2)"),
        ("bind = \"localhost:x\"", "key \"listener[1].bind\": \"localhost:x\" is not HOST:PORT (bad port \"x\") (line 2)"),
        ("bind = \"1.2.3.4:70000\"", "key \"listener[1].bind\": \"1.2.3.4:70000\" is not HOST:PORT (bad port \"70000\") (line 2)"),
        (
            "bind = \"example.keys.com:1883\"",
            "key \"listener[1].bind\": \"example.keys.com:1883\": HOST must be an IP address or localhost (host names \
             are not resolved) (line 2)",
        ),
        (
            "bind = \"::1:1883\"",
            "key \"listener[1].bind\": \"::1:1883\" is not HOST:PORT (write an IPv6 address in brackets: \
             [::1]:1883) (line 2)",
        ),
        (
            "bind = \":1883\"",
            "key \"listener[1].bind\": \":1883\" is not HOST:PORT (no host; use 0.0.0.0:1883 for every \
             interface) (line 2)",
        ),
        (
            "bind = \"0.0.0.0:0\"",
            "key \"listener[1].bind\": \"0.0.0.0:0\": port 0 is not allowed (every core must listen on the \
             same port) (line 2)",
        ),
        ("allow_anonymous = true", "key \"listener[1]\": missing key \"bind\" (HOST:PORT) (line 1)"),
        (
            "bind = \"127.0.0.1:1\"\nprotocol = \"tls\"",
            "key \"listener[1].protocol\": \"tls\" is not one of \"mqtt\", \"mqtts\" (line 3)",
        ),
        (
            "bind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"",
            "key \"listener[1]\": protocol = \"mqtts\" needs tls_cert and tls_key (line 1)",
        ),
        (
            "bind = \"127.0.0.1:1\"\ntls_cert = \"c.keys.pem\"",
            "key \"listener[1].tls_cert\": tls_cert needs protocol = \"mqtts\" in this listener (line 3)",
        ),
        (
            "bind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\ntls_cert = \"c.keys.pem\"\ntls_key = \"k.pem\"\n\
             use_identity_as_username = true",
            "key \"listener[1].use_identity_as_username\": needs tls_client_ca: the identity is the client \
             certificate's (line 6)",
        ),
        (
            "bind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\ntls_cert = \"c.keys.pem\"\ntls_key = \"k.pem\"",
            "key \"listener[1].tls_cert\": cannot read c.keys.pem: No such file or directory (os error 2) (line 4)",
        ),
    ];
    for (body, want) in cases {
        let text = format!("[[listener]]\n{body}\n");
        assert_eq!(err(&text, &[]), format!("config error in x.toml: {want}"), "text {text:?}");
    }
    assert_eq!(
        err("[[listener]]\nbind = \"127.0.0.1:1\"\n[[listener]]\nbind = \"127.0.0.1:1\"\n", &[]),
        "config error in x.toml: key \"listener[2].bind\": 127.0.0.1:1 is already the bind of listener[1] (line 4)"
    );
    assert_eq!(
        err("listener = []", &[]),
        "config error in x.toml: key \"listener\": is empty; give at least one [[listener]] table, or leave \
         the key out for 127.0.0.1:1883 (line 1)"
    );
}

#[test]
fn parse_bind_accepts_ip_and_localhost() {
    assert_eq!(parse_bind("10.1.2.3:1883").unwrap(), addr("10.1.2.3:1883"));
    assert_eq!(parse_bind("[::]:1883").unwrap(), addr("[::]:1883"));
    assert_eq!(parse_bind("LocalHost:9").unwrap(), addr("127.0.0.1:9"));
}

#[test]
fn a_missing_file_is_one_line() {
    let cli = Cli { config: Some(PathBuf::from("/nonexistent/coremq.toml")), ..Cli::default() };
    assert_eq!(
        load(&cli).unwrap_err().to_string(),
        "config error: cannot read /nonexistent/coremq.toml: No such file or directory"
    );
}

#[test]
fn load_reads_the_file_then_applies_flags() {
    let dir = std::env::temp_dir().join(format!("coremq-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.keys.toml");
    std::fs::write(&file, "max_inflight = 7\nmax_queued_messages = 9\n").unwrap();
    let cli =
        Cli::try_parse_from(["coremq", "--max-queued-messages", "11", "--config", file.to_str().unwrap()])
            .unwrap();
    let c = load(&cli).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!((c.keys.max_inflight, c.keys.max_queued_messages), (7, 11));
    assert_eq!(c.source, Some(file));
}

#[test]
fn from_toml_uses_the_real_machine() {
    let c = from_toml("max_inflight = 3", Path::new("y.toml")).unwrap();
    assert_eq!(c.keys.max_inflight, 3);
    let e = from_toml("max_inflight = 0", Path::new("y.toml")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "config error in y.toml: key \"max_inflight\": must be between 1 and 65535, got 0 (line 1)"
    );
}

/// The field names serde's derive declared for `T`: it hands them to `deserialize_struct`, which this
/// deserializer records instead of reading anything.
fn field_names<T: for<'de> serde::Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("only the field names were wanted"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    assert!(!fields.is_empty(), "{} declares no fields", std::any::type_name::<T>());
    fields
}

/// Every key of the table of keys, as (table, key) with "" for the top level.
fn declared_keys() -> BTreeSet<(String, String)> {
    keys::docs().iter().map(|k| (k.table.to_string(), k.name.to_string())).collect()
}

#[test]
fn the_table_is_sound() {
    let problems = [
        keys::top::self_check(),
        keys::listener::self_check(),
        keys::auth::self_check(),
        keys::persistence::self_check(),
    ]
    .concat();
    assert!(problems.is_empty(), "{problems:#?}");
    let docs = keys::docs();
    for (i, k) in docs.iter().enumerate() {
        assert!(
            !docs[..i].iter().any(|o| (o.table, o.name) == (k.table, k.name)),
            "{} {} is declared twice",
            k.table,
            k.name
        );
        if let Some(f) = &k.flag {
            assert_eq!(f.flag, format!("--{}", k.name.replace('_', "-")), "a flag is named after its key");
        }
    }
}

/// The file layer reads exactly the table's keys: the fields serde's structs declare are the rows, and
/// the file's sub-tables are the tables of the table.
#[test]
fn the_file_reads_the_tables_keys() {
    let tables = [
        ("listener", "[[listener]]", field_names::<keys::listener::Raw>()),
        ("auth", "[auth]", field_names::<keys::auth::Raw>()),
        ("persistence", "[persistence]", field_names::<keys::persistence::Raw>()),
    ];
    let mut read = BTreeSet::new();
    for &key in field_names::<keys::top::Raw>() {
        match tables.iter().find(|(field, ..)| *field == key) {
            Some((_, header, fields)) => {
                read.extend(fields.iter().map(|k| (header.to_string(), k.to_string())))
            }
            None => {
                read.insert((String::new(), key.to_string()));
            }
        }
    }
    assert_eq!(read, declared_keys());
}

/// The flags are the table's: `coremq -h` lists, in the table's order, each key's flag with its value name
/// and help (and default), and each sets its key.
#[test]
fn the_flags_are_the_tables() {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let flags: Vec<_> = keys::docs()
        .into_iter()
        .filter_map(|k| k.flag.map(|f| (f, table::flag_help(f.help, &k.default))))
        .collect();
    let args: Vec<_> =
        cmd.get_arguments().filter(|a| !["config", "listen"].contains(&a.get_id().as_str())).collect();
    assert_eq!(args.len(), flags.len());
    for (arg, (flag, help)) in args.iter().zip(&flags) {
        assert_eq!(arg.get_long().map(|l| format!("--{l}")).as_deref(), Some(flag.flag));
        let value_names: Vec<&str> =
            arg.get_value_names().unwrap_or_default().iter().map(|n| n.as_str()).collect();
        assert_eq!(value_names, [flag.value_name]);
        assert_eq!(arg.get_help().map(ToString::to_string).as_ref(), Some(help));
    }
    assert!(flags.iter().any(|(_, h)| h.ends_with("[default: 67108864]")), "{flags:?}");
}

#[test]
fn every_flag_sets_its_key() {
    let dir = std::env::temp_dir().join(format!("coremq-config-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (passwd, acl) = (dir.join("passwd"), dir.join("acl"));
    std::fs::write(&passwd, "").unwrap();
    std::fs::write(&acl, "topic readwrite #\n").unwrap();
    let flags = [
        ("--threads", "2"),
        ("--cpus", "0-1"),
        ("--backend", "epoll"),
        ("--connect-timeout", "2.5"),
        ("--max-inflight", "10"),
        ("--max-queued-messages", "100"),
        ("--max-queued-bytes", "4096"),
        ("--max-packet-size", "65536"),
        ("--slow-subscriber", "drop"),
        ("--slow-subscriber-timeout", "5"),
        ("--max-outbox-messages", "7"),
        ("--max-connections", "9"),
        ("--ring-capacity", "64"),
        ("--password-file", passwd.to_str().unwrap()),
        ("--acl-file", acl.to_str().unwrap()),
    ];
    let args: Vec<&str> = flags.iter().flat_map(|(f, v)| [*f, *v]).collect();
    let c = build("", &args);
    std::fs::remove_dir_all(&dir).unwrap();
    let c = c.unwrap();
    let mut want = build("", &[]).unwrap().keys;
    want.threads = Some(2);
    want.cpus = Some(vec![0, 1]);
    want.backend = BackendChoice::Epoll;
    want.connect_timeout = Duration::from_millis(2500);
    want.max_inflight = 10;
    want.max_queued_messages = 100;
    want.max_queued_bytes = 4096;
    want.max_packet_size = 65536;
    want.slow_subscriber = SlowSubscriber::Drop;
    want.slow_subscriber_timeout = 5;
    want.max_outbox_messages = 7;
    want.max_connections = 9;
    want.ring_capacity = 64;
    assert_eq!(c.keys, want);
    assert_eq!(c.password_file.map(|(p, _)| p).as_ref(), Some(&passwd));
    assert_eq!(c.acl_file.map(|(p, _)| p).as_ref(), Some(&acl));
    // Every flag of the table is tried here.
    let tried: BTreeSet<&str> = flags.iter().map(|(f, _)| *f).collect();
    let declared: BTreeSet<&str> = keys::docs().iter().filter_map(|k| k.flag.map(|f| f.flag)).collect();
    assert_eq!(tried, declared);
}

/// The keys `coremq.example.toml` shows, set or commented out (`# key = ...`), each in the table
/// whose header (`[auth]` or `# [auth]`) came last before it.
fn example_keys(text: &str) -> BTreeSet<(String, String)> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.strip_prefix("# ").unwrap_or(line);
        let header = line.trim();
        if header.starts_with('[') && header.ends_with(']') && !header.contains(' ') {
            table = header.to_string();
        } else if let Some((key, _)) = line.split_once(" = ") {
            if !key.is_empty()
                && key.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                keys.insert((table.clone(), key.to_string()));
            }
        }
    }
    keys
}

/// README's configuration table as the table of keys makes it: a row a key, in order, with its default
/// and meaning.
fn readme_table() -> String {
    let mut rows = vec!["| key | default | meaning |".to_string(), "|---|---|---|".to_string()];
    for k in keys::docs() {
        let name =
            if k.table.is_empty() { format!("`{}`", k.name) } else { format!("`{}` `{}`", k.table, k.name) };
        let default = match k.default {
            table::DefaultDoc::Value(v) => format!("`{v}`"),
            table::DefaultDoc::Text(t) => t.to_string(),
        };
        rows.push(format!("| {name} | {default} | {} |", k.doc));
    }
    rows.join("\n")
}

#[test]
fn readme_config_table_is_the_tables() {
    let readme = include_str!("../../README.md");
    let found: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| key | default | meaning |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(!found.is_empty(), "README has no configuration table");
    let want = readme_table();
    assert!(
        found.join("\n") == want,
        "README's configuration table is not the table of keys; it should read:\n{want}"
    );
}

#[test]
fn example_file_parses_to_the_defaults() {
    // Relative to this source file, so the test reads the example shipped next to Cargo.toml.
    let text = include_str!("../../coremq.example.toml");
    let path = Path::new("coremq.example.toml");
    let example = from_toml(text, path).unwrap();
    let defaults = from_toml("", path).unwrap();
    assert_eq!(example.keys, defaults.keys);
    assert_eq!(example.threads, defaults.threads);
    assert_eq!(example.listeners, defaults.listeners);
    assert_eq!(example.persistence, defaults.persistence);
    assert!(example.password_file.is_none() && example.acl_file.is_none());
    // Every key of the table appears in the example, set or commented out, in its table, and every key
    // the example shows is one of the table.
    let missing: Vec<_> = declared_keys().difference(&example_keys(text)).cloned().collect();
    let unknown: Vec<_> = example_keys(text).difference(&declared_keys()).cloned().collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "coremq.example.toml: missing (table, key) {missing:?}; not keys of the table {unknown:?}"
    );
    // The commented-out examples are valid too.
    let uncommented =
        text.replace("# threads = 4", "threads = 4").replace("# cpus = \"0-3\"", "cpus = \"0-3\"");
    let c = build_on(&uncommented, &[], Ok(vec![0, 1, 2, 3])).unwrap();
    assert_eq!((c.threads, c.keys.cpus), (4, Some(vec![0, 1, 2, 3])));
}
