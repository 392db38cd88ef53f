//! The control block of one connection ([`ConnCtl`]), shared by the core, which fills its outbox, and
//! the connection's reader and writer tasks; and the per-core pool of retired writers ([`Writers`]).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::task::{Poll, Waker};

use crate::session::Outbox;

/// The control block of one connection, shared by the core (which fills the outbox) and the
/// connection's reader and writer tasks.
///
/// The wake-ups are a flag and a waker slot each rather than `tokio::sync::Notify`: one waiter at a time
/// is all they ever have, and a waiting `Notify` future (64 bytes) would sit in every idle connection's
/// writer task for the connection's whole life.
pub struct ConnCtl {
    /// Shuts the socket down on kick; `None` for a connection driven without one (tests, fuzzing).
    socket: Option<Rc<dyn Shutdown>>,
    /// The core's pool of retired writers (see [`Writers`]).
    writers: Rc<Writers>,
    pub outbox: RefCell<Outbox>,
    /// Something was queued, or the connection is closing, since the writer last looked.
    woken: Cell<bool>,
    /// The writer task, while it waits in [`ConnCtl::writer_wait`].
    writer_waker: Cell<Option<Waker>>,
    closing: Cell<bool>,
    /// Already in the core's dirty list for this tick.
    pub(super) dirty: Cell<bool>,
    /// The writer has flushed what it could and stopped.
    writer_finished: Cell<bool>,
    /// Whoever waits in [`ConnCtl::writer_done`].
    done_waker: Cell<Option<Waker>>,
    /// While the reader is parked (a quiet connection waiting for its socket without a pending read):
    /// the token it is parked under; 0 otherwise.
    parked: Cell<u64>,
    /// The writer task ended because the reader is parked and nothing was queued
    /// ([`ConnCtl::retire_writer`]); a wake-up asks for a new one ([`Writers::wanted`]).
    writer_gone: Cell<bool>,
    /// The sweep during which the writer last wrote (see [`Writers::next_sweep`]): a writer that wrote
    /// since the last sweep is not idle, so it does not retire. A byte, so that it packs with the flags
    /// (a `u32` made this block 120 B, and its `Rc` allocation a 160 B one instead of 128 B): sweeps count
    /// modulo 256, so a writer quiet for exactly a multiple of 64 s retires one sweep later. Harmless.
    wrote_in: Cell<u8>,
    /// In the core's list of outboxes used since the last sweep (which the sweep shrinks when empty).
    pub(super) active: Cell<bool>,
}

/// How the core shuts a connection's socket down (the runtime implements it for its sockets): the core
/// itself names no I/O type.
pub trait Shutdown {
    /// Makes the connection's pending read and any stuck write complete now.
    fn shutdown(&self);
}

/// The writers of one core that retired (see [`ConnCtl::retire_writer`]): how many since the last sweep
/// (their memory counts toward a trim), and the park tokens of those someone woke since, with the task
/// that starts writers again waiting in [`Writers::wanted`]. One per core, shared by its connections'
/// control blocks.
#[derive(Default)]
pub struct Writers {
    retired: Cell<usize>,
    /// Sweeps so far: a connection's writer "wrote since the last sweep" if its last write was in this one.
    sweep: Cell<u8>,
    wanted: RefCell<(Vec<u64>, Option<Waker>)>,
}

impl Writers {
    /// Completes once some retired writers were woken, and moves their connections' park tokens to
    /// `out`. A token may be stale (the connection was unparked since): the caller checks it.
    pub fn wanted<'a>(&'a self, out: &'a mut Vec<u64>) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            let mut wanted = self.wanted.borrow_mut();
            let (tokens, waker) = &mut *wanted;
            if tokens.is_empty() {
                *waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            out.append(tokens);
            Poll::Ready(())
        })
    }

    /// A sweep begins: what was written before it is "before the last sweep" from now on.
    pub(super) fn next_sweep(&self) {
        self.sweep.set(self.sweep.get().wrapping_add(1));
    }

    /// Writers retired since the last call.
    pub fn take_retired(&self) -> usize {
        self.retired.take()
    }

    fn want(&self, token: u64) {
        let mut wanted = self.wanted.borrow_mut();
        wanted.0.push(token);
        if let Some(w) = wanted.1.take() {
            w.wake();
        }
    }
}

impl ConnCtl {
    pub fn new(socket: Option<Rc<dyn Shutdown>>, writers: Rc<Writers>) -> ConnCtl {
        ConnCtl {
            socket,
            writers,
            outbox: RefCell::new(Outbox::new()),
            woken: Cell::new(false),
            writer_waker: Cell::new(None),
            closing: Cell::new(false),
            dirty: Cell::new(false),
            writer_finished: Cell::new(false),
            done_waker: Cell::new(None),
            parked: Cell::new(0),
            writer_gone: Cell::new(false),
            wrote_in: Cell::new(u8::MAX),
            active: Cell::new(false),
        }
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Wakes the writer task: something was queued, or the connection is closing. Not lost when the
    /// writer is busy: its next [`ConnCtl::writer_wait`] returns at once.
    ///
    /// A retired writer (see [`ConnCtl::retire_writer`]) is asked for again on the first wake-up since
    /// it retired: later ones find `woken` already set.
    pub fn wake_writer(&self) {
        let was_woken = self.woken.replace(true);
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        } else if self.writer_gone.get() && !was_woken {
            self.writers.want(self.parked.get());
        }
    }

    /// The reader parked under `token` (0: it is reading again). Parking wakes a writer that has been
    /// idle since the last sweep, so that it retires at once.
    pub fn set_parked(&self, token: u64) {
        self.parked.set(token);
        if token != 0 && !self.wrote_since_sweep() {
            self.wake_writer();
        }
    }

    /// Called by the writer after each write.
    pub fn set_wrote(&self) {
        self.wrote_in.set(self.writers.sweep.get());
    }

    fn wrote_since_sweep(&self) -> bool {
        self.wrote_in.get() == self.writers.sweep.get()
    }

    /// Called by every sweep (after [`Writers::next_sweep`]) for a connection that parked: its writer, if
    /// it wrote nothing during the sweep period that just ended, is woken to retire. A writer that keeps
    /// writing (a subscriber that never talks still gets its messages) never retires, so a busy connection
    /// never pays a task start per batch. Returns whether the sweep must look at it again.
    pub(super) fn sweep_writer(&self) -> bool {
        if self.parked.get() == 0 || self.writer_gone.get() || self.closing.get() {
            return false;
        }
        let wrote = self.wrote_in.get() == self.writers.sweep.get().wrapping_sub(1);
        if !wrote {
            self.wake_writer();
        }
        true
    }

    /// Called by the sweep for a connection whose outbox was used since the last one: an empty outbox
    /// gives its capacity back. Returns whether the sweep must look at it again (it is still in use).
    pub(super) fn shrink_idle_outbox(&self) -> bool {
        let Ok(mut outbox) = self.outbox.try_borrow_mut() else { return true };
        if !outbox.is_empty() && !self.writer_finished.get() {
            return true;
        }
        if outbox.capacity() > 0 {
            outbox.shrink_to_fit();
        }
        self.active.set(false);
        false
    }

    /// The writer has nothing to write: if the reader is parked, the writer wrote nothing since the last
    /// sweep and the connection is not closing, the writer may end its task (true) instead of waiting;
    /// the next wake-up asks for a new one. Called by the writer just before it would wait.
    pub fn retire_writer(&self) -> bool {
        let mut outbox = self.outbox.borrow_mut();
        if self.parked.get() == 0 || self.wrote_since_sweep() || self.closing.get() || !outbox.is_empty() {
            return false;
        }
        // A connection without a writer keeps no outbox allocation either.
        outbox.shrink_to_fit();
        self.writer_gone.set(true);
        self.writers.retired.set(self.writers.retired.get() + 1);
        // Whatever woke it was handled: the next wake-up must ask for a writer.
        self.woken.set(false);
        true
    }

    /// Whether the writer had retired; a caller that gets `true` must start a new writer task.
    pub fn take_writer_gone(&self) -> bool {
        self.writer_gone.replace(false)
    }

    /// The writer waits here for [`ConnCtl::wake_writer`] (one waiter: the connection's writer).
    pub fn writer_wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.woken.replace(false) {
                return Poll::Ready(());
            }
            self.writer_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }

    /// Asks the writer to flush what is queued and then close the socket.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake_writer();
    }

    /// Called by the writer when it stops.
    pub fn set_writer_finished(&self) {
        self.writer_finished.set(true);
        if let Some(w) = self.done_waker.take() {
            w.wake();
        }
    }

    /// Completes once the writer has stopped (one waiter: the connection's reader).
    pub fn writer_done(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.writer_finished.get() {
                return Poll::Ready(());
            }
            self.done_waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }

    pub fn writer_finished(&self) -> bool {
        self.writer_finished.get()
    }

    /// Closes at once (takeover, keep-alive expiry, shutdown): the socket is shut down so that the
    /// reader's pending read and any stuck write complete now.
    pub fn kick(&self) {
        self.close();
        if let Some(s) = &self.socket {
            s.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConnCtl;

    /// Every connection has one, for its whole life: at 112 B (128 B with `Rc`'s counts) it fits the
    /// allocator's 128 B size class; one byte more moves it to the 160 B class.
    #[test]
    fn a_control_block_stays_in_its_size_class() {
        assert!(std::mem::size_of::<ConnCtl>() <= 112, "{}", std::mem::size_of::<ConnCtl>());
    }
}
