"""batch/v1 Job validation as kube-apiserver does it (pkg/apis/batch/validation and core/v1's pod
template rules), for what a Job from this project can carry: without it the emulator stores a Job a
real server answers with 422, and a product that builds one passes every test.

It checks the pod template (restartPolicy, containers' resources, tolerations, node affinity), the
podFailurePolicy rules, and on update the fields that are immutable.
"""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from typing import Any

from .errors import FieldError

QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10 ** 3, "M": 10 ** 6,
          "G": 10 ** 9, "T": 10 ** 12, "P": 10 ** 15, "E": 10 ** 18, **{s: 1024 ** (i + 1) for i, s in
                                                                         enumerate(["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"])}}
# what a suspended Job that never started may change in its template (Kueue's admission does)
SCHEDULING = ("nodeSelector", "tolerations", "affinity", "schedulingGates")
IMMUTABLE = ("completionMode", "podFailurePolicy", "backoffLimitPerIndex", "selector")


def quantity(value: Any) -> Decimal | None:
    m = QUANTITY.match(str(value))
    if not m:
        return None
    suffix = m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(m.group(1)) * Decimal(10) ** int(suffix[1:])
    return Decimal(m.group(1)) * Decimal(SUFFIX[suffix])


def validate(job: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:
    spec = job.get("spec") or {}
    pod = ((spec.get("template") or {}).get("spec")) or {}
    errors = _template(pod, "spec.template.spec") + _failure_policy(spec, pod)
    if old is not None:
        errors += _immutable(spec, (old.get("spec") or {}), old.get("status") or {})
    return errors


def _template(pod: dict, at: str) -> list[FieldError]:
    errors = []
    policy = pod.get("restartPolicy")
    if policy not in ("OnFailure", "Never"):
        errors.append(FieldError(f"{at}.restartPolicy", "NotSupported", 'supported values: "OnFailure", "Never"',
                                 policy if policy is not None else ""))
    for i, c in enumerate(pod.get("containers") or []):
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for name, value in (res.get(part) or {}).items():
                q = quantity(value)
                where = f"{at}.containers[{i}].resources.{part}[{name}]"
                if q is None:
                    errors.append(FieldError(where, "Invalid", "must be a quantity", value))
                elif q < 0:
                    errors.append(FieldError(where, "Invalid", "must be greater than or equal to 0", value))
        for name, value in (res.get("requests") or {}).items():
            limit = (res.get("limits") or {}).get(name)
            if limit is not None and (quantity(value) or 0) > (quantity(limit) or 0):
                errors.append(FieldError(f"{at}.containers[{i}].resources.requests", "Invalid",
                                         f"must be less than or equal to {name} limit of {limit}", value))
    for i, t in enumerate(pod.get("tolerations") or []):
        where, op = f"{at}.tolerations[{i}]", t.get("operator") or "Equal"
        if not t.get("key") and op != "Exists":
            errors.append(FieldError(f"{where}.operator", "Invalid",
                                     "operator must be Exists when `key` is empty, which means \"match all values and all keys\"", op))
        if op == "Exists" and t.get("value"):
            errors.append(FieldError(f"{where}.operator", "Invalid", "value must be empty when `operator` is 'Exists'",
                                     t["value"]))
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            errors.append(FieldError(f"{where}.effect", "Invalid", "effect must be 'NoExecute' when `tolerationSeconds` is set",
                                     t.get("effect", "")))
    node = ((pod.get("affinity") or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if node is not None and not node.get("nodeSelectorTerms"):
        errors.append(FieldError(f"{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
                                 "Required", "must have at least one node selector term"))
    return errors


def _failure_policy(spec: dict, pod: dict) -> list[FieldError]:
    rules = (spec.get("podFailurePolicy") or {}).get("rules")
    if rules is None:
        return []
    errors = []
    if pod.get("restartPolicy") != "Never":
        errors.append(FieldError("spec.template.spec.restartPolicy", "Invalid",
                                 'only "Never" is supported when podFailurePolicy is specified', pod.get("restartPolicy", "")))
    names = {c.get("name") for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])}
    for i, rule in enumerate(rules):
        at = f"spec.podFailurePolicy.rules[{i}]"
        if rule.get("action") == "FailIndex" and spec.get("backoffLimitPerIndex") is None:
            errors.append(FieldError(f"{at}.action", "Invalid", "requires the backoffLimitPerIndex to be set", "FailIndex"))
        codes, conds = rule.get("onExitCodes"), rule.get("onPodConditions")
        if (codes is None) == (conds is None):
            errors.append(FieldError(at, "Invalid", "specifying one of OnExitCodes and OnPodConditions is required", ""))
        if not codes:
            continue
        if codes.get("containerName") is not None and codes["containerName"] not in names:
            errors.append(FieldError(f"{at}.onExitCodes.containerName", "Invalid",
                                     "must be one of the container or initContainer names in the pod template",
                                     codes["containerName"]))
        values, seen = codes.get("values") or [], set()
        for j, v in enumerate(values):
            where = f"{at}.onExitCodes.values[{j}]"
            if codes.get("operator") == "In" and v == 0:
                errors.append(FieldError(where, "Invalid", "must not be 0 for the In operator", v))
            if v in seen:
                errors.append(FieldError(where, "Duplicate", value=v))
            if j and values[j - 1] > v:
                errors.append(FieldError(where, "Invalid", "must be ordered", v))
            seen.add(v)
    return errors


def _immutable(spec: dict, old: dict, status: dict) -> list[FieldError]:
    errors = [FieldError(f"spec.{k}", "Invalid", "field is immutable", spec.get(k)) for k in IMMUTABLE
              if k in old and spec.get(k) != old.get(k)]
    if spec.get("completions") != old.get("completions") and not (   # elastic Indexed Jobs scale both at once
            spec.get("completionMode") == "Indexed" and spec.get("completions") == spec.get("parallelism")
            and old.get("completions") == old.get("parallelism")):
        errors.append(FieldError("spec.completions", "Invalid", "field is immutable", spec.get("completions")))
    new_t, old_t = copy.deepcopy(spec.get("template") or {}), copy.deepcopy(old.get("template") or {})
    if old.get("suspend") and not status.get("startTime"):
        for t in (new_t, old_t):
            for k in SCHEDULING:
                (t.get("spec") or {}).pop(k, None)
            t.get("metadata", {}).pop("labels", None)
            t.get("metadata", {}).pop("annotations", None)
    if new_t != old_t:
        errors.append(FieldError("spec.template", "Invalid", "field is immutable", "{...}"))
    return errors
