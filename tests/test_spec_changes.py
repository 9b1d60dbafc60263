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


def refused(old: dict, new: dict) -> list[str]:
    """The messages of the transition rules an update from `old` to `new` breaks."""
    out = []
    for rule in TRANSITION:
        program = ENV.program(ENV.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}):
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
    ("llm.baseURL", "http://other/v1", True), ("suspend", True, True), ("evaluator.parallelism", 7, True),
    ("llm.temperature", 0.1, False), ("llm.model", "other", False), ("llm.seed", 3, False),
    ("target.ratio", 0.2, False), ("search.generations", 9, False), ("model.source", "demo", False),
])
def test_the_crd_refuses_edits_that_change_the_result_and_allows_the_rest(tiny_job, path, value, allowed):
    old = defaulted(tiny_job("t", llm={"provider": "openai", "model": "m", "baseURL": "http://llm/v1"}))
    new = copy.deepcopy(old)
    section, _, field = path.rpartition(".")
    (new[section] if section else new)[field] = value
    problems = refused(old, new)
    assert (not problems) == allowed, problems
    # what the CRD lets change is exactly what a resumed search does not hold against its state
    assert (spec_hash(old) == spec_hash(new)) == allowed


def test_a_search_resumes_after_its_llm_timeout_changed(tiny_job):
    doc = tiny_job("resume", search={"generations": 1, "population": 4})
    first = runner.run(spec_mod.parse(doc), progress=False)
    doc["spec"]["llm"] = {"timeoutSeconds": 300, "maxRetries": 1, "concurrency": 2}
    again = runner.run(spec_mod.parse(doc), progress=False)  # refused its own state before
    assert again["best"] == first["best"]
