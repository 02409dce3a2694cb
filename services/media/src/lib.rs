//! Chappe's media service: encrypted attachments (DESIGN.md §3, issue 5),
//! served on `chappe.rpc.media.*`.
//!
//! Clients encrypt a file with a fresh key (which travels inside the
//! Megolm message) and upload the ciphertext in chunks; media stores and
//! serves ciphertext only, checking every chunk's SHA-256 as it arrives and
//! the whole object's once the last one is in.
//!
//! What is here:
//! - [`config`]: [`MediaConfig`], every limit with its default (upload and
//!   chunk sizes, the per-user quota and its rolling window, retention, the
//!   sweeper, the access cache) and [`MediaConfig::validate`];
//! - [`clock`]: the [`Clock`] media decides with: [`SystemClock`], and
//!   [`ManualClock`] for tests that move time;
//! - [`convert`]: wire types to domain types, validated as they convert
//!   ([`convert::MediaId`], [`convert::Start`]), and stored objects back to
//!   `MediaInfo`;
//! - [`service`]: the handlers `begin`, `put_chunk`, `status`, `open`,
//!   `get_chunk` and the sweep, and the bus routes that serve them (queue
//!   group `media`); membership is asked of fanout
//!   (`chappe.rpc.fanout.memberships`), never read from its tables;
//! - [`access`]: download rights remembered for `access_cache_ttl`, so a
//!   download of many chunks asks fanout once;
//! - [`error::Error`]: the crate's error, mapped to gRPC codes in one place
//!   (`impl From<Error> for RpcError`);
//! - [`metered`]: the store wrapped with a `store` span and a duration per
//!   call; [`readiness`]: the checks behind `/readyz`;
//! - [`Media::start`]: subscribes the routes, starts the sweeper, and
//!   returns the running service.
//!
//! The lifecycle of an object: `begin` creates it (owner, size, chunk size,
//! whole SHA-256, `expires_at_ms = now + retention`) and records the
//! conversation it is posted in; `put_chunk` stores chunks in index order;
//! the last one completes it if the whole hash matches, or deletes it if
//! not; members of a conversation it was posted in `open` it and
//! `get_chunk` its chunks; past its expiry it is gone for everyone, and the
//! sweeper deletes it with its chunks.
//!
//! *Architecture invariant*: media is the only writer of `media_objects`,
//! `media_chunks` and `media_posts`; it never stores a chunk whose data
//! does not hash to its declared SHA-256, never serves an object whose
//! whole hash did not match, and serves an object only to members of a
//! conversation it was posted in.

pub mod access;
pub mod clock;
pub mod config;
pub mod convert;
pub mod error;
pub mod metered;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::MediaRepo;
use chappe_telemetry::http::Health;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{ConfigError, MediaConfig};
pub use error::{Error, Result};

/// A running media service: its request handlers and its sweeper.
pub struct Media {
    server: RunningServer,
    service: Arc<service::Service>,
    sweeper: JoinHandle<()>,
    stop_sweeper: CancellationToken,
}

impl Media {
    /// Subscribes every media method (queue group `media`) and starts the
    /// sweeper (a first sweep right away, then every `sweep_interval`);
    /// returns once all methods are subscribed. `config` should have passed
    /// [`MediaConfig::validate`].
    pub async fn start(
        config: MediaConfig,
        store: Arc<dyn MediaRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, chappe_bus::Error> {
        let store: Arc<dyn MediaRepo> = Arc::new(metered::MeteredStore::new(store));
        let interval = config.sweep_interval.max(Duration::from_millis(1));
        let service = Arc::new(service::Service::new(config, store, bus, subjects, clock));
        let server = service::routes(service.clone()).start().await?;
        let stop_sweeper = CancellationToken::new();
        let sweeper = tokio::spawn(sweep_every(service.clone(), interval, stop_sweeper.clone()));
        Ok(Self {
            server,
            service,
            sweeper,
            stop_sweeper,
        })
    }

    /// Deletes every object past its retention now; returns how many.
    pub async fn sweep_now(&self) -> Result<u64> {
        self.service.sweep().await
    }

    /// Stops taking requests, finishes those in hand, and stops the
    /// sweeper (a sweep under way stops between two store transactions).
    pub async fn stop(self) {
        self.server.stop().await;
        self.stop_sweeper.cancel();
        if let Err(e) = self.sweeper.await {
            tracing::warn!(error = %e, "media sweeper ended badly");
        }
    }
}

/// Sweeps every `interval` until `stop`. A failed sweep is logged and
/// tried again at the next tick.
async fn sweep_every(service: Arc<service::Service>, interval: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            swept = service.sweep() => {
                if let Err(e) = swept {
                    tracing::warn!(error = %e, "media sweep failed; will retry");
                }
            }
        }
    }
}

/// media is ready when its bus carries messages and its store answers.
pub fn readiness(store: Arc<dyn MediaRepo>, bus: Arc<dyn Bus>) -> Health {
    Health::new()
        .check("bus", move || {
            let bus = bus.clone();
            async move { bus.health().await.map_err(|e| e.to_string()) }
        })
        .check("store", move || {
            let store = store.clone();
            // A read on a primary key: cheap, and it needs a working database.
            async move {
                store
                    .get_object("")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
}
