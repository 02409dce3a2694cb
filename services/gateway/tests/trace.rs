//! Distributed tracing across a deployment: keydir, a fanout and two
//! gateways as processes over a real nats-server, exporting their spans over
//! OTLP/gRPC to a receiver this test runs. alice (on gateway 0) sends bob
//! (on gateway 1) one message; its trace must run, under one trace id, from
//! alice's gateway through fanout's submit and delivery to bob's gateway's
//! push. A raw frame carrying a client's `traceparent` continues the
//! client's trace. Export is batched far apart, so what the receiver gets
//! is what the services flush when they are SIGTERMed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chappe_client::ids::UserId;
use chappe_client::{Client, ClientConfig, ConversationKind, Event, KdfParams};
use chappe_proto::v1::auth_client::AuthClient;
use chappe_proto::v1::gateway_client::GatewayClient;
use chappe_proto::v1::{
    ClientFrame, DevCredential, LoginRequest, SyncRequest, client_frame, login_request,
    server_frame,
};
use chappe_testkit::cluster::{Cluster, ClusterConfig};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

const WAIT: Duration = Duration::from_secs(30);
/// How long the services get to flush their spans after SIGTERM.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Received {
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    name: String,
    kind: i32,
    /// The resource's `service.name`.
    service: String,
    /// String attributes of the span.
    attributes: BTreeMap<String, String>,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn string_value(value: Option<&AnyValue>) -> Option<String> {
    match value?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), string_value(kv.value.as_ref())?)))
        .collect()
}

/// The OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| attributes(&r.attributes).remove("service.name"))
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.push(Received {
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        service: service.clone(),
                        attributes: attributes(&span.attributes),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(received);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves a [`Receiver`] on a free loopback port; returns it and its URL.
async fn start_receiver() -> (Receiver, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver::default();
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("the OTLP receiver serves");
    });
    (receiver, url)
}

fn config(cluster: &Cluster, gateway: usize, name: &str) -> ClientConfig {
    let mut config = ClientConfig::new(
        cluster.gateway_urls()[gateway].clone(),
        cluster.dir().join("devices").join(name),
        format!("{name} passphrase"),
    );
    config.kdf = KdfParams::insecure_fast();
    config
}

/// The spans of one message's trace, when `spans` hold all of them: alice's
/// Send frame on a gateway, fanout's submit, its delivery and the push to
/// bob on a gateway.
struct MessageTrace {
    spans: Vec<Received>,
}

fn find<'a>(
    spans: &'a [Received],
    what: &str,
    pred: impl Fn(&Received) -> bool,
) -> Result<&'a Received, String> {
    spans
        .iter()
        .find(|s| pred(s))
        .ok_or_else(|| format!("no {what}"))
}

/// The trace of alice's Send frame, with every span the path requires.
fn message_trace(spans: &[Received]) -> Result<MessageTrace, String> {
    let send = find(spans, "Connect/Send span of alice", |s| {
        s.name == "Connect/Send" && s.attribute("user") == Some("alice")
    })?;
    let trace: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id == send.trace_id)
        .cloned()
        .collect();
    for (what, pred) in required() {
        find(&trace, what, pred)?;
    }
    Ok(MessageTrace { spans: trace })
}

type Pred = fn(&Received) -> bool;

/// What the trace of one message must contain.
fn required() -> [(&'static str, Pred); 6] {
    [
        ("sender gateway's Connect/Send span", |s| {
            s.name == "Connect/Send"
                && s.service == "chappe-gateway"
                && s.kind == SpanKind::Server as i32
                && s.attribute("user") == Some("alice")
        }),
        ("gateway's rpc client span for fanout.submit", |s| {
            s.name == "chappe.rpc.fanout.submit"
                && s.service == "chappe-gateway"
                && s.kind == SpanKind::Client as i32
        }),
        ("fanout's rpc server span for submit", |s| {
            s.name == "chappe.rpc.fanout.submit"
                && s.service == "chappe-fanout"
                && s.kind == SpanKind::Server as i32
        }),
        ("fanout's submit handler span", |s| {
            s.name == "submit" && s.service == "chappe-fanout"
        }),
        ("fanout.deliver", |s| {
            s.name == "fanout.deliver"
                && s.service == "chappe-fanout"
                && s.kind == SpanKind::Consumer as i32
        }),
        ("recipient gateway's gateway.push to bob", |s| {
            s.name == "gateway.push"
                && s.service == "chappe-gateway"
                && s.kind == SpanKind::Consumer as i32
                && s.attribute("user") == Some("bob")
        }),
    ]
}

/// The client's span a raw frame names as its parent.
const CLIENT_TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// Logs `user` in on `url` without the SDK and sends one `Sync` frame whose
/// `trace_context` names the client's span; waits for its answer.
async fn raw_traced_sync(url: &str, user: &str) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token = AuthClient::new(channel.clone())
        .login(LoginRequest {
            device_id: "raw".into(),
            credential: Some(login_request::Credential::Dev(DevCredential {
                user_id: user.into(),
            })),
        })
        .await
        .expect("development login")
        .into_inner()
        .session_token;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut gateway = GatewayClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ClientFrame {
        request_id: 1,
        body: Some(client_frame::Body::Sync(SyncRequest::default())),
        trace_context: [(
            "traceparent".to_owned(),
            format!("00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"),
        )]
        .into(),
    })
    .await
    .unwrap();
    let mut inbound = gateway
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("Connect")
        .into_inner();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, inbound.message())
            .await
            .expect("the Sync frame answered in time")
            .expect("the stream stays up")
            .expect("the stream stays open");
        if frame.request_id == 1 {
            assert!(
                matches!(frame.body, Some(server_frame::Body::Sync(_))),
                "{frame:?}"
            );
            break;
        }
    }
    drop(tx);
}

/// Checks that the raw frame's spans continue the client's trace: the
/// gateway's span of the frame is the child of the client's span, and the
/// trace goes on into fanout.
fn client_trace(spans: &[Received]) -> Result<(), String> {
    let trace: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id == CLIENT_TRACE_ID)
        .cloned()
        .collect();
    find(&trace, "Connect/Sync span under the client's span", |s| {
        s.name == "Connect/Sync"
            && s.service == "chappe-gateway"
            && s.parent_span_id == CLIENT_SPAN_ID
            && s.attribute("user") == Some("carol")
    })?;
    find(&trace, "fanout's sync span in the client's trace", |s| {
        s.name == "chappe.rpc.fanout.sync"
            && s.service == "chappe-fanout"
            && s.kind == SpanKind::Server as i32
    })?;
    Ok(())
}

fn summary(spans: &[Received]) -> String {
    let mut lines: Vec<String> = spans
        .iter()
        .map(|s| {
            format!(
                "{} {} parent={} {} [{}] kind={} {:?}",
                s.trace_id, s.span_id, s.parent_span_id, s.name, s.service, s.kind, s.attributes
            )
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_senders_send_to_the_recipients_push() {
    let started = Instant::now();
    let (receiver, url) = start_receiver().await;
    let env = vec![
        ("CHAPPE_OTLP_ENDPOINT".to_owned(), url),
        // No periodic export within the test: spans reach the receiver
        // only when the services flush on SIGTERM.
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()),
    ];
    // Starting (and stopping) processes blocks: off the runtime that serves
    // the receiver.
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start(ClusterConfig {
            gateways: 2,
            fanouts: 1,
            env,
        })
    })
    .await
    .unwrap();

    let alice = Client::login_dev(config(&cluster, 0, "alice"), "alice", "laptop")
        .await
        .expect("alice logs in on gateway 0");
    let bob = Client::login_dev(config(&cluster, 1, "bob"), "bob", "phone")
        .await
        .expect("bob logs in on gateway 1");
    let _alice_events = alice.connect().await.unwrap();
    let mut bob_events = bob.connect().await.unwrap();
    let chat = alice
        .create_conversation(ConversationKind::Direct, &[UserId::parse("bob").unwrap()])
        .await
        .unwrap();
    alice.send_text(&chat.id, "traced").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, bob_events.next()).await {
            Ok(Some(Event::Message(m))) => {
                assert_eq!(m.body, "traced");
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("bob's events ended"),
            Err(_) => panic!("bob got no message within {WAIT:?}"),
        }
    }
    // A frame with a client's trace context, on the other gateway.
    raw_traced_sync(&cluster.gateway_urls()[1], "carol").await;
    alice.disconnect();
    bob.disconnect();

    assert!(
        receiver.spans().is_empty(),
        "spans exported before shutdown: the test would not show the flush"
    );
    // SIGTERM: every service flushes the spans it still holds.
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .unwrap();
    let deadline = Instant::now() + FLUSH_WAIT;
    let trace = loop {
        let spans = receiver.spans();
        match message_trace(&spans).and_then(|t| client_trace(&spans).map(|()| t)) {
            Ok(trace) => break trace,
            Err(missing) => assert!(
                Instant::now() < deadline,
                "{missing} within {FLUSH_WAIT:?} of the services' exit; received:\n{}",
                summary(&spans)
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Both kinds of service took part.
    let services: HashSet<&str> = trace.spans.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains("chappe-gateway") && services.contains("chappe-fanout"),
        "{services:?}"
    );
    // One tree: a single root, alice's Send frame; every other span's parent
    // is in the trace.
    let ids: HashSet<&str> = trace.spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Received> = trace
        .spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty() || s.parent_span_id == "0000000000000000")
        .collect();
    assert_eq!(roots.len(), 1, "roots: {}", summary(&trace.spans));
    assert_eq!(roots[0].name, "Connect/Send", "{}", summary(&trace.spans));
    for span in &trace.spans {
        assert!(
            span.span_id == roots[0].span_id || ids.contains(span.parent_span_id.as_str()),
            "{} has its parent outside the trace:\n{}",
            span.name,
            summary(&trace.spans)
        );
    }
    // The causal chain: the push descends from the delivery, which descends
    // from the submit, which descends from the Send frame.
    let by_id: BTreeMap<&str, &Received> = trace
        .spans
        .iter()
        .map(|s| (s.span_id.as_str(), s))
        .collect();
    let ancestors = |span: &Received| -> Vec<String> {
        let mut names = Vec::new();
        let mut at = by_id.get(span.parent_span_id.as_str());
        while let Some(s) = at {
            names.push(s.name.clone());
            at = by_id.get(s.parent_span_id.as_str());
        }
        names
    };
    let push = find(&trace.spans, "push", required()[5].1).unwrap();
    let chain = ancestors(push);
    for name in [
        "fanout.deliver",
        "submit",
        "chappe.rpc.fanout.submit",
        "Connect/Send",
    ] {
        assert!(
            chain.iter().any(|n| n == name),
            "gateway.push descends from {chain:?}, not from {name}"
        );
    }
    eprintln!(
        "one trace of {} spans over {services:?}, in {:?}:\n{}",
        trace.spans.len(),
        started.elapsed(),
        summary(&trace.spans)
    );
}
