//! keydir's error, and the one place where it becomes a gRPC status.

use std::time::Duration;

use chappe_bus::RpcError;

/// Result of a keydir operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything keydir refuses or fails on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(String),
    /// A field that does not decode or validate (an id, a key, a signature).
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    /// A signature that does not verify; `what` names the signed thing.
    #[error("{what} signature does not verify")]
    BadSignature { what: String },
    /// More entries in one request than the configured limit.
    #[error("{field} has {count} entries, the limit is {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    /// A key dated further in the future than the allowed clock skew.
    #[error("{field} is {ahead_ms} ms in the future, more than the allowed {max_skew:?}")]
    FromTheFuture {
        field: String,
        ahead_ms: i64,
        max_skew: Duration,
    },
    /// The authenticated device uploads keys of another device.
    #[error("device {actor} may upload only its own keys, not those of {target}")]
    NotYourDevice { actor: String, target: String },
    /// Keys uploaded for a device that never uploaded its device keys.
    #[error("device {0} has no keys yet: its first upload must include device_keys")]
    UnknownDevice(String),
    /// A device uploads identity keys other than those stored.
    #[error("device {0} already has other keys; a new identity needs a new device id")]
    OtherKeys(String),
    /// A one-time key id already stored with another key.
    #[error("a one-time key id of device {device} is already used by another key ({detail})")]
    KeyIdReused { device: String, detail: String },
    /// A fallback key older than the one stored.
    #[error("device {0} already has a newer fallback key")]
    StaleFallback(String),
    /// The device would hold more unclaimed one-time keys than allowed.
    #[error(
        "device {device} would hold {would_hold} one-time keys, the limit is {max}; \
         upload again once some are claimed"
    )]
    OneTimeKeyQuota {
        device: String,
        would_hold: u64,
        max: u64,
        retry_after: Duration,
    },
    /// The key store failed.
    #[error(transparent)]
    Store(#[from] chappe_storage::Error),
}

impl Error {
    /// Puts `prefix` before the field this error names, so that a nested
    /// conversion reports the full path (`one_time_keys[3].signature`).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::Missing(field) => Self::Missing(format!("{prefix}.{field}")),
            Self::InvalidField { field, reason } => Self::InvalidField {
                field: format!("{prefix}.{field}"),
                reason,
            },
            Self::FromTheFuture {
                field,
                ahead_ms,
                max_skew,
            } => Self::FromTheFuture {
                field: format!("{prefix}.{field}"),
                ahead_ms,
                max_skew,
            },
            other => other,
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, reason: impl ToString) -> Self {
        Self::InvalidField {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// True when the fault is on the server's side (worth an error log).
    pub fn is_server_fault(&self) -> bool {
        matches!(
            self,
            Self::Store(
                chappe_storage::Error::Unavailable(_) | chappe_storage::Error::Corrupt { .. }
            )
        )
    }
}

/// The only place where keydir chooses gRPC status codes.
impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        use chappe_storage::Error as Store;
        let message = e.to_string();
        match e {
            Error::Missing(_)
            | Error::InvalidField { .. }
            | Error::BadSignature { .. }
            | Error::TooMany { .. }
            | Error::FromTheFuture { .. } => RpcError::invalid_argument(message),
            Error::NotYourDevice { .. } => RpcError::permission_denied(message),
            Error::UnknownDevice(_) | Error::StaleFallback(_) => {
                RpcError::failed_precondition(message)
            }
            Error::OtherKeys(_) | Error::KeyIdReused { .. } => RpcError::already_exists(message),
            Error::OneTimeKeyQuota { retry_after, .. } => {
                RpcError::resource_exhausted(message, retry_after)
            }
            Error::Store(Store::Conflict(_)) => RpcError::already_exists(message),
            Error::Store(Store::Unavailable(_)) => {
                RpcError::unavailable("the key store is unavailable; try again")
            }
            Error::Store(Store::Corrupt { .. }) => {
                RpcError::internal("the key store failed on this request")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chappe_storage::Error as Store;
    use tonic::Code;

    use super::*;

    #[test]
    fn store_failures_map_to_server_codes() {
        let e = RpcError::from(Error::Store(Store::Unavailable("down".into())));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::Store(Store::Corrupt {
            table: "device_keys",
            detail: "secret detail".into(),
        }));
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("secret"));
        let e = RpcError::from(Error::Store(Store::Conflict("key id".into())));
        assert_eq!(e.code, Code::AlreadyExists);
    }

    #[test]
    fn quota_errors_carry_retry_after() {
        let e = RpcError::from(Error::OneTimeKeyQuota {
            device: "a/B".into(),
            would_hold: 501,
            max: 500,
            retry_after: Duration::from_secs(60),
        });
        assert_eq!(e.code, Code::ResourceExhausted);
        assert_eq!(e.retry_after, Some(Duration::from_secs(60)));
    }

    #[test]
    fn nested_fields_get_their_path() {
        let e = Error::invalid("signature", "bad").within("one_time_keys[2]");
        assert_eq!(e.to_string(), "one_time_keys[2].signature: bad");
    }
}
