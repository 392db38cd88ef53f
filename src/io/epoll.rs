//! The epoll backend: a tokio `current_thread` runtime. Only this file and `mod.rs` name `tokio::net`.
//!
//! Readiness loops (`readable()`/`try_read_buf`, `writable()`/`try_write_vectored`) give the same
//! owned-buffer shape as the io_uring backend without AsyncRead/AsyncWrite adapters.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{consume, count_writev, write_zero, MAX_IOVECS};

/// Runs `fut` on a new tokio current_thread runtime, inside a LocalSet so `spawn_local` works.
pub(super) fn run<F: Future>(fut: F) -> io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Declared after `rt` so it is dropped first: its tasks (and their sockets) go away while
    // the runtime's I/O driver still exists.
    let local = tokio::task::LocalSet::new();
    Ok(rt.block_on(local.run_until(fut)))
}

/// Reads into the spare capacity of `buf`, after its current contents, once the socket is readable.
/// A poll function rather than an `async fn`: waiting through `poll_read_ready` keeps no waiter node
/// in the caller's future (see [`super::Conn::read`]).
///
/// With `yield_first` (the previous read filled its buffer, so more is likely waiting), a socket that
/// is readable already yields once before it is read: a connection that always has data would
/// otherwise read up to tokio's budget of 128 times in a row while every other task of the core
/// waits. Measured under a QoS 0 flood of eight publishers: the subscriber's writer ran about twice a
/// second and got 1 % of the messages. One full read per turn of the loop is what the io_uring
/// backend does by nature. Reads that did not fill the buffer do not yield: yielding before every
/// read cost the QoS 1 pairs run a third of its throughput.
pub(super) fn poll_read(
    s: &TcpStream,
    buf: &mut BytesMut,
    yield_first: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if std::mem::take(yield_first) && s.poll_read_ready(cx).is_ready() {
        cx.waker().wake_by_ref();
        return Poll::Pending;
    }
    loop {
        if let Err(e) = std::task::ready!(s.poll_read_ready(cx)) {
            return Poll::Ready(Err(e));
        }
        // try_read_buf appends into the BytesMut's spare capacity and advances its length.
        match s.try_read_buf(buf) {
            Ok(n) => return Poll::Ready(Ok(n)),
            // Readiness was stale (edge-triggered epoll, spurious wake-up): poll_read_ready clears it
            // after a WouldBlock, so the next call registers the waker again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes all of `bufs` with writev, at most [`MAX_IOVECS`] runs of adjacent buffers per call.
pub(super) async fn write_all_vectored(s: &TcpStream, mut bufs: Vec<Bytes>) -> (io::Result<()>, Vec<Bytes>) {
    // Index of the first buffer not yet fully written; the Vec is cleared once at the end instead
    // of shifting it after every partial write.
    let mut head = 0;
    let res = loop {
        // Skip empty buffers: a writev of only empty iovecs returns 0, which reads as WriteZero.
        while bufs.get(head).is_some_and(|b| b.is_empty()) {
            head += 1;
        }
        let Some(pending) = bufs.get_mut(head..).filter(|p| !p.is_empty()) else {
            break Ok(());
        };
        if let Err(e) = s.writable().await {
            break Err(e);
        }
        let mut iov: SmallVec<[libc::iovec; 64]> = SmallVec::new();
        super::for_each_run(pending, MAX_IOVECS, |ptr, len| {
            iov.push(libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len })
        });
        count_writev();
        let written = s.try_io(Interest::WRITABLE, || {
            // SAFETY: every iovec covers bytes of buffers in `pending`, which outlive this call; the
            // kernel only reads them. `iov.len()` is at most MAX_IOVECS (1024), so it fits an i32.
            let n = unsafe { libc::writev(s.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        });
        match written {
            Ok(0) => break Err(write_zero()),
            Ok(n) => head += consume(pending, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    bufs.clear();
    (res, bufs)
}
