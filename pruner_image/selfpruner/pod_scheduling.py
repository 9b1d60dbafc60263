"""What kube-apiserver would refuse, or silently drop, in the scheduling fields a PruneJob passes
through to its pods (`spec.evaluator.tolerations` and `.affinity`).

The CRD can only type these loosely (affinity is passed through as written), so without this a
PruneJob with `operator: Exists` and a `value`, an empty `nodeSelectorTerms` or a misspelt
`requiredDuringScheduling` is admitted, the controller starts, and its first GPU Job is refused
(422) or runs without the constraint the user wrote. The rules are core/v1's validation of a Pod
(`ValidateTolerations`, `ValidateAffinity`), for the fields a user writes.
"""

from __future__ import annotations

import re

LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")

NODE_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
LABEL_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
FIELDS = {  # the fields of each core/v1 type below Affinity, and the type of each that has one
    "Affinity": {"nodeAffinity": "NodeAffinity", "podAffinity": "PodAffinity", "podAntiAffinity": "PodAffinity"},
    "NodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "NodeSelector",
                     "preferredDuringSchedulingIgnoredDuringExecution": "[PreferredSchedulingTerm]"},
    "NodeSelector": {"nodeSelectorTerms": "[NodeSelectorTerm]"},
    "PreferredSchedulingTerm": {"weight": None, "preference": "NodeSelectorTerm"},
    "NodeSelectorTerm": {"matchExpressions": "[NodeSelectorRequirement]", "matchFields": "[NodeSelectorRequirement]"},
    "NodeSelectorRequirement": {"key": None, "operator": None, "values": None},
    "PodAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": "[PodAffinityTerm]",
                    "preferredDuringSchedulingIgnoredDuringExecution": "[WeightedPodAffinityTerm]"},
    "WeightedPodAffinityTerm": {"weight": None, "podAffinityTerm": "PodAffinityTerm"},
    "PodAffinityTerm": {"labelSelector": "LabelSelector", "namespaceSelector": "LabelSelector", "namespaces": None,
                        "topologyKey": None, "matchLabelKeys": None, "mismatchLabelKeys": None},
    "LabelSelector": {"matchLabels": None, "matchExpressions": "[LabelSelectorRequirement]"},
    "LabelSelectorRequirement": {"key": None, "operator": None, "values": None},
}


def label_key_ok(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (0 < len(name) <= 63 and bool(LABEL_NAME_RE.match(name))
            and (not prefix or (len(prefix) <= 253 and bool(SUBDOMAIN_RE.match(prefix)))))


def toleration_problems(tolerations, where: str = "spec.evaluator.tolerations") -> list[str]:
    problems = []
    for i, t in enumerate(tolerations or []):
        at, op = f"{where}[{i}]", t.get("operator") or "Equal"
        if not t.get("key") and op != "Exists":
            problems.append(f"{at}: a toleration without a key must have operator Exists")
        if t.get("key") and not label_key_ok(str(t["key"])):
            problems.append(f"{at}.key: {t['key']!r} is not a taint key (a label key such as nvidia.com/gpu)")
        if op == "Exists" and t.get("value"):
            problems.append(f"{at}.value: must be empty with operator Exists (it matches any value)")
        if t.get("tolerationSeconds") is not None and t.get("effect") != "NoExecute":
            problems.append(f"{at}.tolerationSeconds: only with effect NoExecute")
    return problems


def affinity_problems(affinity, where: str = "spec.evaluator.affinity") -> list[str]:
    problems: list[str] = []
    _check(affinity, "Affinity", where, problems)
    return problems


def _check(value, kind: str, at: str, problems: list[str]) -> None:
    if kind.startswith("["):
        if not isinstance(value, list):
            problems.append(f"{at}: must be a list")
            return
        for i, item in enumerate(value):
            _check(item, kind[1:-1], f"{at}[{i}]", problems)
        return
    if not isinstance(value, dict):
        problems.append(f"{at}: must be an object ({kind})")
        return
    fields = FIELDS[kind]
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{at}.{key}: not a field of {kind} (the API server would drop it; check the spelling)")
        elif fields[key] is not None and item is not None:
            _check(item, fields[key], f"{at}.{key}", problems)
    rule = RULES.get(kind)
    if rule:
        problems.extend(f"{at}{p}" for p in rule(value))


def _node_selector(v: dict) -> list[str]:
    return [] if v.get("nodeSelectorTerms") else [".nodeSelectorTerms: needs at least one term"]


def _weight(v: dict) -> list[str]:
    w = v.get("weight")
    return [] if isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 100 else [
        f".weight: {w!r} must be an integer from 1 to 100"]


def _requirement(v: dict, operators: tuple[str, ...]) -> list[str]:
    key, op, values = str(v.get("key") or ""), v.get("operator"), v.get("values") or []
    out = [] if label_key_ok(key) else [f".key: {key!r} is not a label key"]
    if op not in operators:
        return out + [f".operator: {op!r} must be one of {', '.join(operators)}"]
    if op in ("In", "NotIn") and not values:
        out.append(f".values: operator {op} needs at least one value")
    if op in ("Exists", "DoesNotExist") and values:
        out.append(f".values: must be empty with operator {op}")
    if op in ("Gt", "Lt") and (len(values) != 1 or not re.fullmatch(r"-?\d+", str(values[0]))):
        out.append(f".values: operator {op} needs exactly one integer value")
    return out


def _term(v: dict) -> list[str]:
    out = []
    for i, f in enumerate(v.get("matchFields") or []):
        if isinstance(f, dict) and (f.get("key") != "metadata.name" or f.get("operator") not in ("In", "NotIn")
                                    or len(f.get("values") or []) != 1):
            out.append(f".matchFields[{i}]: only key metadata.name, operator In or NotIn, with exactly one value")
    return out


def _pod_term(v: dict) -> list[str]:
    key = str(v.get("topologyKey") or "")
    return [] if label_key_ok(key) else [f".topologyKey: {key!r} must be a label key (e.g. kubernetes.io/hostname)"]


RULES = {
    "NodeSelector": _node_selector,
    "PreferredSchedulingTerm": _weight,
    "WeightedPodAffinityTerm": _weight,
    "NodeSelectorTerm": _term,
    "NodeSelectorRequirement": lambda v: _requirement(v, NODE_OPERATORS),
    "LabelSelectorRequirement": lambda v: _requirement(v, LABEL_OPERATORS),
    "PodAffinityTerm": _pod_term,
}
