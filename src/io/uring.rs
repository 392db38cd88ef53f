//! The io_uring backend: tokio-uring 0.5. Only this file and `mod.rs` name tokio-uring.
//!
//! tokio-uring's sockets are blocking fds driven by io_uring (the kernel arms a poll for them, no
//! worker thread blocks), its operations take owned buffers, and dropping an operation's future
//! does not cancel it. Because the fd is blocking, a writev op completes (measured on Linux 6.18)
//! only once all of it is queued, however slow the peer: one op per write, but a slow reader holds
//! the op (and its buffers) until it catches up or the connection is shut down.

use std::cell::RefCell;
use std::collections::VecDeque;
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

/// Writes all of `bufs` with io_uring writev, at most [`MAX_IOVECS`] buffers per operation.
pub(super) async fn write_all_vectored(
    s: &tokio_uring::net::TcpStream,
    mut bufs: Vec<Bytes>,
) -> (io::Result<()>, Vec<Bytes>) {
    // An empty iovec list (or only empty iovecs) makes writev return 0, which would read as
    // "socket accepts nothing"; empty buffers carry nothing anyway.
    bufs.retain(|b| !b.is_empty());
    // tokio-uring turns the whole Vec into iovecs, so the Vec handed to it must hold at most
    // MAX_IOVECS buffers. The overflow waits here and refills the Vec as it drains; this keeps
    // the caller's allocation as the one that goes back. (Rare: >1024 pending buffers.)
    let mut overflow: VecDeque<Bytes> =
        if bufs.len() > MAX_IOVECS { bufs.drain(MAX_IOVECS..).collect() } else { VecDeque::new() };
    while !bufs.is_empty() {
        count_writev();
        let (res, returned) = s.writev(bufs).await;
        bufs = returned;
        match res {
            Ok(0) => {
                bufs.clear();
                return (Err(write_zero()), bufs);
            }
            Ok(n) => {
                let full = consume(&mut bufs, n);
                bufs.drain(..full);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                bufs.clear();
                return (Err(e), bufs);
            }
        }
        while bufs.len() < MAX_IOVECS {
            match overflow.pop_front() {
                Some(b) => bufs.push(b),
                None => break,
            }
        }
    }
    (Ok(()), bufs)
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
