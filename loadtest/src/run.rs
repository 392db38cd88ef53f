//! The swarm threads: each runs its share of publishers, subscribers and storm connections as
//! tasks on its own current_thread runtime. The main thread only steers (phases, progress) through
//! [`Ctx`] atomics, a watch channel and an event channel.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use coremq::protocol::{publish_head_len, publish_head_len_v5, Ack, Packet, ProtocolVersion, QoS};
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use tokio::task::LocalSet;

use crate::account::{Outcome, StreamTracker, MAX_TRACKED_SEQ};
use crate::cli::{Plan, PubSpec, SubSpec};
use crate::client::{after_read, packet_name, read_available, read_chunk, Conn};
use crate::stamp::{Stamp, STAMP_LEN};

/// Unacknowledged QoS 1/2 messages a publisher may have outstanding.
pub const WINDOW: u32 = 64;
/// Target size of one batched write of QoS 0 publishes.
const BATCH_BYTES: usize = 64 * 1024;
/// Send buffer of unthrottled publishers: a few batches, so backpressure reaches them quickly.
const PUB_SNDBUF: usize = 128 * 1024;
/// Most messages encoded into one write.
const BATCH_MAX: u64 = 256;
/// PINGREQ interval: half the keep-alive, so only runs longer than 30 s send any.
const PING_NS: u64 = 30_000_000_000;
/// How long after the end of the run stragglers are waited for.
pub const DRAIN: Duration = Duration::from_secs(2);
/// Connect + CONNACK (+ SUBACK) deadline, counted from the start of the run.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Storm handshakes in flight per thread: enough to saturate a broker's accept path without
/// overflowing its listen backlog, which would measure SYN retransmission timers instead.
const STORM_INFLIGHT: usize = 256;
/// Extra non-blocking reads a subscriber makes after each awaited one (16 × 64 KiB per turn).
const SUB_EXTRA_READS: usize = 15;
/// Largest latency the histograms hold: one hour in microseconds (larger values are clamped).
const HIST_MAX_US: u64 = 3_600_000_000;

/// What the main thread tells every task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and subscribing; publishers wait.
    Setup,
    /// Publish (times in [`Ctx`]).
    Go,
    /// Stop reading, disconnect, hand the figures back.
    Stop,
}

/// A connection's outcome, reported once per connection to the main thread.
#[derive(Debug)]
pub enum Event {
    /// A publisher connected (or could not).
    Pub(Result<(), String>),
    /// A subscriber connected and subscribed; `Ok(false)` if the SUBACK refused the filter.
    Sub(u32, Result<bool, String>),
    /// A storm connection: CONNECT-to-CONNACK nanoseconds and completion time, or the error.
    Storm(Result<(u64, u64), String>),
}

/// State shared by every thread: the plan, the clock base and the counters the main thread
/// watches. Counters are updated once per batch or per read, not per message.
pub struct Ctx {
    /// The run's plan.
    pub plan: Plan,
    /// Common time base: stamps and receive times are nanoseconds since this instant.
    pub base: Instant,
    /// Process id, for client ids.
    pub pid: u32,
    /// Run tag carried in every stamp.
    pub tag: u16,
    /// Per publisher: messages sent during the measured window.
    pub sent: Vec<AtomicU64>,
    /// Messages sent, warmup included (progress line).
    pub sent_all: AtomicU64,
    /// Messages received, warmup and duplicates included (progress line).
    pub recv_all: AtomicU64,
    /// First deliveries of measured messages (drain check).
    pub recv_new: AtomicU64,
    /// Deliveries without a stamp of this run.
    pub foreign: AtomicU64,
    /// Publishers that finished sending and collecting their acks.
    pub pubs_done: AtomicU32,
    /// When publishing starts, ns since `base` (`u64::MAX` until [`Phase::Go`]).
    pub start_ns: AtomicU64,
    /// When measuring starts.
    pub measure_ns: AtomicU64,
    /// When publishing ends.
    pub end_ns: AtomicU64,
    /// Every connection attempt must be done by then.
    pub connect_deadline: Instant,
}

impl Ctx {
    /// A context for `plan`, its clock starting now.
    pub fn new(plan: Plan) -> Ctx {
        let base = Instant::now();
        let pid = std::process::id();
        // Pid and wall-clock nanoseconds: differs between back-to-back runs even if a pid repeats.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = ((pid ^ nanos ^ (nanos >> 16)) & 0xffff) as u16;
        let sent = (0..plan.publishers.len()).map(|_| AtomicU64::new(0)).collect();
        Ctx {
            plan,
            base,
            pid,
            tag,
            sent,
            sent_all: AtomicU64::new(0),
            recv_all: AtomicU64::new(0),
            recv_new: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            pubs_done: AtomicU32::new(0),
            start_ns: AtomicU64::new(u64::MAX),
            measure_ns: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(u64::MAX),
            connect_deadline: base + CONNECT_TIMEOUT,
        }
    }

    /// Nanoseconds since the base.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `ns` after the base (far in the future if that overflows).
    pub fn instant(&self, ns: u64) -> tokio::time::Instant {
        let i = self
            .base
            .checked_add(Duration::from_nanos(ns))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        tokio::time::Instant::from_std(i)
    }

    /// Time left until the connect deadline.
    fn connect_left(&self) -> Duration {
        self.connect_deadline.saturating_duration_since(Instant::now())
    }
}

/// The connections one thread runs.
#[derive(Default)]
pub struct Work {
    /// Publishers.
    pub pubs: Vec<PubSpec>,
    /// Subscribers.
    pub subs: Vec<SubSpec>,
    /// Storm connection numbers.
    pub storm: Vec<u32>,
}

/// What a thread hands back.
pub struct ThreadOut {
    /// Latency of first deliveries of measured messages, µs.
    pub hist: Histogram<u64>,
    /// Per subscriber id: one tracker per publisher of its range.
    pub subs: Vec<(u32, Vec<StreamTracker>)>,
    /// Connections that broke during the run.
    pub errors: Vec<String>,
}

/// An empty latency histogram with the swarm's bounds.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (low >= 1, high >= 2 * low, 3 significant figures): cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("constant histogram bounds are valid")
}

impl ThreadOut {
    fn new() -> ThreadOut {
        ThreadOut { hist: new_histogram(), subs: Vec::new(), errors: Vec::new() }
    }
}

/// Body of swarm thread `idx`: pins it, runs `work` to completion on a current_thread runtime.
pub fn thread_main(
    idx: usize,
    work: Work,
    ctx: Arc<Ctx>,
    events: mpsc::Sender<Event>,
    phase: watch::Receiver<Phase>,
) -> ThreadOut {
    let mut out = ThreadOut::new();
    if !ctx.plan.cpus.is_empty() {
        if let Some(&cpu) = ctx.plan.cpus.get(idx % ctx.plan.cpus.len()) {
            if let Err(e) = coremq::cpus::pin_current_thread(cpu) {
                eprintln!("coremq-swarm: thread {idx}: cannot pin to cpu {cpu}: {e}");
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            out.errors.push(format!("thread {idx}: cannot start runtime: {e}"));
            return out;
        }
    };
    let out = Rc::new(RefCell::new(out));
    let local = LocalSet::new();
    local.block_on(&rt, async {
        let mut tasks = Vec::new();
        for s in work.subs {
            tasks.push(tokio::task::spawn_local(subscriber(
                s,
                ctx.clone(),
                events.clone(),
                phase.clone(),
                out.clone(),
            )));
        }
        for p in work.pubs {
            tasks.push(tokio::task::spawn_local(publisher(
                p,
                ctx.clone(),
                events.clone(),
                phase.clone(),
                out.clone(),
            )));
        }
        let sem = Rc::new(Semaphore::new(STORM_INFLIGHT));
        for n in work.storm {
            tasks.push(tokio::task::spawn_local(storm_conn(
                n,
                ctx.clone(),
                events.clone(),
                phase.clone(),
                sem.clone(),
            )));
        }
        for t in tasks {
            if let Err(e) = t.await {
                out.borrow_mut().errors.push(format!("task failed: {e}"));
            }
        }
    });
    out.replace(ThreadOut::new())
}

/// Waits for the end of [`Phase::Setup`]; `true` if it is [`Phase::Go`].
async fn wait_go(phase: &mut watch::Receiver<Phase>) -> bool {
    match phase.wait_for(|p| *p != Phase::Setup).await {
        Ok(p) => *p == Phase::Go,
        Err(_) => false,
    }
}

/// Keeps an idle connection alive (PINGREQ every 30 s, replies discarded) until [`Phase::Stop`].
async fn idle_until_stop(
    conn: &mut Conn,
    ctx: &Ctx,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), String> {
    let mut next_ping = ctx.now_ns().saturating_add(PING_NS);
    loop {
        if *phase.borrow_and_update() == Phase::Stop {
            return Ok(());
        }
        tokio::select! {
            r = read_chunk(&mut conn.stream, &mut conn.rbuf) => {
                after_read(r)?;
                while conn.next_packet()?.is_some() {}
            }
            c = phase.changed() => {
                if c.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(ctx.instant(next_ping)) => {
                conn.queue(&Packet::PingReq);
                conn.flush().await.map_err(|e| crate::client::io_text(&e))?;
                next_ping = next_ping.saturating_add(PING_NS);
            }
        }
    }
}

/// Packet ids of unacknowledged QoS 1/2 publishes.
struct Inflight {
    used: Vec<u64>,
    count: u32,
    next: u16,
}

impl Inflight {
    fn new() -> Inflight {
        Inflight { used: vec![0; 65536 / 64], count: 0, next: 0 }
    }

    /// A free packet id; ids are handed out in sequence, skipping 0 and any still in flight.
    fn alloc(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next = self.next.wrapping_add(1).max(1);
            let id = self.next;
            if let Some(w) = self.used.get_mut(usize::from(id / 64)) {
                let bit = 1u64 << (id % 64);
                if *w & bit == 0 {
                    *w |= bit;
                    self.count += 1;
                    return Some(id);
                }
            }
        }
        None
    }

    /// Frees `id`; an ack for an id not in flight is ignored.
    fn release(&mut self, id: u16) {
        if let Some(w) = self.used.get_mut(usize::from(id / 64)) {
            let bit = 1u64 << (id % 64);
            if *w & bit != 0 {
                *w &= !bit;
                self.count -= 1;
            }
        }
    }
}

/// Handles everything a publisher may receive: acks, PUBREC (answered with PUBREL), PINGRESP.
fn publisher_input(conn: &mut Conn, inflight: &mut Inflight) -> Result<(), String> {
    while let Some(p) = conn.next_packet()? {
        match p {
            Packet::PubAck(a) | Packet::PubComp(a) => inflight.release(a.pkid),
            // A v5 PUBREC refusing the message ends its flow: no PUBREL (MQTT-4.3.3).
            Packet::PubRec(a) if a.reason >= 0x80 => inflight.release(a.pkid),
            Packet::PubRec(a) => conn.queue(&Packet::PubRel(Ack::ok(a.pkid))),
            Packet::PingResp | Packet::Publish(_) => {}
            other => return Err(format!("unexpected {} from broker", packet_name(&other))),
        }
    }
    Ok(())
}

async fn publisher(
    spec: PubSpec,
    ctx: Arc<Ctx>,
    events: mpsc::Sender<Event>,
    mut phase: watch::Receiver<Phase>,
    out: Rc<RefCell<ThreadOut>>,
) {
    let client_id = format!("swarm-{}-pub-{}", ctx.pid, spec.id);
    let mut conn = match Conn::connect(
        &ctx.plan.addr,
        ctx.plan.tls.as_ref(),
        ctx.plan.version,
        &client_id,
        false,
        ctx.connect_left(),
    )
    .await
    {
        Ok(c) => {
            let _ = events.send(Event::Pub(Ok(())));
            c
        }
        Err(e) => {
            let _ = events.send(Event::Pub(Err(format!("publisher {}: {e}", spec.id))));
            return;
        }
    };
    if ctx.plan.rate == 0.0 {
        conn.limit_send_buffer(PUB_SNDBUF);
    }
    if !wait_go(&mut phase).await {
        conn.close().await;
        return;
    }
    let r = publish_loop(&mut conn, &spec, &ctx, &mut phase).await;
    ctx.pubs_done.fetch_add(1, Relaxed);
    let r = match r {
        Ok(()) => idle_until_stop(&mut conn, &ctx, &mut phase).await,
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => conn.close().await,
        Err(e) => out.borrow_mut().errors.push(format!("publisher {}: {e}", spec.id)),
    }
}

/// Publishes from [`Ctx::start_ns`] to [`Ctx::end_ns`], then waits for outstanding acks until
/// they are all in or the run is stopped.
async fn publish_loop(
    conn: &mut Conn,
    spec: &PubSpec,
    ctx: &Ctx,
    phase: &mut watch::Receiver<Phase>,
) -> Result<(), String> {
    let plan = &ctx.plan;
    let qos = plan.qos;
    let start = ctx.start_ns.load(Relaxed);
    let measure = ctx.measure_ns.load(Relaxed);
    let end = ctx.end_ns.load(Relaxed);
    // A write still blocked this long after the end means the broker stopped reading.
    let write_deadline = ctx.instant(end).checked_add(DRAIN).unwrap_or_else(|| ctx.instant(end));
    let filler = vec![0x5a_u8; plan.payload.saturating_sub(STAMP_LEN)];
    let msg_len = match plan.version {
        ProtocolVersion::V5 => publish_head_len_v5(spec.topic.len(), qos, 0, plan.payload),
        _ => publish_head_len(spec.topic.len(), qos, plan.payload),
    } + plan.payload;
    let batch_max = ((BATCH_BYTES / msg_len.max(1)) as u64).clamp(1, BATCH_MAX);
    let window = if qos == QoS::AtMostOnce { u64::MAX } else { u64::from(WINDOW) };
    let sent_slot = ctx.sent.get(spec.id as usize);
    let mut inflight = Inflight::new();
    let mut seq: u32 = 0;
    let mut next_ping = start.saturating_add(PING_NS);

    loop {
        let now = ctx.now_ns();
        if now >= end || seq >= MAX_TRACKED_SEQ {
            break;
        }
        if now >= next_ping {
            conn.queue(&Packet::PingReq);
            next_ping = now.saturating_add(PING_NS);
        }
        let room = window.saturating_sub(u64::from(inflight.count));
        let due = if plan.rate > 0.0 {
            // Message k is due at start + k/rate: a publisher that fell behind catches up in
            // batches instead of silently lowering the rate.
            let elapsed = now.saturating_sub(start) as f64 / 1e9;
            ((elapsed * plan.rate).floor() as u64).saturating_add(1).saturating_sub(u64::from(seq))
        } else {
            batch_max
        };
        let n = due.min(room).min(batch_max).min(u64::from(MAX_TRACKED_SEQ - seq));
        if n > 0 {
            let stamp_ns = ctx.now_ns();
            let mut written = 0u64;
            for _ in 0..n {
                let pkid = if qos == QoS::AtMostOnce {
                    0
                } else {
                    match inflight.alloc() {
                        Some(id) => id,
                        None => break,
                    }
                };
                conn.queue_publish_head(&spec.topic, qos, pkid, plan.payload);
                let stamp = Stamp { tag: ctx.tag, publisher: spec.id as u16, seq, sent_ns: stamp_ns };
                conn.wbuf.extend_from_slice(&stamp.to_bytes());
                conn.wbuf.extend_from_slice(&filler);
                seq += 1;
                written += 1;
            }
            // Counted before the write: if it fails part of the batch may still have reached the
            // broker, and a receiver must never see more than its publisher claims to have sent.
            ctx.sent_all.fetch_add(written, Relaxed);
            if stamp_ns >= measure {
                if let Some(slot) = sent_slot {
                    slot.fetch_add(written, Relaxed);
                }
            }
            flush_by(conn, write_deadline).await?;
            if qos == QoS::AtMostOnce && plan.rate == 0.0 {
                // Nothing else makes this loop wait while the socket takes data: let the thread's
                // other clients (subscribers above all) run between batches.
                tokio::task::yield_now().await;
            }
            continue;
        }
        flush_by(conn, write_deadline).await?;
        // Nothing to send now: wait for acks, the next due message, a ping or the end.
        let mut wake = end.min(next_ping);
        if plan.rate > 0.0 && room > 0 {
            let due_at = start.saturating_add((f64::from(seq) * 1e9 / plan.rate) as u64);
            wake = wake.min(due_at);
        }
        tokio::select! {
            r = read_chunk(&mut conn.stream, &mut conn.rbuf) => {
                after_read(r)?;
                publisher_input(conn, &mut inflight)?;
            }
            _ = tokio::time::sleep_until(ctx.instant(wake)) => {}
        }
    }
    // Collect the acks of what is still in flight; the main thread stops the run at the latest
    // when the drain period is over.
    while inflight.count > 0 {
        flush_by(conn, write_deadline).await?;
        if *phase.borrow_and_update() == Phase::Stop {
            break;
        }
        tokio::select! {
            r = read_chunk(&mut conn.stream, &mut conn.rbuf) => {
                after_read(r)?;
                publisher_input(conn, &mut inflight)?;
            }
            c = phase.changed() => {
                if c.is_err() {
                    break;
                }
            }
        }
    }
    flush_by(conn, write_deadline).await
}

/// Flushes the write buffer, failing if the broker has not taken it by `deadline`.
async fn flush_by(conn: &mut Conn, deadline: tokio::time::Instant) -> Result<(), String> {
    match tokio::time::timeout_at(deadline, conn.flush()).await {
        Ok(r) => r.map_err(|e| crate::client::io_text(&e)),
        Err(_) => Err("broker stopped reading (write blocked past the end of the run)".to_string()),
    }
}

async fn subscriber(
    spec: SubSpec,
    ctx: Arc<Ctx>,
    events: mpsc::Sender<Event>,
    mut phase: watch::Receiver<Phase>,
    out: Rc<RefCell<ThreadOut>>,
) {
    let client_id = format!("swarm-{}-sub-{}", ctx.pid, spec.id);
    let mut conn = match Conn::connect(
        &ctx.plan.addr,
        ctx.plan.tls.as_ref(),
        ctx.plan.version,
        &client_id,
        ctx.plan.persistent,
        ctx.connect_left(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            let _ = events.send(Event::Sub(spec.id, Err(format!("subscriber {}: {e}", spec.id))));
            return;
        }
    };
    match conn.subscribe(&spec.filter, ctx.plan.qos, ctx.connect_left().max(Duration::from_secs(1))).await {
        Ok(granted) => {
            let _ = events.send(Event::Sub(spec.id, Ok(granted)));
        }
        Err(e) => {
            let _ = events.send(Event::Sub(spec.id, Err(format!("subscriber {}: {e}", spec.id))));
            return;
        }
    }
    let (lo, hi) = spec.pubs;
    let mut trackers = vec![StreamTracker::new(); hi.saturating_sub(lo) as usize];
    let mut next_ping = ctx.now_ns().saturating_add(PING_NS);
    let r: Result<(), String> = async {
        loop {
            if *phase.borrow_and_update() == Phase::Stop {
                return Ok(());
            }
            tokio::select! {
                r = read_chunk(&mut conn.stream, &mut conn.rbuf) => {
                    after_read(r)?;
                    subscriber_input(&mut conn, &mut trackers, lo, &ctx, &out, ctx.now_ns())?;
                    // Keep reading while the socket has data, up to a budget: the subscriber is the
                    // measuring side and shares its thread with publishers that never wait, so it
                    // takes a larger turn than one 64 KiB read.
                    for _ in 0..SUB_EXTRA_READS {
                        match read_available(&mut conn.stream, &mut conn.rbuf).await {
                            Ok(None) => break,
                            Ok(Some(n)) => after_read(Ok(n))?,
                            Err(e) => after_read(Err(e))?,
                        }
                        subscriber_input(&mut conn, &mut trackers, lo, &ctx, &out, ctx.now_ns())?;
                    }
                    conn.flush().await.map_err(|e| crate::client::io_text(&e))?;
                }
                c = phase.changed() => {
                    if c.is_err() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep_until(ctx.instant(next_ping)) => {
                    conn.queue(&Packet::PingReq);
                    conn.flush().await.map_err(|e| crate::client::io_text(&e))?;
                    next_ping = next_ping.saturating_add(PING_NS);
                }
            }
        }
    }
    .await;
    out.borrow_mut().subs.push((spec.id, trackers));
    match r {
        Ok(()) => conn.close().await,
        Err(e) => out.borrow_mut().errors.push(format!("subscriber {}: {e}", spec.id)),
    }
}

/// Accounts for every packet in the read buffer, queueing the acks QoS 1/2 need. `now` is the
/// receive time of the whole read.
fn subscriber_input(
    conn: &mut Conn,
    trackers: &mut [StreamTracker],
    lo: u32,
    ctx: &Ctx,
    out: &RefCell<ThreadOut>,
    now: u64,
) -> Result<(), String> {
    let measure = ctx.measure_ns.load(Relaxed);
    let mut out = out.borrow_mut();
    let (mut all, mut new, mut foreign) = (0u64, 0u64, 0u64);
    while let Some(p) = conn.next_packet()? {
        let p = match p {
            Packet::Publish(p) => p,
            Packet::PubRel(a) => {
                conn.queue(&Packet::PubComp(Ack::ok(a.pkid)));
                continue;
            }
            _ => continue,
        };
        all += 1;
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => conn.queue(&Packet::PubAck(Ack::ok(p.pkid))),
            QoS::ExactlyOnce => conn.queue(&Packet::PubRec(Ack::ok(p.pkid))),
        }
        let Some(stamp) = Stamp::parse(&p.payload) else {
            foreign += 1;
            continue;
        };
        if stamp.tag != ctx.tag {
            foreign += 1;
            continue;
        }
        if stamp.sent_ns < measure {
            continue; // warmup
        }
        let Some(t) = u32::from(stamp.publisher).checked_sub(lo).and_then(|i| trackers.get_mut(i as usize))
        else {
            foreign += 1;
            continue;
        };
        match t.record(stamp.seq) {
            Outcome::New { .. } => {
                new += 1;
                out.hist.saturating_record(now.saturating_sub(stamp.sent_ns) / 1000);
            }
            Outcome::Duplicate => {}
            Outcome::Untrackable => foreign += 1,
        }
    }
    ctx.recv_all.fetch_add(all, Relaxed);
    ctx.recv_new.fetch_add(new, Relaxed);
    if foreign > 0 {
        ctx.foreign.fetch_add(foreign, Relaxed);
    }
    Ok(())
}

async fn storm_conn(
    n: u32,
    ctx: Arc<Ctx>,
    events: mpsc::Sender<Event>,
    mut phase: watch::Receiver<Phase>,
    sem: Rc<Semaphore>,
) {
    let client_id = format!("swarm-{}-storm-{n}", ctx.pid);
    let permit = sem.acquire().await;
    let t0 = ctx.now_ns();
    let r = Conn::connect(
        &ctx.plan.addr,
        ctx.plan.tls.as_ref(),
        ctx.plan.version,
        &client_id,
        false,
        ctx.connect_left(),
    )
    .await;
    let t1 = ctx.now_ns();
    drop(permit);
    match r {
        Ok(mut conn) => {
            let _ = events.send(Event::Storm(Ok((t1.saturating_sub(t0), t1))));
            if idle_until_stop(&mut conn, &ctx, &mut phase).await.is_ok() {
                conn.close().await;
            }
        }
        Err(e) => {
            let _ = events.send(Event::Storm(Err(format!("connection {n}: {e}"))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_ids_skip_zero_and_busy_ids() {
        let mut f = Inflight::new();
        assert_eq!(f.alloc(), Some(1));
        assert_eq!(f.alloc(), Some(2));
        f.release(1);
        f.release(1); // second ack for the same id is ignored
        assert_eq!(f.count, 1);
        f.next = u16::MAX - 1;
        assert_eq!(f.alloc(), Some(u16::MAX));
        // Wraps past 0 and past 2, which is still in flight.
        assert_eq!(f.alloc(), Some(1));
        assert_eq!(f.alloc(), Some(3));
        assert_eq!(f.count, 4);
    }
}
