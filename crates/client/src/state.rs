//! Local device state, encrypted at rest.
//!
//! One directory per device holds:
//! - `lock`: held with an exclusive file lock while a [`Store`] is open, so
//!   that two processes never use one device's state (the second gets
//!   [`Error::Locked`]);
//! - `kdf.json`: the random salt and the Argon2id parameters the key was
//!   derived with (not secret);
//! - `state.bin`: everything else (pickles, known devices, cursors, token,
//!   server URL, the media ids and keys of unfinished uploads) serialized
//!   as JSON and encrypted whole with XChaCha20-Poly1305 under the
//!   passphrase-derived key.
//!
//! Writes are atomic: a temporary file is written and fsynced, renamed over
//! the old one, and the directory is fsynced.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::MachinePickle;
use crate::error::{Error, Result};

const LOCK_FILE: &str = "lock";
const KDF_FILE: &str = "kdf.json";
const STATE_FILE: &str = "state.bin";
/// Starts `state.bin`; also authenticated as associated data.
const MAGIC: &[u8] = b"CHAPPE-STATE-1\n";
const NONCE_LEN: usize = 24;
const SALT_LEN: usize = 16;

/// Argon2id cost parameters for deriving the state key from the passphrase.
///
/// They apply when a state directory is created; an existing directory is
/// opened with the parameters stored in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory cost in KiB (default 65536, i.e. 64 MiB).
    pub memory_kib: u32,
    /// Passes over memory (default 3).
    pub iterations: u32,
    /// Lanes (default 1).
    pub parallelism: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// Fast and weak: for tests only.
    pub fn insecure_fast() -> Self {
        Self {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    fn derive(&self, passphrase: &str, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
            .map_err(|e| Error::Config(format!("Argon2 parameters: {e}")))?;
        let mut key = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase.as_bytes(), salt, key.as_mut())
            .map_err(|e| Error::Config(format!("Argon2: {e}")))?;
        Ok(key)
    }
}

#[derive(Serialize, Deserialize)]
struct KdfFile {
    algorithm: String,
    salt: String,
    #[serde(flatten)]
    params: KdfParams,
}

const KDF_ALGORITHM: &str = "argon2id-v19";

/// An open, locked, unlocked-by-passphrase state directory.
pub struct Store {
    dir: PathBuf,
    key: Zeroizing<[u8; 32]>,
    /// Holds the exclusive lock for as long as the store lives.
    _lock: File,
    /// Numbers handed to writers in state order ([`Store::next_generation`]).
    generations: AtomicU64,
    /// The generation last written. Writes run one at a time under it, and
    /// an older state never replaces a newer one, even when a cancelled
    /// caller's write finishes late.
    written: Mutex<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Whether `dir` holds device state.
    pub fn exists(dir: &Path) -> bool {
        dir.join(STATE_FILE).is_file()
    }

    /// Locks `dir` and unlocks its state with `passphrase`.
    ///
    /// Returns the decrypted state, or `None` for a directory without state
    /// when `create` is set (a fresh salt is then written with `params`).
    /// Without `create`, a directory without state is [`Error::NoState`].
    /// A lock held elsewhere is waited for up to `lock_wait` (a client of
    /// this process that is shutting down releases it within moments), then
    /// reported as [`Error::Locked`].
    pub fn open(
        dir: &Path,
        passphrase: &str,
        params: &KdfParams,
        create: bool,
        lock_wait: Duration,
    ) -> Result<(Store, Option<Zeroizing<Vec<u8>>>)> {
        if !create && !Self::exists(dir) {
            return Err(Error::NoState(dir.to_owned()));
        }
        create_private_dir(dir)?;
        let deadline = Instant::now() + lock_wait;
        let lock = loop {
            match lock_dir(dir) {
                Err(Error::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other?,
            }
        };
        if Self::exists(dir) {
            let kdf_path = dir.join(KDF_FILE);
            let raw = fs::read(&kdf_path).map_err(|e| Error::io(&kdf_path, e))?;
            let kdf: KdfFile = serde_json::from_slice(&raw)
                .map_err(|e| Error::CorruptState(format!("{KDF_FILE}: {e}")))?;
            if kdf.algorithm != KDF_ALGORITHM {
                return Err(Error::CorruptState(format!(
                    "unknown key derivation {:?}",
                    kdf.algorithm
                )));
            }
            let salt = STANDARD_NO_PAD
                .decode(kdf.salt.as_bytes())
                .map_err(|e| Error::CorruptState(format!("salt: {e}")))?;
            let key = kdf.params.derive(passphrase, &salt)?;
            let store = Store {
                dir: dir.to_owned(),
                key,
                _lock: lock,
                generations: AtomicU64::new(0),
                written: Mutex::new(0),
            };
            let plaintext = store.load()?;
            Ok((store, Some(plaintext)))
        } else if create {
            let salt: [u8; SALT_LEN] = rand::random();
            let kdf = KdfFile {
                algorithm: KDF_ALGORITHM.to_owned(),
                salt: STANDARD_NO_PAD.encode(salt),
                params: *params,
            };
            let key = params.derive(passphrase, &salt)?;
            let bytes = serde_json::to_vec_pretty(&kdf)
                .map_err(|e| Error::CorruptState(format!("{KDF_FILE}: {e}")))?;
            write_atomic(dir, KDF_FILE, &bytes)?;
            Ok((
                Store {
                    dir: dir.to_owned(),
                    key,
                    _lock: lock,
                    generations: AtomicU64::new(0),
                    written: Mutex::new(0),
                },
                None,
            ))
        } else {
            Err(Error::NoState(dir.to_owned()))
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.as_ref().into())
    }

    /// Reads and decrypts `state.bin`.
    pub fn load(&self) -> Result<Zeroizing<Vec<u8>>> {
        let path = self.dir.join(STATE_FILE);
        let raw = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let rest = raw
            .strip_prefix(MAGIC)
            .ok_or_else(|| Error::CorruptState(format!("{STATE_FILE} has no header")))?;
        if rest.len() < NONCE_LEN {
            return Err(Error::CorruptState(format!("{STATE_FILE} is truncated")));
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let plaintext = self
            .cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| Error::WrongPassphrase)?;
        Ok(Zeroizing::new(plaintext))
    }

    /// The next write's place in state order: take it while the state
    /// being written cannot change, then [`Store::save_ordered`].
    pub fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Writes `plaintext` unless a newer generation was written already.
    pub fn save_ordered(&self, generation: u64, plaintext: &[u8]) -> Result<()> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if generation <= *written {
            return Ok(());
        }
        self.write(plaintext)?;
        *written = generation;
        Ok(())
    }

    /// Encrypts `plaintext` and atomically replaces `state.bin` with it.
    pub fn save(&self, plaintext: &[u8]) -> Result<()> {
        self.save_ordered(self.next_generation(), plaintext)
    }

    fn write(&self, plaintext: &[u8]) -> Result<()> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ciphertext = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: MAGIC,
                },
            )
            .map_err(|_| Error::CorruptState("encryption failed".into()))?;
        let mut bytes = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ciphertext.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&ciphertext);
        write_atomic(&self.dir, STATE_FILE, &bytes)
    }

    /// Serializes `value` as JSON and [`Store::save`]s it.
    pub fn save_json<T: Serialize>(&self, value: &T) -> Result<()> {
        let plaintext = Zeroizing::new(
            serde_json::to_vec(value).map_err(|e| Error::CorruptState(e.to_string()))?,
        );
        self.save(&plaintext)
    }
}

/// Parses decrypted state.
pub fn from_json<T: DeserializeOwned>(plaintext: &[u8]) -> Result<T> {
    serde_json::from_slice(plaintext).map_err(|e| Error::CorruptState(e.to_string()))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| Error::io(dir, e))
}

fn private_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = private_file_options()
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked(dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let target = dir.join(name);
    {
        let mut file = private_file_options()
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// What is persisted for one device (inside `state.bin`).
#[derive(Serialize, Deserialize)]
pub struct StateData {
    pub version: u32,
    pub server_url: String,
    pub user_id: String,
    pub device_id: String,
    pub session: Option<SessionToken>,
    pub machine: MachinePickle,
    /// conversation id → newest message id received contiguously.
    pub cursors: BTreeMap<String, String>,
    /// conversation id → membership sequence number last seen.
    pub membership_seq: BTreeMap<String, u64>,
    /// To-device inbox ids already processed (most recent last).
    pub processed_inbox: VecDeque<String>,
    /// Message ids already delivered to the application (most recent last).
    pub seen_messages: VecDeque<String>,
    /// Uploads started and not yet sent in a message, to resume them
    /// (absent from states written before attachments existed).
    #[serde(default)]
    pub uploads: Vec<UploadRecord>,
}

/// An unfinished upload: enough to resume it with the same media id and
/// key. Kept until the message carrying the file is sent.
#[derive(Clone, Serialize, Deserialize)]
pub struct UploadRecord {
    /// The caller's name for the upload (default: conversation and path).
    pub upload_id: String,
    pub conversation_id: String,
    pub media_id: String,
    /// The file key, base64. Zeroed when the record is dropped.
    pub key: String,
    /// Plaintext bytes and plaintext bytes per chunk.
    pub size: u64,
    pub chunk_bytes: u32,
    /// SHA-256 of the whole ciphertext, base64: a file that no longer
    /// seals to it is uploaded afresh under a new id and key.
    pub sha256: String,
    pub created_at_ms: i64,
}

impl Drop for UploadRecord {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
    }
}

impl std::fmt::Debug for UploadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadRecord")
            .field("upload_id", &self.upload_id)
            .field("media_id", &self.media_id)
            .finish_non_exhaustive()
    }
}

pub const STATE_VERSION: u32 = 1;

/// A session token from `Auth.Login`.
#[derive(Clone, Serialize, Deserialize)]
pub struct SessionToken {
    pub token: String,
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Secret {
        text: String,
        n: u32,
    }

    fn open(dir: &Path, pass: &str, create: bool) -> Result<(Store, Option<Zeroizing<Vec<u8>>>)> {
        Store::open(
            dir,
            pass,
            &KdfParams::insecure_fast(),
            create,
            Duration::ZERO,
        )
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let value = Secret {
            text: "hello".into(),
            n: 7,
        };
        {
            let (store, existing) = open(&dir, "pw", true).unwrap();
            assert!(existing.is_none());
            store.save_json(&value).unwrap();
            // A second save replaces the first.
            store.save_json(&value).unwrap();
        }
        assert!(Store::exists(&dir));
        let (_store, existing) = open(&dir, "pw", false).unwrap();
        let back: Secret = from_json(&existing.unwrap()).unwrap();
        assert_eq!(back, value);
        assert!(!dir.join("state.bin.tmp").exists());
    }

    #[test]
    fn a_late_older_write_never_replaces_a_newer_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        {
            let (store, _) = open(&dir, "pw", true).unwrap();
            let older = store.next_generation();
            let newer = store.next_generation();
            store.save_ordered(newer, b"\"newer\"").unwrap();
            // The write of a cancelled caller finishing late.
            store.save_ordered(older, b"\"older\"").unwrap();
        }
        let (_store, existing) = open(&dir, "pw", false).unwrap();
        let back: String = from_json(&existing.unwrap()).unwrap();
        assert_eq!(back, "newer");
    }

    #[test]
    fn wrong_passphrase_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(tmp.path(), "right", true).unwrap();
            store.save_json(&1u32).unwrap();
        }
        let err = open(tmp.path(), "wrong", false).unwrap_err();
        assert!(matches!(err, Error::WrongPassphrase), "{err}");
    }

    #[test]
    fn missing_state_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = open(&tmp.path().join("nothing"), "pw", false).unwrap_err();
        assert!(matches!(err, Error::NoState(_)), "{err}");
    }

    #[test]
    fn plaintext_does_not_reach_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), "pw", true).unwrap();
        let marker = "the-secret-marker-4242";
        store
            .save_json(&Secret {
                text: marker.into(),
                n: 1,
            })
            .unwrap();
        for entry in fs::read_dir(tmp.path()).unwrap() {
            let bytes = fs::read(entry.unwrap().path()).unwrap();
            assert!(!contains(&bytes, marker.as_bytes()));
        }
    }

    #[test]
    fn second_opener_is_locked_out() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), "pw", true).unwrap();
        store.save_json(&1u32).unwrap();
        let err = open(tmp.path(), "pw", false).unwrap_err();
        assert!(matches!(err, Error::Locked(_)), "{err}");
        drop(store);
        assert!(open(tmp.path(), "pw", false).is_ok());
    }

    #[test]
    fn tampering_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(tmp.path(), "pw", true).unwrap();
            store.save_json(&"x").unwrap();
        }
        let path = tmp.path().join(STATE_FILE);
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            open(tmp.path(), "pw", false).unwrap_err(),
            Error::WrongPassphrase
        ));
        fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            open(tmp.path(), "pw", false).unwrap_err(),
            Error::CorruptState(_)
        ));
    }

    #[test]
    fn machine_secrets_do_not_reach_the_disk() {
        use crate::crypto::{CryptoLimits, DeviceAddr, Machine};
        let tmp = tempfile::tempdir().unwrap();
        let (store, _) = open(tmp.path(), "pw", true).unwrap();
        let me = DeviceAddr::parse("alice", "A1").unwrap();
        let machine = Machine::new(me, 1, CryptoLimits::default());
        let plain = serde_json::to_vec(&machine.pickle()).unwrap();
        let data = StateData {
            version: STATE_VERSION,
            server_url: "http://127.0.0.1:1".into(),
            user_id: "alice".into(),
            device_id: "A1".into(),
            session: Some(SessionToken {
                token: "secret-session-token".into(),
                expires_at_ms: 1,
            }),
            machine: machine.pickle(),
            cursors: BTreeMap::new(),
            membership_seq: BTreeMap::new(),
            processed_inbox: VecDeque::new(),
            seen_messages: VecDeque::new(),
            uploads: Vec::new(),
        };
        store.save_json(&data).unwrap();
        let file = fs::read(tmp.path().join(STATE_FILE)).unwrap();
        let ed25519 = machine.own_device().ed25519.to_base64();
        for needle in [
            &b"signing_key"[..],
            b"diffie_hellman_key",
            b"secret-session-token",
            ed25519.as_bytes(),
        ] {
            assert!(contains(&plain, needle) || needle == b"secret-session-token");
            assert!(!contains(&file, needle));
        }
        // Any 16-byte window of the pickle is absent from the file.
        assert!(!plain.windows(16).any(|w| contains(&file, w)));
        drop(store);
        let (_store, back) = open(tmp.path(), "pw", false).unwrap();
        let back: StateData = from_json(&back.unwrap()).unwrap();
        let machine2 = Machine::from_pickle(back.machine, CryptoLimits::default()).unwrap();
        assert_eq!(machine2.own_device(), machine.own_device());
    }

    pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }
}
