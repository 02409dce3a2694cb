//! Where presence records live: in memory in one process, in a JetStream
//! key-value bucket over NATS in a cluster. Both keep a record for `ttl`
//! after its last write and then forget it, so a user nobody reports about
//! any more (their gateway died) disappears by itself even if no presence
//! instance runs [`UserPresence::expire`] for them.
//!
//! Forgetting a record forgets its `last_seen_ms` too. The preference to
//! hide last-seen is kept durably elsewhere (the settings table).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use chappe_bus::nats::NatsBus;
use chappe_proto::ids::UserId;
use tokio::time::Instant;

use crate::state::UserPresence;

/// A failure of a presence store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (NATS unreachable, timeout, ...).
    #[error("presence store: {0}")]
    Backend(String),
    /// A stored record could not be read; it goes away after the ttl.
    #[error("presence record of {user} is unreadable: {why}")]
    Corrupt { user: String, why: String },
    /// An update lost its compare-and-set race too many times in a row.
    #[error("presence record of {user}: too many concurrent updates")]
    Contended { user: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A change applied to a record by [`PresenceStore::update`]. It may run more
/// than once (once per attempt), so it must only depend on the record.
pub type Change<'a> = &'a (dyn Fn(&mut UserPresence) + Send + Sync);

/// Presence records by user, each kept for the store's ttl after its last
/// write.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// The user's record, or `None` if there is none or it expired.
    async fn get(&self, user: &UserId) -> Result<Option<UserPresence>>;

    /// Stores the user's record, replacing any previous one, for the ttl.
    async fn put(&self, user: &UserId, record: &UserPresence) -> Result<()>;

    /// Applies `change` to the user's record (an empty one if there is none)
    /// and stores the result, atomically with respect to other updates of
    /// the same user (from other gateways' events, or other presence
    /// instances). Returns the record as stored.
    async fn update(&self, user: &UserId, change: Change<'_>) -> Result<UserPresence>;

    /// Forgets the user's record.
    async fn delete(&self, user: &UserId) -> Result<()>;

    /// The users who have a record (for the sweeper). Reads every key: its
    /// cost grows with the users seen within the record ttl.
    async fn users(&self) -> Result<Vec<UserId>>;

    /// The records of several users, in the order asked.
    async fn get_many(&self, users: &[UserId]) -> Result<Vec<Option<UserPresence>>> {
        let mut records = Vec::with_capacity(users.len());
        for user in users {
            records.push(self.get(user).await?);
        }
        Ok(records)
    }
}

/// The in-process store: a map behind a mutex, each entry with its expiry,
/// checked on read. Expired entries are swept on writes at most once per
/// ttl, so memory stays bounded by the users active within about two ttls.
///
/// Time is tokio's, so tests can pause and advance it.
#[derive(Debug)]
pub struct MemoryPresenceStore {
    ttl: Duration,
    inner: Mutex<Memory>,
}

#[derive(Debug)]
struct Memory {
    records: HashMap<UserId, (UserPresence, Option<Instant>)>,
    next_sweep: Instant,
}

impl MemoryPresenceStore {
    /// A store whose entries expire `ttl` after their last write (never if
    /// zero, as a key-value bucket's `max_age`).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Memory {
                records: HashMap::new(),
                next_sweep: Instant::now() + ttl,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        // A panic under the lock cannot leave a half-written entry: recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn expiry(&self, now: Instant) -> Option<Instant> {
        (!self.ttl.is_zero()).then(|| now + self.ttl)
    }

    fn write(&self, memory: &mut Memory, user: &UserId, record: UserPresence) {
        let now = Instant::now();
        if !self.ttl.is_zero() && now >= memory.next_sweep {
            memory.records.retain(|_, (_, expiry)| live(*expiry, now));
            memory.next_sweep = now + self.ttl;
        }
        memory
            .records
            .insert(user.clone(), (record, self.expiry(now)));
    }
}

fn live(expiry: Option<Instant>, now: Instant) -> bool {
    expiry.is_none_or(|at| now < at)
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    async fn get(&self, user: &UserId) -> Result<Option<UserPresence>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .records
            .get(user)
            .filter(|(_, expiry)| live(*expiry, now))
            .map(|(record, _)| record.clone()))
    }

    async fn put(&self, user: &UserId, record: &UserPresence) -> Result<()> {
        let mut memory = self.lock();
        self.write(&mut memory, user, record.clone());
        Ok(())
    }

    async fn update(&self, user: &UserId, change: Change<'_>) -> Result<UserPresence> {
        let now = Instant::now();
        let mut memory = self.lock();
        let mut record = memory
            .records
            .get(user)
            .filter(|(_, expiry)| live(*expiry, now))
            .map(|(record, _)| record.clone())
            .unwrap_or_default();
        change(&mut record);
        self.write(&mut memory, user, record.clone());
        Ok(record)
    }

    async fn delete(&self, user: &UserId) -> Result<()> {
        self.lock().records.remove(user);
        Ok(())
    }

    async fn users(&self) -> Result<Vec<UserId>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .records
            .iter()
            .filter(|(_, (_, expiry))| live(*expiry, now))
            .map(|(user, _)| user.clone())
            .collect())
    }
}

/// The cluster store: one JetStream key-value bucket, one key per user, the
/// record as JSON. The bucket's `max_age` is the ttl: JetStream drops a
/// record `ttl` after its last write. Updates are compare-and-set on the
/// key's revision, retried a few times when another writer came first.
#[derive(Debug, Clone)]
pub struct KvPresenceStore {
    kv: kv::Store,
}

/// Compare-and-set attempts of one [`KvPresenceStore::update`].
const UPDATE_ATTEMPTS: usize = 16;

impl KvPresenceStore {
    /// The bucket the presence service uses by default.
    pub const DEFAULT_BUCKET: &'static str = "chappe_presence";

    /// Creates (or opens and reconfigures) the bucket `bucket`, its entries
    /// expiring `ttl` after their last write.
    pub async fn open(bus: &NatsBus, bucket: &str, ttl: Duration) -> Result<Self> {
        let kv = bus
            .key_value(bucket, ttl)
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(Self::new(kv))
    }

    /// A store on a bucket already open.
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }
}

/// The key of a user's record. User ids are `[a-z0-9._-]`; a key-value key
/// is `[-/_=.a-zA-Z0-9]+` but may not start or end with `.` (nor hold `..`,
/// an empty subject token), so `.` becomes `=`, which user ids never
/// contain: the mapping is one to one, and its keys never hold a `.`.
pub fn user_key(user: &UserId) -> String {
    user.as_str().replace('.', "=")
}

/// The user of a key made by [`user_key`].
fn key_user(key: &str) -> Option<UserId> {
    UserId::parse(key.replace('=', ".")).ok()
}

fn backend(what: &str, user: &UserId, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} presence of {user}: {e}"))
}

fn decode(user: &UserId, value: &[u8]) -> Result<UserPresence> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        user: user.to_string(),
        why: e.to_string(),
    })
}

fn encode(user: &UserId, record: &UserPresence) -> Result<Bytes> {
    // A map of strings to integers, and integers: this does not fail; if it
    // ever did, the write is refused rather than the process brought down.
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| StoreError::Corrupt {
            user: user.to_string(),
            why: format!("cannot serialize: {e}"),
        })
}

#[async_trait]
impl PresenceStore for KvPresenceStore {
    async fn get(&self, user: &UserId) -> Result<Option<UserPresence>> {
        match self
            .kv
            .get(user_key(user))
            .await
            .map_err(|e| backend("reading", user, e))?
        {
            Some(value) => decode(user, &value).map(Some),
            None => Ok(None),
        }
    }

    async fn put(&self, user: &UserId, record: &UserPresence) -> Result<()> {
        self.kv
            .put(user_key(user), encode(user, record)?)
            .await
            .map_err(|e| backend("writing", user, e))?;
        Ok(())
    }

    async fn update(&self, user: &UserId, change: Change<'_>) -> Result<UserPresence> {
        let key = user_key(user);
        for _ in 0..UPDATE_ATTEMPTS {
            let entry = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| backend("reading", user, e))?;
            // Revision 0 expects no entry at all; a deleted entry's tombstone
            // has a revision, and is replaced like a value.
            let (mut record, revision) = match entry {
                Some(entry) if entry.operation == Operation::Put => {
                    (decode(user, &entry.value)?, entry.revision)
                }
                Some(tombstone) => (UserPresence::default(), tombstone.revision),
                None => (UserPresence::default(), 0),
            };
            change(&mut record);
            match self.kv.update(&key, encode(user, &record)?, revision).await {
                Ok(_) => return Ok(record),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    tracing::debug!(%user, "presence update raced: retrying");
                }
                Err(e) => return Err(backend("writing", user, e)),
            }
        }
        Err(StoreError::Contended {
            user: user.to_string(),
        })
    }

    async fn delete(&self, user: &UserId) -> Result<()> {
        self.kv
            .delete(user_key(user))
            .await
            .map_err(|e| backend("deleting", user, e))
    }

    async fn users(&self) -> Result<Vec<UserId>> {
        use futures::TryStreamExt as _;
        let keys: Vec<String> = self
            .kv
            .keys()
            .await
            .map_err(|e| StoreError::Backend(format!("listing presence records: {e}")))?
            .try_collect()
            .await
            .map_err(|e| StoreError::Backend(format!("listing presence records: {e}")))?;
        Ok(keys.iter().filter_map(|k| key_user(k)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_keys_are_valid_and_one_to_one() {
        for (user, key) in [
            ("alice", "alice"),
            ("jean.dupont", "jean=dupont"),
            (".a..b.", "=a==b="),
            ("a-b_c", "a-b_c"),
        ] {
            let user = UserId::parse(user).unwrap();
            assert_eq!(user_key(&user), key);
            assert_eq!(key_user(key), Some(user.clone()));
            assert!(!key.contains('.'));
        }
        assert_ne!(
            user_key(&UserId::parse("a.b").unwrap()),
            user_key(&UserId::parse("a-b").unwrap())
        );
    }
}
