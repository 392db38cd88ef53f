//! The byte format of a log: framing, record bodies, and reading a whole file back.
//!
//! Body layout (all integers little-endian): `[u8 kind][u32 sid]` then the kind's fields (a retained
//! message has no sid). Strings are
//! `[u16 length][UTF-8]`, byte blocks `[u32 length][bytes]`. A message is
//! `[str topic][u8 flags: qos in bits 0-1, retain in bit 2][u64 expiry, Unix ms, 0 = none]
//! [bytes forwarded v5 property block][bytes payload]`. Unknown kinds, unknown flag bits, QoS 3, invalid
//! UTF-8 and trailing bytes all make a body undecodable, which [`read_log`] treats like a torn frame.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use super::{Clock, Record};
use crate::protocol::{QoS, Utf8Bytes};
use crate::session::{Change, Message, MsgProps, SubIds, SubOpts};

/// The first 8 bytes of every log file (the trailing digit is the format version).
pub const LOG_MAGIC: &[u8; 8] = b"COREMQL1";

/// The largest body a frame may declare: a maximal MQTT payload (256 MiB) plus room for the rest of the
/// record. A larger length can only be corruption, and is refused before anything is allocated for it.
pub const MAX_BODY: usize = 256 * 1024 * 1024 + 1024;

/// Bytes before a frame's body: its length and its checksum.
const FRAME_HEAD: usize = 8;

const K_SESSION: u8 = 1;
const K_OFFLINE: u8 = 2;
const K_SESSION_END: u8 = 3;
const K_SUBSCRIBE: u8 = 4;
const K_UNSUBSCRIBE: u8 = 5;
const K_RETAINED: u8 = 6;
// One kind per `Change` variant, so that a change costs no second tag byte.
const K_ENQUEUED: u8 = 0x10;
const K_SENT: u8 = 0x11;
const K_RELEASED: u8 = 0x12;
const K_COMPLETED: u8 = 0x13;
const K_DROPPED: u8 = 0x14;
const K_INBOUND_ADD: u8 = 0x15;
const K_INBOUND_DONE: u8 = 0x16;

const RETAIN_BIT: u8 = 0b100;
const NO_LOCAL_BIT: u8 = 0b01;
const RAP_BIT: u8 = 0b10;

/// Appends the framed record: `[u32 LE body length][u32 LE crc32 of body][body]`,
/// body = `[u8 kind][fields]` (see the module documentation for the fields).
///
/// Every length written fits its field for anything MQTT can carry (strings ≤ 65,535 bytes by
/// [`Utf8Bytes`]' invariant, payloads ≤ 256 MiB by the protocol's remaining length); a length that did not
/// would be saturated and the frame would then fail to decode, i.e. read back as a torn tail.
pub fn encode_record(r: &Record, clock: &Clock, out: &mut BytesMut) {
    let start = out.len();
    out.put_bytes(0, FRAME_HEAD);
    encode_body(r, clock, out);
    let body_start = start + FRAME_HEAD;
    let len = u32::try_from(out.len() - body_start).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(&out[body_start..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..body_start].copy_from_slice(&crc.to_le_bytes());
}

fn encode_body(r: &Record, clock: &Clock, out: &mut BytesMut) {
    match r {
        Record::Session { sid, client_id, expiry } => {
            head(out, K_SESSION, *sid);
            put_str(out, client_id);
            out.put_u32_le(*expiry);
        }
        Record::Offline { sid, unix_ms } => {
            head(out, K_OFFLINE, *sid);
            out.put_u64_le(*unix_ms);
        }
        Record::SessionEnd { sid } => head(out, K_SESSION_END, *sid),
        Record::Subscribe { sid, filter, opts } => {
            head(out, K_SUBSCRIBE, *sid);
            put_str(out, filter);
            let flags = if opts.no_local { NO_LOCAL_BIT } else { 0 }
                | if opts.retain_as_published { RAP_BIT } else { 0 };
            out.put_u8(opts.qos as u8);
            out.put_u8(flags);
            out.put_u32_le(opts.id);
        }
        Record::Unsubscribe { sid, filter } => {
            head(out, K_UNSUBSCRIBE, *sid);
            put_str(out, filter);
        }
        Record::Retained { msg } => {
            // Retained messages belong to no session: no sid.
            out.put_u8(K_RETAINED);
            put_msg(out, msg, clock);
        }
        Record::Change { sid, change } => match change {
            Change::Enqueued { seq, msg, qos, retain, sub_ids } => {
                head(out, K_ENQUEUED, *sid);
                out.put_u64_le(*seq);
                out.put_u8(flags(*qos, *retain));
                out.put_u32_le(u32::try_from(sub_ids.len()).unwrap_or(u32::MAX));
                for id in sub_ids {
                    out.put_u32_le(*id);
                }
                put_msg(out, msg, clock);
            }
            Change::Sent { seq, pkid } => {
                head(out, K_SENT, *sid);
                out.put_u64_le(*seq);
                out.put_u16_le(*pkid);
            }
            Change::Released { pkid } => pkid_change(out, K_RELEASED, *sid, *pkid),
            Change::Completed { pkid } => pkid_change(out, K_COMPLETED, *sid, *pkid),
            Change::Dropped { seq } => {
                head(out, K_DROPPED, *sid);
                out.put_u64_le(*seq);
            }
            Change::InboundAdd { pkid } => pkid_change(out, K_INBOUND_ADD, *sid, *pkid),
            Change::InboundDone { pkid } => pkid_change(out, K_INBOUND_DONE, *sid, *pkid),
        },
    }
}

fn head(out: &mut BytesMut, kind: u8, sid: u32) {
    out.put_u8(kind);
    out.put_u32_le(sid);
}

fn pkid_change(out: &mut BytesMut, kind: u8, sid: u32, pkid: u16) {
    head(out, kind, sid);
    out.put_u16_le(pkid);
}

fn flags(qos: QoS, retain: bool) -> u8 {
    qos as u8 | if retain { RETAIN_BIT } else { 0 }
}

fn put_str(out: &mut BytesMut, s: &Utf8Bytes) {
    out.put_u16_le(u16::try_from(s.len()).unwrap_or(u16::MAX));
    out.put_slice(s.as_bytes());
}

fn put_block(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.put_slice(b);
}

fn put_msg(out: &mut BytesMut, msg: &Message, clock: &Clock) {
    put_str(out, &msg.topic);
    out.put_u8(flags(msg.qos, msg.retain));
    let props = msg.props.as_deref();
    // 0 means "no expiry", so a real expiry is never written as 0 (it would need a clock before 1970).
    let expiry = props.and_then(|p| p.expires).map_or(0, |e| clock.to_unix_ms(e).max(1));
    out.put_u64_le(expiry);
    put_block(out, props.map_or(&[][..], |p| &p.forward[..]));
    put_block(out, &msg.payload);
}

/// How a log file ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// The last frame is complete and valid.
    Clean,
    /// The frame at `offset` (the valid length) is incomplete, fails its checksum, or does not decode;
    /// `why` says which, for the one line the runtime logs.
    Torn { offset: usize, why: &'static str },
}

/// A log file read back.
#[derive(Clone, Debug)]
pub struct LogContents {
    /// Every record of the valid prefix, in file order.
    pub records: Vec<Record>,
    /// The length of the valid prefix, magic included (0 when not even the magic is complete).
    pub valid_len: usize,
    /// Whether anything follows the valid prefix.
    pub tail: Tail,
}

/// Reads a whole log file's bytes (magic first). Stops at the first frame that is incomplete, fails its
/// checksum or does not decode: everything before it is returned, `valid_len` is where it starts (the
/// runtime truncates the file there and logs one line).
///
/// An empty file is an empty log (`valid_len` 0, [`Tail::Clean`]): a crash can leave a just-created file
/// empty. A file shorter than the magic whose bytes are a prefix of it is the same crash a little later:
/// an empty log torn at 0. In both cases `valid_len` is 0 and the runtime must write [`LOG_MAGIC`] before
/// appending records. Any other file without the magic is `Err`: it is not a log of this format (another
/// version or another program's file) and must not be truncated.
///
/// Strings and payloads are copied out of `bytes`: recovered messages can live for long (retained ones
/// for ever), and a slice would keep the whole file's buffer alive.
pub fn read_log(bytes: &Bytes, clock: &Clock) -> Result<LogContents, &'static str> {
    let Some(rest) = bytes.strip_prefix(&LOG_MAGIC[..]) else {
        if LOG_MAGIC.starts_with(bytes) {
            let tail = if bytes.is_empty() {
                Tail::Clean
            } else {
                Tail::Torn { offset: 0, why: "incomplete magic" }
            };
            return Ok(LogContents { records: Vec::new(), valid_len: 0, tail });
        }
        return Err("not a coremq log (bad magic)");
    };
    let mut records = Vec::new();
    let mut pos = LOG_MAGIC.len();
    let mut rest = rest;
    let tail = loop {
        match next_frame(rest, clock) {
            Ok(None) => break Tail::Clean,
            Ok(Some((record, used))) => {
                records.push(record);
                pos += used;
                rest = rest.get(used..).unwrap_or_default();
            }
            Err(why) => break Tail::Torn { offset: pos, why },
        }
    };
    Ok(LogContents { records, valid_len: pos, tail })
}

/// The record at the start of `buf` and the bytes its frame takes, `None` at the end of the file.
fn next_frame(buf: &[u8], clock: &Clock) -> Result<Option<(Record, usize)>, &'static str> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut r = Reader(buf);
    let (Ok(len), Ok(crc)) = (r.u32(), r.u32()) else { return Err("incomplete frame header") };
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > MAX_BODY {
        return Err("frame length beyond the maximum");
    }
    let body = r.take(len).map_err(|_| "incomplete frame")?;
    if crc32fast::hash(body) != crc {
        return Err("checksum mismatch");
    }
    let record = decode_body(body, clock)?;
    Ok(Some((record, FRAME_HEAD + len)))
}

fn decode_body(body: &[u8], clock: &Clock) -> Result<Record, &'static str> {
    let mut r = Reader(body);
    let kind = r.u8().map_err(|_| "empty record")?;
    if kind == K_RETAINED {
        let msg = r.msg(clock)?;
        return r.end(Record::Retained { msg });
    }
    let sid = r.u32()?;
    let record = match kind {
        K_SESSION => Record::Session { sid, client_id: r.str()?, expiry: r.u32()? },
        K_OFFLINE => Record::Offline { sid, unix_ms: r.u64()? },
        K_SESSION_END => Record::SessionEnd { sid },
        K_SUBSCRIBE => {
            let filter = r.str()?;
            let qos = QoS::from_u8(r.u8()?).ok_or("invalid QoS")?;
            let flags = r.u8()?;
            if flags & !(NO_LOCAL_BIT | RAP_BIT) != 0 {
                return Err("unknown subscription flags");
            }
            let opts = SubOpts {
                qos,
                no_local: flags & NO_LOCAL_BIT != 0,
                retain_as_published: flags & RAP_BIT != 0,
                id: r.u32()?,
            };
            Record::Subscribe { sid, filter, opts }
        }
        K_UNSUBSCRIBE => Record::Unsubscribe { sid, filter: r.str()? },
        K_ENQUEUED => {
            let seq = r.u64()?;
            let (qos, retain) = r.flags()?;
            let n = usize::try_from(r.u32()?).unwrap_or(usize::MAX);
            // Checked against what is left before anything is allocated: a corrupt count cannot make
            // the reader reserve gigabytes.
            if n > r.0.len() / 4 {
                return Err("truncated field");
            }
            let mut sub_ids = SubIds::with_capacity(n);
            for _ in 0..n {
                sub_ids.push(r.u32()?);
            }
            let msg = r.msg(clock)?;
            Record::Change { sid, change: Change::Enqueued { seq, msg, qos, retain, sub_ids } }
        }
        K_SENT => Record::Change { sid, change: Change::Sent { seq: r.u64()?, pkid: r.u16()? } },
        K_RELEASED => Record::Change { sid, change: Change::Released { pkid: r.u16()? } },
        K_COMPLETED => Record::Change { sid, change: Change::Completed { pkid: r.u16()? } },
        K_DROPPED => Record::Change { sid, change: Change::Dropped { seq: r.u64()? } },
        K_INBOUND_ADD => Record::Change { sid, change: Change::InboundAdd { pkid: r.u16()? } },
        K_INBOUND_DONE => Record::Change { sid, change: Change::InboundDone { pkid: r.u16()? } },
        _ => return Err("unknown record kind"),
    };
    r.end(record)
}

/// A cursor over a body: every read checks the remaining length first.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// `record`, if the body has nothing after it.
    fn end(&self, record: Record) -> Result<Record, &'static str> {
        if self.0.is_empty() {
            Ok(record)
        } else {
            Err("trailing bytes in record")
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.0.len() {
            return Err("truncated field");
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let b = self.take(N)?;
        <[u8; N]>::try_from(b).map_err(|_| "truncated field")
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        self.array().map(u64::from_le_bytes)
    }

    /// QoS and retain from a flags byte.
    fn flags(&mut self) -> Result<(QoS, bool), &'static str> {
        let f = self.u8()?;
        if f & !(0b11 | RETAIN_BIT) != 0 {
            return Err("unknown message flags");
        }
        let qos = QoS::from_u8(f & 0b11).ok_or("invalid QoS")?;
        Ok((qos, f & RETAIN_BIT != 0))
    }

    fn str(&mut self) -> Result<Utf8Bytes, &'static str> {
        let n = self.u16()?;
        let b = self.take(usize::from(n))?;
        Utf8Bytes::try_from_bytes(Bytes::copy_from_slice(b)).map_err(|_| "invalid UTF-8 string")
    }

    fn block(&mut self) -> Result<Bytes, &'static str> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        self.take(n).map(Bytes::copy_from_slice)
    }

    fn msg(&mut self, clock: &Clock) -> Result<Message, &'static str> {
        let topic = self.str()?;
        let (qos, retain) = self.flags()?;
        let expiry = self.u64()?;
        let forward = self.block()?;
        let payload = self.block()?;
        let expires = (expiry != 0).then(|| clock.to_instant(expiry));
        let props =
            (!forward.is_empty() || expires.is_some()).then(|| Arc::new(MsgProps { forward, expires }));
        // The arrival time is not stored: latency is measured from when the message re-entered the
        // broker.
        Ok(Message { topic, payload, qos, retain, received: clock.instant, props })
    }
}
