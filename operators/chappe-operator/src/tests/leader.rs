//! Leader election against a mocked apiserver holding one Lease.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use crate::leader::LeaderElection;

/// Runs one `try_acquire` against a Lease in `existing` state; returns
/// its answer and the requests as `(method, body)`.
async fn attempt(existing: Option<Value>) -> (bool, Vec<(Method, Option<Value>)>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().clone();
            let bytes = request.into_body().collect_bytes().await.expect("body");
            let body: Option<Value> = serde_json::from_slice(&bytes).ok();
            let (code, reply) = match (&method, &existing) {
                (&Method::GET, Some(lease)) => (StatusCode::OK, lease.clone()),
                (&Method::GET, None) => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                _ => (StatusCode::OK, body.clone().unwrap_or_default()),
            };
            seen.push((method, body));
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                    .expect("response"),
            );
        }
        seen
    });
    let election = LeaderElection::new(
        Client::new(service, "default"),
        "chappe-system",
        "chappe-operator",
        "me",
        Duration::from_secs(15),
    );
    let held = election.try_acquire().await.expect("try_acquire");
    drop(election);
    (held, server.await.expect("server"))
}

fn lease(holder: &str, renewed: Timestamp, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "chappe-operator", "namespace": "chappe-system", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
                 "leaseTransitions": transitions}
    })
}

#[tokio::test]
async fn an_absent_lease_is_created() {
    let (held, requests) = attempt(None).await;
    assert!(held);
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].0, Method::POST);
    let body = requests[1].1.as_ref().expect("lease");
    assert_eq!(body["spec"]["holderIdentity"], "me");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn a_lease_held_by_another_replica_is_left_alone() {
    let (held, requests) = attempt(Some(lease("other", Timestamp::now(), 0))).await;
    assert!(!held);
    assert_eq!(requests.len(), 1, "only read");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over() {
    let stale = Timestamp::now() - SignedDuration::from_secs(60);
    let (held, requests) = attempt(Some(lease("other", stale, 2))).await;
    assert!(held);
    assert_eq!(requests[1].0, Method::PUT);
    let body = requests[1].1.as_ref().expect("lease");
    assert_eq!(body["spec"]["holderIdentity"], "me");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    assert_eq!(
        body["metadata"]["resourceVersion"], "7",
        "optimistic concurrency"
    );
}

#[tokio::test]
async fn the_holder_renews_its_lease() {
    let (held, requests) = attempt(Some(lease("me", Timestamp::now(), 1))).await;
    assert!(held);
    assert_eq!(requests[1].0, Method::PUT);
    assert_eq!(
        requests[1].1.as_ref().expect("lease")["spec"]["leaseTransitions"],
        1
    );
}
