//! `render` output checked by `kubernetes-validate --strict` (PyPI
//! package kubernetes-validate) against Kubernetes 1.30 and 1.33: every
//! document must be validated (no "couldn't find schema" warning) and
//! pass. ServiceMonitors are not in its schemas: they are rendered in a
//! test of their own, where only that kind may go unvalidated, and their
//! shape is checked here.

use std::io::Write;
use std::process::Command;

use serde_json::Value;

use crate::crd::ChappePlatform;
use crate::render::render;

const VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];

/// The kubernetes-validate command: the script on PATH, else the module.
fn kubernetes_validate() -> Command {
    let works = |cmd: &mut Command| {
        cmd.arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works(&mut Command::new("kubernetes-validate")) {
        return Command::new("kubernetes-validate");
    }
    let mut module = Command::new("python3");
    module.args(["-m", "kubernetes_validate"]);
    if works(&mut module) {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "kubernetes_validate"]);
        return cmd;
    }
    panic!(
        "kubernetes-validate is not installed: `pip install kubernetes-validate` \
         (python3 -m pip install kubernetes-validate) to validate the rendered manifests"
    );
}

/// Runs kubernetes-validate on `yaml` for `version`; returns the lines it
/// printed, after asserting it passed.
fn validate(yaml: &str, version: &str, what: &str) -> Vec<String> {
    let mut file = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    file.write_all(yaml.as_bytes()).expect("write");
    let output = kubernetes_validate()
        .args(["--strict", "--kubernetes-version", version])
        .arg(file.path())
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{what} does not validate for Kubernetes {version}:\n{text}"
    );
    text.lines().map(str::to_owned).collect()
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml::from_str(d).expect("document"))
        .collect()
}

fn check_all_validated(platform: &ChappePlatform, what: &str) {
    let yaml = render(platform, false).expect("render");
    let count = documents(&yaml).len();
    for version in VERSIONS {
        let lines = validate(&yaml, version, what);
        let unvalidated: Vec<_> = lines.iter().filter(|l| !l.starts_with("INFO")).collect();
        assert!(
            unvalidated.is_empty(),
            "{what}, {version}: {unvalidated:#?}"
        );
        let passed = lines
            .iter()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, count, "{what}, {version}: every document validated");
    }
}

#[test]
fn rendered_one_region_example_validates_strictly() {
    let platform = ChappePlatform::one_region();
    check_all_validated(&platform, "one-region.yaml");
    let kinds: Vec<String> = documents(&render(&platform, false).expect("render"))
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in [
        "ConfigMap",
        "PersistentVolumeClaim",
        "Service",
        "StatefulSet",
        "Job",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
}

#[test]
fn rendered_three_regions_example_validates_strictly() {
    let platform = ChappePlatform::three_regions();
    check_all_validated(&platform, "three-regions.yaml");
    let yaml = render(&platform, false).expect("render");
    let docs = documents(&yaml);
    assert_eq!(
        docs.iter().filter(|d| d["kind"] == "Deployment").count(),
        15
    );
    assert_eq!(
        docs.iter()
            .filter(|d| d["kind"] == "HorizontalPodAutoscaler")
            .count(),
        1
    );
}

#[test]
fn rendered_draining_region_has_no_gateways() {
    let mut platform = ChappePlatform::three_regions();
    platform.spec.regions[2].draining = true;
    let yaml = render(&platform, false).expect("render");
    let gateway = documents(&yaml)
        .into_iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "chappe-fr-lil-gateway")
        .expect("gateway");
    assert_eq!(gateway["spec"]["replicas"], 0);
}

#[test]
fn rendered_service_monitor_is_the_only_kind_left_unvalidated() {
    let platform = ChappePlatform::three_regions();
    let yaml = render(&platform, true).expect("render");
    for version in VERSIONS {
        let lines = validate(&yaml, version, "three-regions.yaml with ServiceMonitors");
        for line in lines.iter().filter(|l| !l.starts_with("INFO")) {
            assert!(
                line.contains("kind ServiceMonitor with api version monitoring.coreos.com/v1"),
                "{line}"
            );
        }
    }
    // kubernetes-validate has no schema for it: check what matters.
    let monitor = documents(&yaml)
        .into_iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["namespace"], "chappe");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["chappe.gouv.fr/scrape"],
        "true"
    );
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"][0],
        "chappe"
    );
}

#[test]
fn committed_crd_validates_strictly() {
    let crd = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/yaml/crd.yaml"))
        .expect("crd.yaml");
    for version in VERSIONS {
        let lines = validate(&crd, version, "yaml/crd.yaml");
        assert!(
            lines.iter().any(|l| l.contains(
                "passed for resource customresourcedefinition/chappeplatforms.chappe.gouv.fr"
            )),
            "{lines:?}"
        );
    }
}

#[test]
fn committed_rbac_validates_strictly() {
    let rbac = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/yaml/rbac.yaml"))
        .expect("rbac.yaml");
    for version in VERSIONS {
        let lines = validate(&rbac, version, "yaml/rbac.yaml");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains(" passed for resource "))
                .count(),
            2,
            "{lines:?}"
        );
    }
}

#[test]
fn render_refuses_an_invalid_platform() {
    let mut platform = ChappePlatform::three_regions();
    platform.spec.regions[0].gateway.workload.replicas = 0;
    let error = render(&platform, false).expect_err("refused").to_string();
    assert!(
        error.contains("gateway replicas must be at least 1 unless the region is draining"),
        "{error}"
    );
}
