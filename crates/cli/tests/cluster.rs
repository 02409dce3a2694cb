//! Chappe as a deployment runs it: keydir, presence, media, two fanouts and
//! two gateways, each in its own OS process, over a real nats-server with
//! JetStream, on one shared store file. The messaging-core, presence and
//! media scenarios pass there, nothing acknowledged is lost when fanouts,
//! gateways or NATS die, and the users of a killed gateway go offline
//! within presence's ttl.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chappe_client::ids::{ConversationId, UserId};
use chappe_client::{Client, ClientConfig, ConversationKind, Event, Events};
use chappe_testkit::cluster::ClusterConfig;
use common::scenarios;
use common::{Deployment, TestCluster, client_config, presence_media};

/// Senders are not rate-limited here: the point is volume.
fn unlimited() -> ClusterConfig {
    ClusterConfig {
        env: vec![
            ("CHAPPE_SEND_RATE".into(), "1000000".into()),
            ("CHAPPE_SEND_BURST".into(), "1000000".into()),
            // A request taken by a fanout that is then killed is asked of
            // the other after 1.5 s (a third of this), and the delivery
            // jobs it held come back after 5 s.
            ("CHAPPE_RPC_TIMEOUT_MS".into(), "4500".into()),
            ("CHAPPE_JOB_ACK_WAIT_MS".into(), "5000".into()),
        ],
        ..ClusterConfig::default()
    }
}

/// A client that keeps retrying through the outages a test causes.
fn patient(mut config: ClientConfig) -> ClientConfig {
    config.send_attempts = 30;
    config.reconnect_backoff_max = Duration::from_millis(500);
    config.dedupe_window = 20_000;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messaging_core_scenarios_pass_with_every_service_in_its_own_process() {
    let cluster = TestCluster::start();
    assert_eq!(cluster.gateway_urls().len(), 2);

    let sent = scenarios::two_users_two_devices_exchange_and_catch_up(&cluster).await;
    scenarios::group_of_three_all_read_each_other(&cluster).await;
    scenarios::new_device_reads_the_next_message(&cluster).await;
    scenarios::removed_member_cannot_read_what_follows(&cluster).await;

    // What the services wrote holds no plaintext.
    for entry in std::fs::read_dir(cluster.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for text in &sent {
                assert!(
                    !bytes.windows(text.len()).any(|w| w == text.as_bytes()),
                    "{} holds {text:?}",
                    path.display()
                );
            }
        }
    }
    // Every service drains and exits cleanly on SIGTERM.
    cluster.cluster.stop();
}

/// Messages one device received, in arrival order, and why its
/// connection ended, each time it did.
#[derive(Default)]
struct Inbox {
    bodies: Vec<String>,
    ids: Vec<String>,
    disconnections: Vec<String>,
}

impl Inbox {
    /// Keeps `event` if it is a message from another device, or a
    /// disconnection.
    fn keep(&mut self, me: &(String, String), event: Event) {
        match event {
            Event::Message(m)
                if (m.sender_user.as_str(), m.sender_device.as_str()) != (&me.0[..], &me.1[..]) =>
            {
                self.bodies.push(m.body);
                self.ids.push(m.message_id.to_string());
            }
            Event::Disconnected { reason } => self.disconnections.push(reason),
            _ => {}
        }
    }
}

/// Reads `events` until `expected` messages from other devices arrived (or
/// `limit` passed), and returns them all, duplicates included.
async fn collect(
    me: (String, String),
    mut events: Events,
    expected: usize,
    limit: Duration,
) -> Inbox {
    let mut inbox = Inbox::default();
    let deadline = tokio::time::Instant::now() + limit;
    while inbox.bodies.len() < expected {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) => inbox.keep(&me, event),
            Ok(None) | Err(_) => break,
        }
    }
    // Anything after the last expected message would be a duplicate.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        inbox.keep(&me, event);
    }
    inbox
}

/// Asserts `inbox` holds exactly `expected`, each once.
fn assert_exactly_once(who: &str, inbox: &Inbox, expected: &BTreeSet<String>) {
    let got: BTreeSet<&String> = inbox.bodies.iter().collect();
    let missing: Vec<&String> = expected.iter().filter(|b| !got.contains(b)).collect();
    assert!(
        missing.is_empty(),
        "{who} lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        inbox.bodies.len(),
        expected.len(),
        "{who} saw duplicates or strangers"
    );
    let ids: BTreeSet<&String> = inbox.ids.iter().collect();
    assert_eq!(ids.len(), inbox.ids.len(), "{who} saw a message id twice");
}

struct Member {
    user: String,
    device: String,
    client: Client,
    events: Events,
}

async fn member(deployment: &impl Deployment, user: &str, device: &str) -> Member {
    let config = patient(client_config(deployment, &format!("{user}-{device}")));
    let client = Client::login_dev(config, user, device)
        .await
        .expect("login");
    let events = client.connect().await.expect("connect");
    Member {
        user: user.into(),
        device: device.into(),
        client,
        events,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_among_twenty_devices_survive_fanouts_killed_every_few_seconds() {
    const USERS: usize = 10;
    const PER_DEVICE: usize = 500;
    let cluster = TestCluster::start_with(unlimited());

    // Ten users with two devices each, in five direct conversations.
    let mut members = Vec::new();
    for u in 0..USERS {
        for device in ["laptop", "phone"] {
            members.push(member(&cluster, &format!("agent{u}"), device).await);
        }
    }
    let mut chats: BTreeMap<String, ConversationId> = BTreeMap::new();
    for pair in 0..USERS / 2 {
        let (a, b) = (
            format!("agent{}", 2 * pair),
            format!("agent{}", 2 * pair + 1),
        );
        let chat = members[4 * pair]
            .client
            .create_conversation(ConversationKind::Direct, &[UserId::parse(&b).unwrap()])
            .await
            .expect("conversation");
        chats.insert(a, chat.id);
        chats.insert(b, chat.id);
    }
    let chat_of = |user: &str| chats[user];

    // Kill a fanout (`kill -9`) every four seconds, alternating, and start
    // it again a second later, until the senders are done.
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let done = done.clone();
        let mut cluster = cluster;
        tokio::task::spawn_blocking(move || {
            let mut kills = 0;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(3));
                cluster.cluster.kill_fanout(kills % 2);
                std::thread::sleep(Duration::from_secs(1));
                cluster.cluster.start_fanout(kills % 2);
                kills += 1;
            }
            (cluster, kills)
        })
    };

    // Every device sends its share while every device listens.
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    let mut expected: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    let mut all_sent = BTreeSet::new();
    for m in &members {
        for i in 0..PER_DEVICE {
            let body = format!("{}/{} n°{i}", m.user, m.device);
            all_sent.insert(body.clone());
            for other in &members {
                let same_chat = chat_of(&other.user) == chat_of(&m.user);
                let same_device = (&other.user, &other.device) == (&m.user, &m.device);
                if same_chat && !same_device {
                    expected
                        .entry((other.user.clone(), other.device.clone()))
                        .or_default()
                        .insert(body.clone());
                }
            }
        }
    }
    for m in members {
        let Member {
            user,
            device,
            client,
            events,
        } = m;
        let want = expected[&(user.clone(), device.clone())].len();
        receivers.push((
            format!("{user}/{device}"),
            tokio::spawn(collect(
                (user.clone(), device.clone()),
                events,
                want,
                Duration::from_secs(300),
            )),
        ));
        let chat = chat_of(&user);
        senders.push(tokio::spawn(async move {
            for i in 0..PER_DEVICE {
                let body = format!("{user}/{device} n°{i}");
                client
                    .send_text(&chat, &body)
                    .await
                    .unwrap_or_else(|e| panic!("{body}: {e}"));
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for sender in senders {
        clients.push(sender.await.expect("sender finished"));
    }
    done.store(true, Ordering::Relaxed);
    let (cluster, kills) = killer.await.unwrap();
    assert!(kills >= 3, "only {kills} fanout kills happened");

    for ((who, receiver), (key, want)) in receivers.into_iter().zip(&expected) {
        assert_eq!(who, format!("{}/{}", key.0, key.1));
        let inbox = receiver.await.unwrap();
        assert_exactly_once(&who, &inbox, want);
    }
    // And the store holds each message once, retries notwithstanding.
    let mut stored = 0;
    for chat in chats.values().collect::<BTreeSet<_>>() {
        let mut from = None;
        loop {
            let page = cluster
                .store()
                .messages_after(*chat, from, 500)
                .await
                .unwrap();
            let Some(last) = page.last() else { break };
            from = Some(last.message_id);
            stored += page.len();
        }
    }
    assert_eq!(stored, all_sent.len(), "each message stored exactly once");
    drop(clients);
    cluster.cluster.stop();
}

/// Alice, and bob with his phone on gateway 0 and his laptop on gateway 1,
/// every device able to move to the other gateway; bob's devices collect
/// `count` messages (for at most `limit`) in a direct conversation.
struct AcrossGateways {
    alice: Client,
    chat: ConversationId,
    phone: tokio::task::JoinHandle<Inbox>,
    laptop: tokio::task::JoinHandle<Inbox>,
    /// Alice's events, and bob's devices: connected while they are held.
    _held: (Events, Client, Client),
}

async fn across_gateways(
    cluster: &TestCluster,
    alice_on: usize,
    count: usize,
    limit: Duration,
) -> AcrossGateways {
    let urls = cluster.gateway_urls();
    let on = |first: usize, name: &str| {
        let mut config = patient(client_config(cluster, name));
        config.server_url = urls[first].clone();
        config.failover_urls = vec![urls[1 - first].clone()];
        config
    };
    let alice = Client::login_dev(on(alice_on, "alice"), "alice", "laptop")
        .await
        .unwrap();
    let bob_phone = Client::login_dev(on(0, "bob-phone"), "bob", "phone")
        .await
        .unwrap();
    let bob_laptop = Client::login_dev(on(1, "bob-laptop"), "bob", "laptop")
        .await
        .unwrap();
    let alice_events = alice.connect().await.unwrap();
    let phone_events = bob_phone.connect().await.unwrap();
    let laptop_events = bob_laptop.connect().await.unwrap();
    let chat = alice
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap()
        .id;
    let bob = |device: &str, events| {
        tokio::spawn(collect(("bob".into(), device.into()), events, count, limit))
    };
    AcrossGateways {
        phone: bob("phone", phone_events),
        laptop: bob("laptop", laptop_events),
        alice,
        chat,
        _held: (alice_events, bob_phone, bob_laptop),
    }
}

/// Both of bob's devices got each of `expected` exactly once, and the store
/// holds each once; returns what the phone saw.
async fn bob_got_each_once(
    cluster: &TestCluster,
    chat: ConversationId,
    phone: tokio::task::JoinHandle<Inbox>,
    laptop: tokio::task::JoinHandle<Inbox>,
    expected: &BTreeSet<String>,
) -> Inbox {
    let phone = phone.await.unwrap();
    assert_exactly_once("bob/phone", &phone, expected);
    assert_exactly_once("bob/laptop", &laptop.await.unwrap(), expected);
    let stored = cluster
        .store()
        .messages_after(chat, None, 1000)
        .await
        .unwrap();
    assert_eq!(stored.len(), expected.len(), "each message stored once");
    phone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_gateways_clients_move_to_the_other_and_lose_nothing() {
    const COUNT: usize = 200;
    let mut cluster = TestCluster::start_with(unlimited());
    // Alice and bob's phone on gateway 0, bob's laptop on gateway 1.
    let AcrossGateways {
        alice,
        chat,
        phone,
        laptop,
        _held,
    } = across_gateways(&cluster, 0, COUNT, Duration::from_secs(120)).await;

    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            alice
                .send_text(&chat, &format!("dépêche {i}"))
                .await
                .unwrap_or_else(|e| panic!("dépêche {i}: {e}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        alice
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.cluster.kill_gateway(0);
    let _alice = sender.await.unwrap();

    let expected: BTreeSet<String> = (0..COUNT).map(|i| format!("dépêche {i}")).collect();
    bob_got_each_once(&cluster, chat, phone, laptop, &expected).await;
}

/// A rolling restart as Kubernetes does it (SIGTERM, then a grace period)
/// while messages flow: fanout 0 finishes what it has in hand and hands
/// back the jobs it had fetched (shown on its own, with a backlog, in
/// fanout's `tests/process.rs`); gateway 0 tells its devices to go, and they
/// move to gateway 1 at once and sync. A job left behind would wait two
/// minutes (`ack_wait`) for another fanout: every message arrives well
/// within that, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_and_a_fanout_stopped_by_sigterm_hand_over_without_loss() {
    const COUNT: usize = 400;
    let mut config = unlimited();
    config
        .env
        .retain(|(name, _)| name != "CHAPPE_JOB_ACK_WAIT_MS");
    config
        .env
        .push(("CHAPPE_JOB_ACK_WAIT_MS".into(), "120000".into()));
    let mut cluster = TestCluster::start_with(config);
    // Alice sends on gateway 1 throughout; bob's phone is on gateway 0.
    // Well under the two minutes a job left behind would wait:
    let limit = Duration::from_secs(60);
    let AcrossGateways {
        alice,
        chat,
        phone,
        laptop,
        _held,
    } = across_gateways(&cluster, 1, COUNT, limit).await;
    // Bursts of 20 sends at once, so that jobs queue up.
    let alice = Arc::new(alice);
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for burst in 0..COUNT / 20 {
                let sends = (0..20).map(|i| {
                    let alice = alice.clone();
                    let body = format!("relève {}", burst * 20 + i);
                    async move {
                        alice
                            .send_text(&chat, &body)
                            .await
                            .unwrap_or_else(|e| panic!("{body}: {e}"))
                    }
                });
                futures::future::join_all(sends).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (fanout, gateway) = tokio::task::block_in_place(|| {
        let fanout = cluster.cluster.terminate_fanout(0);
        let gateway = cluster.cluster.terminate_gateway(0);
        (fanout, gateway)
    });
    assert!(gateway.expect("gateway 0 ran").success(), "{gateway:?}");
    assert!(fanout.expect("fanout 0 ran").success(), "{fanout:?}");
    sender.await.unwrap();

    let expected: BTreeSet<String> = (0..COUNT).map(|i| format!("relève {i}")).collect();
    let phone = bob_got_each_once(&cluster, chat, phone, laptop, &expected).await;
    eprintln!("all delivered {:?} after the start", started.elapsed());
    // The phone was told to go, not cut off.
    assert!(
        phone
            .disconnections
            .iter()
            .any(|reason| reason.contains("going away")),
        "{:?}",
        phone.disconnections
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_mid_run_loses_nothing_and_stores_retries_once() {
    const COUNT: usize = 300;
    let mut cluster = TestCluster::start_with(unlimited());
    let alice = member(&cluster, "alice", "laptop").await;
    let bob = member(&cluster, "bob", "phone").await;
    let chat = alice
        .client
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap()
        .id;
    let receiver = tokio::spawn(collect(
        ("bob".into(), "phone".into()),
        bob.events,
        COUNT,
        Duration::from_secs(120),
    ));
    let client = alice.client;
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            client
                .send_text(&chat, &format!("note {i}"))
                .await
                .unwrap_or_else(|e| panic!("note {i}: {e}"));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        client
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    // A crash, not a clean stop: JetStream keeps what it acknowledged
    // (sync_interval: always), and everyone reconnects to the same port.
    tokio::task::block_in_place(|| {
        cluster.cluster.nats().kill();
        std::thread::sleep(Duration::from_secs(1));
        cluster.cluster.nats().restart();
    });
    let _client = sender.await.unwrap();

    let expected: BTreeSet<String> = (0..COUNT).map(|i| format!("note {i}")).collect();
    assert_exactly_once("bob/phone", &receiver.await.unwrap(), &expected);
    let stored = cluster
        .store()
        .messages_after(chat, None, 1000)
        .await
        .unwrap();
    assert_eq!(stored.len(), COUNT, "retried sends stored once");
    cluster.cluster.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_typing_and_media_pass_with_every_service_in_its_own_process() {
    let cluster = TestCluster::start();
    presence_media::presence_typing_and_privacy(&cluster).await;
    // Every stored chunk is scanned for plaintext in tests/presence_media.rs.
    presence_media::file_travels_encrypted_and_resumes(
        &cluster,
        50 * 1024 * 1024,
        presence_media::PlaintextScan::FirstAndLast,
    )
    .await;
    cluster.cluster.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_users_of_a_killed_gateway_go_offline_within_the_presence_ttl() {
    const TTL: Duration = Duration::from_secs(3);
    const SWEEP: Duration = Duration::from_millis(200);
    let mut cluster = TestCluster::start_with(ClusterConfig {
        env: vec![
            ("CHAPPE_PRESENCE_TTL_MS".into(), TTL.as_millis().to_string()),
            (
                "CHAPPE_PRESENCE_SWEEP_MS".into(),
                SWEEP.as_millis().to_string(),
            ),
            ("CHAPPE_PRESENCE_HEARTBEAT_MS".into(), "500".into()),
        ],
        ..ClusterConfig::default()
    });
    let urls = cluster.gateway_urls();
    // alice only knows gateway 0 (she cannot move away when it dies); bob
    // is on gateway 1.
    let only = |i: usize, name: &str| {
        let mut config = client_config(&cluster, name);
        config.server_url = urls[i].clone();
        config.failover_urls = Vec::new();
        config
    };
    let alice = Client::login_dev(only(0, "alice"), "alice", "phone")
        .await
        .unwrap();
    alice
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();
    let bob = Client::login_dev(only(1, "bob"), "bob", "laptop")
        .await
        .unwrap();
    let mut bob = scenarios::Device {
        events: bob.connect().await.unwrap(),
        client: bob,
        received: Vec::new(),
    };
    let _alice_events = alice.connect().await.unwrap();
    let (state, _) =
        presence_media::presence_of(&mut bob, "alice", presence_media::ONLINE_WITHIN).await;
    assert_eq!(state, chappe_client::PresenceState::Online);
    // Heartbeats keep her online past the ttl.
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    let seen = bob
        .client
        .presence(&[UserId::parse("alice").unwrap()])
        .await
        .unwrap();
    assert_eq!(seen[0].state, chappe_client::PresenceState::Online);

    let killed = std::time::Instant::now();
    cluster.cluster.kill_gateway(0);
    let (state, at) = presence_media::presence_of(&mut bob, "alice", TTL * 3).await;
    let took = at - killed;
    assert_eq!(state, chappe_client::PresenceState::Offline);
    // Not from a disconnection (the gateway said nothing): from the ttl,
    // counted from her last heartbeat (at most 500 ms before the kill),
    // and announced by the next sweep.
    assert!(
        took >= TTL - Duration::from_millis(700),
        "offline after {took:?}"
    );
    assert!(
        took <= TTL + SWEEP * 2 + Duration::from_millis(300),
        "offline after {took:?}"
    );
    drop(alice);
    cluster.cluster.stop();
}
