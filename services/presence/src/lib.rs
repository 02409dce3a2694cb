//! Chappe's presence service, its core (DESIGN.md §3, issue 5).
//!
//! What is here:
//! - [`config`]: [`PresenceConfig`], the time-to-live of a device without
//!   heartbeat (60 s), the inactivity after which a user is away (5 min),
//!   and the heartbeat interval gateways should use (20 s, below the ttl);
//! - [`state`]: the pure logic of one user's record ([`UserPresence`]):
//!   connection, heartbeat (active or not), disconnection, expiry of devices
//!   whose gateway went silent, and the [`state::Presence`] others are shown
//!   (online / away / offline, last-seen unless hidden). No I/O, no clock:
//!   the time comes from the caller;
//! - [`store`]: [`PresenceStore`], records kept for the ttl after their last
//!   write, in memory ([`MemoryPresenceStore`]) or in a JetStream key-value
//!   bucket whose `max_age` is the ttl ([`KvPresenceStore`]); updates are
//!   atomic per user (compare-and-set on the key's revision in the bucket).
//!   So the users of a gateway killed with `kill -9` go offline by
//!   themselves: their devices stop heartbeating ([`UserPresence::status`]
//!   counts them gone after the ttl) and their records leave the store;
//! - [`service`]: the bus routes `chappe.rpc.presence.connection` (a
//!   device's connection, heartbeat or disconnection, from its gateway,
//!   applied with [`PresenceStore::update`]), `.query` (a batch of users'
//!   presence, at most `max_query_users`), `.typing` (relayed to the
//!   conversation's other members, never stored) and `.settings` (hide
//!   last-seen, kept durably in the `presence_settings` table); a change of
//!   the state a user is shown in is pushed as `UserDelivery.presence_changed`
//!   on `chappe.deliver.u.<contact>` to every user who shares a conversation
//!   with them, once (the record notes what was announced, in the same
//!   compare-and-set as the change);
//! - the sweeper (every `sweep_interval`, in every instance): users whose
//!   devices all expired without a disconnection (their gateway was killed)
//!   are announced offline;
//! - [`error::Error`]: the crate's error, mapped to gRPC codes in one place;
//! - [`Presence::start`]: subscribes the routes, starts the sweeper and
//!   returns the running service.
//!
//! *Privacy*: a user sees the presence of the users who share a
//! conversation with them and of nobody else, by query and by event alike.
//! Who shares a conversation is asked of fanout over the bus
//! (`chappe.rpc.fanout.contacts`, `.memberships`): presence reads no table
//! of another service. A query leaves out the users the asker may not see,
//! without an error, so that it does not reveal whether they exist.
//!
//! *Connection ids*: each Connect stream reports a random id; the end of a
//! stream that a newer one of the same device replaced (the device moved to
//! another gateway, which reported first) does not make the device offline.

pub mod config;
pub mod error;
pub mod service;
pub mod state;
pub mod store;

use std::sync::Arc;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::PresenceSettingsRepo;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{ConfigError, PresenceConfig};
pub use error::{Error, Result};
pub use state::{DeviceSeen, PresenceState, UserPresence};
pub use store::{KvPresenceStore, MemoryPresenceStore, PresenceStore, StoreError};

/// presence is ready when its bus carries messages (its records live on
/// the bus, in a key-value bucket, or in memory).
pub fn readiness(bus: Arc<dyn Bus>) -> chappe_telemetry::http::Health {
    chappe_telemetry::http::Health::new().check("bus", move || {
        let bus = bus.clone();
        async move { bus.health().await.map_err(|e| e.to_string()) }
    })
}

/// A running presence service: its request handlers and its sweeper.
pub struct Presence {
    server: RunningServer,
    sweeper: JoinHandle<()>,
    stop_sweeping: CancellationToken,
}

impl Presence {
    /// Subscribes every presence method (queue group `presence`), starts
    /// the sweeper, and serves in the background; returns once all are
    /// subscribed. `settings` holds who hides their last-seen time.
    pub async fn start(
        config: PresenceConfig,
        store: Arc<dyn PresenceStore>,
        settings: Arc<dyn PresenceSettingsRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Result<Self, chappe_bus::Error> {
        let service = Arc::new(service::Service::new(
            config, store, settings, bus, subjects,
        ));
        let server = service::routes(service.clone()).start().await?;
        let stop_sweeping = CancellationToken::new();
        let sweeper = tokio::spawn(sweep_forever(service, stop_sweeping.clone()));
        Ok(Self {
            server,
            sweeper,
            stop_sweeping,
        })
    }

    /// Stops taking requests and finishes those in hand.
    pub async fn stop(self) {
        self.stop_sweeping.cancel();
        let _ = self.sweeper.await;
        self.server.stop().await;
    }
}

async fn sweep_forever(service: Arc<service::Service>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(service.config().sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = service.sweep().await {
            tracing::warn!(error = %e, "presence sweep failed; next one retries");
        }
    }
}
