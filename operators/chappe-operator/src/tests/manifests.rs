//! The manifest builders, without a cluster.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::crd::{ChappePlatform, ExternalNats, NatsSpec, Service};
use crate::manifests::{Manifest, RenderOptions, Rollout, checksum, desired};

fn render(platform: &ChappePlatform) -> Vec<Manifest> {
    desired(
        platform,
        &RenderOptions {
            service_monitors: true,
            rollout: Rollout::converged(platform),
        },
    )
    .expect("desired")
}

fn find(manifests: &[Manifest], kind: &str, name: &str) -> Value {
    let m = manifests
        .iter()
        .find(|m| m.kind() == kind && m.name() == name)
        .unwrap_or_else(|| panic!("{kind} {name}"));
    serde_json::to_value(&m.object).expect("json")
}

fn pod_spec(object: &Value) -> &Value {
    &object["spec"]["template"]["spec"]
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

#[test]
fn every_pod_runs_locked_down() {
    for platform in [
        ChappePlatform::three_regions(),
        ChappePlatform::one_region(),
    ] {
        for m in render(&platform) {
            if !matches!(m.kind(), "Deployment" | "StatefulSet" | "Job") {
                continue;
            }
            let object = serde_json::to_value(&m.object).expect("json");
            let pod = pod_spec(&object);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", m.name());
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            for c in pod["containers"].as_array().expect("containers") {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", m.name());
                assert_eq!(sc["allowPrivilegeEscalation"], false);
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
            }
        }
    }
}

#[test]
fn services_run_their_binary_with_probes_on_their_ops_port() {
    let platform = ChappePlatform::three_regions();
    let manifests = render(&platform);
    for service in Service::ALL {
        let d = find(
            &manifests,
            "Deployment",
            &format!("chappe-fr-mrs-{service}"),
        );
        let c = &pod_spec(&d)["containers"][0];
        assert_eq!(c["command"], json!([service.binary()]));
        assert_eq!(
            env(c, "CHAPPE_METRICS_LISTEN"),
            Some(format!("0.0.0.0:{}", service.ops_port()).as_str())
        );
        assert_eq!(
            c["ports"].as_array().expect("ports").last().expect("port")["containerPort"],
            service.ops_port()
        );
        assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(
            c["envFrom"][0]["configMapRef"]["name"],
            "chappe-fr-mrs-config"
        );
        let affinity = &pod_spec(&d)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"];
        assert_eq!(
            affinity[0],
            json!({"key": "topology.kubernetes.io/region", "operator": "In", "values": ["fr-mrs"]})
        );
        assert_eq!(affinity[1]["key"], "topology.kubernetes.io/zone");
        assert_eq!(
            pod_spec(&d)["topologySpreadConstraints"][0]["topologyKey"],
            "topology.kubernetes.io/zone"
        );
    }
}

#[test]
fn gateways_drain_gracefully_and_read_the_session_key() {
    let manifests = render(&ChappePlatform::three_regions());
    let d = find(&manifests, "Deployment", "chappe-fr-par-gateway");
    let pod = pod_spec(&d);
    assert!(
        pod["terminationGracePeriodSeconds"]
            .as_i64()
            .expect("grace")
            >= 30
    );
    let c = &pod["containers"][0];
    assert_eq!(c["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(env(c, "CHAPPE_LISTEN"), Some("0.0.0.0:7443"));
    assert_eq!(
        env(c, "CHAPPE_SESSION_KEY_FILE"),
        Some("/etc/chappe/session/session.key")
    );
    assert_eq!(env(c, "CHAPPE_DEV_LOGIN"), None, "dev login off by default");
    assert_eq!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "session-key")
            .expect("secret")["secret"]["secretName"],
        "chappe-session-key"
    );
}

#[test]
fn settings_carry_the_limits_and_their_checksum_rolls_the_pods() {
    let platform = ChappePlatform::three_regions();
    let manifests = render(&platform);
    let config = find(&manifests, "ConfigMap", "chappe-fr-par-config");
    let data = &config["data"];
    assert_eq!(data["CHAPPE_MAX_FRAME_BYTES"], "262144");
    assert_eq!(data["CHAPPE_MAX_MESSAGE_BYTES"], "65536");
    assert_eq!(data["CHAPPE_MAX_GROUP_MEMBERS"], "1000");
    assert_eq!(data["CHAPPE_SEND_RATE"], "50");
    assert_eq!(data["CHAPPE_SEND_BURST"], "200");
    assert_eq!(data["CHAPPE_MEDIA_MAX_UPLOAD_BYTES"], "2147483648");
    assert_eq!(
        data["CHAPPE_OTLP_ENDPOINT"],
        "http://otel-collector.observability.svc:4317"
    );
    assert_eq!(data["CHAPPE_SUBJECT_PREFIX"], "chappe");
    let expected = checksum(&serde_json::from_value(data.clone()).expect("map")).expect("sha");
    let annotation = |ms: &[Manifest]| {
        find(ms, "Deployment", "chappe-fr-par-keydir")["spec"]["template"]["metadata"]["annotations"]
            ["chappe.gouv.fr/config-checksum"]
            .clone()
    };
    assert_eq!(annotation(&manifests), json!(expected));

    let mut changed = platform.clone();
    changed.spec.limits.send_rate = Some(10);
    let after = render(&changed);
    assert_ne!(
        annotation(&manifests),
        annotation(&after),
        "a settings change rolls the pods"
    );
    assert_eq!(
        find(&manifests, "Deployment", "chappe-fr-mrs-keydir")["spec"]["template"]["metadata"]["annotations"],
        find(&render(&platform), "Deployment", "chappe-fr-mrs-keydir")["spec"]["template"]["metadata"]
            ["annotations"],
        "rendering is deterministic"
    );
}

#[test]
fn network_policies_open_only_what_the_services_need() {
    let manifests = render(&ChappePlatform::three_regions());
    let gateway = find(&manifests, "NetworkPolicy", "chappe-gateway-ingress");
    assert_eq!(
        gateway["spec"]["ingress"][0]["ports"],
        json!([{"port": 7443, "protocol": "TCP"}])
    );
    assert_eq!(
        gateway["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "gateway"
    );
    let deny = find(&manifests, "NetworkPolicy", "chappe-default-deny");
    assert_eq!(deny["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    assert!(deny["spec"].get("ingress").is_none() && deny["spec"].get("egress").is_none());
    let egress = find(&manifests, "NetworkPolicy", "chappe-services-egress");
    let ports: BTreeSet<i64> = egress["spec"]["egress"]
        .as_array()
        .expect("rules")
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, BTreeSet::from([53, 4222, 9042]));
}

#[test]
fn nats_clusters_join_a_supercluster() {
    let manifests = render(&ChappePlatform::three_regions());
    let conf = find(&manifests, "ConfigMap", "chappe-fr-lil-nats-config")["data"]["nats.conf"]
        .as_str()
        .expect("conf")
        .to_owned();
    assert!(conf.contains("server_name: $POD_NAME"));
    assert!(
        conf.contains("jetstream {\n  store_dir: /data\n  sync_interval: always\n}"),
        "{conf}"
    );
    assert!(conf.contains("cluster {\n  name: fr-lil"));
    assert!(conf.contains("gateway {\n  name: fr-lil"));
    for i in 0..3 {
        assert!(conf.contains(&format!(
            "nats://chappe-fr-lil-nats-{i}.chappe-fr-lil-nats.chappe.svc:6222"
        )));
    }
    let sts = find(&manifests, "StatefulSet", "chappe-fr-lil-nats");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"],
        "fast-ssd"
    );
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
        "20Gi"
    );
}

#[test]
fn external_nats_renders_no_nats_servers() {
    let mut platform = ChappePlatform::three_regions();
    platform.spec.nats = NatsSpec {
        managed: None,
        external: Some(ExternalNats {
            urls: platform
                .spec
                .regions
                .iter()
                .map(|r| {
                    (
                        r.name.clone(),
                        vec![
                            format!("nats://{}-a:4222", r.name),
                            format!("nats://{}-b:4222", r.name),
                        ],
                    )
                })
                .collect(),
        }),
    };
    let manifests = render(&platform);
    assert!(!manifests.iter().any(|m| m.kind() == "StatefulSet"));
    let config = find(&manifests, "ConfigMap", "chappe-fr-par-config");
    assert_eq!(
        config["data"]["CHAPPE_NATS_URL"],
        "nats://fr-par-a:4222,nats://fr-par-b:4222"
    );
    assert!(
        config["data"].get("CHAPPE_JETSTREAM_REPLICAS").is_none(),
        "external NATS: its operator knows its size, the services keep their default"
    );
}

#[test]
fn the_embedded_store_keeps_every_pod_on_its_volume() {
    let manifests = render(&ChappePlatform::one_region());
    let pvc = find(&manifests, "PersistentVolumeClaim", "eval-data");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
    let config = find(&manifests, "ConfigMap", "eval-fr-par-config");
    assert_eq!(config["data"]["CHAPPE_STORE"], "embedded:/data/chappe.db");
    for service in Service::ALL {
        let d = find(&manifests, "Deployment", &format!("eval-fr-par-{service}"));
        let pod = pod_spec(&d);
        assert_eq!(
            pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"],
            "kubernetes.io/hostname"
        );
        assert_eq!(
            pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
            "eval-data"
        );
        assert_eq!(
            pod["containers"][0]["env"]
                .as_array()
                .map(|e| e.iter().any(|v| v["name"] == "CHAPPE_DEV_LOGIN")),
            Some(service == Service::Gateway)
        );
    }
}

#[test]
fn owner_references_only_when_the_platform_has_a_uid() {
    let owned = render(&ChappePlatform::three_regions());
    assert!(owned.iter().all(|m| {
        m.object
            .metadata
            .owner_references
            .as_ref()
            .is_some_and(|o| o[0].controller == Some(true))
    }));
    let mut from_file = ChappePlatform::three_regions();
    from_file.metadata.uid = None;
    assert!(
        render(&from_file)
            .iter()
            .all(|m| m.object.metadata.owner_references.is_none())
    );
}

#[test]
fn no_service_deployment_before_a_first_migration() {
    let platform = ChappePlatform::three_regions();
    let manifests = desired(
        &platform,
        &RenderOptions {
            service_monitors: false,
            rollout: Rollout {
                services_image: None,
                migrate: true,
                drained: BTreeSet::new(),
            },
        },
    )
    .expect("desired");
    assert!(
        !manifests
            .iter()
            .any(|m| m.kind() == "Deployment" || m.kind() == "HorizontalPodAutoscaler")
    );
    assert_eq!(manifests.iter().filter(|m| m.kind() == "Job").count(), 1);
    assert!(!manifests.iter().any(|m| m.kind() == "ServiceMonitor"));
}

#[test]
fn object_names_stay_dns_labels() {
    let mut platform = ChappePlatform::three_regions();
    platform.metadata.name = Some("a".repeat(crate::crd::MAX_NAME_LEN));
    platform.spec.regions[0].name = "r".repeat(20);
    platform
        .spec
        .store
        .scylla
        .as_mut()
        .expect("scylla")
        .datacenters[0]
        .region = "r".repeat(20);
    assert_eq!(platform.validate(), Ok(()));
    for m in render(&platform) {
        assert!(
            crate::crd::is_dns_label(m.name()),
            "{} {}",
            m.kind(),
            m.name()
        );
    }
}
