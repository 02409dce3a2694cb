#!/usr/bin/env python3
"""Writes the Grafana dashboards of the chart (dashboards/*.json).

    python3 charts/chappe/hack/dashboards.py

The JSON files are committed; charts/chappe/tests checks that they are what
this script writes, and that every metric they query is one the services
export. Edit here, then run it.

Every series of a Chappe service carries `chappe_gouv_fr_region` (the
operator's ServiceMonitor copies the Services' `chappe.gouv.fr/region`
label; the chart's `monitoring.regionLabel` renames it in the ConfigMaps
when Prometheus spells it otherwise) and `namespace`.
"""

from __future__ import annotations

import json
import pathlib

R = "chappe_gouv_fr_region"
SEL = f'namespace=~"$namespace", {R}=~"$region"'
RATE = "$__rate_interval"
SERVER_CODES = "UNAVAILABLE|INTERNAL|UNKNOWN|DATA_LOSS|DEADLINE_EXCEEDED"
DS = {"type": "prometheus", "uid": "${datasource}"}


class Layout:
    """Places panels on Grafana's 24-column grid, row after row."""

    def __init__(self) -> None:
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel: dict, w: int = 12, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr: str, legend: str, ref: str = "A") -> dict:
    return {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }


def timeseries(title: str, description: str, targets: list[dict], unit: str) -> dict:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "min": 0,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max", "lastNotNull"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, description: str, expr: str, legend: str, unit: str) -> dict:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [dict(target(expr, legend), instant=True, range=False)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "value_and_name",
        },
    }


def quantile(q: float, metric: str, extra: str, by: str) -> str:
    inner = f"sum by ({by}, le) (rate({metric}_bucket{{{SEL}{extra}}}[{RATE}]))"
    return f"histogram_quantile({q}, {inner})"


def variables() -> dict:
    def query(name: str, label: str, q: str, multi: bool) -> dict:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": {"query": q, "refId": f"{name}-values"},
            "definition": q,
            "refresh": 2,
            "sort": 1,
            "multi": multi,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }

    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
            },
            query("namespace", "Namespace", "label_values(chappe_gateway_connected_devices, namespace)", True),
            query(
                "region",
                "Region",
                f'label_values(chappe_gateway_connected_devices{{namespace=~"$namespace"}}, {R})',
                True,
            ),
        ]
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["chappe"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": variables(),
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def overview() -> dict:
    g = Layout()
    g.row("Traffic")
    g.add(
        timeseries(
            "Messages stored / s",
            "Conversation messages durably stored by fanout (retried duplicates excluded), per region.",
            [target(f"sum by ({R}) (rate(chappe_fanout_messages_stored_total{{{SEL}}}[{RATE}]))", f"{{{{{R}}}}}")],
            "ops",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Frames pushed to devices / s",
            "Frames the gateways pushed to connected devices (messages, to-device, presence, typing), per region and kind.",
            [
                target(
                    f"sum by ({R}, kind) (rate(chappe_gateway_pushed_frames_total{{{SEL}}}[{RATE}]))",
                    f"{{{{{R}}}}} {{{{kind}}}}",
                )
            ],
            "ops",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Connected devices",
            "Devices holding an open Connect stream, per region.",
            [target(f"sum by ({R}) (chappe_gateway_connected_devices{{{SEL}}})", f"{{{{{R}}}}}")],
            "short",
        ),
        w=8,
    )
    g.row("Latency")
    g.add(
        timeseries(
            "p99 send → stored → delivered",
            "The two halves of send → delivered as the servers see them. send → stored: from a device's send "
            "reaching the gateway to its acknowledgement, which comes only once the ciphertext is durably stored. "
            "stored → delivered: from that storage (fanout's clock) to the push onto a recipient device's stream "
            "(the recipient gateway's clock; needs NTP across hosts). Per region of the gateway that measured it.",
            [
                target(quantile(0.99, "chappe_gateway_request_duration_seconds", ', method="Connect/Send"', R), f"send → stored p99 {{{{{R}}}}}"),
                target(quantile(0.99, "chappe_gateway_delivery_lag_seconds", "", R), f"stored → delivered p99 {{{{{R}}}}}"),
                target(quantile(0.5, "chappe_gateway_delivery_lag_seconds", "", R), f"stored → delivered p50 {{{{{R}}}}}"),
            ],
            "s",
        )
    )
    g.add(
        timeseries(
            "p99 by gateway method",
            "p99 time to answer each public gateway method (unary RPCs and Connect frame kinds), all selected regions.",
            [target(quantile(0.99, "chappe_gateway_request_duration_seconds", "", "method"), "{{method}}")],
            "s",
        )
    )
    g.row("Errors")
    g.add(
        timeseries(
            "Gateway errors / s by status",
            "Public gateway requests that did not end OK, by gRPC status and region. INVALID_ARGUMENT, "
            "RESOURCE_EXHAUSTED, PERMISSION_DENIED and UNAUTHENTICATED are the clients'; UNAVAILABLE, INTERNAL, "
            "UNKNOWN, DEADLINE_EXCEEDED and DATA_LOSS are the platform's.",
            [
                target(
                    f'sum by ({R}, code) (rate(chappe_gateway_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                    f"{{{{{R}}}}} {{{{code}}}}",
                )
            ],
            "reqps",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Server error ratio",
            "Share of gateway requests answered with a server-side status (what the ChappeErrorRate alert watches).",
            [
                target(
                    f'sum by ({R}) (rate(chappe_gateway_requests_total{{{SEL}, code=~"{SERVER_CODES}"}}[{RATE}]))'
                    f" / sum by ({R}) (rate(chappe_gateway_requests_total{{{SEL}}}[{RATE}]))",
                    f"{{{{{R}}}}}",
                )
            ],
            "percentunit",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Bus RPC errors / s by service and status",
            "Bus requests the services (fanout, keydir, presence, media) answered with another status than OK.",
            [
                target(
                    f'sum by ({R}, service, code) (rate(chappe_bus_rpc_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                    f"{{{{{R}}}}} {{{{service}}}} {{{{code}}}}",
                )
            ],
            "reqps",
        ),
        w=8,
    )
    g.row("Delivery (JetStream job queue)")
    g.add(
        timeseries(
            "Delivery queue depth",
            "Delivery jobs waiting in JetStream (consumer pending + unacknowledged), sampled by fanout every 2 s.",
            [target(f"max by ({R}) (chappe_fanout_delivery_queue_depth{{{SEL}}})", f"{{{{{R}}}}}")],
            "short",
        )
    )
    g.add(
        timeseries(
            "Delivery jobs / s by outcome",
            "delivered: published to every member; retried: nacked after a store failure; dropped: can never succeed.",
            [
                target(
                    f"sum by ({R}, outcome) (rate(chappe_fanout_delivery_jobs_total{{{SEL}}}[{RATE}]))",
                    f"{{{{{R}}}}} {{{{outcome}}}}",
                )
            ],
            "ops",
        )
    )
    g.row("Store")
    g.add(
        timeseries(
            "Store p99 by service",
            "p99 of a store operation (ScyllaDB at LOCAL_QUORUM, or the embedded store), per owning service and region.",
            [
                target(quantile(0.99, f"chappe_{svc}_store_operation_duration_seconds", "", R), f"{svc} {{{{{R}}}}}")
                for svc in ("fanout", "keydir", "media")
            ],
            "s",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Fanout store p99 by operation",
            "p99 of each fanout store operation (insert_message is on every send's path).",
            [target(quantile(0.99, "chappe_fanout_store_operation_duration_seconds", "", "operation"), "{{operation}}")],
            "s",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Store operations / s",
            "Store operations per second, per service and region.",
            [
                target(
                    f"sum by ({R}) (rate(chappe_{svc}_store_operation_duration_seconds_count{{{SEL}}}[{RATE}]))",
                    f"{svc} {{{{{R}}}}}",
                )
                for svc in ("fanout", "keydir", "media")
            ],
            "ops",
        ),
        w=8,
    )
    g.row("Targets")
    g.add(
        stat(
            "Pods answering scrapes, per region and service",
            "Pods Prometheus scraped successfully (`up`), per region and service (what ChappeRegionDegraded watches).",
            f'sum by ({R}, app_kubernetes_io_component) (up{{{SEL}, app_kubernetes_io_component=~"gateway|fanout|keydir|presence|media"}})',
            f"{{{{{R}}}}} {{{{app_kubernetes_io_component}}}}",
            "short",
        ),
        w=24,
        h=6,
    )
    return dashboard(
        "chappe-overview",
        "Chappe / Overview",
        "Messages, latency, devices, errors, delivery queue and store, per region. See docs/operations.md.",
        g.panels,
    )


def services() -> dict:
    g = Layout()
    g.row("Gateway (public API)")
    g.add(
        timeseries(
            "Requests / s by method",
            "Public gateway requests per method (unary RPCs and Connect frame kinds).",
            [target(f"sum by (method) (rate(chappe_gateway_requests_total{{{SEL}}}[{RATE}]))", "{{method}}")],
            "reqps",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Errors / s by method and status",
            "Public gateway requests that did not end OK.",
            [
                target(
                    f'sum by (method, code) (rate(chappe_gateway_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                    "{{method}} {{code}}",
                )
            ],
            "reqps",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "p99 by method",
            "p99 time to answer each public gateway method.",
            [target(quantile(0.99, "chappe_gateway_request_duration_seconds", "", "method"), "{{method}}")],
            "s",
        ),
        w=8,
    )
    g.row("Bus RPCs (fanout, keydir, presence, media)")
    g.add(
        timeseries(
            "Requests / s by route",
            "Bus requests each service handled, by subject.",
            [
                target(
                    f"sum by (service, route) (rate(chappe_bus_rpc_requests_total{{{SEL}}}[{RATE}]))",
                    "{{route}}",
                )
            ],
            "reqps",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Errors / s by route and status",
            "Bus requests answered with another status than OK.",
            [
                target(
                    f'sum by (route, code) (rate(chappe_bus_rpc_requests_total{{{SEL}, code!="OK"}}[{RATE}]))',
                    "{{route}} {{code}}",
                )
            ],
            "reqps",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "p99 by route",
            "p99 time to handle each bus request.",
            [target(quantile(0.99, "chappe_bus_rpc_request_duration_seconds", "", "route"), "{{route}}")],
            "s",
        ),
        w=8,
    )
    g.row("Store operations")
    for svc in ("fanout", "keydir", "media"):
        g.add(
            timeseries(
                f"{svc}: store p99 by operation",
                f"p99 of each {svc} store operation.",
                [target(quantile(0.99, f"chappe_{svc}_store_operation_duration_seconds", "", "operation"), "{{operation}}")],
                "s",
            ),
            w=8,
        )
    return dashboard(
        "chappe-services",
        "Chappe / Services",
        "Rate, errors and duration of every gateway method, bus route and store operation. See docs/operations.md.",
        g.panels,
    )


DASHBOARDS = {"chappe-overview.json": overview, "chappe-services.json": services}


def render() -> dict[str, str]:
    """File name → JSON text."""
    return {name: json.dumps(build(), indent=2, sort_keys=True) + "\n" for name, build in DASHBOARDS.items()}


if __name__ == "__main__":
    here = pathlib.Path(__file__).resolve().parent.parent / "dashboards"
    for name, text in render().items():
        (here / name).write_text(text)
        print(f"wrote {here / name}")
