//! gRPC transport: login, unary calls, and the `Connect` stream.
//!
//! [`Rpc`] owns the channel and the session token (sent as
//! `authorization: Bearer <token>` by an interceptor); unary calls get a
//! deadline and, when the token expired, one transparent re-login with the
//! device's development credential.
//!
//! [`Link`] keeps one `Connect` stream open: a task writes the frames queued
//! on an mpsc, reads the server's frames, hands each answer to the oneshot
//! registered under its `request_id`, and forwards pushed deliveries as
//! [`Push`]. When the stream breaks it fails the outstanding requests with
//! [`Error::Disconnected`], reports [`Push::Disconnected`], waits with
//! exponential backoff and jitter, reconnects and reports [`Push::Connected`]
//! (the client then syncs). `FrameError`s and statuses become
//! [`Error::Status`] with the gRPC code and retry-after.
//!
//! The `Media` service (attachment chunks) is served on the same channel
//! with the same bearer token; its client accepts larger messages
//! (`media_max_message_bytes`) than `Connect`'s frames.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chappe_proto::v1::{
    self as pb, auth_client::AuthClient, client_frame, gateway_client::GatewayClient,
    media_client::MediaClient, server_frame,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, timeout, timeout_at};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::crypto::DeviceAddr;
use crate::error::{Error, Result};
use crate::state::SessionToken;

/// Transport settings, taken from [`ClientConfig`](crate::ClientConfig).
#[derive(Debug, Clone)]
pub(crate) struct TransportConfig {
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub ping_interval: Duration,
    pub outgoing_buffer: usize,
    pub local_address: Option<std::net::IpAddr>,
    /// Largest gRPC message of the `Media` service, either way.
    pub media_max_message_bytes: usize,
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Default)]
pub(crate) struct Bearer(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let value = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(value) = value {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

pub(crate) type Gateway = GatewayClient<InterceptedService<Channel, Bearer>>;
pub(crate) type Media = MediaClient<InterceptedService<Channel, Bearer>>;

/// The channels (one per gateway URL), the token, and unary calls.
pub(crate) struct Rpc {
    /// One lazily connected channel per gateway; `current` is in use until
    /// it fails, then the next one is.
    channels: Vec<Channel>,
    current: AtomicUsize,
    bearer: Bearer,
    token: Mutex<Option<SessionToken>>,
    /// The device this client logs in as (development credential).
    device: DeviceAddr,
    config: TransportConfig,
    relogin_lock: tokio::sync::Mutex<()>,
}

impl Rpc {
    /// Prepares a lazily connected channel to each of `urls`
    /// (`http://host:port`), the first in use.
    pub fn new(urls: &[&str], device: DeviceAddr, config: TransportConfig) -> Result<Rpc> {
        if urls.is_empty() {
            return Err(Error::Config("no server URL".into()));
        }
        let channels = urls
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared((*url).to_owned())
                    .map_err(|e| Error::Config(format!("server URL {url:?}: {e}")))?
                    .connect_timeout(config.connect_timeout)
                    .tcp_nodelay(true)
                    .local_address(config.local_address)
                    .http2_keep_alive_interval(config.ping_interval)
                    .keep_alive_timeout(config.request_timeout)
                    .keep_alive_while_idle(true);
                Ok(endpoint.connect_lazy())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Rpc {
            channels,
            current: AtomicUsize::new(0),
            bearer: Bearer::default(),
            token: Mutex::new(None),
            device,
            config,
            relogin_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// The gateway in use and its index (for [`Rpc::fail_over`]).
    fn channel(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        (i, self.channels[i].clone())
    }

    /// Moves on from gateway `failed` to the next one, unless another task
    /// already did (so two failures seen at once move one step, not two).
    pub fn fail_over(&self, failed: usize) {
        if self.channels.len() < 2 {
            return;
        }
        let next = (failed + 1) % self.channels.len();
        if self
            .current
            .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(from = failed, to = next, "failing over to another gateway");
        }
    }

    pub fn set_token(&self, token: Option<SessionToken>) -> Result<()> {
        let header = match &token {
            Some(t) => Some(
                MetadataValue::try_from(format!("Bearer {}", t.token))
                    .map_err(|_| Error::protocol("session token is not valid ASCII"))?,
            ),
            None => None,
        };
        *self.bearer.0.write().unwrap_or_else(|e| e.into_inner()) = header;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
        Ok(())
    }

    pub fn token(&self) -> Option<SessionToken> {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Logs in with the development credential and installs the token.
    pub async fn login_dev(&self) -> Result<SessionToken> {
        let request = pb::LoginRequest {
            device_id: self.device.device_id.to_string(),
            credential: Some(pb::login_request::Credential::Dev(pb::DevCredential {
                user_id: self.device.user_id.to_string(),
            })),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.config.request_timeout);
        let (used, channel) = self.channel();
        let mut auth = AuthClient::new(channel);
        let response = match timeout(self.config.request_timeout, auth.login(request)).await {
            Err(_) => {
                self.fail_over(used);
                return Err(Error::Timeout(self.config.request_timeout));
            }
            Ok(Err(status)) => {
                if status.code() == tonic::Code::Unavailable {
                    self.fail_over(used);
                }
                return Err(status.into());
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        let device = DeviceAddr::from_proto(response.device.as_ref())?;
        if device != self.device {
            return Err(Error::protocol(format!(
                "logged in as {device}, asked for {}",
                self.device
            )));
        }
        if response.session_token.is_empty() {
            return Err(Error::protocol("empty session token"));
        }
        let token = SessionToken {
            token: response.session_token,
            expires_at_ms: response.expires_at_ms,
        };
        self.set_token(Some(token.clone()))?;
        Ok(token)
    }

    /// Logs in again unless another task just did (the token changed since
    /// `stale` was read).
    pub async fn relogin(&self, stale: Option<String>) -> Result<()> {
        let _guard = self.relogin_lock.lock().await;
        let current = self.token().map(|t| t.token);
        if current != stale {
            return Ok(());
        }
        tracing::info!(device = %self.device, "session token refused; logging in again");
        self.login_dev().await.map(drop)
    }

    /// A client of the gateway in use, and its index.
    pub fn gateway(&self) -> (usize, Gateway) {
        let (i, channel) = self.channel();
        (
            i,
            GatewayClient::with_interceptor(channel, self.bearer.clone()),
        )
    }

    /// A client of the `Media` service of the gateway in use, and its index.
    pub fn media(&self) -> (usize, Media) {
        let (i, channel) = self.channel();
        let limit = self.config.media_max_message_bytes;
        (
            i,
            MediaClient::with_interceptor(channel, self.bearer.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
    }

    /// `Media.Status` of one of this user's uploads.
    pub async fn media_status(&self, media_id: &str) -> Result<pb::MediaInfo> {
        let req = pb::MediaStatusRequest {
            media_id: media_id.to_owned(),
        };
        self.unary(
            req,
            Self::media,
            |mut m, r| async move { m.status(r).await },
        )
        .await
    }

    /// One unary call with a deadline; re-logs in once on `UNAUTHENTICATED`.
    pub async fn call<Req, Resp, F, Fut>(&self, req: Req, f: F) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(Gateway, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.unary(req, Self::gateway, f).await
    }

    /// One unary call on a client made by `client`, with a deadline;
    /// re-logs in once on `UNAUTHENTICATED`.
    async fn unary<C, Req, Resp, F, Fut>(
        &self,
        req: Req,
        client: fn(&Self) -> (usize, C),
        f: F,
    ) -> Result<Resp>
    where
        Req: Clone,
        F: Fn(C, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let limit = self.config.request_timeout;
        let mut relogged = false;
        loop {
            let used = self.token().map(|t| t.token);
            let mut request = tonic::Request::new(req.clone());
            request.set_timeout(limit);
            let (gateway_index, gateway) = client(self);
            match timeout(limit, f(gateway, request)).await {
                Err(_) => {
                    self.fail_over(gateway_index);
                    return Err(Error::Timeout(limit));
                }
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if status.code() == tonic::Code::Unauthenticated && !relogged => {
                    relogged = true;
                    self.relogin(used).await?;
                }
                Ok(Err(status)) => {
                    // The caller retries (it knows whether the call may be
                    // repeated); the retry goes to the next gateway.
                    if status.code() == tonic::Code::Unavailable {
                        self.fail_over(gateway_index);
                    }
                    return Err(status.into());
                }
            }
        }
    }

    pub async fn upload_keys(&self, req: pb::UploadKeysRequest) -> Result<pb::UploadKeysResponse> {
        self.call(req, |mut g, r| async move { g.upload_keys(r).await })
            .await
    }

    pub async fn query_devices(
        &self,
        req: pb::QueryDevicesRequest,
    ) -> Result<pb::QueryDevicesResponse> {
        self.call(req, |mut g, r| async move { g.query_devices(r).await })
            .await
    }

    pub async fn claim_keys(&self, req: pb::ClaimKeysRequest) -> Result<pb::ClaimKeysResponse> {
        self.call(req, |mut g, r| async move { g.claim_keys(r).await })
            .await
    }

    pub async fn create_conversation(
        &self,
        req: pb::CreateConversationRequest,
    ) -> Result<pb::CreateConversationResponse> {
        self.call(
            req,
            |mut g, r| async move { g.create_conversation(r).await },
        )
        .await
    }

    pub async fn list_conversations(&self) -> Result<pb::ListConversationsResponse> {
        self.call(pb::ListConversationsRequest {}, |mut g, r| async move {
            g.list_conversations(r).await
        })
        .await
    }

    pub async fn get_conversation(
        &self,
        req: pb::GetConversationRequest,
    ) -> Result<pb::GetConversationResponse> {
        self.call(req, |mut g, r| async move { g.get_conversation(r).await })
            .await
    }

    pub async fn update_membership(
        &self,
        req: pb::UpdateMembershipRequest,
    ) -> Result<pb::UpdateMembershipResponse> {
        self.call(req, |mut g, r| async move { g.update_membership(r).await })
            .await
    }

    pub async fn history(&self, req: pb::HistoryRequest) -> Result<pb::HistoryResponse> {
        self.call(req, |mut g, r| async move { g.history(r).await })
            .await
    }
}

// ------------------------------------------------------------------ link

/// What the `Connect` stream hands to the client.
#[derive(Debug)]
pub(crate) enum Push {
    /// A stream is (again) open: sync now.
    Connected,
    /// The stream broke; the link reconnects by itself.
    Disconnected(String),
    Message(pb::Message),
    ToDevice(pb::ToDeviceEvent),
    /// A conversation of ours was created or changed members.
    ConversationChanged(pb::Conversation),
    /// A user we share a conversation with changed devices.
    DeviceListChanged(String),
    /// A user we share a conversation with changed presence.
    PresenceChanged(pb::PresenceInfo),
    /// A member of one of our conversations is typing (or stopped).
    Typing(pb::TypingEvent),
}

type Answer = Result<server_frame::Body>;

struct LinkShared {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    out: Mutex<Option<mpsc::Sender<pb::ClientFrame>>>,
    connected: watch::Sender<bool>,
}

impl LinkShared {
    fn fail_pending(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, tx) in pending {
            let _ = tx.send(Err(Error::Disconnected));
        }
    }

    fn take_pending(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
    }
}

/// Removes a request's oneshot if the request is abandoned.
struct PendingGuard<'a> {
    shared: &'a LinkShared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.take_pending(self.id);
    }
}

/// The `Connect` stream, kept open. Dropping the link stops it.
pub(crate) struct Link {
    shared: Arc<LinkShared>,
    request_timeout: Duration,
    shutdown: watch::Sender<bool>,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl Link {
    /// Starts the connection task. Pushed events arrive on the receiver.
    pub fn start(rpc: Arc<Rpc>) -> (Link, mpsc::UnboundedReceiver<Push>) {
        let shared = Arc::new(LinkShared {
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            out: Mutex::new(None),
            connected: watch::Sender::new(false),
        });
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let request_timeout = rpc.config().request_timeout;
        tokio::spawn(run(shared.clone(), rpc, push_tx, shutdown_rx));
        (
            Link {
                shared,
                request_timeout,
                shutdown,
            },
            push_rx,
        )
    }

    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Sends one frame and waits for its answer (within the request timeout,
    /// which includes waiting for a connection).
    pub async fn request(&self, body: client_frame::Body) -> Result<server_frame::Body> {
        let limit = self.request_timeout;
        let deadline = Instant::now() + limit;
        let mut connected = self.shared.connected.subscribe();
        match timeout_at(deadline, connected.wait_for(|c| *c)).await {
            Err(_) => return Err(Error::Timeout(limit)),
            Ok(Err(_)) => return Err(Error::Disconnected),
            Ok(Ok(_)) => {}
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, answer) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let out = self
            .shared
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(Error::Disconnected)?;
        let frame = pb::ClientFrame {
            request_id: id,
            trace_context: Default::default(),
            body: Some(body),
        };
        match timeout_at(deadline, out.send(frame)).await {
            Err(_) => return Err(Error::Timeout(limit)),
            Ok(Err(_)) => return Err(Error::Disconnected),
            Ok(Ok(())) => {}
        }
        match timeout_at(deadline, answer).await {
            Err(_) => Err(Error::Timeout(limit)),
            Ok(Err(_)) => Err(Error::Disconnected),
            Ok(Ok(answer)) => answer,
        }
    }
}

enum End {
    Shutdown,
    Goaway(String),
    Broken(String),
}

async fn run(
    shared: Arc<LinkShared>,
    rpc: Arc<Rpc>,
    push: mpsc::UnboundedSender<Push>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = rpc.config().clone();
    let mut backoff = config.backoff_min;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (tx, rx) = mpsc::channel(config.outgoing_buffer.max(1));
        let used = rpc.token().map(|t| t.token);
        let (gateway_index, mut gateway) = rpc.gateway();
        let attempt = tokio::select! {
            r = timeout(config.connect_timeout + config.request_timeout, gateway.connect(ReceiverStream::new(rx))) => r,
            _ = shutdown.changed() => break,
        };
        let mut retry_now = false;
        match attempt {
            Err(_) => {
                tracing::warn!("Connect: no answer");
                rpc.fail_over(gateway_index);
            }
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "Connect refused");
                match status.code() {
                    tonic::Code::Unauthenticated => match rpc.relogin(used).await {
                        Ok(()) => retry_now = true,
                        Err(e) => tracing::warn!(error = %e, "login failed"),
                    },
                    tonic::Code::Unavailable => rpc.fail_over(gateway_index),
                    _ => {}
                }
            }
            Ok(Ok(response)) => {
                backoff = config.backoff_min;
                *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
                shared.connected.send_replace(true);
                tracing::debug!("Connect stream open");
                if push.send(Push::Connected).is_err() {
                    break;
                }
                let end = serve(
                    &shared,
                    response.into_inner(),
                    &tx,
                    &push,
                    &mut shutdown,
                    config.ping_interval,
                    config.request_timeout,
                )
                .await;
                *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
                shared.connected.send_replace(false);
                shared.fail_pending();
                // Whether the gateway drains or died, the next attempt goes
                // to another one (with a single URL, to the same one).
                rpc.fail_over(gateway_index);
                let reason = match end {
                    End::Shutdown => break,
                    End::Goaway(reason) => {
                        retry_now = true;
                        format!("server going away: {reason}")
                    }
                    End::Broken(reason) => reason,
                };
                tracing::info!(%reason, "Connect stream closed");
                if push.send(Push::Disconnected(reason)).is_err() {
                    break;
                }
            }
        }
        if !retry_now {
            let wait = jitter(backoff);
            backoff = (backoff * 2).min(config.backoff_max);
            tokio::select! {
                _ = sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
    }
    *shared.out.lock().unwrap_or_else(|e| e.into_inner()) = None;
    shared.connected.send_replace(false);
    shared.fail_pending();
}

/// Between half and all of `d`, so that clients do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}

async fn serve(
    shared: &LinkShared,
    mut stream: tonic::Streaming<pb::ServerFrame>,
    out: &mpsc::Sender<pb::ClientFrame>,
    push: &mpsc::UnboundedSender<Push>,
    shutdown: &mut watch::Receiver<bool>,
    ping_interval: Duration,
    answer_timeout: Duration,
) -> End {
    let mut ping = tokio::time::interval(ping_interval.max(Duration::from_millis(10)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_frame = Instant::now();
    loop {
        tokio::select! {
            frame = stream.message() => match frame {
                Ok(Some(frame)) => {
                    last_frame = Instant::now();
                    if let Some(end) = route(shared, push, frame) {
                        return end;
                    }
                }
                Ok(None) => return End::Broken("the server closed the stream".into()),
                Err(status) => return End::Broken(format!("{:?}: {}", status.code(), status.message())),
            },
            _ = ping.tick() => {
                if last_frame.elapsed() > ping_interval + answer_timeout {
                    return End::Broken("no frame from the server, not even a pong".into());
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                let frame = pb::ClientFrame {
                    request_id: id,
                    trace_context: Default::default(),
                    body: Some(client_frame::Body::Ping(pb::Ping { nonce: id })),
                };
                // A full queue means frames are flowing anyway.
                let _ = out.try_send(frame);
            }
            _ = shutdown.changed() => return End::Shutdown,
        }
    }
}

fn route(
    shared: &LinkShared,
    push: &mpsc::UnboundedSender<Push>,
    frame: pb::ServerFrame,
) -> Option<End> {
    use server_frame::Body;
    let id = frame.request_id;
    let Some(body) = frame.body else {
        tracing::warn!(request_id = id, "server frame without a body");
        return None;
    };
    match body {
        Body::Message(m) => {
            if push.send(Push::Message(m)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::ToDevice(e) => {
            if push.send(Push::ToDevice(e)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::ConversationChanged(c) => {
            if push.send(Push::ConversationChanged(c)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::DeviceListChanged(d) => {
            if push.send(Push::DeviceListChanged(d.user_id)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::PresenceChanged(p) => {
            if push.send(Push::PresenceChanged(p)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::Typing(t) => {
            if push.send(Push::Typing(t)).is_err() {
                return Some(End::Shutdown);
            }
        }
        Body::Goaway(g) => return Some(End::Goaway(g.reason)),
        body => match shared.take_pending(id) {
            Some(tx) => {
                let answer = match body {
                    Body::Error(e) => Err(Error::from(e)),
                    other => Ok(other),
                };
                let _ = tx.send(answer);
            }
            None => {
                if !matches!(body, Body::Pong(_)) {
                    tracing::debug!(request_id = id, "answer to no pending request");
                }
            }
        },
    }
    None
}
