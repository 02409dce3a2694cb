//! keydir's limits, each with its documented default.

use std::time::Duration;

/// Every limit keydir enforces. `Default` gives the documented values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeydirConfig {
    /// Requests each method runs at once; the rest wait on the bus.
    /// Default: 256.
    pub max_in_flight: usize,
    /// One-time keys accepted in one upload; a bigger upload is refused
    /// with `INVALID_ARGUMENT`. Default: 100.
    pub max_one_time_keys_per_upload: usize,
    /// Unclaimed one-time keys one device may hold; an upload that would go
    /// over is refused with `RESOURCE_EXHAUSTED`. Default: 500.
    pub max_stored_one_time_keys: u64,
    /// When a device over its one-time key quota should try again (others
    /// claim its keys meanwhile). Default: 60 s.
    pub quota_retry_after: Duration,
    /// Users in one device query. Default: 100.
    pub max_query_users: usize,
    /// Devices in one claim. Default: 1000.
    pub max_claim_devices: usize,
    /// Store claims one claim request runs at once. Default: 16.
    pub claim_concurrency: usize,
    /// How far in the future a key's `created_at_ms` may be (clock skew
    /// between a device and the server); further is refused with
    /// `INVALID_ARGUMENT`. Default: 5 min.
    pub max_future_skew: Duration,
}

impl Default for KeydirConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            max_one_time_keys_per_upload: 100,
            max_stored_one_time_keys: 500,
            quota_retry_after: Duration::from_secs(60),
            max_query_users: 100,
            max_claim_devices: 1000,
            claim_concurrency: 16,
            max_future_skew: Duration::from_secs(5 * 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = KeydirConfig::default();
        assert_eq!(c.max_in_flight, 256);
        assert_eq!(c.max_one_time_keys_per_upload, 100);
        assert_eq!(c.max_stored_one_time_keys, 500);
        assert_eq!(c.max_query_users, 100);
        assert_eq!(c.max_claim_devices, 1000);
        assert_eq!(c.max_future_skew, Duration::from_secs(300));
        assert_eq!(c.quota_retry_after, Duration::from_secs(60));
        assert!(c.max_one_time_keys_per_upload as u64 <= c.max_stored_one_time_keys);
    }
}
