//! The same checks against both presence stores: in memory, and on a
//! JetStream key-value bucket of a real nats-server.

use std::time::Duration;

use bytes::Bytes;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_presence::store::user_key;
use chappe_presence::{
    KvPresenceStore, MemoryPresenceStore, PresenceStore, StoreError, UserPresence,
};
use chappe_proto::ids::{DeviceId, UserId};
use chappe_testkit::NatsServer;
use tokio::time::{Instant, sleep};

const T0: u64 = 1_700_000_000_000;

fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).unwrap()
}

fn online(devices: &[&str]) -> UserPresence {
    let mut record = UserPresence::default();
    for d in devices {
        record.connect(&device(d), 1, T0);
    }
    record
}

/// Every store must pass this; `ttl` is the store's.
async fn conformance(store: &dyn PresenceStore, ttl: Duration) {
    let (alice, bob) = (user("alice"), user("bob"));
    let (dotted, dashed) = (user("jean.dupont"), user("jean-dupont"));

    // An unknown user has no record.
    assert_eq!(store.get(&user("nobody")).await.unwrap(), None);

    // Round trip, and a put replaces.
    let mut record = online(&["phone"]);
    record.announced = Some(chappe_presence::PresenceState::Online);
    store.put(&alice, &record).await.unwrap();
    assert_eq!(store.get(&alice).await.unwrap(), Some(record.clone()));
    let replaced = online(&["laptop"]);
    store.put(&alice, &replaced).await.unwrap();
    assert_eq!(store.get(&alice).await.unwrap(), Some(replaced.clone()));

    // Ids that differ only where the key encoding works are distinct.
    store.put(&dotted, &online(&["a"])).await.unwrap();
    store.put(&dashed, &online(&["b"])).await.unwrap();
    assert_eq!(store.get(&dotted).await.unwrap(), Some(online(&["a"])));
    assert_eq!(store.get(&dashed).await.unwrap(), Some(online(&["b"])));

    // Update starts from an empty record, then from the stored one.
    let first = store
        .update(&bob, &|r: &mut UserPresence| {
            r.connect(&device("phone"), 1, T0)
        })
        .await
        .unwrap();
    assert_eq!(first, online(&["phone"]));
    let second = store
        .update(&bob, &|r: &mut UserPresence| {
            r.connect(&device("laptop"), 1, T0)
        })
        .await
        .unwrap();
    assert_eq!(second, online(&["laptop", "phone"]));
    assert_eq!(store.get(&bob).await.unwrap(), Some(second));

    // Concurrent updates of one user are not lost.
    let carol = user("carol");
    let names: Vec<String> = (0..8).map(|n| format!("device{n}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        let carol = &carol;
        async move {
            let d = device(name);
            store
                .update(carol, &move |r: &mut UserPresence| r.connect(&d, 1, T0))
                .await
                .unwrap()
        }
    }))
    .await;
    let stored = store.get(&carol).await.unwrap().unwrap();
    assert_eq!(stored.devices.len(), 8, "{stored:?}");

    // A batch, in the order asked.
    assert_eq!(
        store
            .get_many(&[bob.clone(), user("nobody"), alice.clone()])
            .await
            .unwrap(),
        [
            Some(online(&["laptop", "phone"])),
            None,
            Some(replaced.clone())
        ]
    );

    // Delete forgets; an update after it starts afresh.
    store.delete(&alice).await.unwrap();
    assert_eq!(store.get(&alice).await.unwrap(), None);
    let fresh = store
        .update(&alice, &|r: &mut UserPresence| {
            r.connect(&device("phone"), 1, T0)
        })
        .await
        .unwrap();
    assert_eq!(fresh, online(&["phone"]));

    // A write keeps a record for the ttl from that write...
    let dave = user("dave");
    store.put(&dave, &online(&["phone"])).await.unwrap();
    sleep(ttl.mul_f64(0.6)).await;
    store.put(&dave, &online(&["phone"])).await.unwrap();
    let rewritten = Instant::now();
    sleep(ttl.mul_f64(0.6)).await;
    assert!(
        store.get(&dave).await.unwrap().is_some(),
        "expired before its ttl from the last write"
    );
    // ...and the record goes away by itself after it.
    let deadline = rewritten + ttl + Duration::from_secs(5);
    loop {
        if store.get(&dave).await.unwrap().is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "still there long after the ttl");
        sleep(Duration::from_millis(50)).await;
    }
    assert!(rewritten.elapsed() >= ttl.mul_f64(0.9));
    // Every other record expired too.
    for u in [&alice, &bob, &carol, &dotted, &dashed] {
        assert_eq!(store.get(u).await.unwrap(), None, "{u}");
    }
}

#[tokio::test]
async fn memory_store() {
    let ttl = Duration::from_millis(500);
    conformance(&MemoryPresenceStore::new(ttl), ttl).await;
}

#[tokio::test]
async fn memory_store_with_zero_ttl_keeps_records() {
    let store = MemoryPresenceStore::new(Duration::ZERO);
    store
        .put(&user("alice"), &online(&["phone"]))
        .await
        .unwrap();
    sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.get(&user("alice")).await.unwrap(),
        Some(online(&["phone"]))
    );
}

#[tokio::test]
async fn kv_store() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig::with_url(server.url()))
        .await
        .unwrap();
    let ttl = Duration::from_secs(2);
    let store = KvPresenceStore::open(&bus, KvPresenceStore::DEFAULT_BUCKET, ttl)
        .await
        .unwrap();
    let status = bus
        .key_value(KvPresenceStore::DEFAULT_BUCKET, ttl)
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(status.max_age(), ttl, "the bucket's max_age is the ttl");
    conformance(&store, ttl).await;
}

#[tokio::test]
async fn kv_store_reports_an_unreadable_record() {
    let server = NatsServer::start();
    let bus = NatsBus::connect(NatsConfig::with_url(server.url()))
        .await
        .unwrap();
    let ttl = Duration::from_secs(60);
    let store = KvPresenceStore::open(&bus, "presence_test", ttl)
        .await
        .unwrap();
    let kv = bus.key_value("presence_test", ttl).await.unwrap();
    let alice = user("alice.b");
    kv.put(user_key(&alice), Bytes::from_static(b"not json"))
        .await
        .unwrap();
    assert!(matches!(
        store.get(&alice).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store
            .update(&alice, &|r: &mut UserPresence| r.connect(
                &device("phone"),
                1,
                T0
            ))
            .await,
        Err(StoreError::Corrupt { .. })
    ));
}
