//! The broker-wide settings every core reads (each core holds its own copy).

use std::time::Duration;

use crate::auth::acl::Acl;
use crate::auth::password::PasswordFile;
use crate::config::Config;
use crate::protocol::Utf8Bytes;
use crate::session::Limits;

/// Broker-wide settings every core reads (a copy per core).
#[derive(Clone, Debug)]
pub struct Settings {
    pub limits: Limits,
    pub max_packet_size: usize,
    pub connect_timeout: Duration,
    /// Queue QoS 0 messages for offline persistent sessions (mosquitto's `queue_qos0_messages`).
    pub queue_qos0_messages: bool,
    /// Frames an online client's outbox may hold before QoS 0 deliveries to it are dropped.
    pub max_outbox_messages: usize,
    /// Subscriptions one session may hold.
    pub max_subscriptions_per_client: usize,
    /// Levels a topic name or filter may have.
    pub max_topic_levels: usize,
    /// Longest client id accepted.
    pub max_client_id_len: usize,
    /// What a full queue of an online session does to QoS 1/2 publishers of matching messages.
    pub slow_subscriber: SlowSubscriber,
    /// Pause policy: how long a congested session may go without progress before its client is
    /// disconnected; `None` = never.
    pub slow_subscriber_timeout: Option<Duration>,
    /// Users and password hashes (`[auth] password_file`); `None`: usernames are not checked.
    pub passwords: Option<PasswordFile>,
    /// Access rules (`[auth] acl_file`); `None`: every client may publish and subscribe to anything.
    pub acl: Option<Acl>,
    /// Largest keep-alive (seconds): v5 clients are told it (Server Keep Alive), 3.1.1 ones above it are
    /// refused.
    pub max_keepalive: u16,
    /// Cap on session expiry (seconds; `u32::MAX` = never expire).
    pub max_session_expiry: u32,
    /// Topic aliases a v5 client may set towards the broker.
    pub topic_alias_maximum: u16,
    /// Unacknowledged inbound QoS 1/2 PUBLISHes a v5 client may have (its excess is DISCONNECT 0x93).
    pub receive_maximum: u16,
    /// Response Information for v5 clients that request it.
    pub response_information: Option<Utf8Bytes>,
}

impl Settings {
    /// The settings of a broker configured as `cfg` (every core gets a copy).
    pub fn from_config(cfg: &Config) -> Settings {
        let k = &cfg.keys;
        let pause = k.slow_subscriber == SlowSubscriber::Pause;
        Settings {
            limits: Limits {
                max_inflight: k.max_inflight,
                max_queued_messages: k.max_queued_messages,
                max_queued_bytes: k.max_queued_bytes,
                // Pause policy: what is already in the rings when publishers are told to wait (at most a
                // ring per source core) still fits, and as much again for retained messages on subscribe.
                overflow_messages: if pause {
                    k.max_queued_messages.saturating_add(k.ring_capacity.saturating_mul(cfg.threads))
                } else {
                    0
                },
                overflow_bytes: if pause { k.max_queued_bytes } else { 0 },
            },
            max_packet_size: k.max_packet_size,
            connect_timeout: k.connect_timeout,
            queue_qos0_messages: k.queue_qos0_messages,
            max_outbox_messages: k.max_outbox_messages,
            max_subscriptions_per_client: k.max_subscriptions_per_client,
            max_topic_levels: k.max_topic_levels,
            max_client_id_len: k.max_client_id_len,
            slow_subscriber: k.slow_subscriber,
            slow_subscriber_timeout: (k.slow_subscriber_timeout > 0)
                .then(|| Duration::from_secs(k.slow_subscriber_timeout)),
            passwords: cfg.password_file.as_ref().map(|(_, f)| f.clone()),
            acl: cfg.acl_file.as_ref().map(|(_, a)| a.clone()),
            max_keepalive: k.max_keepalive,
            max_session_expiry: k.max_session_expiry_interval,
            topic_alias_maximum: k.topic_alias_maximum,
            receive_maximum: k.receive_maximum,
            response_information: k.response_information.as_deref().map(Utf8Bytes::copy_from_str),
        }
    }
}

/// The policy for an online session whose queue is full (the config key `slow_subscriber`, whose names
/// are `"pause"` and `"drop"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowSubscriber {
    /// Publishers of QoS 1/2 messages that would reach the session wait, unacknowledged, until its
    /// queue drains to half: no acknowledged message is dropped for it.
    Pause,
    /// The newest messages are dropped and counted (mosquitto's behaviour); publishers never wait.
    Drop,
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::from_toml;

    fn settings(text: &str) -> Settings {
        Settings::from_config(&from_toml(text, Path::new("x.toml")).unwrap())
    }

    #[test]
    fn pause_leaves_room_for_what_the_rings_hold() {
        let s = settings("threads = 1\nmax_queued_messages = 10\nmax_queued_bytes = 100\nring_capacity = 64");
        assert_eq!(s.slow_subscriber, SlowSubscriber::Pause);
        assert_eq!((s.limits.max_queued_messages, s.limits.max_queued_bytes), (10, 100));
        assert_eq!((s.limits.overflow_messages, s.limits.overflow_bytes), (10 + 64, 100));
        let s = settings("threads = 1\nslow_subscriber = \"drop\"");
        assert_eq!(s.slow_subscriber, SlowSubscriber::Drop);
        assert_eq!((s.limits.overflow_messages, s.limits.overflow_bytes), (0, 0));
    }

    #[test]
    fn keys_reach_the_settings() {
        let s = settings("");
        assert_eq!(s.slow_subscriber_timeout, Some(Duration::from_secs(60)));
        assert_eq!((s.max_session_expiry, s.response_information), (u32::MAX, None));
        let s = settings(
            "slow_subscriber_timeout = 0\nmax_session_expiry_interval = 5\nresponse_information = \"r/\"",
        );
        assert_eq!(s.slow_subscriber_timeout, None);
        assert_eq!(s.max_session_expiry, 5);
        assert_eq!(s.response_information.as_ref().map(|r| r.as_str()), Some("r/"));
    }
}
