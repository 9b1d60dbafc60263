"""How a PruneJob fails, and what it leaves running: a final failure is reported once (phase,
reason in a condition and an Event) and never retried; a controller pod that cannot start says
why and fails in bounded time; one bad candidate costs only itself; a restarted controller adopts
the batch still running; a finished or deleted PruneJob leaves no running Job behind; a
PruneJob posts no Event per reconciliation. Cluster: the emulator with a fake kubelet; S3: moto."""

from __future__ import annotations

import os
import signal
import sys
import time

from operator_world import (IMAGE, apply, hold_second_shard, needs_kubectl, output, renamed, runs_store,  # noqa: F401
                            wait, wait_phase, world)
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = needs_kubectl
UID = "selfpruner.io/uid"


def children(cluster, pj, component=None):
    jobs = cluster.list("jobs", labels=f"{UID}={pj['metadata']['uid']}")
    return [j for j in jobs if component in (None, j["metadata"]["labels"]["app.kubernetes.io/component"])]


def failed_condition(pj):
    return {c["type"]: c for c in pj["status"]["conditions"]}["Failed"]


def unfinished(jobs):
    return [j for j in jobs if not any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                                       for c in (j.get("status") or {}).get("conditions") or [])]


def test_final_failures_are_reported_once_and_never_retried(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    cases = {
        # the preparation Job fails for good: the model is not in the store
        "no-model": ({"model": {"source": "s3://models/absent"}}, "PrepareFailed", "the preparation Job failed"),
        # the store the PruneJob names does not exist
        "no-bucket": ({"storage": {**doc["spec"]["storage"], "uri": "s3://no-such-bucket/runs"}}, "InvalidInput",
                      "no-such-bucket"),
    }
    for name, (sections, _, _) in cases.items():
        bad = renamed(doc, name)
        bad["spec"].update(sections)
        apply(cluster, bad, tmp_path)
    for name, (_, reason, message) in cases.items():
        pj = wait_phase(cluster, name, ("Succeeded", "Failed"), timeout=120)
        assert pj["status"]["phase"] == "Failed", pj["status"]
        condition = failed_condition(pj)
        assert condition["reason"] == reason and message in condition["message"], condition
        assert pj["status"]["restarts"] == 0, "a final failure was retried"
        assert len(children(cluster, pj, "controller")) == 1
        # the controller writes the status, then the event (so a lost event is posted again, never twice):
        # a reader can see the phase a moment before the event
        warnings = wait(lambda: [e for e in cluster.events(name) if e["reason"] == "Failed"], timeout=10,
                        what=f"the Failed event of {name}")
        assert len(warnings) == 1 and reason in warnings[0]["message"]
        # the operator's own condition survives the controller's status writes
        assert {c["type"] for c in pj["status"]["conditions"]} >= {"ControllerStarted", "Failed"}


def test_a_controller_pod_that_cannot_start_says_why_and_fails_in_bounded_time(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    kubelet.unpullable.add(IMAGE)
    apply(cluster, renamed(doc, "no-image"), tmp_path)

    def pending(name):
        pj = cluster.get("prunejobs", name)
        return next((c for c in (pj.get("status") or {}).get("conditions") or []
                     if c["type"] == "ControllerPending" and c["status"] == "True"), None)

    assert wait(lambda: pending("no-image"), 30, "ControllerPending")["reason"] == "ErrImagePull"
    wait(lambda: "ControllerPending" in {e["reason"] for e in cluster.events("no-image")}, 10,
         "the ControllerPending event")  # posted from kopf's event queue, not with the status patch
    for name, reason in (("no-image", "ErrImagePull"), ("no-secret", "CreateContainerConfigError")):
        if name == "no-secret":
            kubelet.unpullable.clear()
            missing = renamed(doc, "no-secret")
            missing["spec"]["storage"]["credentialsSecret"] = {"name": "absent-secret"}  # allowed, but not there
            apply(cluster, missing, tmp_path)
        pj = wait_phase(cluster, name, ("Failed", "Succeeded"), timeout=60)
        condition = failed_condition(pj)
        assert condition["reason"] == "ControllerNotStarting" and reason in condition["message"], condition
        wait(lambda: not unfinished(children(cluster, pj)), 30, f"{name}'s controller Job to be deleted")
        wait(lambda: cluster.get("prunejobs", name)["status"].get("childrenStopped"), 30, "childrenStopped")


def kill_controller(cluster, kubelet, name):
    """SIGKILL the PruneJob's current controller process (a lost pod)."""
    controller = cluster.get("prunejobs", name)["status"]["controllerJob"]
    os.kill(next(iter(wait(lambda: kubelet.processes(controller), what="the controller").values())), signal.SIGKILL)


def test_a_restarted_controller_adopts_the_batch_still_running(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    hold = hold_second_shard(kubelet, tmp_path)
    apply(cluster, doc, tmp_path)
    pj = wait(lambda: cluster.get("prunejobs", "e2e"), what="the PruneJob")

    def half_done():
        for job in children(cluster, pj, "evaluator"):
            st = job.get("status") or {}
            if not job["metadata"]["name"].endswith("bprep") and st.get("succeeded", 0) >= 1 and st.get("active"):
                return job
        return None

    wait(half_done, 120, "an evaluation batch half done")
    kill_controller(cluster, kubelet, "e2e")
    # the new controller resumes while the old batch still runs; only then the held shard goes on
    wait(lambda: cluster.get("prunejobs", "e2e")["status"].get("restarts") == 1, 60, "a new controller")
    replacement = cluster.get("prunejobs", "e2e")["status"]["controllerJob"]
    wait(lambda: kubelet.processes(replacement), 30, "the new controller's process")
    time.sleep(8)  # long enough to load the state and ask for the batch again
    hold.unlink()
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded" and pj["status"]["restarts"] == 1, pj["status"]
    store = runs_store(endpoint)
    prefix = f"runs/{pj['metadata']['uid']}/tasks/"
    batches: dict[str, set] = {}
    for key in store.list(prefix):
        batch = key[len(prefix):].split("/")[0]
        batches.setdefault(batch, set()).update(t.get("id") for t in store.get_json(key)["tasks"])
    seen: dict[str, str] = {}
    for batch, ids in batches.items():
        for tid in ids - {None}:
            assert tid not in seen, f"candidate {tid} was asked in batch {seen[tid]} and again in {batch}"
            seen[tid] = batch
    assert len(children(cluster, pj, "evaluator")) == len(batches)


def test_a_failed_prunejob_gives_back_the_gpus_of_its_running_jobs(world, tmp_path):
    """A controller lost for good leaves its evaluation Job running (here: a shard held back); the
    PruneJob fails, and the operator deletes that Job and so its pods."""
    cluster, kubelet, operator, doc, endpoint = world
    operator.stop()
    operator.env["SELFPRUNER_MAX_CONTROLLER_RESTARTS"] = "0"  # the first loss is final
    operator.start()
    hold = hold_second_shard(kubelet, tmp_path)
    apply(cluster, doc, tmp_path)
    pj = wait(lambda: cluster.get("prunejobs", "e2e"), what="the PruneJob")

    def held():
        for job in children(cluster, pj, "evaluator"):
            if not job["metadata"]["name"].endswith("bprep") and kubelet.processes(job["metadata"]["name"]):
                return job["metadata"]["name"]
        return None

    job_name = wait(held, 120, "an evaluation pod held back")
    kill_controller(cluster, kubelet, "e2e")
    pj = wait_phase(cluster, "e2e", ("Failed", "Succeeded"), timeout=60)
    assert failed_condition(pj)["reason"] == "ControllerLost", pj["status"]
    wait(lambda: cluster.get("jobs", job_name) is None, 30, "the running evaluation Job to be deleted")
    wait(lambda: not kubelet.processes(job_name), 30, "its pods to be killed")
    # kopf posts events from a queue of its own: the warning may follow the deletions by a moment
    wait(lambda: "ChildrenStopped" in {e["reason"] for e in cluster.events("e2e")}, 10, "the ChildrenStopped event")
    hold.unlink()


ONE_BAD_CANDIDATE = """
import os, sys
from selfpruner import evaluate as ev

first = {}
real = ev.perplexity

def perplexity(*args, **kwargs):
    # injected: a candidate the model cannot evaluate (an error of the candidate's own, not the
    # device's: a device error is retried on another pod instead, tests/test_entrypoints.py)
    if os.environ.get("JOB_COMPLETION_INDEX") == "0" and not first:
        first["done"] = True
        raise RuntimeError("shapes cannot be multiplied (injected for the test)")
    return real(*args, **kwargs)

ev.perplexity = perplexity
from selfpruner.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_one_failing_candidate_costs_only_itself(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", ONE_BAD_CANDIDATE, *argv[3:]]
                                             if argv[-1] == "worker" else argv)
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    history = output(endpoint, pj, "history.jsonl")
    failed = [e for e in history if e.get("error")]
    batches = [j for j in children(cluster, pj, "evaluator") if not j["metadata"]["name"].endswith("bprep")]
    # one candidate per batch whose shard 0 ran: each failed alone, with its error text kept
    assert failed and all(e["error"] == "RuntimeError: shapes cannot be multiplied (injected for the test)" for e in failed)
    assert len(failed) <= len(batches)
    assert all(not (j["status"].get("failedIndexes") or "") for j in batches)  # no shard was failed
    assert len(history) - len(failed) >= len(failed) * 2  # the rest of each shard was evaluated


def test_finished_prunejobs_post_no_periodic_events_and_deleted_ones_leave_nothing_running(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    apply(cluster, doc, tmp_path)
    pj = wait_phase(cluster, "e2e", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded"
    wait(lambda: cluster.get("prunejobs", "e2e")["status"].get("childrenStopped"), 30, "the timer's last run")
    before = cluster.events("e2e")
    assert not [e for e in before if "succeeded" in e["message"].lower() and "Timer" in e["message"]], before
    time.sleep(3)  # six reconcile intervals
    assert len(cluster.events("e2e")) == len(before), "events were posted for a finished PruneJob"

    apply(cluster, renamed(doc, "deleted"), tmp_path)
    victim = wait(lambda: cluster.get("prunejobs", "deleted"), what="the PruneJob")
    wait(lambda: [j for j in children(cluster, victim, "evaluator") if (j.get("status") or {}).get("active")],
         120, "a running evaluation Job")
    cluster.kubectl("delete", "prunejob", "deleted", "--wait=false")
    wait(lambda: not children(cluster, victim), 30, "the Jobs to be deleted with their PruneJob")
    wait(lambda: not cluster.list("pods", labels=f"{UID}={victim['metadata']['uid']}"), 30, "the pods")
    wait(lambda: not any(kubelet.processes(j) for j in ("deleted",)), 10, "the processes")
