//! The schema migration Job: `chappe migrate` against the store, once per
//! image. The reconciler keeps the services on the previous image until
//! this Job has succeeded.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::workloads::{common_volumes, embedded_labels, scheduling, store_url};
use super::{Ctx, Manifest, container_security, image_hash, pod_security};
use crate::Result;

/// Component label of migration pods.
pub const COMPONENT: &str = "migration";
/// Annotation naming the image a Job migrates to.
pub const IMAGE_ANNOTATION: &str = "chappe.gouv.fr/image";

/// Name of the migration Job of `image` for platform `name`.
pub fn job_name(name: &str, image: &str) -> String {
    format!("{name}-migrate-{}", image_hash(image))
}

/// The migration Job of the spec's image. It runs in the first region,
/// whose datacenter it talks to; the keyspace's replication covers all.
pub fn job(ctx: &Ctx<'_>) -> Result<Manifest> {
    let spec = &ctx.platform.spec;
    let image = spec.image.reference();
    let region = &spec.regions[0];
    let (affinity, _) = scheduling(ctx, region, COMPONENT);
    let (volumes, mounts) = common_volumes(ctx);
    let mut meta = ctx.meta(job_name(&ctx.name, &image), COMPONENT, None);
    meta.annotations = Some(BTreeMap::from([(IMAGE_ANNOTATION.into(), image.clone())]));
    let mut pod_labels = ctx.labels(COMPONENT, None);
    if spec.store.embedded.is_some() {
        pod_labels.extend(embedded_labels(ctx));
    }
    let job = Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(4),
            active_deadline_seconds: Some(1800),
            // Kept a day for inspection; the status remembers the result.
            ttl_seconds_after_finished: Some(86_400),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    affinity: Some(affinity),
                    volumes: Some(volumes),
                    containers: vec![Container {
                        name: "migrate".into(),
                        image: Some(image),
                        image_pull_policy: Some(spec.image.pull_policy.as_str().into()),
                        command: Some(vec!["chappe".into(), "migrate".into()]),
                        env: Some(vec![
                            EnvVar {
                                name: "CHAPPE_STORE".into(),
                                value: Some(store_url(ctx, &region.name)),
                                ..EnvVar::default()
                            },
                            EnvVar {
                                name: "CHAPPE_LOG_FORMAT".into(),
                                value: Some("json".into()),
                                ..EnvVar::default()
                            },
                        ]),
                        security_context: Some(container_security()),
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        ..Job::default()
    };
    Manifest::typed(&job, None)
}
