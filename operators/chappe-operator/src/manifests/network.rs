//! NetworkPolicies (only gateways reachable from outside; services reach
//! NATS, the store and DNS, nothing else; metrics scrapable from inside
//! the cluster) and the Prometheus Operator ServiceMonitor.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::nats::{CLIENT_PORT, CLUSTER_PORT, GATEWAY_PORT, MONITOR_PORT};
use super::{Ctx, GATEWAY_GRPC_PORT, Manifest, SCRAPE_LABEL};
use crate::Result;
use crate::crd::Service;

/// CQL port of the store.
pub const CQL_PORT: i32 = 9042;

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..NetworkPolicyPort::default()
    }
}

fn udp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(port)),
        protocol: Some("UDP".into()),
        ..NetworkPolicyPort::default()
    }
}

fn dns() -> NetworkPolicyEgressRule {
    NetworkPolicyEgressRule {
        ports: Some(vec![udp(53), tcp(53)]),
        ..NetworkPolicyEgressRule::default()
    }
}

fn pods(ctx: &Ctx<'_>, component: Option<&str>) -> LabelSelector {
    let mut labels = std::collections::BTreeMap::from([(
        "app.kubernetes.io/instance".to_owned(),
        ctx.name.clone(),
    )]);
    if let Some(c) = component {
        labels.insert("app.kubernetes.io/component".into(), c.into());
    }
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

fn policy(ctx: &Ctx<'_>, part: &str, spec: NetworkPolicySpec) -> Result<Manifest> {
    Manifest::typed(
        &NetworkPolicy {
            metadata: ctx.meta(ctx.global(part), "network", None),
            spec: Some(spec),
        },
        None,
    )
}

/// The platform's NetworkPolicies.
pub fn policies(ctx: &Ctx<'_>) -> Result<Vec<Manifest>> {
    let spec = &ctx.platform.spec;
    let managed_nats = spec.nats.managed().is_some();
    let mut out = Vec::new();

    // Deny everything not allowed below, both ways.
    out.push(policy(
        ctx,
        "default-deny",
        NetworkPolicySpec {
            pod_selector: Some(pods(ctx, None)),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ..NetworkPolicySpec::default()
        },
    )?);

    // Clients reach the gateways' gRPC port, from anywhere.
    out.push(policy(
        ctx,
        "gateway-ingress",
        NetworkPolicySpec {
            pod_selector: Some(pods(ctx, Some(Service::Gateway.name()))),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(vec![tcp(GATEWAY_GRPC_PORT)]),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        },
    )?);

    // Scrapers inside the cluster reach the operations ports.
    let mut metric_ports: Vec<_> = Service::ALL.iter().map(|s| tcp(s.ops_port())).collect();
    metric_ports.push(tcp(MONITOR_PORT));
    out.push(policy(
        ctx,
        "metrics-ingress",
        NetworkPolicySpec {
            pod_selector: Some(pods(ctx, None)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector::default()),
                    ..NetworkPolicyPeer::default()
                }]),
                ports: Some(metric_ports),
            }]),
            ..NetworkPolicySpec::default()
        },
    )?);

    // Services and the migration reach DNS, NATS and the store; nothing else.
    let mut components: Vec<String> = Service::ALL.iter().map(|s| s.name().to_owned()).collect();
    components.push(super::migration::COMPONENT.into());
    let nats_peer = managed_nats.then(|| {
        vec![NetworkPolicyPeer {
            pod_selector: Some(pods(ctx, Some(super::nats::COMPONENT))),
            ..NetworkPolicyPeer::default()
        }]
    });
    let mut egress = vec![
        dns(),
        NetworkPolicyEgressRule {
            to: nats_peer,
            ports: Some(vec![tcp(CLIENT_PORT)]),
        },
    ];
    if spec.store.scylla.is_some() {
        egress.push(NetworkPolicyEgressRule {
            ports: Some(vec![tcp(CQL_PORT)]),
            ..NetworkPolicyEgressRule::default()
        });
    }
    out.push(policy(
        ctx,
        "services-egress",
        NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(std::collections::BTreeMap::from([(
                    "app.kubernetes.io/instance".to_owned(),
                    ctx.name.clone(),
                )])),
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app.kubernetes.io/component".into(),
                    operator: "In".into(),
                    values: Some(components),
                }]),
            }),
            policy_types: Some(vec!["Egress".into()]),
            egress: Some(egress),
            ..NetworkPolicySpec::default()
        },
    )?);

    // NATS servers: clients from the platform's pods, routes and gateways
    // between NATS servers of every region.
    if managed_nats {
        let nats_pods = || {
            Some(vec![NetworkPolicyPeer {
                pod_selector: Some(pods(ctx, Some(super::nats::COMPONENT))),
                ..NetworkPolicyPeer::default()
            }])
        };
        out.push(policy(
            ctx,
            "nats",
            NetworkPolicySpec {
                pod_selector: Some(pods(ctx, Some(super::nats::COMPONENT))),
                policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
                ingress: Some(vec![
                    NetworkPolicyIngressRule {
                        from: Some(vec![NetworkPolicyPeer {
                            pod_selector: Some(pods(ctx, None)),
                            ..NetworkPolicyPeer::default()
                        }]),
                        ports: Some(vec![tcp(CLIENT_PORT)]),
                    },
                    NetworkPolicyIngressRule {
                        from: nats_pods(),
                        ports: Some(vec![tcp(CLUSTER_PORT), tcp(GATEWAY_PORT)]),
                    },
                ]),
                egress: Some(vec![
                    dns(),
                    NetworkPolicyEgressRule {
                        to: nats_pods(),
                        ports: Some(vec![tcp(CLUSTER_PORT), tcp(GATEWAY_PORT)]),
                    },
                ]),
            },
        )?);
    }
    Ok(out)
}

/// API resource of Prometheus Operator ServiceMonitors.
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// A ServiceMonitor scraping every service of every region.
pub fn service_monitor(ctx: &Ctx<'_>) -> Result<Manifest> {
    let resource = service_monitor_resource();
    let mut object = DynamicObject::new(&ctx.name, &resource).within(&ctx.namespace);
    object.metadata = ctx.meta(ctx.name.clone(), "monitoring", None);
    object.data = json!({
        "spec": {
            "selector": { "matchLabels": {
                "app.kubernetes.io/instance": ctx.name,
                SCRAPE_LABEL: "true",
            }},
            "namespaceSelector": { "matchNames": [ctx.namespace] },
            "endpoints": [{ "port": "metrics", "path": "/metrics", "interval": "30s" }],
            "targetLabels": [super::REGION_LABEL, "app.kubernetes.io/component"],
        }
    });
    Ok(Manifest {
        resource,
        object,
        region: None,
    })
}
