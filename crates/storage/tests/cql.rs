//! The CQL store against a real CQL database (ScyllaDB, or Apache
//! Cassandra, started by `chappe_testkit::cql`; or the cluster named by
//! `CHAPPE_TEST_CQL`): the conformance suite, exclusive one-time key
//! claims, and migrations (concurrent, idempotent, versions checked).
//!
//! Every test makes its own keyspace on the one shared node.

use std::collections::BTreeMap;
use std::sync::Arc;

use chappe_storage::cql::{self, CqlConfig, CqlStore, MIGRATIONS};
use chappe_storage::{Error, conformance};
use chappe_testkit::cql::CqlServer;

/// A fresh keyspace name for one test.
fn keyspace(test: &str) -> String {
    format!("chappe_{test}_{:012x}", rand::random::<u64>() >> 16)
}

/// A configuration for `test`'s own keyspace on the shared node, through
/// the URL form services are given.
fn config(test: &str) -> CqlConfig {
    let server = CqlServer::shared();
    let dc = server.datacenter();
    let url = format!(
        "scylla://{}/{}?dc={dc}&rf={dc}:1&timeout=30s",
        server.contact_points().join(","),
        keyspace(test)
    );
    CqlConfig::from_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Migrates `test`'s keyspace and connects a store to it.
async fn store(test: &str) -> CqlStore {
    let config = config(test);
    let session = cql::open_session(&config).await.expect("session");
    let version = cql::migrate(&session, &config).await.expect("migrate");
    assert_eq!(version, MIGRATIONS.len() as u32);
    CqlStore::with_session(Arc::new(session), &config)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite() {
    conformance::run_all(store("suite").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_suite_runs_twice_at_once_on_one_keyspace() {
    let store = store("twice").await;
    let first = tokio::spawn(conformance::run_all(store.clone()));
    let second = tokio::spawn(conformance::run_all(store));
    first.await.expect("first run");
    second.await.expect("second run");
}

/// 50 concurrent claims of a device's 10 one-time keys: each key is handed
/// out exactly once, the 40 others get the fallback key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_claims_of_ten_keys_hand_each_out_once() {
    let store = store("claims").await;
    for _ in 0..3 {
        conformance::one_time_key_claims_are_exclusive(&store).await;
    }
}

/// Two migrators at once on a new keyspace both succeed, the version is
/// recorded once, and running again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_migrators_at_once_both_succeed_and_record_the_version_once() {
    let config = config("migrators");
    let a = cql::open_session(&config).await.expect("session a");
    let b = cql::open_session(&config).await.expect("session b");
    let (ra, rb) = tokio::join!(cql::migrate(&a, &config), cql::migrate(&b, &config));
    let known = MIGRATIONS.len() as u32;
    assert_eq!(ra.expect("first migrator"), known);
    assert_eq!(rb.expect("second migrator"), known);
    assert_eq!(
        cql::schema_version(&a, &config).await.expect("version"),
        known
    );

    let rows = a
        .query_unpaged(
            format!(
                "SELECT version, name, applied_by FROM {}.schema_migrations",
                config.keyspace
            ),
            &[],
        )
        .await
        .expect("read versions")
        .into_rows_result()
        .expect("rows");
    let versions: Vec<(i32, String, String)> = rows
        .rows()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("decoded");
    assert_eq!(versions.len(), MIGRATIONS.len(), "{versions:?}");
    for (m, (version, name, _)) in MIGRATIONS.iter().zip(&versions) {
        assert_eq!((*version as u32, name.as_str()), (m.version, m.name));
    }

    assert_eq!(cql::migrate(&a, &config).await.expect("again"), known);
    let lock: Vec<(String,)> = a
        .query_unpaged(
            format!("SELECT name FROM {}.schema_lock", config.keyspace),
            &[],
        )
        .await
        .expect("read lock")
        .into_rows_result()
        .expect("rows")
        .rows()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("decoded");
    assert!(lock.is_empty(), "the lock is released: {lock:?}");
    CqlStore::connect(&config).await.expect("connect");
}

/// A keyspace that was not migrated is refused with what to do; one
/// migrated by a newer build is refused as such, by the store and by the
/// migrator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schema_versions_are_checked() {
    let config = config("versions");
    match CqlStore::connect(&config).await {
        Err(Error::Unavailable(why)) => assert!(why.contains("chappe migrate"), "{why}"),
        other => panic!("an unmigrated keyspace: {other:?}"),
    }
    let session = cql::open_session(&config).await.expect("session");
    cql::migrate(&session, &config).await.expect("migrate");
    session
        .query_unpaged(
            format!(
                "INSERT INTO {}.schema_migrations (version, name) VALUES (999, 'from_the_future')",
                config.keyspace
            ),
            &[],
        )
        .await
        .expect("record a future version");
    match CqlStore::connect(&config).await {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("newer"), "{detail}"),
        other => panic!("a newer keyspace: {other:?}"),
    }
    match cql::migrate(&session, &config).await {
        Err(Error::Corrupt { detail, .. }) => assert!(detail.contains("newer"), "{detail}"),
        other => panic!("migrating a newer keyspace: {other:?}"),
    }
}

/// The keyspace gets the configured replication, also when it existed
/// with another one (made by hand here with `SimpleStrategy`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyspace_replication_follows_the_configuration() {
    let config = config("replication");
    let session = cql::open_session(&config).await.expect("session");
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE {} WITH replication = \
                 {{'class': 'SimpleStrategy', 'replication_factor': 1}}",
                config.keyspace
            ),
            &[],
        )
        .await
        .expect("create by hand");
    cql::migrate(&session, &config).await.expect("migrate");
    let dc = CqlServer::shared().datacenter().to_owned();
    let stored = replication(&session, config.keyspace.clone()).await;
    assert!(
        stored["class"].ends_with("NetworkTopologyStrategy"),
        "{stored:?}"
    );
    assert_eq!(stored.get(&dc).map(String::as_str), Some("1"), "{stored:?}");
    assert_eq!(stored.len(), 2, "{stored:?}");
    CqlStore::with_session(Arc::new(session), &config)
        .await
        .expect("connect");
}

async fn replication(
    session: &scylla::client::session::Session,
    keyspace: String,
) -> BTreeMap<String, String> {
    let rows = session
        .query_unpaged(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await
        .expect("read replication")
        .into_rows_result()
        .expect("rows");
    let (map,): (BTreeMap<String, String>,) = rows.single_row().expect("one keyspace");
    map
}

// ------------------------------------------------- interrupted calls
//
// A CQL call that stops half-way (a timeout, a killed process) leaves the
// rows written before it stopped. These tests write such rows by hand and
// check that the next call finishes the work instead of doing it twice.

use chappe_proto::ids::{ConversationId, MessageIdGenerator};
use chappe_storage::{
    ConversationRepo, ConversationRow, InsertMessage, KeyRepo, MemberChange, MembershipRow,
    MessageRepo, MessageRow, OneTimeKeyRow,
};

fn event(id: ConversationId, seq: u64, target: &str) -> MembershipRow {
    MembershipRow {
        conversation_id: id,
        seq,
        actor_user_id: "alice".into(),
        actor_device_id: "PHONE".into(),
        op: if seq == 1 { 1 } else { 2 },
        target_user_id: target.into(),
        at_ms: 1_000 + seq as i64,
        signature: vec![seq as u8],
    }
}

async fn create_alone(store: &CqlStore, alice: &str) -> ConversationId {
    let id = ConversationId::random();
    let row = ConversationRow {
        conversation_id: id,
        kind: 2,
        created_at_ms: 1_000,
        head: None,
        membership_seq: 1,
    };
    store
        .create_conversation(&row, &[(event(id, 1, alice), MemberChange::Add)])
        .await
        .expect("create");
    id
}

async fn run(store: &CqlStore, cql: String) {
    store
        .session()
        .query_unpaged(cql.clone(), &[])
        .await
        .unwrap_or_else(|e| panic!("{cql}: {e}"));
}

/// A send that claimed its client id and stopped before writing the
/// message: its retry (another server id) stores the message once, under
/// the id claimed first, and moves the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_completes_a_send_that_stopped_after_claiming_its_id() {
    let store = store("halfsend").await;
    let ks = store.config().keyspace.clone();
    let id = create_alone(&store, "alice").await;
    let ids = MessageIdGenerator::new();
    let (first, retry_id) = (
        ids.next_at(1_700_000_000_000),
        ids.next_at(1_700_000_000_500),
    );
    run(
        &store,
        format!(
            "INSERT INTO {ks}.message_dedup (conversation_id, sender_user_id, sender_device_id, \
             client_msg_id, message_id, sent_at_ms, attempt) \
             VALUES ('{id}', 'alice', 'PHONE', 'c1', '{first}', 1700000000000, 42)"
        ),
    )
    .await;
    assert!(
        store
            .messages_after(id, None, 10)
            .await
            .expect("page")
            .is_empty()
    );

    let retry = MessageRow {
        conversation_id: id,
        message_id: retry_id,
        sender_user_id: "alice".into(),
        sender_device_id: "PHONE".into(),
        client_msg_id: "c1".into(),
        ciphertext: b"megolm".to_vec(),
        session_id: "s".into(),
        sent_at_ms: 1_700_000_000_500,
    };
    let stored = MessageRow {
        message_id: first,
        sent_at_ms: 1_700_000_000_000,
        ..retry.clone()
    };
    for _ in 0..2 {
        assert_eq!(
            store.insert_message(&retry).await.expect("insert"),
            InsertMessage::Duplicate(stored.clone())
        );
    }
    assert_eq!(
        store.messages_after(id, None, 10).await.expect("page"),
        std::slice::from_ref(&stored),
        "stored once, under the first id"
    );
    assert_eq!(store.get_message(id, retry_id).await.expect("get"), None);
    let head = store
        .get_conversation(id)
        .await
        .expect("get")
        .expect("row")
        .head;
    assert_eq!(head, Some(first));
}

/// An append that took its seq and stopped before writing its event: the
/// next append applies it first, so the log has no gap and the member set
/// follows the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_append_finishes_one_that_stopped_after_taking_its_seq() {
    let store = store("halfappend").await;
    let ks = store.config().keyspace.clone();
    let id = create_alone(&store, "alice").await;
    run(
        &store,
        format!(
            "UPDATE {ks}.conversations SET membership_seq = 2, last_seq = 2, \
             last_actor_user_id = 'alice', last_actor_device_id = 'PHONE', last_op = 2, \
             last_target_user_id = 'bob', last_at_ms = 1002, last_signature = 0x02, \
             last_change = 1, last_attempt = 7 WHERE conversation_id = '{id}' IF membership_seq = 1"
        ),
    )
    .await;
    assert_eq!(store.members(id).await.expect("members"), ["alice"]);

    store
        .append_membership(&event(id, 3, "carol"), MemberChange::Add)
        .await
        .expect("append");
    assert_eq!(
        store.membership_log(id).await.expect("log"),
        [
            event(id, 1, "alice"),
            event(id, 2, "bob"),
            event(id, 3, "carol")
        ]
    );
    assert_eq!(
        store.members(id).await.expect("members"),
        ["alice", "bob", "carol"]
    );
    let of_bob = store.conversations_of("bob").await.expect("of bob");
    assert_eq!(of_bob.len(), 1);
    assert_eq!(of_bob[0].membership_seq, 3);
}

/// A claim that marked its key and stopped before deleting it: the key is
/// no longer offered nor counted, and uploading it again offers it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_left_claimed_is_never_offered_again_until_uploaded_again() {
    let store = store("halfclaim").await;
    let ks = store.config().keyspace.clone();
    let key = |id: &str| OneTimeKeyRow {
        key_id: id.into(),
        curve25519: format!("curve-{id}"),
        signature: format!("sig-{id}"),
        created_at_ms: 1,
    };
    let user = format!("u{:x}", rand::random::<u32>());
    assert_eq!(
        store
            .add_one_time_keys(&user, "PHONE", &[key("k1"), key("k2")])
            .await
            .expect("add"),
        2
    );
    run(
        &store,
        format!(
            "UPDATE {ks}.one_time_keys SET claimed_by = 7 \
             WHERE user_id = '{user}' AND device_id = 'PHONE' AND key_id = 'k1' IF EXISTS"
        ),
    )
    .await;
    assert_eq!(
        store
            .count_one_time_keys(&user, "PHONE")
            .await
            .expect("count"),
        1
    );
    let claimed = store.claim_key(&user, "PHONE").await.expect("claim");
    assert_eq!(claimed.map(|c| c.key), Some(key("k2")));
    assert_eq!(store.claim_key(&user, "PHONE").await.expect("claim"), None);

    assert_eq!(
        store
            .add_one_time_keys(&user, "PHONE", &[key("k1")])
            .await
            .expect("add again"),
        1
    );
    let claimed = store.claim_key(&user, "PHONE").await.expect("claim");
    assert_eq!(claimed.map(|c| c.key), Some(key("k1")));
}
