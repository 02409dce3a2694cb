//! A light device for the pre-encrypted mode and for idle and reconnect
//! scenarios: a session token and one `Connect` stream, speaking the wire
//! protocol directly, without the SDK's crypto state.
//!
//! What it sends are real Megolm ciphertexts, made before the measured
//! phase, so the server does exactly the work it does for real clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chappe_proto::v1::auth_client::AuthClient;
use chappe_proto::v1::gateway_client::GatewayClient;
use chappe_proto::v1::{
    ClientFrame, DevCredential, LoginRequest, Message, ServerFrame, SyncRequest, client_frame,
    login_request, server_frame,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A failure of one call: its gRPC code and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CallError {
    pub code: Code,
    pub message: String,
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        Self {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

impl From<tonic::transport::Error> for CallError {
    fn from(e: tonic::transport::Error) -> Self {
        Self {
            code: Code::Unavailable,
            message: e.to_string(),
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type Gateway = GatewayClient<InterceptedService<Channel, Bearer>>;

/// A logged-in device with its own HTTP/2 connection.
pub struct RawDevice {
    pub user: String,
    pub device: String,
    channel: Channel,
    bearer: Bearer,
    timeout: Duration,
    stream: Mutex<Option<Link>>,
    next_id: AtomicU64,
}

struct Link {
    tx: mpsc::Sender<ClientFrame>,
    pending: Pending,
}

/// Opens a connection from `local` (if given) to `url`.
pub async fn channel(
    url: &str,
    local: Option<IpAddr>,
    timeout: Duration,
) -> Result<Channel, CallError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| CallError {
            code: Code::InvalidArgument,
            message: e.to_string(),
        })?
        .local_address(local)
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .connect()
        .await?)
}

impl RawDevice {
    /// Logs in with a development credential.
    pub async fn login(
        url: &str,
        local: Option<IpAddr>,
        user: &str,
        device: &str,
        timeout: Duration,
    ) -> Result<RawDevice, CallError> {
        let channel = channel(url, local, timeout).await?;
        let token = AuthClient::new(channel.clone())
            .login(LoginRequest {
                device_id: device.to_owned(),
                credential: Some(login_request::Credential::Dev(DevCredential {
                    user_id: user.to_owned(),
                })),
            })
            .await?
            .into_inner()
            .session_token;
        let bearer = format!("Bearer {token}").parse().map_err(|_| CallError {
            code: Code::Internal,
            message: "token is not ASCII".into(),
        })?;
        Ok(RawDevice {
            user: user.to_owned(),
            device: device.to_owned(),
            channel,
            bearer: Bearer(bearer),
            timeout,
            stream: Mutex::new(None),
            next_id: AtomicU64::new(1),
        })
    }

    /// A unary client carrying this device's token.
    pub fn gateway(&self) -> Gateway {
        GatewayClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }

    /// Opens the `Connect` stream; pushed messages go to `deliveries`.
    pub async fn connect(
        &self,
        deliveries: mpsc::UnboundedSender<Message>,
    ) -> Result<(), CallError> {
        let (tx, rx) = mpsc::channel(1024);
        let mut inbound = self
            .gateway()
            .connect(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let pending: Pending = Arc::default();
        let answers = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = inbound.next().await {
                match frame.body {
                    Some(server_frame::Body::Message(m)) if frame.request_id == 0 => {
                        let _ = deliveries.send(m);
                    }
                    _ if frame.request_id != 0 => {
                        let waiter = answers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&frame.request_id);
                        if let Some(w) = waiter {
                            let _ = w.send(frame);
                        }
                    }
                    _ => {}
                }
            }
            // The stream ended: fail everything still waiting.
            answers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        });
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(Link { tx, pending });
        Ok(())
    }

    /// Closes the `Connect` stream.
    pub fn disconnect(&self) {
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Sends a frame and waits for its answer.
    pub async fn ask(&self, body: client_frame::Body) -> Result<server_frame::Body, CallError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer_rx) = oneshot::channel();
        let tx = {
            let guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
            let link = guard.as_ref().ok_or_else(|| CallError {
                code: Code::Unavailable,
                message: "not connected".into(),
            })?;
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(request_id, answer_tx);
            link.tx.clone()
        };
        let lost = || CallError {
            code: Code::Unavailable,
            message: "stream closed".into(),
        };
        tx.send(ClientFrame {
            request_id,
            trace_context: Default::default(),
            body: Some(body),
        })
        .await
        .map_err(|_| lost())?;
        let frame = tokio::time::timeout(self.timeout, answer_rx)
            .await
            .map_err(|_| CallError {
                code: Code::DeadlineExceeded,
                message: "no answer in time".into(),
            })?
            .map_err(|_| lost())?;
        match frame.body {
            Some(server_frame::Body::Error(e)) => Err(CallError {
                code: Code::from_i32(e.code as i32),
                message: e.message,
            }),
            Some(body) => Ok(body),
            None => Err(CallError {
                code: Code::Internal,
                message: "empty answer".into(),
            }),
        }
    }

    /// Syncs from nothing, as a reconnecting device does.
    pub async fn sync(&self) -> Result<(), CallError> {
        self.ask(client_frame::Body::Sync(SyncRequest {
            cursors: Vec::new(),
            limit: 1,
            continuation: false,
        }))
        .await
        .map(|_| ())
    }
}
