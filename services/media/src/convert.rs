//! Wire types to domain types, validated as they convert, and stored
//! objects back to the wire.

use std::fmt;

use chappe_proto::ids::{ConversationId, DeviceId, UserId};
use chappe_proto::v1;
use chappe_storage::{MediaObjectRow, StoredMedia};

use crate::config::{MediaConfig, ms};
use crate::error::{Error, Result};

/// Bytes of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// A media object's id: 32 lowercase hex digits (128 random bits, chosen
/// by the uploading client).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaId(String);

impl MediaId {
    /// Parses `value`; `field` names it in the error.
    pub fn parse(field: &'static str, value: impl Into<String>) -> Result<Self> {
        let value = value.into();
        let hex = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
        if value.len() != 32 || !value.bytes().all(hex) {
            return Err(Error::invalid(
                field,
                "a media id is 32 lowercase hex digits",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MediaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The authenticated device a request is made for.
#[derive(Debug, Clone)]
pub struct Actor {
    pub user: UserId,
    pub device: DeviceId,
}

impl Actor {
    pub fn from_wire(actor: Option<v1::DeviceRef>) -> Result<Self> {
        let actor = actor.ok_or(Error::Missing("actor"))?;
        Ok(Self {
            user: UserId::parse(actor.user_id).map_err(|e| Error::invalid("actor.user_id", e))?,
            device: DeviceId::parse(actor.device_id)
                .map_err(|e| Error::invalid("actor.device_id", e))?,
        })
    }
}

/// A validated `MediaUploadStart`.
#[derive(Debug, Clone)]
pub struct Start {
    pub media_id: MediaId,
    pub conversation: ConversationId,
    pub size: u64,
    pub chunk_size: u32,
    pub chunk_count: u32,
    pub sha256: Vec<u8>,
}

impl Start {
    /// Checks every field against `config`'s limits.
    pub fn from_wire(start: v1::MediaUploadStart, config: &MediaConfig) -> Result<Self> {
        let media_id = MediaId::parse("start.media_id", start.media_id)?;
        let conversation = ConversationId::parse(&start.conversation_id)
            .map_err(|e| Error::invalid("start.conversation_id", e))?;
        if start.size == 0 {
            return Err(Error::invalid(
                "start.size",
                "an upload has at least one byte",
            ));
        }
        if start.size > config.max_upload_bytes {
            return Err(Error::TooLarge {
                size: start.size,
                max: config.max_upload_bytes,
            });
        }
        if start.chunk_size == 0 || start.chunk_size > config.max_chunk_bytes {
            return Err(Error::invalid(
                "start.chunk_size",
                format!(
                    "must be from 1 to {} bytes (max_chunk_bytes), not {}",
                    config.max_chunk_bytes, start.chunk_size
                ),
            ));
        }
        let chunk_count = start.size.div_ceil(u64::from(start.chunk_size));
        let chunk_count = u32::try_from(chunk_count)
            .ok()
            .filter(|n| *n <= config.max_chunks)
            .ok_or_else(|| {
                Error::invalid(
                    "start.chunk_size",
                    format!(
                        "{} bytes in chunks of {} make {chunk_count} chunks, more than the \
                         {} allowed (max_chunks): use bigger chunks",
                        start.size, start.chunk_size, config.max_chunks
                    ),
                )
            })?;
        if start.sha256.len() != SHA256_LEN {
            return Err(Error::invalid(
                "start.sha256",
                format!(
                    "a SHA-256 is {SHA256_LEN} bytes, not {}",
                    start.sha256.len()
                ),
            ));
        }
        Ok(Self {
            media_id,
            conversation,
            size: start.size,
            chunk_size: start.chunk_size,
            chunk_count,
            sha256: start.sha256,
        })
    }

    /// The object this start creates for `owner` at `now_ms`.
    pub fn to_row(&self, owner: &UserId, now_ms: i64, config: &MediaConfig) -> MediaObjectRow {
        MediaObjectRow {
            media_id: self.media_id.to_string(),
            owner_user_id: owner.to_string(),
            size: self.size,
            chunk_size: self.chunk_size,
            chunk_count: self.chunk_count,
            sha256: self.sha256.clone(),
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ms(config.retention)),
            complete: false,
        }
    }
}

/// The length chunk `index` of `object` must have: `chunk_size`, except
/// the last, which holds the rest.
pub fn chunk_len(object: &MediaObjectRow, index: u32) -> u64 {
    let chunk_size = u64::from(object.chunk_size);
    if index.saturating_add(1) >= object.chunk_count {
        object
            .size
            .saturating_sub(chunk_size.saturating_mul(u64::from(index)))
    } else {
        chunk_size
    }
}

/// What the server holds of an object, on the wire.
pub fn info(stored: &StoredMedia) -> v1::MediaInfo {
    let o = &stored.object;
    v1::MediaInfo {
        media_id: o.media_id.clone(),
        owner_user_id: o.owner_user_id.clone(),
        size: o.size,
        chunk_size: o.chunk_size,
        chunk_count: o.chunk_count,
        stored_chunks: stored.stored_chunks,
        complete: o.complete,
        sha256: o.sha256.clone(),
        created_at_ms: o.created_at_ms,
        expires_at_ms: o.expires_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> v1::MediaUploadStart {
        v1::MediaUploadStart {
            media_id: "0123456789abcdef0123456789abcdef".into(),
            conversation_id: ConversationId::random().to_string(),
            size: 10,
            chunk_size: 4,
            sha256: vec![7; 32],
        }
    }

    fn refused(start: v1::MediaUploadStart) -> Error {
        match Start::from_wire(start, &MediaConfig::default()) {
            Ok(s) => panic!("accepted {s:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_good_start_converts() {
        let s = Start::from_wire(start(), &MediaConfig::default()).unwrap();
        assert_eq!(s.chunk_count, 3);
        let row = s.to_row(
            &UserId::parse("alice").unwrap(),
            1_000,
            &MediaConfig::default(),
        );
        assert_eq!(row.expires_at_ms, 1_000 + 30 * 86_400_000);
        assert_eq!(chunk_len(&row, 0), 4);
        assert_eq!(chunk_len(&row, 1), 4);
        assert_eq!(chunk_len(&row, 2), 2);
        let exact = MediaObjectRow {
            size: 8,
            chunk_count: 2,
            ..row
        };
        assert_eq!(chunk_len(&exact, 1), 4);
    }

    #[test]
    fn bad_starts_are_refused_with_the_field() {
        for (bad, field) in [
            (
                v1::MediaUploadStart {
                    media_id: "0123456789ABCDEF0123456789ABCDEF".into(),
                    ..start()
                },
                "start.media_id",
            ),
            (
                v1::MediaUploadStart {
                    media_id: "../etc".into(),
                    ..start()
                },
                "start.media_id",
            ),
            (
                v1::MediaUploadStart {
                    conversation_id: "nope".into(),
                    ..start()
                },
                "start.conversation_id",
            ),
            (v1::MediaUploadStart { size: 0, ..start() }, "start.size"),
            (
                v1::MediaUploadStart {
                    chunk_size: 0,
                    ..start()
                },
                "start.chunk_size",
            ),
            (
                v1::MediaUploadStart {
                    chunk_size: 256 * 1024 + 1,
                    ..start()
                },
                "start.chunk_size",
            ),
            (
                v1::MediaUploadStart {
                    size: 1 << 30,
                    chunk_size: 1,
                    ..start()
                },
                "start.chunk_size",
            ),
            (
                v1::MediaUploadStart {
                    sha256: vec![1; 31],
                    ..start()
                },
                "start.sha256",
            ),
        ] {
            match refused(bad) {
                Error::InvalidField { field: f, .. } => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let big = v1::MediaUploadStart {
            size: (2 << 30) + 1,
            ..start()
        };
        assert!(matches!(refused(big), Error::TooLarge { .. }));
    }
}
