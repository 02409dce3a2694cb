//! Schema migrations: the versioned CQL files of `crates/storage/migrations`,
//! applied in order, each once.
//!
//! [`migrate`] creates the keyspace (`NetworkTopologyStrategy`, the
//! configured factor per datacenter; an existing keyspace whose
//! replication differs is altered to it, with a warning that a repair must
//! follow), then takes a lock (an LWT `INSERT ... IF NOT EXISTS` on a row
//! with a TTL, the lease, renewed while it works) so that of two migrators
//! started at once one applies and the other waits, then applies the
//! missing versions statement by statement, waiting for schema agreement
//! after each, and records each version by LWT. Every statement is
//! `IF NOT EXISTS`, so a migrator that died half-way is simply run again.
//!
//! Creating the keyspace and the two bookkeeping tables happens before the
//! lock (the lock lives in them). On Apache Cassandra, schema changes sent
//! to two different coordinators at the same moment can still disagree;
//! run one migration Job per cluster (as the operator does) and let the
//! lock cover concurrent retries.

use std::time::{Duration, Instant};

use scylla::client::session::Session;
use scylla::statement::Consistency;
use scylla::statement::SerialConsistency;
use scylla::statement::unprepared::Statement;

use super::{CqlConfig, corrupt};
use crate::{Error, Result};

/// One schema version: its number (1, 2, ...), a name and the CQL text.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    /// Statements separated by `;` at the end of a line, with
    /// `{keyspace}` standing for the keyspace; `--` starts a comment line.
    pub cql: &'static str,
}

/// The schema, one file per version. Append, never edit.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_initial",
    cql: include_str!("../../migrations/0001_initial.cql"),
}];

/// How often a migrator waiting for the lock looks again.
const LOCK_POLL: Duration = Duration::from_millis(250);

impl Migration {
    /// The statements of this version for `keyspace`.
    pub fn statements(&self, keyspace: &str) -> Vec<String> {
        let text: String = self
            .cql
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .map(|line| format!("{line}\n"))
            .collect();
        text.split(";\n")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches(';').replace("{keyspace}", keyspace))
            .collect()
    }

    /// A checksum of the text, recorded with the version so that an
    /// edited file is noticed.
    pub fn checksum(&self) -> String {
        // FNV-1a, 64 bits: stable across builds and platforms.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.cql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

fn ddl_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("migration: {what}: {e}"))
}

/// A statement of the migrator, at the configured consistencies.
fn statement(config: &CqlConfig, text: impl Into<String>) -> Statement {
    let mut st = Statement::new(text);
    st.set_consistency(config.consistency);
    st.set_serial_consistency(Some(config.serial_consistency));
    st.set_request_timeout(Some(config.request_timeout.max(Duration::from_secs(30))));
    st
}

/// A read at the serial consistency, seeing every LWT that completed.
fn serial_read(config: &CqlConfig, text: impl Into<String>) -> Statement {
    let mut st = statement(config, text);
    st.set_consistency(match config.serial_consistency {
        SerialConsistency::Serial => Consistency::Serial,
        SerialConsistency::LocalSerial => Consistency::LocalSerial,
    });
    st
}

async fn ddl(session: &Session, config: &CqlConfig, what: &str, text: &str) -> Result<()> {
    session
        .query_unpaged(statement(config, text), &[])
        .await
        .map_err(|e| ddl_error(what, e))?;
    session
        .await_schema_agreement()
        .await
        .map_err(|e| ddl_error("schema agreement", e))?;
    Ok(())
}

/// Brings the keyspace of `config` to the newest schema this build knows;
/// returns that version. Safe to run again, and from two processes at once.
///
/// Fails with [`Error::Corrupt`] when the keyspace was migrated by a newer
/// build, and [`Error::Unavailable`] when the cluster cannot be reached or
/// refuses a statement.
pub async fn migrate(session: &Session, config: &CqlConfig) -> Result<u32> {
    config
        .validate()
        .map_err(|e| Error::Unavailable(e.to_string()))?;
    let ks = &config.keyspace;
    let replication = config.replication_cql();
    ddl(
        session,
        config,
        "create keyspace",
        &format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication} \
             AND durable_writes = true"
        ),
    )
    .await?;
    reconcile_replication(session, config).await?;
    ddl(
        session,
        config,
        "create schema_migrations",
        &format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (version int PRIMARY KEY, \
             name text, checksum text, applied_at_ms bigint, applied_by text)"
        ),
    )
    .await?;
    ddl(
        session,
        config,
        "create schema_lock",
        &format!(
            "CREATE TABLE IF NOT EXISTS {ks}.schema_lock (name text PRIMARY KEY, \
             owner text, acquired_at_ms bigint)"
        ),
    )
    .await?;

    let lock = Lock::acquire(session, config).await?;
    let outcome = apply_missing(session, config, &lock).await;
    lock.release(session, config).await;
    outcome
}

/// The versions recorded in `schema_migrations`, with their checksums.
async fn applied(session: &Session, config: &CqlConfig) -> Result<Vec<(i32, Option<String>)>> {
    let st = serial_read(
        config,
        format!(
            "SELECT version, checksum FROM {}.schema_migrations",
            config.keyspace
        ),
    );
    let result = session
        .query_unpaged(st, &[])
        .await
        .map_err(|e| ddl_error("read schema_migrations", e))?;
    let rows = result
        .into_rows_result()
        .map_err(|e| corrupt("schema_migrations", e))?;
    rows.rows::<(i32, Option<String>)>()
        .map_err(|e| corrupt("schema_migrations", e))?
        .map(|r| r.map_err(|e| corrupt("schema_migrations", e)))
        .collect()
}

/// The schema version of the keyspace: the highest version recorded, 0
/// for a keyspace (or a bookkeeping table) that does not exist yet.
pub async fn schema_version(session: &Session, config: &CqlConfig) -> Result<u32> {
    let exists = session
        .query_unpaged(
            statement(
                config,
                "SELECT table_name FROM system_schema.tables \
                 WHERE keyspace_name = ? AND table_name = 'schema_migrations'",
            ),
            (config.keyspace.as_str(),),
        )
        .await
        .map_err(|e| ddl_error("read system_schema.tables", e))?
        .into_rows_result()
        .map_err(|e| corrupt("system_schema.tables", e))?
        .rows_num()
        > 0;
    if !exists {
        return Ok(0);
    }
    let versions = applied(session, config).await?;
    let max = versions.iter().map(|(v, _)| *v).max().unwrap_or(0);
    u32::try_from(max).map_err(|_| corrupt("schema_migrations", format!("version {max}")))
}

async fn apply_missing(session: &Session, config: &CqlConfig, lock: &Lock) -> Result<u32> {
    let known = MIGRATIONS.len() as u32;
    let done = applied(session, config).await?;
    if let Some((newest, _)) = done.iter().max_by_key(|(v, _)| *v)
        && *newest > known as i32
    {
        return Err(Error::Corrupt {
            table: "schema_migrations",
            detail: format!(
                "keyspace {} is at schema version {newest}, newer than the {known} this build \
                 knows: it was migrated by a newer Chappe; run that version or newer",
                config.keyspace
            ),
        });
    }
    for migration in MIGRATIONS {
        let version = migration.version as i32;
        if let Some((_, checksum)) = done.iter().find(|(v, _)| *v == version) {
            if checksum.as_deref() != Some(migration.checksum().as_str()) {
                tracing::warn!(
                    version,
                    name = migration.name,
                    "the applied migration's file has changed since; migrations must not be \
                     edited once applied"
                );
            }
            continue;
        }
        for (i, text) in migration.statements(&config.keyspace).iter().enumerate() {
            lock.renew(session, config).await?;
            ddl(
                session,
                config,
                &format!("{} statement {}", migration.name, i + 1),
                text,
            )
            .await?;
        }
        let record = statement(
            config,
            format!(
                "INSERT INTO {}.schema_migrations (version, name, checksum, applied_at_ms, \
                 applied_by) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
                config.keyspace
            ),
        );
        session
            .query_unpaged(
                record,
                (
                    version,
                    migration.name,
                    migration.checksum(),
                    chappe_proto::ids::unix_ms(),
                    lock.owner.as_str(),
                ),
            )
            .await
            .map_err(|e| ddl_error("record version", e))?;
        tracing::info!(
            keyspace = %config.keyspace,
            version,
            name = migration.name,
            "CQL schema migrated"
        );
    }
    Ok(known)
}

/// Alters the keyspace's replication to the configured one if it differs.
async fn reconcile_replication(session: &Session, config: &CqlConfig) -> Result<()> {
    let st = statement(
        config,
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
    );
    let result = session
        .query_unpaged(st, (config.keyspace.as_str(),))
        .await
        .map_err(|e| ddl_error("read keyspace replication", e))?;
    let rows = result
        .into_rows_result()
        .map_err(|e| corrupt("system_schema.keyspaces", e))?;
    let Some((stored,)) = rows
        .maybe_first_row::<(std::collections::BTreeMap<String, String>,)>()
        .map_err(|e| corrupt("system_schema.keyspaces", e))?
    else {
        return Err(ddl_error(
            "read keyspace replication",
            format!("keyspace {} was not created", config.keyspace),
        ));
    };
    let class_ok = stored
        .get("class")
        .is_some_and(|c| c.ends_with("NetworkTopologyStrategy"));
    let factors: std::collections::BTreeMap<String, u32> = stored
        .iter()
        .filter(|(k, _)| k.as_str() != "class")
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.clone(), v)))
        .collect();
    if class_ok && factors == config.replication {
        return Ok(());
    }
    tracing::warn!(
        keyspace = %config.keyspace,
        stored = ?stored,
        wanted = %config.replication_cql(),
        "altering the keyspace's replication: run a full repair (nodetool repair -full) \
         on every node, and rebuild a datacenter that was added"
    );
    ddl(
        session,
        config,
        "alter keyspace replication",
        &format!(
            "ALTER KEYSPACE {} WITH replication = {}",
            config.keyspace,
            config.replication_cql()
        ),
    )
    .await
}

/// The migration lock, held by `owner` while its lease runs.
struct Lock {
    owner: String,
}

impl Lock {
    fn lease_secs(config: &CqlConfig) -> i32 {
        i32::try_from(config.migration_lease.as_secs()).unwrap_or(i32::MAX)
    }

    /// Takes the lock, waiting while another migrator holds it (at most
    /// four leases: one that died holding it loses it after one).
    async fn acquire(session: &Session, config: &CqlConfig) -> Result<Self> {
        let owner = format!(
            "{}-{}-{:016x}",
            hostname(),
            std::process::id(),
            rand::random::<u64>()
        );
        let take = statement(
            config,
            format!(
                "INSERT INTO {}.schema_lock (name, owner, acquired_at_ms) VALUES ('migrate', ?, ?) \
                 IF NOT EXISTS USING TTL ?",
                config.keyspace
            ),
        );
        let deadline = Instant::now() + config.migration_lease * 4;
        let mut waited = false;
        loop {
            let result = session
                .query_unpaged(
                    take.clone(),
                    (
                        owner.as_str(),
                        chappe_proto::ids::unix_ms(),
                        Self::lease_secs(config),
                    ),
                )
                .await;
            // An unknown outcome is settled by reading the owner back.
            let applied = match result {
                Ok(r) => lwt_applied(r)?,
                Err(e) => {
                    tracing::debug!(error = %e, "migration lock: outcome unknown, reading back");
                    false
                }
            };
            if applied || Self::owner(session, config).await?.as_deref() == Some(owner.as_str()) {
                tracing::debug!(owner, "migration lock taken");
                return Ok(Self { owner });
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "migration: another migrator ({}) held the lock for {:?}",
                    Self::owner(session, config)
                        .await?
                        .unwrap_or_else(|| "gone".into()),
                    config.migration_lease * 4
                )));
            }
            if !waited {
                tracing::info!("another migrator holds the lock: waiting");
                waited = true;
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    async fn owner(session: &Session, config: &CqlConfig) -> Result<Option<String>> {
        let st = serial_read(
            config,
            format!(
                "SELECT owner FROM {}.schema_lock WHERE name = 'migrate'",
                config.keyspace
            ),
        );
        let result = session
            .query_unpaged(st, &[])
            .await
            .map_err(|e| ddl_error("read the migration lock", e))?;
        let rows = result
            .into_rows_result()
            .map_err(|e| corrupt("schema_lock", e))?;
        let row: Option<(Option<String>,)> = rows
            .maybe_first_row()
            .map_err(|e| corrupt("schema_lock", e))?;
        Ok(row.and_then(|(o,)| o))
    }

    /// Extends the lease; fails if the lock was lost (the lease ran out
    /// and another migrator took it).
    async fn renew(&self, session: &Session, config: &CqlConfig) -> Result<()> {
        let st = statement(
            config,
            format!(
                "UPDATE {}.schema_lock USING TTL ? SET owner = ?, acquired_at_ms = ? \
                 WHERE name = 'migrate' IF owner = ?",
                config.keyspace
            ),
        );
        let result = session
            .query_unpaged(
                st,
                (
                    Self::lease_secs(config),
                    self.owner.as_str(),
                    chappe_proto::ids::unix_ms(),
                    self.owner.as_str(),
                ),
            )
            .await;
        let held = match result {
            Ok(r) => lwt_applied(r)?,
            Err(_) => Self::owner(session, config).await?.as_deref() == Some(self.owner.as_str()),
        };
        if held {
            Ok(())
        } else {
            Err(Error::Unavailable(
                "migration: the lock was lost (its lease ran out); run the migration again".into(),
            ))
        }
    }

    /// Releases the lock (best effort: the lease ends it anyway).
    async fn release(self, session: &Session, config: &CqlConfig) {
        let st = statement(
            config,
            format!(
                "DELETE FROM {}.schema_lock WHERE name = 'migrate' IF owner = ?",
                config.keyspace
            ),
        );
        if let Err(e) = session.query_unpaged(st, (self.owner.as_str(),)).await {
            tracing::warn!(error = %e, "migration lock not released; its lease will end it");
        }
    }
}

/// `[applied]` of an LWT's answer.
fn lwt_applied(result: scylla::response::query_result::QueryResult) -> Result<bool> {
    let rows = result
        .into_rows_result()
        .map_err(|e| corrupt("schema_lock", e))?;
    let row: Option<scylla::value::Row> = rows
        .maybe_first_row()
        .map_err(|e| corrupt("schema_lock", e))?;
    Ok(matches!(
        row.as_ref().and_then(|r| r.columns.first()),
        Some(Some(scylla::value::CqlValue::Boolean(true)))
    ))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "migrator".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn every_statement_is_idempotent_and_qualified() {
        for m in MIGRATIONS {
            let statements = m.statements("ks_test");
            assert!(!statements.is_empty(), "{}", m.name);
            for s in statements {
                assert!(
                    s.starts_with("CREATE TABLE IF NOT EXISTS ks_test.")
                        || s.starts_with("CREATE INDEX IF NOT EXISTS ")
                        || s.starts_with("ALTER TABLE ks_test."),
                    "{}: {s}",
                    m.name
                );
                assert!(!s.contains("{keyspace}"), "{s}");
                assert!(!s.contains(';'), "one statement each: {s}");
                assert!(!s.contains("--"), "comments are dropped: {s}");
            }
        }
    }

    #[test]
    fn the_schema_has_every_table_of_the_data_model() {
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|m| m.statements("ks")).collect();
        let table = |name: &str, key: &str| {
            let s = all
                .iter()
                .find(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS ks.{name} (")))
                .unwrap_or_else(|| panic!("no table {name}"));
            let compact: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(compact.contains(key), "{name}: {key} not in {compact}");
        };
        table("device_keys", "PRIMARY KEY ((user_id), device_id)");
        table(
            "one_time_keys",
            "PRIMARY KEY ((user_id, device_id), key_id)",
        );
        table("fallback_keys", "PRIMARY KEY ((user_id, device_id))");
        table("conversations", "conversation_id text PRIMARY KEY");
        table("membership_log", "PRIMARY KEY ((conversation_id), seq)");
        table("members", "PRIMARY KEY ((conversation_id), user_id)");
        table(
            "user_conversations",
            "PRIMARY KEY ((user_id), conversation_id)",
        );
        table(
            "messages",
            "PRIMARY KEY ((conversation_id, bucket), message_id)",
        );
        table(
            "message_dedup",
            "PRIMARY KEY ((conversation_id, sender_user_id, sender_device_id, client_msg_id))",
        );
        table(
            "device_inbox",
            "PRIMARY KEY ((user_id, device_id), inbox_id)",
        );
        table(
            "to_device_dedup",
            "PRIMARY KEY ((sender_user_id, sender_device_id, client_msg_id))",
        );
        table("media_objects", "media_id text PRIMARY KEY");
        table("media_chunks", "PRIMARY KEY ((media_id), idx)");
        table("media_posts", "PRIMARY KEY ((media_id), conversation_id)");
        table("presence_settings", "user_id text PRIMARY KEY");
        table("conversation_heads", "conversation_id text PRIMARY KEY");
        table("message_buckets", "PRIMARY KEY ((conversation_id), bucket)");
        table(
            "media_by_owner",
            "PRIMARY KEY ((owner_user_id), created_at_ms, media_id)",
        );
        table(
            "media_by_expiry",
            "PRIMARY KEY ((day), expires_at_ms, media_id)",
        );
    }

    #[test]
    fn checksums_are_stable() {
        let m = Migration {
            version: 1,
            name: "0001_x",
            cql: "CREATE TABLE IF NOT EXISTS {keyspace}.t (a int PRIMARY KEY);\n",
        };
        assert_eq!(m.checksum(), m.checksum());
        assert_ne!(
            m.checksum(),
            Migration {
                cql: "CREATE TABLE IF NOT EXISTS {keyspace}.t (b int PRIMARY KEY);\n",
                ..m
            }
            .checksum()
        );
        assert_eq!(
            m.statements("k"),
            ["CREATE TABLE IF NOT EXISTS k.t (a int PRIMARY KEY)"]
        );
    }
}
