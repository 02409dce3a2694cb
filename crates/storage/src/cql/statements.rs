//! Every statement the store runs, prepared once at connect.
//!
//! Each is marked idempotent or not (the driver retries only idempotent
//! ones after an unknown outcome): plain reads, inserts and deletes of
//! fixed values are; lightweight transactions are not. `*_serial` reads
//! run at the serial consistency, to see the outcome of every LWT that
//! completed (or to complete one left in progress).

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};

use super::CqlConfig;
use crate::{Error, Result};

/// Columns of a device's keys.
pub(crate) const DEVICE_COLS: &str =
    "user_id, device_id, curve25519, ed25519, signature, created_at_ms, uploaded_at_ms";
/// Columns of a one-time or fallback key.
pub(crate) const KEY_COLS: &str = "key_id, curve25519, signature, created_at_ms";
/// Columns of a membership event.
pub(crate) const MEMBERSHIP_COLS: &str =
    "conversation_id, seq, actor_user_id, actor_device_id, op, target_user_id, at_ms, signature";
/// Columns of a message.
pub(crate) const MESSAGE_COLS: &str = "conversation_id, message_id, sender_user_id, \
     sender_device_id, client_msg_id, ciphertext, session_id, sent_at_ms";
/// Columns of an inbox entry.
pub(crate) const INBOX_COLS: &str = "user_id, device_id, inbox_id, sender_user_id, \
     sender_device_id, olm_type, ciphertext, sent_at_ms";
/// Columns of a media object.
pub(crate) const MEDIA_COLS: &str = "media_id, owner_user_id, size, chunk_size, chunk_count, \
     sha256, created_at_ms, expires_at_ms, complete";

macro_rules! statements {
    ($( $(#[$doc:meta])* $name:ident: $kind:ident => $cql:literal; )*) => {
        pub(crate) struct Statements {
            $( $(#[$doc])* pub(crate) $name: PreparedStatement, )*
        }

        impl Statements {
            /// Prepares every statement on `session` for the keyspace of
            /// `config`.
            pub(crate) async fn prepare(session: &Session, config: &CqlConfig) -> Result<Self> {
                let ks = config.keyspace.as_str();
                let serial = match config.serial_consistency {
                    SerialConsistency::Serial => Consistency::Serial,
                    SerialConsistency::LocalSerial => Consistency::LocalSerial,
                };
                let page_size = config.page_size;
                Ok(Self {
                    $( $name: prepare(session, Kind::$kind, &format!($cql, ks = ks), serial, page_size).await?, )*
                })
            }
        }
    };
}

/// What a statement is, for the driver.
#[derive(Clone, Copy)]
enum Kind {
    /// A read or a write of fixed values: safe to retry.
    Idempotent,
    /// A read at the serial consistency (idempotent).
    SerialRead,
    /// A lightweight transaction: never retried blindly.
    Lwt,
}

async fn prepare(
    session: &Session,
    kind: Kind,
    cql: &str,
    serial: Consistency,
    page_size: i32,
) -> Result<PreparedStatement> {
    let mut st = session.prepare(cql).await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot prepare `{cql}`: {e}; is the keyspace migrated to this build's schema? \
             (`chappe migrate`)"
        ))
    })?;
    st.set_page_size(page_size);
    match kind {
        Kind::Idempotent => st.set_is_idempotent(true),
        Kind::SerialRead => {
            st.set_is_idempotent(true);
            st.set_consistency(serial);
        }
        Kind::Lwt => st.set_is_idempotent(false),
    }
    Ok(st)
}

statements! {
    // ------------------------------------------------------------ keys
    device_get: Idempotent =>
        "SELECT {DEVICE_COLS} FROM {ks}.device_keys WHERE user_id = ? AND device_id = ?";
    device_get_serial: SerialRead =>
        "SELECT {DEVICE_COLS} FROM {ks}.device_keys WHERE user_id = ? AND device_id = ?";
    device_insert: Lwt =>
        "INSERT INTO {ks}.device_keys ({DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS";
    device_list: Idempotent =>
        "SELECT {DEVICE_COLS} FROM {ks}.device_keys WHERE user_id = ?";
    /// Every key row of a device, claimed ones included.
    otk_list: Idempotent =>
        "SELECT {KEY_COLS}, claimed_by FROM {ks}.one_time_keys WHERE user_id = ? AND device_id = ?";
    otk_list_serial: SerialRead =>
        "SELECT {KEY_COLS}, claimed_by FROM {ks}.one_time_keys WHERE user_id = ? AND device_id = ?";
    otk_first: Idempotent =>
        "SELECT {KEY_COLS}, claimed_by FROM {ks}.one_time_keys WHERE user_id = ? AND device_id = ? LIMIT ?";
    otk_get_serial: SerialRead =>
        "SELECT {KEY_COLS}, claimed_by FROM {ks}.one_time_keys \
         WHERE user_id = ? AND device_id = ? AND key_id = ?";
    otk_insert: Lwt =>
        "INSERT INTO {ks}.one_time_keys (user_id, device_id, {KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?) \
         IF NOT EXISTS";
    otk_claim: Lwt =>
        "UPDATE {ks}.one_time_keys SET claimed_by = ? WHERE user_id = ? AND device_id = ? AND key_id = ? \
         IF claimed_by = null AND curve25519 = ? AND signature = ? AND created_at_ms = ?";
    otk_delete_claimed: Lwt =>
        "DELETE FROM {ks}.one_time_keys WHERE user_id = ? AND device_id = ? AND key_id = ? \
         IF claimed_by = ?";
    fallback_get: Idempotent =>
        "SELECT {KEY_COLS} FROM {ks}.fallback_keys WHERE user_id = ? AND device_id = ?";
    fallback_get_serial: SerialRead =>
        "SELECT {KEY_COLS} FROM {ks}.fallback_keys WHERE user_id = ? AND device_id = ?";
    fallback_insert: Lwt =>
        "INSERT INTO {ks}.fallback_keys (user_id, device_id, {KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?) \
         IF NOT EXISTS";
    fallback_replace: Lwt =>
        "UPDATE {ks}.fallback_keys SET key_id = ?, curve25519 = ?, signature = ?, created_at_ms = ? \
         WHERE user_id = ? AND device_id = ? \
         IF key_id = ? AND curve25519 = ? AND signature = ? AND created_at_ms = ?";

    // --------------------------------------------------- conversations
    conversation_get: Idempotent =>
        "SELECT conversation_id, kind, created_at_ms, membership_seq FROM {ks}.conversations \
         WHERE conversation_id = ?";
    /// The seq and the last event, for an append.
    conversation_last: Idempotent =>
        "SELECT membership_seq, last_seq, last_actor_user_id, last_actor_device_id, last_op, \
         last_target_user_id, last_at_ms, last_signature, last_change, last_attempt, created_by \
         FROM {ks}.conversations WHERE conversation_id = ?";
    conversation_last_serial: SerialRead =>
        "SELECT membership_seq, last_seq, last_actor_user_id, last_actor_device_id, last_op, \
         last_target_user_id, last_at_ms, last_signature, last_change, last_attempt, created_by \
         FROM {ks}.conversations WHERE conversation_id = ?";
    conversation_insert: Lwt =>
        "INSERT INTO {ks}.conversations (conversation_id, kind, created_at_ms, membership_seq, \
         created_by) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS";
    conversation_advance: Lwt =>
        "UPDATE {ks}.conversations SET membership_seq = ?, last_seq = ?, last_actor_user_id = ?, \
         last_actor_device_id = ?, last_op = ?, last_target_user_id = ?, last_at_ms = ?, \
         last_signature = ?, last_change = ?, last_attempt = ? \
         WHERE conversation_id = ? IF membership_seq = ?";
    head_get: Idempotent =>
        "SELECT head FROM {ks}.conversation_heads WHERE conversation_id = ?";
    head_put: Idempotent =>
        "UPDATE {ks}.conversation_heads USING TIMESTAMP ? SET head = ? WHERE conversation_id = ?";
    log_insert: Idempotent =>
        "INSERT INTO {ks}.membership_log ({MEMBERSHIP_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)";
    log_list: Idempotent =>
        "SELECT {MEMBERSHIP_COLS} FROM {ks}.membership_log WHERE conversation_id = ?";
    member_add: Idempotent =>
        "INSERT INTO {ks}.members (conversation_id, user_id) VALUES (?, ?) USING TIMESTAMP ?";
    member_remove: Idempotent =>
        "DELETE FROM {ks}.members USING TIMESTAMP ? WHERE conversation_id = ? AND user_id = ?";
    user_conversation_add: Idempotent =>
        "INSERT INTO {ks}.user_conversations (user_id, conversation_id) VALUES (?, ?) \
         USING TIMESTAMP ?";
    user_conversation_remove: Idempotent =>
        "DELETE FROM {ks}.user_conversations USING TIMESTAMP ? WHERE user_id = ? AND conversation_id = ?";
    members_list: Idempotent =>
        "SELECT user_id FROM {ks}.members WHERE conversation_id = ?";
    member_get: Idempotent =>
        "SELECT user_id FROM {ks}.members WHERE conversation_id = ? AND user_id = ?";
    user_conversations_list: Idempotent =>
        "SELECT conversation_id FROM {ks}.user_conversations WHERE user_id = ?";

    // -------------------------------------------------------- messages
    dedup_insert: Lwt =>
        "INSERT INTO {ks}.message_dedup (conversation_id, sender_user_id, sender_device_id, \
         client_msg_id, message_id, sent_at_ms, attempt) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS";
    dedup_get_serial: SerialRead =>
        "SELECT message_id, sent_at_ms, attempt FROM {ks}.message_dedup WHERE conversation_id = ? \
         AND sender_user_id = ? AND sender_device_id = ? AND client_msg_id = ?";
    bucket_put: Idempotent =>
        "INSERT INTO {ks}.message_buckets (conversation_id, bucket) VALUES (?, ?)";
    buckets_from: Idempotent =>
        "SELECT bucket FROM {ks}.message_buckets WHERE conversation_id = ? AND bucket >= ?";
    buckets_down_from: Idempotent =>
        "SELECT bucket FROM {ks}.message_buckets WHERE conversation_id = ? AND bucket <= ? \
         ORDER BY bucket DESC";
    message_put: Idempotent =>
        "INSERT INTO {ks}.messages (bucket, {MESSAGE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)";
    message_get: Idempotent =>
        "SELECT {MESSAGE_COLS} FROM {ks}.messages \
         WHERE conversation_id = ? AND bucket = ? AND message_id = ?";
    messages_after: Idempotent =>
        "SELECT {MESSAGE_COLS} FROM {ks}.messages \
         WHERE conversation_id = ? AND bucket = ? AND message_id > ? LIMIT ?";
    messages_before: Idempotent =>
        "SELECT {MESSAGE_COLS} FROM {ks}.messages \
         WHERE conversation_id = ? AND bucket = ? AND message_id < ? ORDER BY message_id DESC LIMIT ?";

    // ----------------------------------------------------------- inbox
    inbox_put: Idempotent =>
        "INSERT INTO {ks}.device_inbox ({INBOX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)";
    inbox_list: Idempotent =>
        "SELECT {INBOX_COLS} FROM {ks}.device_inbox WHERE user_id = ? AND device_id = ? LIMIT ?";
    inbox_existing: Idempotent =>
        "SELECT inbox_id FROM {ks}.device_inbox WHERE user_id = ? AND device_id = ? AND inbox_id IN ?";
    inbox_delete: Idempotent =>
        "DELETE FROM {ks}.device_inbox WHERE user_id = ? AND device_id = ? AND inbox_id = ?";
    to_device_dedup_insert: Lwt =>
        "INSERT INTO {ks}.to_device_dedup (sender_user_id, sender_device_id, client_msg_id, attempt) \
         VALUES (?, ?, ?, ?) IF NOT EXISTS";
    to_device_dedup_get_serial: SerialRead =>
        "SELECT attempt FROM {ks}.to_device_dedup WHERE sender_user_id = ? AND sender_device_id = ? \
         AND client_msg_id = ?";

    // ----------------------------------------------------------- media
    media_insert: Lwt =>
        "INSERT INTO {ks}.media_objects ({MEDIA_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
         IF NOT EXISTS USING TTL ?";
    media_get: Idempotent =>
        "SELECT {MEDIA_COLS} FROM {ks}.media_objects WHERE media_id = ?";
    media_get_serial: SerialRead =>
        "SELECT {MEDIA_COLS} FROM {ks}.media_objects WHERE media_id = ?";
    media_complete: Lwt =>
        "UPDATE {ks}.media_objects USING TTL ? SET complete = true WHERE media_id = ? IF EXISTS";
    media_delete: Lwt =>
        "DELETE FROM {ks}.media_objects WHERE media_id = ? IF EXISTS";
    chunk_insert: Lwt =>
        "INSERT INTO {ks}.media_chunks (media_id, idx, sha256, data) VALUES (?, ?, ?, ?) \
         IF NOT EXISTS USING TTL ?";
    chunk_get: Idempotent =>
        "SELECT media_id, idx, sha256, data FROM {ks}.media_chunks WHERE media_id = ? AND idx = ?";
    chunk_hash_serial: SerialRead =>
        "SELECT sha256 FROM {ks}.media_chunks WHERE media_id = ? AND idx = ?";
    chunk_hash: Idempotent =>
        "SELECT sha256 FROM {ks}.media_chunks WHERE media_id = ? AND idx = ?";
    chunk_last: Idempotent =>
        "SELECT idx FROM {ks}.media_chunks WHERE media_id = ? ORDER BY idx DESC LIMIT 1";
    chunks_delete: Idempotent =>
        "DELETE FROM {ks}.media_chunks WHERE media_id = ?";
    post_put: Idempotent =>
        "INSERT INTO {ks}.media_posts (media_id, conversation_id) VALUES (?, ?) USING TTL ?";
    posts_list: Idempotent =>
        "SELECT conversation_id FROM {ks}.media_posts WHERE media_id = ?";
    posts_delete: Idempotent =>
        "DELETE FROM {ks}.media_posts WHERE media_id = ?";
    owner_put: Idempotent =>
        "INSERT INTO {ks}.media_by_owner (owner_user_id, created_at_ms, media_id, size) \
         VALUES (?, ?, ?, ?) USING TTL ?";
    owner_since: Idempotent =>
        "SELECT media_id, created_at_ms, size FROM {ks}.media_by_owner \
         WHERE owner_user_id = ? AND created_at_ms >= ?";
    owner_delete: Idempotent =>
        "DELETE FROM {ks}.media_by_owner WHERE owner_user_id = ? AND created_at_ms = ? AND media_id = ?";
    expiry_put: Idempotent =>
        "INSERT INTO {ks}.media_by_expiry (day, expires_at_ms, media_id) VALUES (?, ?, ?) USING TTL ?";
    expiry_day_put: Idempotent =>
        "INSERT INTO {ks}.media_expiry_days (shard, day) VALUES (0, ?) USING TTL ?";
    expiry_days: Idempotent =>
        "SELECT day FROM {ks}.media_expiry_days WHERE shard = 0 AND day <= ?";
    expiry_in_day: Idempotent =>
        "SELECT expires_at_ms, media_id FROM {ks}.media_by_expiry WHERE day = ? AND expires_at_ms <= ? \
         LIMIT ?";
    expiry_any_in_day: Idempotent =>
        "SELECT media_id FROM {ks}.media_by_expiry WHERE day = ? LIMIT 1";
    expiry_delete: Idempotent =>
        "DELETE FROM {ks}.media_by_expiry WHERE day = ? AND expires_at_ms = ? AND media_id = ?";
    expiry_day_delete: Idempotent =>
        "DELETE FROM {ks}.media_expiry_days WHERE shard = 0 AND day = ?";

    // -------------------------------------------------------- presence
    presence_put: Idempotent =>
        "INSERT INTO {ks}.presence_settings (user_id, hide_last_seen, updated_at_ms) VALUES (?, ?, ?)";
    presence_get: Idempotent =>
        "SELECT hide_last_seen FROM {ks}.presence_settings WHERE user_id = ?";
}
