//! The `Auth` and `Gateway` gRPC services.
//!
//! Unary RPCs are forwarded to their owning service over the bus, wrapped
//! with the caller's [`Identity`]. `Connect` carries one device's frames:
//! each is answered with the same `request_id`, and failures of one frame
//! come back as a `FrameError` while the stream goes on. Only a broken
//! stream (an unreadable or oversized frame) ends it, with a precise status.
//!
//! Telemetry: each unary call and each frame is handled in a span (a unary
//! call's is the child of the `traceparent` in its gRPC metadata, a frame's
//! the child of the one in its `trace_context`) and
//! counted in `chappe_gateway_requests_total{method,code}` and
//! `chappe_gateway_request_duration_seconds{method}`; methods are the gRPC
//! method names, and `Connect/<frame kind>` for frames.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chappe_bus::subjects::{FanoutMethod, KeydirMethod, PresenceMethod};
use chappe_bus::{Bus, Headers, RpcError, Subjects, rpc};
use chappe_proto::ids::DeviceId;
use chappe_proto::internal as wire;
use chappe_proto::internal::presence_connection::Kind;
use chappe_proto::v1::{self, ClientFrame, FrameError, ServerFrame, client_frame, server_frame};
use chappe_telemetry::metrics::{self, MethodCodeLabels, MethodLabels};
use chappe_telemetry::otel;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::auth::{Identity, IdentityProvider, SessionKeys};
use crate::config::GatewayConfig;
use crate::connections::Connections;
use crate::limits::Limits;

/// How often rate-limit tables are swept.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct Inner {
    pub(crate) config: GatewayConfig,
    bus: Arc<dyn Bus>,
    pub(crate) subjects: Subjects,
    connections: Arc<Connections>,
    pub(crate) limits: Limits,
}

/// The `Gateway` service.
#[derive(Clone)]
pub struct GatewayService(Arc<Inner>);

impl GatewayService {
    pub fn new(
        config: GatewayConfig,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        connections: Arc<Connections>,
    ) -> Self {
        let limits = Limits::new(&config);
        let inner = Arc::new(Inner {
            config,
            bus,
            subjects,
            connections,
            limits,
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => inner.limits.housekeeping(),
                    None => return,
                }
            }
        });
        Self(inner)
    }

    pub fn connections(&self) -> Arc<Connections> {
        self.0.connections.clone()
    }

    /// The `Media` service, sharing this one's limits and bus.
    pub fn media(&self) -> crate::media::MediaService {
        crate::media::MediaService::new(self.0.clone())
    }
}

impl Inner {
    pub(crate) async fn call<Req, Resp>(
        &self,
        subject: String,
        request: &Req,
    ) -> Result<Resp, RpcError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        rpc::call(&*self.bus, &subject, request, self.config.rpc_timeout).await
    }

    /// Forwards a unary call after the caller's rate limit, in a span that
    /// continues the caller's trace (`parent`, from its metadata).
    pub(crate) async fn unary<Req, Resp>(
        &self,
        method: &'static str,
        parent: &Headers,
        identity: &Identity,
        subject: String,
        request: &Req,
    ) -> Result<Response<Resp>, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let span = request_span(method, identity);
        otel::set_parent(&span, parent);
        let started = Instant::now();
        let result: Result<Resp, RpcError> = async {
            self.limits.call(identity)?;
            self.call(subject, request).await
        }
        .instrument(span.clone())
        .await;
        let code = result.as_ref().map_or_else(|e| e.code, |_| Code::Ok);
        observe(&span, method, code, started);
        Ok(Response::new(result?))
    }

    fn fanout(&self, method: FanoutMethod) -> String {
        self.subjects.fanout(method)
    }

    /// Answers one frame of a `Connect` stream, in a span that continues
    /// the client's trace when the frame carries one.
    async fn frame(&self, identity: &Identity, frame: ClientFrame) -> ServerFrame {
        let request_id = frame.request_id;
        let method = frame_method(frame.body.as_ref());
        let span = frame_span(method, identity, &frame.trace_context);
        let started = Instant::now();
        let result = self
            .frame_body(identity, frame.body)
            .instrument(span.clone())
            .await;
        let code = result.as_ref().map_or_else(|e| e.code, |_| Code::Ok);
        observe(&span, method, code, started);
        let body = match result {
            Ok(body) => body,
            Err(e) => server_frame::Body::Error(FrameError {
                code: e.code as u32,
                message: e.message,
                retry_after_ms: e.retry_after.map_or(0, |d| d.as_millis() as u64),
            }),
        };
        ServerFrame {
            request_id,
            body: Some(body),
        }
    }

    async fn frame_body(
        &self,
        identity: &Identity,
        body: Option<client_frame::Body>,
    ) -> Result<server_frame::Body, RpcError> {
        use client_frame::Body as In;
        use server_frame::Body as Out;
        let actor = Some(identity.to_wire());
        match body.ok_or_else(|| RpcError::invalid_argument("frame has no body"))? {
            In::Send(request) => {
                self.limits.send(identity)?;
                let req = wire::Submit {
                    actor,
                    request: Some(request),
                };
                Ok(Out::Sent(
                    self.call(self.fanout(FanoutMethod::Submit), &req).await?,
                ))
            }
            In::SendToDevice(request) => {
                self.limits.send(identity)?;
                let req = wire::SubmitToDevice {
                    actor,
                    request: Some(request),
                };
                let subject = self.fanout(FanoutMethod::SubmitToDevice);
                Ok(Out::ToDeviceSent(self.call(subject, &req).await?))
            }
            In::AckToDevice(request) => {
                self.limits.call(identity)?;
                let req = wire::AckToDevice {
                    actor,
                    request: Some(request),
                };
                let subject = self.fanout(FanoutMethod::AckToDevice);
                Ok(Out::Acked(self.call(subject, &req).await?))
            }
            In::Sync(request) => {
                self.limits.call(identity)?;
                let req = wire::Sync {
                    actor,
                    request: Some(request),
                };
                Ok(Out::Sync(
                    self.call(self.fanout(FanoutMethod::Sync), &req).await?,
                ))
            }
            In::Ping(ping) => Ok(Out::Pong(v1::Pong { nonce: ping.nonce })),
            In::Typing(request) => {
                self.limits.call(identity)?;
                let req = wire::TypingRequest {
                    actor,
                    request: Some(request),
                };
                let subject = self.subjects.presence(PresenceMethod::Typing);
                let _: wire::PresenceAck = self.call(subject, &req).await?;
                Ok(Out::Accepted(v1::Accepted {}))
            }
            In::PresenceQuery(request) => {
                self.limits.call(identity)?;
                let req = wire::PresenceQueryRequest {
                    actor,
                    request: Some(request),
                };
                let subject = self.subjects.presence(PresenceMethod::Query);
                Ok(Out::Presence(self.call(subject, &req).await?))
            }
            In::PresenceSettings(request) => {
                self.limits.call(identity)?;
                let req = wire::PresenceSettingsRequest {
                    actor,
                    request: Some(request),
                };
                let subject = self.subjects.presence(PresenceMethod::Settings);
                let _: wire::PresenceAck = self.call(subject, &req).await?;
                Ok(Out::Accepted(v1::Accepted {}))
            }
        }
    }

    /// Reads one device's frames until it hangs up, breaks the stream or is
    /// told to go; answers go to `tx`.
    async fn serve_stream(
        self: Arc<Self>,
        identity: Identity,
        mut inbound: Streaming<ClientFrame>,
        tx: mpsc::Sender<Result<ServerFrame, Status>>,
        cancel: CancellationToken,
        presence: &PresenceReporter,
    ) {
        let permits = Arc::new(Semaphore::new(self.config.max_pending_frames.max(1)));
        let mut in_flight = JoinSet::new();
        let mut heartbeat = tokio::time::interval(self.config.presence_heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.reset();
        // Whether the device did something (not a mere ping) since the last
        // heartbeat: what "away" is computed from.
        let mut active = false;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = heartbeat.tick() => {
                    presence.report(Kind::Heartbeat, std::mem::take(&mut active));
                    continue;
                }
                next = inbound.message() => next,
            };
            let frame = match next {
                Ok(Some(frame)) => {
                    active |= !matches!(frame.body, Some(client_frame::Body::Ping(_)) | None);
                    frame
                }
                Ok(None) => break,
                Err(status) => {
                    let status = self.stream_error(status);
                    tracing::info!(user = %identity.user, device = %identity.device, code = ?status.code(), "stream ended: {}", status.message());
                    let _ = tx.send(Err(status)).await;
                    break;
                }
            };
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            while in_flight.try_join_next().is_some() {}
            let (this, identity, tx) = (self.clone(), identity.clone(), tx.clone());
            let cancel = cancel.clone();
            in_flight.spawn(async move {
                let _permit = permit;
                let answer = this.frame(&identity, frame).await;
                // A device that stopped reading loses the answer rather than
                // pinning this task: it retries with the same ids.
                tokio::select! {
                    _ = tx.send(Ok(answer)) => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
        // Frames in hand get their answers (each bounded by rpc_timeout).
        while in_flight.join_next().await.is_some() {}
    }

    /// What a broken inbound stream tells the client.
    fn stream_error(&self, status: Status) -> Status {
        match status.code() {
            // tonic reports a frame over max_decoding_message_size this way.
            Code::OutOfRange => Status::resource_exhausted(format!(
                "frame larger than max_frame_bytes ({} bytes): {}",
                self.config.max_frame_bytes,
                status.message()
            )),
            _ => status,
        }
    }
}

/// Reports one Connect stream's connection, heartbeats and end to the
/// presence service, each in a task of its own so the stream never waits
/// for presence. A lost report is repaired by the next heartbeat.
struct PresenceReporter {
    inner: Arc<Inner>,
    actor: v1::DeviceRef,
    /// Random per stream: see `PresenceConnection.connection_id`.
    connection_id: u64,
}

impl PresenceReporter {
    fn new(inner: Arc<Inner>, identity: &Identity) -> Self {
        Self {
            inner,
            actor: identity.to_wire(),
            connection_id: rand::random(),
        }
    }

    fn report(&self, kind: Kind, active: bool) {
        let inner = self.inner.clone();
        let request = wire::PresenceConnection {
            actor: Some(self.actor.clone()),
            kind: kind as i32,
            active,
            connection_id: self.connection_id,
        };
        tokio::spawn(async move {
            let subject = inner.subjects.presence(PresenceMethod::Connection);
            let result: Result<wire::PresenceAck, RpcError> = inner.call(subject, &request).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, kind = ?kind, "presence report lost");
            }
        });
    }
}

/// The span of one public request.
pub(crate) fn request_span(method: &'static str, identity: &Identity) -> tracing::Span {
    tracing::info_span!(
        "gateway.request",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
        user = %identity.user,
        device = %identity.device,
        rpc.grpc.status_code = tracing::field::Empty,
    )
}

/// The span of one `Connect` frame: a child of the client's span when the
/// frame's `trace_context` carries one (only its W3C entries are read).
fn frame_span(
    method: &'static str,
    identity: &Identity,
    trace_context: &HashMap<String, String>,
) -> tracing::Span {
    let span = request_span(method, identity);
    let parent: Headers = otel::TRACE_HEADERS
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), trace_context.get(*name)?.clone())))
        .collect();
    otel::set_parent(&span, &parent);
    span
}

/// Counts and times one public request.
pub(crate) fn observe(span: &tracing::Span, method: &'static str, code: Code, started: Instant) {
    span.record("rpc.grpc.status_code", code as i32);
    let m = metrics::metrics();
    m.gateway_duration
        .get_or_create(&MethodLabels { method })
        .observe(metrics::seconds(started.elapsed()));
    m.gateway_requests
        .get_or_create(&MethodCodeLabels {
            method,
            code: metrics::grpc_code_name(code as i32),
        })
        .inc();
}

/// The metrics label of a `Connect` frame.
fn frame_method(body: Option<&client_frame::Body>) -> &'static str {
    use client_frame::Body as In;
    match body {
        Some(In::Send(_)) => "Connect/Send",
        Some(In::SendToDevice(_)) => "Connect/SendToDevice",
        Some(In::AckToDevice(_)) => "Connect/AckToDevice",
        Some(In::Sync(_)) => "Connect/Sync",
        Some(In::Ping(_)) => "Connect/Ping",
        Some(In::Typing(_)) => "Connect/Typing",
        Some(In::PresenceQuery(_)) => "Connect/PresenceQuery",
        Some(In::PresenceSettings(_)) => "Connect/PresenceSettings",
        None => "Connect/Empty",
    }
}

/// The W3C trace context a caller put in its gRPC metadata.
pub(crate) fn trace_headers(metadata: &MetadataMap) -> Headers {
    otel::TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let value = metadata.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect()
}

#[tonic::async_trait]
impl v1::gateway_server::Gateway for GatewayService {
    type ConnectStream = ReceiverStream<Result<ServerFrame, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = Identity::of(&request)?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(self.0.config.outbound_queue.max(1));
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let registered = self
            .0
            .connections
            .register(&identity, tx.clone(), cancel.clone())
            .await;
        let code = registered.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
        observe(&tracing::Span::none(), "Connect", code, started);
        let registration = registered?;
        tracing::info!(user = %identity.user, device = %identity.device, "device connected");
        let inner = self.0.clone();
        let presence = PresenceReporter::new(inner.clone(), &identity);
        presence.report(Kind::Connected, false);
        tokio::spawn(async move {
            let who = (identity.user.clone(), identity.device.clone());
            inner
                .serve_stream(identity, inbound, tx, cancel, &presence)
                .await;
            drop(registration);
            presence.report(Kind::Disconnected, false);
            tracing::info!(user = %who.0, device = %who.1, "device disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn upload_keys(
        &self,
        request: Request<v1::UploadKeysRequest>,
    ) -> Result<Response<v1::UploadKeysResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::UploadKeys {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.subjects.keydir(KeydirMethod::UploadKeys);
        self.0
            .unary("UploadKeys", &parent, &identity, subject, &req)
            .await
    }

    async fn query_devices(
        &self,
        request: Request<v1::QueryDevicesRequest>,
    ) -> Result<Response<v1::QueryDevicesResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::QueryDevices {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.subjects.keydir(KeydirMethod::QueryDevices);
        self.0
            .unary("QueryDevices", &parent, &identity, subject, &req)
            .await
    }

    async fn claim_keys(
        &self,
        request: Request<v1::ClaimKeysRequest>,
    ) -> Result<Response<v1::ClaimKeysResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::ClaimKeys {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.subjects.keydir(KeydirMethod::ClaimKeys);
        self.0
            .unary("ClaimKeys", &parent, &identity, subject, &req)
            .await
    }

    async fn create_conversation(
        &self,
        request: Request<v1::CreateConversationRequest>,
    ) -> Result<Response<v1::CreateConversationResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::CreateConversation {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.fanout(FanoutMethod::CreateConversation);
        self.0
            .unary("CreateConversation", &parent, &identity, subject, &req)
            .await
    }

    async fn list_conversations(
        &self,
        request: Request<v1::ListConversationsRequest>,
    ) -> Result<Response<v1::ListConversationsResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::ListConversations {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.fanout(FanoutMethod::ListConversations);
        self.0
            .unary("ListConversations", &parent, &identity, subject, &req)
            .await
    }

    async fn get_conversation(
        &self,
        request: Request<v1::GetConversationRequest>,
    ) -> Result<Response<v1::GetConversationResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::GetConversation {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.fanout(FanoutMethod::GetConversation);
        self.0
            .unary("GetConversation", &parent, &identity, subject, &req)
            .await
    }

    async fn update_membership(
        &self,
        request: Request<v1::UpdateMembershipRequest>,
    ) -> Result<Response<v1::UpdateMembershipResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::UpdateMembership {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.fanout(FanoutMethod::UpdateMembership);
        self.0
            .unary("UpdateMembership", &parent, &identity, subject, &req)
            .await
    }

    async fn history(
        &self,
        request: Request<v1::HistoryRequest>,
    ) -> Result<Response<v1::HistoryResponse>, Status> {
        let identity = Identity::of(&request)?;
        let parent = trace_headers(request.metadata());
        let req = wire::History {
            actor: Some(identity.to_wire()),
            request: Some(request.into_inner()),
        };
        let subject = self.0.fanout(FanoutMethod::History);
        self.0
            .unary("History", &parent, &identity, subject, &req)
            .await
    }
}

/// The `Auth` service: logs a device in.
pub struct AuthService {
    config: GatewayConfig,
    keys: Arc<SessionKeys>,
    identity: Arc<dyn IdentityProvider>,
}

impl AuthService {
    pub fn new(
        config: GatewayConfig,
        keys: Arc<SessionKeys>,
        identity: Arc<dyn IdentityProvider>,
    ) -> Self {
        Self {
            config,
            keys,
            identity,
        }
    }
}

#[tonic::async_trait]
impl v1::auth_server::Auth for AuthService {
    async fn login(
        &self,
        request: Request<v1::LoginRequest>,
    ) -> Result<Response<v1::LoginResponse>, Status> {
        let started = Instant::now();
        let result = self.login_inner(request).await;
        let code = result.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
        observe(&tracing::Span::none(), "Login", code, started);
        result
    }
}

impl AuthService {
    async fn login_inner(
        &self,
        request: Request<v1::LoginRequest>,
    ) -> Result<Response<v1::LoginResponse>, Status> {
        let request = request.into_inner();
        let device = DeviceId::parse(request.device_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let credential = request
            .credential
            .ok_or_else(|| Status::invalid_argument("a credential is required"))?;
        let user = self.identity.authenticate(&credential).await?;
        let identity = Identity { user, device };
        let (session_token, expires_at_ms) = self.keys.issue(&identity, self.config.session_ttl);
        tracing::info!(user = %identity.user, device = %identity.device, "device logged in");
        Ok(Response::new(v1::LoginResponse {
            session_token,
            device: Some(identity.to_wire()),
            expires_at_ms: expires_at_ms as i64,
        }))
    }
}
