//! fanout: conversations, their membership log, messages and per-device
//! inboxes, and the delivery of what it stores (DESIGN.md §3).
//!
//! - [`config::FanoutConfig`]: every limit, with its default;
//! - [`service`]: the request/reply handlers (`chappe.rpc.fanout.*`):
//!   create/list/get conversations, update membership, submit, submit to
//!   device, ack, sync, history;
//! - [`delivery`]: the workers that take `chappe.jobs.deliver` and publish
//!   each stored message to its members' `chappe.deliver.u.<user>`;
//! - [`notify`]: membership and device-list changes told to the members;
//! - [`convert`]: wire types to domain types and back, validated;
//! - [`error::Error`]: the crate's error, mapped to gRPC codes in one place;
//! - [`metered`]: the store wrapped with timings and a `store` span per
//!   call; [`readiness`]: the checks behind `/readyz`.
//!
//! *Architecture invariant*: fanout is the only writer of the conversation,
//! message and inbox tables, and it answers a submit only after the store
//! has committed the message (persist before acknowledge).

pub mod config;
pub mod convert;
pub mod delivery;
pub mod error;
pub mod metered;
pub mod notify;
pub mod service;

use std::sync::Arc;

use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_storage::{ConversationRepo, InboxRepo, MessageRepo};
use chappe_telemetry::http::Health;

pub use config::FanoutConfig;
pub use error::Error;

/// The tables fanout owns.
pub trait FanoutStore: ConversationRepo + MessageRepo + InboxRepo {}

impl<T: ConversationRepo + MessageRepo + InboxRepo> FanoutStore for T {}

/// A running fanout: its request handlers and its delivery workers.
pub struct Fanout {
    server: RunningServer,
    delivery: delivery::Workers,
    key_events: notify::KeyEvents,
}

impl Fanout {
    /// Subscribes every method and starts the delivery workers; returns once
    /// fanout is ready to serve.
    pub async fn start(
        config: FanoutConfig,
        store: Arc<dyn FanoutStore>,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
    ) -> Result<Self, chappe_bus::Error> {
        let store: Arc<dyn FanoutStore> = Arc::new(metered::MeteredStore::new(store));
        let service = Arc::new(service::Service::new(
            config.clone(),
            store.clone(),
            bus.clone(),
            subjects.clone(),
        ));
        let server = service::routes(service, bus.clone(), &subjects, config.max_in_flight)
            .start()
            .await?;
        let key_events =
            notify::KeyEvents::start(store.clone(), bus.clone(), subjects.clone()).await?;
        let delivery = delivery::Workers::start(&config, store, bus, subjects).await?;
        Ok(Self {
            server,
            delivery,
            key_events,
        })
    }

    /// Stops taking requests and jobs; finishes what is in hand. Jobs not
    /// taken stay queued for another fanout.
    pub async fn stop(self) {
        self.server.stop().await;
        self.key_events.stop();
        self.delivery.stop().await;
    }
}

/// fanout is ready when its bus carries messages and its store answers.
pub fn readiness(store: Arc<dyn FanoutStore>, bus: Arc<dyn Bus>) -> Health {
    Health::new()
        .check("bus", move || {
            let bus = bus.clone();
            async move { bus.health().await.map_err(|e| e.to_string()) }
        })
        .check("store", move || {
            let store = store.clone();
            // A read on an index: cheap, and it needs a working database.
            async move {
                store
                    .conversations_of("")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        })
}
