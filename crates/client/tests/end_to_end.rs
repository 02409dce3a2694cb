//! The SDK against an in-process fake gateway over real gRPC: login and key
//! upload, room-key sharing, pushes and sync, persistence across restarts,
//! retries, reconnection.

mod support;

use std::path::Path;
use std::time::Duration;

use chappe_client::{
    Client, ClientConfig, ConversationKind, CryptoError, DecryptedMessage, Error, Event, Events,
    KdfParams,
};
use chappe_proto::ids::UserId;
use tokio::time::timeout;

fn config(url: &str, dir: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(url, dir, "correct horse battery staple");
    c.kdf = KdfParams::insecure_fast();
    c.request_timeout = Duration::from_secs(2);
    c.reconnect_backoff_min = Duration::from_millis(20);
    c.reconnect_backoff_max = Duration::from_millis(200);
    c.one_time_keys_target = 10;
    c.lock_wait = Duration::from_millis(200);
    c
}

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// The next message event, skipping the others.
async fn next_message(events: &mut Events) -> DecryptedMessage {
    timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(Event::Message(m)) => return m,
                Some(_) => continue,
                None => panic!("event stream ended"),
            }
        }
    })
    .await
    .expect("no message within 10 s")
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    timeout(Duration::from_secs(10), async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("condition not met within 10 s");
}

#[tokio::test]
async fn two_users_three_devices_talk() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a1 = Client::login_dev(config(&server.url, &tmp.path().join("a1")), "alice", "A1")
        .await
        .unwrap();
    let a2 = Client::login_dev(config(&server.url, &tmp.path().join("a2")), "alice", "A2")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&server.url, &tmp.path().join("b1")), "bob", "B1")
        .await
        .unwrap();
    assert_eq!(server.gateway.one_time_key_count("bob", "B1"), 10);
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
    assert_eq!(
        server
            .gateway
            .to_device_messages
            .load(std::sync::atomic::Ordering::SeqCst),
        2
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

    // Room keys are acknowledged (inboxes drained) once persisted.
    wait_for(|| server.gateway.inbox_len("bob", "B1") == 0).await;
    wait_for(|| server.gateway.inbox_len("alice", "A2") == 0).await;

    // A second message needs no new room key.
    let before = server
        .gateway
        .to_device_messages
        .load(std::sync::atomic::Ordering::SeqCst);
    a1.send_text(&chat.id, "again").await.unwrap();
    assert_eq!(next_message(&mut b1_events).await.body, "again");
    assert_eq!(
        server
            .gateway
            .to_device_messages
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );

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

#[tokio::test]
async fn state_survives_a_restart_and_is_locked_while_open() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a_dir = tmp.path().join("a1");
    let b_dir = tmp.path().join("b1");
    let a1 = Client::login_dev(config(&server.url, &a_dir), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&server.url, &b_dir), "bob", "B1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Group, &[user("bob")])
        .await
        .unwrap();
    a1.send_text(&chat.id, "before restart").await.unwrap();

    // A second process (or client) on the same directory is refused.
    let err = Client::open(config(&server.url, &a_dir)).await.unwrap_err();
    assert!(matches!(err, Error::Locked(_)), "{err}");

    let events = b1.sync().await.unwrap();
    let bodies: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["before restart"]);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ConversationUpdated(c) if c.id == chat.id))
    );

    // The lock is released with the client.
    drop(a1);
    drop(b1);

    let mut wrong = config(&server.url, &a_dir);
    wrong.passphrase = "wrong".into();
    assert!(matches!(
        Client::open(wrong).await.unwrap_err(),
        Error::WrongPassphrase
    ));
    let a1 = Client::open(config(&server.url, &a_dir)).await.unwrap();
    let b1 = Client::login_dev(config(&server.url, &b_dir), "bob", "B1")
        .await
        .unwrap();
    assert!(matches!(
        Client::login_dev(config(&server.url, &tmp.path().join("b1")), "bob", "B2").await,
        Err(Error::Locked(_))
    ));

    // Sessions were persisted: the same Megolm session goes on, and the
    // cursor means nothing old comes back.
    a1.send_text(&chat.id, "after restart").await.unwrap();
    let events = b1.sync().await.unwrap();
    let bodies: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["after restart"]);
    assert_eq!(
        server
            .gateway
            .to_device_messages
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no new room key after the restart"
    );
    drop(b1);
    let err = Client::login_dev(config(&server.url, &b_dir), "carol", "C1")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::StateMismatch { .. }), "{err}");
}

#[tokio::test]
async fn lost_answer_is_retried_with_the_same_id() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut c = config(&server.url, &tmp.path().join("a1"));
    c.request_timeout = Duration::from_millis(300);
    let a1 = Client::login_dev(c, "alice", "A1").await.unwrap();
    let b1 = Client::login_dev(config(&server.url, &tmp.path().join("b1")), "bob", "B1")
        .await
        .unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .unwrap();
    server.gateway.lose_next_send_answer();
    let sent = a1.send_text(&chat.id, "once").await.unwrap();
    assert!(sent.duplicate);
    assert_eq!(server.gateway.message_count(&chat.id.to_string()), 1);
    let events = b1.sync().await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Message(m) if m.body == "once"))
            .count(),
        1
    );
}

#[tokio::test]
async fn reconnects_and_catches_up() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a1 = Client::login_dev(config(&server.url, &tmp.path().join("a1")), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&server.url, &tmp.path().join("b1")), "bob", "B1")
        .await
        .unwrap();
    let mut events = b1.connect().await.unwrap();
    let chat = a1
        .create_conversation(ConversationKind::Direct, &[user("bob")])
        .await
        .unwrap();
    a1.send_text(&chat.id, "one").await.unwrap();
    assert_eq!(next_message(&mut events).await.body, "one");

    server.gateway.kick("bob", "B1");
    server.gateway.expire_tokens();
    a1.send_text(&chat.id, "two").await.unwrap();
    let mut saw_disconnect = false;
    let got = timeout(Duration::from_secs(10), async {
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
}

#[tokio::test]
async fn removed_member_cannot_read_what_follows() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a1 = Client::login_dev(config(&server.url, &tmp.path().join("a1")), "alice", "A1")
        .await
        .unwrap();
    let b1 = Client::login_dev(config(&server.url, &tmp.path().join("b1")), "bob", "B1")
        .await
        .unwrap();
    let c1 = Client::login_dev(config(&server.url, &tmp.path().join("c1")), "carol", "C1")
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
    let bodies: Vec<_> = bob_events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.body.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(bodies, ["all of us", "without carol"]);

    // Carol is no longer a member: the server refuses her; and even the
    // ciphertext would not open, as the new room key never reached her.
    let err = c1.send_text(&chat.id, "still here?").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert_eq!(server.gateway.inbox_len("carol", "C1"), 0);
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let server = support::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let a1 = Client::login_dev(config(&server.url, &tmp.path().join("a1")), "alice", "A1")
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
    let unknown = chappe_proto::ids::ConversationId::random();
    let err = a1.send_text(&unknown, "hello?").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert!(matches!(
        Client::login_dev(
            config(&server.url, &tmp.path().join("x")),
            "Not A User",
            "X"
        )
        .await,
        Err(Error::Id(_))
    ));
    assert!(matches!(
        Client::open(config(&server.url, &tmp.path().join("nothing"))).await,
        Err(Error::NoState(_))
    ));
    let mut bad = config("not a url", &tmp.path().join("y"));
    bad.server_url = "::::".into();
    assert!(matches!(Client::open(bad).await, Err(Error::Config(_))));
    // A self-conversation works end to end (no other device to share with).
    a1.send_text(&chat.id, "note to self").await.unwrap();
    let history = a1.history(&chat.id, 5).await.unwrap();
    assert_eq!(history[0].body, "note to self");
    let _ = CryptoError::MissingRoomKey {
        session_id: String::new(),
    };
}
