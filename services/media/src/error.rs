//! media's error, and the one place where it becomes a gRPC status.

use std::time::Duration;

use chappe_bus::RpcError;
use chappe_bus::rpc::Code;

/// Result of a media operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything media refuses or fails on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field that does not decode or validate (an id, a size, a hash).
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// An upload bigger than `max_upload_bytes`: never accepted, so no
    /// retry-after.
    #[error("the upload is {size} bytes, over the limit of {max} bytes (max_upload_bytes)")]
    TooLarge { size: u64, max: u64 },
    /// The user's uploads within the quota window plus this one would go
    /// over the quota.
    #[error(
        "upload quota exceeded: {used} bytes uploaded in the last {window:?} plus {size} would \
         go over the quota of {quota} bytes; retry in {retry_after:?}"
    )]
    QuotaExceeded {
        used: u64,
        size: u64,
        quota: u64,
        window: Duration,
        retry_after: Duration,
    },
    /// The uploader is not a member of the conversation the media is posted
    /// in (or it does not exist).
    #[error("not a member of conversation {0}")]
    NotMember(String),
    /// The downloader is a member of none of the conversations the media
    /// was posted in.
    #[error("media {0} was not posted in a conversation of yours")]
    NoAccess(String),
    /// The media id is taken by another upload. Says nothing more.
    #[error("media id {0} is already in use; choose another id")]
    IdTaken(String),
    /// No such media (for this caller): unknown, expired, or another
    /// user's upload.
    #[error("media {0} not found")]
    NotFound(String),
    /// A chunk that is neither stored nor the next one.
    #[error("media {media}: chunk {index} is out of order; the next chunk to send is {expected}")]
    WrongIndex {
        media: String,
        index: u32,
        expected: u32,
    },
    /// A chunk stored already, with other content.
    #[error(
        "media {media}: chunk {index} is already stored with other content; the next chunk to \
         send is {expected}"
    )]
    ChunkDiffers {
        media: String,
        index: u32,
        expected: u32,
    },
    /// A chunk whose length is not what the start declared.
    #[error("chunk {index} is {len} bytes; it must be {expected}")]
    ChunkLength {
        index: u32,
        len: usize,
        expected: u64,
    },
    /// A chunk whose data does not hash to its declared SHA-256.
    #[error("chunk {index}: chunk hash mismatch")]
    ChunkHashMismatch { index: u32 },
    /// Every chunk arrived but the whole ciphertext does not hash to the
    /// start's SHA-256; the object was deleted.
    #[error(
        "media {0}: the whole object's SHA-256 does not match the one given at the start; \
         the upload was discarded, start again"
    )]
    ObjectHashMismatch(String),
    /// A download of an object whose upload has not completed.
    #[error("media {media} is not complete yet: {stored} of {chunk_count} chunks uploaded")]
    Incomplete {
        media: String,
        stored: u32,
        chunk_count: u32,
    },
    /// A download past the object's last chunk.
    #[error("media {media} has {chunk_count} chunks; there is no chunk {index}")]
    PastEnd {
        media: String,
        index: u32,
        chunk_count: u32,
    },
    /// fanout did not answer a membership question.
    #[error("asking fanout about membership: {0}")]
    Fanout(RpcError),
    /// The media store failed.
    #[error(transparent)]
    Store(#[from] chappe_storage::Error),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl ToString) -> Self {
        Self::InvalidField {
            field,
            reason: reason.to_string(),
        }
    }

    /// True when the fault is on the server's side (worth an error log).
    pub fn is_server_fault(&self) -> bool {
        match self {
            Self::Store(_) => true,
            Self::Fanout(e) => !is_transient(e.code),
            _ => false,
        }
    }
}

/// Codes from fanout that mean "not now" rather than a bug.
fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

/// The only place where media chooses gRPC status codes.
impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        use chappe_storage::Error as Store;
        let message = e.to_string();
        match e {
            Error::Missing(_)
            | Error::InvalidField { .. }
            | Error::ChunkLength { .. }
            | Error::ChunkHashMismatch { .. }
            | Error::ObjectHashMismatch(_) => RpcError::invalid_argument(message),
            // A permanent limit: no retry-after, trying again will not help.
            Error::TooLarge { .. } => RpcError::new(Code::ResourceExhausted, message),
            Error::QuotaExceeded { retry_after, .. } => {
                RpcError::resource_exhausted(message, retry_after)
            }
            Error::NotMember(_) | Error::NoAccess(_) => RpcError::permission_denied(message),
            Error::IdTaken(_) => RpcError::already_exists(message),
            Error::NotFound(_) => RpcError::not_found(message),
            Error::WrongIndex { .. } | Error::ChunkDiffers { .. } | Error::Incomplete { .. } => {
                RpcError::failed_precondition(message)
            }
            Error::PastEnd { .. } => RpcError::new(Code::OutOfRange, message),
            Error::Fanout(e) if is_transient(e.code) => {
                RpcError::unavailable("conversation membership cannot be checked now; try again")
            }
            Error::Fanout(_) => RpcError::internal("media failed to check conversation membership"),
            Error::Store(Store::Unavailable(_)) => {
                RpcError::unavailable("the media store is unavailable; try again")
            }
            Error::Store(Store::Corrupt { .. } | Store::Conflict(_)) => {
                RpcError::internal("the media store failed on this request")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chappe_storage::Error as Store;

    use super::*;

    #[test]
    fn client_mistakes_are_invalid_arguments() {
        for e in [
            Error::Missing("actor"),
            Error::invalid("media_id", "bad"),
            Error::ChunkHashMismatch { index: 3 },
            Error::ChunkLength {
                index: 0,
                len: 3,
                expected: 4,
            },
            Error::ObjectHashMismatch("m".into()),
        ] {
            assert_eq!(RpcError::from(e).code, Code::InvalidArgument);
        }
        let e = RpcError::from(Error::ChunkHashMismatch { index: 3 });
        assert!(e.message.contains("chunk hash mismatch"), "{}", e.message);
    }

    #[test]
    fn limits_are_resource_exhausted_and_only_quotas_say_when() {
        let e = RpcError::from(Error::TooLarge { size: 3, max: 2 });
        assert_eq!(e.code, Code::ResourceExhausted);
        assert_eq!(e.retry_after, None);
        assert!(e.message.contains("max_upload_bytes"), "{}", e.message);
        let e = RpcError::from(Error::QuotaExceeded {
            used: 10,
            size: 5,
            quota: 12,
            window: Duration::from_secs(60),
            retry_after: Duration::from_millis(1_500),
        });
        assert_eq!(e.code, Code::ResourceExhausted);
        assert_eq!(e.retry_after, Some(Duration::from_millis(1_500)));
    }

    #[test]
    fn failures_behind_media_map_to_server_codes_without_details() {
        let e = RpcError::from(Error::Store(Store::Unavailable("down".into())));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::Store(Store::Corrupt {
            table: "media_chunks",
            detail: "secret detail".into(),
        }));
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("secret"));
        let e = RpcError::from(Error::Fanout(RpcError::unavailable("no fanout")));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::Fanout(RpcError::invalid_argument("secret detail")));
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("secret"));
    }
}
