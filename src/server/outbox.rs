//! Encoding of a connection's outbox: the frames the core queued become the buffers of one vectored
//! write, in the connection's protocol layout, with its outbound v5 topic aliases and each message's
//! remaining expiry; and the deliveries written are counted.
//!
//! Plain functions, no I/O and no clock (the time is passed in), so that the writer task
//! (`server::conn::writer`) and the `connection` fuzz target encode the same bytes.

use std::collections::HashMap;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use crate::protocol::{self, properties, Connect, ProtocolVersion, Utf8Bytes};
use crate::session::{OutFrame, Outbox};
use crate::stats::Stats;

/// What the writer of one connection keeps between batches: the protocol layout, and (v5) the topic
/// aliases it assigned.
#[derive(Debug)]
pub struct OutState {
    version: ProtocolVersion,
    /// The client's Topic Alias Maximum; 0 = no aliases.
    alias_max: u16,
    /// Topic -> alias assigned on this connection; boxed and created on first use, since most connections
    /// never have one. Once `alias_max` are assigned, other topics are sent in full.
    #[allow(clippy::box_collection)] // 8 bytes in every writer task instead of an empty map's 48
    aliases: Option<Box<HashMap<Utf8Bytes, u16>>>,
    /// Scratch for a v5 delivery's own properties, reused so that a delivery allocates nothing.
    own: BytesMut,
}

/// The topic aliases the broker may use towards a client: its v5 Topic Alias Maximum (0 = none).
pub fn alias_max(connect: &Connect) -> u16 {
    connect.properties.topic_alias_maximum.unwrap_or(0)
}

impl OutState {
    /// A writer's state for a connection of `version` allowing `alias_max` topic aliases
    /// ([`alias_max`]), with none assigned yet: sending a topic name with an alias again just maps it
    /// anew, which v5 allows, so a new writer may start afresh.
    pub fn new(version: ProtocolVersion, alias_max: u16) -> OutState {
        OutState { version, alias_max, aliases: None, own: BytesMut::new() }
    }

    /// The alias for `topic`, and whether the topic name must be sent with it (first use).
    fn alias(&mut self, topic: &Utf8Bytes) -> Option<(u16, bool)> {
        if self.alias_max == 0 {
            return None;
        }
        let map = self.aliases.get_or_insert_with(Default::default);
        if let Some(&a) = map.get(topic) {
            return Some((a, false));
        }
        let next = u16::try_from(map.len() + 1).ok().filter(|&n| n <= self.alias_max)?;
        map.insert(topic.clone(), next);
        Some((next, true))
    }
}

/// Turns outbox frames into write buffers, appended to `iov`, and the receive time of each message
/// among them, appended to `stamps`. Heads and control packets are encoded into one buffer allocated
/// per batch; payloads and shared QoS 0 frames are referenced, never copied. `now` is when the batch
/// is written: a v5 delivery carries the expiry interval that remains then.
pub fn encode_outbox(
    ob: &mut Outbox,
    st: &mut OutState,
    iov: &mut Vec<Bytes>,
    stamps: &mut Vec<Instant>,
    now: Instant,
) {
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
            OutFrame::Publish { msg, qos, pkid, dup, retain, sub_ids }
                if st.version == ProtocolVersion::V5 =>
            {
                // MQTT-3.3.2-6: the interval that remains, at least 1 s (it had not expired when queued).
                let expiry = msg.props.as_ref().and_then(|p| p.expires).map(|expires| {
                    expires.saturating_duration_since(now).as_secs_f64().ceil().max(1.0) as u32
                });
                let mut topic = msg.topic.as_str();
                let alias = st.alias(&msg.topic).map(|(alias, first)| {
                    if !first {
                        topic = "";
                    }
                    alias
                });
                // The per-subscriber properties; the forwarded ones follow as they are.
                let mut own = std::mem::take(&mut st.own);
                own.clear();
                properties::encode_delivery_props(&sub_ids, expiry, alias, &mut own);
                let forward = msg.props.as_ref().map_or(&[][..], |p| &p.forward[..]);
                protocol::encode_publish_head_v5(
                    topic,
                    qos,
                    pkid,
                    dup,
                    retain,
                    &[&own, forward],
                    msg.payload.len(),
                    &mut head,
                );
                st.own = own;
                if !msg.payload.is_empty() {
                    push_head(&mut head, iov);
                    iov.push(msg.payload);
                }
                stamps.push(msg.received);
            }
            OutFrame::Publish { msg, qos, pkid, dup, retain, .. } => {
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
            OutFrame::Control(p) => protocol::encode(&p, st.version, &mut head),
        }
    }
    push_head(&mut head, iov);
}

fn push_head(head: &mut BytesMut, iov: &mut Vec<Bytes>) {
    if !head.is_empty() {
        iov.push(head.split().freeze());
    }
}

/// Counts the deliveries of a completed write, whose receive times [`encode_outbox`] left in
/// `stamps` (emptied): each one's in-broker latency ends at `now`.
pub fn record_sent(stats: &mut Stats, stamps: &mut Vec<Instant>, now: Instant) {
    stats.msgs_out += stamps.len() as u64;
    for s in stamps.drain(..) {
        stats.record_latency(now.saturating_duration_since(s));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::protocol::property_id::{MESSAGE_EXPIRY_INTERVAL, SUBSCRIPTION_IDENTIFIER, TOPIC_ALIAS};
    use crate::protocol::QoS;
    use crate::session::{Message, MsgProps};

    fn publish(msg: Message, pkid: u16, sub_ids: &[u32]) -> OutFrame {
        OutFrame::Publish {
            msg,
            qos: QoS::AtLeastOnce,
            pkid,
            dup: false,
            retain: false,
            sub_ids: sub_ids.into(),
        }
    }

    fn written(ob: &mut Outbox, st: &mut OutState, now: Instant) -> (Vec<u8>, usize) {
        let (mut iov, mut stamps) = (Vec::new(), Vec::new());
        encode_outbox(ob, st, &mut iov, &mut stamps, now);
        assert!(ob.is_empty());
        (iov.concat(), stamps.len())
    }

    #[test]
    fn v5_deliveries_carry_their_ids_remaining_expiry_and_alias() {
        let now = Instant::now();
        let msg = Message {
            topic: Utf8Bytes::from_static("a/b"),
            payload: Bytes::from_static(b"hi"),
            qos: QoS::AtLeastOnce,
            retain: false,
            received: now,
            props: None,
        };
        let expiring =
            Arc::new(MsgProps { forward: Bytes::new(), expires: Some(now + Duration::from_millis(90_500)) });
        let mut ob = Outbox::new();
        ob.push_back(publish(Message { props: Some(expiring), ..msg.clone() }, 7, &[1, 300]));
        ob.push_back(publish(msg, 8, &[]));
        let mut st = OutState::new(ProtocolVersion::V5, 2);
        let (bytes, stamps) = written(&mut ob, &mut st, now);
        let mut want = vec![0x32, 23, 0, 3, b'a', b'/', b'b', 0, 7, 13];
        want.extend([SUBSCRIPTION_IDENTIFIER, 1, SUBSCRIPTION_IDENTIFIER, 0xAC, 0x02]);
        // 90.5 s remain: 91 s, rounded up.
        want.extend([MESSAGE_EXPIRY_INTERVAL, 0, 0, 0, 91, TOPIC_ALIAS, 0, 1, b'h', b'i']);
        // The same topic again: the alias alone, with an empty topic name.
        want.extend([0x32, 10, 0, 0, 0, 8, 3, TOPIC_ALIAS, 0, 1, b'h', b'i']);
        assert_eq!(bytes, want);
        assert_eq!(stamps, 2);
    }

    #[test]
    fn aliases_run_out_and_3_1_1_has_none() {
        let now = Instant::now();
        let msg = |topic| Message {
            topic: Utf8Bytes::from_static(topic),
            payload: Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: false,
            received: now,
            props: None,
        };
        let mut st = OutState::new(ProtocolVersion::V5, 1);
        assert_eq!(st.alias(&Utf8Bytes::from_static("x")), Some((1, true)));
        assert_eq!(st.alias(&Utf8Bytes::from_static("y")), None);
        assert_eq!(st.alias(&Utf8Bytes::from_static("x")), Some((1, false)));
        let mut ob = Outbox::new();
        ob.push_back(publish(msg("t"), 1, &[5]));
        let (bytes, _) = written(&mut ob, &mut OutState::new(ProtocolVersion::V3_1_1, 4), now);
        assert_eq!(bytes, [0x32, 5, 0, 1, b't', 0, 1]);
    }
}
