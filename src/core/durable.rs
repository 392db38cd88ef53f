//! A core's side of persistence: the records it appends to its log, how far the log is durable, and, with
//! `fsync = "always"`, the acknowledgements that wait for durability here and on the other cores.
//!
//! The log task (`crate::server::persist`) takes [`Persister::buf`], writes it, syncs it as the policy
//! says, and reports the new durable position with [`Persister::set_durable`].
//!
//! Acknowledgement order with `fsync = "always"`: a QoS 1/2 PUBLISH changes this core's log (inbound QoS 2
//! id, local persistent subscribers, a retained message this core owns) and is sent to other cores, whose
//! logs it may change too. Its PUBACK/PUBREC waits until this core's log is durable past the position it
//! reached, and every core it was sent to has confirmed (`Control::Durable`) that its log is durable past
//! what that message changed there. Cores count the publishes they send each other, so a confirmation is
//! one number per pair of cores.

use super::keys::SessionKey;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use smallvec::SmallVec;

use super::ConnCtl;
use crate::persist::{encode_record, Clock, Record, RecoveredSession};
use crate::protocol::Packet;
use crate::session::Change;
use crate::xcore::CoreId;

/// An acknowledgement held until what it acknowledges is durable.
struct PendingAck {
    ctl: Rc<ConnCtl>,
    packet: Packet,
    /// This core's log must be durable up to here.
    local: u64,
    /// (core, n): that core must have confirmed the first n publishes this core sent it.
    remote: SmallVec<[(usize, u64); 2]>,
}

/// What a core knows about its log.
pub struct Persister {
    /// Encoded records the log task has not taken yet.
    pub buf: BytesMut,
    /// Bytes ever appended to this core's log (a position that survives compactions).
    pub appended: u64,
    /// Bytes known durable.
    durable: u64,
    /// `fsync = "always"`: acknowledgements wait for durability.
    pub always: bool,
    next_sid: u32,
    /// Scratch for draining session journals.
    pub changes: Vec<Change>,
    pending: VecDeque<PendingAck>,
    /// Publishes sent to each core, and how many of them each core confirmed durable.
    sent: Vec<u64>,
    confirmed: Vec<u64>,
    /// Publishes received from each core, and what this core already confirmed to it.
    received: Vec<u64>,
    told: Vec<u64>,
    /// (source core, publishes received from it, log position after them): confirmations to send once the
    /// log is durable that far.
    to_confirm: VecDeque<(usize, u64, u64)>,
    /// Position of the last snapshot (compaction), to decide when the next one is due.
    pub snapshot_at: u64,
    /// Size of the last snapshot.
    pub snapshot_len: u64,
}

/// Compact when the log has grown this much past the last snapshot, and to more than twice its size.
const COMPACT_AFTER: u64 = 64 << 20;

impl Persister {
    pub fn new(cores: usize, always: bool, next_sid: u32) -> Persister {
        Persister {
            buf: BytesMut::new(),
            appended: 0,
            durable: 0,
            always,
            next_sid,
            changes: Vec::new(),
            pending: VecDeque::new(),
            sent: vec![0; cores],
            confirmed: vec![0; cores],
            received: vec![0; cores],
            told: vec![0; cores],
            to_confirm: VecDeque::new(),
            snapshot_at: 0,
            snapshot_len: 0,
        }
    }

    /// Appends one record.
    pub fn append(&mut self, r: &Record, clock: &Clock) {
        let before = self.buf.len();
        encode_record(r, clock, &mut self.buf);
        self.appended += (self.buf.len() - before) as u64;
    }

    /// Session numbers continue after `sid` (a snapshot renumbered them from 1).
    pub fn next_sid_from(&mut self, sid: u32) {
        self.next_sid = sid;
    }

    /// A fresh session number for this log.
    pub fn new_sid(&mut self) -> u32 {
        self.next_sid = self.next_sid.wrapping_add(1);
        self.next_sid
    }

    /// Whether there is something for the log task to write.
    pub fn has_output(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// The log task made everything up to `pos` durable.
    pub fn set_durable(&mut self, pos: u64) {
        self.durable = self.durable.max(pos);
    }

    /// Whether the log has grown enough since the last snapshot to be compacted.
    pub fn compaction_due(&self) -> bool {
        let grown = self.appended - self.snapshot_at;
        grown > COMPACT_AFTER && grown > 2 * self.snapshot_len
    }

    /// Counts a publish staged for core `dst`; returns its number.
    pub fn sent_to(&mut self, dst: CoreId) -> u64 {
        match self.sent.get_mut(dst.index()) {
            Some(n) => {
                *n += 1;
                *n
            }
            None => 0,
        }
    }

    /// Publishes sent to each core so far (to see which cores a publish reached).
    pub fn sent_counts(&self) -> &[u64] {
        &self.sent
    }

    /// Queues `packet` (a PUBACK or PUBREC for `ctl`'s client) until this core's log is durable to `local`
    /// and the cores in `remote` confirmed those publishes. Returns the packet back when nothing needs to
    /// wait (and nothing is queued before it): the caller sends it at once.
    pub fn hold_ack(
        &mut self,
        ctl: Rc<ConnCtl>,
        packet: Packet,
        local: u64,
        remote: SmallVec<[(usize, u64); 2]>,
    ) -> Option<(Rc<ConnCtl>, Packet)> {
        let ready = local <= self.durable
            && remote.iter().all(|&(c, n)| self.confirmed.get(c).is_some_and(|&d| d >= n));
        if ready && self.pending.is_empty() {
            return Some((ctl, packet));
        }
        self.pending.push_back(PendingAck { ctl, packet, local, remote });
        None
    }

    /// Acknowledgements whose conditions are now met, in order (one not yet met holds those behind it, so
    /// that a client's acknowledgements keep their order).
    pub fn release(&mut self, out: &mut Vec<(Rc<ConnCtl>, Packet)>) {
        while let Some(p) = self.pending.front() {
            let ready = p.local <= self.durable
                && p.remote.iter().all(|&(c, n)| self.confirmed.get(c).is_some_and(|&d| d >= n));
            if !ready {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                out.push((p.ctl, p.packet));
            }
        }
    }

    /// Core `core` confirmed the first `upto` publishes this core sent it.
    pub fn confirmed_by(&mut self, core: CoreId, upto: u64) {
        if let Some(c) = self.confirmed.get_mut(core.index()) {
            *c = (*c).max(upto);
        }
    }

    /// `n` publishes from core `src` were processed; the log position after them is `appended`.
    pub fn received_from(&mut self, src: CoreId, n: u64) {
        let src = src.index();
        let Some(r) = self.received.get_mut(src) else { return };
        *r += n;
        let count = *r;
        self.to_confirm.push_back((src, count, self.appended));
    }

    /// The confirmations that can go out now: (core, upto) for every source whose publishes are durable
    /// here. Sent only with `fsync = "always"` (nobody waits for them otherwise).
    pub fn confirmations(&mut self, out: &mut SmallVec<[(CoreId, u64); 4]>) {
        while let Some(&(src, count, pos)) = self.to_confirm.front() {
            if pos > self.durable {
                break;
            }
            self.to_confirm.pop_front();
            if let Some(t) = self.told.get_mut(src) {
                if count > *t {
                    *t = count;
                    let core = CoreId::new(src);
                    match out.iter_mut().find(|(c, _)| *c == core) {
                        Some(e) => e.1 = count,
                        None => out.push((core, count)),
                    }
                }
            }
        }
    }
}

impl super::Core {
    /// Turns persistence on for this core (before it serves anything). `always`: `fsync = "always"`.
    pub fn enable_persistence(&mut self, always: bool, next_sid: u32) {
        self.persist = Some(Persister::new(self.cores(), always, next_sid));
    }

    /// Adopts what recovery rebuilt for this core: persistent sessions (offline, with their sids in the
    /// log this core continues) and the retained store (every core keeps a whole copy).
    pub fn restore(
        &mut self,
        sessions: Vec<(RecoveredSession, u32)>,
        retained: Vec<crate::session::Message>,
        now: Instant,
    ) {
        self.at(now);
        for m in retained {
            if !m.payload.is_empty() {
                let topic = m.topic.clone();
                self.retained.insert(topic.as_str(), m);
            }
        }
        for (rs, sid) in sessions {
            let RecoveredSession { client_id, expiry, offline_since, subscriptions, mut session } = rs;
            if self.by_client.contains_key(&client_id) {
                continue;
            }
            session.enable_journal();
            session.clean = expiry == 0;
            let offline_since = offline_since.unwrap_or(now);
            let skey = self.sessions.insert(super::SessionEntry {
                session,
                conn: None,
                congested: None,
                stalled_since: None,
                username: None,
                // The ACL may have changed since these subscriptions were granted.
                check_reads: self.settings.acl.is_some(),
                expiry,
                offline_since: Some(offline_since),
                pending_will: None,
                sid: Some(sid),
            });
            self.by_client.insert(client_id, skey);
            for (filter, opts) in subscriptions {
                // Checked when it was subscribed; a log from a broker that accepted more is not trusted.
                if let Some(parsed) = crate::topic::Filter::parse(&filter) {
                    self.add_subscription(skey, parsed, opts);
                }
            }
            if expiry != u32::MAX {
                if let Some(at) = offline_since.checked_add(std::time::Duration::from_secs(u64::from(expiry)))
                {
                    self.timers.add(at, super::Due::Expiry(skey));
                }
            }
        }
    }

    /// Appends one record to this core's log, if persistence is on.
    pub(super) fn log(&mut self, r: Record) {
        let clock = self.clock();
        if let Some(p) = &mut self.persist {
            p.append(&r, &clock);
        }
    }

    /// Logs what changed in a persisted session's message state since the last call.
    pub(super) fn log_journal(&mut self, skey: SessionKey) {
        if self.persist.is_none() {
            return;
        }
        let clock = self.clock();
        let (Some(p), Some(sess)) = (&mut self.persist, self.sessions.get_mut(skey)) else { return };
        let Some(sid) = sess.sid else { return };
        let mut changes = std::mem::take(&mut p.changes);
        sess.session.drain_journal(&mut changes);
        if !changes.is_empty() {
            for change in changes.drain(..) {
                p.append(&Record::Change { sid, change }, &clock);
            }
        }
        p.changes = changes;
    }

    /// Starts, updates or stops persisting a session after its expiry may have changed: persisted while
    /// persistence is on and the session outlives its connection.
    pub(super) fn persist_session(&mut self, skey: SessionKey) {
        let clock = self.clock();
        let Some(p) = &mut self.persist else { return };
        let Some(sess) = self.sessions.get_mut(skey) else { return };
        match (sess.expiry > 0, sess.sid) {
            (true, None) => {
                let sid = p.new_sid();
                sess.sid = Some(sid);
                sess.session.enable_journal();
                // Whatever the session already holds, then its subscriptions (normally nothing yet).
                let mut records = Vec::new();
                crate::persist::snapshot_session(
                    sid,
                    &sess.session.client_id,
                    sess.expiry,
                    sess.offline_since,
                    &sess.session,
                    &clock,
                    &mut records,
                );
                for r in &records {
                    p.append(r, &clock);
                }
                // The snapshot covers what the journal would have said since.
                sess.session.drain_journal(&mut p.changes);
                p.changes.clear();
            }
            (true, Some(sid)) => {
                p.append(
                    &Record::Session { sid, client_id: sess.session.client_id.clone(), expiry: sess.expiry },
                    &clock,
                );
            }
            (false, Some(sid)) => {
                sess.sid = None;
                p.append(&Record::SessionEnd { sid }, &clock);
            }
            (false, None) => {}
        }
    }

    /// Whether this core keeps `topic`'s retained message in its log (one core per topic, by hash).
    pub(super) fn owns_retained(&self, topic: &str) -> bool {
        self.persist.is_some() && super::home_core(topic, self.cores()) == self.id
    }

    /// The encoded log bytes for the log task, and the log position they end at.
    pub fn take_log_output(&mut self) -> Option<(bytes::Bytes, u64)> {
        let p = self.persist.as_mut()?;
        if p.buf.is_empty() {
            return None;
        }
        Some((p.buf.split().freeze(), p.appended))
    }

    /// The log task made this core's log durable up to `pos`. Held acknowledgements and confirmations go
    /// out at the end of the batch.
    pub fn log_durable(&mut self, pos: u64) {
        if let Some(p) = &mut self.persist {
            p.set_durable(pos);
        }
    }

    /// Whether everything appended is durable (shutdown waits for it).
    pub fn log_settled(&self) -> bool {
        self.persist.as_ref().map_or(true, |p| p.buf.is_empty() && p.durable() >= p.appended)
    }

    /// With `fsync = "always"`: sends the acknowledgements whose messages are now durable, and tells other
    /// cores how far their publishes are durable here. Called at the end of every batch.
    pub(super) fn settle_durable(&mut self) {
        let Some(p) = &mut self.persist else { return };
        if !p.always {
            return;
        }
        let mut ready = Vec::new();
        p.release(&mut ready);
        let mut confirm: SmallVec<[(CoreId, u64); 4]> = SmallVec::new();
        p.confirmations(&mut confirm);
        for (ctl, packet) in ready {
            ctl.outbox.borrow_mut().push_back(crate::session::OutFrame::Control(packet));
            self.mark_dirty(&ctl);
        }
        let me = self.id;
        for (core, upto) in confirm {
            self.mesh.stage(core, crate::xcore::Control::Durable { core: me, upto }.into());
        }
    }

    /// The snapshot that replaces this core's log when it is due for compaction: the log magic, every
    /// persisted session renumbered, and the retained messages this core owns. Returns it, the records
    /// appended before it and not yet taken (the log task writes them to the old file first, so that a
    /// crash before the new file replaces it loses nothing), and the log position the snapshot stands for.
    pub fn take_snapshot(&mut self, force: bool, now: Instant) -> Option<(bytes::Bytes, bytes::Bytes, u64)> {
        self.at(now);
        let due = self.persist.as_ref().is_some_and(|p| force || p.compaction_due());
        if !due {
            return None;
        }
        let clock = self.clock();
        let mut records = Vec::new();
        let mut sid = 0u32;
        for (_, sess) in self.sessions.iter_mut() {
            if sess.sid.is_none() {
                continue;
            }
            sid += 1;
            sess.sid = Some(sid);
            // The journal's pending changes are part of the state captured here.
            let mut scratch = Vec::new();
            sess.session.drain_journal(&mut scratch);
            crate::persist::snapshot_session(
                sid,
                &sess.session.client_id,
                sess.expiry,
                if sess.conn.is_some() { None } else { sess.offline_since },
                &sess.session,
                &clock,
                &mut records,
            );
        }
        let me = self.id;
        let cores = self.cores();
        self.retained.for_each(|m| {
            if super::home_core(m.topic.as_str(), cores) == me {
                records.push(Record::Retained { msg: m.clone() });
            }
        });
        let p = self.persist.as_mut()?;
        let mut out = bytes::BytesMut::new();
        out.extend_from_slice(crate::persist::LOG_MAGIC);
        for r in &records {
            encode_record(r, &clock, &mut out);
        }
        let before = p.buf.split().freeze();
        p.next_sid_from(sid);
        p.snapshot_at = p.appended;
        p.snapshot_len = out.len() as u64;
        Some((out.freeze(), before, p.appended))
    }
}
