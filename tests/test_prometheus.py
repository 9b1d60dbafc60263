"""A real Prometheus scrapes the operator and the controller pod through an end-to-end PruneJob
(llm-evolution against a scripted chat server), and every query of the Grafana dashboard then
returns data. The unit tests check what each process serves and that each query names a real
series; only this one shows that the series are scrapeable and the PromQL, with its label
matchers, rate windows and histogram, finds them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from chat_server import ScriptedChat
from operator_world import apply, needs_kubectl, serve_controller_metrics, wait_phase, world  # noqa: F401
from prometheus_server import PrometheusServer, needs_prometheus
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = [needs_kubectl, needs_prometheus]

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "selfpruner.json"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes: longer than the whole search here


def dashboard_queries(prunejob: str) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every target, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$prunejob", prunejob).replace("$__rate_interval", RATE_INTERVAL)
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
            PrometheusServer(tmp_path / "prometheus", {"operator": operator.metrics_port,
                                                       "controller": controller_port}) as prom:
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
                     f"selfpruner_search_best_fitness{{{pj_sel}}}"):
            found = values(prom.query(expr, at))
            assert found and found[0] > 0, (expr, found)
        # the default adaptive allocation's split of the one offspring generation: even, as nothing is known yet
        split = {series["metric"]["operator"]: float(series["value"][1]) for series in
                 prom.query(f"max_over_time(selfpruner_search_offspring_share{{{pj_sel}}}[10m])", at)}
        assert split["llm-crossover"] == split["crossover"] == split["llm-mutation"] == split["mutation"] == 0.5, split
        assert values(prom.query(f'max_over_time(selfpruner_prunejobs{{phase="Running"}}[{RATE_INTERVAL}])', at)) == [1]
