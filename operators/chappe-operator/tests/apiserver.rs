//! The operator against a real kube-apiserver and etcd, started by
//! `chappe-testkit` (one server for every test of this binary, each test in
//! its own namespace):
//!
//! - the committed CRD (`yaml/crd.yaml`) applies and is Established;
//! - the examples are admitted, and the apiserver refuses each file of
//!   `examples/invalid/` (422) with the message of its `# expect-schema:`
//!   lines: the OpenAPI bounds and CEL rules work on a real apiserver;
//! - the reconciler, run in-process as `main.rs` runs it, takes the
//!   three-region example from its migration Job to Ready, drains a region
//!   and runs its finalizer.
//!
//! Only the API server runs: no controller-manager, no scheduler, no
//! kubelet. The test plays the missing controllers: it marks the migration
//! Job succeeded and the workloads ready by patching their `/status`. No
//! garbage collector runs either, so nothing deletes what owner references
//! point at.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use chappe_operator::crd::{ChappePlatform, DrainState, FINALIZER, MigrationPhase, ReplicaCount};
use chappe_operator::manifests::migration::job_name;
use chappe_operator::manifests::{self, NODE_REGION, RenderOptions, Rollout};
use chappe_operator::metrics::Metrics;
use chappe_operator::{ChappePlatformStatus, reconcile, status};
use chappe_testkit::kube::KubeApiServer;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::Reporter;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{OnceCell, watch};

const DIR: &str = env!("CARGO_MANIFEST_DIR");
const CRD_NAME: &str = "chappeplatforms.chappe.gouv.fr";
/// How long the apiserver and the reconciler get to reach each state.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The field manager of what the test applies (the CRD).
const TEST_MANAGER: &str = "chappe-operator-test";

/// A client of the shared apiserver, on which the committed CRD is
/// Established and served.
async fn client() -> Client {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info,kube=warn")
        .try_init();
    let server = tokio::task::spawn_blocking(KubeApiServer::shared)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let kubeconfig = Kubeconfig::from_yaml(&server.kubeconfig()).expect("the harness's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a client configuration");
    let client = Client::try_from(config).expect("a client");
    static CRD: OnceCell<()> = OnceCell::const_new();
    CRD.get_or_init(|| install_crd(client.clone())).await;
    client
}

/// Applies `yaml/crd.yaml` (server-side apply), waits until it is
/// Established and its endpoint answers.
async fn install_crd(client: Client) {
    let text = std::fs::read_to_string(format!("{DIR}/yaml/crd.yaml")).expect("yaml/crd.yaml");
    let crd: Value = serde_yaml::from_str(&text).expect("yaml/crd.yaml is YAML");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    if let Err(e) = crds
        .patch(
            CRD_NAME,
            &PatchParams::apply(TEST_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
    {
        panic!("the apiserver refused yaml/crd.yaml: {e}");
    }
    eventually("the CRD to be Established", || async {
        let crd = crds.get(CRD_NAME).await.map_err(|e| e.to_string())?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        match conditions.iter().find(|c| c.type_ == "Established") {
            Some(c) if c.status == "True" => Ok(()),
            other => Err(format!("Established: {other:?}; conditions {conditions:?}")),
        }
    })
    .await;
    let platforms: Api<ChappePlatform> = Api::all(client.clone());
    eventually("the ChappePlatform endpoint to answer", || async {
        platforms
            .list(&ListParams::default().limit(1))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
}

/// Polls `check` until it returns `Ok`, for at most [`TIMEOUT`]; panics
/// with its last error.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(e) if Instant::now() > deadline => {
                panic!("waited {TIMEOUT:?} for {what}; last: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Creates namespace `name`.
async fn namespace(client: &Client, name: &str) -> String {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name.to_owned()
}

/// An example file as it is, moved to namespace `ns`.
fn example(path: &str, ns: &str) -> (String, DynamicObject) {
    let text = std::fs::read_to_string(format!("{DIR}/examples/{path}"))
        .unwrap_or_else(|e| panic!("examples/{path}: {e}"));
    let mut value: Value =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("examples/{path}: {e}"));
    value["metadata"]["namespace"] = json!(ns);
    let object = serde_json::from_value(value).unwrap_or_else(|e| panic!("examples/{path}: {e}"));
    (text, object)
}

fn platform_resource() -> ApiResource {
    ApiResource::erase::<ChappePlatform>(&())
}

#[tokio::test]
async fn the_committed_crd_is_established_and_served() {
    let client = client().await;
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(CRD_NAME)
        .await
        .expect("the CRD");
    let status = crd.status.clone().expect("the CRD's status");
    for type_ in ["NamesAccepted", "Established"] {
        let condition = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_);
        assert!(
            condition.is_some_and(|c| c.status == "True"),
            "{type_}: {condition:?}"
        );
    }
    assert_eq!(
        status
            .accepted_names
            .as_ref()
            .and_then(|n| n.short_names.clone()),
        Some(vec!["cp".to_owned()])
    );
    assert_eq!(status.stored_versions, Some(vec!["v1alpha1".to_owned()]));

    // Served with its status subresource, as the reconciler needs.
    let resources = client
        .list_api_group_resources("chappe.gouv.fr/v1alpha1")
        .await
        .expect("discovery of chappe.gouv.fr/v1alpha1");
    let names: Vec<&str> = resources
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(names.contains(&"chappeplatforms"), "{names:?}");
    assert!(names.contains(&"chappeplatforms/status"), "{names:?}");

    // Every CEL rule of the committed file is kept by the apiserver.
    fn rules(v: &Value) -> usize {
        match v {
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| {
                    if k == "x-kubernetes-validations" {
                        v.as_array().map_or(0, Vec::len)
                    } else {
                        rules(v)
                    }
                })
                .sum(),
            Value::Array(items) => items.iter().map(rules).sum(),
            _ => 0,
        }
    }
    let committed: Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{DIR}/yaml/crd.yaml")).expect("yaml/crd.yaml"),
    )
    .expect("YAML");
    let served = serde_json::to_value(&crd.spec).expect("JSON");
    assert!(rules(&committed["spec"]) >= 12);
    assert_eq!(rules(&served), rules(&committed["spec"]));
}

#[tokio::test]
async fn examples_are_admitted_and_invalid_ones_refused_with_their_messages() {
    let client = client().await;
    let ns = namespace(&client, "examples").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &platform_resource());

    for path in ["one-region.yaml", "three-regions.yaml"] {
        let (_, object) = example(path, &ns);
        if let Err(e) = api.create(&PostParams::default(), &object).await {
            panic!("the apiserver refused examples/{path}: {e}");
        }
    }

    let mut files: Vec<_> = std::fs::read_dir(format!("{DIR}/examples/invalid"))
        .expect("examples/invalid")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for file in files {
        let path = format!("invalid/{file}");
        let (text, object) = example(&path, &ns);
        let expected: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect-schema: "))
            .collect();
        assert!(!expected.is_empty(), "{path}: no `# expect-schema:` line");
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("the apiserver admitted examples/{path}"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "examples/{path}: {status:?}");
                assert_eq!(status.reason, "Invalid", "examples/{path}: {status:?}");
                for message in expected {
                    let message = apiserver_wording(message);
                    assert!(
                        status.message.contains(&message),
                        "examples/{path}: the apiserver said {:?}, expected {message:?}",
                        status.message
                    );
                }
            }
            Err(e) => panic!("examples/{path}: {e}"),
        }
    }
}

/// The apiserver's wording of an `# expect-schema:` message. The CEL
/// rules' messages are their own, the same offline (`src/tests/crd.rs`
/// checks the files with the `jsonschema` crate) and in the apiserver; an
/// OpenAPI bound is worded by each validator its own way:
/// `spec.regions: [] has less than 1 item` offline is `spec.regions in
/// body should have at least 1 items` in the apiserver.
fn apiserver_wording(expected: &str) -> String {
    if let Some((path, rest)) = expected.split_once(": ")
        && let Some((_, n)) = rest.split_once(" has less than ")
        && let Some(n) = n.strip_suffix(" items").or_else(|| n.strip_suffix(" item"))
    {
        return format!("{path} in body should have at least {n} items");
    }
    expected.to_owned()
}

/// The condition `type_` of a status, or why not.
fn condition<'a>(
    status: &'a ChappePlatformStatus,
    type_: &str,
) -> Result<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition, String> {
    status::find(status, type_).ok_or_else(|| format!("no {type_} condition in {status:#?}"))
}

/// That condition `type_` has `status` and `reason` and describes
/// `generation`.
fn expect_condition(
    status: &ChappePlatformStatus,
    type_: &str,
    expected: &str,
    reason: &str,
    generation: Option<i64>,
) -> Result<(), String> {
    let c = condition(status, type_)?;
    if c.status == expected && c.reason == reason && c.observed_generation == generation {
        Ok(())
    } else {
        Err(format!(
            "{type_} is {} ({}, generation {:?}: {}), expected {expected} ({reason}, generation {generation:?})",
            c.status, c.reason, c.observed_generation, c.message
        ))
    }
}

/// The platform and its status, once it has one.
async fn platform_status(
    platforms: &Api<ChappePlatform>,
    name: &str,
) -> Result<(ChappePlatform, ChappePlatformStatus), String> {
    let platform = platforms.get(name).await.map_err(|e| e.to_string())?;
    let status = platform.status.clone().ok_or("no status yet")?;
    if status.observed_generation != platform.metadata.generation {
        return Err(format!(
            "status of generation {:?}, spec of {:?}",
            status.observed_generation, platform.metadata.generation
        ));
    }
    Ok((platform, status))
}

fn now() -> Value {
    serde_json::to_value(Time(Timestamp::now())).expect("a time")
}

/// Plays the Job controller: the Job ran one pod, which succeeded.
async fn mark_job_succeeded(jobs: &Api<Job>, name: &str) {
    let now = now();
    let finished = |type_: &str| {
        json!({
            "type": type_,
            "status": "True",
            "reason": "CompletionsReached",
            "message": "Reached expected number of succeeded pods",
            "lastProbeTime": now,
            "lastTransitionTime": now,
        })
    };
    let patch = json!({"status": {
        "startTime": now,
        "completionTime": now,
        "succeeded": 1,
        "conditions": [finished("SuccessCriteriaMet"), finished("Complete")],
    }});
    if let Err(e) = jobs
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        panic!("marking Job {name} succeeded: {e}");
    }
}

/// Plays the Deployment and StatefulSet controllers: every pod of every
/// workload of the namespace is up, ready and of the latest template.
async fn mark_workloads_ready(client: &Client, ns: &str) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in deployments
        .list(&ListParams::default())
        .await
        .expect("Deployments")
    {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let patch = json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }});
        deployments
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("marking Deployment {} ready: {e}", d.name_any()));
    }
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    for s in statefulsets
        .list(&ListParams::default())
        .await
        .expect("StatefulSets")
    {
        let replicas = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let patch = json!({"status": {
            "observedGeneration": s.metadata.generation,
            "replicas": replicas,
            "currentReplicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        }});
        statefulsets
            .patch_status(
                &s.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("marking StatefulSet {} ready: {e}", s.name_any()));
    }
}

/// The regions a Deployment's pods are pinned to (required node affinity
/// on `topology.kubernetes.io/region`).
fn pinned_regions(d: &Deployment) -> Vec<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flat_map(|s| &s.node_selector_terms)
        .flat_map(|t| t.match_expressions.iter().flatten())
        .filter(|e| e.key == NODE_REGION && e.operator == "In")
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn the_reconciler_migrates_rolls_out_drains_and_finalizes_three_regions() {
    let client = client().await;
    let ns = namespace(&client, "three-regions").await;

    // The controller as main.rs runs it (without the leader Lease), on this
    // test's namespace only.
    let (stop, stopped) = watch::channel(false);
    let controller = tokio::spawn({
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let reporter = Reporter {
                controller: "chappe-operator".into(),
                instance: Some("apiserver-test".into()),
            };
            let shutdown = async move {
                let mut stopped = stopped;
                let _ = stopped.wait_for(|s| *s).await;
            };
            reconcile::run_namespaced(client, &ns, reporter, Metrics::default(), shutdown).await;
        }
    });

    let (_, object) = example("three-regions.yaml", &ns);
    let platform: ChappePlatform =
        serde_json::from_value(serde_json::to_value(&object).expect("JSON")).expect("a platform");
    let name = platform.name_any();
    let regions: Vec<String> = platform
        .spec
        .regions
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(regions, ["fr-par", "fr-mrs", "fr-lil"]);
    let image = platform.spec.image.reference();
    let platforms: Api<ChappePlatform> = Api::namespaced(client.clone(), &ns);
    platforms
        .create(&PostParams::default(), &platform)
        .await
        .expect("the three-region platform is admitted");

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);

    // 1. The finalizer, then the migration Job, and no service Deployment
    //    while it runs.
    let job = job_name(&name, &image);
    let (platform, migration) = eventually("the finalizer and the migration Job", || async {
        let (platform, status) = platform_status(&platforms, &name).await?;
        if !platform.finalizers().iter().any(|f| f == FINALIZER) {
            return Err(format!("finalizers {:?}", platform.finalizers()));
        }
        let generation = platform.metadata.generation;
        expect_condition(
            &status,
            "Progressing",
            "True",
            "MigrationRunning",
            generation,
        )?;
        expect_condition(&status, "Ready", "False", "MigrationRunning", generation)?;
        let migration = status.migration.as_ref().ok_or("no status.migration")?;
        if migration.phase != MigrationPhase::Running || migration.job != job {
            return Err(format!("migration {migration:?}"));
        }
        let job = jobs
            .get_opt(&job)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no Job {job}"))?;
        Ok((platform, job))
    })
    .await;
    let uid = platform.uid().expect("a uid");
    let owned_by_platform = |meta: &ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.kind == "ChappePlatform" && o.controller == Some(true))
    };
    assert!(
        owned_by_platform(&migration.metadata),
        "{:?}",
        migration.metadata
    );
    let migrate_image = migration
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone());
    assert_eq!(migrate_image.as_deref(), Some(image.as_str()));
    let early = deployments
        .list(&ListParams::default())
        .await
        .expect("Deployments");
    assert!(
        early.items.is_empty(),
        "Deployments before the migration succeeded: {:?}",
        early
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect::<Vec<_>>()
    );

    // 2. The test plays the Job controller: the migration succeeded. The
    //    Deployments appear; the status says RollingOut until their pods
    //    are ready.
    mark_job_succeeded(&jobs, &job).await;
    let (platform, status) = eventually("the services' Deployments", || async {
        let (platform, status) = platform_status(&platforms, &name).await?;
        if status.migrated_image.as_deref() != Some(image.as_str()) {
            return Err(format!("migratedImage {:?}", status.migrated_image));
        }
        let generation = platform.metadata.generation;
        expect_condition(&status, "Progressing", "True", "RollingOut", generation)?;
        let count = deployments
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if count != 15 {
            return Err(format!("{count} Deployments"));
        }
        Ok((platform, status))
    })
    .await;
    let generation = platform.metadata.generation;
    assert_eq!(status.schema_version.as_deref(), Some("0.1.0"));
    assert_eq!(status.migration, None);
    expect_condition(&status, "Ready", "False", "RollingOut", generation).unwrap();
    expect_condition(&status, "Available", "False", "NoRegionReady", generation).unwrap();
    expect_condition(&status, "Degraded", "False", "AsExpected", generation).unwrap();
    assert_eq!(status.ready_regions.as_deref(), Some("0/3"));
    for region in &regions {
        expect_condition(
            &status,
            &format!("Ready-{region}"),
            "False",
            "ReplicasNotReady",
            generation,
        )
        .unwrap();
    }
    let par = &status.regions[0];
    assert_eq!(par.name, "fr-par");
    assert!(!par.ready);
    assert_eq!(
        par.replicas["gateway"],
        ReplicaCount {
            ready: 0,
            desired: 3
        }
    );
    assert_eq!(
        par.replicas["nats"],
        ReplicaCount {
            ready: 0,
            desired: 3
        }
    );
    assert_eq!(
        par.replicas["media"],
        ReplicaCount {
            ready: 0,
            desired: 2
        }
    );
    let lil = &status.regions[2];
    assert_eq!(
        lil.replicas["gateway"],
        ReplicaCount {
            ready: 0,
            desired: 2
        }
    );
    assert!(status.regions.iter().all(|r| r.replicas.len() == 6
        && r.replicas.values().all(|c| c.ready == 0)
        && r.applied_hash.is_some()));

    // A Deployment per service and region, pinned to its region, of the
    // migrated image, owned by the platform.
    for region in &regions {
        for service in ["gateway", "fanout", "keydir", "presence", "media"] {
            let d = deployments
                .get(&format!("{name}-{region}-{service}"))
                .await
                .unwrap_or_else(|e| panic!("Deployment of {service} in {region}: {e}"));
            assert_eq!(
                pinned_regions(&d),
                std::slice::from_ref(region),
                "{}",
                d.name_any()
            );
            assert!(owned_by_platform(&d.metadata), "{}", d.name_any());
            let container_image = d
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|s| s.containers.first())
                .and_then(|c| c.image.clone());
            assert_eq!(container_image.as_deref(), Some(image.as_str()));
        }
    }
    // Every object the operator renders for the converged platform exists
    // and is owned by it: Services, PDBs, ConfigMaps, NetworkPolicies, the
    // NATS StatefulSets, the autoscaler.
    let desired = manifests::desired(
        &platform,
        &RenderOptions {
            service_monitors: false,
            rollout: Rollout::converged(&platform),
        },
    )
    .expect("the manifests");
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for m in &desired {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &m.resource);
        let found = api
            .get(m.name())
            .await
            .unwrap_or_else(|e| panic!("{} {}: {e}", m.kind(), m.name()));
        assert!(
            owned_by_platform(&found.metadata),
            "{} {} is not owned by the platform: {:?}",
            m.kind(),
            m.name(),
            found.metadata.owner_references
        );
        *kinds.entry(m.kind().to_owned()).or_default() += 1;
    }
    for kind in [
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "NetworkPolicy",
        "StatefulSet",
        "HorizontalPodAutoscaler",
    ] {
        assert!(
            kinds.get(kind).is_some_and(|n| *n > 0),
            "no {kind}: {kinds:?}"
        );
    }
    assert_eq!(kinds["Deployment"], 15, "{kinds:?}");
    assert_eq!(kinds["StatefulSet"], 3, "{kinds:?}");

    // 3. The test plays the Deployment and StatefulSet controllers: every
    //    pod is ready. The platform becomes Ready and Available.
    mark_workloads_ready(&client, &ns).await;
    let (platform, status) = eventually("the platform to be Ready", || async {
        let (platform, status) = platform_status(&platforms, &name).await?;
        let generation = platform.metadata.generation;
        expect_condition(&status, "Ready", "True", "Ready", generation)?;
        Ok((platform, status))
    })
    .await;
    let generation = platform.metadata.generation;
    expect_condition(&status, "Available", "True", "RegionsReady", generation).unwrap();
    expect_condition(&status, "Progressing", "False", "Converged", generation).unwrap();
    expect_condition(&status, "Degraded", "False", "AsExpected", generation).unwrap();
    for region in &regions {
        expect_condition(
            &status,
            &format!("Ready-{region}"),
            "True",
            "AllReplicasReady",
            generation,
        )
        .unwrap();
    }
    assert_eq!(status.ready_regions.as_deref(), Some("3/3"));
    for region in &status.regions {
        assert!(region.ready, "{region:?}");
        assert_eq!(region.drain, DrainState::Serving);
        assert!(
            region
                .replicas
                .values()
                .all(|c| c.ready == c.desired && c.desired > 0),
            "{region:?}"
        );
    }

    // 4. Drain fr-lil: its gateways scale to zero, the others stay Ready.
    let mut spec_regions = serde_json::to_value(&platform.spec.regions).expect("JSON");
    spec_regions[2]["draining"] = json!(true);
    platforms
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"regions": spec_regions}})),
        )
        .await
        .expect("draining fr-lil");
    let (platform, status) = eventually("fr-lil to be drained", || async {
        let (platform, status) = platform_status(&platforms, &name).await?;
        let generation = platform.metadata.generation;
        expect_condition(&status, "Ready-fr-lil", "False", "Drained", generation)?;
        let gateway = deployments
            .get(&format!("{name}-fr-lil-gateway"))
            .await
            .map_err(|e| e.to_string())?;
        match gateway.spec.as_ref().and_then(|s| s.replicas) {
            Some(0) => Ok((platform, status)),
            other => Err(format!("fr-lil gateway replicas {other:?}")),
        }
    })
    .await;
    let generation = platform.metadata.generation;
    assert!(generation > Some(1), "{generation:?}");
    for region in ["fr-par", "fr-mrs"] {
        expect_condition(
            &status,
            &format!("Ready-{region}"),
            "True",
            "AllReplicasReady",
            generation,
        )
        .unwrap();
        let gateway = deployments
            .get(&format!("{name}-{region}-gateway"))
            .await
            .expect("a gateway");
        assert_eq!(gateway.spec.and_then(|s| s.replicas), Some(3), "{region}");
    }
    expect_condition(&status, "Ready", "True", "Ready", generation).unwrap();
    expect_condition(&status, "Available", "True", "RegionsReady", generation).unwrap();
    assert_eq!(status.ready_regions.as_deref(), Some("2/3"));
    let lil = status
        .regions
        .iter()
        .find(|r| r.name == "fr-lil")
        .expect("fr-lil");
    assert_eq!(lil.drain, DrainState::Drained);
    assert!(!lil.ready);
    assert_eq!(lil.replicas["gateway"].desired, 0);

    // 5. Delete the platform: the finalizer deletes the NATS volumes (here
    //    one claim, made as the StatefulSet controller would make it) and
    //    lets the platform go.
    let nats = statefulsets
        .get(&format!("{name}-fr-par-nats"))
        .await
        .expect("the NATS StatefulSet of fr-par");
    let template = nats
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.as_ref())
        .and_then(|t| t.first())
        .cloned()
        .expect("a volume claim template");
    let claim_name = format!("{}-{}-0", template.name_any(), nats.name_any());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(claim_name.clone()),
            labels: template.metadata.labels.clone(),
            ..ObjectMeta::default()
        },
        spec: template.spec.clone(),
        ..PersistentVolumeClaim::default()
    };
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("a NATS volume claim");

    platforms
        .delete(&name, &DeleteParams::default())
        .await
        .expect("deleting the platform");
    eventually("the platform to be gone", || async {
        match platforms.get_opt(&name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(p) => Err(format!("still there, finalizers {:?}", p.finalizers())),
        }
    })
    .await;
    // No controller removes the claim's kubernetes.io/pvc-protection
    // finalizer: deleted means marked for deletion.
    let claim = claims.get_opt(&claim_name).await.expect("the claim");
    assert!(
        claim
            .as_ref()
            .is_none_or(|c| c.metadata.deletion_timestamp.is_some()),
        "the finalizer left the NATS claim: {claim:?}"
    );
    // No garbage collector runs here, so the owned objects remain: a real
    // cluster deletes them through their owner references. Not asserted.

    // What the platform went through, as events.
    let reasons: Vec<String> = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str()))
        .filter_map(|e| e.reason)
        .collect();
    for reason in [
        "MigrationStarted",
        "MigrationSucceeded",
        "Applied",
        "DrainStarted",
        "Deleted",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event: {reasons:?}"
        );
    }

    stop.send(true).expect("the controller listens");
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller stops")
        .expect("the controller did not panic");
}
