//! The two tasks of one client connection: the reader (socket -> decoder -> core) and the writer
//! (outbox -> encoder -> one vectored write per wake-up).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rustls::{ServerConfig, ServerConnection};

use super::{after_batch, schedule_tick, wait_unblocked, CoreRef};
use crate::core::{check_connect, home_core, ConnCtl, Flow};
use crate::io::{self, Conn};
use crate::protocol::{self, ConnAck, Connect, ConnectReturnCode, DecodeError, Packet, ProtocolVersion};
use crate::session::{OutFrame, Outbox};
use crate::tls;
use crate::xcore::{ConnPermit, Handoff, XMsg};

/// First read buffer of a connection. Small, because an io_uring read holds its buffer while the
/// connection is idle (a typical CONNECT fits); it doubles when a read fills it, up to
/// [`READ_BUF_MAX`].
const READ_BUF_INITIAL: usize = 256;
const READ_BUF_MAX: usize = 64 * 1024;
/// How long a closing connection's writer may take to flush before the socket is shut down anyway.
const FLUSH_ON_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest CONNECT 3.1.1 allows (fixed header, variable header, five 16-bit-length fields): a
/// connection that has not sent CONNECT yet cannot make the broker buffer more than this.
const MAX_CONNECT_SIZE: usize = 5 + 12 + 5 * (2 + 65_535);

/// Below this much free space a read is not worth a syscall: get a fresh block instead.
const MIN_SPARE: usize = 256;

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
    mut buf: BytesMut,
) -> (std::io::Result<usize>, BytesMut) {
    let Some(tls) = tls else { return conn.read(buf).await };
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
                ctl.wake.notify_one();
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
    let ctl = Rc::new(ConnCtl::new(Some(conn.clone())));
    let key = core.borrow_mut().register(ctl.clone());
    let tls = match &transport.tls {
        Some(config) => match handshake(&conn, &ctl, config).await {
            Some(session) => Some(Rc::new(TlsConn::new(session))),
            None if ctl.is_closing() => return refuse(&core, key, &ctl, &conn, None, None, None).await,
            None => return refuse(&core, key, &ctl, &conn, None, None, Some("TLS handshake failed")).await,
        },
        None => None,
    };
    let tls_ref = tls.as_deref();
    let max_packet = core.borrow().settings().max_packet_size.min(MAX_CONNECT_SIZE);
    let mut buf = BytesMut::with_capacity(READ_BUF_INITIAL);
    let connect = loop {
        prepare_read(&mut buf, READ_BUF_INITIAL, max_packet);
        let (res, b) = read_plain(&conn, tls_ref, &ctl, buf).await;
        buf = b;
        if ctl.is_closing() {
            // The sweeper closed it (connect_timeout) and counted it.
            return refuse(&core, key, &ctl, &conn, tls_ref, None, None).await;
        }
        if !matches!(res, Ok(n) if n > 0) {
            return refuse(&core, key, &ctl, &conn, tls_ref, None, Some("closed before CONNECT")).await;
        }
        // MQTT-3.1.0-1: anything but CONNECT first is refused as soon as its first byte is seen, not
        // after buffering a whole (possibly huge) packet.
        if buf.first().is_some_and(|&b| b != 0x10) {
            return refuse(&core, key, &ctl, &conn, tls_ref, None, Some("first packet not CONNECT")).await;
        }
        match protocol::decode(&mut buf, ProtocolVersion::V3_1_1, max_packet) {
            Ok(Some(Packet::Connect(c))) => break c,
            // MQTT-3.1.0-1: the first packet must be CONNECT.
            Ok(Some(_)) => {
                return refuse(&core, key, &ctl, &conn, tls_ref, None, Some("first packet not CONNECT")).await
            }
            Ok(None) => continue,
            // MQTT-3.1.2-2: an unsupported level gets CONNACK 0x01, then the connection closes.
            Err(DecodeError::UnsupportedProtocolLevel { .. }) => {
                let code = Some(ConnectReturnCode::UnacceptableProtocolVersion);
                return refuse(&core, key, &ctl, &conn, tls_ref, code, Some("unacceptable protocol version"))
                    .await;
            }
            Err(_) => return refuse(&core, key, &ctl, &conn, tls_ref, None, Some("malformed CONNECT")).await,
        }
    };
    let mut connect = connect;
    let not_authorized = Some(ConnectReturnCode::NotAuthorized);
    if transport.identity_as_username {
        // Mutual TLS already authenticated the client: its certificate's name is its username, and the
        // password file is not consulted (mosquitto's use_identity_as_username).
        match tls_ref.and_then(|t| tls::identity(&t.session.borrow())) {
            Some(name) => {
                connect.username = Some(crate::protocol::Utf8Bytes::copy_from_str(&name));
                connect.password = None;
            }
            None => {
                let reason = Some("no identity in the client certificate");
                return refuse(&core, key, &ctl, &conn, tls_ref, not_authorized, reason).await;
            }
        }
    } else if !core.borrow_mut().authenticate(&connect, allow_anonymous) {
        // On the accepting core, before any session work: a refused client costs its home core nothing.
        let reason = match connect.username {
            Some(_) => "bad username or password",
            None => "anonymous not allowed",
        };
        return refuse(&core, key, &ctl, &conn, tls_ref, not_authorized, Some(reason)).await;
    }
    if !permit.granted() {
        let code = Some(ConnectReturnCode::ServerUnavailable);
        return refuse(&core, key, &ctl, &conn, tls_ref, code, Some("max_connections reached")).await;
    }
    let check = check_connect(&connect, core.borrow().settings());
    match check {
        Err(code) => {
            return refuse(&core, key, &ctl, &conn, tls_ref, Some(code), Some("identifier rejected")).await
        }
        Ok(false) => return refuse(&core, key, &ctl, &conn, tls_ref, None, Some("invalid will topic")).await,
        Ok(true) => {}
    }
    if connect.client_id.is_empty() {
        connect.client_id = core.borrow_mut().assign_client_id();
    }
    let (me, cores) = {
        let c = core.borrow();
        (c.id, c.cores())
    };
    let home = home_core(connect.client_id.as_str(), cores);
    if home == me {
        // A task of its own, so that this handshake's future (and its larger state) is freed now
        // rather than held for the connection's whole life.
        let link = Link { conn, tls };
        io::spawn_local(established(core, key, ctl, link, connect, buf, permit));
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
            let h = Handoff { stream, connect, buffered: buf, permit, tls };
            c.mesh.stage(home, XMsg::Handoff(h));
            c.end_batch();
            drop(c);
            schedule_tick(&core);
        }
        Err(e) => eprintln!("coremq: core {me}: hand-off failed: {e}"),
    }
}

/// A connection handed over by another core, with its CONNECT already read and checked.
pub async fn serve_handoff(core: CoreRef, h: Handoff) {
    let Handoff { stream, connect, buffered: buf, permit, tls } = h;
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
    let ctl = Rc::new(ConnCtl::new(Some(conn.clone())));
    let key = core.borrow_mut().register_handoff(ctl.clone());
    established(core, key, ctl, Link { conn, tls }, connect, buf, permit).await
}

/// Closes a connection that never got a session, after sending CONNACK `code` if given (encrypted on a
/// TLS connection, followed by close_notify), and counts it under `reason` (None: already counted).
async fn refuse(
    core: &CoreRef,
    key: usize,
    ctl: &Rc<ConnCtl>,
    conn: &Conn,
    tls: Option<&TlsConn>,
    code: Option<ConnectReturnCode>,
    reason: Option<&'static str>,
) {
    {
        let mut c = core.borrow_mut();
        c.unregister(key, ctl);
        if let Some(reason) = reason {
            c.stats.count_refused(reason);
        }
    }
    if let Some(code) = code {
        let mut out = BytesMut::new();
        protocol::encode(
            &Packet::ConnAck(ConnAck { session_present: false, code }),
            ProtocolVersion::V3_1_1,
            &mut out,
        );
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

/// Serves a connection whose session is on this core until it ends.
async fn established(
    core: CoreRef,
    key: usize,
    ctl: Rc<ConnCtl>,
    link: Link,
    mut connect: Box<Connect>,
    mut buf: BytesMut,
    // Held, not read: dropping it at the end releases this connection's place in max_connections.
    _permit: ConnPermit,
) {
    let Link { conn, tls } = link;
    // The CONNECT's strings are slices of the first read buffer; the session keeps them for its whole
    // life, so give them their own small allocations instead of pinning that buffer.
    connect.detach();
    let version = connect.protocol;
    let max_packet = {
        let mut c = core.borrow_mut();
        c.connect(key, *connect);
        c.end_batch();
        c.settings().max_packet_size
    };
    schedule_tick(&core);
    io::spawn_local(writer(core.clone(), ctl.clone(), conn.clone(), version, tls.clone()));
    let mut want = READ_BUF_INITIAL;
    let graceful = loop {
        // Decode and handle every complete packet in the buffer, in one borrow of the core.
        let flow = {
            let mut c = core.borrow_mut();
            // Subscriptions and retained messages other cores sent before this data arrived must be
            // visible to it ("subscribe takes effect at once"), so take them first; usually a no-op.
            c.drain_inbound();
            let now = Instant::now();
            let mut flow = Flow::Continue;
            while flow == Flow::Continue && !ctl.is_closing() {
                match protocol::decode(&mut buf, version, max_packet) {
                    Ok(Some(p)) => flow = c.handle(key, p, now),
                    Ok(None) => break,
                    Err(_) => flow = Flow::Close("malformed packet"),
                }
            }
            c.end_batch();
            flow
        };
        after_batch(&core);
        match flow {
            Flow::Continue => {}
            Flow::Disconnect => break true,
            Flow::Close(reason) => {
                core.borrow_mut().stats.count_closed(reason);
                break false;
            }
        }
        if ctl.is_closing() {
            break false;
        }
        wait_unblocked(&core, key, &ctl).await;
        prepare_read(&mut buf, want, max_packet);
        let spare = buf.capacity() - buf.len();
        let (res, b) = read_plain(&conn, tls.as_deref(), &ctl, buf).await;
        buf = b;
        let n = match res {
            Ok(n) if n > 0 && !ctl.is_closing() => n,
            _ => break false,
        };
        // A read that filled the buffer means more is waiting: read bigger next time.
        if n == spare && want < READ_BUF_MAX {
            want *= 2;
        }
        core.borrow_mut().touch(key, Instant::now());
    };
    {
        let mut c = core.borrow_mut();
        c.conn_closed(key, &ctl, graceful);
        c.end_batch();
    }
    schedule_tick(&core);
    ctl.close();
    // Let the writer flush what is queued (e.g. the CONNACK that preceded a protocol error), but not
    // forever: a peer that does not read must not keep the socket. Shutting down ends a stuck write.
    if !ctl.writer_finished() {
        // Boxed: a timer is large, and inline it would enlarge every idle connection's task.
        let _ = Box::pin(tokio::time::timeout(FLUSH_ON_CLOSE, ctl.writer_done.notified())).await;
    }
    conn.shutdown();
}

/// Writes the connection's outbox: everything queued since the last write goes out in one vectored
/// write, so a busy connection costs one syscall (or one ring submission) per loop tick, not per packet.
async fn writer(
    core: CoreRef,
    ctl: Rc<ConnCtl>,
    conn: Rc<Conn>,
    version: ProtocolVersion,
    tls: Option<Rc<TlsConn>>,
) {
    let mut iov: Vec<Bytes> = Vec::new();
    let mut stamps: Vec<Instant> = Vec::new();
    loop {
        encode_outbox(&mut ctl.outbox.borrow_mut(), version, &mut iov, &mut stamps);
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
            ctl.wake.notified().await;
            continue;
        }
        // Boxed: the write future is a few hundred bytes that an idle connection would otherwise carry
        // in its writer task forever; one allocation per write batch is cheaper than that memory.
        let (res, v) = Box::pin(conn.write_all_vectored(std::mem::take(&mut iov))).await;
        iov = v;
        iov.clear();
        if res.is_err() {
            ctl.kick();
            break;
        }
        if !stamps.is_empty() {
            let now = Instant::now();
            let mut c = core.borrow_mut();
            c.stats.msgs_out += stamps.len() as u64;
            for s in stamps.drain(..) {
                c.stats.record_latency(now.saturating_duration_since(s));
            }
        }
    }
    ctl.set_writer_finished();
    conn.shutdown();
}

/// Turns outbox frames into write buffers. Heads and control packets are encoded into one buffer
/// allocated per batch; payloads and shared QoS 0 frames are referenced, never copied.
fn encode_outbox(ob: &mut Outbox, version: ProtocolVersion, iov: &mut Vec<Bytes>, stamps: &mut Vec<Instant>) {
    if ob.is_empty() {
        return;
    }
    let mut head = BytesMut::with_capacity(ob.len() * 32);
    for f in ob.drain(..) {
        match f {
            OutFrame::Shared { frame, received } => {
                push_head(&mut head, iov);
                iov.push(frame);
                stamps.push(received);
            }
            OutFrame::Publish { msg, qos, pkid, dup, retain } => {
                protocol::encode_publish_head(
                    msg.topic.as_str(),
                    qos,
                    pkid,
                    dup,
                    retain,
                    msg.payload.len(),
                    &mut head,
                );
                if !msg.payload.is_empty() {
                    push_head(&mut head, iov);
                    iov.push(msg.payload);
                }
                stamps.push(msg.received);
            }
            OutFrame::Control(p) => protocol::encode(&p, version, &mut head),
        }
    }
    push_head(&mut head, iov);
}

fn push_head(head: &mut BytesMut, iov: &mut Vec<Bytes>) {
    if !head.is_empty() {
        iov.push(head.split().freeze());
    }
}
