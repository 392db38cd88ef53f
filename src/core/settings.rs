//! The broker-wide settings every core reads (each core holds its own copy).

use std::time::Duration;

use crate::auth::acl::Acl;
use crate::auth::password::PasswordFile;
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

/// The policy for an online session whose queue is full (`slow_subscriber` in config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowSubscriber {
    /// Publishers of QoS 1/2 messages that would reach the session wait, unacknowledged, until its
    /// queue drains to half: no acknowledged message is dropped for it.
    Pause,
    /// The newest messages are dropped and counted (mosquitto's behaviour); publishers never wait.
    Drop,
}
