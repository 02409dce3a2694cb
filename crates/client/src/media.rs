//! Encrypted attachments: the file cipher, its chunk layout, and the
//! description of an attachment that travels inside a Megolm message.
//!
//! # The cipher
//!
//! Every file gets a fresh random 256-bit key ([`MediaKey`]) and a fresh
//! random media id (32 lowercase hex digits, 128 bits), chosen by the
//! sending device. The server only ever sees ciphertext.
//!
//! The plaintext is cut into chunks of
//! [`ClientConfig::media_chunk_bytes`](crate::ClientConfig::media_chunk_bytes)
//! bytes (default 256 KiB − 16, so that each ciphertext chunk is at most
//! 256 KiB, the server's default largest chunk); the last chunk holds the
//! rest, and an empty file is one empty chunk ([`Layout`]). Chunk `i` of
//! `n` is sealed with AES-256-GCM, as the STREAM construction (Hoang,
//! Reyhanitabar, Rogaway, Vizár, 2015) does:
//!
//! - nonce = 4 zero bytes ‖ `i` as a big-endian `u64` (a key is never used
//!   for two files, so a nonce is never reused with different plaintext);
//! - associated data = media id (32 ASCII bytes) ‖ `i` as a big-endian `u64`
//!   ‖ one byte, 1 for the last chunk and 0 otherwise;
//! - ciphertext chunk = GCM output (encrypted data ‖ 16-byte tag).
//!
//! Binding the index and the "last" flag means that chunks cannot be
//! reordered, dropped, duplicated or moved to another file, and that the
//! file cannot be truncated, without a chunk failing to authenticate.
//!
//! Hashes: the SHA-256 of each ciphertext chunk goes with it (the server
//! checks it on upload and sends it on download), and the SHA-256 of the
//! whole ciphertext (all ciphertext chunks, concatenated) is declared when
//! the upload starts and travels in the Megolm message ([`Attachment`]); a
//! receiver checks both, and authenticates every chunk, before it trusts a
//! single byte.
//!
//! Sealing is deterministic given the key and the index, which is what
//! makes uploads resumable: a sender reads the file once to hash it
//! ([`scan`]) and again to send it ([`Sealer`]), never holding more than a
//! chunk; a resumed upload reuses the media id and key (kept in the
//! device's encrypted state) only if the file still hashes to the same
//! ciphertext, and every chunk is compared with the first pass's hash
//! before it leaves, so a file changed in between can never make a key and
//! nonce seal two different plaintexts on the wire.
//!
//! # In a message
//!
//! The Megolm content of a file message is
//!
//! ```json
//! {"type": "chappe.file",
//!  "file": {"media_id": "…32 hex…", "name": "report.pdf", "size": 1234,
//!           "ciphertext_size": 1250, "chunk_size": 262128,
//!           "key": "…base64…", "sha256": "…base64…"}}
//! ```
//!
//! `size` and `chunk_size` count plaintext bytes; `key` is the 32-byte
//! AES key and `sha256` the whole-ciphertext hash, both in standard base64
//! (written without padding; padding is accepted).

use std::fmt;
use std::io::{Read, Seek, SeekFrom};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::Sent;

/// Bytes of a file key (AES-256).
pub const KEY_BYTES: usize = 32;
/// Bytes that sealing adds to each chunk (the GCM tag).
pub const TAG_BYTES: usize = 16;
/// Bytes of a SHA-256 hash.
pub const HASH_BYTES: usize = 32;
/// Characters of a media id (lowercase hex).
pub const MEDIA_ID_LEN: usize = 32;
/// Default plaintext bytes per chunk: 256 KiB − 16, so that a ciphertext
/// chunk is exactly 256 KiB, the server's default largest chunk.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024 - TAG_BYTES;
/// The `type` of a file message's content.
pub const FILE_CONTENT_TYPE: &str = "chappe.file";

/// Why an attachment could not be sealed, opened or trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// A media id is not 32 lowercase hex digits.
    #[error("media id {0:?} is not 32 lowercase hex digits")]
    BadMediaId(String),
    /// A file key is not 32 bytes.
    #[error("a file key must be {KEY_BYTES} bytes")]
    BadKey,
    /// Sizes that do not make a valid chunk layout.
    #[error("invalid chunk layout: {0}")]
    BadLayout(String),
    /// An attachment description (from a message) is malformed.
    #[error("malformed attachment: {0}")]
    MalformedAttachment(String),
    /// A chunk's bytes do not match the SHA-256 sent with it.
    #[error("chunk {index} does not match its SHA-256")]
    ChunkHashMismatch { index: u32 },
    /// A chunk failed to authenticate: altered, reordered, moved from
    /// another file, opened as last when it is not (truncation), or the key
    /// is wrong.
    #[error("chunk {index} failed authentication (altered, reordered, truncated or wrong key)")]
    ChunkAuthentication { index: u32 },
    /// The server sent another chunk than the next one.
    #[error("expected chunk {expected}, the server sent chunk {got}")]
    UnexpectedChunk { expected: u32, got: u32 },
    /// A chunk has a length the layout does not allow.
    #[error("chunk {index} is {got} bytes, expected {expected}")]
    ChunkLength {
        index: u32,
        expected: usize,
        got: usize,
    },
    /// Fewer chunks than the layout has.
    #[error("got {received} of {expected} chunks")]
    Truncated { received: u32, expected: u32 },
    /// The whole ciphertext does not hash to what the message declared.
    #[error("the whole ciphertext does not match the SHA-256 in the message")]
    WholeHashMismatch,
    /// The server describes the media otherwise than the message does.
    #[error("the server's description of media {media_id} does not match: {what}")]
    InfoMismatch { media_id: String, what: String },
    /// The file changed between the two passes over it.
    #[error("the file changed while it was being uploaded: {0}")]
    FileChanged(String),
    /// AES-GCM refused to seal (a chunk beyond its size limit).
    #[error("sealing chunk {index} failed")]
    Seal { index: u32 },
}

// -------------------------------------------------------------------- ids

/// A fresh media id: 32 lowercase hex digits (128 random bits).
pub fn random_media_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Checks that `id` is 32 lowercase hex digits.
pub fn validate_media_id(id: &str) -> Result<(), MediaError> {
    if id.len() == MEDIA_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(MediaError::BadMediaId(id.to_owned()))
    }
}

// -------------------------------------------------------------------- key

/// A file's AES-256 key. Zeroed when dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct MediaKey(Zeroizing<[u8; KEY_BYTES]>);

impl MediaKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        rand::fill(&mut key[..]);
        MediaKey(key)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MediaError> {
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        if bytes.len() != KEY_BYTES {
            return Err(MediaError::BadKey);
        }
        key.copy_from_slice(bytes);
        Ok(MediaKey(key))
    }

    /// The key in unpadded standard base64.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD_NO_PAD.encode(&self.0[..]))
    }

    /// A key from base64 (padded or not).
    pub fn from_base64(text: &str) -> Result<Self, MediaError> {
        let bytes = Zeroizing::new(decode_b64(text).map_err(|_| MediaError::BadKey)?);
        Self::from_bytes(&bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MediaKey(<redacted>)")
    }
}

/// Standard base64, padding optional.
pub(crate) fn decode_b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD_NO_PAD.decode(text.trim_end_matches('=').as_bytes())
}

// ----------------------------------------------------------------- layout

/// How a file of `size` plaintext bytes is cut into chunks of `chunk_bytes`
/// plaintext bytes: every chunk but the last is full, the last holds the
/// rest, and an empty file is one empty chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    chunk_bytes: u32,
    chunks: u32,
}

impl Layout {
    /// Validates that the chunk size is positive, that the chunk count fits
    /// a `u32` and that a ciphertext chunk's size fits a `u32`.
    pub fn new(size: u64, chunk_bytes: u32) -> Result<Self, MediaError> {
        if chunk_bytes == 0 {
            return Err(MediaError::BadLayout("chunk size is 0".into()));
        }
        if u64::from(chunk_bytes) + TAG_BYTES as u64 > u64::from(u32::MAX) {
            return Err(MediaError::BadLayout(format!(
                "chunk size {chunk_bytes} is too large"
            )));
        }
        let chunks = size.div_ceil(u64::from(chunk_bytes)).max(1);
        let chunks = u32::try_from(chunks).map_err(|_| {
            MediaError::BadLayout(format!("{size} bytes make {chunks} chunks, too many"))
        })?;
        size.checked_add(u64::from(chunks) * TAG_BYTES as u64)
            .ok_or_else(|| MediaError::BadLayout(format!("size {size} is too large")))?;
        Ok(Layout {
            size,
            chunk_bytes,
            chunks,
        })
    }

    /// Plaintext bytes of the file.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Plaintext bytes of every chunk but the last.
    pub fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Ciphertext bytes of every chunk but the last (what the server calls
    /// the chunk size).
    pub fn ciphertext_chunk_bytes(&self) -> u32 {
        // Checked in `new`.
        self.chunk_bytes + TAG_BYTES as u32
    }

    /// How many chunks (at least 1).
    pub fn chunk_count(&self) -> u32 {
        self.chunks
    }

    /// Total ciphertext bytes.
    pub fn ciphertext_size(&self) -> u64 {
        self.size + u64::from(self.chunks) * TAG_BYTES as u64
    }

    /// Whether `index` is the last chunk.
    pub fn is_last(&self, index: u32) -> bool {
        index + 1 == self.chunks
    }

    /// Plaintext bytes of chunk `index` (which must be below the count).
    pub fn plain_len(&self, index: u32) -> usize {
        let full = u64::from(self.chunk_bytes);
        let len = if self.is_last(index) {
            self.size - full * u64::from(index)
        } else {
            full
        };
        // At most chunk_bytes, a u32.
        len as usize
    }

    /// Ciphertext bytes of chunk `index`.
    pub fn cipher_len(&self, index: u32) -> usize {
        self.plain_len(index) + TAG_BYTES
    }

    /// Where chunk `index` starts in the plaintext.
    pub fn plain_offset(&self, index: u32) -> u64 {
        u64::from(self.chunk_bytes) * u64::from(index)
    }
}

// ----------------------------------------------------------------- cipher

/// AES-256-GCM over one file's chunks (see the module documentation).
pub struct ChunkCipher {
    aead: Aes256Gcm,
    media_id: [u8; MEDIA_ID_LEN],
}

impl fmt::Debug for ChunkCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCipher").finish_non_exhaustive()
    }
}

impl ChunkCipher {
    /// The cipher of the file `media_id` under `key`.
    pub fn new(key: &MediaKey, media_id: &str) -> Result<Self, MediaError> {
        validate_media_id(media_id)?;
        let mut id = [0u8; MEDIA_ID_LEN];
        id.copy_from_slice(media_id.as_bytes());
        Ok(ChunkCipher {
            aead: Aes256Gcm::new(key.bytes().into()),
            media_id: id,
        })
    }

    fn nonce(index: u32) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&u64::from(index).to_be_bytes());
        nonce
    }

    fn aad(&self, index: u32, last: bool) -> [u8; MEDIA_ID_LEN + 9] {
        let mut aad = [0u8; MEDIA_ID_LEN + 9];
        aad[..MEDIA_ID_LEN].copy_from_slice(&self.media_id);
        aad[MEDIA_ID_LEN..MEDIA_ID_LEN + 8].copy_from_slice(&u64::from(index).to_be_bytes());
        aad[MEDIA_ID_LEN + 8] = u8::from(last);
        aad
    }

    /// Seals chunk `index` in place: `buf` holds its plaintext and becomes
    /// its ciphertext (data ‖ tag).
    pub fn seal_in_place(
        &self,
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        self.aead
            .encrypt_in_place(
                Nonce::from_slice(&Self::nonce(index)),
                &self.aad(index, last),
                buf,
            )
            .map_err(|_| MediaError::Seal { index })
    }

    /// Opens chunk `index` in place: `buf` holds its ciphertext and becomes
    /// its plaintext, if it authenticates.
    pub fn open_in_place(
        &self,
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(), MediaError> {
        self.aead
            .decrypt_in_place(
                Nonce::from_slice(&Self::nonce(index)),
                &self.aad(index, last),
                buf,
            )
            .map_err(|_| MediaError::ChunkAuthentication { index })
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; HASH_BYTES] {
    Sha256::digest(data).into()
}

// ---------------------------------------------------------------- sealing

/// One sealed chunk, ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    pub index: u32,
    /// Ciphertext: encrypted data ‖ tag.
    pub data: Vec<u8>,
    /// SHA-256 of `data`.
    pub sha256: [u8; HASH_BYTES],
}

/// Reads a file's plaintext chunk by chunk and seals each; holds one chunk
/// at a time.
pub struct Sealer<R> {
    reader: R,
    layout: Layout,
    cipher: ChunkCipher,
    next: u32,
}

impl<R: Read> Sealer<R> {
    /// Seals from the reader's current position, which must be the start of
    /// chunk 0 (or use [`Sealer::seek_to`]).
    pub fn new(reader: R, layout: Layout, cipher: ChunkCipher) -> Self {
        Sealer {
            reader,
            layout,
            cipher,
            next: 0,
        }
    }

    /// The index of the chunk [`Sealer::next_chunk`] returns next.
    pub fn next_index(&self) -> u32 {
        self.next
    }

    /// Reads and seals the next chunk; `None` after the last. A file
    /// shorter than the layout says is `UnexpectedEof`.
    pub fn next_chunk(&mut self) -> std::io::Result<Option<SealedChunk>> {
        if self.next >= self.layout.chunk_count() {
            return Ok(None);
        }
        let index = self.next;
        let len = self.layout.plain_len(index);
        let mut buf = Vec::with_capacity(len + TAG_BYTES);
        (&mut self.reader).take(len as u64).read_to_end(&mut buf)?;
        if buf.len() != len {
            zeroize::Zeroize::zeroize(&mut buf);
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the file ends inside chunk {index}"),
            ));
        }
        if let Err(e) = self
            .cipher
            .seal_in_place(index, self.layout.is_last(index), &mut buf)
        {
            zeroize::Zeroize::zeroize(&mut buf);
            return Err(std::io::Error::other(e));
        }
        self.next += 1;
        let sha256 = sha256(&buf);
        Ok(Some(SealedChunk {
            index,
            data: buf,
            sha256,
        }))
    }
}

impl<R: Read + Seek> Sealer<R> {
    /// Moves to chunk `index` (to resume an upload there).
    pub fn seek_to(&mut self, index: u32) -> std::io::Result<()> {
        let index = index.min(self.layout.chunk_count());
        self.reader
            .seek(SeekFrom::Start(self.layout.plain_offset(index)))?;
        self.next = index;
        Ok(())
    }
}

/// What a first pass over a file found: each ciphertext chunk's hash, and
/// the whole ciphertext's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub chunk_hashes: Vec<[u8; HASH_BYTES]>,
    pub sha256: [u8; HASH_BYTES],
}

/// Seals a whole file to hash it, one chunk at a time, keeping only the
/// hashes (32 bytes per chunk).
pub fn scan<R: Read>(reader: R, layout: Layout, cipher: ChunkCipher) -> std::io::Result<Scan> {
    let mut sealer = Sealer::new(reader, layout, cipher);
    let mut whole = Sha256::new();
    let mut chunk_hashes = Vec::with_capacity(layout.chunk_count() as usize);
    while let Some(chunk) = sealer.next_chunk()? {
        whole.update(&chunk.data);
        chunk_hashes.push(chunk.sha256);
    }
    Ok(Scan {
        chunk_hashes,
        sha256: whole.finalize().into(),
    })
}

// ---------------------------------------------------------------- opening

/// Checks, authenticates and decrypts downloaded chunks in order, and the
/// whole ciphertext's hash at the end.
pub struct Opener {
    layout: Layout,
    cipher: ChunkCipher,
    expected_sha256: [u8; HASH_BYTES],
    whole: Sha256,
    next: u32,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("layout", &self.layout)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Opens a file of this layout whose whole ciphertext must hash to
    /// `expected_sha256`.
    pub fn new(layout: Layout, cipher: ChunkCipher, expected_sha256: [u8; HASH_BYTES]) -> Self {
        Opener {
            layout,
            cipher,
            expected_sha256,
            whole: Sha256::new(),
            next: 0,
        }
    }

    /// The index of the chunk expected next.
    pub fn next_index(&self) -> u32 {
        self.next
    }

    /// Whether every chunk was opened.
    pub fn is_done(&self) -> bool {
        self.next >= self.layout.chunk_count()
    }

    /// Checks chunk `index` against `declared_sha256` (sent with it), then
    /// authenticates and decrypts it. It must be the next chunk.
    pub fn open_chunk(
        &mut self,
        index: u32,
        mut data: Vec<u8>,
        declared_sha256: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, MediaError> {
        if self.is_done() || index != self.next {
            return Err(MediaError::UnexpectedChunk {
                expected: self.next,
                got: index,
            });
        }
        let expected = self.layout.cipher_len(index);
        if data.len() != expected {
            return Err(MediaError::ChunkLength {
                index,
                expected,
                got: data.len(),
            });
        }
        if sha256(&data)[..] != *declared_sha256 {
            return Err(MediaError::ChunkHashMismatch { index });
        }
        self.whole.update(&data);
        self.cipher
            .open_in_place(index, self.layout.is_last(index), &mut data)?;
        self.next += 1;
        Ok(Zeroizing::new(data))
    }

    /// Checks that every chunk came and that the whole ciphertext hashes to
    /// the expected value.
    pub fn finish(self) -> Result<(), MediaError> {
        if !self.is_done() {
            return Err(MediaError::Truncated {
                received: self.next,
                expected: self.layout.chunk_count(),
            });
        }
        let got: [u8; HASH_BYTES] = self.whole.finalize().into();
        if got != self.expected_sha256 {
            return Err(MediaError::WholeHashMismatch);
        }
        Ok(())
    }
}

// ------------------------------------------------------------- attachment

/// A file attached to a message: what a receiver needs to download,
/// authenticate and decrypt it. It holds the file's key; its `Debug` does
/// not print it. Serializes to the `file` object of the message content
/// (see the module documentation), so an application can keep it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "FileWire", into = "FileWire")]
pub struct Attachment {
    /// The server's id of the ciphertext: 32 lowercase hex digits.
    pub media_id: String,
    /// The file's name as the sender gave it (untrusted: a receiver that
    /// makes a path of it must sanitize it).
    pub name: String,
    /// Plaintext bytes.
    pub size: u64,
    /// Ciphertext bytes stored on the server.
    pub ciphertext_size: u64,
    /// Plaintext bytes of every chunk but the last.
    pub chunk_size: u32,
    key: MediaKey,
    /// SHA-256 of the whole ciphertext.
    pub sha256: [u8; HASH_BYTES],
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attachment")
            .field("media_id", &self.media_id)
            .field("name", &self.name)
            .field("size", &self.size)
            .field("ciphertext_size", &self.ciphertext_size)
            .field("chunk_size", &self.chunk_size)
            .finish_non_exhaustive()
    }
}

/// The JSON form of an [`Attachment`]. Unknown fields are ignored, so that
/// a later sender may add some.
#[derive(Serialize, Deserialize)]
struct FileWire {
    media_id: String,
    name: String,
    size: u64,
    ciphertext_size: u64,
    chunk_size: u32,
    key: String,
    sha256: String,
}

impl Drop for FileWire {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl TryFrom<FileWire> for Attachment {
    type Error = MediaError;

    fn try_from(w: FileWire) -> Result<Self, MediaError> {
        let bad = |what: &str| MediaError::MalformedAttachment(what.to_owned());
        validate_media_id(&w.media_id)?;
        let key = MediaKey::from_base64(&w.key)?;
        let sha256: [u8; HASH_BYTES] = decode_b64(&w.sha256)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad("sha256 is not 32 bytes of base64"))?;
        let attachment = Attachment {
            media_id: w.media_id.clone(),
            name: w.name.clone(),
            size: w.size,
            ciphertext_size: w.ciphertext_size,
            chunk_size: w.chunk_size,
            key,
            sha256,
        };
        let layout = attachment.layout()?;
        if layout.ciphertext_size() != w.ciphertext_size {
            return Err(bad(
                "ciphertext_size does not follow from size and chunk_size",
            ));
        }
        Ok(attachment)
    }
}

impl From<Attachment> for FileWire {
    fn from(a: Attachment) -> Self {
        FileWire {
            media_id: a.media_id.clone(),
            name: a.name.clone(),
            size: a.size,
            ciphertext_size: a.ciphertext_size,
            chunk_size: a.chunk_size,
            key: a.key.to_base64().to_string(),
            sha256: STANDARD_NO_PAD.encode(a.sha256),
        }
    }
}

impl Attachment {
    /// Describes a file sealed under `key` with this layout.
    pub fn new(
        media_id: String,
        name: String,
        layout: Layout,
        key: MediaKey,
        sha256: [u8; HASH_BYTES],
    ) -> Result<Self, MediaError> {
        validate_media_id(&media_id)?;
        Ok(Attachment {
            media_id,
            name,
            size: layout.size(),
            ciphertext_size: layout.ciphertext_size(),
            chunk_size: layout.chunk_bytes(),
            key,
            sha256,
        })
    }

    /// The file's chunk layout.
    pub fn layout(&self) -> Result<Layout, MediaError> {
        Layout::new(self.size, self.chunk_size)
    }

    /// The cipher of the file.
    pub fn cipher(&self) -> Result<ChunkCipher, MediaError> {
        ChunkCipher::new(&self.key, &self.media_id)
    }

    /// The file's key.
    pub fn key(&self) -> &MediaKey {
        &self.key
    }

    /// The content of a file message carrying this attachment.
    pub fn to_content(&self) -> Result<serde_json::Value, MediaError> {
        let file = serde_json::to_value(self)
            .map_err(|e| MediaError::MalformedAttachment(e.to_string()))?;
        Ok(serde_json::json!({ "type": FILE_CONTENT_TYPE, "file": file }))
    }

    /// The attachment of a file message's content (`{"type":
    /// "chappe.file", "file": {…}}`).
    pub fn from_content(content: &serde_json::Value) -> Result<Self, MediaError> {
        let file = content
            .get("file")
            .ok_or_else(|| MediaError::MalformedAttachment("no \"file\" object".into()))?;
        Attachment::deserialize(file).map_err(|e| MediaError::MalformedAttachment(e.to_string()))
    }
}

// ---------------------------------------------------------- SDK API types

/// How far an upload or a download is, in plaintext bytes and chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Plaintext bytes done (stored on the server, or written and verified).
    pub bytes_done: u64,
    /// Plaintext bytes of the file.
    pub bytes_total: u64,
    pub chunks_done: u32,
    pub chunks_total: u32,
}

impl Progress {
    pub(crate) fn at(layout: &Layout, chunks_done: u32) -> Self {
        let bytes_done = if chunks_done >= layout.chunk_count() {
            layout.size()
        } else {
            layout.plain_offset(chunks_done)
        };
        Progress {
            bytes_done,
            bytes_total: layout.size(),
            chunks_done,
            chunks_total: layout.chunk_count(),
        }
    }
}

/// Options of [`Client::send_file_with`](crate::Client::send_file_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendFileOptions {
    /// Names the upload so that it can be resumed, by this process or
    /// after a restart: an unfinished upload's media id and key are kept
    /// (encrypted) in the device's state under this id until its message is
    /// sent. Default: the conversation and the file's canonical path, so
    /// sending the same file to the same conversation again resumes.
    pub upload_id: Option<String>,
    /// Testing and interruption aid: end the upload stream after this many
    /// chunks were sent by this call, as a cut connection would, and return
    /// [`Error::UploadInterrupted`](crate::Error::UploadInterrupted). The
    /// upload is kept for the next call with the same upload id.
    pub stop_after_chunks: Option<u32>,
}

/// What [`Client::send_file`](crate::Client::send_file) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFile {
    /// The receipt of the message that carries the attachment.
    pub sent: Sent,
    /// What was sent (media id, name, sizes, key, hash).
    pub attachment: Attachment,
    /// The media id (also in `attachment`).
    pub media_id: String,
    /// Chunks this call sent to the server (over every attempt).
    pub chunks_sent: u32,
    /// Chunks the server already held when this call started (a resumed
    /// upload), which were not sent again.
    pub chunks_skipped: u32,
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        // Structured plaintext: a ciphertext leaking it would show runs.
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
            .collect()
    }

    fn seal_all(data: &[u8], chunk: u32, key: &MediaKey, id: &str) -> (Layout, Vec<SealedChunk>) {
        let layout = Layout::new(data.len() as u64, chunk).unwrap();
        let mut sealer = Sealer::new(
            Cursor::new(data),
            layout,
            ChunkCipher::new(key, id).unwrap(),
        );
        let mut chunks = Vec::new();
        while let Some(c) = sealer.next_chunk().unwrap() {
            chunks.push(c);
        }
        (layout, chunks)
    }

    fn whole_hash(chunks: &[SealedChunk]) -> [u8; 32] {
        let mut h = Sha256::new();
        for c in chunks {
            h.update(&c.data);
        }
        h.finalize().into()
    }

    fn open_all(
        layout: Layout,
        chunks: &[SealedChunk],
        key: &MediaKey,
        id: &str,
        sha: [u8; 32],
    ) -> Result<Vec<u8>, MediaError> {
        let mut opener = Opener::new(layout, ChunkCipher::new(key, id)?, sha);
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let plain = opener.open_chunk(i as u32, c.data.clone(), &c.sha256)?;
            out.extend_from_slice(&plain);
        }
        opener.finish()?;
        Ok(out)
    }

    #[test]
    fn layouts() {
        let l = Layout::new(0, 10).unwrap();
        assert_eq!(
            (l.chunk_count(), l.plain_len(0), l.ciphertext_size()),
            (1, 0, 16)
        );
        let l = Layout::new(30, 10).unwrap();
        assert_eq!(
            (l.chunk_count(), l.plain_len(2), l.ciphertext_size()),
            (3, 10, 78)
        );
        let l = Layout::new(31, 10).unwrap();
        assert_eq!(
            (l.chunk_count(), l.plain_len(3), l.ciphertext_size()),
            (4, 1, 95)
        );
        assert_eq!(l.ciphertext_chunk_bytes(), 26);
        let d = Layout::new(1, DEFAULT_CHUNK_BYTES as u32).unwrap();
        assert_eq!(d.ciphertext_chunk_bytes(), 256 * 1024);
        assert!(Layout::new(1, 0).is_err());
        assert!(Layout::new(u64::MAX, 1).is_err());
    }

    #[test]
    fn round_trip_over_several_chunk_layouts() {
        let key = MediaKey::random();
        let id = random_media_id();
        for (len, chunk) in [
            (0usize, 64u32), // one empty (last) chunk
            (1, 64),
            (63, 64),
            (64, 64),  // exactly one full chunk
            (65, 64),  // one byte in the last chunk
            (256, 64), // exact multiple: four full chunks
            (1000, 64),
            (5000, 1),
        ] {
            let data = pattern(len);
            let (layout, chunks) = seal_all(&data, chunk, &key, &id);
            assert_eq!(chunks.len() as u32, layout.chunk_count(), "len {len}");
            let total: usize = chunks.iter().map(|c| c.data.len()).sum();
            assert_eq!(total as u64, layout.ciphertext_size());
            let scanned = scan(
                Cursor::new(&data),
                layout,
                ChunkCipher::new(&key, &id).unwrap(),
            )
            .unwrap();
            assert_eq!(scanned.sha256, whole_hash(&chunks));
            assert_eq!(
                scanned.chunk_hashes,
                chunks.iter().map(|c| c.sha256).collect::<Vec<_>>()
            );
            let back = open_all(layout, &chunks, &key, &id, scanned.sha256).unwrap();
            assert_eq!(back, data, "len {len} chunk {chunk}");
        }
    }

    #[test]
    fn sealing_is_deterministic_and_resumes_at_any_chunk() {
        let key = MediaKey::random();
        let id = random_media_id();
        let data = pattern(1000);
        let (layout, chunks) = seal_all(&data, 100, &key, &id);
        let mut sealer = Sealer::new(
            Cursor::new(&data),
            layout,
            ChunkCipher::new(&key, &id).unwrap(),
        );
        sealer.seek_to(6).unwrap();
        let mut rest = Vec::new();
        while let Some(c) = sealer.next_chunk().unwrap() {
            rest.push(c);
        }
        assert_eq!(rest, chunks[6..]);
    }

    #[test]
    fn tampering_is_detected() {
        let key = MediaKey::random();
        let id = random_media_id();
        let data = pattern(1000);
        let (layout, chunks) = seal_all(&data, 256, &key, &id);
        assert_eq!(chunks.len(), 4);
        let sha = whole_hash(&chunks);

        // A flipped byte, with its hash recomputed by a hostile server.
        let mut flipped = chunks.clone();
        flipped[1].data[10] ^= 1;
        flipped[1].sha256 = sha256(&flipped[1].data);
        assert_eq!(
            open_all(layout, &flipped, &key, &id, sha),
            Err(MediaError::ChunkAuthentication { index: 1 })
        );
        // A flipped byte under the original hash.
        let mut corrupt = chunks.clone();
        corrupt[2].data[0] ^= 0x80;
        assert_eq!(
            open_all(layout, &corrupt, &key, &id, sha),
            Err(MediaError::ChunkHashMismatch { index: 2 })
        );
        // Two chunks swapped.
        let mut swapped = chunks.clone();
        swapped.swap(0, 1);
        assert_eq!(
            open_all(layout, &swapped, &key, &id, sha),
            Err(MediaError::ChunkAuthentication { index: 0 })
        );
        // The last chunk dropped: the layout wants four.
        assert_eq!(
            open_all(layout, &chunks[..3], &key, &id, sha),
            Err(MediaError::Truncated {
                received: 3,
                expected: 4
            })
        );
        // Truncated and relabelled: a file of three chunks whose third was
        // not sealed as the last one.
        let short = Layout::new(768, 256).unwrap();
        let short_sha = whole_hash(&chunks[..3]);
        assert_eq!(
            open_all(short, &chunks[..3], &key, &id, short_sha),
            Err(MediaError::ChunkAuthentication { index: 2 })
        );
        // Wrong key, and the right key under another media id.
        assert_eq!(
            open_all(layout, &chunks, &MediaKey::random(), &id, sha),
            Err(MediaError::ChunkAuthentication { index: 0 })
        );
        assert_eq!(
            open_all(layout, &chunks, &key, &random_media_id(), sha),
            Err(MediaError::ChunkAuthentication { index: 0 })
        );
        // Every chunk authentic, but not the file the message describes.
        assert_eq!(
            open_all(layout, &chunks, &key, &id, [0; 32]),
            Err(MediaError::WholeHashMismatch)
        );
        // The untampered file opens.
        assert_eq!(open_all(layout, &chunks, &key, &id, sha).unwrap(), data);
    }

    #[test]
    fn ciphertext_holds_no_run_of_the_plaintext() {
        let key = MediaKey::random();
        let id = random_media_id();
        // Highly repetitive plaintext: any 32-byte window of it is common.
        let data: Vec<u8> = b"chappe attachment plaintext 0123456789 "
            .iter()
            .copied()
            .cycle()
            .take(10_000)
            .collect();
        let (_, chunks) = seal_all(&data, 1024, &key, &id);
        let windows: std::collections::HashSet<&[u8]> = data.windows(32).collect();
        for c in &chunks {
            assert!(!c.data.windows(32).any(|w| windows.contains(w)));
        }
    }

    #[test]
    fn a_short_file_is_an_error_not_a_short_chunk() {
        let key = MediaKey::random();
        let id = random_media_id();
        let layout = Layout::new(100, 64).unwrap();
        let mut sealer = Sealer::new(
            Cursor::new(pattern(80)),
            layout,
            ChunkCipher::new(&key, &id).unwrap(),
        );
        assert!(sealer.next_chunk().unwrap().is_some());
        let err = sealer.next_chunk().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn attachments_round_trip_as_content_and_are_validated() {
        let key = MediaKey::random();
        let id = random_media_id();
        let layout = Layout::new(1000, 256).unwrap();
        let a = Attachment::new(id.clone(), "report.pdf".into(), layout, key, [7; 32]).unwrap();
        let content = a.to_content().unwrap();
        assert_eq!(content["type"], FILE_CONTENT_TYPE);
        assert_eq!(content["file"]["ciphertext_size"], 1064);
        assert_eq!(Attachment::from_content(&content).unwrap(), a);
        assert!(!format!("{a:?}").contains(&*a.key().to_base64()));
        // Padded base64 is accepted too.
        let mut padded = content.clone();
        padded["file"]["sha256"] = base64::engine::general_purpose::STANDARD
            .encode([7u8; 32])
            .into();
        assert_eq!(Attachment::from_content(&padded).unwrap(), a);
        for (field, value) in [
            ("media_id", serde_json::json!("../etc")),
            ("key", serde_json::json!("AAAA")),
            ("sha256", serde_json::json!("AAAA")),
            ("ciphertext_size", serde_json::json!(1000)),
            ("chunk_size", serde_json::json!(0)),
        ] {
            let mut bad = content.clone();
            bad["file"][field] = value;
            assert!(Attachment::from_content(&bad).is_err(), "{field}");
        }
        assert!(Attachment::from_content(&serde_json::json!({"type": "chappe.file"})).is_err());
    }
}
