"""The controller's search metrics: absolute totals from the run's files, served over HTTP."""

from __future__ import annotations

import json
import socket
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from selfpruner.cluster.metrics import SearchMetrics  # noqa: E402

ALLOWED_LABELS = {"prunejob", "outcome", "kind", "use", "origin"}


class FakeStrategy:
    def __init__(self, generation, best, counters, origins=None):
        self.generation, self._best, self.counters = generation, best, counters
        self.origins = origins or {}

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
    assert len(fams) == 12
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
