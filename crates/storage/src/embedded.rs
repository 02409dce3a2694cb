//! The embedded store: every repository on one SQLite file, for a Chappe
//! that runs in a single process.
//!
//! - the file is opened in WAL mode with `synchronous=FULL` (a commit is
//!   fsynced before it returns, so acknowledged data survives power loss),
//!   `foreign_keys=ON` and a busy timeout; [`EmbeddedStore::open`] checks
//!   that each pragma took effect;
//! - the schema is a list of migrations applied at open in one transaction,
//!   the version kept in `PRAGMA user_version`; a file written by a newer
//!   build is refused;
//! - rusqlite is synchronous, so every repository call runs on the blocking
//!   pool, on the one connection, as one transaction (`BEGIN IMMEDIATE` when
//!   it writes, so concurrent claims and appends serialize);
//! - SQLite errors map onto [`Error`]: busy, locked and I/O failures are
//!   `Unavailable`, constraint violations `Conflict`, unreadable rows
//!   `Corrupt`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chappe_proto::ids::{ConversationId, IdError, MessageId};
use rusqlite::types::Type;
use rusqlite::{
    Connection, ErrorCode, OptionalExtension, Params, Row, Transaction, TransactionBehavior, params,
};

use crate::{
    ClaimedKey, ConversationRepo, ConversationRow, CreateMedia, DeviceKeysRow, Error, InboxRepo,
    InboxRow, InsertMessage, KeyRepo, MediaChunkRow, MediaObjectRow, MediaRepo, MediaUsage,
    MemberChange, MembershipRow, MessageRepo, MessageRow, OneTimeKeyRow, PresenceSettingsRepo,
    PutChunk, PutDevice, PutFallback, Result, StoredMedia, bucket_of,
};

/// How long a call waits for a lock held by another connection to the same
/// file (another process, a backup) before failing with
/// [`Error::Unavailable`].
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: every distinct query fits.
const STATEMENT_CACHE: usize = 64;

/// The schema, one migration per version: a file at version `n` has had
/// the first `n` applied. Append, never edit.
const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2];

/// Version 1. Tables and primary keys are those of the CQL schema (see the
/// crate docs). Ids are stored as printed: message ids are 32 lowercase hex
/// digits, so their text order is their time order. Key tables have no
/// foreign key to `device_keys`, as in CQL, so both stores accept the same
/// calls.
const SCHEMA_V1: &str = "
CREATE TABLE device_keys (
    user_id        TEXT    NOT NULL,
    device_id      TEXT    NOT NULL,
    curve25519     TEXT    NOT NULL,
    ed25519        TEXT    NOT NULL,
    signature      TEXT    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    uploaded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE one_time_keys (
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    key_id        TEXT    NOT NULL,
    curve25519    TEXT    NOT NULL,
    signature     TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE fallback_keys (
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    key_id        TEXT    NOT NULL,
    curve25519    TEXT    NOT NULL,
    signature     TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE conversations (
    conversation_id TEXT    NOT NULL PRIMARY KEY,
    kind            INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    head            TEXT,
    membership_seq  INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE TABLE membership_log (
    conversation_id TEXT    NOT NULL REFERENCES conversations (conversation_id),
    seq             INTEGER NOT NULL,
    actor_user_id   TEXT    NOT NULL,
    actor_device_id TEXT    NOT NULL,
    op              INTEGER NOT NULL,
    target_user_id  TEXT    NOT NULL,
    at_ms           INTEGER NOT NULL,
    signature       BLOB    NOT NULL,
    PRIMARY KEY (conversation_id, seq)
) WITHOUT ROWID, STRICT;

CREATE TABLE members (
    conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
    user_id         TEXT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE user_conversations (
    user_id         TEXT NOT NULL,
    conversation_id TEXT NOT NULL REFERENCES conversations (conversation_id),
    PRIMARY KEY (user_id, conversation_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE messages (
    conversation_id  TEXT    NOT NULL REFERENCES conversations (conversation_id),
    bucket           INTEGER NOT NULL,
    message_id       TEXT    NOT NULL,
    sender_user_id   TEXT    NOT NULL,
    sender_device_id TEXT    NOT NULL,
    client_msg_id    TEXT    NOT NULL,
    ciphertext       BLOB    NOT NULL,
    session_id       TEXT    NOT NULL,
    sent_at_ms       INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, bucket, message_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE message_dedup (
    conversation_id  TEXT NOT NULL REFERENCES conversations (conversation_id),
    sender_user_id   TEXT NOT NULL,
    sender_device_id TEXT NOT NULL,
    client_msg_id    TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    PRIMARY KEY (conversation_id, sender_user_id, sender_device_id, client_msg_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE device_inbox (
    user_id          TEXT    NOT NULL,
    device_id        TEXT    NOT NULL,
    inbox_id         TEXT    NOT NULL,
    sender_user_id   TEXT    NOT NULL,
    sender_device_id TEXT    NOT NULL,
    olm_type         INTEGER NOT NULL,
    ciphertext       BLOB    NOT NULL,
    sent_at_ms       INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, inbox_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE to_device_dedup (
    sender_user_id   TEXT NOT NULL,
    sender_device_id TEXT NOT NULL,
    client_msg_id    TEXT NOT NULL,
    PRIMARY KEY (sender_user_id, sender_device_id, client_msg_id)
) WITHOUT ROWID, STRICT;
";

/// Version 2: media (objects, chunks, posts) and presence settings.
///
/// `media_chunks` keeps a rowid (unlike the other tables): its rows hold up
/// to a chunk of ciphertext each, and SQLite keeps large rows in rowid
/// tables far better than in `WITHOUT ROWID` b-trees. The two indexes on
/// `media_objects` serve quotas (an owner's objects by creation time) and
/// the sweeper (objects by expiry).
const SCHEMA_V2: &str = "
CREATE TABLE media_objects (
    media_id      TEXT    NOT NULL PRIMARY KEY,
    owner_user_id TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    chunk_size    INTEGER NOT NULL,
    chunk_count   INTEGER NOT NULL,
    sha256        BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    complete      INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX media_objects_by_owner ON media_objects (owner_user_id, created_at_ms);
CREATE INDEX media_objects_by_expiry ON media_objects (expires_at_ms);

CREATE TABLE media_chunks (
    media_id TEXT    NOT NULL REFERENCES media_objects (media_id),
    idx      INTEGER NOT NULL,
    sha256   BLOB    NOT NULL,
    data     BLOB    NOT NULL,
    PRIMARY KEY (media_id, idx)
) STRICT;

CREATE TABLE media_posts (
    media_id        TEXT NOT NULL REFERENCES media_objects (media_id),
    conversation_id TEXT NOT NULL,
    PRIMARY KEY (media_id, conversation_id)
) WITHOUT ROWID, STRICT;

CREATE TABLE presence_settings (
    user_id        TEXT    NOT NULL PRIMARY KEY,
    hide_last_seen INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Every repository on one SQLite file. Cheap to clone: clones share the
/// connection.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// How often the checkpointer folds the WAL back into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Checkpoints the WAL in the background for as long as the store lives.
fn spawn_checkpointer(store: std::sync::Weak<Inner>, conn: Connection) {
    let spawned = std::thread::Builder::new()
        .name("chappe-sqlite-checkpoint".into())
        .spawn(move || {
            while store.upgrade().is_some() {
                std::thread::sleep(CHECKPOINT_EVERY);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "no checkpoint thread: the WAL will grow until restart");
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Opens the store at `path`, creating the file if needed, and brings
    /// its schema up to date. Blocks while it does (call it at start-up).
    ///
    /// Fails with [`Error::Corrupt`] when the file was written by a newer
    /// build (its schema version is unknown here) or is not a database,
    /// and with [`Error::Unavailable`] when it cannot be opened or a pragma
    /// does not take effect.
    pub fn open(path: &Path) -> Result<Self> {
        let db = |e| sql_error("database", e);
        let mut conn = Connection::open(path).map_err(db)?;
        configure(&conn)?;
        let version = migrate(&mut conn)?;
        // Writers never checkpoint: a commit that crosses the WAL's size
        // threshold would otherwise copy the WAL into the database and fsync
        // it before answering, stalling every writer behind it. A thread of
        // its own checkpoints instead (PASSIVE: it never blocks writers).
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db)?;
        let checkpointer = Connection::open(path).map_err(db)?;
        checkpointer.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        tracing::debug!(path = %path.display(), version, "embedded store opened");
        let inner = Arc::new(Inner {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        });
        spawn_checkpointer(Arc::downgrade(&inner), checkpointer);
        Ok(Self { inner })
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` as one read transaction.
    async fn read<T, F>(&self, table: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Fail> + Send + 'static,
    {
        self.run(table, TransactionBehavior::Deferred, f).await
    }

    /// Runs `f` as one write transaction, taking the write lock up front.
    async fn write<T, F>(&self, table: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Fail> + Send + 'static,
    {
        self.run(table, TransactionBehavior::Immediate, f).await
    }

    /// Runs `f` in a transaction on the blocking pool: committed when `f`
    /// succeeds, rolled back (when dropped) when it fails. `table` names
    /// the main table for errors.
    async fn run<T, F>(&self, table: &'static str, behavior: TransactionBehavior, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Fail> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let task = tokio::task::spawn_blocking(move || {
            // A panic cannot leave a transaction open (dropping it rolls
            // back), so a poisoned connection is still a good one.
            let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn
                .transaction_with_behavior(behavior)
                .map_err(|e| sql_error(table, e))?;
            let out = f(&tx).map_err(|e| e.into_error(table))?;
            tx.commit().map_err(|e| sql_error(table, e))?;
            Ok(out)
        });
        task.await
            .map_err(|e| Error::Unavailable(format!("{table}: store task failed: {e}")))?
    }
}

/// Sets and checks the connection's pragmas.
fn configure(conn: &Connection) -> Result<()> {
    let db = |e| sql_error("database", e);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(db)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
    let pragma = |name| conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0));
    let synchronous = pragma("synchronous").map_err(db)?;
    let foreign_keys = pragma("foreign_keys").map_err(db)?;
    // synchronous: 2 is FULL.
    if !mode.eq_ignore_ascii_case("wal") || synchronous != 2 || foreign_keys != 1 {
        return Err(Error::Unavailable(format!(
            "pragmas did not take effect: journal_mode={mode} (want wal), \
             synchronous={synchronous} (want 2), foreign_keys={foreign_keys} (want 1)"
        )));
    }
    Ok(())
}

/// Applies the migrations the file lacks, in one transaction; returns the
/// schema version.
fn migrate(conn: &mut Connection) -> Result<usize> {
    let db = |e| sql_error("schema", e);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let version: usize = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    let known = MIGRATIONS.len();
    if version > known {
        return Err(Error::Corrupt {
            table: "schema",
            detail: format!(
                "the file is at schema version {version}, newer than the {known} this build \
                 knows: it was written by a newer Chappe; run that version or newer"
            ),
        });
    }
    for (applied, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql).map_err(db)?;
        tx.pragma_update(None, "user_version", applied + 1)
            .map_err(db)?;
        tracing::info!(version = applied + 1, "embedded store schema migrated");
    }
    tx.commit().map_err(db)?;
    Ok(known)
}

// ------------------------------------------------------------- errors

/// Why a transaction body failed: SQLite, or a domain error it decided.
enum Fail {
    Sql(rusqlite::Error),
    Store(Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Self::Store(e)
    }
}

impl Fail {
    fn into_error(self, table: &'static str) -> Error {
        match self {
            Self::Sql(e) => sql_error(table, e),
            Self::Store(e) => e,
        }
    }
}

/// Maps a SQLite error met while working on `table`.
fn sql_error(table: &'static str, e: rusqlite::Error) -> Error {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _) => match f.code {
            ErrorCode::ConstraintViolation => Error::Conflict(format!("{table}: {e}")),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Error::Corrupt {
                table,
                detail: e.to_string(),
            },
            // Busy, locked, I/O, disk full, out of memory, ...: nothing
            // was committed, the caller may retry.
            _ => Error::Unavailable(format!("{table}: {e}")),
        },
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::InvalidColumnType(..)
        | E::Utf8Error(..) => Error::Corrupt {
            table,
            detail: e.to_string(),
        },
        // A value SQLite cannot hold (an integer above i64::MAX).
        E::ToSqlConversionFailure(_) => Error::Conflict(format!("{table}: {e}")),
        _ => Error::Unavailable(format!("{table}: {e}")),
    }
}

// ------------------------------------------------------ query helpers

/// Runs a cached statement and maps its first row, if any.
fn query_opt<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Option<T>> {
    conn.prepare_cached(sql)?.query_row(params, map).optional()
}

/// Runs a cached statement and maps every row.
fn query_all<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    map: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    conn.prepare_cached(sql)?.query_map(params, map)?.collect()
}

/// Runs a cached statement; returns the number of rows changed.
fn exec(conn: &Connection, sql: &str, params: impl Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// A SQL `LIMIT` for a caller's `usize` (`usize::MAX` means all).
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

// -------------------------------------------------------- row mapping

/// Reads column `idx` as text and parses it as an id.
fn id_col<T>(
    row: &Row<'_>,
    idx: usize,
    parse: fn(&str) -> Result<T, IdError>,
) -> rusqlite::Result<T> {
    let text: String = row.get(idx)?;
    parse(&text).map_err(|e| bad_id(idx, e))
}

/// Reads column `idx` as nullable text and parses it as an id.
fn opt_id_col<T>(
    row: &Row<'_>,
    idx: usize,
    parse: fn(&str) -> Result<T, IdError>,
) -> rusqlite::Result<Option<T>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| parse(&t))
        .transpose()
        .map_err(|e| bad_id(idx, e))
}

fn bad_id(idx: usize, e: IdError) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

const DEVICE_COLS: &str =
    "user_id, device_id, curve25519, ed25519, signature, created_at_ms, uploaded_at_ms";

fn device_row(r: &Row<'_>) -> rusqlite::Result<DeviceKeysRow> {
    Ok(DeviceKeysRow {
        user_id: r.get(0)?,
        device_id: r.get(1)?,
        curve25519: r.get(2)?,
        ed25519: r.get(3)?,
        signature: r.get(4)?,
        created_at_ms: r.get(5)?,
        uploaded_at_ms: r.get(6)?,
    })
}

/// The columns of a one-time or fallback key.
const KEY_COLS: &str = "key_id, curve25519, signature, created_at_ms";

fn key_row(r: &Row<'_>) -> rusqlite::Result<OneTimeKeyRow> {
    Ok(OneTimeKeyRow {
        key_id: r.get(0)?,
        curve25519: r.get(1)?,
        signature: r.get(2)?,
        created_at_ms: r.get(3)?,
    })
}

const CONVERSATION_COLS: &str = "conversation_id, kind, created_at_ms, head, membership_seq";

fn conversation_row(r: &Row<'_>) -> rusqlite::Result<ConversationRow> {
    Ok(ConversationRow {
        conversation_id: id_col(r, 0, ConversationId::parse)?,
        kind: r.get(1)?,
        created_at_ms: r.get(2)?,
        head: opt_id_col(r, 3, MessageId::parse)?,
        membership_seq: r.get(4)?,
    })
}

const MEMBERSHIP_COLS: &str =
    "conversation_id, seq, actor_user_id, actor_device_id, op, target_user_id, at_ms, signature";

fn membership_row(r: &Row<'_>) -> rusqlite::Result<MembershipRow> {
    Ok(MembershipRow {
        conversation_id: id_col(r, 0, ConversationId::parse)?,
        seq: r.get(1)?,
        actor_user_id: r.get(2)?,
        actor_device_id: r.get(3)?,
        op: r.get(4)?,
        target_user_id: r.get(5)?,
        at_ms: r.get(6)?,
        signature: r.get(7)?,
    })
}

const MESSAGE_COLS: &str = "conversation_id, message_id, sender_user_id, sender_device_id, \
                            client_msg_id, ciphertext, session_id, sent_at_ms";

fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        conversation_id: id_col(r, 0, ConversationId::parse)?,
        message_id: id_col(r, 1, MessageId::parse)?,
        sender_user_id: r.get(2)?,
        sender_device_id: r.get(3)?,
        client_msg_id: r.get(4)?,
        ciphertext: r.get(5)?,
        session_id: r.get(6)?,
        sent_at_ms: r.get(7)?,
    })
}

const INBOX_COLS: &str = "user_id, device_id, inbox_id, sender_user_id, sender_device_id, \
                          olm_type, ciphertext, sent_at_ms";

fn inbox_row(r: &Row<'_>) -> rusqlite::Result<InboxRow> {
    Ok(InboxRow {
        user_id: r.get(0)?,
        device_id: r.get(1)?,
        inbox_id: id_col(r, 2, MessageId::parse)?,
        sender_user_id: r.get(3)?,
        sender_device_id: r.get(4)?,
        olm_type: r.get(5)?,
        ciphertext: r.get(6)?,
        sent_at_ms: r.get(7)?,
    })
}

// ---------------------------------------------------------------- keys

fn select_device(
    conn: &Connection,
    user: &str,
    device: &str,
) -> rusqlite::Result<Option<DeviceKeysRow>> {
    let sql =
        format!("SELECT {DEVICE_COLS} FROM device_keys WHERE user_id = ?1 AND device_id = ?2");
    query_opt(conn, &sql, params![user, device], device_row)
}

fn select_one_time_key(
    conn: &Connection,
    user: &str,
    device: &str,
    key_id: &str,
) -> rusqlite::Result<Option<OneTimeKeyRow>> {
    let sql = format!(
        "SELECT {KEY_COLS} FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3"
    );
    query_opt(conn, &sql, params![user, device, key_id], key_row)
}

fn select_fallback(
    conn: &Connection,
    user: &str,
    device: &str,
) -> rusqlite::Result<Option<OneTimeKeyRow>> {
    let sql = format!("SELECT {KEY_COLS} FROM fallback_keys WHERE user_id = ?1 AND device_id = ?2");
    query_opt(conn, &sql, params![user, device], key_row)
}

fn count_one_time_keys(conn: &Connection, user: &str, device: &str) -> rusqlite::Result<u64> {
    let sql = "SELECT COUNT(*) FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2";
    conn.prepare_cached(sql)?
        .query_row(params![user, device], |r| r.get(0))
}

#[async_trait]
impl KeyRepo for EmbeddedStore {
    async fn get_device(&self, user_id: &str, device_id: &str) -> Result<Option<DeviceKeysRow>> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.read("device_keys", move |tx| {
            Ok(select_device(tx, &user, &device)?)
        })
        .await
    }

    /// A device whose stored Curve25519 and Ed25519 keys equal the row's is
    /// `Unchanged` (its first signature and times are kept).
    async fn put_device(&self, row: &DeviceKeysRow) -> Result<PutDevice> {
        let row = row.clone();
        self.write("device_keys", move |tx| {
            if let Some(stored) = select_device(tx, &row.user_id, &row.device_id)? {
                let same = stored.curve25519 == row.curve25519 && stored.ed25519 == row.ed25519;
                return Ok(if same {
                    PutDevice::Unchanged
                } else {
                    PutDevice::Conflict(stored)
                });
            }
            let sql = format!(
                "INSERT INTO device_keys ({DEVICE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            );
            exec(
                tx,
                &sql,
                params![
                    row.user_id,
                    row.device_id,
                    row.curve25519,
                    row.ed25519,
                    row.signature,
                    row.created_at_ms,
                    row.uploaded_at_ms
                ],
            )?;
            Ok(PutDevice::Inserted)
        })
        .await
    }

    async fn list_devices(&self, user_id: &str) -> Result<Vec<DeviceKeysRow>> {
        let user = user_id.to_owned();
        self.read("device_keys", move |tx| {
            let sql = format!(
                "SELECT {DEVICE_COLS} FROM device_keys WHERE user_id = ?1 ORDER BY device_id"
            );
            Ok(query_all(tx, &sql, params![user], device_row)?)
        })
        .await
    }

    async fn add_one_time_keys(
        &self,
        user_id: &str,
        device_id: &str,
        keys: &[OneTimeKeyRow],
    ) -> Result<u64> {
        let (user, device, keys) = (user_id.to_owned(), device_id.to_owned(), keys.to_vec());
        self.write("one_time_keys", move |tx| {
            let insert = format!(
                "INSERT INTO one_time_keys (user_id, device_id, {KEY_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            );
            for key in &keys {
                match select_one_time_key(tx, &user, &device, &key.key_id)? {
                    None => {
                        exec(
                            tx,
                            &insert,
                            params![user, device, key.key_id, key.curve25519, key.signature, key.created_at_ms],
                        )?;
                    }
                    Some(stored) if stored.curve25519 == key.curve25519 && stored.signature == key.signature => {}
                    Some(_) => {
                        return Err(Error::Conflict(format!(
                            "one-time key {} of {user}/{device} is stored with another key or signature",
                            key.key_id
                        ))
                        .into());
                    }
                }
            }
            Ok(count_one_time_keys(tx, &user, &device)?)
        })
        .await
    }

    async fn count_one_time_keys(&self, user_id: &str, device_id: &str) -> Result<u64> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.read("one_time_keys", move |tx| {
            Ok(count_one_time_keys(tx, &user, &device)?)
        })
        .await
    }

    async fn put_fallback_key(
        &self,
        user_id: &str,
        device_id: &str,
        key: &OneTimeKeyRow,
    ) -> Result<PutFallback> {
        let (user, device, key) = (user_id.to_owned(), device_id.to_owned(), key.clone());
        self.write("fallback_keys", move |tx| {
            match select_fallback(tx, &user, &device)? {
                Some(stored) if stored == key => return Ok(PutFallback::Unchanged),
                Some(stored) if stored.created_at_ms > key.created_at_ms => {
                    return Ok(PutFallback::Stale);
                }
                _ => {}
            }
            let sql = format!(
                "INSERT OR REPLACE INTO fallback_keys (user_id, device_id, {KEY_COLS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            );
            exec(
                tx,
                &sql,
                params![
                    user,
                    device,
                    key.key_id,
                    key.curve25519,
                    key.signature,
                    key.created_at_ms
                ],
            )?;
            Ok(PutFallback::Stored)
        })
        .await
    }

    /// Hands out the one-time key with the lowest key id.
    async fn claim_key(&self, user_id: &str, device_id: &str) -> Result<Option<ClaimedKey>> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.write("one_time_keys", move |tx| {
            let sql = format!(
                "SELECT {KEY_COLS} FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 \
                 ORDER BY key_id LIMIT 1"
            );
            if let Some(key) = query_opt(tx, &sql, params![user, device], key_row)? {
                exec(
                    tx,
                    "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3",
                    params![user, device, key.key_id],
                )?;
                return Ok(Some(ClaimedKey { key, fallback: false }));
            }
            let fallback = select_fallback(tx, &user, &device)?;
            Ok(fallback.map(|key| ClaimedKey { key, fallback: true }))
        })
        .await
    }
}

// ------------------------------------------------------- conversations

/// The log a conversation is created with must be its seqs 1..=n, all of
/// this conversation, ending at the row's `membership_seq`.
fn check_creation_log(row: &ConversationRow, log: &[(MembershipRow, MemberChange)]) -> Result<()> {
    let id = row.conversation_id;
    let in_order = log
        .iter()
        .zip(1u64..)
        .all(|((event, _), seq)| event.seq == seq && event.conversation_id == id);
    if !in_order || row.membership_seq != log.len() as u64 {
        return Err(Error::Conflict(format!(
            "conversation {id}: the creation log must hold seqs 1..={} of this conversation",
            row.membership_seq
        )));
    }
    Ok(())
}

/// Writes a membership event and applies its change to the member set.
fn insert_membership(
    conn: &Connection,
    event: &MembershipRow,
    change: MemberChange,
) -> rusqlite::Result<()> {
    let id = event.conversation_id.to_string();
    let sql = format!(
        "INSERT INTO membership_log ({MEMBERSHIP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    );
    exec(
        conn,
        &sql,
        params![
            id,
            event.seq,
            event.actor_user_id,
            event.actor_device_id,
            event.op,
            event.target_user_id,
            event.at_ms,
            event.signature
        ],
    )?;
    let member = params![id, event.target_user_id];
    match change {
        MemberChange::Add => {
            exec(
                conn,
                "INSERT OR IGNORE INTO members (conversation_id, user_id) VALUES (?1, ?2)",
                member,
            )?;
            exec(
                conn,
                "INSERT OR IGNORE INTO user_conversations (conversation_id, user_id) VALUES (?1, ?2)",
                member,
            )?;
        }
        MemberChange::Remove => {
            exec(
                conn,
                "DELETE FROM members WHERE conversation_id = ?1 AND user_id = ?2",
                member,
            )?;
            exec(
                conn,
                "DELETE FROM user_conversations WHERE conversation_id = ?1 AND user_id = ?2",
                member,
            )?;
        }
        MemberChange::None => {}
    }
    Ok(())
}

fn conversation_exists(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    let sql = "SELECT 1 FROM conversations WHERE conversation_id = ?1";
    Ok(query_opt(conn, sql, params![id], |_| Ok(()))?.is_some())
}

#[async_trait]
impl ConversationRepo for EmbeddedStore {
    /// Also a [`Error::Conflict`] when the log is not seqs 1..=n of this
    /// conversation ending at `row.membership_seq`.
    async fn create_conversation(
        &self,
        row: &ConversationRow,
        log: &[(MembershipRow, MemberChange)],
    ) -> Result<()> {
        check_creation_log(row, log)?;
        let (row, log) = (row.clone(), log.to_vec());
        self.write("conversations", move |tx| {
            let id = row.conversation_id.to_string();
            let sql = format!(
                "INSERT INTO conversations ({CONVERSATION_COLS}) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (conversation_id) DO NOTHING"
            );
            let head = row.head.map(|h| h.to_string());
            let inserted = exec(
                tx,
                &sql,
                params![id, row.kind, row.created_at_ms, head, row.membership_seq],
            )?;
            if inserted == 0 {
                return Err(Error::Conflict(format!("conversation {id} already exists")).into());
            }
            for (event, change) in &log {
                insert_membership(tx, event, *change)?;
            }
            Ok(())
        })
        .await
    }

    async fn get_conversation(&self, id: ConversationId) -> Result<Option<ConversationRow>> {
        self.read("conversations", move |tx| {
            let sql =
                format!("SELECT {CONVERSATION_COLS} FROM conversations WHERE conversation_id = ?1");
            Ok(query_opt(
                tx,
                &sql,
                params![id.to_string()],
                conversation_row,
            )?)
        })
        .await
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<String>> {
        self.read("members", move |tx| {
            let sql = "SELECT user_id FROM members WHERE conversation_id = ?1 ORDER BY user_id";
            Ok(query_all(tx, sql, params![id.to_string()], |r| r.get(0))?)
        })
        .await
    }

    async fn is_member(&self, id: ConversationId, user_id: &str) -> Result<bool> {
        let user = user_id.to_owned();
        self.read("members", move |tx| {
            let sql = "SELECT 1 FROM members WHERE conversation_id = ?1 AND user_id = ?2";
            Ok(query_opt(tx, sql, params![id.to_string(), user], |_| Ok(()))?.is_some())
        })
        .await
    }

    async fn membership_log(&self, id: ConversationId) -> Result<Vec<MembershipRow>> {
        self.read("membership_log", move |tx| {
            let sql = format!("SELECT {MEMBERSHIP_COLS} FROM membership_log WHERE conversation_id = ?1 ORDER BY seq");
            Ok(query_all(tx, &sql, params![id.to_string()], membership_row)?)
        })
        .await
    }

    async fn append_membership(&self, row: &MembershipRow, change: MemberChange) -> Result<()> {
        let row = row.clone();
        self.write("membership_log", move |tx| {
            let id = row.conversation_id.to_string();
            let advanced = exec(
                tx,
                "UPDATE conversations SET membership_seq = ?2 \
                 WHERE conversation_id = ?1 AND membership_seq = ?2 - 1",
                params![id, row.seq],
            )?;
            if advanced == 0 {
                let why = if conversation_exists(tx, &id)? {
                    format!("membership seq {} of {id} is not the next one", row.seq)
                } else {
                    format!("conversation {id} does not exist")
                };
                return Err(Error::Conflict(why).into());
            }
            insert_membership(tx, &row, change)?;
            Ok(())
        })
        .await
    }

    async fn conversations_of(&self, user_id: &str) -> Result<Vec<ConversationRow>> {
        let user = user_id.to_owned();
        let mut rows = self
            .read("user_conversations", move |tx| {
                let sql = format!(
                    "SELECT {CONVERSATION_COLS} FROM conversations WHERE conversation_id IN \
                     (SELECT conversation_id FROM user_conversations WHERE user_id = ?1)"
                );
                Ok(query_all(tx, &sql, params![user], conversation_row)?)
            })
            .await?;
        rows.sort_by_key(|c| (std::cmp::Reverse(c.last_activity_ms()), c.conversation_id));
        Ok(rows)
    }
}

// ------------------------------------------------------------ messages

fn select_message(
    conn: &Connection,
    conversation: &str,
    id: MessageId,
) -> rusqlite::Result<Option<MessageRow>> {
    let sql = format!(
        "SELECT {MESSAGE_COLS} FROM messages \
         WHERE conversation_id = ?1 AND bucket = ?2 AND message_id = ?3"
    );
    query_opt(
        conn,
        &sql,
        params![conversation, bucket_of(id), id.to_string()],
        message_row,
    )
}

/// Which way [`EmbeddedStore::page`] reads from its bound.
#[derive(Clone, Copy)]
enum Direction {
    /// Ids greater than the bound, ascending.
    Forward,
    /// Ids smaller than the bound, descending.
    Backward,
}

impl EmbeddedStore {
    /// Up to `limit` messages strictly beyond `bound` in `direction`, from
    /// the conversation's start or end when `bound` is `None`. Buckets grow
    /// with ids, so `(bucket, message_id)` orders as `message_id` does and
    /// one range scan of the primary key crosses buckets.
    async fn page(
        &self,
        conversation: ConversationId,
        bound: Option<MessageId>,
        limit: usize,
        direction: Direction,
    ) -> Result<Vec<MessageRow>> {
        let (cmp, order, open_bucket) = match direction {
            Direction::Forward => (">", "ASC", i64::MIN),
            Direction::Backward => ("<", "DESC", i64::MAX),
        };
        // No real row has bucket i64::MIN or i64::MAX, so with an empty id
        // these open bounds are beyond every message.
        let (bucket, id) = bound.map_or((open_bucket, String::new()), |b| {
            (bucket_of(b), b.to_string())
        });
        self.read("messages", move |tx| {
            let sql = format!(
                "SELECT {MESSAGE_COLS} FROM messages \
                 WHERE conversation_id = ?1 AND (bucket, message_id) {cmp} (?2, ?3) \
                 ORDER BY bucket {order}, message_id {order} LIMIT ?4"
            );
            let params = params![conversation.to_string(), bucket, id, sql_limit(limit)];
            Ok(query_all(tx, &sql, params, message_row)?)
        })
        .await
    }
}

#[async_trait]
impl MessageRepo for EmbeddedStore {
    /// A message for a conversation that does not exist is a
    /// [`Error::Conflict`], as is a message id already stored.
    async fn insert_message(&self, row: &MessageRow) -> Result<InsertMessage> {
        let row = row.clone();
        self.write("messages", move |tx| {
            let id = row.conversation_id.to_string();
            let sender = params![id, row.sender_user_id, row.sender_device_id, row.client_msg_id];
            let dedup = "SELECT message_id FROM message_dedup WHERE conversation_id = ?1 \
                         AND sender_user_id = ?2 AND sender_device_id = ?3 AND client_msg_id = ?4";
            if let Some(first) = query_opt(tx, dedup, sender, |r| id_col(r, 0, MessageId::parse))? {
                let stored = select_message(tx, &id, first)?.ok_or_else(|| Error::Corrupt {
                    table: "message_dedup",
                    detail: format!("message {first} of {id} is recorded but not stored"),
                })?;
                return Ok(InsertMessage::Duplicate(stored));
            }
            if !conversation_exists(tx, &id)? {
                return Err(Error::Conflict(format!("conversation {id} does not exist")).into());
            }
            let message_id = row.message_id.to_string();
            let sql = format!(
                "INSERT INTO messages (bucket, {MESSAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            );
            exec(
                tx,
                &sql,
                params![
                    bucket_of(row.message_id),
                    id,
                    message_id,
                    row.sender_user_id,
                    row.sender_device_id,
                    row.client_msg_id,
                    row.ciphertext,
                    row.session_id,
                    row.sent_at_ms
                ],
            )?;
            exec(
                tx,
                "INSERT INTO message_dedup \
                 (conversation_id, sender_user_id, sender_device_id, client_msg_id, message_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, row.sender_user_id, row.sender_device_id, row.client_msg_id, message_id],
            )?;
            // Ids are fixed-width hex: text order is id order.
            exec(
                tx,
                "UPDATE conversations SET head = ?2 \
                 WHERE conversation_id = ?1 AND (head IS NULL OR head < ?2)",
                params![id, message_id],
            )?;
            Ok(InsertMessage::Inserted)
        })
        .await
    }

    async fn get_message(
        &self,
        conversation: ConversationId,
        id: MessageId,
    ) -> Result<Option<MessageRow>> {
        self.read("messages", move |tx| {
            Ok(select_message(tx, &conversation.to_string(), id)?)
        })
        .await
    }

    async fn messages_after(
        &self,
        conversation: ConversationId,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        self.page(conversation, after, limit, Direction::Forward)
            .await
    }

    async fn messages_before(
        &self,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageRow>> {
        self.page(conversation, before, limit, Direction::Backward)
            .await
    }
}

// --------------------------------------------------------------- inbox

#[async_trait]
impl InboxRepo for EmbeddedStore {
    /// An inbox id already stored for the device is a [`Error::Conflict`]
    /// (and nothing is written).
    async fn put_to_device(
        &self,
        sender_user_id: &str,
        sender_device_id: &str,
        client_msg_id: &str,
        rows: &[InboxRow],
    ) -> Result<bool> {
        let key = [sender_user_id, sender_device_id, client_msg_id].map(str::to_owned);
        let rows = rows.to_vec();
        self.write("device_inbox", move |tx| {
            let recorded = exec(
                tx,
                "INSERT INTO to_device_dedup (sender_user_id, sender_device_id, client_msg_id) \
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
                params![key[0], key[1], key[2]],
            )?;
            if recorded == 0 {
                return Ok(false);
            }
            let sql = format!(
                "INSERT INTO device_inbox ({INBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
            );
            for r in &rows {
                exec(
                    tx,
                    &sql,
                    params![
                        r.user_id,
                        r.device_id,
                        r.inbox_id.to_string(),
                        r.sender_user_id,
                        r.sender_device_id,
                        r.olm_type,
                        r.ciphertext,
                        r.sent_at_ms
                    ],
                )?;
            }
            Ok(true)
        })
        .await
    }

    async fn inbox(&self, user_id: &str, device_id: &str, limit: usize) -> Result<Vec<InboxRow>> {
        let (user, device) = (user_id.to_owned(), device_id.to_owned());
        self.read("device_inbox", move |tx| {
            let sql = format!(
                "SELECT {INBOX_COLS} FROM device_inbox WHERE user_id = ?1 AND device_id = ?2 \
                 ORDER BY inbox_id LIMIT ?3"
            );
            Ok(query_all(
                tx,
                &sql,
                params![user, device, sql_limit(limit)],
                inbox_row,
            )?)
        })
        .await
    }

    async fn delete_inbox(&self, user_id: &str, device_id: &str, ids: &[MessageId]) -> Result<u64> {
        let (user, device, ids) = (user_id.to_owned(), device_id.to_owned(), ids.to_vec());
        self.write("device_inbox", move |tx| {
            let mut removed = 0;
            for id in ids {
                removed += exec(
                    tx,
                    "DELETE FROM device_inbox WHERE user_id = ?1 AND device_id = ?2 AND inbox_id = ?3",
                    params![user, device, id.to_string()],
                )? as u64;
            }
            Ok(removed)
        })
        .await
    }
}

// --------------------------------------------------------------- media

const MEDIA_COLS: &str = "media_id, owner_user_id, size, chunk_size, chunk_count, sha256, \
                          created_at_ms, expires_at_ms, complete";

fn media_row(r: &Row<'_>) -> rusqlite::Result<MediaObjectRow> {
    Ok(MediaObjectRow {
        media_id: r.get(0)?,
        owner_user_id: r.get(1)?,
        size: r.get(2)?,
        chunk_size: r.get(3)?,
        chunk_count: r.get(4)?,
        sha256: r.get(5)?,
        created_at_ms: r.get(6)?,
        expires_at_ms: r.get(7)?,
        complete: r.get(8)?,
    })
}

const CHUNK_COLS: &str = "media_id, idx, sha256, data";

fn chunk_row(r: &Row<'_>) -> rusqlite::Result<MediaChunkRow> {
    Ok(MediaChunkRow {
        media_id: r.get(0)?,
        idx: r.get(1)?,
        sha256: r.get(2)?,
        data: r.get(3)?,
    })
}

/// Chunks are stored in order without gaps, so the number stored is the
/// highest index plus one: a lookup at the end of the key, not a count.
fn stored_chunks(conn: &Connection, media_id: &str) -> rusqlite::Result<u32> {
    let sql = "SELECT MAX(idx) FROM media_chunks WHERE media_id = ?1";
    let last: Option<u32> = conn
        .prepare_cached(sql)?
        .query_row(params![media_id], |r| r.get(0))?;
    Ok(last.map_or(0, |l| l.saturating_add(1)))
}

fn select_media(conn: &Connection, media_id: &str) -> rusqlite::Result<Option<StoredMedia>> {
    let sql = format!("SELECT {MEDIA_COLS} FROM media_objects WHERE media_id = ?1");
    let Some(object) = query_opt(conn, &sql, params![media_id], media_row)? else {
        return Ok(None);
    };
    let stored_chunks = stored_chunks(conn, media_id)?;
    Ok(Some(StoredMedia {
        object,
        stored_chunks,
    }))
}

fn media_exists(conn: &Connection, media_id: &str) -> rusqlite::Result<bool> {
    let sql = "SELECT 1 FROM media_objects WHERE media_id = ?1";
    Ok(query_opt(conn, sql, params![media_id], |_| Ok(()))?.is_some())
}

fn insert_post(conn: &Connection, media_id: &str, conversation: &str) -> rusqlite::Result<()> {
    exec(
        conn,
        "INSERT OR IGNORE INTO media_posts (media_id, conversation_id) VALUES (?1, ?2)",
        params![media_id, conversation],
    )?;
    Ok(())
}

/// Deletes an object with its chunks and posts; true if it existed.
fn delete_media(conn: &Connection, media_id: &str) -> rusqlite::Result<bool> {
    exec(
        conn,
        "DELETE FROM media_chunks WHERE media_id = ?1",
        params![media_id],
    )?;
    exec(
        conn,
        "DELETE FROM media_posts WHERE media_id = ?1",
        params![media_id],
    )?;
    let deleted = exec(
        conn,
        "DELETE FROM media_objects WHERE media_id = ?1",
        params![media_id],
    )?;
    Ok(deleted > 0)
}

#[async_trait]
impl MediaRepo for EmbeddedStore {
    async fn create_object(
        &self,
        row: &MediaObjectRow,
        conversation: ConversationId,
    ) -> Result<CreateMedia> {
        let row = row.clone();
        self.write("media_objects", move |tx| {
            let conversation = conversation.to_string();
            if let Some(stored) = select_media(tx, &row.media_id)? {
                if !stored.object.same_upload(&row) {
                    return Ok(CreateMedia::Conflict);
                }
                insert_post(tx, &row.media_id, &conversation)?;
                return Ok(CreateMedia::Existing(stored));
            }
            let sql = format!(
                "INSERT INTO media_objects ({MEDIA_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            );
            exec(
                tx,
                &sql,
                params![
                    row.media_id,
                    row.owner_user_id,
                    row.size,
                    row.chunk_size,
                    row.chunk_count,
                    row.sha256,
                    row.created_at_ms,
                    row.expires_at_ms,
                    row.complete
                ],
            )?;
            insert_post(tx, &row.media_id, &conversation)?;
            Ok(CreateMedia::Created(StoredMedia {
                object: row,
                stored_chunks: 0,
            }))
        })
        .await
    }

    async fn get_object(&self, media_id: &str) -> Result<Option<StoredMedia>> {
        let media_id = media_id.to_owned();
        self.read("media_objects", move |tx| Ok(select_media(tx, &media_id)?))
            .await
    }

    async fn put_chunk(&self, chunk: MediaChunkRow) -> Result<PutChunk> {
        self.write("media_chunks", move |tx| {
            let sql = "SELECT chunk_count FROM media_objects WHERE media_id = ?1";
            let Some(chunk_count) =
                query_opt(tx, sql, params![chunk.media_id], |r| r.get::<_, u32>(0))?
            else {
                return Ok(PutChunk::UnknownObject);
            };
            let stored = stored_chunks(tx, &chunk.media_id)?;
            if chunk.idx < stored {
                let sql = "SELECT sha256 FROM media_chunks WHERE media_id = ?1 AND idx = ?2";
                let hash: Option<Vec<u8>> =
                    query_opt(tx, sql, params![chunk.media_id, chunk.idx], |r| r.get(0))?;
                return Ok(match hash {
                    Some(hash) if hash == chunk.sha256 => PutChunk::Unchanged { stored },
                    Some(_) => PutChunk::Conflict { stored },
                    None => {
                        return Err(Error::Corrupt {
                            table: "media_chunks",
                            detail: format!(
                                "chunk {} of {} is missing below {stored} stored",
                                chunk.idx, chunk.media_id
                            ),
                        }
                        .into());
                    }
                });
            }
            if chunk.idx != stored || chunk.idx >= chunk_count {
                return Ok(PutChunk::OutOfOrder { stored });
            }
            let sql = format!("INSERT INTO media_chunks ({CHUNK_COLS}) VALUES (?1, ?2, ?3, ?4)");
            exec(
                tx,
                &sql,
                params![chunk.media_id, chunk.idx, chunk.sha256, chunk.data],
            )?;
            Ok(PutChunk::Stored { stored: stored + 1 })
        })
        .await
    }

    async fn get_chunk(&self, media_id: &str, idx: u32) -> Result<Option<MediaChunkRow>> {
        let media_id = media_id.to_owned();
        self.read("media_chunks", move |tx| {
            let sql =
                format!("SELECT {CHUNK_COLS} FROM media_chunks WHERE media_id = ?1 AND idx = ?2");
            Ok(query_opt(tx, &sql, params![media_id, idx], chunk_row)?)
        })
        .await
    }

    async fn mark_complete(&self, media_id: &str) -> Result<bool> {
        let media_id = media_id.to_owned();
        self.write("media_objects", move |tx| {
            let Some(stored) = select_media(tx, &media_id)? else {
                return Ok(false);
            };
            if stored.stored_chunks < stored.object.chunk_count {
                return Ok(false);
            }
            exec(
                tx,
                "UPDATE media_objects SET complete = 1 WHERE media_id = ?1",
                params![media_id],
            )?;
            Ok(true)
        })
        .await
    }

    async fn add_post(&self, media_id: &str, conversation: ConversationId) -> Result<bool> {
        let media_id = media_id.to_owned();
        self.write("media_posts", move |tx| {
            if !media_exists(tx, &media_id)? {
                return Ok(false);
            }
            insert_post(tx, &media_id, &conversation.to_string())?;
            Ok(true)
        })
        .await
    }

    async fn posts(&self, media_id: &str) -> Result<Vec<ConversationId>> {
        let media_id = media_id.to_owned();
        self.read("media_posts", move |tx| {
            let sql = "SELECT conversation_id FROM media_posts WHERE media_id = ?1 \
                       ORDER BY conversation_id";
            Ok(query_all(tx, sql, params![media_id], |r| {
                id_col(r, 0, ConversationId::parse)
            })?)
        })
        .await
    }

    async fn usage_since(&self, owner_user_id: &str, since_ms: i64) -> Result<Vec<MediaUsage>> {
        let owner = owner_user_id.to_owned();
        self.read("media_objects", move |tx| {
            let sql = "SELECT media_id, created_at_ms, size FROM media_objects \
                       WHERE owner_user_id = ?1 AND created_at_ms >= ?2 \
                       ORDER BY created_at_ms, media_id";
            Ok(query_all(tx, sql, params![owner, since_ms], |r| {
                Ok(MediaUsage {
                    media_id: r.get(0)?,
                    created_at_ms: r.get(1)?,
                    size: r.get(2)?,
                })
            })?)
        })
        .await
    }

    async fn delete_expired(&self, now_ms: i64, limit: usize) -> Result<u64> {
        self.write("media_objects", move |tx| {
            let sql = "SELECT media_id FROM media_objects WHERE expires_at_ms <= ?1 \
                       ORDER BY expires_at_ms, media_id LIMIT ?2";
            let expired: Vec<String> =
                query_all(tx, sql, params![now_ms, sql_limit(limit)], |r| r.get(0))?;
            let mut deleted = 0;
            for media_id in expired {
                if delete_media(tx, &media_id)? {
                    deleted += 1;
                }
            }
            Ok(deleted)
        })
        .await
    }

    async fn delete_object(&self, media_id: &str) -> Result<bool> {
        let media_id = media_id.to_owned();
        self.write("media_objects", move |tx| Ok(delete_media(tx, &media_id)?))
            .await
    }
}

// ------------------------------------------------------------ presence

#[async_trait]
impl PresenceSettingsRepo for EmbeddedStore {
    async fn set_hide_last_seen(&self, user_id: &str, hide: bool) -> Result<()> {
        let user = user_id.to_owned();
        let now = chappe_proto::ids::unix_ms();
        self.write("presence_settings", move |tx| {
            exec(
                tx,
                "INSERT INTO presence_settings (user_id, hide_last_seen, updated_at_ms) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (user_id) DO UPDATE SET \
                 hide_last_seen = excluded.hide_last_seen, updated_at_ms = excluded.updated_at_ms",
                params![user, hide, now],
            )?;
            Ok(())
        })
        .await
    }

    async fn hide_last_seen_many(&self, user_ids: &[&str]) -> Result<Vec<bool>> {
        let users: Vec<String> = user_ids.iter().map(|u| (*u).to_owned()).collect();
        self.read("presence_settings", move |tx| {
            let sql = "SELECT hide_last_seen FROM presence_settings WHERE user_id = ?1";
            let mut hidden = Vec::with_capacity(users.len());
            for user in &users {
                let hide: Option<bool> = query_opt(tx, sql, params![user], |r| r.get(0))?;
                hidden.push(hide.unwrap_or(false));
            }
            Ok(hidden)
        })
        .await
    }
}
