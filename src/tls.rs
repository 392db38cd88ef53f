//! TLS for `mqtts` listeners (rustls, TLS 1.2 and 1.3): building a server configuration from PEM files,
//! the client certificate's identity, and moving bytes between a socket's ciphertext and the broker's
//! plaintext. No I/O here: the runtime reads and writes the socket and hands the bytes over.
//!
//! Each core builds its own `ServerConfig` (rustls keeps a session cache behind a lock inside it), so
//! cores never contend on one.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// The files of one TLS listener, as named in the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one of them.
    pub client_ca: Option<PathBuf>,
    /// The client certificate's subject CN becomes the username (needs `client_ca`).
    pub use_identity_as_username: bool,
}

fn read_pem(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM certificate: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// Reads the files and builds a server configuration. `Err` is one line naming the file.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs(&files.cert)?;
    let key_pem = read_pem(&files.key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: bad PEM private key: {e}", files.key.display()))?
        .ok_or_else(|| format!("{}: no private key in the file", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certs(ca)? {
                roots.add(c).map_err(|e| format!("{}: unusable CA certificate: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(config))
}

/// The subject common name of the client's certificate, if it sent one and it has a CN.
pub fn identity(session: &ServerConnection) -> Option<String> {
    let cert = session.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A new server-side session with no limit on buffered output: the broker bounds what it queues for a
/// connection itself (outbox, session queue), and a limit here would make a write fail half-way.
pub fn new_session(config: &Arc<ServerConfig>) -> Result<ServerConnection, String> {
    let mut s = ServerConnection::new(config.clone()).map_err(|e| e.to_string())?;
    s.set_buffer_limit(None);
    Ok(s)
}

/// Feeds ciphertext read from the socket into the session and processes it. `Err` is a TLS error
/// (the alert to send is then waiting in [`take_output`]).
pub fn feed(session: &mut ServerConnection, mut ciphertext: &[u8]) -> io::Result<()> {
    while !ciphertext.is_empty() {
        session.read_tls(&mut ciphertext)?;
        session.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(())
}

/// Moves decrypted plaintext into the spare room of `buf`. `Ok(Some(n))`: n bytes (0 = the peer closed
/// the TLS session cleanly); `Ok(None)`: nothing decrypted yet, read more ciphertext.
pub fn read_plaintext(session: &mut ServerConnection, buf: &mut BytesMut) -> io::Result<Option<usize>> {
    let start = buf.len();
    let room = buf.capacity() - start;
    if room == 0 {
        buf.reserve(4096);
    }
    buf.resize(buf.capacity(), 0);
    let got = session.reader().read(&mut buf[start..]);
    match got {
        Ok(n) => {
            buf.truncate(start + n);
            Ok(Some(n))
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            buf.truncate(start);
            Ok(None)
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

/// Encrypts `plaintext` (the broker's frames for this write) and returns the records to send, plus any
/// handshake or alert records the session had waiting. One copy per write batch: TLS has to transform
/// every byte anyway.
pub fn encrypt(session: &mut ServerConnection, plaintext: &[Bytes]) -> io::Result<Option<Bytes>> {
    for b in plaintext {
        session.writer().write_all(b)?;
    }
    take_output(session)
}

/// The records the session wants sent (handshake messages, alerts, encrypted data), if any.
pub fn take_output(session: &mut ServerConnection) -> io::Result<Option<Bytes>> {
    if !session.wants_write() {
        return Ok(None);
    }
    let mut out = Vec::new();
    while session.wants_write() {
        session.write_tls(&mut out)?;
    }
    Ok(Some(Bytes::from(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_are_one_line_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("coremq-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a pem file\n").unwrap();
        let files = |cert: &Path, key: &Path| TlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            use_identity_as_username: false,
        };
        let e = server_config(&files(&dir.join("absent.pem"), &junk)).unwrap_err();
        assert!(e.contains("absent.pem") && e.starts_with("cannot read"), "{e}");
        let e = server_config(&files(&junk, &junk)).unwrap_err();
        assert!(e.contains("junk.pem") && e.contains("no certificate"), "{e}");
        assert!(!e.contains('\n'));
        let _ = std::fs::remove_dir_all(dir);
    }
}
