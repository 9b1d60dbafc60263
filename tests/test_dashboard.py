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
    assert variables["datasource"]["type"] == "datasource"
    assert variables["prunejob"]["type"] == "query"


def test_every_expression_names_an_exported_series():
    known = exported_series()
    used = set()
    for p in board()["panels"]:
        for t in p["targets"]:
            names = set(re.findall(r"\bselfpruner_[a-z0-9_]+", t["expr"]))
            assert names, (p["title"], t["expr"])
            assert names <= known, (p["title"], names - known)
            used |= names
    variable = {v["name"]: v for v in board()["templating"]["list"]}["prunejob"]["query"]
    assert set(re.findall(r"\bselfpruner_[a-z0-9_]+", variable)) <= known
    # every search series and every operator series has a panel
    for name in ("selfpruner_search_best_fitness", "selfpruner_search_evaluations_total",
                 "selfpruner_search_evaluation_device_seconds_total", "selfpruner_llm_calls_total",
                 "selfpruner_llm_tokens_total", "selfpruner_llm_invalid_replies_total", "selfpruner_prunejobs",
                 "selfpruner_operator_reconcile_errors_total", "selfpruner_operator_controller_restarts_total",
                 "selfpruner_search_offspring_share"):
        assert name in used, name
