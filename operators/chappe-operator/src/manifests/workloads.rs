//! The five services of a region: settings ConfigMap, Deployments,
//! Services, PodDisruptionBudgets, HorizontalPodAutoscalers; and the
//! embedded store's volume.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, HTTPGetAction, Lifecycle, LifecycleHandler, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodAffinity, PodAffinityTerm, PodAntiAffinity, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, Service as KubeService,
    ServicePort, ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    CHECKSUM_ANNOTATION, Ctx, GATEWAY_GRPC_PORT, Manifest, NODE_REGION, NODE_ZONE, Rollout,
    SCRAPE_LABEL, checksum, container_security, pod_security,
};
use crate::Result;
use crate::crd::{RegionSpec, Service};

/// Desired gateway replicas of a region: zero when drained; `None` when
/// an autoscaler owns them; at least one while the region is asked to
/// drain but is not drained yet (waiting for the others, or refused).
pub fn gateway_replicas(region: &RegionSpec, drained: bool) -> Option<i32> {
    let workload = &region.gateway.workload;
    if drained {
        Some(0)
    } else if workload.autoscaling.is_some() {
        None
    } else if region.draining {
        Some(workload.replicas.max(1))
    } else {
        Some(workload.replicas)
    }
}

/// Mount point of the embedded store's volume.
pub const DATA_DIR: &str = "/data";
/// Where the gateway finds the session key Secret.
pub const SESSION_KEY_DIR: &str = "/etc/chappe/session";
/// Label marking pods that share the embedded store's node.
pub const EMBEDDED_LABEL: &str = "chappe.gouv.fr/store";

/// Objects of the platform as a whole (not of a region): the embedded
/// store's PersistentVolumeClaim.
pub fn platform_objects(ctx: &Ctx<'_>) -> Result<Vec<Manifest>> {
    let Some(embedded) = &ctx.platform.spec.store.embedded else {
        return Ok(Vec::new());
    };
    let pvc = PersistentVolumeClaim {
        metadata: ctx.meta(ctx.global("data"), "store", None),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: embedded.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    embedded.storage_size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    Ok(vec![Manifest::typed(&pvc, None)?])
}

/// The environment every service of `region` shares (the ConfigMap's data).
pub fn settings(ctx: &Ctx<'_>, region: &RegionSpec) -> BTreeMap<String, String> {
    let spec = &ctx.platform.spec;
    let mut env = BTreeMap::from([
        (
            "CHAPPE_NATS_URL".to_owned(),
            super::nats::client_urls(ctx, &region.name),
        ),
        ("CHAPPE_SUBJECT_PREFIX".to_owned(), "chappe".to_owned()),
        ("CHAPPE_STORE".to_owned(), store_url(ctx, &region.name)),
        ("CHAPPE_LOG_FORMAT".to_owned(), "json".to_owned()),
    ]);
    // Jobs stream and presence bucket: three copies in a managed NATS
    // cluster of three or more servers, so losing one loses no job.
    if let Some(managed) = spec.nats.managed() {
        let replicas = managed.replicas.clamp(1, 3);
        env.insert("CHAPPE_JETSTREAM_REPLICAS".into(), replicas.to_string());
    }
    if let Some(otlp) = &spec.telemetry.otlp_endpoint {
        env.insert("CHAPPE_OTLP_ENDPOINT".into(), otlp.clone());
    }
    let limits = [
        ("CHAPPE_MAX_FRAME_BYTES", spec.limits.max_frame_bytes),
        ("CHAPPE_MAX_MESSAGE_BYTES", spec.limits.max_message_bytes),
        ("CHAPPE_MAX_GROUP_MEMBERS", spec.limits.max_group_members),
        ("CHAPPE_SEND_RATE", spec.limits.send_rate),
        ("CHAPPE_SEND_BURST", spec.limits.send_burst),
        (
            "CHAPPE_MEDIA_MAX_UPLOAD_BYTES",
            spec.limits.media_max_upload_bytes,
        ),
    ];
    for (key, value) in limits {
        if let Some(v) = value {
            env.insert(key.into(), v.to_string());
        }
    }
    env
}

/// `CHAPPE_STORE` of a region: `scylla://CONTACTS/KEYSPACE?dc=..&rf=..&consistency=..`
/// with the region's datacenter, or the embedded file.
pub fn store_url(ctx: &Ctx<'_>, region: &str) -> String {
    let store = &ctx.platform.spec.store;
    match &store.scylla {
        Some(scylla) => {
            let dc = scylla.datacenters.iter().find(|d| d.region == region);
            let hosts = dc.map(|d| d.contact_points.join(",")).unwrap_or_default();
            let dc_name = dc.map(|d| d.name.as_str()).unwrap_or(region);
            let rf = scylla
                .replication
                .iter()
                .map(|(dc, n)| format!("{dc}:{n}"))
                .collect::<Vec<_>>()
                .join(",");
            format!(
                "scylla://{hosts}/{}?dc={dc_name}&rf={rf}&consistency={}",
                scylla.keyspace,
                scylla.consistency.url_param()
            )
        }
        None => format!("embedded:{DATA_DIR}/chappe.db"),
    }
}

/// The objects of one region's services.
pub fn region_objects(
    ctx: &Ctx<'_>,
    region: &RegionSpec,
    rollout: &Rollout,
) -> Result<Vec<Manifest>> {
    let r = region.name.as_str();
    let settings = settings(ctx, region);
    let config_checksum = checksum(&settings)?;
    let config = ConfigMap {
        metadata: ctx.meta(ctx.regional(r, "config"), "config", Some(r)),
        data: Some(settings),
        ..ConfigMap::default()
    };
    let mut out = vec![Manifest::typed(&config, Some(r))?];
    let drained = rollout.drained.contains(r);
    for service in Service::ALL {
        out.extend(services(ctx, region, service)?);
        out.push(pdb(ctx, region, service)?);
        let gateway_drained = drained && service == Service::Gateway;
        if let Some(image) = &rollout.services_image {
            out.push(deployment(
                ctx,
                region,
                service,
                image,
                &config_checksum,
                drained,
            )?);
        }
        if let Some(a) = &region.workload(service).autoscaling
            && !gateway_drained
            && rollout.services_image.is_some()
        {
            let hpa = HorizontalPodAutoscaler {
                metadata: ctx.meta(ctx.regional(r, service.name()), service.name(), Some(r)),
                spec: Some(HorizontalPodAutoscalerSpec {
                    scale_target_ref: CrossVersionObjectReference {
                        api_version: Some("apps/v1".into()),
                        kind: "Deployment".into(),
                        name: ctx.regional(r, service.name()),
                    },
                    min_replicas: Some(a.min_replicas),
                    max_replicas: a.max_replicas,
                    metrics: Some(vec![MetricSpec {
                        type_: "Resource".into(),
                        resource: Some(ResourceMetricSource {
                            name: "cpu".into(),
                            target: MetricTarget {
                                type_: "Utilization".into(),
                                average_utilization: Some(a.target_cpu_utilization),
                                ..MetricTarget::default()
                            },
                        }),
                        ..MetricSpec::default()
                    }]),
                    ..HorizontalPodAutoscalerSpec::default()
                }),
                ..HorizontalPodAutoscaler::default()
            };
            out.push(Manifest::typed(&hpa, Some(r))?);
        }
    }
    Ok(out)
}

/// The Services of one service of a region: its metrics Service (headless,
/// scraped), and for the gateway the client-facing one.
fn services(ctx: &Ctx<'_>, region: &RegionSpec, service: Service) -> Result<Vec<Manifest>> {
    let r = region.name.as_str();
    let name = service.name();
    let mut out = Vec::new();
    let metrics_name = if service == Service::Gateway {
        ctx.regional(r, "gateway-metrics")
    } else {
        ctx.regional(r, name)
    };
    let mut meta = ctx.meta(metrics_name, name, Some(r));
    meta.labels
        .get_or_insert_default()
        .insert(SCRAPE_LABEL.into(), "true".into());
    out.push(Manifest::typed(
        &KubeService {
            metadata: meta,
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                selector: Some(ctx.selector(name, Some(r))),
                ports: Some(vec![ServicePort {
                    name: Some("metrics".into()),
                    port: service.ops_port(),
                    target_port: Some(IntOrString::String("metrics".into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..KubeService::default()
        },
        Some(r),
    )?);
    if service == Service::Gateway {
        let svc = &region.gateway.service;
        let mut meta = ctx.meta(ctx.regional(r, name), name, Some(r));
        if !svc.annotations.is_empty() {
            meta.annotations = Some(svc.annotations.clone());
        }
        out.push(Manifest::typed(
            &KubeService {
                metadata: meta,
                spec: Some(ServiceSpec {
                    type_: Some(svc.type_.as_str().into()),
                    selector: Some(ctx.selector(name, Some(r))),
                    ports: Some(vec![ServicePort {
                        name: Some("grpc".into()),
                        port: GATEWAY_GRPC_PORT,
                        target_port: Some(IntOrString::String("grpc".into())),
                        protocol: Some("TCP".into()),
                        app_protocol: Some("kubernetes.io/h2c".into()),
                        ..ServicePort::default()
                    }]),
                    ..ServiceSpec::default()
                }),
                ..KubeService::default()
            },
            Some(r),
        )?);
    }
    Ok(out)
}

/// At most one pod of a service of a region down at a time.
fn pdb(ctx: &Ctx<'_>, region: &RegionSpec, service: Service) -> Result<Manifest> {
    let r = region.name.as_str();
    Manifest::typed(
        &PodDisruptionBudget {
            metadata: ctx.meta(ctx.regional(r, service.name()), service.name(), Some(r)),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(ctx.label_selector(service.name(), Some(r))),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        },
        Some(r),
    )
}

/// Node affinity pinning to the region (and its zones), spread over zones
/// and hosts; with the embedded store, every pod on the volume's node.
pub fn scheduling(
    ctx: &Ctx<'_>,
    region: &RegionSpec,
    component: &str,
) -> (Affinity, Vec<TopologySpreadConstraint>) {
    let r = region.name.as_str();
    let mut requirements = vec![NodeSelectorRequirement {
        key: NODE_REGION.into(),
        operator: "In".into(),
        values: Some(vec![r.to_owned()]),
    }];
    if !region.zones.is_empty() {
        requirements.push(NodeSelectorRequirement {
            key: NODE_ZONE.into(),
            operator: "In".into(),
            values: Some(region.zones.clone()),
        });
    }
    let selector = ctx.label_selector(component, Some(r));
    let embedded = ctx.platform.spec.store.embedded.is_some() && component != "nats";
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(requirements),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        pod_affinity: embedded.then(|| PodAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(embedded_labels(ctx)),
                    ..LabelSelector::default()
                }),
                topology_key: "kubernetes.io/hostname".into(),
                ..PodAffinityTerm::default()
            }]),
            ..PodAffinity::default()
        }),
        pod_anti_affinity: (!embedded).then(|| PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(selector.clone()),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
    };
    let spread = vec![TopologySpreadConstraint {
        max_skew: 1,
        topology_key: NODE_ZONE.into(),
        when_unsatisfiable: "ScheduleAnyway".into(),
        label_selector: Some(selector),
        match_label_keys: (component != "nats").then(|| vec!["pod-template-hash".into()]),
        ..TopologySpreadConstraint::default()
    }];
    (affinity, spread)
}

/// Labels shared by the pods that use the embedded store's volume.
pub fn embedded_labels(ctx: &Ctx<'_>) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/instance".to_owned(), ctx.name.clone()),
        (EMBEDDED_LABEL.to_owned(), "embedded".to_owned()),
    ])
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("100m".into())),
            ("memory".into(), Quantity("128Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".into(),
            Quantity("512Mi".into()),
        )])),
        ..ResourceRequirements::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Volumes every Chappe pod mounts: a writable /tmp, and the embedded
/// store's volume when there is one.
pub fn common_volumes(ctx: &Ctx<'_>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    if ctx.platform.spec.store.embedded.is_some() {
        volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: ctx.global("data"),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// The Deployment of one service in one region.
fn deployment(
    ctx: &Ctx<'_>,
    region: &RegionSpec,
    service: Service,
    image: &str,
    config_checksum: &str,
    drained: bool,
) -> Result<Manifest> {
    let r = region.name.as_str();
    let name = service.name();
    let workload = region.workload(service);
    let spec = &ctx.platform.spec;
    let (affinity, spread) = scheduling(ctx, region, name);
    let (mut volumes, mut mounts) = common_volumes(ctx);

    let mut env = vec![EnvVar {
        name: "CHAPPE_METRICS_LISTEN".into(),
        value: Some(format!("0.0.0.0:{}", service.ops_port())),
        ..EnvVar::default()
    }];
    let mut ports = vec![ContainerPort {
        name: Some("metrics".into()),
        container_port: service.ops_port(),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }];
    let mut lifecycle = None;
    let mut grace = 30;
    if service == Service::Gateway {
        env.push(EnvVar {
            name: "CHAPPE_LISTEN".into(),
            value: Some(format!("0.0.0.0:{GATEWAY_GRPC_PORT}")),
            ..EnvVar::default()
        });
        env.push(EnvVar {
            name: "CHAPPE_SESSION_KEY_FILE".into(),
            value: Some(format!("{SESSION_KEY_DIR}/{}", spec.auth.session_key_key)),
            ..EnvVar::default()
        });
        if spec.auth.dev_login {
            env.push(EnvVar {
                name: "CHAPPE_DEV_LOGIN".into(),
                value: Some("true".into()),
                ..EnvVar::default()
            });
        }
        ports.insert(
            0,
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GATEWAY_GRPC_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        );
        volumes.push(Volume {
            name: "session-key".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(spec.auth.session_key_secret.clone()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "session-key".into(),
            mount_path: SESSION_KEY_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        // The gateway tells its clients to reconnect elsewhere on SIGTERM
        // and drains; the pause lets endpoints drop it from load balancers
        // first.
        lifecycle = Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: 5 }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
        grace = 60;
    }

    let replicas = if service == Service::Gateway {
        gateway_replicas(region, drained)
    } else if workload.autoscaling.is_some() {
        None // the HorizontalPodAutoscaler owns it
    } else {
        Some(workload.replicas)
    };
    // The version label follows the image the pods actually run, which
    // lags the spec's while a migration is pending.
    let mut labels = ctx.labels(name, Some(r));
    labels.insert(
        "app.kubernetes.io/version".into(),
        super::label_value(image.rsplit(':').next().unwrap_or(image)),
    );
    let mut pod_labels = labels.clone();
    if spec.store.embedded.is_some() {
        pod_labels.extend(embedded_labels(ctx));
    }
    let mut metadata = ctx.meta(ctx.regional(r, name), name, Some(r));
    metadata.labels = Some(labels);

    let deployment = Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas,
            revision_history_limit: Some(5),
            selector: ctx.label_selector(name, Some(r)),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CHECKSUM_ANNOTATION.into(),
                        config_checksum.into(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    termination_grace_period_seconds: Some(grace),
                    affinity: Some(affinity),
                    topology_spread_constraints: Some(spread),
                    volumes: Some(volumes),
                    containers: vec![Container {
                        name: name.into(),
                        image: Some(image.into()),
                        image_pull_policy: Some(spec.image.pull_policy.as_str().into()),
                        command: Some(vec![service.binary().into()]),
                        env: Some(env),
                        env_from: Some(vec![EnvFromSource {
                            config_map_ref: Some(ConfigMapEnvSource {
                                name: ctx.regional(r, "config"),
                                ..ConfigMapEnvSource::default()
                            }),
                            ..EnvFromSource::default()
                        }]),
                        ports: Some(ports),
                        startup_probe: Some(http_probe("/healthz", 2, 30)),
                        liveness_probe: Some(http_probe("/healthz", 10, 3)),
                        readiness_probe: Some(http_probe("/readyz", 5, 3)),
                        resources: Some(
                            workload.resources.clone().unwrap_or_else(default_resources),
                        ),
                        security_context: Some(container_security()),
                        lifecycle,
                        volume_mounts: Some(mounts),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    Manifest::typed(&deployment, Some(r))
}
