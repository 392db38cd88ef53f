//! The texts that list the broker's flags match the flags the binary has: README's usage block and the
//! flags named in `coremq.example.toml`'s header are checked against `coremq -h` and `coremq passwd -h`.
//! Those flags are made from the table of config keys (`src/config/keys.rs`), so these checks hold the
//! texts to that table too; the config's unit tests check README's configuration table and the example
//! file against the table directly.

mod common;

use std::process::Command;

use common::coremq_bin;

/// One option as a usage line shows it: the flag and its value's placeholder, if it takes one.
type Opt = (String, Option<String>);

/// The `-h` output of `coremq` with `args`.
fn help(args: &[&str]) -> String {
    let out = Command::new(coremq_bin()).args(args).arg("-h").output().expect("run coremq -h");
    assert!(out.status.success(), "coremq {args:?} -h: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// The options of a clap `-h` text, in order, without `--help` and `--version`: `      --listen
/// <HOST:PORT>  Listen on ...` is `("--listen", Some("HOST:PORT"))`, `  -c   Create ...` is `("-c", None)`.
fn help_options(help: &str) -> Vec<Opt> {
    let mut opts = Vec::new();
    for line in help.lines().skip_while(|l| *l != "Options:").skip(1) {
        let text = line.trim_start();
        // Option lines start within the first columns; a description wrapped onto the next line would
        // start far to the right.
        if !text.starts_with('-') || line.len() - text.len() > 6 {
            continue;
        }
        let mut words = text.split_whitespace();
        let mut flag = words.next().unwrap_or_default();
        if flag.ends_with(',') {
            // "-h, --help": the long name is the one usage lines show.
            flag = words.next().unwrap_or_default();
        }
        let value = words
            .next()
            .and_then(|w| w.strip_prefix('<'))
            .and_then(|w| w.strip_suffix('>'))
            .map(str::to_string);
        if flag != "--help" && flag != "--version" {
            opts.push((flag.to_string(), value));
        }
    }
    assert!(!opts.is_empty(), "no options found in:\n{help}");
    opts
}

/// The options of README usage lines (`[--flag VALUE]`, `[-c]`), in order, and what is left of the
/// lines without them (the command and its positional arguments), words joined by one space.
fn usage_options(lines: &str) -> (Vec<Opt>, String) {
    let mut opts = Vec::new();
    let mut rest = String::new();
    let mut text = lines;
    while let Some(open) = text.find('[') {
        let close = open + text[open..].find(']').expect("unclosed [ in README's usage");
        let inner = &text[open + 1..close];
        rest.push_str(&text[..open]);
        if inner.starts_with('-') {
            let (flag, value) = match inner.split_once(' ') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (inner, None),
            };
            opts.push((flag.to_string(), value));
        } else {
            // A positional argument in brackets, [PASSWORD].
            rest.push_str(&text[open..=close]);
        }
        text = &text[close + 1..];
        // "[--listen HOST:PORT]...": repeatable.
        text = text.strip_prefix("...").unwrap_or(text);
    }
    rest.push_str(text);
    (opts, rest.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// README's usage block: the `coremq` lines and the `coremq passwd` line.
fn readme_usage() -> (String, String) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "## Usage")
        .skip_while(|l| *l != "```")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    let passwd = block.iter().position(|l| l.starts_with("coremq passwd")).expect("README: no passwd usage");
    (block[..passwd].join("\n"), block[passwd..].join("\n"))
}

#[test]
fn readme_usage_shows_every_flag_as_help_does() {
    let (broker, passwd) = readme_usage();

    let (opts, rest) = usage_options(&broker);
    assert_eq!(rest, "coremq", "README's broker usage has words that are not options");
    assert_eq!(opts, help_options(&help(&[])), "README's broker usage against `coremq -h` (flags in order)");

    let passwd_help = help(&["passwd"]);
    let (opts, rest) = usage_options(&passwd);
    assert_eq!(opts, help_options(&passwd_help), "README's passwd usage against `coremq passwd -h`");
    // Positional arguments: clap's usage line, "coremq passwd [OPTIONS] <FILE> <USER> [PASSWORD]".
    let clap_usage = passwd_help
        .lines()
        .find_map(|l| l.strip_prefix("Usage: "))
        .expect("a usage line")
        .replace(" [OPTIONS]", "")
        .replace(['<', '>'], "");
    assert_eq!(rest, clap_usage, "README's passwd arguments");
}

#[test]
fn example_config_header_names_every_flag() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/coremq.example.toml")).unwrap();
    // The header: the comment lines before the first blank line.
    let header: String = text.lines().take_while(|l| !l.trim().is_empty()).collect::<Vec<_>>().join("\n");
    let mut named: Vec<String> = header
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--"))
        .map(str::to_string)
        .collect();
    named.sort();
    named.dedup();
    let mut flags: Vec<String> = help_options(&help(&[])).into_iter().map(|(f, _)| f).collect();
    flags.sort();
    assert_eq!(named, flags, "the flags coremq.example.toml's header names against `coremq -h`");
}
