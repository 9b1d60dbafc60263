"""The search's Prometheus series, served by the controller pod.

Workers are short-lived pods and serve nothing: every evaluation they make ends up in the
controller's `history.jsonl` (and every LLM call in `llm_transcript.jsonl`), so the
controller reports their work from those files after each generation, and nothing is lost
when a worker ends before a scrape. Series follow Prometheus conventions: `selfpruner_`
prefix, base units, `_total` on counters, one `prunejob` label and no per-candidate labels.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ..search.allocation import GROUPS
from ..search.history import read_jsonl
from ..search.llm_clients import batch_seconds

# what became of the offspring the LLM was asked for (they add up to all of them): used as
# written; valid but already seen (mutated until new); repaired by projection; replaced by a
# classical operator. Each `use` is the strategy's counter `llm_<counter>`.
OFFSPRING_USES = {"used": "used", "duplicate": "duplicates", "repaired": "repaired", "replaced": "replaced"}


class SearchMetrics:
    """One PruneJob's search, in its own registry. `update_from` is given absolute totals
    and moves each counter up by the difference from the last totals it saw."""

    def __init__(self, prunejob: str):
        self.prunejob = prunejob
        self.registry = CollectorRegistry(auto_describe=True)
        r, pj = self.registry, ["prunejob"]
        self.evaluations = Counter("selfpruner_search_evaluations_total",
                                   "Candidate evaluations finished, by outcome (ok or failed)",
                                   pj + ["outcome"], registry=r)
        self.device_seconds = Counter("selfpruner_search_evaluation_device_seconds_total",
                                      "Accelerator seconds spent in evaluations", pj, registry=r)
        self.tokens = Counter("selfpruner_search_tokens_evaluated_total",
                              "Tokens run through the model in evaluations", pj, registry=r)
        self.generation = Gauge("selfpruner_search_generation",
                                "Generations the search has completed", pj, registry=r)
        self.best_fitness = Gauge("selfpruner_search_best_fitness",
                                  "Fitness of the best candidate so far", pj, registry=r)
        # the search's own budget (spec.budget: full-fidelity evaluations, a screen counting its share
        # of fitness.tokens; a token budget is the same number of tokens / fitness.tokens)
        self.budget_spent = Gauge("selfpruner_search_budget_spent_ratio",
                                  "Share of the search's budget spent, 0 to 1 (full-fidelity evaluations spent / "
                                  "budget)", pj, registry=r)
        self.llm_calls = Counter("selfpruner_llm_calls_total", "LLM calls made by the search", pj, registry=r)
        self.llm_tokens = Counter("selfpruner_llm_tokens_total", "LLM tokens, by kind (prompt or completion)",
                                  pj + ["kind"], registry=r)
        self.llm_invalid = Counter("selfpruner_llm_invalid_replies_total",
                                   "LLM replies that could not be used: unparseable replies and failed calls",
                                   pj, registry=r)
        self.llm_offspring = Counter("selfpruner_llm_offspring_total",
                                     "Offspring the LLM was asked for, by use (used, duplicate, repaired, replaced)",
                                     pj + ["use"], registry=r)
        self.llm_seconds = Counter("selfpruner_llm_seconds_total",
                                   "Wall seconds the search waited for the LLM", pj, registry=r)
        # origin: who proposed a candidate (llm-initial, llm-crossover, llm-mutation, classical,
        # repaired, random, crossover, mutation, ...): a handful of values, never a candidate
        self.offspring = Counter("selfpruner_search_offspring_total",
                                 "Candidates proposed and evaluated, by origin", pj + ["origin"], registry=r)
        self.offspring_entered = Counter("selfpruner_search_offspring_entered_total",
                                         "Candidates that entered the population, by origin", pj + ["origin"],
                                         registry=r)
        # operator: an arm of search/allocation.py (llm-crossover, crossover, llm-mutation, mutation,
        # llm-selection, tournament). No child is made up front: a share of nothing is not zero
        self.offspring_share = Gauge("selfpruner_search_offspring_share",
                                     "Share of the last generation's slots of its group (crossovers, mutations, "
                                     "the LLM offspring's parents) given to each operator, 0 to 1",
                                     pj + ["operator"], registry=r)
        self._last: dict[tuple, float] = {}
        # every labelled child exists from the start, so a scrape shows zeros, not gaps
        for outcome in ("ok", "failed"):
            self.evaluations.labels(prunejob, outcome)
        for kind in ("prompt", "completion"):
            self.llm_tokens.labels(prunejob, kind)
        for use in OFFSPRING_USES:
            self.llm_offspring.labels(prunejob, use)
        for c in (self.device_seconds, self.tokens, self.llm_calls, self.llm_invalid, self.llm_seconds):
            c.labels(prunejob)

    def _total(self, counter: Counter, value: float, *labels: str) -> None:
        key = (counter._name, *labels)
        last = self._last.get(key, 0)
        if value > last:  # counters only go up (a rewound transcript does not take them back)
            counter.labels(self.prunejob, *labels).inc(value - last)
            self._last[key] = value

    def update_from(self, out_dir: str | Path, strategy) -> None:
        out = Path(out_dir)
        done = [e for e in read_jsonl(out / "history.jsonl") if e.get("fitness") is not None or e.get("error")]
        failed = sum(1 for e in done if e.get("error"))
        self._total(self.evaluations, len(done) - failed, "ok")
        self._total(self.evaluations, failed, "failed")
        self._total(self.device_seconds, sum(float(e.get("seconds") or 0) for e in done))
        self._total(self.tokens, sum(int(e.get("tokens") or 0) for e in done))
        calls = read_jsonl(out / "llm_transcript.jsonl")
        self._total(self.llm_calls, len(calls))
        self._total(self.llm_tokens, sum(int(e.get("prompt_tokens") or 0) for e in calls), "prompt")
        self._total(self.llm_tokens, sum(int(e.get("completion_tokens") or 0) for e in calls), "completion")
        counters = getattr(strategy, "counters", None) or {}
        self._total(self.llm_invalid, counters.get("llm_unparseable_replies", 0) + counters.get("llm_failed_calls", 0))
        for use, counter in OFFSPRING_USES.items():
            self._total(self.llm_offspring, counters.get(f"llm_{counter}", 0), use)
        self._total(self.llm_seconds, sum(batch_seconds(calls).values()))
        for origin, o in (getattr(strategy, "origins", None) or {}).items():
            self._total(self.offspring, o.get("made", 0), origin)
            self._total(self.offspring_entered, o.get("entered", 0), origin)
        self._update_shares(getattr(strategy, "generation_log", None) or [])
        self.generation.labels(self.prunejob).set(strategy.generation)
        budget = getattr(getattr(strategy, "ctx", None), "budget", None)
        if budget:
            self.budget_spent.labels(self.prunejob).set(strategy.spent / budget)
        best = strategy.best()
        if best is not None and best.fitness is not None:
            self.best_fitness.labels(self.prunejob).set(best.fitness)

    def _update_shares(self, generation_log: list[dict]) -> None:
        """Each operator's slots in the newest generation that shared offspring (strategy.py's
        `generation_log`, as in result.json) over its group's slots. A group with no slots then has
        no series rather than a made-up value: the LLM offspring's parents in a generation where the
        LLM was given no offspring, every group for a strategy that shares nothing (genetic)."""
        shares = next((g["shares"] for g in reversed(generation_log) if g.get("shares")), {})
        for arms in GROUPS.values():
            slots = sum(shares.get(arm, 0) for arm in arms)
            for arm in arms:
                if slots:
                    self.offspring_share.labels(self.prunejob, arm).set(shares.get(arm, 0) / slots)
                else:
                    self.offspring_share.remove(self.prunejob, arm)

    def serve(self, port: int):
        """Serve /metrics on `port` from a daemon thread; returns (server, thread)."""
        return start_http_server(port, registry=self.registry)
