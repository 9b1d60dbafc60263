"""The PruneJob CRD follows the conventions a platform engineer expects of a Kubernetes API, as Katib,
JobSet and Kueue do: every field is described for `kubectl explain`; `kubectl get` says where each
PruneJob is and why (wide: how far its search is); a category and a short name; and the status
declares every field its two writers (the operator, the controller) write, since the API server prunes
what it does not declare."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from k8s import Cluster, find_kubectl
from selfpruner.cluster import status as st

ROOT = Path(__file__).resolve().parents[1]
CRD = yaml.safe_load((ROOT / "crds" / "prunejob.yaml").read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
STATUS = SCHEMA["properties"]["status"]["properties"]


def fields(node: dict, path: str = ""):
    """(dotted path, schema) of every property below `node`, array items and map values included."""
    for name, child in (node.get("properties") or {}).items():
        yield f"{path}.{name}", child
        yield from fields(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield f"{path}[]", node["items"]
        yield from fields(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from fields(node["additionalProperties"], f"{path}{{}}")


def test_every_field_has_a_description():
    """`kubectl explain prunejob.spec...` has something to say about every field: what it is, its
    values, its unit, its default."""
    assert len(SCHEMA.get("description", "")) > 40
    found = list(fields(SCHEMA))
    assert len(found) > 120, len(found)
    missing = [path for path, node in found if not (node.get("description") or "").strip()]
    assert not missing, f"fields without a description: {missing}"
    for top in ("spec", "status"):
        assert len(SCHEMA["properties"][top]["description"]) > 40, top
    # not filler: no description is its field's name again, or a few words
    name = lambda path: path.rstrip("[]").rsplit(".", 1)[-1]  # noqa: E731
    short = [(path, node["description"]) for path, node in found
             if len(node["description"]) < 15 or node["description"].strip(". ").lower() == name(path).lower()]
    assert not short, short


def test_every_default_is_said():
    """A field the API server defaults says its default (an empty object's default is its fields')."""
    unsaid = [path for path, node in fields(SCHEMA["properties"]["spec"], "spec")
              if "default" in node and node["default"] != {} and "default" not in node["description"].lower()]
    assert not unsaid, unsaid


def test_printer_columns_say_where_a_prunejob_is_and_why():
    columns = VERSION["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Phase", "Reason", "Best", "Metric", "Restarts", "Suspended", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == [
        "Strategy", "Progress", "Evaluations", "Ratio", "Generation"]  # `kubectl get -o wide`
    by_name = {c["name"]: c for c in columns}
    assert by_name["Reason"]["jsonPath"] == f'.status.conditions[?(@.type=="{st.RUNNING}")].reason'
    assert by_name["Metric"]["jsonPath"] == ".status.fitnessMetric"  # "Best PPL" was wrong for kl fitness
    for c in columns:
        assert c["type"] in ("integer", "number", "string", "boolean", "date"), c
        # every plain path names a field the schema declares (a pruned field would be an empty column)
        path = c["jsonPath"]
        if "[" in path or path.startswith(".metadata."):
            continue
        node = SCHEMA
        for part in path.strip(".").split("."):
            assert part in (node.get("properties") or {}), (c["name"], path)
            node = node["properties"][part]
        assert node.get("type") == c["type"] or (c["type"] == "number" and node.get("type") in ("number", "integer")), \
            (c["name"], node)
    assert CRD["spec"]["names"]["categories"] == ["selfpruner"]  # `kubectl get selfpruner`; not `all`
    assert CRD["spec"]["names"]["shortNames"] == ["pj"]


def test_the_status_declares_what_its_writers_write():
    """Every key the operator (patch.status[...]) and the controller (kube.patch_status({...}) and the
    status helpers) write into status is declared in the CRD: a real API server drops the rest."""
    written = set(re.findall(r'patch\.status\["(\w+)"\]',
                             (ROOT / "operator" / "selfpruner_operator" / "handlers.py").read_text()))
    assert {"observedGeneration", "phase", "controllerJob", "childrenStopped"} <= written
    for source in ("controller.py", "k8s_executor.py"):
        tree = ast.parse((ROOT / "pruner_image" / "selfpruner" / "cluster" / source).read_text())
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "attr", "") == "patch_status":
                for arg in call.args:
                    if isinstance(arg, ast.Dict):
                        written |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
    written |= set(st.progress(1, 2)) | set(st.failed("X", "y", 1))
    assert {"fitnessMetric", "budget", "budgetSpent", "progress", "bestFitness", "evaluations"} <= written
    assert written <= set(STATUS), written - set(STATUS)


def test_failure_reasons_in_the_code_are_the_known_ones():
    """The Failed condition's reason labels the operator's failed counter: a closed set. Every reason the
    code fails a PruneJob with must be in status.FAILURE_REASONS (else it is counted as Other)."""
    cluster = ROOT / "pruner_image" / "selfpruner" / "cluster"
    found = set()
    for path in cluster.glob("*.py"):
        found |= set(re.findall(r'Verdict\(\s*"(\w+)"', path.read_text()))
    found |= set(re.findall(r'return "(\w+)", ', (cluster / "failures.py").read_text()))
    handlers = (ROOT / "operator" / "selfpruner_operator" / "handlers.py").read_text()
    operator = set(re.findall(r'_fail\(body, meta, status, patch, key, "(\w+)"', handlers))
    assert "SpecInvalid" in operator  # phase Invalid, not Failed: not a failure reason
    found |= operator - {"SpecInvalid"}
    assert {"TooManyFailedEvaluations", "ControllerLost", "JobConflict", "ControllerError"} <= found
    assert found == set(st.FAILURE_REASONS), (found ^ set(st.FAILURE_REASONS))
    assert st.failure_reason(st.failed("JobTimeout", "m", 1)["conditions"]) == "JobTimeout"
    assert st.failure_reason([{"type": "Failed", "status": "True", "reason": "SomethingNew"}]) == st.OTHER_REASON


def test_progress_is_spent_over_budget_in_full_evaluations():
    assert st.progress(0, 430) == {"budget": 430.0, "budgetSpent": 0.0, "progress": "0/430"}
    assert st.progress(128.75, 430)["progress"] == "128/430"
    assert st.progress(429.9, 430)["progress"] == "429/430"  # never all spent before it is
    assert st.progress(2.55, 3.5)["progress"] == "2.5/3.5"
    assert st.progress(12, 12)["progress"] == "12/12"


@pytest.mark.skipif(find_kubectl() is None, reason="no kubectl: run `make tools/bin/kubectl`")
def test_kubectl_reads_the_columns_from_a_stored_prunejob(tmp_path):
    """The columns' JSON paths, as kubectl's JSONPath (the API server's) reads them from a PruneJob the
    strict test API server stored (the status written through /status, pruned by the schema). The
    emulator prints only plain paths in its tables, so the filter is checked with -o jsonpath."""
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.create({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob", "metadata": {"name": "demo"},
                        "spec": {"model": {"source": "demo"}, "target": {"ratio": 0.3},
                                 "fitness": {"metric": "kl"}, "search": {"strategy": "genetic"}}}, "default")
        failed = st.failed("TooManyFailedEvaluations", "11 evaluations failed for good", 1)
        conditions = st.merge_conditions([st.condition("ControllerStarted", "True", "JobCreated", "j", 1)],
                                         failed["conditions"])
        cluster.patch("prunejobs", "demo", {"status": {
            **failed, "conditions": conditions, "bestFitness": 0.125, "fitnessMetric": "kl", "restarts": 1,
            "evaluations": 40, "generation": 3, "observedGeneration": 1, **st.progress(37.5, 430)}},
            "default", subresource="status")
        stored = cluster.get("prunejobs", "demo", "default")["status"]
        assert stored["progress"] == "37/430" and stored["fitnessMetric"] == "kl" and stored["budget"] == 430

        def column(name: str) -> str:
            (c,) = [c for c in VERSION["additionalPrinterColumns"] if c["name"] == name]
            return cluster.kubectl("get", "pj", "demo", "-o", f"jsonpath={{{c['jsonPath']}}}").stdout

        assert column("Phase") == "Failed"
        assert column("Reason") == "TooManyFailedEvaluations"
        assert column("Best") == "0.125" and column("Metric") == "kl"
        assert column("Restarts") == "1" and column("Suspended") == "false"  # the CRD's default
        assert column("Strategy") == "genetic" and column("Progress") == "37/430"
        assert column("Evaluations") == "40" and column("Ratio") == "0.3" and column("Generation") == "3"
        # a running one: the Running condition's reason
        cluster.patch("prunejobs", "demo", {"status": {"phase": "Running", "conditions": [
            st.condition(st.RUNNING, "True", "SearchRunning", "the controller is running the search", 1)]}},
            "default", subresource="status")
        assert column("Reason") == "SearchRunning"
        # the category lists PruneJobs
        assert "demo" in cluster.kubectl("get", "selfpruner", "-o", "name").stdout
        table = cluster.kubectl("get", "pj", "-o", "wide").stdout.splitlines()
        assert table[0].split()[:4] == ["NAME", "PHASE", "REASON", "BEST"], table
        assert json.loads(cluster.kubectl("get", "pj", "demo", "-o", "json").stdout)["status"]["phase"] == "Running"
