//! The distributed store: every repository on ScyllaDB (or Apache
//! Cassandra, which speaks the same CQL protocol), through the `scylla`
//! driver (DESIGN.md §4).
//!
//! - [`CqlConfig`] says where the cluster is (a `scylla://` URL parses
//!   into one); [`open_session`] connects with token-aware, datacenter-aware
//!   load balancing that prefers the local datacenter, `LOCAL_QUORUM` by
//!   default, a client-side timeout and a bounded retry policy
//!   ([`retry::BoundedRetryPolicy`]) that retries only what is idempotent
//!   (or what the server proves it did not do);
//! - [`migrate`] applies the versioned CQL files of `migrations/` under a
//!   lock, idempotently; [`CqlStore::connect`] checks the schema version and
//!   prepares every statement once;
//! - `keys.rs`, `conversations.rs`, `messages.rs`, `inbox.rs`, `media.rs` and
//!   `presence.rs` implement the repositories, with the same observable
//!   behaviour as the embedded store (the conformance suite is the judge).
//!
//! # Atomicity without transactions
//!
//! SQLite runs each call as one transaction; CQL is atomic only within one
//! partition, and serializable only through lightweight transactions
//! (LWT, Paxos). Each multi-partition call therefore writes in an order
//! that keeps every read correct if it stops half-way, and a retry of the
//! call (same arguments) finishes the work instead of doing it twice:
//!
//! - **message insert** — (1) LWT `INSERT ... IF NOT EXISTS` into
//!   `message_dedup`, claiming the client's id for a message id and time;
//!   (2) the bucket's row in `message_buckets`; (3) the message row; (4)
//!   the head. A message is readable only from (3) on, so a call that stops
//!   earlier leaves nothing visible; its retry finds the dedup row, writes
//!   the message under the id claimed first and answers `Duplicate` with
//!   it: the message is stored once, under one id. The head is a
//!   max-register (its write timestamp is the id's time), so writes in any
//!   order, repeated or late, leave the greatest id.
//! - **conversation creation** — (1) LWT on the `conversations` row (the id
//!   is taken: a second creation is a conflict); (2) the membership log; (3)
//!   members; (4) each member's `user_conversations` row. A creation that
//!   stops half-way was not acknowledged and its conversation stays out of
//!   most members' lists; the caller creates another.
//! - **membership append** — (1) LWT compare-and-set of `membership_seq`,
//!   which also stores the event in the row (`last_*`); (2) the log row; (3)
//!   the member rows. Member rows are written with the event's seq as their
//!   write timestamp, so the newest event about a user wins whatever the
//!   order of application; the next append re-applies the last event before
//!   its own, finishing one whose writer stopped after (1).
//! - **to-device batch** — (1) the inbox rows; (2) LWT on `to_device_dedup`.
//!   A batch refused as a duplicate deletes the rows it wrote. A call that
//!   stops between (1) and (2) may leave a copy that its retry duplicates:
//!   to-device messages are delivered at least once (never lost).
//! - **one-time key claim** — an LWT marks one unclaimed key as claimed by
//!   a random attempt id, then the row is deleted. The mark makes the
//!   outcome of a timed-out LWT knowable (a `SERIAL` read shows whose it
//!   is), so a key goes to exactly one caller even under timeouts; a claim
//!   lost to another claimer retries with another key.
//! - **media** — the object row is taken by LWT before its lookup rows
//!   (`media_by_owner`, `media_by_expiry`); chunks are LWT inserts so that
//!   each index is stored once; deletion removes the object row first (by
//!   LWT, so concurrent sweepers count it once), then chunks, posts and
//!   lookups. Every media row carries a TTL (retention plus grace) as a net.
//!
//! Every LWT whose outcome is unknown (a timeout, a broken connection) is
//! resolved by a `SERIAL` read of what it wrote, never by guessing; when
//! that read fails too, the call fails with [`Error::Unavailable`] and its
//! retry converges as above.
//!
//! Driver errors map onto [`Error`]: timeouts, unavailable replicas,
//! overload, broken connections and server-side refusals are
//! `Unavailable`; rows that do not decode are `Corrupt`.

mod config;
mod conversations;
mod inbox;
mod keys;
mod media;
mod messages;
mod migrate;
mod presence;
pub mod retry;
mod statements;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::response::PagingState;
use scylla::response::query_result::QueryResult;
use scylla::serialize::batch::BatchValues;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

pub use config::{ConfigError, CqlConfig, validate_keyspace};
pub use migrate::{MIGRATIONS, Migration, migrate, schema_version};

use crate::{Error, Result};
use statements::Statements;

/// Every repository on a CQL cluster. Cheap to clone: clones share the
/// session and its prepared statements.
#[derive(Clone)]
pub struct CqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Arc<Session>,
    config: CqlConfig,
    st: Statements,
    /// Conversations known to exist (conversations are never deleted, so
    /// a yes never goes stale): spares a read per message.
    known_conversations: Mutex<HashSet<chappe_proto::ids::ConversationId>>,
    /// `(conversation, bucket)` pairs whose `message_buckets` row is known
    /// to be written: spares a write per message.
    known_buckets: Mutex<HashSet<(chappe_proto::ids::ConversationId, i64)>>,
    /// Requests sent, per table and kind.
    round_trips: Mutex<BTreeMap<(&'static str, RequestKind), u64>>,
}

/// What a request to the database does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RequestKind {
    /// A read (one page of rows).
    Read,
    /// A write or an unconditional batch.
    Write,
    /// A lightweight transaction (Paxos: about four round trips between
    /// replicas, one between the store and its coordinator).
    Lwt,
}

/// Requests a [`CqlStore`] sent to its coordinators, per table and kind:
/// what the benchmark reads to count round trips per sent message and per
/// sync. The driver's own retries of a request are not counted (its
/// session metrics count those).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundTrips(BTreeMap<(&'static str, RequestKind), u64>);

impl RoundTrips {
    /// Every request.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The requests of one kind.
    pub fn of(&self, kind: RequestKind) -> u64 {
        self.0
            .iter()
            .filter(|((_, k), _)| *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// The requests to one table, of one kind.
    pub fn table(&self, table: &str, kind: RequestKind) -> u64 {
        self.0
            .iter()
            .filter(|((t, k), _)| *t == table && *k == kind)
            .map(|(_, n)| n)
            .sum()
    }

    /// The requests sent since `earlier` (a snapshot of the same store).
    pub fn since(&self, earlier: &RoundTrips) -> RoundTrips {
        let mut out = BTreeMap::new();
        for (key, n) in &self.0 {
            let n = n.saturating_sub(earlier.0.get(key).copied().unwrap_or(0));
            if n > 0 {
                out.insert(*key, n);
            }
        }
        RoundTrips(out)
    }

    /// `(table, kind, requests)`, by table.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, RequestKind, u64)> + '_ {
        self.0.iter().map(|((t, k), n)| (*t, *k, *n))
    }
}

/// Entries kept in each of the caches above before they are emptied.
const CACHE_ENTRIES: usize = 100_000;

impl std::fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlStore")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Connects a driver session as the store uses it: the contact points of
/// `config`, token-aware load balancing preferring `local_datacenter` (and
/// never leaving it, so that `LOCAL_*` consistencies mean that
/// datacenter), its consistencies, timeouts and bounded retries, and
/// client-side monotonic write timestamps.
pub async fn open_session(config: &CqlConfig) -> Result<Session> {
    config
        .validate()
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.local_datacenter {
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .serial_consistency(Some(config.serial_consistency))
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(policy.build())
        .retry_policy(Arc::new(retry::BoundedRetryPolicy::new(config.max_retries)))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(config.connect_timeout)
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()));
    if let Some(dc) = &config.local_datacenter {
        builder = builder.prefer_datacenter(dc.clone());
    }
    if let Some((user, password)) = &config.credentials {
        builder = builder.user(user, password);
    }
    builder.build().await.map_err(|e| {
        Error::Unavailable(format!(
            "cannot connect to the CQL cluster at {}: {e}",
            config.contact_points.join(",")
        ))
    })
}

impl CqlStore {
    /// Connects to the cluster and prepares every statement. The schema
    /// must be migrated already ([`migrate`]): a keyspace at an older
    /// version is refused with [`Error::Unavailable`] (run the migration),
    /// one at a newer version with [`Error::Corrupt`] (run a newer build).
    pub async fn connect(config: &CqlConfig) -> Result<Self> {
        let session = open_session(config).await?;
        Self::with_session(Arc::new(session), config).await
    }

    /// Like [`connect`](Self::connect), on a session opened already (by
    /// [`open_session`], which sets the profile the store relies on).
    pub async fn with_session(session: Arc<Session>, config: &CqlConfig) -> Result<Self> {
        config
            .validate()
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let version = schema_version(&session, config).await?;
        let known = MIGRATIONS.len() as u32;
        if version < known {
            return Err(Error::Unavailable(format!(
                "keyspace {} is at schema version {version}, this build needs {known}: \
                 run `chappe migrate` first",
                config.keyspace
            )));
        }
        if version > known {
            return Err(Error::Corrupt {
                table: "schema_migrations",
                detail: format!(
                    "keyspace {} is at schema version {version}, newer than the {known} this \
                     build knows: it was migrated by a newer Chappe; run that version or newer",
                    config.keyspace
                ),
            });
        }
        let st = Statements::prepare(&session, config).await?;
        tracing::debug!(keyspace = %config.keyspace, version, "CQL store connected");
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                config: config.clone(),
                st,
                known_conversations: Mutex::new(HashSet::new()),
                known_buckets: Mutex::new(HashSet::new()),
                round_trips: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    /// The driver session (shared by clones of this store).
    pub fn session(&self) -> &Arc<Session> {
        &self.inner.session
    }

    /// The configuration this store was connected with.
    pub fn config(&self) -> &CqlConfig {
        &self.inner.config
    }

    /// The requests sent so far (a snapshot; see [`RoundTrips::since`]).
    pub fn round_trips(&self) -> RoundTrips {
        RoundTrips(lock(&self.inner.round_trips).clone())
    }
}

// ------------------------------------------------------------ execution

/// A row type the store reads: owned, decodable from any frame.
pub(crate) trait OwnedRow: for<'f, 'm> DeserializeRow<'f, 'm> {}
impl<T> OwnedRow for T where T: for<'f, 'm> DeserializeRow<'f, 'm> {}

/// What a lightweight transaction did.
#[derive(Debug)]
pub(crate) enum Lwt {
    Applied,
    /// Its condition was false; nothing was written.
    NotApplied,
    /// It may or may not have been applied (a timeout, a broken
    /// connection): the caller reads back with `SERIAL` to know. The error
    /// is what to report if that read fails too.
    Unknown(Error),
}

impl Inner {
    /// Counts one request.
    fn count(&self, table: &'static str, kind: RequestKind) {
        *lock(&self.round_trips).entry((table, kind)).or_default() += 1;
    }

    /// Runs a statement, unpaged (writes, and reads of one row).
    async fn exec(
        &self,
        table: &'static str,
        kind: RequestKind,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryResult> {
        self.count(table, kind);
        self.session
            .execute_unpaged(st, values)
            .await
            .map_err(|e| exec_error(table, &e))
    }

    /// Runs a write.
    async fn write(
        &self,
        table: &'static str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<()> {
        self.exec(table, RequestKind::Write, st, values)
            .await
            .map(drop)
    }

    /// Runs a batch of writes.
    async fn batch(
        &self,
        table: &'static str,
        batch: &Batch,
        values: impl BatchValues,
    ) -> Result<()> {
        self.count(table, RequestKind::Write);
        self.session
            .batch(batch, values)
            .await
            .map(drop)
            .map_err(|e| exec_error(table, &e))
    }

    /// Runs a read of at most one row.
    async fn first<R: OwnedRow>(
        &self,
        table: &'static str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Option<R>> {
        let result = self.exec(table, RequestKind::Read, st, values).await?;
        let rows = result.into_rows_result().map_err(|e| corrupt(table, e))?;
        rows.maybe_first_row::<R>().map_err(|e| corrupt(table, e))
    }

    /// Runs a read and collects every row, a page at a time.
    async fn all<R: OwnedRow>(
        &self,
        table: &'static str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>> {
        self.up_to(table, st, values, usize::MAX).await
    }

    /// Runs a read and collects up to `max` rows, a page at a time (each
    /// page continues from the last one's [`PagingState`]).
    async fn up_to<R: OwnedRow>(
        &self,
        table: &'static str,
        st: &PreparedStatement,
        values: impl SerializeRow,
        max: usize,
    ) -> Result<Vec<R>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let mut paging = PagingState::start();
        loop {
            self.count(table, RequestKind::Read);
            let (result, next) = self
                .session
                .execute_single_page(st, &values, paging)
                .await
                .map_err(|e| exec_error(table, &e))?;
            let rows = result.into_rows_result().map_err(|e| corrupt(table, e))?;
            for row in rows.rows::<R>().map_err(|e| corrupt(table, e))? {
                out.push(row.map_err(|e| corrupt(table, e))?);
                if out.len() >= max {
                    return Ok(out);
                }
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => return Ok(out),
                std::ops::ControlFlow::Continue(state) => paging = state,
            }
        }
    }

    /// Runs a lightweight transaction.
    async fn lwt(
        &self,
        table: &'static str,
        st: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Lwt> {
        self.count(table, RequestKind::Lwt);
        lwt_outcome(table, self.session.execute_unpaged(st, values).await)
    }

    /// Runs a conditional batch (one partition).
    async fn lwt_batch(
        &self,
        table: &'static str,
        batch: &Batch,
        values: impl BatchValues,
    ) -> Result<Lwt> {
        self.count(table, RequestKind::Lwt);
        lwt_outcome(table, self.session.batch(batch, values).await)
    }

    /// An unlogged batch of `n` runs of `st` (one partition: atomic and
    /// isolated), idempotent when `st` is.
    fn batch_of(&self, st: &PreparedStatement, n: usize) -> Batch {
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in 0..n {
            batch.append_statement(st.clone());
        }
        batch.set_is_idempotent(st.get_is_idempotent());
        batch
    }

    /// A fresh id for one attempt of an LWT, to recognize it when read back.
    fn attempt_id() -> i64 {
        rand::random::<i64>()
    }

    fn conversation_known(&self, id: chappe_proto::ids::ConversationId) -> bool {
        lock(&self.known_conversations).contains(&id)
    }

    fn remember_conversation(&self, id: chappe_proto::ids::ConversationId) {
        remember(&self.known_conversations, id);
    }

    fn bucket_known(&self, id: chappe_proto::ids::ConversationId, bucket: i64) -> bool {
        lock(&self.known_buckets).contains(&(id, bucket))
    }

    fn remember_bucket(&self, id: chappe_proto::ids::ConversationId, bucket: i64) {
        remember(&self.known_buckets, (id, bucket));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds to a bounded cache (emptied when full: entries are only hints).
fn remember<T: std::hash::Hash + Eq>(cache: &Mutex<HashSet<T>>, value: T) {
    let mut cache = lock(cache);
    if cache.len() >= CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(value);
}

/// Reads `[applied]` from an LWT's answer, or classifies its failure.
fn lwt_outcome(
    table: &'static str,
    result: std::result::Result<QueryResult, ExecutionError>,
) -> Result<Lwt> {
    let result = match result {
        Ok(result) => result,
        Err(e) if may_have_applied(&e) => return Ok(Lwt::Unknown(exec_error(table, &e))),
        Err(e) => return Err(exec_error(table, &e)),
    };
    let rows = result.into_rows_result().map_err(|e| corrupt(table, e))?;
    let first: Option<Row> = rows.maybe_first_row().map_err(|e| corrupt(table, e))?;
    match first.as_ref().and_then(|r| r.columns.first()) {
        Some(Some(CqlValue::Boolean(true))) => Ok(Lwt::Applied),
        Some(Some(CqlValue::Boolean(false))) => Ok(Lwt::NotApplied),
        other => Err(corrupt(
            table,
            format!("a lightweight transaction answered {other:?} for [applied]"),
        )),
    }
}

/// Whether a failed request may still have been applied: anything but
/// errors that prove the request was refused before it ran.
fn may_have_applied(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => !matches!(
                db,
                DbError::Unavailable { .. }
                    | DbError::Overloaded
                    | DbError::IsBootstrapping
                    | DbError::SyntaxError
                    | DbError::Invalid
                    | DbError::Unauthorized
                    | DbError::AuthenticationError
                    | DbError::ConfigError
                    | DbError::AlreadyExists { .. }
                    | DbError::Unprepared { .. }
                    | DbError::ProtocolError
                    | DbError::RateLimitReached {
                        rejected_by_coordinator: true,
                        ..
                    }
            ),
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_)
            | RequestAttemptError::UnableToAllocStreamId => false,
            _ => true,
        },
        ExecutionError::BadQuery(_)
        | ExecutionError::EmptyPlan
        | ExecutionError::PrepareError(_)
        | ExecutionError::ConnectionPoolError(_)
        | ExecutionError::UseKeyspaceError(_) => false,
        _ => true,
    }
}

/// Maps a driver error met while working on `table`. Everything the
/// cluster or the network does is `Unavailable` (the caller may retry);
/// a statement the server refuses as invalid means the schema is not the
/// one this build expects, also `Unavailable`, with a hint.
fn exec_error(table: &'static str, e: &ExecutionError) -> Error {
    if let ExecutionError::LastAttemptError(RequestAttemptError::DbError(
        DbError::Invalid | DbError::SyntaxError,
        _,
    )) = e
    {
        return Error::Unavailable(format!(
            "{table}: the server refused a statement ({e}); is the keyspace migrated to this \
             build's schema? (`chappe migrate`)"
        ));
    }
    Error::Unavailable(format!("{table}: {e}"))
}

/// A row that cannot be decoded.
fn corrupt(table: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        table,
        detail: e.to_string(),
    }
}

/// A `u64` for a `bigint` column ([`Error::Conflict`] if it does not fit,
/// as the embedded store answers for values SQLite cannot hold).
fn to_i64(table: &'static str, what: &str, value: u64) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| Error::Conflict(format!("{table}: {what} {value} is beyond a bigint")))
}

/// A `u32` for an `int` column.
fn to_i32(table: &'static str, what: &str, value: u32) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::Conflict(format!("{table}: {what} {value} is beyond an int")))
}

/// A stored `bigint` that must be a `u64`.
fn from_i64(table: &'static str, what: &str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(table, format!("{what} is negative: {value}")))
}

/// A stored `int` that must be a `u32`.
fn from_i32(table: &'static str, what: &str, value: i32) -> Result<u32> {
    u32::try_from(value).map_err(|_| corrupt(table, format!("{what} is negative: {value}")))
}

/// A stored id that must parse.
fn parse_id<T>(
    table: &'static str,
    text: &str,
    parse: fn(&str) -> std::result::Result<T, chappe_proto::ids::IdError>,
) -> Result<T> {
    parse(text).map_err(|e| corrupt(table, e))
}

/// A stored column that must be set.
fn required<T>(table: &'static str, what: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| corrupt(table, format!("{what} is null")))
}

/// A short pause with jitter before the next round of a contended LWT.
async fn backoff(round: u32) {
    let cap_ms = 2u64.saturating_pow(round.min(6)).min(50);
    let ms = rand::random_range(0..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Runs `futures` at most [`FAN_OUT`] at a time; their outputs in order.
async fn fan_out<T, F>(futures: Vec<F>) -> Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T>>,
{
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(futures)
        .buffered(FAN_OUT)
        .try_collect()
        .await
}

/// Rows per batch when a call writes many rows of one partition.
const BATCH_ROWS: usize = 64;

/// Concurrent requests of one call that reads or writes many partitions.
const FAN_OUT: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;
    use scylla::errors::WriteType;
    use scylla::statement::Consistency;

    fn db(e: DbError) -> ExecutionError {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "message".into()))
    }

    #[test]
    fn only_refusals_prove_an_lwt_did_not_happen() {
        let timeout = db(DbError::WriteTimeout {
            consistency: Consistency::LocalQuorum,
            received: 0,
            required: 2,
            write_type: WriteType::Cas,
        });
        assert!(may_have_applied(&timeout));
        assert!(may_have_applied(&ExecutionError::RequestTimeout(
            Duration::from_secs(1)
        )));
        let unavailable = db(DbError::Unavailable {
            consistency: Consistency::Serial,
            required: 2,
            alive: 1,
        });
        for refused in [
            unavailable,
            db(DbError::Overloaded),
            db(DbError::Invalid),
            ExecutionError::EmptyPlan,
        ] {
            assert!(!may_have_applied(&refused), "{refused}");
        }
    }

    #[test]
    fn driver_errors_are_unavailable_and_schema_errors_say_so() {
        match exec_error("messages", &db(DbError::Invalid)) {
            Error::Unavailable(why) => assert!(why.contains("chappe migrate"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            exec_error("messages", &db(DbError::Overloaded)),
            Error::Unavailable(_)
        ));
        assert!(matches!(corrupt("messages", "bad"), Error::Corrupt { .. }));
        assert!(matches!(
            to_i64("t", "seq", u64::MAX),
            Err(Error::Conflict(_))
        ));
        assert!(matches!(
            from_i64("t", "seq", -1),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(from_i32("t", "idx", 7).ok(), Some(7));
    }
}
