//! gateway: the client-facing gRPC server (DESIGN.md §3).
//!
//! - [`config::GatewayConfig`]: listen address and every limit;
//! - [`auth`]: session tokens (HMAC, issued by `Auth.Login`), the
//!   [`auth::IdentityProvider`] behind login (a development issuer now, OIDC
//!   later) and the interceptor that puts the authenticated
//!   [`auth::Identity`] into each request's extensions;
//! - [`connections`]: the devices connected to this gateway, and the bus
//!   subscription (`chappe.deliver.u.<user>`) held while a user has one;
//! - [`service`]: the `Gateway` service: unary RPCs forwarded to keydir and
//!   fanout over the bus, and the `Connect` stream;
//! - [`media`]: the `Media` service: encrypted attachment chunks streamed
//!   to and from the media service over the bus, a chunk at a time;
//! - [`limits`]: per-device rate limits;
//! - [`readiness`]: the checks behind `/readyz`.
//!
//! *API boundary*: the gateway is the only component that speaks to
//! clients. It never interprets ciphertext; it checks identity, sizes and
//! rates, and forwards.

pub mod auth;
pub mod config;
pub mod connections;
pub mod limits;
pub mod media;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use chappe_bus::{Bus, Subjects};
use chappe_proto::v1::auth_server::AuthServer;
use chappe_proto::v1::gateway_server::GatewayServer;
use chappe_proto::v1::media_server::MediaServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

pub use auth::{DevIdentityProvider, Identity, IdentityProvider, NoIdentityProvider, SessionKeys};
pub use config::GatewayConfig;

/// A gateway is ready when its bus carries messages (it keeps no store).
pub fn readiness(bus: Arc<dyn Bus>) -> chappe_telemetry::http::Health {
    chappe_telemetry::http::Health::new().check("bus", move || {
        let bus = bus.clone();
        async move { bus.health().await.map_err(|e| e.to_string()) }
    })
}

/// What can stop a gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A gateway ready to serve on a bound listener.
pub struct Gateway {
    listener: TcpListener,
    service: service::GatewayService,
    auth: service::AuthService,
    session_keys: Arc<SessionKeys>,
    config: GatewayConfig,
}

impl Gateway {
    /// Binds `config.listen` (port 0 picks a free port: see
    /// [`Gateway::local_addr`]).
    pub async fn bind(
        config: GatewayConfig,
        bus: Arc<dyn Bus>,
        subjects: Subjects,
        session_keys: Arc<SessionKeys>,
        identity: Arc<dyn IdentityProvider>,
    ) -> Result<Self, Error> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let connections = Arc::new(connections::Connections::new(bus.clone(), subjects.clone()));
        let service = service::GatewayService::new(config.clone(), bus, subjects, connections);
        let auth = service::AuthService::new(config.clone(), session_keys.clone(), identity);
        Ok(Self {
            listener,
            service,
            auth,
            session_keys,
            config,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then tells every connected device to
    /// reconnect elsewhere (`Goaway`), stops accepting and waits up to
    /// `config.drain_grace` for streams in flight to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<GatewayServer<service::GatewayService>>()
            .await;
        reporter
            .set_serving::<AuthServer<service::AuthService>>()
            .await;
        reporter
            .set_serving::<MediaServer<media::MediaService>>()
            .await;

        let connections = self.service.connections();
        let keys = self.session_keys.clone();
        let media_frame = self.config.max_media_frame_bytes;
        let media = InterceptedService::new(
            MediaServer::new(self.service.media())
                .max_decoding_message_size(media_frame)
                .max_encoding_message_size(media_frame),
            move |req| auth::authenticate(&keys, req),
        );
        let keys = self.session_keys.clone();
        let gateway = InterceptedService::new(
            GatewayServer::new(self.service).max_decoding_message_size(self.config.max_frame_bytes),
            move |req| auth::authenticate(&keys, req),
        );
        let auth =
            AuthServer::new(self.auth).max_decoding_message_size(self.config.max_frame_bytes);
        let grace = self.config.drain_grace;
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.keepalive_timeout))
            .add_service(health)
            .add_service(auth)
            .add_service(gateway)
            .add_service(media)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), async move {
                shutdown.await;
                tracing::info!("gateway draining");
                connections.goaway_all("gateway shutting down").await;
                let _ = drained_tx.send(());
            });
        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => return result.map_err(Error::from),
            _ = drained_rx => {}
        }
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => {
                tracing::warn!(?grace, "drain grace expired; closing remaining connections");
                Ok(())
            }
        }
    }
}
