//! Command-line flags. Every flag but `--config` and `--listen` is a config key's, declared with the key
//! in the config's table of keys (`config/keys.rs`), and overrides the file's key of the same name;
//! `config::load` validates them, so errors name the flag.

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

    /// The flags of the config keys (`--threads`, `--max-inflight`, ...): one per key that has one in
    /// the config's table of keys, listed in its order.
    #[command(flatten)]
    pub keys: crate::config::KeyFlags,
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
    fn parses_config_and_listen() {
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
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("/etc/coremq.toml")));
        assert_eq!(cli.listen, vec!["0.0.0.0:1883".to_string(), "[::1]:1884".to_string()]);
        assert_eq!(cli.keys.0.get_one::<u64>("threads"), Some(&4));
    }

    #[test]
    fn no_flags_means_no_overrides() {
        let cli = Cli::try_parse_from(["coremq"]).unwrap();
        assert!(cli.config.is_none() && cli.listen.is_empty() && cli.command.is_none());
        assert_eq!(cli.keys.0.ids().count(), 0, "{:?}", cli.keys.0);
    }

    #[test]
    fn rejects_unknown_flags_and_non_numbers() {
        assert!(Cli::try_parse_from(["coremq", "--threds", "2"]).is_err());
        assert!(Cli::try_parse_from(["coremq", "--threads", "two"]).is_err());
        assert!(Cli::try_parse_from(["coremq", "--max-inflight", "-1"]).is_err());
    }
}
