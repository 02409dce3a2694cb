//! From what the reconciler observed (workloads, the migration Job) and
//! the previous status, decide the rollout (which image the services run,
//! which regions are drained) and compute the new status and the events
//! to publish. Pure: no I/O, so every decision is unit-testable.
//!
//! Conditions (each with `observedGeneration`):
//! - `Available`: at least one region serves clients;
//! - `Progressing`: `MigrationRunning`, `WaitingForMigration`,
//!   `WaitingForOtherRegions` (a region waits to drain) or `RollingOut`;
//! - `Degraded`: `InvalidSpec`, `MigrationFailed` or `DrainRefused`;
//! - `Ready-<region>`: every workload of the region ready (`Drained` when
//!   its gateways are scaled to zero);
//! - `Ready`, the summary: Available, not Progressing, not Degraded.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;

use crate::crd::{
    ChappePlatform, ChappePlatformStatus, DrainState, MigrationPhase, MigrationStatus, RegionSpec,
    RegionStatus, ReplicaCount, Service,
};
use crate::manifests::Rollout;
use crate::manifests::migration::job_name;
use crate::manifests::workloads::gateway_replicas;

/// What the reconciler read from the cluster before deciding.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The platform's Deployments.
    pub deployments: Vec<Deployment>,
    /// The platform's NATS StatefulSets.
    pub statefulsets: Vec<StatefulSet>,
    /// The migration Job of the spec's image, when looked up and found.
    pub job: Option<Job>,
}

/// An event to publish about the platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// PascalCase reason (`DrainStarted`).
    pub reason: String,
    /// What was done: `Migrate`, `Apply fr-par`, `Drain fr-par`... The
    /// recorder folds events of the same reason and action into a series,
    /// so region events name their region here.
    pub action: String,
    /// Human-readable note.
    pub note: String,
}

impl PlannedEvent {
    /// A Normal event.
    pub fn normal(reason: &str, action: impl Into<String>, note: String) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            action: action.into(),
            note,
        }
    }

    /// A Warning event.
    pub fn warning(reason: &str, action: impl Into<String>, note: String) -> Self {
        Self {
            warning: true,
            reason: reason.into(),
            action: action.into(),
            note,
        }
    }
}

/// The outcome of [`evaluate`].
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// What to apply.
    pub rollout: Rollout,
    /// The status to write (region `appliedHash`es are the reconciler's).
    pub status: ChappePlatformStatus,
    /// Events to publish.
    pub events: Vec<PlannedEvent>,
    /// Something is still moving: check back soon.
    pub progressing: bool,
}

/// The phase of a migration Job.
pub fn job_phase(job: &Job) -> MigrationPhase {
    let status = job.status.clone().unwrap_or_default();
    let has = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if has("Complete") || status.succeeded.unwrap_or(0) > 0 {
        MigrationPhase::Succeeded
    } else if has("Failed") {
        MigrationPhase::Failed
    } else {
        MigrationPhase::Running
    }
}

fn container_image(d: &Deployment) -> Option<&str> {
    d.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .as_deref()
}

/// Ready and desired pods of one service of a region: pods count as ready
/// only once the Deployment runs `image` and its controller saw the
/// latest generation.
fn deployment_count(
    observed: Option<&Deployment>,
    desired: Option<i32>,
    image: &str,
) -> ReplicaCount {
    let Some(d) = observed else {
        return ReplicaCount {
            ready: 0,
            desired: desired.unwrap_or(1),
        };
    };
    let status = d.status.clone().unwrap_or_default();
    let desired = desired
        .or_else(|| d.spec.as_ref().and_then(|s| s.replicas))
        .unwrap_or(1);
    let current = container_image(d) == Some(image)
        && status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let ready = if current {
        status
            .ready_replicas
            .unwrap_or(0)
            .min(status.updated_replicas.unwrap_or(0))
    } else {
        0
    };
    ReplicaCount { ready, desired }
}

fn statefulset_count(observed: Option<&StatefulSet>, desired: i32) -> ReplicaCount {
    let ready = observed
        .and_then(|s| s.status.as_ref())
        .filter(|s| {
            s.observed_generation.unwrap_or(0)
                >= observed.and_then(|o| o.metadata.generation).unwrap_or(0)
        })
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    ReplicaCount { ready, desired }
}

fn region_counts(
    platform: &ChappePlatform,
    region: &RegionSpec,
    observed: &Observed,
    image: Option<&str>,
    drain: DrainState,
) -> BTreeMap<String, ReplicaCount> {
    let name = platform.name_any();
    let mut counts = BTreeMap::new();
    if let Some(image) = image {
        for service in Service::ALL {
            let deployment_name = format!("{name}-{}-{service}", region.name);
            let found = observed
                .deployments
                .iter()
                .find(|d| d.name_any() == deployment_name);
            let desired = match service {
                Service::Gateway => gateway_replicas(region, drain == DrainState::Drained),
                _ if region.workload(service).autoscaling.is_some() => None,
                _ => Some(region.workload(service).replicas),
            };
            counts.insert(
                service.name().to_owned(),
                deployment_count(found, desired, image),
            );
        }
    }
    if let Some(nats) = platform.spec.nats.managed() {
        let sts_name = format!("{name}-{}-nats", region.name);
        let found = observed
            .statefulsets
            .iter()
            .find(|s| s.name_any() == sts_name);
        counts.insert("nats".into(), statefulset_count(found, nats.replicas));
    }
    counts
}

fn all_ready(counts: &BTreeMap<String, ReplicaCount>) -> bool {
    counts.values().all(|c| c.ready >= c.desired)
}

fn describe(counts: &BTreeMap<String, ReplicaCount>) -> String {
    counts
        .iter()
        .map(|(k, c)| format!("{k} {}/{}", c.ready, c.desired))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decides the rollout and computes the status and events of a valid
/// platform from what was observed.
pub fn evaluate(platform: &ChappePlatform, observed: &Observed, now: &Time) -> Evaluation {
    let generation = platform.metadata.generation;
    let old = platform.status.clone().unwrap_or_default();
    let spec = &platform.spec;
    let mut events = Vec::new();

    // Migration gate: the services run the image the schema was migrated
    // for; a new image's Job runs first.
    let target = spec.image.reference();
    let job = job_name(&platform.name_any(), &target);
    let mut migrated_image = old.migrated_image.clone();
    let mut schema_version = old.schema_version.clone();
    let mut migration = None;
    let mut migrate = false;
    if migrated_image.as_deref() != Some(target.as_str()) {
        let phase = observed.job.as_ref().map(job_phase);
        match phase {
            Some(MigrationPhase::Succeeded) => {
                events.push(PlannedEvent::normal(
                    "MigrationSucceeded",
                    "Migrate",
                    format!("schema migrated for {target} by Job {job}; rolling out the services"),
                ));
                migrated_image = Some(target.clone());
                schema_version = Some(spec.image.tag.clone());
            }
            Some(phase) => {
                let was_failed = old
                    .migration
                    .as_ref()
                    .is_some_and(|m| m.image == target && m.phase == MigrationPhase::Failed);
                if phase == MigrationPhase::Failed && !was_failed {
                    events.push(PlannedEvent::warning(
                        "MigrationFailed",
                        "Migrate",
                        format!("Job {job} failed to migrate the schema for {target}; the services keep {}; delete the Job to retry", migrated_image.as_deref().unwrap_or("no image")),
                    ));
                }
                migration = Some(MigrationStatus {
                    image: target.clone(),
                    job: job.clone(),
                    phase,
                });
            }
            None => {
                migrate = true;
                events.push(PlannedEvent::normal(
                    "MigrationStarted",
                    "Migrate",
                    format!("Job {job} migrates the schema for {target}"),
                ));
                migration = Some(MigrationStatus {
                    image: target.clone(),
                    job: job.clone(),
                    phase: MigrationPhase::Running,
                });
            }
        }
    }
    let services_image = migrated_image.clone();

    // Readiness of every region as if serving, to decide draining.
    let old_drain = |name: &str| {
        old.regions
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.drain)
            .unwrap_or_default()
    };
    let serving_ready: BTreeMap<&str, bool> = spec
        .regions
        .iter()
        .map(|r| {
            let counts = region_counts(
                platform,
                r,
                observed,
                services_image.as_deref(),
                DrainState::Serving,
            );
            (
                r.name.as_str(),
                services_image.is_some() && all_ready(&counts),
            )
        })
        .collect();
    let any_serving = spec.regions.iter().any(|r| !r.draining);
    let others_ready = spec
        .regions
        .iter()
        .filter(|r| !r.draining)
        .all(|r| serving_ready[r.name.as_str()]);

    let mut regions = Vec::new();
    let mut drained = std::collections::BTreeSet::new();
    let mut region_conditions = Vec::new();
    let (mut waiting, mut refused) = (Vec::new(), Vec::new());
    for region in &spec.regions {
        let r = region.name.as_str();
        let before = old_drain(r);
        let drain = if !region.draining {
            DrainState::Serving
        } else if before == DrainState::Drained {
            DrainState::Drained
        } else if !any_serving {
            DrainState::Refused
        } else if others_ready {
            DrainState::Drained
        } else {
            DrainState::Waiting
        };
        match (before, drain) {
            (DrainState::Drained, DrainState::Serving) => events.push(PlannedEvent::normal(
                "Undrained",
                format!("Drain {r}"),
                format!("region {r} serves clients again: gateways restored to {}", region.gateway.workload.replicas),
            )),
            (b, DrainState::Drained) if b != DrainState::Drained => events.push(PlannedEvent::normal(
                "DrainStarted",
                format!("Drain {r}"),
                format!("region {r}: every other region is Ready; its gateways tell clients to reconnect elsewhere and scale to zero"),
            )),
            (b, DrainState::Refused) if b != DrainState::Refused => events.push(PlannedEvent::warning(
                "DrainRefused",
                format!("Drain {r}"),
                format!("region {r} is the last region serving clients: draining it would leave no Ready region; its gateways stay"),
            )),
            _ => {}
        }
        match drain {
            DrainState::Drained => {
                drained.insert(r.to_owned());
            }
            DrainState::Waiting => waiting.push(r.to_owned()),
            DrainState::Refused => refused.push(r.to_owned()),
            DrainState::Serving => {}
        }
        let counts = region_counts(platform, region, observed, services_image.as_deref(), drain);
        let workloads_ready = services_image.is_some() && all_ready(&counts);
        let ready = workloads_ready && drain != DrainState::Drained;
        let (status, reason, message) = if services_image.is_none() {
            (
                "False",
                "WaitingForMigration",
                "the services start once the schema migration succeeded".to_owned(),
            )
        } else if drain == DrainState::Drained {
            (
                "False",
                "Drained",
                format!("gateways scaled to zero; {}", describe(&counts)),
            )
        } else if workloads_ready {
            ("True", "AllReplicasReady", describe(&counts))
        } else {
            ("False", "ReplicasNotReady", describe(&counts))
        };
        region_conditions.push(condition(
            &format!("Ready-{r}"),
            status,
            reason,
            message,
            generation,
            now,
            &old.conditions,
        ));
        regions.push(RegionStatus {
            name: r.to_owned(),
            ready,
            drain,
            replicas: counts,
            applied_hash: old
                .regions
                .iter()
                .find(|o| o.name == r)
                .and_then(|o| o.applied_hash.clone()),
        });
    }

    let ready_count = regions.iter().filter(|r| r.ready).count();
    let total = regions.len();
    let mut conditions = Vec::new();
    let available = ready_count > 0;
    conditions.push(condition(
        "Available",
        if available { "True" } else { "False" },
        if available {
            "RegionsReady"
        } else {
            "NoRegionReady"
        },
        format!("{ready_count}/{total} regions ready"),
        generation,
        now,
        &old.conditions,
    ));

    let migration_phase = migration.as_ref().map(|m| m.phase);
    let progressing = if migration_phase == Some(MigrationPhase::Running) {
        Some((
            "MigrationRunning",
            format!("Job {job} migrates the schema for {target}"),
        ))
    } else if !waiting.is_empty() {
        Some((
            "WaitingForOtherRegions",
            format!(
                "regions {} drain once every other region is Ready",
                waiting.join(", ")
            ),
        ))
    } else if services_image.is_none() {
        Some((
            "WaitingForMigration",
            "no schema migration has succeeded yet".to_owned(),
        ))
    } else if regions
        .iter()
        .any(|r| !r.ready && r.drain != DrainState::Drained)
    {
        let not_ready: Vec<_> = regions
            .iter()
            .filter(|r| !r.ready && r.drain != DrainState::Drained)
            .map(|r| r.name.as_str())
            .collect();
        Some((
            "RollingOut",
            format!("regions not ready yet: {}", not_ready.join(", ")),
        ))
    } else {
        None
    };
    conditions.push(match &progressing {
        Some((reason, message)) => condition(
            "Progressing",
            "True",
            reason,
            message.clone(),
            generation,
            now,
            &old.conditions,
        ),
        None => condition(
            "Progressing",
            "False",
            "Converged",
            "every region runs the desired state".into(),
            generation,
            now,
            &old.conditions,
        ),
    });

    let degraded = if migration_phase == Some(MigrationPhase::Failed) {
        Some((
            "MigrationFailed",
            format!("Job {job} failed to migrate the schema for {target}"),
        ))
    } else if !refused.is_empty() {
        Some((
            "DrainRefused",
            format!(
                "draining {} would leave no Ready region",
                refused.join(", ")
            ),
        ))
    } else {
        None
    };
    conditions.push(match &degraded {
        Some((reason, message)) => condition(
            "Degraded",
            "True",
            reason,
            message.clone(),
            generation,
            now,
            &old.conditions,
        ),
        None => condition(
            "Degraded",
            "False",
            "AsExpected",
            "nothing is wrong".into(),
            generation,
            now,
            &old.conditions,
        ),
    });

    let summary = match (&degraded, &progressing) {
        (Some((reason, message)), _) | (None, Some((reason, message))) => condition(
            "Ready",
            "False",
            reason,
            message.clone(),
            generation,
            now,
            &old.conditions,
        ),
        (None, None) if available => condition(
            "Ready",
            "True",
            "Ready",
            format!("{ready_count}/{total} regions ready"),
            generation,
            now,
            &old.conditions,
        ),
        (None, None) => condition(
            "Ready",
            "False",
            "NoRegionReady",
            "no region serves clients".into(),
            generation,
            now,
            &old.conditions,
        ),
    };
    let mut all = vec![summary];
    all.extend(conditions);
    all.extend(region_conditions);

    let moving = progressing.is_some();
    Evaluation {
        rollout: Rollout {
            services_image,
            migrate,
            drained,
        },
        status: ChappePlatformStatus {
            observed_generation: generation,
            conditions: all,
            ready_regions: Some(format!("{ready_count}/{total}")),
            schema_version,
            migrated_image,
            migration,
            regions,
        },
        events,
        progressing: moving,
    }
}

/// The status of a platform whose spec is invalid: `Degraded` with reason
/// `InvalidSpec` and every message; the rest kept as it was.
pub fn invalid(platform: &ChappePlatform, errors: &[String], now: &Time) -> ChappePlatformStatus {
    let generation = platform.metadata.generation;
    let mut status = platform.status.clone().unwrap_or_default();
    let message = errors.join("; ");
    let keep = |t: &str| !matches!(t, "Ready" | "Degraded");
    let mut conditions = vec![
        condition(
            "Ready",
            "False",
            "InvalidSpec",
            message.clone(),
            generation,
            now,
            &status.conditions,
        ),
        condition(
            "Degraded",
            "True",
            "InvalidSpec",
            message,
            generation,
            now,
            &status.conditions,
        ),
    ];
    conditions.extend(status.conditions.iter().filter(|c| keep(&c.type_)).cloned());
    status.conditions = conditions;
    status.observed_generation = generation;
    status
}

/// A condition, keeping the previous `lastTransitionTime` when its status
/// did not change.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
    old: &[Condition],
) -> Condition {
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of a type in a status, if any.
pub fn find<'a>(status: &'a ChappePlatformStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}
