//! The SDK (`chappe_client::Client`) against the real platform on loopback:
//! login and key upload, room-key sharing, pushes and sync, persistence
//! across restarts, retries, reconnection. Network faults (a lost answer, a
//! cut connection) come from the fault-injecting proxy in `common::proxy`.

mod common;

use std::path::Path;
use std::time::Duration;

use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{
    Client, ClientConfig, ConversationKind, DecryptedMessage, Error, Event, Events, KdfParams,
};
use chappe_proto::v1::ListConversationsRequest;
use chappe_proto::v1::internal::{DeliverJob, UserDelivery, user_delivery};
use chappe_storage::MessageRow;
use common::TestPlatform;
use common::proxy::FaultProxy;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

fn config(url: &str, dir: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(url, dir, "correct horse battery staple");
    c.kdf = KdfParams::insecure_fast();
    c.request_timeout = Duration::from_secs(5);
    c.reconnect_backoff_min = Duration::from_millis(20);
    c.reconnect_backoff_max = Duration::from_millis(200);
    c.one_time_keys_target = 10;
    c.lock_wait = Duration::from_secs(1);
    c
}

/// A device's state directory under the platform's temporary directory.
fn dir(platform: &TestPlatform, name: &str) -> std::path::PathBuf {
    platform.dir.path().join("devices").join(name)
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// The next message event, skipping the others.
async fn next_message(events: &mut Events) -> DecryptedMessage {
    timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(Event::Message(m)) => return m,
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .expect("no message in time")
}

fn message_bodies(events: &[Event]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.body.as_str()),
            _ => None,
        })
        .collect()
}

/// Every message of a conversation in the store, oldest first.
async fn stored(platform: &TestPlatform, conversation: &ConversationId) -> Vec<MessageRow> {
    platform
        .platform
        .store()
        .messages_after(*conversation, None, 1_000)
        .await
        .unwrap()
}

async fn inbox_len(platform: &TestPlatform, user: &str, device: &str) -> usize {
    platform
        .platform
        .store()
        .inbox(user, device, 1_000)
        .await
        .unwrap()
        .len()
}

/// The to-device messages the platform stored, as fanout announces each one
/// on the bus (a `UserDelivery` to its recipient's user): who got one from
/// whom, as `(recipient, sender)` in `user/device` form.
struct ToDeviceLog {
    bus: mpsc::UnboundedReceiver<chappe_bus::Message>,
    seen: Vec<(String, String)>,
}

impl ToDeviceLog {
    fn new(platform: &TestPlatform) -> Self {
        Self {
            bus: platform
                .platform
                .memory_bus()
                .expect("in-process bus")
                .observe(),
            seen: Vec::new(),
        }
    }

    /// Everything stored since the log started.
    fn seen(&mut self) -> &[(String, String)] {
        let prefix = format!("{}.deliver.u.", chappe_bus::subjects::DEFAULT_PREFIX);
        while let Ok(message) = self.bus.try_recv() {
            let Some(user) = message.subject.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(UserDelivery {
                item: Some(user_delivery::Item::ToDevice(delivery)),
            }) = UserDelivery::decode(message.payload)
            else {
                continue;
            };
            let sender = delivery
                .event
                .and_then(|e| e.sender)
                .map(|s| format!("{}/{}", s.user_id, s.device_id))
                .unwrap_or_default();
            self.seen
                .push((format!("{user}/{}", delivery.device_id), sender));
        }
        &self.seen
    }

    fn len(&mut self) -> usize {
        self.seen().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_three_devices_talk() {
    let platform = TestPlatform::start().await;
    let mut to_device = ToDeviceLog::new(&platform);
    let url = platform.url();
    let a1 = Client::login_dev(config(&url, &dir(&platform, "a1")), "alice", "A1")
        .await
        .unwrap();
    let a2 = Client::login_dev(config(&url, &dir(&platform, "a2")), "alice", "A2")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&url, &dir(&platform, "b1")), "bob", "B1")
        .await
        .unwrap();
    let store = platform.platform.store();
    assert_eq!(store.count_one_time_keys("bob", "B1").await.unwrap(), 10);
    assert_eq!(b1.user_id().as_str(), "bob");
    assert_eq!(b1.device_id().as_str(), "B1");

    let mut a1_events = a1.connect().await.unwrap();
    let mut a2_events = a2.connect().await.unwrap();
    let mut b1_events = b1.connect().await.unwrap();

    let chat = a1
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .unwrap();
    let sent = a1.send_text(&chat.id, "hello bob").await.unwrap();
    assert!(!sent.duplicate);
    // Room key went to B1 and to alice's other device, not to A1 itself.
    let mut shared = to_device.seen().to_vec();
    shared.sort();
    assert_eq!(
        shared,
        [
            ("alice/A2".to_owned(), "alice/A1".to_owned()),
            ("bob/B1".to_owned(), "alice/A1".to_owned()),
        ]
    );

    let got = next_message(&mut b1_events).await;
    assert_eq!(got.body, "hello bob");
    assert_eq!(got.message_id, sent.message_id);
    assert_eq!(got.sender_user.as_str(), "alice");
    assert_eq!(got.sender_device.as_str(), "A1");
    assert_eq!(next_message(&mut a2_events).await.body, "hello bob");

    let reply = b1.send_text(&chat.id, "hi alice").await.unwrap();
    let at_a1 = next_message(&mut a1_events).await;
    assert_eq!(
        (at_a1.body.as_str(), at_a1.message_id),
        ("hi alice", reply.message_id)
    );
    assert_eq!(next_message(&mut a2_events).await.body, "hi alice");

    // Room keys are acknowledged (inboxes drained) once persisted: a message
    // is handed to the app only after the room key that opens it was stored
    // on the device and its acknowledgement answered.
    assert_eq!(inbox_len(&platform, "bob", "B1").await, 0);
    assert_eq!(inbox_len(&platform, "alice", "A2").await, 0);

    // A second message needs no new room key.
    let before = to_device.len();
    a1.send_text(&chat.id, "again").await.unwrap();
    assert_eq!(next_message(&mut b1_events).await.body, "again");
    assert_eq!(to_device.len(), before);

    // Pushed then synced: delivered once.
    assert!(
        b1.sync()
            .await
            .unwrap()
            .iter()
            .all(|e| !matches!(e, Event::Message(_)))
    );

    let history = b1.history(&chat.id, 10).await.unwrap();
    let bodies: Vec<_> = history.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["hello bob", "hi alice", "again"]);
    let listed = a2.conversations().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, chat.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart_and_is_locked_while_open() {
    let platform = TestPlatform::start().await;
    let mut to_device = ToDeviceLog::new(&platform);
    let url = platform.url();
    let a_dir = dir(&platform, "a1");
    let b_dir = dir(&platform, "b1");
    let a1 = Client::login_dev(config(&url, &a_dir), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&url, &b_dir), "bob", "B1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Group, &[user("bob")])
        .await
        .unwrap();
    a1.send_text(&chat.id, "before restart").await.unwrap();

    // A second process (or client) on the same directory is refused.
    let err = Client::open(config(&url, &a_dir)).await.unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");

    let events = b1.sync().await.unwrap();
    assert_eq!(message_bodies(&events), ["before restart"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ConversationUpdated(c) if c.id == chat.id))
    );

    // The lock is released with the client.
    drop(a1);
    drop(b1);

    let mut wrong = config(&url, &a_dir);
    wrong.passphrase = "wrong".into();
    assert!(matches!(
        Client::open(wrong).await.unwrap_err(),
        Error::WrongPassphrase
    ));
    let a1 = Client::open(config(&url, &a_dir)).await.unwrap();
    let b1 = Client::login_dev(config(&url, &b_dir), "bob", "B1")
        .await
        .unwrap();
    assert!(matches!(
        Client::login_dev(config(&url, &b_dir), "bob", "B2").await,
        Err(Error::Locked(_))
    ));

    // Sessions were persisted: the same Megolm session goes on, and the
    // cursor means nothing old comes back.
    a1.send_text(&chat.id, "after restart").await.unwrap();
    let events = b1.sync().await.unwrap();
    assert_eq!(message_bodies(&events), ["after restart"]);
    assert_eq!(to_device.len(), 1, "no new room key after the restart");
    drop(b1);
    let err = Client::login_dev(config(&url, &b_dir), "carol", "C1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answer_is_retried_with_the_same_id() {
    let platform = TestPlatform::start().await;
    let proxy = FaultProxy::start(platform.platform.gateway_addr()).await;
    // alice goes through the proxy, bob straight to the gateway.
    let a1 = Client::login_dev(config(&proxy.url(), &dir(&platform, "a1")), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&platform.url(), &dir(&platform, "b1")), "bob", "B1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .unwrap();
    // Shares the room key, so that the next send is a single Send frame on
    // the open Connect stream, with nothing else waiting for an answer.
    a1.send_text(&chat.id, "first").await.unwrap();

    // The next answer from the server is lost with its connection: the
    // server stores the message, the client never hears of it.
    let mut bus = platform
        .platform
        .memory_bus()
        .expect("in-process bus")
        .observe();
    proxy.lose_replies();
    let sending = tokio::spawn({
        let a1 = a1.clone();
        let id = chat.id;
        async move { a1.send_text(&id, "once").await }
    });
    let jobs = format!("{}.jobs.deliver", chappe_bus::subjects::DEFAULT_PREFIX);
    let first_id = timeout(WAIT, async {
        loop {
            let message = bus.recv().await.expect("the bus goes on");
            if message.subject == jobs {
                // Queued only once the store committed the message.
                let job = DeliverJob::decode(message.payload).unwrap();
                assert_eq!(job.conversation_id, chat.id.to_string());
                return job.message_id;
            }
        }
    })
    .await
    .expect("the send reached the server");
    assert!(!sending.is_finished(), "the client saw no answer");
    proxy.sever();

    let sent = timeout(WAIT, sending)
        .await
        .expect("the send ends")
        .unwrap()
        .unwrap();
    assert!(sent.duplicate);
    assert_eq!(sent.message_id.to_string(), first_id);
    let copies: Vec<_> = stored(&platform, &chat.id)
        .await
        .into_iter()
        .filter(|m| m.client_msg_id == sent.client_msg_id)
        .collect();
    assert_eq!(copies.len(), 1, "stored once");
    assert_eq!(copies[0].message_id, sent.message_id);
    let events = b1.sync().await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Message(m) if m.body == "once"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_and_catches_up() {
    const TTL: Duration = Duration::from_secs(1);
    let platform = TestPlatform::start_with(|c| c.gateway.session_ttl = TTL).await;
    let proxy = FaultProxy::start(platform.platform.gateway_addr()).await;
    let a1 = Client::login_dev(
        config(&platform.url(), &dir(&platform, "a1")),
        "alice",
        "A1",
    )
    .await
    .unwrap();
    // bob goes through the proxy.
    let b1 = Client::login_dev(config(&proxy.url(), &dir(&platform, "b1")), "bob", "B1")
        .await
        .unwrap();
    let mut events = b1.connect().await.unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .unwrap();
    a1.send_text(&chat.id, "one").await.unwrap();
    assert_eq!(next_message(&mut events).await.body, "one");

    // bob's connection is cut, and the network stays down until every
    // token issued so far has expired: bob comes back with a stale token.
    let issued_before = platform.token("witness", "W1").await;
    proxy.refuse_for(TTL + Duration::from_millis(200));
    proxy.sever();
    a1.send_text(&chat.id, "two").await.unwrap();
    let mut saw_disconnect = false;
    let got = timeout(WAIT, async {
        loop {
            match events.next().await {
                Some(Event::Disconnected { .. }) => saw_disconnect = true,
                Some(Event::Message(m)) => return m,
                Some(_) => {}
                None => panic!("stream ended"),
            }
        }
    })
    .await
    .unwrap();
    assert!(saw_disconnect);
    assert_eq!(got.body, "two");
    // The premise: tokens from before the outage are refused now.
    let refused = platform
        .client(Some(issued_before))
        .await
        .list_conversations(ListConversationsRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_member_cannot_read_what_follows() {
    let platform = TestPlatform::start().await;
    let url = platform.url();
    let a1 = Client::login_dev(config(&url, &dir(&platform, "a1")), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&url, &dir(&platform, "b1")), "bob", "B1")
        .await
        .unwrap();
    let c1 = Client::login_dev(config(&url, &dir(&platform, "c1")), "carol", "C1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Group, &[user("bob"), user("carol")])
        .await
        .unwrap();
    a1.send_text(&chat.id, "all of us").await.unwrap();
    let carol_history = c1.history(&chat.id, 10).await.unwrap();
    assert_eq!(carol_history.len(), 0, "no key yet before a sync");
    let synced = c1.sync().await.unwrap();
    assert!(
        synced
            .iter()
            .any(|e| matches!(e, Event::Message(m) if m.body == "all of us"))
    );

    a1.remove_member(&chat.id, &user("carol")).await.unwrap();
    a1.send_text(&chat.id, "without carol").await.unwrap();
    let bob_events = b1.sync().await.unwrap();
    assert_eq!(message_bodies(&bob_events), ["all of us", "without carol"]);

    // Carol is no longer a member: the server refuses her; and even the
    // ciphertext would not open, as the new room key never reached her.
    let err = c1.send_text(&chat.id, "still here?").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert_eq!(inbox_len(&platform, "carol", "C1").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let platform = TestPlatform::start().await;
    let url = platform.url();
    let a1 = Client::login_dev(config(&url, &dir(&platform, "a1")), "alice", "A1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Group, &[])
        .await
        .unwrap();
    assert!(matches!(
        a1.send_text(&chat.id, "").await,
        Err(Error::InvalidInput(_))
    ));
    let huge = "x".repeat(64 * 1024 + 1);
    assert!(matches!(
        a1.send_text(&chat.id, &huge).await,
        Err(Error::InvalidInput(_))
    ));
    let unknown = ConversationId::random();
    let err = a1.send_text(&unknown, "hello?").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(matches!(
        Client::login_dev(config(&url, &dir(&platform, "x")), "Not A User", "X").await,
        Err(Error::Id(_))
    ));
    assert!(matches!(
        Client::open(config(&url, &dir(&platform, "nothing"))).await,
        Err(Error::NoState(_))
    ));
    let mut bad = config("not a url", &dir(&platform, "y"));
    bad.server_url = "::::".into();
    assert!(matches!(Client::open(bad).await, Err(Error::Config(_))));
    // A self-conversation works end to end (no other device to share with).
    a1.send_text(&chat.id, "note to self").await.unwrap();
    let history = a1.history(&chat.id, 5).await.unwrap();
    assert_eq!(history[0].body, "note to self");
}
