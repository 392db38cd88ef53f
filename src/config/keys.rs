//! Every config key, declared once: its name, type, check, default, flag and help. The file layer
//! (`file.rs`), the flags (`coremq -h`), `Config` and the checks of README's configuration table and of
//! `coremq.example.toml` (the unit tests) are all made from these rows; `table.rs` says how.
//!
//! A row: `key: TYPE, default(VALUE) | unset("what the docs say instead"), CHECK, (FLAG, VALUE NAME,
//! FLAG HELP) | (), "README's meaning";`. A flag is the key's name with dashes; its help gets
//! `[default: VALUE]` from the row. The rows of a table are read, and their flags listed, in this order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::table::{key_table, Bool, FilePath, Named, OneOf, Range, Seconds, BIND, CPU_LIST, MQTT_STRING};
use super::{BackendChoice, FsyncPolicy, MAX_THREADS};
use crate::core::SlowSubscriber;

/// Default of `ring_capacity`: enough to absorb a busy loop tick without blocking.
pub const DEFAULT_RING_CAPACITY: usize = 4096;
/// The largest packet MQTT can express: a 268435455-byte remaining length plus the fixed header
/// (1 type byte and 4 length bytes).
pub const MAX_PACKET_SIZE_LIMIT: usize = 268_435_460;
/// The smallest packet size limit that admits any packet (PINGREQ is 2 bytes).
pub const MIN_PACKET_SIZE_LIMIT: usize = 2;

const THREADS: Range =
    Range { min: 1, max: MAX_THREADS as i128, why: " (core ids are kept in a 64-bit mask)" };
const INFLIGHT: Range = Range::new(1, u16::MAX as i128);
const AT_LEAST_1: Range = Range::new(1, usize::MAX as i128);
const PACKET_SIZE: Range = Range::new(MIN_PACKET_SIZE_LIMIT as i128, MAX_PACKET_SIZE_LIMIT as i128);
const U16: Range = Range::new(0, u16::MAX as i128);
const U32: Range = Range::new(0, u32::MAX as i128);
/// `slow_subscriber_timeout` in seconds: 0 (never) to one day.
const STALL: Range = Range::new(0, 86_400);
const RING: Range = Range::new(2, 1 << 20);
const COUNT: Range = Range::new(0, usize::MAX as i128);
const LEVELS: Range = Range::new(1, 65_535);
/// 23 is what the spec requires every server to take.
const CLIENT_ID_LEN: Range = Range::new(23, 65_535);
/// `fsync_interval_ms`: 1 ms to one hour.
const FSYNC_INTERVAL: Range = Range::new(1, 3_600_000);

const FILE: FilePath = FilePath { non_empty: false };
const DIR: FilePath = FilePath { non_empty: true };

/// `[[listener]] protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Plain TCP.
    Mqtt,
    /// TLS.
    Mqtts,
}

impl Named for BackendChoice {
    const NAMES: &'static [(&'static str, Self)] =
        &[("auto", BackendChoice::Auto), ("uring", BackendChoice::Uring), ("epoll", BackendChoice::Epoll)];
}

impl Named for SlowSubscriber {
    const NAMES: &'static [(&'static str, Self)] =
        &[("pause", SlowSubscriber::Pause), ("drop", SlowSubscriber::Drop)];
}

impl Named for FsyncPolicy {
    const NAMES: &'static [(&'static str, Self)] = &[
        ("always", FsyncPolicy::Always),
        ("interval", FsyncPolicy::Interval),
        ("never", FsyncPolicy::Never),
    ];
}

impl Named for Protocol {
    const NAMES: &'static [(&'static str, Self)] = &[("mqtt", Protocol::Mqtt), ("mqtts", Protocol::Mqtts)];
}

key_table! {
    /// The top level of the file.
    mod top "" #[serde(deny_unknown_fields)] {
        threads: usize, unset("CPUs available"), THREADS,
            ("--threads", "N",
             "Worker threads, one per core, at most 64 [default: one per allowed cpu, or one per cpu in --cpus]"),
            "worker threads, one per core (at most 64)";
        cpus: Vec<usize>, unset("unset (no pinning)"), CPU_LIST,
            ("--cpus", "LIST", "Cores to pin worker threads to, e.g. 0-3,6 (thread i runs on the i-th listed cpu)"),
            "CPU list such as `\"0-3,6\"`: thread *i* is pinned to the *i*-th CPU";
        backend: BackendChoice, default(BackendChoice::Auto), OneOf,
            ("--backend", "auto|uring|epoll",
             "I/O backend: auto (io_uring, or epoll where io_uring is unavailable), uring (io_uring only: exits \
              where it is unavailable) or epoll"),
            "`\"auto\"`, `\"uring\"` or `\"epoll\"`";
        connect_timeout: Duration, default(Duration::from_secs(10)), Seconds,
            ("--connect-timeout", "SECS", "Seconds a new connection has to send CONNECT"),
            "seconds a new connection has to send CONNECT";
        // mosquitto's max_inflight_messages.
        max_inflight: u16, default(20), INFLIGHT,
            ("--max-inflight", "N", "Outbound QoS 1/2 messages in flight per client"),
            "outbound QoS 1/2 messages in flight per client (mosquitto's `max_inflight_messages`)";
        max_queued_messages: usize, default(1000), AT_LEAST_1,
            ("--max-queued-messages", "N", "Messages queued per session beyond the in-flight window or while offline"),
            "messages queued per session beyond the in-flight window or while offline";
        max_queued_bytes: usize, default(64 << 20), AT_LEAST_1,
            ("--max-queued-bytes", "N", "Payload bytes queued per session"),
            "payload bytes queued per session (64 MiB)";
        max_packet_size: usize, default(1 << 20), PACKET_SIZE,
            ("--max-packet-size", "N", "Largest packet accepted, in bytes; a larger one closes the connection"),
            "largest packet accepted; a larger one closes the connection";
        queue_qos0_messages: bool, default(false), Bool, (),
            "also queue QoS 0 messages for offline persistent sessions";
        slow_subscriber: SlowSubscriber, default(SlowSubscriber::Pause), OneOf,
            ("--slow-subscriber", "pause|drop",
             "A full queue of an online subscriber: \"pause\" QoS 1/2 publishers (nothing acknowledged is dropped) \
              or \"drop\" the newest, as mosquitto does"),
            "a connected subscriber's full queue: `\"pause\"` holds matching QoS 1/2 publishers unacknowledged, \
             `\"drop\"` drops the newest (mosquitto)";
        slow_subscriber_timeout: u64, default(60), STALL,
            ("--slow-subscriber-timeout", "SECS",
             "Seconds a connected subscriber's full queue may go without an acknowledgement before the broker \
              disconnects it (pause policy); 0 = never"),
            "seconds a connected subscriber's full queue may go without an acknowledgement before it is \
             disconnected (pause policy); 0 = never";
        max_keepalive: u16, default(65535), U16, (),
            "largest keep-alive: an MQTT 5 client asking for more (or for 0, when this is below 65535) is told \
             this value (Server Keep Alive); a 3.1/3.1.1 client asking for more gets CONNACK 0x02";
        max_session_expiry_interval: u32, default(u32::MAX), U32, (),
            "cap on an MQTT 5 client's Session Expiry Interval (seconds), and the expiry of 3.1.1 persistent \
             sessions; 4294967295 = never expire";
        // mosquitto's max_topic_alias.
        topic_alias_maximum: u16, default(10), U16, (),
            "topic aliases an MQTT 5 client may set towards the broker (announced in CONNACK)";
        // What one connection may have held under the pause policy, so that a client respecting it is
        // never cut off for it.
        receive_maximum: u16, default(1024), INFLIGHT, (),
            "unacknowledged QoS 1/2 PUBLISHes an MQTT 5 client may have towards the broker (announced in \
             CONNACK); more: DISCONNECT 0x93";
        response_information: String, unset("unset"), MQTT_STRING, (),
            "Response Information given in CONNACK to an MQTT 5 client that requests it";
        // About 60 ms of a 160k msgs/s stream.
        max_outbox_messages: usize, default(10_000), AT_LEAST_1,
            ("--max-outbox-messages", "N",
             "Packets waiting to be written to one online client; QoS 0 beyond it is dropped"),
            "packets waiting to be written to one online client; QoS 0 beyond it is dropped and counted";
        max_connections: usize, default(0), COUNT,
            ("--max-connections", "N", "Client connections served at once, all listeners together; 0 = no limit"),
            "client connections at once, all listeners and cores; 0 = no limit (the open-files limit, raised to \
             its hard limit at startup, still applies); over it: CONNACK 0x03";
        max_subscriptions_per_client: usize, default(10_000), AT_LEAST_1, (),
            "subscriptions per session; beyond it a filter gets 0x80 in SUBACK";
        max_topic_levels: usize, default(128), LEVELS, (),
            "levels of a topic or filter; a PUBLISH with more closes the connection, a filter with more gets 0x80";
        // What the 16-bit length prefix allows.
        max_client_id_len: usize, default(65_535), CLIENT_ID_LEN, (),
            "longest client id (23..65535); longer: CONNACK 0x02";
        ring_capacity: usize, default(DEFAULT_RING_CAPACITY), RING,
            ("--ring-capacity", "N", "Slots of each cross-core ring; a full ring pauses publishers, never drops"),
            "slots of each cross-core ring; a full ring pauses publishers on that core";
    } {
        pub(crate) listener: Option<toml::Spanned<Vec<toml::Spanned<listener::Raw>>>>,
        pub(crate) auth: Option<toml::Spanned<auth::Raw>>,
        pub(crate) persistence: Option<toml::Spanned<persistence::Raw>>,
    }
}

key_table! {
    /// `[[listener]]`, one table per listening address (`--listen` replaces them all).
    mod listener "[[listener]]" #[serde(deny_unknown_fields, expecting = "a [[listener]] table")] {
        bind: SocketAddr, unset("`\"127.0.0.1:1883\"`"), BIND, (),
            "address to listen on; one table per listener";
        allow_anonymous: bool, default(true), Bool, (),
            "clients without a username; with `false` and no password file every client is refused with \
             CONNACK 0x05 (as mosquitto does)";
        max_connections: usize, default(0), COUNT, (),
            "connections this listener serves at once; 0 = only the global limit";
        protocol: Protocol, default(Protocol::Mqtt), OneOf, (),
            "`\"mqtt\"` (plain TCP) or `\"mqtts\"` (TLS 1.2/1.3, rustls)";
        tls_cert: PathBuf, unset("unset"), FILE, (),
            "PEM certificate chain of an `mqtts` listener";
        tls_key: PathBuf, unset("unset"), FILE, (),
            "PEM private key of an `mqtts` listener";
        tls_client_ca: PathBuf, unset("unset"), FILE, (),
            "PEM CA: clients must present a certificate it signed (mutual TLS)";
        use_identity_as_username: bool, default(false), Bool, (),
            "with `tls_client_ca`: the client certificate's CN is the username (no password check)";
    } {}
}

key_table! {
    /// `[auth]`: who may connect, and what they may do.
    mod auth "[auth]" #[serde(deny_unknown_fields, expecting = "an [auth] table")] {
        password_file: PathBuf, unset("unset"), FILE,
            ("--password-file", "FILE", "Password file in mosquitto_passwd format (the config's [auth] password_file)"),
            "users and password hashes (mosquitto_passwd format); relative to the config file";
        acl_file: PathBuf, unset("unset"), FILE,
            ("--acl-file", "FILE", "ACL file in mosquitto's acl_file format (the config's [auth] acl_file)"),
            "access rules (mosquitto acl_file format); relative to the config file";
    } {}
}

key_table! {
    /// `[persistence]`: durable sessions and retained messages.
    mod persistence "[persistence]" #[serde(deny_unknown_fields, expecting = "a [persistence] table")] {
        enabled: bool, default(false), Bool, (),
            "keep sessions, their messages and retained messages across restarts and crashes";
        data_dir: PathBuf, unset("unset"), DIR, (),
            "where the logs live (required when enabled); relative to the config file";
        fsync: FsyncPolicy, default(FsyncPolicy::Always), OneOf, (),
            "when the logs are made durable: `\"always\"`, `\"interval\"` or `\"never\"` (see below)";
        fsync_interval_ms: u64, default(1000), FSYNC_INTERVAL, (),
            "for `fsync = \"interval\"`";
    } {}
}

/// The flags of every table's keys, in the order `coremq -h` lists them.
pub(crate) fn add_flags(cmd: clap::Command) -> clap::Command {
    auth::add_flags(top::add_flags(cmd))
}

/// Every row of every table, in order.
#[cfg(test)]
pub(crate) fn docs() -> Vec<super::table::KeyDoc> {
    [top::docs(), listener::docs(), auth::docs(), persistence::docs()].concat()
}
