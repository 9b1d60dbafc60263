"""The tenant boundary and the faults a real cluster has, end to end: an author who may only create
PruneJobs in one namespace tries to reach what the installation did not give them, and the API
server throttles, fails and drops connections. The real operator (kopf), controller and kubectl
against the strict API-server emulator with a fake kubelet, and moto's S3 (tests/operator_world.py)."""

from __future__ import annotations

import json
import os
import signal
import sys

from operator_world import (apply, condition, hold_second_shard, jobs_of, needs_kubectl, renamed,  # noqa: F401
                            restart_operator, wait, wait_phase, world)
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = needs_kubectl
INSTALLATION_LLM = {"baseURL": "http://vllm.selfpruner.svc:8000/v1", "apiKeySecret": {"name": "llm-key", "key": "token"}}


def test_tenant_a_tries_to_send_the_installation_llm_key_to_its_own_endpoint(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    restart_operator(operator, SELFPRUNER_DEFAULTS=json.dumps({"llm": INSTALLATION_LLM}))
    attack = renamed(doc, "exfiltrate")
    attack["spec"]["llm"] = {"provider": "openai", "model": "m", "baseURL": "https://attacker.example/v1",
                             "apiKeySecret": INSTALLATION_LLM["apiKeySecret"]}
    apply(cluster, attack, tmp_path)
    pj = wait_phase(cluster, "exfiltrate", ("Invalid", "Pending", "Running"), timeout=60)
    assert pj["status"]["phase"] == "Invalid", pj["status"]
    message = condition(pj, "Invalid")["message"]
    assert "the installation's LLM key 'llm-key' goes only to its own endpoint" in message and "\n" not in message
    assert jobs_of(cluster, "exfiltrate") == []


def test_tenant_a_tries_to_choose_the_controllers_environment_variable_names(world, tmp_path):
    """llm.apiKeyEnv: AWS_ENDPOINT_URL_S3 once put the LLM key into the controller's S3 endpoint (and,
    through the error message, into the status the author reads)."""
    cluster, kubelet, operator, doc, endpoint = world
    attack = renamed(doc, "env-name")
    attack["spec"]["suspend"] = True
    attack["spec"]["llm"] = {"apiKeyEnv": "AWS_ENDPOINT_URL_S3", "apiKeySecret": {"name": "s3-credentials",
                                                                                   "key": "AWS_SECRET_ACCESS_KEY"}}
    apply(cluster, attack, tmp_path)
    (job,) = wait(lambda: jobs_of(cluster, "env-name"), 60, "the controller Job")
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    names = [e["name"] for e in env]
    assert "AWS_ENDPOINT_URL_S3" not in names
    (key,) = [e for e in env if "valueFrom" in e]
    assert key["name"] == "SELFPRUNER_LLM_API_KEY"
    cluster.delete("prunejobs", "env-name")


FROZEN_EDITS = [
    ("storage", {"uri": "s3://private-of-b/runs"}, "storage cannot change once admitted"),
    ("evaluator", {"image": "docker.io/evil/reads-secrets:1"}, "image cannot change once admitted"),
    ("evaluator", {"nodeCache": "/"}, "nodeCache cannot change once admitted"),
    ("llm", {"baseURL": "https://attacker.example/v1"}, "baseURL cannot change once admitted"),
]


def test_tenant_a_tries_to_redirect_a_running_prunejob(world, tmp_path):
    """The API server refuses each edit (the CRD's transition rules), so no later controller restart
    can build a Job from it; an edit of what may change (suspend) goes through."""
    cluster, kubelet, operator, doc, endpoint = world
    running = renamed(doc, "frozen")
    running["spec"]["suspend"] = True
    apply(cluster, running, tmp_path)
    wait(lambda: jobs_of(cluster, "frozen"), 60, "the controller Job")
    before = cluster.get("prunejobs", "frozen")["spec"]
    for field, value, message in FROZEN_EDITS:
        edit = cluster.kubectl("patch", "prunejob", "frozen", "--type=merge", "-p",
                               json.dumps({"spec": {field: value}}), check=False)
        assert edit.returncode != 0 and message in edit.stderr, (field, edit.stderr)
    assert cluster.get("prunejobs", "frozen")["spec"] == before
    cluster.kubectl("patch", "prunejob", "frozen", "--type=merge", "-p", json.dumps({"spec": {"suspend": False}}))
    assert cluster.get("prunejobs", "frozen")["spec"]["suspend"] is False
    cluster.delete("prunejobs", "frozen")


def test_a_policy_tightened_mid_run_is_held_at_the_next_controller(world, tmp_path):
    """The installation stops handing out the Secret a running PruneJob uses: the operator checks the
    policy again when it resumes, refuses to build another Job with it, and stops what runs."""
    cluster, kubelet, operator, doc, endpoint = world
    # the tiny search could finish while the operator restarts: an evaluation shard waits until the end
    hold = hold_second_shard(kubelet, tmp_path)
    apply(cluster, renamed(doc, "tightened"), tmp_path)
    controller = wait(lambda: (cluster.get("prunejobs", "tightened").get("status") or {}).get("controllerJob"), 60,
                      "the controller")
    wait(lambda: kubelet.processes(controller), 60, "the controller process")
    restart_operator(operator, SELFPRUNER_POLICY=json.dumps({"allowedSecrets": []}))
    pj = wait_phase(cluster, "tightened", ("Invalid", "Failed", "Succeeded"), timeout=120)
    assert pj["status"]["phase"] in ("Invalid", "Failed"), pj["status"]
    assert "Secret 's3-credentials' is not one this installation hands" in json.dumps(pj["status"]["conditions"])
    wait(lambda: not any(kubelet.processes(j["metadata"]["name"]) for j in jobs_of(cluster, "tightened")), 60,
         "every pod of the PruneJob to be stopped")
    attempts = [j for j in jobs_of(cluster, "tightened") if j["metadata"]["labels"]["app.kubernetes.io/component"]
                == "controller"]
    assert len(attempts) <= 1, "a controller was started outside the policy"
    hold.unlink()


def test_api_server_blips_cost_no_controller(world, tmp_path):
    """429s with Retry-After, 5xx and reset connections on the controller's and the operator's own
    requests: every call is retried, so the search neither fails nor restarts its controller."""
    cluster, kubelet, operator, doc, endpoint = world
    faults = [
        cluster.faults.add(code=503, method="PATCH", path_regex=r"/prunejobs/blips/status", times=2),
        cluster.faults.add(code=429, method="POST", path_regex=r"/apis/batch/v1/namespaces/default/jobs$", times=2),
        cluster.faults.add(code=500, method="GET", path_regex=r"/apis/batch/v1/namespaces/default/jobs/blips-", times=3),
        # (the test's own polling reads the PruneJob: the resets go to the Job reads only the
        # operator and the controller make)
        cluster.faults.add(reset=True, method="GET", path_regex=r"/apis/batch/v1/namespaces/default/jobs/blips-",
                           times=2),
        cluster.faults.add(code=504, method="POST", path_regex=r"/api/v1/namespaces/default/events", times=1),
    ]
    apply(cluster, renamed(doc, "blips"), tmp_path)
    pj = wait_phase(cluster, "blips", ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    assert pj["status"]["restarts"] == 0, "a blip cost a controller"
    assert [f.hits for f in faults] == [f.times for f in faults], "a fault was never hit: the test tested nothing"


def test_a_search_that_keeps_progressing_is_restarted_as_often_as_it_is_lost(world, tmp_path):
    """The restart budget counts losses in a row without progress: with a budget of one, a search
    whose controller dies twice, each time after new evaluations, still finishes. Its long name
    also gives the longest child names (an Indexed Job's pods must fit `<job>-<index>` in 63)."""
    cluster, kubelet, operator, doc, endpoint = world
    restart_operator(operator, SELFPRUNER_MAX_CONTROLLER_RESTARTS="1")
    name = "a-search-with-a-name-of-sixty-three-characters-to-test-bounds-x"
    assert len(name) == 63
    job = renamed(doc, name)
    job["spec"]["search"]["generations"] = 4
    apply(cluster, job, tmp_path)

    def kill_after_progress(seen: int) -> int:
        def progressed():
            status = cluster.get("prunejobs", name).get("status") or {}
            return status.get("evaluations", 0) > seen and status.get("controllerJob") and \
                kubelet.processes(status["controllerJob"]) and status
        status = wait(progressed, 120, "progress")
        os.kill(next(iter(kubelet.processes(status["controllerJob"]).values())), signal.SIGKILL)
        return status["evaluations"]

    seen = kill_after_progress(0)
    wait(lambda: (cluster.get("prunejobs", name).get("status") or {}).get("restarts") == 1, 60, "the first restart")
    kill_after_progress(seen)
    pj = wait_phase(cluster, name, ("Succeeded", "Failed"))
    assert pj["status"]["phase"] == "Succeeded", pj["status"]
    assert pj["status"]["restarts"] == 2 and pj["status"]["controllerJob"].endswith("-controller-2")
    assert all(len(j["metadata"]["name"]) <= 58 for j in jobs_of(cluster, name[:63])
               if j["spec"].get("completionMode") == "Indexed")


def test_a_controller_pod_that_cannot_be_created_fails_the_prunejob_in_bounded_time(world, tmp_path):
    """No ServiceAccount: the Job controller cannot create the pod at all (FailedCreate), so there is
    no pod to wait for; the PruneJob says why and fails instead of staying Running forever."""
    cluster, kubelet, operator, doc, endpoint = world
    restart_operator(operator, SELFPRUNER_CONTROLLER_SERVICE_ACCOUNT="no-such-account")
    apply(cluster, renamed(doc, "no-account"), tmp_path)
    pj = wait_phase(cluster, "no-account", ("Failed", "Succeeded"), timeout=60)
    assert pj["status"]["phase"] == "Failed"
    failed = condition(pj, "Failed")
    assert failed["reason"] == "ControllerNotStarting" and 'serviceaccount "no-such-account" not found' in \
        failed["message"], failed
    assert "ControllerPending" in {e["reason"] for e in cluster.events("no-account")}


def test_a_controller_that_cannot_identify_its_prunejob_is_reported_not_restarted(world, tmp_path):
    """Exit 42 from the controller (here: a PruneJob document without a uid) fails its Job through the
    pod failure policy; the operator reports it instead of spending restarts on it."""
    cluster, kubelet, operator, doc, endpoint = world
    kubelet.override_env["SELFPRUNER_PRUNEJOB"] = json.dumps({"metadata": {"name": "broken"}})
    apply(cluster, renamed(doc, "broken"), tmp_path)
    pj = wait_phase(cluster, "broken", ("Failed", "Succeeded"), timeout=60)
    failed = condition(pj, "Failed")
    assert failed["reason"] == "ControllerCannotRun", failed
    assert pj["status"].get("restarts", 0) == 0
    del kubelet.override_env["SELFPRUNER_PRUNEJOB"]


def test_no_secret_value_reaches_the_status_an_author_reads(world, tmp_path):
    """A failure whose message carries a secret's value reaches the status and the events with the
    value replaced. Here the bucket the author names is spelled like the storage key id (the
    world's Secret holds AWS_ACCESS_KEY_ID=testing), so the store's own "no such bucket" carries it."""
    cluster, kubelet, operator, doc, endpoint = world
    leaky = renamed(doc, "leaky")
    leaky["spec"]["storage"] = {**leaky["spec"]["storage"], "uri": "s3://testing/runs"}
    apply(cluster, leaky, tmp_path)
    pj = wait_phase(cluster, "leaky", ("Failed", "Succeeded"), timeout=120)
    failed = condition(pj, "Failed")
    assert failed["reason"] == "InvalidInput" and "***" in failed["message"], failed
    text = json.dumps(pj["status"]) + json.dumps([e["message"] for e in cluster.events("leaky")])
    assert "testing" not in text


def test_gpu_pods_that_cannot_start_give_their_gpus_back_in_bounded_time(world, tmp_path):
    """An evaluation image that cannot be pulled keeps its pod waiting (a GPU held, on a real
    cluster): the PruneJob says so (condition EvaluationPending), and after
    evaluator.startTimeoutSeconds the Job is deleted and the search fails, instead of holding the
    GPU until activeDeadlineSeconds (six hours by default)."""
    cluster, kubelet, operator, doc, endpoint = world
    restart_operator(operator, SELFPRUNER_POLICY=json.dumps({"allowedSecrets": ["s3-credentials"],
                                                             "allowedImagePrefixes": ["registry.example/ml/"]}))
    broken = "registry.example/ml/pruner:no-such-tag"
    kubelet.unpullable.add(broken)
    job = renamed(doc, "no-pull")
    job["spec"]["evaluator"] = {**job["spec"]["evaluator"], "image": broken, "startTimeoutSeconds": 10}
    apply(cluster, job, tmp_path)

    def pending():
        pj = cluster.get("prunejobs", "no-pull")
        return next((c for c in (pj.get("status") or {}).get("conditions") or []
                     if c["type"] == "EvaluationPending" and c["status"] == "True"), None)

    assert wait(pending, 60, "EvaluationPending")["reason"] == "ErrImagePull"
    pj = wait_phase(cluster, "no-pull", ("Failed", "Succeeded"), timeout=90)
    failed = condition(pj, "Failed")
    assert failed["reason"] == "EvaluationNotStarting" and broken in failed["message"], failed
    evaluators = [j for j in jobs_of(cluster, "no-pull")
                  if j["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluator"]
    assert evaluators == [], "the Job whose pods could not start is still there"


PROBE = """
import json, sys, kubernetes
kubernetes.config.load_kube_config()
core, batch, custom = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api(), kubernetes.client.CustomObjectsApi()
tries = {
    "read its own namespace's S3 Secret": lambda: core.read_namespaced_secret("s3-credentials", "default"),
    "list Secrets": lambda: core.list_namespaced_secret("default"),
    "read tenant B's PruneJob": lambda: custom.get_namespaced_custom_object(
        "selfpruner.io", "v1alpha1", "team-b", "prunejobs", "victim"),
    "fail tenant B's PruneJob": lambda: custom.patch_namespaced_custom_object_status(
        "selfpruner.io", "v1alpha1", "team-b", "prunejobs", "victim", {"status": {"phase": "Failed"}}),
    "list tenant B's Jobs": lambda: batch.list_namespaced_job("team-b"),
    "read tenant B's Secret": lambda: core.read_namespaced_secret("s3-credentials", "team-b"),
}
codes = {}
for what, call in tries.items():
    try:
        call()
        codes[what] = 200
    except kubernetes.client.ApiException as e:
        codes[what] = e.status
open(sys.argv[1] + "-" + sys.argv[2], "w").write(json.dumps(codes))
"""


def test_a_hijacked_controller_or_evaluation_pod_gets_nothing_from_the_api_it_was_not_given(world, tmp_path):
    """Code that runs in tenant A's pods (a model's remote code, a compromised image) uses the pod's
    own ServiceAccount token against the API server: it may not read the Secrets its pod was only
    given as variables, nor touch tenant B's PruneJobs, Jobs or Secrets. The emulator enforces the
    chart's RBAC (tests/k8s/rbac.py), so this is what the chart grants, not what the test assumes."""
    cluster, kubelet, operator, doc, endpoint = world
    cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-b"}})
    victim = {**renamed(doc, "victim"), "metadata": {"name": "victim", "namespace": "team-b"}}
    cluster.create(victim, namespace="team-b")
    cluster.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                    "stringData": {"AWS_SECRET_ACCESS_KEY": "tenant-b"}}, namespace="team-b")
    out = tmp_path / "probe"
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", PROBE, str(out), argv[-1]]
                                             if argv[-1] in ("controller", "worker") else argv)
    apply(cluster, renamed(doc, "hijacked"), tmp_path)
    wait(lambda: (tmp_path / "probe-controller").exists(), 120, "the hijacked controller pod's probe")
    controller = json.loads((tmp_path / "probe-controller").read_text())
    assert controller == {what: 403 for what in controller}, controller
    assert len(controller) == 6
    assert (cluster.get("prunejobs", "victim", namespace="team-b").get("status") or {}).get("phase") != "Failed"
    # an evaluation pod mounts no token at all (automountServiceAccountToken: false): nothing either
    kubelet.hooks["command"] = lambda argv: ([sys.executable, "-c", PROBE, str(out), argv[-1]]
                                             if argv[-1] == "worker" else argv)
    apply(cluster, renamed(doc, "hijacked-worker"), tmp_path)
    wait(lambda: (tmp_path / "probe-worker").exists(), 180, "a hijacked evaluation pod's probe")
    worker = json.loads((tmp_path / "probe-worker").read_text())
    assert len(worker) == 6 and set(worker.values()) <= {401, 403}, worker
