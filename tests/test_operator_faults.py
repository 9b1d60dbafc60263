"""Faults in the cluster: a controller killed mid-search, a preempted pod, an operator
restart, an index that keeps failing, S3 answering 500s, and malformed PruneJobs.
The cluster is the emulator with a fake kubelet, S3 is moto (tests/operator_world.py)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import sys
import time

from operator_world import apply, needs_kubectl, output, renamed, runs_store, wait, wait_phase, world  # noqa: F401
from s3_server import FaultProxy, s3_endpoint  # noqa: F401  (a pytest fixture)
from k8s import ClusterApiError
from test_validate import CASES, mutate

pytestmark = needs_kubectl


def keys(history):
    return [(json.dumps(e["rates"]), e["tokens_budget"], e["text"]) for e in history]


def test_controller_killed_mid_search_resumes_with_the_same_result(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    apply(cluster, renamed(doc, "reference"), tmp_path)
    reference = wait_phase(cluster, "reference", ("Succeeded", "Failed"))
    assert reference["status"]["phase"] == "Succeeded"

    apply(cluster, renamed(doc, "killed"), tmp_path)
    pj = wait(lambda: cluster.get("prunejobs", "killed"), what="the PruneJob")
    store = runs_store(endpoint)
    latest = f"runs/{pj['metadata']['uid']}/state/latest.json"
    wait(lambda: store.exists(latest), what="the first checkpoint in S3")
    controller = cluster.get("prunejobs", "killed")["status"]["controllerJob"]
    pids = wait(lambda: kubelet.processes(controller), what="the controller process")
    os.kill(next(iter(pids.values())), signal.SIGKILL)

    pj = wait_phase(cluster, "killed", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    assert pj["status"]["restarts"] == 1
    assert "ControllerRestarted" in {e["reason"] for e in cluster.events("killed")}
    ref, res = output(endpoint, reference, "result.json"), output(endpoint, pj, "result.json")
    assert res["best"] == ref["best"]
    assert res["best_per_generation"] == ref["best_per_generation"]
    history, ref_history = output(endpoint, pj, "history.jsonl"), output(endpoint, reference, "history.jsonl")
    assert len(keys(history)) == len(set(keys(history))), "an evaluation was repeated"
    assert sorted(keys(history)) == sorted(keys(ref_history)), "an evaluation was lost or added"


def test_preempted_pod_and_operator_restart(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    apply(cluster, doc, tmp_path)

    def running_evaluator():
        for job in cluster.list("jobs", labels="selfpruner.io/prunejob=e2e"):
            labels = job["metadata"]["labels"]
            if labels.get("app.kubernetes.io/component") == "evaluator" and not job["metadata"]["name"].endswith("bprep"):
                pods = kubelet.processes(job["metadata"]["name"])
                if pods:
                    return job["metadata"]["name"], next(iter(pods))
        return None

    job_name, index = wait(running_evaluator, what="an evaluation pod")
    kubelet.preempt(job_name, index)
    operator.stop()  # and the operator dies too, mid-search
    time.sleep(1)
    operator.start()
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    job = cluster.get("jobs", job_name)
    assert job["status"].get("failed", 0) == 0, "a preemption spent the retry budget"
    assert job["status"]["succeeded"] == job["spec"]["completions"]
    controllers = [j for j in cluster.list("jobs", labels="selfpruner.io/prunejob=e2e")
                   if j["metadata"]["labels"]["app.kubernetes.io/component"] == "controller"]
    assert len(controllers) == 1 and pj["status"]["restarts"] == 0  # the operator restart changed nothing


FAIL_ONCE = """
import os, sys
marker = os.environ["SELFPRUNER_TEST_FAIL_MARKER"]
if (os.environ.get("SELFPRUNER_BATCH", "prep") != "prep" and os.environ.get("JOB_COMPLETION_INDEX") == "1"
        and not os.path.exists(marker)):
    open(marker, "w").close()
    sys.exit(42)  # this shard's candidates cannot be evaluated (say, out of GPU memory)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_failing_index_and_s3_errors(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    marker = tmp_path / "failed-once"
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", FAIL_ONCE, *argv[1:]]
                                             if argv[-1] == "worker" else argv)
    kubelet.override_env["SELFPRUNER_TEST_FAIL_MARKER"] = str(marker)
    with FaultProxy(endpoint) as proxy:
        doc = copy.deepcopy(doc)
        doc["spec"]["storage"]["endpointURL"] = proxy.url
        apply(cluster, doc, tmp_path)
        pj = wait(lambda: cluster.get("prunejobs", "e2e"), what="the PruneJob")
        latest = f"runs/{pj['metadata']['uid']}/state/latest.json"
        wait(lambda: runs_store(endpoint).exists(latest), what="the first checkpoint")
        proxy.fail(3)  # S3 answers 500 for a while, mid-search
        pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
        injected = [r for r in proxy.requests if r[3] == 500]
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    assert len(injected) == 3
    assert marker.exists()
    history = output(endpoint, pj, "history.jsonl")
    failed = [e for e in history if e.get("error")]
    # the recorded failure says why the shard's pod failed, not only its log
    assert failed and all("failed after its retries" in e["error"] and "its pods exited 42 (cannot be evaluated) "
                          "1 time" in e["error"] for e in failed), failed
    failed_jobs = [j for j in cluster.list("jobs", labels="selfpruner.io/prunejob=e2e")
                   if j["status"].get("failedIndexes")]
    assert [j["status"]["failedIndexes"] for j in failed_jobs] == ["1"]


EXTRA_CASES = [
    ("spec.fitness", {"tokens": 1}, "spec.fitness.tokens"),
    ("spec.calibration", {"seqLen": 1}, "spec.calibration.seqLen"),
    ("spec.search", {"generations": -1}, "spec.search.generations"),
    ("spec.llm", {"maxTokens": 1}, "spec.llm.maxTokens"),
    ("spec.evaluator", {"parallelism": 0}, "spec.evaluator.parallelism"),
    ("spec.storage", {"endpointURL": "http://minio"}, "spec.storage.uri: required field is missing"),
    ("spec.target", {"grid": 0.7}, "spec.target.grid"),
]


def test_malformed_prunejobs_are_refused_and_nothing_is_created(world, tmp_path):
    """Each malformed PruneJob is refused by the API server (the CRD's schema and CEL rules, and
    unknown fields under strict field validation, which `kubectl apply` asks for by default) or, for
    what the schema cannot say, by the operator (phase Invalid); the reason names the field either
    way, and nothing is created."""
    cluster, kubelet, operator, doc, endpoint = world
    cases = [c for c in CASES if c[0].startswith("spec.")] + EXTRA_CASES
    assert len(cases) >= 30
    by_server, by_operator = [], []
    for i, (path, value, message) in enumerate(cases):
        bad = mutate(path, value)
        bad["metadata"] = {"name": f"bad-{i}"}
        try:
            cluster.request("POST", cluster.path("prunejobs"), bad, params={"fieldValidation": "Strict"})
            by_operator.append((i, path, value, message))
        except ClusterApiError as e:
            assert e.code in (400, 422), (path, value, e)
            field, _, detail = message.partition(": ")
            text = e.status.get("message", "")
            # a map's key is written spec.evaluator.nodeSelector[gpu] by the server
            assert field in text or re.sub(r"\.([^.\[]+)$", r"[\1]", field) in text, (message, text)
            if "must" in detail:  # a CEL rule of the CRD: the server says its message
                assert detail in text, (message, text)
            by_server.append(i)
    for i, path, value, message in by_operator:
        pj = wait_phase(cluster, f"bad-{i}", ("Invalid", "Pending", "Running", "Succeeded", "Failed"), timeout=60)
        assert pj["status"]["phase"] == "Invalid", (path, value, pj["status"])
        condition = {c["type"]: c for c in pj["status"]["conditions"]}["Invalid"]
        assert message in condition["message"], (message, condition["message"])
    assert by_server and by_operator  # both layers are exercised
    assert cluster.list("jobs") == []


def test_suspend_holds_the_search_and_unsuspend_finishes_it(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    doc = copy.deepcopy(doc)
    doc["spec"]["suspend"] = True
    apply(cluster, doc, tmp_path)

    def suspended_job():
        jobs = [j for j in cluster.list("jobs", labels="selfpruner.io/prunejob=e2e")
                if j["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluator"]
        return jobs[0] if jobs and jobs[0]["spec"].get("suspend") else None

    job = wait(suspended_job, what="a suspended evaluation Job")
    wait(lambda: cluster.get("prunejobs", "e2e")["status"].get("phase") == "Suspended", what="phase Suspended")
    time.sleep(2)
    assert kubelet.processes(job["metadata"]["name"]) == {}  # nothing runs while suspended
    assert not (cluster.get("jobs", job["metadata"]["name"])["status"] or {}).get("succeeded")
    cluster.patch("prunejobs", "e2e", {"spec": {"suspend": False}})
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]


GPU_FAILS = """
import os, sys
if os.environ.get("SELFPRUNER_BATCH", "prep") != "prep" and os.environ.get("JOB_COMPLETION_INDEX") == "1":
    print("selfpruner worker: the device failed (OutOfMemoryError: CUDA out of memory); exit 43", file=sys.stderr)
    sys.exit(43)  # this shard's GPU fails on every pod: the worker's exit for a device error
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_more_failures_than_allowed_fail_the_search(world, tmp_path):
    """A shard whose GPU fails on every try: the Job retries it (backoffLimitPerIndex, default 2), then its
    candidates are recorded as failed, and with maxFailedEvaluations 0 the PruneJob fails saying why."""
    cluster, kubelet, operator, doc, endpoint = world
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", GPU_FAILS, *argv[1:]]
                                             if argv[-1] == "worker" else argv)
    doc = copy.deepcopy(doc)
    doc["spec"]["evaluator"]["maxFailedEvaluations"] = 0
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Failed"
    condition = {c["type"]: c for c in pj["status"]["conditions"]}["Failed"]
    assert condition["reason"] == "TooManyFailedEvaluations" and "maxFailedEvaluations (0)" in condition["message"]
    assert "its pods exited 43 (the GPU failed) 3 times" in condition["message"], condition
    assert pj["status"]["restarts"] == 0  # a verdict, not a lost controller
    assert not [j for j in cluster.list("jobs", labels="selfpruner.io/prunejob=e2e")
                if j["metadata"]["labels"]["app.kubernetes.io/component"] == "finalize"]
