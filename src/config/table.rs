//! The machinery behind the table of keys (`keys.rs`): what a row declares ([`Kind`]: how a value is
//! read from the file or a flag, checked and written), the `key_table!` macro that turns a table's rows
//! into the file layer, the flag layer and the documentation rows, and [`KeyFlags`], the flags of every
//! key on `Cli`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::ValueParser;
use toml::Value;

use super::{keys, parse_bind, ConfigError, Origin};
use crate::cpus;

/// How one key's value of type `T` is given and checked. A check's error is the message after the key or
/// flag's name ("must be at least 1, got 0"); the caller names the key or flag.
pub(crate) trait Kind<T> {
    /// What clap parses the flag's text into: its errors ("invalid digit found in string") are clap's.
    type Flag: Clone + Send + Sync + 'static;

    /// Clap's parser for [`Kind::Flag`].
    fn value_parser(&self) -> ValueParser;

    /// The value a file gives; `dir` is the config file's directory (paths are relative to it).
    fn read_file(&self, v: &Value, dir: &Path) -> Result<T, String>;

    /// The value a flag gives.
    fn read_flag(&self, v: &Self::Flag) -> Result<T, String>;

    /// `v` as a config file writes it (the docs show defaults so).
    fn render(&self, v: &T) -> String;

    /// Whether every value the check accepts fits `T` (a range wider than its type is a bug in the
    /// table). Checked by the unit tests.
    #[cfg(test)]
    fn fits(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Describes a value for "expected X, got Y" messages.
pub(crate) fn describe(v: &Value) -> String {
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

fn string(v: &Value) -> Result<&str, String> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(format!("expected a string, got {}", describe(other))),
    }
}

/// An integer key's accepted range and how to say it.
pub(crate) struct Range {
    pub(crate) min: i128,
    pub(crate) max: i128,
    /// Appended to the range message to say why the bound exists.
    pub(crate) why: &'static str,
}

impl Range {
    pub(crate) const fn new(min: i128, max: i128) -> Self {
        Range { min, max, why: "" }
    }

    pub(crate) fn check(&self, v: i128) -> Result<i128, String> {
        if (self.min..=self.max).contains(&v) {
            return Ok(v);
        }
        if self.max >= u64::MAX as i128 {
            Err(format!("must be at least {}{}, got {v}", self.min, self.why))
        } else {
            Err(format!("must be between {} and {}{}, got {v}", self.min, self.max, self.why))
        }
    }

    fn value<T: TryFrom<i128>>(&self, v: i128) -> Result<T, String> {
        let v = self.check(v)?;
        // Cannot fail for a range within T, which `fits` checks.
        T::try_from(v).map_err(|_| format!("{v} does not fit"))
    }
}

impl<T: TryFrom<i128> + std::fmt::Display> Kind<T> for Range {
    type Flag = u64;

    fn value_parser(&self) -> ValueParser {
        clap::value_parser!(u64).into()
    }

    fn read_file(&self, v: &Value, _: &Path) -> Result<T, String> {
        match v {
            Value::Integer(i) => self.value(i128::from(*i)),
            other => Err(format!("expected an integer, got {}", describe(other))),
        }
    }

    fn read_flag(&self, v: &u64) -> Result<T, String> {
        self.value(i128::from(*v))
    }

    fn render(&self, v: &T) -> String {
        v.to_string()
    }

    #[cfg(test)]
    fn fits(&self) -> Result<(), String> {
        for end in [self.min, self.max] {
            T::try_from(end)
                .map_err(|_| format!("range end {end} does not fit {}", std::any::type_name::<T>()))?;
        }
        Ok(())
    }
}

/// Longest `connect_timeout` accepted: one day. The bound keeps deadline arithmetic
/// (`Instant + timeout`) far from overflow.
pub const MAX_CONNECT_TIMEOUT_SECS: f64 = 86_400.0;

/// A number of seconds, integer or decimal, more than 0 and at most one day.
pub(crate) struct Seconds;

impl Seconds {
    fn check(secs: f64) -> Result<Duration, String> {
        if secs.is_finite() && secs > 0.0 && secs <= MAX_CONNECT_TIMEOUT_SECS {
            // Cannot fail: the value is finite, positive and at most one day.
            Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
        } else {
            Err(format!("must be more than 0 and at most {MAX_CONNECT_TIMEOUT_SECS} seconds, got {secs}"))
        }
    }
}

impl Kind<Duration> for Seconds {
    type Flag = f64;

    fn value_parser(&self) -> ValueParser {
        clap::value_parser!(f64).into()
    }

    fn read_file(&self, v: &Value, _: &Path) -> Result<Duration, String> {
        match v {
            // i64 -> f64 may round for huge values, which the range check rejects anyway.
            Value::Integer(i) => Seconds::check(*i as f64),
            Value::Float(f) => Seconds::check(*f),
            other => Err(format!("expected a number of seconds, got {}", describe(other))),
        }
    }

    fn read_flag(&self, v: &f64) -> Result<Duration, String> {
        Seconds::check(*v)
    }

    fn render(&self, v: &Duration) -> String {
        v.as_secs_f64().to_string()
    }
}

/// `true` or `false`.
pub(crate) struct Bool;

impl Kind<bool> for Bool {
    type Flag = bool;

    fn value_parser(&self) -> ValueParser {
        clap::value_parser!(bool)
    }

    fn read_file(&self, v: &Value, _: &Path) -> Result<bool, String> {
        match v {
            Value::Boolean(b) => Ok(*b),
            other => Err(format!("expected true or false, got {}", describe(other))),
        }
    }

    fn read_flag(&self, v: &bool) -> Result<bool, String> {
        Ok(*v)
    }

    fn render(&self, v: &bool) -> String {
        v.to_string()
    }
}

/// An enum a key sets by name: its names, in the order messages list them.
pub(crate) trait Named: Copy + PartialEq + 'static {
    const NAMES: &'static [(&'static str, Self)];
}

/// One of the names of a [`Named`] enum.
pub(crate) struct OneOf;

impl OneOf {
    fn parse<T: Named>(s: &str) -> Result<T, String> {
        match T::NAMES.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(*v),
            None => {
                let names: Vec<String> = T::NAMES.iter().map(|(name, _)| format!("\"{name}\"")).collect();
                Err(format!("\"{s}\" is not one of {}", names.join(", ")))
            }
        }
    }
}

impl<T: Named> Kind<T> for OneOf {
    type Flag = String;

    fn value_parser(&self) -> ValueParser {
        ValueParser::string()
    }

    fn read_file(&self, v: &Value, _: &Path) -> Result<T, String> {
        OneOf::parse(string(v)?)
    }

    fn read_flag(&self, v: &String) -> Result<T, String> {
        OneOf::parse(v)
    }

    fn render(&self, v: &T) -> String {
        let name = T::NAMES.iter().find(|(_, n)| n == v).map_or("", |(name, _)| name);
        format!("\"{name}\"")
    }
}

/// A string read by `parse`, and written back by `show` (without quotes).
pub(crate) struct Text<T: 'static> {
    parse: fn(&str) -> Result<T, String>,
    show: fn(&T) -> String,
}

/// A cpu list such as "0-3,6".
pub(crate) const CPU_LIST: Text<Vec<usize>> =
    Text { parse: cpus::parse_cpu_list, show: |v| cpus::format_cpu_list(v) };

/// A listener address: `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` ([`parse_bind`]).
pub(crate) const BIND: Text<SocketAddr> = Text { parse: parse_bind, show: SocketAddr::to_string };

/// A string MQTT can carry: not empty, at most 65535 bytes, no U+0000.
pub(crate) const MQTT_STRING: Text<String> = Text {
    parse: |s| {
        if s.is_empty() || s.len() > u16::MAX as usize || s.contains('\0') {
            return Err("must be a non-empty MQTT string (at most 65535 bytes, no U+0000)".to_string());
        }
        Ok(s.to_string())
    },
    show: String::clone,
};

impl<T> Kind<T> for Text<T> {
    type Flag = String;

    fn value_parser(&self) -> ValueParser {
        ValueParser::string()
    }

    fn read_file(&self, v: &Value, _: &Path) -> Result<T, String> {
        (self.parse)(string(v)?)
    }

    fn read_flag(&self, v: &String) -> Result<T, String> {
        (self.parse)(v)
    }

    fn render(&self, v: &T) -> String {
        format!("\"{}\"", (self.show)(v))
    }
}

/// A path; in a file, relative to the file's directory, so that a config and its files can move
/// together. `non_empty`: "" is refused (a directory to write into).
pub(crate) struct FilePath {
    pub(crate) non_empty: bool,
}

impl Kind<PathBuf> for FilePath {
    type Flag = PathBuf;

    fn value_parser(&self) -> ValueParser {
        ValueParser::path_buf()
    }

    fn read_file(&self, v: &Value, dir: &Path) -> Result<PathBuf, String> {
        let s = string(v)?;
        if self.non_empty && s.is_empty() {
            return Err("must not be empty".to_string());
        }
        Ok(dir.join(s))
    }

    fn read_flag(&self, v: &PathBuf) -> Result<PathBuf, String> {
        if self.non_empty && v.as_os_str().is_empty() {
            return Err("must not be empty".to_string());
        }
        Ok(v.clone())
    }

    fn render(&self, v: &PathBuf) -> String {
        format!("\"{}\"", v.display())
    }
}

/// A key's default as the docs show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DefaultDoc {
    /// The default value, as a file writes it (`1000`, `"pause"`).
    Value(String),
    /// No value: what happens instead ("unset", "CPUs available").
    Text(&'static str),
}

/// A key's flag: `--name VALUE`, its help without the default (which is added from the key's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FlagDoc {
    pub(crate) flag: &'static str,
    pub(crate) value_name: &'static str,
    pub(crate) help: &'static str,
}

/// One row of the table, for the checks of README and the example config.
#[cfg(test)]
#[derive(Clone, Debug)]
pub(crate) struct KeyDoc {
    /// `""` for the top level, else the table's header: `[auth]`, `[[listener]]`.
    pub(crate) table: &'static str,
    pub(crate) name: &'static str,
    pub(crate) default: DefaultDoc,
    pub(crate) flag: Option<FlagDoc>,
    /// README's "meaning" column.
    pub(crate) doc: &'static str,
}

/// A flag's help: its text and, for a key with a default value, `[default: VALUE]` (strings unquoted,
/// as on the command line).
pub(crate) fn flag_help(help: &str, default: &DefaultDoc) -> String {
    match default {
        DefaultDoc::Value(v) => format!("{help} [default: {}]", v.trim_matches('"')),
        DefaultDoc::Text(_) => help.to_string(),
    }
}

/// The value of `key`'s flag, if given, checked; errors name the flag.
pub(crate) fn flag_value<T, K: Kind<T>>(
    kind: &K,
    matches: &clap::ArgMatches,
    key: &str,
    flag: &'static str,
) -> Result<Option<(T, Origin)>, ConfigError> {
    // An error is an id this command does not have: a `Cli` built without clap (`Cli::default()`).
    let Ok(Some(v)) = matches.try_get_one::<K::Flag>(key) else {
        return Ok(None);
    };
    let origin = Origin::Flag(flag);
    let value = kind.read_flag(v).map_err(|m| origin.error(m))?;
    Ok(Some((value, origin)))
}

/// The flag of a key: `--max-inflight <N>`.
pub(crate) fn flag_arg<T, K: Kind<T>>(
    kind: &K,
    key: &'static str,
    flag: FlagDoc,
    default: &DefaultDoc,
) -> clap::Arg {
    clap::Arg::new(key)
        .long(flag.flag.trim_start_matches('-'))
        .value_name(flag.value_name)
        .help(flag_help(flag.help, default))
        .value_parser(kind.value_parser())
}

/// The flags of the config keys (`--threads`, `--max-inflight`, ...), one per row of the table that has
/// one, as clap parsed them; `config::load` checks them, so that errors name the flag.
#[derive(Clone, Debug, Default)]
pub struct KeyFlags(pub(crate) clap::ArgMatches);

impl clap::FromArgMatches for KeyFlags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(KeyFlags(matches.clone()))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

impl clap::Args for KeyFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        keys::add_flags(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        keys::add_flags(cmd)
    }
}

/// Declares one table of config keys, one row a key, as a module of its own:
///
/// ```text
/// key_table! {
///     /// What the table is.
///     mod NAME "[header]" #[serde attributes of the table] {
///         KEY: TYPE, default(EXPR) | unset("what the docs say instead"), KIND,
///             ("--flag", "VALUE", "flag help") | (),
///             "README's meaning";
///     } { other fields of the file's struct (sub-tables) }
/// }
/// ```
///
/// The module has `Raw` (the table as serde reads it: every key a spanned `toml::Value`, so that type
/// errors are reported with the key's name), `Given` (the keys the file or the flags set, each with where
/// it came from), `Keys` (every key's value, defaults applied; `Option` for `unset` keys), `add_flags`
/// (the keys' clap arguments) and `docs` (the rows as [`KeyDoc`]s).
macro_rules! key_table {
    (
        $(#[doc = $mod_doc:literal])*
        mod $table:ident $header:literal $(#[$raw_attr:meta])* {
            $( $key:ident: $ty:ty, $dk:ident $dv:tt, $kind:expr, $flag:tt, $doc:literal; )*
        } { $($extra:tt)* }
    ) => {
        $(#[doc = $mod_doc])*
        // Every table gets every item, and not every table uses each: [[listener]] has no flags.
        #[allow(dead_code)]
        pub mod $table {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use $crate::config::table as t;
            use $crate::config::{ConfigError, Origin};

            /// The table as serde reads it.
            #[derive(serde::Deserialize)]
            $(#[$raw_attr])*
            pub(crate) struct Raw {
                $( pub(crate) $key: Option<toml::Spanned<toml::Value>>, )*
                $($extra)*
            }

            /// The keys the file or the flags gave, each with where it came from.
            #[derive(Clone, Debug, Default)]
            pub(crate) struct Given {
                $( pub(crate) $key: Option<($ty, Origin)>, )*
            }

            /// The keys' values, defaults applied.
            #[derive(Clone, Debug, PartialEq)]
            pub struct Keys {
                $( #[doc = $doc] pub $key: key_table!(@type $ty, $dk $dv), )*
            }

            impl Given {
                /// The file's values of this table; `prefix` names it in errors (`"listener[2]."`).
                pub(crate) fn from_file(
                    raw: &Raw,
                    ctx: &$crate::config::file::FileCtx,
                    prefix: &str,
                ) -> Result<Given, ConfigError> {
                    Ok(Given { $( $key: ctx.value(&raw.$key, prefix, stringify!($key), &$kind)?, )* })
                }

                /// Sets the keys whose flags were given.
                #[allow(unused_variables)]
                pub(crate) fn apply_flags(&mut self, matches: &clap::ArgMatches) -> Result<(), ConfigError> {
                    $( key_table!(@apply self.$key, matches, $key, $ty, $kind, $flag); )*
                    Ok(())
                }

                /// Every key's value: the given one, else the default.
                pub(crate) fn keys(&self) -> Keys {
                    Keys { $( $key: key_table!(@value self.$key, $dk $dv), )* }
                }
            }

            /// The flags of this table's keys.
            #[allow(unused_mut)]
            pub(crate) fn add_flags(mut cmd: clap::Command) -> clap::Command {
                $( key_table!(@flag cmd, $key, $ty, $kind, $dk $dv, $flag); )*
                cmd
            }

            /// The rows, for the docs.
            #[cfg(test)]
            pub(crate) fn docs() -> Vec<t::KeyDoc> {
                vec![$(t::KeyDoc {
                    table: $header,
                    name: stringify!($key),
                    default: key_table!(@default $ty, $kind, $dk $dv),
                    flag: key_table!(@flag_doc $flag),
                    doc: $doc,
                },)*]
            }

            /// Each row's problems: a range its type cannot hold, a default its own check refuses or
            /// that does not read back as itself. Empty when the table is sound.
            #[cfg(test)]
            pub(crate) fn self_check() -> Vec<String> {
                let mut problems = Vec::new();
                $(
                    if let Err(e) = <_ as t::Kind<$ty>>::fits(&$kind) {
                        problems.push(format!("{}: {e}", stringify!($key)));
                    }
                    key_table!(@check problems, $key, $ty, $kind, $dk $dv);
                )*
                problems
            }
        }
    };

    (@type $ty:ty, default($e:expr)) => { $ty };
    (@type $ty:ty, unset($text:literal)) => { Option<$ty> };

    (@value $given:expr, default($e:expr)) => { $given.as_ref().map_or_else(|| $e, |(v, _)| v.clone()) };
    (@value $given:expr, unset($text:literal)) => { $given.as_ref().map(|(v, _)| v.clone()) };

    (@default $ty:ty, $kind:expr, default($e:expr)) => {
        t::DefaultDoc::Value(<_ as t::Kind<$ty>>::render(&$kind, &$e))
    };
    (@default $ty:ty, $kind:expr, unset($text:literal)) => { t::DefaultDoc::Text($text) };

    (@flag_doc ()) => { None };
    (@flag_doc ($flag:literal, $value:literal, $help:literal)) => {
        Some(t::FlagDoc { flag: $flag, value_name: $value, help: $help })
    };

    (@apply $slot:expr, $matches:ident, $key:ident, $ty:ty, $kind:expr, ()) => {};
    (@apply $slot:expr, $matches:ident, $key:ident, $ty:ty, $kind:expr, ($flag:literal, $value:literal, $help:literal)) => {
        if let Some(v) = t::flag_value::<$ty, _>(&$kind, $matches, stringify!($key), $flag)? {
            $slot = Some(v);
        }
    };

    (@flag $cmd:ident, $key:ident, $ty:ty, $kind:expr, $dk:ident $dv:tt, ()) => {};
    (@flag $cmd:ident, $key:ident, $ty:ty, $kind:expr, $dk:ident $dv:tt, ($flag:literal, $value:literal, $help:literal)) => {
        $cmd = $cmd.arg(t::flag_arg::<$ty, _>(
            &$kind,
            stringify!($key),
            t::FlagDoc { flag: $flag, value_name: $value, help: $help },
            &key_table!(@default $ty, $kind, $dk $dv),
        ));
    };

    (@check $problems:ident, $key:ident, $ty:ty, $kind:expr, default($e:expr)) => {{
        let default: $ty = $e;
        let text = <_ as t::Kind<$ty>>::render(&$kind, &default);
        let read = toml::from_str::<toml::Table>(&format!("v = {text}"))
            .map_err(|e| e.to_string())
            .and_then(|table| {
                <_ as t::Kind<$ty>>::read_file(&$kind, &table["v"], std::path::Path::new(""))
            });
        if read.as_ref() != Ok(&default) {
            $problems.push(format!("{}: the default {text} reads as {read:?}", stringify!($key)));
        }
    }};
    (@check $problems:ident, $key:ident, $ty:ty, $kind:expr, unset($text:literal)) => {};
}

pub(crate) use key_table;
