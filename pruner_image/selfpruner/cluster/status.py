"""A PruneJob's status: its phases and conditions, and how a change merges into what is there.

Two writers share it: the operator (the controller Job's life) and the controller (the search's
progress and verdict). Both merge conditions by type, so neither drops the other's; a condition
whose status is unchanged keeps its lastTransitionTime (how long a controller pod has been stuck
is read from it).
"""

from __future__ import annotations

import datetime

from ..spec import API_VERSION, GROUP, KIND, PHASES, PLURAL, VERSION  # noqa: F401  (re-exported)

PENDING, RUNNING, SUSPENDED = "Pending", "Running", "Suspended"
SUCCEEDED, FAILED, INVALID = "Succeeded", "Failed", "Invalid"
TERMINAL = (SUCCEEDED, FAILED, INVALID)
assert set(TERMINAL) | {PENDING, RUNNING, SUSPENDED} <= set(PHASES), "phases the CRD does not list"


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
