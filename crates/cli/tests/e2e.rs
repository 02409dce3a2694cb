//! The messaging core end to end: real clients (the SDK, real Olm and
//! Megolm) against a whole platform in this process, on loopback.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chappe_client::ids::UserId;
use chappe_client::{Client, ConversationKind};
use chappe_proto::v1::{
    ClaimKeysRequest, ClientFrame, DeviceRef, HistoryRequest, SendMessage, client_frame,
    server_frame,
};
use common::scenarios::{self, Device, device, receive, texts};
use common::{TestPlatform, client_config, megolm_ciphertext};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_with_two_devices_each_exchange_messages_and_catch_up() {
    let platform = TestPlatform::start().await;
    let observed = platform
        .platform
        .memory_bus()
        .expect("in-process bus")
        .observe();
    let sent_texts = scenarios::two_users_two_devices_exchange_and_catch_up(&platform).await;

    // The server never saw plaintext: not on the bus, not anywhere in the
    // database files.
    assert_no_plaintext_on_bus(observed, &sent_texts);
    let data_dir = platform.dir.path().join("data");
    assert_no_plaintext_in_dir(&data_dir, &sent_texts);
    // Nor is it readable in the devices' own state at rest.
    assert_no_plaintext_in_dir(&platform.dir.path().join("devices"), &sent_texts);

    platform.platform.shutdown().await.expect("shutdown");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Distinctive pieces of each text: any of them found means a leak.
fn needles(texts: &[String]) -> Vec<Vec<u8>> {
    let mut needles = Vec::new();
    for text in texts {
        needles.push(text.as_bytes().to_vec());
        for word in text.split_whitespace().filter(|w| w.len() >= 6) {
            needles.push(word.as_bytes().to_vec());
        }
    }
    needles
}

fn assert_no_plaintext_on_bus(
    mut observed: mpsc::UnboundedReceiver<chappe_bus::Message>,
    texts: &[String],
) {
    let needles = needles(texts);
    let mut seen = 0;
    while let Ok(message) = observed.try_recv() {
        seen += 1;
        for needle in &needles {
            assert!(
                !contains(&message.payload, needle),
                "plaintext {:?} crossed the bus on {}",
                String::from_utf8_lossy(needle),
                message.subject
            );
        }
    }
    assert!(
        seen > 20,
        "the bus observer saw the exchange ({seen} messages)"
    );
}

fn assert_no_plaintext_in_dir(dir: &Path, texts: &[String]) {
    let needles = needles(texts);
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for needle in &needles {
            assert!(
                !contains(&bytes, needle),
                "plaintext {:?} found in {}",
                String::from_utf8_lossy(needle),
                path.display()
            );
        }
    }
    assert!(files > 0, "no file under {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_stored_once_with_the_same_id() {
    let platform = TestPlatform::start().await;
    let token = platform.token("claire", "desk").await;
    let mut client = platform.client(Some(token.clone())).await;
    let conversation = client
        .create_conversation(chappe_proto::v1::CreateConversationRequest {
            kind: chappe_proto::v1::ConversationKind::Group as i32,
            member_user_ids: vec!["denis".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .conversation
        .unwrap()
        .conversation_id;

    let (tx, rx) = mpsc::channel(4);
    let mut answers = client
        .connect(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (ciphertext, session_id) = megolm_ciphertext("once only");
    let mut results = Vec::new();
    for request_id in [1, 2] {
        tx.send(ClientFrame {
            request_id,
            trace_context: Default::default(),
            body: Some(client_frame::Body::Send(SendMessage {
                conversation_id: conversation.clone(),
                client_msg_id: "retry-me".into(),
                ciphertext: ciphertext.clone(),
                session_id: session_id.clone(),
            })),
        })
        .await
        .unwrap();
        let answer = loop {
            let frame = tokio::time::timeout(WAIT, answers.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if frame.request_id == request_id {
                break frame;
            }
        };
        match answer.body {
            Some(server_frame::Body::Sent(sent)) => results.push(sent),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(results[0].message_id, results[1].message_id);
    assert!(!results[0].duplicate && results[1].duplicate);

    let history = client
        .history(HistoryRequest {
            conversation_id: conversation,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.messages.len(), 1, "stored once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_claims_through_the_gateway_get_ten_keys_once_and_forty_fallbacks() {
    let platform = TestPlatform::start().await;
    // A real device uploads its keys through the SDK; keep 10 one-time keys.
    let mut target = client_config(&platform, "target-device");
    target.one_time_keys_target = 10;
    let owner = Client::login_dev(target, "target", "device")
        .await
        .expect("login");
    drop(owner);

    let token = platform.token("claimer", "device").await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = platform.client(Some(token.clone())).await;
        tasks.push(tokio::spawn(async move {
            client
                .claim_keys(ClaimKeysRequest {
                    devices: vec![DeviceRef {
                        user_id: "target".into(),
                        device_id: "device".into(),
                    }],
                })
                .await
                .expect("claim answered")
                .into_inner()
        }));
    }
    let mut one_time: BTreeMap<String, usize> = BTreeMap::new();
    let mut fallbacks = 0;
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(answer.unavailable.is_empty());
        let key = answer.keys[0].key.clone().expect("a key");
        if key.fallback {
            fallbacks += 1;
        } else {
            *one_time.entry(key.key_id).or_default() += 1;
        }
    }
    assert_eq!(one_time.len(), 10, "{one_time:?}");
    assert!(
        one_time.values().all(|n| *n == 1),
        "each key once: {one_time:?}"
    );
    assert_eq!(fallbacks, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_of_three_users_all_read_each_other() {
    scenarios::group_of_three_all_read_each_other(&TestPlatform::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_device_reads_the_next_message_without_waiting_for_a_cache() {
    scenarios::new_device_reads_the_next_message(&TestPlatform::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_removed_by_someone_else_cannot_read_what_follows() {
    scenarios::removed_member_cannot_read_what_follows(&TestPlatform::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_absence_syncs_in_pages_that_fit_and_loses_nothing() {
    // Answers of at most ~4 KiB: catching up takes many rounds.
    let platform = TestPlatform::start_with(|c| {
        c.fanout.max_sync_bytes = 4 * 1024;
        c.fanout.max_history_bytes = 4 * 1024;
    })
    .await;
    let alice = device(&platform, "alice", "laptop").await;
    let bob = device(&platform, "bob", "phone").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();
    let Device { client, events, .. } = bob;
    client.disconnect();
    drop(events);
    drop(client);
    let missed = texts("message pendant l'absence numéro", 40);
    for text in &missed {
        alice.client.send_text(&chat.id, text).await.unwrap();
    }
    let client = Client::open(client_config(&platform, "bob-phone"))
        .await
        .unwrap();
    let mut bob = Device {
        events: client.connect().await.unwrap(),
        client,
        received: Vec::new(),
    };
    let got = receive(&mut bob, &missed).await;
    let bodies: Vec<&String> = got.iter().map(|m| &m.body).collect();
    assert_eq!(
        bodies,
        missed.iter().collect::<Vec<_>>(),
        "all of it, in order"
    );
    let history = bob.client.history(&chat.id, 40).await.unwrap();
    assert_eq!(history.len(), 40, "history pages through small answers too");
}
