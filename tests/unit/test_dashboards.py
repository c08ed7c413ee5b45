"""The Grafana dashboards and Prometheus alert rules shipped in `kiln/observability` name only
metrics and labels that Kiln's registries export (a renamed metric fails here, not on an
operator's screen), their SQL names only tables and columns that exist, every alert has a
severity and a runbook (in the file and in docs/operations.md), and the panels and alerts that
issue 9 asks for are there."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml  # type: ignore[import-untyped]  # PyYAML has no inline types; no stubs installed
from prometheus_client import CollectorRegistry

from kiln.db.models import Base
from kiln.devstack.supervisor import Supervisor
from kiln.observability.billing import BillingMetrics
from kiln.observability.coldstart import ColdStartMetrics
from kiln.observability.gpu import GpuTelemetry
from kiln.observability.invocation_log import InvocationLogMetrics
from kiln.observability.nats import NatsMetrics
from kiln.observability.scheduling import SchedulingMetrics
from kiln.observability.standbys import StandbyMetrics
from kiln.router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = files("kiln.observability")
# Every file shipped there is checked, not a list kept by hand.
DASHBOARDS = sorted(
    f.name for f in OBSERVABILITY.joinpath("dashboards").iterdir() if f.name.endswith(".json")
)
RULE_FILES = sorted(
    f.name for f in OBSERVABILITY.joinpath("alerts").iterdir() if f.name.endswith(".yml")
)

# Panel title -> a metric (or, for SQL panels, a table) the panel must query.
REQUIRED_PANELS = {
    "operations.json": {
        "Request rate": "kiln_router_requests_total",
        "Error rate": "kiln_router_requests_total",
        "Call latency p50 / p95 / p99": "kiln_router_call_duration_seconds_bucket",
        "Queue wait p50 / p95 / p99": "kiln_router_queue_wait_seconds_bucket",
        "Execution p50 / p95 / p99": "kiln_router_call_execution_seconds_bucket",
        "Replicas by state": "kiln_scheduler_replicas_by_state",
        "Desired vs actual replicas": "kiln_scheduler_desired_replicas",
        "Pending calls": "kiln_scheduler_pending_calls",
        "GPU utilisation": "kiln_gpu_utilization_ratio",
        "GPU memory used": "kiln_gpu_memory_used_bytes",
        "GPU temperature": "kiln_gpu_temperature_celsius",
        "GPU power": "kiln_gpu_power_watts",
    },
    "cold_starts.json": {
        "Cold starts by origin": "kiln_cold_starts_total",
        "Cold start phase p50": "kiln_cold_start_phase_seconds_bucket",
        "Cold start phase p95": "kiln_cold_start_phase_seconds_bucket",
        "Snapshot hit rate": "kiln_cold_starts_total",
        "Snapshot fallbacks": "kiln_snapshot_fallbacks_total",
    },
    "business.json": {
        "Active customers": "invocations",
        "Replica-hours by tier and GPU type": "kiln_billing_replica_seconds_total",
        "Revenue by tier and GPU type": "kiln_billing_charged_micros_total",
        "Top customers": "ledger_entries",
    },
}
# Alert name -> (a metric its expression must use, the threshold it must compare with).
REQUIRED_ALERTS = {
    "KilnHighErrorRate": ("kiln_router_requests_total", "> 0.05"),
    "KilnHighLatencyP99": ("kiln_router_call_duration_seconds_bucket", "> 0.5"),
    "KilnGpuTemperatureHigh": ("kiln_gpu_temperature_celsius", "> 85"),
    "KilnBillingOutboxStale": ("kiln_billing_outbox_oldest_unsent_seconds", "> 1800"),
    "KilnJobsStuckInQueue": ("kiln_jobs_oldest_queued_seconds", "> 600"),
    "KilnNodeLost": ('kiln_scheduler_nodes{state="lost"}', "> 0"),
}
SEVERITIES = {"critical", "warning"}
# Labels Prometheus adds to every scraped series, and the histogram bucket bound.
TARGET_LABELS = frozenset({"instance", "job"})
# Sample names a metric family of each type exports (prometheus_client's naming).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}

METRIC = re.compile(r"\bkiln_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(kiln_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
TEMPLATE_LABEL = re.compile(r"\{\{\s*\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
# A metric defined in the source: a string starting with kiln_ followed by its help text.
DEFINED = re.compile(r'\(\s*"(kiln_[a-z0-9_]+)",\s*"')
SQL_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+([a-z_]+)\s+([a-z])\b", re.IGNORECASE)
SQL_COLUMN = re.compile(r"\b([a-z])\.([a-z_]+)\b")


def _registries() -> list[CollectorRegistry]:
    """A registry of each metrics class Kiln has; `test_every_metric_class_is_read` fails when a
    new one is missing here."""
    cold = ColdStartMetrics()
    SchedulingMetrics(cold.registry)  # the scheduler shares the cold-start registry
    invocations = CollectorRegistry()
    InvocationLogMetrics(invocations)
    return [
        RouterMetrics().registry,
        cold.registry,
        BillingMetrics().registry,
        invocations,
        GpuTelemetry("node", dict, interval_s=5).registry,
        NatsMetrics().registry,
        StandbyMetrics(CollectorRegistry()).registry,
        Supervisor([]).registry,  # `kiln dev`'s restarts of its embedded servers
    ]


@dataclass(frozen=True)
class Exported:
    families: frozenset[str]  # as defined: kiln_router_requests
    labels: dict[str, frozenset[str]]  # sample name (kiln_router_requests_total) -> its labels


@pytest.fixture(scope="module")
def exported() -> Exported:
    families: set[str] = set()
    labels: dict[str, frozenset[str]] = {}
    for registry in _registries():
        for family in registry.collect():
            assert family.type in SUFFIXES, f"{family.name}: a {family.type}, unknown here"
            families.add(family.name)
            label_names = frozenset(getattr(_collector(registry, family.name), "_labelnames", ()))
            for suffix in SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                labels[family.name + suffix] = label_names | extra | TARGET_LABELS
    return Exported(frozenset(families), labels)


def _collector(registry: CollectorRegistry, name: str) -> Any:
    # prometheus_client keeps no public map from a family to its label names.
    mapping: dict[str, Any] = registry._names_to_collectors
    return mapping[name]


@dataclass(frozen=True)
class Query:
    where: str  # for messages: file and panel or alert
    expr: str
    legend: str = ""


def _dashboard(name: str) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(OBSERVABILITY.joinpath("dashboards", name).read_text())
    return board


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows hold theirs


def _rules() -> list[dict[str, Any]]:
    rules = []
    for name in RULE_FILES:
        data = yaml.safe_load(OBSERVABILITY.joinpath("alerts", name).read_text())
        rules += [{**rule, "file": name} for group in data["groups"] for rule in group["rules"]]
    return rules


def _queries() -> Iterator[Query]:
    for name in DASHBOARDS:
        board = _dashboard(name)
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                if "expr" in target:
                    where = f"{name}: {panel['title']!r}"
                    yield Query(where, target["expr"], target.get("legendFormat", ""))
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                yield Query(f"{name}: variable {variable['name']}", variable["definition"])
    for rule in _rules():
        text = " ".join(rule.get("annotations", {}).values())
        yield Query(f"{rule['file']}: {rule['alert']}", rule["expr"], text)


def _sql() -> Iterator[tuple[str, str]]:
    for name in DASHBOARDS:
        for panel in _panels(_dashboard(name)["panels"]):
            for target in panel.get("targets", []):
                if "rawSql" in target:
                    yield f"{name}: {panel['title']!r}", target["rawSql"]


def test_every_metric_class_is_read(exported: Exported) -> None:
    defined = set()
    for path in (ROOT / "kiln").rglob("*.py"):
        defined |= set(DEFINED.findall(path.read_text()))
    assert defined, "the pattern that finds metric definitions found none"
    missing = defined - exported.families
    assert not missing, f"metrics defined in kiln/ that no registry above holds: {missing}"


def test_every_metric_a_dashboard_or_alert_names_is_exported(exported: Exported) -> None:
    unknown = [
        f"{query.where}: {name}"
        for query in _queries()
        for name in METRIC.findall(query.expr)
        if name not in exported.labels
    ]
    assert not unknown, "names Kiln does not export:\n" + "\n".join(unknown)


def test_every_label_a_query_names_exists(exported: Exported) -> None:
    wrong = []
    for query in _queries():
        for name, matchers in SELECTOR.findall(query.expr):
            for label in MATCHER.findall(matchers):
                if label not in exported.labels.get(name, frozenset({label})):
                    wrong.append(f"{query.where}: {name} has no label {label!r}")
        # Grouping and legend labels must belong to some metric of the expression.
        known: set[str] = set()
        for name in METRIC.findall(query.expr):
            known |= exported.labels.get(name, frozenset())
        grouped = {
            label.strip()
            for labels in GROUPING.findall(query.expr)
            for label in labels.split(",")
            if label.strip()
        }
        shown = set(TEMPLATE_LABEL.findall(query.legend)) | set(LEGEND_LABEL.findall(query.legend))
        wrong += [f"{query.where}: no metric here has label {x!r}" for x in grouped - known]
        wrong += [
            f"{query.where}: shows label {x!r}, which nothing here has" for x in shown - known
        ]
    assert not wrong, "\n".join(wrong)


def test_the_sql_panels_name_existing_tables_and_columns() -> None:
    tables: dict[str, sa.Table] = dict(Base.metadata.tables)
    wrong = []
    queries = list(_sql())
    assert queries, "the business dashboard has SQL panels"
    for where, sql in queries:
        aliases = {}
        for table, alias in SQL_TABLE.findall(sql):
            if table not in tables:
                wrong.append(f"{where}: no table {table!r}")
            else:
                aliases[alias] = tables[table]
        for alias, column in SQL_COLUMN.findall(sql):
            if alias in aliases and column not in aliases[alias].c:
                wrong.append(f"{where}: {aliases[alias].name} has no column {column!r}")
    assert not wrong, "\n".join(wrong)


def test_dashboards_import_anywhere_and_have_the_panels_asked_for() -> None:
    assert set(REQUIRED_PANELS) <= set(DASHBOARDS)
    assert RULE_FILES == ["kiln.rules.yml"]
    uids = set()
    for name in DASHBOARDS:
        board = _dashboard(name)
        uids.add(board["uid"])
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        panels = [p for p in _panels(board["panels"]) if p["type"] != "row"]
        ids = [p["id"] for p in _panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        for panel in panels:
            # Through the template variables only: no datasource uid of one Grafana install.
            sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
            for source in sources:
                assert source["uid"] in ("${datasource}", "${postgres}"), (name, panel["title"])
                assert source["uid"][2:-1] in variables, (name, panel["title"])
            assert panel["targets"], f"{name}: {panel['title']!r} has no query"
        by_title = {p["title"]: p for p in panels}
        for title, source in REQUIRED_PANELS.get(name, {}).items():
            assert title in by_title, f"{name} lacks the panel {title!r}"
            text = " ".join(
                t.get("expr", "") + t.get("rawSql", "") for t in by_title[title]["targets"]
            )
            assert source in text, f"{name}: {title!r} does not query {source}"
    assert len(uids) == len(DASHBOARDS)


def test_every_alert_has_a_severity_and_a_runbook_and_the_six_asked_for_exist() -> None:
    rules = _rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    docs = (ROOT / "docs" / "operations.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert len(rule["annotations"]["runbook"]) > 40, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert f"`{rule['alert']}`" in docs, (
            f"docs/operations.md has no runbook line for it: {rule['alert']}"
        )
    by_name = {rule["alert"]: " ".join(rule["expr"].split()) for rule in rules}
    for name, (metric, threshold) in REQUIRED_ALERTS.items():
        assert name in by_name, f"no alert {name}"
        assert metric in by_name[name], f"{name} does not use {metric}"
        assert threshold in by_name[name], f"{name} does not compare {threshold}"


def test_the_node_lost_alert_counts_lost_nodes_and_standbys_report_none() -> None:
    registry = CollectorRegistry()
    metrics = SchedulingMetrics(registry)

    def nodes(state: str) -> float | None:
        return registry.get_sample_value("kiln_scheduler_nodes", {"state": state})

    assert (nodes("ready"), nodes("lost")) == (0.0, 0.0)
    metrics.node_states(ready=2, lost=1)
    metrics.nodes_lost.inc()
    assert (nodes("ready"), nodes("lost")) == (2.0, 1.0)
    assert registry.get_sample_value("kiln_scheduler_nodes_lost_total") == 1.0
    metrics.standing_by()
    assert (nodes("ready"), nodes("lost")) == (0.0, 0.0)
