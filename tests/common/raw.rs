//! A raw MQTT 3.1.1 client writing hand-made bytes: used where the test must control or
//! observe exact packets (DUP flags, packet ids, protocol violations, half-finished QoS 2).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{SILENCE, WAIT};

/// A decoded packet received from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    /// CONNACK.
    ConnAck {
        /// Session-present flag.
        session_present: bool,
        /// Return code.
        code: u8,
    },
    /// PUBLISH.
    Publish(Msg),
    /// PUBACK with packet id.
    PubAck(u16),
    /// PUBREC with packet id.
    PubRec(u16),
    /// PUBREL with packet id.
    PubRel(u16),
    /// PUBCOMP with packet id.
    PubComp(u16),
    /// SUBACK with packet id and return codes.
    SubAck(u16, Vec<u8>),
    /// UNSUBACK with packet id.
    UnsubAck(u16),
    /// PINGRESP.
    PingResp,
    /// Anything else: first header byte and body.
    Other(u8, Vec<u8>),
}

/// A received PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// DUP flag.
    pub dup: bool,
    /// QoS.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// Topic name.
    pub topic: String,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Outcome of a bounded read.
#[derive(Debug)]
pub enum Recv {
    /// A complete packet.
    Packet(Pkt),
    /// The broker closed the connection (EOF or reset).
    Closed,
    /// Nothing within the window.
    Timeout,
}

/// A raw TCP connection speaking hand-encoded MQTT.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Opens a TCP connection to the broker without sending anything.
    pub async fn tcp(port: u16) -> Raw {
        let stream = timeout(WAIT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw { stream, buf: Vec::new() }
    }

    /// Connects with a 3.1.1 CONNECT and asserts CONNACK code 0; returns session-present.
    pub async fn connect(port: u16, id: &str, clean: bool) -> (Raw, bool) {
        Raw::connect_with(port, &Connect::new(id, clean)).await
    }

    /// Sends `c` and asserts CONNACK code 0; returns the connection and session-present.
    pub async fn connect_with(port: u16, c: &Connect) -> (Raw, bool) {
        let mut r = Raw::tcp(port).await;
        r.send(&c.encode()).await;
        match r.recv().await {
            Pkt::ConnAck { session_present, code: 0 } => (r, session_present),
            other => panic!("{}: expected CONNACK 0, got {other:?}", c.client_id),
        }
    }

    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        timeout(WAIT, self.stream.write_all(bytes)).await.expect("write timed out").expect("write");
    }

    /// Writes raw bytes, tolerating a connection the broker already closed.
    pub async fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = timeout(WAIT, self.stream.write_all(bytes)).await;
    }

    /// Reads the next packet within `within`.
    pub async fn try_recv(&mut self, within: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = self.parse() {
                return Recv::Packet(p);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Recv::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads the next packet; panics on close or after `WAIT`.
    pub async fn recv(&mut self) -> Pkt {
        match self.try_recv(WAIT).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Reads the next packet and asserts it is a PUBLISH.
    pub async fn recv_publish(&mut self) -> Msg {
        match self.recv().await {
            Pkt::Publish(m) => m,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives (and the connection stays open) for `SILENCE`.
    pub async fn expect_silence(&mut self) {
        match self.try_recv(SILENCE).await {
            Recv::Timeout => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    /// Waits until the broker closes the connection; returns the packets received before.
    pub async fn expect_closed(&mut self, within: Duration) -> Vec<Pkt> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_recv(left).await {
                Recv::Packet(p) => seen.push(p),
                Recv::Closed => return seen,
                Recv::Timeout => panic!("connection not closed within {within:?}; got {seen:?}"),
            }
        }
    }

    /// Closes the socket with a TCP reset (SO_LINGER 0): the most abrupt client death.
    pub fn reset(self) {
        #[allow(deprecated)]
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }

    /// Closes the socket normally (FIN) without sending DISCONNECT.
    pub fn close(self) {
        drop(self.stream);
    }

    /// Sends DISCONNECT and waits for the broker to close the connection.
    pub async fn disconnect(mut self) {
        self.send(&disconnect()).await;
        self.expect_closed(WAIT).await;
    }

    /// Receives `n` PUBLISHes, acknowledging each as a well-behaved client would (PUBACK;
    /// PUBREC then PUBCOMP on PUBREL), and returns them in arrival order once every QoS 2
    /// flow among them is complete. Tolerates the broker pipelining PUBLISHes between a
    /// PUBREC and its PUBREL.
    pub async fn recv_acking(&mut self, n: usize) -> Vec<Msg> {
        let mut got = Vec::with_capacity(n);
        let mut pending_rel = std::collections::BTreeSet::new();
        while got.len() < n || !pending_rel.is_empty() {
            match self.recv().await {
                Pkt::Publish(m) => {
                    match m.qos {
                        1 => self.send(&puback(m.pkid)).await,
                        2 => {
                            self.send(&pubrec(m.pkid)).await;
                            pending_rel.insert(m.pkid);
                        }
                        _ => {}
                    }
                    got.push(m);
                }
                Pkt::PubRel(id) => {
                    assert!(pending_rel.remove(&id), "PUBREL {id} for no PUBREC");
                    self.send(&pubcomp(id)).await;
                }
                other => panic!("expected PUBLISH/PUBREL, got {other:?}"),
            }
        }
        assert_eq!(got.len(), n, "more PUBLISHes than expected: {got:?}");
        got
    }

    /// Subscribes to filters in one SUBSCRIBE and returns the SUBACK codes.
    pub async fn subscribe(&mut self, pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        self.send(&subscribe(pkid, filters)).await;
        match self.recv().await {
            Pkt::SubAck(id, codes) => {
                assert_eq!(id, pkid, "SUBACK packet id");
                codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    fn parse(&mut self) -> Option<Pkt> {
        let (len, hdr) = decode_remaining_length(self.buf.get(1..)?)?;
        let total = 1 + hdr + len;
        if self.buf.len() < total {
            return None;
        }
        let first = self.buf[0];
        let body: Vec<u8> = self.buf[1 + hdr..total].to_vec();
        self.buf.drain(..total);
        Some(decode(first, body))
    }
}

fn decode_remaining_length(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    assert!(b.len() < 4, "malformed remaining length from broker");
    None
}

fn id_of(body: &[u8]) -> u16 {
    assert!(body.len() >= 2, "short ack body {body:?}");
    u16::from_be_bytes([body[0], body[1]])
}

fn decode(first: u8, body: Vec<u8>) -> Pkt {
    match first >> 4 {
        2 => {
            assert_eq!(body.len(), 2, "CONNACK length");
            Pkt::ConnAck { session_present: body[0] & 1 == 1, code: body[1] }
        }
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let topic = String::from_utf8(body[2..2 + tlen].to_vec()).expect("utf8 topic");
            let mut at = 2 + tlen;
            let mut pkid = 0;
            if qos > 0 {
                pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
            }
            Pkt::Publish(Msg {
                dup: first & 8 != 0,
                qos,
                retain: first & 1 != 0,
                topic,
                pkid,
                payload: body[at..].to_vec(),
            })
        }
        4 => Pkt::PubAck(id_of(&body)),
        5 => Pkt::PubRec(id_of(&body)),
        6 => {
            assert_eq!(first & 0x0f, 2, "PUBREL fixed-header flags");
            Pkt::PubRel(id_of(&body))
        }
        7 => Pkt::PubComp(id_of(&body)),
        9 => Pkt::SubAck(id_of(&body), body[2..].to_vec()),
        11 => Pkt::UnsubAck(id_of(&body)),
        13 => Pkt::PingResp,
        _ => Pkt::Other(first, body),
    }
}

// ---------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    remaining_length(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A CONNECT packet under construction.
#[derive(Debug, Clone)]
pub struct Connect {
    /// Protocol name ("MQTT", or "MQIsdp" for 3.1).
    pub protocol_name: String,
    /// Protocol level (4 = 3.1.1, 3 = 3.1).
    pub level: u8,
    /// Client identifier.
    pub client_id: String,
    /// Clean-session flag.
    pub clean: bool,
    /// Keep-alive seconds.
    pub keep_alive: u16,
    /// Will: (topic, payload, qos, retain).
    pub will: Option<(String, Vec<u8>, u8, bool)>,
    /// User name and password.
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Connect {
    /// A 3.1.1 CONNECT with keep-alive 60.
    pub fn new(id: &str, clean: bool) -> Connect {
        Connect {
            protocol_name: "MQTT".into(),
            level: 4,
            client_id: id.into(),
            clean,
            keep_alive: 60,
            will: None,
            username: None,
            password: None,
        }
    }

    /// Encodes the packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        string(self.protocol_name.as_bytes(), &mut b);
        b.push(self.level);
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some((_, _, q, r)) = &self.will {
            flags |= 0x04 | (q << 3);
            if *r {
                flags |= 0x20;
            }
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        b.push(flags);
        b.extend_from_slice(&self.keep_alive.to_be_bytes());
        string(self.client_id.as_bytes(), &mut b);
        if let Some((t, p, _, _)) = &self.will {
            string(t.as_bytes(), &mut b);
            string(p, &mut b);
        }
        if let Some(u) = &self.username {
            string(u.as_bytes(), &mut b);
        }
        if let Some(p) = &self.password {
            string(p, &mut b);
        }
        packet(0x10, &b)
    }
}

/// PUBLISH packet.
pub fn publish(topic: &str, qos: u8, retain: bool, dup: bool, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut first = 0x30 | (qos << 1);
    if retain {
        first |= 1;
    }
    if dup {
        first |= 8;
    }
    let mut b = Vec::new();
    string(topic.as_bytes(), &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    b.extend_from_slice(payload);
    packet(first, &b)
}

/// PUBACK.
pub fn puback(pkid: u16) -> Vec<u8> {
    packet(0x40, &pkid.to_be_bytes())
}

/// PUBREC.
pub fn pubrec(pkid: u16) -> Vec<u8> {
    packet(0x50, &pkid.to_be_bytes())
}

/// PUBREL (fixed-header flags 0b0010 as the spec requires).
pub fn pubrel(pkid: u16) -> Vec<u8> {
    packet(0x62, &pkid.to_be_bytes())
}

/// PUBCOMP.
pub fn pubcomp(pkid: u16) -> Vec<u8> {
    packet(0x70, &pkid.to_be_bytes())
}

/// SUBSCRIBE with (filter, requested qos) pairs.
pub fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    for (f, q) in filters {
        string(f.as_bytes(), &mut b);
        b.push(*q);
    }
    packet(0x82, &b)
}

/// UNSUBSCRIBE.
pub fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    for f in filters {
        string(f.as_bytes(), &mut b);
    }
    packet(0xa2, &b)
}

/// PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![0xc0, 0x00]
}

/// DISCONNECT.
pub fn disconnect() -> Vec<u8> {
    vec![0xe0, 0x00]
}
