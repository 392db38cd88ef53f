//! `--tls-ca`: the rustls client configuration every connection of a run shares, and
//! [`ReadAhead`], the socket wrapper that keeps TLS reads as large as plaintext ones.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::client::READ_CHUNK;

/// How to wrap every connection of a run in TLS: the verified CA and the name the broker's
/// certificate must carry.
#[derive(Clone)]
pub struct Tls {
    /// Shared client configuration (roots, ring provider, TLS 1.2 and 1.3).
    pub connector: TlsConnector,
    /// The `--host` value, which the certificate must name (an IP SAN for an address).
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl Tls {
    /// A configuration trusting the PEM certificates of `ca_file` and expecting the broker's
    /// certificate to name `host`. Errors are one line, naming the option.
    pub fn new(ca_file: &Path, host: &str) -> Result<Tls, String> {
        let what = format!("--tls-ca {}", ca_file.display());
        let pem = std::fs::read(ca_file).map_err(|e| format!("{what}: {}", crate::client::io_text(&e)))?;
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{what}: bad PEM: {}", crate::client::io_text(&e)))?;
            roots.add(cert).map_err(|e| format!("{what}: unusable CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("{what}: no CERTIFICATE in the file"));
        }
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| format!("--host {host}: not a valid TLS server name or IP address"))?;
        // An explicit provider rather than the process default: nothing else has to install one.
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls { connector: TlsConnector::from(Arc::new(config)), server_name })
    }
}

/// A TCP socket that reads up to [`READ_CHUNK`] bytes per syscall on behalf of rustls.
///
/// rustls asks its transport for about 4 KiB at a time, so a 64 KiB burst of records would cost
/// sixteen `read`s over a bare socket where the plaintext path needs one. The buffer only exists
/// while it holds data: idle connections (a storm of thousands) keep none.
pub struct ReadAhead {
    tcp: TcpStream,
    /// Bytes read from the socket; `buf[pos..]` is not yet handed out.
    buf: Vec<u8>,
    pos: usize,
}

impl ReadAhead {
    /// Wraps a connected socket.
    pub fn new(tcp: TcpStream) -> ReadAhead {
        ReadAhead { tcp, buf: Vec::new(), pos: 0 }
    }

    /// The socket, for socket options.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Fills the (empty) buffer with one read of whatever the socket has, up to [`READ_CHUNK`].
    /// `Ok(0)` is end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if let Err(e) = ready!(self.tcp.poll_read_ready(cx)) {
                return Poll::Ready(Err(e));
            }
            self.buf.clear();
            self.pos = 0;
            self.buf.reserve_exact(READ_CHUNK);
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                // Readiness was stale; poll_read_ready has cleared it and will register the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = Vec::new(),
                Err(e) => {
                    self.buf = Vec::new();
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos >= this.buf.len() {
            if out.remaining() >= READ_CHUNK {
                // A caller asking for a whole chunk gains nothing from a copy.
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Ok(())); // end of stream: nothing put in `out`
            }
        }
        let avail = this.buf.get(this.pos..).unwrap_or_default();
        let n = avail.len().min(out.remaining());
        out.put_slice(avail.get(..n).unwrap_or_default());
        this.pos += n;
        if this.pos >= this.buf.len() {
            // Drained: give the memory back rather than pin 64 KiB to every idle connection.
            this.buf = Vec::new();
            this.pos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // rustls hands over its queued records as one vector: one writev, as the socket would.
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_are_one_line() {
        let e = Tls::new(Path::new("/nonexistent/ca.pem"), "127.0.0.1").unwrap_err();
        assert!(e.starts_with("--tls-ca /nonexistent/ca.pem: No such file"), "{e}");
        let dir = std::env::temp_dir().join(format!("swarm-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"not a pem file\n").unwrap();
        let e = Tls::new(&empty, "127.0.0.1").unwrap_err();
        assert!(e.ends_with("no CERTIFICATE in the file"), "{e}");
        assert!(!e.contains('\n'));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn read_ahead_serves_small_reads_from_one_large_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(&sent).await.unwrap();
            s.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(TcpStream::connect(addr).await.unwrap());
        writer.await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 1000];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        assert!(r.buf.is_empty(), "a drained buffer is released");
    }
}
