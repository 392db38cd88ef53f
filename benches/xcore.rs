//! The cross-core mesh: message rate through one SPSC ring between two threads, for producer batches of
//! 1, 64 and 1024 messages per loop tick, and the single-thread cost of a stage/flush/drain round trip.
//!
//! A producer tick is what the runtime does: stage the batch, `flush` it into the ring (retrying while the
//! ring is full, where the runtime would stop reading its sockets), then `wake_peers`. The consumer drains
//! and drops what it took, like a core handling its inbound messages, so the cost of freeing each message
//! on the other thread is included.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coremq::config::DEFAULT_RING_CAPACITY as RING_CAPACITY;
use coremq::protocol::{QoS, Utf8Bytes};
use coremq::session::Message;
use coremq::xcore::{build_mesh, Control, CoreId, Data, Mesh, XMsg};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

// The broker runs on mimalloc (src/main.rs): interest messages allocate on one core and free on another.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCHES: [usize; 3] = [1, 64, 1024];

/// What each benchmark sends.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A routed PUBLISH: the topic and payload are shared `Bytes`, so a message costs two reference counts.
    Publish,
    /// A subscription interest update: one boxed filter string allocated per message.
    Interest,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Publish => "publish",
            Kind::Interest => "interest",
        }
    }
}

/// Builds the messages of one batch: the shared parts are cloned, the rest made per message.
struct Source {
    topic: Utf8Bytes,
    payload: Bytes,
}

impl Source {
    fn new() -> Source {
        Source { topic: Utf8Bytes::from_static("site/17/dev/42/temp"), payload: Bytes::from(vec![0xa5; 64]) }
    }

    fn msg(&self, kind: Kind, received: Instant) -> XMsg {
        match kind {
            Kind::Publish => XMsg::Data(Data::Publish(Message {
                topic: self.topic.clone(),
                payload: self.payload.clone(),
                qos: QoS::AtMostOnce,
                retain: false,
                received,
                props: None,
            })),
            Kind::Interest => XMsg::Control(Control::Interest {
                core: CoreId::new(0),
                filter: "site/17/dev/+/temp".into(),
                add: true,
            }),
        }
    }
}

/// Busy-waits briefly, then yields the CPU: with two shared cores the peer thread may be waiting for this
/// very CPU, and pure spinning would then advance only once per scheduler time slice. (The runtime itself
/// sleeps on `room` / `wake` instead.)
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    const SPINS: u32 = 64;

    fn wait(&mut self) {
        if self.0 < Self::SPINS {
            self.0 += 1;
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }
}

/// One producer tick: stage `n` messages for core `dst`, push them all, wake.
fn tick(mesh: &mut Mesh, dst: usize, src: &Source, kind: Kind, n: usize) {
    let received = Instant::now();
    for _ in 0..n {
        mesh.stage(CoreId::new(dst), src.msg(kind, received));
    }
    // A full ring keeps the rest staged; the runtime would stop reading sockets and wait for `room`,
    // here the producer simply retries until the consumer made space.
    let mut backoff = Backoff::default();
    while !mesh.flush() {
        backoff.wait();
    }
    mesh.wake_peers();
}

/// State shared by the producer (the bench thread) and the consumer thread.
#[derive(Default)]
struct Shared {
    /// Messages the consumer has drained and dropped, ever.
    consumed: AtomicU64,
    /// A measurement is running: the consumer spins instead of parking.
    active: AtomicBool,
    stop: AtomicBool,
}

/// Stops the consumer when the bench thread leaves the scope, even by a panic: otherwise the scope would
/// wait forever for a consumer that never sees `stop`.
struct StopOnDrop<'a>(&'a Shared, thread::Thread);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
        self.1.unpark();
    }
}

fn consumer(mut mesh: Mesh, shared: &Shared) {
    let mut out = Vec::with_capacity(RING_CAPACITY);
    let mut backoff = Backoff::default();
    while !shared.stop.load(Ordering::Acquire) {
        if !shared.active.load(Ordering::Acquire) {
            // Between measurements this thread must not burn the core criterion analyses on; a timeout
            // makes a lost unpark harmless.
            thread::park_timeout(Duration::from_millis(10));
            continue;
        }
        let n = mesh.drain(usize::MAX, &mut out);
        if n == 0 {
            backoff.wait();
            continue;
        }
        backoff = Backoff::default();
        out.clear();
        shared.consumed.fetch_add(n as u64, Ordering::Release);
    }
}

fn bench_two_threads(c: &mut Criterion) {
    let mut meshes = build_mesh(2, RING_CAPACITY);
    let (Some(rx), Some(mut tx)) = (meshes.pop(), meshes.pop()) else {
        panic!("build_mesh(2) returns two meshes");
    };
    let shared = Shared::default();
    let src = Source::new();
    let mut group = c.benchmark_group("xcore/two_threads");

    thread::scope(|s| {
        let shared = &shared;
        let consumer_thread = s.spawn(move || consumer(rx, shared)).thread().clone();
        let _stop = StopOnDrop(shared, consumer_thread.clone());
        for kind in [Kind::Publish, Kind::Interest] {
            for batch in BATCHES {
                group.throughput(Throughput::Elements(1));
                group.bench_function(BenchmarkId::new(kind.name(), batch), |b| {
                    b.iter_custom(|iters| {
                        let target = shared.consumed.load(Ordering::Acquire) + iters;
                        shared.active.store(true, Ordering::Release);
                        consumer_thread.unpark();
                        let start = Instant::now();
                        let mut left = iters;
                        while left > 0 {
                            let n = left.min(batch as u64);
                            tick(&mut tx, 1, &src, kind, n as usize);
                            left -= n;
                        }
                        let mut backoff = Backoff::default();
                        while shared.consumed.load(Ordering::Acquire) < target {
                            backoff.wait();
                        }
                        let elapsed = start.elapsed();
                        shared.active.store(false, Ordering::Release);
                        elapsed
                    });
                });
            }
        }
    });
    group.finish();
}

fn bench_round_trip(c: &mut Criterion) {
    let mut meshes = build_mesh(2, RING_CAPACITY);
    let (Some(mut rx), Some(mut tx)) = (meshes.pop(), meshes.pop()) else {
        panic!("build_mesh(2) returns two meshes");
    };
    let src = Source::new();
    let mut out = Vec::with_capacity(RING_CAPACITY);
    let mut group = c.benchmark_group("xcore/one_thread_round_trip");
    for kind in [Kind::Publish, Kind::Interest] {
        for batch in BATCHES {
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(kind.name(), batch), |b| {
                b.iter(|| {
                    tick(&mut tx, 1, &src, kind, batch);
                    let n = rx.drain(usize::MAX, &mut out);
                    out.clear();
                    black_box(n)
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_two_threads, bench_round_trip);
criterion_main!(benches);
