"""The Grafana dashboard: generated from dashboards/generate.py, and every query names a real series."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "dashboards" / "selfpruner.json"
CHART_COPY = ROOT / "charts" / "selfpruner" / "files" / "dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def board() -> dict:
    return json.loads(COMMITTED.read_text())


def exported_series() -> set[str]:
    pytest.importorskip("prometheus_client")
    from prometheus_client.metrics import MetricWrapperBase

    from selfpruner.cluster.metrics import SearchMetrics
    from selfpruner_operator import metrics as operator_metrics

    families = [m for obj in vars(operator_metrics).values() if isinstance(obj, MetricWrapperBase)
                for m in obj.describe()]
    families += list(SearchMetrics("x").registry.collect())
    assert families
    return {f.name + s for f in families for s in SUFFIXES[f.type]}


def test_regenerating_gives_the_committed_json():
    pytest.importorskip("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("selfpruner_dashboard_generate", ROOT / "dashboards" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert COMMITTED.read_text() == text, "dashboards/selfpruner.json is stale: run python dashboards/generate.py"
    assert CHART_COPY.read_text() == text, "the chart's dashboard.json is stale: run python dashboards/generate.py"


def test_chart_copy_is_the_generated_dashboard():
    assert CHART_COPY.read_text() == COMMITTED.read_text()


def test_panels_have_unique_ids_and_queries():
    b = board()
    ids = [p["id"] for p in b["panels"]]
    assert len(ids) == len(set(ids)) == len(b["panels"]) >= 10
    for p in b["panels"]:
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    variables = {v["name"]: v for v in b["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "prunejob"]  # Grafana resolves them in this order
    assert variables["datasource"]["type"] == "datasource"
    for name in ("namespace", "prunejob"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    assert variables["namespace"]["query"] == "label_values(selfpruner_prunejobs, namespace)"
    assert 'namespace=~"$namespace"' in variables["prunejob"]["query"]  # the PruneJobs of the chosen namespaces


def test_every_expression_names_an_exported_series():
    known = exported_series()
    used = set()
    for p in board()["panels"]:
        for t in p["targets"]:
            names = set(re.findall(r"\bselfpruner_[a-z0-9_]+", t["expr"]))
            assert names, (p["title"], t["expr"])
            assert names <= known, (p["title"], names - known)
            used |= names
    for variable in ("namespace", "prunejob"):
        query = {v["name"]: v for v in board()["templating"]["list"]}[variable]["query"]
        assert set(re.findall(r"\bselfpruner_[a-z0-9_]+", query)) <= known
    # every search series and every operator series has a panel
    for name in ("selfpruner_search_best_fitness", "selfpruner_search_evaluations_total",
                 "selfpruner_search_evaluation_device_seconds_total", "selfpruner_llm_calls_total",
                 "selfpruner_llm_tokens_total", "selfpruner_llm_invalid_replies_total", "selfpruner_prunejobs",
                 "selfpruner_operator_reconcile_errors_total", "selfpruner_operator_controller_restarts_total",
                 "selfpruner_search_offspring_share", "selfpruner_search_budget_spent_ratio",
                 "selfpruner_prunejobs_succeeded_total", "selfpruner_prunejobs_failed_total"):
        assert name in used, name


# the operator process's own health: one process, not a namespace's (the only unfiltered panels)
OPERATOR_PROCESS = {"selfpruner_operator_reconcile_errors_total", "selfpruner_operator_controller_restarts_total",
                    "selfpruner_operator_reconcile_duration_seconds_bucket"}


def test_every_panel_follows_the_namespace_and_a_prunejob_is_its_namespace_and_name():
    for p in board()["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            names = set(re.findall(r"\bselfpruner_[a-z0-9_]+", expr))
            if names <= OPERATOR_PROCESS:
                assert "$namespace" not in expr, (p["title"], expr)
                continue
            # every selector of the expression filters by the namespace variable
            selectors = re.findall(r"\bselfpruner_[a-z0-9_]+(\{[^}]*\})?", expr)
            assert all('namespace=~"$namespace"' in sel for sel in selectors), (p["title"], expr)
            if any(n.startswith(("selfpruner_search_", "selfpruner_llm_")) for n in names):
                # per-PruneJob series: the same name in two namespaces is two PruneJobs
                assert 'prunejob=~"$prunejob"' in expr, (p["title"], expr)
                groupings = re.findall(r"\bby \(([^)]*)\)", expr)
                assert groupings and all(g.startswith("namespace, prunejob") for g in groupings), (p["title"], expr)
                assert "{{namespace}}/{{prunejob}}" in t["legendFormat"], (p["title"], t["legendFormat"])
