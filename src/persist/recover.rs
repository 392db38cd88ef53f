//! Folding the records of every log into the sessions and retained messages to restore, and the reverse:
//! the records that recreate one session (for compaction).

use std::collections::HashMap;
use std::time::Instant;

use super::{Clock, Record};
use crate::protocol::Utf8Bytes;
use crate::session::{Limits, Message, Session, SubOpts};

/// One persistent session rebuilt from the logs.
#[derive(Debug)]
pub struct RecoveredSession {
    /// The session's client id.
    pub client_id: Utf8Bytes,
    /// Session Expiry Interval (seconds) of the last [`Record::Session`].
    pub expiry: u32,
    /// When its client went offline; `None` if the client was connected when the log ended (the broker
    /// stopped or crashed under it), in which case its expiry counts from the restart.
    pub offline_since: Option<Instant>,
    /// Its subscriptions, sorted by filter. They are *not* in `session.subscriptions`: the runtime
    /// installs each in its subscription index and in the session the way a SUBSCRIBE does.
    pub subscriptions: Vec<(Box<str>, SubOpts)>,
    /// Its message state (queue, in-flight window, inbound QoS 2 ids), with the journal off.
    pub session: Session,
}

/// What recovery rebuilt from every log.
#[derive(Debug)]
pub struct Recovered {
    /// Every session still alive at the end of the logs, sorted by client id.
    pub sessions: Vec<RecoveredSession>,
    /// The retained messages, sorted by topic.
    pub retained: Vec<Message>,
    /// How many records were read (for the startup log line).
    pub records: usize,
}

/// A session being rebuilt, and where it came from: the log and the sid that currently name it.
struct Building {
    log: usize,
    sid: u32,
    expiry: u32,
    offline_since: Option<Instant>,
    subscriptions: HashMap<Box<str>, SubOpts>,
    session: Session,
}

/// Folds the records of each log (each with its own sid numbering) into sessions and retained messages.
/// Sessions are built with `Session::new(client_id, expiry == 0, limits)` and the Change records applied
/// with `Session::apply`; a client id seen in several logs keeps the last log's; a Retained record with an
/// empty payload removes the topic; later records win. Records naming an unknown sid are skipped (never
/// panic).
///
/// Within a log, a [`Record::Session`] for the sid that already names the client updates its expiry and
/// marks it online; one under any other sid (or from a later log) starts the session afresh, and the sid
/// that named the old one names nothing any more.
pub fn recover(logs: Vec<Vec<Record>>, limits: Limits, clock: &Clock) -> Recovered {
    let mut sessions: HashMap<Utf8Bytes, Building> = HashMap::new();
    let mut retained: HashMap<Utf8Bytes, Message> = HashMap::new();
    let mut records = 0usize;
    for (log, recs) in logs.into_iter().enumerate() {
        // This log's sid -> the client id it names.
        let mut sids: HashMap<u32, Utf8Bytes> = HashMap::new();
        for record in recs {
            records += 1;
            match record {
                Record::Session { sid, client_id, expiry } => {
                    if sids.get(&sid) == Some(&client_id) {
                        if let Some(b) = sessions.get_mut(&client_id) {
                            b.expiry = expiry;
                            b.offline_since = None;
                            continue;
                        }
                    }
                    let fresh = Building {
                        log,
                        sid,
                        expiry,
                        offline_since: None,
                        subscriptions: HashMap::new(),
                        session: Session::new(client_id.clone(), expiry == 0, limits),
                    };
                    if let Some(old) = sessions.insert(client_id.clone(), fresh) {
                        if old.log == log && sids.get(&old.sid) == Some(&client_id) {
                            sids.remove(&old.sid);
                        }
                    }
                    // A sid reused without a SessionEnd: the session it named stays, but nothing names
                    // it in this log any more.
                    sids.insert(sid, client_id);
                }
                Record::SessionEnd { sid } => {
                    if let Some(cid) = sids.remove(&sid) {
                        sessions.remove(&cid);
                    }
                }
                Record::Offline { sid, unix_ms } => {
                    if let Some(b) = named(&sids, &mut sessions, sid) {
                        b.offline_since = Some(clock.to_instant(unix_ms));
                    }
                }
                Record::Subscribe { sid, filter, opts } => {
                    if let Some(b) = named(&sids, &mut sessions, sid) {
                        b.subscriptions.insert(filter.as_str().into(), opts);
                    }
                }
                Record::Unsubscribe { sid, filter } => {
                    if let Some(b) = named(&sids, &mut sessions, sid) {
                        b.subscriptions.remove(filter.as_str());
                    }
                }
                Record::Change { sid, change } => {
                    if let Some(b) = named(&sids, &mut sessions, sid) {
                        b.session.apply(change);
                    }
                }
                Record::Retained { msg } => {
                    if msg.payload.is_empty() {
                        retained.remove(&msg.topic);
                    } else {
                        retained.insert(msg.topic.clone(), msg);
                    }
                }
            }
        }
    }
    let mut sessions: Vec<RecoveredSession> = sessions
        .into_iter()
        .map(|(client_id, mut b)| {
            // The expiry may have changed since the session was created (v5 DISCONNECT).
            b.session.clean = b.expiry == 0;
            let mut subscriptions: Vec<_> = b.subscriptions.into_iter().collect();
            subscriptions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            RecoveredSession {
                client_id,
                expiry: b.expiry,
                offline_since: b.offline_since,
                subscriptions,
                session: b.session,
            }
        })
        .collect();
    sessions.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
    let mut retained: Vec<Message> = retained.into_values().collect();
    retained.sort_unstable_by(|a, b| a.topic.cmp(&b.topic));
    Recovered { sessions, retained, records }
}

/// The session `sid` names in the log being read, if any.
fn named<'a>(
    sids: &HashMap<u32, Utf8Bytes>,
    sessions: &'a mut HashMap<Utf8Bytes, Building>,
    sid: u32,
) -> Option<&'a mut Building> {
    sessions.get_mut(sids.get(&sid)?)
}

/// The records that recreate one session from nothing (for a snapshot/compaction): Session, Offline if
/// offline, one Subscribe per subscription (of `session.subscriptions`, sorted by filter), then
/// `session.snapshot(clock.instant, ..)` as Change records.
pub fn snapshot_session(
    sid: u32,
    client_id: &Utf8Bytes,
    expiry: u32,
    offline_since: Option<Instant>,
    session: &Session,
    clock: &Clock,
    out: &mut Vec<Record>,
) {
    out.push(Record::Session { sid, client_id: client_id.clone(), expiry });
    if let Some(t) = offline_since {
        out.push(Record::Offline { sid, unix_ms: clock.to_unix_ms(t) });
    }
    let mut subs: Vec<_> = session.subscriptions.iter().collect();
    subs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (filter, opts) in subs {
        out.push(Record::Subscribe { sid, filter: Utf8Bytes::copy_from_str(filter), opts: *opts });
    }
    let mut changes = Vec::new();
    session.snapshot(clock.instant, &mut changes);
    out.extend(changes.into_iter().map(|change| Record::Change { sid, change }));
}
