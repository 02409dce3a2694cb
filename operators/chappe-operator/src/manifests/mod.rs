//! What the operator applies for a platform: pure builders from a
//! [`ChappePlatform`] (plus the reconciler's rollout decisions, a
//! [`Rollout`]) to a list of [`Manifest`]s. `render` prints them; the
//! reconciler applies them with server-side apply. Nothing here talks to
//! the apiserver.
//!
//! - [`workloads`]: per region and service, the Deployment, its Services,
//!   PodDisruptionBudget, optional HorizontalPodAutoscaler, and the
//!   region's settings ConfigMap (whose checksum rolls the pods);
//! - [`nats`]: per region, the NATS StatefulSet, headless Service,
//!   ConfigMap (routes, JetStream, gateways to the other regions) and PDB;
//! - [`migration`]: the schema migration Job of an image;
//! - [`network`]: NetworkPolicies and the optional ServiceMonitor.

pub mod migration;
pub mod nats;
pub mod network;
pub mod workloads;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, PodSecurityContext, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::crd::ChappePlatform;
use crate::{Error, Result};

/// Field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "chappe-operator";
/// Label naming the region of an object.
pub const REGION_LABEL: &str = "chappe.gouv.fr/region";
/// Label on the Services Prometheus scrapes.
pub const SCRAPE_LABEL: &str = "chappe.gouv.fr/scrape";
/// Pod-template annotation carrying the settings' sha256.
pub const CHECKSUM_ANNOTATION: &str = "chappe.gouv.fr/config-checksum";
/// Node label of regions.
pub const NODE_REGION: &str = "topology.kubernetes.io/region";
/// Node label of zones.
pub const NODE_ZONE: &str = "topology.kubernetes.io/zone";
/// gRPC port of the gateways.
pub const GATEWAY_GRPC_PORT: i32 = 7443;
/// UID and GID the containers run as.
pub const RUN_AS: i64 = 65532;

/// One object to apply, type-erased, with the API resource that serves it.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// Group, version, kind and plural of the object.
    pub resource: ApiResource,
    /// The object itself (`apiVersion`, `kind`, `metadata`, the rest).
    pub object: DynamicObject,
    /// The region the object belongs to, if any.
    pub region: Option<String>,
}

impl Manifest {
    /// Wraps a typed object.
    pub fn typed<K>(obj: &K, region: Option<&str>) -> Result<Self>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        let value = serde_json::to_value(obj)?;
        Ok(Self {
            resource: ApiResource::erase::<K>(&()),
            object: serde_json::from_value(value)?,
            region: region.map(str::to_owned),
        })
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        &self.resource.kind
    }
}

/// The reconciler's decisions that the spec alone does not determine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    /// Image of the service Deployments: the image the schema was last
    /// migrated for. `None` (no migration ever succeeded): no service
    /// Deployment yet.
    pub services_image: Option<String>,
    /// Run the migration Job of the spec's image.
    pub migrate: bool,
    /// Regions whose gateways are scaled to zero.
    pub drained: BTreeSet<String>,
}

impl Rollout {
    /// The converged state `render` shows: the spec's image migrated and
    /// running, and every draining region drained (unless that would leave
    /// no serving region).
    pub fn converged(platform: &ChappePlatform) -> Self {
        let serving = platform.spec.regions.iter().any(|r| !r.draining);
        Self {
            services_image: Some(platform.spec.image.reference()),
            migrate: true,
            drained: platform
                .spec
                .regions
                .iter()
                .filter(|r| r.draining && serving)
                .map(|r| r.name.clone())
                .collect(),
        }
    }
}

/// Options of [`desired`].
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Include ServiceMonitors (the reconciler sets this when the
    /// `monitoring.coreos.com/v1` API exists).
    pub service_monitors: bool,
    /// Decisions of the reconciler (`Rollout::converged` for `render`).
    pub rollout: Rollout,
}

/// Everything to apply for `platform`, in apply order: settings, storage
/// and Services first, NATS, the migration Job, the Deployments, then
/// disruption budgets, autoscalers and policies.
pub fn desired(platform: &ChappePlatform, opts: &RenderOptions) -> Result<Vec<Manifest>> {
    let ctx = Ctx::new(platform)?;
    let mut out = Vec::new();
    out.extend(workloads::platform_objects(&ctx)?);
    for region in &platform.spec.regions {
        out.extend(nats::region_objects(&ctx, region)?);
        out.extend(workloads::region_objects(&ctx, region, &opts.rollout)?);
    }
    if opts.rollout.migrate {
        out.push(migration::job(&ctx)?);
    }
    out.extend(network::policies(&ctx)?);
    if opts.service_monitors && platform.spec.telemetry.service_monitor {
        out.push(network::service_monitor(&ctx)?);
    }
    out.sort_by_key(|m| kind_order(m.kind()));
    Ok(out)
}

/// Position of a kind in apply order.
fn kind_order(kind: &str) -> usize {
    const ORDER: [&str; 11] = [
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "StatefulSet",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "ServiceMonitor",
        "",
    ];
    ORDER.iter().position(|k| *k == kind).unwrap_or(ORDER.len())
}

/// A short content hash of a region's manifests (status `appliedHash`).
pub fn region_hash(manifests: &[Manifest], region: &str) -> Result<String> {
    let mut hasher = Sha256::new();
    for m in manifests
        .iter()
        .filter(|m| m.region.as_deref() == Some(region))
    {
        hasher.update(serde_json::to_vec(&m.object)?);
    }
    Ok(hex::encode(&hasher.finalize()[..8]))
}

/// sha256 of some settings, hex.
pub fn checksum(data: &BTreeMap<String, String>) -> Result<String> {
    Ok(hex::encode(Sha256::digest(serde_json::to_vec(data)?)))
}

/// What every builder needs: names, namespace, owner, labels.
pub struct Ctx<'a> {
    /// The platform.
    pub platform: &'a ChappePlatform,
    /// Its name.
    pub name: String,
    /// Its namespace (`default` when a file for `render` names none).
    pub namespace: String,
    owner: Option<OwnerReference>,
}

impl<'a> Ctx<'a> {
    /// Reads the platform's metadata.
    pub fn new(platform: &'a ChappePlatform) -> Result<Self> {
        let name = platform
            .metadata
            .name
            .clone()
            .ok_or(Error::MissingMetadata("name"))?;
        Ok(Self {
            name,
            namespace: platform.namespace().unwrap_or_else(|| "default".into()),
            // An object read from a file has no uid: its manifests carry
            // no owner reference (the apiserver would refuse one without).
            owner: platform.controller_owner_ref(&()),
            platform,
        })
    }

    /// `NAME-REGION-PART`.
    pub fn regional(&self, region: &str, part: &str) -> String {
        format!("{}-{region}-{part}", self.name)
    }

    /// `NAME-PART`.
    pub fn global(&self, part: &str) -> String {
        format!("{}-{part}", self.name)
    }

    /// The labels that select one component's pods (of one region).
    pub fn selector(&self, component: &str, region: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "chappe".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.name.clone()),
            (
                "app.kubernetes.io/component".to_owned(),
                component.to_owned(),
            ),
        ]);
        if let Some(region) = region {
            l.insert(REGION_LABEL.to_owned(), region.to_owned());
        }
        l
    }

    /// The selector labels plus part-of, managed-by and version.
    pub fn labels(&self, component: &str, region: Option<&str>) -> BTreeMap<String, String> {
        let mut l = self.selector(component, region);
        l.insert("app.kubernetes.io/part-of".into(), "chappe".into());
        l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        l.insert(
            "app.kubernetes.io/version".into(),
            label_value(&self.platform.spec.image.tag),
        );
        l
    }

    /// Metadata of an object: name, namespace, labels, owner.
    pub fn meta(&self, name: String, component: &str, region: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels(component, region)),
            owner_references: self.owner.clone().map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }

    /// A label selector of one component of one region.
    pub fn label_selector(&self, component: &str, region: Option<&str>) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector(component, region)),
            ..LabelSelector::default()
        }
    }
}

/// `prune` label selector for a platform name.
pub fn instance_selector(name: &str) -> String {
    format!("app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={FIELD_MANAGER}")
}

/// A valid label value from any string: at most 63 characters of
/// `[A-Za-z0-9._-]`, alphanumeric at both ends.
pub fn label_value(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// Pod security: non-root, RuntimeDefault seccomp, group-owned volumes.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..PodSecurityContext::default()
    }
}

/// Container security: read-only root, no privilege escalation, no
/// capabilities.
pub fn container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// A short hash of an image reference, for the migration Job's name.
pub fn image_hash(image: &str) -> String {
    hex::encode(&Sha256::digest(image.as_bytes())[..5])
}
