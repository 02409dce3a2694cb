"""The chart renders, lints, refuses bad values clearly, and what it renders
is what Kubernetes and the operator accept."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

import helm_python as helm
from conftest import (
    CHART,
    EXAMPLES,
    INVALID,
    NAMESPACE,
    RELEASE,
    REPO,
    TEST_VALUES,
    expectations,
    load_values,
    render_docs,
    strip,
)

KUBE_VERSIONS = ["1.30.0", "1.33.0"]
CUSTOM_KINDS = {"ChappePlatform", "PrometheusRule", "ServiceMonitor"}
ALL_VALUES = EXAMPLES + TEST_VALUES
CRD_FILE = CHART / "crds" / "chappeplatforms.chappe.gouv.fr.yaml"
OPERATOR = REPO / "operators" / "chappe-operator"


def ids(paths):
    return [p.name for p in paths]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# -- Rendering, lint, schema ------------------------------------------------


def test_examples_exist():
    assert {p.name for p in EXAMPLES} == {"one-node.yaml", "three-regions.yaml"}
    assert len(INVALID) >= 10


@pytest.mark.parametrize("kube", ["v1.30.0", "v1.33.0"])
@pytest.mark.parametrize("values", ALL_VALUES, ids=ids(ALL_VALUES))
def test_lint_strict_is_clean(values, kube):
    report = helm.lint(CHART, load_values(values), strict=True, namespace=NAMESPACE, kube_version=kube)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values", ALL_VALUES, ids=ids(ALL_VALUES))
def test_renders(rendered, values):
    docs = rendered[values.name]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} <= kinds
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects share kind, namespace and name"


@pytest.mark.parametrize("path", INVALID, ids=ids(INVALID))
def test_invalid_values_are_refused_with_a_clear_message(chart, path):
    expected = expectations(path)
    assert expected, f"{path.name} has no '# expect: ...' line"
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as refused:
        render_docs(chart, load_values(path))
    message = str(refused.value)
    for text in expected:
        assert text in message, f"{path.name}: {text!r} not in:\n{message}"


def test_default_values_name_the_missing_image(chart):
    with pytest.raises(helm.HelmRenderError, match=r"image\.repository is required: the Chappe image"):
        render_docs(chart, {})


def test_schema_is_generated_from_the_crd():
    """values.schema.json is hack/schema.py's output (the platform part comes
    from the CRD): run `python3 charts/chappe/hack/schema.py` after changing either."""
    result = subprocess.run([sys.executable, str(CHART / "hack" / "schema.py"), "--check"])
    assert result.returncode == 0, "values.schema.json is stale: run python3 charts/chappe/hack/schema.py"


def test_platform_values_mirror_the_crd_spec():
    crd = yaml.safe_load(CRD_FILE.read_text())
    spec_fields = set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])
    schema = json.loads((CHART / "values.schema.json").read_text())
    platform = schema["properties"]["platform"]["properties"]
    assert spec_fields <= set(platform), spec_fields - set(platform)
    chart_only = set(platform) - spec_fields
    assert chart_only == {"enabled", "name", "namespace", "annotations", "createSessionKey"}


# -- Kubernetes validation ---------------------------------------------------


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("values", ALL_VALUES, ids=ids(ALL_VALUES))
def test_manifests_validate_strictly(rendered, values, kube):
    checked = 0
    for doc in rendered[values.name]:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(strip(doc), kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({doc['_template']}) for {kube}: {e.message} at {list(e.path)}")
        checked += 1
    assert checked >= 8


def test_crds_equal_crdgen_output():
    crds = sorted(p.name for p in (CHART / "crds").iterdir())
    assert crds == [CRD_FILE.name]
    assert CRD_FILE.read_bytes() == (OPERATOR / "yaml" / "crd.yaml").read_bytes(), (
        "charts/chappe/crds/ differs from operators/chappe-operator/yaml/crd.yaml: "
        f"cp operators/chappe-operator/yaml/crd.yaml {CRD_FILE.relative_to(REPO)}"
    )


def openapi_to_jsonschema(s: dict) -> dict:
    """The CRD's structural schema as JSON Schema, strict: unknown fields are
    refused (as `kubectl apply --validate=strict` does)."""
    out = {k: v for k, v in s.items() if k in ("type", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "required")}
    if s.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if s.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"] + ["null"]
    if "properties" in s:
        out["properties"] = {k: openapi_to_jsonschema(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s:
            out["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        out["additionalProperties"] = openapi_to_jsonschema(s["additionalProperties"])
    if "items" in s:
        out["items"] = openapi_to_jsonschema(s["items"])
    return out


def cel_errors(schema: dict, value, path: str = "") -> list[str]:
    """Messages of the CRD's x-kubernetes-validations rules that `value` breaks."""
    if value is None:
        return []
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            errors += cel_errors(sub, value.get(key), f"{path}.{key}")
        if isinstance(schema.get("additionalProperties"), dict):
            for key, sub in value.items():
                errors += cel_errors(schema["additionalProperties"], sub, f"{path}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def platform_errors(cr: dict) -> list[str]:
    """What the apiserver would refuse in a ChappePlatform: its schema and its CEL rules."""
    schema = crd_schema()
    body = {k: v for k, v in cr.items() if k not in ("apiVersion", "kind", "metadata")}
    validator = jsonschema.Draft7Validator(openapi_to_jsonschema(schema))
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(body)]
    if not errors:
        errors = cel_errors(schema, cr)
    return errors


@pytest.mark.parametrize("path", sorted((OPERATOR / "examples" / "invalid").glob("*.yaml")), ids=lambda p: p.name)
def test_platform_check_refuses_the_operators_invalid_examples(path):
    """The check below is real: it refuses what the operator's examples say the apiserver refuses."""
    expected = [l.split("# expect-schema: ", 1)[1] for l in path.read_text().splitlines() if l.startswith("# expect-schema: ")]
    errors = platform_errors(yaml.safe_load(path.read_text()))
    assert errors, f"{path.name} passed"
    for text in expected:
        if "has less than" in text:  # jsonschema words minItems otherwise than the apiserver
            text = "should be non-empty"
        assert any(text in e for e in errors), (text, errors)


@pytest.mark.parametrize("values", ALL_VALUES, ids=ids(ALL_VALUES))
def test_platform_matches_the_crd(rendered, values):
    platforms = by_kind(rendered[values.name], "ChappePlatform")
    if not load_values(values).get("platform", {}).get("enabled"):
        assert platforms == []
        return
    (cr,) = platforms
    assert cr["apiVersion"] == "chappe.gouv.fr/v1alpha1"
    assert platform_errors(strip(cr)) == []
    # Every object the operator will make is prefixed by the name: keep it short.
    assert len(cr["metadata"]["name"]) <= 24


def test_operator_examples_and_chart_examples_agree(rendered):
    """The chart's examples build the operator's examples' platforms."""
    for chart_example, operator_example in (("three-regions.yaml", "three-regions.yaml"), ("one-node.yaml", "one-region.yaml")):
        (cr,) = by_kind(rendered[chart_example], "ChappePlatform")
        expected = yaml.safe_load((OPERATOR / "examples" / operator_example).read_text())["spec"]
        got = copy.deepcopy(cr["spec"])
        for spec in (got, expected):
            spec["image"].setdefault("pullPolicy", "IfNotPresent")
            spec.setdefault("auth", {}).setdefault("sessionKeyKey", "session.key")
            spec["auth"].setdefault("devLogin", False)
            spec.setdefault("telemetry", {})
        assert got == expected


# -- What the chart renders ---------------------------------------------------

LABELS = [
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "helm.sh/chart",
]


@pytest.mark.parametrize("values", ALL_VALUES, ids=ids(ALL_VALUES))
def test_full_label_set(rendered, values):
    for doc in rendered[values.name]:
        labels = doc["metadata"].get("labels", {})
        missing = [l for l in LABELS if l not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        template = doc.get("spec", {}).get("template")
        if template:
            pod_labels = template["metadata"]["labels"]
            assert all(l in pod_labels for l in LABELS)
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= pod_labels.items()
            assert "app.kubernetes.io/version" not in selector, "a selector must not change with the version"


def test_rbac_is_the_operators(rendered):
    """Least privilege: exactly the rules of operators/chappe-operator/yaml/rbac.yaml."""
    reference = {d["kind"]: d["rules"] for d in yaml.safe_load_all((OPERATOR / "yaml" / "rbac.yaml").read_text()) if d}
    docs = rendered["three-regions.yaml"]
    (cluster_role,) = by_kind(docs, "ClusterRole")
    (role,) = by_kind(docs, "Role")
    assert cluster_role["rules"] == reference["ClusterRole"]
    assert role["rules"] == reference["Role"]
    assert role["metadata"]["namespace"] == NAMESPACE
    (sa,) = by_kind(docs, "ServiceAccount")
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    (crb,) = by_kind(docs, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cluster_role["metadata"]["name"]
    (rb,) = by_kind(docs, "RoleBinding")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}


def operator_deployment(docs):
    (dep,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    return dep


def test_operator_deployment(rendered):
    docs = rendered["three-regions.yaml"]
    dep = operator_deployment(docs)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.gouv.fr/chappe/chappe:0.1.0"
    assert c["command"] == ["chappe-operator"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    (cm,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == c["envFrom"][0]["configMapRef"]["name"]]
    assert cm["data"]["CHAPPE_OPERATOR_METRICS_LISTEN"] == "0.0.0.0:8080"
    assert cm["data"]["CHAPPE_OPERATOR_LEASE"] == "chappe-operator"
    assert int(cm["data"]["CHAPPE_OPERATOR_LEASE_SECONDS"]) >= 3
    assert len(dep["spec"]["template"]["metadata"]["annotations"]["checksum/config"]) == 64
    (svc,) = [d for d in by_kind(docs, "Service")]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_operator_flags_exist():
    """The settings the chart passes are flags `chappe-operator` reads."""
    main = (OPERATOR / "src" / "main.rs").read_text()
    for env in ("CHAPPE_OPERATOR_METRICS_LISTEN", "CHAPPE_OPERATOR_LEASE", "CHAPPE_OPERATOR_LEASE_SECONDS", "CHAPPE_LOG_FORMAT", "POD_NAMESPACE", "POD_NAME"):
        assert f'env = "{env}"' in main, env


def test_config_change_rolls_the_operator(chart):
    values = load_values(CHART / "examples" / "one-node.yaml")
    before = operator_deployment(render_docs(chart, values))
    values["operator"]["leaderElection"] = {"leaseName": "chappe-operator", "leaseSeconds": 30}
    after = operator_deployment(render_docs(chart, values))
    key = "checksum/config"
    assert before["spec"]["template"]["metadata"]["annotations"][key] != after["spec"]["template"]["metadata"]["annotations"][key]


def test_pdb_on_by_default(chart, rendered):
    (pdb,) = by_kind(rendered["three-regions.yaml"], "PodDisruptionBudget")
    dep = operator_deployment(rendered["three-regions.yaml"])
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] == 1
    defaults = render_docs(chart, load_values(CHART / "tests" / "values" / "operator-only.yaml"))
    assert len(by_kind(defaults, "PodDisruptionBudget")) == 1


def test_session_key_secret(rendered):
    (secret,) = by_kind(rendered["one-node.yaml"], "Secret")
    import base64

    assert len(base64.b64decode(secret["data"]["session.key"])) == 32
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert by_kind(rendered["three-regions.yaml"], "Secret") == []


def hooks(docs):
    return {d["metadata"]["name"]: d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"}


def test_helm_test_hooks(rendered):
    one = hooks(rendered["one-node.yaml"])
    assert set(one) == {"chappe-operator-test-gateways", "chappe-operator-test-round-trip"}
    pod = one["chappe-operator-test-round-trip"]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_A"] == env["GATEWAY_B"] == "http://eval-fr-par-gateway.chappe-system.svc:7443"
    # Without development logins only the reachability test runs.
    assert set(hooks(rendered["three-regions.yaml"])) == {"chappe-operator-test-gateways"}
    script = hooks(rendered["three-regions.yaml"])["chappe-operator-test-gateways"]["spec"]["containers"][0]["command"][2]
    for region in ("fr-par", "fr-mrs", "fr-lil"):
        assert f"chappe-{region}-gateway.chappe.svc" in script
    # A draining region's gateways are at zero: the tests use the serving one.
    drain = hooks(rendered["draining-external-nats.yaml"])
    env = {e["name"]: e["value"] for e in drain["chappe-ops-test-round-trip"]["spec"]["containers"][0]["env"]}
    assert env["GATEWAY_A"] == env["GATEWAY_B"] == "http://staging-fr-par-gateway.chappe-staging.svc:7443"
    assert "fr-mrs" not in drain["chappe-ops-test-gateways"]["spec"]["containers"][0]["command"][2]
    assert hooks(rendered["operator-only.yaml"]) == {}


def test_notes(chart):
    out = chart.render(values=load_values(CHART / "examples" / "one-node.yaml"), name=RELEASE, namespace=NAMESPACE)
    notes = out["chappe/templates/NOTES.txt"]
    assert "kubectl -n chappe-system get chappeplatforms -w" in notes
    assert ".status.conditions" in notes
    assert "chappe login --user alice --device laptop" in notes
    assert "port-forward service/eval-fr-par-gateway 7443:7443" in notes


def test_dashboards_are_configmaps_for_the_sidecar(rendered):
    maps = [d for d in by_kind(rendered["three-regions.yaml"], "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    assert len(maps) == 2
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        (text,) = cm["data"].values()
        board = json.loads(text)
        assert {v["name"] for v in board["templating"]["list"]} >= {"datasource", "region"}
    renamed = [d for d in by_kind(rendered["draining-external-nats.yaml"], "ConfigMap") if "grafana_dashboard" in d["metadata"]["labels"]]
    for cm in renamed:
        (text,) = cm["data"].values()
        assert "chappe_gouv_fr_region" not in text and "region=~\\\"$region\\\"" in text


def test_dashboards_are_generated():
    sys.path.insert(0, str(CHART / "hack"))
    try:
        import dashboards
    finally:
        sys.path.pop(0)
    for name, text in dashboards.render().items():
        assert (CHART / "dashboards" / name).read_text() == text, f"{name} is stale: run python3 charts/chappe/hack/dashboards.py"


def test_operator_service_monitor(rendered):
    """Custom kind the Kubernetes schemas do not know: checked by hand."""
    docs = rendered["three-regions.yaml"]
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    (svc,) = by_kind(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert by_kind(rendered["one-node.yaml"], "ServiceMonitor") == []
