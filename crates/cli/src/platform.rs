//! One process, every service: the embedded store (SQLite, or a CQL
//! cluster when configured), the in-process bus, keydir, fanout, presence, media and the gateway, built from the same
//! libraries that run as separate processes in a cluster. Presence records
//! live in memory on the in-process bus, in a JetStream key-value bucket on
//! NATS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chappe_bus::memory::MemoryBus;
use chappe_bus::nats::{NatsBus, NatsConfig};
use chappe_bus::rpc::RunningServer;
use chappe_bus::{Bus, Subjects};
use chappe_fanout::{Fanout, FanoutConfig};
use chappe_gateway::{DevIdentityProvider, Gateway, GatewayConfig, SessionKeys};
use chappe_keydir::KeydirConfig;
use chappe_media::{Media, MediaConfig, SystemClock};
use chappe_presence::{
    KvPresenceStore, MemoryPresenceStore, Presence, PresenceConfig, PresenceStore,
};
use chappe_storage::{AnyStore, Store, StoreLocation};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which bus the services talk over.
#[derive(Debug, Clone, Default)]
pub enum BusChoice {
    /// In this process (the default: nothing else to run).
    #[default]
    Memory,
    /// A NATS server with JetStream, as in a cluster.
    Nats(Box<NatsConfig>),
}

/// Everything `chappe up` needs.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Holds the development session secret, and the SQLite database
    /// unless `store` says otherwise.
    pub data_dir: PathBuf,
    /// Where data lives; `None`: the embedded store `data_dir/chappe.db`.
    /// A CQL keyspace is migrated at start.
    pub store: Option<StoreLocation>,
    pub subjects_prefix: String,
    pub bus: BusChoice,
    pub gateway: GatewayConfig,
    pub fanout: FanoutConfig,
    pub keydir: KeydirConfig,
    pub presence: PresenceConfig,
    pub media: MediaConfig,
}

impl PlatformConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            store: None,
            subjects_prefix: chappe_bus::subjects::DEFAULT_PREFIX.to_owned(),
            bus: BusChoice::Memory,
            gateway: GatewayConfig::default(),
            fanout: FanoutConfig::default(),
            keydir: KeydirConfig::default(),
            presence: PresenceConfig::default(),
            media: MediaConfig::default(),
        }
    }
}

/// Why the platform did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] chappe_storage::Error),
    #[error("bus: {0}")]
    Bus(#[from] chappe_bus::Error),
    #[error("gateway: {0}")]
    Gateway(#[from] chappe_gateway::Error),
    #[error("presence store: {0}")]
    Presence(#[from] chappe_presence::StoreError),
}

/// A running platform.
pub struct Platform {
    addr: SocketAddr,
    store: AnyStore,
    store_location: StoreLocation,
    /// The in-process bus, when the services talk over it.
    memory: Option<MemoryBus>,
    /// The bus every service talks over.
    bus: Arc<dyn Bus>,
    keydir: RunningServer,
    fanout: Fanout,
    presence: Presence,
    media: Media,
    gateway: JoinHandle<Result<(), chappe_gateway::Error>>,
    stop_gateway: oneshot::Sender<()>,
}

/// The file that keeps the development session secret, so that tokens
/// survive a restart of `chappe up`.
const SESSION_KEY_FILE: &str = "dev-session.key";

fn session_keys(dir: &Path) -> Result<SessionKeys, Error> {
    let path = dir.join(SESSION_KEY_FILE);
    SessionKeys::load_or_create(&path).map_err(|source| Error::DataDir { path, source })
}

impl Platform {
    /// Starts every service; returns once the gateway accepts connections
    /// and every service answers on the bus.
    pub async fn start(config: PlatformConfig) -> Result<Self, Error> {
        match &config.bus {
            BusChoice::Memory => {
                let bus = MemoryBus::default();
                Self::start_on(config, Some(bus.clone()), Arc::new(bus)).await
            }
            BusChoice::Nats(nats) => {
                let mut nats = (**nats).clone();
                nats.prefix = config.subjects_prefix.clone();
                let bus = NatsBus::connect(nats).await?;
                let presence = KvPresenceStore::open(
                    &bus,
                    KvPresenceStore::DEFAULT_BUCKET,
                    config.presence.record_ttl(),
                )
                .await?;
                Self::start_with(config, None, Arc::new(bus), Arc::new(presence)).await
            }
        }
    }

    /// Like [`Platform::start`], with the services talking through
    /// `shared_bus` (which may wrap `memory`, to inject faults or delays in a
    /// test or benchmark).
    pub async fn start_on(
        config: PlatformConfig,
        memory: Option<MemoryBus>,
        shared_bus: Arc<dyn Bus>,
    ) -> Result<Self, Error> {
        let presence = MemoryPresenceStore::new(config.presence.record_ttl());
        Self::start_with(config, memory, shared_bus, Arc::new(presence)).await
    }

    async fn start_with(
        config: PlatformConfig,
        memory: Option<MemoryBus>,
        shared_bus: Arc<dyn Bus>,
        presence_store: Arc<dyn PresenceStore>,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let store_location = config
            .store
            .clone()
            .unwrap_or_else(|| StoreLocation::Embedded(config.data_dir.join("chappe.db")));
        let (store, version) = AnyStore::migrate_and_open(&store_location).await?;
        if let Some(version) = version {
            tracing::info!(store = %store_location, version, "store schema is current");
        }
        let shared: Arc<dyn Store> = store.shared();
        let subjects = Subjects::new(config.subjects_prefix.clone());

        let keydir = chappe_keydir::start(
            config.keydir.clone(),
            shared.clone(),
            shared_bus.clone(),
            subjects.clone(),
        )
        .await?;
        let fanout = Fanout::start(
            config.fanout.clone(),
            store
                .clone()
                .map(|s| Arc::new(s) as _, |s| Arc::new(s) as _),
            shared_bus.clone(),
            subjects.clone(),
        )
        .await?;
        let presence = Presence::start(
            config.presence.clone(),
            presence_store,
            shared.clone(),
            shared_bus.clone(),
            subjects.clone(),
        )
        .await?;
        let media = Media::start(
            config.media.clone(),
            shared.clone(),
            shared_bus.clone(),
            subjects.clone(),
            Arc::new(SystemClock),
        )
        .await?;
        let gateway = Gateway::bind(
            config.gateway.clone(),
            shared_bus.clone(),
            subjects,
            Arc::new(session_keys(&config.data_dir)?),
            Arc::new(DevIdentityProvider),
        )
        .await?;
        let addr = gateway.local_addr().map_err(|source| Error::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let (stop_gateway, stopped) = oneshot::channel::<()>();
        let gateway = tokio::spawn(gateway.run(async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            store,
            store_location,
            memory,
            bus: shared_bus,
            keydir,
            fanout,
            presence,
            media,
            gateway,
            stop_gateway,
        })
    }

    /// Where clients connect: `http://host:port`.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn gateway_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every repository of the store the services use.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.shared()
    }

    /// Where the store is.
    pub fn store_location(&self) -> &StoreLocation {
        &self.store_location
    }

    /// The in-process bus, unless the services talk over NATS.
    pub fn memory_bus(&self) -> Option<&MemoryBus> {
        self.memory.as_ref()
    }

    /// What `/readyz` checks: the bus and the store.
    pub fn readiness(&self) -> chappe_telemetry::http::Health {
        let store = self
            .store
            .clone()
            .map(|s| Arc::new(s) as _, |s| Arc::new(s) as _);
        chappe_fanout::readiness(store, self.bus.clone())
    }

    /// Drains the gateway (clients are told to go), then stops the services
    /// after the requests they hold.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop_gateway.send(());
        let gateway = match self.gateway.await {
            Ok(result) => result.map_err(Error::from),
            Err(e) => {
                tracing::error!(error = %e, "gateway task failed");
                Ok(())
            }
        };
        self.media.stop().await;
        self.presence.stop().await;
        self.fanout.stop().await;
        self.keydir.stop().await;
        self.bus.close().await;
        gateway
    }
}
