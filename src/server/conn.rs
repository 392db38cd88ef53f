//! The two tasks of one client connection: the reader (socket -> decoder -> core) and the writer
//! (outbox -> encoder -> one vectored write per wake-up).
//!
//! Only the sockets, TLS and the tasks' life cycle are here: what the tasks decide is in plain
//! functions shared with the `connection` fuzz target, [`admit`] (a new connection's CONNECT),
//! [`inbox`](super::inbox) (decoding into the core) and [`outbox`] (encoding for the client).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rustls::{ServerConfig, ServerConnection};

use super::admit::{self, FirstPacket, Hello, Login, Refusal};
use super::inbox::decode_batch;
use super::outbox::{self, encode_outbox, OutState};
use super::{after_batch, schedule_tick, wait_unblocked, CoreRef};
use crate::core::{home_core, ConnCtl, ConnKey, Flow};
use crate::io::{self, Conn};
use crate::protocol::{self, ProtocolVersion};
use crate::tls;
use crate::xcore::{ConnPermit, Control, Handoff};

/// First read buffer of a connection. Small, because an io_uring read holds its buffer while the
/// connection is idle (a typical CONNECT fits); it doubles when a read fills it, up to
/// [`READ_BUF_MAX`].
const READ_BUF_INITIAL: usize = 128;
const READ_BUF_MAX: usize = 64 * 1024;
/// How long a closing connection's writer may take to flush before the socket is shut down anyway.
const FLUSH_ON_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// Below this much free space a read is not worth a syscall: get a fresh block instead.
const MIN_SPARE: usize = 128;

/// Ciphertext read per socket read on a TLS connection: it starts small, because a pending read holds
/// its buffer while the connection is idle, and doubles when a read fills it, up to one whole TLS
/// record (16 KiB plus overhead). rustls reassembles records split across reads.
const TLS_READ_INITIAL: usize = 512;
const TLS_READ_MAX: usize = 16 * 1024 + 512;

/// What a listener asks of its connections' transport.
#[derive(Clone)]
pub struct Transport {
    /// `mqtts`: this core's TLS configuration for the listener.
    pub tls: Option<Arc<ServerConfig>>,
    /// The client certificate's common name is the username (mutual TLS, no password check).
    pub identity_as_username: bool,
}

/// A connection's TLS session, shared by its reader (which decrypts) and writer (which encrypts). Both
/// run on the core's thread and never hold the borrow across an await.
pub struct TlsConn {
    session: RefCell<ServerConnection>,
    /// Size of the next ciphertext read.
    read_size: std::cell::Cell<usize>,
}

impl TlsConn {
    fn new(session: ServerConnection) -> TlsConn {
        TlsConn { session: RefCell::new(session), read_size: std::cell::Cell::new(TLS_READ_INITIAL) }
    }
}

/// Reads plaintext into `buf`: straight from the socket, or by reading ciphertext and decrypting it.
/// Records the TLS session wants to send in answer (alerts, key updates) wake the writer through `ctl`.
async fn read_plain(
    conn: &Conn,
    tls: Option<&TlsConn>,
    ctl: &ConnCtl,
    buf: BytesMut,
) -> (std::io::Result<usize>, BytesMut) {
    let Some(tls) = tls else { return conn.read(buf).await };
    read_tls(conn, tls, ctl, buf).await
}

/// Reads plaintext from a TLS connection: reads ciphertext until rustls has some plaintext.
async fn read_tls(
    conn: &Conn,
    tls: &TlsConn,
    ctl: &ConnCtl,
    mut buf: BytesMut,
) -> (std::io::Result<usize>, BytesMut) {
    loop {
        match tls::read_plaintext(&mut tls.session.borrow_mut(), &mut buf) {
            Ok(Some(n)) => return (Ok(n), buf),
            Ok(None) => {}
            Err(e) => return (Err(e), buf),
        }
        let size = tls.read_size.get();
        let (res, cipher) = conn.read(BytesMut::with_capacity(size)).await;
        match res {
            Ok(0) => return (Ok(0), buf),
            Ok(n) if n >= size && size < TLS_READ_MAX => tls.read_size.set((size * 2).min(TLS_READ_MAX)),
            Ok(_) => {}
            Err(e) => return (Err(e), buf),
        }
        let fed = {
            let mut s = tls.session.borrow_mut();
            let fed = tls::feed(&mut s, &cipher);
            if s.wants_write() {
                ctl.wake_writer();
            }
            fed
        };
        if let Err(e) = fed {
            return (Err(e), buf);
        }
    }
}

/// Runs the TLS handshake of a new `mqtts` connection (bounded by `connect_timeout`: the sweeper shuts
/// the socket down). `None`: it failed; the alert, if any, was sent.
async fn handshake(conn: &Conn, ctl: &ConnCtl, config: &Arc<ServerConfig>) -> Option<ServerConnection> {
    let mut s = tls::new_session(config).ok()?;
    loop {
        if let Ok(Some(out)) = tls::take_output(&mut s) {
            if conn.write_all_vectored(vec![out]).await.0.is_err() {
                return None;
            }
        }
        if !s.is_handshaking() {
            return Some(s);
        }
        let (res, cipher) = conn.read(BytesMut::with_capacity(TLS_READ_MAX)).await;
        if ctl.is_closing() || !matches!(res, Ok(n) if n > 0) {
            return None;
        }
        if tls::feed(&mut s, &cipher).is_err() {
            if let Ok(Some(alert)) = tls::take_output(&mut s) {
                let _ = conn.write_all_vectored(vec![alert]).await;
            }
            return None;
        }
    }
}

/// Makes room for the next read: at least the rest of a partly received packet (bounded by
/// max_packet_size through `frame_len`) or a growing chunk.
fn prepare_read(buf: &mut BytesMut, want: usize, max_packet: usize) {
    let need = match protocol::frame_len(buf, max_packet) {
        Ok(Some(total)) => total.saturating_sub(buf.len()).min(READ_BUF_MAX),
        _ => 0,
    };
    let spare = buf.capacity() - buf.len();
    if spare < need.max(MIN_SPARE) {
        buf.reserve(need.max(want));
    }
}

/// A new connection on the core that accepted it: waits for CONNECT, authenticates and checks it, then
/// either serves it here or hands it to the home core of its client id. A client the listener's
/// `allow_anonymous` and the password file do not admit gets CONNACK 0x05.
pub async fn serve_new(
    core: CoreRef,
    conn: Conn,
    allow_anonymous: bool,
    transport: Transport,
    permit: ConnPermit,
) {
    let conn = Rc::new(conn);
    let ctl = core.borrow().new_ctl(Some(conn.clone()));
    let key = core.borrow_mut().register(ctl.clone(), Instant::now());
    let tls = match &transport.tls {
        Some(config) => match handshake(&conn, &ctl, config).await {
            Some(session) => Some(Rc::new(TlsConn::new(session))),
            None if ctl.is_closing() => return refuse(&core, key, &ctl, &conn, None, None).await,
            None => {
                let r = Some(Refusal::Close("TLS handshake failed"));
                return refuse(&core, key, &ctl, &conn, None, r).await;
            }
        },
        None => None,
    };
    let tls_ref = tls.as_deref();
    let max_packet_size = core.borrow().settings().max_packet_size;
    let mut buf = BytesMut::with_capacity(READ_BUF_INITIAL);
    let connect = loop {
        prepare_read(&mut buf, READ_BUF_INITIAL, admit::connect_limit(max_packet_size));
        let (res, b) = read_plain(&conn, tls_ref, &ctl, buf).await;
        buf = b;
        if ctl.is_closing() {
            // The sweeper closed it (connect_timeout) and counted it.
            return refuse(&core, key, &ctl, &conn, tls_ref, None).await;
        }
        if !matches!(res, Ok(n) if n > 0) {
            let r = Some(Refusal::Close("closed before CONNECT"));
            return refuse(&core, key, &ctl, &conn, tls_ref, r).await;
        }
        match admit::read_connect(&mut buf, max_packet_size) {
            FirstPacket::More => {}
            FirstPacket::Connect(c) => break c,
            FirstPacket::Refuse(r) => return refuse(&core, key, &ctl, &conn, tls_ref, Some(r)).await,
        }
    };
    let login = if transport.identity_as_username {
        Login::Certificate(tls_ref.and_then(|t| tls::identity(&t.session.borrow())))
    } else {
        Login::Password { allow_anonymous }
    };
    let admitted = admit::admit(&mut core.borrow_mut(), connect, login, permit.granted(), Instant::now());
    let hello = match admitted {
        Ok(hello) => hello,
        Err(r) => return refuse(&core, key, &ctl, &conn, tls_ref, Some(r)).await,
    };
    let (me, cores) = {
        let c = core.borrow();
        (c.id, c.cores())
    };
    let home = home_core(hello.connect.client_id.as_str(), cores);
    if home == me {
        // The connection's own tasks take over, so that this handshake's future (and its larger state)
        // is freed now rather than held for the connection's whole life.
        start(core, key, ctl, Link { conn, tls }, hello, buf, permit);
        return;
    }
    // Hand-off: the session lives on `home`. No operation is in flight on the socket now.
    core.borrow_mut().unregister(key, &ctl);
    drop(ctl);
    let Ok(conn) = Rc::try_unwrap(conn) else { return };
    let tls = match tls.map(Rc::try_unwrap) {
        Some(Ok(t)) => Some(Box::new(t.session.into_inner())),
        Some(Err(_)) => return,
        None => None,
    };
    match conn.into_std() {
        Ok(stream) => {
            let mut c = core.borrow_mut();
            let Hello { connect, assigned } = hello;
            let h = Handoff { stream, connect, assigned, buffered: buf, permit, tls };
            c.mesh.stage(home, Control::Handoff(h).into());
            c.end_batch(Instant::now());
            drop(c);
            schedule_tick(&core);
        }
        Err(e) => eprintln!("coremq: core {me}: hand-off failed: {e}"),
    }
}

/// A connection handed over by another core, with its CONNECT already read and checked: adopts the
/// socket and starts the connection's tasks.
pub fn serve_handoff(core: CoreRef, h: Handoff) {
    let Handoff { stream, connect, assigned, buffered: buf, permit, tls } = h;
    let tls = tls.map(|s| Rc::new(TlsConn::new(*s)));
    let adopted = match io::current_backend() {
        Some(backend) => Conn::from_std(stream, backend),
        None => Err(std::io::Error::other("not inside a core's runtime")),
    };
    let conn = match adopted {
        Ok(c) => Rc::new(c),
        Err(e) => {
            eprintln!("coremq: adopting a handed-off connection failed: {e}");
            return;
        }
    };
    let ctl = core.borrow().new_ctl(Some(conn.clone()));
    let key = core.borrow_mut().register_handoff(ctl.clone(), Instant::now());
    start(core, key, ctl, Link { conn, tls }, Hello { connect, assigned }, buf, permit);
}

/// Closes a connection that never got a session, after sending a CONNACK refusal if `r` says so
/// (encrypted on a TLS connection, followed by close_notify), and counts it. `None`: already counted
/// (the sweeper closed it), just close.
async fn refuse(
    core: &CoreRef,
    key: ConnKey,
    ctl: &Rc<ConnCtl>,
    conn: &Conn,
    tls: Option<&TlsConn>,
    r: Option<Refusal>,
) {
    {
        let mut c = core.borrow_mut();
        c.unregister(key, ctl);
        if let Some(r) = r {
            c.stats.count_refused(r.reason());
        }
    }
    if let Some((version, connack)) = r.and_then(|r| r.connack()) {
        let mut out = BytesMut::new();
        protocol::encode(&connack, version, &mut out);
        let mut iov = vec![out.freeze()];
        if let Some(t) = tls {
            let mut s = t.session.borrow_mut();
            s.send_close_notify();
            iov = tls::encrypt(&mut s, &iov).ok().flatten().into_iter().collect();
        }
        let _ = conn.write_all_vectored(iov).await;
    }
    conn.shutdown();
}

/// A connection's socket and, on an `mqtts` listener, its TLS session.
struct Link {
    conn: Rc<Conn>,
    tls: Option<Rc<TlsConn>>,
}

/// A connection that was silent for this long before its last read stops reading after it: it parks
/// (see [`park`]) instead of keeping a read in flight. A connection that talks more often never parks,
/// so a busy one pays nothing; one that parks pays an `epoll_ctl` and a task start per wake-up.
const PARK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Attaches a connection whose session is on this core and starts its two tasks: the writer, and the
/// reader, which serves it until it ends.
fn start(
    core: CoreRef,
    key: ConnKey,
    ctl: Rc<ConnCtl>,
    link: Link,
    hello: Hello,
    mut buf: BytesMut,
    permit: ConnPermit,
) {
    // The CONNECT (about 1 KB with its v5 properties) is consumed here, before any task starts: no
    // task state keeps it for the connection's whole life.
    let (version, aliases, max_packet) = {
        let Hello { connect, assigned } = hello;
        let mut connect = *connect;
        // The CONNECT's strings are slices of the first read buffer; the session keeps them for its
        // whole life, so give them their own small allocations instead of pinning that buffer.
        connect.detach();
        let version = connect.protocol;
        let aliases = outbox::alias_max(&connect);
        let mut c = core.borrow_mut();
        c.connect(key, connect, assigned, Instant::now());
        c.end_batch(Instant::now());
        (version, aliases, c.settings().max_packet_size)
    };
    schedule_tick(&core);
    if buf.is_empty() {
        // Decoding the CONNECT made the first buffer shared (a 40-byte header beside it); nothing
        // refers to it any more, so the next read gets a plain buffer instead.
        buf = BytesMut::new();
    }
    let reader = Reader { key, ctl, link, version, alias_max: aliases, max_packet, permit };
    spawn_writer(&core, &reader);
    // Quiet from the start: a client that says nothing after CONNECT parks at once.
    io::spawn_local(reading(core, reader, buf, true));
}

/// The reading side of an established connection: what its reading task needs, and all a parked
/// connection keeps of it.
pub(super) struct Reader {
    key: ConnKey,
    ctl: Rc<ConnCtl>,
    link: Link,
    version: ProtocolVersion,
    /// The client's Topic Alias Maximum (v5), for the writer.
    alias_max: u16,
    max_packet: usize,
    /// Held, not read: dropping it releases this connection's place in max_connections.
    #[allow(dead_code)] // held for its Drop
    permit: ConnPermit,
}

/// Starts the connection's writer task. A new writer starts with no topic aliases assigned: sending
/// a topic name with an alias again just maps it anew, which v5 allows.
fn spawn_writer(core: &CoreRef, r: &Reader) {
    let out = OutState::new(r.version, r.alias_max);
    io::spawn_local(writer(core.clone(), r.ctl.clone(), r.link.conn.clone(), out, r.link.tls.clone()));
}

/// Stops reading a quiet connection: its socket joins the core's idle set and this task's state is
/// kept in the core's parked list until [`unpark`] starts a new reading task. Its writer ends too once
/// its outbox is empty ([`ConnCtl::retire_writer`]), and [`start_writer`] starts one again when
/// something is queued, so an idle connection has no task at all. Gives the reader back
/// when the connection cannot park (no idle set, or arming failed): it then keeps reading.
fn park(core: &CoreRef, r: Reader) -> Result<(), Reader> {
    let Some(idle) = core.idle.as_ref() else { return Err(r) };
    let mut parked = core.parked.borrow_mut();
    let entry = parked.vacant_entry();
    // Generation 0 is skipped when the counter wraps, so that a token is never 0.
    let gen = core.park_gen.get().checked_add(1).unwrap_or(1);
    core.park_gen.set(gen);
    let token = park_token(entry.key(), gen);
    if idle.arm(&r.link.conn, token).is_err() {
        return Err(r);
    }
    let ctl = r.ctl.clone();
    entry.insert((gen, r));
    drop(parked);
    if core.borrow_mut().note_parked(&ctl) {
        crate::alloc::release_free_memory();
    }
    // Its writer retires too once it has nothing to write.
    ctl.set_parked(token);
    Ok(())
}

/// A park's token: the parked list's index (below 2^32: one per connection) and the park's generation,
/// so that a token left over from an earlier park of the same slot is told apart. Never 0 (generations
/// are never 0), which [`ConnCtl`] uses for "not parked".
fn park_token(index: usize, gen: u32) -> u64 {
    (u64::from(gen) << 32) | (index as u64 & 0xffff_ffff)
}

fn split_park_token(token: u64) -> (usize, u32) {
    ((token & 0xffff_ffff) as usize, (token >> 32) as u32)
}

/// The socket of a parked connection became readable (data, end of stream, or the broker shut it down
/// to close it): start its reading task again. Tokens of parks that are over are ignored.
pub(super) fn unpark(core: &CoreRef, token: u64) {
    let (index, gen) = split_park_token(token);
    let reader = {
        let mut parked = core.parked.borrow_mut();
        if !parked.get(index).is_some_and(|(g, _)| *g == gen) {
            return;
        }
        let (_, r) = parked.remove(index);
        if parked.is_empty() {
            // After a storm of idle connections, give the list's memory back.
            parked.shrink_to_fit();
        }
        r
    };
    reader.ctl.set_parked(0);
    if reader.ctl.take_writer_gone() {
        spawn_writer(core, &reader);
    }
    io::spawn_local(reading(core.clone(), reader, BytesMut::new(), false));
}

/// Something was queued for a parked connection whose writer retired: start a writer again (the reader
/// stays parked). Tokens of parks that are over are ignored: unparking started the writer then.
pub(super) fn start_writer(core: &CoreRef, token: u64) {
    let (index, gen) = split_park_token(token);
    let parked = core.parked.borrow();
    if let Some((g, r)) = parked.get(index) {
        if *g == gen && r.ctl.take_writer_gone() {
            spawn_writer(core, r);
        }
    }
}

/// Serves a connection's incoming side until it ends or parks: decodes and handles what `buf` holds,
/// then reads on. `quiet`: the connection was silent for [`PARK_AFTER`] before its last read, so it
/// parks once it has nothing left to decode.
///
/// A function returning an `async move` block rather than an `async fn`: an `async fn` keeps its
/// arguments twice in its state (as passed and as bound), and this future is what a connection that
/// talks costs while it waits.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn reading(
    core: CoreRef,
    mut r: Reader,
    mut buf: BytesMut,
    mut quiet: bool,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut want = READ_BUF_INITIAL;
        let graceful = loop {
            // Decode and handle every complete packet in the buffer, in one borrow of the core.
            let flow = {
                let mut c = core.borrow_mut();
                // Subscriptions and retained messages other cores sent before this data arrived must be
                // visible to it ("subscribe takes effect at once"), so take them first; usually a no-op.
                let now = Instant::now();
                c.drain_inbound(now);
                let flow =
                    decode_batch(&mut buf, r.version, r.max_packet, &r.ctl, |p| c.handle(r.key, p, now));
                if let Flow::Close(code, why) = flow {
                    // v5: tell the client why before closing (MQTT-4.13.1-1).
                    c.send_disconnect(r.key, code, why);
                }
                c.end_batch(now);
                flow
            };
            after_batch(&core);
            match flow {
                Flow::Continue => {}
                Flow::Disconnect { will: false } => break true,
                Flow::Disconnect { will: true } => break false,
                Flow::Close(_, why) => {
                    core.borrow_mut().stats.count_closed(why);
                    break false;
                }
            }
            if r.ctl.is_closing() {
                break false;
            }
            wait_unblocked(&core, r.key, &r.ctl).await;
            // TLS connections never park: rustls may hold plaintext the socket no longer signals.
            if quiet && buf.is_empty() && r.link.tls.is_none() && !r.ctl.is_closing() {
                match park(&core, r) {
                    Ok(()) => return,
                    Err(back) => r = back,
                }
            }
            prepare_read(&mut buf, want, r.max_packet);
            let spare = buf.capacity() - buf.len();
            // The plain read is awaited here directly and a TLS one boxed: a connection waits in this
            // future, and a nested `async fn` would carry both paths and extra copies of their arguments.
            let (res, b) = match r.link.tls.as_deref() {
                None => r.link.conn.read(buf).await,
                Some(t) => Box::pin(read_tls(&r.link.conn, t, &r.ctl, buf)).await,
            };
            buf = b;
            let n = match res {
                Ok(n) if n > 0 && !r.ctl.is_closing() => n,
                _ => break false,
            };
            // A read that filled the buffer means more is waiting: read bigger next time.
            if n == spare && want < READ_BUF_MAX {
                want *= 2;
            }
            quiet = core.borrow_mut().touch(r.key, Instant::now()) >= PARK_AFTER;
        };
        {
            let mut c = core.borrow_mut();
            let now = Instant::now();
            c.conn_closed(r.key, &r.ctl, graceful, now);
            c.end_batch(now);
        }
        schedule_tick(&core);
        r.ctl.close();
        // Let the writer flush what is queued (e.g. the CONNACK that preceded a protocol error), but not
        // forever: a peer that does not read must not keep the socket. Shutting down ends a stuck write.
        if !r.ctl.writer_finished() {
            // Boxed: a timer is large, and inline it would enlarge every connection's reading task.
            let _ = Box::pin(tokio::time::timeout(FLUSH_ON_CLOSE, r.ctl.writer_done())).await;
        }
        r.link.conn.shutdown();
        // Dropping the reader releases the connection's place in max_connections.
        drop(r);
    }
}

/// Writes the connection's outbox: everything queued since the last write goes out in one vectored
/// write, so a busy connection costs one syscall (or one ring submission) per loop tick, not per packet.
///
/// An `async move` block for the reason given at [`reading`].
#[allow(clippy::manual_async_fn)] // on purpose: see reading
fn writer(
    core: CoreRef,
    ctl: Rc<ConnCtl>,
    conn: Rc<Conn>,
    mut out: OutState,
    tls: Option<Rc<TlsConn>>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let mut iov: Vec<Bytes> = Vec::new();
        let mut stamps: Vec<Instant> = Vec::new();
        let mut first = true;
        loop {
            if iov.capacity() == 0 && !ctl.outbox.borrow().is_empty() {
                (iov, stamps) = SPARE_LISTS.with_borrow_mut(|l| l.pop()).unwrap_or_default();
            }
            {
                let mut ob = ctl.outbox.borrow_mut();
                if !ob.is_empty() {
                    encode_outbox(&mut ob, &mut out, &mut iov, &mut stamps, Instant::now());
                }
            }
            if let Some(t) = &tls {
                let mut s = t.session.borrow_mut();
                if ctl.is_closing() && iov.is_empty() {
                    s.send_close_notify();
                }
                // Also sends what the reader's side of the session produced (alerts, key updates).
                match tls::encrypt(&mut s, &iov) {
                    Ok(records) => {
                        iov.clear();
                        iov.extend(records);
                    }
                    Err(_) => {
                        ctl.kick();
                        break;
                    }
                }
            }
            if iov.is_empty() {
                if ctl.is_closing() {
                    break;
                }
                give_back_lists(&mut iov, &mut stamps);
                if ctl.retire_writer() {
                    // The reader is parked and nothing is queued: end this task (see `park`).
                    return;
                }
                ctl.writer_wait().await;
                continue;
            }
            // Boxed: the write future is a few hundred bytes that an idle connection would otherwise carry
            // in its writer task forever; one allocation per write batch is cheaper than that memory.
            let (res, v) = Box::pin(conn.write_all_vectored(std::mem::take(&mut iov))).await;
            iov = v;
            iov.clear();
            if first {
                first = false;
                // The first batch is usually the CONNACK alone. It does not count as traffic, so that a
                // client that connects and then says nothing has its writer retire as soon as the reader
                // parks; and its outbox allocation goes back now, while the allocator can hand the block
                // to the next connection, rather than at the next sweep, when it would leave a hole among
                // long-lived blocks (measured: ~200 B per idle connection).
                let mut ob = ctl.outbox.borrow_mut();
                if ob.is_empty() {
                    ob.shrink_to_fit();
                }
            } else {
                ctl.set_wrote();
            }
            if res.is_err() {
                ctl.kick();
                break;
            }
            if !stamps.is_empty() {
                outbox::record_sent(&mut core.borrow_mut().stats, &mut stamps, Instant::now());
            }
        }
        ctl.set_writer_finished();
        conn.shutdown();
    }
}

thread_local! {
    /// Write lists (iovecs, and the receive times of the messages in them) that no writer on this core
    /// is using: a writer takes a pair for a batch and gives it back before it waits, so an idle
    /// connection holds none and a busy one allocates none.
    static SPARE_LISTS: RefCell<Vec<(Vec<Bytes>, Vec<Instant>)>> = const { RefCell::new(Vec::new()) };
}

/// At most this many pairs wait in [`SPARE_LISTS`]; lists longer than [`SPARE_LIST_MAX`] entries (a
/// burst) are freed rather than kept.
const SPARE_LISTS_MAX: usize = 256;
const SPARE_LIST_MAX: usize = 1024;

/// Returns a writer's (empty) lists to [`SPARE_LISTS`], or frees them.
fn give_back_lists(iov: &mut Vec<Bytes>, stamps: &mut Vec<Instant>) {
    let mut pair = (std::mem::take(iov), std::mem::take(stamps));
    pair.0.clear();
    pair.1.clear();
    if pair.0.capacity() == 0 || pair.0.capacity() > SPARE_LIST_MAX || pair.1.capacity() > SPARE_LIST_MAX {
        return;
    }
    SPARE_LISTS.with_borrow_mut(|l| {
        if l.len() < SPARE_LISTS_MAX {
            l.push(pair);
        }
    });
}

/// The core shuts a socket down on a kick through this (it names no I/O type itself).
impl crate::core::Shutdown for Conn {
    fn shutdown(&self) {
        Conn::shutdown(self);
    }
}
