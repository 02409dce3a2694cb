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
//! - [`metered`]: the store wrapped with timings and a `store` span per
//!   call; [`readiness`]: the checks behind `/readyz`;
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
pub mod metered;
pub mod service;

use std::sync::Arc;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::KeyRepo;
use chappe_telemetry::http::Health;

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
    let store: Arc<dyn KeyRepo> = Arc::new(metered::MeteredStore::new(store));
    let service = Arc::new(service::Service::new(config, store, bus, subjects));
    service::routes(service).start().await
}

/// keydir is ready when its bus carries messages and its store answers.
pub fn readiness(store: Arc<dyn KeyRepo>, bus: Arc<dyn Bus>) -> Health {
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
                    .count_one_time_keys("", "")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
}
