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
//!   applied with [`PresenceStore::update`]) and `chappe.rpc.presence.query`
//!   (a batch of users' presence, at most `max_query_users`); a change of
//!   the state a user is shown in is pushed as `UserDelivery.presence_changed`
//!   on `chappe.deliver.u.<contact>` to every user who shares a conversation
//!   with them;
//! - [`error::Error`]: the crate's error, mapped to gRPC codes in one place;
//! - [`Presence::start`]: subscribes the routes and returns the running
//!   service.
//!
//! *Privacy*: a user sees the presence of the users who share a
//! conversation with them (read from fanout's conversation store,
//! `conversations_of` and `members`) and of nobody else, by query and by
//! event alike. A query leaves out the users the asker may not see, without
//! an error, so that it does not reveal whether they exist.
//!
//! What is next, and not in this crate yet:
//! - gateways sending the connection events and heartbeats (every
//!   `heartbeat_interval`, with whether the device was active), serving the
//!   query and forwarding `presence_changed` on the Connect stream;
//! - the preference to hide last-seen must be kept durably (a record here
//!   expires with its ttl, and its `hide_last_seen` with it) and applied on
//!   every read;
//! - a sweeper: a user that only expired (their gateway died, no event from
//!   anyone) is shown offline by queries after the ttl, but no
//!   `presence_changed` is pushed for it yet;
//! - typing indicators, relayed on `chappe.evt.typing.<conversation>` to the
//!   conversation's connected members and never stored.

pub mod config;
pub mod error;
pub mod service;
pub mod state;
pub mod store;

use std::sync::Arc;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::ConversationRepo;

pub use config::{ConfigError, PresenceConfig};
pub use error::{Error, Result};
pub use state::{DeviceSeen, PresenceState, UserPresence};
pub use store::{KvPresenceStore, MemoryPresenceStore, PresenceStore, StoreError};

/// A running presence service: its request handlers.
pub struct Presence {
    server: RunningServer,
}

impl Presence {
    /// Subscribes every presence method (queue group `presence`) and serves
    /// them in the background; returns once all are subscribed.
    /// `conversations` is fanout's conversation store, read to decide who
    /// may see whom.
    pub async fn start(
        config: PresenceConfig,
        store: Arc<dyn PresenceStore>,
        conversations: Arc<dyn ConversationRepo>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Result<Self, chappe_bus::Error> {
        let service = Arc::new(service::Service::new(
            config,
            store,
            conversations,
            bus,
            subjects,
        ));
        let server = service::routes(service).start().await?;
        Ok(Self { server })
    }

    /// Stops taking requests and finishes those in hand.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}
