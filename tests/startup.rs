//! Starting on an address that is already served. Every core listens with `SO_REUSEPORT`, which would let a
//! second coremq of the same user join the first one's group: both would start, and the kernel would spread
//! clients over two brokers that share no session and no subscription. A second broker must instead exit
//! with the error of any port in use, and the first must go on serving.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{
    client, coremq_bin, free_port, qos, run_coremq_to_exit, skip_unless_coremq, temp_dir, Backend, Broker,
    Settings, Stopped, WAIT,
};

backend_tests!(
    second_broker_on_a_served_address_exits_and_the_first_serves_on,
    a_shared_address_among_several_listeners_is_refused,
    of_two_brokers_started_at_once_exactly_one_serves,
);

/// `coremq --listen 127.0.0.1:PORT ...` for each port, on two threads (so that the first broker has a
/// group of listeners per address) and `backend`.
fn args(ports: &[u16], backend: Backend) -> Vec<String> {
    let mut a = Vec::new();
    for p in ports {
        a.extend(["--listen".to_string(), format!("127.0.0.1:{p}")]);
    }
    a.extend(["--threads", "2", "--backend", backend.as_str()].map(String::from));
    a
}

/// The error line a broker prints when it cannot listen on `127.0.0.1:port`.
fn in_use(port: u16) -> String {
    format!("coremq: cannot listen on 127.0.0.1:{port}: Address already in use (os error 98)\n")
}

/// Runs a broker that must exit at once, within `WAIT`, because an address it was given is taken.
async fn refused(args: Vec<String>) -> Stopped {
    let t0 = Instant::now();
    let st = tokio::task::spawn_blocking(move || run_coremq_to_exit(&args)).await.expect("runner");
    assert!(t0.elapsed() < WAIT, "the refused broker took {:?} to exit", t0.elapsed());
    st
}

/// Round trips on `port` through a few connections (spread over the first broker's cores by the kernel):
/// each client gets back what it published.
async fn serves(port: u16, tag: &str) {
    for i in 0..4 {
        let topic = format!("startup/{tag}/{i}");
        let mut c = client(port, &format!("{tag}-{i}")).await;
        c.subscribe(&topic, qos(1)).await;
        c.publish(&topic, qos(1), false, format!("hello {i}")).await;
        let p = c.recv().await;
        assert_eq!((p.topic.as_str(), &p.payload[..]), (topic.as_str(), format!("hello {i}").as_bytes()));
        c.disconnect().await;
    }
}

async fn second_broker_on_a_served_address_exits_and_the_first_serves_on(b: Backend) {
    if skip_unless_coremq("the listen address claim") {
        return;
    }
    let first = Broker::start_with(b, &Settings::default());
    let second = refused(args(&[first.port], b)).await;
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert_eq!(second.stderr, in_use(first.port), "{second:?}");

    // The same line, and the same exit status, as for a port that another program listens on.
    let foreign = TcpListener::bind("127.0.0.1:0").expect("bind a foreign listener");
    let foreign_port = foreign.local_addr().expect("local_addr").port();
    let other = refused(args(&[foreign_port], b)).await;
    assert_eq!(other.status.code(), second.status.code(), "{other:?}");
    assert_eq!(other.stderr, in_use(foreign_port), "{other:?}");
    drop(foreign);

    serves(first.port, "first").await;
    let st = first.stop();
    assert!(st.status.success(), "{st:?}");
}

async fn a_shared_address_among_several_listeners_is_refused(b: Backend) {
    if skip_unless_coremq("the listen address claim") {
        return;
    }
    // A broker with two listeners; a port taken between free_port and the bind is retried.
    let mut last = String::new();
    let (first, ports) = 'start: {
        for _ in 0..3 {
            let ports = [free_port(), free_port()];
            match Broker::try_start_coremq_args(&args(&ports, b), ports[0]) {
                Ok(broker) => break 'start (broker, ports),
                Err(e) if e.contains("in use") => last = e,
                Err(e) => panic!("the first broker failed to start:\n{e}"),
            }
        }
        panic!("the first broker failed to start (port collisions):\n{last}");
    };
    // A second broker with a free address and one of the first's: the shared one is named.
    let free = free_port();
    let second = refused(args(&[free, ports[1]], b)).await;
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert_eq!(second.stderr, in_use(ports[1]), "{second:?}");
    // Its claim of the free address ended with it: another broker can listen there.
    let third = Broker::try_start_coremq_args(&args(&[free], b), free);
    // (A port taken by someone else meanwhile says nothing about the claim.)
    match third {
        Ok(third) => serves(third.port, "third").await,
        Err(e) => assert!(e.contains("in use") && !e.contains("listening on"), "{e}"),
    }
    serves(ports[0], "first-a").await;
    serves(ports[1], "first-b").await;
    let st = first.stop();
    assert!(st.status.success(), "{st:?}");
}

/// A broker process started by the race test; SIGKILLed if the test ends with it still running.
struct Racer {
    child: Child,
    dir: PathBuf,
}

impl Racer {
    fn spawn(args: &[String]) -> Racer {
        let dir = temp_dir("racer");
        let err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(coremq_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn coremq");
        Racer { child, dir }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// The exit status once the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Ready: every core listens (the broker prints this line after all of them bound).
    fn listening(&self) -> bool {
        self.stderr().contains("coremq: listening on")
    }

    /// True once the process has `path` open.
    fn has_open(&self, path: &Path) -> bool {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()));
        fds.into_iter().flatten().flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == path))
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts two brokers with `args` that both go past reading their config file at the same instant.
///
/// Why: two processes spawned one after the other start about a millisecond apart, which is about as
/// long as a broker takes from its first look at the address to its cores listening, so the later one
/// would mostly find the earlier one listening and the race the claim's lock exists for would hardly
/// ever be run. So the config file is a FIFO that this function holds open for writing: each broker
/// blocks reading it until the last writer closes, then both read an empty file (the defaults) at once.
/// Even so, the probes of the two do not always overlap (with the lock disabled, this test failed one
/// run in six): the lock itself is checked exactly by the claim's unit tests in `src/io/tests.rs`.
fn start_racers(args: &[String]) -> [Racer; 2] {
    let dir = temp_dir("race");
    // Canonical, because that is how /proc names the file the brokers have open.
    let fifo = dir.canonicalize().expect("canonical temp dir").join("coremq.toml");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo(3) reads the NUL-terminated path, which outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
    // Read and write: on Linux opening a FIFO so never blocks, and the brokers' opens then do not either.
    let writer = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).expect("open the FIFO");
    let mut with_config = args.to_vec();
    with_config.extend(["--config".to_string(), fifo.display().to_string()]);
    let mut racers = [Racer::spawn(&with_config), Racer::spawn(&with_config)];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !racers.iter().all(|r| r.has_open(&fifo)) {
        for r in racers.iter_mut() {
            assert!(r.exited().is_none(), "a broker exited before reading its config:\n{}", r.stderr());
        }
        assert!(Instant::now() < deadline, "the brokers did not open their config within 10 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
    racers
}

/// Two brokers on one address that start at the same instant: both may probe the address before either
/// listens, so only the claim's lock keeps one of them out.
async fn of_two_brokers_started_at_once_exactly_one_serves(b: Backend) {
    if skip_unless_coremq("the listen address claim") {
        return;
    }
    for attempt in 1..=3 {
        let port = free_port();
        let a = args(&[port], b);
        let mut racers = start_racers(&a);
        // Bounded: wait until one has exited and the other listens, or both have exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            let status = [racers[0].exited(), racers[1].exited()];
            match status {
                [Some(s0), Some(s1)] => break Err((s0, s1)),
                [Some(s), None] if racers[1].listening() => break Ok((1, s)),
                [None, Some(s)] if racers[0].listening() => break Ok((0, s)),
                _ => {}
            }
            let running = racers.iter().filter(|r| r.listening()).count();
            assert!(
                running < 2,
                "both brokers listen on {port}:\n--- 1 ---\n{}\n--- 2 ---\n{}",
                racers[0].stderr(),
                racers[1].stderr()
            );
            assert!(
                Instant::now() < deadline,
                "no outcome within 10 s:\n--- 1 ---\n{}\n--- 2 ---\n{}",
                racers[0].stderr(),
                racers[1].stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        match outcome {
            Ok((winner, loser_status)) => {
                let loser = &racers[1 - winner];
                assert_eq!(loser_status.code(), Some(2), "{}", loser.stderr());
                assert_eq!(loser.stderr(), in_use(port));
                serves(port, "race").await;
                let w = &mut racers[winner];
                assert!(w.exited().is_none(), "the winner exited:\n{}", w.stderr());
                // SAFETY: plain kill(2) on our own child, not yet reaped.
                unsafe {
                    libc::kill(w.child.id() as libc::pid_t, libc::SIGTERM);
                }
                let t0 = Instant::now();
                let st = loop {
                    if let Some(st) = w.exited() {
                        break st;
                    }
                    assert!(t0.elapsed() < WAIT, "the winner did not stop within {WAIT:?}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                assert!(st.success(), "{st:?}:\n{}", w.stderr());
                return;
            }
            // Someone else took the port after free_port: both were refused; try a fresh one.
            Err(st) => {
                let errs = [racers[0].stderr(), racers[1].stderr()];
                assert!(
                    errs.iter().all(|e| *e == in_use(port)) && attempt < 3,
                    "both brokers exited {st:?}:\n--- 1 ---\n{}\n--- 2 ---\n{}",
                    errs[0],
                    errs[1]
                );
            }
        }
    }
}
