//! media's limits and settings, each with its documented default.

use std::time::Duration;

/// Every limit media enforces. `Default` gives the documented values;
/// [`MediaConfig::validate`] says whether a set of values can work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Largest object, in bytes of ciphertext; a bigger upload is refused
    /// at its start with `RESOURCE_EXHAUSTED` naming this limit.
    /// Default: 2 GiB.
    pub max_upload_bytes: u64,
    /// Largest chunk, in bytes; a start whose `chunk_size` is larger (or 0)
    /// is `INVALID_ARGUMENT`. Default: 256 KiB.
    pub max_chunk_bytes: u32,
    /// Most chunks one object may have (`size / chunk_size`, rounded up): a
    /// start with tiny chunks would cost the store a row per few bytes; it
    /// is `INVALID_ARGUMENT`. Default: 65,536 (2 GiB in chunks of 32 KiB).
    pub max_chunks: u32,
    /// Bytes one user may upload per `quota_window`: the sizes of the
    /// objects they created within the last window (rolling) add up to at
    /// most this. A start that would go over is `RESOURCE_EXHAUSTED` with
    /// the time until enough of the window's uploads roll out of it.
    /// Default: 10 GiB.
    pub quota_bytes: u64,
    /// The rolling window of `quota_bytes`. Default: 24 h.
    pub quota_window: Duration,
    /// How long an object is kept after its upload began; then it is
    /// deleted with its chunks, and reads answer `NOT_FOUND` even before
    /// the sweeper ran. Default: 30 days.
    pub retention: Duration,
    /// How often the sweeper deletes expired objects. Default: 10 min.
    pub sweep_interval: Duration,
    /// Objects the sweeper deletes per store transaction (each with all
    /// its chunks). Default: 16.
    pub sweep_batch: usize,
    /// How long a user's right to download a media object is remembered,
    /// so that a download of many chunks asks fanout about membership once.
    /// A member who leaves every conversation the media was posted in may
    /// go on downloading it for this long. Default: 30 s.
    pub access_cache_ttl: Duration,
    /// Most (user, media) rights remembered at once; past it the expired
    /// ones are dropped, and if that is not enough, all. Default: 65,536.
    pub access_cache_capacity: usize,
    /// How long media waits for fanout's answer about membership; past it
    /// the caller gets `UNAVAILABLE`. Default: 5 s.
    pub fanout_timeout: Duration,
    /// Requests each method handles at once; the rest wait on the bus.
    /// Default: 64.
    pub max_in_flight: usize,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_upload_bytes: 2 << 30,
            max_chunk_bytes: 256 << 10,
            max_chunks: 1 << 16,
            quota_bytes: 10 << 30,
            quota_window: Duration::from_secs(24 * 60 * 60),
            retention: Duration::from_secs(30 * 24 * 60 * 60),
            sweep_interval: Duration::from_secs(10 * 60),
            sweep_batch: 16,
            access_cache_ttl: Duration::from_secs(30),
            access_cache_capacity: 1 << 16,
            fanout_timeout: Duration::from_secs(5),
            max_in_flight: 64,
        }
    }
}

/// A [`MediaConfig`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A limit or duration that must be positive is zero.
    #[error("media {0} must be positive")]
    Zero(&'static str),
    /// An upload allowed by `max_upload_bytes` could never fit the quota.
    #[error(
        "media max_upload_bytes ({max_upload_bytes}) must not exceed quota_bytes ({quota_bytes}): \
         such an upload could never start"
    )]
    UploadOverQuota {
        max_upload_bytes: u64,
        quota_bytes: u64,
    },
    /// A duration too long to count in milliseconds since the epoch.
    #[error("media {0} is too long")]
    TooLong(&'static str),
}

/// The longest duration accepted: a century, far beyond any sensible
/// setting and far within `i64` milliseconds.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

impl MediaConfig {
    /// Checks that the settings can work together: positive limits and
    /// durations, durations that fit in milliseconds, and an upload of the
    /// largest size that fits within the quota.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_upload_bytes", self.max_upload_bytes == 0),
            ("max_chunk_bytes", self.max_chunk_bytes == 0),
            ("max_chunks", self.max_chunks == 0),
            ("quota_bytes", self.quota_bytes == 0),
            ("quota_window", self.quota_window.is_zero()),
            ("retention", self.retention.is_zero()),
            ("sweep_interval", self.sweep_interval.is_zero()),
            ("sweep_batch", self.sweep_batch == 0),
            ("access_cache_capacity", self.access_cache_capacity == 0),
            ("fanout_timeout", self.fanout_timeout.is_zero()),
            ("max_in_flight", self.max_in_flight == 0),
        ];
        if let Some((name, _)) = positive.into_iter().find(|(_, zero)| *zero) {
            return Err(ConfigError::Zero(name));
        }
        let durations = [
            ("quota_window", self.quota_window),
            ("retention", self.retention),
            ("sweep_interval", self.sweep_interval),
            ("access_cache_ttl", self.access_cache_ttl),
            ("fanout_timeout", self.fanout_timeout),
        ];
        if let Some((name, _)) = durations.into_iter().find(|(_, d)| *d > MAX_DURATION) {
            return Err(ConfigError::TooLong(name));
        }
        if self.max_upload_bytes > self.quota_bytes {
            return Err(ConfigError::UploadOverQuota {
                max_upload_bytes: self.max_upload_bytes,
                quota_bytes: self.quota_bytes,
            });
        }
        Ok(())
    }
}

/// A duration in milliseconds, as the clock counts (saturating; validated
/// durations always fit).
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_documented_ones_and_valid() {
        let c = MediaConfig::default();
        assert_eq!(c.max_upload_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(c.max_chunk_bytes, 256 * 1024);
        assert_eq!(c.max_chunks, 65_536);
        assert_eq!(c.quota_bytes, 10 * 1024 * 1024 * 1024);
        assert_eq!(c.quota_window, Duration::from_secs(86_400));
        assert_eq!(c.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.sweep_interval, Duration::from_secs(600));
        assert_eq!(c.sweep_batch, 16);
        assert_eq!(c.access_cache_ttl, Duration::from_secs(30));
        assert_eq!(c.access_cache_capacity, 65_536);
        assert_eq!(c.fanout_timeout, Duration::from_secs(5));
        assert_eq!(c.max_in_flight, 64);
        c.validate().unwrap();
        // The largest upload in the largest chunks fits the chunk limit.
        assert!(
            c.max_upload_bytes.div_ceil(u64::from(c.max_chunk_bytes)) <= u64::from(c.max_chunks)
        );
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let zero = MediaConfig {
            sweep_interval: Duration::ZERO,
            ..MediaConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::Zero("sweep_interval")));
        let zero = MediaConfig {
            max_chunk_bytes: 0,
            ..MediaConfig::default()
        };
        assert_eq!(zero.validate(), Err(ConfigError::Zero("max_chunk_bytes")));
        let over = MediaConfig {
            quota_bytes: 1 << 20,
            ..MediaConfig::default()
        };
        assert!(matches!(
            over.validate(),
            Err(ConfigError::UploadOverQuota { .. })
        ));
        let long = MediaConfig {
            retention: Duration::MAX,
            ..MediaConfig::default()
        };
        assert_eq!(long.validate(), Err(ConfigError::TooLong("retention")));
        // A zero cache ttl is allowed: it turns the cache off.
        let no_cache = MediaConfig {
            access_cache_ttl: Duration::ZERO,
            ..MediaConfig::default()
        };
        no_cache.validate().unwrap();
    }
}
