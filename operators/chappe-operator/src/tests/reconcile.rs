//! Reconciliations against a mocked apiserver: each test sets up a
//! cluster ([`Scenario`]), runs `reconcile` once (or a few times, feeding
//! each status into the next) and asserts the requests made and the
//! status written.

use std::sync::Arc;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde_json::{Value, json};

use crate::crd::{ChappePlatform, ChappePlatformStatus, DrainState, MigrationPhase};
use crate::fixtures::{Cluster, Requests, Scenario, all_regions, reconcile_in};
use crate::reconcile::{Context, error_policy};

const IMAGE_1: &str = "registry.example.gouv.fr/chappe/chappe:0.1.0";
const IMAGE_2: &str = "registry.example.gouv.fr/chappe/chappe:0.2.0";

fn cond<'a>(status: &'a ChappePlatformStatus, type_: &str) -> &'a Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("condition {type_} in {:#?}", status.conditions))
}

/// Asserts a condition's status and reason, and that it carries the
/// platform's generation.
fn assert_cond(status: &ChappePlatformStatus, type_: &str, value: &str, reason: &str) {
    let c = cond(status, type_);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        (value, reason),
        "condition {type_}: {c:?}"
    );
    assert_eq!(
        c.observed_generation, status.observed_generation,
        "{type_} carries observedGeneration"
    );
}

fn replicas(object: &Value) -> Option<i64> {
    object["spec"]["replicas"].as_i64()
}

fn image(object: &Value) -> &str {
    object["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

fn deployment(requests: &Requests, name: &str) -> Value {
    requests
        .applied_object("deployments", name)
        .unwrap_or_else(|| panic!("Deployment {name} applied"))
}

fn written_status(requests: &Requests) -> ChappePlatformStatus {
    requests.status().expect("the status is written")
}

fn region<'a>(status: &'a ChappePlatformStatus, name: &str) -> &'a crate::crd::RegionStatus {
    status
        .regions
        .iter()
        .find(|r| r.name == name)
        .expect("region status")
}

#[tokio::test]
async fn a_new_platform_gets_the_finalizer_first() {
    let platform = ChappePlatform::three_regions().unfinalized();
    let out = reconcile_in(Scenario::FreshCluster, platform).await;
    out.result.expect("reconcile");
    let requests = &out.requests.0;
    assert_eq!(requests.len(), 1, "only the finalizer patch: {requests:#?}");
    assert_eq!(requests[0].method, Method::PATCH);
    assert_eq!(
        requests[0].path,
        "/apis/chappe.gouv.fr/v1alpha1/namespaces/chappe/chappeplatforms/chappe"
    );
    let patch = requests[0].body.clone().expect("json patch");
    assert_eq!(patch[1]["op"], "add");
    assert_eq!(patch[1]["path"], "/metadata/finalizers");
    assert_eq!(
        patch[1]["value"],
        json!(["chappeplatforms.chappe.gouv.fr/cleanup"])
    );
}

#[tokio::test]
async fn first_install_of_three_regions_migrates_then_rolls_out() {
    let platform = ChappePlatform::three_regions();

    // Pass 1: nothing exists. The migration Job and everything but the
    // service Deployments are applied.
    let out = reconcile_in(Scenario::FreshCluster, platform.clone()).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(
        r.matching(Method::GET, "/apis/apps/v1/namespaces/chappe/deployments")
            .len(),
        1,
        "observed; not listed for pruning: before a migration no Deployment is rendered, so none is pruned"
    );
    for applied in r.0.iter().filter(|x| x.query.contains("fieldManager")) {
        assert!(applied.query.contains("force=true"), "{}", applied.line());
    }
    let jobs = r.applied("jobs");
    assert_eq!(jobs.len(), 1, "one migration Job");
    let (job_name, job) = &jobs[0];
    assert!(job_name.starts_with("chappe-migrate-"), "{job_name}");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], IMAGE_1);
    assert_eq!(container["command"], json!(["chappe", "migrate"]));
    assert_eq!(container["env"][0]["name"], "CHAPPE_STORE");
    assert_eq!(
        container["env"][0]["value"],
        "scylla://scylla-par-0.scylla.svc:9042,scylla-par-1.scylla.svc:9042/chappe?dc=dc-par&rf=dc-lil:3,dc-mrs:3,dc-par:3&consistency=local_quorum"
    );
    assert!(
        r.applied("deployments").is_empty(),
        "no service runs before the schema is migrated"
    );

    let statefulsets = r.applied("statefulsets");
    assert_eq!(statefulsets.len(), 3, "one NATS cluster per region");
    for (name, sts) in &statefulsets {
        assert_eq!(replicas(sts), Some(3), "{name}");
        let region = name.trim_start_matches("chappe-").trim_end_matches("-nats");
        assert_eq!(
            sts["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0],
            json!({"key": "topology.kubernetes.io/region", "operator": "In", "values": [region]})
        );
    }
    let nats_conf = r
        .applied_object("configmaps", "chappe-fr-par-nats-config")
        .expect("NATS config")["data"]["nats.conf"]
        .as_str()
        .expect("nats.conf")
        .to_owned();
    assert!(nats_conf.contains("sync_interval: always"), "{nats_conf}");
    assert!(nats_conf.contains("nats://chappe-fr-par-nats-2.chappe-fr-par-nats.chappe.svc:6222"));
    assert!(
        nats_conf
            .contains("{ name: fr-mrs, urls: [\"nats://chappe-fr-mrs-nats.chappe.svc:7222\"] }")
    );
    assert!(
        nats_conf
            .contains("{ name: fr-lil, urls: [\"nats://chappe-fr-lil-nats.chappe.svc:7222\"] }")
    );
    assert!(
        !nats_conf.contains("{ name: fr-par,"),
        "no gateway to itself"
    );

    let gateway_svc = r
        .applied_object("services", "chappe-fr-par-gateway")
        .expect("gateway Service");
    assert_eq!(gateway_svc["spec"]["type"], "LoadBalancer");
    assert_eq!(
        gateway_svc["metadata"]["annotations"]["service.beta.kubernetes.io/load-balancer-name"],
        "chappe-fr-par"
    );
    assert_eq!(
        gateway_svc["metadata"]["ownerReferences"][0]["kind"], "ChappePlatform",
        "owned, so that deletion cleans up"
    );
    assert_eq!(
        r.applied("poddisruptionbudgets").len(),
        18,
        "5 services and NATS per region"
    );
    assert_eq!(r.applied("networkpolicies").len(), 5);
    assert_eq!(
        r.applied("servicemonitors").len(),
        1,
        "the Prometheus Operator is installed"
    );
    let config = r
        .applied_object("configmaps", "chappe-fr-mrs-config")
        .expect("settings");
    assert_eq!(
        config["data"]["CHAPPE_NATS_URL"],
        "nats://chappe-fr-mrs-nats.chappe.svc:4222"
    );
    assert_eq!(config["data"]["CHAPPE_LOG_FORMAT"], "json");
    assert_eq!(
        config["data"]["CHAPPE_JETSTREAM_REPLICAS"], "3",
        "jobs survive the loss of a NATS server"
    );

    assert_eq!(
        r.event_reasons(),
        ["MigrationStarted", "Applied", "Applied", "Applied"]
    );
    assert_eq!(
        r.matching(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/chappe/events"
        )
        .len(),
        4,
        "one event per region, not folded into a series"
    );
    for (i, region) in ["fr-par", "fr-mrs", "fr-lil"].iter().enumerate() {
        assert!(
            r.events()[i + 1]
                .2
                .starts_with(&format!("region {region}:"))
        );
    }
    let status = written_status(r);
    assert_eq!(status.observed_generation, Some(1));
    assert_cond(&status, "Progressing", "True", "MigrationRunning");
    assert_cond(&status, "Available", "False", "NoRegionReady");
    assert_cond(&status, "Degraded", "False", "AsExpected");
    assert_cond(&status, "Ready", "False", "MigrationRunning");
    assert_cond(&status, "Ready-fr-par", "False", "WaitingForMigration");
    assert_eq!(
        status.migration.as_ref().map(|m| m.phase),
        Some(MigrationPhase::Running)
    );
    assert_eq!(status.schema_version, None);
    assert_eq!(status.ready_regions.as_deref(), Some("0/3"));

    // Pass 2: the Job succeeded. The services roll out with the image.
    let platform = platform.with_status(status);
    let cluster = Cluster::empty().with_job(&platform, MigrationPhase::Succeeded);
    let out = reconcile_in(Scenario::Cluster(cluster), platform.clone()).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    let deployments = r.applied("deployments");
    assert_eq!(deployments.len(), 15, "5 services in 3 regions");
    for (name, d) in &deployments {
        assert_eq!(image(d), IMAGE_1, "{name}");
    }
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-gateway")), Some(3));
    assert_eq!(replicas(&deployment(r, "chappe-fr-lil-gateway")), Some(2));
    assert_eq!(
        replicas(&deployment(r, "chappe-fr-par-fanout")),
        None,
        "the autoscaler owns fr-par's fanout replicas"
    );
    let hpa = r
        .applied_object("horizontalpodautoscalers", "chappe-fr-par-fanout")
        .expect("autoscaler");
    assert_eq!(
        (
            hpa["spec"]["minReplicas"].as_i64(),
            hpa["spec"]["maxReplicas"].as_i64()
        ),
        (Some(3), Some(12))
    );
    assert!(
        r.applied("jobs").is_empty(),
        "the Job exists: not applied again"
    );
    assert_eq!(
        r.event_reasons(),
        ["MigrationSucceeded", "Applied", "Applied", "Applied"]
    );
    let status = written_status(r);
    assert_eq!(status.schema_version.as_deref(), Some("0.1.0"));
    assert_eq!(status.migrated_image.as_deref(), Some(IMAGE_1));
    assert_eq!(status.migration, None);
    assert_cond(&status, "Progressing", "True", "RollingOut");
    assert_cond(&status, "Ready-fr-mrs", "False", "ReplicasNotReady");

    // Pass 3: every pod is ready. The platform is Ready; nothing changed,
    // so no event; the Job is no longer looked up.
    let platform = platform.with_status(status);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let out = reconcile_in(Scenario::Cluster(cluster), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert!(r.event_reasons().is_empty(), "{:?}", r.events());
    assert!(r.matching(Method::GET, "/jobs/").is_empty());
    let status = written_status(r);
    assert_cond(&status, "Ready", "True", "Ready");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_cond(&status, "Progressing", "False", "Converged");
    assert_cond(&status, "Degraded", "False", "AsExpected");
    for region in ["fr-par", "fr-mrs", "fr-lil"] {
        assert_cond(
            &status,
            &format!("Ready-{region}"),
            "True",
            "AllReplicasReady",
        );
    }
    assert_eq!(status.ready_regions.as_deref(), Some("3/3"));
    let par = region(&status, "fr-par");
    assert_eq!(par.replicas["gateway"].ready, 3);
    assert_eq!(par.replicas["gateway"].desired, 3);
    assert_eq!(par.replicas["nats"].ready, 3);
}

#[tokio::test]
async fn scaling_one_region_reapplies_it_and_reports_it_rolling_out() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.regions[1].fanout.replicas = 5);
    let out = reconcile_in(Scenario::Cluster(cluster), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(replicas(&deployment(r, "chappe-fr-mrs-fanout")), Some(5));
    assert_eq!(replicas(&deployment(r, "chappe-fr-mrs-keydir")), Some(3));
    assert_eq!(replicas(&deployment(r, "chappe-fr-lil-fanout")), Some(2));
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-gateway")), Some(3));
    let events = r.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1, "Applied");
    assert!(events[0].2.contains("region fr-mrs"), "{events:?}");

    let status = written_status(r);
    assert_eq!(status.observed_generation, Some(2));
    assert_cond(&status, "Ready-fr-mrs", "False", "ReplicasNotReady");
    assert!(cond(&status, "Ready-fr-mrs").message.contains("fanout 3/5"));
    assert_cond(&status, "Ready-fr-par", "True", "AllReplicasReady");
    assert_cond(&status, "Progressing", "True", "RollingOut");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_cond(&status, "Ready", "False", "RollingOut");
    assert_eq!(status.ready_regions.as_deref(), Some("2/3"));
}

#[tokio::test]
async fn draining_waits_for_the_other_regions_then_scales_gateways_to_zero() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let drain = |s: &mut crate::ChappePlatformSpec| s.regions[0].draining = true;

    // fr-mrs is not Ready: fr-par keeps its gateways.
    let cluster = Cluster::running(
        &platform,
        IMAGE_1,
        &["fr-par".to_owned(), "fr-lil".to_owned()],
    );
    let waiting = platform.clone().changed(drain);
    let out = reconcile_in(Scenario::Cluster(cluster), waiting.clone()).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-gateway")), Some(3));
    assert!(!r.event_reasons().contains(&"DrainStarted".to_owned()));
    let status = written_status(r);
    assert_eq!(region(&status, "fr-par").drain, DrainState::Waiting);
    assert_cond(&status, "Progressing", "True", "WaitingForOtherRegions");
    assert_cond(&status, "Degraded", "False", "AsExpected");

    // Every other region Ready: fr-par's gateways go to zero, its data
    // services and NATS stay.
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let out = reconcile_in(Scenario::Cluster(cluster), waiting.with_status(status)).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-gateway")), Some(0));
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-keydir")), Some(3));
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-media")), Some(2));
    assert_eq!(replicas(&deployment(r, "chappe-fr-mrs-gateway")), Some(3));
    assert_eq!(
        replicas(
            &r.applied_object("statefulsets", "chappe-fr-par-nats")
                .expect("NATS")
        ),
        Some(3)
    );
    assert_eq!(r.event_reasons(), ["DrainStarted", "Applied"]);
    let status = written_status(r);
    assert_eq!(region(&status, "fr-par").drain, DrainState::Drained);
    assert_cond(&status, "Ready-fr-par", "False", "Drained");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_cond(&status, "Progressing", "False", "Converged");
    assert_cond(&status, "Ready", "True", "Ready");
    assert_eq!(status.ready_regions.as_deref(), Some("2/3"));
}

#[tokio::test]
async fn undraining_restores_the_gateways() {
    let platform = ChappePlatform::three_regions()
        .changed(|s| s.regions[0].draining = true)
        .converged(&["fr-par"]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.regions[0].draining = false);
    let out = reconcile_in(Scenario::Cluster(cluster), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(replicas(&deployment(r, "chappe-fr-par-gateway")), Some(3));
    assert_eq!(r.event_reasons(), ["Undrained", "Applied"]);
    let status = written_status(r);
    assert_eq!(region(&status, "fr-par").drain, DrainState::Serving);
    assert_cond(&status, "Ready-fr-par", "False", "ReplicasNotReady");
    assert!(
        cond(&status, "Ready-fr-par")
            .message
            .contains("gateway 0/3")
    );
    assert_cond(&status, "Progressing", "True", "RollingOut");
}

#[tokio::test]
async fn draining_the_last_ready_region_is_refused() {
    // fr-mrs and fr-lil are drained; draining fr-par too would leave no
    // region serving clients.
    let platform = ChappePlatform::three_regions()
        .changed(|s| {
            s.regions[1].draining = true;
            s.regions[2].draining = true;
        })
        .converged(&["fr-mrs", "fr-lil"]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.regions[0].draining = true);
    let out = reconcile_in(Scenario::Cluster(cluster), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(
        replicas(&deployment(r, "chappe-fr-par-gateway")),
        Some(3),
        "kept"
    );
    assert_eq!(replicas(&deployment(r, "chappe-fr-mrs-gateway")), Some(0));
    assert_eq!(replicas(&deployment(r, "chappe-fr-lil-gateway")), Some(0));
    assert!(
        r.events().contains(&(
            "Warning".into(),
            "DrainRefused".into(),
            "region fr-par is the last region serving clients: draining it would leave no Ready region; its gateways stay".into()
        )),
        "{:?}",
        r.events()
    );
    let status = written_status(r);
    assert_eq!(region(&status, "fr-par").drain, DrainState::Refused);
    assert_cond(&status, "Degraded", "True", "DrainRefused");
    assert_cond(&status, "Ready", "False", "DrainRefused");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_cond(&status, "Ready-fr-par", "True", "AllReplicasReady");
}

#[tokio::test]
async fn draining_the_only_region_is_refused() {
    let platform = ChappePlatform::one_region().converged(&[]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.regions[0].draining = true);
    let out = reconcile_in(Scenario::Cluster(cluster), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(replicas(&deployment(r, "eval-fr-par-gateway")), Some(1));
    assert!(r.event_reasons().contains(&"DrainRefused".to_owned()));
    let status = written_status(r);
    assert_cond(&status, "Degraded", "True", "DrainRefused");
    assert_eq!(region(&status, "fr-par").drain, DrainState::Refused);
}

#[tokio::test]
async fn a_new_image_is_migrated_before_the_services_roll_out() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.image.tag = "0.2.0".into());

    // The Job for 0.2.0 starts; the services keep 0.1.0.
    let out = reconcile_in(Scenario::Cluster(cluster.clone()), platform.clone()).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    let jobs = r.applied("jobs");
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0].1["spec"]["template"]["spec"]["containers"][0]["image"],
        IMAGE_2
    );
    let job_position =
        r.0.iter()
            .position(|x| x.path.contains("/jobs/"))
            .expect("job");
    let first_deployment =
        r.0.iter()
            .position(|x| x.method == Method::PATCH && x.path.contains("/deployments/"))
            .expect("deployments");
    assert!(job_position < first_deployment, "the Job is applied first");
    let deployments = r.applied("deployments");
    assert_eq!(deployments.len(), 15);
    for (name, d) in &deployments {
        assert_eq!(image(d), IMAGE_1, "{name} keeps the migrated image");
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/version"],
            "0.1.0"
        );
    }
    assert!(r.event_reasons().contains(&"MigrationStarted".to_owned()));
    let status = written_status(r);
    assert_cond(&status, "Progressing", "True", "MigrationRunning");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_cond(&status, "Ready-fr-par", "True", "AllReplicasReady");
    assert_eq!(status.schema_version.as_deref(), Some("0.1.0"));
    assert_eq!(
        status.migration.as_ref().map(|m| m.image.as_str()),
        Some(IMAGE_2)
    );

    // The Job runs: nothing changes, no new event about it.
    let platform = platform.with_status(status);
    let running = cluster.clone().with_job(&platform, MigrationPhase::Running);
    let out = reconcile_in(Scenario::Cluster(running), platform.clone()).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert!(
        r.applied("jobs").is_empty(),
        "an existing Job is not re-applied"
    );
    assert_eq!(image(&deployment(r, "chappe-fr-lil-media")), IMAGE_1);
    assert!(!r.event_reasons().iter().any(|e| e.starts_with("Migration")));
    let status = written_status(r);
    assert_cond(&status, "Progressing", "True", "MigrationRunning");

    // The Job succeeded: the services move to 0.2.0.
    let platform = platform.with_status(status);
    let done = cluster.with_job(&platform, MigrationPhase::Succeeded);
    let out = reconcile_in(Scenario::Cluster(done), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    for (name, d) in r.applied("deployments") {
        assert_eq!(image(&d), IMAGE_2, "{name}");
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/version"],
            "0.2.0"
        );
    }
    assert_eq!(r.event_reasons()[0], "MigrationSucceeded");
    let status = written_status(r);
    assert_eq!(status.schema_version.as_deref(), Some("0.2.0"));
    assert_eq!(status.migrated_image.as_deref(), Some(IMAGE_2));
    assert_eq!(status.migration, None);
    assert_cond(&status, "Progressing", "True", "RollingOut");
}

#[tokio::test]
async fn a_failed_migration_keeps_the_old_image_and_degrades() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let platform = platform.changed(|s| s.image.tag = "0.2.0".into());
    let failed = cluster.with_job(&platform, MigrationPhase::Failed);
    let out = reconcile_in(Scenario::Cluster(failed), platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert_eq!(image(&deployment(r, "chappe-fr-par-gateway")), IMAGE_1);
    assert!(
        r.events()
            .iter()
            .any(|(t, reason, _)| t == "Warning" && reason == "MigrationFailed")
    );
    let status = written_status(r);
    assert_cond(&status, "Degraded", "True", "MigrationFailed");
    assert_cond(&status, "Available", "True", "RegionsReady");
    assert_eq!(status.schema_version.as_deref(), Some("0.1.0"));
}

#[tokio::test]
async fn deletion_runs_the_finalizer() {
    let platform = ChappePlatform::three_regions().converged(&[]).deleting();
    let out = reconcile_in(Scenario::Deleting, platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert!(
        r.applied("deployments").is_empty(),
        "nothing applied while deleting"
    );
    assert!(r.status().is_none());
    let deletes = r.matching(
        Method::DELETE,
        "/api/v1/namespaces/chappe/persistentvolumeclaims",
    );
    assert_eq!(deletes.len(), 1, "NATS volumes deleted");
    assert!(
        deletes[0]
            .query
            .contains("labelSelector=app.kubernetes.io%2Finstance%3Dchappe%2Capp.kubernetes.io%2Fcomponent%3Dnats"),
        "{}",
        deletes[0].line()
    );
    assert_eq!(r.event_reasons(), ["Deleted"]);
    let last = r.0.last().expect("requests");
    assert_eq!(last.method, Method::PATCH);
    assert_eq!(
        last.path,
        "/apis/chappe.gouv.fr/v1alpha1/namespaces/chappe/chappeplatforms/chappe"
    );
    assert_eq!(
        last.body.clone().expect("patch")[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"}),
        "the finalizer removes itself"
    );
}

#[tokio::test]
async fn an_invalid_spec_is_refused_with_its_reason() {
    let platform = ChappePlatform::three_regions()
        .converged(&[])
        .changed(|s| s.regions[1].gateway.workload.replicas = 0);
    let out = reconcile_in(Scenario::FreshCluster, platform).await;
    out.result.expect("reconcile");
    let r = &out.requests;
    assert!(r.applied("deployments").is_empty() && r.applied("configmaps").is_empty());
    assert_eq!(r.events().len(), 1);
    assert_eq!(
        (r.events()[0].0.as_str(), r.events()[0].1.as_str()),
        ("Warning", "InvalidSpec")
    );
    let status = written_status(r);
    assert_eq!(status.observed_generation, Some(2));
    assert_cond(&status, "Degraded", "True", "InvalidSpec");
    assert_cond(&status, "Ready", "False", "InvalidSpec");
    assert!(
        cond(&status, "Degraded")
            .message
            .contains("gateway replicas must be at least 1 unless the region is draining (region fr-mrs has 0)"),
        "{}",
        cond(&status, "Degraded").message
    );
}

#[tokio::test]
async fn objects_no_longer_desired_are_deleted() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let mut cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    let mut stale = cluster.deployments[0].clone();
    stale.metadata.name = Some("chappe-fr-nce-gateway".into());
    cluster.deployments.push(stale);
    let out = reconcile_in(
        Scenario::Cluster(cluster.without_service_monitors()),
        platform,
    )
    .await;
    out.result.expect("reconcile");
    let r = &out.requests;
    let deletes = r.matching(Method::DELETE, "/deployments/");
    assert_eq!(deletes.len(), 1);
    assert!(deletes[0].path.ends_with("/chappe-fr-nce-gateway"));
    assert!(
        r.applied("servicemonitors").is_empty(),
        "no ServiceMonitor API, none applied"
    );
    assert!(r.matching(Method::GET, "servicemonitors").is_empty());
}

#[tokio::test]
async fn errors_are_counted_under_their_label() {
    let platform = ChappePlatform::three_regions().converged(&[]);
    let mut cluster = Cluster::running(&platform, IMAGE_1, &all_regions(&platform));
    cluster.fail_applies = Some(500);
    let out = reconcile_in(Scenario::Cluster(cluster), platform.clone()).await;
    let error = out.result.expect_err("the apiserver failed");
    assert_eq!(error.metric_label(), "api_internalerror");
    assert!(
        crate::metrics::encode(&Arc::new(out.registry))
            .contains("chappe_operator_reconciliations_total 1")
    );

    let (ctx, _server, registry) = Context::test();
    error_policy(Arc::new(platform), &error, ctx);
    let text = crate::metrics::encode(&Arc::new(registry));
    assert!(
        text.contains(r#"chappe_operator_reconcile_errors_total{error="api_internalerror"} 1"#),
        "{text}"
    );
}
