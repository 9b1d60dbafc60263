"""Which spec fields may change while a PruneJob runs. What decides the result is fixed by the
CRD's transition rules (the API server refuses the edit); how the LLM is reached (its URL, key,
timeouts, retries, concurrency) may change, and a search resumed after such an edit goes on
instead of refusing its own state. The rules are evaluated here with CEL, as the API server does."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import celpy
import pytest
import yaml

from selfpruner import spec as spec_mod
from selfpruner.search import runner

CRD = yaml.safe_load((Path(__file__).parents[1] / "crds" / "prunejob.yaml").read_text())
SPEC = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
TRANSITION = [r for r in SPEC["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
ENV = celpy.Environment()


def transition_rules(node: dict, path: tuple = ()):
    """(path below spec, rule) of every transition rule, at whatever depth the CRD puts it."""
    for rule in node.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"]:
            yield path, rule
    for key, sub in (node.get("properties") or {}).items():
        yield from transition_rules(sub, path + (key,))


def refused(old: dict, new: dict) -> list[str]:
    """The messages of the transition rules an update from `old` to `new` breaks (a rule applies
    where the old object has its node, as on the API server)."""
    out = []
    for path, rule in transition_rules(SPEC):
        o, n = old, new
        for key in path:
            o, n = (o or {}).get(key), (n or {}).get(key)
        if o is None or n is None:
            continue
        program = ENV.program(ENV.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(n), "oldSelf": celpy.json_to_cel(o)}):
            out.append(rule["message"])
    return out


def defaulted(doc: dict) -> dict:
    return dict(spec_mod.parse(doc).spec)


def spec_hash(spec: dict) -> str:
    return runner.spec_hash(spec_mod.parse({"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
                                            "metadata": {"name": "t"}, "spec": spec}))


def test_every_llm_field_is_either_fixed_by_the_crd_or_a_call_setting(tiny_job):
    fields = set(SPEC["properties"]["llm"]["properties"])
    (llm_rule,) = [r["rule"] for r in TRANSITION if "oldSelf.llm" in r["rule"]]
    fixed = set(re.findall(r"self\.llm\.(\w+) == oldSelf\.llm\.\1", llm_rule))
    assert fixed | set(runner.LLM_CALL_FIELDS) == fields and not fixed & set(runner.LLM_CALL_FIELDS)


@pytest.mark.parametrize("path,value,allowed", [
    ("llm.timeoutSeconds", 600, True), ("llm.maxRetries", 9, True), ("llm.concurrency", 2, True),
    ("suspend", True, True), ("evaluator.parallelism", 7, True),
    ("llm.temperature", 0.1, False), ("llm.model", "other", False), ("llm.seed", 3, False),
    ("target.ratio", 0.2, False), ("search.generations", 9, False), ("model.source", "demo", False),
    ("search.zeroShotBatchSize", 16, False), ("search.zeroShotTasks", ["piqa"], False),
])
def test_the_crd_refuses_edits_that_change_the_result_and_allows_the_rest(tiny_job, path, value, allowed):
    old = defaulted(tiny_job("t", llm={"provider": "openai", "model": "m", "baseURL": "http://llm/v1"}))
    new = copy.deepcopy(old)
    section, _, field = path.rpartition(".")
    (new[section] if section else new)[field] = value
    problems = refused(old, new)
    assert (not problems) == allowed, problems
    # what the CRD lets change is exactly what a resumed search does not hold against its state, but for
    # the fields only the last step reads: fixed on a cluster (its finalize pod records a device failure
    # there), free for a local rerun after one (the zero-shot tasks out of GPU memory, at a smaller batch)
    finish_only = section == "search" and field in runner.FINISH_FIELDS
    assert (spec_hash(old) == spec_hash(new)) == (allowed or finish_only)


@pytest.mark.parametrize("path,value", [
    ("llm.baseURL", "https://attacker.example/v1"), ("llm.apiKeySecret", {"name": "other", "key": "k"}),
    ("storage", {"uri": "s3://elsewhere/runs"}), ("storage.endpointURL", "https://attacker.example"),
    ("evaluator.image", "docker.io/evil/x:1"), ("evaluator.nodeCache", "/"),
])
def test_tenant_a_tries_to_redirect_secrets_images_or_host_paths_after_admission(tiny_job, path, value):
    """What decides where Secrets, images and host paths go is fixed once admitted, although it
    does not change the result: the policy was checked against the admitted values."""
    old = defaulted(tiny_job("t", llm={"provider": "openai", "model": "m", "baseURL": "http://llm/v1",
                                       "apiKeySecret": {"name": "llm", "key": "k"}},
                             storage={"uri": "s3://runs/a", "endpointURL": "http://minio:9000"}))
    new = copy.deepcopy(old)
    section, _, field = path.rpartition(".")
    (new[section] if section else new)[field] = value
    problems = refused(old, new)
    assert len(problems) == 1 and "cannot change once admitted" in problems[0], problems


def test_a_search_resumes_after_its_llm_timeout_changed(tiny_job):
    doc = tiny_job("resume", search={"generations": 1, "population": 4})
    first = runner.run(spec_mod.parse(doc), progress=False)
    doc["spec"]["llm"] = {"timeoutSeconds": 300, "maxRetries": 1, "concurrency": 2}
    again = runner.run(spec_mod.parse(doc), progress=False)  # refused its own state before
    assert again["best"] == first["best"]
