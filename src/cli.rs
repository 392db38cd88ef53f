//! Command-line flags. Every flag overrides the config file's key of the same name; `config::load`
//! validates them, so errors name the flag.

use std::path::PathBuf;

/// The `coremq` command line.
#[derive(clap::Parser, Debug, Default, Clone)]
#[command(
    name = "coremq",
    version,
    about = "A thread-per-core io_uring MQTT broker",
    long_about = "A thread-per-core io_uring MQTT broker (MQTT 3.1, 3.1.1 and 5.0).\n\n\
                  Flags override the keys of the same name in the config file; \
                  see coremq.example.toml for every key and its default."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TOML config file
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listen on HOST:PORT (repeatable; replaces the config's listeners)
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Vec<String>,

    /// Worker threads, one per core, at most 64 [default: one per allowed cpu, or one per cpu in --cpus]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Cores to pin worker threads to, e.g. 0-3,6 (thread i runs on the i-th listed cpu)
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,

    /// I/O backend: auto (io_uring, or epoll where io_uring is unavailable), uring (io_uring only: exits
    /// where it is unavailable) or epoll [default: auto]
    #[arg(long, value_name = "auto|uring|epoll")]
    pub backend: Option<String>,

    /// Seconds a new connection has to send CONNECT [default: 10]
    #[arg(long, value_name = "SECS")]
    pub connect_timeout: Option<f64>,

    /// Outbound QoS 1/2 messages in flight per client [default: 20]
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u64>,

    /// Messages queued per session beyond the in-flight window or while offline [default: 1000]
    #[arg(long, value_name = "N")]
    pub max_queued_messages: Option<u64>,

    /// Payload bytes queued per session [default: 67108864]
    #[arg(long, value_name = "N")]
    pub max_queued_bytes: Option<u64>,

    /// Largest packet accepted, in bytes; a larger one closes the connection [default: 1048576]
    #[arg(long, value_name = "N")]
    pub max_packet_size: Option<u64>,
    /// A full queue of an online subscriber: "pause" QoS 1/2 publishers (nothing acknowledged is
    /// dropped) or "drop" the newest, as mosquitto does [default: pause]
    #[arg(long, value_name = "pause|drop")]
    pub slow_subscriber: Option<String>,
    /// Seconds a connected subscriber's full queue may go without an acknowledgement before the broker
    /// disconnects it (pause policy); 0 = never [default: 60]
    #[arg(long, value_name = "SECS")]
    pub slow_subscriber_timeout: Option<u64>,
    /// Packets waiting to be written to one online client; QoS 0 beyond it is dropped [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_outbox_messages: Option<u64>,
    /// Client connections served at once, all listeners together; 0 = no limit [default: 0]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<u64>,
    /// Password file in mosquitto_passwd format (the config's [auth] password_file)
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// ACL file in mosquitto's acl_file format (the config's [auth] acl_file)
    #[arg(long, value_name = "FILE")]
    pub acl_file: Option<PathBuf>,
    /// Slots of each cross-core ring; a full ring pauses publishers, never drops [default: 4096]
    #[arg(long, value_name = "N")]
    pub ring_capacity: Option<u64>,
}

/// Subcommands; without one, `coremq` runs the broker.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Add, update or delete a user of a password file (like mosquitto_passwd; the file format is the
    /// same, so either tool can edit it)
    Passwd(PasswdArgs),
}

/// `coremq passwd [-c] [-b] [-D] FILE USER [PASSWORD]`.
#[derive(clap::Args, Debug, Clone)]
pub struct PasswdArgs {
    /// Create the file, replacing it if it exists
    #[arg(short = 'c', conflicts_with = "delete")]
    pub create: bool,
    /// Take the password from the command line instead of a prompt or stdin
    #[arg(short = 'b', requires = "password")]
    pub batch: bool,
    /// Delete USER from the file
    #[arg(short = 'D', conflicts_with_all = ["batch", "password"])]
    pub delete: bool,
    /// PBKDF2-SHA512 iterations for the new hash [default: 10000]
    #[arg(long, value_name = "N")]
    pub iterations: Option<u32>,
    /// The password file
    pub file: PathBuf,
    /// The user name
    pub user: String,
    /// The password (with -b)
    pub password: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_every_flag() {
        let cli = Cli::try_parse_from([
            "coremq",
            "--config",
            "/etc/coremq.toml",
            "--listen",
            "0.0.0.0:1883",
            "--listen",
            "[::1]:1884",
            "--threads",
            "4",
            "--cpus",
            "0-3",
            "--backend",
            "epoll",
            "--connect-timeout",
            "2.5",
            "--max-inflight",
            "10",
            "--max-queued-messages",
            "100",
            "--max-queued-bytes",
            "4096",
            "--max-packet-size",
            "65536",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("/etc/coremq.toml")));
        assert_eq!(cli.listen, vec!["0.0.0.0:1883".to_string(), "[::1]:1884".to_string()]);
        assert_eq!(cli.threads, Some(4));
        assert_eq!(cli.cpus.as_deref(), Some("0-3"));
        assert_eq!(cli.backend.as_deref(), Some("epoll"));
        assert_eq!(cli.connect_timeout, Some(2.5));
        assert_eq!(cli.max_inflight, Some(10));
        assert_eq!(cli.max_queued_messages, Some(100));
        assert_eq!(cli.max_queued_bytes, Some(4096));
        assert_eq!(cli.max_packet_size, Some(65536));
    }

    #[test]
    fn no_flags_means_no_overrides() {
        let cli = Cli::try_parse_from(["coremq"]).unwrap();
        assert!(cli.config.is_none() && cli.listen.is_empty() && cli.threads.is_none());
        assert!(cli.cpus.is_none() && cli.backend.is_none() && cli.connect_timeout.is_none());
        assert!(cli.max_inflight.is_none() && cli.max_queued_messages.is_none());
        assert!(cli.max_queued_bytes.is_none() && cli.max_packet_size.is_none());
    }

    #[test]
    fn rejects_unknown_flags_and_non_numbers() {
        assert!(Cli::try_parse_from(["coremq", "--threds", "2"]).is_err());
        assert!(Cli::try_parse_from(["coremq", "--threads", "two"]).is_err());
        assert!(Cli::try_parse_from(["coremq", "--max-inflight", "-1"]).is_err());
    }
}
