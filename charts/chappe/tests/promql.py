"""The metric names a PromQL expression (or a Grafana query) reads.

Not a PromQL parser: it removes what cannot name a metric (strings, label
matchers, ranges, grouping clauses, Grafana variables), then keeps the
identifiers that are not functions, keywords or numbers. Good enough for the
chart's own queries, and tested on them in test_promql_names.
"""

from __future__ import annotations

import re

KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "atan2",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*)\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """Names of the series `expr` selects."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def grafana_query_names(query: str) -> set[str]:
    """Names a Grafana Prometheus variable query reads: `label_values(SELECTOR, LABEL)`
    reads SELECTOR's metric; `label_values(LABEL)` reads none; anything else is PromQL."""
    m = _LABEL_VALUES.match(query)
    if not m:
        return metric_names(query)
    args = m.group(1)
    # The label is the last argument; a selector, when given, comes first.
    head, sep, _label = args.rpartition(",")
    return metric_names(head) if sep else set()
