"""The installation's settings end to end, through the real operator (kopf), the controller and kubectl
against the API-server emulator (tests/operator_world.py): a PruneJob that omits its texts and its LLM
is refused at admission; one naming a Kueue priority the installation does not allow too; the chart's
pod settings (SELFPRUNER_PODS) reach the controller's pod and, through it, the GPU Jobs it creates."""

from __future__ import annotations

import copy
import json

from operator_world import (apply, condition, jobs_of, needs_kubectl, renamed, restart_operator,  # noqa: F401
                            wait, wait_phase, world)
from s3_server import s3_endpoint  # noqa: F401  (a pytest fixture)

pytestmark = needs_kubectl
QUEUE, PRIORITY = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"


def test_tenant_a_omits_texts_and_llm_on_a_cluster_and_is_refused_at_admission(world, tmp_path):
    """Without texts the API server fills in demo:calibration, ... (fetched from PyPI by the pods at run
    time); without `llm`, with the default strategy, the local demo LLM (not in the pruner image)."""
    cluster, kubelet, operator, doc, endpoint = world
    bare = renamed(doc, "no-texts")
    del bare["spec"]["calibration"]["text"]
    del bare["spec"]["fitness"]["text"], bare["spec"]["fitness"]["heldOutText"]
    bare["spec"]["search"] = {**bare["spec"]["search"], "strategy": "llm-evolution"}
    bare["spec"].pop("llm", None)
    apply(cluster, bare, tmp_path)
    pj = wait_phase(cluster, "no-texts", ("Invalid", "Pending", "Running"), timeout=60)
    assert pj["status"]["phase"] == "Invalid", pj["status"]
    message = condition(pj, "Invalid")["message"]
    assert "spec.calibration.text, spec.fitness.text, spec.fitness.heldOutText: demo texts" in message, message
    assert "give each an s3:// URI" in message and "spec.llm: the local demo LLM" in message, message
    assert "\n" not in message
    assert jobs_of(cluster, "no-texts") == []

    # a Kueue priority the installation does not hand out (it would preempt other tenants' workloads)
    greedy = renamed(doc, "greedy")
    greedy["metadata"]["labels"] = {QUEUE: "team-a", PRIORITY: "system-critical"}
    apply(cluster, greedy, tmp_path)
    pj = wait_phase(cluster, "greedy", ("Invalid", "Pending", "Running"), timeout=60)
    assert pj["status"]["phase"] == "Invalid", pj["status"]
    assert f"label {PRIORITY}='system-critical' is not allowed" in condition(pj, "Invalid")["message"]
    assert jobs_of(cluster, "greedy") == []


PODS = {"imagePullSecrets": [{"name": "registry-creds"}], "gpuResource": "nvidia.com/mig-1g.10gb",
        "runtimeClassName": "nvidia", "podLabels": {"sidecar.istio.io/inject": "false"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "controller": {"resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}},
        "podSecurityContext": {"runAsUser": 1000680000}}


def test_the_installations_pod_settings_reach_the_controller_and_its_gpu_jobs(world, tmp_path):
    cluster, kubelet, operator, doc, endpoint = world
    restart_operator(operator, SELFPRUNER_PODS=json.dumps(PODS), SELFPRUNER_POLICY=json.dumps(
        {"allowedSecrets": ["s3-credentials"], "allowedWorkloadPriorityClasses": ["batch-low"]}))
    pj = copy.deepcopy(renamed(doc, "settings"))
    pj["metadata"]["labels"] = {QUEUE: "team-a", PRIORITY: "batch-low"}
    apply(cluster, pj, tmp_path)

    def by_component(component):
        return [j for j in jobs_of(cluster, "settings")
                if j["metadata"]["labels"]["app.kubernetes.io/component"] == component]

    (controller,) = wait(lambda: by_component("controller"), 60, "the controller Job")
    # the first GPU Job (the preparation batch) is created by the controller process, from its own env
    gpu = wait(lambda: by_component("evaluator"), 120, "the controller's first evaluation Job")[0]
    for job in (controller, gpu):
        pod, meta = job["spec"]["template"]["spec"], job["spec"]["template"]["metadata"]
        assert pod["imagePullSecrets"] == PODS["imagePullSecrets"], job["metadata"]["name"]
        assert meta["labels"]["sidecar.istio.io/inject"] == "false"
        assert meta["annotations"]["example.com/owner"] == "ml-platform"
        assert pod["securityContext"]["runAsUser"] == 1000680000
    assert controller["spec"]["template"]["spec"]["containers"][0]["resources"] == PODS["controller"]["resources"]
    # the PruneJob's Kueue labels: on its GPU Jobs, not on its controller
    assert {QUEUE: "team-a", PRIORITY: "batch-low"}.items() <= gpu["metadata"]["labels"].items()
    assert not {QUEUE, PRIORITY} & controller["metadata"]["labels"].keys()
    # gpusPerPod 0 here: a CPU pod gets neither the RuntimeClass nor the GPU resource
    assert "runtimeClassName" not in gpu["spec"]["template"]["spec"]
    cluster.delete("prunejobs", "settings")
