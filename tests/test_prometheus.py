"""A real Prometheus scrapes the operator and the controller pod through an end-to-end PruneJob
(llm-evolution against a scripted chat server), and every query of the Grafana dashboard then
returns data. The unit tests check what each process serves and that each query names a real
series; only this one shows that the series are scrapeable and the PromQL, with its label
matchers, rate windows and histogram, finds them."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from chat_server import ScriptedChat
from operator_world import apply, needs_kubectl, serve_controller_metrics, wait_phase, world  # noqa: F401
from prometheus_server import PrometheusServer, needs_prometheus
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = [needs_kubectl, needs_prometheus]

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "selfpruner.json"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes: longer than the whole search here
NAMESPACE = "default"  # the PruneJobs' (operator_world's cluster)
# Target labels as the chart's monitors give them in a cluster: the controller pod's PodMonitor adds the
# pod's namespace (the PruneJob's); the operator's monitor adds the operator's own namespace, and keeps
# the `namespace` the operator exposes on its PruneJob series only with honorLabels: true.
TARGET_LABELS = {"controller": {"namespace": NAMESPACE}, "operator": {"namespace": "selfpruner-system"}}


def dashboard_queries(prunejob: str) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every target, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = (target["expr"].replace("$prunejob", prunejob).replace("$namespace", NAMESPACE)
                    .replace("$__rate_interval", RATE_INTERVAL))
            assert "$" not in expr, (panel["title"], expr)
            out.append((f"{panel['title']} / {target['refId']}", expr))
    return out


def values(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


def test_every_dashboard_query_returns_data(world, tmp_path):
    cluster, kubelet, operator, doc, _ = world
    name = doc["metadata"]["name"]
    controller_port = serve_controller_metrics(kubelet)
    with ScriptedChat(dim=6) as chat, \
            PrometheusServer(tmp_path / "prometheus",
                             {"operator": operator.metrics_port, "controller": controller_port},
                             labels=TARGET_LABELS, honor_labels=("operator",)) as prom:
        # Prometheus scrapes its targets a few seconds after it starts (service discovery's first update)
        deadline = time.time() + 30
        while time.time() < deadline and not prom.query('up{job="operator"} == 1'):
            time.sleep(0.2)
        assert prom.query('up{job="operator"} == 1'), prom.targets()
        # a PruneJob that fails at once (its controller pod waits for a Secret that is not there; the
        # operator gives up after SELFPRUNER_CONTROLLER_START_TIMEOUT), for the failed counter
        failing = json.loads(json.dumps(doc))
        failing["metadata"]["name"] = "no-secret"
        failing["spec"]["storage"]["credentialsSecret"] = {"name": "absent-secret"}  # allowed, but not there
        apply(cluster, failing, tmp_path)
        doc["spec"]["search"].update(strategy="llm-evolution", generations=1)  # ~30 s of controller: scraped often
        doc["spec"]["llm"] = {"provider": "openai", "model": "scripted", "baseURL": chat.url, "offspringPerCall": 2}
        apply(cluster, doc, tmp_path)
        pj = wait_phase(cluster, name, ("Succeeded", "Failed", "Invalid"))
        assert pj["status"]["phase"] == "Succeeded", pj["status"]
        assert chat.requests, "the search never called the LLM"

        # the controller exits with the search (its series then go stale): query at its last scrape
        (up,) = prom.query('up{job="controller"}[10m]')
        scraped = [float(t) for t, v in up["values"] if v == "1"]
        assert len(scraped) >= 3, f"the controller was scraped {len(scraped)} times: {prom.targets()}"
        at = scraped[-1]
        assert prom.query('up{job="operator"} == 1', at), prom.targets()

        # Each panel as Grafana draws it over the run: a range query across the controller's life. A
        # ratio of rates (evaluation duration) is 0/0 = NaN in any minute without evaluations, which on a
        # slow machine includes the controller's last minute (held-out scoring, export): a gap in the
        # plot, not a broken query. A panel fails if it has no series, or no finite point in the whole run.
        empty, nan = [], []
        for title, expr in dashboard_queries(name):
            result = prom.query_range(expr, scraped[0], at)
            points = [float(v) for series in result for _, v in series["values"]]
            if not result:
                empty.append((title, expr))
            elif not any(math.isfinite(v) for v in points):
                nan.append((title, expr, result))
        assert not empty, f"dashboard queries with no data: {empty}"
        assert not nan, f"dashboard queries with only NaN/Inf over the run: {nan}"

        # and the data is the search's, not just zeros
        pj_sel = f'prunejob="{name}"'
        for expr in (f'selfpruner_search_evaluations_total{{{pj_sel},outcome="ok"}}',
                     f"selfpruner_search_tokens_evaluated_total{{{pj_sel}}}",
                     f"selfpruner_llm_calls_total{{{pj_sel}}}", f"selfpruner_search_generation{{{pj_sel}}}",
                     f"selfpruner_search_best_fitness{{{pj_sel}}}",
                     f"selfpruner_search_budget_spent_ratio{{{pj_sel}}}"):
            found = values(prom.query(expr, at))
            assert found and found[0] > 0, (expr, found)
        # the controller's series carry the namespace its monitor adds, and the dashboard's variables find it
        controller_series = prom.query(f"selfpruner_search_generation{{{pj_sel}}}", at)
        assert {r["metric"]["namespace"] for r in controller_series} == {NAMESPACE}
        assert {r["metric"]["namespace"] for r in prom.query("selfpruner_prunejobs", at)} == {NAMESPACE}
        assert values(prom.query(f"selfpruner_search_budget_spent_ratio{{{pj_sel}}}", at))[0] <= 1.0 + 1e-9
        # the default adaptive allocation's split of the one offspring generation: even, as nothing is known yet
        split = {series["metric"]["operator"]: float(series["value"][1]) for series in
                 prom.query(f"max_over_time(selfpruner_search_offspring_share{{{pj_sel}}}[10m])", at)}
        assert split["llm-crossover"] == split["crossover"] == split["llm-mutation"] == split["mutation"] == 0.5, split
        assert values(prom.query(f'max_over_time(selfpruner_prunejobs{{phase="Running"}}[{RATE_INTERVAL}])', at)) == [1]
        # the failing one was Pending while its controller pod waited, then Failed, counted once with its reason
        pending = values(prom.query(
            f'max_over_time(selfpruner_prunejobs{{namespace="{NAMESPACE}",phase="Pending"}}[10m])', at))
        assert pending and pending[0] >= 1, pending
        failed = f'selfpruner_prunejobs_failed_total{{namespace="{NAMESPACE}"}}'
        by_reason = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query(failed, at)}
        assert by_reason["ControllerNotStarting"] == 1 and sum(by_reason.values()) == 1, by_reason
        # the operator counts the Succeeded one when its reconcile timer first sees it (after `at`)
        deadline = time.time() + 30
        while time.time() < deadline and values(prom.query(
                f'selfpruner_prunejobs_succeeded_total{{namespace="{NAMESPACE}"}}')) != [1]:
            time.sleep(0.5)
        assert values(prom.query(f'selfpruner_prunejobs_succeeded_total{{namespace="{NAMESPACE}"}}')) == [1]
