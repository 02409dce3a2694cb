//! presence through the bus, as a gateway calls it, on the in-process bus,
//! with a real fanout answering who shares a conversation with whom (over
//! the bus, from an embedded store), the in-memory presence store and the
//! embedded settings table.

use std::sync::Arc;
use std::time::Duration;

use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc::{self, Code};
use chappe_bus::subjects::PresenceMethod;
use chappe_bus::{Bus, RpcError, Subjects, Subscription};
use chappe_presence::{MemoryPresenceStore, Presence, PresenceConfig};
use chappe_proto::ids::{ConversationId, UserId};
use chappe_proto::internal::{
    PresenceAck, PresenceConnection, PresenceQueryRequest, UserDelivery, presence_connection::Kind,
    user_delivery,
};
use chappe_proto::v1::{
    self, ConversationKind, DeviceRef, MembershipOp, PresenceInfo, PresenceState,
};
use chappe_storage::{
    ConversationRepo, ConversationRow, EmbeddedStore, MemberChange, MembershipRow,
};
use futures::StreamExt;
use prost::Message as _;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a presence change must reach the users allowed to see it.
const PUSH_WITHIN: Duration = Duration::from_secs(1);
/// How long to wait for a push that must not come.
const QUIET: Duration = Duration::from_millis(300);

struct Harness {
    bus: Arc<dyn Bus>,
    subjects: Subjects,
    presence: Presence,
    _fanout: chappe_fanout::Fanout,
    store: EmbeddedStore,
    conversations: Vec<ConversationId>,
    _dir: tempfile::TempDir,
}

/// A group conversation of `members` (the first creates it), stored as
/// fanout would.
async fn conversation(store: &EmbeddedStore, members: &[&str]) -> ConversationId {
    let id = ConversationId::random();
    let log: Vec<_> = (1..)
        .zip(members)
        .map(|(seq, user)| {
            let op = if seq == 1 {
                MembershipOp::Create
            } else {
                MembershipOp::Add
            };
            let row = MembershipRow {
                conversation_id: id,
                seq,
                actor_user_id: members[0].into(),
                actor_device_id: "D1".into(),
                op: op as i32,
                target_user_id: (*user).into(),
                at_ms: 1_000,
                signature: Vec::new(),
            };
            (row, MemberChange::Add)
        })
        .collect();
    let row = ConversationRow {
        conversation_id: id,
        kind: ConversationKind::Group as i32,
        created_at_ms: 1_000,
        head: None,
        membership_seq: log.len() as u64,
    };
    store.create_conversation(&row, &log).await.unwrap();
    id
}

/// alice and bob share a conversation; carol shares one with dave, none
/// with alice.
async fn start() -> Harness {
    start_with(PresenceConfig::default()).await
}

async fn start_with(config: PresenceConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("chappe.db")).unwrap();
    let conversations = vec![
        conversation(&store, &["alice", "bob"]).await,
        conversation(&store, &["carol", "dave"]).await,
    ];
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
    let subjects = Subjects::default();
    let fanout = chappe_fanout::Fanout::start(
        chappe_fanout::FanoutConfig::default(),
        Arc::new(store.clone()),
        bus.clone(),
        subjects.clone(),
    )
    .await
    .unwrap();
    let presence = Presence::start(
        config.clone(),
        Arc::new(MemoryPresenceStore::new(config.record_ttl())),
        Arc::new(store.clone()),
        bus.clone(),
        subjects.clone(),
    )
    .await
    .unwrap();
    Harness {
        bus,
        subjects,
        presence,
        _fanout: fanout,
        store,
        conversations,
        _dir: dir,
    }
}

fn actor(user: &str) -> Option<DeviceRef> {
    Some(DeviceRef {
        user_id: user.into(),
        device_id: "D1".into(),
    })
}

impl Harness {
    async fn deliveries(&self, user: &str) -> Subscription {
        let user = UserId::parse(user).unwrap();
        self.bus
            .subscribe(&self.subjects.deliver_user(&user))
            .await
            .unwrap()
    }

    async fn connection(&self, user: &str, kind: Kind, active: bool) -> Result<(), RpcError> {
        self.stream_event(user, 1, kind, active).await
    }

    /// An event of the Connect stream `connection_id` of `user`'s device D1.
    async fn stream_event(
        &self,
        user: &str,
        connection_id: u64,
        kind: Kind,
        active: bool,
    ) -> Result<(), RpcError> {
        let request = PresenceConnection {
            actor: actor(user),
            kind: kind as i32,
            active,
            connection_id,
        };
        let _: PresenceAck = rpc::call(
            &*self.bus,
            &self.subjects.presence(PresenceMethod::Connection),
            &request,
            TIMEOUT,
        )
        .await?;
        Ok(())
    }

    async fn query(&self, user: &str, of: &[&str]) -> Result<Vec<PresenceInfo>, RpcError> {
        let request = PresenceQueryRequest {
            actor: actor(user),
            request: Some(v1::PresenceQuery {
                user_ids: of.iter().map(|u| u.to_string()).collect(),
            }),
        };
        let result: v1::PresenceResult = rpc::call(
            &*self.bus,
            &self.subjects.presence(PresenceMethod::Query),
            &request,
            TIMEOUT,
        )
        .await?;
        Ok(result.presences)
    }
}

/// The next delivery on `deliveries`, within `within`.
async fn next_item(deliveries: &mut Subscription, within: Duration) -> user_delivery::Item {
    let message = tokio::time::timeout(within, deliveries.next())
        .await
        .unwrap_or_else(|_| panic!("a delivery within {within:?}"))
        .expect("the subscription is open");
    UserDelivery::decode(message.payload)
        .unwrap()
        .item
        .expect("a delivery with an item")
}

/// The next presence change on `deliveries`, within [`PUSH_WITHIN`].
async fn next_change(deliveries: &mut Subscription) -> PresenceInfo {
    match next_item(deliveries, PUSH_WITHIN).await {
        user_delivery::Item::PresenceChanged(info) => info,
        other => panic!("expected a presence change, got {other:?}"),
    }
}

async fn assert_quiet(deliveries: &mut Subscription, who: &str) {
    if let Ok(message) = tokio::time::timeout(QUIET, deliveries.next()).await {
        panic!("{who} got a delivery: {message:?}");
    }
}

fn state(info: &PresenceInfo) -> PresenceState {
    PresenceState::try_from(info.state).unwrap()
}

#[tokio::test]
async fn contacts_see_presence_and_strangers_see_nothing() {
    let h = start().await;
    let mut bob = h.deliveries("bob").await;
    let mut carol = h.deliveries("carol").await;
    let mut alice = h.deliveries("alice").await;

    // alice connects: bob hears it within 1 s; carol and alice do not.
    h.connection("alice", Kind::Connected, true).await.unwrap();
    let online = next_change(&mut bob).await;
    assert_eq!(online.user_id, "alice");
    assert_eq!(state(&online), PresenceState::Online);
    assert!(online.last_seen_ms > 0);

    // A heartbeat that changes nothing visible is not pushed.
    h.connection("alice", Kind::Heartbeat, true).await.unwrap();
    assert_quiet(&mut bob, "bob").await;
    assert_quiet(&mut carol, "carol").await;
    assert_quiet(&mut alice, "alice").await;

    // By query: bob sees alice online; carol gets nothing for her, exactly
    // as for a user who does not exist.
    let seen = h.query("bob", &["alice"]).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].user_id, "alice");
    assert_eq!(state(&seen[0]), PresenceState::Online);
    assert_eq!(h.query("carol", &["alice"]).await.unwrap(), []);
    assert_eq!(h.query("carol", &["nobody"]).await.unwrap(), []);
    // Contacts never connected are offline and never seen; duplicates once.
    let seen = h
        .query("alice", &["bob", "bob", "carol", "alice"])
        .await
        .unwrap();
    let users: Vec<_> = seen.iter().map(|p| p.user_id.as_str()).collect();
    assert_eq!(users, ["bob", "alice"]);
    assert_eq!(state(&seen[0]), PresenceState::Offline);
    assert_eq!(seen[0].last_seen_ms, 0);

    // alice disconnects: bob hears she is offline, with her last-seen.
    h.connection("alice", Kind::Disconnected, false)
        .await
        .unwrap();
    let offline = next_change(&mut bob).await;
    assert_eq!(offline.user_id, "alice");
    assert_eq!(state(&offline), PresenceState::Offline);
    assert!(offline.last_seen_ms >= online.last_seen_ms);
    assert_quiet(&mut carol, "carol").await;
    assert_quiet(&mut alice, "alice").await;
    let seen = h.query("bob", &["alice"]).await.unwrap();
    assert_eq!(state(&seen[0]), PresenceState::Offline);
    assert_eq!(seen[0].last_seen_ms, offline.last_seen_ms);

    h.presence.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_arguments() {
    let h = start().await;
    let config = PresenceConfig::default();

    let too_many: Vec<String> = (0..=config.max_query_users)
        .map(|i| format!("user{i}"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let e = h.query("bob", &too_many).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("user_ids"), "{e}");
    // At the limit is fine.
    h.query("bob", &too_many[..config.max_query_users])
        .await
        .unwrap();

    let e = h.query("bob", &["alice", "Not A User!"]).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    assert!(e.message.contains("user_ids[1]"), "{e}");

    let e = h
        .connection("alice", Kind::Unspecified, false)
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let e = h
        .connection("Not A User!", Kind::Connected, false)
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");
    let request = PresenceQueryRequest {
        actor: None,
        request: Some(v1::PresenceQuery::default()),
    };
    let e = rpc::call::<_, v1::PresenceResult>(
        &*h.bus,
        &h.subjects.presence(PresenceMethod::Query),
        &request,
        TIMEOUT,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e}");

    h.presence.stop().await;
}

#[tokio::test]
async fn a_user_whose_gateway_went_silent_is_announced_offline_after_the_ttl() {
    let config = PresenceConfig {
        ttl: Duration::from_millis(800),
        heartbeat_interval: Duration::from_millis(200),
        sweep_interval: Duration::from_millis(100),
        ..PresenceConfig::default()
    };
    let h = start_with(config.clone()).await;
    let mut bob = h.deliveries("bob").await;
    h.connection("alice", Kind::Connected, true).await.unwrap();
    assert_eq!(state(&next_change(&mut bob).await), PresenceState::Online);
    let silent_from = std::time::Instant::now();
    // No heartbeat, no disconnection: the gateway died. bob is told within
    // the ttl and a sweep.
    let offline = match next_item(&mut bob, config.ttl * 2).await {
        user_delivery::Item::PresenceChanged(info) => info,
        other => panic!("expected a presence change, got {other:?}"),
    };
    let took = silent_from.elapsed();
    assert_eq!(offline.user_id, "alice");
    assert_eq!(state(&offline), PresenceState::Offline);
    assert!(took >= config.ttl - Duration::from_millis(100), "{took:?}");
    assert!(took <= config.ttl + config.sweep_interval * 3, "{took:?}");
    // Once: later sweeps (of this or another instance) do not repeat it.
    assert_quiet(&mut bob, "bob").await;
    assert_eq!(
        state(&h.query("bob", &["alice"]).await.unwrap()[0]),
        PresenceState::Offline
    );
    h.presence.stop().await;
}

#[tokio::test]
async fn a_late_disconnection_of_an_older_stream_does_not_make_a_user_offline() {
    let h = start().await;
    let mut bob = h.deliveries("bob").await;
    h.stream_event("alice", 1, Kind::Connected, true)
        .await
        .unwrap();
    assert_eq!(state(&next_change(&mut bob).await), PresenceState::Online);
    // alice's device moved to another gateway, which reported it first; the
    // old gateway reports the end of the old stream afterwards.
    h.stream_event("alice", 2, Kind::Connected, true)
        .await
        .unwrap();
    h.stream_event("alice", 1, Kind::Disconnected, false)
        .await
        .unwrap();
    assert_quiet(&mut bob, "bob").await;
    let seen = h.query("bob", &["alice"]).await.unwrap();
    assert_eq!(state(&seen[0]), PresenceState::Online);
    h.stream_event("alice", 2, Kind::Disconnected, false)
        .await
        .unwrap();
    assert_eq!(state(&next_change(&mut bob).await), PresenceState::Offline);
    h.presence.stop().await;
}

#[tokio::test]
async fn hidden_last_seen_is_kept_and_applied_to_queries_and_events() {
    let h = start().await;
    let mut bob = h.deliveries("bob").await;
    let settings = chappe_proto::internal::PresenceSettingsRequest {
        actor: actor("alice"),
        request: Some(v1::PresenceSettings {
            hide_last_seen: true,
        }),
    };
    let _: PresenceAck = rpc::call(
        &*h.bus,
        &h.subjects.presence(PresenceMethod::Settings),
        &settings,
        TIMEOUT,
    )
    .await
    .unwrap();
    h.connection("alice", Kind::Connected, true).await.unwrap();
    let online = next_change(&mut bob).await;
    assert_eq!(state(&online), PresenceState::Online);
    assert_eq!(online.last_seen_ms, 0, "hidden from events");
    h.connection("alice", Kind::Disconnected, false)
        .await
        .unwrap();
    assert_eq!(next_change(&mut bob).await.last_seen_ms, 0);
    assert_eq!(h.query("bob", &["alice"]).await.unwrap()[0].last_seen_ms, 0);
    // alice still sees her own.
    assert!(h.query("alice", &["alice"]).await.unwrap()[0].last_seen_ms > 0);
    // Kept durably, in the settings table.
    use chappe_storage::PresenceSettingsRepo as _;
    assert_eq!(
        h.store
            .hide_last_seen_many(&["alice", "bob"])
            .await
            .unwrap(),
        [true, false]
    );
    h.presence.stop().await;
}

#[tokio::test]
async fn typing_reaches_the_other_members_only_and_is_never_stored() {
    let h = start().await;
    let mut alice = h.deliveries("alice").await;
    let mut bob = h.deliveries("bob").await;
    let mut carol = h.deliveries("carol").await;
    let typing =
        |user: &str, conversation: &ConversationId| chappe_proto::internal::TypingRequest {
            actor: actor(user),
            request: Some(v1::Typing {
                conversation_id: conversation.to_string(),
                typing: true,
            }),
        };
    let subject = h.subjects.presence(PresenceMethod::Typing);
    let ours = h.conversations[0];
    let _: PresenceAck = rpc::call(&*h.bus, &subject, &typing("alice", &ours), TIMEOUT)
        .await
        .unwrap();
    match next_item(&mut bob, PUSH_WITHIN).await {
        user_delivery::Item::Typing(event) => {
            assert_eq!(event.user_id, "alice");
            assert_eq!(event.conversation_id, ours.to_string());
            assert!(event.typing);
            assert_eq!(event.timeout_ms, 6_000);
        }
        other => panic!("expected typing, got {other:?}"),
    }
    assert_quiet(&mut alice, "alice").await;
    assert_quiet(&mut carol, "carol").await;

    // carol is not a member: refused, and nobody hears of it.
    let e = rpc::call::<_, PresenceAck>(&*h.bus, &subject, &typing("carol", &ours), TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "{e}");
    let unknown = ConversationId::random();
    let e = rpc::call::<_, PresenceAck>(&*h.bus, &subject, &typing("alice", &unknown), TIMEOUT)
        .await
        .unwrap_err();
    assert_eq!(e.code, Code::PermissionDenied, "{e}");
    assert_quiet(&mut bob, "bob").await;

    // Never stored: nothing in the conversation, nothing in any inbox.
    use chappe_storage::{InboxRepo as _, MessageRepo as _};
    assert!(
        h.store
            .messages_after(ours, None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(h.store.inbox("bob", "D1", 100).await.unwrap().is_empty());
    h.presence.stop().await;
}
