//! keydir: device keys, signed one-time keys and fallback keys
//! (DESIGN.md §3, §5), served on `chappe.rpc.keydir.*`.
//!
//! - [`config::KeydirConfig`]: every limit, with its default;
//! - [`convert`]: wire types to domain types, validated as they convert
//!   (ids, canonical base64 keys, the device's self-signature);
//! - [`service`]: the handlers `upload_keys`, `query_devices`, `claim_keys`
//!   and the bus routes that serve them;
//! - [`error::Error`]: the crate's error, mapped to gRPC codes in one place
//!   (`impl From<Error> for RpcError`);
//! - [`start`]: subscribes every method and returns the running server.
//!
//! *Architecture invariant*: keydir is the only writer of the
//! `device_keys`, `one_time_keys` and `fallback_keys` tables, and it stores
//! no key whose signature does not verify: device keys under their own
//! Ed25519 key, one-time and fallback keys under the device's stored (or
//! just uploaded) Ed25519 key. A device's identity never changes once
//! stored; a new identity needs a new device id. Each one-time key is handed
//! to exactly one claimer (the store guarantees it); the fallback key
//! answers once none is left.

pub mod config;
pub mod convert;
pub mod error;
pub mod service;

use std::sync::Arc;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::KeyRepo;

pub use config::KeydirConfig;
pub use error::{Error, Result};

/// Subscribes every keydir method (queue group `keydir`) and serves them in
/// the background; returns once all are subscribed.
pub async fn start(
    config: KeydirConfig,
    store: Arc<dyn KeyRepo>,
    bus: Arc<dyn Bus>,
    subjects: Subjects,
) -> Result<RunningServer, chappe_bus::Error> {
    let service = Arc::new(service::Service::new(config, store, bus, subjects));
    service::routes(service).start().await
}
