//! The messaging-core scenarios, written once and run against the platform
//! in one process (tests/e2e.rs) and against services in processes of their
//! own over NATS (tests/cluster.rs).

use std::time::Duration;

use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{Client, ConversationKind, DecryptedMessage, Event, Events};

use super::{Deployment, client_config};

pub const WAIT: Duration = Duration::from_secs(30);

pub struct Device {
    pub client: Client,
    pub events: Events,
    /// Every message received so far, in arrival order.
    pub received: Vec<DecryptedMessage>,
}

pub async fn device(platform: &impl Deployment, user: &str, device: &str) -> Device {
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
pub async fn receive(device: &mut Device, bodies: &[String]) -> Vec<DecryptedMessage> {
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

pub fn texts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix} {i}")).collect()
}

/// Waits for an event matching `want`, keeping messages it passes.
pub async fn wait_event(device: &mut Device, what: &str, want: impl Fn(&Event) -> bool) {
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

/// Two users with two devices each: every device reads every message of
/// the other side, an offline device catches up exactly, history decrypts.
/// Returns every text sent, for the caller's plaintext checks.
pub async fn two_users_two_devices_exchange_and_catch_up(
    platform: &impl Deployment,
) -> Vec<String> {
    let mut alice_laptop = device(platform, "alice", "laptop").await;
    let mut alice_phone = device(platform, "alice", "phone").await;
    let mut bob_laptop = device(platform, "bob", "laptop").await;
    let mut bob_phone = device(platform, "bob", "phone").await;

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
    let client = Client::open(client_config(platform, "bob-phone"))
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

    all
}

/// Three users in a group each read the other two.
pub async fn group_of_three_all_read_each_other(platform: &impl Deployment) {
    let mut a = device(platform, "agnes", "pc").await;
    let mut b = device(platform, "bruno", "pc").await;
    let mut c = device(platform, "chloe", "pc").await;
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

/// A device added mid-conversation is told to the sender at once and reads
/// the next message.
pub async fn new_device_reads_the_next_message(platform: &impl Deployment) {
    let mut alice = device(platform, "alice", "laptop").await;
    let mut bob_phone = device(platform, "bob", "phone").await;
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
    let mut bob_tablet = device(platform, "bob", "tablet").await;
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

/// A member removed by someone else does not read what follows (the room
/// key rotated).
pub async fn removed_member_cannot_read_what_follows(platform: &impl Deployment) {
    let mut agnes = device(platform, "agnes", "pc").await;
    let bruno = device(platform, "bruno", "pc").await;
    let mut chloe = device(platform, "chloe", "pc").await;
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
    let stored = platform
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
