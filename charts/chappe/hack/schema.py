#!/usr/bin/env python3
"""Writes charts/chappe/values.schema.json.

    python3 charts/chappe/hack/schema.py

The `platform` part is made from the CRD (crds/chappeplatforms.chappe.gouv.fr.yaml,
itself crdgen's output): the same fields, types, bounds, enums and patterns,
with `additionalProperties: false` on every object whose fields are known, so
that a misspelt field is refused by `helm install` instead of being pruned by
the apiserver. The CRD's CEL rules that JSON Schema can express are added
here; the others are checked by templates/_validate.tpl with the CRD's
messages. The rest of the schema (image, operator, monitoring, tests) is
written below. charts/chappe/tests checks the committed file is this
script's output.
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
CRD = CHART / "crds" / "chappeplatforms.chappe.gouv.fr.yaml"

# Keywords copied as they are from the CRD's OpenAPI v3 schema.
COPIED = (
    "description",
    "type",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "required",
)


def number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def convert(s: dict) -> dict:
    """An OpenAPI v3 (structural) schema as a strict JSON Schema."""
    out: dict = {}
    for key in COPIED:
        if key in s:
            out[key] = copy.deepcopy(s[key])
    for key in ("minimum", "maximum"):
        if key in s:
            out[key] = number(s[key])
    if s.get("x-kubernetes-int-or-string"):
        # Quantities: 10Gi, 500m, or a plain number.
        out["type"] = ["string", "number"]
    if "properties" in s:
        out["properties"] = {k: convert(v) for k, v in s["properties"].items()}
        out["additionalProperties"] = False
    if "additionalProperties" in s:
        ap = s["additionalProperties"]
        out["additionalProperties"] = convert(ap) if isinstance(ap, dict) else ap
    if "items" in s:
        out["items"] = convert(s["items"])
    return out


def crd_spec() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def platform_schema() -> dict:
    spec = crd_spec()
    fields = {k: convert(v) for k, v in spec["properties"].items()}

    # image: every field optional, the chart's image fills in the rest.
    fields["image"].pop("required", None)
    fields["image"]["description"] = (
        "spec.image; unset fields come from the chart's image (repository, tag, pullPolicy)."
    )
    # regions: may be empty while the platform is disabled (see allOf).
    fields["regions"].pop("minItems", None)
    # nats: "managed or external, not both" is the CRD's CEL rule, checked
    # by templates/_validate.tpl with its message.
    fields["store"]["maxProperties"] = 1

    properties = {
        "enabled": {"type": "boolean", "description": "Create a ChappePlatform from these values."},
        "name": {
            "type": "string",
            "description": "Name of the ChappePlatform (it prefixes every object the operator makes).",
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
            "minLength": 1,
            "maxLength": 24,
        },
        "namespace": {
            "type": "string",
            "description": "Namespace of the platform; the release namespace when empty.",
            "pattern": "^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$",
            "maxLength": 63,
        },
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "createSessionKey": {
            "type": "boolean",
            "description": "Create the session key Secret with 32 random bytes (kept on upgrade and uninstall).",
        },
    }
    properties.update(fields)
    return {
        "type": "object",
        "description": "A ChappePlatform built from values: its fields are the CRD's spec fields.",
        "additionalProperties": False,
        "required": ["enabled", "name"],
        "properties": properties,
        "allOf": [
            {
                "if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
                "then": {
                    "required": ["regions", "store"],
                    "properties": {"regions": {"minItems": 1}},
                },
            }
        ],
    }


def resources() -> dict:
    quantity = {"type": ["string", "number"]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "requests": {"type": "object", "additionalProperties": quantity},
            "limits": {"type": "object", "additionalProperties": quantity},
        },
    }


def string_map() -> dict:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def obj(properties: dict, required: list[str] | None = None, description: str | None = None) -> dict:
    out: dict = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


# Bucket boundaries of the services' latency histograms (0.5 ms doubling,
# crates/telemetry/src/metrics.rs): an objective must be one of them.
LATENCY_BUCKETS = [round(0.0005 * 2**i, 4) for i in range(16)]


def schema() -> dict:
    ratio = {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Values of the Chappe chart",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "global": {"type": "object", "description": "Helm's global values (unused)."},
            "nameOverride": {"type": "string", "maxLength": 63},
            "fullnameOverride": {"type": "string", "maxLength": 63},
            "image": obj(
                {
                    "repository": {
                        "type": "string",
                        "description": "Required: the Chappe image, e.g. registry.example.gouv.fr/chappe/chappe.",
                        "maxLength": 200,
                    },
                    "tag": {"type": "string", "maxLength": 128, "description": "The chart's appVersion when empty."},
                    "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
                },
                ["repository", "tag", "pullPolicy"],
            ),
            "imagePullSecrets": {
                "type": "array",
                "items": obj({"name": {"type": "string", "minLength": 1}}, ["name"]),
            },
            "operator": obj(
                {
                    "replicas": {"type": "integer", "minimum": 1, "maximum": 5},
                    "metricsPort": {"type": "integer", "minimum": 1024, "maximum": 65535},
                    "leaderElection": obj(
                        {
                            "leaseName": {
                                "type": "string",
                                "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                                "maxLength": 253,
                            },
                            "leaseSeconds": {"type": "integer", "minimum": 3, "maximum": 300},
                        },
                        ["leaseName", "leaseSeconds"],
                    ),
                    "logFormat": {"type": "string", "enum": ["text", "json"]},
                    "logLevel": {"type": "string", "minLength": 1},
                    "resources": resources(),
                    "podDisruptionBudget": obj(
                        {
                            "enabled": {"type": "boolean"},
                            "maxUnavailable": {"type": ["integer", "string"], "minimum": 1, "pattern": "^[0-9]+%$"},
                        },
                        ["enabled"],
                    ),
                    "serviceAccount": obj(
                        {
                            "create": {"type": "boolean"},
                            "name": {"type": "string", "maxLength": 253},
                            "annotations": string_map(),
                        },
                        ["create"],
                    ),
                    "rbac": obj({"create": {"type": "boolean"}}, ["create"]),
                    "podAnnotations": string_map(),
                    "podLabels": string_map(),
                    "nodeSelector": string_map(),
                    "tolerations": {"type": "array", "items": {"type": "object"}},
                    "affinity": {"type": "object"},
                    "priorityClassName": {"type": "string"},
                    "serviceMonitor": obj(
                        {
                            "enabled": {"type": "boolean"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "labels": string_map(),
                        },
                        ["enabled"],
                    ),
                },
                ["replicas", "metricsPort", "leaderElection"],
            ),
            "platform": platform_schema(),
            "monitoring": obj(
                {
                    "regionLabel": {
                        "type": "string",
                        "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$",
                        "description": "The Prometheus label holding the region.",
                    },
                    "runbookBaseUrl": {"type": "string", "pattern": "^https?://"},
                    "dashboards": obj(
                        {
                            "enabled": {"type": "boolean"},
                            "namespace": {"type": "string", "maxLength": 63},
                            "label": {"type": "string", "minLength": 1},
                            "labelValue": {"type": "string"},
                            "folderAnnotation": {"type": "string", "minLength": 1},
                            "folder": {"type": "string"},
                        },
                        ["enabled"],
                    ),
                    "prometheusRule": obj(
                        {
                            "enabled": {"type": "boolean"},
                            "labels": string_map(),
                            "alerts": obj(
                                {
                                    "errorRate": obj({"warning": ratio, "critical": ratio}, ["warning", "critical"]),
                                    "sendLatency": obj(
                                        {
                                            "objective": ratio,
                                            "seconds": {
                                                "enum": LATENCY_BUCKETS,
                                                "description": "A bucket boundary of the services' latency histograms.",
                                            },
                                        },
                                        ["objective", "seconds"],
                                    ),
                                    "deliveryQueue": obj({"warning": {"type": "integer", "minimum": 1}}, ["warning"]),
                                    "store": obj(
                                        {
                                            "unavailableRatio": ratio,
                                            "p99Seconds": {"type": "number", "exclusiveMinimum": 0},
                                        },
                                        ["unavailableRatio", "p99Seconds"],
                                    ),
                                },
                                ["errorRate", "sendLatency", "deliveryQueue", "store"],
                            ),
                        },
                        ["enabled"],
                    ),
                },
                ["regionLabel", "runbookBaseUrl"],
            ),
            "tests": obj(
                {
                    "enabled": {"type": "boolean"},
                    "timeoutSeconds": {"type": "integer", "minimum": 10, "maximum": 3600},
                },
                ["enabled"],
            ),
        },
    }


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if (CHART / "values.schema.json").read_text() == render() else 1)
    (CHART / "values.schema.json").write_text(render())
    print(f"wrote {CHART / 'values.schema.json'}")
