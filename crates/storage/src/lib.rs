//! Chappe's data model and the stores that hold it (DESIGN.md §4).
//!
//! - the row types and repository traits below are the logical data model,
//!   one table family per owning service: [`KeyRepo`] (keydir),
//!   [`ConversationRepo`], [`MessageRepo`] and [`InboxRepo`] (fanout),
//!   [`MediaRepo`] (media), [`PresenceSettingsRepo`] (presence);
//! - [`embedded::EmbeddedStore`] implements every repository on SQLite
//!   (WAL, `synchronous=FULL`, one transaction per operation);
//!   [`cql::CqlStore`] implements the same traits on ScyllaDB (or
//!   Cassandra) over the same tables and keys, with versioned CQL
//!   migrations ([`cql::migrate`]);
//! - [`select`]: [`StoreLocation`] (`--store embedded:PATH` or
//!   `--store scylla://...`) and [`AnyStore`], the store it opens;
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
//! | `media_objects` | `(media_id)` | media |
//! | `media_chunks` | `((media_id), idx)` | media |
//! | `media_posts` | `((media_id), conversation_id)` | media |
//! | `presence_settings` | `(user_id)` | presence |
//!
//! `media_objects` is also read by owner and creation time (quotas) and by
//! expiry (the sweeper): SQLite indexes it on `(owner_user_id,
//! created_at_ms)` and `(expires_at_ms)`; the CQL store keeps the same
//! lookups as tables of its own, written in the same batch as the object.
//! A chunk's ciphertext lives in its own row (at most one chunk, a few
//! hundred KiB), so no call ever holds a whole object in memory.
//!
//! *Architecture invariant*: a repository call either happens whole or not
//! at all, and returns only after the data is durable. Callers acknowledge
//! to clients only after it returns (DESIGN.md invariant 3).

pub mod conformance;
pub mod cql;
pub mod embedded;
pub mod select;

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, MessageId};

pub use cql::{CqlConfig, CqlStore};
pub use embedded::EmbeddedStore;
pub use select::{AnyStore, StoreLocation};

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

// ----------------------------------------------------------------- media

/// One media object: what an upload declared when it began, and whether it
/// is complete. Its ciphertext is in [`MediaChunkRow`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaObjectRow {
    /// 32 lowercase hex digits, chosen by the uploading client.
    pub media_id: String,
    pub owner_user_id: String,
    /// Total bytes of ciphertext.
    pub size: u64,
    /// Bytes of every chunk but the last, which holds the rest.
    pub chunk_size: u32,
    pub chunk_count: u32,
    /// SHA-256 of the whole ciphertext.
    pub sha256: Vec<u8>,
    pub created_at_ms: i64,
    /// When the object and its chunks are deleted.
    pub expires_at_ms: i64,
    /// Every chunk is stored and the whole hash matched.
    pub complete: bool,
}

impl MediaObjectRow {
    /// Whether `other` declares the same upload: same id, owner, size,
    /// chunking and hash (times and completion aside). A begin that does is
    /// a resumption of this one.
    pub fn same_upload(&self, other: &MediaObjectRow) -> bool {
        self.media_id == other.media_id
            && self.owner_user_id == other.owner_user_id
            && self.size == other.size
            && self.chunk_size == other.chunk_size
            && self.chunk_count == other.chunk_count
            && self.sha256 == other.sha256
    }
}

/// A media object and how far its upload went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMedia {
    pub object: MediaObjectRow,
    /// Chunks `0..stored_chunks` are stored (chunks are stored in order,
    /// so there is never a gap).
    pub stored_chunks: u32,
}

/// What [`MediaRepo::create_object`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateMedia {
    /// A new object, with no chunk yet.
    Created(StoredMedia),
    /// The same upload was stored already (see
    /// [`MediaObjectRow::same_upload`]); here it is as stored.
    Existing(StoredMedia),
    /// The id is taken by another owner or another upload; nothing was
    /// written.
    Conflict,
}

/// One chunk of a media object's ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaChunkRow {
    pub media_id: String,
    /// From 0.
    pub idx: u32,
    /// SHA-256 of `data`.
    pub sha256: Vec<u8>,
    pub data: Vec<u8>,
}

/// What [`MediaRepo::put_chunk`] did. `stored` is the number of chunks
/// stored after the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutChunk {
    /// The chunk was the next one and is stored now.
    Stored { stored: u32 },
    /// The chunk was stored already with the same hash; nothing written.
    Unchanged { stored: u32 },
    /// The chunk was stored already with another hash; nothing written.
    Conflict { stored: u32 },
    /// The index is neither stored nor the next one (`stored`), or it is
    /// past the object's last chunk; nothing written.
    OutOfOrder { stored: u32 },
    /// No object has this id; nothing written.
    UnknownObject,
}

/// One object of an owner, for quotas: [`MediaRepo::usage_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaUsage {
    pub media_id: String,
    pub created_at_ms: i64,
    pub size: u64,
}

/// The media service's tables: objects, their chunks, and the
/// conversations each was posted in.
#[async_trait]
pub trait MediaRepo: Send + Sync {
    /// Creates the object, with no chunk, and records that it was posted
    /// in `conversation`. When the id is stored already: the same upload
    /// ([`MediaObjectRow::same_upload`]) is `Existing` (its post in
    /// `conversation` recorded too, its times and chunks unchanged);
    /// anything else is `Conflict` and writes nothing.
    async fn create_object(
        &self,
        row: &MediaObjectRow,
        conversation: ConversationId,
    ) -> Result<CreateMedia>;
    /// The object and how many of its chunks are stored.
    async fn get_object(&self, media_id: &str) -> Result<Option<StoredMedia>>;
    /// Stores a chunk if its index is the next one (the number of chunks
    /// stored) and within the object; see [`PutChunk`] for the rest.
    async fn put_chunk(&self, chunk: MediaChunkRow) -> Result<PutChunk>;
    /// One chunk, as stored.
    async fn get_chunk(&self, media_id: &str, idx: u32) -> Result<Option<MediaChunkRow>>;
    /// Marks the object complete. False, writing nothing, when there is no
    /// such object or some of its chunks are missing.
    async fn mark_complete(&self, media_id: &str) -> Result<bool>;
    /// Records that the object was posted in `conversation` (again is a
    /// no-op). False, writing nothing, when there is no such object.
    async fn add_post(&self, media_id: &str, conversation: ConversationId) -> Result<bool>;
    /// The conversations the object was posted in, ordered by id.
    async fn posts(&self, media_id: &str) -> Result<Vec<ConversationId>>;
    /// The objects `owner_user_id` created at or after `since_ms`, oldest
    /// first (ties by media id): their sizes add up to the owner's use of a
    /// quota window, and their times say when that use rolls out of it.
    async fn usage_since(&self, owner_user_id: &str, since_ms: i64) -> Result<Vec<MediaUsage>>;
    /// Deletes up to `limit` objects whose `expires_at_ms <= now_ms`, each
    /// with its chunks and posts, soonest expired first. Returns how many
    /// were deleted (fewer than `limit`: none is left).
    async fn delete_expired(&self, now_ms: i64, limit: usize) -> Result<u64>;
    /// Deletes one object with its chunks and posts. False when there was
    /// no such object.
    async fn delete_object(&self, media_id: &str) -> Result<bool>;
}

// -------------------------------------------------------------- presence

/// presence's durable per-user settings.
#[async_trait]
pub trait PresenceSettingsRepo: Send + Sync {
    /// Sets whether others may see `user_id`'s last-seen time (and stamps
    /// the change with the store's clock).
    async fn set_hide_last_seen(&self, user_id: &str, hide: bool) -> Result<()>;
    /// For each of `user_ids`, in order, whether they hide their last-seen
    /// time; false for users who never set it.
    async fn hide_last_seen_many(&self, user_ids: &[&str]) -> Result<Vec<bool>>;
}

/// Every repository at once: what a process that runs all services holds.
pub trait Store:
    KeyRepo + ConversationRepo + MessageRepo + InboxRepo + MediaRepo + PresenceSettingsRepo
{
}

impl<T> Store for T where
    T: KeyRepo + ConversationRepo + MessageRepo + InboxRepo + MediaRepo + PresenceSettingsRepo
{
}
