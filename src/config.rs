//! Broker configuration: a TOML file, overridden by command-line flags, validated into a [`Config`].
//!
//! Every problem is reported as exactly one line naming where the bad value came from: the file and
//! key (with its line number) or the flag. The file is first read into a raw struct whose scalar
//! fields are `toml::Value`s with spans, so type and range errors are produced here, with the key's
//! name, rather than by serde (whose messages name neither the key nor, for nested tables, the line).

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

use crate::auth::acl::Acl;
use crate::auth::password::PasswordFile;
use crate::auth::AuthFiles;
use crate::cli::Cli;
use crate::cpus;
use crate::tls::TlsFiles;

/// At most this many worker threads: the core ids are kept in a 64-bit mask.
pub const MAX_THREADS: usize = 64;
/// The port of the default listener (MQTT's registered port).
pub const DEFAULT_PORT: u16 = 1883;
/// Default for [`Config::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `connect_timeout` accepted: one day. The bound keeps deadline arithmetic
/// (`Instant + timeout`) far from overflow.
pub const MAX_CONNECT_TIMEOUT_SECS: f64 = 86_400.0;
/// Default for [`Config::max_inflight`] (mosquitto's `max_inflight_messages`).
pub const DEFAULT_MAX_INFLIGHT: u16 = 20;
/// Default for [`Config::max_queued_messages`] (mosquitto's `max_queued_messages`).
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
/// Default for [`Config::max_queued_bytes`]: 64 MiB.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 64 << 20;
/// Default for [`Config::max_packet_size`]: 1 MiB.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 1 << 20;
/// Default for [`Config::max_outbox_messages`]: about 60 ms of a 160k msgs/s stream.
pub const DEFAULT_MAX_OUTBOX_MESSAGES: usize = 10_000;
/// Default for [`Config::max_subscriptions_per_client`].
pub const DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 10_000;
/// Default for [`Config::max_topic_levels`].
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 128;
/// Default for [`Config::max_client_id_len`]: what the 16-bit length prefix allows.
pub const DEFAULT_MAX_CLIENT_ID_LEN: usize = 65_535;
/// Default for [`Config::ring_capacity`]: enough to absorb a busy loop tick without blocking.
pub const DEFAULT_RING_CAPACITY: usize = 4096;
/// The largest packet MQTT can express: a 268435455-byte remaining length plus the fixed header
/// (1 type byte and 4 length bytes).
pub const MAX_PACKET_SIZE_LIMIT: usize = 268_435_460;
/// The smallest packet size limit that admits any packet (PINGREQ is 2 bytes).
pub const MIN_PACKET_SIZE_LIMIT: usize = 2;
/// Default for [`Config::max_keepalive`].
pub const DEFAULT_MAX_KEEPALIVE: u16 = 65535;
/// Default for [`Config::max_session_expiry_interval`]: no cap.
pub const DEFAULT_MAX_SESSION_EXPIRY: u32 = u32::MAX;
/// Default for [`Config::topic_alias_maximum`] (mosquitto's `max_topic_alias`).
pub const DEFAULT_TOPIC_ALIAS_MAXIMUM: u16 = 10;
/// Default for [`Config::receive_maximum`]: what one connection may have held under the pause policy
/// (`core::HOLD_MESSAGES`), so that a client respecting it is never cut off for it.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 1024;

/// Which I/O backend to run the cores on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, otherwise epoll with a warning.
    Auto,
    /// io_uring or a startup error.
    Uring,
    /// epoll only.
    Epoll,
}

impl BackendChoice {
    /// The name used in the config file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Epoll => "epoll",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "uring" => Ok(BackendChoice::Uring),
            "epoll" => Ok(BackendChoice::Epoll),
            _ => Err(format!("\"{s}\" is not one of \"auto\", \"uring\", \"epoll\"")),
        }
    }
}

/// What a full queue of an online subscriber does (`slow_subscriber`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowSubscriberChoice {
    /// Publishers of matching QoS 1/2 messages wait, unacknowledged, until the queue drains to half.
    Pause,
    /// The newest messages are dropped and counted, as in mosquitto.
    Drop,
}

impl SlowSubscriberChoice {
    /// The name used in the config file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SlowSubscriberChoice::Pause => "pause",
            SlowSubscriberChoice::Drop => "drop",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(SlowSubscriberChoice::Pause),
            "drop" => Ok(SlowSubscriberChoice::Drop),
            _ => Err(format!("\"{s}\" is not one of \"pause\", \"drop\"")),
        }
    }
}

/// When the persistence log is made durable (`[persistence] fsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Before a QoS 1/2 PUBLISH is acknowledged (group commit): an acknowledged message survives a power
    /// loss.
    Always,
    /// Every `fsync_interval_ms`: a crash of the machine loses at most that much; a crash of the broker
    /// alone loses nothing written.
    Interval,
    /// Never explicitly: the kernel writes back when it likes (a broker crash loses nothing written, a
    /// machine crash may lose the last ~30 s).
    Never,
}

impl FsyncPolicy {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "interval" => Ok(FsyncPolicy::Interval),
            "never" => Ok(FsyncPolicy::Never),
            _ => Err(format!("\"{s}\" is not one of \"always\", \"interval\", \"never\"")),
        }
    }
}

/// `[persistence]` with `enabled = true`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistenceConfig {
    /// Where the logs live (relative paths are relative to the config file).
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// For [`FsyncPolicy::Interval`].
    pub fsync_interval: Duration,
}

/// Default for `[persistence] fsync_interval_ms`.
pub const DEFAULT_FSYNC_INTERVAL_MS: u64 = 1000;

/// One listening address; every core binds it with `SO_REUSEPORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Address and port to listen on.
    pub bind: SocketAddr,
    /// Whether clients without a username may connect. With `false` and no password file every client
    /// is refused with CONNACK 0x05, as in mosquitto; with a password file, clients with a username
    /// are checked against it either way.
    pub allow_anonymous: bool,
    /// Connections this listener serves at once, across all cores; 0 = no limit of its own.
    pub max_connections: usize,
    /// `protocol = "mqtts"`: the TLS files; `None` for plain `mqtt`.
    pub tls: Option<TlsFiles>,
}

impl ListenerConfig {
    fn new(bind: SocketAddr) -> Self {
        ListenerConfig { bind, allow_anonymous: true, max_connections: 0, tls: None }
    }
}

/// The validated broker configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Worker threads, 1..=64. Default: the number of cpus in `cpus` if given, else the number of
    /// cpus this process may run on (capped at 64).
    pub threads: usize,
    /// Cpu thread *i* is pinned to (`cpus[i]`); `None` = don't pin.
    pub cpus: Option<Vec<usize>>,
    /// I/O backend. Default `Auto`.
    pub backend: BackendChoice,
    /// Addresses to listen on; never empty. Default: one on 127.0.0.1:1883 (local only, like mosquitto 2).
    pub listeners: Vec<ListenerConfig>,
    /// True when neither the file nor `--listen` named a listener, so main can say how to open up.
    pub default_listener: bool,
    /// Time a new connection has to send CONNECT. Default 10 s.
    pub connect_timeout: Duration,
    /// Outbound QoS 1/2 messages in flight per client, 1..=65535. Default 20.
    pub max_inflight: u16,
    /// Messages queued per session (offline, or beyond the in-flight window), at least 1. Default 1000.
    pub max_queued_messages: usize,
    /// Payload bytes queued per session, at least 1. Default 64 MiB.
    pub max_queued_bytes: usize,
    /// Largest packet accepted, 2..=268435460 bytes. Default 1 MiB.
    pub max_packet_size: usize,
    /// Whether QoS 0 messages are queued for offline persistent sessions. Default false (mosquitto).
    pub queue_qos0_messages: bool,
    /// What happens when an online subscriber's queue is full. Default `Pause` (nothing acknowledged is
    /// dropped); `Drop` is mosquitto's behaviour.
    pub slow_subscriber: SlowSubscriberChoice,
    /// Pause policy: a connected subscriber whose full queue has not moved (no PUBACK/PUBCOMP) for this
    /// many seconds is disconnected, so that one stuck client cannot hold publishers forever; 0 = never.
    /// Default 60.
    pub slow_subscriber_timeout: u64,
    /// Largest keep-alive, 0..=65535 (mosquitto's `max_keepalive`): a v5 client asking for more (or for
    /// 0, when this is below 65535) is told this value as Server Keep Alive; a 3.1/3.1.1 client asking for
    /// more gets CONNACK 0x02. Default 65535.
    pub max_keepalive: u16,
    /// Cap on a v5 client's Session Expiry Interval, and the expiry of 3.1.1 persistent sessions
    /// (seconds; 4294967295 = never expire). Default 4294967295.
    pub max_session_expiry_interval: u32,
    /// Topic aliases a v5 client may set towards the broker, 0..=65535 (announced in CONNACK). Default 10.
    pub topic_alias_maximum: u16,
    /// Unacknowledged QoS 1/2 PUBLISHes a v5 client may have towards the broker, 1..=65535 (announced in
    /// CONNACK; exceeding it is DISCONNECT 0x93). Default 1024.
    pub receive_maximum: u16,
    /// Response Information sent in CONNACK to a v5 client that requests it (request/response); unset =
    /// none is sent.
    pub response_information: Option<String>,
    /// Packets waiting to be written to one online client, at least 1; QoS 0 messages beyond it are
    /// dropped and counted (QoS 1/2 wait in the session queue instead). Default 10,000.
    pub max_outbox_messages: usize,
    /// Client connections served at once, across all listeners and cores; 0 = no limit (the open-files
    /// limit, raised to its hard limit at startup, still bounds it). Default 0.
    pub max_connections: usize,
    /// Subscriptions one session may hold; a SUBSCRIBE beyond it gets 0x80 for that filter. Default 10,000.
    pub max_subscriptions_per_client: usize,
    /// Levels a topic name or filter may have. A PUBLISH with more closes the connection, a filter with
    /// more gets 0x80 in SUBACK. Default 128.
    pub max_topic_levels: usize,
    /// Longest client id accepted (23..=65535, 23 being what the spec requires every server to take);
    /// a longer one gets CONNACK 0x02. Default 65535.
    pub max_client_id_len: usize,
    /// Slots of each cross-core ring, 2..=1048576. A full ring pauses the publishing core's readers.
    /// Default 4096.
    pub ring_capacity: usize,
    /// `[auth] password_file`, read and parsed at startup (mosquitto_passwd format).
    pub password_file: Option<(PathBuf, PasswordFile)>,
    /// `[auth] acl_file`, read and parsed at startup (mosquitto acl_file format).
    pub acl_file: Option<(PathBuf, Acl)>,
    /// `[persistence]`, when enabled.
    pub persistence: Option<PersistenceConfig>,
    /// The file this came from, if any.
    pub source: Option<PathBuf>,
}

/// A configuration error; its `Display` is the one line to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads the file named by cli.config (if any), applies defaults, then CLI overrides, then validates.
pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
    let layer = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("config error: cannot read {}: {}", path.display(), io_message(&e)))
            })?;
            parse_file(&text, path)?
        }
        None => Layer::default(),
    };
    resolve(layer, cli, cpus::allowed_cpus())
}

/// Same from a TOML string (used by load and tests); `path` only for messages.
/// Command-line overrides are applied by [`load`], not here.
pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
    resolve(parse_file(text, path)?, &Cli::default(), cpus::allowed_cpus())
}

/// `io::Error`'s Display ends in " (os error 2)", which is noise in a one-line message.
fn io_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) => s.get(..i).unwrap_or(&s).to_string(),
        None => s,
    }
}

/// Where a value came from, so its error can name it.
#[derive(Clone, Debug)]
enum Origin {
    File { path: PathBuf, key: String, line: usize },
    Flag(&'static str),
}

impl Origin {
    fn error(&self, msg: impl fmt::Display) -> ConfigError {
        match self {
            Origin::File { path, key, line } => {
                ConfigError(format!("config error in {}: key \"{key}\": {msg} (line {line})", path.display()))
            }
            Origin::Flag(flag) => ConfigError(format!("{flag}: {msg}")),
        }
    }

    /// How another value's error refers to this one.
    fn describe(&self, from: &Origin) -> String {
        match (self, from) {
            (Origin::File { key, .. }, Origin::File { .. }) => format!("key \"{key}\""),
            (Origin::File { path, key, .. }, Origin::Flag(_)) => {
                format!("key \"{key}\" of {}", path.display())
            }
            (Origin::Flag(flag), _) => flag.to_string(),
        }
    }
}

/// The settings given so far (by the file, then the flags); `None` = not given.
#[derive(Default, Debug)]
struct Layer {
    source: Option<PathBuf>,
    threads: Option<(usize, Origin)>,
    cpus: Option<(Vec<usize>, Origin)>,
    backend: Option<BackendChoice>,
    listeners: Option<Vec<ListenerConfig>>,
    connect_timeout: Option<Duration>,
    max_inflight: Option<u16>,
    max_queued_messages: Option<usize>,
    max_queued_bytes: Option<usize>,
    max_packet_size: Option<usize>,
    queue_qos0_messages: Option<bool>,
    slow_subscriber: Option<SlowSubscriberChoice>,
    slow_subscriber_timeout: Option<u64>,
    max_keepalive: Option<u16>,
    max_session_expiry_interval: Option<u32>,
    topic_alias_maximum: Option<u16>,
    receive_maximum: Option<u16>,
    response_information: Option<String>,
    ring_capacity: Option<usize>,
    max_outbox_messages: Option<usize>,
    max_connections: Option<usize>,
    max_subscriptions_per_client: Option<usize>,
    max_topic_levels: Option<usize>,
    max_client_id_len: Option<usize>,
    password_file: Option<(PathBuf, Origin)>,
    acl_file: Option<(PathBuf, Origin)>,
    persistence: Option<PersistenceConfig>,
}

/// The file as serde sees it. Scalars stay `Value`s so that type errors are reported by `FileCtx`
/// with the key's name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    threads: Option<Spanned<Value>>,
    cpus: Option<Spanned<Value>>,
    backend: Option<Spanned<Value>>,
    connect_timeout: Option<Spanned<Value>>,
    max_inflight: Option<Spanned<Value>>,
    max_queued_messages: Option<Spanned<Value>>,
    max_queued_bytes: Option<Spanned<Value>>,
    max_packet_size: Option<Spanned<Value>>,
    queue_qos0_messages: Option<Spanned<Value>>,
    slow_subscriber: Option<Spanned<Value>>,
    slow_subscriber_timeout: Option<Spanned<Value>>,
    max_keepalive: Option<Spanned<Value>>,
    max_session_expiry_interval: Option<Spanned<Value>>,
    topic_alias_maximum: Option<Spanned<Value>>,
    receive_maximum: Option<Spanned<Value>>,
    response_information: Option<Spanned<Value>>,
    ring_capacity: Option<Spanned<Value>>,
    max_outbox_messages: Option<Spanned<Value>>,
    max_connections: Option<Spanned<Value>>,
    max_subscriptions_per_client: Option<Spanned<Value>>,
    max_topic_levels: Option<Spanned<Value>>,
    max_client_id_len: Option<Spanned<Value>>,
    listener: Option<Spanned<Vec<Spanned<RawListener>>>>,
    auth: Option<Spanned<RawAuth>>,
    persistence: Option<Spanned<RawPersistence>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [persistence] table")]
struct RawPersistence {
    enabled: Option<Spanned<Value>>,
    data_dir: Option<Spanned<Value>>,
    fsync: Option<Spanned<Value>>,
    fsync_interval_ms: Option<Spanned<Value>>,
}

/// `fsync_interval_ms`: 1 ms to one hour.
const FSYNC_INTERVAL: Range = Range::new(1, 3_600_000);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [auth] table")]
struct RawAuth {
    password_file: Option<Spanned<Value>>,
    acl_file: Option<Spanned<Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[listener]] table")]
struct RawListener {
    bind: Option<Spanned<Value>>,
    allow_anonymous: Option<Spanned<Value>>,
    max_connections: Option<Spanned<Value>>,
    protocol: Option<Spanned<Value>>,
    tls_cert: Option<Spanned<Value>>,
    tls_key: Option<Spanned<Value>>,
    tls_client_ca: Option<Spanned<Value>>,
    use_identity_as_username: Option<Spanned<Value>>,
}

/// An integer setting's accepted range and how to say it.
struct Range {
    min: i128,
    max: i128,
    /// Appended to the range message to say why the bound exists.
    why: &'static str,
}

impl Range {
    const fn new(min: i128, max: i128) -> Self {
        Range { min, max, why: "" }
    }

    fn check(&self, v: i128) -> Result<i128, String> {
        if (self.min..=self.max).contains(&v) {
            return Ok(v);
        }
        if self.max >= u64::MAX as i128 {
            Err(format!("must be at least {}{}, got {v}", self.min, self.why))
        } else {
            Err(format!("must be between {} and {}{}, got {v}", self.min, self.max, self.why))
        }
    }
}

const THREADS: Range =
    Range { min: 1, max: MAX_THREADS as i128, why: " (core ids are kept in a 64-bit mask)" };
const INFLIGHT: Range = Range::new(1, u16::MAX as i128);
const QUEUED: Range = Range::new(1, usize::MAX as i128);
const PACKET_SIZE: Range = Range::new(MIN_PACKET_SIZE_LIMIT as i128, MAX_PACKET_SIZE_LIMIT as i128);
const KEEPALIVE: Range = Range::new(0, u16::MAX as i128);
const EXPIRY: Range = Range::new(0, u32::MAX as i128);
const ALIASES: Range = Range::new(0, u16::MAX as i128);
/// `slow_subscriber_timeout` in seconds: 0 (never) to one day.
const STALL: Range = Range::new(0, 86_400);
/// Default for [`Config::slow_subscriber_timeout`].
pub const DEFAULT_SLOW_SUBSCRIBER_TIMEOUT: u64 = 60;
const RING: Range = Range::new(2, 1 << 20);
const COUNT: Range = Range::new(0, usize::MAX as i128);
const LEVELS: Range = Range::new(1, 65_535);
const CLIENT_ID_LEN: Range = Range::new(23, 65_535);

fn connect_timeout(secs: f64) -> Result<Duration, String> {
    if secs.is_finite() && secs > 0.0 && secs <= MAX_CONNECT_TIMEOUT_SECS {
        // Cannot fail: the value is finite, positive and at most one day.
        Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
    } else {
        Err(format!("must be more than 0 and at most {MAX_CONNECT_TIMEOUT_SECS} seconds, got {secs}"))
    }
}

/// Parses a listener address: an IP address and port (`[::1]:1883` for IPv6) or `localhost:PORT`.
///
/// Other host names are refused rather than resolved: a DNS lookup at startup can block for a long
/// time, and a name resolving to several addresses would make "the" listener ambiguous.
pub fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(format!("\"{s}\" is not HOST:PORT"));
            };
            let port: u16 =
                port.parse().map_err(|_| format!("\"{s}\" is not HOST:PORT (bad port \"{port}\")"))?;
            if host.eq_ignore_ascii_case("localhost") {
                // The IPv4 loopback, like the default listener; "localhost" in /etc/hosts may also
                // name ::1, and picking one keeps the bound address predictable.
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
            } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
                return Err(format!(
                    "\"{s}\" is not HOST:PORT (write an IPv6 address in brackets: [{host}]:{port})"
                ));
            } else if host.is_empty() {
                return Err(format!(
                    "\"{s}\" is not HOST:PORT (no host; use 0.0.0.0:{port} for every interface)"
                ));
            } else {
                return Err(format!(
                    "\"{s}\": HOST must be an IP address or localhost (host names are not resolved)"
                ));
            }
        }
    };
    if addr.port() == 0 {
        // Every core binds the same address with SO_REUSEPORT; port 0 would give each its own port.
        return Err(format!("\"{s}\": port 0 is not allowed (every core must listen on the same port)"));
    }
    Ok(addr)
}

/// "1 cpu", "2 cpus".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes().get(..end).map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count()) + 1
}

/// The key that the line containing `offset` assigns or the table it opens, for serde errors that
/// name neither.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text.get(..offset.min(text.len()))?.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next()?.trim();
    let key = if let Some(header) = line.strip_prefix('[') {
        header.trim_start_matches('[').split(']').next()?
    } else {
        line.split('=').next()?
    };
    let key = key.trim().trim_matches('"').trim_matches('\'');
    (!key.is_empty()).then(|| key.to_string())
}

/// Describes a value for "expected X, got Y" messages.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "an array".to_string(),
        Value::Table(_) => "a table".to_string(),
    }
}

/// Turns the file's values into checked settings, naming the file, key and line on error.
struct FileCtx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl FileCtx<'_> {
    fn origin(&self, key: &str, span: std::ops::Range<usize>) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            line: line_of(self.text, span.start),
        }
    }

    fn int(&self, key: &str, v: &Spanned<Value>, range: &Range) -> Result<(i128, Origin), ConfigError> {
        let origin = self.origin(key, v.span());
        match v.get_ref() {
            Value::Integer(i) => {
                range.check(i128::from(*i)).map(|i| (i, origin.clone())).map_err(|m| origin.error(m))
            }
            other => Err(origin.error(format!("expected an integer, got {}", describe(other)))),
        }
    }

    fn string<'v>(&self, key: &str, v: &'v Spanned<Value>) -> Result<(&'v str, Origin), ConfigError> {
        let origin = self.origin(key, v.span());
        match v.get_ref() {
            Value::String(s) => Ok((s, origin)),
            other => Err(origin.error(format!("expected a string, got {}", describe(other)))),
        }
    }

    fn bool(&self, key: &str, v: &Spanned<Value>) -> Result<bool, ConfigError> {
        match v.get_ref() {
            Value::Boolean(b) => Ok(*b),
            other => Err(self
                .origin(key, v.span())
                .error(format!("expected true or false, got {}", describe(other)))),
        }
    }

    /// Maps toml/serde's multi-line message (with its caret diagram) to one line.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let path = self.path.display();
        let msg = e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        let at = e.span().map(|s| s.start);
        let line = at.map(|a| format!(" (line {})", line_of(self.text, a))).unwrap_or_default();
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or(rest);
            // serde's list of expected fields tells which table the key was in.
            let table = if rest.contains("`allow_anonymous`") { " in [[listener]]" } else { "" };
            return ConfigError(format!("config error in {path}: unknown key \"{key}\"{table}{line}"));
        }
        if msg.starts_with("invalid type") || msg.starts_with("invalid length") {
            if let Some(key) = at.and_then(|a| key_at(self.text, a)) {
                return ConfigError(format!("config error in {path}: key \"{key}\": {msg}{line}"));
            }
        }
        ConfigError(format!("config error in {path}: {msg}{line}"))
    }
}

/// Parses and checks the file's values (each on its own); cross-checks happen in `resolve`.
fn parse_file(text: &str, path: &Path) -> Result<Layer, ConfigError> {
    let ctx = FileCtx { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    let mut layer = Layer { source: Some(path.to_path_buf()), ..Layer::default() };

    if let Some(v) = &raw.threads {
        let (n, origin) = ctx.int("threads", v, &THREADS)?;
        layer.threads = Some((usize::try_from(n).unwrap_or(MAX_THREADS), origin));
    }
    if let Some(v) = &raw.cpus {
        let (s, origin) = ctx.string("cpus", v)?;
        let list = cpus::parse_cpu_list(s).map_err(|m| origin.error(m))?;
        layer.cpus = Some((list, origin));
    }
    if let Some(v) = &raw.backend {
        let (s, origin) = ctx.string("backend", v)?;
        layer.backend = Some(BackendChoice::parse(s).map_err(|m| origin.error(m))?);
    }
    if let Some(v) = &raw.connect_timeout {
        let origin = ctx.origin("connect_timeout", v.span());
        let secs = match v.get_ref() {
            // i64 -> f64 may round for huge values, which the range check rejects anyway.
            Value::Integer(i) => *i as f64,
            Value::Float(f) => *f,
            other => {
                return Err(origin.error(format!("expected a number of seconds, got {}", describe(other))))
            }
        };
        layer.connect_timeout = Some(connect_timeout(secs).map_err(|m| origin.error(m))?);
    }
    if let Some(v) = &raw.max_inflight {
        let (n, _) = ctx.int("max_inflight", v, &INFLIGHT)?;
        layer.max_inflight = Some(u16::try_from(n).unwrap_or(u16::MAX));
    }
    if let Some(v) = &raw.max_queued_messages {
        let (n, _) = ctx.int("max_queued_messages", v, &QUEUED)?;
        layer.max_queued_messages = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_queued_bytes {
        let (n, _) = ctx.int("max_queued_bytes", v, &QUEUED)?;
        layer.max_queued_bytes = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_packet_size {
        let (n, _) = ctx.int("max_packet_size", v, &PACKET_SIZE)?;
        layer.max_packet_size = Some(usize::try_from(n).unwrap_or(MAX_PACKET_SIZE_LIMIT));
    }
    if let Some(v) = &raw.queue_qos0_messages {
        layer.queue_qos0_messages = Some(ctx.bool("queue_qos0_messages", v)?);
    }
    if let Some(v) = &raw.slow_subscriber {
        let (s, origin) = ctx.string("slow_subscriber", v)?;
        layer.slow_subscriber = Some(SlowSubscriberChoice::parse(s).map_err(|m| origin.error(m))?);
    }
    if let Some(v) = &raw.slow_subscriber_timeout {
        let (n, _) = ctx.int("slow_subscriber_timeout", v, &STALL)?;
        layer.slow_subscriber_timeout = Some(u64::try_from(n).unwrap_or(0));
    }
    if let Some(v) = &raw.max_keepalive {
        let (n, _) = ctx.int("max_keepalive", v, &KEEPALIVE)?;
        layer.max_keepalive = Some(u16::try_from(n).unwrap_or(u16::MAX));
    }
    if let Some(v) = &raw.max_session_expiry_interval {
        let (n, _) = ctx.int("max_session_expiry_interval", v, &EXPIRY)?;
        layer.max_session_expiry_interval = Some(u32::try_from(n).unwrap_or(u32::MAX));
    }
    if let Some(v) = &raw.topic_alias_maximum {
        let (n, _) = ctx.int("topic_alias_maximum", v, &ALIASES)?;
        layer.topic_alias_maximum = Some(u16::try_from(n).unwrap_or(u16::MAX));
    }
    if let Some(v) = &raw.receive_maximum {
        let (n, _) = ctx.int("receive_maximum", v, &INFLIGHT)?;
        layer.receive_maximum = Some(u16::try_from(n).unwrap_or(u16::MAX));
    }
    if let Some(v) = &raw.response_information {
        let (s, origin) = ctx.string("response_information", v)?;
        if s.is_empty() || s.len() > u16::MAX as usize || s.contains('\0') {
            return Err(origin.error("must be a non-empty MQTT string (at most 65535 bytes, no U+0000)"));
        }
        layer.response_information = Some(s.to_string());
    }
    if let Some(v) = &raw.max_outbox_messages {
        let (n, _) = ctx.int("max_outbox_messages", v, &QUEUED)?;
        layer.max_outbox_messages = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_connections {
        let (n, _) = ctx.int("max_connections", v, &COUNT)?;
        layer.max_connections = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_subscriptions_per_client {
        let (n, _) = ctx.int("max_subscriptions_per_client", v, &QUEUED)?;
        layer.max_subscriptions_per_client = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_topic_levels {
        let (n, _) = ctx.int("max_topic_levels", v, &LEVELS)?;
        layer.max_topic_levels = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.max_client_id_len {
        let (n, _) = ctx.int("max_client_id_len", v, &CLIENT_ID_LEN)?;
        layer.max_client_id_len = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = &raw.ring_capacity {
        let (n, _) = ctx.int("ring_capacity", v, &RING)?;
        layer.ring_capacity = Some(usize::try_from(n).unwrap_or(DEFAULT_RING_CAPACITY));
    }
    if let Some(table) = &raw.persistence {
        let t = table.get_ref();
        let enabled = match &t.enabled {
            Some(v) => ctx.bool("persistence.enabled", v)?,
            None => false,
        };
        let dir = path.parent().unwrap_or(Path::new(""));
        let data_dir = match &t.data_dir {
            Some(v) => {
                let (s, origin) = ctx.string("persistence.data_dir", v)?;
                if s.is_empty() {
                    return Err(origin.error("must not be empty"));
                }
                Some(dir.join(s))
            }
            None => None,
        };
        let fsync = match &t.fsync {
            Some(v) => {
                let (s, origin) = ctx.string("persistence.fsync", v)?;
                FsyncPolicy::parse(s).map_err(|m| origin.error(m))?
            }
            None => FsyncPolicy::Always,
        };
        let interval = match &t.fsync_interval_ms {
            Some(v) => {
                u64::try_from(ctx.int("persistence.fsync_interval_ms", v, &FSYNC_INTERVAL)?.0).unwrap_or(1)
            }
            None => DEFAULT_FSYNC_INTERVAL_MS,
        };
        if enabled {
            let Some(data_dir) = data_dir else {
                return Err(ctx
                    .origin("persistence", table.span())
                    .error("enabled = true needs data_dir = \"PATH\" (where the logs are kept)"));
            };
            layer.persistence =
                Some(PersistenceConfig { data_dir, fsync, fsync_interval: Duration::from_millis(interval) });
        }
    }
    if let Some(auth) = &raw.auth {
        let auth = auth.get_ref();
        // Relative to the config file, so that a config and its files can move together.
        let dir = path.parent().unwrap_or(Path::new(""));
        if let Some(v) = &auth.password_file {
            let (s, origin) = ctx.string("auth.password_file", v)?;
            layer.password_file = Some((dir.join(s), origin));
        }
        if let Some(v) = &auth.acl_file {
            let (s, origin) = ctx.string("auth.acl_file", v)?;
            layer.acl_file = Some((dir.join(s), origin));
        }
    }
    if let Some(tables) = &raw.listener {
        if tables.get_ref().is_empty() {
            return Err(ctx.origin("listener", tables.span()).error(
                "is empty; give at least one [[listener]] table, or leave the key out for 127.0.0.1:1883",
            ));
        }
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for (i, table) in tables.get_ref().iter().enumerate() {
            // Counted from 1, like the tables as a reader sees them in the file.
            let name = format!("listener[{}]", i + 1);
            let entry = table.get_ref();
            let Some(bind) = &entry.bind else {
                return Err(ctx.origin(&name, table.span()).error("missing key \"bind\" (HOST:PORT)"));
            };
            let key = format!("{name}.bind");
            let (s, origin) = ctx.string(&key, bind)?;
            let addr = parse_bind(s).map_err(|m| origin.error(m))?;
            if let Some(j) = listeners.iter().position(|l| l.bind == addr) {
                return Err(origin.error(format!("{addr} is already the bind of listener[{}]", j + 1)));
            }
            let allow_anonymous = match &entry.allow_anonymous {
                Some(v) => ctx.bool(&format!("{name}.allow_anonymous"), v)?,
                None => true,
            };
            let max_connections = match &entry.max_connections {
                Some(v) => usize::try_from(ctx.int(&format!("{name}.max_connections"), v, &COUNT)?.0)
                    .unwrap_or(usize::MAX),
                None => 0,
            };
            let tls = listener_tls(&ctx, &name, table, path)?;
            listeners.push(ListenerConfig { bind: addr, allow_anonymous, max_connections, tls });
        }
        layer.listeners = Some(listeners);
    }
    Ok(layer)
}

/// The TLS part of one `[[listener]]`: `protocol`, and the `tls_*` keys `mqtts` needs (paths relative to
/// the config file). The files are read and checked here, so a bad one stops the broker at startup.
fn listener_tls(
    ctx: &FileCtx,
    name: &str,
    table: &Spanned<RawListener>,
    path: &Path,
) -> Result<Option<TlsFiles>, ConfigError> {
    let entry = table.get_ref();
    let dir = path.parent().unwrap_or(Path::new(""));
    let file = |key: &str, v: &Option<Spanned<Value>>| -> Result<Option<(PathBuf, Origin)>, ConfigError> {
        match v {
            Some(v) => {
                let (s, origin) = ctx.string(&format!("{name}.{key}"), v)?;
                Ok(Some((dir.join(s), origin)))
            }
            None => Ok(None),
        }
    };
    let tls = match &entry.protocol {
        Some(v) => {
            let (s, origin) = ctx.string(&format!("{name}.protocol"), v)?;
            match s {
                "mqtt" => false,
                "mqtts" => true,
                other => return Err(origin.error(format!("\"{other}\" is not one of \"mqtt\", \"mqtts\""))),
            }
        }
        None => false,
    };
    let cert = file("tls_cert", &entry.tls_cert)?;
    let key = file("tls_key", &entry.tls_key)?;
    let client_ca = file("tls_client_ca", &entry.tls_client_ca)?;
    let identity = match &entry.use_identity_as_username {
        Some(v) => Some((
            ctx.bool(&format!("{name}.use_identity_as_username"), v)?,
            ctx.origin(&format!("{name}.use_identity_as_username"), v.span()),
        )),
        None => None,
    };
    if !tls {
        let stray = [("tls_cert", &cert), ("tls_key", &key), ("tls_client_ca", &client_ca)];
        if let Some((k, Some((_, origin)))) = stray.into_iter().find(|(_, f)| f.is_some()) {
            return Err(origin.error(format!("{k} needs protocol = \"mqtts\" in this listener")));
        }
        if let Some((true, origin)) = identity {
            return Err(origin.error("needs protocol = \"mqtts\" and tls_client_ca in this listener"));
        }
        return Ok(None);
    }
    let (Some((cert, origin)), Some((key, _))) = (cert, key) else {
        return Err(ctx.origin(name, table.span()).error("protocol = \"mqtts\" needs tls_cert and tls_key"));
    };
    let use_identity_as_username = match identity {
        Some((true, o)) if client_ca.is_none() => {
            return Err(o.error("needs tls_client_ca: the identity is the client certificate's"))
        }
        Some((v, _)) => v,
        None => false,
    };
    let files = TlsFiles { cert, key, client_ca: client_ca.map(|(p, _)| p), use_identity_as_username };
    crate::tls::server_config(&files).map_err(|m| origin.error(m))?;
    Ok(Some(files))
}

/// Applies the flags over the file's layer.
fn apply_cli(layer: &mut Layer, cli: &Cli) -> Result<(), ConfigError> {
    if let Some(n) = cli.threads {
        let origin = Origin::Flag("--threads");
        let n = THREADS.check(n as i128).map_err(|m| origin.error(m))?;
        layer.threads = Some((usize::try_from(n).unwrap_or(MAX_THREADS), origin));
    }
    if let Some(s) = &cli.cpus {
        let origin = Origin::Flag("--cpus");
        let list = cpus::parse_cpu_list(s).map_err(|m| origin.error(m))?;
        layer.cpus = Some((list, origin));
    }
    if let Some(s) = &cli.backend {
        layer.backend = Some(BackendChoice::parse(s).map_err(|m| Origin::Flag("--backend").error(m))?);
    }
    if let Some(s) = &cli.slow_subscriber {
        layer.slow_subscriber =
            Some(SlowSubscriberChoice::parse(s).map_err(|m| Origin::Flag("--slow-subscriber").error(m))?);
    }
    if !cli.listen.is_empty() {
        let origin = Origin::Flag("--listen");
        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for s in &cli.listen {
            let addr = parse_bind(s).map_err(|m| origin.error(m))?;
            if listeners.iter().any(|l| l.bind == addr) {
                return Err(origin.error(format!("{addr} is given twice")));
            }
            listeners.push(ListenerConfig::new(addr));
        }
        layer.listeners = Some(listeners);
    }
    if let Some(secs) = cli.connect_timeout {
        layer.connect_timeout =
            Some(connect_timeout(secs).map_err(|m| Origin::Flag("--connect-timeout").error(m))?);
    }
    let flag_int = |v: u64, flag: &'static str, range: &Range| {
        range.check(i128::from(v)).map_err(|m| Origin::Flag(flag).error(m))
    };
    if let Some(v) = cli.slow_subscriber_timeout {
        let n = flag_int(v, "--slow-subscriber-timeout", &STALL)?;
        layer.slow_subscriber_timeout = Some(u64::try_from(n).unwrap_or(0));
    }
    if let Some(v) = cli.max_inflight {
        let n = flag_int(v, "--max-inflight", &INFLIGHT)?;
        layer.max_inflight = Some(u16::try_from(n).unwrap_or(u16::MAX));
    }
    if let Some(v) = cli.max_queued_messages {
        let n = flag_int(v, "--max-queued-messages", &QUEUED)?;
        layer.max_queued_messages = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = cli.max_queued_bytes {
        let n = flag_int(v, "--max-queued-bytes", &QUEUED)?;
        layer.max_queued_bytes = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = cli.max_packet_size {
        let n = flag_int(v, "--max-packet-size", &PACKET_SIZE)?;
        layer.max_packet_size = Some(usize::try_from(n).unwrap_or(MAX_PACKET_SIZE_LIMIT));
    }
    if let Some(v) = cli.max_outbox_messages {
        let n = flag_int(v, "--max-outbox-messages", &QUEUED)?;
        layer.max_outbox_messages = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = cli.max_connections {
        let n = flag_int(v, "--max-connections", &COUNT)?;
        layer.max_connections = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(v) = cli.ring_capacity {
        let n = flag_int(v, "--ring-capacity", &RING)?;
        layer.ring_capacity = Some(usize::try_from(n).unwrap_or(DEFAULT_RING_CAPACITY));
    }
    if let Some(p) = &cli.password_file {
        layer.password_file = Some((p.clone(), Origin::Flag("--password-file")));
    }
    if let Some(p) = &cli.acl_file {
        layer.acl_file = Some((p.clone(), Origin::Flag("--acl-file")));
    }
    Ok(())
}

/// Reads the password and ACL files again (SIGHUP), from the paths the configuration named.
pub fn reload_auth(cfg: &Config) -> Result<AuthFiles, String> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {}", path.display(), io_message(&e)))
    };
    let passwords = match &cfg.password_file {
        Some((path, _)) => {
            Some(PasswordFile::parse(&read(path)?).map_err(|m| format!("{}: {m}", path.display()))?)
        }
        None => None,
    };
    let acl = match &cfg.acl_file {
        Some((path, _)) => Some(Acl::parse(&read(path)?).map_err(|m| format!("{}: {m}", path.display()))?),
        None => None,
    };
    Ok(AuthFiles { passwords, acl })
}

/// Reads and parses a file an `[auth]` key names; an error names the key (or flag), the file and the line.
fn load_auth_file<T>(
    (path, origin): &(PathBuf, Origin),
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<(PathBuf, T), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| origin.error(format!("cannot read {}: {}", path.display(), io_message(&e))))?;
    let parsed = parse(&text).map_err(|m| origin.error(format!("{}: {m}", path.display())))?;
    Ok((path.clone(), parsed))
}

/// Applies the flags, cross-checks threads and cpus against each other and against the cpus this
/// process may use (`allowed`, a parameter so tests need not depend on the machine), and fills in
/// the defaults.
fn resolve(mut layer: Layer, cli: &Cli, allowed: io::Result<Vec<usize>>) -> Result<Config, ConfigError> {
    apply_cli(&mut layer, cli)?;

    if let Some((list, origin)) = &layer.cpus {
        let allowed = allowed.as_ref().map_err(|e| {
            origin.error(format!("cannot read this process's cpu affinity: {}", io_message(e)))
        })?;
        if let Some(cpu) = list.iter().find(|c| !allowed.contains(c)) {
            return Err(origin.error(format!(
                "cpu {cpu} is not available to this process (allowed: {})",
                cpus::format_cpu_list(allowed)
            )));
        }
    }
    let threads = match (&layer.threads, &layer.cpus) {
        (Some((n, t_origin)), Some((list, c_origin))) => {
            if *n != list.len() {
                return Err(t_origin.error(format!(
                    "{} but {} lists {} ({}); thread i is pinned to the i-th cpu, so give as many threads \
                     as cpus or leave threads unset",
                    count(*n, "thread"),
                    c_origin.describe(t_origin),
                    count(list.len(), "cpu"),
                    cpus::format_cpu_list(list)
                )));
            }
            *n
        }
        (Some((n, _)), None) => *n,
        (None, Some((list, origin))) => {
            if list.len() > MAX_THREADS {
                return Err(origin.error(format!(
                    "lists {} cpus, one thread each, but at most {MAX_THREADS} threads are supported (core ids \
                     are kept in a 64-bit mask)",
                    list.len()
                )));
            }
            list.len()
        }
        (None, None) => {
            // One thread per cpu this process may use, capped (not refused) on larger machines.
            let n = match &allowed {
                Ok(list) => list.len(),
                Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            n.clamp(1, MAX_THREADS)
        }
    };

    let password_file =
        layer.password_file.as_ref().map(|f| load_auth_file(f, PasswordFile::parse)).transpose()?;
    let acl_file = layer.acl_file.as_ref().map(|f| load_auth_file(f, Acl::parse)).transpose()?;
    let default_listener = layer.listeners.is_none();
    let listeners = layer.listeners.unwrap_or_else(|| {
        vec![ListenerConfig::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT))]
    });
    Ok(Config {
        threads,
        cpus: layer.cpus.map(|(list, _)| list),
        backend: layer.backend.unwrap_or(BackendChoice::Auto),
        listeners,
        default_listener,
        connect_timeout: layer.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        max_inflight: layer.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
        max_queued_messages: layer.max_queued_messages.unwrap_or(DEFAULT_MAX_QUEUED_MESSAGES),
        max_queued_bytes: layer.max_queued_bytes.unwrap_or(DEFAULT_MAX_QUEUED_BYTES),
        max_packet_size: layer.max_packet_size.unwrap_or(DEFAULT_MAX_PACKET_SIZE),
        queue_qos0_messages: layer.queue_qos0_messages.unwrap_or(false),
        slow_subscriber: layer.slow_subscriber.unwrap_or(SlowSubscriberChoice::Pause),
        slow_subscriber_timeout: layer.slow_subscriber_timeout.unwrap_or(DEFAULT_SLOW_SUBSCRIBER_TIMEOUT),
        max_keepalive: layer.max_keepalive.unwrap_or(DEFAULT_MAX_KEEPALIVE),
        max_session_expiry_interval: layer.max_session_expiry_interval.unwrap_or(DEFAULT_MAX_SESSION_EXPIRY),
        topic_alias_maximum: layer.topic_alias_maximum.unwrap_or(DEFAULT_TOPIC_ALIAS_MAXIMUM),
        receive_maximum: layer.receive_maximum.unwrap_or(DEFAULT_RECEIVE_MAXIMUM),
        response_information: layer.response_information,
        ring_capacity: layer.ring_capacity.unwrap_or(DEFAULT_RING_CAPACITY),
        max_outbox_messages: layer.max_outbox_messages.unwrap_or(DEFAULT_MAX_OUTBOX_MESSAGES),
        max_connections: layer.max_connections.unwrap_or(0),
        max_subscriptions_per_client: layer
            .max_subscriptions_per_client
            .unwrap_or(DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT),
        max_topic_levels: layer.max_topic_levels.unwrap_or(DEFAULT_MAX_TOPIC_LEVELS),
        max_client_id_len: layer.max_client_id_len.unwrap_or(DEFAULT_MAX_CLIENT_ID_LEN),
        password_file,
        acl_file,
        persistence: layer.persistence,
        source: layer.source,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
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
        assert_eq!(c.cpus, None);
        assert_eq!(c.backend, BackendChoice::Auto);
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
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.max_inflight, 20);
        assert_eq!(c.max_queued_messages, 1000);
        assert_eq!(c.max_queued_bytes, 64 * 1024 * 1024);
        assert_eq!(c.max_packet_size, 1_048_576);
        assert!(!c.queue_qos0_messages);
        assert_eq!(c.slow_subscriber, SlowSubscriberChoice::Pause);
        assert_eq!(c.max_keepalive, 65535);
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
        assert_eq!(c.cpus, Some(vec![0, 1]));
        assert_eq!(c.backend, BackendChoice::Epoll);
        assert_eq!(c.connect_timeout, Duration::from_millis(2500));
        assert_eq!(c.max_inflight, 65535);
        assert_eq!(c.max_queued_messages, 7);
        assert_eq!(c.max_queued_bytes, 1);
        assert_eq!(c.max_packet_size, MAX_PACKET_SIZE_LIMIT);
        assert!(c.queue_qos0_messages);
        assert_eq!(c.slow_subscriber, SlowSubscriberChoice::Drop);
        assert_eq!(c.max_keepalive, 0);
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
        assert_eq!((c.threads, c.cpus), (1, Some(vec![1])));
        let c = build("", &["--cpus", "0-1"]).unwrap();
        assert_eq!((c.threads, c.cpus), (2, Some(vec![0, 1])));
    }

    #[test]
    fn connect_timeout_accepts_integers_and_floats() {
        assert_eq!(build("connect_timeout = 3", &[]).unwrap().connect_timeout, Duration::from_secs(3));
        assert_eq!(build("connect_timeout = 0.25", &[]).unwrap().connect_timeout, Duration::from_millis(250));
        assert_eq!(
            build("connect_timeout = 86400", &[]).unwrap().connect_timeout,
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
        assert_eq!(c.cpus, Some(vec![0, 1]));
        assert_eq!(c.backend, BackendChoice::Epoll);
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.max_inflight, 100);
        assert_eq!(c.max_queued_messages, 200);
        assert_eq!(c.max_queued_bytes, 300);
        assert_eq!(c.max_packet_size, 400);
        assert_eq!(
            c.listeners.iter().map(|l| l.bind).collect::<Vec<_>>(),
            vec![addr("127.0.0.1:2000"), addr("[::]:2001")]
        );
        assert!(!c.default_listener);
        // Values the flags do not touch stay as the file set them.
        let c = build(text, &["--threads", "2"]).unwrap();
        assert_eq!((c.threads, c.max_inflight, c.backend), (2, 5, BackendChoice::Uring));
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
            (
                "max_inflight = \"20\"",
                "key \"max_inflight\": expected an integer, got string \"20\" (line 1)",
            ),
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
        assert_eq!(c.unwrap().cpus, Some(vec![1]));
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
                "bind = \"example.com:1883\"",
                "key \"listener[1].bind\": \"example.com:1883\": HOST must be an IP address or localhost (host names \
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
                "bind = \"127.0.0.1:1\"\ntls_cert = \"c.pem\"",
                "key \"listener[1].tls_cert\": tls_cert needs protocol = \"mqtts\" in this listener (line 3)",
            ),
            (
                "bind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n\
                 use_identity_as_username = true",
                "key \"listener[1].use_identity_as_username\": needs tls_client_ca: the identity is the client \
                 certificate's (line 6)",
            ),
            (
                "bind = \"127.0.0.1:1\"\nprotocol = \"mqtts\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
                "key \"listener[1].tls_cert\": cannot read c.pem: No such file or directory (os error 2) (line 4)",
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
        let file = dir.join("c.toml");
        std::fs::write(&file, "max_inflight = 7\nmax_queued_messages = 9\n").unwrap();
        let cli = Cli { config: Some(file.clone()), max_queued_messages: Some(11), ..Cli::default() };
        let c = load(&cli).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((c.max_inflight, c.max_queued_messages), (7, 11));
        assert_eq!(c.source, Some(file));
    }

    #[test]
    fn from_toml_uses_the_real_machine() {
        let c = from_toml("max_inflight = 3", Path::new("y.toml")).unwrap();
        assert_eq!(c.max_inflight, 3);
        let e = from_toml("max_inflight = 0", Path::new("y.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config error in y.toml: key \"max_inflight\": must be between 1 and 65535, got 0 (line 1)"
        );
    }

    /// The field names serde's derive declared for `T`: it hands them to `deserialize_struct`, which this
    /// deserializer records instead of reading anything.
    fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
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

    /// Every key a config file may set, as (table, key) with "" for the top level: the fields of the
    /// `Raw*` structs, the one place the keys are declared.
    fn declared_keys() -> BTreeSet<(String, String)> {
        // The tables among the file's fields: (field, header, the table's fields). A table added to
        // `RawFile` and not here shows up as a top-level key no text documents.
        let tables = [
            ("listener", "[[listener]]", field_names::<RawListener>()),
            ("auth", "[auth]", field_names::<RawAuth>()),
            ("persistence", "[persistence]", field_names::<RawPersistence>()),
        ];
        let mut keys = BTreeSet::new();
        for &key in field_names::<RawFile>() {
            match tables.iter().find(|(field, ..)| *field == key) {
                Some((_, header, fields)) => {
                    keys.extend(fields.iter().map(|k| (header.to_string(), k.to_string())))
                }
                None => {
                    keys.insert((String::new(), key.to_string()));
                }
            }
        }
        keys
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

    /// The keys of README's configuration table (one row names one key, or several of one table:
    /// `` `[[listener]]` `tls_cert`, `tls_key` ``). The table ends at its first line that is not a row,
    /// so a row cut off from it by a blank line is missing here.
    fn readme_keys(readme: &str) -> BTreeSet<(String, String)> {
        let mut lines = readme.lines().skip_while(|l| !l.starts_with("| key | default | meaning |"));
        assert!(lines.next().is_some(), "README has no configuration table");
        let mut keys = BTreeSet::new();
        for row in lines.skip(1).take_while(|l| l.starts_with('|')) {
            let first = row.split('|').nth(1).unwrap_or_default();
            let names: Vec<&str> = first.split('`').skip(1).step_by(2).collect();
            let (table, names) = match names.split_first() {
                Some((t, rest)) if t.starts_with('[') => (t.to_string(), rest),
                _ => (String::new(), &names[..]),
            };
            assert!(!names.is_empty(), "README's config row {row:?} names no key");
            keys.extend(names.iter().map(|k| (table.clone(), k.to_string())));
        }
        keys
    }

    /// Asserts that `found` (the keys `what` shows) are exactly the declared keys, naming the differences.
    fn assert_declared(found: BTreeSet<(String, String)>, what: &str) {
        let declared = declared_keys();
        let missing: Vec<_> = declared.difference(&found).collect();
        let unknown: Vec<_> = found.difference(&declared).collect();
        assert!(
            missing.is_empty() && unknown.is_empty(),
            "{what}: missing (table, key) {missing:?}; not keys of the parser {unknown:?}"
        );
    }

    #[test]
    fn readme_config_table_has_every_key() {
        assert_declared(readme_keys(include_str!("../README.md")), "README's configuration table");
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        // Relative to this source file, so the test reads the example shipped next to Cargo.toml.
        let text = include_str!("../coremq.example.toml");
        let path = Path::new("coremq.example.toml");
        let example = from_toml(text, path).unwrap();
        let defaults = from_toml("", path).unwrap();
        assert_eq!(example.threads, defaults.threads);
        assert_eq!(example.cpus, defaults.cpus);
        assert_eq!(example.backend, defaults.backend);
        assert_eq!(example.listeners, defaults.listeners);
        assert_eq!(example.connect_timeout, defaults.connect_timeout);
        assert_eq!(example.max_inflight, defaults.max_inflight);
        assert_eq!(example.max_queued_messages, defaults.max_queued_messages);
        assert_eq!(example.max_queued_bytes, defaults.max_queued_bytes);
        assert_eq!(example.max_packet_size, defaults.max_packet_size);
        assert_eq!(example.queue_qos0_messages, defaults.queue_qos0_messages);
        assert_eq!(example.max_keepalive, defaults.max_keepalive);
        assert_eq!(example.max_session_expiry_interval, defaults.max_session_expiry_interval);
        assert_eq!(example.topic_alias_maximum, defaults.topic_alias_maximum);
        assert_eq!(example.receive_maximum, defaults.receive_maximum);
        assert_eq!(example.response_information, defaults.response_information);
        assert_eq!(example.ring_capacity, defaults.ring_capacity);
        assert_eq!(example.max_outbox_messages, defaults.max_outbox_messages);
        assert_eq!(example.max_connections, defaults.max_connections);
        assert_eq!(example.max_subscriptions_per_client, defaults.max_subscriptions_per_client);
        assert_eq!(example.max_topic_levels, defaults.max_topic_levels);
        assert_eq!(example.max_client_id_len, defaults.max_client_id_len);
        // Every key the parser accepts appears in the example, set or commented out, in its table, and
        // every key the example shows is one the parser accepts.
        assert_declared(example_keys(text), "coremq.example.toml");
        // The commented-out examples are valid too.
        let uncommented =
            text.replace("# threads = 4", "threads = 4").replace("# cpus = \"0-3\"", "cpus = \"0-3\"");
        let c = build_on(&uncommented, &[], Ok(vec![0, 1, 2, 3])).unwrap();
        assert_eq!((c.threads, c.cpus), (4, Some(vec![0, 1, 2, 3])));
    }
}
