//! Broker configuration: a TOML file, overridden by command-line flags, validated into a [`Config`].
//!
//! Every key is declared once, in the table of `keys.rs` (its name, type, check, default, flag and help);
//! `table.rs` makes each table's file layer, flags and docs from it. `file.rs` reads the file: each table
//! first as a raw struct whose fields are `toml::Value`s with spans, so that type and range errors are
//! produced here, with the key's name, rather than by serde (whose messages name neither the key nor,
//! for nested tables, the line). Every problem is reported as exactly one line naming where the bad
//! value came from: the file and key (with its line number) or the flag.

mod file;
mod keys;
mod table;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::acl::Acl;
use crate::auth::password::PasswordFile;
use crate::auth::AuthFiles;
use crate::cli::Cli;
use crate::cpus;
use crate::tls::TlsFiles;

use file::parse_file;
pub use keys::top::Keys;
pub use keys::{DEFAULT_RING_CAPACITY, MAX_PACKET_SIZE_LIMIT, MIN_PACKET_SIZE_LIMIT};
pub use table::{KeyFlags, MAX_CONNECT_TIMEOUT_SECS};

/// At most this many worker threads: the core ids are kept in a 64-bit mask.
pub const MAX_THREADS: usize = 64;
/// The port of the default listener (MQTT's registered port).
pub const DEFAULT_PORT: u16 = 1883;

/// Which I/O backend to run the cores on (`backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, otherwise epoll with a warning.
    Auto,
    /// io_uring or a startup error.
    Uring,
    /// epoll only.
    Epoll,
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

/// `[persistence]` with `enabled = true`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistenceConfig {
    /// Where the logs live (relative paths are relative to the config file).
    pub data_dir: PathBuf,
    pub fsync: FsyncPolicy,
    /// For [`FsyncPolicy::Interval`].
    pub fsync_interval: Duration,
}

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
    /// The top-level keys, defaults applied (`keys.threads` as given; the count is [`Config::threads`]).
    pub keys: Keys,
    /// Worker threads, 1..=64: `threads` if given, else the number of cpus in `cpus` if given, else the
    /// number of cpus this process may run on (capped at 64).
    pub threads: usize,
    /// Addresses to listen on; never empty. Default: one on 127.0.0.1:1883 (local only, like mosquitto 2).
    pub listeners: Vec<ListenerConfig>,
    /// True when neither the file nor `--listen` named a listener, so main can say how to open up.
    pub default_listener: bool,
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
pub(crate) enum Origin {
    File { path: PathBuf, key: String, line: usize },
    Flag(&'static str),
}

impl Origin {
    pub(crate) fn error(&self, msg: impl fmt::Display) -> ConfigError {
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

/// The settings given so far (by the file, then the flags); a key not given is `None` in its table's
/// `Given`.
#[derive(Default, Debug)]
struct Layer {
    source: Option<PathBuf>,
    top: keys::top::Given,
    auth: keys::auth::Given,
    listeners: Option<Vec<ListenerConfig>>,
    persistence: Option<PersistenceConfig>,
}

/// Applies the flags over the file's layer: the keys' flags, then `--listen`.
fn apply_cli(layer: &mut Layer, cli: &Cli) -> Result<(), ConfigError> {
    layer.top.apply_flags(&cli.keys.0)?;
    layer.auth.apply_flags(&cli.keys.0)?;
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
    Ok(())
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

    if let Some((list, origin)) = &layer.top.cpus {
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
    let threads = match (&layer.top.threads, &layer.top.cpus) {
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
        layer.auth.password_file.as_ref().map(|f| load_auth_file(f, PasswordFile::parse)).transpose()?;
    let acl_file = layer.auth.acl_file.as_ref().map(|f| load_auth_file(f, Acl::parse)).transpose()?;
    let default_listener = layer.listeners.is_none();
    let listeners = layer.listeners.unwrap_or_else(|| {
        vec![ListenerConfig::new(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_PORT))]
    });
    Ok(Config {
        keys: layer.top.keys(),
        threads,
        listeners,
        default_listener,
        password_file,
        acl_file,
        persistence: layer.persistence,
        source: layer.source,
    })
}
