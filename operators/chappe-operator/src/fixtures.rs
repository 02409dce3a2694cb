//! Test fixtures: platform builders, a fake cluster ([`Scenario`]) and a
//! mocked apiserver ([`ApiServerVerifier`]) that answers the reconciler's
//! requests from that cluster and records every request for assertions.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus, StatefulSet, StatefulSetStatus};
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::crd::{
    ChappePlatform, ChappePlatformStatus, DrainState, FINALIZER, MigrationPhase, Service,
};
use crate::manifests::{self, RenderOptions, Rollout, region_hash};
use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::status::{self, Observed};

/// The one-region example (embedded store).
pub const ONE_REGION: &str = include_str!("../examples/one-region.yaml");
/// The three-region example (ScyllaDB, managed NATS).
pub const THREE_REGIONS: &str = include_str!("../examples/three-regions.yaml");
/// Namespace of the example platforms.
pub const NS: &str = "chappe";

impl ChappePlatform {
    /// The three-region example as the apiserver would hand it over:
    /// uid, generation 1, finalizer already there.
    pub fn three_regions() -> Self {
        Self::from_example(THREE_REGIONS)
    }

    /// The one-region example, likewise.
    pub fn one_region() -> Self {
        Self::from_example(ONE_REGION)
    }

    fn from_example(yaml: &str) -> Self {
        let mut p: ChappePlatform = serde_yaml::from_str(yaml).expect("example parses");
        p.metadata.uid = Some("5f0c1d2e-0000-4000-8000-000000000001".into());
        p.metadata.generation = Some(1);
        p.metadata.finalizers = Some(vec![FINALIZER.into()]);
        p
    }

    /// Without the finalizer (a platform just created).
    pub fn unfinalized(mut self) -> Self {
        self.metadata.finalizers = None;
        self
    }

    /// Being deleted.
    pub fn deleting(mut self) -> Self {
        self.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        self
    }

    /// The spec changed: generation bumped, `change` applied to the spec.
    pub fn changed(mut self, change: impl FnOnce(&mut crate::ChappePlatformSpec)) -> Self {
        change(&mut self.spec);
        self.metadata.generation = Some(self.metadata.generation.unwrap_or(1) + 1);
        self
    }

    /// With `status`.
    pub fn with_status(mut self, status: ChappePlatformStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The status a converged platform has: every region ready at the
    /// spec's image, migrated, objects applied (their hashes recorded), and
    /// the regions in `drained` drained.
    pub fn converged(self, drained: &[&str]) -> Self {
        let image = self.spec.image.reference();
        let mut old = ChappePlatformStatus {
            migrated_image: Some(image.clone()),
            schema_version: Some(self.spec.image.tag.clone()),
            ..ChappePlatformStatus::default()
        };
        old.regions = self
            .spec
            .regions
            .iter()
            .map(|r| crate::crd::RegionStatus {
                name: r.name.clone(),
                drain: if drained.contains(&r.name.as_str()) {
                    DrainState::Drained
                } else {
                    DrainState::Serving
                },
                ..Default::default()
            })
            .collect();
        let with_old = self.clone().with_status(old);
        let cluster = Cluster::running(&with_old, &image, &all_regions(&with_old));
        let now = Time(Timestamp::now());
        let mut evaluation = status::evaluate(&with_old, &cluster.observed(&with_old), &now);
        let desired = manifests::desired(
            &with_old,
            &RenderOptions {
                service_monitors: true,
                rollout: evaluation.rollout.clone(),
            },
        )
        .expect("desired");
        for r in &mut evaluation.status.regions {
            r.applied_hash = Some(region_hash(&desired, &r.name).expect("hash"));
        }
        self.with_status(evaluation.status)
    }
}

/// Every region name of a platform.
pub fn all_regions(p: &ChappePlatform) -> Vec<String> {
    p.spec.regions.iter().map(|r| r.name.clone()).collect()
}

/// What the fake cluster holds.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Deployments (with their status).
    pub deployments: Vec<Deployment>,
    /// NATS StatefulSets.
    pub statefulsets: Vec<StatefulSet>,
    /// Migration Jobs.
    pub jobs: Vec<Job>,
    /// The ServiceMonitor API is served.
    pub service_monitors: bool,
    /// Answer server-side applies with this error code.
    pub fail_applies: Option<u16>,
}

impl Cluster {
    /// Nothing yet, the Prometheus Operator installed.
    pub fn empty() -> Self {
        Self {
            service_monitors: true,
            ..Self::default()
        }
    }

    /// Workloads of `platform` (as the operator renders them with the
    /// platform's status) running `image`, all replicas ready in `ready`
    /// regions and none elsewhere.
    pub fn running(platform: &ChappePlatform, image: &str, ready: &[String]) -> Self {
        let old = platform.status.clone().unwrap_or_default();
        let rollout = Rollout {
            services_image: Some(image.to_owned()),
            migrate: false,
            drained: old
                .regions
                .iter()
                .filter(|r| r.drain == DrainState::Drained)
                .map(|r| r.name.clone())
                .collect(),
        };
        let mut cluster = Self::empty();
        let desired = manifests::desired(
            platform,
            &RenderOptions {
                service_monitors: false,
                rollout,
            },
        )
        .expect("desired");
        for m in desired {
            let is_ready = m.region.as_ref().is_some_and(|r| ready.contains(r));
            let mut value = serde_json::to_value(&m.object).expect("json");
            value["metadata"]["generation"] = json!(1);
            match m.kind() {
                "Deployment" => {
                    let mut d: Deployment = serde_json::from_value(value).expect("deployment");
                    let replicas = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.replicas)
                        .unwrap_or_else(|| hpa_min(platform, &d));
                    if let Some(spec) = d.spec.as_mut() {
                        spec.replicas = Some(replicas);
                    }
                    let n = if is_ready { replicas } else { 0 };
                    d.status = Some(DeploymentStatus {
                        observed_generation: Some(1),
                        replicas: Some(replicas),
                        ready_replicas: Some(n),
                        updated_replicas: Some(replicas),
                        available_replicas: Some(n),
                        ..DeploymentStatus::default()
                    });
                    cluster.deployments.push(d);
                }
                "StatefulSet" => {
                    let mut s: StatefulSet = serde_json::from_value(value).expect("statefulset");
                    let replicas = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    s.status = Some(StatefulSetStatus {
                        observed_generation: Some(1),
                        replicas,
                        ready_replicas: Some(if is_ready { replicas } else { 0 }),
                        ..StatefulSetStatus::default()
                    });
                    cluster.statefulsets.push(s);
                }
                _ => {}
            }
        }
        cluster
    }

    /// With the migration Job of `platform`'s spec image in `phase`.
    pub fn with_job(mut self, platform: &ChappePlatform, phase: MigrationPhase) -> Self {
        let name =
            manifests::migration::job_name(&platform.name_any(), &platform.spec.image.reference());
        let (type_, succeeded, failed) = match phase {
            MigrationPhase::Succeeded => (Some("Complete"), Some(1), None),
            MigrationPhase::Failed => (Some("Failed"), None, Some(5)),
            MigrationPhase::Running => (None, None, None),
        };
        let mut job = Job::default();
        job.metadata.name = Some(name);
        job.metadata.namespace = Some(NS.into());
        job.status = Some(JobStatus {
            active: (phase == MigrationPhase::Running).then_some(1),
            succeeded,
            failed,
            conditions: type_.map(|t| {
                vec![JobCondition {
                    type_: t.into(),
                    status: "True".into(),
                    ..JobCondition::default()
                }]
            }),
            ..JobStatus::default()
        });
        self.jobs.push(job);
        self
    }

    /// Without the ServiceMonitor API.
    pub fn without_service_monitors(mut self) -> Self {
        self.service_monitors = false;
        self
    }

    /// What the reconciler would observe.
    pub fn observed(&self, platform: &ChappePlatform) -> Observed {
        let job_name =
            manifests::migration::job_name(&platform.name_any(), &platform.spec.image.reference());
        Observed {
            deployments: self.deployments.clone(),
            statefulsets: self.statefulsets.clone(),
            job: self
                .jobs
                .iter()
                .find(|j| j.metadata.name.as_deref() == Some(job_name.as_str()))
                .cloned(),
        }
    }
}

fn hpa_min(platform: &ChappePlatform, d: &Deployment) -> i32 {
    platform
        .spec
        .regions
        .iter()
        .flat_map(|r| Service::ALL.map(|s| (r, s)))
        .find(|(r, s)| d.name_any() == format!("{}-{}-{s}", platform.name_any(), r.name))
        .and_then(|(r, s)| r.workload(s).autoscaling.as_ref().map(|a| a.min_replicas))
        .unwrap_or(1)
}

/// The cluster states the reconcile tests run against.
pub enum Scenario {
    /// Nothing exists: no workload, no migration Job.
    FreshCluster,
    /// A cluster in a given state.
    Cluster(Cluster),
    /// The platform is being deleted: only cleanup requests are expected.
    Deleting,
}

/// One request the fake apiserver received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query string.
    pub query: String,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl Recorded {
    /// `METHOD path?query`, for messages.
    pub fn line(&self) -> String {
        format!("{} {}?{}", self.method, self.path, self.query)
    }
}

/// Every request of a reconciliation, with helpers to find them.
#[derive(Debug)]
pub struct Requests(pub Vec<Recorded>);

impl Requests {
    /// Server-side applies (PATCH with fieldManager=chappe-operator) to
    /// objects of `plural`, by object name.
    pub fn applied(&self, plural: &str) -> Vec<(String, Value)> {
        self.0
            .iter()
            .filter(|r| {
                r.method == Method::PATCH
                    && r.query.contains("fieldManager=chappe-operator")
                    && !r.path.ends_with("/status")
            })
            .filter_map(|r| {
                let mut parts = r.path.rsplit('/');
                let name = parts.next()?;
                (parts.next()? == plural)
                    .then(|| (name.to_owned(), r.body.clone().unwrap_or_default()))
            })
            .collect()
    }

    /// The body applied to `plural/name`.
    pub fn applied_object(&self, plural: &str, name: &str) -> Option<Value> {
        self.applied(plural)
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// `(type, reason, note)` of every event published.
    pub fn events(&self) -> Vec<(String, String, String)> {
        self.0
            .iter()
            .filter(|r| r.path.starts_with("/apis/events.k8s.io/v1/"))
            .filter_map(|r| {
                let b = r.body.as_ref()?;
                Some((
                    b["type"].as_str()?.to_owned(),
                    b["reason"].as_str()?.to_owned(),
                    b["note"].as_str().unwrap_or_default().to_owned(),
                ))
            })
            .collect()
    }

    /// Reasons of the events published, in order.
    pub fn event_reasons(&self) -> Vec<String> {
        self.events().into_iter().map(|(_, r, _)| r).collect()
    }

    /// The status written with server-side apply, if any.
    pub fn status(&self) -> Option<ChappePlatformStatus> {
        let r = self
            .0
            .iter()
            .find(|r| r.method == Method::PATCH && r.path.ends_with("/status"))?;
        assert!(
            r.query.contains("fieldManager=chappe-operator") && r.query.contains("force=true"),
            "status is written with server-side apply: {}",
            r.line()
        );
        serde_json::from_value(r.body.as_ref()?["status"].clone()).ok()
    }

    /// Requests with this method whose path contains `fragment`.
    pub fn matching(&self, method: Method, fragment: &str) -> Vec<&Recorded> {
        self.0
            .iter()
            .filter(|r| r.method == method && r.path.contains(fragment))
            .collect()
    }
}

/// The mocked apiserver's end of the client.
pub struct ApiServerVerifier(Handle<Request<Body>, Response<Body>>);

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(value).expect("json")))
        .expect("response")
}

fn not_found(what: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

fn list(kind: &str, items: Vec<Value>) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}

impl ApiServerVerifier {
    /// Answers requests from `scenario` until the client is dropped, and
    /// returns what it received.
    pub fn run(self, scenario: Scenario, platform: ChappePlatform) -> JoinHandle<Requests> {
        let cluster = match scenario {
            Scenario::FreshCluster => Cluster::empty(),
            Scenario::Cluster(c) => c,
            Scenario::Deleting => Cluster::default(),
        };
        let mut handle = self.0;
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.expect("request body");
                let body: Option<Value> = serde_json::from_slice(&bytes).ok();
                let recorded = Recorded {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or_default().to_owned(),
                    body,
                };
                let response = answer(&cluster, &platform, &recorded);
                seen.push(recorded);
                send.send_response(response);
            }
            Requests(seen)
        })
    }
}

fn answer(cluster: &Cluster, platform: &ChappePlatform, r: &Recorded) -> Response<Body> {
    let path = r.path.as_str();
    let json = |v: Value| json_response(StatusCode::OK, &v);
    match r.method {
        Method::GET if path == "/apis/monitoring.coreos.com/v1" => {
            if cluster.service_monitors {
                json(
                    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "monitoring.coreos.com/v1",
                    "resources": [{"name": "servicemonitors", "singularName": "servicemonitor", "namespaced": true,
                                   "kind": "ServiceMonitor", "verbs": ["get", "list", "patch", "delete"]}]}),
                )
            } else {
                not_found("monitoring.coreos.com/v1")
            }
        }
        Method::GET if path.ends_with("/deployments") => list(
            "DeploymentList",
            cluster
                .deployments
                .iter()
                .map(|d| serde_json::to_value(d).expect("json"))
                .collect(),
        ),
        Method::GET if path.ends_with("/statefulsets") => list(
            "StatefulSetList",
            cluster
                .statefulsets
                .iter()
                .map(|s| serde_json::to_value(s).expect("json"))
                .collect(),
        ),
        Method::GET if path.contains("/jobs/") => {
            let name = path.rsplit('/').next().unwrap_or_default();
            match cluster
                .jobs
                .iter()
                .find(|j| j.metadata.name.as_deref() == Some(name))
            {
                Some(job) => json(serde_json::to_value(job).expect("json")),
                None => not_found(name),
            }
        }
        // Prune listings of every other kind: nothing stale.
        Method::GET => list("List", Vec::new()),
        Method::PATCH if path.ends_with("/status") => {
            let mut p = serde_json::to_value(platform).expect("json");
            if let Some(status) = r.body.as_ref().map(|b| b["status"].clone()) {
                p["status"] = status;
            }
            json(p)
        }
        Method::PATCH if r.query.contains("fieldManager=chappe-operator") => {
            if let Some(code) = cluster.fail_applies {
                return json_response(
                    StatusCode::from_u16(code).expect("code"),
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                            "message": "etcdserver: request timed out", "reason": "InternalError", "code": code}),
                );
            }
            json(r.body.clone().unwrap_or_default())
        }
        // The finalizer's JSON patches on the platform.
        Method::PATCH => {
            let mut p = serde_json::to_value(platform).expect("json");
            p["metadata"]["finalizers"] = json!([FINALIZER]);
            json(p)
        }
        Method::POST if path.starts_with("/apis/events.k8s.io/") => {
            json_response(StatusCode::CREATED, &r.body.clone().unwrap_or_default())
        }
        Method::DELETE if path.ends_with("/persistentvolumeclaims") => {
            list("PersistentVolumeClaimList", Vec::new())
        }
        Method::DELETE => {
            json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("unexpected {} {}", r.method, path), "reason": "MethodNotAllowed", "code": 405}),
        ),
    }
}

impl Context {
    /// A context whose client talks to a mocked apiserver, with metrics
    /// registered in a fresh registry.
    pub fn test() -> (Arc<Self>, ApiServerVerifier, Registry) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let mut registry = Registry::default();
        let metrics = Metrics::default().register(&mut registry);
        let reporter = Reporter {
            controller: "chappe-operator".into(),
            instance: Some("chappe-operator-test".into()),
        };
        (
            Arc::new(Context::new(client, reporter, metrics)),
            ApiServerVerifier(handle),
            registry,
        )
    }
}

/// The outcome of [`reconcile_in`].
pub struct Outcome {
    /// What `reconcile` returned.
    pub result: crate::Result<kube::runtime::controller::Action>,
    /// Every request it made, in order.
    pub requests: Requests,
    /// The registry its metrics were registered in.
    pub registry: Registry,
}

/// Runs one reconciliation of `platform` against `scenario`, returning
/// its result and every request it made.
pub async fn reconcile_in(scenario: Scenario, platform: ChappePlatform) -> Outcome {
    let (ctx, server, registry) = Context::test();
    let requests = server.run(scenario, platform.clone());
    let result = crate::reconcile::reconcile(Arc::new(platform), ctx.clone()).await;
    // The fake apiserver stops once every client handle is gone.
    drop(ctx);
    let requests = tokio::time::timeout(Duration::from_secs(10), requests)
        .await
        .expect("the fake apiserver stops once the client is dropped")
        .expect("fake apiserver task");
    Outcome {
        result,
        requests,
        registry,
    }
}
