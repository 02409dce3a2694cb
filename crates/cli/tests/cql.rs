//! The services on a CQL database (Apache Cassandra 5, or ScyllaDB, started
//! by `chappe_testkit::cql`; or the cluster named by `CHAPPE_TEST_CQL`): the
//! messaging-core, presence and media scenarios pass in one process and
//! with each service in its own process; a message written through a fanout
//! in one datacenter is read through a fanout in the other.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc;
use chappe_bus::subjects::FanoutMethod;
use chappe_bus::{Bus, Subjects};
use chappe_fanout::{Fanout, FanoutConfig};
use chappe_proto::internal as wire;
use chappe_proto::v1;
use chappe_storage::{AnyStore, StoreLocation};
use chappe_testkit::cql::{CqlCluster, CqlServer};
use common::{TestCluster, TestPlatform, megolm_ciphertext, presence_media, scenarios};

const MIB: usize = 1024 * 1024;

/// One test at a time: each starts many processes (or two database nodes)
/// on a two-core machine, where together they would only time out.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fresh keyspace on the shared node, as a `--store` URL.
fn store_url(test: &str) -> String {
    let server = CqlServer::shared();
    let dc = server.datacenter();
    format!(
        "scylla://{}/chappe_{test}_{:012x}?dc={dc}&rf={dc}:1&timeout=30s",
        server.contact_points().join(","),
        rand::random::<u64>() >> 16
    )
}

fn location(url: &str) -> StoreLocation {
    url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_passes_in_one_process_on_the_cql_store() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let url = store_url("inproc");
    let platform = TestPlatform::start_with(|c| c.store = Some(location(&url))).await;
    assert!(
        platform
            .platform
            .store_location()
            .to_string()
            .starts_with("cql://"),
        "{}",
        platform.platform.store_location()
    );
    scenarios::two_users_two_devices_exchange_and_catch_up(&platform).await;
    scenarios::group_of_three_all_read_each_other(&platform).await;
    scenarios::new_device_reads_the_next_message(&platform).await;
    scenarios::removed_member_cannot_read_what_follows(&platform).await;
    presence_media::presence_typing_and_privacy(&platform).await;
    presence_media::file_travels_encrypted_and_resumes(
        &platform,
        50 * MIB,
        presence_media::PlaintextScan::FirstAndLast,
    )
    .await;
    platform.platform.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_passes_with_each_service_in_its_own_process_on_the_cql_store() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let url = store_url("procs");
    let cluster = TestCluster::start_on_store(Default::default(), &location(&url), &url).await;
    scenarios::two_users_two_devices_exchange_and_catch_up(&cluster).await;
    scenarios::group_of_three_all_read_each_other(&cluster).await;
    presence_media::presence_typing_and_privacy(&cluster).await;
    // The 50 MiB file crosses the CQL store in one process above; here a
    // smaller one shows the media process on CQL.
    presence_media::file_travels_encrypted_and_resumes(
        &cluster,
        4 * MIB,
        presence_media::PlaintextScan::FirstAndLast,
    )
    .await;
    tokio::task::block_in_place(|| cluster.cluster.stop());
}

/// A fanout on its own bus and store, in `dc`.
async fn fanout_in(url: &str) -> (Arc<dyn Bus>, Fanout) {
    let store = AnyStore::open(&location(url)).await.expect("store opens");
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
    let fanout = Fanout::start(
        FanoutConfig::default(),
        store.map(|s| Arc::new(s) as _, |s| Arc::new(s) as _),
        bus.clone(),
        Subjects::default(),
    )
    .await
    .expect("fanout starts");
    (bus, fanout)
}

fn actor(user: &str) -> Option<v1::DeviceRef> {
    Some(v1::DeviceRef {
        user_id: user.into(),
        device_id: "D1".into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_written_in_one_datacenter_is_read_in_the_other() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let cluster = tokio::task::block_in_place(CqlCluster::start_two_datacenters);
    let keyspace = format!("chappe_twodc_{:012x}", rand::random::<u64>() >> 16);
    let url_in = |dc: &str| {
        let node = cluster.node(dc).expect("a node in each datacenter");
        format!(
            "scylla://{}/{keyspace}?dc={dc}&rf=dc1:1,dc2:1&timeout=30s",
            node.contact_point()
        )
    };
    let (dc1, dc2) = (url_in("dc1"), url_in("dc2"));
    AnyStore::migrate_and_open(&location(&dc1))
        .await
        .expect("the keyspace migrates");
    let (bus1, fanout1) = fanout_in(&dc1).await;
    let (bus2, fanout2) = fanout_in(&dc2).await;
    let subjects = Subjects::default();
    const T: Duration = Duration::from_secs(30);

    // alice writes through the fanout in dc1.
    let created: v1::CreateConversationResponse = rpc::call(
        &*bus1,
        &subjects.fanout(FanoutMethod::CreateConversation),
        &wire::CreateConversation {
            actor: actor("alice"),
            request: Some(v1::CreateConversationRequest {
                kind: v1::ConversationKind::Direct as i32,
                member_user_ids: vec!["bob".into()],
            }),
        },
        T,
    )
    .await
    .expect("conversation created in dc1");
    let conversation = created.conversation.expect("conversation").conversation_id;
    let (ciphertext, session_id) = megolm_ciphertext("écrit à Paris");
    let sent: v1::SendResult = rpc::call(
        &*bus1,
        &subjects.fanout(FanoutMethod::Submit),
        &wire::Submit {
            actor: actor("alice"),
            request: Some(v1::SendMessage {
                conversation_id: conversation.clone(),
                client_msg_id: "m-1".into(),
                ciphertext: ciphertext.clone(),
                session_id,
            }),
        },
        T,
    )
    .await
    .expect("stored in dc1");

    // bob reads it through the fanout in dc2 (replication between
    // datacenters is asynchronous: it arrives within moments).
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let history: Result<v1::HistoryResponse, _> = rpc::call(
            &*bus2,
            &subjects.fanout(FanoutMethod::History),
            &wire::History {
                actor: actor("bob"),
                request: Some(v1::HistoryRequest {
                    conversation_id: conversation.clone(),
                    ..Default::default()
                }),
            },
            T,
        )
        .await;
        match history {
            Ok(h) if h.messages.iter().any(|m| m.message_id == sent.message_id) => {
                let m = h
                    .messages
                    .iter()
                    .find(|m| m.message_id == sent.message_id)
                    .expect("found");
                assert_eq!(m.ciphertext, ciphertext);
                break;
            }
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "dc2 never read the message: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    fanout1.stop().await;
    fanout2.stop().await;
}
