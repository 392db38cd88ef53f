//! Tests of both backends over real loopback sockets. Every wait is bounded: runtime bodies by
//! [`LIMIT`] through a tokio timeout, client threads by socket timeouts.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::*;

/// Upper bound on any single test body or blocking client operation.
const LIMIT: Duration = Duration::from_secs(30);

/// The backends to test: epoll always, io_uring when this machine allows it.
fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Epoll];
    match probe_uring() {
        Ok(()) => v.push(Backend::Uring),
        Err(e) => eprintln!("note: io_uring backend not tested here: {e}"),
    }
    v
}

/// Runs `fut` on `backend` with an overall time limit.
fn run_bounded<F: Future>(backend: Backend, fut: F) -> F::Output {
    run(backend, async move {
        tokio::time::timeout(LIMIT, fut).await.unwrap_or_else(|_| panic!("{backend:?}: test body timed out"))
    })
    .expect("runtime failed to start")
}

/// A blocking client connection with bounded reads and writes.
fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.set_write_timeout(Some(LIMIT)).unwrap();
    s
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Deterministic test payload: byte i of a stream seeded with `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn writev_calls() -> u64 {
    WRITEV_CALLS.with(Cell::get)
}

#[test]
fn consume_advances_and_counts_full_buffers() {
    let mut v = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de"), Bytes::from_static(b"fgh")];
    assert_eq!(consume(&mut v, 0), 0);
    assert_eq!(v[0], "abc");
    assert_eq!(consume(&mut v, 4), 1);
    assert_eq!(v[1], "e");
    assert_eq!(consume(&mut v[1..], 1), 1);
    assert_eq!(consume(&mut v[2..], 2), 0);
    assert_eq!(v[2], "h");
    // More than is there (the kernel never reports that) must not panic.
    assert_eq!(consume(&mut v[2..], 10), 1);
}

/// The runs `for_each_run` makes of `bufs`, as (offset in `base`, length) pairs.
fn runs_of(base: &Bytes, bufs: &[Bytes], max: usize) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    for_each_run(bufs, max, |ptr, len| runs.push((ptr as usize - base.as_ptr() as usize, len)));
    runs
}

#[test]
fn adjacent_buffers_are_joined_into_one_run_and_runs_are_capped() {
    let base = Bytes::from(pattern(1, 100));
    let at = |from: usize, to: usize| base.slice(from..to);
    // Back to back, with an empty buffer in between: one run.
    assert_eq!(runs_of(&base, &[at(0, 10), Bytes::new(), at(10, 30), at(30, 31)], 8), vec![(0, 31)]);
    // A gap, and a buffer that goes backwards, start new runs.
    assert_eq!(runs_of(&base, &[at(0, 10), at(11, 20), at(5, 8)], 8), vec![(0, 10), (11, 9), (5, 3)]);
    // The same bytes twice are not adjacent to themselves.
    assert_eq!(runs_of(&base, &[at(0, 10), at(0, 10)], 8), vec![(0, 10), (0, 10)]);
    // At most `max` runs; the last one still takes in everything adjacent to it.
    assert_eq!(runs_of(&base, &[at(0, 1), at(2, 3), at(3, 4), at(5, 6), at(7, 8)], 2), vec![(0, 1), (2, 2)]);
    // Nothing, or only empty buffers: no runs (a writev of nothing would read as WriteZero).
    assert!(runs_of(&base, &[], 8).is_empty());
    assert!(runs_of(&base, &[Bytes::new(), at(4, 4)], 8).is_empty());
}

#[test]
fn reuseport_lets_two_listeners_share_a_port() {
    for b in backends() {
        run_bounded(b, async move {
            let l1 = Listener::bind(localhost()).unwrap();
            let addr = l1.local_addr().unwrap();
            assert_ne!(addr.port(), 0);
            let l2 = Listener::bind(addr).expect("second SO_REUSEPORT bind on the same port");
            assert_eq!(l2.local_addr().unwrap(), addr);
            // A socket without SO_REUSEPORT is refused: the option is what makes the sharing work.
            assert!(std::net::TcpListener::bind(addr).is_err());

            const N: usize = 16;
            let clients = std::thread::spawn(move || (0..N).map(|_| client(addr)).collect::<Vec<_>>());
            let mut accepted = 0;
            while accepted < N {
                let (conn, peer) = tokio::select! {
                    r = l1.accept() => r.unwrap(),
                    r = l2.accept() => r.unwrap(),
                };
                assert_eq!(conn.peer_addr(), Some(peer));
                assert!(peer.ip().is_loopback());
                conn.shutdown();
                accepted += 1;
            }
            let streams = clients.join().unwrap();
            assert_eq!(streams.len(), N);
        });
    }
}

#[test]
fn echo_with_many_small_iovecs() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            const N: usize = 200_000;
            let sent = pattern(7, N);
            let expect = sent.clone();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                let reader = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || s.write_all(&sent).unwrap());
                let mut got = vec![0u8; N];
                (&reader).read_exact(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == expect, "echoed bytes differ");
            });
            let (conn, _) = l.accept().await.unwrap();
            let mut echoed = 0;
            let mut iov = Vec::new();
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let mut max_batch = 0;
            let mut reads = 0;
            while echoed < N {
                let (res, b2) = conn.read(buf).await;
                buf = b2;
                let n = res.unwrap();
                assert!(n > 0, "unexpected EOF after {echoed} bytes");
                // Echo in 3-byte pieces, so a 64 KiB read becomes ~20k buffers (> MAX_IOVECS). Every
                // other read the pieces are copies, each in its own allocation, so none are adjacent
                // and the iovec limit loop runs; otherwise they are slices of the read buffer, back to
                // back, and are joined into a few iovecs.
                let adjacent = reads % 2 == 1;
                reads += 1;
                let mut chunk = buf.split().freeze();
                while !chunk.is_empty() {
                    let piece = chunk.split_to(chunk.len().min(3));
                    iov.push(if adjacent { piece } else { Bytes::copy_from_slice(&piece) });
                }
                max_batch = max_batch.max(iov.len());
                let before = writev_calls();
                let (res, v) = conn.write_all_vectored(std::mem::take(&mut iov)).await;
                res.unwrap();
                assert!(v.is_empty());
                iov = v;
                let calls = writev_calls() - before;
                let pieces = n.div_ceil(3);
                if adjacent {
                    // A blocking io_uring writev completes only once everything is queued: one op.
                    if b == Backend::Uring {
                        assert_eq!(calls, 1, "{pieces} adjacent pieces took {calls} writev ops");
                    }
                } else {
                    assert!(
                        calls as usize >= pieces.div_ceil(MAX_IOVECS),
                        "{calls} writev calls for {pieces} separate iovecs"
                    );
                }
                echoed += n;
                buf.reserve(64 * 1024);
            }
            assert!(max_batch > MAX_IOVECS, "the iovec limit loop never ran (largest batch {max_batch})");
            conn.shutdown();
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

/// Switches an io_uring connection's socket to O_NONBLOCK (or back). In the backend's normal
/// blocking mode the kernel completes a writev only once everything is queued, so short writes
/// would be rare; non-blocking mode makes io_uring return them, which exercises the loop.
fn uring_nonblocking(conn: &Conn, on: bool) {
    if let ConnIo::Uring(s) = &conn.io {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the fd belongs to `s`, which outlives this borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(s.as_raw_fd()) };
        socket2::SockRef::from(&fd).set_nonblocking(on).unwrap();
    }
}

#[test]
fn large_and_many_buffers_are_written_whole_and_in_order() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let big = Bytes::from(pattern(3, 4 << 20));
            let small: Vec<Bytes> = (0..3000u32).map(|i| Bytes::from(format!("<{i}>"))).collect();
            let mut expect = Vec::new();
            expect.extend_from_slice(&big);
            for s in &small {
                expect.extend_from_slice(s);
            }
            expect.extend_from_slice(&big);
            let total = expect.len();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                // Read nothing at first: 4 MiB cannot fit into the socket buffers of a peer that
                // is not reading, so the first write has to be partial.
                std::thread::sleep(Duration::from_millis(300));
                let mut got = vec![0u8; total];
                s.read_exact(&mut got).unwrap();
                assert!(got == expect, "received bytes differ");
                let mut rest = [0u8; 1];
                assert_eq!(s.read(&mut rest).unwrap(), 0, "expected EOF after the payload");
            });
            let (conn, _) = l.accept().await.unwrap();

            uring_nonblocking(&conn, true);
            let before = writev_calls();
            let (res, _) = conn.write_all_vectored(vec![big.clone()]).await;
            res.unwrap();
            let calls = writev_calls() - before;
            assert!(calls >= 2, "4 MiB went out in {calls} writev call(s): no partial write exercised");
            uring_nonblocking(&conn, false);

            // > MAX_IOVECS buffers, plus an empty one that must be skipped, plus 4 MiB (in the
            // backend's normal mode).
            let mut bufs = small.clone();
            bufs.insert(10, Bytes::new());
            bufs.push(big);
            let cap = bufs.capacity();
            let before = writev_calls();
            let (res, v) = conn.write_all_vectored(bufs).await;
            res.unwrap();
            assert!(v.is_empty());
            assert_eq!(v.capacity(), cap, "the caller's allocation comes back");
            assert!(writev_calls() - before >= 3, "3001 buffers need at least 3 writev calls");

            conn.shutdown();
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

#[test]
fn dropping_a_listener_with_a_parked_accept_frees_the_port() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let timed = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
            assert!(timed.is_err(), "nobody connected");
            drop(l);
            // Once the socket is really closed, a listener without SO_REUSEPORT can take the port.
            let mut rebound = None;
            for _ in 0..100 {
                if let Ok(s) = std::net::TcpListener::bind(addr) {
                    rebound = Some(s);
                    break;
                }
                sleep(Duration::from_millis(10)).await;
            }
            assert!(rebound.is_some(), "{addr} still held after the listener was dropped");
        });
    }
}

#[test]
fn accept_is_cancel_safe() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            // Abandon an accept, then let a client connect while no accept() is being polled.
            let timed = tokio::time::timeout(Duration::from_millis(50), l.accept()).await;
            assert!(timed.is_err());
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                s.write_all(b"x").unwrap();
                let mut one = [0u8; 1];
                assert_eq!(s.read(&mut one).unwrap(), 0);
            });
            sleep(Duration::from_millis(100)).await;
            let (conn, _) = l.accept().await.expect("the connection was not lost");
            let (res, buf) = conn.read(BytesMut::with_capacity(8)).await;
            assert_eq!(res.unwrap(), 1);
            assert_eq!(&buf[..], b"x");
            conn.shutdown();
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

#[test]
fn read_appends_and_reports_eof() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                s.write_all(b"hello ").unwrap();
                std::thread::sleep(Duration::from_millis(50));
                s.write_all(b"world").unwrap();
                // Dropping closes the connection: the server must see EOF.
            });
            let (conn, _) = l.accept().await.unwrap();
            let mut buf = BytesMut::with_capacity(8);
            buf.extend_from_slice(b"pre:");
            loop {
                let (res, b2) = conn.read(buf).await;
                buf = b2;
                if res.unwrap() == 0 {
                    break;
                }
            }
            assert_eq!(&buf[..], b"pre:hello world");
            // EOF is sticky.
            let (res, b2) = conn.read(buf).await;
            assert_eq!(res.unwrap(), 0);
            assert_eq!(&b2[..], b"pre:hello world");
            // A zero-capacity buffer is given room; on a closed peer the answer is still EOF.
            let (res, b3) = conn.read(BytesMut::new()).await;
            assert_eq!(res.unwrap(), 0);
            assert!(b3.capacity() > 0);
            conn.shutdown();
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

#[test]
fn a_connection_that_always_has_data_lets_the_core_run_other_tasks_between_full_reads() {
    // Epoll only: on io_uring every read completes in a later turn of the loop by nature.
    run_bounded(Backend::Epoll, async move {
        let l = Listener::bind(localhost()).unwrap();
        let addr = l.local_addr().unwrap();
        const N: usize = 8 << 20;
        let peer = std::thread::spawn(move || client(addr).write_all(&pattern(5, N)).unwrap());
        let (conn, _) = l.accept().await.unwrap();
        // Another task that is always ready, as a subscriber's writer is under a flood: it counts
        // how often the core polls it.
        let polls = Rc::new(Cell::new(0u64));
        let stop = Rc::new(Cell::new(false));
        let other = tokio::task::spawn_local({
            let (polls, stop) = (polls.clone(), stop.clone());
            std::future::poll_fn(move |cx| {
                if stop.get() {
                    return std::task::Poll::Ready(());
                }
                polls.set(polls.get() + 1);
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            })
        });
        let (mut got, mut full_reads) = (0, 0);
        // The other task's poll count when the previous read filled its buffer.
        let mut after_full: Option<u64> = None;
        let mut buf = BytesMut::with_capacity(4096);
        while got < N {
            buf.clear();
            let spare = buf.capacity();
            let (res, b) = conn.read(buf).await;
            buf = b;
            let n = res.unwrap();
            assert!(n > 0, "unexpected EOF after {got} bytes");
            got += n;
            if let Some(polls_then) = after_full {
                assert!(
                    polls.get() > polls_then,
                    "a read right after a full one did not let the other task run"
                );
            }
            after_full = (n == spare).then(|| polls.get());
            full_reads += usize::from(n == spare);
        }
        assert!(
            full_reads > 10,
            "the socket never had a full buffer's worth waiting ({full_reads} full reads)"
        );
        stop.set(true);
        other.await.unwrap();
        tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
    });
}

#[test]
fn full_buffer_gets_room_instead_of_false_eof() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                s.write_all(b"xyz").unwrap();
                let mut one = [0u8; 1];
                // Wait for the server to finish (it shuts the connection down).
                assert_eq!(s.read(&mut one).unwrap(), 0);
            });
            let (conn, _) = l.accept().await.unwrap();
            // A buffer with no spare capacity at all: a read of 0 bytes would look like EOF.
            let full = BytesMut::from(&b"aaaa"[..]);
            assert_eq!(full.len(), full.capacity(), "test needs a buffer without spare room");
            let (res, got) = conn.read(full).await;
            assert_eq!(res.unwrap(), 3);
            assert_eq!(&got[..], b"aaaaxyz");
            conn.shutdown();
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

#[test]
fn shutdown_completes_a_pending_read_in_another_task() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                // The client never sends; it only waits for the server's shutdown to reach it.
                let mut one = [0u8; 1];
                assert_eq!(s.read(&mut one).unwrap(), 0, "client should see EOF after shutdown");
            });
            let (conn, _) = l.accept().await.unwrap();
            let conn = Rc::new(conn);
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            let reader = conn.clone();
            spawn_local(async move {
                let (res, _) = reader.read(BytesMut::with_capacity(64)).await;
                let _ = tx.send(res);
            });
            sleep(Duration::from_millis(100)).await;
            assert!(
                matches!(rx.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)),
                "the read should still be pending"
            );
            conn.shutdown();
            let res = tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .expect("shutdown did not complete the pending read")
                .expect("reader task dropped");
            assert!(matches!(res, Ok(0) | Err(_)), "read after shutdown returned {res:?}");
            drop(conn);
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

#[test]
fn handoff_between_two_runtimes_keeps_the_connection_alive() {
    for b in backends() {
        let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
        let (conn_tx, conn_rx) = mpsc::channel::<(TcpStream, BytesMut)>();
        // Core A: accepts, reads the first bytes, hands the socket (and what it read) over.
        let a = std::thread::spawn(move || {
            run_bounded(b, async move {
                let l = Listener::bind(localhost()).unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                let (conn, _) = l.accept().await.unwrap();
                let mut buf = BytesMut::with_capacity(64);
                while buf.len() < 5 {
                    let (res, b2) = conn.read(buf).await;
                    buf = b2;
                    assert!(res.unwrap() > 0);
                }
                conn_tx.send((conn.into_std().unwrap(), buf)).unwrap();
            })
        });
        // Core B: adopts it and serves it from then on.
        let bthread = std::thread::spawn(move || {
            run_bounded(b, async move {
                let (stream, buf) = conn_rx.recv_timeout(LIMIT).unwrap();
                assert_eq!(&buf[..], b"hello");
                let conn = Conn::from_std(stream, b).unwrap();
                assert!(conn.peer_addr().is_some());
                let (res, _) = conn.write_all_vectored(vec![Bytes::from_static(b"world")]).await;
                res.unwrap();
                let mut buf = BytesMut::with_capacity(64);
                while buf.len() < 4 {
                    let (res, b2) = conn.read(buf).await;
                    buf = b2;
                    assert!(res.unwrap() > 0);
                }
                assert_eq!(&buf[..], b"more");
                let (res, _) = conn
                    .write_all_vectored(vec![Bytes::from_static(b"mo"), Bytes::from_static(b"re!")])
                    .await;
                res.unwrap();
                conn.shutdown();
            })
        });
        let addr = addr_rx.recv_timeout(LIMIT).unwrap();
        let mut s = client(addr);
        s.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");
        s.write_all(b"more").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"more!");
        let mut one = [0u8; 1];
        assert_eq!(s.read(&mut one).unwrap(), 0);
        a.join().unwrap();
        bthread.join().unwrap();
    }
}

#[test]
fn handoff_is_refused_after_an_abandoned_uring_read() {
    if let Err(e) = probe_uring() {
        eprintln!("note: io_uring backend not tested here: {e}");
        return;
    }
    run_bounded(Backend::Uring, async {
        let l = Listener::bind(localhost()).unwrap();
        let addr = l.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let mut s = client(addr);
            let mut one = [0u8; 1];
            // The refused hand-off shuts the socket down, so the client is not left hanging.
            assert_eq!(s.read(&mut one).unwrap(), 0);
        });
        let (conn, _) = l.accept().await.unwrap();
        // Dropping the read on timeout leaves the operation with the kernel.
        let timed =
            tokio::time::timeout(Duration::from_millis(50), conn.read(BytesMut::with_capacity(64))).await;
        assert!(timed.is_err(), "nothing was sent, the read must still be pending");
        assert!(conn.into_std().is_err());
        tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
    });
}

#[test]
fn sleep_waits_in_both_backends() {
    for b in backends() {
        run_bounded(b, async {
            let t = Instant::now();
            sleep(Duration::from_millis(50)).await;
            assert!(t.elapsed() >= Duration::from_millis(50));
        });
    }
}

#[test]
fn misuse_is_reported_not_panicked() {
    assert!(Listener::bind(localhost()).is_err(), "bind outside run");
    let std_listener = std::net::TcpListener::bind(localhost()).unwrap();
    let addr = std_listener.local_addr().unwrap();
    for b in backends() {
        assert_eq!(current_backend(), None);
        run_bounded(b, async move {
            assert_eq!(current_backend(), Some(b));
            let nested = run(b, async {});
            assert!(nested.is_err(), "nested run must be refused");
            let other = if b == Backend::Uring { Backend::Epoll } else { Backend::Uring };
            let s = TcpStream::connect(addr).unwrap();
            assert!(Conn::from_std(s, other).is_err(), "adopting for the wrong backend");
        });
        assert_eq!(current_backend(), None);
    }
}

#[test]
fn idle_set_reports_data_once_per_arm_and_our_own_shutdown() {
    for b in backends() {
        run_bounded(b, async move {
            let l = Listener::bind(localhost()).unwrap();
            let addr = l.local_addr().unwrap();
            let (go_tx, go_rx) = mpsc::channel::<()>();
            let peer = std::thread::spawn(move || {
                let mut s = client(addr);
                go_rx.recv().unwrap();
                s.write_all(b"ping").unwrap();
                // Then wait for the server's shutdown.
                let mut one = [0u8; 1];
                assert_eq!(s.read(&mut one).unwrap(), 0);
            });
            let (conn, _) = l.accept().await.unwrap();
            let idle = IdleSet::new().unwrap();
            let mut tokens = Vec::new();
            let quiet = Duration::from_millis(100);

            // Nothing to read: no token.
            idle.arm(&conn, 7).unwrap();
            assert!(tokio::time::timeout(quiet, idle.wait(&mut tokens)).await.is_err(), "{tokens:?}");
            // Data arrives: the token comes back, and the data is still there to read.
            go_tx.send(()).unwrap();
            tokio::time::timeout(LIMIT, idle.wait(&mut tokens)).await.unwrap().unwrap();
            assert_eq!(tokens, [7]);
            tokens.clear();
            // One-shot: not reported again until armed again, although the data is still unread.
            assert!(tokio::time::timeout(quiet, idle.wait(&mut tokens)).await.is_err(), "{tokens:?}");
            // Armed again while readable: reported at once, with the new token.
            idle.arm(&conn, 8).unwrap();
            tokio::time::timeout(LIMIT, idle.wait(&mut tokens)).await.unwrap().unwrap();
            assert_eq!(tokens, [8]);
            tokens.clear();
            let (res, buf) = conn.read(BytesMut::with_capacity(16)).await;
            assert_eq!(res.unwrap(), 4);
            assert_eq!(&buf[..], b"ping");
            // Drained and armed: a shutdown by the broker itself wakes it (that is how a parked
            // connection learns it was kicked).
            idle.arm(&conn, 9).unwrap();
            assert!(tokio::time::timeout(quiet, idle.wait(&mut tokens)).await.is_err(), "{tokens:?}");
            conn.shutdown();
            tokio::time::timeout(LIMIT, idle.wait(&mut tokens)).await.unwrap().unwrap();
            assert_eq!(tokens, [9]);
            tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        });
    }
}

/// A port on `127.0.0.<host>` that was free a moment ago. Each claim test has a loopback address of its
/// own, which the other tests' `127.0.0.1:0` binds never take.
fn free_addr(host: u8) -> SocketAddr {
    let l = std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0)).unwrap();
    l.local_addr().unwrap()
}

#[test]
fn a_claimed_address_is_refused_to_another_claim_but_shared_by_the_cores() {
    let addr = free_addr(2);
    for b in backends() {
        let claim = claim_address(addr).unwrap();
        let t = Instant::now();
        let second = claim_address(addr).err().expect("a second claim while the first is held");
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse, "{second}");
        // The lock answers at once: no waiting for a listener to go away.
        assert!(t.elapsed() < RELEASE_WAIT, "{:?}", t.elapsed());
        run_bounded(b, async move {
            // The claim leaves the cores their SO_REUSEPORT group.
            let l1 = Listener::bind(addr).expect("a core's listener beside the claim");
            let l2 = Listener::bind(addr).expect("another core's listener beside the claim");
            // Without its claim (an older broker, or one that lost the lock), the address is still
            // refused, because the cores' sockets listen there; only after the wait for a dying one.
            drop(claim);
            let t = Instant::now();
            let e = claim_address(addr).err().expect("a claim while the cores listen");
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
            assert!(t.elapsed() >= RELEASE_WAIT, "{:?}", t.elapsed());
            drop((l1, l2));
        });
        // Once the listeners are gone the address can be claimed again (the next backend does).
    }
    drop(claim_address(addr).expect("the address is free again"));
}

#[test]
fn a_foreign_listener_is_in_use_unless_it_goes_away_within_the_wait() {
    let addr = free_addr(3);
    let foreign = std::net::TcpListener::bind(addr).unwrap();
    let e = claim_address(addr).err().expect("a claim while another program listens");
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    assert_eq!(e.to_string(), "Address already in use (os error 98)", "the error of any port in use");
    // A listener that closes during the wait (a broker killed a moment ago) is waited for.
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(foreign);
    });
    let t = Instant::now();
    let claim = claim_address(addr).expect("the listener closed within the wait");
    assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < LIMIT, "{:?}", t.elapsed());
    closer.join().unwrap();
    drop(claim);
}

#[test]
fn time_wait_leftovers_of_a_previous_broker_do_not_block_a_claim() {
    use socket2::{Domain, Socket, Type};
    let addr = free_addr(4);
    {
        let l = bind_std(addr).unwrap(); // a core's listener: SO_REUSEADDR + SO_REUSEPORT
        let mut c = client(addr);
        let (s, _) = l.accept().unwrap();
        drop(s); // the broker's end closes first, so it is the one left in TIME_WAIT
        let mut byte = [0u8; 1];
        assert_eq!(c.read(&mut byte).unwrap(), 0);
    }
    // /proc/net/tcp: "local_address rem_address st", the IPv4 address as the kernel's u32 in hex.
    let std::net::IpAddr::V4(ip) = addr.ip() else { unreachable!() };
    let local = format!("{:08X}:{:04X}", u32::from_ne_bytes(ip.octets()), addr.port());
    let deadline = Instant::now() + LIMIT;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let time_wait = table.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[3] == "06"
        });
        if time_wait {
            break;
        }
        assert!(Instant::now() < deadline, "no TIME_WAIT socket on {addr}:\n{table}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The leftover does hold the address: a bind without SO_REUSEADDR is refused.
    let plain = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let refused = plain.bind(&addr.into()).expect_err("TIME_WAIT refuses a bind without SO_REUSEADDR");
    assert_eq!(refused.kind(), io::ErrorKind::AddrInUse);
    let t = Instant::now();
    let claim = claim_address(addr).expect("TIME_WAIT is no broker");
    assert!(t.elapsed() < RELEASE_WAIT, "claimed at once, not after the wait: {:?}", t.elapsed());
    drop(claim);
}

#[test]
fn port_zero_claims_nothing() {
    let addr = localhost();
    let a = claim_address(addr).unwrap();
    let b = claim_address(addr).expect("every bind to port 0 gets its own port");
    drop((a, b));
}
