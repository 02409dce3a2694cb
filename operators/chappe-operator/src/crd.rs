//! The `ChappePlatform` custom resource (`chappe.gouv.fr/v1alpha1`): its
//! spec, its status, the validation rules the apiserver enforces at
//! admission (OpenAPI bounds and CEL `x-kubernetes-validations`) and the
//! same checks in Rust ([`ChappePlatform::validate`]), which the reconciler
//! runs before touching anything.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the resource.
pub const GROUP: &str = "chappe.gouv.fr";
/// Finalizer the operator puts on every platform.
pub const FINALIZER: &str = "chappeplatforms.chappe.gouv.fr/cleanup";
/// Longest platform name: it prefixes `NAME-REGION-SERVICE` object names,
/// which must stay DNS labels (63 characters).
pub const MAX_NAME_LEN: usize = 24;

/// A Chappe deployment spanning one or more regions, reconciled by
/// `chappe-operator`. See `operators/chappe-operator/examples/`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chappe.gouv.fr",
    version = "v1alpha1",
    kind = "ChappePlatform",
    plural = "chappeplatforms",
    shortname = "cp",
    namespaced,
    status = "ChappePlatformStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Regions","type":"string","description":"ready regions / regions","jsonPath":".status.readyRegions"}"#,
    printcolumn = r#"{"name":"Schema","type":"string","description":"version the schema was migrated for","jsonPath":".status.schemaVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 24").message("the name of a ChappePlatform is at most 24 characters (it prefixes the names of the objects it creates)")
)]
#[x_kube(
    validation = Rule::new("!has(self.store.embedded) || size(self.regions) == 1").message("an embedded store runs in exactly one region"),
    validation = Rule::new("!has(self.store.scylla) || self.store.scylla.datacenters.all(d, self.regions.exists(r, r.name == d.region))").message("every ScyllaDB datacenter must belong to a region of spec.regions"),
    validation = Rule::new("!has(self.store.scylla) || self.regions.all(r, self.store.scylla.datacenters.exists(d, d.region == r.name))").message("every region needs a ScyllaDB datacenter in spec.store.scylla.datacenters"),
    validation = Rule::new("!has(self.nats) || !has(self.nats.external) || self.regions.all(r, r.name in self.nats.external.urls)").message("spec.nats.external.urls needs the NATS URLs of every region")
)]
#[serde(rename_all = "camelCase")]
pub struct ChappePlatformSpec {
    /// The Chappe image: every service binary and `chappe migrate` live in it.
    pub image: ImageSpec,
    /// The regions to run in, each a value of the nodes'
    /// `topology.kubernetes.io/region` label.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(o, o.name == r.name))").message("region names must be unique"))]
    pub regions: Vec<RegionSpec>,
    /// The NATS bus: operator-managed clusters (default) or external URLs.
    #[serde(default)]
    pub nats: NatsSpec,
    /// Where ciphertext is stored: ScyllaDB, or an embedded SQLite file for
    /// a one-node evaluation install.
    pub store: StoreSpec,
    /// Gateway authentication.
    #[serde(default)]
    pub auth: AuthSpec,
    /// Limits enforced by the services; unset ones keep the services'
    /// documented defaults.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Traces and metrics scraping.
    #[serde(default)]
    pub telemetry: TelemetrySpec,
}

/// The container image of the platform.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// Repository, e.g. `registry.example.gouv.fr/chappe/chappe`.
    #[schemars(length(min = 1, max = 200))]
    pub repository: String,
    /// Tag, which is also the version the schema is migrated for.
    #[schemars(length(min = 1, max = 128))]
    pub tag: String,
    /// Kubernetes image pull policy.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

impl ImageSpec {
    /// `repository:tag`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag)
    }
}

/// Kubernetes image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// One region: every service runs there, pinned by node affinity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.draining) && self.draining) || !has(self.gateway) || !has(self.gateway.replicas) || self.gateway.replicas >= 1").message("gateway replicas must be at least 1 unless the region is draining")
)]
#[serde(rename_all = "camelCase")]
pub struct RegionSpec {
    /// Value of the `topology.kubernetes.io/region` node label, e.g. `fr-par`.
    #[schemars(
        length(min = 1, max = 20),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Zones (`topology.kubernetes.io/zone` values) of the region to run in;
    /// pods are spread across them. Empty: every zone of the region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 63)))]
    pub zones: Vec<String>,
    /// Move this region's clients elsewhere: its gateways drain and scale
    /// to zero once every other region is Ready. Data services stay.
    #[serde(default)]
    pub draining: bool,
    /// Client-facing gateways.
    #[serde(default)]
    pub gateway: GatewaySpec,
    /// Conversations, membership, messages, delivery.
    #[serde(default)]
    pub fanout: WorkloadSpec,
    /// Device keys and key transparency.
    #[serde(default)]
    pub keydir: WorkloadSpec,
    /// Online state and typing.
    #[serde(default)]
    pub presence: WorkloadSpec,
    /// Encrypted attachments.
    #[serde(default)]
    pub media: WorkloadSpec,
}

impl RegionSpec {
    /// The workload settings of `service` in this region.
    pub fn workload(&self, service: Service) -> &WorkloadSpec {
        match service {
            Service::Gateway => &self.gateway.workload,
            Service::Fanout => &self.fanout,
            Service::Keydir => &self.keydir,
            Service::Presence => &self.presence,
            Service::Media => &self.media,
        }
    }
}

/// Replicas, resources and autoscaling of one service in one region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// Pods of the service in the region (ignored while autoscaling is set).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Container resources; default requests 100m CPU and 128Mi, limit 512Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// A HorizontalPodAutoscaler (autoscaling/v2, CPU) instead of fixed replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

fn default_replicas() -> i32 {
    2
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            resources: None,
            autoscaling: None,
        }
    }
}

/// Bounds of a HorizontalPodAutoscaler.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("autoscaling.maxReplicas must be at least minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest pods.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most pods.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU utilization to aim for, in percent of requests.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

fn default_cpu_target() -> i32 {
    70
}

/// The gateway of a region: a workload plus its client-facing Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Replicas, resources, autoscaling.
    #[serde(flatten)]
    pub workload: WorkloadSpec,
    /// The Service clients connect to (gRPC on 7443).
    #[serde(default)]
    pub service: GatewayServiceSpec,
}

/// The client-facing Service of a region's gateways.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct GatewayServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Annotations of the Service (load balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kubernetes Service type of the gateways.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    #[default]
    LoadBalancer,
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    NodePort,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancer => "LoadBalancer",
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
        }
    }
}

/// The NATS bus. Neither field set means `managed` with its defaults.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.managed) && has(self.external))").message("spec.nats takes managed or external, not both"))]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// Operator-managed NATS: one StatefulSet per region, joined into a
    /// supercluster by NATS gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedNats>,
    /// NATS run by someone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalNats>,
}

impl NatsSpec {
    /// The managed settings, defaults included, unless NATS is external.
    pub fn managed(&self) -> Option<ManagedNats> {
        match (&self.managed, &self.external) {
            (_, Some(_)) => None,
            (Some(m), None) => Some(m.clone()),
            (None, None) => Some(ManagedNats::default()),
        }
    }
}

/// Operator-managed NATS servers of every region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedNats {
    /// Servers per region (JetStream streams keep 3 replicas when there
    /// are at least 3).
    #[serde(default = "default_nats_replicas")]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,
    /// JetStream storage per server.
    #[serde(default = "default_storage_size")]
    pub storage_size: Quantity,
    /// StorageClass of the JetStream volumes (default class when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// NATS server image (2.12 or newer).
    #[serde(default = "default_nats_image")]
    pub image: String,
}

fn default_nats_replicas() -> i32 {
    3
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".into())
}
fn default_nats_image() -> String {
    "nats:2.12-alpine".into()
}

impl Default for ManagedNats {
    fn default() -> Self {
        Self {
            replicas: default_nats_replicas(),
            storage_size: default_storage_size(),
            storage_class: None,
            image: default_nats_image(),
        }
    }
}

/// NATS servers the operator does not run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalNats {
    /// Region name → NATS URLs the region's services connect to.
    #[schemars(extend("maxProperties" = 16))]
    pub urls: BTreeMap<String, Vec<String>>,
}

/// Where ciphertext is stored: exactly one of `scylla` or `embedded`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("has(self.scylla) != has(self.embedded)").message("spec.store needs exactly one of scylla or embedded"))]
#[serde(rename_all = "camelCase")]
pub struct StoreSpec {
    /// A ScyllaDB cluster with one datacenter per region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scylla: Option<ScyllaStore>,
    /// An embedded SQLite file on a volume: one region, one node,
    /// evaluation only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedStore>,
}

/// A ScyllaDB (or Cassandra) cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("self.datacenters.all(d, self.datacenters.exists_one(o, o.name == d.name))").message("ScyllaDB datacenter names must be unique"),
    validation = Rule::new("self.datacenters.all(d, self.datacenters.exists_one(o, o.region == d.region))").message("a region has one ScyllaDB datacenter"),
    validation = Rule::new("self.replication.all(dc, self.replication[dc] >= 1)").message("a replication factor is at least 1"),
    validation = Rule::new("self.replication.all(dc, self.datacenters.exists(d, d.name == dc))").message("every key of spec.store.scylla.replication must name a datacenter of spec.store.scylla.datacenters"),
    validation = Rule::new("self.replication.all(dc, self.datacenters.all(d, d.name != dc || self.replication[dc] <= d.nodes))").message("a replication factor must not exceed the number of nodes of its datacenter")
)]
#[serde(rename_all = "camelCase")]
pub struct ScyllaStore {
    /// Keyspace of Chappe's tables.
    #[serde(default = "default_keyspace")]
    #[schemars(length(min = 1, max = 48), regex(pattern = r"^[a-z][a-z0-9_]*$"))]
    pub keyspace: String,
    /// Consistency of reads and writes.
    #[serde(default)]
    pub consistency: Consistency,
    /// One datacenter per region.
    #[schemars(length(min = 1, max = 16))]
    pub datacenters: Vec<ScyllaDatacenter>,
    /// Replication factor per datacenter name (`NetworkTopologyStrategy`).
    #[schemars(extend("minProperties" = 1, "maxProperties" = 16))]
    pub replication: BTreeMap<String, i32>,
}

fn default_keyspace() -> String {
    "chappe".into()
}

/// The ScyllaDB datacenter of one region.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScyllaDatacenter {
    /// The region (a name in `spec.regions`) whose services use this datacenter.
    #[schemars(length(min = 1, max = 20))]
    pub region: String,
    /// Datacenter name as ScyllaDB knows it (`dc=` of the store URL).
    #[schemars(length(min = 1, max = 48))]
    pub name: String,
    /// `host` or `host:port` of nodes to contact first (port 9042 by default).
    #[schemars(length(min = 1, max = 16), inner(length(min = 1, max = 253)))]
    pub contact_points: Vec<String>,
    /// Nodes in the datacenter: bounds its replication factor.
    #[schemars(range(min = 1, max = 1000))]
    pub nodes: i32,
}

/// CQL consistency of reads and writes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Consistency {
    #[default]
    LocalQuorum,
    Quorum,
    EachQuorum,
    All,
    LocalOne,
    One,
}

impl Consistency {
    /// The spelling of the store URL's `consistency=` parameter.
    pub fn url_param(self) -> &'static str {
        match self {
            Self::LocalQuorum => "local_quorum",
            Self::Quorum => "quorum",
            Self::EachQuorum => "each_quorum",
            Self::All => "all",
            Self::LocalOne => "local_one",
            Self::One => "one",
        }
    }
}

/// The embedded store's volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmbeddedStore {
    /// Size of the volume holding the SQLite file.
    #[serde(default = "default_storage_size")]
    pub storage_size: Quantity,
    /// StorageClass of the volume (default class when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

/// Gateway authentication.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret holding the 32-byte key that signs session tokens (the same
    /// for every gateway of every region). The operator does not create it.
    #[serde(default = "default_session_secret")]
    #[schemars(length(min = 1, max = 253))]
    pub session_key_secret: String,
    /// Key of that Secret.
    #[serde(default = "default_session_key")]
    #[schemars(length(min = 1, max = 253))]
    pub session_key_key: String,
    /// Accept development logins (any user name). Never where real users connect.
    #[serde(default)]
    pub dev_login: bool,
}

fn default_session_secret() -> String {
    "chappe-session-key".into()
}
fn default_session_key() -> String {
    "session.key".into()
}

impl Default for AuthSpec {
    fn default() -> Self {
        Self {
            session_key_secret: default_session_secret(),
            session_key_key: default_session_key(),
            dev_login: false,
        }
    }
}

/// Limits enforced by the services. Each unset limit keeps the service's
/// default (noted on each field).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    /// Largest frame a client may send to a gateway (default 262144).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024))]
    pub max_frame_bytes: Option<i64>,
    /// Largest message ciphertext (fanout; default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_message_bytes: Option<i64>,
    /// Most members of a group (fanout; default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2))]
    pub max_group_members: Option<i64>,
    /// Messages per second a device may send (gateway; default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub send_rate: Option<i64>,
    /// Burst above the send rate (gateway; default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub send_burst: Option<i64>,
    /// Largest attachment (media; default 2 GiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub media_max_upload_bytes: Option<i64>,
}

/// Traces and metrics.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP/gRPC collector the services export traces to (off when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Create Prometheus Operator ServiceMonitors (when their CRD exists).
    #[serde(default = "default_true")]
    pub service_monitor: bool,
}

fn default_true() -> bool {
    true
}

impl Default for TelemetrySpec {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_monitor: true,
        }
    }
}

/// The five Chappe services, each a Deployment per region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Gateway,
    Fanout,
    Keydir,
    Presence,
    Media,
}

impl Service {
    /// Every service, in a fixed order.
    pub const ALL: [Service; 5] = [
        Service::Gateway,
        Service::Fanout,
        Service::Keydir,
        Service::Presence,
        Service::Media,
    ];

    /// Short name (`gateway`), used in object names and labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Fanout => "fanout",
            Self::Keydir => "keydir",
            Self::Presence => "presence",
            Self::Media => "media",
        }
    }

    /// The binary in the image (`chappe-gateway`).
    pub fn binary(self) -> &'static str {
        match self {
            Self::Gateway => "chappe-gateway",
            Self::Fanout => "chappe-fanout",
            Self::Keydir => "chappe-keydir",
            Self::Presence => "chappe-presence",
            Self::Media => "chappe-media",
        }
    }

    /// Port of `/metrics`, `/healthz`, `/readyz`.
    pub fn ops_port(self) -> i32 {
        match self {
            Self::Gateway => 9471,
            Self::Fanout => 9472,
            Self::Keydir => 9473,
            Self::Presence => 9474,
            Self::Media => 9475,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the operator observed and decided, written with server-side apply.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChappePlatformStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (the summary), `Available`, `Progressing`, `Degraded`, and
    /// `Ready-<region>` for every region.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `ready/total` regions, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_regions: Option<String>,
    /// Image tag the keyspace schema was migrated for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// Full image reference the schema was migrated for: the services run
    /// it until a newer migration succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_image: Option<String>,
    /// The migration of the spec's image, while it is not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// Per-region state.
    #[serde(default)]
    pub regions: Vec<RegionStatus>,
}

/// A schema migration Job's progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Image being migrated to.
    pub image: String,
    /// Name of the Job.
    pub job: String,
    /// Running, Succeeded or Failed.
    pub phase: MigrationPhase,
}

/// Phase of a migration Job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MigrationPhase {
    Running,
    Succeeded,
    Failed,
}

/// One region as last observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// Every workload of the region has its desired replicas ready.
    pub ready: bool,
    /// Where the region is in draining.
    #[serde(default)]
    pub drain: DrainState,
    /// Ready and desired pods per service (and `nats`).
    #[serde(default)]
    pub replicas: BTreeMap<String, ReplicaCount>,
    /// Hash of the objects last applied for the region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_hash: Option<String>,
}

/// Where a region is in draining.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DrainState {
    /// Not draining: gateways serve clients.
    #[default]
    Serving,
    /// Draining requested; gateways kept until every other region is Ready.
    Waiting,
    /// Gateways scaled to zero.
    Drained,
    /// Draining refused: it would leave no Ready region.
    Refused,
}

/// Ready and desired pods of one workload.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCount {
    /// Ready pods running the desired template.
    pub ready: i32,
    /// Desired pods.
    pub desired: i32,
}

impl ChappePlatformSpec {
    /// The checks of the CRD's CEL rules and bounds, in Rust, with messages
    /// naming the offending field and values. `Err` lists every problem.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut err = |m: String| errors.push(m);

        if self.regions.is_empty() {
            err("spec.regions: at least one region is required".into());
        }
        let mut seen = BTreeSet::new();
        for (i, region) in self.regions.iter().enumerate() {
            let at = format!("spec.regions[{i}]");
            if !is_dns_label(&region.name) || region.name.len() > 20 {
                err(format!(
                    "{at}.name: {:?} must be a lowercase DNS label of at most 20 characters",
                    region.name
                ));
            }
            if !seen.insert(region.name.as_str()) {
                err(format!(
                    "{at}.name: region names must be unique ({:?} appears twice)",
                    region.name
                ));
            }
            if !region.draining && region.gateway.workload.replicas < 1 {
                err(format!(
                    "{at}.gateway.replicas: gateway replicas must be at least 1 unless the region is draining (region {} has {})",
                    region.name, region.gateway.workload.replicas
                ));
            }
            for service in Service::ALL {
                let w = region.workload(service);
                if w.replicas < 0 {
                    err(format!("{at}.{service}.replicas: must not be negative"));
                }
                if let Some(a) = &w.autoscaling
                    && (a.min_replicas < 1 || a.max_replicas < a.min_replicas)
                {
                    err(format!(
                        "{at}.{service}.autoscaling: autoscaling.maxReplicas must be at least minReplicas, and minReplicas at least 1"
                    ));
                }
            }
        }

        match (&self.nats.managed, &self.nats.external) {
            (Some(_), Some(_)) => err("spec.nats takes managed or external, not both".into()),
            (_, Some(external)) => {
                for region in &self.regions {
                    if external.urls.get(&region.name).is_none_or(|u| u.is_empty()) {
                        err(format!(
                            "spec.nats.external.urls: spec.nats.external.urls needs the NATS URLs of every region (region {} has none)",
                            region.name
                        ));
                    }
                }
            }
            (Some(m), None) if m.replicas < 1 => {
                err("spec.nats.managed.replicas: at least 1 NATS server per region".into())
            }
            _ => {}
        }

        match (&self.store.scylla, &self.store.embedded) {
            (Some(_), Some(_)) | (None, None) => {
                err("spec.store needs exactly one of scylla or embedded".into())
            }
            (None, Some(_)) => {
                if self.regions.len() != 1 {
                    err(format!(
                        "spec.store.embedded: an embedded store runs in exactly one region ({} given)",
                        self.regions.len()
                    ));
                }
            }
            (Some(scylla), None) => {
                let mut names = BTreeSet::new();
                let mut regions = BTreeSet::new();
                for dc in &scylla.datacenters {
                    if !names.insert(dc.name.as_str()) {
                        err(format!(
                            "spec.store.scylla.datacenters: ScyllaDB datacenter names must be unique ({:?} appears twice)",
                            dc.name
                        ));
                    }
                    if !regions.insert(dc.region.as_str()) {
                        err(format!(
                            "spec.store.scylla.datacenters: a region has one ScyllaDB datacenter (region {} has several)",
                            dc.region
                        ));
                    }
                    if !self.regions.iter().any(|r| r.name == dc.region) {
                        err(format!(
                            "spec.store.scylla.datacenters: every ScyllaDB datacenter must belong to a region of spec.regions (datacenter {} names region {})",
                            dc.name, dc.region
                        ));
                    }
                    if dc.contact_points.is_empty() {
                        err(format!(
                            "spec.store.scylla.datacenters: datacenter {} needs at least one contact point",
                            dc.name
                        ));
                    }
                    if dc.nodes < 1 {
                        err(format!(
                            "spec.store.scylla.datacenters: datacenter {} needs at least one node",
                            dc.name
                        ));
                    }
                }
                for region in &self.regions {
                    if !scylla.datacenters.iter().any(|d| d.region == region.name) {
                        err(format!(
                            "spec.store.scylla.datacenters: every region needs a ScyllaDB datacenter in spec.store.scylla.datacenters (region {} has none)",
                            region.name
                        ));
                    }
                }
                if scylla.replication.is_empty() {
                    err("spec.store.scylla.replication: give the replication factor of at least one datacenter".into());
                }
                for (dc, rf) in &scylla.replication {
                    match scylla.datacenters.iter().find(|d| &d.name == dc) {
                        None => err(format!(
                            "spec.store.scylla.replication: every key of spec.store.scylla.replication must name a datacenter of spec.store.scylla.datacenters ({dc:?} is not one of {:?})",
                            scylla
                                .datacenters
                                .iter()
                                .map(|d| d.name.as_str())
                                .collect::<Vec<_>>()
                        )),
                        Some(d) if *rf > d.nodes => err(format!(
                            "spec.store.scylla.replication: a replication factor must not exceed the number of nodes of its datacenter (datacenter {dc} has replication factor {rf} but {} nodes)",
                            d.nodes
                        )),
                        Some(_) if *rf < 1 => err(format!(
                            "spec.store.scylla.replication: replication factor of {dc} must be at least 1"
                        )),
                        Some(_) => {}
                    }
                }
            }
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

impl ChappePlatform {
    /// [`ChappePlatformSpec::validate`] plus the checks on the object's name.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = match self.spec.validate() {
            Ok(()) => Vec::new(),
            Err(e) => e,
        };
        let name = self.metadata.name.as_deref().unwrap_or_default();
        if name.len() > MAX_NAME_LEN || !is_dns_label(name) {
            errors.insert(
                0,
                format!(
                    "metadata.name: the name of a ChappePlatform is at most {MAX_NAME_LEN} characters (it prefixes the names of the objects it creates) and a DNS label ({name:?})"
                ),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// A lowercase RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
