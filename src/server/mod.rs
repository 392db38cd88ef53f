//! The runtime glue of one core: binds its listeners, accepts connections, runs the cross-core loop,
//! the keep-alive sweeper and the per-tick wake-up task. Sockets are reached only through `crate::io`.

pub mod admit;
mod conn;
pub mod inbox;
pub mod outbox;
pub mod persist;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use rustls::ServerConfig;

use crate::auth::AuthFiles;
use crate::config::ListenerConfig;
use crate::core::{ConnCtl, ConnKey, Core, Settings};
use crate::io::{self, Listener};
use crate::stats::Stats;
use crate::xcore::{ConnLimits, Mesh, Signal};

/// Set once by the main thread on SIGINT/SIGTERM; every core then stops.
pub static SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Whether the broker is stopping.
fn shutting_down() -> bool {
    SHUTDOWN.load(Ordering::SeqCst)
}

/// How often keep-alive and connect timeouts are checked. Expiry is therefore detected up to this much
/// late, which the spec allows ("within one and a half times the keep alive period" is a lower bound).
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// A core and the thread-local helpers its tasks share.
pub struct CoreCell {
    core: RefCell<Core>,
    /// Wakes the tick task, which sends the cross-core wake-ups owed at the end of this loop tick.
    tick: Notify,
    tick_scheduled: Cell<bool>,
    /// Readers paused by a full ring or a full hold (pause policy) wait here; whoever frees either
    /// wakes them all.
    unblocked: Notify,
    /// This core's TLS configuration of each listener (`None` for plain ones), replaced on SIGHUP.
    tls: RefCell<Vec<Option<Arc<ServerConfig>>>>,
    /// Wakes the persistence log task: records were appended.
    log_wake: Notify,
    /// Quiet plain-TCP connections wait here for their socket to become readable, with no reading
    /// task and no pending read (`None` if the set could not be created: they then keep reading).
    idle: Option<io::IdleSet>,
    /// The reading side of each connection in `idle`, by token (see [`conn::park`]).
    parked: RefCell<slab::Slab<(u32, conn::Reader)>>,
    /// Generation of the next park, so that a token names one park of one connection.
    park_gen: Cell<u32>,
}

/// What a SIGHUP hands each core: the password and ACL files and its own TLS configurations.
pub struct Reload {
    pub auth: AuthFiles,
    pub tls: Vec<Option<Arc<ServerConfig>>>,
}

pub type CoreRef = Rc<CoreCell>;

impl CoreCell {
    fn borrow(&self) -> std::cell::Ref<'_, Core> {
        self.core.borrow()
    }
    fn borrow_mut(&self) -> std::cell::RefMut<'_, Core> {
        self.core.borrow_mut()
    }
}

/// What one core thread needs to start.
pub struct CoreSetup {
    pub id: usize,
    pub settings: Settings,
    pub mesh: Mesh,
    pub listeners: Vec<ListenerConfig>,
    /// `max_connections` counts, shared by every core.
    pub limits: Arc<ConnLimits>,
    /// Reports whether the listeners could be bound.
    pub ready: Sender<Result<(), String>>,
    /// Receives the core's statistics when it stops.
    pub done: Sender<(usize, Stats)>,
    /// This core's TLS configuration of each listener, in `listeners` order.
    pub tls: Vec<Option<Arc<ServerConfig>>>,
    /// New password, ACL and TLS files after a SIGHUP; the sweeper applies them.
    pub reload: Receiver<Reload>,
    /// Persistence: this core's log and what was recovered for it.
    pub store: Option<persist::CoreStore>,
}

/// Schedules the tick task if a cross-core wake-up is owed. The tick task runs after the tasks that are
/// ready now, so a whole tick's worth of messages costs one wake-up per destination core.
fn schedule_tick(core: &CoreRef) {
    if !core.tick_scheduled.get() && core.borrow().mesh.wake_pending() {
        core.tick_scheduled.set(true);
        core.tick.notify_one();
    }
}

/// End-of-batch chores of any task that borrowed the core: owe a tick, and start the tasks of
/// connections other cores handed over (whoever drained the ring found them).
fn after_batch(core: &CoreRef) {
    schedule_tick(core);
    if core.borrow().persist.as_ref().is_some_and(|p| p.has_output()) {
        core.log_wake.notify_one();
    }
    if core.borrow_mut().take_released() {
        core.unblocked.notify_waiters();
    }
    let handoffs = std::mem::take(&mut core.borrow_mut().handoffs);
    for h in handoffs {
        conn::serve_handoff(core.clone(), h);
    }
}

async fn tick_task(core: CoreRef) {
    loop {
        core.tick.notified().await;
        core.tick_scheduled.set(false);
        core.borrow_mut().mesh.wake_peers();
    }
}

/// Waits while this core has messages that did not fit a ring, or while the connection holds as many
/// PUBLISHes as it may for congested subscribers (backpressure on publishers).
async fn wait_unblocked(core: &CoreRef, key: ConnKey, ctl: &Rc<ConnCtl>) {
    let blocked = || {
        let c = core.borrow();
        (c.is_blocked() || c.hold_full(key, ctl)) && !ctl.is_closing()
    };
    while blocked() {
        let n = core.unblocked.notified();
        if !blocked() {
            break;
        }
        n.await;
    }
}

/// Starts a reading task again for each parked connection whose socket became readable, and a writer
/// task for each parked connection something was queued for.
async fn unpark_task(core: CoreRef) {
    let Some(idle) = core.idle.as_ref() else { return };
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let writers = core.borrow().writers();
    loop {
        tokio::select! {
            r = idle.wait(&mut readable) => {
                if let Err(e) = r {
                    // Not expected from a valid epoll descriptor; back off rather than spin.
                    eprintln!("coremq: core {}: waiting for idle connections failed: {e}", core.borrow().id);
                    io::sleep(Duration::from_millis(100)).await;
                }
            }
            () = writers.wanted(&mut writable) => {}
        }
        for token in writable.drain(..) {
            conn::start_writer(&core, token);
        }
        for token in readable.drain(..) {
            conn::unpark(&core, token);
        }
    }
}

/// Retries staged messages whenever a consumer signals room, then releases the paused readers.
async fn room_task(core: CoreRef, signals: Arc<[Signal]>, id: usize) {
    loop {
        signals[id].room.notified().await;
        {
            let mut c = core.borrow_mut();
            c.end_batch(Instant::now());
        }
        after_batch(&core);
        if !core.borrow().is_blocked() {
            core.unblocked.notify_waiters();
        }
    }
}

async fn sweeper(core: CoreRef, reload: Receiver<Reload>) {
    loop {
        io::sleep(SWEEP_INTERVAL).await;
        {
            let mut c = core.borrow_mut();
            while let Ok(r) = reload.try_recv() {
                c.reload_auth(r.auth);
                // New connections use the new certificates; established ones keep their sessions.
                *core.tls.borrow_mut() = r.tls;
            }
            c.sweep(wall_clock());
            c.end_batch(Instant::now());
        }
        after_batch(&core);
        if core.borrow_mut().take_trim_due() {
            crate::alloc::release_free_memory();
        }
    }
}

async fn accept_loop(
    core: CoreRef,
    listener: Rc<Listener>,
    index: usize,
    config: ListenerConfig,
    limits: Arc<ConnLimits>,
) {
    let identity_as_username = config.tls.as_ref().is_some_and(|t| t.use_identity_as_username);
    loop {
        match listener.accept().await {
            Ok((conn, _peer)) => {
                let permit = limits.acquire(index);
                let tls = core.tls.borrow().get(index).cloned().flatten();
                let transport = conn::Transport { tls, identity_as_username };
                io::spawn_local(conn::serve_new(
                    core.clone(),
                    conn,
                    config.allow_anonymous,
                    transport,
                    permit,
                ))
            }
            // Shutdown closed the listener.
            Err(_) if shutting_down() => return,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning; never exit.
                eprintln!("coremq: core {}: accept failed: {e}", core.borrow().id);
                io::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The core's main loop: drains the inbound rings, spawns handed-off connections, parks when idle, and
/// returns on shutdown.
async fn xcore_loop(core: CoreRef, signals: Arc<[Signal]>, id: usize) {
    loop {
        let n = {
            let mut c = core.borrow_mut();
            let n = c.drain_inbound(Instant::now());
            c.end_batch(Instant::now());
            n
        };
        after_batch(&core);
        if SHUTDOWN.load(Ordering::SeqCst) {
            return;
        }
        if n > 0 {
            // Let the sockets run between batches so a flood from other cores cannot starve them.
            tokio::task::yield_now().await;
            continue;
        }
        let wake = signals[id].wake.notified();
        // Paused (a session past its limits): nothing from other cores until it drains; end_batch
        // wakes this loop then. Otherwise park until a producer wakes it.
        let paused = core.borrow_mut().inbound_paused();
        if paused || core.borrow().mesh.park() {
            wake.await;
        }
        signals[id].parked.store(false, Ordering::SeqCst);
    }
}

/// How long shutdown waits for the persistence log to be written out.
const LOG_FLUSH: Duration = Duration::from_secs(10);

/// How long shutdown waits for v5 clients' DISCONNECT 0x8B to be written.
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(500);

/// Runs one core until shutdown. Called inside `io::run` on the core's own thread.
pub async fn run_core(setup: CoreSetup) {
    let CoreSetup { id, settings, mesh, listeners, limits, ready, done, tls, reload, store } = setup;
    let mut bound = Vec::new();
    for lc in &listeners {
        match Listener::bind(lc.bind) {
            Ok(l) => bound.push((l, lc.clone())),
            Err(e) => {
                let _ = ready.send(Err(format!("cannot listen on {}: {e}", lc.bind)));
                return;
            }
        }
    }
    let signals = mesh.signals().clone();
    let core: CoreRef = Rc::new(CoreCell {
        core: RefCell::new(Core::new(id, settings, mesh, wall_clock())),
        tick: Notify::new(),
        tick_scheduled: Cell::new(false),
        unblocked: Notify::new(),
        tls: RefCell::new(tls),
        log_wake: Notify::new(),
        idle: io::IdleSet::new()
            .map_err(|e| {
                eprintln!("coremq: core {id}: idle set unavailable, idle connections keep reading: {e}")
            })
            .ok(),
        parked: RefCell::new(slab::Slab::new()),
        park_gen: Cell::new(0),
    });
    if let Some(store) = store {
        let persist::CoreStore { file, path, len, sessions, retained, last_sid, fsync, fsync_interval } =
            store;
        {
            let mut c = core.borrow_mut();
            c.enable_persistence(fsync == crate::config::FsyncPolicy::Always, last_sid);
            c.restore(sessions, retained, Instant::now());
            if let Some(p) = &mut c.persist {
                // The file already holds this core's snapshot: compaction is measured from it.
                p.snapshot_len = len;
            }
            c.end_batch(Instant::now());
        }
        io::spawn_local(persist::log_task(core.clone(), file, path, len, fsync, fsync_interval));
    }
    let mut listening = Vec::new();
    for (index, (l, config)) in bound.into_iter().enumerate() {
        let l = Rc::new(l);
        listening.push(l.clone());
        io::spawn_local(accept_loop(core.clone(), l, index, config, limits.clone()));
    }
    io::spawn_local(sweeper(core.clone(), reload));
    io::spawn_local(tick_task(core.clone()));
    io::spawn_local(room_task(core.clone(), signals.clone(), id));
    io::spawn_local(unpark_task(core.clone()));
    let _ = ready.send(Ok(()));
    xcore_loop(core.clone(), signals, id).await;
    // New connections go nowhere from now on (and a broker restarted at once gets them all).
    for l in &listening {
        l.close();
    }
    let flushing = core.borrow_mut().close_all(Instant::now());
    // v5 clients were sent DISCONNECT 0x8B: give their writers a moment to flush it, then cut.
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    while !flushing.iter().all(|c| c.writer_finished()) && Instant::now() < deadline {
        io::sleep(Duration::from_millis(5)).await;
    }
    for c in &flushing {
        c.kick();
    }
    // What the log task has not written yet is written (and synced) before the thread ends.
    let deadline = Instant::now() + LOG_FLUSH;
    core.log_wake.notify_one();
    while !core.borrow().log_settled() && Instant::now() < deadline {
        core.log_wake.notify_one();
        io::sleep(Duration::from_millis(5)).await;
    }
    let stats = core.borrow().stats.clone();
    let _ = done.send((id, stats));
}

/// The present on both clocks: the runtime reads the clocks, the core is given the time.
pub fn wall_clock() -> crate::persist::Clock {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    crate::persist::Clock { instant: Instant::now(), unix_ms }
}
