//! The messaging core with the services talking over a real nats-server
//! (JetStream for delivery jobs), as they do in a cluster.

mod common;

use std::time::Duration;

use chappe_cli::platform::BusChoice;
use chappe_client::ids::UserId;
use chappe_client::{Client, ConversationKind, Event, Events};
use chappe_testkit::NatsServer;
use common::{TestPlatform, client_config};

const WAIT: Duration = Duration::from_secs(30);

async fn wait_for(events: &mut Events, body: &str) {
    tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if matches!(&event, Event::Message(m) if m.body == body) {
                return;
            }
        }
        panic!("events ended before {body:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("{body:?} did not arrive"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_chat_and_catch_up_over_nats() {
    let nats = NatsServer::start();
    let platform = TestPlatform::start_with(|c| {
        c.bus = BusChoice::Nats(Box::new(chappe_bus::nats::NatsConfig::with_url(nats.url())));
    })
    .await;
    assert!(platform.platform.memory_bus().is_none());

    let alice = Client::login_dev(client_config(&platform, "alice"), "alice", "laptop")
        .await
        .unwrap();
    let bob = Client::login_dev(client_config(&platform, "bob"), "bob", "phone")
        .await
        .unwrap();
    let bob_tablet = Client::login_dev(client_config(&platform, "bob-tablet"), "bob", "tablet")
        .await
        .unwrap();
    let mut alice_events = alice.connect().await.unwrap();
    let mut bob_events = bob.connect().await.unwrap();
    let chat = alice
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();

    alice.send_text(&chat.id, "bonjour par NATS").await.unwrap();
    wait_for(&mut bob_events, "bonjour par NATS").await;
    bob.send_text(&chat.id, "bien reçu").await.unwrap();
    wait_for(&mut alice_events, "bien reçu").await;

    // Bob's tablet was never connected: it catches up from the store.
    let mut tablet_events = bob_tablet.connect().await.unwrap();
    wait_for(&mut tablet_events, "bonjour par NATS").await;
    wait_for(&mut tablet_events, "bien reçu").await;

    platform.platform.shutdown().await.unwrap();
}
