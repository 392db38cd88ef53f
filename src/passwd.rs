//! `coremq passwd`: edits a password file the way `mosquitto_passwd` does, in the same format.
//!
//! The new file is written beside the old one and renamed over it, so a crash never leaves half a file;
//! a created file is readable by its owner only (it holds password hashes).

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::auth::password::{self, DEFAULT_ITERATIONS};
use crate::cli::PasswdArgs;

/// Runs the subcommand; `Err` is the one line to print.
pub fn run(args: &PasswdArgs) -> Result<(), String> {
    let file = args.file.display();
    if !password::valid_username(&args.user) {
        return Err(format!(
            "invalid user name {:?}: it must be non-empty, without ':' or control characters",
            args.user
        ));
    }
    let text = if args.create {
        String::new()
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("cannot read {file}: {e} (use -c to create it)"))?
    };
    // Refuse to edit a file the broker could not load, rather than appending to garbage.
    password::PasswordFile::parse(&text).map_err(|e| format!("{file}: {e}"))?;
    let new = if args.delete {
        password::delete_user(&text, &args.user)?
    } else {
        let secret = match (&args.password, args.batch) {
            (Some(p), true) => p.clone(),
            _ => read_password()?,
        };
        if secret.is_empty() {
            return Err("empty password".into());
        }
        let iterations = args.iterations.unwrap_or(DEFAULT_ITERATIONS);
        if iterations == 0 {
            return Err("--iterations must be at least 1".into());
        }
        password::set_user(&text, &args.user, &password::hash_password(secret.as_bytes(), iterations))?
    };
    write_atomically(&args.file, &new).map_err(|e| format!("cannot write {file}: {e}"))
}

/// From the terminal (twice, echo off), or one line of stdin when it is not a terminal.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map_err(|e| format!("cannot read the password from stdin: {e}"))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = prompt("Password: ")?;
    let second = prompt("Reenter password: ")?;
    if first != second {
        return Err("passwords do not match".into());
    }
    Ok(first)
}

/// Prints `label` and reads one line from the terminal with echo turned off (restored afterwards).
fn prompt(label: &str) -> Result<String, String> {
    eprint!("{label}");
    let _ = std::io::stderr().flush();
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor or fails.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a live termios the call writes into.
    let have_tty = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: `quiet` is a valid termios copied from the terminal's own settings.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if have_tty {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
        eprintln!();
    }
    read.map_err(|e| format!("cannot read the password: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // Keep an existing file's permissions; a new one is owner-only.
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap_or(0o600);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}
