//! Operator-managed NATS: per region a StatefulSet whose servers form one
//! cluster (routes), run JetStream with `sync_interval: always`, and join
//! the other regions' clusters into a supercluster through NATS gateways.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, Service as KubeService, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::workloads::scheduling;
use super::{CHECKSUM_ANNOTATION, Ctx, Manifest, checksum, container_security, pod_security};
use crate::Result;
use crate::crd::{ManagedNats, RegionSpec};

/// Client port.
pub const CLIENT_PORT: i32 = 4222;
/// Cluster route port.
pub const CLUSTER_PORT: i32 = 6222;
/// Supercluster gateway port.
pub const GATEWAY_PORT: i32 = 7222;
/// Monitoring port (`/healthz`, `/varz`).
pub const MONITOR_PORT: i32 = 8222;
/// Component label of NATS pods.
pub const COMPONENT: &str = "nats";

/// `CHAPPE_NATS_URL` for a region's services.
pub fn client_urls(ctx: &Ctx<'_>, region: &str) -> String {
    match &ctx.platform.spec.nats.external {
        Some(external) => external
            .urls
            .get(region)
            .cloned()
            .unwrap_or_default()
            .join(","),
        None => format!(
            "nats://{}.{}.svc:{CLIENT_PORT}",
            ctx.regional(region, COMPONENT),
            ctx.namespace
        ),
    }
}

/// The `nats.conf` of a region's servers.
pub fn config(ctx: &Ctx<'_>, region: &str, nats: &ManagedNats) -> String {
    let service = ctx.regional(region, COMPONENT);
    let ns = &ctx.namespace;
    let mut conf = format!(
        "# Rendered by chappe-operator for region {region}.\n\
         server_name: $POD_NAME\n\
         listen: 0.0.0.0:{CLIENT_PORT}\n\
         http: 0.0.0.0:{MONITOR_PORT}\n\
         pid_file: /var/run/nats/nats.pid\n\
         lame_duck_duration: 30s\n\
         lame_duck_grace_period: 10s\n\
         \n\
         jetstream {{\n  store_dir: /data\n  sync_interval: always\n}}\n"
    );
    // A cluster of one would only route to itself; a supercluster needs the
    // cluster block for its name all the same.
    let regions = &ctx.platform.spec.regions;
    if nats.replicas > 1 || regions.len() > 1 {
        let routes = (0..nats.replicas)
            .map(|i| format!("    nats://{service}-{i}.{service}.{ns}.svc:{CLUSTER_PORT}"))
            .collect::<Vec<_>>()
            .join("\n");
        conf.push_str(&format!(
            "\ncluster {{\n  name: {region}\n  listen: 0.0.0.0:{CLUSTER_PORT}\n  routes: [\n{routes}\n  ]\n}}\n"
        ));
    }
    if regions.len() > 1 {
        let gateways = regions
            .iter()
            .filter(|r| r.name != region)
            .map(|r| {
                format!(
                    "    {{ name: {}, urls: [\"nats://{}.{ns}.svc:{GATEWAY_PORT}\"] }}",
                    r.name,
                    ctx.regional(&r.name, COMPONENT)
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        conf.push_str(&format!(
            "\ngateway {{\n  name: {region}\n  listen: 0.0.0.0:{GATEWAY_PORT}\n  gateways: [\n{gateways}\n  ]\n}}\n"
        ));
    }
    conf
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("monitor".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// The NATS objects of one region (none when NATS is external).
pub fn region_objects(ctx: &Ctx<'_>, region: &RegionSpec) -> Result<Vec<Manifest>> {
    let Some(nats) = ctx.platform.spec.nats.managed() else {
        return Ok(Vec::new());
    };
    let r = region.name.as_str();
    let name = ctx.regional(r, COMPONENT);
    let conf = config(ctx, r, &nats);
    let data = BTreeMap::from([("nats.conf".to_owned(), conf)]);
    let conf_checksum = checksum(&data)?;
    let config_map = ConfigMap {
        metadata: ctx.meta(ctx.regional(r, "nats-config"), COMPONENT, Some(r)),
        data: Some(data),
        ..ConfigMap::default()
    };

    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    let service = KubeService {
        metadata: ctx.meta(name.clone(), COMPONENT, Some(r)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(ctx.selector(COMPONENT, Some(r))),
            ports: Some(vec![
                port("client", CLIENT_PORT),
                port("cluster", CLUSTER_PORT),
                port("gateway", GATEWAY_PORT),
                port("monitor", MONITOR_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..KubeService::default()
    };

    let (affinity, spread) = scheduling(ctx, region, COMPONENT);
    let container_port = |name: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let statefulset = StatefulSet {
        metadata: ctx.meta(name.clone(), COMPONENT, Some(r)),
        spec: Some(StatefulSetSpec {
            service_name: Some(name.clone()),
            replicas: Some(nats.replicas),
            pod_management_policy: Some("Parallel".into()),
            selector: ctx.label_selector(COMPONENT, Some(r)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(ctx.labels(COMPONENT, Some(r))),
                    annotations: Some(BTreeMap::from([(
                        CHECKSUM_ANNOTATION.into(),
                        conf_checksum,
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(pod_security()),
                    termination_grace_period_seconds: Some(60),
                    affinity: Some(affinity),
                    topology_spread_constraints: Some(spread),
                    volumes: Some(vec![
                        Volume {
                            name: "config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: ctx.regional(r, "nats-config"),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "pid".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    containers: vec![Container {
                        name: COMPONENT.into(),
                        image: Some(nats.image.clone()),
                        command: Some(vec![
                            "nats-server".into(),
                            "--config".into(),
                            "/etc/nats/nats.conf".into(),
                        ]),
                        env: Some(vec![EnvVar {
                            name: "POD_NAME".into(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.name".into(),
                                    ..ObjectFieldSelector::default()
                                }),
                                ..EnvVarSource::default()
                            }),
                            ..EnvVar::default()
                        }]),
                        ports: Some(vec![
                            container_port("client", CLIENT_PORT),
                            container_port("cluster", CLUSTER_PORT),
                            container_port("gateway", GATEWAY_PORT),
                            container_port("monitor", MONITOR_PORT),
                        ]),
                        startup_probe: Some(probe("/healthz", 5, 60)),
                        liveness_probe: Some(probe("/healthz?js-enabled-only=true", 30, 3)),
                        readiness_probe: Some(probe("/healthz?js-server-only=true", 10, 3)),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".into(), Quantity("200m".into())),
                                ("memory".into(), Quantity("256Mi".into())),
                            ])),
                            limits: Some(BTreeMap::from([(
                                "memory".into(),
                                Quantity("2Gi".into()),
                            )])),
                            ..ResourceRequirements::default()
                        }),
                        security_context: Some(container_security()),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                name: "config".into(),
                                mount_path: "/etc/nats".into(),
                                read_only: Some(true),
                                ..VolumeMount::default()
                            },
                            VolumeMount {
                                name: "data".into(),
                                mount_path: "/data".into(),
                                ..VolumeMount::default()
                            },
                            VolumeMount {
                                name: "pid".into(),
                                mount_path: "/var/run/nats".into(),
                                ..VolumeMount::default()
                            },
                        ]),
                        // Lame duck mode: clients move to the other servers
                        // before this one stops.
                        lifecycle: Some(Lifecycle {
                            pre_stop: Some(LifecycleHandler {
                                exec: Some(ExecAction {
                                    command: Some(vec![
                                        "nats-server".into(),
                                        "--signal".into(),
                                        "ldm=/var/run/nats/nats.pid".into(),
                                    ]),
                                }),
                                ..LifecycleHandler::default()
                            }),
                            ..Lifecycle::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    labels: Some(ctx.selector(COMPONENT, Some(r))),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: nats.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".into(),
                            nats.storage_size.clone(),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    let pdb = PodDisruptionBudget {
        metadata: ctx.meta(name, COMPONENT, Some(r)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(ctx.label_selector(COMPONENT, Some(r))),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    Ok(vec![
        Manifest::typed(&config_map, Some(r))?,
        Manifest::typed(&service, Some(r))?,
        Manifest::typed(&statefulset, Some(r))?,
        Manifest::typed(&pdb, Some(r))?,
    ])
}
