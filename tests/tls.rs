//! TLS listeners (`protocol = "mqtts"`): TLS 1.2 and 1.3 with the real mosquitto clients (OpenSSL) and
//! with rustls, a plain listener beside a TLS one, garbage and stalled handshakes, mutual TLS with the
//! certificate's CN as the username, and SIGHUP reloading certificates under live connections.
//!
//! Certificates are made fresh by every test with rcgen: nothing is checked in, nothing expires.
//! Every config also has a plain `mqtt` listener: the harness waits for the broker by connecting to it,
//! so that its readiness probe (a TCP connect that sends nothing) never lands on a TLS port and shows up
//! in the handshake counts the tests assert exactly.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::Connect;
use common::tools::{self, ToolOutput};
use common::{free_port, temp_dir, use_mosquitto, Backend, Broker, Stopped, SILENCE, WAIT};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, StreamOwned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

backend_tests!(
    mqtts_pub_sub_with_mosquitto_clients,
    plaintext_and_garbage_on_tls_port_are_refused_and_counted,
    handshake_timeout_closes,
    mutual_tls_and_identity_as_username,
    sighup_reloads_certificates,
);

/// The reason the shutdown report gives for a handshake that failed.
const HANDSHAKE_FAILED: &str = "TLS handshake failed";

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A self-signed certificate authority.
struct Ca {
    der: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("self-sign CA");
        Ca { der: cert.der().clone(), pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// An end-entity certificate with subject CN `cn` and the given SANs (IP or DNS), for `eku`.
    fn sign(&self, cn: &str, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> Leaf {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("leaf params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Explicit EKUs: OpenSSL and webpki both check them when present, as real deployments have them.
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.issuer).expect("sign leaf");
        Leaf {
            der: cert.der().clone(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    fn server(&self) -> Leaf {
        self.sign("coremq test server", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, cn: &str) -> Leaf {
        self.sign(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A certificate and its PKCS#8 private key.
struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key_pem: String,
    key_der: PrivatePkcs8KeyDer<'static>,
}

/// Everything the tests need, written as PEM files into `dir` (names below).
struct Pki {
    dir: PathBuf,
    /// `ca.pem`: signs the server certificate and alice's and bob's client certificates.
    ca: Ca,
    /// `other-ca.pem`: an unrelated CA; signs `stranger` (whose CN is also alice).
    other_ca: Ca,
    /// `server.pem` / `server.key`.
    server: Leaf,
    /// `alice.pem` / `alice.key`.
    alice: Leaf,
    /// `bob.pem` / `bob.key`.
    bob: Leaf,
    /// `stranger.pem` / `stranger.key`.
    stranger: Leaf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca = Ca::new("coremq test CA");
        let other_ca = Ca::new("some other CA");
        let pki = Pki {
            dir: dir.to_path_buf(),
            server: ca.server(),
            alice: ca.client("alice"),
            bob: ca.client("bob"),
            // Same CN as alice: only the issuing CA tells them apart.
            stranger: other_ca.client("alice"),
            ca,
            other_ca,
        };
        pki.write("ca.pem", &pki.ca.pem);
        pki.write("other-ca.pem", &pki.other_ca.pem);
        for (name, leaf) in
            [("server", &pki.server), ("alice", &pki.alice), ("bob", &pki.bob), ("stranger", &pki.stranger)]
        {
            pki.write_leaf(name, leaf);
        }
        // mosquitto_pub's --tls-version only sets a minimum; an OpenSSL config is what caps it.
        pki.write(
            "tls12-only.cnf",
            "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n\
             system_default = system_default_sect\n[system_default_sect]\nMaxProtocol = TLSv1.2\n",
        );
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }

    /// Writes `NAME.pem` and `NAME.key`.
    fn write_leaf(&self, name: &str, leaf: &Leaf) {
        self.write(&format!("{name}.pem"), &leaf.pem);
        self.write(&format!("{name}.key"), &leaf.key_pem);
    }

    /// Absolute path of a file in the PKI directory, as a string for command lines.
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf-8 temp path").to_string()
    }

    /// mosquitto client arguments: trust `ca_file`, present client certificate `client` if any.
    fn args(&self, ca_file: &str, client: Option<&str>) -> Vec<String> {
        let mut v = vec!["--cafile".to_string(), self.path(ca_file)];
        if let Some(c) = client {
            v.extend(["--cert".to_string(), self.path(&format!("{c}.pem"))]);
            v.extend(["--key".to_string(), self.path(&format!("{c}.key"))]);
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Broker and clients
// ---------------------------------------------------------------------------------------

/// `N` distinct ports that were free a moment ago.
fn ports<const N: usize>() -> [u16; N] {
    let mut v: Vec<u16> = Vec::with_capacity(N);
    while v.len() < N {
        let p = free_port();
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v.try_into().expect("N ports")
}

/// A plain `mqtt` listener table.
fn plain_listener(port: u16) -> String {
    format!("\n[[listener]]\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = true\n")
}

/// An `mqtts` listener table with `server.pem` / `server.key` and the `extra` lines.
fn tls_listener(port: u16, extra: &str) -> String {
    format!(
        "\n[[listener]]\nbind = \"127.0.0.1:{port}\"\nprotocol = \"mqtts\"\ntls_cert = \"server.pem\"\n\
         tls_key = \"server.key\"\n{extra}"
    )
}

/// Writes `dir/coremq.toml` (`top` keys, then `tables`) and starts coremq from it, waiting until
/// `probe_port` (a plain listener) accepts.
fn start(b: Backend, dir: &Path, top: &str, tables: &str, probe_port: u16) -> Broker {
    let conf = format!("threads = 2\nbackend = \"{}\"\n{top}\n{tables}", b.as_str());
    let path = dir.join("coremq.toml");
    std::fs::write(&path, &conf).expect("write config");
    eprintln!("tls: config\n{conf}");
    Broker::start_coremq_args(&["--config".to_string(), path.display().to_string()], probe_port)
}

/// `mosquitto_pub` with owned argument lists.
async fn pub_(port: u16, tls: &[String], args: &[&str]) -> ToolOutput {
    let all: Vec<&str> = tls.iter().map(String::as_str).chain(args.iter().copied()).collect();
    tools::mosquitto_pub(port, &all).await
}

/// `mosquitto_pub` over exactly TLS 1.2 (`tls12` and the PKI's capping OpenSSL config) or TLS 1.3.
async fn pub_version(pki: &Pki, port: u16, tls12: bool, tls: &[String], args: &[&str]) -> ToolOutput {
    let version = if tls12 { "tlsv1.2" } else { "tlsv1.3" };
    let all: Vec<&str> = tls
        .iter()
        .map(String::as_str)
        .chain(["--tls-version", version])
        .chain(args.iter().copied())
        .collect();
    let cnf = pki.path("tls12-only.cnf");
    let env: &[(&str, &str)] = if tls12 { &[("OPENSSL_CONF", &cnf)] } else { &[] };
    tools::mosquitto_pub_env(port, env, &all).await
}

/// A started `mosquitto_sub` (SUBACK received) with owned argument lists.
async fn sub_(port: u16, tls: &[String], args: &[&str]) -> tools::Sub {
    let all: Vec<&str> = tls.iter().map(String::as_str).chain(args.iter().copied()).collect();
    tools::mosquitto_sub(port, &all).await
}

/// A rustls client configuration trusting `roots`, limited to `versions`, presenting `client` if any.
fn rustls_config(
    roots: &[&CertificateDer<'static>],
    client: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("add root");
    }
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(store);
    Arc::new(match client {
        Some(l) => b
            .with_client_auth_cert(vec![l.der.clone()], PrivateKeyDer::Pkcs8(l.key_der.clone_key()))
            .expect("client certificate"),
        None => b.with_no_client_auth(),
    })
}

/// What a successful rustls MQTT connection saw.
#[derive(Debug)]
struct TlsSession {
    version: ProtocolVersion,
    server_cert: CertificateDer<'static>,
}

/// Opens a blocking TLS connection to `port` (every step bounded by `WAIT`).
fn tls_open(
    port: u16,
    cfg: Arc<ClientConfig>,
) -> Result<StreamOwned<ClientConnection, StdTcpStream>, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = StdTcpStream::connect_timeout(&addr, WAIT).map_err(|e| format!("TCP connect: {e}"))?;
    tcp.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(cfg, name).map_err(|e| format!("TLS client: {e}"))?;
    Ok(StreamOwned::new(conn, tcp))
}

/// TLS handshake, MQTT CONNECT, CONNACK 0 and DISCONNECT over rustls. Ok only if the broker accepted
/// the MQTT connection; the error says where it stopped.
async fn tls_mqtt(port: u16, cfg: Arc<ClientConfig>, id: &str) -> Result<TlsSession, String> {
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = tls_open(port, cfg)?;
        // The first write drives the handshake; with TLS 1.3 a refused client certificate only shows
        // up on the read that follows.
        s.write_all(&Connect::new(&id, true).encode()).map_err(|e| format!("handshake/CONNECT: {e}"))?;
        s.flush().map_err(|e| format!("flush: {e}"))?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).map_err(|e| format!("no CONNACK: {e}"))?;
        if ack[..2] != [0x20, 2] || ack[3] != 0 {
            return Err(format!("not an accepting CONNACK: {ack:02x?}"));
        }
        let version = s.conn.protocol_version().ok_or("no protocol version")?;
        let server_cert =
            s.conn.peer_certificates().and_then(|c| c.first()).cloned().ok_or("no server certificate")?;
        let _ = s.write_all(&[0xe0, 0]);
        s.conn.send_close_notify();
        let _ = s.flush();
        Ok(TlsSession { version, server_cert })
    })
    .await
    .expect("rustls client thread")
}

/// Sends `bytes` on a raw TCP connection to `port` and waits (≤ `WAIT`) for the broker to close it;
/// returns what the broker sent before closing.
async fn garbage(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
        .await
        .expect("TCP connect timed out")
        .expect("TCP connect");
    // The broker may close before reading everything: a failed write is fine.
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all).await.unwrap_or_else(|_| {
        panic!("{:?}…: connection not closed within {WAIT:?}", &bytes[..bytes.len().min(8)])
    });
    // Nothing but a TLS alert record (content type 21) may come back: never MQTT, never plaintext.
    assert!(
        got.is_empty() || got[0] == 0x15,
        "reply to garbage {:?}…: {got:02x?}",
        &bytes[..bytes.len().min(8)]
    );
    got
}

/// Refusal counts (reason → count) of the merged `all:` block of a shutdown report.
fn refused_all(stdout: &str) -> BTreeMap<String, u64> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("all:"));
    assert!(lines.next().is_some(), "no `all:` block in the report:\n{stdout}");
    let mut out = BTreeMap::new();
    for l in lines.take_while(|l| l.starts_with(' ')) {
        if let Some(rest) = l.trim_start().strip_prefix("refused:") {
            for part in rest.split(", ") {
                let (reason, n) = part.trim().rsplit_once(' ').unwrap_or_else(|| panic!("bad part {part:?}"));
                out.insert(reason.to_string(), n.parse().unwrap_or_else(|_| panic!("bad count in {l:?}")));
            }
        }
    }
    out
}

/// Stops the broker, asserts a clean exit, and returns the report.
fn stop(broker: Broker) -> Stopped {
    let st = broker.stop();
    assert!(st.status.success(), "{st:?}");
    eprintln!("tls: report\n{}", st.stdout);
    st
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

async fn mqtts_pub_sub_with_mosquitto_clients(b: Backend) {
    if use_mosquitto() {
        eprintln!("tls: coremq's listener config; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("tls-pubsub");
    let pki = Pki::new(&dir);
    let [plain, tls] = ports::<2>();
    let tables = format!("{}{}", plain_listener(plain), tls_listener(tls, "allow_anonymous = true\n"));
    let broker = start(b, &dir, "", &tables, plain);

    // rustls pins each version exactly and shows which certificate the broker presented.
    for (v, want) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let s = tls_mqtt(tls, rustls_config(&[&pki.ca.der], None, &[v]), &format!("rustls-{want:?}"))
            .await
            .unwrap_or_else(|e| panic!("rustls {want:?}: {e}"));
        assert_eq!(s.version, want);
        assert_eq!(s.server_cert, pki.server.der, "the configured server certificate");
    }

    // OpenSSL clients on both listeners; messages cross between them.
    let ca = pki.args("ca.pem", None);
    let mut tls_sub =
        sub_(tls, &ca, &["--tls-version", "tlsv1.3", "-i", "tls-sub", "-t", "t/#", "-q", "1"]).await;
    let mut plain_sub = tools::mosquitto_sub(plain, &["-i", "plain-sub", "-t", "t/#", "-q", "1"]).await;
    let out = pub_version(&pki, tls, true, &ca, &["-t", "t/12", "-m", "over-1.2", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "mosquitto_pub capped at TLS 1.2: {out:?}");
    let out = pub_(tls, &ca, &["--tls-version", "tlsv1.3", "-t", "t/13", "-m", "over-1.3", "-q", "2"]).await;
    assert_eq!(out.code, Some(0), "mosquitto_pub TLS 1.3: {out:?}");
    let out = tools::mosquitto_pub(plain, &["-t", "t/plain", "-m", "plain", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "mosquitto_pub plain: {out:?}");
    // Bigger than several TLS records (16 KiB each) in both directions.
    let big = "0123456789abcdef".repeat(200 * 1024 / 16);
    let big_file = dir.join("big.txt");
    std::fs::write(&big_file, &big).expect("write payload");
    let out = pub_(tls, &ca, &["-t", "t/big", "-f", big_file.to_str().expect("utf-8"), "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "mosquitto_pub 200 KiB over TLS: {out:?}");

    let mut want = vec![
        "t/12 over-1.2".to_string(),
        "t/13 over-1.3".to_string(),
        "t/plain plain".to_string(),
        format!("t/big {big}"),
    ];
    want.sort();
    for (name, s) in [("TLS subscriber", &mut tls_sub), ("plain subscriber", &mut plain_sub)] {
        let mut got = Vec::new();
        for _ in 0..want.len() {
            got.push(s.recv().await);
        }
        got.sort();
        assert!(
            got == want,
            "{name}: got {:?}",
            got.iter().map(|m| &m[..m.len().min(40)]).collect::<Vec<_>>()
        );
        assert_eq!(s.try_recv(SILENCE).await, None, "{name}: nothing else");
    }

    // TLS to the plain port fails and leaves that listener working.
    let out = pub_(plain, &ca, &["-t", "t/x", "-m", "tls-on-plain"]).await;
    assert_ne!(out.code, Some(0), "a TLS ClientHello on a plain listener: {out:?}");
    let out = tools::mosquitto_pub(plain, &["-t", "t/after", "-m", "after", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(tls_sub.recv().await, "t/after after");
    assert_eq!(plain_sub.recv().await, "t/after after");

    // The TLS subscriber is still connected at shutdown: that must stay clean too.
    drop(plain_sub);
    let st = stop(broker);
    drop(tls_sub);
    let refused = refused_all(&st.stdout);
    assert_eq!(refused.get(HANDSHAKE_FAILED), None, "no TLS failures on the TLS port: {refused:?}");
}

async fn plaintext_and_garbage_on_tls_port_are_refused_and_counted(b: Backend) {
    if use_mosquitto() {
        eprintln!("tls: coremq's listener config; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("tls-garbage");
    let pki = Pki::new(&dir);
    let [plain, tls] = ports::<2>();
    let tables = format!("{}{}", plain_listener(plain), tls_listener(tls, "allow_anonymous = true\n"));
    let broker = start(b, &dir, "", &tables, plain);
    let ca = pki.args("ca.pem", None);
    let mut sub = sub_(tls, &ca, &["-i", "healthy", "-t", "g/#", "-q", "1"]).await;

    let mut failures = 0;
    // Plain MQTT, HTTP, and a handshake record whose ClientHello is junk.
    garbage(tls, &Connect::new("plain-on-tls", true).encode()).await;
    failures += 1;
    garbage(tls, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    failures += 1;
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend(std::iter::repeat(0xff).take(0x40));
    garbage(tls, &junk).await;
    failures += 1;
    // mosquitto_pub without --cafile speaks plain MQTT; with the wrong CA it aborts the handshake itself.
    let out = tools::mosquitto_pub(tls, &["-t", "g/x", "-m", "plaintext", "-q", "1"]).await;
    assert_ne!(out.code, Some(0), "plain MQTT on the TLS port: {out:?}");
    failures += 1;
    let out = pub_(tls, &pki.args("other-ca.pem", None), &["-t", "g/x", "-m", "wrong-ca", "-q", "1"]).await;
    assert_ne!(out.code, Some(0), "a client that does not trust the server certificate: {out:?}");
    failures += 1;
    let err = tls_mqtt(
        tls,
        rustls_config(&[&pki.other_ca.der], None, &[&rustls::version::TLS13]),
        "rustls-wrong-ca",
    )
    .await
    .expect_err("rustls with the wrong CA");
    assert!(err.contains("handshake"), "{err}");
    failures += 1;

    // None of that disturbed the established TLS client, and new ones still get in.
    let out = pub_(tls, &ca, &["-t", "g/ok", "-m", "still-fine", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(sub.recv().await, "g/ok still-fine");
    assert_eq!(sub.try_recv(SILENCE).await, None, "none of the refused publishes got through");
    drop(sub);

    let st = stop(broker);
    let refused = refused_all(&st.stdout);
    assert_eq!(refused.get(HANDSHAKE_FAILED), Some(&failures), "{refused:?}\n{}", st.stdout);
}

async fn handshake_timeout_closes(b: Backend) {
    if use_mosquitto() {
        eprintln!("tls: coremq's listener config; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("tls-timeout");
    let pki = Pki::new(&dir);
    let [plain, tls] = ports::<2>();
    let tables = format!("{}{}", plain_listener(plain), tls_listener(tls, "allow_anonymous = true\n"));
    let broker = start(b, &dir, "connect_timeout = 1", &tables, plain);
    let bound = Duration::from_secs(3);

    /// Connects, sends `bytes`, then waits (≤ 3 s) for the close; returns how long that took.
    async fn stall(port: u16, bytes: &'static [u8], bound: Duration) -> Duration {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("TCP connect");
        s.write_all(bytes).await.expect("write");
        let mut buf = [0u8; 256];
        let closed = async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(bound, closed).await.unwrap_or_else(|_| {
            panic!("stalled handshake ({} bytes) not closed within {bound:?}", bytes.len())
        });
        t0.elapsed()
    }
    // Silent from the start, and stuck in the middle of a ClientHello that announces 512 bytes.
    let silent = stall(tls, b"", bound);
    let partial = stall(tls, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00], bound);
    // A completed handshake still owes a CONNECT within the same timeout.
    let cfg = rustls_config(&[&pki.ca.der], None, &[&rustls::version::TLS13]);
    let idle = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut s = tls_open(tls, cfg).expect("TLS connect");
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).expect("handshake");
        }
        s.sock.set_read_timeout(Some(bound)).expect("read timeout");
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    panic!("TLS client without CONNECT still open after {:?}", t0.elapsed())
                }
                Err(_) => break,
            }
        }
        t0.elapsed()
    });
    let (silent, partial, idle) = tokio::join!(silent, partial, idle);
    let idle = idle.expect("idle TLS client thread");
    for (what, took) in
        [("silent", silent), ("partial ClientHello", partial), ("no CONNECT after handshake", idle)]
    {
        eprintln!("tls: {what} closed after {took:?}");
        // Not an immediate close: the broker waited for the client, then gave up.
        assert!(took >= Duration::from_millis(500), "{what}: closed after only {took:?}");
    }

    // A client that does finish its handshake promptly is unaffected.
    let out = pub_(tls, &pki.args("ca.pem", None), &["-t", "to/x", "-m", "in-time", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");

    let st = stop(broker);
    let refused = refused_all(&st.stdout);
    // The reason a stalled handshake is filed under is the broker's choice ("TLS handshake failed" or
    // the connect timeout); each of the three is counted exactly once. (The harness's readiness probe
    // on the plain port shows up under another reason, "closed before CONNECT".)
    let timed_out = ["no CONNECT within connect_timeout", HANDSHAKE_FAILED]
        .iter()
        .map(|r| refused.get(*r).copied().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(timed_out, 3, "{refused:?}\n{}", st.stdout);
}

const ACL: &str = "\
user alice
topic readwrite a/#

user bob
topic readwrite b/#
";

async fn mutual_tls_and_identity_as_username(b: Backend) {
    if use_mosquitto() {
        eprintln!("tls: coremq's listener config; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("tls-mutual");
    let pki = Pki::new(&dir);
    std::fs::write(dir.join("acl"), ACL).expect("write acl");
    let [plain, tls] = ports::<2>();
    // No password file and no anonymous access: the certificate alone authenticates, as in mosquitto.
    let tables = format!(
        "{}{}\n[auth]\nacl_file = \"acl\"\n",
        plain_listener(plain),
        tls_listener(
            tls,
            "tls_client_ca = \"ca.pem\"\nuse_identity_as_username = true\nallow_anonymous = false\n"
        )
    );
    let broker = start(b, &dir, "", &tables, plain);
    let alice = pki.args("ca.pem", Some("alice"));
    let bob = pki.args("ca.pem", Some("bob"));

    let mut bob_sub = sub_(tls, &bob, &["-i", "bob-sub", "-t", "b/#", "-q", "1"]).await;
    // alice's b/# is outside her ACL: refused in the SUBACK or simply never fed, either way silent.
    let mut alice_sub = sub_(tls, &alice, &["-i", "alice-sub", "-t", "a/#", "-t", "b/#", "-q", "1"]).await;

    // Refused during the handshake: no certificate, or one from another CA (even with CN alice).
    let mut failures = 0;
    for (what, tls_args) in [
        ("no client certificate", pki.args("ca.pem", None)),
        ("certificate from another CA", pki.args("ca.pem", Some("stranger"))),
    ] {
        for tls12 in [true, false] {
            let out =
                pub_version(&pki, tls, tls12, &tls_args, &["-t", "a/x", "-m", "intruder", "-q", "1"]).await;
            assert_ne!(out.code, Some(0), "{what} (TLS 1.2 only: {tls12}): {out:?}");
            failures += 1;
        }
    }
    for (what, client, v) in [
        ("rustls without a certificate", None, &rustls::version::TLS12),
        ("rustls without a certificate", None, &rustls::version::TLS13),
        ("rustls with the stranger's certificate", Some(&pki.stranger), &rustls::version::TLS13),
    ] {
        let r = tls_mqtt(tls, rustls_config(&[&pki.ca.der], client, &[v]), "rustls-refused").await;
        assert!(r.is_err(), "{what} {v:?}: accepted {r:?}");
        failures += 1;
    }
    // A certificate from the right CA gets in without a password over both versions.
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let s = tls_mqtt(tls, rustls_config(&[&pki.ca.der], Some(&pki.alice), &[v]), "rustls-alice")
            .await
            .unwrap_or_else(|e| panic!("alice {v:?}: {e}"));
        assert_eq!(s.server_cert, pki.server.der);
    }

    // The CN is the username: alice may write b/x nowhere, not even by claiming to be bob.
    let out = pub_(tls, &alice, &["-i", "alice-pub", "-t", "b/x", "-m", "alice-denied", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "a denied PUBLISH is still acknowledged (3.1.1): {out:?}");
    let out =
        pub_(tls, &alice, &["-i", "alice-as-bob", "-u", "bob", "-t", "b/x", "-m", "alice-as-bob", "-q", "1"])
            .await;
    eprintln!("tls: alice's certificate with username bob: exit {:?}", out.code);
    let out = pub_(tls, &bob, &["-i", "bob-pub", "-t", "b/x", "-m", "bob-ok", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = pub_(tls, &alice, &["-i", "alice-pub", "-t", "a/x", "-m", "alice-ok", "-q", "1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(bob_sub.recv().await, "b/x bob-ok", "bob got neither of alice's b/x messages before his own");
    assert_eq!(alice_sub.recv().await, "a/x alice-ok", "alice read nothing under b/#");
    assert_eq!(bob_sub.try_recv(SILENCE).await, None, "bob: nothing from alice under b/#");
    assert_eq!(alice_sub.try_recv(Duration::ZERO).await, None, "alice: nothing under b/#");
    drop(bob_sub);
    drop(alice_sub);

    let st = stop(broker);
    let refused = refused_all(&st.stdout);
    assert_eq!(refused.get(HANDSHAKE_FAILED), Some(&failures), "{refused:?}\n{}", st.stdout);
}

/// Polls (≤ 5 s) until `probe` holds on 6 connections in a row. Each core reloads on its own, and
/// SO_REUSEPORT spreads new connections over the cores, so one success does not mean all have.
async fn until_all_cores<F, Fut>(what: &str, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streak = 0;
    while streak < 6 {
        match probe().await {
            Ok(()) => streak += 1,
            Err(e) => {
                streak = 0;
                assert!(Instant::now() < deadline, "{what}: still not after 5 s: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn sighup_reloads_certificates(b: Backend) {
    if use_mosquitto() {
        eprintln!("tls: coremq's listener config; skipped under mosquitto");
        return;
    }
    let dir = temp_dir("tls-hup");
    let pki = Pki::new(&dir);
    pki.write("clients.pem", &pki.ca.pem);
    let [plain, tls, mtls] = ports::<3>();
    let tables = format!(
        "{}{}{}",
        plain_listener(plain),
        tls_listener(tls, "allow_anonymous = true\n"),
        tls_listener(mtls, "tls_client_ca = \"clients.pem\"\nallow_anonymous = true\n")
    );
    let broker = start(b, &dir, "", &tables, plain);
    let pid = broker.pid();
    let old_ca = pki.args("ca.pem", None);
    let mut sub = sub_(tls, &old_ca, &["-i", "old-sub", "-t", "h/#", "-q", "1"]).await;
    let mut alice_sub =
        sub_(mtls, &pki.args("ca.pem", Some("alice")), &["-i", "old-alice", "-t", "h/#", "-q", "1"]).await;

    // Everything from the other CA now: the server certificate and the CA client certificates must
    // chain to. The files are replaced whole (rename), as a certificate manager would.
    let new_server = pki.other_ca.server();
    for (name, text) in [
        ("server.pem", &new_server.pem),
        ("server.key", &new_server.key_pem),
        ("clients.pem", &pki.other_ca.pem),
    ] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).expect("write new file");
        std::fs::rename(&tmp, dir.join(name)).expect("replace file");
    }
    // SAFETY: kill(2) on the broker's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);

    let new_ca = pki.args("other-ca.pem", None);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = pub_(tls, &new_ca, &["-t", "h/probe", "-m", "probe", "-q", "1"]).await;
        if out.code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "no connection with the new CA 5 s after SIGHUP: {out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_roots = rustls_config(&[&pki.other_ca.der], None, &[&rustls::version::TLS13]);
    until_all_cores("the new server certificate on every core", || {
        let cfg = new_roots.clone();
        let want = new_server.der.clone();
        async move {
            let s = tls_mqtt(tls, cfg, "probe-new").await?;
            if s.server_cert == want {
                Ok(())
            } else {
                Err("old certificate".to_string())
            }
        }
    })
    .await;
    let stranger_cfg = rustls_config(&[&pki.other_ca.der], Some(&pki.stranger), &[&rustls::version::TLS13]);
    until_all_cores("the new client CA on every core", || {
        let cfg = stranger_cfg.clone();
        async move { tls_mqtt(mtls, cfg, "probe-stranger").await.map(drop) }
    })
    .await;
    // The old CA is gone from both roles: its clients no longer trust us, and alice's certificate no
    // longer chains to what the mutual-TLS listener trusts.
    let out = pub_(tls, &old_ca, &["-t", "h/x", "-m", "old-ca", "-q", "1"]).await;
    assert_ne!(out.code, Some(0), "a client trusting only the old CA: {out:?}");
    let r = tls_mqtt(
        mtls,
        rustls_config(&[&pki.other_ca.der], Some(&pki.alice), &[&rustls::version::TLS13]),
        "alice-after",
    )
    .await;
    assert!(r.is_err(), "alice's certificate after the client CA changed: accepted {r:?}");

    // The connections made under the old certificates were never dropped.
    let out =
        pub_(mtls, &pki.args("other-ca.pem", Some("stranger")), &["-t", "h/after", "-m", "after", "-q", "1"])
            .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // Drain the probes (mosquitto_pub's and none of rustls', which never published).
    for s in [&mut sub, &mut alice_sub] {
        loop {
            let m = s.recv().await;
            if m == "h/after after" {
                break;
            }
            assert_eq!(m, "h/probe probe", "only the probes came before");
        }
        assert_eq!(s.try_recv(SILENCE).await, None);
    }
    drop(sub);
    drop(alice_sub);
    let st = stop(broker);
    assert!(st.stderr.contains("SIGHUP"), "the reload is logged: {}", st.stderr);
}
