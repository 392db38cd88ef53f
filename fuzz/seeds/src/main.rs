//! Writes the seed corpora of coremq's fuzz targets: `seeds <corpus-dir>` fills
//! `<corpus-dir>/decode/` and `<corpus-dir>/connection/`.
//!
//! Seeds give libFuzzer valid packets of every type and version, and whole sessions, to mutate; without
//! them it would spend most of its time rediscovering the CONNECT layout. The packets are encoded here
//! by hand, not with coremq's encoder, so that they also check the decoder against a second reading of
//! the spec. File names are stable, so regenerating over an existing corpus adds nothing twice.

use std::fs;
use std::io;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// A minimal MQTT 3.1/3.1.1 client-side encoder.

/// Protocol version of a CONNECT.
#[derive(Clone, Copy)]
enum Version {
    V31,
    V311,
}

/// A CONNECT's optional parts.
#[derive(Clone, Default)]
struct ConnectOpts<'a> {
    clean: bool,
    keep_alive: u16,
    /// (topic, payload, qos, retain)
    will: Option<(&'a str, &'a [u8], u8, bool)>,
    username: Option<&'a str>,
    password: Option<&'a [u8]>,
}

/// Fixed header: first byte and the variable-length remaining length (MQTT-2.2.3).
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A two-byte-length-prefixed string or binary field (MQTT-1.5.3).
fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("seed fields are short");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn connect(version: Version, client_id: &str, o: &ConnectOpts) -> Vec<u8> {
    let mut body = Vec::new();
    match version {
        Version::V31 => {
            field(&mut body, b"MQIsdp");
            body.push(3);
        }
        Version::V311 => {
            field(&mut body, b"MQTT");
            body.push(4);
        }
    }
    let mut flags = 0u8;
    if o.clean {
        flags |= 0x02;
    }
    if let Some((_, _, qos, retain)) = o.will {
        flags |= 0x04 | qos << 3;
        if retain {
            flags |= 0x20;
        }
    }
    if o.username.is_some() {
        flags |= 0x80;
    }
    if o.password.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&o.keep_alive.to_be_bytes());
    field(&mut body, client_id.as_bytes());
    if let Some((topic, payload, _, _)) = o.will {
        field(&mut body, topic.as_bytes());
        field(&mut body, payload);
    }
    if let Some(u) = o.username {
        field(&mut body, u.as_bytes());
    }
    if let Some(p) = o.password {
        field(&mut body, p);
    }
    packet(0x10, &body)
}

fn publish(topic: &str, payload: &[u8], qos: u8, pkid: u16, retain: bool, dup: bool) -> Vec<u8> {
    let mut body = Vec::new();
    field(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let first = 0x30 | u8::from(dup) << 3 | qos << 1 | u8::from(retain);
    packet(first, &body)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62), PUBCOMP (0x70), UNSUBACK (0xb0).
fn ack(first: u8, pkid: u16) -> Vec<u8> {
    packet(first, &pkid.to_be_bytes())
}

fn puback(pkid: u16) -> Vec<u8> {
    ack(0x40, pkid)
}

fn pubrec(pkid: u16) -> Vec<u8> {
    ack(0x50, pkid)
}

fn pubrel(pkid: u16) -> Vec<u8> {
    ack(0x62, pkid)
}

fn pubcomp(pkid: u16) -> Vec<u8> {
    ack(0x70, pkid)
}

fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (filter, qos) in filters {
        field(&mut body, filter.as_bytes());
        body.push(*qos);
    }
    packet(0x82, &body)
}

fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for filter in filters {
        field(&mut body, filter.as_bytes());
    }
    packet(0xa2, &body)
}

// ---------------------------------------------------------------------------------------------
// The MQTT 5.0 packets of the v5 sessions: the same layouts with a property block (a length byte, then
// the properties; every block here is shorter than 128 bytes).

/// Property identifiers (MQTT 5.0 table 2-4), spelled out here rather than taken from coremq.
const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
const SUBSCRIPTION_IDENTIFIER: u8 = 0x0b;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;

fn props(out: &mut Vec<u8>, block: &[u8]) {
    out.push(u8::try_from(block.len()).expect("short property block"));
    out.extend_from_slice(block);
}

/// A v5 CONNECT with Clean Start, announcing `alias_max` topic aliases towards the client.
fn connect5(client_id: &str, keep_alive: u16, alias_max: u16) -> Vec<u8> {
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    let [hi, lo] = alias_max.to_be_bytes();
    props(&mut body, &[TOPIC_ALIAS_MAXIMUM, hi, lo]);
    field(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// A v5 PUBLISH whose message expires after `expiry` seconds, if given.
fn publish5(topic: &str, payload: &[u8], qos: u8, pkid: u16, expiry: Option<u32>) -> Vec<u8> {
    let mut body = Vec::new();
    field(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    let mut block = Vec::new();
    if let Some(seconds) = expiry {
        block.push(MESSAGE_EXPIRY_INTERVAL);
        block.extend_from_slice(&seconds.to_be_bytes());
    }
    props(&mut body, &block);
    body.extend_from_slice(payload);
    packet(0x30 | qos << 1, &body)
}

/// A v5 SUBSCRIBE with subscription identifier `id` (below 128: one byte).
fn subscribe5(pkid: u16, id: u8, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    props(&mut body, &[SUBSCRIPTION_IDENTIFIER, id]);
    for (filter, qos) in filters {
        field(&mut body, filter.as_bytes());
        body.push(*qos);
    }
    packet(0x82, &body)
}

const PINGREQ: [u8; 2] = [0xc0, 0];
const PINGRESP: [u8; 2] = [0xd0, 0];
const DISCONNECT: [u8; 2] = [0xe0, 0];

// ---------------------------------------------------------------------------------------------
// Seeds of the `decode` target: a selector byte, then packets.

/// Every packet type, both versions, with and without the optional CONNECT parts.
fn packet_zoo() -> Vec<(&'static str, Vec<u8>)> {
    let full = ConnectOpts {
        clean: true,
        keep_alive: 60,
        will: Some(("will/topic", b"gone", 1, true)),
        username: Some("user"),
        password: Some(b"secret"),
    };
    let mut zoo = vec![
        ("connect-311-min", connect(Version::V311, "c", &ConnectOpts { clean: true, ..Default::default() })),
        (
            "connect-311-empty-id",
            connect(Version::V311, "", &ConnectOpts { clean: true, ..Default::default() }),
        ),
        ("connect-311-full", connect(Version::V311, "client-311", &full)),
        ("connect-31-min", connect(Version::V31, "c31", &ConnectOpts::default())),
        ("connect-31-full", connect(Version::V31, "client-31", &full)),
        (
            "connect-311-will-qos2-user",
            connect(
                Version::V311,
                "w",
                &ConnectOpts {
                    keep_alive: 5,
                    will: Some(("w/t", b"", 2, false)),
                    username: Some("u"),
                    ..Default::default()
                },
            ),
        ),
        ("connack", vec![0x20, 2, 1, 0]),
        ("connack-refused", vec![0x20, 2, 0, 5]),
        ("publish-qos0", publish("a/b", b"hello", 0, 0, false, false)),
        ("publish-qos1", publish("a/b", b"hello", 1, 1, false, false)),
        ("publish-qos2-retain-dup", publish("a/b/c", b"x", 2, 0xfffe, true, true)),
        ("publish-empty-retained", publish("r", b"", 0, 0, true, false)),
        ("publish-200", publish("big/payload", &[0xa5; 200], 1, 9, false, false)),
        ("puback", puback(1)),
        ("pubrec", pubrec(2)),
        ("pubrel", pubrel(3)),
        ("pubcomp", pubcomp(4)),
        ("subscribe", subscribe(5, &[("a/#", 0), ("+/b", 1), ("$SYS/x", 2)])),
        ("suback", vec![0x90, 5, 0, 5, 0, 1, 0x80]),
        ("unsubscribe", unsubscribe(6, &["a/#", "+/b"])),
        ("unsuback", ack(0xb0, 6)),
        ("pingreq", PINGREQ.to_vec()),
        ("pingresp", PINGRESP.to_vec()),
        ("disconnect", DISCONNECT.to_vec()),
        // A non-minimal remaining length, which the spec allows a decoder to accept.
        ("pingreq-long-length", vec![0xc0, 0x80, 0]),
    ];
    let stream: Vec<u8> = zoo.iter().flat_map(|(_, p)| p.clone()).collect();
    zoo.push(("stream-all", stream));
    zoo
}

/// Selector bytes of the `decode` target: low nibble picks max_packet_size, high nibble the feed.
/// 14 is 1 MiB fed all at once, 0x1e feeds byte by byte, 7 is a 129-byte limit.
const DECODE_SELECTORS: [u8; 3] = [0x0e, 0x1e, 0x07];

fn decode_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (name, p) in packet_zoo() {
        for sel in DECODE_SELECTORS {
            let mut input = vec![sel];
            input.extend_from_slice(&p);
            seeds.push((format!("{name}-{sel:02x}"), input));
        }
    }
    seeds
}

// ---------------------------------------------------------------------------------------------
// Seeds of the `connection` target: a setup byte, then `[op, len, bytes]` chunks.

/// Builds one `connection` input.
struct Script {
    bytes: Vec<u8>,
}

impl Script {
    /// `setup`: bit 0 three clients, bit 1 two cores, bits 2–3 max_packet_size, bit 4 queue QoS 0,
    /// bits 5–7 limits (see the target's documentation).
    fn new(setup: u8) -> Script {
        Script { bytes: vec![setup] }
    }

    /// Client `slot` sends `data`, in reads of at most `read` bytes.
    fn send_in(&mut self, slot: u8, data: &[u8], read: usize) -> &mut Script {
        for piece in data.chunks(read.clamp(1, 255)) {
            self.bytes.push(slot & 3);
            self.bytes.push(piece.len() as u8);
            self.bytes.extend_from_slice(piece);
        }
        self
    }

    /// Client `slot` sends `data` in reads of up to 255 bytes.
    fn send(&mut self, slot: u8, data: &[u8]) -> &mut Script {
        self.send_in(slot, data, 255)
    }

    /// Client `slot`'s connection drops without DISCONNECT.
    fn hang_up(&mut self, slot: u8) -> &mut Script {
        self.bytes.extend_from_slice(&[(slot & 3) | 0x04, 0]);
        self
    }

    /// The clock jumps: `step` 1 = 1 s, 2 = 20 s, 3 = 20 min; the keep-alive sweep runs.
    fn wait(&mut self, step: u8) -> &mut Script {
        self.bytes.extend_from_slice(&[(step & 3) << 3, 0]);
        self
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

fn clean(keep_alive: u16) -> ConnectOpts<'static> {
    ConnectOpts { clean: true, keep_alive, ..Default::default() }
}

fn connection_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = Vec::new();
    // Setups, all with three clients: default-ish limits (0x80) and 1 MiB packets (0x0c) on one core,
    // the same on two cores, tiny limits with queued QoS 0 on two cores, and a 128-byte
    // max_packet_size on two cores.
    for (tag, setup) in [("1core", 0x8d_u8), ("2core", 0x8f), ("tiny", 0x1f), ("small-max", 0x83)] {
        // Publish/subscribe at every QoS, acks, ping, unsubscribe, disconnect.
        let pubsub = Script::new(setup)
            .send(0, &connect(Version::V311, "sub", &clean(30)))
            .send(0, &subscribe(1, &[("a/#", 2), ("+/b", 1), ("x", 0)]))
            .send(
                1,
                &connect(
                    Version::V31,
                    "pub",
                    &ConnectOpts {
                        keep_alive: 10,
                        will: Some(("a/will", b"bye", 1, false)),
                        username: Some("u"),
                        password: Some(b"p"),
                        ..Default::default()
                    },
                ),
            )
            .send(1, &publish("a/b", b"zero", 0, 0, false, false))
            .send(1, &publish("a/b", b"one", 1, 1, false, false))
            .send(1, &publish("a/b", b"two", 2, 2, false, false))
            .send(1, &pubrel(2))
            .send(0, &puback(1))
            .send(0, &pubrec(2))
            .send(0, &pubcomp(2))
            .send(0, &PINGREQ)
            .send(0, &unsubscribe(2, &["a/#"]))
            .send(1, &publish("x", &[7; 300], 1, 3, false, false))
            .hang_up(1)
            .send(0, &DISCONNECT)
            .done();
        seeds.push((format!("pubsub-{tag}"), pubsub));

        // Everything in one read, then byte by byte.
        let mut all = connect(Version::V311, "one-read", &clean(0));
        all.extend(subscribe(1, &[("#", 1)]));
        all.extend(publish("t/1", b"m", 1, 1, true, false));
        all.extend(PINGREQ);
        all.extend(DISCONNECT);
        seeds.push((format!("one-read-{tag}"), Script::new(setup).send(0, &all).done()));
        seeds.push((format!("byte-by-byte-{tag}"), Script::new(setup).send_in(0, &all, 1).done()));

        // Takeover: two connections with the same client id, a persistent session resumed.
        let persistent = ConnectOpts { keep_alive: 60, ..Default::default() };
        let takeover = Script::new(setup)
            .send(0, &connect(Version::V311, "same", &persistent))
            .send(0, &subscribe(1, &[("q/#", 2)]))
            .send(2, &connect(Version::V311, "other", &clean(0)))
            .send(2, &publish("q/1", b"a", 2, 1, false, false))
            .send(
                1,
                &connect(
                    Version::V311,
                    "same",
                    &ConnectOpts { will: Some(("q/will", b"w", 2, true)), ..persistent.clone() },
                ),
            )
            .send(1, &pubrec(1))
            .send(2, &publish("q/2", b"b", 1, 2, false, false))
            .send(0, &connect(Version::V311, "same", &persistent))
            .send(0, &pubcomp(1))
            .hang_up(0)
            .send(2, &publish("q/3", b"offline", 1, 3, false, false))
            .send(1, &connect(Version::V311, "same", &persistent))
            .send(1, &puback(2))
            .done();
        seeds.push((format!("takeover-{tag}"), takeover));

        // Retained messages, including deleting one, then a subscriber that gets them.
        let retained = Script::new(setup)
            .send(0, &connect(Version::V31, "r", &clean(0)))
            .send(0, &publish("r/1", b"keep", 1, 1, true, false))
            .send(0, &publish("r/2", b"gone", 0, 0, true, false))
            .send(0, &publish("r/2", b"", 0, 0, true, false))
            .send(1, &connect(Version::V311, "", &clean(0)))
            .send(1, &subscribe(7, &[("r/+", 2), ("#", 0)]))
            .send(1, &puback(1))
            .done();
        seeds.push((format!("retained-{tag}"), retained));

        // Keep-alive expiry publishes the will; the connect timeout closes a silent connection.
        let keepalive = Script::new(setup)
            .send(1, &connect(Version::V311, "watch", &clean(0)))
            .send(1, &subscribe(1, &[("dead/#", 1)]))
            .send(
                0,
                &connect(
                    Version::V311,
                    "dies",
                    &ConnectOpts {
                        clean: true,
                        keep_alive: 2,
                        will: Some(("dead/dies", b"x", 1, false)),
                        ..Default::default()
                    },
                ),
            )
            .wait(2)
            .send(0, &PINGREQ)
            .send_in(2, &connect(Version::V311, "slow", &clean(0))[..4], 4)
            .wait(2)
            .send(1, &puback(1))
            .done();
        seeds.push((format!("keepalive-{tag}"), keepalive));

        // Protocol violations: a first packet other than CONNECT, a second CONNECT, an unsupported level.
        let mut level5 = connect(Version::V311, "v5", &clean(0));
        if let Some(level) = level5.get_mut(8) {
            *level = 5;
        }
        let violations = Script::new(setup)
            .send(0, &PINGREQ)
            .send(1, &connect(Version::V311, "twice", &clean(0)))
            .send(1, &connect(Version::V311, "twice", &clean(0)))
            .send(2, &level5)
            .send(0, &connect(Version::V311, "", &ConnectOpts::default()))
            .send(1, &publish("bad/+", b"", 0, 0, false, false))
            .done();
        seeds.push((format!("violations-{tag}"), violations));

        // v5: deliveries with subscription identifiers, a remaining message expiry and topic aliases
        // (two for three topics, so that they run out), to a v5 and a 3.1.1 subscriber.
        let v5 = Script::new(setup)
            .send(0, &connect5("sub5", 30, 2))
            .send(0, &subscribe5(1, 5, &[("a/#", 1)]))
            .send(0, &subscribe5(2, 6, &[("a/+", 0)]))
            .send(2, &connect(Version::V311, "sub311", &clean(0)))
            .send(2, &subscribe(1, &[("a/#", 1)]))
            .send(1, &connect5("pub5", 0, 0))
            .send(1, &publish5("a/1", b"one", 1, 1, Some(60)))
            .send(1, &publish5("a/2", b"two", 1, 2, None))
            .send(1, &publish5("a/1", b"again", 0, 0, Some(60)))
            .send(1, &publish5("a/3", b"three", 1, 3, Some(60)))
            .wait(2)
            .send(0, &puback(1))
            .send(2, &puback(1))
            .send(1, &publish5("a/1", b"later", 1, 4, Some(600)))
            .send(0, &DISCONNECT)
            .done();
        seeds.push((format!("v5-{tag}"), v5));
    }
    seeds
}

fn write_all(dir: &Path, seeds: &[(String, Vec<u8>)]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}

fn main() {
    let Some(root) = std::env::args_os().nth(1) else {
        eprintln!("usage: seeds <corpus-dir>   (writes <corpus-dir>/decode and <corpus-dir>/connection)");
        std::process::exit(2);
    };
    let root = Path::new(&root);
    let decode = decode_seeds();
    let connection = connection_seeds();
    let result = write_all(&root.join("decode"), &decode)
        .and_then(|()| write_all(&root.join("connection"), &connection));
    if let Err(e) = result {
        eprintln!("seeds: writing under {}: {e}", root.display());
        std::process::exit(1);
    }
    println!(
        "seeds: {} decode and {} connection inputs under {}",
        decode.len(),
        connection.len(),
        root.display()
    );
}
