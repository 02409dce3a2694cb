//! Chappe's presence service, its core (DESIGN.md §3, issue 5).
//!
//! What is here:
//! - [`config`]: [`PresenceConfig`], the time-to-live of a device without
//!   heartbeat (60 s), the inactivity after which a user is away (5 min),
//!   and the heartbeat interval gateways should use (20 s, below the ttl);
//! - [`state`]: the pure logic of one user's record ([`UserPresence`]):
//!   connection, heartbeat (active or not), disconnection, expiry of devices
//!   whose gateway went silent, and the [`Presence`] others are shown
//!   (online / away / offline, last-seen unless hidden). No I/O, no clock:
//!   the time comes from the caller;
//! - [`store`]: [`PresenceStore`], records kept for the ttl after their last
//!   write, in memory ([`MemoryPresenceStore`]) or in a JetStream key-value
//!   bucket whose `max_age` is the ttl ([`KvPresenceStore`]); updates are
//!   atomic per user (compare-and-set on the key's revision in the bucket).
//!   So the users of a gateway killed with `kill -9` go offline by
//!   themselves: their devices stop heartbeating ([`UserPresence::status`]
//!   counts them gone after the ttl) and their records leave the store.
//!
//! What is next, and not in this crate yet:
//! - wiring: gateways send connection events and heartbeats (every
//!   `heartbeat_interval`, with whether the device was active) as bus
//!   requests on `chappe.rpc.presence.*` (queue group `presence`), and a
//!   query returns a batch of contacts' presence; the service applies them
//!   with [`PresenceStore::update`];
//! - privacy: a user sees the presence of the users who share a conversation
//!   with them and of nobody else, checked with fanout's store
//!   (`conversations_of`) for queries and events alike; the preference to
//!   hide last-seen must be kept durably (a record here expires with its
//!   ttl, and its `hide_last_seen` with it) and applied on every read;
//! - events: a change of a user's [`PresenceState`] is published on
//!   `chappe.evt.presence.<user>` for the gateways to push to the devices
//!   allowed to see it; a user that only expired (no event from anyone) needs
//!   a sweeper that notices the change;
//! - typing indicators, relayed on `chappe.evt.typing.<conversation>` to the
//!   conversation's connected members and never stored.

pub mod config;
pub mod state;
pub mod store;

pub use config::{ConfigError, PresenceConfig};
pub use state::{DeviceSeen, Presence, PresenceState, UserPresence};
pub use store::{KvPresenceStore, MemoryPresenceStore, PresenceStore, StoreError};
