"""The controller's search metrics: absolute totals from the run's files, served over HTTP."""

from __future__ import annotations

import json
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from ports import free_port
from selfpruner.cluster.metrics import SearchMetrics  # noqa: E402

ALLOWED_LABELS = {"prunejob", "outcome", "kind", "use", "origin", "operator"}


class FakeStrategy:
    def __init__(self, generation, best, counters, origins=None, generation_log=None):
        self.generation, self._best, self.counters = generation, best, counters
        self.origins = origins or {}
        self.generation_log = generation_log or []

    def best(self):
        return None if self._best is None else SimpleNamespace(fitness=self._best)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(smp, name, **labels):
    return smp[(name, tuple(sorted({"prunejob": "pj", **labels}.items())))]


HIST = [
    {"tokens": 100, "seconds": 1.5, "fitness": 12.0, "error": None, "origin": "seed"},
    {"tokens": 100, "seconds": 0.5, "fitness": None, "error": "CUDA OOM", "origin": "llm"},
    {"tokens": 0, "seconds": 0.0, "fitness": None, "error": None, "origin": "llm"},  # not finished
]
MORE = [
    {"tokens": 200, "seconds": 2.0, "fitness": 10.0, "error": None, "origin": "llm"},
    {"tokens": 50, "seconds": 0.25, "fitness": 11.0, "error": None, "origin": "report:dense"},
]
CALLS = [  # one batch of two calls
    {"prompt_tokens": 30, "completion_tokens": 7, "error": None, "batch": 0, "batch_seconds": 1.5},
    {"prompt_tokens": 0, "completion_tokens": 0, "error": "timeout", "batch": 0, "batch_seconds": 1.5},
]


def test_update_from_sets_absolute_totals(tmp_path):
    m = SearchMetrics("pj")
    write(tmp_path / "history.jsonl", HIST)
    write(tmp_path / "llm_transcript.jsonl", CALLS)
    m.update_from(tmp_path, FakeStrategy(1, 12.0, {
        "llm_offspring_asked": 4, "llm_used": 2, "llm_repaired": 1, "llm_replaced": 1,
        "llm_unparseable_replies": 1, "llm_failed_calls": 1},
        {"llm-initial": {"made": 3, "entered": 3}, "classical": {"made": 1, "entered": 1}}))
    s = samples(m.registry)
    assert value(s, "selfpruner_search_evaluations_total", outcome="ok") == 1
    assert value(s, "selfpruner_search_evaluations_total", outcome="failed") == 1
    assert value(s, "selfpruner_search_evaluation_device_seconds_total") == 2.0
    assert value(s, "selfpruner_search_tokens_evaluated_total") == 200
    assert value(s, "selfpruner_search_generation") == 1
    assert value(s, "selfpruner_search_best_fitness") == 12.0
    assert value(s, "selfpruner_llm_calls_total") == 2
    assert value(s, "selfpruner_llm_tokens_total", kind="prompt") == 30
    assert value(s, "selfpruner_llm_tokens_total", kind="completion") == 7
    assert value(s, "selfpruner_llm_invalid_replies_total") == 2
    assert value(s, "selfpruner_llm_offspring_total", use="used") == 2
    assert value(s, "selfpruner_llm_offspring_total", use="duplicate") == 0
    assert value(s, "selfpruner_llm_offspring_total", use="repaired") == 1
    assert value(s, "selfpruner_llm_offspring_total", use="replaced") == 1
    assert value(s, "selfpruner_llm_seconds_total") == 1.5  # a batch's seconds counted once
    assert value(s, "selfpruner_search_offspring_total", origin="llm-initial") == 3
    assert value(s, "selfpruner_search_offspring_entered_total", origin="classical") == 1

    # the next generation: more lines, larger totals (and a torn last line from a crash)
    write(tmp_path / "history.jsonl", HIST + MORE)
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"tokens": 9')
    write(tmp_path / "llm_transcript.jsonl",
          CALLS + [{"prompt_tokens": 40, "completion_tokens": 9, "error": None, "batch": 2, "batch_seconds": 0.5}])
    m.update_from(tmp_path, FakeStrategy(2, 10.0, {
        "llm_offspring_asked": 8, "llm_used": 4, "llm_duplicates": 1, "llm_repaired": 2, "llm_replaced": 1,
        "llm_unparseable_replies": 1, "llm_failed_calls": 1},
        {"llm-initial": {"made": 3, "entered": 3}, "classical": {"made": 1, "entered": 1},
         "llm-crossover": {"made": 4, "entered": 1}}))
    s = samples(m.registry)
    assert value(s, "selfpruner_search_evaluations_total", outcome="ok") == 3
    assert value(s, "selfpruner_search_evaluations_total", outcome="failed") == 1
    assert value(s, "selfpruner_search_evaluation_device_seconds_total") == 4.25
    assert value(s, "selfpruner_search_tokens_evaluated_total") == 450
    assert value(s, "selfpruner_search_generation") == 2
    assert value(s, "selfpruner_search_best_fitness") == 10.0
    assert value(s, "selfpruner_llm_calls_total") == 3
    assert value(s, "selfpruner_llm_tokens_total", kind="prompt") == 70
    assert value(s, "selfpruner_llm_tokens_total", kind="completion") == 16
    assert value(s, "selfpruner_llm_invalid_replies_total") == 2
    assert value(s, "selfpruner_llm_offspring_total", use="used") == 4
    assert value(s, "selfpruner_llm_offspring_total", use="duplicate") == 1
    assert value(s, "selfpruner_llm_offspring_total", use="repaired") == 2
    assert value(s, "selfpruner_llm_offspring_total", use="replaced") == 1
    assert value(s, "selfpruner_llm_seconds_total") == 2.0
    assert value(s, "selfpruner_search_offspring_total", origin="llm-crossover") == 4
    assert value(s, "selfpruner_search_offspring_entered_total", origin="llm-crossover") == 1

    # a rewound transcript (fewer lines) never takes a counter down
    write(tmp_path / "llm_transcript.jsonl", CALLS[:1])
    m.update_from(tmp_path, FakeStrategy(2, 10.0, {}))
    s = samples(m.registry)
    assert value(s, "selfpruner_llm_calls_total") == 3
    assert value(s, "selfpruner_llm_offspring_total", use="used") == 4


def test_missing_files_and_no_best(tmp_path):
    m = SearchMetrics("pj")
    m.update_from(tmp_path, SimpleNamespace(generation=0, best=lambda: None))  # no counters either
    s = samples(m.registry)
    assert value(s, "selfpruner_search_evaluations_total", outcome="ok") == 0
    assert value(s, "selfpruner_llm_calls_total") == 0
    assert value(s, "selfpruner_search_generation") == 0


def test_series_follow_conventions(tmp_path):
    m = SearchMetrics("pj")
    m.update_from(tmp_path, FakeStrategy(1, 3.0, {}))
    fams = list(m.registry.collect())
    assert len(fams) == 14
    for fam in fams:
        assert fam.name.startswith("selfpruner_"), fam.name
        for smp in fam.samples:
            assert smp.name.startswith("selfpruner_")
            assert set(smp.labels) <= ALLOWED_LABELS, (smp.name, smp.labels)
            assert smp.labels["prunejob"] == "pj"
            if fam.type == "counter":
                assert smp.name.endswith(("_total", "_created")), smp.name
        assert fam.type in ("counter", "gauge")
    # a second registry for another PruneJob does not clash with the first
    SearchMetrics("other")


def shares(generation, lx, x, lm, m, ls, t):
    """A `generation_log` entry as strategy.py writes it for an llm-evolution generation."""
    return {"generation": generation, "best": 1.0, "shares": {
        "llm-crossover": lx, "crossover": x, "llm-mutation": lm, "mutation": m, "llm-selection": ls, "tournament": t}}


def share_samples(registry) -> dict:
    return {dict(labels)["operator"]: v for (name, labels), v in samples(registry).items()
            if name == "selfpruner_search_offspring_share"}


def test_offspring_share_is_the_newest_generations_split(tmp_path):
    m = SearchMetrics("pj")
    m.update_from(tmp_path, FakeStrategy(0, 3.0, {}, generation_log=[{"generation": 0, "best": 3.0}]))
    assert share_samples(m.registry) == {}  # the initial population shares nothing: no series, not zeros
    log = [{"generation": 0, "best": 3.0}, shares(1, 2, 2, 2, 2, 2, 2)]
    m.update_from(tmp_path, FakeStrategy(1, 3.0, {}, generation_log=log))
    assert share_samples(m.registry) == {arm: 0.5 for arm in ("llm-crossover", "crossover", "llm-mutation",
                                                              "mutation", "llm-selection", "tournament")}
    log.append(shares(2, 1, 9, 3, 7, 4, 0))
    m.update_from(tmp_path, FakeStrategy(2, 3.0, {}, generation_log=log))
    got = share_samples(m.registry)
    assert got == {"llm-crossover": 0.1, "crossover": 0.9, "llm-mutation": 0.3, "mutation": 0.7,
                   "llm-selection": 1.0, "tournament": 0.0}
    # one slot each, both the classical operators': the LLM wrote no offspring, so its parents'
    # group has no share at all (its series go), while the others are still a split of their slots
    log.append(shares(3, 0, 1, 0, 1, 0, 0))
    m.update_from(tmp_path, FakeStrategy(3, 3.0, {}, generation_log=log))
    assert share_samples(m.registry) == {"llm-crossover": 0.0, "crossover": 1.0, "llm-mutation": 0.0, "mutation": 1.0}



def test_serve_over_http(tmp_path):
    m = SearchMetrics("pj")
    write(tmp_path / "history.jsonl", HIST)
    m.update_from(tmp_path, FakeStrategy(3, 7.5, {}))
    port = free_port()
    server, _thread = m.serve(port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'selfpruner_search_generation{prunejob="pj"} 3.0' in body
    assert 'selfpruner_search_best_fitness{prunejob="pj"} 7.5' in body
    assert 'selfpruner_search_evaluations_total{outcome="failed",prunejob="pj"} 1.0' in body
    # only this registry: no process/platform collectors of the global one
    assert "process_" not in body and "python_gc" not in body


def test_offspring_share_follows_an_llm_evolution_run(tiny_job):
    """At every checkpoint of a real llm-evolution search, against an endpoint whose offspring are
    bad so that the split moves, the gauge is the split in the strategy's state; the last one is
    result.json's."""
    from test_allocation import HostileChat

    from selfpruner import spec as spec_mod
    from selfpruner.search import runner

    m, seen = SearchMetrics("pj"), []

    def on_checkpoint(out, strategy):
        m.update_from(out, strategy)
        split = next((dict(g["shares"]) for g in reversed(strategy.generation_log) if g.get("shares")), {})
        seen.append((split, share_samples(m.registry)))

    with HostileChat() as server:
        doc = tiny_job("shares", search={"strategy": "llm-evolution", "population": 8, "generations": 4,
                                         "crossovers": 4, "mutations": 4, "seed": 1},
                       llm={"provider": "openai", "model": "hostile", "baseURL": server.url, "timeoutSeconds": 60})
        result = runner.run(spec_mod.parse(doc), progress=False, on_checkpoint=on_checkpoint)
    # a lost call gives the LLM's arms no evidence and leaves the split even: ruled out here, and named if it
    # happens (the split also stayed even in 6 of 48 runs while HostileChat drew its replies from the model's
    # temporary path; it no longer does)
    assert result["cost"]["llm"]["failed_calls"] == 0
    assert seen[0] == ({}, {})  # the initial population: nothing shared yet
    assert len(seen) == 5
    for split, gauge in seen[1:]:
        groups = [("llm-crossover", "crossover"), ("llm-mutation", "mutation"), ("llm-selection", "tournament")]
        expected = {arm: split[arm] / (split[a] + split[b]) for a, b in groups if split[a] + split[b] for arm in (a, b)}
        assert gauge == pytest.approx(expected), (split, gauge)
    assert seen[-1][0] == result["generations"][-1]["shares"]
    assert seen[1][1]["llm-crossover"] == 0.5 and seen[-1][1]["llm-crossover"] < 0.5  # even at first, then by success


def test_budget_spent_ratio_is_the_strategys_spent_over_its_budget(tmp_path):
    m = SearchMetrics("pj")
    strategy = FakeStrategy(1, 3.0, {})
    strategy.ctx, strategy.spent = SimpleNamespace(budget=430.0), 43.0
    m.update_from(tmp_path, strategy)
    assert value(samples(m.registry), "selfpruner_search_budget_spent_ratio") == pytest.approx(0.1)


def test_budget_spent_ratio_follows_a_search_with_screens_to_its_end(tiny_job):
    """A token budget spent partly on screens: at every checkpoint the gauge is what the strategy has
    spent over its budget, both in full evaluations, and the last one is result.json's."""
    from selfpruner import spec as spec_mod
    from selfpruner.search import runner

    m, seen = SearchMetrics("pj"), []

    def on_checkpoint(out, strategy):
        m.update_from(out, strategy)
        gauge = value(samples(m.registry), "selfpruner_search_budget_spent_ratio")
        seen.append((strategy.spent / strategy.ctx.budget, gauge))

    doc = tiny_job("budget", fitness={"screenTokens": 128, "screenKeep": 0.5}, search={"budget": {"tokens": 512 * 10}})
    result = runner.run(spec_mod.parse(doc), progress=False, on_checkpoint=on_checkpoint)
    assert len(seen) >= 2 and all(gauge == pytest.approx(want) for want, gauge in seen), seen
    assert [g for _, g in seen] == sorted(g for _, g in seen) and 0 < seen[0][1] < seen[-1][1] <= 1 + 1e-9
    cost = result["cost"]
    assert seen[-1][1] == pytest.approx(cost["budget_spent"] / cost["budget_full_evaluations"], abs=1e-3)
    assert cost["budget_full_evaluations"] == 10
