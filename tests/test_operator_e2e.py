"""`kubectl apply -f prunejob.yaml` end to end: the real operator (kopf), controller,
evaluation and finalize Jobs, against the Kubernetes emulator and moto's S3 server
(tests/operator_world.py; tests/README.md says what the emulator cannot show)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from operator_world import apply, needs_kubectl, wait, wait_phase, world  # noqa: F401  (a pytest fixture)
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)
from selfpruner import corpus, evaluate
from selfpruner.cluster.status import progress
from selfpruner.storage import open_store

pytestmark = needs_kubectl


def test_prunejob_end_to_end(world, tmp_path, _shared_task_data):
    cluster, kubelet, operator, doc, endpoint = world
    # the finalize Job also scores the zero-shot tasks (its pods' cache sees the session's task data)
    doc["spec"]["search"].update(zeroShotTasks=["arc_easy"], zeroShotLimit=2)
    # staged selection: screens on fresh windows go out to the evaluation pods as tasks with a sample
    doc["spec"]["fitness"]["stages"] = [{"tokens": 128, "survivors": 2}]
    pod_tasks = tmp_path / "pod-cache" / "tasks"
    pod_tasks.mkdir(parents=True, exist_ok=True)
    (pod_tasks / _shared_task_data.name).symlink_to(_shared_task_data, target_is_directory=True)
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed", "Invalid"))
    status = pj["status"]
    assert status["phase"] == "Succeeded", status
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert all(c["lastTransitionTime"] and "observedGeneration" in c for c in status["conditions"])
    assert status["generation"] == 3 and status["evaluations"] > 0
    assert status["restarts"] == 0
    # what `kubectl get pj -o wide` shows, from fields the CRD declares (else the API server prunes them)
    assert status["fitnessMetric"] == "perplexity"
    assert 0 < status["budgetSpent"] <= status["budget"] == 4 + 2 * 4  # population + generations × offspring
    assert status["progress"] == progress(status["budgetSpent"], 12)["progress"]  # e.g. "9.5/12"
    assert status["observedGeneration"] == pj["metadata"]["generation"]
    assert conditions["Running"]["reason"] == "SearchFinished"  # the printer column's Reason
    # the operator finds its controller through status.controllerJob: a field the CRD must declare, or
    # the API server prunes it and a lost controller is never restarted
    assert status["controllerJob"].endswith("-controller-0")
    assert status["checkpointURI"].startswith("s3://selfpruner/runs/")
    assert status["cost"]["tokensEvaluated"] > 0

    # the operator's events come from kopf's queue, a moment after the phase they tell of
    wait(lambda: {"ControllerStarted", "Succeeded"} <= {e["reason"] for e in cluster.events("e2e")}, 10,
         "the ControllerStarted and Succeeded events")

    # the checkpoint in S3 loads with transformers and measures what the search measured
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs = open_store("s3://selfpruner/runs", endpoint_url=endpoint)
    uid = pj["metadata"]["uid"]
    result = runs.get_json(f"runs/{uid}/output/result.json")
    local = tmp_path / "checkpoint"
    prefix = f"runs/{uid}/checkpoint/"
    for key in runs.list(prefix):
        target = local / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        runs.get_file(key, target)
    model = AutoModelForCausalLM.from_pretrained(local, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(local)
    fitness = doc["spec"]["fitness"]
    ids = corpus.tokenize(tokenizer, corpus.load_text(fitness["text"]))
    ppl = evaluate.perplexity(model, ids, seq_len=fitness["seqLen"], max_tokens=fitness["tokens"])
    assert ppl.perplexity == pytest.approx(result["best"]["fitness"], rel=1e-4)
    assert status["bestFitness"] == pytest.approx(result["best"]["fitness"])
    assert result["counters"]["screened_stage_0"] == 2 * 4  # both generations' offspring were screened
    zero_shot = result["zero_shot"]
    assert {"dense", "best"} <= set(zero_shot["table"]["rows"]), zero_shot
    assert zero_shot["models"]["best"]["arc_easy"]["documents"] == 2

    # the operator counts a phase when its reconcile timer sees it, and that run also marks the
    # children stopped: wait for that mark, not for a guess at the timer's next tick
    deadline = time.time() + 30
    while not (cluster.get("prunejobs", "e2e")["status"].get("childrenStopped")) and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.get("prunejobs", "e2e")["status"].get("childrenStopped"), "the operator never saw Succeeded"
    text = operator.metrics()
    assert 'selfpruner_prunejobs{namespace="default",phase="Succeeded"} 1.0' in text
    assert 'selfpruner_prunejobs_succeeded_total{namespace="default"} 1.0' in text
    assert 'selfpruner_prunejobs_failed_total{namespace="default",reason="ControllerLost"} 0.0' in text
    assert "selfpruner_operator_reconcile_duration_seconds_count" in text


def test_invalid_prunejob_is_refused_and_nothing_is_created(world, tmp_path):
    """The API server refuses a PruneJob its CRD's rules refuse, and `kubectl apply` says why in one
    line; a PruneJob the schema admits but the operator cannot run (a grid the bounds do not sit
    on) is Invalid, with the reason in its status and an event."""
    cluster, kubelet, operator, doc, _ = world
    bad = json.loads(json.dumps(doc))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["target"]["ratio"] = 0.9  # above maxRate 0.6: the CRD's CEL rule
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(bad))
    refused = cluster.kubectl("apply", "-f", str(path), check=False)
    assert refused.returncode != 0 and "ratio must lie between minRate and maxRate" in refused.stderr
    assert cluster.get("prunejobs", "bad") is None
    odd = json.loads(json.dumps(doc))
    odd["metadata"]["name"] = "odd"
    odd["spec"]["target"]["minRate"] = 0.005  # not on the 0.01 grid: the operator's own check
    apply(cluster, odd, tmp_path)
    pj = wait_phase(cluster, "odd", ("Invalid",), timeout=60)
    condition = {c["type"]: c for c in pj["status"]["conditions"]}["Invalid"]
    assert "spec.target.minRate: 0.005 is not a multiple of grid" in condition["message"]
    assert cluster.list("jobs", labels="selfpruner.io/prunejob=odd") == []
    wait(lambda: "Invalid" in {e["reason"] for e in cluster.events("odd")}, 10,
         "the Invalid event")  # posted from kopf's event queue, not with the status patch


def test_prunejobs_outside_the_installation_policy_are_invalid(world, tmp_path):
    """A PruneJob may not hand its pods a Secret the installation does not list, run them on an
    image of its own, or mount a folder of the node: each is Invalid, and nothing is created."""
    cluster, kubelet, operator, doc, _ = world
    cases = {
        "secret": ({"storage": {**doc["spec"]["storage"], "credentialsSecret": {"name": "db-password"}}},
                   "spec.storage.credentialsSecret: Secret 'db-password' is not one this installation hands"),
        "llm-secret": ({"llm": {"provider": "openai", "model": "m", "baseURL": "http://llm.example/v1",
                                "apiKeySecret": {"name": "db-password", "key": "password"}}},
                       "spec.llm.apiKeySecret: Secret 'db-password'"),
        "image": ({"evaluator": {**doc["spec"]["evaluator"], "image": "docker.io/someone/reads-secrets:1"}},
                  "spec.evaluator.image: 'docker.io/someone/reads-secrets:1' is not the pruner image"),
        "hostpath": ({"evaluator": {**doc["spec"]["evaluator"], "nodeCache": "/etc"}},
                     "spec.evaluator.nodeCache: this installation does not allow hostPath node caches"),
    }
    for name, (sections, message) in cases.items():
        bad = json.loads(json.dumps(doc))
        bad["metadata"]["name"] = f"policy-{name}"
        bad["spec"].update(sections)
        apply(cluster, bad, tmp_path)
    for name, (_, message) in cases.items():
        pj = wait_phase(cluster, f"policy-{name}", ("Invalid",), timeout=60)
        condition = {c["type"]: c for c in pj["status"]["conditions"]}["Invalid"]
        assert message in condition["message"], (name, condition["message"])
        assert cluster.list("jobs", labels=f"selfpruner.io/prunejob=policy-{name}") == []


def test_installation_defaults_supply_the_store_and_without_them_the_prunejob_is_invalid(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    bare = json.loads(json.dumps(doc))
    store = bare["spec"].pop("storage")
    bare["metadata"]["name"] = "nostore"
    apply(cluster, bare, tmp_path)
    pj = wait_phase(cluster, "nostore", ("Invalid",), timeout=60)
    condition = {c["type"]: c for c in pj["status"]["conditions"]}["Invalid"]
    assert condition["message"].startswith("spec.storage: required on a cluster")
    assert cluster.list("jobs", labels="selfpruner.io/prunejob=nostore") == []

    # the chart's `defaults.storage`, as the Deployment hands it to the operator
    operator.stop()
    operator.env["SELFPRUNER_DEFAULTS"] = json.dumps({"storage": store})
    operator.start()
    bare["metadata"]["name"] = "defaulted"
    apply(cluster, bare, tmp_path)
    deadline = time.time() + 60
    while not (jobs := cluster.list("jobs", labels="selfpruner.io/prunejob=defaulted")) and time.time() < deadline:
        time.sleep(0.2)
    assert len(jobs) == 1, jobs  # the controller: it hands the same spec to every Job it starts
    env = {e["name"]: e.get("value") for e in jobs[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["SELFPRUNER_PRUNEJOB"])["spec"]["storage"] == store
    assert env["SELFPRUNER_STORE"] == store["uri"]
    assert "storage" not in cluster.get("prunejobs", "defaulted")["spec"]  # the user's object is left as written
    events = wait(lambda: {e["reason"]: e["message"] for e in cluster.events("defaulted")
                           if e["reason"] == "DefaultsApplied"}, 10, "the DefaultsApplied event")  # kopf's queue
    assert events["DefaultsApplied"] == "from the installation's defaults: storage"
