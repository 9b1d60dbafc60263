"""The operator's Prometheus series (selfpruner_ prefix, base units). Labels are bounded: a
PruneJob's namespace, its phase, the reason of its Failed condition (status.FAILURE_REASONS);
never a PruneJob's name (the controller pod's series carry that).

The operator exposes `namespace` itself, so its scrape must keep it: a ServiceMonitor or PodMonitor
with `honorLabels: true` (as for kube-state-metrics); without it Prometheus renames it
`exported_namespace` and sets `namespace` to the operator's own."""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from selfpruner.cluster.status import FAILED, FAILURE_REASONS, OTHER_REASON, PHASES, SUCCEEDED

prunejobs = Gauge("selfpruner_prunejobs", "PruneJobs the operator knows, by namespace and phase",
                  ["namespace", "phase"])
succeeded = Counter("selfpruner_prunejobs_succeeded_total", "PruneJobs that reached phase Succeeded",
                    ["namespace"])
failed = Counter("selfpruner_prunejobs_failed_total",
                 "PruneJobs that reached phase Failed, by the reason of their Failed condition",
                 ["namespace", "reason"])
reconcile_errors = Counter("selfpruner_operator_reconcile_errors_total", "Reconciliations that raised an error")
reconcile_seconds = Histogram("selfpruner_operator_reconcile_duration_seconds", "Time spent in one reconciliation")
controller_restarts = Counter("selfpruner_operator_controller_restarts_total",
                              "Controller Jobs started again after a loss")

_phases: dict[str, str] = {}  # "namespace/name" -> phase
_namespaces: set[str] = set()  # namespaces whose counters exist
_finished: set[str] = set()  # uids of PruneJobs counted as finished by this process


def record_phase(key: str, phase: str | None) -> None:
    """The phase of PruneJob `key` ("namespace/name"); None when it is gone. A namespace's gauge has
    every phase (0 for none) while it has PruneJobs, and no series once it has none."""
    namespace = key.split("/", 1)[0]
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
        _known(namespace)
    counts = Tally(p for k, p in _phases.items() if k.split("/", 1)[0] == namespace)
    if not counts:
        for p in PHASES:
            try:
                prunejobs.remove(namespace, p)
            except KeyError:
                pass
        return
    for p in PHASES:
        prunejobs.labels(namespace=namespace, phase=p).set(counts[p])


def _known(namespace: str) -> None:
    """Every child of the namespace's counters starts at 0, so that the first PruneJob to succeed or to
    fail for a reason is an increase Prometheus sees (a series that appears at 1 shows none)."""
    if namespace in _namespaces:
        return
    _namespaces.add(namespace)
    succeeded.labels(namespace=namespace)
    for reason in (*FAILURE_REASONS, OTHER_REASON):
        failed.labels(namespace=namespace, reason=reason)


def record_finished(uid: str, namespace: str, phase: str, reason: str) -> None:
    """Count a PruneJob that reached Succeeded or Failed (`reason`: status.failure_reason), once.

    The handler calls this from the first reconciliation of a finished PruneJob, the one that writes
    status.childrenStopped; a PruneJob with childrenStopped set is never counted again, so a restarted
    operator does not count the PruneJobs that finished before it, and does count those that
    finished while no operator ran. `_finished` keeps this process from counting one twice before
    that write is seen. A restart between the count and the write counts the PruneJob again, and a
    new operator's counters start from 0 (an ordinary counter reset for increase())."""
    if uid in _finished:
        return
    _finished.add(uid)
    _known(namespace)
    if phase == SUCCEEDED:
        succeeded.labels(namespace=namespace).inc()
    elif phase == FAILED:
        failed.labels(namespace=namespace, reason=reason if reason in FAILURE_REASONS else OTHER_REASON).inc()


def forget(uid: str) -> None:
    _finished.discard(uid)


def serve(port: int) -> None:
    start_http_server(port)
