"""The Grafana dashboard (deploy/k8s/grafana/dualmap-pd.json) queries only what the scheduler
really exports: every PromQL expression is parsed (promql-parser, a real PromQL grammar), and
every metric and label it names is checked against a live /metrics scrape of a scheduler running
in-process over fake engines (the series list is scraped, never written down here)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service_harness import cluster, completion

promql = pytest.importorskip("promql_parser", reason="needs the test extra (promql-parser)")

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "grafana" / "dualmap-pd.json"
# Grafana's macros are not PromQL; substitute what Grafana would.
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


@cache
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from /metrics of a scheduler that served a few requests (one
    streamed, so every histogram has a series) with prefix migration on (its families too).

    A family nothing has happened to yet (no migration failed, no ring change) is exported with
    no samples, so the scrape shows its name but not its labels; those few take the label names
    the collector declares for it."""

    async def scrape() -> tuple[str, dict[str, tuple[str, ...]]]:
        async with cluster(migration_backend="nixl") as h:
            await h.post("/v1/completions", completion(stream=True))
            await h.post("/v1/completions", completion())
            await h.post("/v1/completions", {"prompt": "no model"})  # an error by kind
            text = await (await h.client.get(h.url + "/metrics")).text()
            declared = {m.name: tuple(getattr(m, "_labelnames", ()))
                        for m in h.scheduler.metrics.registry.collect()}  # fmt: skip
            return text, declared

    text, declared = asyncio.run(scrape())
    names: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(fam.type, ("",)):
            names.setdefault(fam.name + suffix, set())
        if not fam.samples:
            for suffix in SUFFIXES.get(fam.type, ("",)):
                names[fam.name + suffix].update(declared.get(fam.name, ()))
            if fam.type == "histogram":
                names[fam.name + "_bucket"].add("le")
        for sample in fam.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in node.get("panels", []):
        yield p
        yield from panels(p)


def expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def children(node: Any) -> Iterator[Any]:
    """The sub-expressions of a parsed PromQL node."""
    if isinstance(node, promql.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql.BinaryExpr):
        yield from (node.lhs, node.rhs)
    elif isinstance(node, promql.Call):
        yield from node.args
    elif isinstance(node, (promql.AggregateExpr, promql.ParenExpr, promql.UnaryExpr, promql.SubqueryExpr)):
        yield node.expr


def nodes(node: Any) -> Iterator[Any]:
    yield node
    for child in children(node):
        yield from nodes(child)


def selectors(tree: Any) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched) of every selector in a parsed expression."""
    for node in nodes(tree):
        if isinstance(node, promql.VectorSelector):
            yield node.name, {m.name for m in node.matchers.matchers}


def grouping_labels(tree: Any) -> Iterator[str]:
    """Labels named in ``by (...)`` clauses."""
    for node in nodes(tree):
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            yield from node.modifier.labels


def parse(expr: str) -> Any:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    return promql.parse(expr)


@pytest.mark.parametrize("title,expr", expressions())
def test_every_query_parses_and_names_only_exported_series_and_labels(title: str, expr: str) -> None:
    tree = parse(expr)
    names = exported()
    used = list(selectors(tree))
    assert used, f"{title}: no metric in {expr!r}"
    labels: set[str] = set()
    for name, matched in used:
        assert name in names, f"{title}: {name} is not exported by the scheduler"
        assert matched <= names[name], f"{title}: {name} has no label {matched - names[name]}"
        labels |= names[name]
    missing = set(grouping_labels(tree)) - labels
    assert not missing, f"{title}: grouping by {missing}, which none of its series carries"
    # Legends name only labels the result keeps.
    dash = json.loads(DASHBOARD.read_text())
    legends = [t.get("legendFormat", "") for p in panels(dash) if p["title"] == title
               for t in p["targets"] if t["expr"] == expr]  # fmt: skip
    for legend in legends:
        assert set(re.findall(r"\{\{(\w+)\}\}", legend)) <= labels, (title, legend)


def test_the_dashboard_covers_what_an_operator_asks() -> None:
    used = {name for _, expr in expressions() for name, _ in selectors(parse(expr))}
    wanted = {
        "decisions by branch": "dualmap_decisions_total",
        "TTFT": "dualmap_ttft_seconds_bucket",
        "TPOT": "dualmap_tpot_seconds_bucket",
        "predicted hits": "dualmap_cache_hit_tokens_predicted_total",
        "engine-reported hits": "dualmap_cache_hit_tokens_engine_total",
        "queue depths": "dualmap_instance_queue_depth",
        "circuit states": "dualmap_instance_circuit_state",
        "migrations": "dualmap_migrations_started_total",
        "KV bytes moved": "dualmap_kv_transfer_bytes_total",
    }
    missing = {what: name for what, name in wanted.items() if name not in used}
    assert not missing


def test_a_query_naming_a_dead_metric_is_caught() -> None:
    # The check above must be able to fail: a typo'd name is not in the scrape.
    (name, _), = selectors(parse("rate(dualmap_decision_total[$__rate_interval])"))
    assert name not in exported()
