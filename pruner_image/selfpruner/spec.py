"""The PruneJob spec: read a YAML file, check it against the CRD's own schema, apply the
schema's defaults, evaluate the CRD's CEL rules (as the API server would), then the few
rules neither can say.

`crds/prunejob.yaml` is the single source of truth; nothing here repeats its fields or
defaults. Every problem is reported, one line each, naming the field path.
"""

from __future__ import annotations

import copy
import os
import re
from functools import lru_cache
from pathlib import Path

import yaml

from . import pod_scheduling
from .errors import UserError

NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecErrors(UserError):
    """Several problems, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def crd_path() -> Path:
    """The CRD shipped inside the package: a link to `crds/prunejob.yaml` in a checkout,
    a copy of it in an installed wheel."""
    return Path(__file__).parent / "crds" / "prunejob.yaml"


@lru_cache(maxsize=1)
def crd() -> dict:
    return yaml.safe_load(crd_path().read_text())


def _served() -> dict:
    return next(v for v in crd()["spec"]["versions"] if v.get("storage"))


# the API group, version, kind and phases: read from the CRD, written nowhere else
GROUP, VERSION = crd()["spec"]["group"], _served()["name"]
PLURAL, KIND = crd()["spec"]["names"]["plural"], crd()["spec"]["names"]["kind"]
API_VERSION = f"{GROUP}/{VERSION}"
PHASES = tuple(_served()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["phase"]["enum"])


def schema() -> dict:
    """The openAPIV3Schema of the served version."""
    return _served()["schema"]["openAPIV3Schema"]


class Section(dict):
    """A spec section with attribute access in snake_case: `spec.fitness.screen_tokens`."""

    def __getattr__(self, name: str):
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        try:
            value = self[camel]
        except KeyError:
            raise AttributeError(name) from None
        return Section(value) if isinstance(value, dict) else value


def _strict(node: dict) -> dict:
    """Kubernetes rejects unknown fields (strict field validation); so do we."""
    node = dict(node)
    if node.get("type") == "object" and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        node.setdefault("additionalProperties", False)
    if node.get("type") == "array" and isinstance(node.get("items"), dict):
        node["items"] = _strict(node["items"])
        if node.get("x-kubernetes-list-type") == "set":  # the API server answers a repeat "Duplicate value"
            node["uniqueItems"] = True
    return node


def _apply_defaults(node: dict, value):
    """Fill in defaults the way the API server does: for absent fields with a default,
    recursing into objects (a defaulted `{}` gets its own fields' defaults too)."""
    if not isinstance(value, dict) or node.get("type") != "object":
        return value
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _apply_defaults(sub, value[key])
    return value


def defaulted_spec(spec: dict) -> dict:
    """A copy of `spec` with the CRD's defaults filled in, as the API server stores it: readers use
    this instead of fallbacks of their own (one source of defaults)."""
    return _apply_defaults(schema()["properties"]["spec"], copy.deepcopy(dict(spec)))


def _path(error) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else p)
    text = ".".join(str(p) for p in parts).replace(".[", "[")
    return text or "(document)"


def _schema_problems(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft4Validator(_strict(schema()))
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        if error.validator == "additionalProperties":
            extra = re.findall(r"'([^']+)'", error.message.split("(")[-1])
            for name in extra or ["?"]:
                problems.append(f"{_path(error)}.{name}: unknown field".lstrip("."))
        elif error.validator == "required":
            missing = re.findall(r"'([^']+)'", error.message)[:1]
            problems.append(f"{_path(error)}.{missing[0] if missing else '?'}: required field is missing".lstrip("."))
        else:
            problems.append(f"{_path(error)}: {error.message}")
    return problems


def _cel_problems(node: dict, value, path: str) -> list[str]:
    """Evaluate the CRD's CEL rules (`x-kubernetes-validations`) where the API server
    would, with the same messages. Transition rules (those that use `oldSelf`) only apply
    to updates in a cluster and are skipped here."""
    problems = []
    if isinstance(value, dict):
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            try:
                ok = _cel(rule["rule"], value)
            except Exception:  # a field the rule reads is itself invalid: the schema's lines say so
                continue
            if not ok:
                problems.append(f"{path}: {rule.get('message') or 'failed rule ' + rule['rule']}")
        for key, sub in node.get("properties", {}).items():
            if key in value:
                problems += _cel_problems(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            problems += _cel_problems(node["items"], item, f"{path}[{i}]")
    return problems


@lru_cache(maxsize=64)
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel(rule: str, value) -> bool:
    from celpy import json_to_cel

    return bool(_program(rule).evaluate({"self": json_to_cel(value)}))


QUANTITY_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _cluster_problems(spec: dict) -> list[str]:
    """Values the API server would refuse once they are in a Job: caught before any Job is made."""
    problems = []
    ev = spec.get("evaluator") or {}
    for key, example in (("cpu", "4, 500m"), ("memory", "32Gi"), ("cacheSize", "300Gi")):
        if key == "cacheSize" and ev.get(key) is None:
            continue
        value = str(ev.get(key, ""))
        if not QUANTITY_RE.match(value):
            problems.append(f"spec.evaluator.{key}: {value!r} is not a Kubernetes quantity (e.g. {example})")
        elif value.startswith("-"):
            problems.append(f"spec.evaluator.{key}: {value!r} is negative; a pod's resources must be at least 0")
    problems += pod_scheduling.toleration_problems(ev.get("tolerations"))
    if ev.get("affinity") is not None:
        problems += pod_scheduling.affinity_problems(ev["affinity"])
    if ev.get("gpuMemory") is not None:
        from .memory_plan import parse_bytes

        try:
            parse_bytes(ev["gpuMemory"])
        except UserError as e:
            problems.append(str(e))
    queue = spec.get("queueName")
    if queue is not None and (len(queue) > 63 or not LABEL_VALUE_RE.match(queue)):
        problems.append(f"spec.queueName: {queue!r} is not a label value (63 characters at most, letters, digits, "
                        "'-', '_', '.', alphanumeric at both ends)")
    pc = ev.get("priorityClassName")
    if pc and (len(pc) > 253 or not pod_scheduling.SUBDOMAIN_RE.match(pc)):
        problems.append(f"spec.evaluator.priorityClassName: {pc!r} is not a valid name (lower-case DNS subdomain)")
    for key, value in (ev.get("nodeSelector") or {}).items():
        if not pod_scheduling.label_key_ok(str(key)):
            problems.append(f"spec.evaluator.nodeSelector: {key!r} is not a label key")
        if isinstance(value, str) and (len(value) > 63 or not LABEL_VALUE_RE.match(value)):
            problems.append(f"spec.evaluator.nodeSelector.{key}: {value!r} is not a label value")
    return problems


def _place_problems(spec: dict) -> list[str]:
    problems = []
    source = str((spec.get("model") or {}).get("source") or "")
    if source.startswith("s3://") and not source[len("s3://"):].partition("/")[2].strip("/"):
        problems.append(f"spec.model.source: {source} names a bucket, not a model folder in it; "
                        "give s3://bucket/prefix")
    if not spec.get("storage"):  # a local run writes under output.path
        out = Path((spec.get("output") or {}).get("path") or "runs").expanduser()
        if out.exists() and not out.is_dir():
            problems.append(f"spec.output.path: {out} is a file; give a folder")
        else:
            parent = out
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                problems.append(f"spec.output.path: cannot create or write {out} ({parent} is not writable)")
    return problems


def _budget_text(given: dict) -> str:
    return f"{given['tokens']} tokens" if "tokens" in given else f"{given.get('evaluations'):g} evaluations"


def _rule_problems(doc: dict) -> list[str]:
    """What neither the schema nor CEL can say well."""
    problems = _cluster_problems(doc["spec"]) + _place_problems(doc["spec"])
    name = doc.get("metadata", {}).get("name")
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 63:
        problems.append("metadata.name: required; lower-case letters, digits and '-', at most 63 characters")
    s, f = doc["spec"]["search"], doc["spec"]["fitness"]
    given = s.get("budget") or {}
    evaluations = (given["tokens"] / f["tokens"] if "tokens" in given else given.get("evaluations", 0)) if given else 0
    if given and evaluations < 1:  # not one candidate could be scored: the search would end with nothing
        problems.append(f"spec.search.budget: {_budget_text(given)} pays for less than one evaluation of "
                        f"spec.fitness.tokens = {f['tokens']} tokens; give at least {f['tokens']} tokens "
                        "(or evaluations: 1)")
    elif given and s["strategy"] in ("genetic", "llm-evolution"):
        if evaluations < s["population"]:
            problems.append(f"spec.search.budget: {evaluations:g} full evaluations do not pay for the initial "
                            f"population of {s['population']}; raise the budget or lower spec.search.population")
    t = doc["spec"]["target"]
    for key in ("minRate", "maxRate"):
        units = t[key] / t["grid"]
        if abs(units - round(units)) > 1e-6:
            problems.append(f"spec.target.{key}: {t[key]} is not a multiple of grid {t['grid']}")
    return problems


def parse(doc) -> Section:
    """Validate a PruneJob document (already parsed YAML); returns it with defaults applied."""
    if not isinstance(doc, dict):
        raise SpecErrors(["(document): a PruneJob must be a YAML mapping"])
    problems = []
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION}, got {doc.get('apiVersion')!r}")
    if doc.get("kind") != KIND:
        problems.append(f"kind: must be {KIND}, got {doc.get('kind')!r}")
    if not isinstance(doc.get("metadata"), dict):
        raise SpecErrors(problems + [f"metadata: must be a mapping with a name, got "
                                     f"{type(doc.get('metadata')).__name__ if doc.get('metadata') is not None else 'nothing'}"])
    if not isinstance(doc.get("spec"), dict):
        raise SpecErrors(problems + ["spec: must be a mapping (model, target, ...)"])
    doc = _apply_defaults(schema(), copy.deepcopy(doc))
    problems += _schema_problems(doc)
    problems += [p.lstrip(".") for p in _cel_problems(schema(), doc, "")]
    try:
        problems += _rule_problems(doc)
    except (KeyError, TypeError, ZeroDivisionError):
        pass  # a field the rules need is itself invalid; the schema's lines say which
    if problems:
        raise SpecErrors(problems)
    return Section(doc)


def load(path: str | Path) -> Section:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not readable: {e}") from None
    from .yaml_input import load_all

    docs = load_all(text, str(path))
    if len(docs) != 1:
        raise UserError(f"{path}: expected one PruneJob document, found {len(docs)}")
    try:
        return parse(docs[0])
    except SpecErrors as e:
        raise SpecErrors([f"{path}: {p}" for p in e.problems]) from None


def budget(spec: Section) -> float:
    """Full-fidelity evaluations the search may spend: `search.budget` (tokens / fitness.tokens, or
    evaluations) when given, else κ + generations × (crossovers + mutations)."""
    s = spec.spec.search
    given = s.get("budget")
    if given:
        return given["tokens"] / spec.spec.fitness.tokens if "tokens" in given else float(given["evaluations"])
    return s.population + s.generations * (s.crossovers + s.mutations)
