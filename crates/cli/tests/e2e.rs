//! The messaging core end to end: real clients (the SDK, real Olm and
//! Megolm) against a whole platform in this process, on loopback.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{Client, ConversationKind, DecryptedMessage, Event, Events};
use chappe_proto::v1::{
    ClaimKeysRequest, ClientFrame, DeviceRef, HistoryRequest, SendMessage, client_frame,
    server_frame,
};
use common::{TestPlatform, client_config, megolm_ciphertext};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

const WAIT: Duration = Duration::from_secs(20);

struct Device {
    client: Client,
    events: Events,
    /// Every message received so far, in arrival order.
    received: Vec<DecryptedMessage>,
}

async fn device(platform: &TestPlatform, user: &str, device: &str) -> Device {
    let client = Client::login_dev(
        client_config(platform, &format!("{user}-{device}")),
        user,
        device,
    )
    .await
    .expect("login");
    let events = client.connect().await.expect("connect");
    Device {
        client,
        events,
        received: Vec::new(),
    }
}

/// Waits until `device` has received messages with all of `bodies`, in any
/// order; returns everything it received so far, in arrival order.
async fn receive(device: &mut Device, bodies: &[String]) -> Vec<DecryptedMessage> {
    let got = &mut device.received;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !bodies
        .iter()
        .all(|b| got.iter().any(|m: &DecryptedMessage| &m.body == b))
    {
        let event = tokio::time::timeout_at(deadline, device.events.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}/{} timed out; has {:?}, wants {:?}",
                    device.client.user_id(),
                    device.client.device_id(),
                    got.iter().map(|m| &m.body).collect::<Vec<_>>(),
                    bodies
                )
            })
            .expect("events go on");
        match event {
            Event::Message(m) => got.push(m),
            Event::Undecryptable { reason, .. } => {
                // Only a key still on its way is acceptable; it resolves.
                assert!(
                    matches!(reason, chappe_client::CryptoError::MissingRoomKey { .. }),
                    "undecryptable: {reason:?}"
                );
            }
            Event::ToDeviceRejected { reason, .. } => panic!("to-device rejected: {reason:?}"),
            _ => {}
        }
    }
    got.clone()
}

fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_with_two_devices_each_exchange_messages_and_catch_up() {
    let platform = TestPlatform::start().await;
    let observed = platform
        .platform
        .memory_bus()
        .expect("in-process bus")
        .observe();
    let mut alice_laptop = device(&platform, "alice", "laptop").await;
    let mut alice_phone = device(&platform, "alice", "phone").await;
    let mut bob_laptop = device(&platform, "bob", "laptop").await;
    let mut bob_phone = device(&platform, "bob", "phone").await;

    let bob = UserId::parse("bob").unwrap();
    let chat = alice_laptop
        .client
        .create_conversation(ConversationKind::Direct, &[bob])
        .await
        .expect("conversation");
    let id = chat.id;

    // Alice writes from her laptop, bob answers from his phone.
    let from_alice = texts("Bonjour Bob, le rapport est prêt", 3);
    for text in &from_alice {
        alice_laptop
            .client
            .send_text(&id, text)
            .await
            .expect("alice sends");
    }
    let from_bob = texts("Merci Alice, je le lis", 2);
    for text in &from_bob {
        bob_phone
            .client
            .send_text(&id, text)
            .await
            .expect("bob sends");
    }

    // Every device of each side decrypts every message of the other side.
    for bob_device in [&mut bob_laptop, &mut bob_phone] {
        let got = receive(bob_device, &from_alice).await;
        assert!(got.iter().all(|m| m.sender_user.as_str() == "alice"
            && m.sender_device.as_str() == "laptop"
            && m.conversation_id == id));
    }
    for alice_device in [&mut alice_laptop, &mut alice_phone] {
        receive(alice_device, &from_bob).await;
    }
    // A user's other device sees what the user sent, too.
    receive(&mut alice_phone, &from_alice).await;

    // Bob's phone goes offline; alice keeps writing.
    let Device { client, events, .. } = bob_phone;
    client.disconnect();
    drop(events);
    drop(client);
    let while_away = texts("Tu es là ? Message", 5);
    for text in &while_away {
        alice_laptop
            .client
            .send_text(&id, text)
            .await
            .expect("alice sends");
    }
    receive(&mut bob_laptop, &while_away).await;

    // It comes back (a new process would do the same: state is on disk)
    // and gets exactly what it missed, in order.
    let client = Client::open(client_config(&platform, "bob-phone"))
        .await
        .expect("reopen");
    let mut bob_phone = Device {
        events: client.connect().await.expect("reconnect"),
        client,
        received: Vec::new(),
    };
    let got = receive(&mut bob_phone, &while_away).await;
    let bodies: Vec<&String> = got
        .iter()
        .map(|m| &m.body)
        .filter(|b| while_away.contains(b))
        .collect();
    assert_eq!(
        bodies,
        while_away.iter().collect::<Vec<_>>(),
        "missed messages arrive in order"
    );
    let ids: Vec<_> = got.iter().map(|m| m.message_id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "each once, in server order");

    // History decrypts too, oldest first.
    let history = bob_phone.client.history(&id, 50).await.expect("history");
    let all: Vec<String> = from_alice
        .iter()
        .chain(&from_bob)
        .chain(&while_away)
        .cloned()
        .collect();
    let history_bodies: Vec<String> = history.iter().map(|m| m.body.clone()).collect();
    for text in &all {
        assert!(
            history_bodies.contains(text),
            "history lacks {text:?}: {history_bodies:?}"
        );
    }

    // The server never saw plaintext: not on the bus, not anywhere in the
    // database files.
    let sent_texts: Vec<String> = all.clone();
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
    let platform = TestPlatform::start().await;
    let mut a = device(&platform, "agnes", "pc").await;
    let mut b = device(&platform, "bruno", "pc").await;
    let mut c = device(&platform, "chloe", "pc").await;
    let group = a
        .client
        .create_conversation(
            ConversationKind::Group,
            &[
                UserId::parse("bruno").unwrap(),
                UserId::parse("chloe").unwrap(),
            ],
        )
        .await
        .unwrap();
    let id: ConversationId = group.id;
    let from = |who: &str| vec![format!("note de {who}")];
    a.client.send_text(&id, &from("agnes")[0]).await.unwrap();
    b.client.send_text(&id, &from("bruno")[0]).await.unwrap();
    c.client.send_text(&id, &from("chloe")[0]).await.unwrap();
    let mut all_b = from("agnes");
    all_b.extend(from("chloe"));
    receive(&mut b, &all_b).await;
    let mut all_c = from("agnes");
    all_c.extend(from("bruno"));
    receive(&mut c, &all_c).await;
    let mut all_a = from("bruno");
    all_a.extend(from("chloe"));
    receive(&mut a, &all_a).await;
}

/// Waits for an event matching `want`, keeping messages it passes.
async fn wait_event(device: &mut Device, what: &str, want: impl Fn(&Event) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, device.events.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} in time"))
            .expect("events go on");
        if want(&event) {
            return;
        }
        if let Event::Message(m) = event {
            device.received.push(m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_device_reads_the_next_message_without_waiting_for_a_cache() {
    let platform = TestPlatform::start().await;
    let mut alice = device(&platform, "alice", "laptop").await;
    let mut bob_phone = device(&platform, "bob", "phone").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();
    alice
        .client
        .send_text(&chat.id, "avant la tablette")
        .await
        .unwrap();
    receive(&mut bob_phone, &["avant la tablette".into()]).await;

    // Bob adds a tablet; alice's client hears of it (device caches last
    // minutes by default, so only the notification can make this work).
    let mut bob_tablet = device(&platform, "bob", "tablet").await;
    wait_event(
        &mut alice,
        "device-list change",
        |e| matches!(e, Event::DeviceListChanged { user_id } if user_id.as_str() == "bob"),
    )
    .await;
    alice
        .client
        .send_text(&chat.id, "pour tous les appareils")
        .await
        .unwrap();
    // The tablet cannot read what came before it (a Megolm session shared
    // from its current index on): that shows as undecryptable history.
    wait_event(
        &mut bob_tablet,
        "the new message",
        |e| matches!(e, Event::Message(m) if m.body == "pour tous les appareils"),
    )
    .await;
    receive(&mut bob_phone, &["pour tous les appareils".into()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_removed_by_someone_else_cannot_read_what_follows() {
    let platform = TestPlatform::start().await;
    let mut agnes = device(&platform, "agnes", "pc").await;
    let bruno = device(&platform, "bruno", "pc").await;
    let mut chloe = device(&platform, "chloe", "pc").await;
    let group = agnes
        .client
        .create_conversation(
            ConversationKind::Group,
            &[
                UserId::parse("bruno").unwrap(),
                UserId::parse("chloe").unwrap(),
            ],
        )
        .await
        .unwrap();
    agnes
        .client
        .send_text(&group.id, "bienvenue")
        .await
        .unwrap();
    receive(&mut chloe, &["bienvenue".into()]).await;

    // Bruno, on his own client, removes chloe; agnes's client is told.
    bruno
        .client
        .remove_member(&group.id, &UserId::parse("chloe").unwrap())
        .await
        .unwrap();
    wait_event(
        &mut agnes,
        "membership change",
        |e| matches!(e, Event::ConversationUpdated(c) if c.id == group.id && c.members.len() == 2),
    )
    .await;
    agnes
        .client
        .send_text(&group.id, "entre nous")
        .await
        .unwrap();

    let mut bruno = bruno;
    receive(&mut bruno, &["entre nous".into()]).await;

    // The room key rotated: the message after the removal is under a new
    // Megolm session, which chloe's device never received.
    use chappe_storage::MessageRepo as _;
    let stored = platform
        .platform
        .store()
        .messages_after(group.id, None, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
    assert_ne!(
        stored[0].session_id, stored[1].session_id,
        "the session rotated"
    );
    while let Some(event) = chloe.events.try_next() {
        if let Event::Message(m) = event {
            assert_ne!(
                m.body, "entre nous",
                "a removed member read a later message"
            );
        }
    }
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
