//! Helpers for fault and load tests: many raw connections driven by tokio tasks with a bounded
//! number in flight, probes of the broker process (RSS and open descriptors from /proc), a lock
//! serialising the descriptor-hungry tests of one test binary, and a healthy publisher/subscriber
//! pair that keeps measuring round trips while a test abuses the broker.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use super::raw::Connect;
use super::{client, qos, Client, WAIT};

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (children such as the broker inherit
/// it) and returns the soft limit now in force.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit(2) writes only into `lim`, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        panic!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        // An unlimited hard limit cannot be the soft one (fs.nr_open caps it); 1 Mi is plenty.
        let want = libc::rlimit { rlim_cur: lim.rlim_max.min(1 << 20), rlim_max: lim.rlim_max };
        // SAFETY: setrlimit(2) only reads `want`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            lim.rlim_cur = want.rlim_cur;
        } else {
            eprintln!("note: setrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        }
    }
    lim.rlim_cur
}

static HEAVY: Mutex<()> = Mutex::const_new(());

/// Serialises the heavy tests of one test binary: two 10,000-connection tests at once would need
/// more descriptors than the limit allows, and a flood next to them would distort latencies.
pub async fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// A snapshot of the broker process's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Resident set size (VmRSS) in KiB.
    pub rss_kb: u64,
    /// Open file descriptors.
    pub fds: usize,
}

/// Reads the RSS and descriptor count of process `pid` from /proc.
pub fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read /proc/<pid>/fd").count();
    Usage { rss_kb, fds }
}

/// Descriptors the broker may hold beyond its baseline once a test's connections are gone
/// (nothing a test does should leave any, but a lazily created one must not fail the test).
pub const FD_SLACK: usize = 4;

/// The RSS a broker may settle at after a test: +30 MiB or twice its baseline, whichever is larger.
pub fn rss_limit_kb(base: Usage) -> u64 {
    (base.rss_kb + 30 * 1024).max(2 * base.rss_kb)
}

/// Waits (≤ `within`) until the broker has closed the test's connections (descriptors back to
/// `base` + `FD_SLACK`) and its RSS is at most `rss_limit_kb` (usually [`rss_limit_kb`] of `base`);
/// returns that snapshot.
pub async fn settle(pid: u32, base: Usage, rss_limit_kb: u64, within: Duration) -> Usage {
    let deadline = Instant::now() + within;
    loop {
        let now = usage(pid);
        if now.fds <= base.fds + FD_SLACK && now.rss_kb <= rss_limit_kb {
            return now;
        }
        if Instant::now() > deadline {
            panic!(
                "broker did not settle within {within:?}: {now:?} vs baseline {base:?} \
                 (limits: fds <= {}, rss <= {} KiB)",
                base.fds + FD_SLACK,
                rss_limit_kb
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the futures of `futs` as tasks, at most `width` at a time (the iterator is only advanced
/// when a slot frees, so futures are created lazily), and returns their outputs in order.
/// A panicking task panics the caller with the same payload.
pub async fn run_limited<T, Fut>(futs: impl IntoIterator<Item = Fut>, width: usize) -> Vec<T>
where
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut futs = futs.into_iter().enumerate();
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = Vec::new();
    loop {
        while set.len() < width.max(1) {
            let Some((i, f)) = futs.next() else { break };
            out.push(None);
            set.spawn(async move { (i, f.await) });
        }
        match set.join_next().await {
            Some(Ok((i, v))) => out[i] = Some(v),
            Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Some(Err(e)) => panic!("load task failed: {e}"),
            None => break,
        }
    }
    out.into_iter().map(|v| v.expect("every task reported")).collect()
}

/// Summarises failures among `results` (count and the first few distinct messages), or None.
pub fn failures<T>(results: &[Result<T, String>]) -> Option<String> {
    let errs: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if errs.is_empty() {
        return None;
    }
    let mut distinct: Vec<&String> = Vec::new();
    for e in &errs {
        if distinct.len() < 5 && !distinct.contains(e) {
            distinct.push(e);
        }
    }
    Some(format!("{} of {} failed; first distinct errors: {distinct:?}", errs.len(), results.len()))
}

/// Opens a TCP connection (bounded by `WAIT`) with Nagle off.
pub async fn tcp(port: u16) -> Result<TcpStream, String> {
    let s = timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| format!("TCP connect not done within {WAIT:?}"))?
        .map_err(|e| format!("TCP connect: {e}"))?;
    s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    Ok(s)
}

/// Writes all of `bytes` (bounded by `WAIT`).
pub async fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    match timeout(WAIT, s.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("write not done within {WAIT:?}")),
    }
}

/// Reads one whole MQTT packet (first header byte and body) within `within`. Reads exactly the
/// packet's bytes, so no buffer has to be carried between calls.
pub async fn read_packet(s: &mut TcpStream, within: Duration) -> Result<(u8, Vec<u8>), String> {
    let read = async {
        let first = s.read_u8().await?;
        let mut len = 0usize;
        for i in 0..4 {
            let b = s.read_u8().await?;
            len |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
            if i == 3 {
                return Err(std::io::Error::other("malformed remaining length from broker"));
            }
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await?;
        Ok((first, body))
    };
    match timeout(within, read).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err(format!("no packet within {within:?}")),
    }
}

/// Connects with `c` and expects CONNACK code 0 (within `WAIT`); returns the stream and the
/// session-present flag.
pub async fn mqtt_connect(port: u16, c: Connect) -> Result<(TcpStream, bool), String> {
    let mut s = tcp(port).await?;
    send(&mut s, &c.encode()).await?;
    match read_packet(&mut s, WAIT).await? {
        (0x20, body) if body.len() == 2 && body[1] == 0 => Ok((s, body[0] & 1 == 1)),
        other => Err(format!("{}: expected CONNACK 0, got {other:?}", c.client_id)),
    }
}

/// Reads until the broker closes the connection (EOF or reset) and returns everything received
/// before; `Err` (with what was received) if it is still open after `within`.
pub async fn read_to_close(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return Err(got),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Splits a byte stream into whole packets (first byte, body); a truncated tail is returned as a
/// packet with first byte 0 and the leftover bytes, so that the caller sees it.
pub fn split_packets(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some((&first, rest)) = b.split_first() {
        let mut len = 0usize;
        let mut hdr = None;
        for (i, &byte) in rest.iter().take(4).enumerate() {
            len |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                hdr = Some(i + 1);
                break;
            }
        }
        match hdr {
            Some(h) if rest.len() >= h + len => {
                out.push((first, rest[h..h + len].to_vec()));
                b = &rest[h + len..];
            }
            _ => {
                out.push((0, b.to_vec()));
                break;
            }
        }
    }
    out
}

/// A small deterministic PRNG (xorshift64*), so that "random" garbage is the same on every run.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; zero is remapped, xorshift would stay at zero).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `n` pseudo-random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// What a [`Chatter`] observed.
#[derive(Debug)]
pub struct ChatterReport {
    /// Messages published (each one PUBLISH counted by the broker's `messages in`).
    pub sent: u64,
    /// Publish-to-receive time of each message, in order.
    pub latencies: Vec<Duration>,
}

impl ChatterReport {
    /// The `q`-quantile (0..=1) of the latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort_unstable();
        let i = ((v.len().saturating_sub(1)) as f64 * q).round() as usize;
        v.get(i).copied().unwrap_or_default()
    }

    /// The largest latency.
    pub fn max(&self) -> Duration {
        self.latencies.iter().copied().max().unwrap_or_default()
    }
}

/// A healthy publisher/subscriber pair exchanging numbered QoS 1 messages one at a time in a task,
/// until finished: every message must arrive, in order, exactly once, within `WAIT`.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    task: JoinHandle<ChatterReport>,
}

impl Chatter {
    /// Connects the pair (ids `<tag>-chat-pub`/`-sub`, topic `chatter/<tag>`) and starts exchanging.
    pub async fn start(port: u16, tag: &str) -> Chatter {
        let topic = format!("chatter/{tag}");
        let mut sub = client(port, &format!("{tag}-chat-sub")).await;
        sub.subscribe(&topic, qos(1)).await;
        let publ = client(port, &format!("{tag}-chat-pub")).await;
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(chat(publ, sub, topic, stop.clone()));
        Chatter { stop, task }
    }

    /// Stops the exchange after the message in progress and returns what was observed.
    pub async fn finish(self) -> ChatterReport {
        self.stop.store(true, Ordering::Relaxed);
        match timeout(2 * WAIT, self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("chatter task failed: {e}"),
            Err(_) => panic!("chatter did not stop within {:?}", 2 * WAIT),
        }
    }
}

async fn chat(mut publ: Client, mut sub: Client, topic: String, stop: Arc<AtomicBool>) -> ChatterReport {
    let mut latencies = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        publ.publish_nowait(&topic, qos(1), false, seq.to_be_bytes().to_vec()).await;
        let m = sub.recv().await;
        latencies.push(t.elapsed());
        assert_eq!(m.payload[..], seq.to_be_bytes(), "chatter: message {seq} out of order or lost");
        match publ.next_packet().await {
            rumqttc::Packet::PubAck(_) => {}
            other => panic!("chatter: expected PUBACK, got {other:?}"),
        }
        seq += 1;
        // A few hundred round trips a second: enough to see a stall, too few to load the broker.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    sub.expect_nothing_now();
    sub.disconnect().await;
    publ.disconnect().await;
    ChatterReport { sent: seq, latencies }
}

/// A fresh QoS 1 publisher/subscriber pair exchanges one message (one `messages in`), then leaves.
pub async fn healthy_roundtrip(port: u16, tag: &str) {
    let topic = format!("healthy/{tag}");
    let mut sub = client(port, &format!("{tag}-ok-sub")).await;
    sub.subscribe(&topic, qos(1)).await;
    let mut publ = client(port, &format!("{tag}-ok-pub")).await;
    publ.publish(&topic, qos(1), false, "still alive").await;
    let m = sub.recv().await;
    assert_eq!(&m.payload[..], b"still alive", "{tag}: healthy round trip");
    sub.disconnect().await;
    publ.disconnect().await;
}
