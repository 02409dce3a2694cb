//! Shared test harness: a platform on a free loopback port in a temporary
//! directory (or a cluster of service processes over NATS), raw gRPC
//! clients for poking at it, and the scenarios both must pass.
#![allow(dead_code)]

pub mod presence_media;
pub mod proxy;
pub mod scenarios;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use chappe_cli::platform::{Platform, PlatformConfig};
use chappe_proto::v1::auth_client::AuthClient;
use chappe_proto::v1::gateway_client::GatewayClient;
use chappe_proto::v1::{DevCredential, LoginRequest, login_request};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

pub struct TestPlatform {
    pub platform: Platform,
    pub dir: tempfile::TempDir,
}

impl TestPlatform {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut PlatformConfig)) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut config = PlatformConfig::new(dir.path().join("data"));
        config.gateway.listen = "127.0.0.1:0".parse().expect("address");
        tune(&mut config);
        let platform = Platform::start(config).await.expect("platform starts");
        Self { platform, dir }
    }

    pub fn url(&self) -> String {
        self.platform.gateway_url()
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connects to the gateway")
    }

    /// A session token for a development user and device.
    pub async fn token(&self, user: &str, device: &str) -> String {
        let mut auth = AuthClient::new(self.channel().await);
        auth.login(LoginRequest {
            device_id: device.into(),
            credential: Some(login_request::Credential::Dev(DevCredential {
                user_id: user.into(),
            })),
        })
        .await
        .expect("login")
        .into_inner()
        .session_token
    }

    /// A gateway client that sends `token` (or nothing) with each call.
    pub async fn client(
        &self,
        token: Option<String>,
    ) -> GatewayClient<InterceptedService<Channel, Bearer>> {
        GatewayClient::with_interceptor(self.channel().await, Bearer(token))
    }
}

/// Adds `authorization: Bearer <token>` when it has one.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value: MetadataValue<_> = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::internal("token is not ASCII"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A codec that sends and receives raw bytes: lets a test put anything on
/// the wire, malformed protobuf included.
#[derive(Default, Clone)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A well-formed Megolm ciphertext (from a throwaway session).
pub fn megolm_ciphertext(plaintext: &str) -> (Vec<u8>, String) {
    let mut session =
        vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    (session.encrypt(plaintext).to_bytes(), session.session_id())
}

/// Where the scenarios run: the platform in this process, or a cluster of
/// service processes.
pub trait Deployment: Sync {
    /// Every gateway, in order.
    fn gateway_urls(&self) -> Vec<String>;
    /// The test's directory (devices keep their state under it).
    fn dir(&self) -> &std::path::Path;
    /// The store the services write to.
    fn store(&self) -> std::sync::Arc<dyn chappe_storage::Store>;
}

impl Deployment for TestPlatform {
    fn gateway_urls(&self) -> Vec<String> {
        vec![self.url()]
    }
    fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    fn store(&self) -> std::sync::Arc<dyn chappe_storage::Store> {
        self.platform.store()
    }
}

/// keydir, fanouts and gateways each in a process of its own over a real
/// nats-server (two of each but keydir by default).
pub struct TestCluster {
    pub cluster: chappe_testkit::cluster::Cluster,
    /// The services' store, opened by the test to look at what was written.
    store: std::sync::Arc<dyn chappe_storage::Store>,
}

impl TestCluster {
    pub fn start() -> Self {
        Self::start_with(chappe_testkit::cluster::ClusterConfig::default())
    }

    pub fn start_with(config: chappe_testkit::cluster::ClusterConfig) -> Self {
        let cluster = chappe_testkit::cluster::Cluster::start(config);
        let store = chappe_storage::EmbeddedStore::open(&cluster.dir().join("chappe.db"))
            .expect("the cluster's store opens");
        Self {
            cluster,
            store: std::sync::Arc::new(store),
        }
    }
}

impl TestCluster {
    /// A cluster whose services keep their data at `store` (given to them
    /// as `CHAPPE_STORE`), which the test migrates first.
    pub async fn start_on_store(
        mut config: chappe_testkit::cluster::ClusterConfig,
        store: &chappe_storage::StoreLocation,
        url: &str,
    ) -> Self {
        let (opened, _) = chappe_storage::AnyStore::migrate_and_open(store)
            .await
            .expect("the store migrates");
        config.env.push(("CHAPPE_STORE".into(), url.into()));
        let cluster =
            tokio::task::block_in_place(|| chappe_testkit::cluster::Cluster::start(config));
        Self {
            cluster,
            store: opened.shared(),
        }
    }
}

impl Deployment for TestCluster {
    fn gateway_urls(&self) -> Vec<String> {
        self.cluster.gateway_urls().to_vec()
    }
    fn dir(&self) -> &std::path::Path {
        self.cluster.dir()
    }
    fn store(&self) -> std::sync::Arc<dyn chappe_storage::Store> {
        self.store.clone()
    }
}

/// A device's client settings for this deployment: its own state directory
/// under the test's temporary directory, and a cheap KDF. With several
/// gateways, devices are spread over them by name (so that a conversation's
/// members sit on different gateways) and fail over to the others.
pub fn client_config(deployment: &impl Deployment, name: &str) -> chappe_client::ClientConfig {
    let mut urls = deployment.gateway_urls();
    let first = name.bytes().map(usize::from).sum::<usize>() % urls.len();
    urls.rotate_left(first);
    let mut config = chappe_client::ClientConfig::new(
        urls[0].clone(),
        deployment.dir().join("devices").join(name),
        format!("{name} passphrase"),
    );
    config.failover_urls = urls[1..].to_vec();
    config.kdf = chappe_client::KdfParams::insecure_fast();
    config
}

/// A well-formed Olm pre-key message (type and bytes), between throwaway
/// accounts.
pub fn olm_ciphertext() -> (u32, Vec<u8>) {
    use vodozemac::olm::{Account, SessionConfig};
    let alice = Account::new();
    let mut bob = Account::new();
    bob.generate_one_time_keys(1);
    let otk = *bob.one_time_keys().values().next().expect("a one-time key");
    let mut session = alice
        .create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk)
        .expect("an Olm session");
    let (kind, bytes) = session.encrypt("room key").expect("encrypts").to_parts();
    (kind as u32, bytes)
}
