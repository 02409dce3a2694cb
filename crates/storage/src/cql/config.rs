//! [`CqlConfig`]: where the CQL cluster is and how to talk to it, and its
//! URL form.
//!
//! ```text
//! scylla://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/KEYSPACE[?PARAM=VALUE&...]
//! ```
//!
//! - hosts are contact points (the driver discovers the rest of the
//!   cluster from them); the port defaults to 9042; an IPv6 address is
//!   written in brackets (`[::1]:9042`);
//! - `KEYSPACE` is a lowercase CQL identifier (`[a-z][a-z0-9_]{0,47}`);
//! - parameters:
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `dc` | the local datacenter: requests go to its nodes first | none (all nodes are local) |
//! | `rf` | replication per datacenter, `DC:N,DC:N` | `DC:3` for the `dc` given; required without `dc` |
//! | `consistency` | `local_quorum`, `quorum`, `each_quorum`, `all`, `local_one`, `one` | `local_quorum` |
//! | `serial` | consistency of lightweight transactions: `serial` (linearizable across datacenters) or `local_serial` | `serial` |
//! | `timeout` | client-side timeout of one request, retries included (`500ms`, `5s`, `1m`) | `10s` |
//! | `connect_timeout` | timeout of opening one connection | `5s` |
//! | `retries` | retries of one request after a failed attempt (idempotent statements only, or errors that prove nothing was written) | `3` |
//! | `page_size` | rows fetched per page when reading | `1000` |
//!
//! For example
//! `scylla://10.0.0.1,10.0.0.2/chappe?dc=fr-par&rf=fr-par:3,fr-mrs:3&consistency=local_quorum`.
//! A bad URL is refused with a message naming what is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use scylla::statement::{Consistency, SerialConsistency};

/// Where the CQL cluster is and how the store talks to it. Build one with
/// [`CqlConfig::new`] or parse a URL ([`CqlConfig::from_url`], see the
/// module docs); every field has a documented default.
#[derive(Clone, PartialEq, Eq)]
pub struct CqlConfig {
    /// `host:port` of nodes to contact first.
    pub contact_points: Vec<String>,
    /// The keyspace holding Chappe's tables.
    pub keyspace: String,
    /// This process's datacenter: token-aware load balancing prefers its
    /// replicas, and `LOCAL_*` consistencies refer to it. `None` treats
    /// every node as local.
    pub local_datacenter: Option<String>,
    /// Replication factor per datacenter, for `NetworkTopologyStrategy`
    /// (applied by [`super::migrate`]).
    pub replication: BTreeMap<String, u32>,
    /// Consistency of reads and writes. Default `LOCAL_QUORUM`.
    pub consistency: Consistency,
    /// Consistency of the Paxos phase of lightweight transactions (one-time
    /// key claims, dedup, membership seqs, conversation creation). Default
    /// `SERIAL`: a one-time key is handed out once even when two regions
    /// claim it at the same moment; `LOCAL_SERIAL` is faster across regions
    /// but only linearizable within one.
    pub serial_consistency: SerialConsistency,
    /// Client-side timeout of one request, its retries included. Default
    /// 10 s (longer than the servers' own write and CAS timeouts, so that a
    /// server reports its timeout rather than the client giving up first).
    pub request_timeout: Duration,
    /// Timeout of opening one connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Retries of one request after a failed attempt. Only statements
    /// marked idempotent are retried after a failure that may have written
    /// (timeouts, broken connections); any statement is retried after one
    /// that proves nothing was done (unavailable, overloaded). Default 3.
    pub max_retries: u32,
    /// Rows fetched per page when reading. Default 1000.
    pub page_size: i32,
    /// Rounds of a contended lightweight transaction (a claim that lost its
    /// key to another claimer, a dedup or seq write whose outcome had to be
    /// read back) before the call gives up with `Unavailable`. Default 64.
    pub lwt_attempts: u32,
    /// Media rows carry a TTL of their object's remaining retention plus
    /// this grace, so that an object the sweeper missed still goes away.
    /// Default 7 days.
    pub media_ttl_grace: Duration,
    /// How long the migration lock is held without being renewed before
    /// another migrator may take it (one that died holding it). Default
    /// 60 s.
    pub migration_lease: Duration,
    /// User name and password, when the cluster requires authentication.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for CqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlConfig")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .field("local_datacenter", &self.local_datacenter)
            .field("replication", &self.replication)
            .field("consistency", &self.consistency)
            .field("serial_consistency", &self.serial_consistency)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("page_size", &self.page_size)
            .field("lwt_attempts", &self.lwt_attempts)
            .field("media_ttl_grace", &self.media_ttl_grace)
            .field("migration_lease", &self.migration_lease)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(user, _)| (user, "<redacted>")),
            )
            .finish()
    }
}

/// Default consistency of reads and writes.
pub const DEFAULT_CONSISTENCY: Consistency = Consistency::LocalQuorum;
/// Default consistency of lightweight transactions.
pub const DEFAULT_SERIAL_CONSISTENCY: SerialConsistency = SerialConsistency::Serial;
/// Default client-side timeout of one request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default timeout of opening a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default retries of one request.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default rows per page.
pub const DEFAULT_PAGE_SIZE: i32 = 1000;
/// Default rounds of a contended lightweight transaction.
pub const DEFAULT_LWT_ATTEMPTS: u32 = 64;
/// Default grace added to media TTLs.
pub const DEFAULT_MEDIA_TTL_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default lease of the migration lock.
pub const DEFAULT_MIGRATION_LEASE: Duration = Duration::from_secs(60);
/// Default CQL port.
pub const DEFAULT_PORT: u16 = 9042;
/// Replication factor given to the `dc` of a URL without `rf`.
pub const DEFAULT_REPLICATION_FACTOR: u32 = 3;

/// Why a URL or a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad CQL store configuration: {0}")]
pub struct ConfigError(pub String);

fn bad<T>(why: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(why.into()))
}

impl CqlConfig {
    /// A configuration with every default: `contact_points`, `keyspace`
    /// and `replication` are the caller's.
    pub fn new(
        contact_points: Vec<String>,
        keyspace: impl Into<String>,
        replication: BTreeMap<String, u32>,
    ) -> Self {
        Self {
            contact_points,
            keyspace: keyspace.into(),
            local_datacenter: None,
            replication,
            consistency: DEFAULT_CONSISTENCY,
            serial_consistency: DEFAULT_SERIAL_CONSISTENCY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            page_size: DEFAULT_PAGE_SIZE,
            lwt_attempts: DEFAULT_LWT_ATTEMPTS,
            media_ttl_grace: DEFAULT_MEDIA_TTL_GRACE,
            migration_lease: DEFAULT_MIGRATION_LEASE,
            credentials: None,
        }
    }

    /// Parses `scylla://HOSTS/KEYSPACE?PARAMS` (see the module docs) and
    /// [validates](Self::validate) the result.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let rest = url
            .strip_prefix("scylla://")
            .or_else(|| url.strip_prefix("cql://"))
            .ok_or_else(|| {
                ConfigError(format!(
                    "{url:?} must start with scylla:// (scylla://HOST[:PORT],.../KEYSPACE?dc=DC)"
                ))
            })?;
        let (authority, path) = rest.split_once('/').ok_or_else(|| {
            ConfigError(format!(
                "{url:?} names no keyspace: add /KEYSPACE after the hosts"
            ))
        })?;
        let (keyspace, query) = path.split_once('?').unwrap_or((path, ""));
        let (credentials, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = userinfo.split_once(':').ok_or_else(|| {
                    ConfigError("credentials must be USER:PASSWORD@ before the hosts".into())
                })?;
                if user.is_empty() {
                    return bad("the user name before @ is empty");
                }
                (Some((user.to_owned(), password.to_owned())), hosts)
            }
            None => (None, authority),
        };
        let contact_points = hosts
            .split(',')
            .map(contact_point)
            .collect::<Result<Vec<_>, _>>()?;

        let mut config = Self::new(contact_points, keyspace, BTreeMap::new());
        config.credentials = credentials;
        let mut rf = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| ConfigError(format!("parameter {pair:?} has no =VALUE")))?;
            match key {
                "dc" => {
                    if value.is_empty() {
                        return bad("dc= is empty");
                    }
                    config.local_datacenter = Some(value.to_owned());
                }
                "rf" => rf = Some(parse_replication(value)?),
                "consistency" => config.consistency = parse_consistency(value)?,
                "serial" => config.serial_consistency = parse_serial(value)?,
                "timeout" => config.request_timeout = parse_duration(key, value)?,
                "connect_timeout" => config.connect_timeout = parse_duration(key, value)?,
                "retries" => {
                    config.max_retries = value.parse().map_err(|_| {
                        ConfigError(format!("retries={value:?} is not a whole number"))
                    })?;
                }
                "page_size" => {
                    config.page_size = value.parse().map_err(|_| {
                        ConfigError(format!("page_size={value:?} is not a whole number"))
                    })?;
                }
                _ => {
                    return bad(format!(
                        "unknown parameter {key:?} (known: dc, rf, consistency, serial, timeout, \
                         connect_timeout, retries, page_size)"
                    ));
                }
            }
        }
        config.replication = match (rf, &config.local_datacenter) {
            (Some(rf), _) => rf,
            (None, Some(dc)) => BTreeMap::from([(dc.clone(), DEFAULT_REPLICATION_FACTOR)]),
            (None, None) => {
                return bad("give the replication (rf=DC:N,DC:N) or the local datacenter (dc=DC)");
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what a configuration must hold: contact points, a valid
    /// keyspace name, a replication factor of at least 1 per datacenter,
    /// the local datacenter among the replicated ones, non-zero timeouts
    /// and page size.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.contact_points.is_empty() {
            return bad("no contact point");
        }
        validate_keyspace(&self.keyspace)?;
        if self.replication.is_empty() {
            return bad("no datacenter to replicate to");
        }
        for (dc, rf) in &self.replication {
            if dc.is_empty() || dc.contains(['\'', '"', '\\']) {
                return bad(format!("datacenter name {dc:?} is empty or has quotes"));
            }
            if *rf == 0 {
                return bad(format!("replication factor of {dc} is 0"));
            }
        }
        if let Some(dc) = &self.local_datacenter
            && !self.replication.contains_key(dc)
        {
            return bad(format!(
                "the local datacenter {dc} is not among those replicated ({})",
                self.replication
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if matches!(
            self.consistency,
            Consistency::Serial | Consistency::LocalSerial | Consistency::Any
        ) {
            return bad(format!(
                "consistency {:?} cannot serve both reads and writes",
                self.consistency
            ));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be greater than zero");
        }
        if self.page_size <= 0 {
            return bad("page_size must be at least 1");
        }
        if self.lwt_attempts == 0 {
            return bad("lwt_attempts must be at least 1");
        }
        if self.migration_lease < Duration::from_secs(1) {
            return bad("migration_lease must be at least 1 s");
        }
        Ok(())
    }

    /// The CQL replication map of the keyspace, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}`.
    pub fn replication_cql(&self) -> String {
        let mut out = String::from("{'class': 'NetworkTopologyStrategy'");
        for (dc, rf) in &self.replication {
            out.push_str(&format!(", '{dc}': {rf}"));
        }
        out.push('}');
        out
    }
}

impl std::str::FromStr for CqlConfig {
    type Err = ConfigError;

    /// Same as [`CqlConfig::from_url`] (for command-line parsers).
    fn from_str(url: &str) -> Result<Self, ConfigError> {
        Self::from_url(url)
    }
}

/// Checks a keyspace name: a lowercase CQL identifier of at most 48
/// characters, so that it can be written into statements unquoted.
pub fn validate_keyspace(keyspace: &str) -> Result<(), ConfigError> {
    let mut chars = keyspace.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || keyspace.len() > 48 {
        return bad(format!(
            "keyspace {keyspace:?} must be a lowercase letter then up to 47 lowercase letters, \
             digits or _"
        ));
    }
    Ok(())
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` → `host:port`.
fn contact_point(host: &str) -> Result<String, ConfigError> {
    if host.is_empty() {
        return bad("an empty host in the host list");
    }
    let (name, port) = if let Some(v6) = host.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| ConfigError(format!("host {host:?} lacks its closing ]")))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| ConfigError(format!("host {host:?}: expected :PORT after ]")))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port)),
            None => (host.to_owned(), None),
        }
    };
    if name.is_empty() || name == "[]" {
        return bad(format!("host {host:?} has no name"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ConfigError(format!("host {host:?}: port {p:?} is not 1-65535")))?,
    };
    Ok(format!("{name}:{port}"))
}

/// `dc1:3,dc2:3`.
fn parse_replication(value: &str) -> Result<BTreeMap<String, u32>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in value.split(',') {
        let (dc, rf) = part
            .rsplit_once(':')
            .ok_or_else(|| ConfigError(format!("rf entry {part:?} must be DATACENTER:FACTOR")))?;
        let rf: u32 = rf.parse().map_err(|_| {
            ConfigError(format!(
                "rf entry {part:?}: factor {rf:?} is not a whole number"
            ))
        })?;
        if out.insert(dc.to_owned(), rf).is_some() {
            return bad(format!("rf names datacenter {dc} twice"));
        }
    }
    Ok(out)
}

fn parse_consistency(value: &str) -> Result<Consistency, ConfigError> {
    Ok(match value.to_ascii_lowercase().as_str() {
        "local_quorum" => Consistency::LocalQuorum,
        "quorum" => Consistency::Quorum,
        "each_quorum" => Consistency::EachQuorum,
        "all" => Consistency::All,
        "local_one" => Consistency::LocalOne,
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        _ => {
            return bad(format!(
                "consistency={value:?} (known: local_quorum, quorum, each_quorum, all, \
                 local_one, one, two, three)"
            ));
        }
    })
}

fn parse_serial(value: &str) -> Result<SerialConsistency, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "serial" => Ok(SerialConsistency::Serial),
        "local_serial" => Ok(SerialConsistency::LocalSerial),
        _ => bad(format!("serial={value:?} (known: serial, local_serial)")),
    }
}

/// `250ms`, `5s`, `2m`.
fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 = number.parse().map_err(|_| {
        ConfigError(format!(
            "{key}={value:?} must be a number and a unit (ms, s, m)"
        ))
    })?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => {
            return bad(format!("{key}={value:?}: unknown unit {unit:?} (ms, s, m)"));
        }
    };
    if duration.is_zero() {
        return bad(format!("{key} must be greater than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        match CqlConfig::from_url(url) {
            Ok(c) => panic!("{url} parsed: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_url() {
        let c = CqlConfig::from_url(
            "scylla://host1:9042,host2:19042,[::1]/chappe_prod?dc=fr-par&rf=fr-par:3,fr-mrs:3\
             &consistency=quorum&serial=local_serial&timeout=2s&connect_timeout=500ms\
             &retries=5&page_size=200",
        )
        .expect("parses");
        assert_eq!(
            c.contact_points,
            ["host1:9042", "host2:19042", "[::1]:9042"]
        );
        assert_eq!(c.keyspace, "chappe_prod");
        assert_eq!(c.local_datacenter.as_deref(), Some("fr-par"));
        assert_eq!(
            c.replication,
            BTreeMap::from([("fr-mrs".into(), 3), ("fr-par".into(), 3)])
        );
        assert_eq!(c.consistency, Consistency::Quorum);
        assert_eq!(c.serial_consistency, SerialConsistency::LocalSerial);
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.max_retries, 5);
        assert_eq!(c.page_size, 200);
        assert_eq!(
            c.replication_cql(),
            "{'class': 'NetworkTopologyStrategy', 'fr-mrs': 3, 'fr-par': 3}"
        );
    }

    #[test]
    fn defaults() {
        let c = CqlConfig::from_url("scylla://10.0.0.1/chappe?dc=dc1").expect("parses");
        assert_eq!(c.contact_points, ["10.0.0.1:9042"]);
        assert_eq!(c.replication, BTreeMap::from([("dc1".into(), 3)]));
        assert_eq!(c.consistency, Consistency::LocalQuorum);
        assert_eq!(c.serial_consistency, SerialConsistency::Serial);
        assert_eq!(c.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(c.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(c.credentials, None);
        let no_dc = CqlConfig::from_url("cql://a:1/ks?rf=datacenter1:1").expect("parses");
        assert_eq!(no_dc.local_datacenter, None);
        assert_eq!(
            no_dc.replication,
            BTreeMap::from([("datacenter1".into(), 1)])
        );
        let parsed: CqlConfig = "cql://a:1/ks?rf=datacenter1:1".parse().expect("FromStr");
        assert_eq!(parsed, no_dc);
        let new = CqlConfig::new(vec!["a:1".into()], "ks", no_dc.replication.clone());
        assert_eq!(new.validate(), Ok(()));
    }

    #[test]
    fn credentials_are_parsed_and_not_printed() {
        let c = CqlConfig::from_url("scylla://chappe:s3cret@db:9042/ks?dc=dc1").expect("parses");
        assert_eq!(c.credentials, Some(("chappe".into(), "s3cret".into())));
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(err("http://h/ks?dc=a").contains("must start with scylla://"));
        assert!(err("scylla://h?dc=a").contains("names no keyspace"));
        assert!(err("scylla://h/?dc=a").contains("keyspace \"\""));
        assert!(err("scylla://h/Chappe?dc=a").contains("lowercase"));
        assert!(err("scylla://h/ks;drop?dc=a").contains("lowercase"));
        assert!(err("scylla://h/ks").contains("rf=DC:N"));
        assert!(err("scylla://h,/ks?dc=a").contains("empty host"));
        assert!(err("scylla://h:99999/ks?dc=a").contains("not 1-65535"));
        assert!(err("scylla://h:x/ks?dc=a").contains("not 1-65535"));
        assert!(err("scylla://[::1/ks?dc=a").contains("closing ]"));
        assert!(err("scylla://h/ks?dc=a&rf=a").contains("DATACENTER:FACTOR"));
        assert!(err("scylla://h/ks?dc=a&rf=a:x").contains("not a whole number"));
        assert!(err("scylla://h/ks?dc=a&rf=a:0").contains("is 0"));
        assert!(err("scylla://h/ks?dc=a&rf=a:1,a:2").contains("twice"));
        assert!(err("scylla://h/ks?dc=a&rf=b:3").contains("not among those replicated"));
        assert!(err("scylla://h/ks?dc=a&consistency=most").contains("known: local_quorum"));
        assert!(err("scylla://h/ks?dc=a&consistency=serial").contains("known"));
        assert!(err("scylla://h/ks?dc=a&serial=quorum").contains("local_serial"));
        assert!(err("scylla://h/ks?dc=a&timeout=5").contains("unknown unit"));
        assert!(err("scylla://h/ks?dc=a&timeout=0s").contains("greater than zero"));
        assert!(err("scylla://h/ks?dc=a&page_size=0").contains("at least 1"));
        assert!(err("scylla://h/ks?dc=a&retries=-1").contains("whole number"));
        assert!(err("scylla://h/ks?dc=a&color=red").contains("unknown parameter"));
        assert!(err("scylla://h/ks?dc").contains("no =VALUE"));
        assert!(err("scylla://:pw@h/ks?dc=a").contains("user name"));
        assert!(err("scylla://h/ks?dc=a&rf=a':1").contains("quotes"));
    }
}
