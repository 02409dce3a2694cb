"""Alerts and dashboards: valid rules (promtool), alerts that fire when they
should (promtool's rule unit tests), runbook sections that exist, and only
metrics that a running platform really exports. Also runs the `helm test`
round-trip script against that platform."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import CHART, EXAMPLES, REPO, TEST_VALUES, load_values
from promql import grafana_query_names, metric_names

OPERATIONS = REPO / "docs" / "operations.md"

# Series the dashboards and alerts read that the Chappe services do not
# export, each with the reason it is there anyway.
NOT_FROM_CHAPPE = {
    "up": "written by Prometheus itself for every scrape target (1 scraped, 0 failed); "
    "ChappeRegionDegraded and the Targets panel count the services' pods with it",
}

ALERTS = {
    "ChappeErrorRate",
    "ChappeDeliveryLatencyBudgetBurn",
    "ChappeRegionDegraded",
    "ChappeJetStreamConsumerLag",
    "ChappeStoreUnavailable",
    "ChappeStoreLatencyHigh",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install prometheus)", pytrace=False)
    return path


def rule_groups(rendered, values_name: str) -> list[dict]:
    (rule,) = [d for d in rendered[values_name] if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule["spec"]["groups"]


RULE_VALUES = [p for p in EXAMPLES + TEST_VALUES if load_values(p).get("monitoring", {}).get("prometheusRule", {}).get("enabled")]


@pytest.mark.parametrize("values", RULE_VALUES, ids=[p.name for p in RULE_VALUES])
def test_promtool_check_rules(rendered, values, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(rendered, values.name)}))
    result = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_there_with_a_runbook(rendered):
    groups = rule_groups(rendered, "three-regions.yaml")
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == ALERTS
    headings = {slug(h) for h in re.findall(r"^#{2,4} (.+)$", OPERATIONS.read_text(), re.M)}
    for a in alerts:
        assert a["labels"]["severity"] in ("warning", "critical")
        url = a["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == "https://chappe.example.gouv.fr/docs/operations.md"
        assert anchor == a["alert"].lower(), url
        assert anchor in headings, f"docs/operations.md has no section for {a['alert']}"
        assert a["annotations"]["summary"] and a["annotations"]["description"]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# Rule unit tests: synthetic series in, alerts out. They use the region label
# the ServiceMonitor gives (chappe_gouv_fr_region) and the metric names of
# the services, so a renamed label or metric breaks them.
R = "chappe_gouv_fr_region"
UNIT_TESTS = [
    {
        "interval": "1m",
        "input_series": [
            {"series": f'chappe_gateway_requests_total{{namespace="chappe", {R}="fr-par", method="Connect/Send", code="OK"}}', "values": "0+600x30"},
            {"series": f'chappe_gateway_requests_total{{namespace="chappe", {R}="fr-par", method="Connect/Send", code="UNAVAILABLE"}}', "values": "0+120x30"},
            {"series": f'chappe_gateway_requests_total{{namespace="chappe", {R}="fr-mrs", method="Connect/Send", code="OK"}}', "values": "0+600x30"},
            {"series": f'chappe_gateway_requests_total{{namespace="chappe", {R}="fr-mrs", method="Connect/Send", code="INVALID_ARGUMENT"}}', "values": "0+300x30"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "20m",
                "alertname": "ChappeErrorRate",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "namespace": "chappe", R: "fr-par"}},
                    {"exp_labels": {"severity": "warning", "namespace": "chappe", R: "fr-par"}},
                ],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f'up{{namespace="chappe", {R}="fr-par", app_kubernetes_io_component="fanout", pod="a"}}', "values": "0x20"},
            {"series": f'up{{namespace="chappe", {R}="fr-par", app_kubernetes_io_component="fanout", pod="b"}}', "values": "0x20"},
            {"series": f'up{{namespace="chappe", {R}="fr-par", app_kubernetes_io_component="gateway", pod="c"}}', "values": "1x20"},
            {"series": f'up{{namespace="chappe", {R}="fr-mrs", app_kubernetes_io_component="fanout", pod="d"}}', "values": "1x20"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "15m",
                "alertname": "ChappeRegionDegraded",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "namespace": "chappe", R: "fr-par", "app_kubernetes_io_component": "fanout"}},
                    {"exp_labels": {"severity": "warning", "namespace": "chappe", R: "fr-par", "app_kubernetes_io_component": "fanout"}},
                ],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f'chappe_fanout_delivery_queue_depth{{namespace="chappe", {R}="fr-lil", pod="f1"}}', "values": "5000x30"},
            {"series": f'chappe_fanout_delivery_jobs_total{{namespace="chappe", {R}="fr-lil", pod="f1", outcome="delivered"}}', "values": "100x30"},
            {"series": f'chappe_fanout_delivery_queue_depth{{namespace="chappe", {R}="fr-par", pod="f2"}}', "values": "10x30"},
            {"series": f'chappe_fanout_delivery_jobs_total{{namespace="chappe", {R}="fr-par", pod="f2", outcome="delivered"}}', "values": "0+60x30"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "ChappeJetStreamConsumerLag",
                "exp_alerts": [
                    {"exp_labels": {"severity": "warning", "namespace": "chappe", R: "fr-lil"}},
                    {"exp_labels": {"severity": "critical", "namespace": "chappe", R: "fr-lil"}},
                ],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f'chappe_bus_rpc_requests_total{{namespace="chappe", {R}="fr-mrs", service="fanout", route="chappe.rpc.fanout.submit", code="UNAVAILABLE"}}', "values": "0+100x20"},
            {"series": f'chappe_bus_rpc_requests_total{{namespace="chappe", {R}="fr-mrs", service="keydir", route="chappe.rpc.keydir.claim_keys", code="OK"}}', "values": "0+10x20"},
            {"series": f'chappe_bus_rpc_requests_total{{namespace="chappe", {R}="fr-par", service="fanout", route="chappe.rpc.fanout.submit", code="OK"}}', "values": "0+100x20"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "ChappeStoreUnavailable",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "namespace": "chappe", R: "fr-mrs"}}],
            }
        ],
    },
    {
        # 1000 sends a minute, 30% of them slower than 0.256 s: a fast burn.
        "interval": "1m",
        "input_series": [
            {"series": f'chappe_gateway_request_duration_seconds_bucket{{namespace="chappe", {R}="fr-par", method="Connect/Send", le="0.256"}}', "values": "0+700x90"},
            {"series": f'chappe_gateway_request_duration_seconds_count{{namespace="chappe", {R}="fr-par", method="Connect/Send"}}', "values": "0+1000x90"},
            {"series": f'chappe_gateway_request_duration_seconds_bucket{{namespace="chappe", {R}="fr-mrs", method="Connect/Send", le="0.256"}}', "values": "0+999x90"},
            {"series": f'chappe_gateway_request_duration_seconds_count{{namespace="chappe", {R}="fr-mrs", method="Connect/Send"}}', "values": "0+1000x90"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "80m",
                "alertname": "ChappeDeliveryLatencyBudgetBurn",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "namespace": "chappe", R: "fr-par"}},
                    {"exp_labels": {"severity": "warning", "namespace": "chappe", R: "fr-par"}},
                ],
            }
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": f'chappe_fanout_store_operation_duration_seconds_bucket{{namespace="chappe", {R}="fr-par", operation="insert_message", le="0.512"}}', "values": "0+10x30"},
            {"series": f'chappe_fanout_store_operation_duration_seconds_bucket{{namespace="chappe", {R}="fr-par", operation="insert_message", le="1.024"}}', "values": "0+100x30"},
            {"series": f'chappe_fanout_store_operation_duration_seconds_bucket{{namespace="chappe", {R}="fr-par", operation="insert_message", le="+Inf"}}', "values": "0+100x30"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "25m",
                "alertname": "ChappeStoreLatencyHigh",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "chappe", R: "fr-par", "service": "fanout"}}],
            }
        ],
    },
]


def test_alerts_fire_when_they_should(rendered, tmp_path):
    """`promtool test rules` on the rendered rules of the three-region example
    (annotations left out: promtool would compare their text too; `promtool
    check rules` checks their templates)."""
    groups = copy.deepcopy(rule_groups(rendered, "three-regions.yaml"))
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": UNIT_TESTS}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {t["alert_rule_test"][0]["alertname"] for t in UNIT_TESTS} == ALERTS


# -- Metric names ---------------------------------------------------------------


def test_promql_names():
    assert metric_names(
        'histogram_quantile(0.99, sum by (chappe_gouv_fr_region, le) (rate(chappe_x_seconds_bucket{namespace=~"$namespace", code!="OK"}[$__rate_interval])))'
    ) == {"chappe_x_seconds_bucket"}
    assert metric_names("a:b:rate5m / c_total > 0.05 unless on (x) d offset 1h") == {"a:b:rate5m", "c_total", "d"}
    assert metric_names('label_replace(up{a="b"} == 0, "s", "f", "", "") or vector(1e3)') == {"up"}
    assert grafana_query_names('label_values(m_total{namespace=~"$namespace", x="y"}, region)') == {"m_total"}
    assert grafana_query_names("label_values(namespace)") == set()


def queried_names(rendered) -> dict[str, set[str]]:
    """Metric name → where it is queried, over every dashboard and rule."""
    where: dict[str, set[str]] = {}
    recorded = set()
    for values in RULE_VALUES:
        for group in rule_groups(rendered, values.name):
            for rule in group["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                for name in metric_names(rule["expr"]):
                    where.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    for path in sorted((CHART / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        panels = list(board["panels"])
        while panels:
            panel = panels.pop()
            panels += panel.get("panels", [])
            for t in panel.get("targets", []):
                for name in metric_names(t["expr"]):
                    where.setdefault(name, set()).add(f"{path.name}: {panel['title']}")
        for var in board["templating"]["list"]:
            query = var.get("query")
            if isinstance(query, dict):
                query = query["query"]
            if var["type"] == "query":
                for name in grafana_query_names(query):
                    where.setdefault(name, set()).add(f"{path.name}: ${var['name']}")
    for name in recorded:
        where.pop(name, None)
    undefined = [n for n in where if ":" in n]
    assert not undefined, f"recording rules queried but never recorded: {undefined}"
    return where


def exported(scrape: str) -> tuple[set[str], dict[str, str]]:
    samples = {line.split("{")[0].split(" ")[0] for line in scrape.splitlines() if line and not line.startswith("#")}
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", scrape, re.M))
    return samples, types


def is_exported(name: str, samples: set[str], types: dict[str, str]) -> bool:
    if name in samples:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
            return True
    return False


def test_round_trip_script_of_helm_test(round_trip):
    """The `helm test` Pod's script: two devices exchange a message (here
    through a local `chappe up`; in the cluster through the gateways)."""
    assert round_trip.returncode == 0, round_trip.stdout + round_trip.stderr
    assert "bob received alice's message" in round_trip.stdout
    assert "round trip ok" in round_trip.stdout


def test_every_queried_metric_is_exported(rendered, platform, round_trip):
    assert round_trip.returncode == 0, "the round trip gives the histograms their samples"
    samples, types = exported(platform.scrape())
    where = queried_names(rendered)
    assert len(where) >= 10
    missing = {
        name: sorted(places)
        for name, places in where.items()
        if name not in NOT_FROM_CHAPPE and not is_exported(name, samples, types)
    }
    assert not missing, f"queried but not exported by chappe up: {json.dumps(missing, indent=2)}"
    assert set(NOT_FROM_CHAPPE) <= set(where), "an exception nobody needs: remove it"


def test_latency_objective_is_a_bucket(platform, round_trip):
    """The SLO threshold (le="0.256") is a bucket boundary the gateway exports."""
    assert round_trip.returncode == 0
    seconds = load_values(CHART / "values.yaml")["monitoring"]["prometheusRule"]["alerts"]["sendLatency"]["seconds"]
    pattern = rf'chappe_gateway_request_duration_seconds_bucket{{method="Connect/Send",le="{seconds:g}"}}'
    assert pattern in platform.scrape()
