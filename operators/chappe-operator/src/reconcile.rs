//! The controller: [`reconcile`] and [`error_policy`] over a [`Context`],
//! run by [`run`] with `kube::runtime::Controller`.
//!
//! One reconciliation of a platform:
//! 1. the finalizer helper adds [`FINALIZER`] first, and on deletion runs
//!    [`cleanup`] before removing it;
//! 2. an invalid spec is refused: `Degraded`/`InvalidSpec`, an event,
//!    nothing applied;
//! 3. it observes the platform's Deployments, NATS StatefulSets, the
//!    migration Job of the spec's image and whether ServiceMonitors exist;
//! 4. [`status::evaluate`] decides the rollout (migration gate, draining);
//! 5. every desired object is applied with server-side apply (field
//!    manager `chappe-operator`, forced), then objects of the platform that
//!    are no longer desired are deleted;
//! 6. events are published and the status written (server-side apply on
//!    the status subresource).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service as KubeService};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{ChappePlatform, ChappePlatformStatus, FINALIZER};
use crate::manifests::migration::job_name;
use crate::manifests::network::service_monitor_resource;
use crate::manifests::{
    self, FIELD_MANAGER, Manifest, RenderOptions, instance_selector, region_hash,
};
use crate::metrics::Metrics;
use crate::status::{self, Observed, PlannedEvent};
use crate::{Error, Result};

/// Requeue delay while something moves (a migration, a rollout, a drain).
pub const REQUEUE_PROGRESSING: Duration = Duration::from_secs(15);
/// Requeue delay of a converged platform.
pub const REQUEUE_CONVERGED: Duration = Duration::from_secs(300);
/// Requeue delay after an error.
pub const REQUEUE_ERROR: Duration = Duration::from_secs(30);

/// What `reconcile` needs: the client, the event recorder, the metrics.
#[derive(Clone)]
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes events about platforms.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
}

impl Context {
    /// A context reporting events as `reporter`.
    pub fn new(client: Client, reporter: Reporter, metrics: Metrics) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }
}

/// Reconciles one platform (see the module documentation).
pub async fn reconcile(platform: Arc<ChappePlatform>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.count_and_measure();
    let ns = platform
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ChappePlatform> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, platform, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, &ctx).await,
            Finalizer::Cleanup(p) => cleanup(p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Counts the failure under its error label and retries later.
pub fn error_policy(platform: Arc<ChappePlatform>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(platform = %platform.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_failure(error);
    Action::requeue(REQUEUE_ERROR)
}

async fn publish(ctx: &Context, platform: &ChappePlatform, event: &PlannedEvent) {
    let ev = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason.clone(),
        note: Some(event.note.clone()),
        action: event.action.clone(),
        secondary: None,
    };
    // Events inform; failing to publish one does not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&ev, &platform.object_ref(&())).await {
        tracing::warn!(reason = %event.reason, error = %e, "publishing an event failed");
    }
}

async fn write_status(
    ctx: &Context,
    platform: &ChappePlatform,
    status: &ChappePlatformStatus,
) -> Result<()> {
    let api: Api<ChappePlatform> = Api::namespaced(
        ctx.client.clone(),
        &platform.namespace().unwrap_or_default(),
    );
    let patch = Patch::Apply(json!({
        "apiVersion": ChappePlatform::api_version(&()),
        "kind": ChappePlatform::kind(&()),
        "status": status,
    }));
    api.patch_status(
        &platform.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &patch,
    )
    .await?;
    Ok(())
}

/// Whether the Prometheus Operator's ServiceMonitor API is served.
pub async fn service_monitors_available(client: &Client) -> bool {
    match client
        .list_api_group_resources("monitoring.coreos.com/v1")
        .await
    {
        Ok(list) => list.resources.iter().any(|r| r.name == "servicemonitors"),
        Err(_) => false,
    }
}

/// Reads what [`status::evaluate`] needs.
pub async fn observe(client: &Client, platform: &ChappePlatform) -> Result<Observed> {
    let ns = platform.namespace().unwrap_or_default();
    let name = platform.name_any();
    let selector = ListParams::default().labels(&instance_selector(&name));
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns)
        .list(&selector)
        .await?
        .items;
    let statefulsets = if platform.spec.nats.managed().is_some() {
        Api::<StatefulSet>::namespaced(client.clone(), &ns)
            .list(&selector)
            .await?
            .items
    } else {
        Vec::new()
    };
    let target = platform.spec.image.reference();
    let migrated = platform
        .status
        .as_ref()
        .and_then(|s| s.migrated_image.as_deref());
    let job = if migrated == Some(target.as_str()) {
        None
    } else {
        Api::<Job>::namespaced(client.clone(), &ns)
            .get_opt(&job_name(&name, &target))
            .await?
    };
    Ok(Observed {
        deployments,
        statefulsets,
        job,
    })
}

async fn apply(platform: Arc<ChappePlatform>, ctx: &Context) -> Result<Action> {
    let now = Time(Timestamp::now());
    let ns = platform.namespace().unwrap_or_default();
    let name = platform.name_any();

    if let Err(errors) = platform.validate() {
        let old = platform.status.clone().unwrap_or_default();
        let reported = old.observed_generation == platform.metadata.generation
            && status::find(&old, "Degraded").is_some_and(|c| c.reason == "InvalidSpec");
        if !reported {
            publish(
                ctx,
                &platform,
                &PlannedEvent::warning("InvalidSpec", "Validate", errors.join("; ")),
            )
            .await;
        }
        write_status(ctx, &platform, &status::invalid(&platform, &errors, &now)).await?;
        return Ok(Action::await_change());
    }

    let observed = observe(&ctx.client, &platform).await?;
    let service_monitors =
        platform.spec.telemetry.service_monitor && service_monitors_available(&ctx.client).await;
    let evaluation = status::evaluate(&platform, &observed, &now);
    let manifests = manifests::desired(
        &platform,
        &RenderOptions {
            service_monitors,
            rollout: evaluation.rollout.clone(),
        },
    )?;
    for m in &manifests {
        apply_manifest(&ctx.client, &ns, m).await?;
    }
    let mut keep_kinds = BTreeSet::new();
    if evaluation.rollout.services_image.is_none() {
        // Before any migration succeeded (or with a lost status) the
        // Deployments are not rendered: leave existing ones alone.
        keep_kinds.extend(["Deployment", "HorizontalPodAutoscaler"]);
    }
    prune(
        &ctx.client,
        &ns,
        &name,
        &manifests,
        service_monitors,
        &keep_kinds,
    )
    .await?;

    let mut status = evaluation.status;
    let mut events = evaluation.events;
    for region in &mut status.regions {
        let hash = region_hash(&manifests, &region.name)?;
        if region.applied_hash.as_deref() != Some(hash.as_str()) {
            let count = manifests
                .iter()
                .filter(|m| m.region.as_deref() == Some(region.name.as_str()))
                .count();
            events.push(PlannedEvent::normal(
                "Applied",
                format!("Apply {}", region.name),
                format!("region {}: {count} objects applied", region.name),
            ));
            region.applied_hash = Some(hash);
        }
    }
    for event in &events {
        publish(ctx, &platform, event).await;
    }
    write_status(ctx, &platform, &status).await?;
    tracing::info!(platform = %name, namespace = %ns, objects = manifests.len(), "reconciled");
    Ok(Action::requeue(if evaluation.progressing {
        REQUEUE_PROGRESSING
    } else {
        REQUEUE_CONVERGED
    }))
}

/// Server-side applies one object (field manager `chappe-operator`, forced).
pub async fn apply_manifest(client: &Client, ns: &str, m: &Manifest) -> Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &m.resource);
    api.patch(
        m.name(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&m.object),
    )
    .await?;
    Ok(())
}

/// Kinds whose stale objects are deleted (the migration Job expires by
/// itself; the embedded store's volume only goes with the platform).
fn prunable(service_monitors: bool) -> Vec<ApiResource> {
    let mut kinds = vec![
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<KubeService>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<PodDisruptionBudget>(&()),
        ApiResource::erase::<HorizontalPodAutoscaler>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
    ];
    if service_monitors {
        kinds.push(service_monitor_resource());
    }
    kinds
}

/// Deletes the platform's objects that are no longer desired (a removed
/// region, a dropped autoscaler, NATS made external).
async fn prune(
    client: &Client,
    ns: &str,
    name: &str,
    desired: &[Manifest],
    service_monitors: bool,
    keep_kinds: &BTreeSet<&str>,
) -> Result<()> {
    let selector = ListParams::default().labels(&instance_selector(name));
    for resource in prunable(service_monitors) {
        if keep_kinds.contains(resource.kind.as_str()) {
            continue;
        }
        let wanted: BTreeSet<&str> = desired
            .iter()
            .filter(|m| m.resource.kind == resource.kind)
            .map(Manifest::name)
            .collect();
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        for existing in api.list(&selector).await? {
            let existing_name = existing.name_any();
            if !wanted.contains(existing_name.as_str()) {
                tracing::info!(kind = %resource.kind, name = %existing_name, "deleting an object no longer desired");
                match api
                    .delete(&existing_name, &DeleteParams::background())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// Deletion: owner references take every namespaced object away; the
/// NATS JetStream volumes, which a StatefulSet's owner reference does not
/// cover on every cluster, are deleted here, and the deletion announced.
async fn cleanup(platform: Arc<ChappePlatform>, ctx: &Context) -> Result<Action> {
    let ns = platform.namespace().unwrap_or_default();
    let name = platform.name_any();
    let selector = format!(
        "app.kubernetes.io/instance={name},app.kubernetes.io/component={}",
        manifests::nats::COMPONENT
    );
    Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&selector),
        )
        .await?;
    publish(
        ctx,
        &platform,
        &PlannedEvent::normal(
            "Deleted",
            "Delete",
            format!("ChappePlatform {name} deleted: its objects go with it (owner references), NATS volumes deleted"),
        ),
    )
    .await;
    Ok(Action::await_change())
}

/// Runs the controller until `shutdown` completes: watches platforms and
/// the Deployments, StatefulSets and Jobs they own, in every namespace.
pub async fn run(
    client: Client,
    reporter: Reporter,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    run_scoped(client, None, reporter, metrics, shutdown).await;
}

/// [`run`] for the platforms of one namespace only (a test that shares its
/// apiserver with others reconciles its own namespace).
pub async fn run_namespaced(
    client: Client,
    namespace: &str,
    reporter: Reporter,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    run_scoped(client, Some(namespace), reporter, metrics, shutdown).await;
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn run_scoped(
    client: Client,
    namespace: Option<&str>,
    reporter: Reporter,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let ctx = Arc::new(Context::new(client.clone(), reporter, metrics));
    Controller::new(
        scoped::<ChappePlatform>(&client, namespace),
        watcher::Config::default().any_semantic(),
    )
    .owns(scoped::<Deployment>(&client, namespace), owned.clone())
    .owns(scoped::<StatefulSet>(&client, namespace), owned.clone())
    .owns(scoped::<Job>(&client, namespace), owned)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((obj, _)) => tracing::debug!(platform = %obj.name, "reconciled"),
            Err(e) => tracing::warn!(error = %e, "reconcile failed"),
        }
    })
    .await;
}
