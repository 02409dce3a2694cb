//! Chappe's data model and the stores that hold it (DESIGN.md §4).
//!
//! - the row types and repository traits below are the logical data model,
//!   one table family per owning service: [`KeyRepo`] (keydir),
//!   [`ConversationRepo`], [`MessageRepo`] and [`InboxRepo`] (fanout);
//! - [`embedded::EmbeddedStore`] implements every repository on SQLite
//!   (WAL, `synchronous=FULL`, one transaction per operation); the ScyllaDB
//!   store implements the same traits over the same tables and keys;
//! - [`conformance`] is the test suite every implementation must pass.
//!
//! Tables (same names and primary keys in SQLite and CQL):
//!
//! | table | primary key | owner |
//! |---|---|---|
//! | `device_keys` | `(user_id, device_id)` | keydir |
//! | `one_time_keys` | `(user_id, device_id, key_id)` | keydir |
//! | `fallback_keys` | `(user_id, device_id)` | keydir |
//! | `conversations` | `(conversation_id)` | fanout |
//! | `membership_log` | `(conversation_id, seq)` | fanout |
//! | `members` | `(conversation_id, user_id)` | fanout |
//! | `user_conversations` | `(user_id, conversation_id)` | fanout |
//! | `messages` | `((conversation_id, bucket), message_id)` | fanout |
//! | `message_dedup` | `((conversation_id, sender_user_id, sender_device_id, client_msg_id))` | fanout |
//! | `device_inbox` | `((user_id, device_id), inbox_id)` | fanout |
//! | `to_device_dedup` | `((sender_user_id, sender_device_id, client_msg_id))` | fanout |
//!
//! *Architecture invariant*: a repository call either happens whole or not
//! at all, and returns only after the data is durable. Callers acknowledge
//! to clients only after it returns (DESIGN.md invariant 3).

pub mod conformance;
pub mod embedded;

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, MessageId};

pub use embedded::EmbeddedStore;

/// Result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a store can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The write conflicts with what is stored (an existing key with other
    /// content, a membership seq already taken).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store cannot be reached or failed to commit; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data that cannot be read back (a bug or a corrupted file).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

/// Width of a message partition in time: messages of one conversation are
/// partitioned by `(conversation_id, sent_at / BUCKET_MS)`, so a partition
/// of a busy group stays bounded (as Discord does).
pub const BUCKET_MS: u64 = 10 * 24 * 60 * 60 * 1000;

/// The time bucket of a message id.
pub fn bucket_of(id: MessageId) -> i64 {
    (id.timestamp_ms() / BUCKET_MS) as i64
}

// ------------------------------------------------------------------ keys

/// A device's identity keys, as uploaded and verified by keydir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeysRow {
    pub user_id: String,
    pub device_id: String,
    pub curve25519: String,
    pub ed25519: String,
    pub signature: String,
    pub created_at_ms: i64,
    pub uploaded_at_ms: i64,
}

/// What [`KeyRepo::put_device`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutDevice {
    Inserted,
    /// The same keys were already stored.
    Unchanged,
    /// Other keys are stored for this device; nothing was written.
    Conflict(DeviceKeysRow),
}

/// A one-time or fallback key, signed by its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimeKeyRow {
    pub key_id: String,
    pub curve25519: String,
    pub signature: String,
    pub created_at_ms: i64,
}

/// What [`KeyRepo::put_fallback_key`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutFallback {
    Stored,
    Unchanged,
    /// The stored fallback key is newer; nothing was written.
    Stale,
}

/// A key handed out by [`KeyRepo::claim_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub key: OneTimeKeyRow,
    /// True when no one-time key was left and this is the fallback key,
    /// which stays stored.
    pub fallback: bool,
}

/// keydir's tables.
#[async_trait]
pub trait KeyRepo: Send + Sync {
    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceKeysRow>>;
    /// Stores a device's keys once; identical re-uploads are `Unchanged`.
    async fn put_device(&self, row: &DeviceKeysRow) -> Result<PutDevice>;
    /// A user's devices, ordered by device id.
    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceKeysRow>>;
    /// Adds one-time keys, all or none. Re-adding an identical key is a
    /// no-op; a known key id with another key or signature is a
    /// [`Error::Conflict`]. Returns the number of unclaimed keys after.
    async fn add_one_time_keys(
        &self,
        user_id: &str,
        device_id: &str,
        keys: &[OneTimeKeyRow],
    ) -> Result<u64>;
    async fn count_one_time_keys(&self, user_id: &str, device_id: &str) -> Result<u64>;
    /// Replaces the fallback key unless the stored one is newer.
    async fn put_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        key: &OneTimeKeyRow,
    ) -> Result<PutFallback>;
    /// Removes and returns one one-time key of the device: each key is
    /// returned to exactly one caller, however many claim at once. When none
    /// is left, returns the fallback key (not removed); `None` if neither.
    async fn claim_key(&self, user_id: &str, device_id: &str) -> Result<Option<ClaimedKey>>;
}

// --------------------------------------------------------- conversations

/// `ConversationKind` as stored (the protobuf enum's number).
pub type KindCode = i32;
/// `MembershipOp` as stored (the protobuf enum's number).
pub type OpCode = i32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub conversation_id: ConversationId,
    pub kind: KindCode,
    pub created_at_ms: i64,
    /// Newest message, maintained by [`MessageRepo::insert_message`].
    pub head: Option<MessageId>,
    /// Seq of the newest membership event.
    pub membership_seq: u64,
}

impl ConversationRow {
    /// When the conversation last saw activity: its newest message, or its
    /// creation when it has none. [`ConversationRepo::conversations_of`]
    /// orders by this, newest first.
    pub fn last_activity_ms(&self) -> i64 {
        let head_ms = self.head.map_or(0, |h| h.timestamp_ms() as i64);
        self.created_at_ms.max(head_ms)
    }
}

/// One entry of a conversation's membership log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRow {
    pub conversation_id: ConversationId,
    /// 1 for the creation, then +1 per event, without gaps.
    pub seq: u64,
    pub actor_user_id: String,
    pub actor_device_id: String,
    pub op: OpCode,
    pub target_user_id: String,
    pub at_ms: i64,
    pub signature: Vec<u8>,
}

/// How an event changes the member set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    Add,
    Remove,
    None,
}

/// fanout's conversation tables.
#[async_trait]
pub trait ConversationRepo: Send + Sync {
    /// Creates a conversation with its first membership events (seq 1..)
    /// and its member set. [`Error::Conflict`] if the id exists.
    async fn create_conversation(
        &self,
        row: &ConversationRow,
        log: &[(MembershipRow, MemberChange)],
    ) -> Result<()>;
    async fn get_conversation(&self, id: ConversationId) -> Result<Option<ConversationRow>>;
    /// Current members, ordered by user id.
    async fn members(&self, id: ConversationId) -> Result<Vec<String>>;
    async fn is_member(&self, id: ConversationId, user_id: &str) -> Result<bool>;
    /// The membership log in seq order.
    async fn membership_log(&self, id: ConversationId) -> Result<Vec<MembershipRow>>;
    /// Appends an event whose seq must be the stored `membership_seq + 1`
    /// ([`Error::Conflict`] otherwise: another writer got there first) and
    /// applies its change to the member set, in one transaction.
    async fn append_membership(&self, row: &MembershipRow, change: MemberChange) -> Result<()>;
    /// The conversations `user_id` is a member of now, newest activity first.
    async fn conversations_of(&self, user_id: &str) -> Result<Vec<ConversationRow>>;
}

// -------------------------------------------------------------- messages

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub sender_user_id: String,
    pub sender_device_id: String,
    pub client_msg_id: String,
    pub ciphertext: Vec<u8>,
    pub session_id: String,
    pub sent_at_ms: i64,
}

/// What [`MessageRepo::insert_message`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertMessage {
    Inserted,
    /// The sender already stored a message with this client_msg_id in this
    /// conversation; here it is, and nothing was written.
    Duplicate(MessageRow),
}

/// fanout's message tables.
#[async_trait]
pub trait MessageRepo: Send + Sync {
    /// Stores a message once per (conversation, sender user, sender device,
    /// client_msg_id) and moves the conversation's head, atomically.
    async fn insert_message(&self, row: &MessageRow) -> Result<InsertMessage>;
    async fn get_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<MessageRow>>;
    /// Up to `limit` messages with ids greater than `after` (all when
    /// `None`), oldest first.
    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>>;
    /// Up to `limit` messages with ids smaller than `before` (the newest
    /// when `None`), newest first.
    async fn messages_before(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>>;
}

// ----------------------------------------------------------------- inbox

/// An Olm message waiting for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxRow {
    pub user_id: String,
    pub device_id: String,
    /// Time-ordered; the inbox is read in this order.
    pub inbox_id: MessageId,
    pub sender_user_id: String,
    pub sender_device_id: String,
    pub olm_type: u32,
    pub ciphertext: Vec<u8>,
    pub sent_at_ms: i64,
}

/// fanout's per-device inboxes of to-device messages.
#[async_trait]
pub trait InboxRepo: Send + Sync {
    /// Stores a batch of to-device messages from one sender once per
    /// (sender user, sender device, client_msg_id). Returns false, writing
    /// nothing, when that batch was already stored.
    async fn put_to_device(
        &self,
        sender_user_id: &str,
        sender_device_id: &str,
        client_msg_id: &str,
        rows: &[InboxRow],
    ) -> Result<bool>;
    /// Up to `limit` entries of a device's inbox, oldest first.
    async fn inbox(&self, user_id: &str, device_id: &str, limit: usize) -> Result<Vec<InboxRow>>;
    /// Deletes acknowledged entries; unknown ids are ignored. Returns how
    /// many were removed.
    async fn delete_inbox(&self, user_id: &str, device_id: &str, ids: &[MessageId]) -> Result<u64>;
}

/// Every repository at once: what a process that runs all services holds.
pub trait Store: KeyRepo + ConversationRepo + MessageRepo + InboxRepo {}

impl<T: KeyRepo + ConversationRepo + MessageRepo + InboxRepo> Store for T {}
