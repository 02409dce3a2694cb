//! Per-device rate limits (GCRA, via `governor`).

use std::num::NonZeroU32;
use std::time::Duration;

use chappe_bus::RpcError;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::auth::Identity;
use crate::config::GatewayConfig;

type Keyed = RateLimiter<(String, String), DefaultKeyedStateStore<(String, String)>, DefaultClock>;

/// The gateway's rate limits, keyed by (user, device).
pub struct Limits {
    sends: Keyed,
    calls: Keyed,
    clock: DefaultClock,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(config: &GatewayConfig) -> Self {
        Self {
            sends: RateLimiter::keyed(quota(config.send_rate_per_second, config.send_burst)),
            calls: RateLimiter::keyed(quota(config.call_rate_per_second, config.call_burst)),
            clock: DefaultClock::default(),
        }
    }

    fn check(&self, limiter: &Keyed, identity: &Identity, what: &str) -> Result<(), RpcError> {
        let key = (identity.user.to_string(), identity.device.to_string());
        limiter.check_key(&key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            RpcError::resource_exhausted(
                format!("{what} rate limit of this device reached"),
                wait.max(Duration::from_millis(1)),
            )
        })
    }

    /// One message or to-device batch.
    pub fn send(&self, identity: &Identity) -> Result<(), RpcError> {
        self.check(&self.sends, identity, "send")
    }

    /// One unary call.
    pub fn call(&self, identity: &Identity) -> Result<(), RpcError> {
        self.check(&self.calls, identity, "call")
    }

    /// Forgets devices that have been quiet long enough to be back at full
    /// burst, so the tables do not grow without bound.
    pub fn housekeeping(&self) {
        self.sends.retain_recent();
        self.calls.retain_recent();
    }
}
