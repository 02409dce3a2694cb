//! The conformance suite against both implementations of the bus
//! (DESIGN.md invariant 7): in-process, and NATS on a real nats-server.

use std::sync::Arc;

use chappe_bus::conformance::{self, Limits};
use chappe_bus::memory::{MemoryBus, MemoryBusConfig};
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_testkit::NatsServer;

const MAX_DELIVER: u32 = 3;

fn limits() -> Limits {
    Limits {
        max_deliver: MAX_DELIVER,
        ..Limits::default()
    }
}

#[tokio::test]
async fn memory_bus_conforms() {
    let bus = MemoryBus::new(MemoryBusConfig {
        max_deliver: MAX_DELIVER,
        ..Default::default()
    });
    conformance::run_all(Arc::new(bus), limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bus_conforms_and_again_on_the_same_server() {
    let server = NatsServer::start();
    let config = NatsConfig {
        max_deliver: MAX_DELIVER,
        ..NatsConfig::with_url(server.url())
    };
    let bus = NatsBus::connect(config.clone()).await.unwrap();
    conformance::run_all(Arc::new(bus), limits()).await;
    // A second connection, a second run: nothing of the first gets in the way.
    let bus = NatsBus::connect(config).await.unwrap();
    conformance::run_all(Arc::new(bus), limits()).await;
}
