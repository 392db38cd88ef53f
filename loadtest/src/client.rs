//! One MQTT 3.1.1 or 5.0 client connection, over plain TCP or TLS: handshake, batched writes, large reads
//! that yield many packets, and a clean close.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use coremq::protocol::{
    decode, encode, encode_publish_head, encode_publish_head_v5, reason, ConnAck, Connect, Disconnect,
    Packet, ProtocolVersion, QoS, Subscribe, SubscribeFilter, Utf8Bytes,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use crate::tls::{ReadAhead, Tls};

/// Read size: one read can carry hundreds of small PUBLISHes.
pub const READ_CHUNK: usize = 64 * 1024;
/// The largest packet MQTT can express; the swarm accepts whatever its broker sends.
const MAX_PACKET: usize = 268_435_455 + 5;
/// Keep-alive announced in CONNECT.
pub const KEEP_ALIVE_SECS: u16 = 60;

/// `io::Error` text without the " (os error 111)" suffix, for one-line messages.
pub fn io_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// What a CONNACK refusal (a v5 reason code; 3.1.1 codes arrive mapped to them) means.
fn code_text(code: u8) -> &'static str {
    match code {
        reason::SUCCESS => "accepted",
        reason::UNSUPPORTED_PROTOCOL_VERSION => "unacceptable protocol version",
        reason::CLIENT_IDENTIFIER_NOT_VALID => "identifier rejected",
        reason::SERVER_UNAVAILABLE => "server unavailable",
        reason::BAD_USERNAME_OR_PASSWORD => "bad user name or password",
        reason::NOT_AUTHORIZED => "not authorized",
        reason::QUOTA_EXCEEDED => "quota exceeded",
        _ => "refused",
    }
}

/// A client's byte stream. An enum rather than a trait object: the plaintext arm costs one match
/// per read or write batch, and the TLS state (kilobytes) is boxed so plaintext connections stay
/// small.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (`--tls-ca`) over a socket that reads ahead in large chunks.
    Tls(Box<TlsStream<ReadAhead>>),
}

impl Stream {
    /// The underlying socket.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0.tcp(),
        }
    }
}

/// A connected, CONNACKed client.
pub struct Conn {
    /// The stream; public so callers can `select!` on a read next to other events.
    pub stream: Stream,
    /// Bytes read but not yet decoded.
    pub rbuf: BytesMut,
    /// Bytes encoded but not yet written.
    pub wbuf: BytesMut,
    /// The protocol version of the connection (`--mqtt`).
    pub version: ProtocolVersion,
}

impl Conn {
    /// Opens a TCP connection to `addr`, with a TLS handshake if `tls` is given, sends CONNECT
    /// (clean session, `client_id`) and waits for an accepting CONNACK, all within `limit`. Errors
    /// are one line ("Connection refused", "TLS handshake: invalid peer certificate: UnknownIssuer",
    /// "CONNACK code 5 (not authorized)", "timed out after 10 s").
    pub async fn connect(
        addr: &str,
        tls: Option<&Tls>,
        version: ProtocolVersion,
        client_id: &str,
        persistent: bool,
        limit: Duration,
    ) -> Result<Conn, String> {
        match timeout(limit, Conn::connect_inner(addr, tls, version, client_id, persistent)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} s", limit.as_secs_f64())),
        }
    }

    async fn connect_inner(
        addr: &str,
        tls: Option<&Tls>,
        version: ProtocolVersion,
        client_id: &str,
        persistent: bool,
    ) -> Result<Conn, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| io_text(&e))?;
        // Writes are already batched by the swarm; Nagle would only add latency to the tail.
        tcp.set_nodelay(true).map_err(|e| io_text(&e))?;
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(t) => {
                let s = t
                    .connector
                    .connect(t.server_name.clone(), ReadAhead::new(tcp))
                    .await
                    .map_err(|e| format!("TLS handshake: {}", io_text(&e)))?;
                Stream::Tls(Box::new(s))
            }
        };
        let mut conn = Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(READ_CHUNK),
            version,
        };
        // A persistent session (`--persistent`): clean session = false on 3.1.1, a session expiry of an
        // hour on v5 (which also starts clean, so that each run measures a fresh session).
        let mut properties = coremq::protocol::properties::Properties::default();
        if persistent && version == ProtocolVersion::V5 {
            properties.session_expiry_interval = Some(3600);
        }
        let connect = Connect {
            protocol: version,
            clean_session: !persistent || version == ProtocolVersion::V5,
            keep_alive: KEEP_ALIVE_SECS,
            client_id: Utf8Bytes::copy_from_str(client_id),
            will: None,
            username: None,
            password: None,
            properties,
        };
        conn.queue(&Packet::Connect(Box::new(connect)));
        conn.flush().await.map_err(|e| io_text(&e))?;
        loop {
            // 0x15/0x16 start a TLS alert/handshake record; no broker packet starts that way (they
            // would be a CONNECT), so say what is most likely wrong instead of a decode error.
            if tls.is_none() && matches!(conn.rbuf.first(), Some(0x15 | 0x16)) {
                return Err("the broker answered with TLS: a TLS listener? (use --tls-ca FILE)".to_string());
            }
            match conn.next_packet()? {
                Some(Packet::ConnAck(ConnAck { code: reason::SUCCESS, .. })) => return Ok(conn),
                Some(Packet::ConnAck(ConnAck { code, .. })) => {
                    return Err(format!("CONNACK code 0x{code:02x} ({})", code_text(code)))
                }
                Some(other) => return Err(format!("expected CONNACK, got {}", packet_name(&other))),
                None => conn.read_more().await?,
            }
        }
    }

    /// Subscribes to `filter` at `qos` and waits for the SUBACK. `Ok(false)` if the broker
    /// answered with the failure code (0x80): the connection stays usable.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, limit: Duration) -> Result<bool, String> {
        let sub = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new(Utf8Bytes::copy_from_str(filter), qos)].into(),
            subscription_id: None,
        };
        self.queue(&Packet::Subscribe(sub));
        let wait = async {
            self.flush().await.map_err(|e| io_text(&e))?;
            loop {
                match self.next_packet()? {
                    Some(Packet::SubAck(ack)) if ack.pkid == 1 => {
                        return Ok(ack.codes.first().is_some_and(|&c| c < 0x80))
                    }
                    // Nothing is published before every subscriber is ready, so anything else
                    // is a broker oddity, not data to account for.
                    Some(_) => {}
                    None => self.read_more().await?,
                }
            }
        };
        match timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!("no SUBACK within {} s", limit.as_secs_f64())),
        }
    }

    /// Caps the kernel send buffer at `bytes` (Linux doubles it). For flooding publishers: with
    /// the default autotuned buffers (megabytes per socket) an open-loop QoS 0 flood mostly
    /// measures how many messages fit in the kernel, and a run's warmup backlog outlives the run.
    pub fn limit_send_buffer(&self, bytes: usize) {
        use std::os::fd::AsRawFd;
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: a valid socket fd owned by `self.stream`, and a pointer to a live c_int whose
        // size is what we pass. Failure only leaves the default buffer size, which is harmless.
        unsafe {
            libc::setsockopt(
                self.stream.tcp().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// Appends `p` to the write buffer.
    pub fn queue(&mut self, p: &Packet) {
        encode(p, self.version, &mut self.wbuf);
    }

    /// Appends the head of a PUBLISH (everything but its payload) in the connection's protocol layout.
    pub fn queue_publish_head(&mut self, topic: &str, qos: QoS, pkid: u16, payload_len: usize) {
        if self.version == ProtocolVersion::V5 {
            encode_publish_head_v5(topic, qos, pkid, false, false, &[], payload_len, &mut self.wbuf);
        } else {
            encode_publish_head(topic, qos, pkid, false, false, payload_len, &mut self.wbuf);
        }
    }

    /// Writes the whole write buffer in one go (as few syscalls as the kernel allows).
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            match &mut self.stream {
                Stream::Plain(s) => s.write_all(&self.wbuf).await?,
                Stream::Tls(s) => {
                    s.write_all(&self.wbuf).await?;
                    // rustls may have accepted the tail without writing it to the socket yet.
                    s.flush().await?;
                }
            }
            self.wbuf.clear();
        }
        Ok(())
    }

    /// A description of the negotiated TLS session ("TLSv1_3 TLS13_AES_256_GCM_SHA384"), if any.
    pub fn tls_session(&self) -> Option<String> {
        match &self.stream {
            Stream::Plain(_) => None,
            Stream::Tls(s) => {
                let c = s.get_ref().1;
                let version = c.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
                let suite =
                    c.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
                Some(format!("{version} {suite}"))
            }
        }
    }

    /// One read of up to [`READ_CHUNK`] bytes; the broker closing is an error.
    pub async fn read_more(&mut self) -> Result<(), String> {
        let n = read_chunk(&mut self.stream, &mut self.rbuf).await;
        after_read(n)
    }

    /// Decodes the next complete packet from the read buffer, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, String> {
        decode(&mut self.rbuf, self.version, MAX_PACKET).map_err(|e| format!("from broker: {e}"))
    }

    /// Sends DISCONNECT, half-closes and waits (at most a second) for the broker to close, so the
    /// socket never ends with a reset that could discard data the broker has not read yet.
    pub async fn close(mut self) {
        self.queue(&Packet::Disconnect(Disconnect::default()));
        if self.flush().await.is_err() {
            return;
        }
        // TLS: close_notify, then the TCP half-close.
        let shut = match &mut self.stream {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
        };
        if shut.is_err() {
            return;
        }
        let drain = async {
            loop {
                self.rbuf.clear();
                match read_chunk(&mut self.stream, &mut self.rbuf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        let _ = timeout(Duration::from_secs(1), drain).await;
    }
}

/// `read_buf` with room for a full chunk. Cancel-safe (tokio's `read_buf` is, and TLS records
/// read but not yet consumed stay in the rustls session), so it can be a `select!` branch.
pub async fn read_chunk(stream: &mut Stream, rbuf: &mut BytesMut) -> io::Result<usize> {
    rbuf.reserve(READ_CHUNK);
    match stream {
        Stream::Plain(s) => s.read_buf(rbuf).await,
        Stream::Tls(s) => s.read_buf(rbuf).await,
    }
}

/// One read of up to [`READ_CHUNK`] bytes only if data is there now: `Ok(None)` instead of
/// waiting. For extra reads after an awaited one.
pub async fn read_available(stream: &mut Stream, rbuf: &mut BytesMut) -> io::Result<Option<usize>> {
    rbuf.reserve(READ_CHUNK);
    match stream {
        Stream::Plain(s) => match s.try_read_buf(rbuf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            r => r.map(Some),
        },
        Stream::Tls(s) => {
            // rustls has no try_read: poll a read once. Dropping it pending is safe (see
            // read_chunk); the waker it registered at most causes one spurious wakeup.
            let mut read = pin!(s.read_buf(rbuf));
            poll_fn(|cx| match read.as_mut().poll(cx) {
                Poll::Pending => Poll::Ready(Ok(None)),
                Poll::Ready(r) => Poll::Ready(r.map(Some)),
            })
            .await
        }
    }
}

/// Turns the result of [`read_chunk`] into "got bytes" or a one-line error.
pub fn after_read(n: io::Result<usize>) -> Result<(), String> {
    match n {
        Ok(0) => Err("broker closed the connection".to_string()),
        Ok(_) => Ok(()),
        Err(e) => Err(io_text(&e)),
    }
}

/// Short packet name for error messages.
pub fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect(_) => "DISCONNECT",
        Packet::Auth(_) => "AUTH",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_text_drops_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_text(&e), "Connection refused");
        let e = io::Error::other("plain");
        assert_eq!(io_text(&e), "plain");
    }
}
