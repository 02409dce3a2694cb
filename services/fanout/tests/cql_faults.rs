//! fanout on the CQL store under driver-level faults (issue 6): a
//! `scylla-proxy` in proxy mode stands between the store's driver and the
//! shared Cassandra (or ScyllaDB) node of `chappe_testkit::cql`, and answers
//! chosen requests itself with a write timeout, an unavailable or an
//! overloaded error instead of passing them on.
//!
//! - a message whose store write failed is never acknowledged (nor
//!   delivered), and its retry with the same `client_msg_id` is stored once,
//!   under the id claimed first;
//! - a timed-out claim of the client id (a lightweight transaction, not
//!   idempotent) is never sent twice by the driver: the store reads back
//!   its outcome, and answers UNAVAILABLE when it cannot claim;
//! - unavailable and overloaded reads are answered UNAVAILABLE, and the
//!   service keeps serving.
//!
//! Each test makes its own keyspace (migrated directly on the node) and its
//! own proxy, on a loopback address of its own with the node's port. The
//! driver addresses a node by the `rpc_address` the node gives in
//! `system.local`, not by the contact point it dialled: a session through
//! the proxy needs the proxy's translation map as its address translator,
//! which [`cql::open_session`] has no setting for, so [`proxied_session`]
//! opens one like it with the translator added. Each test first checks
//! that every request of that session crosses the proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chappe_bus::memory::MemoryBus;
use chappe_bus::rpc::{self, Code, RpcError};
use chappe_bus::subjects::FanoutMethod;
use chappe_bus::{Bus, Subjects, Subscription};
use chappe_fanout::{Fanout, FanoutConfig};
use chappe_proto::internal as wire;
use chappe_proto::v1;
use chappe_storage::cql::{self, CqlConfig, CqlStore};
use chappe_testkit::cql::CqlServer;
use futures::StreamExt;
use prost::Message as _;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla_proxy::{
    Condition, Node, Proxy, ProxyError, Reaction, RequestFrame, RequestOpcode, RequestReaction,
    RequestRule, RunningProxy, ShardAwareness, TargetShard, WorkerError,
};
use tokio::sync::mpsc;

/// Patience for one call that should succeed.
const T: Duration = Duration::from_secs(30);

/// Lightweight-transaction rounds the store tries before giving up, small
/// here so that a claim that always times out fails quickly.
const LWT_ATTEMPTS: u32 = 4;

/// Driver retries allowed per request.
const MAX_RETRIES: u32 = 3;

/// The claim of a client id (`statements.rs`, `dedup_insert`). EXECUTE
/// frames carry the prepared statement's id, not its text: the test
/// prepares this text itself to learn the id (the same text gives the
/// same id), and a rule that never fires fails the test, so a drift of
/// the text shows.
const DEDUP_INSERT: &str = "INSERT INTO {ks}.message_dedup (conversation_id, sender_user_id, \
     sender_device_id, client_msg_id, message_id, sent_at_ms, attempt) VALUES (?, ?, ?, ?, ?, ?, ?) \
     IF NOT EXISTS";

/// A request the test sends to see the proxy pass it.
const PROBE: &str = "SELECT release_version FROM system.local WHERE key = 'local'";

type Feedback = mpsc::UnboundedReceiver<(RequestFrame, Option<TargetShard>)>;

/// A fanout whose store reaches the node through a proxy.
struct Rig {
    proxy: RunningProxy,
    bus: Arc<dyn Bus>,
    fanout: Option<Fanout>,
    subjects: Subjects,
    /// The same keyspace, reached directly.
    direct: CqlStore,
    keyspace: String,
}

impl Rig {
    async fn start(test: &str) -> Rig {
        let server = CqlServer::shared();
        assert!(
            server.peers().expect("the node lists its peers").is_empty(),
            "the proxy fronts one node: a cluster of several would be reached around it"
        );
        let node: SocketAddr = server
            .contact_point()
            .parse()
            .expect("the node's contact point is an address");
        let dc = server.datacenter();
        let keyspace = format!("chappe_{test}_{:012x}", rand::random::<u64>() >> 16);
        let url = |contact: &str| {
            format!(
                "scylla://{contact}/{keyspace}?dc={dc}&rf={dc}:1&timeout=10s&retries={MAX_RETRIES}"
            )
        };
        let direct_config = CqlConfig::from_url(&url(&node.to_string())).expect("direct url");
        let session = cql::open_session(&direct_config).await.expect("session");
        cql::migrate(&session, &direct_config)
            .await
            .expect("migrate");
        let direct = CqlStore::with_session(Arc::new(session), &direct_config)
            .await
            .expect("direct store");

        let proxy_addr = SocketAddr::new(scylla_proxy::get_exclusive_local_address(), node.port());
        let proxy = Proxy::builder()
            .with_node(
                Node::builder()
                    .real_address(node)
                    .proxy_address(proxy_addr)
                    .shard_awareness(ShardAwareness::Unaware)
                    .build(),
            )
            .build();
        let translation = proxy.translation_map();
        let proxy = proxy.run().await.expect("the proxy starts");
        let mut config = CqlConfig::from_url(&url(&proxy_addr.to_string())).expect("proxy url");
        config.lwt_attempts = LWT_ATTEMPTS;
        let session = Arc::new(proxied_session(&config, translation).await);
        let store = CqlStore::with_session(session.clone(), &config)
            .await
            .expect("the store connects through the proxy");
        let mut rig_proxy = proxy;
        // Every request of the store's session crosses the proxy.
        let (tx, mut feedback) = mpsc::unbounded_channel();
        rig_proxy.running_nodes[0].change_request_rules(Some(vec![RequestRule(
            Condition::RequestOpcode(RequestOpcode::Query).and(
                Condition::BodyContainsCaseSensitive(PROBE.as_bytes().into()),
            ),
            RequestReaction::noop().with_feedback_when_performed(tx),
        )]));
        for _ in 0..10 {
            session.query_unpaged(PROBE, ()).await.expect("probe");
        }
        assert_eq!(
            fired(&mut feedback),
            10,
            "every request of the session crosses the proxy"
        );
        rig_proxy.running_nodes[0].change_request_rules(None);
        let proxy = rig_proxy;

        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let subjects = Subjects::default();
        let fanout = Fanout::start(
            FanoutConfig::default(),
            Arc::new(store),
            bus.clone(),
            subjects.clone(),
        )
        .await
        .expect("fanout starts");
        Rig {
            proxy,
            bus,
            fanout: Some(fanout),
            subjects,
            direct,
            keyspace,
        }
    }

    /// Replaces the proxy's rules (none: every request passes).
    fn rules(&mut self, rules: Vec<RequestRule>) {
        self.proxy.running_nodes[0].change_request_rules(Some(rules));
    }

    async fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: FanoutMethod,
        request: &Req,
    ) -> Result<Resp, RpcError> {
        rpc::call(&*self.bus, &self.subjects.fanout(method), request, T).await
    }

    async fn create_conversation(&self) -> String {
        let created: v1::CreateConversationResponse = self
            .call(
                FanoutMethod::CreateConversation,
                &wire::CreateConversation {
                    actor: actor("alice"),
                    request: Some(v1::CreateConversationRequest {
                        kind: v1::ConversationKind::Direct as i32,
                        member_user_ids: vec!["bob".into()],
                    }),
                },
            )
            .await
            .expect("conversation created");
        created.conversation.expect("conversation").conversation_id
    }

    async fn submit(&self, message: &v1::SendMessage) -> Result<v1::SendResult, RpcError> {
        self.call(
            FanoutMethod::Submit,
            &wire::Submit {
                actor: actor("alice"),
                request: Some(message.clone()),
            },
        )
        .await
    }

    async fn history(&self, conversation: &str) -> Result<v1::HistoryResponse, RpcError> {
        self.call(
            FanoutMethod::History,
            &wire::History {
                actor: actor("bob"),
                request: Some(v1::HistoryRequest {
                    conversation_id: conversation.into(),
                    ..Default::default()
                }),
            },
        )
        .await
    }

    /// bob's deliveries from now on.
    async fn deliveries_of_bob(&self) -> Subscription {
        let bob = chappe_proto::ids::UserId::parse("bob").expect("user id");
        self.bus
            .subscribe(&self.subjects.deliver_user(&bob))
            .await
            .expect("subscribed")
    }

    /// The id of the claim statement, as the node prepares it.
    async fn dedup_insert_id(&self) -> Vec<u8> {
        let text = DEDUP_INSERT.replace("{ks}", &self.keyspace);
        let prepared = self
            .direct
            .session()
            .prepare(text)
            .await
            .expect("the claim statement prepares");
        prepared.get_id().to_vec()
    }

    async fn stop(mut self) {
        if let Some(fanout) = self.fanout.take() {
            fanout.stop().await;
        }
        self.proxy.turn_off_rules();
        match self.proxy.finish().await {
            // The store's connections close as fanout drops it.
            Ok(()) | Err(ProxyError::Worker(WorkerError::DriverDisconnected(_))) => {}
            Err(e) => panic!("the proxy failed: {e}"),
        }
    }
}

/// A session as [`cql::open_session`] opens it (same profile: consistency,
/// timeout, token- and datacenter-aware balancing, the store's bounded
/// retry policy; monotonic timestamps), plus the one thing it cannot be
/// told: to translate the node's own address (`system.local` names it by
/// its `rpc_address`, which the driver then connects to, around the proxy)
/// into the proxy's.
async fn proxied_session(
    config: &CqlConfig,
    translation: HashMap<SocketAddr, SocketAddr>,
) -> Session {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    let dc = config.local_datacenter.clone().expect("a local datacenter");
    policy = policy
        .prefer_datacenter(dc.clone())
        .permit_dc_failover(false);
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .serial_consistency(Some(config.serial_consistency))
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(policy.build())
        .retry_policy(Arc::new(cql::retry::BoundedRetryPolicy::new(
            config.max_retries,
        )))
        .build();
    SessionBuilder::new()
        .known_nodes(&config.contact_points)
        .default_execution_profile_handle(profile.into_handle())
        .connection_timeout(config.connect_timeout)
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .prefer_datacenter(dc)
        .address_translator(Arc::new(translation))
        .build()
        .await
        .expect("a session through the proxy")
}

fn actor(user: &str) -> Option<v1::DeviceRef> {
    Some(v1::DeviceRef {
        user_id: user.into(),
        device_id: "D1".into(),
    })
}

fn send(conversation: &str, client_msg_id: &str, text: &str) -> v1::SendMessage {
    let mut session =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    v1::SendMessage {
        conversation_id: conversation.into(),
        client_msg_id: client_msg_id.into(),
        ciphertext: session.encrypt(text).to_bytes(),
        session_id: session.session_id(),
    }
}

/// EXECUTE requests whose body contains `bytes` (a bound value, or the id
/// of a prepared statement).
fn execute_with(bytes: &[u8]) -> Condition {
    Condition::RequestOpcode(RequestOpcode::Execute)
        .and(Condition::BodyContainsCaseSensitive(bytes.into()))
}

/// How many requests a rule answered so far.
fn fired(feedback: &mut Feedback) -> usize {
    std::iter::from_fn(|| feedback.try_recv().ok()).count()
}

/// A refusal the sender retries: the request failed and nothing says it
/// was done.
fn assert_unavailable<T: std::fmt::Debug>(result: Result<T, RpcError>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.code, Code::Unavailable, "{what}: {e}"),
        Ok(answer) => panic!("{what}: answered {answer:?}, expected UNAVAILABLE"),
    }
}

/// The messages delivered to bob: those within `wait`, or, once one came,
/// those within a short while after it.
async fn delivered(deliveries: &mut Subscription, wait: Duration) -> Vec<v1::Message> {
    let mut out = Vec::new();
    let mut deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, deliveries.next()).await {
        deadline = deadline.min(tokio::time::Instant::now() + Duration::from_millis(500));
        let delivery = wire::UserDelivery::decode(m.payload).expect("a delivery decodes");
        if let Some(wire::user_delivery::Item::Message(message)) = delivery.item {
            out.push(message);
        }
    }
    out
}

/// A message whose row write times out (the idempotent `messages` insert,
/// the only request carrying the ciphertext) is answered UNAVAILABLE and
/// never delivered; its retry with the same client id, once the fault is
/// gone, is acknowledged under the id claimed first, and the history holds
/// it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_whose_write_timed_out_is_not_acknowledged_and_its_retry_is_stored_once() {
    let mut rig = Rig::start("wto").await;
    let conversation = rig.create_conversation().await;
    let mut deliveries = rig.deliveries_of_bob().await;
    let message = send(&conversation, "m-timeout", "écrit une fois");

    let (tx, mut feedback) = mpsc::unbounded_channel();
    rig.rules(vec![RequestRule(
        execute_with(&message.ciphertext),
        RequestReaction::forge()
            .write_timeout()
            .with_feedback_when_performed(tx),
    )]);
    assert_unavailable(rig.submit(&message).await, "a submit whose write timed out");
    let attempts = fired(&mut feedback);
    assert_eq!(
        attempts,
        1 + MAX_RETRIES as usize,
        "the idempotent row write is retried, a bounded number of times"
    );
    // Not acknowledged, not readable, not delivered.
    let history = rig.history(&conversation).await.expect("history");
    assert!(
        history.messages.is_empty(),
        "a message that was not written is not read: {:?}",
        history.messages
    );
    assert!(
        delivered(&mut deliveries, Duration::from_millis(500))
            .await
            .is_empty(),
        "a message that was not written is not delivered"
    );

    // The sender retries; the fault is gone.
    rig.rules(Vec::new());
    let sent = rig.submit(&message).await.expect("the retry is stored");
    assert!(
        sent.duplicate,
        "the retry completes the first attempt's claim of the client id"
    );
    assert_eq!(sent.client_msg_id, message.client_msg_id);
    let again = rig.submit(&message).await.expect("a second retry");
    assert_eq!(again.message_id, sent.message_id, "one id for one message");
    assert!(again.duplicate);

    let history = rig.history(&conversation).await.expect("history");
    let ids: Vec<_> = history
        .messages
        .iter()
        .map(|m| (m.message_id.as_str(), m.client_msg_id.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![(sent.message_id.as_str(), "m-timeout")],
        "stored once"
    );
    assert_eq!(history.messages[0].ciphertext, message.ciphertext);
    let pushed = delivered(&mut deliveries, Duration::from_secs(5)).await;
    assert!(!pushed.is_empty(), "the stored message is delivered");
    assert!(
        pushed.iter().all(|m| m.message_id == sent.message_id),
        "only the stored message is delivered: {pushed:?}"
    );
    rig.stop().await;
}

/// The claim of a client id is a lightweight transaction: not idempotent,
/// so the driver never sends it again after a timeout. The store reads its
/// outcome back (`SERIAL`): a claim that always times out is answered
/// UNAVAILABLE after exactly `LWT_ATTEMPTS` claims, with nothing stored;
/// one that times out once is claimed again and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timed_out_claim_is_read_back_never_resent_blindly() {
    let mut rig = Rig::start("lwt").await;
    let conversation = rig.create_conversation().await;
    let claim = rig.dedup_insert_id().await;

    let (tx, mut feedback) = mpsc::unbounded_channel();
    rig.rules(vec![RequestRule(
        execute_with(&claim),
        RequestReaction::forge()
            .write_timeout()
            .with_feedback_when_performed(tx),
    )]);
    let always = send(&conversation, "m-claim-always", "jamais stocké");
    assert_unavailable(rig.submit(&always).await, "a claim that always times out");
    assert_eq!(
        fired(&mut feedback),
        LWT_ATTEMPTS as usize,
        "one claim per round, none resent by the driver"
    );
    let history = rig.history(&conversation).await.expect("history");
    assert!(history.messages.is_empty(), "{:?}", history.messages);

    let (tx, mut feedback) = mpsc::unbounded_channel();
    rig.rules(vec![RequestRule(
        execute_with(&claim).and(Condition::TrueForLimitedTimes(1)),
        RequestReaction::forge()
            .write_timeout()
            .with_feedback_when_performed(tx),
    )]);
    let once = send(&conversation, "m-claim-once", "stocké une fois");
    let sent = rig
        .submit(&once)
        .await
        .expect("a claim that timed out once is resolved and stored");
    assert_eq!(fired(&mut feedback), 1, "the fault fired");
    assert!(!sent.duplicate, "the first claim did not happen");
    rig.rules(Vec::new());
    let history = rig.history(&conversation).await.expect("history");
    let ids: Vec<_> = history
        .messages
        .iter()
        .map(|m| (m.message_id.as_str(), m.client_msg_id.as_str()))
        .collect();
    assert_eq!(ids, vec![(sent.message_id.as_str(), "m-claim-once")]);
    rig.stop().await;
}

/// Reads that meet unavailable replicas or an overloaded coordinator (on
/// every request of the conversation) are answered UNAVAILABLE, and fanout
/// serves again once the node is healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unavailable_and_overloaded_reads_are_answered_unavailable() {
    let mut rig = Rig::start("reads").await;
    let conversation = rig.create_conversation().await;
    let sent = rig
        .submit(&send(&conversation, "m-read", "lu plus tard"))
        .await
        .expect("stored");

    for (name, reaction) in [
        ("unavailable", RequestReaction::forge().unavailable()),
        ("overloaded", RequestReaction::forge().overloaded()),
    ] {
        let (tx, mut feedback) = mpsc::unbounded_channel();
        rig.rules(vec![RequestRule(
            execute_with(conversation.as_bytes()),
            reaction.with_feedback_when_performed(tx),
        )]);
        assert_unavailable(rig.history(&conversation).await, name);
        assert_unavailable(
            rig.call::<_, v1::GetConversationResponse>(
                FanoutMethod::GetConversation,
                &wire::GetConversation {
                    actor: actor("bob"),
                    request: Some(v1::GetConversationRequest {
                        conversation_id: conversation.clone(),
                    }),
                },
            )
            .await,
            name,
        );
        assert!(fired(&mut feedback) >= 2, "{name}: the faults fired");
    }

    rig.rules(Vec::new());
    let history = rig.history(&conversation).await.expect("serves again");
    assert_eq!(history.messages.len(), 1);
    assert_eq!(history.messages[0].message_id, sent.message_id);
    rig.stop().await;
}

/// Idempotent statements that time out once are sent again by the driver
/// (on the same node: the coordinator answered, its replicas were slow)
/// and the caller never sees the fault: a history read, and a message's
/// row write, whose sender gets its acknowledgement and whose message is
/// stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_statements_that_time_out_once_are_retried_by_the_driver() {
    let mut rig = Rig::start("retry").await;
    let conversation = rig.create_conversation().await;
    let sent = rig
        .submit(&send(&conversation, "m-retry", "relu"))
        .await
        .expect("stored");

    let (tx, mut feedback) = mpsc::unbounded_channel();
    rig.rules(vec![RequestRule(
        execute_with(conversation.as_bytes()).and(Condition::TrueForLimitedTimes(1)),
        RequestReaction::forge()
            .read_timeout()
            .with_feedback_when_performed(tx),
    )]);
    let history = rig.history(&conversation).await;
    assert_eq!(fired(&mut feedback), 1, "the read timed out once");
    let history = history.unwrap_or_else(|e| panic!("the driver retries the read: {e}"));
    assert_eq!(history.messages.len(), 1);
    assert_eq!(history.messages[0].message_id, sent.message_id);

    let message = send(&conversation, "m-retry-write", "écrit au second essai");
    let (tx, mut feedback) = mpsc::unbounded_channel();
    rig.rules(vec![RequestRule(
        execute_with(&message.ciphertext).and(Condition::TrueForLimitedTimes(1)),
        RequestReaction::forge()
            .write_timeout()
            .with_feedback_when_performed(tx),
    )]);
    let stored = rig
        .submit(&message)
        .await
        .unwrap_or_else(|e| panic!("the driver retries the row write: {e}"));
    assert_eq!(fired(&mut feedback), 1, "the row write timed out once");
    assert!(!stored.duplicate, "one claim, one write");
    rig.rules(Vec::new());
    let history = rig.history(&conversation).await.expect("history");
    let mut ids: Vec<_> = history
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["m-retry", "m-retry-write"], "each stored once");
    rig.stop().await;
}
