//! The crate's error type.
//!
//! [`Error`] covers every failure of the public API. [`CryptoError`] is the
//! part of it that says why a key, a to-device message or a conversation
//! message was refused; it is also carried by
//! [`Event::Undecryptable`](crate::Event::Undecryptable), hence `Clone`.
//! [`MediaError`] says why an attachment could not
//! be sealed, trusted or opened (a tampered chunk, a truncated download, a
//! file that changed during its upload).

use std::path::PathBuf;
use std::time::Duration;

use chappe_proto::ids::IdError;

use crate::media::MediaError;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the client SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A [`ClientConfig`](crate::ClientConfig) value is unusable.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// An argument given to the API is unusable (empty text, too long, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// An identifier given to the API, or sent by the server, is malformed.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The server answered with a gRPC status (unary call or `FrameError`).
    #[error("server answered {code:?}: {message}")]
    Status {
        code: tonic::Code,
        message: String,
        /// For `RESOURCE_EXHAUSTED`: when to try again (`retry-after-ms`).
        retry_after: Option<Duration>,
    },
    /// The server cannot be reached (connection refused, bad URL, ...).
    #[error("cannot reach the server: {0}")]
    Transport(String),
    /// No answer within the configured request timeout.
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    /// The `Connect` stream broke before the answer arrived.
    #[error("the connection to the server was lost")]
    Disconnected,
    /// The server sent something that breaks the protocol.
    #[error("the server sent malformed data: {0}")]
    Protocol(String),
    /// A key, to-device message or conversation message was refused.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// An attachment failed a check: a chunk or the whole file does not
    /// authenticate or hash to what its message says, the download is
    /// incomplete, or the file changed while it was uploaded.
    #[error(transparent)]
    Media(#[from] MediaError),
    /// An upload stopped before its end (as
    /// [`SendFileOptions::stop_after_chunks`](crate::SendFileOptions::stop_after_chunks)
    /// asked, or after its last retry); the server holds `stored_chunks`
    /// chunks. Sending the file again with the same upload id resumes it.
    #[error("upload {upload_id} (media {media_id}) interrupted with {stored_chunks} chunks stored")]
    UploadInterrupted {
        upload_id: String,
        media_id: String,
        stored_chunks: u32,
    },
    /// Another process holds this device's state directory.
    #[error("the state directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The state file does not decrypt under the passphrase.
    #[error("wrong passphrase (or the state file was altered)")]
    WrongPassphrase,
    /// `Client::open` on a directory without device state.
    #[error("no device state in {0}: log in first")]
    NoState(PathBuf),
    /// The state directory belongs to another user, device or server.
    #[error("the state in {dir} belongs to {found}, not {wanted}")]
    StateMismatch {
        dir: PathBuf,
        found: String,
        wanted: String,
    },
    /// The state file decrypted but cannot be read back.
    #[error("the state file is corrupt: {0}")]
    CorruptState(String),
    /// A file system operation on the state directory failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The gRPC code of a server refusal, if this is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// When the server asked us to come back, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the same request may succeed if sent again unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport(_) | Error::Timeout(_) | Error::Disconnected => true,
            Error::Status { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn protocol(what: impl Into<String>) -> Self {
        Error::Protocol(what.into())
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let retry_after = status
            .metadata()
            .get("retry-after-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        Error::Status {
            code: status.code(),
            message: status.message().to_owned(),
            retry_after,
        }
    }
}

impl From<chappe_proto::v1::FrameError> for Error {
    fn from(e: chappe_proto::v1::FrameError) -> Self {
        let code = i32::try_from(e.code)
            .map(tonic::Code::from_i32)
            .unwrap_or(tonic::Code::Unknown);
        Error::Status {
            code,
            message: e.message,
            retry_after: (e.retry_after_ms > 0).then(|| Duration::from_millis(e.retry_after_ms)),
        }
    }
}

/// Why the crypto layer refused something. Never a panic: every malformed or
/// hostile input from the server ends here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A device's published keys are malformed or their self-signature fails.
    #[error("device {device} has invalid keys: {why}")]
    BadDeviceKeys { device: String, why: String },
    /// keydir now publishes other keys for a device we already knew.
    #[error("device {device} changed its identity keys; refusing to use it")]
    DeviceKeysChanged { device: String },
    /// A claimed one-time or fallback key is malformed or badly signed.
    #[error("one-time key of {device} is invalid: {why}")]
    BadOneTimeKey { device: String, why: String },
    /// No Olm session with that device, and none can be made yet.
    #[error("no Olm session with {device}")]
    NoOlmSession { device: String },
    /// We do not know the keys of the device that sent a to-device message.
    #[error("unknown sender device {device}")]
    UnknownDevice { device: String },
    /// An Olm message could not be decoded or decrypted.
    #[error("Olm: {0}")]
    Olm(String),
    /// A pre-key message's identity key is not the sender's published key.
    #[error("pre-key message identity key is not the one published for {device}")]
    IdentityKeyMismatch { device: String },
    /// A decrypted payload is not what the protocol says it must be.
    #[error("malformed payload: {0}")]
    MalformedPayload(String),
    /// A room key names another sender than the device it came from.
    #[error("room key claims to be from {claimed} but came from {actual}")]
    ForgedSender { claimed: String, actual: String },
    /// A room key was meant for another device.
    #[error("room key is addressed to {addressed}, not to us")]
    NotForUs { addressed: String },
    /// A room key reuses a session id already known from another origin.
    #[error("room key for session {session_id} conflicts with a known one")]
    RoomKeyConflict { session_id: String },
    /// No room key (yet) for this Megolm session.
    #[error("no room key for session {session_id} (yet)")]
    MissingRoomKey { session_id: String },
    /// The message's sender is not the device the room key came from.
    #[error("message sent by {envelope} but its room key came from {origin}")]
    SenderMismatch { envelope: String, origin: String },
    /// The message or its room key belongs to another conversation.
    #[error("ciphertext belongs to conversation {bound}, not {envelope}")]
    ConversationMismatch { envelope: String, bound: String },
    /// A Megolm message could not be decoded or decrypted.
    #[error("Megolm: {0}")]
    Megolm(String),
    /// The room key we hold starts after this message (we joined later).
    #[error("message index {index} precedes our room key (first known {first_known})")]
    UnknownMessageIndex { index: u32, first_known: u32 },
    /// The same Megolm index was presented under another message id.
    #[error("Megolm index {index} of session {session_id} replayed as another message")]
    Replayed { session_id: String, index: u32 },
    /// Sending needs an outbound group session that does not exist.
    #[error("no outbound group session for conversation {conversation}")]
    NoOutboundSession { conversation: String },
    /// The decrypted content has a type this client does not handle.
    #[error("unsupported content: {0}")]
    UnsupportedContent(String),
}
