"""The operator's Prometheus series (selfpruner_ prefix, base units, no per-object labels)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from selfpruner.cluster.status import PHASES

prunejobs = Gauge("selfpruner_prunejobs", "PruneJobs by phase", ["phase"])
reconcile_errors = Counter("selfpruner_operator_reconcile_errors_total", "Reconciliations that raised an error")
reconcile_seconds = Histogram("selfpruner_operator_reconcile_duration_seconds", "Time spent in one reconciliation")
controller_restarts = Counter("selfpruner_operator_controller_restarts_total",
                              "Controller Jobs started again after a loss")

_phases: dict[str, str] = {}


def record_phase(key: str, phase: str | None) -> None:
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    for p in PHASES:
        prunejobs.labels(phase=p).set(sum(1 for v in _phases.values() if v == p))


def serve(port: int) -> None:
    start_http_server(port)
