//! Waiting for idle connections without a pending read.
//!
//! An io_uring read holds its buffer, its operation slot and the task that awaits it for as long as
//! the peer says nothing, and a connection cannot take back a submitted read. A connection that has
//! been quiet therefore stops reading instead: its socket joins this core's [`IdleSet`] (its own
//! epoll instance, armed one-shot per connection), and the connection's reading task ends. When the
//! socket becomes readable (data, end of stream, or a shutdown by the broker itself), [`IdleSet::wait`]
//! hands the connection's token back and the caller starts a new reading task for it. One epoll
//! instance per core, watched by tokio's reactor, serves both backends.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::Conn;

/// Events fetched per `epoll_wait` call.
const BATCH: usize = 256;

/// This core's idle connections: sockets waiting to become readable, each with a caller's token.
pub struct IdleSet {
    epoll: AsyncFd<OwnedFd>,
}

impl IdleSet {
    /// A new, empty set. Must be called inside [`super::run`] (it registers with the runtime).
    pub fn new() -> io::Result<IdleSet> {
        // SAFETY: plain syscall; the result is checked before it is used as a descriptor.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the set owns `owned` for its whole life and never replaces or closes it.
        let epoll = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }?;
        Ok(IdleSet { epoll })
    }

    /// Arms `conn` once: the next time its socket is readable (or at once if it is now), [`IdleSet::wait`]
    /// returns `token`, and the socket is not watched again until it is armed again. The caller must
    /// have no read in flight on `conn` and must keep `conn` open until its token comes back.
    pub fn arm(&self, conn: &Conn, token: u64) -> io::Result<()> {
        let fd = conn.raw_fd();
        let flags = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
        let mut ev = libc::epoll_event { events: flags, u64: token };
        // A socket armed before is still in the set (disarmed): modify it; a new one is added.
        let op = if conn.idle_known.get() { libc::EPOLL_CTL_MOD } else { libc::EPOLL_CTL_ADD };
        match ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) {
            Ok(()) => {}
            // The set forgot it (the descriptor was closed and reused) or already has it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev)?
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut ev)?
            }
            Err(e) => return Err(e),
        }
        conn.idle_known.set(true);
        Ok(())
    }

    /// Waits until at least one armed socket is readable and appends the tokens of all that are.
    pub async fn wait(&self, tokens: &mut Vec<u64>) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            let mut guard = self.epoll.readable().await?;
            loop {
                // SAFETY: `events` is a writable array of BATCH entries; timeout 0 never blocks.
                let n =
                    unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), BATCH as i32, 0) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                let n = n as usize;
                tokens.extend(events[..n].iter().map(|e| e.u64));
                if n < BATCH {
                    // Drained: the reactor reports the set again when it next has a ready socket.
                    guard.clear_ready();
                    break;
                }
            }
            if !tokens.is_empty() {
                return Ok(());
            }
        }
    }
}

fn ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, ev: &mut libc::epoll_event) -> io::Result<()> {
    // SAFETY: `ev` is a valid event; both descriptors are open (the caller keeps `conn` open).
    if unsafe { libc::epoll_ctl(epfd, op, fd, ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
