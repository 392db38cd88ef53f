//! Keeps the layering rules of ARCHITECTURE.md true: a rule broken by a change fails `cargo test`.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).expect("under src").to_string_lossy().replace('\\', "/");
            (rel, fs::read_to_string(&p).expect("readable source"))
        })
        .collect()
}

/// Lines that are code, not comments (good enough for the words checked here).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !l.trim_start().starts_with("//"))
}

#[test]
fn only_the_io_layer_names_the_runtime_crates() {
    for (file, text) in sources() {
        if file.starts_with("io/") {
            continue;
        }
        for word in ["tokio_uring", "io_uring::", "tokio::net"] {
            assert!(!code_lines(&text).any(|l| l.contains(word)), "{file} names {word}: only src/io/ may");
        }
    }
}

#[test]
fn pure_modules_do_no_io() {
    for (file, text) in sources() {
        let pure = ["protocol/", "topic/", "session/", "persist/"];
        if !pure.iter().any(|p| file.starts_with(p)) {
            continue;
        }
        for word in
            ["crate::io", "crate::server", "crate::core", "tokio", "std::net", "std::fs", "Instant::now"]
        {
            // Tests may read the clock to build messages; the state machines themselves take time as input.
            if word == "Instant::now" && file.ends_with("tests.rs") {
                continue;
            }
            assert!(!code_lines(&text).any(|l| l.contains(word)), "{file} uses {word}: it must stay pure");
        }
    }
}

#[test]
fn the_core_reads_no_clock_and_names_no_io() {
    // Every entry point of the core, the session and QoS machines, the topic index, the codec and the
    // log format is given the time; only the runtime reads the clocks.
    for (file, text) in sources() {
        let timeless = ["core/", "session/", "topic/", "protocol/", "persist/"];
        if !timeless.iter().any(|p| file.starts_with(p)) || file.ends_with("tests.rs") {
            continue;
        }
        for word in ["Instant::now", "SystemTime::now"] {
            assert!(
                !code_lines(&text).any(|l| l.contains(word)),
                "{file} reads the clock ({word}): pass the time in"
            );
        }
    }
    for (file, text) in sources() {
        if !file.starts_with("core/") {
            continue;
        }
        for word in ["crate::io", "crate::server", "tokio", "std::net", "std::fs", "thread_local!"] {
            assert!(
                !code_lines(&text).any(|l| l.contains(word)),
                "{file} uses {word}: the core does no I/O and keeps no per-thread globals"
            );
        }
    }
}

#[test]
fn the_connection_glue_shared_with_the_fuzz_target_is_plain() {
    // Admission, the reader's decoding and the outbox encoding are plain functions that the connection
    // tasks and the `connection` fuzz target both call: no sockets, no TLS session, no clock.
    let plain = ["server/admit.rs", "server/inbox.rs", "server/outbox.rs"];
    let found = sources().into_iter().filter(|(file, _)| plain.contains(&file.as_str())).count();
    assert_eq!(found, plain.len(), "a module of {plain:?} moved: update this test");
    for (file, text) in sources() {
        if !plain.contains(&file.as_str()) {
            continue;
        }
        // Its unit tests may read the clock to build messages.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for word in
            ["crate::io", "crate::tls", "tokio", "std::net", "std::fs", "Instant::now", "SystemTime::now"]
        {
            assert!(!code_lines(code).any(|l| l.contains(word)), "{file} uses {word}: it must stay plain");
        }
    }
}

#[test]
fn broker_state_is_never_behind_a_lock() {
    for (file, text) in sources() {
        for word in ["Mutex", "RwLock"] {
            assert!(
                !code_lines(&text).any(|l| l.contains(word)),
                "{file} uses {word}: cores share no locked state"
            );
        }
    }
}

#[test]
fn only_xcore_and_main_touch_atomics() {
    for (file, text) in sources() {
        if file.starts_with("xcore/")
            || file == "main.rs"
            || file.starts_with("io/")
            || file == "server/mod.rs"
        {
            continue;
        }
        assert!(
            !code_lines(&text).any(|l| l.contains("std::sync::atomic")),
            "{file} uses atomics: cross-thread state belongs in src/xcore/"
        );
    }
}
