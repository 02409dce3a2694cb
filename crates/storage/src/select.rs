//! Which store a process uses, chosen by configuration: the embedded store
//! (a SQLite file) or a CQL cluster (ScyllaDB, or Cassandra).
//!
//! `--store` (`CHAPPE_STORE`) takes either:
//! - `embedded:PATH`, or a bare `PATH`: the SQLite file (created if absent);
//! - `scylla://host1:9042,host2/KEYSPACE?dc=fr-par&rf=fr-par:3,fr-mrs:3`
//!   (also `cql://`): a CQL cluster; see [`CqlConfig::from_url`] for every
//!   parameter. Its keyspace must have been migrated (`chappe migrate
//!   --store URL`, or a migration Job); a service refuses to start on a
//!   schema older or newer than its own.

use std::path::PathBuf;
use std::sync::Arc;

use crate::cql::{self, CqlConfig, CqlStore};
use crate::embedded::EmbeddedStore;
use crate::{Error, Result, Store};

/// Where a process keeps its data.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    /// The embedded SQLite store in this file.
    Embedded(PathBuf),
    /// A CQL cluster.
    Cql(Box<CqlConfig>),
}

/// A `--store` value that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid store {value:?}: {reason}")]
pub struct StoreLocationError {
    value: String,
    reason: String,
}

impl std::str::FromStr for StoreLocation {
    type Err = StoreLocationError;

    fn from_str(value: &str) -> std::result::Result<Self, Self::Err> {
        let invalid = |reason: String| StoreLocationError {
            value: value.to_owned(),
            reason,
        };
        if value.starts_with("scylla://") || value.starts_with("cql://") {
            let config = CqlConfig::from_url(value).map_err(|e| invalid(e.to_string()))?;
            return Ok(Self::Cql(Box::new(config)));
        }
        let path = value.strip_prefix("embedded:").unwrap_or(value);
        if path.is_empty() {
            return Err(invalid("no file named".into()));
        }
        Ok(Self::Embedded(PathBuf::from(path)))
    }
}

impl std::fmt::Display for StoreLocation {
    /// The location without credentials, for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded(path) => write!(f, "embedded:{}", path.display()),
            Self::Cql(config) => write!(
                f,
                "cql://{}/{}",
                config.contact_points.join(","),
                config.keyspace
            ),
        }
    }
}

/// An open store of either kind. Clones share it.
#[derive(Clone)]
pub enum AnyStore {
    Embedded(EmbeddedStore),
    Cql(CqlStore),
}

impl AnyStore {
    /// Opens the store at `location`: creates the embedded store's file and
    /// tables if needed; connects to a CQL cluster whose keyspace is
    /// migrated to this version (else an error saying to migrate).
    pub async fn open(location: &StoreLocation) -> Result<Self> {
        match location {
            StoreLocation::Embedded(path) => Ok(Self::Embedded(EmbeddedStore::open(path)?)),
            StoreLocation::Cql(config) => Ok(Self::Cql(CqlStore::connect(config).await?)),
        }
    }

    /// Brings the store's schema to this version (idempotent; safe when
    /// several migrators run at once), then opens it. Returns the store
    /// and its schema version (embedded stores create their tables on
    /// open: their version is `None`).
    pub async fn migrate_and_open(location: &StoreLocation) -> Result<(Self, Option<u32>)> {
        match location {
            StoreLocation::Embedded(path) => Ok((Self::Embedded(EmbeddedStore::open(path)?), None)),
            StoreLocation::Cql(config) => {
                let session = Arc::new(cql::open_session(config).await?);
                let version = cql::migrate(&session, config).await?;
                let store = CqlStore::with_session(session, config).await?;
                Ok((Self::Cql(store), Some(version)))
            }
        }
    }

    /// The store as the trait object a caller needs: `pick(store)` is
    /// called with the concrete store, which coerces to any repository
    /// trait object (`|s| Arc::new(s) as Arc<dyn KeyRepo>`).
    pub fn map<R>(
        self,
        embedded: impl FnOnce(EmbeddedStore) -> R,
        cql: impl FnOnce(CqlStore) -> R,
    ) -> R {
        match self {
            Self::Embedded(s) => embedded(s),
            Self::Cql(s) => cql(s),
        }
    }

    /// Every repository, as one trait object.
    pub fn shared(&self) -> Arc<dyn Store> {
        self.clone()
            .map(|s| Arc::new(s) as Arc<dyn Store>, |s| Arc::new(s) as _)
    }

    /// The embedded store, if this is one.
    pub fn embedded(&self) -> Option<&EmbeddedStore> {
        match self {
            Self::Embedded(s) => Some(s),
            Self::Cql(_) => None,
        }
    }
}

/// Why [`open`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Location(#[from] StoreLocationError),
    #[error("opening the store {location}: {source}")]
    Store { location: String, source: Error },
}

/// Parses a `--store` value and opens that store (see [`AnyStore::open`]):
/// what a service's `main` does.
pub async fn open(value: &str) -> std::result::Result<AnyStore, OpenError> {
    let location: StoreLocation = value.parse()?;
    AnyStore::open(&location)
        .await
        .map_err(|source| OpenError::Store {
            location: location.to_string(),
            source,
        })
}

impl From<EmbeddedStore> for AnyStore {
    fn from(store: EmbeddedStore) -> Self {
        Self::Embedded(store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations_parse() {
        let embedded: StoreLocation = "chappe-data/chappe.db".parse().unwrap();
        assert!(
            matches!(embedded, StoreLocation::Embedded(ref p) if p == &PathBuf::from("chappe-data/chappe.db"))
        );
        let embedded: StoreLocation = "embedded:/var/lib/chappe.db".parse().unwrap();
        assert_eq!(embedded.to_string(), "embedded:/var/lib/chappe.db");
        let cql: StoreLocation = "scylla://10.0.0.1:9042,10.0.0.2/chappe?dc=fr-par"
            .parse()
            .unwrap();
        let StoreLocation::Cql(config) = &cql else {
            panic!("expected a CQL store");
        };
        assert_eq!(config.keyspace, "chappe");
        assert_eq!(config.local_datacenter.as_deref(), Some("fr-par"));
        assert!(cql.to_string().starts_with("cql://"));
        assert!("embedded:".parse::<StoreLocation>().is_err());
        let bad = "scylla://h/Not A Keyspace".parse::<StoreLocation>();
        assert!(bad.is_err(), "{bad:?}");
    }
}
