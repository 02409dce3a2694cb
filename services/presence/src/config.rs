//! The settings of the presence service.

use std::time::Duration;

/// How presence is computed and how long it lasts without news.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceConfig {
    /// How long a device counts as connected after its last heartbeat (or
    /// connection event); also the time-to-live of a user's record in the
    /// store. A user whose gateway died without a word falls offline within
    /// it. Default: 60 s.
    pub ttl: Duration,
    /// How long a connected device counts as active after its last activity;
    /// past it, a user whose devices are all inactive is away. Default: 5 min.
    pub away_after: Duration,
    /// How often gateways should send a heartbeat for each connected device.
    /// Must be shorter than `ttl` (a few heartbeats per ttl, so that one lost
    /// heartbeat does not make a user offline). Default: 20 s.
    pub heartbeat_interval: Duration,
    /// Users one presence query may ask about; more is INVALID_ARGUMENT.
    /// Default: 500.
    pub max_query_users: usize,
    /// Requests each method handles at once. Default: 256.
    pub max_in_flight: usize,
    /// How often each presence instance looks for users whose devices all
    /// expired (their gateway died without a word) and tells their contacts
    /// they went offline. Such a user is shown offline at most `ttl` after
    /// their last heartbeat, and the push follows within this. Default: 5 s.
    pub sweep_interval: Duration,
    /// How long a typing indicator is shown without a newer one (receivers
    /// are told this with each event). Default: 6 s.
    pub typing_timeout: Duration,
    /// How long a question to fanout (who shares a conversation with whom)
    /// may take. Default: 5 s.
    pub fanout_timeout: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            away_after: Duration::from_secs(5 * 60),
            heartbeat_interval: Duration::from_secs(20),
            max_query_users: 500,
            max_in_flight: 256,
            sweep_interval: Duration::from_secs(5),
            typing_timeout: Duration::from_secs(6),
            fanout_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`PresenceConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("presence ttl must be positive")]
    ZeroTtl,
    #[error("presence heartbeat_interval must be positive")]
    ZeroHeartbeat,
    #[error(
        "presence heartbeat_interval ({heartbeat_interval:?}) must be shorter than ttl ({ttl:?})"
    )]
    HeartbeatNotBelowTtl {
        heartbeat_interval: Duration,
        ttl: Duration,
    },
    #[error("presence {0} must be positive")]
    ZeroLimit(&'static str),
}

impl PresenceConfig {
    /// How long the store keeps a record after its last write: twice the
    /// ttl, so that the sweeper still finds the record of a user whose
    /// devices expired and can announce them offline.
    pub fn record_ttl(&self) -> Duration {
        self.ttl.saturating_mul(2)
    }

    /// Checks that the settings can work together: a positive ttl and
    /// heartbeat interval, and heartbeats more frequent than the ttl.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl.is_zero() {
            return Err(ConfigError::ZeroTtl);
        }
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::ZeroHeartbeat);
        }
        if self.heartbeat_interval >= self.ttl {
            return Err(ConfigError::HeartbeatNotBelowTtl {
                heartbeat_interval: self.heartbeat_interval,
                ttl: self.ttl,
            });
        }
        if self.max_query_users == 0 {
            return Err(ConfigError::ZeroLimit("max_query_users"));
        }
        if self.max_in_flight == 0 {
            return Err(ConfigError::ZeroLimit("max_in_flight"));
        }
        for (name, value) in [
            ("sweep_interval", self.sweep_interval),
            ("typing_timeout", self.typing_timeout),
            ("fanout_timeout", self.fanout_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroLimit(name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        let config = PresenceConfig::default();
        assert_eq!(config.ttl, Duration::from_secs(60));
        assert_eq!(config.away_after, Duration::from_secs(300));
        assert_eq!(config.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(config.max_query_users, 500);
        config.validate().unwrap();
    }

    #[test]
    fn heartbeats_must_come_within_the_ttl() {
        let config = PresenceConfig {
            heartbeat_interval: Duration::from_secs(60),
            ..PresenceConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(ConfigError::HeartbeatNotBelowTtl { .. })
        ));
        let zero = PresenceConfig {
            ttl: Duration::ZERO,
            ..PresenceConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::ZeroTtl));
        let zero = PresenceConfig {
            heartbeat_interval: Duration::ZERO,
            ..PresenceConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::ZeroHeartbeat));
        let zero = PresenceConfig {
            max_query_users: 0,
            ..PresenceConfig::default()
        };
        assert_eq!(
            zero.validate(),
            Err(ConfigError::ZeroLimit("max_query_users"))
        );
    }
}
