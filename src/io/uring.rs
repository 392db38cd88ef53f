//! The io_uring backend: tokio-uring 0.5. Only this file and `mod.rs` name tokio-uring.
//!
//! tokio-uring's sockets are blocking fds driven by io_uring (the kernel arms a poll for them, no
//! worker thread blocks), its operations take owned buffers, and dropping an operation's future
//! does not cancel it. Because the fd is blocking, a writev op completes (measured on Linux 6.18)
//! only once all of it is queued, however slow the peer: one op per write, but a slow reader holds
//! the op (and its buffers) until it catches up or the connection is shut down.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use tokio_uring::buf::{BoundedBuf, Slice};

use super::{consume, count_writev, probe, write_zero, MAX_IOVECS};

/// Runs `fut` on a new tokio-uring runtime built with the flags the probe found usable.
pub(super) fn run<F: Future>(fut: F) -> io::Result<F::Output> {
    // The probe (cached after the first success) picks COOP_TASKRUN + SINGLE_ISSUER when the
    // kernel has them, and turns "no io_uring here" into a readable error instead of the panic
    // tokio_uring::start would give.
    let setup = probe::setup().map_err(io::Error::other)?;
    let mut builder = tokio_uring::builder();
    builder.entries(probe::RING_ENTRIES).uring_builder(&setup.uring_builder());
    let rt = tokio_uring::Runtime::new(&builder)?;
    Ok(rt.block_on(fut))
}

/// An accept operation that may outlive the `accept()` call that started it.
type AcceptOp = Pin<Box<dyn Future<Output = io::Result<(tokio_uring::net::TcpStream, SocketAddr)>>>>;

/// A tokio-uring listener whose `accept` is cancel-safe.
///
/// Dropping a tokio-uring accept future does not cancel the operation: the kernel still accepts a
/// connection for it, and tokio-uring then discards the result, so the connection is lost (its
/// fd leaks). Here an unfinished accept is parked in `pending` instead and the next `accept()`
/// resumes it, so callers may use `accept()` in `select!` like tokio's (one `accept()` at a
/// time per listener).
pub(super) struct Listener {
    inner: Rc<tokio_uring::net::TcpListener>,
    pending: RefCell<Option<AcceptOp>>,
}

impl Listener {
    /// Wraps a bound, listening, blocking std listener.
    pub(super) fn from_std(l: std::net::TcpListener) -> Listener {
        Listener { inner: Rc::new(tokio_uring::net::TcpListener::from_std(l)), pending: RefCell::new(None) }
    }

    /// The listening socket's fd.
    pub(super) fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }

    /// The bound address.
    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Next connection; resumes an accept left unfinished by a dropped earlier call.
    pub(super) async fn accept(&self) -> io::Result<(tokio_uring::net::TcpStream, SocketAddr)> {
        let op = self.pending.borrow_mut().take().unwrap_or_else(|| {
            let l = self.inner.clone();
            Box::pin(async move { l.accept().await })
        });
        let mut slot = ParkOnDrop { op: Some(op), home: &self.pending };
        poll_fn(|cx| match slot.op.as_mut() {
            Some(op) => {
                let res = op.as_mut().poll(cx);
                if res.is_ready() {
                    slot.op = None;
                }
                res
            }
            // Unreachable: the op is only taken out when it has completed and was returned.
            None => std::task::Poll::Ready(Err(io::Error::other("accept polled after completion"))),
        })
        .await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // A parked accept keeps the listening fd open inside tokio-uring until the runtime ends,
        // and with SO_REUSEPORT the kernel would keep routing connections to it, to be lost.
        // Shutting the socket down fails that accept (EINVAL) and takes it out of the group.
        if self.pending.get_mut().take().is_some() {
            // SAFETY: shutdown on the fd owned by `inner`, which is still open here.
            unsafe { libc::shutdown(self.inner.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Puts an unfinished accept back into its listener when the `accept()` future is dropped.
struct ParkOnDrop<'a> {
    op: Option<AcceptOp>,
    home: &'a RefCell<Option<AcceptOp>>,
}

impl Drop for ParkOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            *self.home.borrow_mut() = Some(op);
        }
    }
}

/// Reads into the spare capacity of `buf`, after its current contents.
///
/// A plain function returning tokio-uring's future mapped, not an `async fn`: see [`super::Conn::read`].
pub(super) fn read(
    s: &tokio_uring::net::TcpStream,
    buf: BytesMut,
) -> impl Future<Output = (io::Result<usize>, BytesMut)> + '_ {
    // A bare BytesMut would be read into from its start (tokio-uring reads at stable_mut_ptr
    // with length bytes_total), overwriting what the caller already holds; a slice beginning at
    // len() appends, and its completion sets the length to len() + n.
    let start = buf.len();
    Map {
        fut: s.read(buf.slice(start..)),
        f: Some(|(res, slice): (io::Result<usize>, Slice<BytesMut>)| (res, slice.into_inner())),
    }
}

/// `fut` with `f` applied to its output, without an `async` layer of its own.
struct Map<Fut, F> {
    fut: Fut,
    f: Option<F>,
}

impl<Fut: Future, F: FnOnce(Fut::Output) -> T, T> Future for Map<Fut, F> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        // SAFETY: `fut` is structurally pinned: it is never moved out of `self` (only polled in place
        // and dropped with it); `f` is not pinned and only taken by value, which does not move `fut`.
        let this = unsafe { self.get_unchecked_mut() };
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        match fut.poll(cx) {
            std::task::Poll::Ready(out) => match this.f.take() {
                Some(f) => std::task::Poll::Ready(f(out)),
                // Polled again after completion: a caller bug; the future stays pending forever.
                None => std::task::Poll::Pending,
            },
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

/// One iovec of a writev op: a run of buffers adjacent in memory (see [`super::for_each_run`]). It
/// holds the whole buffer list, so that the bytes stay alive for as long as tokio-uring holds the
/// op, which it does even if the writing future is dropped.
struct Run {
    ptr: *const u8,
    len: usize,
    _bufs: Rc<Vec<Bytes>>,
}

// SAFETY: `ptr..ptr + len` lies within buffers of `_bufs`, which the run keeps alive and which are
// never written while any run exists (the list is only changed after the op gave every run back).
unsafe impl tokio_uring::buf::IoBuf for Run {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr
    }

    fn bytes_init(&self) -> usize {
        self.len
    }

    fn bytes_total(&self) -> usize {
        self.len
    }
}

/// Most spare run lists a thread keeps: one per write that may be in flight at once, within reason. A
/// list holds at most [`MAX_IOVECS`] runs (24 KiB).
const SPARE_RUNS_MAX: usize = 64;

thread_local! {
    /// Run lists of finished writes on this thread, kept for the next ones, so that a write batch does
    /// not allocate its list again (many writes are in flight at once on a busy core).
    static SPARE_RUNS: RefCell<Vec<Vec<Run>>> = const { RefCell::new(Vec::new()) };
}

/// Writes all of `bufs` with io_uring writev, at most [`MAX_IOVECS`] runs of adjacent buffers per
/// operation.
pub(super) async fn write_all_vectored(
    s: &tokio_uring::net::TcpStream,
    bufs: Vec<Bytes>,
) -> (io::Result<()>, Vec<Bytes>) {
    let mut bufs = Rc::new(bufs);
    let mut runs = SPARE_RUNS.with_borrow_mut(Vec::pop).unwrap_or_default();
    // Index of the first buffer not yet written completely.
    let mut head = 0;
    let res = loop {
        super::for_each_run(bufs.get(head..).unwrap_or_default(), MAX_IOVECS, |ptr, len| {
            runs.push(Run { ptr, len, _bufs: bufs.clone() })
        });
        // Empty buffers make no runs: a writev of nothing would return 0, which reads as WriteZero.
        if runs.is_empty() {
            break Ok(());
        }
        count_writev();
        let (res, returned) = s.writev(runs).await;
        runs = returned;
        runs.clear();
        match res {
            Ok(0) => break Err(write_zero()),
            Ok(n) => match Rc::get_mut(&mut bufs) {
                Some(list) => head += list.get_mut(head..).map_or(0, |rest| consume(rest, n)),
                // Cannot happen: the runs, the only other holders, were just dropped.
                None => break Err(io::Error::other("write buffers still shared after writev")),
            },
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    SPARE_RUNS.with_borrow_mut(|spare| {
        if spare.len() < SPARE_RUNS_MAX && runs.capacity() > 0 {
            spare.push(runs);
        }
    });
    let mut bufs = Rc::try_unwrap(bufs).unwrap_or_default();
    bufs.clear();
    (res, bufs)
}

/// Detaches a tokio-uring stream: tokio-uring has no `into_std`, so the fd is duplicated into a
/// std stream and the original is closed. Both fds name the same socket, so nothing is lost as
/// long as no operation is in flight (the caller checks that).
pub(super) fn into_std(s: tokio_uring::net::TcpStream) -> io::Result<std::net::TcpStream> {
    // F_DUPFD_CLOEXEC: the duplicate must not leak into child processes either.
    // SAFETY: fcntl on a valid fd owned by `s`; no memory is passed.
    let fd = unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by fcntl, is open and owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Closes the original fd synchronously (tokio-uring's SharedFd closes on last drop).
    drop(s);
    Ok(std::net::TcpStream::from(owned))
}
