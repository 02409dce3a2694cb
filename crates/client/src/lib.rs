//! `chappe-client`: the client SDK that a CLI, a mobile app or a load
//! generator embeds to talk to Chappe end-to-end encrypted.
//!
//! Its parts, kept apart:
//! - [`crypto`]: a pure, I/O-free state machine over vodozemac: the device's
//!   Olm account and signed keys, Olm sessions per remote device, Megolm
//!   outbound sessions per conversation (with rotation) and the inbound
//!   sessions received over Olm, with every check that keeps a hostile
//!   server from forging a sender, a room key or a conversation;
//! - [`state`]: the device's state directory, encrypted at rest
//!   (Argon2id + XChaCha20-Poly1305), written atomically, locked against a
//!   second process;
//! - [`media`]: encrypted attachments: a fresh AES-256-GCM key per file,
//!   chunks sealed as in the STREAM construction (reordering, dropping and
//!   truncation are detected), per-chunk and whole-file SHA-256, and the
//!   [`Attachment`] description that travels inside the Megolm message;
//! - `transport`: gRPC: login, unary calls, the `Connect` stream task
//!   with request/answer correlation, pushes, reconnection with backoff,
//!   and the `Media` service's streaming calls;
//! - [`Client`] (in `client`): the public API that ties them together:
//!   sharing room keys before sending, processing room keys before messages,
//!   persisting before any ciphertext leaves and before acknowledging;
//! - [`error`]: one [`Error`] type with [`Result`].
//!
//! What a [`Client`] does:
//! - log in, keep its device keys published, open the `Connect` stream
//!   ([`Client::connect`]) and deliver [`Event`]s;
//! - conversations: create, list, add and remove members, leave;
//! - text messages ([`Client::send_text`]), sync and history, end-to-end
//!   encrypted with Megolm over Olm-shared room keys;
//! - files ([`Client::send_file`], [`Client::download`]): encrypted on the
//!   device, uploaded chunk by chunk (never whole in memory), resumed
//!   after a cut connection or a restart without resending what the server
//!   holds, and verified chunk by chunk and whole before the plaintext
//!   reaches its destination;
//! - presence and typing: [`Client::presence`] of users sharing a
//!   conversation, [`Event::PresenceChanged`] when it changes,
//!   [`Client::set_typing`] and [`Event::Typing`],
//!   [`Client::set_hide_last_seen`].
//!
//! ```no_run
//! # async fn demo() -> chappe_client::Result<()> {
//! use chappe_client::{Client, ClientConfig, ConversationKind, Event};
//! use chappe_proto::ids::UserId;
//!
//! let config = ClientConfig::new("http://127.0.0.1:7070", "/tmp/alice-laptop", "passphrase");
//! let alice = Client::login_dev(config, "alice", "LAPTOP").await?;
//! let mut events = alice.connect().await?;
//! let chat = alice
//!     .create_conversation(ConversationKind::Direct, &[UserId::parse("bob")?])
//!     .await?;
//! alice.send_text(&chat.id, "hello").await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {}", m.sender_user, m.body);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chappe_proto::ids::{ConversationId, MessageId, UserId};
use chappe_proto::v1 as pb;
use tokio::sync::mpsc;

mod client;
pub mod crypto;
pub mod error;
pub mod media;
pub mod state;
mod transport;

pub use chappe_proto::ids::{self, DeviceId};
pub use client::Client;
pub use crypto::{DecryptedMessage, DeviceAddr, RotationPolicy};
pub use error::{CryptoError, Error, Result};
pub use media::{Attachment, MediaError, Progress, SendFileOptions, SentFile};
pub use state::KdfParams;

/// Room for a media chunk's framing (index, hash, protobuf tags) within
/// [`ClientConfig::media_max_message_bytes`].
const MEDIA_FRAME_OVERHEAD: usize = 1024;

/// How to reach the server, where the device's state lives, and every limit
/// the client applies. Build with [`ClientConfig::new`], then adjust fields.
#[derive(Clone)]
pub struct ClientConfig {
    /// The gateway, e.g. `http://127.0.0.1:7070`.
    pub server_url: String,
    /// Other gateways of the same platform, tried in turn when the current
    /// one is unreachable or goes away (default: none).
    pub failover_urls: Vec<String>,
    /// The device's state directory (created on first login).
    pub state_dir: PathBuf,
    /// Unlocks the state directory.
    pub passphrase: String,
    /// Key derivation cost, used when the state directory is created.
    pub kdf: KdfParams,
    /// One-time keys kept on the server; topped up below half (default 50).
    pub one_time_keys_target: usize,
    /// When Megolm sessions rotate (default 100 messages, 7 days, on leave).
    pub rotation: RotationPolicy,
    /// Deadline of a request, including waiting for a connection (default 10 s).
    pub request_timeout: Duration,
    /// Deadline of opening a TCP/HTTP2 connection (default 5 s).
    pub connect_timeout: Duration,
    /// First reconnection delay (default 250 ms), doubled up to the maximum.
    pub reconnect_backoff_min: Duration,
    /// Longest reconnection delay (default 30 s).
    pub reconnect_backoff_max: Duration,
    /// Application-level ping and HTTP/2 keep-alive interval (default 20 s).
    pub ping_interval: Duration,
    /// How long member lists and device lists are reused before being
    /// fetched again (default 5 min). They are always fetched again when a
    /// Megolm session rotates.
    pub device_cache_ttl: Duration,
    /// Attempts of one send (same `client_msg_id`, same ciphertext) before
    /// giving up on a retryable error (default 5).
    pub send_attempts: u32,
    /// Messages per conversation per sync page; 0 is the server default.
    pub sync_page_limit: u32,
    /// Sync round trips per sync, while the server says more follow (default 50).
    pub max_sync_rounds: u32,
    /// Largest text accepted by [`Client::send_text`], in bytes (default 64 KiB).
    pub max_text_bytes: usize,
    /// To-device messages per `SendToDevice` batch (default 100).
    pub max_to_device_batch: usize,
    /// Events buffered for the listener before the client waits (default 1024).
    pub event_buffer: usize,
    /// How long a message may wait for its room key before the client syncs
    /// to fetch the key from its inbox (default 1 s).
    pub missing_key_sync_delay: Duration,
    /// Undecryptable messages kept until their room key arrives (default 1000).
    pub max_pending_messages: usize,
    /// Olm sessions kept per remote device (default 4).
    pub max_olm_sessions_per_device: usize,
    /// Inbox ids and message ids remembered to drop duplicates (default
    /// 2000). A sync answers again from a settle window before each cursor
    /// (fanout's `sync_settle_window`, 5 s), so this should exceed the
    /// messages a device receives in that time.
    pub dedupe_window: usize,
    /// Frames queued towards the server before senders wait (default 256).
    pub outgoing_buffer: usize,
    /// How long opening the state directory waits for a lock held elsewhere
    /// before failing with [`Error::Locked`] (default 2 s): a dropped client
    /// of the same process releases it once its background tasks finish.
    pub lock_wait: Duration,
    /// Source address of connections to the server (default: chosen by the
    /// system). A load generator spreads devices over 127.0.0.x with it.
    pub local_address: Option<std::net::IpAddr>,
    /// Plaintext bytes per chunk of an encrypted file (default 256 KiB − 16
    /// = 262,128, so that a sealed chunk, 16 bytes longer, is 256 KiB: the
    /// server's default largest chunk). Between 1 and
    /// `media_max_message_bytes` − 1,040.
    pub media_chunk_bytes: usize,
    /// Largest gRPC message of the `Media` service, sent or received
    /// (default 1 MiB): a chunk plus its framing must fit.
    pub media_max_message_bytes: usize,
    /// Attempts of one upload or download, each resuming where the last
    /// stopped, before a transient failure (`UNAVAILABLE`, a broken stream,
    /// a timeout) is returned (default 5).
    pub media_attempts: u32,
}

impl ClientConfig {
    /// Defaults for everything but the three things only the caller knows.
    pub fn new(
        server_url: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        passphrase: impl Into<String>,
    ) -> Self {
        Self {
            server_url: server_url.into(),
            failover_urls: Vec::new(),
            state_dir: state_dir.into(),
            passphrase: passphrase.into(),
            kdf: KdfParams::default(),
            one_time_keys_target: 50,
            rotation: RotationPolicy::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            reconnect_backoff_min: Duration::from_millis(250),
            reconnect_backoff_max: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            device_cache_ttl: Duration::from_secs(300),
            send_attempts: 5,
            sync_page_limit: 0,
            max_sync_rounds: 50,
            max_text_bytes: 64 * 1024,
            max_to_device_batch: 100,
            event_buffer: 1024,
            missing_key_sync_delay: Duration::from_secs(1),
            max_pending_messages: 1000,
            max_olm_sessions_per_device: 4,
            dedupe_window: 2_000,
            outgoing_buffer: 256,
            lock_wait: Duration::from_secs(2),
            local_address: None,
            media_chunk_bytes: media::DEFAULT_CHUNK_BYTES,
            media_max_message_bytes: 1024 * 1024,
            media_attempts: 5,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Config(what.to_owned()));
        for url in std::iter::once(&self.server_url).chain(&self.failover_urls) {
            if let Err(e) = tonic::transport::Endpoint::from_shared(url.clone()) {
                return Err(Error::Config(format!("server URL {url:?}: {e}")));
            }
        }
        if self.passphrase.is_empty() {
            return bad("passphrase is empty");
        }
        if self.one_time_keys_target == 0 || self.one_time_keys_target > 50 {
            return bad("one_time_keys_target must be between 1 and 50");
        }
        if self.rotation.max_messages == 0 {
            return bad("rotation.max_messages must be at least 1");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be positive");
        }
        if self.reconnect_backoff_min.is_zero()
            || self.reconnect_backoff_max < self.reconnect_backoff_min
        {
            return bad("reconnect backoff must be positive and min <= max");
        }
        if self.ping_interval.is_zero() {
            return bad("ping_interval must be positive");
        }
        if self.send_attempts == 0 || self.max_sync_rounds == 0 {
            return bad("send_attempts and max_sync_rounds must be at least 1");
        }
        if self.max_to_device_batch == 0 || self.event_buffer == 0 || self.outgoing_buffer == 0 {
            return bad("batch and buffer sizes must be at least 1");
        }
        if self.media_max_message_bytes > u32::MAX as usize {
            return bad("media_max_message_bytes must be below 4 GiB");
        }
        if self.media_chunk_bytes == 0
            || self.media_chunk_bytes + media::TAG_BYTES + MEDIA_FRAME_OVERHEAD
                > self.media_max_message_bytes
        {
            return Err(Error::Config(format!(
                "media_chunk_bytes must be between 1 and media_max_message_bytes - {} ({})",
                media::TAG_BYTES + MEDIA_FRAME_OVERHEAD,
                self.media_max_message_bytes
                    .saturating_sub(media::TAG_BYTES + MEDIA_FRAME_OVERHEAD)
            )));
        }
        if self.media_attempts == 0 {
            return bad("media_attempts must be at least 1");
        }
        Ok(())
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server_url", &self.server_url)
            .field("state_dir", &self.state_dir)
            .field("passphrase", &"<redacted>")
            .field("kdf", &self.kdf)
            .field("one_time_keys_target", &self.one_time_keys_target)
            .field("rotation", &self.rotation)
            .field("request_timeout", &self.request_timeout)
            .field("media_chunk_bytes", &self.media_chunk_bytes)
            .finish_non_exhaustive()
    }
}

/// Direct (exactly two users) or group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationKind {
    Direct,
    Group,
}

impl ConversationKind {
    fn to_proto(self) -> pb::ConversationKind {
        match self {
            ConversationKind::Direct => pb::ConversationKind::Direct,
            ConversationKind::Group => pb::ConversationKind::Group,
        }
    }
}

/// A conversation as the server describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    pub id: ConversationId,
    pub kind: ConversationKind,
    pub members: Vec<UserId>,
    pub created_at_ms: i64,
    /// Newest message, if any.
    pub head_message_id: Option<MessageId>,
    /// Sequence number of the last membership change.
    pub membership_seq: u64,
}

impl TryFrom<&pb::Conversation> for Conversation {
    type Error = Error;

    fn try_from(c: &pb::Conversation) -> Result<Self> {
        let kind = match pb::ConversationKind::try_from(c.kind) {
            Ok(pb::ConversationKind::Direct) => ConversationKind::Direct,
            Ok(pb::ConversationKind::Group) => ConversationKind::Group,
            _ => return Err(Error::protocol(format!("conversation kind {}", c.kind))),
        };
        Ok(Self {
            id: ConversationId::parse(&c.conversation_id)?,
            kind,
            members: c
                .member_user_ids
                .iter()
                .map(|u| UserId::parse(u.as_str()))
                .collect::<Result<_, _>>()?,
            created_at_ms: c.created_at_ms,
            head_message_id: if c.head_message_id.is_empty() {
                None
            } else {
                Some(MessageId::parse(&c.head_message_id)?)
            },
            membership_seq: c.membership_seq,
        })
    }
}

/// The server's receipt for a sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    /// The id this client chose for the send (retries reuse it).
    pub client_msg_id: String,
    pub sent_at_ms: i64,
    /// The server had already stored this send (a retry after a lost answer).
    pub duplicate: bool,
}

/// Something that happened, delivered through [`Events`] or returned by
/// [`Client::sync`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The `Connect` stream is open (again); a sync follows.
    Connected,
    /// The `Connect` stream broke; the client reconnects by itself.
    Disconnected { reason: String },
    /// A conversation message, decrypted and authenticated.
    Message(DecryptedMessage),
    /// A message that cannot be read. When the reason is
    /// [`CryptoError::MissingRoomKey`], it is kept and delivered as
    /// [`Event::Message`] if its room key arrives.
    Undecryptable {
        conversation_id: ConversationId,
        message_id: MessageId,
        sender: DeviceAddr,
        reason: CryptoError,
    },
    /// A conversation appeared or its membership changed.
    ConversationUpdated(Conversation),
    /// A user sharing a conversation with us changed devices; the next
    /// room key goes to the new list.
    DeviceListChanged { user_id: UserId },
    /// A to-device message was refused (forged, garbled, not for us).
    ToDeviceRejected {
        sender: Option<DeviceAddr>,
        reason: CryptoError,
    },
    /// A user sharing a conversation with us changed presence.
    PresenceChanged(Presence),
    /// A member of a conversation started or stopped typing. Show it for at
    /// most `timeout` unless a newer event about them comes.
    Typing {
        conversation_id: ConversationId,
        user_id: UserId,
        typing: bool,
        timeout: Duration,
    },
}

/// Whether a user is around, as the server shows it to the users who share
/// a conversation with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceState {
    /// A device is connected and was in use recently.
    Online,
    /// A device is connected, but none was in use recently.
    Away,
    /// No device is connected.
    Offline,
    /// The server did not say (or said something this client does not know).
    Unknown,
}

impl PresenceState {
    /// `online`, `away`, `offline` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Away => "away",
            PresenceState::Offline => "offline",
            PresenceState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for PresenceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub user_id: UserId,
    pub state: PresenceState,
    /// When the user was last seen connected (milliseconds since the Unix
    /// epoch); `None` when they hide it or the server does not know.
    pub last_seen_ms: Option<u64>,
}

impl TryFrom<&pb::PresenceInfo> for Presence {
    type Error = Error;

    fn try_from(p: &pb::PresenceInfo) -> Result<Self> {
        let state = match pb::PresenceState::try_from(p.state) {
            Ok(pb::PresenceState::Online) => PresenceState::Online,
            Ok(pb::PresenceState::Away) => PresenceState::Away,
            Ok(pb::PresenceState::Offline) => PresenceState::Offline,
            _ => PresenceState::Unknown,
        };
        Ok(Presence {
            user_id: UserId::parse(p.user_id.as_str())?,
            state,
            last_seen_ms: (p.last_seen_ms > 0).then_some(p.last_seen_ms),
        })
    }
}

/// The stream of [`Event`]s of a connected client (see [`Client::connect`]).
///
/// Ends when the client is disconnected or another `connect` replaced it.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event, or `None` once the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures::Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        let config = ClientConfig::new("http://127.0.0.1:1", "/tmp/x", "pw");
        assert!(config.validate().is_ok());
        assert!(!format!("{config:?}").contains("\"pw\""));
        let mut bad = config.clone();
        bad.one_time_keys_target = 0;
        assert!(matches!(bad.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn media_limits_are_validated() {
        let config = ClientConfig::new("http://127.0.0.1:1", "/tmp/x", "pw");
        assert_eq!(config.media_chunk_bytes + media::TAG_BYTES, 256 * 1024);
        for chunk in [0, 1024 * 1024, config.media_max_message_bytes] {
            let mut bad = config.clone();
            bad.media_chunk_bytes = chunk;
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{chunk}");
        }
        let mut small = config.clone();
        small.media_chunk_bytes = 1;
        assert!(small.validate().is_ok());
        let mut bad = config;
        bad.media_attempts = 0;
        assert!(matches!(bad.validate(), Err(Error::Config(_))));
    }

    #[test]
    fn presence_converts_from_the_wire() {
        let p = Presence::try_from(&pb::PresenceInfo {
            user_id: "bob".into(),
            state: pb::PresenceState::Away as i32,
            last_seen_ms: 0,
        })
        .unwrap();
        assert_eq!(p.state, PresenceState::Away);
        assert_eq!(p.last_seen_ms, None);
        let p = Presence::try_from(&pb::PresenceInfo {
            user_id: "bob".into(),
            state: 42,
            last_seen_ms: 7,
        })
        .unwrap();
        assert_eq!((p.state, p.last_seen_ms), (PresenceState::Unknown, Some(7)));
        assert!(
            Presence::try_from(&pb::PresenceInfo {
                user_id: "not a user".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
