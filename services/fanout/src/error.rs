//! fanout's error, and the one place where it becomes a gRPC status.

use chappe_bus::RpcError;
use chappe_bus::rpc::Code;
use chappe_proto::ids::IdError;

/// What fanout refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    BadId(#[from] IdError),
    #[error("{what} is {size} bytes, the limit is {limit}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("conversation {0} does not exist")]
    UnknownConversation(String),
    #[error("{user} is not a member of conversation {conversation}")]
    NotMember { user: String, conversation: String },
    #[error("you share no conversation with {0}: to-device messages go to conversation members")]
    Stranger(String),
    #[error("{0}")]
    Refused(String),
    #[error("the membership log moved on concurrently; try again")]
    Contended,
    #[error(transparent)]
    Store(#[from] chappe_storage::Error),
    /// The message is stored but its delivery job could not be queued: the
    /// sender retries (the retry finds the stored message and queues again).
    #[error("message {0} stored but not yet queued for delivery; retry")]
    NotQueued(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Invalid(_) | Error::BadId(_) | Error::TooLarge { .. } => {
                RpcError::invalid_argument(message)
            }
            Error::UnknownConversation(_) => RpcError::not_found(message),
            Error::NotMember { .. } | Error::Stranger(_) => RpcError::permission_denied(message),
            Error::Refused(_) => RpcError::failed_precondition(message),
            Error::Contended => RpcError::new(Code::Aborted, message),
            Error::Store(chappe_storage::Error::Unavailable(_)) | Error::NotQueued(_) => {
                RpcError::unavailable(message)
            }
            Error::Store(chappe_storage::Error::Conflict(_)) => {
                RpcError::new(Code::Aborted, message)
            }
            Error::Store(chappe_storage::Error::Corrupt { .. }) => {
                tracing::error!(error = %message, "corrupt data in the store");
                RpcError::internal("stored data could not be read")
            }
        }
    }
}
