"""The selfpruner Grafana dashboard, as code (grafana-foundation-sdk).

    python dashboards/generate.py          # writes both copies
    python dashboards/generate.py --check  # exits 1 if a copy differs from the code

Writes `dashboards/selfpruner.json` and the Helm chart's `charts/selfpruner/files/dashboard.json`
(the same text). Never edit those files by hand: tests/test_dashboard.py regenerates them
and fails on any difference. Series are documented in docs/metrics.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh, VariableSort

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (ROOT / "dashboards" / "selfpruner.json", ROOT / "charts" / "selfpruner" / "files" / "dashboard.json")

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace=~"$namespace"'
PJ = f'{NS}, prunejob=~"$prunejob"'
BY = "namespace, prunejob"  # a PruneJob is its namespace and its name
JOB = "{{namespace}}/{{prunejob}}"
RI = "[$__rate_interval]"
# The operator's own health (reconciliations, controller restarts) is one process's, not a namespace's:
# those panels are the only ones not filtered by $namespace.


def query(expr: str, legend: str, ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DS)


def series(pid: int, title: str, unit: str, queries: list, pos: tuple[int, int, int, int], description: str):
    x, y, w, h = pos
    panel = (timeseries.Panel().id(pid).title(title).description(description).datasource(DS)
             .unit(unit).grid_pos(GridPos(x=x, y=y, w=w, h=h)))
    for q in queries:
        panel = panel.with_target(q)
    return panel


def total(pid: int, title: str, unit: str, q, pos: tuple[int, int, int, int], description: str):
    x, y, w, h = pos
    return (stat.Panel().id(pid).title(title).description(description).datasource(DS).unit(unit)
            .grid_pos(GridPos(x=x, y=y, w=w, h=h)).with_target(q))


def panels() -> list:
    rate = lambda name, by: f"sum by ({by}) (rate({name}{{{PJ}}}{RI}))"  # noqa: E731
    return [
        # the search, per PruneJob (exported by the controller pod; Prometheus adds its namespace)
        series(1, "Best fitness", "short",
               [query(f"max by ({BY}) (selfpruner_search_best_fitness{{{PJ}}})", JOB)],
               (0, 0, 12, 8), "Fitness of the best candidate so far (perplexity, or KL divergence from the dense model "
                              "with fitness.metric kl: the PruneJob's status.fitnessMetric; lower is better)"),
        series(17, "Budget spent", "percentunit",
               [query(f"max by ({BY}) (selfpruner_search_budget_spent_ratio{{{PJ}}})", JOB)],
               (12, 0, 12, 8), "Share of each search's budget spent (full-fidelity evaluations; a screen counts its "
                               "share of fitness.tokens): the search ends near 100 %"),
        series(2, "Search generation", "short",
               [query(f"max by ({BY}) (selfpruner_search_generation{{{PJ}}})", JOB)],
               (0, 8, 12, 8), "Generations each search has completed"),
        series(3, "Evaluations per second", "reqps",
               [query(rate("selfpruner_search_evaluations_total", f"{BY}, outcome"), f"{JOB} {{{{outcome}}}}")],
               (12, 8, 12, 8), "Candidate evaluations finished per second, ok and failed"),
        series(4, "Evaluation duration", "s",
               [query(f'{rate("selfpruner_search_evaluation_device_seconds_total", BY)}'
                      f' / {rate("selfpruner_search_evaluations_total", BY)}', JOB)],
               (0, 16, 12, 8), "Accelerator seconds per evaluation"),
        series(6, "Tokens evaluated per second", "short",
               [query(rate("selfpruner_search_tokens_evaluated_total", BY), JOB)],
               (12, 16, 12, 8), "Tokens run through the model per second in evaluations"),
        total(5, "Device seconds", "s",
              query(f"sum by ({BY}) (selfpruner_search_evaluation_device_seconds_total{{{PJ}}})", JOB),
              (0, 24, 24, 6), "Accelerator seconds spent in evaluations since the controller started"),
        # the LLM
        series(7, "LLM calls per second", "reqps",
               [query(rate("selfpruner_llm_calls_total", BY), JOB)],
               (0, 30, 12, 8), "LLM calls made by the search"),
        series(8, "LLM tokens per second", "short",
               [query(rate("selfpruner_llm_tokens_total", f"{BY}, kind"), f"{JOB} {{{{kind}}}}")],
               (12, 30, 12, 8), "LLM prompt and completion tokens"),
        series(9, "LLM invalid replies", "short",
               [query(f"sum by ({BY}) (increase(selfpruner_llm_invalid_replies_total{{{PJ}}}{RI}))", JOB)],
               (0, 38, 12, 8), "Unparseable LLM replies and failed LLM calls"),
        series(10, "LLM offspring by use", "short",
               [query(f"sum by ({BY}, use) (increase(selfpruner_llm_offspring_total{{{PJ}}}{RI}))",
                      f"{JOB} {{{{use}}}}")],
               (12, 38, 12, 8), "Offspring the LLM was asked for: used as written, duplicate (valid but seen), "
                                "repaired by projection, or replaced by a classical operator"),
        series(14, "LLM and evaluation seconds per second", "percentunit",
               [query(rate("selfpruner_llm_seconds_total", BY), f"{JOB} LLM"),
                query(rate("selfpruner_search_evaluation_device_seconds_total", BY), f"{JOB} evaluation", "B")],
               (0, 46, 12, 8), "Share of wall time spent waiting for the LLM, and accelerator time in evaluations"),
        series(15, "Offspring entering the population, by origin", "percentunit",
               [query(f"sum by ({BY}, origin) (selfpruner_search_offspring_entered_total{{{PJ}}}) / "
                      f"sum by ({BY}, origin) (selfpruner_search_offspring_total{{{PJ}}})",
                      f"{JOB} {{{{origin}}}}")],
               (12, 46, 12, 8), "Did the LLM help? The share of each origin's candidates that entered the population "
                                "(LLM crossover/mutation against classical fallbacks, or genetic's own operators)"),
        series(16, "LLM share of offspring", "percentunit",
               [query(f'max by ({BY}, operator) (selfpruner_search_offspring_share{{{PJ}, operator=~"llm-.*"}})',
                      f"{JOB} {{{{operator}}}}")],
               (0, 54, 24, 8), "Of each generation's crossovers, mutations, and parents of the LLM's offspring, the "
                               "share the LLM's operators were given by their measured success (llm.allocation: "
                               "adaptive; fixed gives the LLM every offspring; absent for genetic)"),
        # the operator: PruneJobs by namespace
        series(11, "PruneJobs by phase", "short",
               [query(f"sum by (namespace, phase) (selfpruner_prunejobs{{{NS}}})", "{{namespace}} {{phase}}")],
               (0, 62, 12, 8), "PruneJobs the operator knows, by namespace and phase"),
        series(18, "PruneJobs finished", "short",
               [query(f"sum by (namespace) (increase(selfpruner_prunejobs_succeeded_total{{{NS}}}{RI}))",
                      "{{namespace}} succeeded"),
                query(f"sum by (namespace, reason) (increase(selfpruner_prunejobs_failed_total{{{NS}}}{RI}))",
                      "{{namespace}} failed: {{reason}}", "B")],
               (12, 62, 12, 8), "PruneJobs that reached Succeeded, and Failed by the reason of their Failed condition"),
        # the operator process itself: not a namespace's, so not filtered by it
        series(12, "Operator reconcile errors and controller restarts", "short",
               [query(f"sum(increase(selfpruner_operator_reconcile_errors_total{RI}))", "reconcile errors"),
                query(f"sum(increase(selfpruner_operator_controller_restarts_total{RI}))",
                      "controller restarts", "B")],
               (0, 70, 12, 8), "The operator's own: reconciliations that raised an error; controller Jobs started "
                               "again after a loss (all namespaces)"),
        series(13, "Operator reconcile duration (p95)", "s",
               [query("histogram_quantile(0.95, sum by (le) "
                      f"(rate(selfpruner_operator_reconcile_duration_seconds_bucket{RI})))", "p95")],
               (12, 70, 12, 8), "The operator's own: 95th percentile of the time one reconciliation takes "
                                "(all namespaces)"),
    ]


def build() -> dict:
    board = (dash.Dashboard("selfpruner").uid("selfpruner").tags(["selfpruner"]).editable()
             .time("now-6h", "now").refresh("30s")
             .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
             .with_variable(dash.QueryVariable("namespace").label("Namespace").datasource(DS)
                            .query("label_values(selfpruner_prunejobs, namespace)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                            .multi(True).include_all(True).all_value(".*"))
             .with_variable(dash.QueryVariable("prunejob").label("PruneJob").datasource(DS)
                            .query(f"label_values(selfpruner_search_generation{{{NS}}}, prunejob)")
                            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
                            .multi(True).include_all(True).all_value(".*")))
    for p in panels():
        board = board.with_panel(p)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        stale = [str(p.relative_to(ROOT)) for p in OUTPUTS if not p.is_file() or p.read_text() != text]
        for p in stale:
            print(f"{p} differs from dashboards/generate.py; run it", file=sys.stderr)
        return 1 if stale else 0
    for p in OUTPUTS:
        p.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
