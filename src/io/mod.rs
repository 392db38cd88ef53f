//! The socket interface: a narrow, owned-buffer API over two interchangeable single-threaded runtimes.
//!
//! Everything the broker needs from a runtime (start it, spawn tasks, sleep, listen, read and write
//! TCP) goes through this module, so nothing above it names tokio-uring or `tokio::net`. The API is
//! shaped after io_uring: buffers are handed over by value and come back with the result, because
//! the kernel owns them while an operation is in flight. The epoll backend follows the same shape
//! so that callers never know which backend runs.
//!
//! The backend is chosen once per process (see [`probe_uring`]); each core thread then calls
//! [`run`] with it. Types from different backends never meet: a [`Conn`] only crosses threads as a
//! plain `std::net::TcpStream` ([`Conn::into_std`] / [`Conn::from_std`]).

mod epoll;
mod idle;
mod probe;
mod uring;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

pub use idle::IdleSet;
pub use probe::probe_uring;

/// Most iovecs handed to one `writev` (Linux `IOV_MAX`); longer lists are written in several calls.
pub const MAX_IOVECS: usize = 1024;

/// Listen backlog of every [`Listener`].
const BACKLOG: i32 = 1024;

/// Spare capacity added by [`Conn::read`] when the caller passes a full buffer: a read into zero
/// bytes would return `Ok(0)`, which is indistinguishable from EOF.
const MIN_READ_SPARE: usize = 4096;

/// Which runtime drives this thread's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// tokio-uring: io_uring submissions, readiness of the ring itself watched by tokio's epoll.
    Uring,
    /// Plain tokio `current_thread` runtime: readiness via epoll, then non-blocking syscalls.
    Epoll,
}

thread_local! {
    /// The backend of the runtime running on this thread, set for the duration of [`run`].
    static CURRENT: Cell<Option<Backend>> = const { Cell::new(None) };
}

/// The backend of the runtime running on the calling thread, or `None` outside [`run`].
pub fn current_backend() -> Option<Backend> {
    CURRENT.with(Cell::get)
}

/// The current backend, or an error naming `what` when called outside [`run`].
fn require_backend(what: &str) -> io::Result<Backend> {
    current_backend().ok_or_else(|| io::Error::other(format!("{what} called outside coremq::io::run")))
}

/// Clears [`CURRENT`] when [`run`] ends, also when the root future panics.
struct CurrentGuard;

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(None));
    }
}

/// Runs `fut` to completion as the root task of a new single-threaded runtime of `backend` on the
/// calling thread, and returns its output.
///
/// Uring: a tokio-uring runtime whose ring has `COOP_TASKRUN` and `SINGLE_ISSUER` (when the kernel
/// knows them; never `DEFER_TASKRUN`, which hangs tokio-uring). Epoll: a tokio `current_thread`
/// runtime with a `LocalSet`. In both, [`spawn_local`], [`sleep`], `tokio::sync` and `tokio::time`
/// work. Failing to build the runtime (io_uring unavailable, out of memory, a `run` already active
/// on this thread) is returned as an error, never a panic. Tasks still pending when `fut` finishes
/// are dropped with the runtime.
pub fn run<F: Future>(backend: Backend, fut: F) -> io::Result<F::Output> {
    if let Some(active) = current_backend() {
        return Err(io::Error::other(format!(
            "coremq::io::run called on a thread that already runs a {active:?} runtime"
        )));
    }
    CURRENT.with(|c| c.set(Some(backend)));
    let _guard = CurrentGuard;
    match backend {
        Backend::Uring => uring::run(fut),
        Backend::Epoll => epoll::run(fut),
    }
}

/// Spawns a `!Send` task on the current thread's runtime (whichever backend runs). The task is
/// detached: it runs until it finishes or the runtime is dropped.
///
/// # Panics
/// When called outside [`run`] (a programming error, not something input can cause).
pub fn spawn_local<F: Future<Output = ()> + 'static>(fut: F) {
    // Both backends run their root future inside a tokio LocalSet, so tokio's spawn_local serves both.
    drop(tokio::task::spawn_local(fut));
}

/// Sleeps for `d`. Both backends are tokio runtimes with the time driver enabled, so tokio's timer
/// serves both.
pub async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Creates a listening TCP socket with `SO_REUSEADDR` and `SO_REUSEPORT` set before `bind`, so that
/// every core can bind its own listener on the same address and the kernel spreads connections.
fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// How long [`claim_address`] waits for a listener that holds the address without holding its claim:
/// a broker killed a moment ago (below).
const RELEASE_WAIT: Duration = Duration::from_millis(500);

/// The claim of one listen address by this process; the address is free for other coremq processes
/// again once it is dropped (or the process exits).
pub struct AddressClaim {
    /// The abstract Unix socket named after the address; `None` for port 0, or where the kernel would
    /// not make one (the probe alone then guards the address).
    _lock: Option<std::os::unix::net::UnixDatagram>,
}

/// Claims `addr` for this process. Call it on the main thread before any core binds its [`Listener`],
/// and keep the claim for as long as the process serves the address.
///
/// Why: `SO_REUSEPORT`, which lets the cores of one broker share the address, also lets any other
/// process of the same user bind it. A second broker started on the address would join the first one's
/// group silently, and the kernel would spread clients over two brokers that share no session and no
/// subscription. Fails with the same `AddrInUse` error as a port taken by any other program when
///
/// - another coremq holds the address's claim: an abstract Unix socket named after the address, which
///   the kernel releases when its process exits, and which, like the port, belongs to the network
///   namespace. It closes the race of two brokers started at the same instant, which the probe below
///   cannot (both would probe before either listens);
/// - a socket already listens there (another program, an older coremq): the probe binds the address
///   with `SO_REUSEADDR` but without `SO_REUSEPORT`, which a listening socket refuses (a `SO_REUSEPORT`
///   group too), while connections left in TIME_WAIT by a previous broker do not. The probe is closed at
///   once and never listens; the cores bind afterwards. When nobody holds the claim, a listener in the
///   way may belong to a coremq that exited a moment ago: on io_uring its listening socket outlives the
///   process by a few milliseconds (a pending accept holds it until the kernel tears the ring down), so
///   the probe is retried for up to [`RELEASE_WAIT`] before it is believed.
///
/// Port 0 claims nothing: each bind to it gets a port of its own.
pub fn claim_address(addr: SocketAddr) -> io::Result<AddressClaim> {
    use std::os::linux::net::SocketAddrExt;
    if addr.port() == 0 {
        return Ok(AddressClaim { _lock: None });
    }
    let name = std::os::unix::net::SocketAddr::from_abstract_name(format!("coremq-listen {addr}"))?;
    let lock = match std::os::unix::net::UnixDatagram::bind_addr(&name) {
        Ok(s) => Some(s),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
        // Abstract sockets exist on every Linux, but a sandbox may refuse Unix sockets; the probe still
        // refuses a broker that is already listening, and only the simultaneous start stays unguarded.
        Err(_) => None,
    };
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    loop {
        match probe_bind(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
            Ok(()) => return Ok(AddressClaim { _lock: lock }),
        }
    }
}

/// Takes an exclusive advisory lock (`flock`) on `path`, creating the file if needed, for as long as the
/// returned file stays open; the kernel releases it when the process exits, however it exits. Fails with
/// `WouldBlock` while another process holds it.
pub fn lock_exclusive(path: &std::path::Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
    // SAFETY: flock(2) on a descriptor this function owns and keeps open; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Binds (never listens on) a throwaway socket to `addr` with `SO_REUSEADDR` and without
/// `SO_REUSEPORT`, and closes it: fails with `AddrInUse` when a socket listens on `addr`.
fn probe_bind(addr: SocketAddr) -> io::Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// A listening TCP socket owned by one core's runtime.
pub struct Listener {
    inner: ListenerInner,
}

enum ListenerInner {
    Uring(uring::Listener),
    Epoll(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `addr` with `SO_REUSEADDR` + `SO_REUSEPORT` (set before bind) and a backlog of 1024,
    /// so that each core can bind its own listener on the same address. Must be called inside
    /// [`run`]; the listener belongs to that runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let backend = require_backend("Listener::bind")?;
        let std = bind_std(addr)?;
        let inner = match backend {
            Backend::Uring => {
                // tokio-uring keeps its sockets blocking: io_uring arms a poll internally, and a
                // blocking fd is what tokio-uring's own bind/accept produce.
                std.set_nonblocking(false)?;
                ListenerInner::Uring(uring::Listener::from_std(std))
            }
            Backend::Epoll => {
                std.set_nonblocking(true)?;
                ListenerInner::Epoll(tokio::net::TcpListener::from_std(std)?)
            }
        };
        Ok(Listener { inner })
    }

    /// The address the listener is bound to (with the actual port when bound to port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            ListenerInner::Uring(l) => l.local_addr(),
            ListenerInner::Epoll(l) => l.local_addr(),
        }
    }

    /// Stops listening now (`shutdown(2)` on the listening socket: Linux takes it out of the port's
    /// `SO_REUSEPORT` group at once). Without this, on io_uring the socket lives until the ring is torn
    /// down after the thread exits, because a pending accept still holds it, and a broker restarted at
    /// once would share the port with it for a moment: connections the kernel gave the old socket would
    /// be reset. Pending and later accepts fail.
    pub fn close(&self) {
        use std::os::fd::AsRawFd;
        let fd = match &self.inner {
            ListenerInner::Uring(l) => l.as_raw_fd(),
            ListenerInner::Epoll(l) => l.as_raw_fd(),
        };
        // SAFETY: `fd` is the listening socket this value owns and keeps open; shutdown does not close it.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }

    /// Waits for the next connection and sets `TCP_NODELAY` on it (MQTT packets are small and
    /// latency-bound; the broker batches writes itself). Cancel-safe in both backends: dropping
    /// the future (e.g. in `select!`) loses no connection.
    pub async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        let (io, peer) = match &self.inner {
            ListenerInner::Uring(l) => {
                let (s, peer) = l.accept().await?;
                // Best effort: a socket without NODELAY still works, and refusing the connection
                // over it (e.g. the peer already reset it) would only make the accept loop back off.
                let _ = s.set_nodelay(true);
                (ConnIo::Uring(s), peer)
            }
            ListenerInner::Epoll(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                (ConnIo::Epoll(s), peer)
            }
        };
        Ok((Conn::new(io), peer))
    }
}

/// One TCP connection owned by one core's runtime.
///
/// All methods take `&self`, so a reader task and a writer task can share it through an `Rc`; at
/// most one read and one write should be in flight at a time. Call [`Conn::shutdown`] before the
/// last `Rc` is dropped.
///
/// Cancellation: with io_uring, dropping a `read`/`write_all_vectored` future (a timeout, a
/// `select!`) does not cancel the kernel operation; a dropped read may still consume data that
/// nobody sees, a dropped write may still send. Prefer letting them complete (shut the
/// connection down to make them complete at once); [`Conn::into_std`] refuses connections that
/// had an operation dropped this way.
pub struct Conn {
    io: ConnIo,
    /// io_uring operations started and not seen completing. Counted, not guarded: an operation whose
    /// future is dropped before completion (tokio-uring does not cancel it, so the kernel may still
    /// consume data for it) leaves the count above 0 for good, and [`Conn::into_std`] refuses the
    /// hand-off. A counter costs the pending read's future nothing, where a drop guard would sit in it.
    in_flight: Cell<u32>,
    /// The socket is in this core's [`IdleSet`] (armed or spent): re-arming modifies its entry.
    idle_known: Cell<bool>,
    /// Epoll backend: the last read filled the buffer it was given (see `epoll::poll_read`).
    read_filled: Cell<bool>,
}

enum ConnIo {
    Uring(tokio_uring::net::TcpStream),
    Epoll(tokio::net::TcpStream),
}

impl Conn {
    fn new(io: ConnIo) -> Conn {
        Conn { io, in_flight: Cell::new(0), idle_known: Cell::new(false), read_filled: Cell::new(false) }
    }

    /// Reads into the spare capacity of `buf`, appending after `buf.len()`, and returns how many
    /// bytes arrived together with the buffer. `Ok(0)` means EOF (or that the connection was shut
    /// down). The buffer belongs to the kernel until the read completes, io_uring style.
    ///
    /// The caller should leave spare capacity; if it does not, 4 KiB are reserved here, because
    /// a zero-length read would look like EOF.
    ///
    /// One async layer over the backend's own operation (not an `async fn` calling another): an idle
    /// connection waits in this future for its whole life, and every nested layer would add its own
    /// copy of the arguments to the connection's memory.
    pub fn read(&self, mut buf: BytesMut) -> impl Future<Output = (io::Result<usize>, BytesMut)> + '_ {
        if buf.len() == buf.capacity() {
            buf.reserve(MIN_READ_SPARE);
        }
        async move {
            match &self.io {
                ConnIo::Uring(s) => {
                    self.in_flight.set(self.in_flight.get() + 1);
                    let out = uring::read(s, buf).await;
                    self.in_flight.set(self.in_flight.get() - 1);
                    out
                }
                ConnIo::Epoll(s) => {
                    let spare = buf.capacity() - buf.len();
                    let mut yield_first = self.read_filled.get();
                    let res =
                        std::future::poll_fn(|cx| epoll::poll_read(s, &mut buf, &mut yield_first, cx)).await;
                    self.read_filled.set(matches!(res, Ok(n) if n == spare));
                    (res, buf)
                }
            }
        }
    }

    /// Writes every byte of every buffer, in order, with `writev` (at most [`MAX_IOVECS`] iovecs
    /// per call, each covering a run of buffers that are adjacent in memory), looping on partial
    /// writes. Returns the Vec emptied, so that the caller can reuse its allocation. On error the
    /// unwritten buffers are dropped too: the connection is broken.
    pub async fn write_all_vectored(&self, bufs: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
        match &self.io {
            ConnIo::Uring(s) => {
                self.in_flight.set(self.in_flight.get() + 1);
                let out = uring::write_all_vectored(s, bufs).await;
                self.in_flight.set(self.in_flight.get() - 1);
                out
            }
            ConnIo::Epoll(s) => epoll::write_all_vectored(s, bufs).await,
        }
    }

    /// Shuts down both directions; errors (e.g. the peer already went away) are ignored.
    ///
    /// Must be called before the last `Rc` of a connection is dropped: tokio-uring does not cancel
    /// an in-flight read on drop, so without this the read (and the fd it holds) would stay
    /// pending until the peer sends something, forever for a dead peer. After shutdown every
    /// pending and future read completes at once with `Ok(0)` or an error.
    pub fn shutdown(&self) {
        let _ = match &self.io {
            ConnIo::Uring(s) => s.shutdown(Shutdown::Both),
            ConnIo::Epoll(s) => socket2::SockRef::from(s).shutdown(Shutdown::Both),
        };
    }

    /// The peer's address, asked of the kernel (`None` once the connection is gone). Not stored: that
    /// would cost every connection 32 bytes for a value the broker seldom needs.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the descriptor is this connection's socket, open for as long as `self` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.raw_fd()) };
        socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match &self.io {
            ConnIo::Uring(s) => s.as_raw_fd(),
            ConnIo::Epoll(s) => s.as_raw_fd(),
        }
    }

    /// Detaches the socket from this runtime so that another core's runtime can adopt it with
    /// [`Conn::from_std`] (hand-off of a connection to the core that owns its session).
    ///
    /// Only valid when no operation is in flight. If an io_uring operation was abandoned (its
    /// future dropped before completion) the kernel may still consume data for it, so the
    /// hand-off is refused: the connection is then shut down and closed, and an error returned.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        if self.in_flight.get() > 0 {
            self.shutdown();
            return Err(io::Error::other(
                "connection has an abandoned in-flight operation; it cannot be handed off",
            ));
        }
        match self.io {
            ConnIo::Uring(s) => uring::into_std(s),
            ConnIo::Epoll(s) => s.into_std(),
        }
    }

    /// Adopts a socket detached by [`Conn::into_std`] (possibly on another thread). Must be called
    /// inside [`run`] on this thread, with that run's `backend`.
    pub fn from_std(s: std::net::TcpStream, backend: Backend) -> io::Result<Conn> {
        let running = require_backend("Conn::from_std")?;
        if running != backend {
            return Err(io::Error::other(format!(
                "Conn::from_std for {backend:?} inside a {running:?} runtime"
            )));
        }
        let io = match backend {
            Backend::Uring => {
                // See Listener::bind: tokio-uring expects blocking sockets; an epoll-side
                // into_std would hand over a non-blocking one.
                s.set_nonblocking(false)?;
                ConnIo::Uring(tokio_uring::net::TcpStream::from_std(s))
            }
            Backend::Epoll => {
                // tokio requires the caller to set non-blocking mode before from_std.
                s.set_nonblocking(true)?;
                ConnIo::Epoll(tokio::net::TcpStream::from_std(s)?)
            }
        };
        Ok(Conn::new(io))
    }
}

/// Accounts for `n` bytes written from the front of `bufs`: advances the buffer the write ended
/// in and returns how many leading buffers were written completely (the caller drops them).
/// Never panics, even if `n` exceeds the total (it cannot, coming from the kernel).
fn consume(bufs: &mut [Bytes], mut n: usize) -> usize {
    let mut full = 0;
    for b in bufs.iter_mut() {
        if n >= b.len() {
            n -= b.len();
            full += 1;
        } else {
            b.advance(n);
            break;
        }
    }
    full
}

/// Calls `push(ptr, len)` for each run of bytes to hand to one `writev`: consecutive non-empty buffers
/// that lie back to back in memory form one run, and at most `max` runs are produced.
///
/// Why: shared QoS 0 frames are carved one after another from 64 KiB blocks, so the frames queued for
/// a subscriber are mostly adjacent. Joined, a batch of thousands of small frames goes out in one
/// write instead of one write per [`MAX_IOVECS`] frames, without copying a byte. Under a flood that
/// is the difference between a subscriber that gets a thousand messages per loop turn (while the
/// readers take in eight times that and most of it is dropped) and one that gets its whole outbox.
/// Runs are raw pointers, never Rust slices: two buffers that happen to be adjacent may belong to
/// different allocations, which is fine for the kernel (both stay alive until the write is done)
/// but not for a `&[u8]`.
fn for_each_run(bufs: &[Bytes], max: usize, mut push: impl FnMut(*const u8, usize)) {
    let mut run: Option<(*const u8, usize)> = None;
    let mut pushed = 0;
    for b in bufs.iter().filter(|b| !b.is_empty()) {
        match &mut run {
            Some((ptr, len)) if ptr.wrapping_add(*len) == b.as_ptr() => *len += b.len(),
            _ => {
                if let Some((ptr, len)) = run.take() {
                    push(ptr, len);
                    pushed += 1;
                }
                if pushed == max {
                    return;
                }
                run = Some((b.as_ptr(), b.len()));
            }
        }
    }
    if let Some((ptr, len)) = run {
        push(ptr, len);
    }
}

/// The error for a write that made no progress: the socket accepts no more bytes.
fn write_zero() -> io::Error {
    io::Error::new(io::ErrorKind::WriteZero, "writev wrote 0 bytes")
}

#[cfg(test)]
thread_local! {
    /// Number of writev calls (syscalls or io_uring ops) made on this thread; lets tests check
    /// that the partial-write and iovec-limit loops actually ran.
    static WRITEV_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Counts one writev call (tests only).
#[inline]
fn count_writev() {
    #[cfg(test)]
    WRITEV_CALLS.with(|c| c.set(c.get() + 1));
}

/// An open file written by a core (the persistence log): positioned writes and `fdatasync`, through
/// io_uring on the uring backend. On the epoll backend the blocking calls run on tokio's blocking pool,
/// so the core's loop never waits for the disk.
pub struct File {
    io: FileIo,
}

enum FileIo {
    Uring(tokio_uring::fs::File),
    Epoll(std::sync::Arc<std::fs::File>),
}

impl File {
    /// Adopts an open std file into the calling thread's runtime.
    pub fn from_std(f: std::fs::File) -> io::Result<File> {
        let io = match require_backend("File::from_std")? {
            Backend::Uring => FileIo::Uring(tokio_uring::fs::File::from_std(f)),
            Backend::Epoll => FileIo::Epoll(std::sync::Arc::new(f)),
        };
        Ok(File { io })
    }

    /// Writes all of `buf` at offset `pos`.
    pub async fn write_all_at(&self, buf: Bytes, pos: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        match &self.io {
            FileIo::Uring(f) => f.write_all_at(buf, pos).await.0,
            FileIo::Epoll(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || std::os::unix::fs::FileExt::write_all_at(&*f, &buf, pos))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }

    /// Makes what was written durable (`fdatasync`).
    pub async fn sync_data(&self) -> io::Result<()> {
        match &self.io {
            FileIo::Uring(f) => f.sync_data().await,
            FileIo::Epoll(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.sync_data()).await.map_err(io::Error::other)?
            }
        }
    }
}
