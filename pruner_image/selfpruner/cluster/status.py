"""A PruneJob's status: its phases and conditions, and how a change merges into what is there.

Two writers share it: the operator (the controller Job's life) and the controller (the search's
progress and verdict). Both merge conditions by type, so neither drops the other's; a condition
whose status is unchanged keeps its lastTransitionTime (how long a controller pod has been stuck
is read from it).
"""

from __future__ import annotations

import datetime
import math

from ..spec import API_VERSION, GROUP, KIND, PHASES, PLURAL, VERSION  # noqa: F401  (re-exported)

PENDING, RUNNING, SUSPENDED = "Pending", "Running", "Suspended"
SUCCEEDED, FAILED, INVALID = "Succeeded", "Failed", "Invalid"
TERMINAL = (SUCCEEDED, FAILED, INVALID)
assert set(TERMINAL) | {PENDING, RUNNING, SUSPENDED} <= set(PHASES), "phases the CRD does not list"

# Every reason a Failed condition is written with: the controller's verdicts (failures.Verdict and
# failures.classify) and the operator's (handlers._fail). A closed set, so that a metric may carry it
# as a label (the operator's selfpruner_prunejobs_failed_total); tests/test_crd_conventions.py finds
# every reason in the code and fails on one missing here. Anything else is counted as OTHER_REASON.
FAILURE_REASONS = (
    "ApiRejected", "ControllerCannotRun", "ControllerError", "ControllerLost", "ControllerNotStarting",
    "EvaluationNotStarting", "FinalizeFailed", "InvalidInput", "JobConflict", "JobTimeout", "ModelDoesNotFit",
    "PolicyViolation", "PrepareFailed", "TooManyFailedEvaluations")
OTHER_REASON = "Other"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: str, reason: str, message: str, generation: int | None) -> dict:
    """A status condition as Kubernetes writes them."""
    return {"type": type_, "status": status, "reason": reason, "message": message[:2000],
            "lastTransitionTime": now(), "observedGeneration": generation or 0}


def merge_conditions(old: list | None, new: list) -> list:
    by_type = {c["type"]: c for c in old or []}
    for c in new:
        prev = by_type.get(c["type"])
        if prev and prev.get("status") == c["status"]:
            c = {**c, "lastTransitionTime": prev.get("lastTransitionTime", c["lastTransitionTime"])}
        by_type[c["type"]] = c
    return list(by_type.values())


def find(conditions: list | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def seconds_since(timestamp: str | None) -> float:
    if not timestamp:
        return 0.0
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    return (datetime.datetime.now(datetime.timezone.utc) - then).total_seconds()


def failed(reason: str, message: str, generation: int | None, old: list | None = None) -> dict:
    """The status of a PruneJob that failed for good: phase, and the reason in a condition (pod
    logs vanish; the status stays)."""
    return {"phase": FAILED, "conditions": merge_conditions(old, [
        condition(RUNNING, "False", reason, message, generation),
        condition(FAILED, "True", reason, message, generation)])}


def failure_reason(conditions: list | None) -> str:
    """The Failed condition's reason, as a bounded label value: one of FAILURE_REASONS, else OTHER_REASON."""
    reason = (find(conditions, FAILED) or {}).get("reason")
    return reason if reason in FAILURE_REASONS else OTHER_REASON


def progress(spent: float, budget: float) -> dict:
    """status.budget, status.budgetSpent (full-fidelity evaluations) and status.progress, the two as
    "spent/budget" text for `kubectl get -o wide` (e.g. "128/430", "2.5/8")."""
    return {"budget": round(float(budget), 3), "budgetSpent": round(float(spent), 3),
            "progress": f"{_amount(spent, down=True)}/{_amount(budget)}"}


def _amount(x: float, down: bool = False) -> str:
    """Whole numbers from 10 up, one decimal below; what is spent is rounded down (never "430/430"
    before the last evaluation)."""
    x = float(x)
    if down:
        x = math.floor(x + 1e-9) if x >= 10 else math.floor(x * 10 + 1e-9) / 10
    return f"{x:.0f}" if round(x, 1) >= 10 else f"{x:.1f}".removesuffix(".0")
