//! Shared harness for the black-box integration tests.
//!
//! Every test drives a real broker process over loopback with independent clients:
//! rumqttc (v4) clients, hand-written raw MQTT bytes for protocol edge cases, and the
//! `mosquitto_pub` / `mosquitto_sub` command-line tools.
//!
//! The broker under test is `coremq` (the binary cargo builds for this package, or
//! `$COREMQ_BIN`), or, with `COREMQ_TEST_BROKER=mosquitto`, the reference broker
//! mosquitto started from a generated config file, so the tests themselves can be
//! validated against the reference implementation.
#![allow(dead_code)]

pub mod load;
pub mod raw;
pub mod tools;

use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Upper bound for any single wait on an event that is expected to happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// Fixed window used only where the *absence* of an event must be shown.
pub const SILENCE: Duration = Duration::from_millis(300);
/// Whole-test bound, so that a hung broker fails one test instead of the run.
const TEST_BOUND: Duration = Duration::from_secs(60);

/// The I/O backend a coremq instance is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring (tokio-uring).
    Uring,
    /// epoll (tokio current_thread).
    Epoll,
}

impl Backend {
    /// The value of `--backend` for this backend.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// True when the suite runs against mosquitto instead of coremq.
pub fn use_mosquitto() -> bool {
    std::env::var("COREMQ_TEST_BROKER").is_ok_and(|v| v == "mosquitto")
}

/// Prints a skip note and returns true when a coremq-only test runs against mosquitto.
pub fn skip_unless_coremq(what: &str) -> bool {
    if use_mosquitto() {
        eprintln!("SKIP (mosquitto): {what} is coremq-specific");
        true
    } else {
        false
    }
}

/// Path of the coremq binary: the one cargo built for this package, else `$COREMQ_BIN`.
pub fn coremq_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_coremq") {
        return PathBuf::from(p);
    }
    match std::env::var("COREMQ_BIN") {
        Ok(p) => PathBuf::from(p),
        Err(_) => {
            panic!("no coremq binary: not built by cargo for this package and COREMQ_BIN unset")
        }
    }
}

/// Runs an async test body for one backend on a fresh runtime with an overall bound.
///
/// Under mosquitto the backend is meaningless, so only the epoll variant runs (the uring
/// variant prints a note); that halves the time without losing coverage.
pub fn run<F, Fut>(backend: Backend, test: F)
where
    F: FnOnce(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    if use_mosquitto() && backend == Backend::Uring {
        eprintln!("SKIP (mosquitto): backend variant only meaningful for coremq");
        return;
    }
    if backend == Backend::Uring && !uring_available() {
        // CI runs on machines with io_uring: there a missing ring is a fault to see, not a reason to pass.
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "io_uring is unavailable but CI=true: the uring variant of this test cannot run"
        );
        eprintln!("SKIP (LOUD): io_uring is unavailable on this host; this uring test did not run");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        timeout(TEST_BOUND, test(backend)).await.expect("test exceeded its overall time bound")
    });
}

/// Generates `mod <name> { #[test] fn uring(); #[test] fn epoll(); }` for each async test
/// function `async fn <name>(backend: Backend)` in the including file.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn uring() {
                    $crate::common::run($crate::common::Backend::Uring, super::$name);
                }
                #[test]
                fn epoll() {
                    $crate::common::run($crate::common::Backend::Epoll, super::$name);
                }
            }
        )*
    };
}

/// [`backend_tests!`] for stress tests: tests whose assertions are wall-clock or RSS thresholds
/// (a round trip under 500 ms, RSS back near its baseline within 5 s, ...) that a loaded machine can
/// miss. The default `cargo test` skips them; `scripts/test.sh` runs them on their own, one at a time
/// (`-- --ignored --test-threads=1`), and lists each threshold and its tolerance.
#[macro_export]
macro_rules! stress_backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                #[ignore = "stress: wall-clock/RSS threshold, run by scripts/test.sh"]
                fn uring() {
                    $crate::common::run($crate::common::Backend::Uring, super::$name);
                }
                #[test]
                #[ignore = "stress: wall-clock/RSS threshold, run by scripts/test.sh"]
                fn epoll() {
                    $crate::common::run($crate::common::Backend::Epoll, super::$name);
                }
            }
        )*
    };
}

/// True when this kernel lets us create an io_uring (it may be compiled out, disabled by
/// `kernel.io_uring_disabled`, or blocked by a seccomp filter in containers).
pub fn uring_available() -> bool {
    // struct io_uring_params is 120 bytes; zeroed is a valid request for a 1-entry ring.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup(2) reads and writes only `params`, which outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a descriptor we just created and own.
    unsafe {
        libc::close(fd as libc::c_int);
    }
    true
}

/// Runs coremq with `args` and waits (≤ 10 s) for it to exit by itself, e.g. on a
/// configuration error; panics if it is still running then.
pub fn run_coremq_to_exit(args: &[String]) -> Stopped {
    let dir = temp_dir("exit");
    let out = std::fs::File::create(dir.join("stdout")).expect("stdout file");
    let err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let mut child = Command::new(coremq_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn coremq");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("coremq {args:?} still running after 10 s (expected it to exit)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    let st = Stopped { status, stdout: read("stdout"), stderr: read("stderr") };
    let _ = std::fs::remove_dir_all(&dir);
    st
}

/// Returns a port that was free a moment ago (bind to port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A unique, fresh temporary directory for one broker instance.
pub fn temp_dir(tag: &str) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("coremq-itest-{tag}-{}-{n}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Broker limits a test needs; mapped to coremq flags or to mosquitto config lines.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--threads` (coremq only).
    pub threads: usize,
    /// `--connect-timeout` seconds (coremq only: mosquitto has no such option).
    pub connect_timeout: Option<u64>,
    /// `--max-inflight` / mosquitto `max_inflight_messages`.
    pub max_inflight: Option<u32>,
    /// `--max-queued-messages` / mosquitto `max_queued_messages`.
    pub max_queued_messages: Option<u32>,
    /// `--max-packet-size` / mosquitto `max_packet_size`.
    pub max_packet_size: Option<u32>,
    /// `queue_qos0_messages = true` (through a config file for coremq).
    pub queue_qos0: bool,
    /// Extra coremq command-line arguments (ignored under mosquitto).
    pub extra_args: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            threads: 2,
            connect_timeout: None,
            max_inflight: None,
            max_queued_messages: None,
            max_packet_size: None,
            queue_qos0: false,
            extra_args: Vec::new(),
        }
    }
}

/// What a stopped broker left behind.
#[derive(Debug)]
pub struct Stopped {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

/// A running broker process; stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Broker {
    child: Option<Child>,
    /// Loopback port the broker listens on.
    pub port: u16,
    /// Private temporary directory (config, captured output).
    pub dir: PathBuf,
}

impl Broker {
    /// Starts the broker under test with default settings.
    pub fn start(backend: Backend) -> Broker {
        Broker::start_with(backend, &Settings::default())
    }

    /// Starts the broker under test (coremq or mosquitto) and waits until it is ready.
    pub fn start_with(backend: Backend, s: &Settings) -> Broker {
        // A port picked by `free_port` can be taken by someone else before the broker binds
        // it; retry with a fresh port instead of failing the test.
        let mut last_err = String::new();
        for _ in 0..3 {
            let port = free_port();
            let dir = temp_dir("broker");
            let cmd = if use_mosquitto() {
                mosquitto_command(&dir, port, s)
            } else {
                coremq_command(&dir, port, backend, s)
            };
            match Broker::spawn_and_wait(cmd, port, dir) {
                Ok(b) => return b,
                Err(e) if e.contains("in use") => last_err = e,
                Err(e) => panic!("broker failed to start:\n{e}"),
            }
        }
        panic!("broker failed to start (port collisions):\n{last_err}");
    }

    /// Starts coremq with exactly `args` (no defaults added) and waits until `port` accepts.
    pub fn start_coremq_args(args: &[String], port: u16) -> Broker {
        match Broker::try_start_coremq_args(args, port) {
            Ok(b) => b,
            Err(e) => panic!("coremq failed to start with {args:?}:\n{e}"),
        }
    }

    /// Like [`Broker::start_coremq_args`], but a broker that exits or does not answer within 10 s is
    /// an `Err` with its output, so that a caller can retry a port taken meanwhile ("in use").
    pub fn try_start_coremq_args(args: &[String], port: u16) -> Result<Broker, String> {
        let dir = temp_dir("args");
        let mut cmd = Command::new(coremq_bin());
        cmd.args(args);
        Broker::spawn_and_wait(cmd, port, dir)
    }

    fn spawn_and_wait(mut cmd: Command, port: u16, dir: PathBuf) -> Result<Broker, String> {
        let out = std::fs::File::create(dir.join("stdout")).expect("stdout file");
        let err = std::fs::File::create(dir.join("stderr")).expect("stderr file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let is_mosquitto = cmd.get_program().to_string_lossy().contains("mosquitto");
        let child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let mut b = Broker { child: Some(child), port, dir };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = b.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                b.child = None;
                return Err(format!(
                    "exited early with {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    b.read_output("stdout"),
                    b.read_output("stderr")
                ));
            }
            // coremq prints its "listening on" line once every core has bound its listener and started
            // its tasks; the port alone answers as soon as the first core listens, and a test that
            // takes a baseline of the process (descriptors, memory) then would miss the other cores'.
            let all_cores_up = is_mosquitto || b.read_output("stderr").contains("coremq: listening on");
            if all_cores_up && StdTcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(b);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not accepting on {addr} after 10 s\n--- stderr ---\n{}",
                    b.read_output("stderr")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running broker (for /proc probes).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker already stopped").id()
    }

    fn read_output(&self, name: &str) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join(name)) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends `signal` and waits (≤ 5 s, then SIGKILL) for the process to exit.
    pub fn stop_with_signal(mut self, signal: i32) -> Stopped {
        let status = self.terminate(signal);
        Stopped { status, stdout: self.read_output("stdout"), stderr: self.read_output("stderr") }
    }

    /// Graceful stop with SIGTERM; returns the exit status and captured output.
    pub fn stop(self) -> Stopped {
        self.stop_with_signal(libc::SIGTERM)
    }

    fn terminate(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("broker already stopped");
        let pid = child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                eprintln!("broker did not exit within 5 s of signal {signal}; SIGKILL");
                let _ = child.kill();
                return child.wait().expect("wait after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.terminate(libc::SIGTERM);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- broker dir {} ---\n--- stdout ---\n{}\n--- stderr ---\n{}",
                self.dir.display(),
                self.read_output("stdout"),
                self.read_output("stderr")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn coremq_command(dir: &Path, port: u16, backend: Backend, s: &Settings) -> Command {
    let mut cmd = Command::new(coremq_bin());
    cmd.arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--threads")
        .arg(s.threads.to_string())
        .arg("--backend")
        .arg(backend.as_str());
    if let Some(v) = s.connect_timeout {
        cmd.arg("--connect-timeout").arg(v.to_string());
    }
    if let Some(v) = s.max_inflight {
        cmd.arg("--max-inflight").arg(v.to_string());
    }
    if let Some(v) = s.max_queued_messages {
        cmd.arg("--max-queued-messages").arg(v.to_string());
    }
    if let Some(v) = s.max_packet_size {
        cmd.arg("--max-packet-size").arg(v.to_string());
    }
    if s.queue_qos0 {
        // There is no flag for this one; it is a config-file key.
        let conf = dir.join("coremq.toml");
        std::fs::write(&conf, "queue_qos0_messages = true\n").expect("write config");
        cmd.arg("--config").arg(conf);
    }
    cmd.args(&s.extra_args);
    cmd
}

fn mosquitto_command(dir: &Path, port: u16, s: &Settings) -> Command {
    let mut conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
         set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n"
    );
    if let Some(v) = s.max_inflight {
        conf.push_str(&format!("max_inflight_messages {v}\n"));
    }
    if let Some(v) = s.max_queued_messages {
        conf.push_str(&format!("max_queued_messages {v}\n"));
    }
    if let Some(v) = s.max_packet_size {
        conf.push_str(&format!("max_packet_size {v}\n"));
    }
    if s.queue_qos0 {
        conf.push_str("queue_qos0_messages true\n");
    }
    let path = dir.join("mosquitto.conf");
    std::fs::write(&path, conf).expect("write mosquitto.conf");
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(path);
    cmd
}

/// Parsed shutdown statistics line (`all: connections 3, messages in 10, ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatLine {
    /// Connections accepted.
    pub connections: u64,
    /// PUBLISH packets received from clients.
    pub messages_in: u64,
    /// Deliveries written to subscribers.
    pub messages_out: u64,
    /// Messages dropped (queue limits).
    pub dropped: u64,
}

/// Value following `key` in `line` (e.g. `messages in 10` → 10).
pub fn stat_value(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..].trim_start().split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// All statistics lines of a shutdown report as (label, stats), e.g. ("all", ...).
pub fn parse_stats(stdout: &str) -> Vec<(String, StatLine)> {
    stdout
        .lines()
        .filter(|l| l.contains("messages in"))
        .map(|l| {
            let label = l.split(':').next().unwrap_or("").trim().to_string();
            let get = |k| stat_value(l, k).unwrap_or_else(|| panic!("no `{k}` in {l:?}"));
            (
                label,
                StatLine {
                    connections: get("connections"),
                    messages_in: get("messages in"),
                    messages_out: get("messages out"),
                    dropped: get("dropped"),
                },
            )
        })
        .collect()
}

/// The merged `all:` statistics line of a shutdown report.
pub fn all_stats(stdout: &str) -> StatLine {
    parse_stats(stdout)
        .into_iter()
        .find(|(l, _)| l == "all")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("no `all:` stats line in stdout:\n{stdout}"))
}

// ---------------------------------------------------------------------------------------
// rumqttc clients
// ---------------------------------------------------------------------------------------

/// Options for a rumqttc test client.
#[derive(Debug, Clone)]
pub struct ClientOpts {
    /// CONNECT clean-session flag.
    pub clean: bool,
    /// Keep-alive in seconds (0 disables).
    pub keep_alive: u64,
    /// Optional will: (topic, payload, qos, retain).
    pub will: Option<(String, Vec<u8>, QoS, bool)>,
    /// Optional user name and password.
    pub credentials: Option<(String, String)>,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts { clean: true, keep_alive: 30, will: None, credentials: None }
    }
}

/// A connected rumqttc client whose event loop runs in its own task.
///
/// Incoming PUBLISH packets go to one channel, every other incoming packet to another; the
/// task ends (and does not reconnect) on the first connection error.
pub struct Client {
    /// The rumqttc handle.
    pub client: AsyncClient,
    /// Client identifier.
    pub id: String,
    /// The CONNACK the broker answered with.
    pub connack: ConnAck,
    publishes: mpsc::UnboundedReceiver<Publish>,
    packets: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

/// Connects a clean-session rumqttc client with default options.
pub async fn client(port: u16, id: &str) -> Client {
    client_with(port, id, ClientOpts::default()).await
}

/// Connects a rumqttc client and waits for a successful CONNACK.
pub async fn client_with(port: u16, id: &str, o: ClientOpts) -> Client {
    let mut mo = MqttOptions::new(id, "127.0.0.1", port);
    mo.set_clean_session(o.clean);
    mo.set_keep_alive(Duration::from_secs(o.keep_alive));
    mo.set_inflight(100);
    if let Some((t, p, q, r)) = o.will {
        mo.set_last_will(LastWill::new(t, p, q, r));
    }
    if let Some((u, p)) = o.credentials {
        mo.set_credentials(u, p);
    }
    let (client, eventloop) = AsyncClient::new(mo, 1024);
    let (pub_tx, publishes) = mpsc::unbounded_channel();
    let (pkt_tx, packets) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(drive(eventloop, pub_tx, pkt_tx, ack_tx));
    let connack = timeout(WAIT, ack_rx)
        .await
        .unwrap_or_else(|_| panic!("{id}: no CONNACK within {WAIT:?}"))
        .unwrap_or_else(|_| panic!("{id}: connection failed before CONNACK"));
    assert_eq!(connack.code, ConnectReturnCode::Success, "{id}: CONNACK {connack:?}");
    Client { client, id: id.to_string(), connack, publishes, packets, task }
}

async fn drive(
    mut el: EventLoop,
    pub_tx: mpsc::UnboundedSender<Publish>,
    pkt_tx: mpsc::UnboundedSender<Packet>,
    ack_tx: tokio::sync::oneshot::Sender<ConnAck>,
) {
    let mut ack_tx = Some(ack_tx);
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                if let Some(tx) = ack_tx.take() {
                    let _ = tx.send(c);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = pub_tx.send(p);
            }
            Ok(Event::Incoming(other)) => {
                let _ = pkt_tx.send(other);
            }
            Ok(Event::Outgoing(_)) => {}
            // Stop on the first error: polling again would make rumqttc reconnect, which would
            // hide exactly the closes and takeovers the tests look for.
            Err(_) => return,
        }
    }
}

impl Client {
    /// Subscribes and waits for the SUBACK; returns its return codes.
    pub async fn subscribe_codes(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client.subscribe(filter, qos).await.expect("queue SUBSCRIBE");
        match self.next_packet().await {
            Packet::SubAck(s) => s.return_codes,
            other => panic!("{}: expected SUBACK, got {other:?}", self.id),
        }
    }

    /// Subscribes, waits for the SUBACK and asserts it granted exactly `qos`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let codes = self.subscribe_codes(filter, qos).await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(qos)], "{}: SUBACK for {filter}", self.id);
    }

    /// Unsubscribes and waits for the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) {
        self.client.unsubscribe(filter).await.expect("queue UNSUBSCRIBE");
        match self.next_packet().await {
            Packet::UnsubAck(_) => {}
            other => panic!("{}: expected UNSUBACK, got {other:?}", self.id),
        }
    }

    /// Publishes and, for QoS 1/2, waits for the PUBACK/PUBCOMP of this message.
    ///
    /// Only valid when no other acknowledged publish of this client is outstanding.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, retain, payload.into()).await.expect("queue PUBLISH");
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.next_packet().await {
                Packet::PubAck(_) => {}
                other => panic!("{}: expected PUBACK, got {other:?}", self.id),
            },
            QoS::ExactlyOnce => loop {
                // rumqttc answers PUBREC itself; we only see it go by.
                match self.next_packet().await {
                    Packet::PubRec(_) => continue,
                    Packet::PubComp(_) => break,
                    other => panic!("{}: expected PUBREC/PUBCOMP, got {other:?}", self.id),
                }
            },
        }
    }

    /// Publishes without waiting for any acknowledgement.
    pub async fn publish_nowait(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, qos, retain, payload.into()).await.expect("queue PUBLISH");
    }

    /// Waits (bounded) for the next non-PUBLISH packet.
    pub async fn next_packet(&mut self) -> Packet {
        match timeout(WAIT, self.packets.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("{}: connection closed while waiting for a packet", self.id),
            Err(_) => panic!("{}: no packet within {WAIT:?}", self.id),
        }
    }

    /// Waits (bounded) for the next incoming PUBLISH.
    pub async fn recv(&mut self) -> Publish {
        match timeout(WAIT, self.publishes.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("{}: connection closed while waiting for a PUBLISH", self.id),
            Err(_) => panic!("{}: no PUBLISH within {WAIT:?}", self.id),
        }
    }

    /// Receives exactly `n` PUBLISH packets.
    pub async fn recv_n(&mut self, n: usize) -> Vec<Publish> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            match timeout(WAIT, self.publishes.recv()).await {
                Ok(Some(p)) => v.push(p),
                _ => panic!("{}: got only {i} of {n} PUBLISHes", self.id),
            }
        }
        v
    }

    /// Asserts that no PUBLISH arrives within `SILENCE`.
    pub async fn expect_nothing(&mut self) {
        if let Ok(Some(p)) = timeout(SILENCE, self.publishes.recv()).await {
            panic!("{}: unexpected PUBLISH {p:?}", self.id);
        }
    }

    /// Asserts that no PUBLISH has arrived so far (no waiting: callers that check many
    /// clients sleep `SILENCE` once and then check each).
    pub fn expect_nothing_now(&mut self) {
        if let Ok(p) = self.publishes.try_recv() {
            panic!("{}: unexpected PUBLISH {p:?}", self.id);
        }
    }

    /// True once the connection's event loop has ended (closed by the broker or error).
    pub async fn wait_closed(&mut self, within: Duration) -> bool {
        timeout(within, &mut self.task).await.is_ok()
    }

    /// Sends DISCONNECT and waits (bounded) for the event loop to finish.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        if timeout(WAIT, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }

    /// Drops the connection without DISCONNECT (an abnormal close from MQTT's view).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Asserts that none of `clients` receives anything within one shared `SILENCE` window.
pub async fn expect_nothing_all(clients: &mut [Client]) {
    tokio::time::sleep(SILENCE).await;
    for c in clients {
        c.expect_nothing_now();
    }
}

/// Maps a QoS number to rumqttc's `QoS`.
pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => panic!("bad qos {n}"),
    }
}

/// Client ids chosen so that a test touches many sessions: with `hash(id) % 2` placement a
/// handful of distinct ids lands on both cores with overwhelming probability.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}
