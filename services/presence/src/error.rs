//! presence's error, and the one place where it becomes a gRPC status.

use chappe_bus::RpcError;
use chappe_bus::rpc::Code;

use crate::store::StoreError;

/// Result of a presence operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything presence refuses or fails on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is absent.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field that does not decode or validate (an id, an enum).
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    /// More entries in one request than the configured limit.
    #[error("{field} has {count} entries, the limit is {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    /// The presence store failed.
    #[error(transparent)]
    Presence(#[from] StoreError),
    /// The settings store failed.
    #[error(transparent)]
    Settings(#[from] chappe_storage::Error),
    /// fanout (who shares a conversation with whom) failed or did not
    /// answer in time.
    #[error("fanout: {0}")]
    Fanout(RpcError),
    /// Typing in a conversation the user is not a member of (or that does
    /// not exist: the two are not told apart).
    #[error("not a member of conversation {0}")]
    NotMember(String),
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl ToString) -> Self {
        Self::InvalidField {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

/// The only place where presence chooses gRPC status codes.
impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        use chappe_storage::Error as Store;
        let message = e.to_string();
        match e {
            Error::Missing(_) | Error::InvalidField { .. } | Error::TooMany { .. } => {
                RpcError::invalid_argument(message)
            }
            Error::Presence(StoreError::Backend(_)) => {
                RpcError::unavailable("the presence store is unavailable; try again")
            }
            Error::Presence(StoreError::Contended { .. }) => RpcError::new(
                Code::Aborted,
                "too many concurrent presence updates; try again",
            ),
            Error::Presence(StoreError::Corrupt { .. }) => {
                RpcError::internal("the presence store failed on this request")
            }
            Error::Settings(Store::Unavailable(_)) => {
                RpcError::unavailable("the settings store is unavailable; try again")
            }
            Error::Settings(Store::Corrupt { .. } | Store::Conflict(_)) => {
                RpcError::internal("the settings store failed on this request")
            }
            Error::Fanout(e) => match e.code {
                // fanout refused what presence asked: presence's own bug.
                Code::InvalidArgument | Code::PermissionDenied | Code::NotFound => {
                    RpcError::internal("presence asked fanout a malformed question")
                }
                _ => RpcError::unavailable("cannot tell who shares a conversation; try again"),
            },
            Error::NotMember(_) => RpcError::new(Code::PermissionDenied, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_mistakes_are_invalid_arguments() {
        let e = RpcError::from(Error::TooMany {
            field: "user_ids",
            count: 501,
            max: 500,
        });
        assert_eq!(e.code, Code::InvalidArgument);
        assert_eq!(e.message, "user_ids has 501 entries, the limit is 500");
        let e = RpcError::from(Error::invalid("user_ids[0]", "bad"));
        assert_eq!(e.code, Code::InvalidArgument);
        assert_eq!(
            RpcError::from(Error::Missing("actor")).code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn store_failures_map_to_server_codes_without_details() {
        let e = RpcError::from(Error::Presence(StoreError::Backend("down".into())));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::Presence(StoreError::Contended {
            user: "alice".into(),
        }));
        assert_eq!(e.code, Code::Aborted);
        let e = RpcError::from(Error::Presence(StoreError::Corrupt {
            user: "alice".into(),
            why: "secret detail".into(),
        }));
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("secret"));
        let e = RpcError::from(Error::Settings(chappe_storage::Error::Unavailable(
            "down".into(),
        )));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::Fanout(RpcError::unavailable("no responders")));
        assert_eq!(e.code, Code::Unavailable);
        let e = RpcError::from(Error::NotMember("c".into()));
        assert_eq!(e.code, Code::PermissionDenied);
        let e = RpcError::from(Error::Settings(chappe_storage::Error::Corrupt {
            table: "members",
            detail: "secret detail".into(),
        }));
        assert_eq!(e.code, Code::Internal);
        assert!(!e.message.contains("secret"));
    }
}
