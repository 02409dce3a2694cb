//! Typed request/reply over the bus.
//!
//! A request is a protobuf message; the reply is a
//! [`ServiceReply`](chappe_proto::internal::ServiceReply) holding either the
//! encoded response or a [`ServiceError`] with a gRPC status code, so the
//! gateway can hand a service's precise status to the client unchanged.
//!
//! Telemetry: [`call`] runs in an `rpc.client` span whose trace context
//! travels in the request's headers; the server handles each request in an
//! `rpc.server` span, child of that context, and counts it in
//! `chappe_bus_rpc_requests_total{service,route,code}` and
//! `chappe_bus_rpc_request_duration_seconds{service,route}`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chappe_proto::internal::{ServiceError, ServiceReply, service_reply};
use chappe_telemetry::metrics::{self, RouteCodeLabels, RouteLabels};
use chappe_telemetry::otel;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use prost::Message as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
pub use tonic::Code;
use tracing::Instrument as _;

use crate::{Bus, Error, Headers, Requests};

/// A failed call: a gRPC status code, a message for the client, and for
/// `RESOURCE_EXHAUSTED` when to try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(Code::AlreadyExists, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    pub fn failed_precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    pub fn resource_exhausted(message: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(Code::ResourceExhausted, message)
        }
    }

    fn from_wire(e: ServiceError) -> Self {
        Self {
            code: Code::from_i32(e.code as i32),
            message: e.message,
            retry_after: (e.retry_after_ms > 0).then(|| Duration::from_millis(e.retry_after_ms)),
        }
    }

    fn to_wire(&self) -> ServiceError {
        ServiceError {
            code: self.code as u32,
            message: self.message.clone(),
            retry_after_ms: self.retry_after.map_or(0, |d| d.as_millis() as u64),
        }
    }
}

impl From<Error> for RpcError {
    fn from(e: Error) -> Self {
        match e {
            Error::Timeout { .. } => Self::new(Code::DeadlineExceeded, e.to_string()),
            Error::InvalidSubject(_) => Self::internal(e.to_string()),
            Error::NoResponders(_) | Error::Closed | Error::Transport(_) => {
                Self::unavailable(e.to_string())
            }
        }
    }
}

/// The metadata key that carries `retry_after` to gRPC clients, in milliseconds.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";

impl From<RpcError> for tonic::Status {
    fn from(e: RpcError) -> Self {
        let mut status = tonic::Status::new(e.code, e.message);
        if let Some(Ok(v)) = e.retry_after.map(|a| a.as_millis().to_string().parse()) {
            status.metadata_mut().insert(RETRY_AFTER_METADATA, v);
        }
        status
    }
}

/// Sends `request` to the server of `subject` and decodes its reply.
pub async fn call<Req, Resp>(
    bus: &dyn Bus,
    subject: &str,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, RpcError>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let span = tracing::info_span!(
        "rpc.client",
        otel.name = %subject,
        otel.kind = "client",
        rpc.system = "chappe-bus",
    );
    let mut headers = Headers::new();
    otel::inject_span(&span, &mut headers);
    let reply = bus
        .request(
            subject,
            headers,
            Bytes::from(request.encode_to_vec()),
            timeout,
        )
        .instrument(span)
        .await?;
    let reply = ServiceReply::decode(reply.payload)
        .map_err(|e| RpcError::internal(format!("malformed reply on {subject}: {e}")))?;
    match reply.result {
        Some(service_reply::Result::Ok(body)) => Resp::decode(body.as_slice())
            .map_err(|e| RpcError::internal(format!("malformed response on {subject}: {e}"))),
        Some(service_reply::Result::Error(e)) => Err(RpcError::from_wire(e)),
        None => Err(RpcError::internal(format!("empty reply on {subject}"))),
    }
}

/// Serves `subject` in `queue_group` with `handler` until `shutdown`
/// resolves, then waits for the requests in hand.
///
/// At most `max_in_flight` requests run at once; the rest wait on the bus. A
/// request that does not decode gets `INVALID_ARGUMENT`; a handler that
/// panics gets its caller an `INTERNAL` reply, and the server goes on.
pub async fn serve<Req, Resp, H, Fut>(
    bus: &dyn Bus,
    subject: &str,
    queue_group: &str,
    max_in_flight: usize,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    Req: prost::Message + Default + 'static,
    Resp: prost::Message + 'static,
    H: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, RpcError>> + Send + 'static,
{
    let requests = bus.serve(subject, queue_group).await?;
    serve_requests(
        requests,
        queue_group.to_owned(),
        subject.to_owned(),
        max_in_flight,
        Arc::new(handler),
        shutdown,
    )
    .await
}

async fn serve_requests<Req, Resp, H, Fut>(
    mut requests: Requests,
    service: String,
    subject: String,
    max_in_flight: usize,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error>
where
    Req: prost::Message + Default + 'static,
    Resp: prost::Message + 'static,
    H: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Resp, RpcError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut in_flight = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // Labels and the latency histogram of this route, looked up once rather
    // than per request.
    let route = RouteLabels {
        service,
        route: subject,
    };
    let duration = metrics::metrics()
        .rpc_duration
        .get_or_create(&route)
        .clone();
    let route = Arc::new(route);
    let subject = &route.route;
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.map_err(|_| Error::Closed)?,
        };
        let request = tokio::select! {
            _ = &mut shutdown => break,
            r = requests.next() => match r { Some(r) => r, None => break },
        };
        while in_flight.try_join_next().is_some() {}
        let handler = handler.clone();
        let route = route.clone();
        let duration = duration.clone();
        let span = tracing::info_span!(
            "rpc.server",
            otel.name = %subject,
            otel.kind = "server",
            rpc.system = "chappe-bus",
            rpc.service = %route.service,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        otel::set_parent(&span, &request.message.headers);
        in_flight.spawn(
            async move {
                let _permit = permit;
                let started = Instant::now();
                let subject = &route.route;
                let result = match Req::decode(request.message.payload.clone()) {
                    Err(e) => Err(RpcError::invalid_argument(format!(
                        "malformed request on {subject}: {e}"
                    ))),
                    Ok(req) => AssertUnwindSafe(handler(req))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            tracing::error!(%subject, "handler panicked");
                            Err(RpcError::internal("the service failed on this request"))
                        }),
                };
                let code = match &result {
                    Ok(_) => Code::Ok,
                    Err(e) => {
                        tracing::debug!(%subject, code = ?e.code, message = %e.message, "request refused");
                        e.code
                    }
                };
                tracing::Span::current().record("rpc.grpc.status_code", code as i32);
                duration.observe(metrics::seconds(started.elapsed()));
                metrics::metrics()
                    .rpc_requests
                    .get_or_create(&RouteCodeLabels {
                        service: route.service.clone(),
                        route: route.route.clone(),
                        code: metrics::grpc_code_name(code as i32),
                    })
                    .inc();
                let reply = ServiceReply {
                    result: Some(match result {
                        Ok(resp) => service_reply::Result::Ok(resp.encode_to_vec()),
                        Err(e) => service_reply::Result::Error(e.to_wire()),
                    }),
                };
                if let Err(e) = request.respond(Bytes::from(reply.encode_to_vec())).await {
                    tracing::warn!(%subject, error = %e, "reply not sent");
                }
            }
            .instrument(span),
        );
    }
    drop(requests);
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

type Route =
    Box<dyn FnOnce(Requests, CancellationToken) -> BoxFuture<'static, Result<(), Error>> + Send>;

/// A service's set of methods, served together and stopped together.
///
/// ```text
/// let server = Server::new(bus, "keydir", 64)
///     .route(subjects.keydir(KeydirMethod::UploadKeys), move |r| svc.upload(r))
///     .start().await?;          // every subject is subscribed once this returns
/// server.stop().await;          // stop taking requests, finish those in hand
/// ```
pub struct Server {
    bus: Arc<dyn Bus>,
    queue_group: String,
    max_in_flight: usize,
    routes: Vec<(String, Route)>,
}

impl Server {
    /// `max_in_flight` bounds the requests each method runs at once.
    pub fn new(bus: Arc<dyn Bus>, queue_group: impl Into<String>, max_in_flight: usize) -> Self {
        Self {
            bus,
            queue_group: queue_group.into(),
            max_in_flight,
            routes: Vec::new(),
        }
    }

    pub fn route<Req, Resp, H, Fut>(mut self, subject: String, handler: H) -> Self
    where
        Req: prost::Message + Default + 'static,
        Resp: prost::Message + 'static,
        H: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, RpcError>> + Send + 'static,
    {
        let max = self.max_in_flight;
        let name = subject.clone();
        let service = self.queue_group.clone();
        let route: Route = Box::new(move |requests, token| {
            Box::pin(serve_requests(
                requests,
                service,
                name,
                max,
                Arc::new(handler),
                token.cancelled_owned(),
            ))
        });
        self.routes.push((subject, route));
        self
    }

    /// Subscribes every route, then serves them in the background.
    pub async fn start(self) -> Result<RunningServer, Error> {
        let token = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (subject, route) in self.routes {
            let requests = self.bus.serve(&subject, &self.queue_group).await?;
            tasks.spawn(route(requests, token.clone()));
        }
        Ok(RunningServer { token, tasks })
    }
}

/// Handle on a started [`Server`].
pub struct RunningServer {
    token: CancellationToken,
    tasks: JoinSet<Result<(), Error>>,
}

impl RunningServer {
    /// Stops taking requests and waits for those in hand.
    pub async fn stop(mut self) {
        self.token.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Runs until `shutdown` resolves, then stops.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use chappe_proto::v1::{Ping, Pong};

    use super::*;
    use crate::memory::MemoryBus;

    #[tokio::test]
    async fn typed_calls_carry_results_and_errors() {
        let bus = MemoryBus::default();
        let server = bus.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(
                &server,
                "t.ping",
                "t",
                4,
                |p: Ping| async move {
                    match p.nonce {
                        0 => Err(RpcError::resource_exhausted(
                            "slow down",
                            Duration::from_secs(2),
                        )),
                        1 => panic!("boom"),
                        n => Ok(Pong { nonce: n + 1 }),
                    }
                },
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        tokio::task::yield_now().await;
        let t = Duration::from_secs(1);
        let pong: Pong = call(&bus, "t.ping", &Ping { nonce: 41 }, t).await.unwrap();
        assert_eq!(pong.nonce, 42);

        let err = call::<_, Pong>(&bus, "t.ping", &Ping { nonce: 0 }, t)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::ResourceExhausted);
        assert_eq!(err.retry_after, Some(Duration::from_secs(2)));
        let status = tonic::Status::from(err);
        assert_eq!(status.metadata().get(RETRY_AFTER_METADATA).unwrap(), "2000");

        let err = call::<_, Pong>(&bus, "t.ping", &Ping { nonce: 1 }, t)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Internal);

        // Garbage on the wire: INVALID_ARGUMENT, and the server keeps serving.
        let reply = bus
            .request(
                "t.ping",
                Headers::new(),
                Bytes::from_static(&[0xff, 0xff]),
                t,
            )
            .await
            .unwrap();
        let reply = ServiceReply::decode(reply.payload).unwrap();
        assert!(matches!(
            reply.result,
            Some(service_reply::Result::Error(ServiceError { code: 3, .. }))
        ));
        let pong: Pong = call(&bus, "t.ping", &Ping { nonce: 1 << 40 }, t)
            .await
            .unwrap();
        assert_eq!(pong.nonce, (1 << 40) + 1);

        // Every request was counted under its status code, and timed.
        let m = chappe_telemetry::metrics::metrics();
        let count = |code| {
            m.rpc_requests
                .get_or_create(&RouteCodeLabels {
                    service: "t".into(),
                    route: "t.ping".into(),
                    code,
                })
                .get()
        };
        assert_eq!(count("OK"), 2);
        assert_eq!(count("RESOURCE_EXHAUSTED"), 1);
        assert_eq!(count("INTERNAL"), 1);
        assert_eq!(count("INVALID_ARGUMENT"), 1);
        let text = m.encode_prometheus();
        assert!(
            text.contains(
                r#"chappe_bus_rpc_request_duration_seconds_count{service="t",route="t.ping"} 5"#
            ),
            "{text}"
        );

        stop.send(()).unwrap();
        task.await.unwrap().unwrap();
        let err = call::<_, Pong>(&bus, "t.ping", &Ping { nonce: 5 }, t)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unavailable);
    }

    #[tokio::test]
    async fn a_server_is_subscribed_when_started_and_drains_on_stop() {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::default());
        let server = Server::new(bus.clone(), "t", 8)
            .route("t.a".into(), |p: Ping| async move {
                Ok(Pong { nonce: p.nonce })
            })
            .route("t.slow".into(), |p: Ping| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Pong { nonce: p.nonce })
            })
            .start()
            .await
            .unwrap();
        let t = Duration::from_secs(2);
        let pong: Pong = call(&*bus, "t.a", &Ping { nonce: 7 }, t).await.unwrap();
        assert_eq!(pong.nonce, 7);
        let slow = {
            let bus = bus.clone();
            tokio::spawn(
                async move { call::<_, Pong>(&*bus, "t.slow", &Ping { nonce: 9 }, t).await },
            )
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.stop().await;
        // The request in hand was finished, not dropped.
        assert_eq!(slow.await.unwrap().unwrap().nonce, 9);
        let err = call::<_, Pong>(&*bus, "t.a", &Ping { nonce: 1 }, t)
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unavailable);
    }
}
